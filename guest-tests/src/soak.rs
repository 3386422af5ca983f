//! The soak: the suite's heaviest I/O at once for a configured time, under
//! fault rules drawn from the run's seed, with the daemon's memory and open
//! descriptors sampled throughout.
//!
//! - [`fault_plan`]: the rules (and media latency) a seed gives. Every rule is
//!   one a correct kernel running the soak's workload must get through without
//!   a device finding: delays, watches, and errors only on the pinning loops'
//!   own reads, which expect them. The guest computes the same plan from the
//!   same seed, to know how long its reads may wait and whether they may fail.
//! - [`Sampler`]: a thread that asks the daemon's control socket for `status`
//!   every second while the guest runs, keeps each answer in `samples.jsonl`,
//!   and at the end turns the samples into host checks ([`judge`]): memory
//!   levels off, descriptors come back to where they were, the device found
//!   nothing.
//!
//! The workload itself is the guest's (`src/bin/dmaprobe-guest/soak.rs`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::protocol::Event;
use crate::run::{control_request, CheckRecord};

/// How long the soak runs unless `--soak-seconds` says otherwise.
pub const DEFAULT_SECONDS: u64 = 180;

/// What the pinning loops read at a time, and so what the plan's rules for
/// them match (`size=512`): nothing else in the soak reads 512 B (ext4 reads
/// whole 4 KiB blocks, fio at least 4 KiB, the mailbox never meets a rule).
pub const PIN_READ_LEN: u64 = 512;

/// Findings that describe expected kernel behaviour, not a bug (dma's
/// `FindingKind::is_info`; a unit test keeps the two the same).
pub const INFO_FINDINGS: [&str; 2] = ["zero-page-source", "suspected-zero-buffer"];

/// splitmix64: the soak's one source of choices, on the host and in the guest.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

/// The fault rules and media latency of a soak, drawn from a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    pub seed: u64,
    /// `--fault` rules, in the order given (a request gets the first wait,
    /// watch and effect of the rules that fire on it).
    pub rules: Vec<String>,
    /// The `--latency` preset.
    pub latency: &'static str,
    /// How long the pin-window rule delays the pinning loops' reads, in ms
    /// (at least [`MIN_PIN_DELAY_MS`]): the loops fork within the first half.
    pub pin_delay_ms: (u64, u64),
    /// Whether the pinning loops' reads may fail (an `error` or `partial`
    /// rule matches them).
    pub pin_errors: bool,
}

/// The shortest delay the pin-window rule gives: long enough for the guest
/// to see the read waiting (a mailbox round trip), fork (about 50 ms under
/// TCG while the soak runs) and see it waiting still.
pub const MIN_PIN_DELAY_MS: u64 = 50;

/// The rules beyond the two every plan has, one of each at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extra {
    /// Any read, rarely, a little.
    ReadDelay,
    /// Any write (O_DIRECT, writeback, journal), rarely, a little: the write's
    /// source must not change while it waits (`--snapshot`).
    WriteDelay,
    /// Every few flushes: fsync waits.
    FlushDelay,
    /// Anything on one queue, rarely.
    QueueDelay,
    /// The pinning loops' reads fail now and then (EIO), which they expect;
    /// nothing else sees an error, so ext4 never does.
    PinError,
}

const EXTRAS: [Extra; 5] = [
    Extra::ReadDelay,
    Extra::WriteDelay,
    Extra::FlushDelay,
    Extra::QueueDelay,
    Extra::PinError,
];

/// The media latency presets a plan chooses from.
const LATENCIES: [&str; 3] = ["instant", "nvme", "sata"];

/// The soak's plan for `seed`: 3 to 6 rules, the same for the same seed.
///
/// Always: a delay of [`MIN_PIN_DELAY_MS`]..250 ms on (most of) the pinning
/// loops' reads, which opens the window in which they fork and write, and a
/// watch of those reads after completion (a kernel that let the read land in
/// a page it then freed shows as `data-vanished-after-completion`). Then one
/// to four of: rare short delays of reads, of writes, of one queue, delays of
/// flushes, errors on the pinning reads. Never a hold (nobody releases it),
/// never corrupt, torn, power-cut or the broken-device actions: a correct
/// kernel would rightly fail under those. Errors stay off ext4's metadata and
/// fio's data, which would (rightly) give up on EIO.
pub fn fault_plan(seed: u64) -> FaultPlan {
    let mut rng = SplitMix::new(seed ^ 0x50a4_c0de);
    let lo = rng.range(MIN_PIN_DELAY_MS, 2 * MIN_PIN_DELAY_MS);
    let hi = lo + rng.range(50, 150);
    let select = if rng.coin() {
        format!("every={}", rng.range(1, 2))
    } else {
        format!("prob={}", rounded(0.5 + rng.unit() / 2.0, 100.0))
    };
    let mut rules = vec![
        format!("op=read,size={PIN_READ_LEN},{select},action=delay,ms={lo}-{hi}"),
        format!(
            "op=read,size={PIN_READ_LEN},action=watch,ms={}",
            rng.range(20, 200)
        ),
    ];
    let mut extras = EXTRAS.to_vec();
    // Fisher-Yates, then the first one to four.
    for i in (1..extras.len()).rev() {
        let j = rng.range(0, i as u64) as usize;
        extras.swap(i, j);
    }
    let take = rng.range(1, 4) as usize;
    let mut pin_errors = false;
    for extra in &extras[..take] {
        let prob =
            |rng: &mut SplitMix, lo: f64, hi: f64| rounded(lo + rng.unit() * (hi - lo), 1000.0);
        let rule = match extra {
            Extra::ReadDelay => {
                let p = prob(&mut rng, 0.002, 0.02);
                let a = rng.range(1, 5);
                format!(
                    "op=read,prob={p},action=delay,ms={a}-{}",
                    a + rng.range(5, 25)
                )
            }
            Extra::WriteDelay => {
                let p = prob(&mut rng, 0.002, 0.02);
                let a = rng.range(1, 5);
                format!(
                    "op=write,prob={p},action=delay,ms={a}-{}",
                    a + rng.range(5, 25)
                )
            }
            Extra::FlushDelay => {
                let a = rng.range(5, 20);
                format!(
                    "op=flush,every={},action=delay,ms={a}-{}",
                    rng.range(2, 8),
                    a + rng.range(5, 30)
                )
            }
            Extra::QueueDelay => {
                let p = prob(&mut rng, 0.002, 0.01);
                let a = rng.range(1, 5);
                format!(
                    "queue={},prob={p},action=delay,ms={a}-{}",
                    rng.range(0, 1),
                    a + rng.range(5, 15)
                )
            }
            Extra::PinError => {
                pin_errors = true;
                let p = prob(&mut rng, 0.01, 0.05);
                let effect = if rng.coin() {
                    "action=error,status=ioerr".to_owned()
                } else {
                    format!("action=partial,bytes={}", PIN_READ_LEN / 2)
                };
                format!("op=read,size={PIN_READ_LEN},prob={p},{effect}")
            }
        };
        rules.push(rule);
    }
    let latency = LATENCIES[rng.range(0, LATENCIES.len() as u64 - 1) as usize];
    FaultPlan {
        seed,
        rules,
        latency,
        pin_delay_ms: (lo, hi),
        pin_errors,
    }
}

/// `x` to the nearest `1 / per`, so that it prints short, as the rule
/// parser prints it back.
fn rounded(x: f64, per: f64) -> f64 {
    (x * per).round() / per
}

impl FaultPlan {
    /// The `dmaprobe serve` arguments: the seed of its probabilities, the
    /// latency preset, the rules.
    pub fn serve_args(&self) -> Vec<String> {
        let mut args = vec![
            "--seed".to_owned(),
            self.seed.to_string(),
            "--latency".to_owned(),
            self.latency.to_owned(),
        ];
        for rule in &self.rules {
            args.push("--fault".to_owned());
            args.push(rule.clone());
        }
        args
    }
}

/// How often the sampler asks for `status`.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// One `status` answer, in the figures the judge uses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the sampler started.
    pub t_s: f64,
    pub connected: bool,
    /// Requests the device has served.
    pub requests: u64,
    /// VmRSS: the daemon's own memory and the guest memory it has touched.
    pub rss_bytes: Option<u64>,
    /// RssAnon: the daemon's own memory (heap, stacks).
    pub rss_anon_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub threads: Option<u64>,
    pub ledger_entries: u64,
    /// Findings so far by kind (informational ones included).
    pub findings: BTreeMap<String, u64>,
}

impl Sample {
    /// The figures of a `status` result taken `t_s` seconds in.
    pub fn from_status(t_s: f64, status: &Value) -> Sample {
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
pub struct Sampler {
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
    pub fn start(socket: &Path, out: PathBuf) -> Sampler {
        let control = {
            let mut name = socket.as_os_str().to_owned();
            name.push(".ctl");
            PathBuf::from(name)
        };
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
    pub fn finish(mut self, plan: &FaultPlan, events: &Path) -> Vec<CheckRecord> {
        self.stop.store(true, Ordering::SeqCst);
        let sampled = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
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
        let fired = control_request(&self.control, r#"{"v":1,"cmd":"rules"}"#)
            .ok()
            .filter(|a| a["ok"] == true)
            .and_then(|a| a["result"].as_array().cloned())
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
            Ok(answer) if answer["ok"] == true => {
                let status = &answer["result"];
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{}", json!({"t_s": t_s, "status": status}));
                }
                sampled.samples.push(Sample::from_status(t_s, status));
            }
            other => {
                sampled.missed += 1;
                if sampled.first_miss.is_none() {
                    sampled.first_miss = Some(match other {
                        Ok(answer) => format!("refused: {}", answer["error"]),
                        Err(e) => e,
                    });
                }
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
pub const RSS_SLACK_BYTES: u64 = 4 << 20;
pub const RSS_SLACK_FRACTION: f64 = 0.05;

/// How far the open descriptors at the end may be from those at the start.
pub const FD_SLACK: u64 = 2;

/// What the samples say: host checks, and notes with the figures.
#[derive(Debug, Default, PartialEq)]
pub struct Judgement {
    pub checks: Vec<CheckRecord>,
    pub notes: Vec<(String, String)>,
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
pub fn judge(samples: &[Sample]) -> Judgement {
    let mut j = Judgement::default();
    let active: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.connected && s.requests > 0)
        .collect();
    let check = |name: &str, ok: bool, detail: String| CheckRecord {
        name: format!("host: {name}"),
        ok,
        detail,
    };
    let (Some(first), Some(last)) = (active.first(), active.last()) else {
        j.checks.push(check(
            "the daemon was sampled through the soak",
            false,
            format!(
                "{} samples, none with the guest attached and served",
                samples.len()
            ),
        ));
        return j;
    };
    if active.len() < MIN_SAMPLES {
        j.checks.push(check(
            "the daemon was sampled through the soak",
            false,
            format!(
                "{} samples with the guest attached and served; at least {MIN_SAMPLES} are needed",
                active.len()
            ),
        ));
    }
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
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1 << 20));
    match (
        peak(first.t_s, first.t_s + half),
        peak(last.t_s - window, last.t_s),
    ) {
        (Some(early), Some(late)) => {
            let allowed = early + (early as f64 * RSS_SLACK_FRACTION) as u64 + RSS_SLACK_BYTES;
            j.checks.push(check(
                "daemon memory (anonymous RSS) levels off",
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
            ));
        }
        _ => j.checks.push(check(
            "daemon memory (anonymous RSS) levels off",
            false,
            "the daemon did not report its anonymous RSS".into(),
        )),
    }
    match (first.open_fds, last.open_fds) {
        (Some(a), Some(b)) => j.checks.push(check(
            "daemon open fds at the end as at the start",
            a.abs_diff(b) <= FD_SLACK,
            format!(
                "{a} at {:.0} s, {b} at {:.0} s (±{FD_SLACK} allowed)",
                first.t_s, last.t_s
            ),
        )),
        _ => j.checks.push(check(
            "daemon open fds at the end as at the start",
            false,
            "the daemon did not report its open fds".into(),
        )),
    }
    let bad = last.bad_findings();
    j.checks.push(check(
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
    ));

    let figures = |get: fn(&Sample) -> Option<u64>, show: &dyn Fn(u64) -> String| {
        let or = |v: Option<u64>| v.map_or("?".to_owned(), show);
        let max = active.iter().filter_map(|s| get(s)).max();
        format!(
            "start {}, end {}, max {}",
            or(get(first)),
            or(get(last)),
            or(max)
        )
    };
    j.notes.push((
        "soak sampled".into(),
        format!(
            "{} samples over {span:.0} s with the guest attached; {} requests served ({:.0}/s)",
            active.len(),
            last.requests,
            (last.requests - first.requests.min(last.requests)) as f64 / span.max(1.0)
        ),
    ));
    j.notes
        .push(("daemon rss".into(), figures(|s| s.rss_bytes, &|b| mib(b))));
    j.notes.push((
        "daemon anonymous rss".into(),
        figures(|s| s.rss_anon_bytes, &|b| mib(b)),
    ));
    j.notes.push((
        "daemon open fds".into(),
        figures(|s| s.open_fds, &|n| n.to_string()),
    ));
    j.notes.push((
        "daemon threads".into(),
        figures(|s| s.threads, &|n| n.to_string()),
    ));
    j.notes.push((
        "ledger entries".into(),
        figures(|s| Some(s.ledger_entries), &|n| n.to_string()),
    ));
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_plan() {
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(fault_plan(seed), fault_plan(seed));
        }
        let distinct: std::collections::HashSet<Vec<String>> =
            (0..20).map(|s| fault_plan(s).rules).collect();
        assert!(distinct.len() >= 15, "{distinct:?}");
    }

    #[test]
    fn every_rule_parses_and_is_one_a_correct_kernel_survives() {
        use dma::fault::{Action, Effect};
        let mut pin_errors = 0;
        let mut sizes = std::collections::HashSet::new();
        for seed in 0..500 {
            let plan = fault_plan(seed);
            assert!((3..=6).contains(&plan.rules.len()), "{plan:?}");
            sizes.insert(plan.rules.len());
            assert!(nvme_model::LatencySpec::preset(plan.latency).is_some());
            let (lo, hi) = plan.pin_delay_ms;
            assert!(lo >= MIN_PIN_DELAY_MS && hi > lo, "{plan:?}");
            let mut errors = false;
            for (i, line) in plan.rules.iter().enumerate() {
                let rule = dma::RuleSpec::parse(line)
                    .unwrap_or_else(|e| panic!("seed {seed}: {line:?}: {e}"));
                // It prints back as written: what the report shows is what runs.
                assert_eq!(&rule.to_string(), line);
                let pin_read = rule.op == Some(dma::Op::Read)
                    && rule.size == Some((PIN_READ_LEN, PIN_READ_LEN));
                match rule.action {
                    // The pin window is long, other delays short: nothing
                    // waits long enough to trouble a kernel's timeouts.
                    Action::Delay { min_ms, max_ms } if i == 0 => {
                        assert!(pin_read && max_ms <= 250, "{line}");
                        assert_eq!((min_ms, max_ms), plan.pin_delay_ms);
                    }
                    Action::Delay { max_ms, .. } => assert!(max_ms <= 100, "{line}"),
                    Action::Watch { ms } => assert!(pin_read && ms <= 200, "{line}"),
                    Action::Effect(Effect::Error { unsupp: false })
                    | Action::Effect(Effect::Partial { .. }) => {
                        assert!(pin_read, "an error off the pinning reads: {line}");
                        errors = true;
                    }
                    other => panic!("seed {seed}: {line} ({other:?}) is not survivable"),
                }
                assert_eq!(rule.count, None);
                assert_eq!(rule.lba, None);
            }
            assert_eq!(errors, plan.pin_errors, "{plan:?}");
            pin_errors += usize::from(errors);
            let args = plan.serve_args();
            assert_eq!(
                args.iter().filter(|a| *a == "--fault").count(),
                plan.rules.len()
            );
            assert_eq!(args[..2], ["--seed".to_owned(), seed.to_string()]);
        }
        // Every size of plan occurs, and errors in some plans, not all.
        assert_eq!(sizes.len(), 4, "{sizes:?}");
        assert!((50..450).contains(&pin_errors), "{pin_errors}");
    }

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
