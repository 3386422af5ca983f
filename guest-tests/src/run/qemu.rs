//! One boot of the guest under QEMU: its command line with the disk device
//! on the daemon's socket, and the wait for it to power off, doing meanwhile
//! what the guest asks of the host.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::accel::Machine;
use super::config::{RunConfig, Transport};
use super::events::EventTail;
use super::result::{CheckRecord, Timing};
use crate::kernel::Kernel;
use crate::process::Child;
use crate::protocol::{Event, GuestParams, HostAction};

/// How often the runner looks for requests from the guest while it runs.
const EVENT_POLL: Duration = Duration::from_millis(20);

/// How soon QEMU tries again to reach a daemon that went away.
const RECONNECT: Duration = Duration::from_millis(200);

/// One boot of the guest: what QEMU is given.
#[derive(Debug)]
pub(super) struct Boot<'a> {
    pub(super) config: &'a RunConfig,
    /// The accelerator the run chose.
    pub(super) machine: Machine,
    pub(super) kernel: &'a Kernel,
    pub(super) transport: Transport,
    pub(super) initrd: &'a Path,
    /// The daemon's socket.
    pub(super) socket: &'a Path,
    /// Where the guest's events go (its second serial port; QEMU truncates it).
    pub(super) events: &'a Path,
    pub(super) params: &'a GuestParams,
    pub(super) timeout: Duration,
    /// Whether QEMU reconnects to a daemon that went away (one restarted).
    pub(super) reconnect: bool,
}

/// The note a result carries for each boot repeated.
pub(super) const REPEATED_BOOT: &str = "boot repeated";

/// What a test's boots printed on the console: the lines of the boots that
/// count, and any boot repeated because it died before the guest started,
/// with why and its own lines, set aside so they are kept but not judged.
#[derive(Debug, Default)]
pub(super) struct Console {
    pub(super) lines: Vec<String>,
    pub(super) repeated: Vec<RepeatedBoot>,
}

/// A boot that died before the guest wrote its first event.
#[derive(Debug)]
pub(super) struct RepeatedBoot {
    pub(super) why: String,
    pub(super) lines: Vec<String>,
}

impl Console {
    /// Everything, in order, for `console.log`: each repeated boot under a
    /// line saying why, then the boots that count.
    pub(super) fn log(&self) -> String {
        let mut log = Vec::new();
        for boot in &self.repeated {
            log.push(format!(
                "----- dmaprobe run: a boot repeated: {} -----",
                boot.why
            ));
            log.extend(boot.lines.iter().cloned());
        }
        if !self.repeated.is_empty() {
            log.push("----- dmaprobe run: the boots that count -----".to_owned());
        }
        log.extend(self.lines.iter().cloned());
        log.join("\n")
    }
}

impl Boot<'_> {
    /// Boots the guest and waits for it to power off, doing what it asks of
    /// the host (`host_action`) meanwhile; its console is appended to
    /// `console`. An error unless QEMU exited cleanly in time.
    ///
    /// A boot that dies before the guest wrote its first event, with QEMU
    /// killed by a signal (an assertion in QEMU's own device code, seen under
    /// TCG while the kernel probes PCI) or the kernel panicking (an `int3`
    /// oops while the kernel patches its own code, seen under TCG) or the
    /// boot hanging (a vCPU starved of its timer under TCG, an RCU stall,
    /// seen with two guests on two cores), never reached the test: the guest is booted once more, the console says
    /// why, and the dead boot's console is set aside. A second death is
    /// judged as any other run. The boots' time is added to `timing`.
    pub(super) fn run(
        &self,
        host_action: &mut dyn FnMut(HostAction) -> CheckRecord,
        console: &mut Console,
        timing: &mut Timing,
    ) -> Result<(), String> {
        let mut lines = Vec::new();
        let mut status = self.boot_once(host_action, &mut lines, timing)?;
        if let Some(why) = self.died_before_the_guest_started(&status, &lines) {
            console.repeated.push(RepeatedBoot { why, lines });
            lines = Vec::new();
            status = self.boot_once(host_action, &mut lines, timing)?;
        }
        console.lines.extend(lines);
        match status {
            Ok(Some(s)) if s.success() => Ok(()),
            Ok(Some(s)) => Err(format!("QEMU exited with {s}")),
            Err(e) => Err(format!("waiting for QEMU failed: {e}")),
            Ok(None) if crate::process::interrupted() => Err("interrupted".into()),
            Ok(None) => Err(format!(
                "the guest did not finish within {:.0} s and was killed",
                self.timeout.as_secs_f64()
            )),
        }
    }

    /// Why a boot that ended with `status`, having printed `lines`, died
    /// before the guest wrote its first event; `None` if it did not.
    fn died_before_the_guest_started(
        &self,
        status: &std::io::Result<Option<ExitStatus>>,
        lines: &[String],
    ) -> Option<String> {
        if !self.guest_silent() {
            return None;
        }
        let status = match status {
            Ok(Some(status)) => status,
            Ok(None) if !crate::process::interrupted() => {
                return Some(format!(
                    "the guest had not started when the boot's {:.0} s ran out",
                    self.timeout.as_secs_f64()
                ))
            }
            _ => return None,
        };
        if let Some(signal) = status.signal() {
            return Some(format!(
                "QEMU was killed by signal {signal} before the guest started"
            ));
        }
        lines
            .iter()
            .any(|l| l.contains("Kernel panic - not syncing"))
            .then(|| {
                let first = crate::klog::errors(lines)
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                format!(
                    "the kernel panicked before the guest started: {}",
                    first.trim()
                )
            })
    }

    /// Starts QEMU and waits for it; its console is appended to `console`,
    /// the time until the guest's first event and after it to `timing`.
    fn boot_once(
        &self,
        host_action: &mut dyn FnMut(HostAction) -> CheckRecord,
        console: &mut Vec<String>,
        timing: &mut Timing,
    ) -> Result<std::io::Result<Option<ExitStatus>>, String> {
        let start = Instant::now();
        let mut qemu = Child::spawn("qemu", self.command()).map_err(|e| {
            format!(
                "cannot start {}: {e} (run scripts/setup)",
                self.config.qemu.display()
            )
        })?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let readers = qemu.take_output(output.clone());
        let (status, spoke) = self.wait(&mut qemu, host_action, &output);
        let end = Instant::now();
        let spoke = spoke.unwrap_or(end);
        timing.boot += (spoke - start).as_secs_f64();
        timing.guest += (end - spoke).as_secs_f64();
        qemu.kill();
        for r in readers {
            let _ = r.join();
        }
        console.extend(output.lock().map(|c| c.clone()).unwrap_or_default());
        Ok(status)
    }

    /// Whether the guest has written no event yet (QEMU truncates the file
    /// at start).
    fn guest_silent(&self) -> bool {
        std::fs::metadata(self.events).is_ok_and(|m| m.len() == 0)
    }

    fn command(&self) -> Command {
        let qemu = match self.transport {
            Transport::VirtioBlk => &self.config.qemu,
            Transport::Nvme => &self.config.qemu_nvme,
        };
        let mut cmd = guest_command(
            qemu,
            &self.machine.args(),
            (&self.kernel.image, self.initrd),
            self.params,
            ("stdio", self.events),
        );
        cmd.args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-machine", "q35,memory-backend=mem"])
            .args(disk_device(
                self.transport,
                self.socket,
                self.config.queues,
                self.reconnect,
            ));
        cmd
    }

    /// Waits for QEMU until the timeout or an interrupt; while the guest
    /// runs, the runner does what it asks of the host, and says so on the
    /// console. How QEMU ended, and when the guest's first event was seen.
    fn wait(
        &self,
        qemu: &mut Child,
        host_action: &mut dyn FnMut(HostAction) -> CheckRecord,
        console: &Mutex<Vec<String>>,
    ) -> (std::io::Result<Option<ExitStatus>>, Option<Instant>) {
        let mut asks = EventTail::new(self.events);
        let mut spoke = None;
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match qemu.wait_timeout(left.min(EVENT_POLL)) {
                Ok(None) if !left.is_zero() && !crate::process::interrupted() => {
                    let events = asks.poll();
                    if spoke.is_none() && !events.is_empty() {
                        spoke = Some(Instant::now());
                    }
                    for event in events {
                        if let Event::Host { action, .. } = event {
                            let done = host_action(action);
                            if let Ok(mut c) = console.lock() {
                                c.push(format!("dmaprobe run: {}: {}", done.name, done.detail));
                            }
                        }
                    }
                }
                other => return (other, spoke),
            }
        }
    }
}

/// QEMU under `accel_args` booting `kernel` with `initrd` (`boot`) and the
/// guest's `params`: the guest every boot of a run gets (two vCPUs,
/// 512 MiB, no default devices, no reboot), its console on the `-serial`
/// of `serial.0`, its events in the file `serial.1`; stdin closed, stdout
/// and stderr piped. The caller adds memory and disks.
pub(super) fn guest_command(
    qemu: &Path,
    accel_args: &[&str],
    boot: (&Path, &Path),
    params: &GuestParams,
    serial: (&str, &Path),
) -> Command {
    let append = format!(
        "console=ttyS0 panic=-1 init_on_free=1 {}",
        params.to_cmdline()
    );
    let mut cmd = Command::new(qemu);
    cmd.args(accel_args)
        .args(["-smp", "2", "-m", "512M"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(boot.0)
        .arg("-initrd")
        .arg(boot.1)
        .args(["-append", &append])
        .args(["-serial", serial.0])
        .arg("-serial")
        .arg(format!("file:{}", serial.1.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
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
pub(super) fn qemu_opt(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::config::Daemon;

    /// How the stand-in for QEMU ends a run.
    #[derive(Clone, Copy)]
    enum End {
        /// Killed by SIGABRT, as QEMU's assertions do.
        Abort,
        /// Exits cleanly after a kernel panic on the console (`panic=-1`
        /// with `-no-reboot`).
        Panic,
        /// Hangs past the boot's timeout.
        Hang,
    }

    /// Boots a stand-in for QEMU: a script that counts its runs and ends
    /// its `n`th run as `ends[n - 1]` says (cleanly past the list);
    /// `guest_spoke` puts an event in the events file first.
    fn boot_with(ends: &[End], guest_spoke: bool) -> (Result<(), String>, Console, usize) {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let qemu = dir.path().join("qemu");
        let mut script = format!(
            "#!/bin/sh\necho run >> {runs}\nn=$(wc -l < {runs})\necho \"console of run $n\"\n",
            runs = runs.display()
        );
        for (i, end) in ends.iter().enumerate() {
            let action = match end {
                End::Abort => "kill -ABRT $$",
                End::Panic => {
                    "echo '[    1.9] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI'; \
                     echo '[    1.9] Kernel panic - not syncing: Fatal exception'; exit 0"
                }
                End::Hang => "exec sleep 30",
            };
            script += &format!("[ $n = {} ] && {{ {action}; }}\n", i + 1);
        }
        script += "exit 0\n";
        crate::test_utils::write_executable(&qemu, &script);
        let events = dir.path().join("events.jsonl");
        std::fs::write(&events, if guest_spoke { "{}\n" } else { "" }).unwrap();
        let mut config = RunConfig::for_tests(Daemon::Dmaprobe);
        config.qemu = qemu;
        let kernel = Kernel {
            name: "k".into(),
            image: dir.path().join("bzImage"),
            modules: None,
            release: None,
        };
        let boot = Boot {
            config: &config,
            machine: Machine::Tcg,
            kernel: &kernel,
            transport: Transport::VirtioBlk,
            initrd: &dir.path().join("initrd"),
            socket: &dir.path().join("vhost.sock"),
            events: &events,
            params: &GuestParams::default(),
            // A hang is waited for a second only.
            timeout: Duration::from_secs(if ends.iter().any(|e| matches!(e, End::Hang)) {
                1
            } else {
                30
            }),
            reconnect: false,
        };
        let mut console = Console::default();
        let result = boot.run(
            &mut |_| unreachable!("no host action"),
            &mut console,
            &mut Timing::default(),
        );
        let n = std::fs::read_to_string(&runs).unwrap().lines().count();
        (result, console, n)
    }

    #[test]
    fn qemu_killed_before_the_guest_spoke_is_booted_once_more() {
        let (result, console, runs) = boot_with(&[End::Abort], false);
        assert_eq!(result, Ok(()));
        assert_eq!(runs, 2);
        assert_eq!(console.lines, ["console of run 2"]);
        assert_eq!(console.repeated.len(), 1);
        assert!(console.repeated[0].why.contains("killed by signal 6"));
        assert_eq!(console.repeated[0].lines, ["console of run 1"]);
        let log = console.log();
        assert!(log.starts_with("----- dmaprobe run: a boot repeated: QEMU was killed by signal 6"));
        assert!(
            log.ends_with("the boots that count -----\nconsole of run 2"),
            "{log}"
        );
    }

    #[test]
    fn a_kernel_panic_before_the_guest_spoke_is_set_aside_and_booted_once_more() {
        let (result, console, runs) = boot_with(&[End::Panic], false);
        assert_eq!(result, Ok(()));
        assert_eq!(runs, 2);
        assert_eq!(
            console.lines,
            ["console of run 2"],
            "the panic is not judged"
        );
        let why = &console.repeated[0].why;
        assert!(
            why.starts_with("the kernel panicked before the guest started"),
            "{why}"
        );
        assert!(why.contains("Oops: int3"), "{why}");
        assert!(
            console.log().contains("Kernel panic - not syncing"),
            "kept in console.log"
        );
    }

    #[test]
    fn a_boot_that_hangs_before_the_guest_spoke_is_booted_once_more() {
        let (result, console, runs) = boot_with(&[End::Hang], false);
        assert_eq!(result, Ok(()));
        assert_eq!(runs, 2);
        let why = &console.repeated[0].why;
        assert_eq!(why, "the guest had not started when the boot's 1 s ran out");
        let (result, _, runs) = boot_with(&[End::Hang, End::Hang], false);
        assert!(result.unwrap_err().contains("did not finish within 1 s"));
        assert_eq!(runs, 2, "booted once more, not again and again");
        let (result, console, runs) = boot_with(&[End::Hang], true);
        assert!(result.unwrap_err().contains("did not finish within 1 s"));
        assert_eq!(runs, 1, "the guest had started: its run is judged");
        assert!(console.repeated.is_empty());
    }

    #[test]
    fn a_second_death_or_one_after_the_guest_spoke_is_judged() {
        let (result, console, runs) = boot_with(&[End::Abort, End::Abort], false);
        assert!(result.unwrap_err().contains("signal: 6"));
        assert_eq!(runs, 2, "booted once more, not again and again");
        assert_eq!(console.repeated.len(), 1);
        let (result, console, runs) = boot_with(&[End::Panic, End::Panic], false);
        assert_eq!(result, Ok(()), "QEMU exits cleanly after a panic");
        assert_eq!(runs, 2);
        assert_eq!(
            crate::klog::errors(&console.lines).len(),
            2,
            "the second panic is judged"
        );
        let (result, console, runs) = boot_with(&[End::Abort], true);
        assert!(result.unwrap_err().contains("signal: 6"));
        assert_eq!(runs, 1, "the guest had started: its run is judged");
        assert_eq!(console.lines, ["console of run 1"]);
        let (_, console, runs) = boot_with(&[End::Panic], true);
        assert_eq!(runs, 1);
        assert!(console.repeated.is_empty());
        assert_eq!(crate::klog::errors(&console.lines).len(), 2);
    }

    #[test]
    fn over_nvme_qemu_gets_the_json_device_and_over_virtio_a_socket_it_reconnects() {
        let dir = Path::new("/tmp/run,1");
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
    }
}
