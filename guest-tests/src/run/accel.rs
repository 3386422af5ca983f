//! How QEMU runs the guests: KVM where it works, TCG otherwise.
//!
//! `/dev/kvm` opening is not proof that guests run under it: on some hosts
//! QEMU asserts at once on an MSR with `-cpu host`, and with its default CPU
//! model the guest stops at its first BMI2 instruction ("KVM internal error",
//! "emulation failure") while QEMU hangs. So [`Accel::Auto`] boots the run's
//! first kernel and initramfs once, with no test, under each CPU model in
//! [`KVM_CPUS`] in turn, and takes the first whose guest starts and powers
//! off cleanly; failing all, TCG. Verdicts do not depend on the choice: every
//! pinning test waits on holds, never on timing.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::events::read_events;
use super::qemu::guest_command;
use crate::process::Child;
use crate::protocol::{Event, GuestParams};

/// What `--accel` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM when a probe boot shows that it works, TCG otherwise.
    Auto,
    /// KVM, or the run stops with the probe's reason.
    Kvm,
    /// QEMU's emulator, no probe.
    Tcg,
}

impl Accel {
    pub const ALL: [Accel; 3] = [Accel::Auto, Accel::Kvm, Accel::Tcg];

    /// The name `--accel` takes.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The device QEMU opens for KVM.
pub(super) const KVM_DEVICE: &str = "/dev/kvm";

/// The CPU models a KVM guest is tried with, in order: the host's own, then
/// QEMU's default (`None`).
const KVM_CPUS: [Option<&str>; 2] = [Some("host"), None];

/// How long a probe boot may take. A guest that runs under KVM is done in a
/// second or two.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the probe's kernel may print nothing. Under KVM its first line
/// comes well within a second; the failures seen end at once (QEMU asserts),
/// say so (an emulation failure) or leave the guest silent.
const PROBE_SILENCE: Duration = Duration::from_secs(5);

/// What QEMU prints when KVM cannot run the guest's code (it then hangs).
const KVM_FAILURES: [&str; 2] = ["KVM internal error", "emulation failure"];

/// The accelerator the run's guests get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    Tcg,
    /// KVM with this `-cpu` model (`None`: QEMU's default).
    Kvm {
        cpu: Option<&'static str>,
    },
}

impl Machine {
    /// QEMU's arguments for it.
    pub(super) fn args(self) -> Vec<&'static str> {
        match self {
            Machine::Tcg => vec!["-accel", "tcg"],
            Machine::Kvm { cpu: None } => vec!["-accel", "kvm"],
            Machine::Kvm { cpu: Some(cpu) } => vec!["-accel", "kvm", "-cpu", cpu],
        }
    }

    /// How the run's first line names it.
    fn describe(self) -> String {
        match self {
            Machine::Tcg => "TCG".to_owned(),
            Machine::Kvm { cpu: None } => "KVM (QEMU's default CPU model)".to_owned(),
            Machine::Kvm { cpu: Some(cpu) } => format!("KVM (-cpu {cpu})"),
        }
    }
}

/// The choice made, and why, in one line for stderr.
#[derive(Debug)]
pub(super) struct Choice {
    pub(super) machine: Machine,
    pub(super) why: String,
}

/// A way to boot the guest once with no test under the given QEMU
/// arguments: `Ok` when it started and powered off cleanly, else why not.
pub(super) type Probe<'a> = dyn Fn(&[&str]) -> Result<(), String> + 'a;

/// Chooses the accelerator `asked` allows, proving KVM with `probe`; `Err`
/// only when KVM was asked for and does not work, with why.
pub(super) fn choose(asked: Accel, kvm_device: &Path, probe: &Probe) -> Result<Choice, String> {
    if asked == Accel::Tcg {
        return Ok(Choice {
            machine: Machine::Tcg,
            why: "--accel tcg".to_owned(),
        });
    }
    let start = Instant::now();
    let kvm = open_kvm(kvm_device).and_then(|()| {
        let mut failed = Vec::new();
        for cpu in KVM_CPUS {
            let machine = Machine::Kvm { cpu };
            match probe(&machine.args()) {
                Ok(()) => return Ok(machine),
                Err(e) => failed.push(format!("{}: {e}", machine.describe())),
            }
        }
        Err(failed.join("; "))
    });
    let probed = format!("probe {:.1} s", start.elapsed().as_secs_f64());
    match (kvm, asked) {
        (Ok(machine), _) => Ok(Choice {
            machine,
            why: format!("a guest ran under it ({probed})"),
        }),
        (Err(e), Accel::Kvm) => Err(e),
        (Err(e), _) => Ok(Choice {
            machine: Machine::Tcg,
            why: format!("KVM does not run guests here: {e} ({probed})"),
        }),
    }
}

impl Choice {
    /// The line the run says once.
    pub(super) fn line(&self) -> String {
        format!("guests run under {}: {}", self.machine.describe(), self.why)
    }
}

/// `Ok` when the KVM device opens for reading and writing, as QEMU opens it.
fn open_kvm(device: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map(drop)
        .map_err(|e| format!("cannot open {}: {e}", device.display()))
}

/// One boot of `kernel` and `initrd` under `qemu` with `accel_args`, the
/// guest running no test, its console and events in files in `dir`; `Ok`
/// when the guest started, said it was done, and QEMU exited cleanly within
/// [`PROBE_TIMEOUT`]. A kernel silent for [`PROBE_SILENCE`], or QEMU saying
/// KVM failed, ends it at once.
pub(super) fn probe_boot(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    accel_args: &[&str],
) -> Result<(), String> {
    let console = dir.join("probe-console.log");
    let events = dir.join("probe-events.jsonl");
    let console_file = format!("file:{}", console.display());
    let cmd = guest_command(
        qemu,
        accel_args,
        (kernel, initrd),
        &GuestParams::default(),
        (&console_file, &events),
    );
    let mut child =
        Child::spawn("qemu", cmd).map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    // QEMU's own messages; the guest's console goes to its file.
    let said = Arc::new(Mutex::new(Vec::new()));
    let readers = child.take_output(said.clone());
    let status = watch(&mut child, &said, &console);
    child.kill();
    for r in readers {
        let _ = r.join();
    }
    let status = status?;
    if !status.success() {
        let first = said
            .lock()
            .ok()
            .and_then(|s| s.iter().find(|l| l.contains("error")).cloned());
        let first = first.map_or(String::new(), |l| format!(": {}", l.trim()));
        return Err(format!("QEMU exited with {status}{first}"));
    }
    if !read_events(&events).contains(&Event::Done) {
        return Err("the guest powered off without running".to_owned());
    }
    Ok(())
}

/// Waits for the probe's QEMU to exit; `Err` as soon as it says KVM failed,
/// the kernel has been silent on `console` for [`PROBE_SILENCE`], or
/// [`PROBE_TIMEOUT`] has passed.
fn watch(
    child: &mut Child,
    said: &Mutex<Vec<String>>,
    console: &Path,
) -> Result<std::process::ExitStatus, String> {
    let start = Instant::now();
    loop {
        if let Some(status) = child
            .wait_timeout(Duration::from_millis(20))
            .map_err(|e| format!("waiting for QEMU failed: {e}"))?
        {
            return Ok(status);
        }
        let failure = said.lock().ok().and_then(|lines| {
            lines
                .iter()
                .find(|l| KVM_FAILURES.iter().any(|f| l.contains(f)))
                .cloned()
        });
        if let Some(line) = failure {
            return Err(format!("QEMU said {:?}", line.trim()));
        }
        let waited = start.elapsed();
        let silent = std::fs::metadata(console).map_or(true, |m| m.len() == 0);
        if silent && waited > PROBE_SILENCE {
            return Err(format!(
                "the kernel printed nothing within {} s",
                PROBE_SILENCE.as_secs()
            ));
        }
        if waited > PROBE_TIMEOUT {
            return Err(format!(
                "the guest did not power off within {} s",
                PROBE_TIMEOUT.as_secs()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Chooses with a probe that answers from `answers` in turn, and says
    /// which QEMU arguments it was asked for.
    fn choose_with(
        asked: Accel,
        device: &Path,
        answers: &[Result<(), &str>],
    ) -> (Result<Choice, String>, Vec<Vec<String>>) {
        let asked_for = RefCell::new(Vec::new());
        let probe = |args: &[&str]| {
            let mut asked_for = asked_for.borrow_mut();
            asked_for.push(args.iter().map(|a| a.to_string()).collect());
            answers[asked_for.len() - 1].map_err(str::to_owned)
        };
        let choice = choose(asked, device, &probe);
        (choice, asked_for.into_inner())
    }

    #[test]
    fn tcg_asked_for_probes_nothing() {
        let (choice, probed) = choose_with(Accel::Tcg, Path::new("/dev/null"), &[]);
        assert_eq!(choice.unwrap().machine, Machine::Tcg);
        assert!(probed.is_empty());
    }

    #[test]
    fn auto_takes_the_first_cpu_model_a_guest_runs_under() {
        let dev = Path::new("/dev/null");
        let (choice, probed) = choose_with(Accel::Auto, dev, &[Ok(())]);
        assert_eq!(choice.unwrap().machine, Machine::Kvm { cpu: Some("host") });
        assert_eq!(probed, [["-accel", "kvm", "-cpu", "host"]]);

        let (choice, probed) = choose_with(Accel::Auto, dev, &[Err("MSR"), Ok(())]);
        assert_eq!(choice.unwrap().machine, Machine::Kvm { cpu: None });
        assert_eq!(probed.len(), 2);
    }

    #[test]
    fn auto_falls_back_to_tcg_saying_why_and_kvm_asked_for_stops_the_run() {
        let dev = Path::new("/dev/null");
        let fails = [Err("failed to set MSR"), Err("emulation failure")];
        let choice = choose_with(Accel::Auto, dev, &fails).0.unwrap();
        assert_eq!(choice.machine, Machine::Tcg);
        let line = choice.line();
        assert!(
            line.starts_with("guests run under TCG: KVM does not run guests here: ")
                && line.contains("KVM (-cpu host): failed to set MSR")
                && line.contains("KVM (QEMU's default CPU model): emulation failure"),
            "{line}"
        );
        let err = choose_with(Accel::Kvm, dev, &fails).0.unwrap_err();
        assert!(err.contains("failed to set MSR"), "{err}");
    }

    /// Probes with a stand-in for QEMU: a shell script that does `body`
    /// with `$console` and `$events` set to the files QEMU was given.
    fn probe_with(body: &str) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let qemu = dir.path().join("qemu");
        let script = format!(
            "#!/bin/sh\nfor a; do case $a in file:*console*) console=${{a#file:}};; \
             file:*events*) events=${{a#file:}};; esac; done\n{body}\n"
        );
        crate::test_utils::write_executable(&qemu, &script);
        let (kernel, initrd) = (dir.path().join("bzImage"), dir.path().join("initrd"));
        probe_boot(&qemu, &kernel, &initrd, dir.path(), &["-accel", "kvm"])
    }

    #[test]
    fn a_probe_passes_when_the_guest_ran_and_powered_off() {
        let guest_ran = r#"echo 'Linux version' > $console; echo '{"event":"done"}' > $events"#;
        assert_eq!(probe_with(guest_ran), Ok(()));
        let err = probe_with("echo 'Linux version' > $console").unwrap_err();
        assert_eq!(err, "the guest powered off without running");
    }

    #[test]
    fn a_probe_fails_at_once_on_an_assertion_or_an_emulation_failure() {
        let start = Instant::now();
        let err = probe_with("echo 'qemu: error: failed to set MSR 0x10a' >&2; kill -ABRT $$")
            .unwrap_err();
        assert!(
            err.contains("SIGABRT") && err.contains("failed to set MSR"),
            "{err}"
        );
        let err =
            probe_with("echo 'KVM internal error. Suberror: 1' >&2; exec sleep 20").unwrap_err();
        assert!(err.contains("KVM internal error"), "{err}");
        assert!(start.elapsed() < PROBE_SILENCE, "{:?}", start.elapsed());
    }

    #[test]
    fn no_kvm_device_is_tcg_without_a_boot() {
        let (choice, probed) = choose_with(Accel::Auto, Path::new("/nonexistent/kvm"), &[]);
        let line = choice.unwrap().line();
        assert!(line.contains("cannot open /nonexistent/kvm"), "{line}");
        assert!(probed.is_empty());
    }
}
