//! The load loop, whatever the device: a [`LoadQueue`] per queue (submit,
//! kick, wait), one thread per queue that keeps `iodepth` requests in
//! flight for the warm-up and the measured time ([`drive`]), each request's
//! latency in a log-linear [`Histogram`], and the figures of each queue and
//! of the whole run ([`Stats`]).
//!
//! A request flows: [`Workload::draw`] (what and where) → a free buffer →
//! [`LoadQueue::submit`] (a slot) → [`LoadQueue::kick`] → the device →
//! [`LoadQueue::wait`] (the slot and whether it went well) → the latency
//! recorded if it completed inside the measured time → the buffer to the
//! next request.

use std::time::{Duration, Instant};

use serde::Serialize;
use wire::splitmix::SplitMix64;

use super::{BenchConfig, BenchError, DeviceError, Rw};

/// What a request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// A request as the loop hands it to a queue: `op` of a block at byte
/// `offset` of the disk, through data buffer `buffer` of the queue's
/// `iodepth` (each a block long).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Io {
    pub op: Op,
    pub offset: u64,
    pub buffer: usize,
}

/// A request that completed: the slot [`LoadQueue::submit`] gave it, and
/// the device's status when it is not OK, as the device words it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    pub slot: usize,
    pub status: Result<(), String>,
}

/// One queue of a device, as the load loop drives it from a thread of its
/// own.
pub trait LoadQueue {
    /// The queue's index in the results, from 0.
    fn index(&self) -> u16;

    /// Slots are below this.
    fn slots(&self) -> usize;

    /// Puts `io` on the queue, not yet told to the device; the slot its
    /// completion will name, not in use by another request in flight.
    fn submit(&mut self, io: Io) -> Result<usize, DeviceError>;

    /// Tells the device of what was submitted since the last kick.
    fn kick(&mut self) -> Result<(), DeviceError>;

    /// Appends what completed to `out`, waiting for at least one completion
    /// for `within` at most; none by then may be an error or an empty `out`.
    fn wait(&mut self, out: &mut Vec<Done>, within: Duration) -> Result<(), DeviceError>;
}

/// When the run measures, and how long one request may take before the
/// run is declared stuck.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Completions from here on are measured.
    pub measure_from: Instant,
    /// No request is submitted after this; what is in flight drains.
    pub end: Instant,
    pub stall: Duration,
}

impl Timing {
    /// `warmup` seconds from now, then `seconds` measured.
    pub fn from_now(warmup: f64, seconds: f64, stall: Duration) -> Timing {
        let measure_from = Instant::now() + Duration::from_secs_f64(warmup);
        Timing {
            measure_from,
            end: measure_from + Duration::from_secs_f64(seconds),
            stall,
        }
    }
}

/// Where one queue's next request goes and what it does.
#[derive(Debug)]
pub struct Workload {
    rw: Rw,
    rng: SplitMix64,
    /// Blocks of `bs` in the range.
    blocks: u64,
    /// Next block of a sequential workload.
    cursor: u64,
}

impl Workload {
    /// Queue `index`'s: its own seed, and for a sequential workload its own
    /// starting point, the queues spread evenly over the `blocks`.
    pub fn new(config: &BenchConfig, index: u16, blocks: u64) -> Workload {
        let nqueues = u64::from(config.queues.max(1));
        Workload {
            rw: config.rw,
            rng: SplitMix64(config.seed ^ u64::from(index).wrapping_mul(0x2545_f491_4f6c_dd1d)),
            blocks: blocks.max(1),
            cursor: blocks / nqueues * u64::from(index) % blocks.max(1),
        }
    }

    /// The next request: what, and which block.
    pub fn draw(&mut self) -> (Op, u64) {
        let block = if self.rw.random() {
            self.rng.below(self.blocks)
        } else {
            let b = self.cursor;
            self.cursor = (self.cursor + 1) % self.blocks;
            b
        };
        let op = match self.rw {
            Rw::RandRead | Rw::Read => Op::Read,
            Rw::RandWrite | Rw::Write => Op::Write,
            Rw::Mix { read_percent } => {
                if self.rng.below(100) < u64::from(read_percent) {
                    Op::Read
                } else {
                    Op::Write
                }
            }
        };
        (op, block)
    }
}

/// What buffer `buffer` of queue `queue` holds before the run, and so what
/// a write through it carries (until a read into it, of a mixed workload,
/// replaces it): the data pattern of a seed of its own. A disk that was
/// zeroes before a run holds, after it, in each block either zeroes or one
/// buffer's bytes whole.
pub fn buffer_data(seed: u64, queue: u16, buffer: usize, len: usize) -> Vec<u8> {
    let id = u64::from(queue) << 32 | u64::try_from(buffer).unwrap_or(u64::MAX);
    wire::pattern::pattern(seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15), len)
}

/// A request in flight.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    io: Io,
    submitted: Instant,
}

/// Requests counted in the measured time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Count {
    pub reads: u64,
    pub writes: u64,
}

/// What one queue did.
#[derive(Debug)]
pub struct QueueOutcome {
    pub count: Count,
    pub hist: Histogram,
    pub secs: f64,
}

/// Keeps `depth` requests (one per buffer) in flight on `q` until
/// `timing.end`, measuring those that complete in the measured time; then
/// lets the queue drain. A request that fails, a completion of no request in
/// flight, or nothing completing for `timing.stall` stops it.
pub fn drive<Q: LoadQueue>(
    q: &mut Q,
    depth: usize,
    mut work: Workload,
    bs: u64,
    timing: Timing,
) -> Result<QueueOutcome, BenchError> {
    let queue = q.index();
    let qerr = |source| BenchError::Queue { queue, source };
    let mut in_flight: Vec<Option<InFlight>> = vec![None; q.slots()];
    let mut outstanding = 0usize;
    let mut submit = |q: &mut Q, in_flight: &mut [Option<InFlight>], buffer: usize| {
        let (op, block) = work.draw();
        let io = Io {
            op,
            offset: block * bs,
            buffer,
        };
        let slot = q.submit(io).map_err(qerr)?;
        match in_flight.get_mut(slot) {
            Some(entry @ None) => {
                *entry = Some(InFlight {
                    io,
                    submitted: Instant::now(),
                });
                Ok(())
            }
            _ => Err(BenchError::SlotInUse { queue, slot }),
        }
    };

    for buffer in 0..depth {
        submit(q, &mut in_flight, buffer)?;
        outstanding += 1;
    }
    q.kick().map_err(qerr)?;

    let mut hist = Histogram::default();
    let mut count = Count::default();
    let mut done = Vec::with_capacity(depth);
    let mut freed = Vec::with_capacity(depth);
    let mut stopping = false;
    while !stopping || outstanding > 0 {
        done.clear();
        q.wait(&mut done, timing.stall).map_err(qerr)?;
        if done.is_empty() {
            return Err(BenchError::Stalled {
                queue,
                waited: timing.stall,
            });
        }
        let now = Instant::now();
        stopping = stopping || now >= timing.end;
        for d in done.drain(..) {
            let req = in_flight.get_mut(d.slot).and_then(Option::take).ok_or(
                BenchError::UnknownCompletion {
                    queue,
                    slot: d.slot,
                },
            )?;
            outstanding -= 1;
            if let Err(status) = d.status {
                return Err(BenchError::Request {
                    queue,
                    op: req.io.op.name(),
                    offset: req.io.offset,
                    len: bs,
                    status,
                });
            }
            if now >= timing.measure_from && now < timing.end {
                hist.record(now - req.submitted);
                match req.io.op {
                    Op::Read => count.reads += 1,
                    Op::Write => count.writes += 1,
                }
            }
            freed.push(req.io.buffer);
        }
        // Only now: a new request may reuse the slot of any completion above.
        if !stopping {
            for buffer in freed.drain(..) {
                submit(q, &mut in_flight, buffer)?;
                outstanding += 1;
            }
            q.kick().map_err(qerr)?;
        }
        freed.clear();
    }
    Ok(QueueOutcome {
        count,
        hist,
        secs: timing
            .end
            .saturating_duration_since(timing.measure_from)
            .as_secs_f64(),
    })
}

/// Drives every queue on a thread of its own through the warm-up and the
/// measured seconds of `config`, each over the `blocks` of the range.
pub fn run_queues<Q: LoadQueue + Send>(
    queues: Vec<Q>,
    config: &BenchConfig,
    blocks: u64,
    stall: Duration,
) -> Vec<Result<QueueOutcome, BenchError>> {
    let timing = Timing::from_now(config.warmup, config.seconds, stall);
    let depth = usize::from(config.iodepth);
    let bs = config.bs;
    std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .map(|mut q| {
                let index = q.index();
                let work = Workload::new(config, index, blocks);
                let handle = s.spawn(move || drive(&mut q, depth, work, bs, timing));
                (index, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(index, h)| h.join().unwrap_or(Err(BenchError::Panicked(index))))
            .collect()
    })
}

/// The figures of the whole run and of each queue; the first queue that
/// failed fails the run.
pub fn totals(
    config: &BenchConfig,
    outcomes: Vec<Result<QueueOutcome, BenchError>>,
) -> Result<(Stats, Vec<Stats>), BenchError> {
    let mut total_hist = Histogram::default();
    let mut total_count = Count::default();
    let mut queues = Vec::with_capacity(outcomes.len());
    let mut secs: f64 = 0.0;
    for (index, outcome) in (0..config.queues).zip(outcomes) {
        let o = outcome?;
        total_hist.merge(&o.hist);
        total_count.reads += o.count.reads;
        total_count.writes += o.count.writes;
        secs = secs.max(o.secs);
        queues.push(Stats::new(
            Some(index),
            &o.count,
            config.bs,
            o.secs,
            &o.hist,
        ));
    }
    let total = Stats::new(None, &total_count, config.bs, secs, &total_hist);
    Ok((total, queues))
}

/// Latencies in nanoseconds, in log-linear buckets: exact below 256 ns, then
/// 128 buckets per power of two (under 0.8% wide).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; Self::BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

impl Histogram {
    const SUB_BITS: u32 = 7;
    const SUB: u64 = 1 << Self::SUB_BITS;
    const BUCKETS: usize = (64 - Self::SUB_BITS as usize) * (1 << Self::SUB_BITS) + 256;

    fn bucket(ns: u64) -> usize {
        let index = if ns < 2 * Self::SUB {
            ns
        } else {
            let shift = u64::from(63 - ns.leading_zeros() - Self::SUB_BITS);
            shift * Self::SUB + (ns >> shift)
        };
        usize::try_from(index).unwrap_or(Self::BUCKETS - 1)
    }

    /// The middle of bucket `index`, in ns.
    fn value(index: usize) -> u64 {
        let i = index as u64;
        if i < 2 * Self::SUB {
            i
        } else {
            let shift = i / Self::SUB - 1;
            let mantissa = i - shift * Self::SUB;
            (mantissa << shift) + (1 << shift) / 2
        }
    }

    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[Self::bucket(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// Latencies recorded.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The latency at quantile `q` (0 < q ≤ 1) in ns: the smallest bucket
    /// with at least `ceil(q × len)` latencies at or below it. 0 when empty.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        // The float product is at most `total`, well within u64.
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(index).min(self.max);
            }
        }
        self.max
    }
}

/// Throughput and latency of one queue, or of all of them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    /// Queue index (absent in the total).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<u16>,
    /// Requests completed in the measured time.
    pub ios: u64,
    /// Of which reads.
    pub reads: u64,
    /// Of which writes.
    pub writes: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Seconds measured.
    pub secs: f64,
    /// Requests per second.
    pub iops: f64,
    /// 10^6 bytes per second.
    pub mbps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// 99.9th percentile latency, µs.
    pub p999_us: f64,
    /// Largest latency, µs.
    pub max_us: f64,
}

impl Stats {
    fn new(queue: Option<u16>, count: &Count, bs: u64, secs: f64, hist: &Histogram) -> Stats {
        let ios = count.reads + count.writes;
        let bytes = ios * bs;
        let us = |ns: u64| ns as f64 / 1000.0;
        Stats {
            queue,
            ios,
            reads: count.reads,
            writes: count.writes,
            bytes,
            secs,
            iops: ios as f64 / secs,
            mbps: bytes as f64 / secs / 1e6,
            p50_us: us(hist.quantile_ns(0.50)),
            p99_us: us(hist.quantile_ns(0.99)),
            p999_us: us(hist.quantile_ns(0.999)),
            max_us: us(hist.max),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    #[test]
    fn histogram_buckets_are_continuous_and_tight() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 40, u64::MAX]) {
            let b = Histogram::bucket(ns);
            assert!(b >= last && b < Histogram::BUCKETS, "ns={ns} b={b}");
            last = b;
            let v = Histogram::value(b);
            let err = v.abs_diff(ns) as f64 / ns.max(1) as f64;
            assert!(err <= 0.005, "ns={ns} value={v}");
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p = |q| h.quantile_ns(q) as f64 / 1000.0;
        assert!((p(0.5) - 500.0).abs() < 5.0, "{}", p(0.5));
        assert!((p(0.99) - 990.0).abs() < 10.0, "{}", p(0.99));
        assert!((p(0.999) - 999.0).abs() < 10.0, "{}", p(0.999));
        assert_eq!(h.quantile_ns(1.0), 1_000_000);
        assert_eq!(Histogram::default().quantile_ns(0.5), 0);
    }

    fn config(rw: Rw, queues: u16) -> BenchConfig {
        BenchConfig {
            rw,
            queues,
            ..BenchConfig::default()
        }
    }

    #[test]
    fn sequential_offsets_wrap() {
        let mut w = Workload::new(&config(Rw::Read, 2), 1, 5);
        let blocks: Vec<u64> = (0..4).map(|_| w.draw().1).collect();
        assert_eq!(blocks, [2, 3, 4, 0], "queue 1 of 2 starts half way");
    }

    #[test]
    fn buffers_of_other_queues_carry_other_data() {
        let a = buffer_data(1, 0, 0, 4096);
        assert_eq!(a, buffer_data(1, 0, 0, 4096));
        for other in [
            buffer_data(1, 0, 1, 4096),
            buffer_data(1, 1, 0, 4096),
            buffer_data(2, 0, 0, 4096),
        ] {
            assert_ne!(a[..16], other[..16]);
        }
    }

    /// A device in memory: what was kicked completes at the next wait, in
    /// order, OK unless the request's offset is `fail_at`. It records the
    /// most requests it ever held and what it was asked to do.
    #[derive(Default)]
    struct Fake {
        slots: Vec<Option<Io>>,
        unkicked: Vec<usize>,
        kicked: VecDeque<usize>,
        most_in_flight: usize,
        seen: Vec<Io>,
        fail_at: Option<u64>,
        /// Names this slot in the next completion instead of the real one.
        bogus_slot: Option<usize>,
        /// Completes nothing.
        dead: bool,
    }

    impl Fake {
        fn new(slots: usize) -> Fake {
            Fake {
                slots: vec![None; slots],
                ..Fake::default()
            }
        }
    }

    impl LoadQueue for Fake {
        fn index(&self) -> u16 {
            0
        }

        fn slots(&self) -> usize {
            self.slots.len()
        }

        fn submit(&mut self, io: Io) -> Result<usize, DeviceError> {
            let slot = self
                .slots
                .iter()
                .position(Option::is_none)
                .expect("a free slot");
            self.slots[slot] = Some(io);
            self.unkicked.push(slot);
            self.seen.push(io);
            let held = self.slots.iter().filter(|s| s.is_some()).count();
            self.most_in_flight = self.most_in_flight.max(held);
            Ok(slot)
        }

        fn kick(&mut self) -> Result<(), DeviceError> {
            self.kicked.extend(self.unkicked.drain(..));
            Ok(())
        }

        fn wait(&mut self, out: &mut Vec<Done>, within: Duration) -> Result<(), DeviceError> {
            if self.dead {
                std::thread::sleep(within);
                return Ok(());
            }
            for slot in self.kicked.drain(..) {
                let io = self.slots[slot].take().expect("in flight");
                let status = if Some(io.offset) == self.fail_at {
                    Err("IOERR".to_owned())
                } else {
                    Ok(())
                };
                let slot = self.bogus_slot.take().unwrap_or(slot);
                out.push(Done { slot, status });
            }
            Ok(())
        }
    }

    fn timing(warmup_ms: u64, measure_ms: u64) -> Timing {
        Timing::from_now(
            warmup_ms as f64 / 1000.0,
            measure_ms as f64 / 1000.0,
            Duration::from_millis(50),
        )
    }

    #[test]
    fn the_loop_keeps_depth_in_flight_and_drains() {
        let c = config(Rw::Mix { read_percent: 50 }, 1);
        let mut q = Fake::new(16);
        let work = Workload::new(&c, 0, 100);
        let o = drive(&mut q, 4, work, 8192, timing(10, 50)).unwrap();
        assert_eq!(q.most_in_flight, 4);
        assert!(q.slots.iter().all(Option::is_none), "drained");
        let ios = o.count.reads + o.count.writes;
        assert!(ios > 100, "{ios}");
        assert_eq!(o.hist.len(), ios);
        assert!((q.seen.len() as u64) > ios, "the warm-up is not counted");
        assert!(
            o.count.reads > ios / 4 && o.count.writes > ios / 4,
            "{:?}",
            o.count
        );
        assert!(q
            .seen
            .iter()
            .all(|io| io.offset % 8192 == 0 && io.offset < 100 * 8192 && io.buffer < 4));
        assert!((o.secs - 0.05).abs() < 1e-9);
    }

    #[test]
    fn a_failed_request_stops_the_run_with_its_details() {
        let c = config(Rw::Write, 1);
        let mut q = Fake::new(8);
        q.fail_at = Some(3 * 4096);
        let e = drive(&mut q, 2, Workload::new(&c, 0, 10), 4096, timing(0, 1000)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "q=0 op=write offset=12288 len=4096 completed with status IOERR"
        );
    }

    #[test]
    fn a_completion_of_nothing_in_flight_or_no_completion_stops_the_run() {
        let c = config(Rw::RandRead, 1);
        let mut q = Fake::new(8);
        q.bogus_slot = Some(7);
        let e = drive(&mut q, 2, Workload::new(&c, 0, 10), 512, timing(0, 1000)).unwrap_err();
        assert!(
            matches!(e, BenchError::UnknownCompletion { queue: 0, slot: 7 }),
            "{e:?}"
        );

        let mut q = Fake::new(8);
        q.dead = true;
        let start = Instant::now();
        let e = drive(&mut q, 2, Workload::new(&c, 0, 10), 512, timing(0, 1000)).unwrap_err();
        assert!(matches!(e, BenchError::Stalled { queue: 0, .. }), "{e:?}");
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn queues_on_threads_add_up() {
        let c = BenchConfig {
            seconds: 0.05,
            warmup: 0.01,
            iodepth: 3,
            ..config(Rw::RandRead, 2)
        };
        struct Indexed(u16, Fake);
        impl LoadQueue for Indexed {
            fn index(&self) -> u16 {
                self.0
            }
            fn slots(&self) -> usize {
                self.1.slots()
            }
            fn submit(&mut self, io: Io) -> Result<usize, DeviceError> {
                self.1.submit(io)
            }
            fn kick(&mut self) -> Result<(), DeviceError> {
                self.1.kick()
            }
            fn wait(&mut self, out: &mut Vec<Done>, within: Duration) -> Result<(), DeviceError> {
                self.1.wait(out, within)
            }
        }
        let queues = vec![Indexed(0, Fake::new(4)), Indexed(1, Fake::new(4))];
        let outcomes = run_queues(queues, &c, 1000, Duration::from_secs(1));
        let (total, each) = totals(&c, outcomes).unwrap();
        assert_eq!(each.len(), 2);
        assert_eq!(total.ios, each[0].ios + each[1].ios);
        assert!(each.iter().all(|s| s.ios > 0 && s.writes == 0));
        assert_eq!(total.bytes, total.ios * 4096);
    }
}
