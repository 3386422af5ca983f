//! The guest-to-host protocol: the events the guest writes, what it asks of
//! the host, and the parameters it boots with.
//!
//! The guest writes one [`Event`] per line, as JSON, to its second serial port
//! (`/dev/ttyS1`). It also writes `dmaprobe: begin TEST` / `dmaprobe: end TEST`
//! to `/dev/kmsg`, so the kernel log on the first serial port can be split by test.
//!
//! The guest learns what to do from the kernel command line ([`GuestParams`]).

use serde::{Deserialize, Serialize};

/// The outcome of one test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Fail,
    /// The kernel lacks what the test needs.
    Skip,
    /// The harness, not the kernel, went wrong.
    Error,
}

impl Verdict {
    /// The verdict as the reports show it (and JSON spells it).
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
            Verdict::Error => "ERROR",
        }
    }
}

/// One line from the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The guest binary started.
    Hello { kernel: String, tests: Vec<String> },
    /// A test started.
    Begin { test: String },
    /// One check within a test, passed or failed, with what was seen.
    Check {
        test: String,
        name: String,
        ok: bool,
        detail: String,
    },
    /// The guest wrote `len` bytes of [`fill_pattern`](wire::pattern::fill_pattern)`(seed, offset)` to the raw
    /// device at byte `offset`; the host checks the backing holds them.
    Wrote {
        test: String,
        offset: u64,
        len: u64,
        seed: u64,
    },
    /// The guest left a file of `len` bytes of [`fill_pattern`](wire::pattern::fill_pattern)`(seed, 0)` at
    /// `path` on the test's file system; the host checks it after shutdown.
    File {
        test: String,
        path: String,
        len: u64,
        seed: u64,
    },
    /// A property of the kernel the test observed (not a pass or fail by itself).
    Note {
        test: String,
        key: String,
        value: String,
    },
    /// A test ended with the guest's own verdict and, unless it passed, why.
    End {
        test: String,
        verdict: Verdict,
        reason: String,
    },
    /// The guest asks the host to do something to the device now; the runner
    /// does it while the guest carries on.
    Host { test: String, action: HostAction },
    /// Every test has run; the guest powers off next.
    Done,
}

/// What a guest may ask of the host while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostAction {
    /// Kill the daemon with SIGKILL and start it again with the same
    /// arguments, on the same disk and socket; QEMU reconnects to it.
    RestartDaemon,
}

impl Event {
    /// The line the guest writes.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"event":"note","test":"","key":"encode-error","value":"{e}"}}"#)
        });
        s.push('\n');
        s
    }

    /// Parses a line from the guest; anything else (noise, a torn line) is `None`.
    pub fn from_line(line: &str) -> Option<Event> {
        serde_json::from_str(line.trim()).ok()
    }
}

/// What the guest is told on the kernel command line, as `dmaprobe.KEY=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestParams {
    /// Tests to run, in order (`dmaprobe.tests=smoke,ext4`).
    pub tests: Vec<String>,
    /// The disk's size in bytes, as the host configured it (`dmaprobe.size`).
    pub disk_size: Option<u64>,
    /// The disk's logical block size (`dmaprobe.lbs`).
    pub lbs: Option<u64>,
    /// The seed for data patterns (`dmaprobe.seed`).
    pub seed: u64,
    /// The disk has a mailbox (`dmaprobe.mailbox=1`).
    pub mailbox: bool,
    /// Which boot of the test this is, from 1 (`dmaprobe.boot`): a test of
    /// several boots against one disk does its next part in each.
    pub boot: u8,
    /// How long a timed test (the soak) runs its workload, in seconds
    /// (`dmaprobe.duration`); `None` leaves it to the test.
    pub duration: Option<u64>,
    /// The disk under test as the guest names it (`dmaprobe.disk`); `None`
    /// is virtio-blk's `/dev/vda`.
    pub disk: Option<String>,
}

impl Default for GuestParams {
    fn default() -> Self {
        GuestParams {
            tests: Vec::new(),
            disk_size: None,
            lbs: None,
            seed: 0,
            mailbox: false,
            boot: 1,
            duration: None,
            disk: None,
        }
    }
}

impl GuestParams {
    /// Reads the `dmaprobe.*` parameters from a kernel command line.
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut p = GuestParams::default();
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word
                .strip_prefix("dmaprobe.")
                .and_then(|kv| kv.split_once('='))
            else {
                continue;
            };
            match key {
                "tests" => {
                    p.tests = value
                        .split(',')
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                        .collect()
                }
                "size" => p.disk_size = value.parse().ok(),
                "lbs" => p.lbs = value.parse().ok(),
                "seed" => p.seed = value.parse().unwrap_or(0),
                "mailbox" => p.mailbox = value == "1",
                "boot" => p.boot = value.parse().unwrap_or(1),
                "duration" => p.duration = value.parse().ok(),
                "disk" => p.disk = Some(value.to_owned()).filter(|d| d.starts_with("/dev/")),
                _ => {}
            }
        }
        p
    }

    /// The words to put on the kernel command line.
    pub fn to_cmdline(&self) -> String {
        let mut words = vec![format!("dmaprobe.tests={}", self.tests.join(","))];
        if let Some(size) = self.disk_size {
            words.push(format!("dmaprobe.size={size}"));
        }
        if let Some(lbs) = self.lbs {
            words.push(format!("dmaprobe.lbs={lbs}"));
        }
        words.push(format!("dmaprobe.seed={}", self.seed));
        if self.mailbox {
            words.push("dmaprobe.mailbox=1".into());
        }
        if self.boot != 1 {
            words.push(format!("dmaprobe.boot={}", self.boot));
        }
        if let Some(seconds) = self.duration {
            words.push(format!("dmaprobe.duration={seconds}"));
        }
        if let Some(disk) = &self.disk {
            words.push(format!("dmaprobe.disk={disk}"));
        }
        words.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_as_lines() {
        let events = [
            Event::Hello {
                kernel: "6.12".into(),
                tests: vec!["smoke".into()],
            },
            Event::Wrote {
                test: "smoke".into(),
                offset: 4096,
                len: 512,
                seed: 7,
            },
            Event::End {
                test: "smoke".into(),
                verdict: Verdict::Fail,
                reason: "mismatch at byte 3".into(),
            },
            Event::Host {
                test: "daemon-restart".into(),
                action: HostAction::RestartDaemon,
            },
            Event::Done,
        ];
        for e in events {
            let line = e.to_line();
            assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
            assert_eq!(Event::from_line(&line), Some(e));
        }
        assert_eq!(Event::from_line("[    1.0] random console noise"), None);
        assert_eq!(Event::from_line(r#"{"event":"end","test":"x""#), None);
    }

    #[test]
    fn params_round_trip() {
        let p = GuestParams {
            tests: vec!["smoke".into(), "ext4".into()],
            disk_size: Some(1 << 28),
            lbs: Some(4096),
            seed: 42,
            mailbox: true,
            boot: 2,
            duration: None,
            disk: None,
        };
        let cmdline = format!("console=ttyS0 panic=-1 {} quiet", p.to_cmdline());
        assert!(cmdline.contains(" dmaprobe.boot=2 "), "{cmdline}");
        assert_eq!(GuestParams::from_cmdline(&cmdline), p);
        // The first boot is the default, and is not spelled out.
        let first = GuestParams {
            boot: 1,
            ..p.clone()
        };
        assert!(!first.to_cmdline().contains("boot"));
        assert_eq!(GuestParams::from_cmdline(&first.to_cmdline()), first);
        assert_eq!(GuestParams::from_cmdline("quiet").boot, 1);
    }

    #[test]
    fn the_disk_rides_on_the_command_line_and_only_a_dev_path_is_taken() {
        let nvme = GuestParams {
            tests: vec!["smoke".into()],
            disk: Some("/dev/nvme0n1".into()),
            ..GuestParams::default()
        };
        let cmdline = format!("console=ttyS0 {} quiet", nvme.to_cmdline());
        assert!(
            cmdline.contains(" dmaprobe.disk=/dev/nvme0n1 "),
            "{cmdline}"
        );
        assert_eq!(GuestParams::from_cmdline(&cmdline), nvme);
        assert!(!GuestParams::default().to_cmdline().contains("disk="));
        assert_eq!(GuestParams::from_cmdline("dmaprobe.disk=vda").disk, None);
    }

    #[test]
    fn a_timed_tests_duration_rides_on_the_command_line() {
        let soak = GuestParams {
            tests: vec!["soak".into()],
            duration: Some(180),
            ..GuestParams::default()
        };
        let cmdline = format!("console=ttyS0 {} quiet", soak.to_cmdline());
        assert!(cmdline.contains(" dmaprobe.duration=180 "), "{cmdline}");
        assert_eq!(GuestParams::from_cmdline(&cmdline), soak);
        // Untimed tests say nothing of it; a bad value is no duration.
        let smoke = GuestParams {
            tests: vec!["smoke".into()],
            ..GuestParams::default()
        };
        assert!(!smoke.to_cmdline().contains("duration"));
        assert_eq!(
            GuestParams::from_cmdline("dmaprobe.duration=3m").duration,
            None
        );
    }
}
