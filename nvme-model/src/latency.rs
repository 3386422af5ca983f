//! How long the media takes to serve a command: the latency model.
//!
//! A command's *service time* is a base time for its kind plus, for reads and
//! writes, its bytes over the media's bandwidth, varied by a seeded jitter.
//! The media serves at most `depth` commands at once: it keeps one "busy
//! until" instant per slot, and a command starts when it reaches the media or
//! when the earliest slot frees, whichever is later. What the model returns is
//! the delay from "now" to the command's completion; it never sleeps and owns
//! no thread, so the caller parks the request for that long (the DMA
//! scheduler's deadline) and the model costs one lock per command.
//!
//! - [`LatencySpec`]: the parameters, the presets ([`LatencySpec::INSTANT`],
//!   [`LatencySpec::NVME`], [`LatencySpec::SATA`]) and the one-line form of
//!   `--latency` ([`LatencySpec::parse`], and `Display` back).
//! - [`Latency`]: the model in force: the slots and the generator behind the
//!   jitter, shared by every queue.
//!
//! Jitter is uniform within ±`jitter`% of the service time. Uniform keeps the
//! mean where the base times and bandwidth put it, so throughput over many
//! commands is what the spec says, and it is bounded, so a command is never
//! faster than [`LatencySpec::min_service`]: a test can rely on that floor.
//! The long tails of real drives (garbage collection, thermal throttling) are
//! not modelled.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wire::splitmix::SplitMix64;

/// A command as the latency model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaOp {
    Read,
    Write,
    Flush,
    /// Deallocate (discard) and write-zeroes: the mapping changes, no data moves.
    Discard,
}

/// The longest base time a spec may give.
pub const MAX_BASE: Duration = Duration::from_secs(10);
/// The most commands a spec may serve at once.
pub const MAX_DEPTH: u32 = 65536;
/// The lowest bandwidth a spec may give, in bytes per second.
pub const MIN_BANDWIDTH: u64 = 1000;
/// No command is served for longer than this, whatever its size.
pub const MAX_SERVICE: Duration = Duration::from_secs(3600);

/// The model's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencySpec {
    pub read: Duration,
    pub write: Duration,
    pub flush: Duration,
    /// Deallocate (discard) and write-zeroes.
    pub discard: Duration,
    /// Bytes per second a read moves; `None`: no time per byte.
    pub read_bw: Option<NonZeroU64>,
    /// Bytes per second a write moves; `None`: no time per byte.
    pub write_bw: Option<NonZeroU64>,
    /// Commands served at once; `None`: no limit, nothing waits for a slot.
    pub depth: Option<NonZeroU32>,
    /// Service times vary uniformly within ± this many percent (0–100).
    pub jitter_pct: u8,
}

const fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}

const fn rate(bytes_per_s: u64) -> Option<NonZeroU64> {
    NonZeroU64::new(bytes_per_s)
}

const fn slots(n: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(n)
}

impl Default for LatencySpec {
    fn default() -> Self {
        LatencySpec::INSTANT
    }
}

impl LatencySpec {
    /// No added time: the media answers as fast as the backing does. The
    /// default; the device then skips the model altogether.
    pub const INSTANT: LatencySpec = LatencySpec {
        read: Duration::ZERO,
        write: Duration::ZERO,
        flush: Duration::ZERO,
        discard: Duration::ZERO,
        read_bw: None,
        write_bw: None,
        depth: None,
        jitter_pct: 0,
    };

    /// A fast PCIe 3/4 NVMe SSD. Rough figures from vendor datasheets and
    /// published QD1 measurements of drives such as the Samsung 970/980 Pro
    /// and WD SN750/SN850: a 4 KiB random read at QD1 in 60–90 µs (NAND read
    /// time plus controller), a write acknowledged from the DRAM/SLC cache in
    /// about 20 µs, ~3 GB/s sequential, a flush of the volatile cache in
    /// hundreds of µs. NVMe queues are deep; 64 commands in service at once
    /// stands for the parallelism of the flash channels.
    pub const NVME: LatencySpec = LatencySpec {
        read: us(80),
        write: us(20),
        flush: us(500),
        discard: us(50),
        read_bw: rate(3_000_000_000),
        write_bw: rate(3_000_000_000),
        depth: slots(64),
        jitter_pct: 5,
    };

    /// A SATA-class SSD behind AHCI. The SATA 6 Gb/s link caps transfers at
    /// ~550 MB/s (500 here); NCQ allows 32 commands in flight; a 4 KiB read at
    /// QD1 through AHCI takes 100–250 µs on typical consumer drives (Samsung
    /// 860/870 EVO, Crucial MX500 reviews, e.g. AnandTech's QD1 random-read
    /// tests), a cached write about 60 µs, and FLUSH CACHE milliseconds.
    pub const SATA: LatencySpec = LatencySpec {
        read: us(180),
        write: us(60),
        flush: us(2000),
        discard: us(200),
        read_bw: rate(500_000_000),
        write_bw: rate(500_000_000),
        depth: slots(32),
        jitter_pct: 10,
    };

    /// The presets by name.
    pub const PRESETS: [(&'static str, LatencySpec); 3] = [
        ("instant", LatencySpec::INSTANT),
        ("nvme", LatencySpec::NVME),
        ("sata", LatencySpec::SATA),
    ];

    /// The preset called `name`.
    pub fn preset(name: &str) -> Option<LatencySpec> {
        LatencySpec::PRESETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
    }

    /// Whether the spec adds no time to any command.
    pub fn is_instant(&self) -> bool {
        [self.read, self.write, self.flush, self.discard]
            .iter()
            .all(Duration::is_zero)
            && self.read_bw.is_none()
            && self.write_bw.is_none()
    }

    /// The service time of a command before jitter: its base time plus its
    /// bytes over the bandwidth (reads and writes only).
    pub fn nominal(&self, op: MediaOp, bytes: u64) -> Duration {
        let (base, bw) = match op {
            MediaOp::Read => (self.read, self.read_bw),
            MediaOp::Write => (self.write, self.write_bw),
            MediaOp::Flush => (self.flush, None),
            MediaOp::Discard => (self.discard, None),
        };
        let transfer = bw.map_or(Duration::ZERO, |bw| {
            let ns = u128::from(bytes) * 1_000_000_000 / u128::from(bw.get());
            duration_from_nanos(ns)
        });
        base.saturating_add(transfer).min(MAX_SERVICE)
    }

    /// The shortest service time the jitter allows: no command of `op` and
    /// `bytes` completes sooner than this after it starts.
    pub fn min_service(&self, op: MediaOp, bytes: u64) -> Duration {
        scale(self.nominal(op, bytes), -i64::from(self.jitter_pct) * 100)
    }

    /// Parses the `--latency` form: a preset name, then `key=value` fields
    /// that override it, comma-separated (`nvme`, `sata,depth=1`,
    /// `read=80us,write=20us,bw=3G,depth=64,jitter=10%`). Fields without a
    /// preset start from `instant`.
    pub fn parse(text: &str) -> Result<LatencySpec, LatencySpecError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(LatencySpecError::Empty);
        }
        let mut spec = LatencySpec::INSTANT;
        let mut seen: Vec<&str> = Vec::new();
        for (i, item) in text.split(',').map(str::trim).enumerate() {
            let Some((key, value)) = item.split_once('=') else {
                match LatencySpec::preset(item) {
                    Some(p) if i == 0 => spec = p,
                    Some(_) => return Err(LatencySpecError::PresetNotFirst(item.to_owned())),
                    None => return Err(LatencySpecError::UnknownPreset(item.to_owned())),
                }
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return Err(LatencySpecError::Repeated(key.to_owned()));
            }
            seen.push(key);
            match key {
                "read" => spec.read = parse_base("read", value)?,
                "write" => spec.write = parse_base("write", value)?,
                "flush" => spec.flush = parse_base("flush", value)?,
                "discard" => spec.discard = parse_base("discard", value)?,
                "bw" => {
                    let b = parse_bandwidth("bw", value)?;
                    spec.read_bw = b;
                    spec.write_bw = b;
                }
                "read-bw" => spec.read_bw = parse_bandwidth("read-bw", value)?,
                "write-bw" => spec.write_bw = parse_bandwidth("write-bw", value)?,
                "depth" => spec.depth = parse_depth(value)?,
                "jitter" => spec.jitter_pct = parse_jitter(value)?,
                _ => return Err(LatencySpecError::UnknownField(key.to_owned())),
            }
        }
        Ok(spec)
    }
}

/// Why a `--latency` spec was refused. Each names the field and the forms it takes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LatencySpecError {
    #[error("Empty: give a preset (instant, nvme, sata) and/or key=value fields")]
    Empty,
    #[error("Unknown preset {0:?}: the presets are instant, nvme and sata; fields are key=value")]
    UnknownPreset(String),
    #[error("The preset {0:?} must come first")]
    PresetNotFirst(String),
    #[error(
        "Unknown field {0:?}: the fields are read, write, flush, discard, bw, read-bw, \
         write-bw, depth and jitter"
    )]
    UnknownField(String),
    #[error("Field {0} given twice")]
    Repeated(String),
    #[error("{field}={value:?}: {expected}")]
    Value {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
}

fn bad(field: &'static str, value: &str, expected: &'static str) -> LatencySpecError {
    LatencySpecError::Value {
        field,
        value: value.to_owned(),
        expected,
    }
}

/// A base time: a number (decimals allowed) with ns, us (or µs), ms or s; or 0.
fn parse_base(field: &'static str, value: &str) -> Result<Duration, LatencySpecError> {
    const FORM: &str = "give a time with ns, us, ms or s (80us, 1.5ms) or 0, at most 10s";
    let err = || bad(field, value, FORM);
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(err)?;
    let (number, unit) = value.split_at(split);
    let per_unit: u64 = match unit {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        _ => return Err(err()),
    };
    let ns = decimal_times(number, per_unit).ok_or_else(err)?;
    let d = duration_from_nanos(ns);
    if d > MAX_BASE {
        return Err(err());
    }
    Ok(d)
}

/// A bandwidth in bytes per second, with decimal suffixes K, M, G (as drive
/// datasheets give them: 3G is 3,000,000,000 B/s); or `unlimited`.
fn parse_bandwidth(
    field: &'static str,
    value: &str,
) -> Result<Option<NonZeroU64>, LatencySpecError> {
    const FORM: &str =
        "give bytes per second with K, M or G (decimal: 3G, 500M, 1.5G) or unlimited, at least 1K";
    let err = || bad(field, value, FORM);
    if value == "unlimited" {
        return Ok(None);
    }
    let (number, per_unit) = match value.strip_suffix(['K', 'k']) {
        Some(n) => (n, 1_000),
        None => match value.strip_suffix('M') {
            Some(n) => (n, 1_000_000),
            None => match value.strip_suffix('G') {
                Some(n) => (n, 1_000_000_000),
                None => (value, 1),
            },
        },
    };
    let n = decimal_times(number, per_unit)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(err)?;
    if n < MIN_BANDWIDTH {
        return Err(err());
    }
    Ok(NonZeroU64::new(n))
}

fn parse_depth(value: &str) -> Result<Option<NonZeroU32>, LatencySpecError> {
    const FORM: &str = "give the commands served at once, 1 to 65536, or unlimited";
    if value == "unlimited" {
        return Ok(None);
    }
    match value.parse::<u32>() {
        Ok(n) if n <= MAX_DEPTH => NonZeroU32::new(n)
            .map(Some)
            .ok_or_else(|| bad("depth", value, FORM)),
        _ => Err(bad("depth", value, FORM)),
    }
}

fn parse_jitter(value: &str) -> Result<u8, LatencySpecError> {
    const FORM: &str = "give a percentage from 0% to 100% (10%), or 0";
    let number = if value == "0" {
        "0"
    } else {
        value
            .strip_suffix('%')
            .ok_or_else(|| bad("jitter", value, FORM))?
    };
    match number.parse::<u8>() {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(bad("jitter", value, FORM)),
    }
}

/// `number` (digits with at most one decimal point) times `per_unit`, rounded
/// down to a whole number; `None` if it is not a number or too large.
fn decimal_times(number: &str, per_unit: u64) -> Option<u128> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || !all_digits(frac) || frac.len() > 9 {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let frac_scale = 10u128.pow(u32::try_from(frac.len()).ok()?);
    let per_unit = u128::from(per_unit);
    int.checked_mul(per_unit)?
        .checked_add(frac_value * per_unit / frac_scale)
}

fn duration_from_nanos(ns: u128) -> Duration {
    let secs = u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is below 10^9 and fits in u32.
    let sub = u32::try_from(ns % 1_000_000_000).unwrap_or(0);
    Duration::new(secs, sub)
}

/// `d` changed by `basis_points` hundredths of a percent (-10000..=10000),
/// rounded down.
/// A value in `-span..=span`, drawn from `rng`.
fn within(rng: &mut SplitMix64, span: i64) -> i64 {
    let span = span.unsigned_abs();
    let drawn = rng.in_range(0, span * 2);
    i64::try_from(drawn).unwrap_or(0) - i64::try_from(span).unwrap_or(0)
}

fn scale(d: Duration, basis_points: i64) -> Duration {
    let factor = u128::try_from(10_000 + basis_points.clamp(-10_000, 10_000)).unwrap_or(0);
    duration_from_nanos(d.as_nanos() * factor / 10_000)
}

impl fmt::Display for LatencySpec {
    /// The canonical one-line form, which [`LatencySpec::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((name, _)) = LatencySpec::PRESETS.iter().find(|(_, s)| s == self) {
            return f.write_str(name);
        }
        write!(
            f,
            "read={},write={},flush={},discard={}",
            ShowTime(self.read),
            ShowTime(self.write),
            ShowTime(self.flush),
            ShowTime(self.discard)
        )?;
        write!(
            f,
            ",read-bw={},write-bw={}",
            ShowBandwidth(self.read_bw),
            ShowBandwidth(self.write_bw)
        )?;
        match self.depth {
            Some(d) => write!(f, ",depth={d}")?,
            None => f.write_str(",depth=unlimited")?,
        }
        write!(f, ",jitter={}%", self.jitter_pct)
    }
}

struct ShowTime(Duration);

impl fmt::Display for ShowTime {
    // `is_multiple_of` needs Rust 1.87; the workspace's MSRV is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        if ns == 0 {
            return f.write_str("0");
        }
        let (per, unit) = [(1_000_000_000, "s"), (1_000_000, "ms"), (1_000, "us")]
            .into_iter()
            .find(|(per, _)| ns % per == 0)
            .unwrap_or((1, "ns"));
        write!(f, "{}{unit}", ns / per)
    }
}

struct ShowBandwidth(Option<NonZeroU64>);

impl fmt::Display for ShowBandwidth {
    #[allow(clippy::manual_is_multiple_of)]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(bw) = self.0 else {
            return f.write_str("unlimited");
        };
        let n = bw.get();
        let (per, unit) = [(1_000_000_000, "G"), (1_000_000, "M"), (1_000, "K")]
            .into_iter()
            .find(|(per, _)| n % per == 0)
            .unwrap_or((1, ""));
        write!(f, "{}{unit}", n / per)
    }
}

#[derive(Debug)]
struct State {
    /// When each busy slot frees, earliest first; at most `depth` of them.
    busy: BinaryHeap<Reverse<Instant>>,
    rng: SplitMix64,
}

/// The latency model in force, shared by every queue.
#[derive(Debug)]
pub struct Latency {
    spec: LatencySpec,
    instant: bool,
    state: Mutex<State>,
}

impl Latency {
    /// A model of `spec`, its jitter drawn from a generator seeded with `seed`.
    pub fn new(spec: LatencySpec, seed: u64) -> Latency {
        Latency {
            spec,
            instant: spec.is_instant(),
            state: Mutex::new(State {
                busy: BinaryHeap::new(),
                // Apart from the fault plan's stream of the same seed.
                rng: SplitMix64(seed ^ 0x6c61_7465_6e63_7921),
            }),
        }
    }

    pub fn spec(&self) -> &LatencySpec {
        &self.spec
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long after `now` a command of `op` moving `bytes`, reaching the
    /// media at `now`, completes: a wait for a free slot if all `depth` are
    /// busy, then its service time. The slot stays busy until then.
    pub fn delay(&self, op: MediaOp, bytes: u64, now: Instant) -> Duration {
        if self.instant {
            return Duration::ZERO;
        }
        let nominal = self.spec.nominal(op, bytes);
        let mut st = self.lock();
        let service = match self.spec.jitter_pct {
            0 => nominal,
            pct => {
                let bp = within(&mut st.rng, i64::from(pct) * 100);
                scale(nominal, bp)
            }
        };
        let Some(depth) = self.spec.depth else {
            return service;
        };
        let start = if st.busy.len() < usize::try_from(depth.get()).unwrap_or(usize::MAX) {
            now
        } else {
            // Full: take the slot that frees first.
            st.busy.pop().map_or(now, |Reverse(free)| free.max(now))
        };
        let done = start.checked_add(service).unwrap_or(start);
        st.busy.push(Reverse(done));
        done.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> LatencySpec {
        LatencySpec::parse(text).unwrap()
    }

    #[test]
    fn base_plus_time_per_byte() {
        let s = spec("read=80us,write=20us,flush=1ms,discard=5us,bw=1G");
        // 4096 B at 10^9 B/s is 4096 ns.
        assert_eq!(s.nominal(MediaOp::Read, 4096), Duration::from_nanos(84_096));
        assert_eq!(
            s.nominal(MediaOp::Write, 1 << 20),
            Duration::from_nanos(20_000 + 1_048_576)
        );
        // Flush and discard move no data: no time per byte.
        assert_eq!(s.nominal(MediaOp::Flush, 1 << 30), Duration::from_millis(1));
        assert_eq!(s.nominal(MediaOp::Discard, 1 << 30), us(5));
        let m = Latency::new(s, 0);
        let t0 = Instant::now();
        assert_eq!(
            m.delay(MediaOp::Read, 4096, t0),
            Duration::from_nanos(84_096)
        );
        assert_eq!(m.delay(MediaOp::Read, 0, t0), us(80));
        // Separate bandwidths.
        let s = spec("read-bw=2G,write-bw=500M");
        assert_eq!(s.nominal(MediaOp::Read, 2000), Duration::from_nanos(1000));
        assert_eq!(s.nominal(MediaOp::Write, 2000), Duration::from_nanos(4000));
        // A huge command at the lowest bandwidth is capped, not overflowed.
        let s = spec("bw=1K");
        assert_eq!(s.nominal(MediaOp::Read, u64::MAX), MAX_SERVICE);
    }

    #[test]
    fn requests_beyond_the_depth_wait_for_a_slot() {
        let m = Latency::new(spec("read=100us,depth=2"), 0);
        let t0 = Instant::now();
        // Two slots: two start at once, the third waits for the first to free.
        assert_eq!(m.delay(MediaOp::Read, 0, t0), us(100));
        assert_eq!(m.delay(MediaOp::Read, 0, t0), us(100));
        assert_eq!(m.delay(MediaOp::Read, 0, t0), us(200));
        assert_eq!(m.delay(MediaOp::Read, 0, t0), us(200));
        assert_eq!(m.delay(MediaOp::Read, 0, t0), us(300));
        // Later arrivals wait only for what is still busy: at 250 µs one slot
        // has been free since 200 µs, the other frees at 300 µs.
        let t1 = t0 + us(250);
        assert_eq!(m.delay(MediaOp::Read, 0, t1), us(100));
        assert_eq!(m.delay(MediaOp::Read, 0, t1), us(150));
        // After everything is done, nothing waits.
        let t2 = t0 + Duration::from_secs(1);
        assert_eq!(m.delay(MediaOp::Read, 0, t2), us(100));
        assert_eq!(m.delay(MediaOp::Read, 0, t2), us(100));
        assert_eq!(m.delay(MediaOp::Read, 0, t2), us(200));

        // Without a depth, nothing ever waits for a slot.
        let m = Latency::new(spec("read=100us,depth=unlimited"), 0);
        for _ in 0..1000 {
            assert_eq!(m.delay(MediaOp::Read, 0, t0), us(100));
        }
    }

    #[test]
    fn depth_one_serialises_mixed_commands() {
        let m = Latency::new(spec("read=10us,write=30us,flush=1ms,depth=1"), 0);
        let t0 = Instant::now();
        assert_eq!(m.delay(MediaOp::Write, 0, t0), us(30));
        assert_eq!(m.delay(MediaOp::Flush, 0, t0), us(1030));
        assert_eq!(m.delay(MediaOp::Read, 0, t0 + us(30)), us(1010));
    }

    #[test]
    fn jitter_stays_in_bounds_and_repeats_with_its_seed() {
        let s = spec("read=100us,jitter=20%");
        assert_eq!(s.min_service(MediaOp::Read, 0), us(80));
        let draw = |seed| {
            let m = Latency::new(s, seed);
            let t0 = Instant::now();
            (0..2000)
                .map(|_| m.delay(MediaOp::Read, 0, t0))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert!(a.iter().all(|d| (us(80)..=us(120)).contains(d)), "{a:?}");
        // Both ends of the range are reached, and the mean stays near 100 µs.
        assert!(a.iter().any(|d| *d < us(82)) && a.iter().any(|d| *d > us(118)));
        let mean = a.iter().sum::<Duration>() / 2000;
        assert!((us(98)..=us(102)).contains(&mean), "{mean:?}");
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        // The floor holds for every preset and size.
        for (_, p) in LatencySpec::PRESETS {
            let m = Latency::new(p, 1);
            for bytes in [0, 512, 4096, 128 << 10] {
                let floor = p.min_service(MediaOp::Read, bytes);
                let t = Instant::now() + Duration::from_secs(3600);
                assert!((0..200).all(|_| m.delay(MediaOp::Read, bytes, t) >= floor));
            }
        }
    }

    #[test]
    fn instant_adds_nothing() {
        let s = LatencySpec::default();
        assert!(s.is_instant());
        assert_eq!(s, spec("instant"));
        let m = Latency::new(s, 0);
        let t0 = Instant::now();
        for op in [
            MediaOp::Read,
            MediaOp::Write,
            MediaOp::Flush,
            MediaOp::Discard,
        ] {
            assert_eq!(m.delay(op, 1 << 20, t0), Duration::ZERO);
            assert_eq!(s.min_service(op, 1 << 20), Duration::ZERO);
        }
        // Depth and jitter alone add no time.
        assert!(spec("depth=1,jitter=50%").is_instant());
        assert!(!spec("bw=3G").is_instant());
        assert!(!spec("flush=1us").is_instant());
    }

    #[test]
    fn presets_and_overrides() {
        assert_eq!(spec("nvme"), LatencySpec::NVME);
        assert_eq!(spec(" sata "), LatencySpec::SATA);
        let s = spec("nvme,read=100us,depth=1");
        assert_eq!(s.read, us(100));
        assert_eq!(s.depth, NonZeroU32::new(1));
        assert_eq!(s.write, LatencySpec::NVME.write);
        let s = spec("read=1.5ms,write=250ns,flush=2s,discard=7µs,bw=1.5G,jitter=0");
        assert_eq!(s.read, Duration::from_micros(1500));
        assert_eq!(s.write, Duration::from_nanos(250));
        assert_eq!(s.flush, Duration::from_secs(2));
        assert_eq!(s.discard, us(7));
        assert_eq!(s.read_bw, NonZeroU64::new(1_500_000_000));
        assert_eq!(s.depth, None);
        assert_eq!(s.jitter_pct, 0);
        // A 4 KiB read on the NVMe preset: 80 µs plus 4096 B at 3 GB/s.
        assert_eq!(
            LatencySpec::NVME.nominal(MediaOp::Read, 4096),
            Duration::from_nanos(81_365)
        );
    }

    #[test]
    fn display_reads_back() {
        for text in [
            "instant",
            "nvme",
            "sata",
            "nvme,depth=1",
            "read=1.5ms,write=250ns,bw=1.5G,jitter=3%",
            "read-bw=1234567,depth=unlimited",
            "flush=2s",
        ] {
            let s = spec(text);
            let shown = s.to_string();
            assert_eq!(spec(&shown), s, "{text} -> {shown}");
        }
        assert_eq!(
            spec("nvme,depth=1").to_string(),
            "read=80us,write=20us,flush=500us,discard=50us,read-bw=3G,write-bw=3G,\
             depth=1,jitter=5%"
        );
    }

    #[test]
    fn bad_specs_name_the_field() {
        let err = |text: &str| LatencySpec::parse(text).unwrap_err();
        assert_eq!(err(""), LatencySpecError::Empty);
        assert_eq!(err("nvm"), LatencySpecError::UnknownPreset("nvm".into()));
        assert_eq!(
            err("read=1us,nvme"),
            LatencySpecError::PresetNotFirst("nvme".into())
        );
        assert_eq!(
            err("speed=1"),
            LatencySpecError::UnknownField("speed".into())
        );
        assert_eq!(
            err("read=1us,read=2us"),
            LatencySpecError::Repeated("read".into())
        );
        for (text, field) in [
            ("read=80", "read"),
            ("read=80 us", "read"),
            ("read=-1us", "read"),
            ("write=11s", "write"),
            ("flush=1.2.3ms", "flush"),
            ("discard=us", "discard"),
            ("read=0.0000000001s", "read"),
            ("bw=3T", "bw"),
            ("bw=0", "bw"),
            ("bw=999", "bw"),
            ("read-bw=99999999999999999999G", "read-bw"),
            ("write-bw=fast", "write-bw"),
            ("depth=0", "depth"),
            ("depth=65537", "depth"),
            ("depth=-1", "depth"),
            ("jitter=10", "jitter"),
            ("jitter=101%", "jitter"),
            ("jitter=x%", "jitter"),
        ] {
            match err(text) {
                LatencySpecError::Value { field: f, .. } => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        let msg = err("depth=0").to_string();
        assert!(msg.contains("depth") && msg.contains("1 to 65536"), "{msg}");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,40}") {
            let _ = LatencySpec::parse(&text);
        }

        #[test]
        fn any_spec_reads_back(
            times in proptest::array::uniform4(0u64..=10_000_000_000),
            rates in proptest::array::uniform2(proptest::option::of(MIN_BANDWIDTH..u64::MAX)),
            depth in proptest::option::of(1..=MAX_DEPTH),
            jitter_pct in 0u8..=100,
        ) {
            let s = LatencySpec {
                read: Duration::from_nanos(times[0]),
                write: Duration::from_nanos(times[1]),
                flush: Duration::from_nanos(times[2]),
                discard: Duration::from_nanos(times[3]),
                read_bw: rates[0].and_then(NonZeroU64::new),
                write_bw: rates[1].and_then(NonZeroU64::new),
                depth: depth.and_then(NonZeroU32::new),
                jitter_pct,
            };
            proptest::prop_assert_eq!(LatencySpec::parse(&s.to_string()), Ok(s));
        }
    }

    #[test]
    fn shared_between_threads() {
        let m = std::sync::Arc::new(Latency::new(spec("read=100us,depth=4"), 0));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|_| m.delay(MediaOp::Read, 0, t0))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<Duration> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort();
        // 100 commands through 4 slots: 25 rounds of 4, each round 100 µs later.
        let expected: Vec<Duration> = (1..=25u32).flat_map(|r| [us(100) * r; 4]).collect();
        assert_eq!(all, expected);
    }
}
