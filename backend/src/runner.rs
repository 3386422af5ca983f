//! `dmaprobe run`: resolve kernels and tests, run the guest suite, report.

use std::path::PathBuf;

use guest_tests::kernel::{Kernel, DEFAULT_KERNELS};
use guest_tests::run::{run, Mutant, RunConfig};
use guest_tests::{initramfs, report, suite};

use crate::cli::RunArgs;
use crate::config::check_queues;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("Unknown test {0:?}; dmaprobe run --list shows the tests")]
    UnknownTest(String),
    #[error("{0} is a self-test: it fails on purpose and runs only with --allow-selftests")]
    Selftest(String),
    #[error(transparent)]
    Kernel(#[from] guest_tests::kernel::KernelError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("Cannot find this executable")]
    Exe(#[source] std::io::Error),
    #[error("Guest binary {0} not found: build it with `cargo build` (it sits beside dmaprobe), or give --guest-bin")]
    NoGuestBin(PathBuf),
    #[error("--timeout-scale must be a positive number")]
    TimeoutScale,
    #[error(transparent)]
    Run(#[from] guest_tests::run::RunError),
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("Interrupted: the results above are those of the tests that finished")]
    Interrupted,
}

/// Runs the suite; `Ok(true)` when nothing failed or errored.
pub fn run_suite(args: RunArgs) -> Result<bool, RunnerError> {
    if args.list {
        for t in suite::TESTS
            .iter()
            .filter(|t| !t.selftest || args.allow_selftests)
        {
            println!(
                "{:14} {}",
                t.name,
                t.summary.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
        return Ok(true);
    }
    let json = args.json.clone();
    let junit = args.junit.clone();
    let config = run_config(args)?;
    eprintln!(
        "dmaprobe run: {} test(s) on {} kernel(s)",
        config.tests.len(),
        config.kernels.len()
    );
    guest_tests::process::catch_interrupts();
    let results = run(&config, &mut |line| eprintln!("{line}"))?;
    println!("{}", report::table(&results));
    if let Some(path) = json {
        std::fs::write(&path, report::json(&results)).map_err(|e| RunnerError::Write(path, e))?;
    }
    if let Some(path) = junit {
        std::fs::write(&path, report::junit(&results)).map_err(|e| RunnerError::Write(path, e))?;
    }
    if guest_tests::process::interrupted() {
        return Err(RunnerError::Interrupted);
    }
    Ok(report::all_good(&results))
}

/// The run's configuration from its arguments, checked before anything starts.
fn run_config(args: RunArgs) -> Result<RunConfig, RunnerError> {
    let tests = if args.tests.is_empty() {
        suite::default_tests()
    } else {
        args.tests
            .iter()
            .map(|name| match suite::find(name) {
                None => Err(RunnerError::UnknownTest(name.clone())),
                Some(t) if t.selftest && !args.allow_selftests => {
                    Err(RunnerError::Selftest(name.clone()))
                }
                Some(t) => Ok(t),
            })
            .collect::<Result<_, _>>()?
    };
    let specs: Vec<String> = if args.kernels.is_empty() {
        DEFAULT_KERNELS.iter().map(|k| (*k).to_owned()).collect()
    } else {
        args.kernels
    };
    let kernels = specs
        .iter()
        .map(|k| Kernel::resolve(k, args.modules.as_deref()))
        .collect::<Result<_, _>>()?;
    let exe = std::env::current_exe().map_err(RunnerError::Exe)?;
    let guest_bin = args
        .guest_bin
        .unwrap_or_else(|| exe.with_file_name("dmaprobe-guest"));
    if !guest_bin.is_file() {
        return Err(RunnerError::NoGuestBin(guest_bin));
    }
    if !(args.timeout_scale > 0.0 && args.timeout_scale.is_finite()) {
        return Err(RunnerError::TimeoutScale);
    }
    Ok(RunConfig {
        kernels,
        tests,
        dmaprobe: exe,
        guest_bin,
        busybox: PathBuf::from(initramfs::BUSYBOX),
        qemu: args.qemu,
        queues: check_queues(args.queues)?,
        seed: args.seed,
        keep_logs: args.keep_logs,
        timeout_scale: args.timeout_scale,
        timelines: args.timelines,
        mutant: args
            .mutant
            .as_deref()
            .and_then(|m| Mutant::ALL.into_iter().find(|x| x.name() == m)),
    })
}
