//! One boot of the guest under QEMU: its command line with the disk device
//! on the daemon's socket, and the wait for it to power off, doing meanwhile
//! what the guest asks of the host.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::config::{RunConfig, Transport};
use super::events::EventTail;
use super::result::CheckRecord;
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

impl Boot<'_> {
    /// Boots the guest and waits for it to power off, doing what it asks of
    /// the host (`host_action`) meanwhile; its console is appended to
    /// `console`. An error unless QEMU exited cleanly in time.
    ///
    /// QEMU killed by a signal before the guest wrote its first event (an
    /// assertion in QEMU's own device code, seen under TCG while the kernel
    /// probes PCI) is QEMU's fault, not the kernel's or the device's: the
    /// guest is booted once more, and the console says so.
    pub(super) fn run(
        &self,
        host_action: &mut dyn FnMut(HostAction) -> CheckRecord,
        console: &mut Vec<String>,
    ) -> Result<(), String> {
        let mut status = self.boot_once(host_action, console)?;
        if let Ok(Some(s)) = &status {
            if let (Some(signal), true) = (s.signal(), self.guest_silent()) {
                console.push(format!(
                    "dmaprobe run: QEMU was killed by signal {signal} before the guest \
                     started; booting again"
                ));
                status = self.boot_once(host_action, console)?;
            }
        }
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

    /// Starts QEMU and waits for it; its console is appended to `console`.
    fn boot_once(
        &self,
        host_action: &mut dyn FnMut(HostAction) -> CheckRecord,
        console: &mut Vec<String>,
    ) -> Result<std::io::Result<Option<ExitStatus>>, String> {
        let mut qemu = Child::spawn("qemu", self.command()).map_err(|e| {
            format!(
                "cannot start {}: {e} (run scripts/setup)",
                self.config.qemu.display()
            )
        })?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let readers = qemu.take_output(output.clone());
        let status = self.wait(&mut qemu, host_action, &output);
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
        let append = format!(
            "console=ttyS0 panic=-1 init_on_free=1 {}",
            self.params.to_cmdline()
        );
        let qemu = match self.transport {
            Transport::VirtioBlk => &self.config.qemu,
            Transport::Nvme => &self.config.qemu_nvme,
        };
        let mut cmd = Command::new(qemu);
        cmd.args(["-accel", "tcg", "-smp", "2", "-m", "512M"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-machine", "q35,memory-backend=mem"])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel.image)
            .arg("-initrd")
            .arg(self.initrd)
            .args(["-append", &append])
            .args(["-serial", "stdio"])
            .arg("-serial")
            .arg(format!("file:{}", self.events.display()))
            .args(disk_device(
                self.transport,
                self.socket,
                self.config.queues,
                self.reconnect,
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Waits for QEMU until the timeout or an interrupt; while the guest
    /// runs, the runner does what it asks of the host, and says so on the
    /// console.
    fn wait(
        &self,
        qemu: &mut Child,
        host_action: &mut dyn FnMut(HostAction) -> CheckRecord,
        console: &Mutex<Vec<String>>,
    ) -> std::io::Result<Option<ExitStatus>> {
        let mut asks = EventTail::new(self.events);
        let deadline = Instant::now() + self.timeout;
        loop {
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
                other => return other,
            }
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
pub(super) fn qemu_opt(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::config::Daemon;
    use std::os::unix::fs::PermissionsExt;

    /// Boots a stand-in for QEMU: a script that counts its runs in
    /// `runs` and aborts (SIGABRT, as QEMU's assertions do) on the runs
    /// `abort_on` names; `guest_spoke` puts an event in the file first.
    fn boot_with(abort_on: &str, guest_spoke: bool) -> (Result<(), String>, Vec<String>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        let qemu = dir.path().join("qemu");
        std::fs::write(
            &qemu,
            format!(
                "#!/bin/sh\necho run >> {runs}\nn=$(wc -l < {runs})\necho \"console of run $n\"\n\
                 case \" {abort_on} \" in *\" $n \"*) kill -ABRT $$ ;; esac\nexit 0\n",
                runs = runs.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
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
            kernel: &kernel,
            transport: Transport::VirtioBlk,
            initrd: &dir.path().join("initrd"),
            socket: &dir.path().join("vhost.sock"),
            events: &events,
            params: &GuestParams::default(),
            timeout: Duration::from_secs(30),
            reconnect: false,
        };
        let mut console = Vec::new();
        let result = boot.run(&mut |_| unreachable!("no host action"), &mut console);
        let n = std::fs::read_to_string(&runs).unwrap().lines().count();
        (result, console, n)
    }

    #[test]
    fn qemu_killed_before_the_guest_spoke_is_booted_once_more() {
        let (result, console, runs) = boot_with("1", false);
        assert_eq!(result, Ok(()));
        assert_eq!(runs, 2);
        assert_eq!(console[0], "console of run 1");
        assert!(console[1].contains("killed by signal 6"), "{console:?}");
        assert!(console[1].contains("booting again"), "{console:?}");
        assert_eq!(console[2], "console of run 2");
    }

    #[test]
    fn qemu_killed_twice_or_after_the_guest_spoke_is_an_error() {
        let (result, _, runs) = boot_with("1 2", false);
        assert!(result.unwrap_err().contains("signal: 6"));
        assert_eq!(runs, 2, "booted once more, not again and again");
        let (result, console, runs) = boot_with("1", true);
        assert!(result.unwrap_err().contains("signal: 6"));
        assert_eq!(runs, 1, "the guest had started: its run is judged");
        assert_eq!(console, ["console of run 1"]);
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
