//! The verdict of a test run: the guest's own verdict, overruled by a
//! harness error, an error in the kernel log, a boot that never reported
//! its end, a failed host check or a device finding; or the host's SKIP of
//! a test it did not boot.

use super::config::{Daemon, Transport};
use super::result::{CheckRecord, Evidence, TestResult};
use crate::kernel::Kernel;
use crate::klog;
use crate::protocol::{Event, Verdict};
use crate::suite::TestSpec;

/// How many console lines a report keeps of a guest that failed to finish.
const CONSOLE_TAIL: usize = 25;

/// Joins the guest's verdict, the host's checks and the kernel log.
pub(super) fn judge(test: &TestSpec, kernel: &Kernel, daemon: Daemon, ev: Evidence) -> TestResult {
    let guest = GuestSaid::read(test, &ev.events);
    let mut checks = guest.checks;
    checks.extend(ev.checks);
    let mut notes = guest.notes;
    notes.extend(ev.notes);
    let kernel_log_errors = klog::errors(&ev.console);
    let findings: Vec<serde_json::Value> = ev
        .ledger
        .iter()
        .filter(|e| e["kind"] == "finding")
        .cloned()
        .collect();
    let (verdict, reason) = if let Some(why) = &ev.skip {
        (Verdict::Skip, why.clone())
    } else if let Some(err) = &ev.error {
        (Verdict::Error, err.clone())
    } else if let Some(reason) = kernel_log_error(&kernel_log_errors) {
        (Verdict::Fail, reason)
    } else {
        guest_verdict(test, guest.end, guest.ends, &checks, &findings)
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
        timing: ev.timing,
    }
}

/// What the guest's events say of the test.
#[derive(Debug, Default)]
struct GuestSaid {
    checks: Vec<CheckRecord>,
    notes: Vec<(String, String)>,
    /// The worst of the verdicts its boots ended with, and its reason.
    end: Option<(Verdict, String)>,
    /// How many boots reported their end.
    ends: u8,
}

impl GuestSaid {
    /// A test of several boots ends once in each: the worst of them counts
    /// (its reason says which boot), and the number of ends is kept, for a
    /// boot that never reported its end leaves the test unjudged.
    fn read(test: &TestSpec, events: &[Event]) -> GuestSaid {
        let mut said = GuestSaid::default();
        for e in events {
            match e {
                Event::Check {
                    name, ok, detail, ..
                } => said.checks.push(CheckRecord {
                    name: name.clone(),
                    ok: *ok,
                    detail: detail.clone(),
                }),
                Event::Note { key, value, .. } => said.notes.push((key.clone(), value.clone())),
                Event::End {
                    test: t,
                    verdict,
                    reason,
                } if t == test.name => {
                    said.ends += 1;
                    let reason = match test.boots {
                        _ if reason.is_empty() => String::new(),
                        1 => reason.clone(),
                        _ => format!("boot {}: {reason}", said.ends),
                    };
                    if said
                        .end
                        .as_ref()
                        .is_none_or(|(worst, _)| severity(*verdict) > severity(*worst))
                    {
                        said.end = Some((*verdict, reason));
                    }
                }
                _ => {}
            }
        }
        said
    }
}

/// The kernel log's first error line, and how many there are.
fn kernel_log_error(errors: &[String]) -> Option<String> {
    let line = errors.first()?;
    Some(format!(
        "kernel log: {} ({} error line(s))",
        line.trim(),
        errors.len()
    ))
}

/// The verdict once neither the harness nor the kernel log decided it: the
/// guest's own, unless it did not report the end of every boot (ERROR), or
/// it passed but a host check failed or the device found something (FAIL).
fn guest_verdict(
    test: &TestSpec,
    end: Option<(Verdict, String)>,
    ends: u8,
    checks: &[CheckRecord],
    findings: &[serde_json::Value],
) -> (Verdict, String) {
    let Some((verdict, reason)) = end else {
        return (
            Verdict::Error,
            "the guest never reported the end of the test".into(),
        );
    };
    if ends < test.boots {
        return (
            Verdict::Error,
            format!(
                "the guest reported the end of the test in {ends} of {} boots",
                test.boots
            ),
        );
    }
    if verdict == Verdict::Pass {
        if let Some(reason) = failed_host_check(checks).or_else(|| device_error(findings)) {
            return (Verdict::Fail, reason);
        }
    }
    (verdict, reason)
}

/// The first host check that failed, as a reason.
fn failed_host_check(checks: &[CheckRecord]) -> Option<String> {
    let c = checks
        .iter()
        .find(|c| !c.ok && c.name.starts_with("host:"))?;
    Some(format!("{}: {}", c.name, c.detail))
}

/// The device's first finding that is not informational, as a reason.
fn device_error(findings: &[serde_json::Value]) -> Option<String> {
    let f = findings.iter().find(|f| f["info"] != true)?;
    Some(format!(
        "device: {} ({})",
        f["detail"].as_str().unwrap_or(""),
        f["finding"].as_str().unwrap_or("finding")
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
    fn a_test_the_host_skipped_is_a_skip_with_its_reason() {
        let test = crate::suite::find("dio-zeroing-udf").unwrap();
        let kernel = Kernel {
            name: "k".into(),
            image: PathBuf::from("/k"),
            modules: None,
            release: None,
        };
        let why = "the kernel's config lacks CONFIG_UDF_FS (needed by dio-zeroing-udf)";
        let ev = Evidence {
            skip: Some(why.into()),
            ..Evidence::default()
        };
        let r = judge(test, &kernel, Daemon::Dmaprobe, ev);
        assert_eq!((r.verdict, r.reason.as_str()), (Verdict::Skip, why));
        assert!(r.console_tail.is_empty());
    }
}
