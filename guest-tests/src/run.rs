//! Running the suite: for each kernel, an initramfs; for each test, a fresh disk,
//! a `dmaprobe serve` child (or, with [`Daemon::QemuStorageDaemon`], QEMU's own
//! backend), a QEMU boot, the guest's events, the host's checks, and a verdict
//! that joins them with the kernel log.

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::initramfs::{self, Contents, BASE_MODULES};
use crate::kernel::Kernel;
use crate::klog;
use crate::modules::ModuleIndex;
use crate::process::Child;
use crate::protocol::{pattern_mismatch, Event, GuestParams, HostAction, Verdict};
use crate::suite::{Fs, TestSpec};

/// How often the runner looks for requests from the guest while it runs.
const EVENT_POLL: Duration = Duration::from_millis(20);

/// How soon QEMU tries again to reach a daemon that went away.
const RECONNECT: Duration = Duration::from_millis(200);

/// How many console lines a report keeps of a guest that failed to finish.
const CONSOLE_TAIL: usize = 25;

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
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub kernels: Vec<Kernel>,
    pub tests: Vec<&'static TestSpec>,
    /// The `dmaprobe` executable that serves the disk.
    pub dmaprobe: PathBuf,
    /// Which backend serves the disk.
    pub daemon: Daemon,
    pub guest_bin: PathBuf,
    /// Host programs the selected tests run in the guest (packed into the initramfs).
    pub programs: Vec<PathBuf>,
    pub busybox: PathBuf,
    pub qemu: PathBuf,
    /// A QEMU with `vfio-user-pci` (10.1 or later), for the NVMe transport.
    pub qemu_nvme: PathBuf,
    /// The transports to run the tests over, one pass each.
    pub transports: Vec<Transport>,
    pub queues: u16,
    pub seed: u64,
    /// Keep each run's console, events and daemon log here.
    pub keep_logs: Option<PathBuf>,
    /// Multiplies every test's timeout (slow machines).
    pub timeout_scale: f64,
    /// Run against a deliberately broken device.
    pub mutant: Option<Mutant>,
    /// Where the SVG timelines of failed tests go.
    pub timelines: Option<PathBuf>,
    /// How long a soak test's workload runs.
    pub soak_seconds: u64,
}

/// How the guest reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// virtio-blk over vhost-user: `/dev/vda`.
    VirtioBlk,
    /// The guest's nvme driver, dmaprobe's NVMe controller over vfio-user:
    /// `/dev/nvme0n1`.
    Nvme,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::VirtioBlk, Transport::Nvme];

    pub fn name(self) -> &'static str {
        match self {
            Transport::VirtioBlk => "virtio-blk",
            Transport::Nvme => "nvme",
        }
    }

    /// The disk as the guest names it.
    pub fn guest_disk(self) -> &'static str {
        match self {
            Transport::VirtioBlk => "/dev/vda",
            Transport::Nvme => "/dev/nvme0n1",
        }
    }

    /// A kernel's column in the reports: the NVMe runs have their own.
    fn column(self, kernel: &str) -> String {
        match self {
            Transport::VirtioBlk => kernel.to_owned(),
            Transport::Nvme => format!("{kernel} nvme"),
        }
    }
}

/// The vhost-user-blk backend that serves each test's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Daemon {
    /// `dmaprobe serve` with the test's options and a ledger.
    Dmaprobe,
    /// QEMU's reference backend on the same disk file with the same queue
    /// count and block size: the same guest on an ordinary device, which tells
    /// a kernel's fault from dmaprobe's. It has none of dmaprobe's features
    /// (fault rules, the mailbox, the ledger), so no findings either.
    QemuStorageDaemon,
}

impl Daemon {
    pub const ALL: [Daemon; 2] = [Daemon::Dmaprobe, Daemon::QemuStorageDaemon];

    /// The name `--daemon` takes.
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Dmaprobe => "dmaprobe",
            Daemon::QemuStorageDaemon => QSD,
        }
    }

    /// What the process is called in messages.
    fn label(self) -> &'static str {
        match self {
            Daemon::Dmaprobe => "dmaprobe serve",
            Daemon::QemuStorageDaemon => QSD,
        }
    }
}

/// qemu-storage-daemon's executable (Debian: qemu-utils), found on `PATH`.
pub const QSD: &str = "qemu-storage-daemon";

/// A deliberately broken device, to show that the suite notices one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mutant {
    /// Every request completes at once; its data moves 100 ms later.
    CompleteBeforeDma,
    /// Every request's data moves into, or out of, the next guest page.
    WrongPage,
}

impl Mutant {
    pub const ALL: [Mutant; 2] = [Mutant::CompleteBeforeDma, Mutant::WrongPage];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::CompleteBeforeDma => "complete-before-dma",
            Mutant::WrongPage => "wrong-page",
        }
    }

    /// The fault rule that makes the device broken.
    pub fn rule(self) -> &'static str {
        match self {
            Mutant::CompleteBeforeDma => "action=complete-before-dma,ms=100",
            Mutant::WrongPage => "action=wrong-page",
        }
    }
}

/// One check, from the guest or the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckRecord {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The outcome of one test on one kernel, with all its evidence.
#[derive(Clone, Debug, Serialize)]
pub struct TestResult {
    pub test: String,
    pub kernel: String,
    pub kernel_release: Option<String>,
    /// The backend that served the disk.
    pub daemon: Daemon,
    /// How the guest reached it.
    pub transport: Transport,
    pub verdict: Verdict,
    /// One line naming the evidence, unless it passed.
    pub reason: String,
    pub checks: Vec<CheckRecord>,
    pub notes: Vec<(String, String)>,
    pub kernel_log_errors: Vec<String>,
    /// What the device saw (findings from its ledger, informational ones included).
    pub findings: Vec<serde_json::Value>,
    /// The end of the console, kept when the guest did not finish.
    pub console_tail: Vec<String>,
    /// The SVG timeline of a failed test, once saved where the user asked.
    pub timeline: Option<PathBuf>,
    pub seconds: f64,
}

/// Runs every test on every kernel; `progress` hears of each step.
pub fn run(
    config: &RunConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<TestResult>, RunError> {
    let work = tempfile::Builder::new()
        .prefix("dmaprobe-run.")
        .tempdir()
        .map_err(RunError::TempDir)?;
    let mut results = Vec::new();
    for kernel in &config.kernels {
        progress(&format!("[{}] building the initramfs", kernel.name));
        let initrd = work
            .path()
            .join(format!("initramfs-{}.cpio", results.len()));
        build_initramfs(config, kernel, &initrd).map_err(|source| RunError::Initramfs {
            kernel: kernel.name.clone(),
            source,
        })?;
        for (transport, test) in config
            .transports
            .iter()
            .flat_map(|&t| config.tests.iter().map(move |test| (t, test)))
        {
            if crate::process::interrupted() {
                progress("interrupted: stopping");
                return Ok(results);
            }
            let column = transport.column(&kernel.name);
            progress(&format!("[{column}] {}: booting", test.name));
            let dir = work.path().join(format!("{}-{}", results.len(), test.name));
            let result = run_one(config, kernel, transport, test, &initrd, &dir);
            progress(&format!(
                "[{column}] {}: {} ({:.1} s){}",
                test.name,
                crate::report::verdict_word(result.verdict),
                result.seconds,
                if result.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", result.reason)
                }
            ));
            if let Some(keep) = &config.keep_logs {
                keep_logs(&dir, &keep.join(&column).join(test.name));
            }
            let mut result = result;
            result.timeline = result.timeline.take().and_then(|svg| {
                let to = config.timelines.as_ref()?;
                let dest = to.join(format!("{}-{}.svg", column.replace(' ', "-"), test.name));
                fs::create_dir_all(to).ok()?;
                fs::copy(&svg, &dest).ok()?;
                Some(dest)
            });
            results.push(result);
        }
    }
    Ok(results)
}

fn build_initramfs(
    config: &RunConfig,
    kernel: &Kernel,
    out: &Path,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Every module a selected test needs goes into the kernel's one initramfs.
    let mut wanted: Vec<&str> = BASE_MODULES.to_vec();
    wanted.extend(config.tests.iter().flat_map(|t| t.modules.iter().copied()));
    let modules = match &kernel.modules {
        Some(dir) => ModuleIndex::load(dir)?.load_order(&wanted)?,
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

/// What one guest run produced.
#[derive(Debug, Default)]
struct Evidence {
    events: Vec<Event>,
    console: Vec<String>,
    checks: Vec<CheckRecord>,
    /// The device's ledger: every request and finding of the run.
    ledger: Vec<serde_json::Value>,
    /// Harness trouble: the run cannot be judged.
    error: Option<String>,
}

fn run_one(
    config: &RunConfig,
    kernel: &Kernel,
    transport: Transport,
    test: &TestSpec,
    initrd: &Path,
    dir: &Path,
) -> TestResult {
    let start = Instant::now();
    let mut ev = Evidence::default();
    if let Err(e) = fs::create_dir_all(dir) {
        ev.error = Some(format!("cannot create {}: {e}", dir.display()));
    } else {
        guest_run(config, kernel, transport, test, initrd, dir, &mut ev);
    }
    // The judge reads the findings in the ledger; the timeline draws all of it.
    let ledger = ev.ledger.clone();
    let mut result = judge(test, kernel, config.daemon, ev);
    result.transport = transport;
    result.kernel = transport.column(&kernel.name);
    result.seconds = start.elapsed().as_secs_f64();
    // Only dmaprobe keeps a ledger to draw.
    if result.verdict == Verdict::Fail && config.daemon == Daemon::Dmaprobe {
        let title = format!("{} on {}: {}", test.name, kernel.name, result.reason);
        let path = dir.join("timeline.svg");
        if fs::write(&path, crate::timeline::svg(&title, &ledger)).is_ok() {
            result.timeline = Some(path);
        }
    }
    result
}

fn guest_run(
    config: &RunConfig,
    kernel: &Kernel,
    transport: Transport,
    test: &TestSpec,
    initrd: &Path,
    dir: &Path,
    ev: &mut Evidence,
) {
    let disk = dir.join("disk.img");
    if let Err(e) = make_disk(test, &disk) {
        ev.error = Some(e);
        return;
    }
    let socket = dir.join("vhost.sock");
    let mut daemon = match DaemonRun::start(config, transport, test, &disk, &socket, dir) {
        Ok(d) => d,
        Err(e) => {
            ev.error = Some(e);
            return;
        }
    };
    let results = dir.join("events.jsonl");
    let mut params = GuestParams {
        tests: vec![test.name.to_owned()],
        disk_size: Some(test.disk.size),
        lbs: Some(test.disk.lbs),
        seed: config.seed,
        mailbox: test.serve_args.contains(&"--mailbox"),
        boot: 1,
        duration: test.soak.then_some(config.soak_seconds),
        disk: (transport != Transport::VirtioBlk).then(|| transport.guest_disk().to_owned()),
    };
    let timeout = test.boot_timeout(config.timeout_scale, config.soak_seconds);
    let sampler = test
        .soak
        .then(|| crate::soak::Sampler::start(&socket, dir.join("samples.jsonl")));
    let mut outcome = Ok(());
    let mut console = Vec::new();
    for n in 1..=test.boots.max(1) {
        params.boot = n;
        // A later boot's events go to a file of their own (QEMU truncates
        // its serial file) and are appended to the first boot's.
        let events = match n {
            1 => results.clone(),
            _ => dir.join(format!("events.boot{n}.jsonl")),
        };
        if n > 1 {
            console.push(format!(
                "----- dmaprobe run: boot {n} of {} -----",
                test.boots
            ));
        }
        let mut host_action = |action: HostAction| match action {
            HostAction::RestartDaemon if test.daemon_restarts => daemon.restart(),
            HostAction::RestartDaemon => CheckRecord {
                name: "host: the guest's request to restart the daemon".into(),
                ok: false,
                detail: format!("{} does not allow it (daemon_restarts is off)", test.name),
            },
        };
        outcome = boot(
            config,
            kernel,
            transport,
            initrd,
            &socket,
            &events,
            &params,
            timeout,
            test.daemon_restarts,
            &mut host_action,
            ev,
        );
        console.append(&mut ev.console);
        if n > 1 {
            if let Err(e) = append_file(&events, &results) {
                outcome = outcome.and(Err(e));
            }
        }
        if outcome.is_err() || n == test.boots {
            break;
        }
        if let Some(request) = test.between_boots {
            outcome = between_boots(&socket, request, n, &results);
            if outcome.is_err() {
                break;
            }
        }
    }
    if let Some(sampler) = sampler {
        let plan = crate::soak::fault_plan(config.seed);
        ev.checks.extend(sampler.finish(&plan, &results));
    }
    ev.console = console;
    let _ = fs::write(dir.join("console.log"), ev.console.join("\n"));
    let stopped = daemon.child.terminate(Duration::from_secs(10));
    ev.events = read_events(&results);
    ev.ledger = daemon
        .ledgers()
        .iter()
        .flat_map(|l| read_json_lines(l))
        .collect();
    ev.checks.append(&mut daemon.host_checks);
    if let Err(e) = outcome {
        ev.error = Some(e);
        return;
    }
    match stopped {
        Ok(Some(status)) if status.success() => {}
        other => {
            ev.error = Some(format!(
                "the daemon did not stop cleanly ({other:?}): {}",
                tail(&dir.join("daemon.log"), 5)
            ));
            return;
        }
    }
    host_checks(test, &disk, ev);
}

/// The daemon of one test, which the guest may have killed and started again.
struct DaemonRun<'a> {
    config: &'a RunConfig,
    transport: Transport,
    test: &'a TestSpec,
    disk: &'a Path,
    socket: &'a Path,
    dir: &'a Path,
    child: Child,
    /// How many times it was killed and started again.
    restarts: u32,
    /// What each restart did, as host checks.
    host_checks: Vec<CheckRecord>,
}

impl<'a> DaemonRun<'a> {
    fn start(
        config: &'a RunConfig,
        transport: Transport,
        test: &'a TestSpec,
        disk: &'a Path,
        socket: &'a Path,
        dir: &'a Path,
    ) -> Result<Self, String> {
        let child = start_daemon(config, transport, test, disk, socket, dir, 0)?;
        Ok(DaemonRun {
            config,
            transport,
            test,
            disk,
            socket,
            dir,
            child,
            restarts: 0,
            host_checks: Vec::new(),
        })
    }

    /// Kills the daemon with SIGKILL and starts it again with the same
    /// arguments; the check says how it went.
    fn restart(&mut self) -> CheckRecord {
        let name = "host: the daemon killed with SIGKILL and started again".to_owned();
        let old = self.child.id();
        let start = Instant::now();
        self.child.kill();
        self.restarts += 1;
        let record = match start_daemon(
            self.config,
            self.transport,
            self.test,
            self.disk,
            self.socket,
            self.dir,
            self.restarts,
        ) {
            Ok(child) => {
                let detail = format!(
                    "pid {} -> {}, serving again {} ms after the kill",
                    old.unwrap_or(0),
                    child.id().unwrap_or(0),
                    start.elapsed().as_millis()
                );
                self.child = child;
                CheckRecord {
                    name,
                    ok: true,
                    detail,
                }
            }
            Err(e) => CheckRecord {
                name,
                ok: false,
                detail: e,
            },
        };
        self.host_checks.push(record.clone());
        record
    }

    /// The ledger of each daemon that served the test, in order.
    fn ledgers(&self) -> Vec<PathBuf> {
        (0..=self.restarts)
            .map(|n| ledger_path(self.dir, n))
            .collect()
    }
}

/// Where the `n`th daemon of a test (0 unless it was restarted) keeps its ledger.
fn ledger_path(dir: &Path, n: u32) -> PathBuf {
    match n {
        0 => dir.join("ledger.jsonl"),
        n => dir.join(format!("ledger.restart{n}.jsonl")),
    }
}

/// Sends `request` to the daemon's control socket after boot `n`; its answer
/// goes into the events as a note (`between-boots`), so the report shows what
/// it did (how many blocks a power cut lost). A refused request is an error.
fn between_boots(socket: &Path, request: &str, n: u8, events: &Path) -> Result<(), String> {
    let control = {
        let mut name = socket.as_os_str().to_owned();
        name.push(".ctl");
        PathBuf::from(name)
    };
    let answer = control_request(&control, request)?;
    if answer["ok"] != true {
        return Err(format!(
            "the daemon refused {request} after boot {n}: {}",
            answer["error"].as_str().unwrap_or("no reason given")
        ));
    }
    let note = Event::Note {
        test: String::new(),
        key: format!("after boot {n}: {request}"),
        value: answer["result"].to_string(),
    };
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(events)
        .and_then(|mut f| std::io::Write::write_all(&mut f, note.to_line().as_bytes()))
        .map_err(|e| format!("cannot write to {}: {e}", events.display()))
}

/// One request line to a control socket, one answer line back.
pub(crate) fn control_request(control: &Path, request: &str) -> Result<serde_json::Value, String> {
    use std::io::Write;
    let talk = || -> std::io::Result<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(control)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(format!("{}\n", request.trim()).as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        Ok(line)
    };
    let line = talk().map_err(|e| format!("control socket {}: {e}", control.display()))?;
    serde_json::from_str(&line)
        .map_err(|e| format!("control answer {:?} is not JSON: {e}", line.trim()))
}

/// Appends the file `from` to `to`.
fn append_file(from: &Path, to: &Path) -> Result<(), String> {
    let mut src =
        fs::File::open(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(to)
        .and_then(|mut dst| std::io::copy(&mut src, &mut dst))
        .map(drop)
        .map_err(|e| format!("cannot append to {}: {e}", to.display()))
}

fn make_disk(test: &TestSpec, disk: &Path) -> Result<(), String> {
    let f = fs::File::create(disk).map_err(|e| format!("cannot create {}: {e}", disk.display()))?;
    f.set_len(test.disk.size)
        .map_err(|e| format!("cannot size {}: {e}", disk.display()))?;
    // With a mailbox, the file system leaves the disk's last MiB to it.
    let fs_bytes = if test.serve_args.contains(&"--mailbox") {
        test.disk.size - crate::mailbox::MAILBOX_BYTES
    } else {
        test.disk.size
    };
    match test.disk.format {
        None => Ok(()),
        Some(Fs::Ext4) => run_tool(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096"])
                .arg(disk)
                .arg(format!("{}k", fs_bytes / 1024)),
            "mkfs.ext4",
        )
        .map(drop),
        Some(Fs::Xfs) => run_tool(
            Command::new("mkfs.xfs")
                .args(["-q", "-f", "-b", "size=4096"])
                .arg("-d")
                .arg(format!("size={fs_bytes}"))
                .arg(disk),
            "mkfs.xfs",
        )
        .map(drop),
        // 4 KiB clusters: a page of a file is one cluster, one extent.
        Some(Fs::Vfat) => run_tool(
            Command::new("mkfs.vfat")
                .args(["-S", "512", "-s", "8"])
                .arg(disk)
                .arg((fs_bytes / 1024).to_string()),
            "mkfs.vfat",
        )
        .map(drop),
        Some(Fs::Udf) => run_tool(
            Command::new("mkudffs")
                .args(["--blocksize=4096", "--media-type=hd"])
                .arg(disk)
                .arg((fs_bytes / 4096).to_string()),
            "mkudffs",
        )
        .map(drop),
    }
}

/// Runs a host tool to completion; its output, or why it failed.
fn run_tool(cmd: &mut Command, name: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {name}: {e} (run scripts/setup)"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{name} failed ({}): {}", out.status, text.trim()))
    }
}

/// The command that serves `disk` on `socket` for `test`, keeping its ledger
/// (if it has one) in `ledger`.
fn daemon_command(
    config: &RunConfig,
    transport: Transport,
    test: &TestSpec,
    disk: &Path,
    socket: &Path,
    ledger: &Path,
) -> Result<Command, String> {
    match config.daemon {
        Daemon::Dmaprobe => {
            let mut cmd = Command::new(&config.dmaprobe);
            cmd.arg("serve")
                .arg("--socket")
                .arg(socket)
                .arg("--disk")
                .arg(disk)
                .args(["--lbs", &test.disk.lbs.to_string()])
                .args(["--queues", &config.queues.to_string()])
                .arg("--ledger")
                .arg(ledger)
                .args(test.serve_args);
            if let Some(m) = config.mutant {
                cmd.args(["--fault", m.rule()]);
            }
            if transport == Transport::Nvme {
                cmd.arg("--nvme");
            }
            if test.soak {
                cmd.args(crate::soak::fault_plan(config.seed).serve_args());
            }
            Ok(cmd)
        }
        Daemon::QemuStorageDaemon => {
            if let Some(features) = test.dmaprobe_features() {
                return Err(format!("{} needs dmaprobe ({features})", test.name));
            }
            if let Some(m) = config.mutant {
                return Err(format!("the {} mutant needs dmaprobe", m.name()));
            }
            if transport == Transport::Nvme {
                return Err(
                    "qemu-storage-daemon has no NVMe front-end: use --daemon dmaprobe".into(),
                );
            }
            // As scripts/bench starts it: a file through the host's page cache,
            // as dmaprobe reads and writes it.
            let mut cmd = Command::new(QSD);
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=disk,filename={},cache.direct=off",
                    qemu_opt(disk)
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},\
                     writable=on,num-queues={},logical-block-size={}",
                    qemu_opt(socket),
                    config.queues,
                    test.disk.lbs
                ));
            Ok(cmd)
        }
    }
}

/// QEMU's arguments for the disk on `socket`.
fn disk_device(transport: Transport, socket: &Path, queues: u16, reconnect: bool) -> Vec<String> {
    match transport {
        Transport::VirtioBlk => {
            let reconnect = if reconnect {
                format!(",reconnect-ms={}", RECONNECT.as_millis())
            } else {
                String::new()
            };
            vec![
                "-chardev".into(),
                format!("socket,id=vu,path={}{reconnect}", qemu_opt(socket)),
                "-device".into(),
                format!("vhost-user-blk-pci,chardev=vu,num-queues={queues}"),
            ]
        }
        // vfio-user-pci takes its socket only in the JSON form.
        Transport::Nvme => vec![
            "-device".into(),
            serde_json::json!({
                "driver": "vfio-user-pci",
                "socket": {"type": "unix", "path": socket.to_string_lossy()},
            })
            .to_string(),
        ],
    }
}

/// A path as the value of a QEMU option: a comma is doubled.
fn qemu_opt(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// Starts the `n`th daemon of a test in `dir` (0 first, then one for each
/// restart) and waits for its socket; all of them log to `daemon.log`.
#[allow(clippy::too_many_arguments)]
fn start_daemon(
    config: &RunConfig,
    transport: Transport,
    test: &TestSpec,
    disk: &Path,
    socket: &Path,
    dir: &Path,
    n: u32,
) -> Result<Child, String> {
    let log = &dir.join("daemon.log");
    // A killed daemon leaves its socket behind; the wait below must see the new one.
    let _ = fs::remove_file(socket);
    let mut cmd = daemon_command(config, transport, test, disk, socket, &ledger_path(dir, n))?;
    let log_file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(n > 0)
        .truncate(n == 0)
        .open(log)
        .map_err(|e| format!("cannot create the daemon log: {e}"))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    let label = config.daemon.label();
    let mut child = Child::spawn(label, cmd).map_err(|e| {
        let program = match config.daemon {
            Daemon::Dmaprobe => config.dmaprobe.display().to_string(),
            Daemon::QemuStorageDaemon => format!("{QSD} (run scripts/setup)"),
        };
        format!("cannot start {program}: {e}")
    })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{label} exited ({status}): {}", tail(log, 5)));
        }
        if Instant::now() > deadline {
            return Err(format!("{label} did not create its socket in 10 s"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

#[allow(clippy::too_many_arguments)]
fn boot(
    config: &RunConfig,
    kernel: &Kernel,
    transport: Transport,
    initrd: &Path,
    socket: &Path,
    results: &Path,
    params: &GuestParams,
    timeout: Duration,
    reconnect: bool,
    host_action: &mut dyn FnMut(HostAction) -> CheckRecord,
    ev: &mut Evidence,
) -> Result<(), String> {
    let append = format!(
        "console=ttyS0 panic=-1 init_on_free=1 {}",
        params.to_cmdline()
    );
    let qemu = match transport {
        Transport::VirtioBlk => &config.qemu,
        Transport::Nvme => &config.qemu_nvme,
    };
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-smp", "2", "-m", "512M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-machine", "q35,memory-backend=mem"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .args(["-serial", "stdio"])
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .args(disk_device(transport, socket, config.queues, reconnect))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut qemu = Child::spawn("qemu", cmd).map_err(|e| {
        format!(
            "cannot start {}: {e} (run scripts/setup)",
            config.qemu.display()
        )
    })?;
    let console = Arc::new(Mutex::new(Vec::new()));
    let readers = qemu.take_output(console.clone());
    // While the guest runs, the runner does what it asks of the host.
    let mut asks = EventTail::new(results);
    let deadline = Instant::now() + timeout;
    let status = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match qemu.wait_timeout(left.min(EVENT_POLL)) {
            Ok(None) if !left.is_zero() && !crate::process::interrupted() => {
                for event in asks.poll() {
                    if let Event::Host { action, .. } = event {
                        let done = host_action(action);
                        if let Ok(mut c) = console.lock() {
                            c.push(format!("dmaprobe run: {}: {}", done.name, done.detail));
                        }
                    }
                }
            }
            other => break other,
        }
    };
    qemu.kill();
    for r in readers {
        let _ = r.join();
    }
    ev.console = console.lock().map(|c| c.clone()).unwrap_or_default();
    match status {
        Ok(Some(s)) if s.success() => Ok(()),
        Ok(Some(s)) => Err(format!("QEMU exited with {s}")),
        Err(e) => Err(format!("waiting for QEMU failed: {e}")),
        Ok(None) if crate::process::interrupted() => Err("interrupted".into()),
        Ok(None) => Err(format!(
            "the guest did not finish within {:.0} s and was killed",
            timeout.as_secs_f64()
        )),
    }
}

/// The events a guest has written so far, read as QEMU appends them.
struct EventTail {
    path: PathBuf,
    offset: u64,
    /// The start of a line not yet complete.
    partial: Vec<u8>,
}

impl EventTail {
    fn new(path: &Path) -> Self {
        EventTail {
            path: path.to_owned(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The events of the lines completed since the last call.
    fn poll(&mut self) -> Vec<Event> {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return Vec::new();
        };
        let mut fresh = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut fresh).is_err() {
            return Vec::new();
        }
        self.offset += fresh.len() as u64;
        self.partial.extend_from_slice(&fresh);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let lines: Vec<u8> = self.partial.drain(..=end).collect();
        String::from_utf8_lossy(&lines)
            .lines()
            .filter_map(Event::from_line)
            .collect()
    }
}

fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn read_events(path: &Path) -> Vec<Event> {
    let Ok(f) = fs::File::open(path) else {
        return Vec::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| Event::from_line(&l))
        .collect()
}

/// What the host checks after the guest has gone: the raw ranges and files the
/// guest says it wrote, and the file system.
fn host_checks(test: &TestSpec, disk: &Path, ev: &mut Evidence) {
    let mut checks = Vec::new();
    for e in &ev.events {
        match e {
            Event::Wrote {
                offset, len, seed, ..
            } => checks.push(check_range(disk, *offset, *len, *seed)),
            Event::File {
                path, len, seed, ..
            } => checks.push(check_file(disk, test.disk.format, path, *len, *seed)),
            _ => {}
        }
    }
    let fsck = match test.disk.format {
        Some(Fs::Ext4) => Some(("host: e2fsck -fn is clean", "e2fsck", &["-f", "-n"][..])),
        Some(Fs::Xfs) => Some(("host: xfs_repair -n is clean", "xfs_repair", &["-n"][..])),
        Some(Fs::Vfat) => Some(("host: fsck.vfat -n is clean", "fsck.vfat", &["-n"][..])),
        Some(Fs::Udf) => {
            checks.push(check_udf(disk));
            None
        }
        None => None,
    };
    if let Some((name, tool, args)) = fsck {
        let out = run_tool(Command::new(tool).args(args).arg(disk), tool);
        checks.push(CheckRecord {
            name: name.into(),
            ok: out.is_ok(),
            detail: match out {
                Ok(_) => "clean".into(),
                Err(e) => last_lines(&e, 6),
            },
        });
    }
    ev.checks.extend(checks);
}

/// UDF has no fsck in Debian's udftools: `udfinfo` reads the volume's
/// descriptors, and a volume unmounted cleanly has its integrity closed.
fn check_udf(disk: &Path) -> CheckRecord {
    let name = "host: udfinfo reads the volume, integrity closed".to_owned();
    match run_tool(Command::new("udfinfo").arg(disk), "udfinfo") {
        Err(e) => CheckRecord {
            name,
            ok: false,
            detail: last_lines(&e, 6),
        },
        Ok(out) => {
            let field = |key: &str| {
                out.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                    .unwrap_or("?")
                    .to_owned()
            };
            let integrity = field("integrity");
            CheckRecord {
                name,
                ok: integrity == "closed",
                detail: format!(
                    "integrity={integrity}, numfiles={}, usedblocks={}",
                    field("numfiles"),
                    field("usedblocks")
                ),
            }
        }
    }
}

fn check_range(disk: &Path, offset: u64, len: u64, seed: u64) -> CheckRecord {
    let name = format!("host: backing holds the {len} B written at byte {offset}");
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = fs::File::open(disk)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        f.read_exact(&mut buf)?;
        Ok(buf)
    };
    pattern_check(name, read(), offset, seed)
}

/// Reads the file `path` (from the file system's root) out of the disk image
/// with the host's own tools, debugfs for ext4 and mtools for FAT, and checks
/// it holds the pattern.
fn check_file(disk: &Path, format: Option<Fs>, path: &str, len: u64, seed: u64) -> CheckRecord {
    let name = format!("host: {path} holds its {len} B");
    let out = disk.with_extension("dump");
    let extract = match format {
        Some(Fs::Vfat) => run_tool(
            Command::new("mcopy")
                .args(["-n", "-o", "-i"])
                .arg(disk)
                .arg(format!("::{path}"))
                .arg(&out),
            "mcopy",
        ),
        Some(Fs::Ext4) => run_tool(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump -p {path} {}", out.display()))
                .arg(disk),
            "debugfs",
        ),
        other => Err(format!(
            "the host cannot read files on {other:?}: no checker for it"
        )),
    };
    let dumped = extract
        .map_err(std::io::Error::other)
        .and_then(|_| fs::read(&out));
    let _ = fs::remove_file(&out);
    match dumped {
        Ok(data) if data.len() as u64 != len => CheckRecord {
            name,
            ok: false,
            detail: format!("the file has {} B, the guest wrote {len} B", data.len()),
        },
        other => pattern_check(name, other, 0, seed),
    }
}

fn pattern_check(
    name: String,
    data: std::io::Result<Vec<u8>>,
    offset: u64,
    seed: u64,
) -> CheckRecord {
    match data {
        Err(e) => CheckRecord {
            name,
            ok: false,
            detail: format!("cannot read it: {e}"),
        },
        Ok(data) => match pattern_mismatch(seed, offset, &data) {
            None => CheckRecord {
                name,
                ok: true,
                detail: "matches".into(),
            },
            Some(i) => CheckRecord {
                name,
                ok: false,
                detail: format!(
                    "first mismatch at +{i} (byte {}): got {:#04x}, want {:#04x}",
                    offset + i as u64,
                    data[i],
                    crate::protocol::pattern_byte(seed, offset + i as u64)
                ),
            },
        },
    }
}

/// Joins the guest's verdict, the host's checks and the kernel log.
fn judge(test: &TestSpec, kernel: &Kernel, daemon: Daemon, ev: Evidence) -> TestResult {
    let mut checks: Vec<CheckRecord> = Vec::new();
    let mut notes = Vec::new();
    // A test of several boots ends once in each: the worst of them counts,
    // and a boot that never reported its end leaves the test unjudged.
    let mut guest_end: Option<(Verdict, String)> = None;
    let mut ends = 0;
    for e in &ev.events {
        match e {
            Event::Check {
                name, ok, detail, ..
            } => checks.push(CheckRecord {
                name: name.clone(),
                ok: *ok,
                detail: detail.clone(),
            }),
            Event::Note { key, value, .. } => notes.push((key.clone(), value.clone())),
            Event::End {
                test: t,
                verdict,
                reason,
            } if t == test.name => {
                ends += 1;
                let reason = match test.boots {
                    _ if reason.is_empty() => String::new(),
                    1 => reason.clone(),
                    _ => format!("boot {ends}: {reason}"),
                };
                if guest_end
                    .as_ref()
                    .is_none_or(|(worst, _)| severity(*verdict) > severity(*worst))
                {
                    guest_end = Some((*verdict, reason));
                }
            }
            _ => {}
        }
    }
    checks.extend(ev.checks);
    let kernel_log_errors = klog::errors(&ev.console);
    let findings: Vec<serde_json::Value> = ev
        .ledger
        .iter()
        .filter(|e| e["kind"] == "finding")
        .cloned()
        .collect();
    let device_error = findings.iter().find(|f| f["info"] != true);
    let failed_host_check = checks.iter().find(|c| !c.ok && c.name.starts_with("host:"));

    let (verdict, reason) = if let Some(err) = &ev.error {
        (Verdict::Error, err.clone())
    } else if let Some(line) = kernel_log_errors.first() {
        (
            Verdict::Fail,
            format!(
                "kernel log: {} ({} error line(s))",
                line.trim(),
                kernel_log_errors.len()
            ),
        )
    } else {
        match guest_end {
            None => (
                Verdict::Error,
                "the guest never reported the end of the test".into(),
            ),
            Some(_) if ends < test.boots => (
                Verdict::Error,
                format!(
                    "the guest reported the end of the test in {ends} of {} boots",
                    test.boots
                ),
            ),
            Some((Verdict::Pass, _)) if failed_host_check.is_some() => {
                let c = failed_host_check.map(|c| format!("{}: {}", c.name, c.detail));
                (Verdict::Fail, c.unwrap_or_default())
            }
            Some((Verdict::Pass, _)) if device_error.is_some() => {
                let f = device_error.map(|f| {
                    format!(
                        "device: {} ({})",
                        f["detail"].as_str().unwrap_or(""),
                        f["finding"].as_str().unwrap_or("finding")
                    )
                });
                (Verdict::Fail, f.unwrap_or_default())
            }
            Some((v, r)) => (v, r),
        }
    };
    let console_tail = if verdict == Verdict::Error {
        ev.console
            .iter()
            .rev()
            .take(CONSOLE_TAIL)
            .rev()
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    TestResult {
        test: test.name.to_owned(),
        kernel: kernel.name.clone(),
        kernel_release: kernel.release.clone(),
        daemon,
        transport: Transport::VirtioBlk,
        verdict,
        reason,
        checks,
        notes,
        kernel_log_errors,
        findings,
        console_tail,
        timeline: None,
        seconds: 0.0,
    }
}

/// How bad a guest's verdict is, for joining the verdicts of several boots.
fn severity(v: Verdict) -> u8 {
    match v {
        Verdict::Pass => 0,
        Verdict::Skip => 1,
        Verdict::Fail => 2,
        Verdict::Error => 3,
    }
}

fn keep_logs(from: &Path, to: &Path) {
    if fs::create_dir_all(to).is_err() {
        return;
    }
    let ledgers = fs::read_dir(from)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ledger.") && n.ends_with(".jsonl"));
    let logs = [
        "console.log",
        "events.jsonl",
        "daemon.log",
        "timeline.svg",
        "samples.jsonl",
    ];
    for name in logs.into_iter().map(str::to_owned).chain(ledgers) {
        let _ = fs::copy(from.join(&name), to.join(&name));
    }
}

/// The last `n` lines of a file, on one line.
fn tail(path: &Path, n: usize) -> String {
    last_lines(&fs::read_to_string(path).unwrap_or_default(), n)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(daemon: Daemon) -> RunConfig {
        RunConfig {
            kernels: Vec::new(),
            tests: Vec::new(),
            dmaprobe: PathBuf::from("/x/dmaprobe"),
            daemon,
            guest_bin: PathBuf::from("/x/dmaprobe-guest"),
            programs: Vec::new(),
            busybox: PathBuf::from(initramfs::BUSYBOX),
            qemu: PathBuf::from("qemu-system-x86_64"),
            qemu_nvme: PathBuf::from("/x/qemu-11"),
            transports: vec![Transport::VirtioBlk],
            queues: 3,
            seed: 1,
            keep_logs: None,
            timeout_scale: 1.0,
            mutant: None,
            timelines: None,
            soak_seconds: 60,
        }
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn command(config: &RunConfig, test: &str) -> Result<Command, String> {
        let test = crate::suite::find(test).unwrap();
        let dir = Path::new("/tmp/run,1");
        daemon_command(
            config,
            Transport::VirtioBlk,
            test,
            &dir.join("disk.img"),
            &dir.join("vhost.sock"),
            &ledger_path(dir, 0),
        )
    }

    #[test]
    fn over_nvme_dmaprobe_serves_vfio_user_and_qemu_gets_the_json_device() {
        let test = crate::suite::find("smoke").unwrap();
        let dir = Path::new("/tmp/run,1");
        let cmd = daemon_command(
            &config(Daemon::Dmaprobe),
            Transport::Nvme,
            test,
            &dir.join("disk.img"),
            &dir.join("vfu.sock"),
            &ledger_path(dir, 0),
        )
        .unwrap();
        assert!(args(&cmd).contains(&"--nvme".to_owned()));
        let qsd = daemon_command(
            &config(Daemon::QemuStorageDaemon),
            Transport::Nvme,
            test,
            &dir.join("disk.img"),
            &dir.join("vfu.sock"),
            &ledger_path(dir, 0),
        );
        assert!(qsd.unwrap_err().contains("NVMe"));
        let device = disk_device(Transport::Nvme, &dir.join("vfu.sock"), 2, false);
        assert_eq!(device[0], "-device");
        let json: serde_json::Value = serde_json::from_str(&device[1]).unwrap();
        assert_eq!(json["driver"], "vfio-user-pci");
        assert_eq!(json["socket"]["path"], "/tmp/run,1/vfu.sock");
        let virtio = disk_device(Transport::VirtioBlk, &dir.join("v.sock"), 2, true);
        assert!(
            virtio[1].contains("path=/tmp/run,,1/v.sock,reconnect-ms="),
            "{virtio:?}"
        );
        assert_eq!(Transport::Nvme.column("debian-6.12"), "debian-6.12 nvme");
    }

    #[test]
    fn qemu_storage_daemon_serves_the_same_disk_socket_and_queues() {
        let cmd = command(&config(Daemon::QemuStorageDaemon), "smoke").unwrap();
        assert_eq!(cmd.get_program(), QSD);
        let a = args(&cmd);
        assert_eq!(a.len(), 4, "{a:?}");
        assert_eq!(
            a[1],
            "driver=file,node-name=disk,filename=/tmp/run,,1/disk.img,cache.direct=off"
        );
        assert_eq!(
            a[3],
            "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,\
             addr.path=/tmp/run,,1/vhost.sock,writable=on,num-queues=3,logical-block-size=512"
        );
    }

    #[test]
    fn qemu_storage_daemon_refuses_what_needs_dmaprobe() {
        let qsd = config(Daemon::QemuStorageDaemon);
        let err = command(&qsd, "delayed-read").unwrap_err();
        assert!(err.contains("needs dmaprobe (--fault op=read"), "{err}");
        let err = command(&qsd, "mailbox-hold").unwrap_err();
        assert!(err.contains("(--mailbox)"), "{err}");
        let mutant = RunConfig {
            mutant: Some(Mutant::WrongPage),
            ..qsd
        };
        assert!(command(&mutant, "smoke")
            .unwrap_err()
            .contains("wrong-page"));
    }

    fn end(verdict: Verdict, reason: &str) -> Event {
        Event::End {
            test: "power-cut-ext4".into(),
            verdict,
            reason: reason.into(),
        }
    }

    #[test]
    fn a_test_of_two_boots_is_judged_by_its_worse_boot() {
        let test = crate::suite::find("power-cut-ext4").unwrap();
        let kernel = Kernel {
            name: "k".into(),
            image: PathBuf::from("/k"),
            modules: None,
            release: None,
        };
        let judged = |events: Vec<Event>| {
            let ev = Evidence {
                events,
                ..Evidence::default()
            };
            let r = judge(test, &kernel, Daemon::Dmaprobe, ev);
            (r.verdict, r.reason)
        };
        let pass = end(Verdict::Pass, "");
        assert_eq!(
            judged(vec![pass.clone(), pass.clone()]),
            (Verdict::Pass, String::new())
        );
        assert_eq!(
            judged(vec![pass.clone(), end(Verdict::Fail, "lost")]),
            (Verdict::Fail, "boot 2: lost".into())
        );
        assert_eq!(
            judged(vec![end(Verdict::Skip, "no ext4"), pass.clone()]),
            (Verdict::Skip, "boot 1: no ext4".into())
        );
        let (verdict, reason) = judged(vec![pass]);
        assert_eq!(verdict, Verdict::Error);
        assert!(reason.contains("in 1 of 2 boots"), "{reason}");
    }

    #[test]
    fn the_event_tail_yields_each_complete_line_once() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut tail = EventTail::new(&path);
        assert!(tail.poll().is_empty(), "no file yet");
        let host = Event::Host {
            test: "daemon-restart".into(),
            action: HostAction::RestartDaemon,
        };
        let line = host.to_line();
        let (first, rest) = line.split_at(10);
        let mut f = fs::File::create(&path).unwrap();
        write!(f, "console noise\n{first}").unwrap();
        assert!(tail.poll().is_empty(), "half a line is not an event");
        write!(f, "{rest}").unwrap();
        assert_eq!(tail.poll(), vec![host.clone()]);
        assert!(tail.poll().is_empty(), "each event comes once");
        write!(f, "{line}{}", Event::Done.to_line()).unwrap();
        assert_eq!(tail.poll(), vec![host, Event::Done]);
    }

    #[test]
    fn dmaprobe_gets_the_tests_options_and_a_ledger() {
        let cmd = command(&config(Daemon::Dmaprobe), "delayed-read").unwrap();
        assert_eq!(cmd.get_program(), "/x/dmaprobe");
        let a = args(&cmd).join(" ");
        assert!(a.contains("--queues 3"), "{a}");
        assert!(a.contains("--ledger /tmp/run,1/ledger.jsonl"), "{a}");
        assert!(
            a.ends_with("--fault op=read,lba=2048,action=delay,ms=1000"),
            "{a}"
        );
    }
    #[test]
    fn the_soak_gets_the_fault_plan_of_the_runs_seed_and_no_other_test_does() {
        let cfg = config(Daemon::Dmaprobe);
        let a = args(&command(&cfg, "soak").unwrap());
        let plan = crate::soak::fault_plan(cfg.seed);
        assert!(a.ends_with(&plan.serve_args()), "{a:?}");
        assert!(a.contains(&"--canary".to_owned()) && a.contains(&"--snapshot".to_owned()));
        let smoke = args(&command(&cfg, "smoke").unwrap());
        assert!(
            !smoke.iter().any(|a| a == "--fault" || a == "--seed"),
            "{smoke:?}"
        );
        let err = command(&config(Daemon::QemuStorageDaemon), "soak").unwrap_err();
        assert!(err.contains("needs dmaprobe"), "{err}");
    }
}
