//! `dmaprobe bench`: a load generator for any vhost-user-blk backend.
//!
//! [`BenchArgs`] (the command line) becomes a checked [`BenchConfig`];
//! [`measure`] connects one [`BlkFrontend`] with a queue per worker, runs one
//! thread per queue that keeps `iodepth` requests in flight for a warm-up and
//! then for the measured time, and records each request's latency (submit to
//! completion) in a log-linear [`Histogram`]. [`run`] prints the
//! [`BenchResult`] as a table or as one JSON object.
//!
//! MB/s are 10^6 bytes per second; latencies are in µs, to about 1%.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use log::info;
use serde::{Serialize, Serializer};
use wire::splitmix::SplitMix64;

use backend::config::{self, ConfigError};
use backend::vhost_user_driver::{
    self, BlkFrontend, BlkRequest, Buffer, Completion, FrontendConfig, Queue, RequestType, Sector,
    Segment, StatusByte,
};

/// Descriptors one request takes: header, data, status.
const DESCRIPTORS_PER_REQUEST: u16 = 3;
/// The largest block size accepted.
const MAX_BS: u64 = 4 << 20;
/// The most guest memory the data buffers may take.
const MAX_BUFFER_BYTES: u64 = 4 << 30;
/// The longest run accepted, in seconds (warm-up and measurement each).
const MAX_SECONDS: f64 = 86_400.0;
/// How long one request may take before the run is declared stuck.
const STALL: Duration = Duration::from_secs(30);
/// Guest memory per queue for its rings and scratch space, generously.
const RING_BYTES: u64 = 2 << 20;

/// Arguments of `dmaprobe bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The vhost-user-blk socket to connect to.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The workload: randread, randwrite, read, write (sequential), or
    /// mix:N (random, N% reads).
    #[arg(long, value_name = "RW", default_value = "randread")]
    pub rw: String,
    /// Bytes per request, a multiple of 512 (e.g. 4k, 64k, 1M).
    #[arg(long, value_name = "SIZE", default_value = "4k")]
    pub bs: String,
    /// Requests kept in flight on each queue.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub iodepth: u16,
    /// Queues to load, one thread each (the backend must have that many).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Descriptors per virtqueue (a power of two, at most what the backend
    /// accepts); each request takes 3.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// Seconds to measure, after the warm-up.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub seconds: f64,
    /// Seconds of load before measuring.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub warmup: f64,
    /// Use only the first SIZE bytes of the disk (default: all of it).
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Seed of the random offsets and the read/write choice of mix:N.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What each request does and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    /// Reads at random aligned offsets.
    RandRead,
    /// Writes at random aligned offsets.
    RandWrite,
    /// Sequential reads (each queue from its own starting point, wrapping).
    Read,
    /// Sequential writes.
    Write,
    /// Random offsets, `read_percent`% reads and the rest writes.
    Mix {
        /// Percentage of reads, 0 to 100.
        read_percent: u8,
    },
}

impl Rw {
    fn random(self) -> bool {
        !matches!(self, Rw::Read | Rw::Write)
    }
}

impl std::str::FromStr for Rw {
    type Err = BenchError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BenchError::Rw(s.to_owned());
        match s {
            "randread" => Ok(Rw::RandRead),
            "randwrite" => Ok(Rw::RandWrite),
            "read" => Ok(Rw::Read),
            "write" => Ok(Rw::Write),
            _ => {
                let n = s.strip_prefix("mix:").ok_or_else(bad)?;
                let read_percent: u8 = n.parse().map_err(|_| bad())?;
                if read_percent > 100 {
                    return Err(bad());
                }
                Ok(Rw::Mix { read_percent })
            }
        }
    }
}

impl fmt::Display for Rw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rw::RandRead => f.write_str("randread"),
            Rw::RandWrite => f.write_str("randwrite"),
            Rw::Read => f.write_str("read"),
            Rw::Write => f.write_str("write"),
            Rw::Mix { read_percent } => write!(f, "mix:{read_percent}"),
        }
    }
}

impl Serialize for Rw {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A checked benchmark configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchConfig {
    /// The workload.
    pub rw: Rw,
    /// Bytes per request: a multiple of 512, at most 4 MiB.
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: u16,
    /// Queues, one thread each.
    pub queues: u16,
    /// Descriptors per virtqueue.
    pub queue_size: u16,
    /// Seconds measured.
    pub seconds: f64,
    /// Seconds of warm-up.
    pub warmup: f64,
    /// Bytes of the disk to use at most (`None`: all of it).
    pub size: Option<u64>,
    /// Seed of the offsets and of mix:N's choices.
    pub seed: u64,
}

impl Default for BenchConfig {
    /// What `dmaprobe bench` does without options.
    fn default() -> Self {
        BenchConfig {
            rw: Rw::RandRead,
            bs: 4096,
            iodepth: 32,
            queues: 1,
            queue_size: 256,
            seconds: 10.0,
            warmup: 1.0,
            size: None,
            seed: 1,
        }
    }
}

impl BenchConfig {
    /// Checks every field and their combinations; the first problem found is
    /// the error.
    pub fn check(self) -> Result<Self, BenchError> {
        if self.bs == 0 || !self.bs.is_multiple_of(Sector::SIZE) || self.bs > MAX_BS {
            return Err(BenchError::BlockSize(self.bs));
        }
        config::check_queues(self.queues).map_err(BenchError::Queues)?;
        config::check_queue_size(self.queue_size).map_err(BenchError::QueueSize)?;
        let max_depth = self.queue_size / DESCRIPTORS_PER_REQUEST;
        if self.iodepth == 0 || self.iodepth > max_depth {
            return Err(BenchError::IoDepth {
                iodepth: self.iodepth,
                queue_size: self.queue_size,
                max: max_depth,
            });
        }
        let buffers = self.buffer_bytes();
        if buffers > MAX_BUFFER_BYTES {
            return Err(BenchError::TooMuchMemory { bytes: buffers });
        }
        for (name, secs, min) in [
            ("seconds", self.seconds, f64::MIN_POSITIVE),
            ("warmup", self.warmup, 0.0),
        ] {
            if !(secs.is_finite() && secs >= min && secs <= MAX_SECONDS) {
                return Err(BenchError::Duration { name, secs });
            }
        }
        if let Some(size) = self.size {
            if size < self.bs {
                return Err(BenchError::RangeTooSmall {
                    range: size,
                    bs: self.bs,
                });
            }
        }
        Ok(self)
    }

    /// Bytes of guest memory the data buffers take (each at least a page).
    fn buffer_bytes(&self) -> u64 {
        let per_buffer = self.bs.div_ceil(4096) * 4096;
        u64::from(self.queues) * u64::from(self.iodepth) * per_buffer
    }

    /// Guest memory for the buffers and the rings.
    fn mem_size(&self) -> u64 {
        self.buffer_bytes() + u64::from(self.queues) * RING_BYTES + (1 << 20)
    }
}

impl TryFrom<BenchArgs> for BenchConfig {
    type Error = BenchError;

    fn try_from(a: BenchArgs) -> Result<Self, Self::Error> {
        let size = |what: &'static str, text: &str| {
            config::parse_size(text).map_err(|source| BenchError::Size { what, source })
        };
        BenchConfig {
            rw: a.rw.parse()?,
            bs: size("--bs", &a.bs)?,
            iodepth: a.iodepth,
            queues: a.queues,
            queue_size: a.queue_size,
            seconds: a.seconds,
            warmup: a.warmup,
            size: a.size.as_deref().map(|s| size("--size", s)).transpose()?,
            seed: a.seed,
        }
        .check()
    }
}

/// Errors of `dmaprobe bench`.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// `--rw` names no workload.
    #[error("Unknown workload {0:?}: use randread, randwrite, read, write or mix:N (N = 0..100)")]
    Rw(String),
    /// A size did not parse.
    #[error("Bad {what}")]
    Size {
        /// The option.
        what: &'static str,
        /// The cause.
        #[source]
        source: ConfigError,
    },
    /// The block size is not a multiple of 512 in range.
    #[error("Block size {0} is not a multiple of 512 between 512 and 4 MiB")]
    BlockSize(u64),
    /// Bad queue count.
    #[error("Bad --queues")]
    Queues(#[source] ConfigError),
    /// Bad queue size.
    #[error("Bad --queue-size")]
    QueueSize(#[source] ConfigError),
    /// iodepth 0, or more requests than the queue holds.
    #[error(
        "iodepth {iodepth} is out of range: at least 1, at most {max} with queue size \
         {queue_size} (3 descriptors per request; raise --queue-size for more)"
    )]
    IoDepth {
        /// Asked for.
        iodepth: u16,
        /// Descriptors per queue.
        queue_size: u16,
        /// The most that fit.
        max: u16,
    },
    /// queues × iodepth × bs is too much memory.
    #[error("The data buffers would take {bytes} bytes of guest memory, more than 4 GiB")]
    TooMuchMemory {
        /// Bytes needed.
        bytes: u64,
    },
    /// A duration that is negative, zero (for the measurement), or absurd.
    #[error("--{name} {secs} is out of range (up to a day; the measurement must be positive)")]
    Duration {
        /// The option.
        name: &'static str,
        /// Its value.
        secs: f64,
    },
    /// Not even one block fits the range.
    #[error("The I/O range of {range} bytes holds no {bs}-byte block")]
    RangeTooSmall {
        /// Bytes of the range.
        range: u64,
        /// Block size.
        bs: u64,
    },
    /// Connecting or setting up the device failed.
    #[error("Cannot set up the device at {}", socket.display())]
    Setup {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: vhost_user_driver::Error,
    },
    /// The backend cannot take writes.
    #[error("The device is read-only (VIRTIO_BLK_F_RO) and the workload {0} writes")]
    ReadOnly(Rw),
    /// Submitting or waiting on a queue failed.
    #[error("Queue {queue} failed")]
    Queue {
        /// Queue index.
        queue: u16,
        /// The cause.
        #[source]
        source: vhost_user_driver::Error,
    },
    /// A request completed with a status other than OK.
    #[error("q={queue} op={op} sector={} len={len} completed with status {status}", sector.0)]
    Request {
        /// Queue index.
        queue: u16,
        /// "read" or "write".
        op: &'static str,
        /// First sector.
        sector: Sector,
        /// Bytes.
        len: u64,
        /// The status the device wrote.
        status: StatusByte,
    },
    /// A worker thread panicked.
    #[error("The worker of queue {0} panicked")]
    Panicked(u16),
    /// Writing the JSON result failed.
    #[error("Cannot encode the result as JSON")]
    Json(#[source] serde_json::Error),
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

/// What [`measure`] found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchResult {
    /// The whole run.
    #[serde(flatten)]
    pub total: Stats,
    /// Each queue.
    pub queues: Vec<Stats>,
    /// The disk's capacity, bytes.
    pub capacity_bytes: u64,
    /// Bytes of the disk the offsets were drawn from.
    pub range_bytes: u64,
    /// The configuration.
    pub config: BenchConfig,
}

#[derive(Clone, Copy, Debug, Default)]
struct Count {
    reads: u64,
    writes: u64,
}

/// Where one queue's next request goes and what it does.
struct Workload {
    rw: Rw,
    rng: SplitMix64,
    /// Blocks of `bs` in the range.
    blocks: u64,
    /// Next block of a sequential workload.
    cursor: u64,
    sectors_per_block: u64,
}

impl Workload {
    fn next(&mut self) -> (RequestType, Sector) {
        let block = if self.rw.random() {
            self.rng.below(self.blocks)
        } else {
            let b = self.cursor;
            self.cursor = (self.cursor + 1) % self.blocks;
            b
        };
        let kind = match self.rw {
            Rw::RandRead | Rw::Read => RequestType::In,
            Rw::RandWrite | Rw::Write => RequestType::Out,
            Rw::Mix { read_percent } => {
                if self.rng.below(100) < u64::from(read_percent) {
                    RequestType::In
                } else {
                    RequestType::Out
                }
            }
        };
        (kind, Sector(block * self.sectors_per_block))
    }
}

/// A request in flight.
#[derive(Clone, Copy)]
struct InFlight {
    buffer: usize,
    kind: RequestType,
    sector: Sector,
    submitted: Instant,
}

struct QueueOutcome {
    count: Count,
    hist: Histogram,
    secs: f64,
}

/// Keeps `bufs.len()` requests in flight on `q` until `end`, measuring those
/// that complete after `measure_from`; then drains the queue.
fn drive(
    q: &mut Queue,
    bufs: &[Buffer],
    mut work: Workload,
    bs: u64,
    measure_from: Instant,
    end: Instant,
) -> Result<QueueOutcome, BenchError> {
    let queue = q.index();
    let qerr = |source| BenchError::Queue { queue, source };
    let len = u32::try_from(bs).map_err(|_| BenchError::BlockSize(bs))?;
    let mut in_flight: Vec<Option<InFlight>> = vec![None; usize::from(q.size())];
    let submit = |q: &mut Queue,
                  in_flight: &mut [Option<InFlight>],
                  work: &mut Workload,
                  buffer: usize|
     -> Result<(), BenchError> {
        let (kind, sector) = work.next();
        let seg = [Segment {
            gpa: bufs[buffer].gpa(),
            len,
        }];
        let id = q
            .submit(&BlkRequest {
                kind,
                sector,
                data: &seg,
            })
            .map_err(qerr)?;
        in_flight[id.index()] = Some(InFlight {
            buffer,
            kind,
            sector,
            submitted: Instant::now(),
        });
        Ok(())
    };

    for buffer in 0..bufs.len() {
        submit(q, &mut in_flight, &mut work, buffer)?;
    }
    q.kick().map_err(qerr)?;

    let mut hist = Histogram::default();
    let mut count = Count::default();
    let mut out = Vec::with_capacity(bufs.len());
    let mut freed = Vec::with_capacity(bufs.len());
    let mut stopping = false;
    while !stopping || q.in_flight() > 0 {
        out.clear();
        q.wait(&mut out, STALL).map_err(qerr)?;
        let now = Instant::now();
        stopping = stopping || now >= end;
        for c in &out {
            let req = completed(&mut in_flight, c, queue, q.size())?;
            check_ok(c, &req, queue, bs)?;
            if now >= measure_from && now < end {
                hist.record(now - req.submitted);
                match req.kind {
                    RequestType::In => count.reads += 1,
                    _ => count.writes += 1,
                }
            }
            freed.push(req.buffer);
        }
        // Only now: a new chain may reuse the head of any completion above.
        if !stopping {
            for buffer in freed.drain(..) {
                submit(q, &mut in_flight, &mut work, buffer)?;
            }
            q.kick().map_err(qerr)?;
        }
        freed.clear();
    }
    Ok(QueueOutcome {
        count,
        hist,
        secs: end.saturating_duration_since(measure_from).as_secs_f64(),
    })
}

/// The request in flight that completion `c` completes, taken out of
/// `in_flight`; a completion of no request in flight is the device's bug.
fn completed(
    in_flight: &mut [Option<InFlight>],
    c: &Completion,
    queue: u16,
    size: u16,
) -> Result<InFlight, BenchError> {
    c.chain()
        .and_then(|id| in_flight.get_mut(id.index()))
        .and_then(Option::take)
        .ok_or(BenchError::Queue {
            queue,
            source: vhost_user_driver::Error::BadSlot {
                slot: u16::try_from(c.id).unwrap_or(u16::MAX),
                size,
            },
        })
}

/// A request that completed with a status other than OK stops the run.
fn check_ok(c: &Completion, req: &InFlight, queue: u16, bs: u64) -> Result<(), BenchError> {
    let status = c.status().unwrap_or(StatusByte::UNWRITTEN);
    if status.is_ok() {
        return Ok(());
    }
    let op = if req.kind == RequestType::In {
        "read"
    } else {
        "write"
    };
    Err(BenchError::Request {
        queue,
        op,
        sector: req.sector,
        len: bs,
        status,
    })
}

/// Connects to `socket`, runs `config`'s workload, and returns what it
/// measured. A request that completes with a status other than OK stops the
/// run with its details.
pub fn measure(socket: &Path, config: &BenchConfig) -> Result<BenchResult, BenchError> {
    let config = config.clone().check()?;
    let setup = |source| BenchError::Setup {
        socket: socket.to_path_buf(),
        source,
    };
    let mut fe = connect(socket, &config)?;
    let capacity = fe.get_config().map_err(setup)?.capacity_bytes();
    let range = config.size.map_or(capacity, |s| s.min(capacity));
    let blocks = range / config.bs;
    if blocks == 0 {
        return Err(BenchError::RangeTooSmall {
            range,
            bs: config.bs,
        });
    }
    let buffers = buffers(socket, &fe, &config)?;
    info!(
        "bench: {} bs={} iodepth={} queues={} over {range} of {capacity} bytes, {} s after {} s warm-up",
        config.rw, config.bs, config.iodepth, config.queues, config.seconds, config.warmup
    );
    let outcomes = run_queues(&mut fe, &buffers, &config, blocks);
    let (total, queues) = totals(&config, outcomes)?;
    Ok(BenchResult {
        total,
        queues,
        capacity_bytes: capacity,
        range_bytes: range,
        config,
    })
}

/// A session with as many queues, of the size and with the guest memory,
/// as `config` needs; a read-only device is refused for a workload that
/// writes.
fn connect(socket: &Path, config: &BenchConfig) -> Result<BlkFrontend, BenchError> {
    let setup = |source| BenchError::Setup {
        socket: socket.to_path_buf(),
        source,
    };
    let mem_size = usize::try_from(config.mem_size()).map_err(|_| BenchError::TooMuchMemory {
        bytes: config.buffer_bytes(),
    })?;
    let fe = BlkFrontend::connect(
        socket,
        FrontendConfig {
            mem_size,
            num_queues: config.queues,
            queue_size: config.queue_size,
            timeout: STALL,
            ..FrontendConfig::default()
        },
    )
    .map_err(setup)?;
    let writes = !matches!(
        config.rw,
        Rw::RandRead | Rw::Read | Rw::Mix { read_percent: 100 }
    );
    if writes && fe.negotiated().has(vhost_user_driver::features::BLK_RO) {
        return Err(BenchError::ReadOnly(config.rw));
    }
    Ok(fe)
}

/// `iodepth` data buffers of one block for each queue, in the guest memory
/// of the session on `socket`.
fn buffers(
    socket: &Path,
    fe: &BlkFrontend,
    config: &BenchConfig,
) -> Result<Vec<Vec<Buffer>>, BenchError> {
    let buffer_len = usize::try_from(config.bs).map_err(|_| BenchError::BlockSize(config.bs))?;
    let mut buffers = Vec::with_capacity(usize::from(config.queues));
    for q in 0..config.queues {
        let bufs = (0..config.iodepth)
            .map(|i| {
                let b = fe.ram().alloc_aligned(buffer_len, 4096)?;
                // Something other than zeroes for the writes to carry.
                b.fill(0xa5 ^ q.to_le_bytes()[0] ^ i.to_le_bytes()[0])?;
                Ok(b)
            })
            .collect::<Result<Vec<_>, vhost_user_driver::Error>>()
            .map_err(|source| BenchError::Setup {
                socket: socket.to_path_buf(),
                source,
            })?;
        buffers.push(bufs);
    }
    Ok(buffers)
}

/// Drives every queue on a thread of its own, through the warm-up and the
/// measured seconds, each over its own slice of the `blocks`.
fn run_queues(
    fe: &mut BlkFrontend,
    buffers: &[Vec<Buffer>],
    config: &BenchConfig,
    blocks: u64,
) -> Vec<Result<QueueOutcome, BenchError>> {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(config.warmup);
    let end = measure_from + Duration::from_secs_f64(config.seconds);
    let nqueues = u64::from(config.queues);
    let bs = config.bs;
    std::thread::scope(|s| {
        let handles: Vec<_> = fe
            .queues_mut()
            .iter_mut()
            .zip(buffers)
            .map(|(q, bufs)| {
                let index = q.index();
                let work = Workload {
                    rw: config.rw,
                    rng: SplitMix64(
                        config.seed ^ u64::from(index).wrapping_mul(0x2545_f491_4f6c_dd1d),
                    ),
                    blocks,
                    cursor: blocks / nqueues * u64::from(index),
                    sectors_per_block: config.bs / Sector::SIZE,
                };
                let handle = s.spawn(move || drive(q, bufs, work, bs, measure_from, end));
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
fn totals(
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

/// The result as a table.
pub fn table(result: &BenchResult) -> String {
    let c = &result.config;
    let mut s = format!(
        "{} bs={} iodepth={} queues={}: {:.1} s over {} bytes\n\
         {:<6} {:>10} {:>9} {:>9} {:>9} {:>9}\n",
        c.rw,
        c.bs,
        c.iodepth,
        c.queues,
        result.total.secs,
        result.range_bytes,
        "queue",
        "IOPS",
        "MB/s",
        "p50 us",
        "p99 us",
        "p99.9 us"
    );
    for st in result.queues.iter().chain(std::iter::once(&result.total)) {
        let name = st
            .queue
            .map_or_else(|| "total".to_owned(), |q| q.to_string());
        s.push_str(&format!(
            "{name:<6} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
            st.iops, st.mbps, st.p50_us, st.p99_us, st.p999_us
        ));
    }
    s
}

/// `dmaprobe bench`: check the arguments, measure, print.
pub fn run(args: BenchArgs) -> Result<(), BenchError> {
    let socket = args.socket.clone();
    let json = args.json;
    let config = BenchConfig::try_from(args)?;
    let result = measure(&socket, &config)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&result).map_err(BenchError::Json)?
        );
    } else {
        print!("{}", table(&result));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn rw_parses_and_prints() {
        for s in [
            "randread",
            "randwrite",
            "read",
            "write",
            "mix:0",
            "mix:70",
            "mix:100",
        ] {
            assert_eq!(s.parse::<Rw>().unwrap().to_string(), s);
        }
        for s in ["mix:101", "mix:150", "mix:", "mix:-1", "rw", ""] {
            assert!(s.parse::<Rw>().is_err(), "{s}");
        }
    }

    #[test]
    fn config_limits() {
        let ok = BenchConfig::default();
        assert!(ok.clone().check().is_ok());
        let with = |f: fn(&mut BenchConfig)| {
            let mut c = BenchConfig::default();
            f(&mut c);
            c.check()
        };
        assert!(matches!(
            with(|c| c.bs = 1000),
            Err(BenchError::BlockSize(1000))
        ));
        assert!(matches!(with(|c| c.bs = 0), Err(BenchError::BlockSize(0))));
        assert!(matches!(
            with(|c| c.iodepth = 0),
            Err(BenchError::IoDepth { .. })
        ));
        assert!(with(|c| c.iodepth = 85).is_ok());
        assert!(matches!(
            with(|c| c.iodepth = 86),
            Err(BenchError::IoDepth { max: 85, .. })
        ));
        assert!(with(|c| c.queues = 0).is_err());
        assert!(with(|c| c.queue_size = 100).is_err());
        assert!(with(|c| c.seconds = 0.0).is_err());
        assert!(with(|c| c.warmup = -1.0).is_err());
        assert!(with(|c| c.seconds = f64::NAN).is_err());
        assert!(with(|c| c.size = Some(512)).is_err());
    }

    #[test]
    fn sequential_offsets_wrap() {
        let mut w = Workload {
            rw: Rw::Read,
            rng: SplitMix64(1),
            blocks: 3,
            cursor: 2,
            sectors_per_block: 8,
        };
        let sectors: Vec<u64> = (0..4).map(|_| w.next().1 .0).collect();
        assert_eq!(sectors, [16, 0, 8, 16]);
    }
}
