//! The daemon that serves a test's disk: its command line (`dmaprobe serve`
//! or qemu-storage-daemon), the child and its restarts ([`DaemonRun`]), where
//! it keeps its ledger, and requests to its control socket.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::config::{Daemon, RunConfig, Transport, QSD};
use super::logs::tail;
use super::qemu::qemu_opt;
use super::result::CheckRecord;
use crate::process::Child;
use crate::protocol::{Event, HostAction};
use crate::suite::TestSpec;

/// How long a control request may wait for its answer.
const CONTROL_ANSWER: Duration = Duration::from_secs(10);

/// The daemon of one test, which the guest may have killed and started again.
#[derive(Debug)]
pub(super) struct DaemonRun<'a> {
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
    pub(super) host_checks: Vec<CheckRecord>,
}

impl<'a> DaemonRun<'a> {
    /// Starts the daemon that serves `disk` on `socket` for `test`, its files in `dir`.
    pub(super) fn start(
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

    /// Does what the guest asks of the host while it runs; the check says
    /// how it went.
    pub(super) fn host_action(&mut self, action: HostAction) -> CheckRecord {
        match action {
            HostAction::RestartDaemon if self.test.daemon_restarts => self.restart(),
            HostAction::RestartDaemon => CheckRecord {
                name: "host: the guest's request to restart the daemon".into(),
                ok: false,
                detail: format!(
                    "{} does not allow it (daemon_restarts is off)",
                    self.test.name
                ),
            },
        }
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

    /// Stops the daemon (SIGTERM, SIGKILL after 10 s); an error unless it
    /// exited cleanly.
    pub(super) fn stop(&mut self) -> Result<(), String> {
        match self.child.terminate(Duration::from_secs(10)) {
            Ok(Some(status)) if status.success() => Ok(()),
            other => Err(format!(
                "the daemon did not stop cleanly ({other:?}): {}",
                tail(&self.dir.join("daemon.log"), 5)
            )),
        }
    }

    /// The ledger of each daemon that served the test, in order.
    pub(super) fn ledgers(&self) -> Vec<PathBuf> {
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
                    "qemu-storage-daemon has no NVMe interface: use --daemon dmaprobe".into(),
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

/// The control socket of the daemon serving `socket`: beside it, `.ctl` added.
pub(super) fn control_socket(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".ctl");
    PathBuf::from(name)
}

/// Sends `request` to the daemon's control socket after boot `n`; its answer
/// goes into the events as a note (`between-boots`), so the report shows what
/// it did (how many blocks a power cut lost). A refused request is an error.
pub(super) fn between_boots(
    socket: &Path,
    request: &str,
    n: u8,
    events: &Path,
) -> Result<(), String> {
    let result = control_request(&control_socket(socket), request)
        .map_err(|e| format!("{request} after boot {n}: {e}"))?;
    let note = Event::Note {
        test: String::new(),
        key: format!("after boot {n}: {request}"),
        value: result.to_string(),
    };
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(events)
        .and_then(|mut f| std::io::Write::write_all(&mut f, note.to_line().as_bytes()))
        .map_err(|e| format!("cannot write to {}: {e}", events.display()))
}

/// One request line to a control socket: the result of its answer, or why
/// there is none (a refusal's reason starts with `refused: `).
pub(super) fn control_request(control: &Path, request: &str) -> Result<serde_json::Value, String> {
    wire::control::request(control, request, CONTROL_ANSWER).map_err(|e| match e {
        wire::control::ClientError::Refused(reason) => format!("refused: {reason}"),
        e => format!("control socket {}: {e}", control.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::config::Mutant;

    fn config(daemon: Daemon) -> RunConfig {
        RunConfig::for_tests(daemon)
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
    fn over_nvme_dmaprobe_serves_vfio_user_and_qemu_storage_daemon_cannot() {
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
