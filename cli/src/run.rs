//! `dmaprobe run`: resolve kernels and tests, run the guest suite, report.

use std::path::{Path, PathBuf};

use guest_tests::kernel;
use guest_tests::run::{default_jobs, run, Accel, Daemon, Mutant, RunConfig, Transport, QSD};
use guest_tests::suite::{Selection, TestSpec};
use guest_tests::{initramfs, report, suite};

use crate::args::RunArgs;
use backend::config::check_queues;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("Unknown test {0:?}; dmaprobe run --list shows the tests")]
    UnknownTest(String),
    #[error("{0} is a self-test: it fails on purpose and runs only with --allow-selftests")]
    Selftest(String),
    #[error(
        "{test} needs dmaprobe's own features ({features}), which {daemon} lacks; \
         run it with --daemon dmaprobe"
    )]
    NeedsDmaprobe {
        test: &'static str,
        features: String,
        daemon: &'static str,
    },
    #[error("--mutant breaks dmaprobe on purpose: it needs --daemon dmaprobe")]
    MutantNeedsDmaprobe,
    #[error("--transport nvme needs --daemon dmaprobe: qemu-storage-daemon has no NVMe interface")]
    NvmeNeedsDmaprobe,
    #[error("{0} not found: --transport nvme needs a QEMU with vfio-user-pci (10.1 or later); run scripts/setup, or give --qemu-nvme")]
    NoQemuNvme(PathBuf),
    #[error("{QSD} not found on PATH: run scripts/setup (it installs qemu-utils)")]
    NoQsd,
    #[error(
        "{program} not found on PATH (the {test} test runs it in the guest): run scripts/setup"
    )]
    NoProgram {
        program: &'static str,
        test: &'static str,
    },
    #[error(transparent)]
    Kernel(#[from] guest_tests::kernel::KernelError),
    #[error(transparent)]
    Fetch(#[from] guest_tests::catalogue::FetchError),
    #[error(transparent)]
    Config(#[from] backend::config::ConfigError),
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
    if args.list_kernels {
        print!(
            "{}",
            crate::kernel::listing(&guest_tests::kernel::cache_dir())
        );
        return Ok(true);
    }
    if args.list {
        let listed: Vec<&TestSpec> = suite::TESTS
            .iter()
            .filter(|t| t.selection != Selection::Selftest || args.allow_selftests)
            .collect();
        let width = listed.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in listed {
            println!(
                "{:width$}  {}",
                t.name,
                t.summary.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
        return Ok(true);
    }
    let json = args.json.clone();
    let junit = args.junit.clone();
    let (jobs, jobs_why) = match args.jobs {
        Some(n) => (usize::from(n), "--jobs".to_owned()),
        None => default_jobs(),
    };
    let config = RunConfig {
        jobs,
        ..run_config(args)?
    };
    eprintln!(
        "dmaprobe run: {} test(s) on {} kernel(s){}{}, {jobs} at once ({jobs_why})",
        config.tests.len(),
        config.kernels.len(),
        match config.daemon {
            Daemon::Dmaprobe => String::new(),
            other => format!(", the disk served by {}", other.name()),
        },
        shard_part(&config),
    );
    guest_tests::process::catch_interrupts();
    let results = run(&config, &mut |line| eprintln!("{line}"))?;
    println!("{}", report::table(&results));
    if let Some(path) = json {
        let matrix = report::Matrix {
            shard: config.shard,
            cases: config.cases(),
        };
        std::fs::write(&path, report::json(&results, &matrix))
            .map_err(|e| RunnerError::Write(path, e))?;
    }
    if let Some(path) = junit {
        std::fs::write(&path, report::junit(&results)).map_err(|e| RunnerError::Write(path, e))?;
    }
    if guest_tests::process::interrupted() {
        return Err(RunnerError::Interrupted);
    }
    Ok(report::all_good(&results))
}

/// What part of the run a shard runs, as the first line says it.
fn shard_part(config: &RunConfig) -> String {
    if config.shard.count == 1 {
        return String::new();
    }
    let all = config.cases().len();
    let mine = (0..all).filter(|&c| config.shard.takes(c)).count();
    format!(", shard {}: {mine} of the {all} cases", config.shard)
}

/// The run's configuration from its arguments, checked before anything
/// starts; one job at a time.
fn run_config(args: RunArgs) -> Result<RunConfig, RunnerError> {
    let daemon = Daemon::ALL
        .into_iter()
        .find(|d| d.name() == args.daemon)
        .unwrap_or(Daemon::Dmaprobe);
    let tests = if args.tests.is_empty() {
        default_tests(daemon)
    } else {
        named_tests(&args.tests, daemon, args.allow_selftests)?
    };
    check_daemon(daemon, args.mutant.is_some())?;
    let qemu_nvme = args.qemu_nvme.unwrap_or_else(|| {
        guest_tests::kernel::cache_dir().join("qemu-vfio-user/bin/qemu-system-x86_64")
    });
    let transports = transports(&args.transport, daemon, &qemu_nvme)?;
    let programs = programs(&tests)?;
    crate::kernel::fetch_missing(&args.kernels)?;
    let kernels = kernel::resolve_all(&args.kernels, args.modules.as_deref())?;
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
        daemon,
        guest_bin,
        programs,
        busybox: PathBuf::from(initramfs::BUSYBOX),
        qemu: args.qemu,
        qemu_nvme,
        transports,
        queues: check_queues(args.queues)?,
        seed: args.seed,
        keep_logs: args.keep_logs,
        timeout_scale: args.timeout_scale,
        timelines: args.timelines,
        soak_seconds: args.soak_seconds,
        shard: args.shard,
        jobs: 1,
        accel: Accel::ALL
            .into_iter()
            .find(|a| a.name() == args.accel)
            .unwrap_or(Accel::Auto),
        mutant: args
            .mutant
            .as_deref()
            .and_then(|m| Mutant::ALL.into_iter().find(|x| x.name() == m)),
    })
}

/// The tests named on the command line: each must exist, a self-test only
/// when self-tests are allowed, and one that needs dmaprobe's own features
/// only against dmaprobe.
fn named_tests(
    names: &[String],
    daemon: Daemon,
    allow_selftests: bool,
) -> Result<Vec<&'static TestSpec>, RunnerError> {
    names
        .iter()
        .map(|name| match suite::find(name) {
            None => Err(RunnerError::UnknownTest(name.clone())),
            Some(t) if t.selection == Selection::Selftest && !allow_selftests => {
                Err(RunnerError::Selftest(name.clone()))
            }
            Some(t) => match t.dmaprobe_features() {
                Some(features) if daemon != Daemon::Dmaprobe => Err(RunnerError::NeedsDmaprobe {
                    test: t.name,
                    features,
                    daemon: daemon.name(),
                }),
                _ => Ok(t),
            },
        })
        .collect()
}

/// Another daemon than dmaprobe plays no mutant and must be on the PATH.
fn check_daemon(daemon: Daemon, mutant: bool) -> Result<(), RunnerError> {
    if daemon != Daemon::Dmaprobe {
        if mutant {
            return Err(RunnerError::MutantNeedsDmaprobe);
        }
        if initramfs::find_on_path(QSD).is_none() {
            return Err(RunnerError::NoQsd);
        }
    }
    Ok(())
}

/// The interfaces `--transport` names; NVMe needs dmaprobe and the QEMU at
/// `qemu_nvme`.
fn transports(
    transport: &str,
    daemon: Daemon,
    qemu_nvme: &Path,
) -> Result<Vec<Transport>, RunnerError> {
    let transports = match transport {
        "nvme" => vec![Transport::Nvme],
        "both" => Transport::ALL.to_vec(),
        _ => vec![Transport::VirtioBlk],
    };
    if transports.contains(&Transport::Nvme) {
        if daemon != Daemon::Dmaprobe {
            return Err(RunnerError::NvmeNeedsDmaprobe);
        }
        if !qemu_nvme.is_file() {
            return Err(RunnerError::NoQemuNvme(qemu_nvme.to_owned()));
        }
    }
    Ok(transports)
}

/// The default suite; against another backend, the tests that need dmaprobe's
/// own features are left out, and the user is told which.
fn default_tests(daemon: Daemon) -> Vec<&'static TestSpec> {
    let (runnable, left_out): (Vec<&TestSpec>, Vec<&TestSpec>) = suite::default_tests()
        .into_iter()
        .partition(|t| daemon == Daemon::Dmaprobe || t.dmaprobe_features().is_none());
    if !left_out.is_empty() {
        let names: Vec<&str> = left_out.iter().map(|t| t.name).collect();
        eprintln!(
            "dmaprobe run: {} lacks dmaprobe's features; left out: {}",
            daemon.name(),
            names.join(", ")
        );
    }
    runnable
}

/// The host programs the tests run in the guest, found on PATH, each once.
fn programs(tests: &[&'static TestSpec]) -> Result<Vec<PathBuf>, RunnerError> {
    let mut found: Vec<PathBuf> = Vec::new();
    for t in tests {
        for &program in t.programs {
            let path = initramfs::find_on_path(program).ok_or(RunnerError::NoProgram {
                program,
                test: t.name,
            })?;
            if !found.contains(&path) {
                found.push(path);
            }
        }
    }
    Ok(found)
}
