//! One boot of the guest under QEMU: its command line with the disk device
//! on the daemon's socket, and the wait for it to power off, doing meanwhile
//! what the guest asks of the host.

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
    pub(super) fn run(
        &self,
        host_action: &mut dyn FnMut(HostAction) -> CheckRecord,
        console: &mut Vec<String>,
    ) -> Result<(), String> {
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
