//! The daemon sampled through a soak: a thread asks its control socket for
//! `status` every second while the guest runs and keeps each answer in
//! `samples.jsonl`; at the end the samples become host checks ([`judge`]):
//! memory levels off, descriptors come back to where they were, the device
//! found nothing. The soak's fault plan is [`crate::soak`]'s.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::daemon::{control_request, control_socket};
use super::result::CheckRecord;
use crate::protocol::Event;
use crate::soak::FaultPlan;

/// Findings that describe expected kernel behaviour, not a bug (dma's
/// `FindingKind::is_info`; a unit test keeps the two the same).
const INFO_FINDINGS: [&str; 2] = ["zero-page-source", "suspected-zero-buffer"];

/// How often the sampler asks for `status`.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// One `status` answer, in the figures the judge uses.
#[derive(Clone, Debug, Default, PartialEq)]
struct Sample {
    /// Seconds since the sampler started.
    t_s: f64,
    connected: bool,
    /// Requests the device has served.
    requests: u64,
    /// VmRSS: the daemon's own memory and the guest memory it has touched.
    rss_bytes: Option<u64>,
    /// RssAnon: the daemon's own memory (heap, stacks).
    rss_anon_bytes: Option<u64>,
    open_fds: Option<u64>,
    threads: Option<u64>,
    ledger_entries: u64,
    /// Findings so far by kind (informational ones included).
    findings: BTreeMap<String, u64>,
}

impl Sample {
    /// The figures of a `status` result taken `t_s` seconds in.
    fn from_status(t_s: f64, status: &Value) -> Sample {
        let process = &status["process"];
        Sample {
            t_s,
            connected: status["connected"] == true,
            requests: status["counters"]["requests"].as_u64().unwrap_or(0),
            rss_bytes: process["rss_bytes"].as_u64(),
            rss_anon_bytes: process["rss_anon_bytes"].as_u64(),
            open_fds: process["open_fds"].as_u64(),
            threads: process["threads"].as_u64(),
            ledger_entries: status["ledger"]["entries"].as_u64().unwrap_or(0),
            findings: status["findings"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The findings that are not informational, as `kind N` each.
    fn bad_findings(&self) -> Vec<String> {
        self.findings
            .iter()
            .filter(|(k, &n)| n > 0 && !INFO_FINDINGS.contains(&k.as_str()))
            .map(|(k, n)| format!("{k} {n}"))
            .collect()
    }
}

/// Polls the daemon's `status` while a soak runs.
#[derive(Debug)]
pub(super) struct Sampler {
    control: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Sampled>>,
}

/// What the sampling thread gathered.
#[derive(Debug, Default)]
struct Sampled {
    samples: Vec<Sample>,
    /// Polls the daemon did not answer, and the first reason.
    missed: u32,
    first_miss: Option<String>,
}

impl Sampler {
    /// Starts sampling the daemon serving `socket` (its control socket is
    /// beside it, `.ctl` added); each answer becomes a line of `out`.
    pub(super) fn start(socket: &Path, out: PathBuf) -> Sampler {
        let control = control_socket(socket);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (control, stop) = (control.clone(), stop.clone());
            thread::Builder::new()
                .name("soak-sampler".into())
                .spawn(move || sample(&control, &out, &stop))
                .ok()
        };
        Sampler {
            control,
            stop,
            thread,
        }
    }

    /// Stops sampling; appends notes to the guest's `events` file (the plan's
    /// rules with how often each fired, the daemon's figures at start, end
    /// and peak) and returns the host checks of the samples.
    pub(super) fn finish(mut self, plan: &FaultPlan, events: &Path) -> Vec<CheckRecord> {
        self.stop.store(true, Ordering::SeqCst);
        let sampled = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let mut notes = plan_notes(plan, &self.control);
        if sampled.missed > 0 {
            notes.push((
                "samples missed".to_owned(),
                format!(
                    "{} ({})",
                    sampled.missed,
                    sampled.first_miss.unwrap_or_default()
                ),
            ));
        }
        let judged = judge(&sampled.samples);
        notes.extend(judged.notes);
        let lines: String = notes
            .into_iter()
            .map(|(key, value)| {
                Event::Note {
                    test: String::new(),
                    key,
                    value,
                }
                .to_line()
            })
            .collect();
        let mut checks = judged.checks;
        let written = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(events)
            .and_then(|mut f| f.write_all(lines.as_bytes()));
        if let Err(e) = written {
            checks.push(CheckRecord {
                name: "host: the soak's notes are kept".into(),
                ok: false,
                detail: format!("cannot write to {}: {e}", events.display()),
            });
        }
        checks
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The plan as notes: its seed, latency and rules, each with how often it
/// fired by the daemon's count (asked of its `control` socket), and the total.
fn plan_notes(plan: &FaultPlan, control: &Path) -> Vec<(String, String)> {
    let mut notes = Vec::new();
    notes.push((
        "fault plan".to_owned(),
        format!(
            "seed {}, --latency {}, {} rule(s)",
            plan.seed,
            plan.latency,
            plan.rules.len()
        ),
    ));
    let fired = control_request(control, r#"{"v":1,"cmd":"rules"}"#)
        .ok()
        .and_then(|rules| rules.as_array().cloned())
        .unwrap_or_default();
    let mut total = 0;
    for (i, rule) in plan.rules.iter().enumerate() {
        // The daemon prints each rule back as written (a unit test
        // holds the plan to that).
        let listed = fired.iter().find(|r| r["rule"] == rule.as_str());
        total += listed.and_then(|r| r["fired"].as_u64()).unwrap_or(0);
        let counts = listed.map_or("no count from the daemon".into(), |r| {
            format!("fired {} of {} matched", r["fired"], r["matched"])
        });
        notes.push((format!("fault rule {}", i + 1), format!("{rule}: {counts}")));
    }
    notes.push(("faults fired".to_owned(), total.to_string()));
    notes
}

/// The sampling loop: `status` every [`SAMPLE_EVERY`] until `stop`.
fn sample(control: &Path, out: &Path, stop: &AtomicBool) -> Sampled {
    let mut sampled = Sampled::default();
    let mut file = fs::File::create(out).ok();
    let start = Instant::now();
    let mut next = start;
    while !stop.load(Ordering::SeqCst) {
        if Instant::now() < next {
            thread::sleep(Duration::from_millis(50).min(next - Instant::now()));
            continue;
        }
        next += SAMPLE_EVERY;
        let t_s = start.elapsed().as_secs_f64();
        match control_request(control, r#"{"v":1,"cmd":"status"}"#) {
            Ok(status) => {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{}", json!({"t_s": t_s, "status": status}));
                }
                sampled.samples.push(Sample::from_status(t_s, &status));
            }
            Err(e) => {
                sampled.missed += 1;
                sampled.first_miss.get_or_insert(e);
            }
        }
    }
    sampled
}

/// Samples with the guest attached and the device serving: the soak proper.
const MIN_SAMPLES: usize = 10;

/// The longest stretch at either end of the soak compared for memory.
const WINDOW_S: f64 = 60.0;

/// How much more the daemon's anonymous RSS may reach late in the soak than
/// early: [`RSS_SLACK_FRACTION`] of the early peak plus [`RSS_SLACK_BYTES`].
/// Measured on debian-6.12 under TCG, the late peak was within 0.2 MiB of
/// the early one over 180 s (41.0 and 41.2 MiB) and within 1.3 MiB over 60 s;
/// the slack is a few times that, for allocator high-water marks that a late
/// burst can raise (large reads served by the I/O pool, write-cache
/// destaging, parked requests' canaries and snapshots). At the 330
/// requests/s of a TCG guest, two minutes between the windows catch a leak
/// of about 100 bytes per request.
const RSS_SLACK_BYTES: u64 = 4 << 20;
const RSS_SLACK_FRACTION: f64 = 0.05;

/// How far the open descriptors at the end may be from those at the start.
const FD_SLACK: u64 = 2;

/// What the samples say: host checks, and notes with the figures.
#[derive(Debug, Default, PartialEq)]
struct Judgement {
    checks: Vec<CheckRecord>,
    notes: Vec<(String, String)>,
}

/// Judges a soak's samples.
///
/// Only samples with the guest connected and requests served count (before
/// the driver set up its queues the daemon holds fewer descriptors). Memory:
/// the daemon's own, its anonymous RSS (VmRSS also counts the guest memory
/// it has touched, which grows towards the guest's size as DMA reaches more
/// pages; it is a note). Its peak in the last stretch (a minute, or a third
/// of a shorter soak) may exceed its peak in the first half of the soak by
/// at most [`RSS_SLACK_FRACTION`] of it plus [`RSS_SLACK_BYTES`]. A leak
/// per request grows with the requests served between the two and shows
/// there; what is bounded — the write cache (32 MiB), the ledger ring,
/// allocator arenas — has filled within the first half. (The slowest soak
/// measured, 60 s on debian-6.1, whose guest took 30 s to boot and lay out
/// fio's file, reached its plateau 42 s into 105: a first minute would have
/// been too early.) Descriptors: the last count within
/// [`FD_SLACK`] of the first. Findings: none but informational ones, by the
/// daemon's own counts (the ledger ring may have dropped early findings).
fn judge(samples: &[Sample]) -> Judgement {
    const SAMPLED: &str = "the daemon was sampled through the soak";
    let active: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.connected && s.requests > 0)
        .collect();
    let (Some(&first), Some(&last)) = (active.first(), active.last()) else {
        return Judgement {
            checks: vec![check(
                SAMPLED,
                false,
                format!(
                    "{} samples, none with the guest attached and served",
                    samples.len()
                ),
            )],
            notes: Vec::new(),
        };
    };
    let mut checks = Vec::new();
    if active.len() < MIN_SAMPLES {
        checks.push(check(
            SAMPLED,
            false,
            format!(
                "{} samples with the guest attached and served; at least {MIN_SAMPLES} are needed",
                active.len()
            ),
        ));
    }
    checks.push(memory_levels_off(&active, first, last));
    checks.push(fds_come_back(first, last));
    checks.push(no_findings(last));
    Judgement {
        checks,
        notes: figures(&active, first, last),
    }
}

/// A host check of the soak.
fn check(name: &str, ok: bool, detail: String) -> CheckRecord {
    CheckRecord {
        name: format!("host: {name}"),
        ok,
        detail,
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

/// Memory: the daemon's peak anonymous RSS in the last stretch against its
/// peak in the first half.
fn memory_levels_off(active: &[&Sample], first: &Sample, last: &Sample) -> CheckRecord {
    const NAME: &str = "daemon memory (anonymous RSS) levels off";
    let span = last.t_s - first.t_s;
    let window = WINDOW_S.min(span / 3.0);
    let half = span / 2.0;
    let peak = |from: f64, to: f64| {
        active
            .iter()
            .filter(|s| (from..=to).contains(&s.t_s))
            .filter_map(|s| s.rss_anon_bytes)
            .max()
    };
    match (
        peak(first.t_s, first.t_s + half),
        peak(last.t_s - window, last.t_s),
    ) {
        (Some(early), Some(late)) => {
            let allowed = early + (early as f64 * RSS_SLACK_FRACTION) as u64 + RSS_SLACK_BYTES;
            check(
                NAME,
                late <= allowed,
                format!(
                    "peak of the first {half:.0} s {}, of the last {window:.0} s {} \
                     (at most {} allowed: +{:.0}% +{})",
                    mib(early),
                    mib(late),
                    mib(allowed),
                    RSS_SLACK_FRACTION * 100.0,
                    mib(RSS_SLACK_BYTES)
                ),
            )
        }
        _ => check(
            NAME,
            false,
            "the daemon did not report its anonymous RSS".into(),
        ),
    }
}

/// Descriptors: as many open at the end as at the start, give or take [`FD_SLACK`].
fn fds_come_back(first: &Sample, last: &Sample) -> CheckRecord {
    const NAME: &str = "daemon open fds at the end as at the start";
    match (first.open_fds, last.open_fds) {
        (Some(a), Some(b)) => check(
            NAME,
            a.abs_diff(b) <= FD_SLACK,
            format!(
                "{a} at {:.0} s, {b} at {:.0} s (±{FD_SLACK} allowed)",
                first.t_s, last.t_s
            ),
        ),
        _ => check(NAME, false, "the daemon did not report its open fds".into()),
    }
}

/// Findings: none but informational ones, by the daemon's counts at the end.
fn no_findings(last: &Sample) -> CheckRecord {
    let bad = last.bad_findings();
    check(
        "no device findings during the soak",
        bad.is_empty(),
        if bad.is_empty() {
            let info: Vec<String> = last
                .findings
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            match info.is_empty() {
                true => "none, by the daemon's counts".into(),
                false => format!("none but informational ({})", info.join(", ")),
            }
        } else {
            format!("the daemon counts {}", bad.join(", "))
        },
    )
}

/// The soak's figures, as notes: how long it was sampled and how much the
/// device served, then each of the daemon's figures at the start, at the end
/// and at its peak.
fn figures(active: &[&Sample], first: &Sample, last: &Sample) -> Vec<(String, String)> {
    let span = last.t_s - first.t_s;
    let start_end_max = |get: fn(&Sample) -> Option<u64>, show: fn(u64) -> String| {
        let or = |v: Option<u64>| v.map_or("?".to_owned(), show);
        let max = active.iter().filter_map(|s| get(s)).max();
        format!(
            "start {}, end {}, max {}",
            or(get(first)),
            or(get(last)),
            or(max)
        )
    };
    let count = |n: u64| n.to_string();
    vec![
        (
            "soak sampled".into(),
            format!(
                "{} samples over {span:.0} s with the guest attached; {} requests served ({:.0}/s)",
                active.len(),
                last.requests,
                (last.requests - first.requests.min(last.requests)) as f64 / span.max(1.0)
            ),
        ),
        ("daemon rss".into(), start_end_max(|s| s.rss_bytes, mib)),
        (
            "daemon anonymous rss".into(),
            start_end_max(|s| s.rss_anon_bytes, mib),
        ),
        (
            "daemon open fds".into(),
            start_end_max(|s| s.open_fds, count),
        ),
        ("daemon threads".into(), start_end_max(|s| s.threads, count)),
        (
            "ledger entries".into(),
            start_end_max(|s| Some(s.ledger_entries), count),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_findings_are_dmas() {
        let info: Vec<&str> = dma::FindingKind::ALL
            .into_iter()
            .filter(|k| k.is_info())
            .map(|k| k.name())
            .collect();
        assert_eq!(info, INFO_FINDINGS);
    }

    const MIB: u64 = 1 << 20;

    /// A soak of `n` one-second samples, RSS and fds from functions of the second.
    fn soak(n: u64, rss: impl Fn(u64) -> u64, fds: impl Fn(u64) -> u64) -> Vec<Sample> {
        (0..n)
            .map(|t| Sample {
                t_s: t as f64,
                // Two samples before the guest is attached and served.
                connected: t > 0,
                requests: t.saturating_sub(1) * 100,
                rss_bytes: Some(rss(t) + t * MIB),
                rss_anon_bytes: Some(rss(t)),
                open_fds: Some(fds(t)),
                threads: Some(9),
                ledger_entries: t * 100,
                findings: BTreeMap::from([("zero-page-source".into(), 3)]),
            })
            .collect()
    }

    fn verdicts(j: &Judgement) -> Vec<(&str, bool)> {
        j.checks.iter().map(|c| (c.name.as_str(), c.ok)).collect()
    }

    #[test]
    fn a_daemon_that_levels_off_passes() {
        // Fills for 40 s (ledger, cache), then flat with noise; fds 12 before
        // the guest, 30 after.
        let j = judge(&soak(
            180,
            |t| 20 * MIB + t.min(40) * MIB + (t % 3) * MIB,
            |t| if t < 2 { 12 } else { 30 + t % 2 },
        ));
        assert_eq!(
            verdicts(&j),
            [
                ("host: daemon memory (anonymous RSS) levels off", true),
                ("host: daemon open fds at the end as at the start", true),
                ("host: no device findings during the soak", true),
            ],
            "{j:#?}"
        );
        let rss = &j.checks[0].detail;
        assert!(
            rss.starts_with("peak of the first 88 s 62.0 MiB, of the last 59 s 62.0 MiB"),
            "{rss}"
        );
        let findings = &j.checks[2].detail;
        assert!(
            findings.contains("informational (zero-page-source 3)"),
            "{findings}"
        );
        let notes: BTreeMap<_, _> = j.notes.iter().cloned().collect();
        assert_eq!(notes["daemon open fds"], "start 30, end 31, max 31");
        assert_eq!(
            notes["daemon anonymous rss"],
            "start 24.0 MiB, end 62.0 MiB, max 62.0 MiB"
        );
        // VmRSS grows as DMA touches more of the guest's memory: a note, not judged.
        assert_eq!(
            notes["daemon rss"],
            "start 26.0 MiB, end 241.0 MiB, max 241.0 MiB"
        );
    }

    #[test]
    fn a_leak_fails_and_says_by_how_much() {
        // 256 KiB a second for three minutes: 45 MiB more at the end.
        let j = judge(&soak(180, |t| 30 * MIB + t * MIB / 4, |_| 30));
        let c = &j.checks[0];
        assert!(!c.ok, "{c:?}");
        assert!(
            c.detail
                .contains("first 88 s 52.5 MiB, of the last 59 s 74.8 MiB"),
            "{c:?}"
        );
        // A short soak's last stretch is its last third.
        let j = judge(&soak(60, |t| 30 * MIB + t * MIB, |_| 30));
        assert!(
            !j.checks[0].ok
                && j.checks[0]
                    .detail
                    .contains("first 28 s 60.0 MiB, of the last 19 s"),
            "{:?}",
            j.checks[0]
        );
    }

    #[test]
    fn a_slow_guest_that_fills_the_write_cache_late_still_levels_off() {
        // As debian-6.1's 60 s soak: 8 MiB while the guest boots and lays
        // out fio's file, 38 MiB from 40 s of 105 on, creeping by 1 MiB.
        let j = judge(&soak(
            105,
            |t| match t {
                0..40 => 8 * MIB,
                _ => 38 * MIB + (t - 40) * MIB / 60,
            },
            |_| 33,
        ));
        assert!(j.checks[0].ok, "{:?}", j.checks[0]);
    }

    #[test]
    fn the_slack_is_five_percent_and_four_mib() {
        // 40 MiB for two minutes, then a step to the bound, or just past it.
        let allowed = 40 * MIB + 2 * MIB + 4 * MIB;
        let step = |late: u64| {
            judge(&soak(
                180,
                move |t| if t < 120 { 40 * MIB } else { late },
                |_| 30,
            ))
        };
        assert!(step(allowed).checks[0].ok, "{:?}", step(allowed).checks[0]);
        let over = step(allowed + 4096).checks.remove(0);
        assert!(
            !over.ok
                && over
                    .detail
                    .contains("(at most 46.0 MiB allowed: +5% +4.0 MiB)"),
            "{over:?}"
        );
    }

    #[test]
    fn leaked_descriptors_and_findings_fail() {
        let j = judge(&soak(100, |_| 30 * MIB, |t| 30 + t / 20));
        assert!(!j.checks[1].ok, "{:?}", j.checks[1]);
        assert!(
            j.checks[1].detail.starts_with("30 at 2 s, 34 at 99 s"),
            "{:?}",
            j.checks[1]
        );
        let mut samples = soak(100, |_| 30 * MIB, |_| 30);
        samples[99]
            .findings
            .insert("data-vanished-after-completion".into(), 2);
        let j = judge(&samples);
        assert_eq!(
            (j.checks[2].ok, j.checks[2].detail.as_str()),
            (false, "the daemon counts data-vanished-after-completion 2")
        );
    }

    #[test]
    fn too_few_samples_cannot_pass() {
        let j = judge(&soak(5, |_| 30 * MIB, |_| 30));
        assert!(
            j.checks.iter().any(|c| !c.ok && c.name.contains("sampled")),
            "{j:#?}"
        );
        let j = judge(&[]);
        assert_eq!(j.checks.len(), 1);
        assert!(!j.checks[0].ok);
    }

    #[test]
    fn samples_read_a_status_answer() {
        let status = json!({
            "connected": true, "counters": {"requests": 1234},
            "ledger": {"entries": 99}, "findings": {"zero-page-source": 1},
            "process": {"rss_bytes": 8192, "rss_anon_bytes": 4096, "open_fds": 17,
                "threads": null},
        });
        assert_eq!(
            Sample::from_status(2.5, &status),
            Sample {
                t_s: 2.5,
                connected: true,
                requests: 1234,
                rss_bytes: Some(8192),
                rss_anon_bytes: Some(4096),
                open_fds: Some(17),
                threads: None,
                ledger_entries: 99,
                findings: BTreeMap::from([("zero-page-source".into(), 1)]),
            }
        );
    }
}
