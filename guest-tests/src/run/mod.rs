//! Running the suite: for each kernel, its config checked where one lies
//! beside it (a test whose options it lacks is skipped, unbooted) and an
//! initramfs; for each test, a fresh disk, a `dmaprobe serve` child (or, with
//! [`Daemon::QemuStorageDaemon`], QEMU's own backend), a QEMU boot, the
//! guest's events, the host's checks, and a verdict that joins them with the
//! kernel log.
//!
//! This file holds the run and the story of each test in it; the steps are
//! its modules:
//!
//! - `config`: what the run is asked to do ([`RunConfig`], [`Transport`],
//!   [`Daemon`], [`Mutant`]).
//! - `disk`: each test's disk image, made before the boot and checked after.
//! - `daemon`: the daemon that serves it, restarted when the guest asks, and
//!   its control socket; `sampler`: the daemon sampled through a soak.
//! - `qemu`: one boot of the guest; `events`: what the guest and the daemon
//!   wrote, read back.
//! - `verdict`: the evidence judged into a [`TestResult`] (`result`);
//!   `logs`: a test's files, kept where the user asked, each kernel in a
//!   directory named by [`path_component`] of its (distinct) name.

mod accel;
mod config;
mod daemon;
mod disk;
mod events;
mod logs;
mod qemu;
mod result;
mod sampler;
mod schedule;
mod verdict;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use accel::Accel;
pub use config::{distinct_names, Case, Daemon, Mutant, RunConfig, Shard, Transport, QSD};
pub use logs::path_component;
pub use result::{CheckRecord, TestResult, Timing};
pub use schedule::default_jobs;

use accel::Machine;
use daemon::{between_boots, DaemonRun};
use disk::{host_checks, make_disk};
use events::{read_events, read_json_lines};
use logs::{append_file, keep_logs, keep_timeline};
use qemu::{Boot, Console, REPEATED_BOOT};
use result::Evidence;
use sampler::Sampler;
use verdict::judge;

use crate::initramfs::{self, Contents};
use crate::kconfig::{self, KernelConfig};
use crate::kernel::{Kernel, Modules};
use crate::modules::{self, ModuleIndex};
use crate::protocol::{GuestParams, Verdict};
use crate::suite::TestSpec;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("Cannot make the initramfs for {kernel}")]
    Initramfs {
        kernel: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("Cannot create a temporary directory")]
    TempDir(#[source] std::io::Error),
    #[error("--accel kvm: KVM does not run guests here ({0}); use --accel tcg or auto")]
    Kvm(String),
}

/// Runs this shard's cases of the run ([`RunConfig::cases`]), `jobs` at
/// once; `progress` hears of each step. The results in the reports' order.
pub fn run(
    config: &RunConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<TestResult>, RunError> {
    let work = tempfile::Builder::new()
        .prefix("dmaprobe-run.")
        .tempdir()
        .map_err(RunError::TempDir)?;
    let kernels = distinct_names(&config.kernels);
    let mut jobs: Vec<Job> = config
        .matrix()
        .enumerate()
        .filter(|&(n, _)| config.shard.takes(n))
        .map(|(n, (kernel, transport, test))| Job {
            number: n,
            kernel: &kernels[kernel],
            transport,
            test,
            skip: None,
            initrd: None,
        })
        .collect();
    for (k, kernel) in kernels.iter().enumerate() {
        let initrd = work.path().join(format!("initramfs-{k}.cpio"));
        let scratch = work.path().join(format!("modules-{k}"));
        let mine = jobs.iter_mut().filter(|j| std::ptr::eq(j.kernel, kernel));
        prepare(config, kernel, mine.collect(), &scratch, &initrd, progress)?;
    }
    let machine = choose_machine(config, &jobs, work.path(), progress)?;
    let work_dir = work.path();
    let results = schedule::run_cases(
        jobs.len(),
        config.jobs,
        &|i| jobs[i].test.alone,
        &crate::process::interrupted,
        &|i, voice| {
            let job = &jobs[i];
            let dir = work_dir.join(format!("{}-{}", job.number, job.test.name));
            let say = |line: &str| voice.say(line);
            let result = job.run(config, machine, &dir, &say);
            tell_and_keep(config, &say, job, &dir, result)
        },
        progress,
    );
    if crate::process::interrupted() {
        progress("interrupted: stopping");
    }
    Ok(results.into_iter().flatten().collect())
}

/// One case of the run as this process runs it: its kernel, transport and
/// test, why the host skips it (if it does), and the kernel's initramfs.
#[derive(Debug)]
struct Job<'a> {
    /// Its place in the run's [`RunConfig::cases`].
    number: usize,
    kernel: &'a Kernel,
    transport: Transport,
    test: &'static TestSpec,
    skip: Option<String>,
    initrd: Option<PathBuf>,
}

impl Job<'_> {
    /// Its column in the reports.
    fn column(&self) -> String {
        self.transport.column(&self.kernel.name)
    }

    /// Runs it under `machine`, its files in `dir`, telling `say` it boots.
    fn run(
        &self,
        config: &RunConfig,
        machine: Machine,
        dir: &Path,
        say: &dyn Fn(&str),
    ) -> TestResult {
        if self.skip.is_none() {
            say(&format!("[{}] {}: booting", self.column(), self.test.name));
        }
        run_one(config, machine, self, dir)
    }
}

/// Readies `kernel` for its `jobs`: tells of it, reads its config (a job
/// whose options it lacks is skipped) and, if any job boots, builds its
/// initramfs at `initrd` with what those jobs need.
fn prepare(
    config: &RunConfig,
    kernel: &Kernel,
    mut jobs: Vec<&mut Job>,
    scratch: &Path,
    initrd: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), RunError> {
    if jobs.is_empty() {
        return Ok(());
    }
    progress(&format!("[{}] {}", kernel.name, describe(kernel)));
    if let Some(kconfig) = kernel_config(kernel, progress) {
        for job in jobs.iter_mut() {
            job.skip = kconfig::skip_reason(&kconfig, job.test, job.transport.name());
        }
    }
    let booted: Vec<&Job> = jobs
        .iter()
        .map(|j| &**j)
        .filter(|j| j.skip.is_none())
        .collect();
    if booted.is_empty() {
        return Ok(());
    }
    progress(&format!("[{}] building the initramfs", kernel.name));
    let wanted = modules_wanted(&booted);
    build_initramfs(config, &wanted, kernel, scratch, initrd).map_err(|source| {
        RunError::Initramfs {
            kernel: kernel.name.clone(),
            source,
        }
    })?;
    for job in jobs.iter_mut().filter(|j| j.skip.is_none()) {
        job.initrd = Some(initrd.to_owned());
    }
    Ok(())
}

/// The accelerator for the run's guests, proved by booting the first job's
/// kernel and initramfs with no test ([`accel`]); said once on `progress`.
/// With no job to boot, nothing is probed.
fn choose_machine(
    config: &RunConfig,
    jobs: &[Job],
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Machine, RunError> {
    let Some((kernel, initrd)) = jobs
        .iter()
        .find_map(|j| Some((j.kernel, j.initrd.as_ref()?)))
    else {
        return Ok(Machine::Tcg);
    };
    let probe = |args: &[&str]| accel::probe_boot(&config.qemu, &kernel.image, initrd, work, args);
    let choice =
        accel::choose(config.accel, Path::new(accel::KVM_DEVICE), &probe).map_err(RunError::Kvm)?;
    progress(&choice.line());
    Ok(choice.machine)
}

/// Tells `say` how a test ended (and of a boot repeated), keeps its logs
/// and its timeline where the user asked; the result, its timeline where it
/// was kept.
fn tell_and_keep(
    config: &RunConfig,
    say: &dyn Fn(&str),
    job: &Job,
    dir: &Path,
    mut result: TestResult,
) -> TestResult {
    let (column, test) = (job.column(), job.test);
    for (_, why) in result.notes.iter().filter(|(k, _)| k == REPEATED_BOOT) {
        say(&format!("[{column}] {}: booted again: {why}", test.name));
    }
    say(&format!(
        "[{column}] {}: {} ({:.1} s){}",
        test.name,
        result.verdict.word(),
        result.seconds,
        if result.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", result.reason)
        }
    ));
    // A test skipped unbooted has no logs to keep.
    if let Some(keep) = config.keep_logs.as_ref().filter(|_| dir.exists()) {
        if let Err(e) = keep_logs(dir, keep, &column, test.name) {
            say(&format!("[{column}] {}: logs not kept: {e}", test.name));
        }
    }
    result.timeline = match (result.timeline.take(), &config.timelines) {
        (Some(svg), Some(to)) => match keep_timeline(&svg, to, &column, test.name) {
            Ok(kept) => Some(kept),
            Err(e) => {
                say(&format!("[{column}] {}: timeline not kept: {e}", test.name));
                None
            }
        },
        _ => None,
    };
    result
}

/// A kernel's image and modules, as the run tells the user.
fn describe(kernel: &Kernel) -> String {
    let modules = match &kernel.modules {
        Some(Modules::Indexed(dir)) => format!("modules {}", dir.display()),
        Some(Modules::Unindexed(dir)) => {
            format!("modules {} (indexed by a private depmod)", dir.display())
        }
        None => "no modules found (its drivers must be built in; if they are not, \
                 give its modules: --kernel PATH:MODULES)"
            .to_owned(),
    };
    format!("{}, {modules}", kernel.image.display())
}

/// The config of `kernel`, where one lies beside it ([`kconfig::find_config`]);
/// `progress` hears which, or that the tests' options go unchecked.
fn kernel_config(kernel: &Kernel, progress: &mut dyn FnMut(&str)) -> Option<KernelConfig> {
    let unchecked = "the options the tests need are not checked";
    let Some(path) = kconfig::find_config(kernel) else {
        progress(&format!(
            "[{}] no kernel config found beside it: {unchecked}",
            kernel.name
        ));
        return None;
    };
    match KernelConfig::read(&path) {
        Ok(read) => {
            progress(&format!(
                "[{}] the options the tests need are checked against {}",
                kernel.name,
                path.display()
            ));
            Some(read)
        }
        Err(e) => {
            let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
            progress(&format!("[{}] {e}{cause}: {unchecked}", kernel.name));
            None
        }
    }
}

/// The modules the initramfs of `jobs` (the ones that boot) packs: their
/// transports' (virtio-blk's, unless built in), then their tests', each
/// once. A run over NVMe alone needs no virtio module, so a kernel built
/// without virtio-blk runs it.
fn modules_wanted(jobs: &[&Job]) -> Vec<&'static str> {
    let transports = jobs.iter().flat_map(|j| j.transport.modules());
    let tests = jobs.iter().flat_map(|j| j.test.modules);
    let mut wanted = Vec::new();
    for &m in transports.chain(tests) {
        if !wanted.contains(&m) {
            wanted.push(m);
        }
    }
    wanted
}

/// The initramfs `kernel` boots, with the modules `wanted` (and their
/// dependencies, those not built in), at `out`; modules without an index
/// are indexed in `scratch` first.
fn build_initramfs(
    config: &RunConfig,
    wanted: &[&str],
    kernel: &Kernel,
    scratch: &Path,
    out: &Path,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let modules = match &kernel.modules {
        Some(Modules::Indexed(dir)) => ModuleIndex::load(dir)?.load_order(wanted)?,
        Some(Modules::Unindexed(dir)) => {
            // depmod wants a release that starts as a version does.
            let release = kernel.release.as_deref().unwrap_or("0.0.0");
            let dir = modules::index_privately(dir, release, scratch)?;
            ModuleIndex::load(&dir)?.load_order(wanted)?
        }
        None => Vec::new(),
    };
    initramfs::build(
        &Contents {
            guest_bin: &config.guest_bin,
            busybox: &config.busybox,
            programs: &config.programs,
            modules: &modules,
        },
        out,
    )?;
    Ok(())
}

/// Runs `job` under `machine`, its files in `dir`, and judges it; or, if
/// the host skips it (and says why), judges it unbooted.
fn run_one(config: &RunConfig, machine: Machine, job: &Job, dir: &Path) -> TestResult {
    let (kernel, test) = (job.kernel, job.test);
    let start = Instant::now();
    let mut ev = Evidence {
        skip: job.skip.clone(),
        ..Evidence::default()
    };
    if let (None, Some(initrd)) = (&ev.skip, &job.initrd) {
        let run = TestRun {
            config,
            machine,
            kernel,
            transport: job.transport,
            test,
            initrd,
            dir,
        };
        let ran = fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))
            .and_then(|()| run.guest_run(&mut ev));
        if let Err(e) = ran {
            ev.error = Some(e);
        }
    }
    // The judge reads the findings in the ledger; the timeline draws all of it.
    let ledger = ev.ledger.clone();
    let mut result = judge(test, kernel, config.daemon, ev);
    result.transport = job.transport;
    result.kernel = job.column();
    result.seconds = start.elapsed().as_secs_f64();
    result.timing.host = result.seconds - result.timing.boot - result.timing.guest;
    // Only dmaprobe keeps a ledger to draw.
    if result.verdict == Verdict::Fail && config.daemon == Daemon::Dmaprobe {
        let title = format!("{} on {}: {}", test.name, kernel.name, result.reason);
        let path = dir.join("timeline.svg");
        if fs::write(&path, crate::timeline::svg(&title, &ledger, &result.notes)).is_ok() {
            result.timeline = Some(path);
        }
    }
    result
}

/// One test on one kernel over one transport, its files in `dir`.
#[derive(Debug)]
struct TestRun<'a> {
    config: &'a RunConfig,
    machine: Machine,
    kernel: &'a Kernel,
    transport: Transport,
    test: &'a TestSpec,
    initrd: &'a Path,
    dir: &'a Path,
}

impl TestRun<'_> {
    /// The story of a test run: a fresh disk and its daemon, the guest's
    /// boots (the daemon sampled meanwhile, in a soak), then the evidence
    /// they left and, if the guest and the daemon finished cleanly, the
    /// host's checks of the disk. An error is harness trouble.
    fn guest_run(&self, ev: &mut Evidence) -> Result<(), String> {
        let (config, test, dir) = (self.config, self.test, self.dir);
        let disk = dir.join("disk.img");
        make_disk(test, &disk)?;
        let socket = dir.join("vhost.sock");
        let mut daemon = DaemonRun::start(config, self.transport, test, &disk, &socket, dir)?;
        let events = dir.join("events.jsonl");
        let sampler = test
            .soak
            .then(|| Sampler::start(&socket, dir.join("samples.jsonl")));

        let (outcome, console) = self.boots(&mut daemon, &socket, &events, &mut ev.timing);

        if let Some(sampler) = sampler {
            let plan = crate::soak::fault_plan(config.seed);
            ev.checks.extend(sampler.finish(&plan, &events));
        }
        let _ = fs::write(dir.join("console.log"), console.log());
        ev.notes.extend(
            console
                .repeated
                .iter()
                .map(|boot| (REPEATED_BOOT.to_owned(), boot.why.clone())),
        );
        ev.console = console.lines;
        let stopped = daemon.stop();
        ev.events = read_events(&events);
        ev.ledger = daemon
            .ledgers()
            .iter()
            .flat_map(|l| read_json_lines(l))
            .collect();
        ev.checks.append(&mut daemon.host_checks);
        outcome?;
        stopped?;
        ev.checks.extend(host_checks(test, &disk, &ev.events));
        Ok(())
    }

    /// Boots the guest as many times as the test says (once for most), on
    /// the one daemon, sending it the test's request between boots; how
    /// they went, and the console of them all. The events of every boot end
    /// up in `events`, their time in `timing`.
    fn boots(
        &self,
        daemon: &mut DaemonRun,
        socket: &Path,
        events: &Path,
        timing: &mut Timing,
    ) -> (Result<(), String>, Console) {
        let test = self.test;
        let mut params = self.guest_params();
        let timeout = test.boot_timeout(self.config.timeout_scale, self.config.soak_seconds);
        let mut outcome = Ok(());
        let mut console = Console::default();
        for n in 1..=test.boots.max(1) {
            params.boot = n;
            // A later boot's events go to a file of their own (QEMU truncates
            // its serial file) and are appended to the first boot's.
            let boot_events = match n {
                1 => events.to_owned(),
                _ => self.dir.join(format!("events.boot{n}.jsonl")),
            };
            if n > 1 {
                console.lines.push(format!(
                    "----- dmaprobe run: boot {n} of {} -----",
                    test.boots
                ));
            }
            let boot = Boot {
                config: self.config,
                machine: self.machine,
                kernel: self.kernel,
                transport: self.transport,
                initrd: self.initrd,
                socket,
                events: &boot_events,
                params: &params,
                timeout,
                reconnect: test.daemon_restarts,
            };
            outcome = boot.run(
                &mut |action| daemon.host_action(action),
                &mut console,
                timing,
            );
            if n > 1 {
                if let Err(e) = append_file(&boot_events, events) {
                    outcome = outcome.and(Err(e));
                }
            }
            if outcome.is_err() || n == test.boots {
                break;
            }
            if let Some(request) = test.between_boots {
                outcome = between_boots(socket, request, n, events);
                if outcome.is_err() {
                    break;
                }
            }
        }
        (outcome, console)
    }

    /// What the guest is told of its first boot.
    fn guest_params(&self) -> GuestParams {
        let (config, test, transport) = (self.config, self.test, self.transport);
        GuestParams {
            tests: vec![test.name.to_owned()],
            disk_size: Some(test.disk.size),
            lbs: Some(test.disk.lbs),
            seed: config.seed,
            mailbox: test.serve_args.contains(&"--mailbox"),
            boot: 1,
            duration: test.soak.then_some(config.soak_seconds),
            disk: (transport != Transport::VirtioBlk).then(|| transport.guest_disk().to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite;
    use std::path::PathBuf;

    /// A kernel build tree in `dir` whose `.config` has every option the
    /// suite needs but `drop`; its image is no kernel, and nothing boots it.
    fn build_tree(dir: &Path, drop: &str) -> Kernel {
        let top = dir.join("linux");
        let image = top.join("arch/x86/boot/bzImage");
        fs::create_dir_all(image.parent().unwrap()).unwrap();
        fs::write(&image, b"not a kernel").unwrap();
        let all: Vec<&'static TestSpec> = suite::TESTS.iter().collect();
        let config: String = kconfig::fragment(&all)
            .lines()
            .filter(|l| *l != format!("CONFIG_{drop}=y"))
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(top.join(".config"), config).unwrap();
        Kernel {
            name: "k".into(),
            image,
            modules: None,
            release: None,
        }
    }

    #[test]
    fn a_test_whose_options_the_kernels_config_lacks_is_skipped_unbooted() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::for_tests(Daemon::Dmaprobe);
        config.kernels = vec![build_tree(dir.path(), "UDF_FS")];
        config.tests = vec![suite::find("dio-zeroing-udf").unwrap()];
        config.transports = Transport::ALL.to_vec();
        let mut said = Vec::new();
        let results = run(&config, &mut |line| said.push(line.to_owned())).unwrap();

        let reason = "the kernel's config lacks CONFIG_UDF_FS (needed by dio-zeroing-udf)";
        let got: Vec<(&str, &str, Verdict, &str)> = results
            .iter()
            .map(|r| {
                (
                    r.kernel.as_str(),
                    r.test.as_str(),
                    r.verdict,
                    r.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("k", "dio-zeroing-udf", Verdict::Skip, reason),
                ("k nvme", "dio-zeroing-udf", Verdict::Skip, reason),
            ]
        );
        let said = said.join("\n");
        assert!(said.contains("linux/.config"), "{said}");
        assert!(
            said.contains(&format!("dio-zeroing-udf: SKIP (0.0 s): {reason}")),
            "{said}"
        );
        // Nothing to boot: no initramfs either.
        assert!(
            !said.contains("booting") && !said.contains("initramfs"),
            "{said}"
        );
    }

    #[test]
    fn the_other_tests_boot_and_without_a_config_every_test_does() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RunConfig::for_tests(Daemon::Dmaprobe);
        // An initramfs can be made (any files will do), but no daemon
        // starts (/x/dmaprobe): a test that boots ends in ERROR at once.
        config.guest_bin = PathBuf::from("/bin/true");
        config.busybox = PathBuf::from("/bin/true");
        config.kernels = vec![build_tree(dir.path(), "UDF_FS")];
        config.tests = vec![
            suite::find("smoke").unwrap(),
            suite::find("dio-zeroing-udf").unwrap(),
        ];
        let verdicts = |config: &RunConfig| {
            let results = run(config, &mut |_| {}).unwrap();
            results.iter().map(|r| r.verdict).collect::<Vec<_>>()
        };
        assert_eq!(verdicts(&config), [Verdict::Error, Verdict::Skip]);
        fs::remove_file(dir.path().join("linux/.config")).unwrap();
        assert_eq!(verdicts(&config), [Verdict::Error, Verdict::Error]);
    }

    #[test]
    fn an_nvme_run_packs_no_virtio_module_and_each_module_once() {
        let kernel = Kernel {
            name: "k".into(),
            image: PathBuf::new(),
            modules: None,
            release: None,
        };
        let job = |transport, test| Job {
            number: 0,
            kernel: &kernel,
            transport,
            test: suite::find(test).unwrap(),
            skip: None,
            initrd: None,
        };
        let smoke = job(Transport::Nvme, "smoke");
        let udf = job(Transport::Nvme, "dio-zeroing-udf");
        assert_eq!(modules_wanted(&[&smoke, &udf]), ["udf"]);
        let udf_virtio = job(Transport::VirtioBlk, "dio-zeroing-udf");
        assert_eq!(
            modules_wanted(&[&smoke, &udf, &udf_virtio]),
            ["virtio_pci", "virtio_blk", "udf"]
        );
    }

    #[test]
    fn every_transport_has_its_kernel_options() {
        for t in Transport::ALL {
            assert!(
                kconfig::options::INTERFACES
                    .iter()
                    .any(|(name, _)| *name == t.name()),
                "{}",
                t.name()
            );
        }
    }
}
