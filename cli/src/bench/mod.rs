//! `dmaprobe bench`: a load generator for any vhost-user-blk backend, and
//! with `--nvme` for an NVMe controller behind a vfio-user socket
//! (`dmaprobe serve --nvme`).
//!
//! [`BenchArgs`] (the command line) becomes a checked [`BenchConfig`];
//! [`measure`] sets up the device with a queue per worker and a data buffer
//! per request in flight, then runs the load loop ([`load`]) on them: one
//! thread per queue that keeps `iodepth` requests in flight for a warm-up
//! and then for the measured time, and records each request's latency
//! (submit to completion) in a log-linear [`Histogram`]. [`run`] prints the
//! [`BenchResult`] as a table or as one JSON object.
//!
//! - [`load`]: the loop, the workload, the histogram and the figures, for
//!   any device that implements [`load::LoadQueue`] (submit, kick, wait).
//! - `vhost_user.rs`: the vhost-user-blk frontend's queues
//!   ([`backend::vhost_user_driver`]).
//! - `nvme.rs`: the NVMe host's: one vfio-user connection, an I/O queue pair
//!   per thread, all ringing doorbells over that one socket
//!   ([`backend::nvme_driver`]).
//!
//! MB/s are 10^6 bytes per second; latencies are in µs, to about 1%.

pub mod load;
mod nvme;
mod vhost_user;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use log::info;
use serde::{Serialize, Serializer};

use backend::config::{self, ConfigError};
use backend::nvme_driver::{self, NotVfioUser};
use backend::vhost_user_driver::{self, Sector};

pub use load::{buffer_data, Histogram, Stats};

/// Descriptors one virtio-blk request takes: header, data, status.
const DESCRIPTORS_PER_REQUEST: u16 = 3;
/// The largest block size accepted.
const MAX_BS: u64 = 4 << 20;
/// The most guest memory the data buffers may take.
const MAX_BUFFER_BYTES: u64 = 4 << 30;
/// The longest run accepted, in seconds (warm-up and measurement each).
const MAX_SECONDS: f64 = 86_400.0;
/// How long one request may take before the run is declared stuck.
const STALL: Duration = Duration::from_secs(30);

/// Arguments of `dmaprobe bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The socket to connect to: a vhost-user-blk backend's, or with --nvme
    /// a vfio-user NVMe controller's.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Act as a vfio-user client and NVMe host driver instead of a
    /// vhost-user frontend, against `dmaprobe serve --nvme`: guest memory
    /// from a memfd, the admin queues and an I/O queue pair per --queues
    /// (each with its MSI-X eventfd), PRP lists for transfers over two
    /// pages. All queues share the one vfio-user connection, and each
    /// doorbell register write is a message over it.
    #[arg(long)]
    pub nvme: bool,
    /// With --nvme, how the host tells the controller of new commands and
    /// consumed completions: `shadow` (the default) as Linux's nvme driver
    /// does when the controller offers Doorbell Buffer Config: doorbells in
    /// host memory, a register write only when the controller's EventIdx
    /// asks (every doorbell a register write if it is not offered);
    /// `registers`: every doorbell a register write.
    #[arg(long, value_name = "HOW", value_enum)]
    pub doorbells: Option<Doorbells>,
    /// The workload: randread, randwrite, read, write (sequential), or
    /// mix:N (random, N% reads).
    #[arg(long, value_name = "RW", default_value = "randread")]
    pub rw: String,
    /// Bytes per request, a multiple of 512 (e.g. 4k, 64k, 1M; with --nvme a
    /// multiple of the namespace's block size, at most the controller's
    /// largest transfer).
    #[arg(long, value_name = "SIZE", default_value = "4k")]
    pub bs: String,
    /// Requests kept in flight on each queue.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub iodepth: u16,
    /// Queues to load, one thread each (the backend must have that many).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Entries per queue (a power of two, at most what the backend
    /// accepts): virtqueue descriptors, 3 per request; with --nvme,
    /// submission and completion queue entries, one fewer in flight.
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
    /// Seed of the random offsets, the read/write choice of mix:N and the
    /// data the writes carry.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// How an NVMe host rings its I/O queues' doorbells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Doorbells {
    /// Shadow doorbells when the controller offers them.
    #[default]
    Shadow,
    /// Every doorbell a register write.
    Registers,
}

/// How the load reaches the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchTransport {
    /// A vhost-user-blk frontend: virtqueues in shared memory, kicks and
    /// calls through eventfds.
    #[default]
    VhostUser,
    /// A vfio-user client and NVMe host driver: queue pairs in shared
    /// memory, doorbells as messages on the socket, MSI-X eventfds.
    Nvme,
}

impl fmt::Display for BenchTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BenchTransport::VhostUser => "vhost-user-blk",
            BenchTransport::Nvme => "nvme",
        })
    }
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
    /// How the load reaches the device.
    pub transport: BenchTransport,
    /// The workload.
    pub rw: Rw,
    /// Bytes per request: a multiple of 512, at most 4 MiB.
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: u16,
    /// Queues, one thread each.
    pub queues: u16,
    /// Descriptors per virtqueue, or entries per NVMe queue.
    pub queue_size: u16,
    /// Seconds measured.
    pub seconds: f64,
    /// Seconds of warm-up.
    pub warmup: f64,
    /// Bytes of the disk to use at most (`None`: all of it).
    pub size: Option<u64>,
    /// Seed of the offsets, of mix:N's choices and of the data written.
    pub seed: u64,
    /// With NVMe, how the doorbells are rung.
    pub doorbells: Doorbells,
}

impl Default for BenchConfig {
    /// What `dmaprobe bench` does without options.
    fn default() -> Self {
        BenchConfig {
            transport: BenchTransport::VhostUser,
            rw: Rw::RandRead,
            bs: 4096,
            iodepth: 32,
            queues: 1,
            queue_size: 256,
            seconds: 10.0,
            warmup: 1.0,
            size: None,
            seed: 1,
            doorbells: Doorbells::Shadow,
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
        let (max_depth, why) = match self.transport {
            BenchTransport::VhostUser => (
                self.queue_size / DESCRIPTORS_PER_REQUEST,
                "3 descriptors per request",
            ),
            BenchTransport::Nvme => (self.queue_size - 1, "a queue holds one entry fewer"),
        };
        if self.iodepth == 0 || self.iodepth > max_depth {
            return Err(BenchError::IoDepth {
                iodepth: self.iodepth,
                queue_size: self.queue_size,
                max: max_depth,
                why,
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

    /// Whether the workload writes.
    fn writes(&self) -> bool {
        !matches!(
            self.rw,
            Rw::RandRead | Rw::Read | Rw::Mix { read_percent: 100 }
        )
    }

    /// The bytes of a disk of `capacity` the offsets are drawn from: all of
    /// it, or --size of it; at least one block.
    fn range(&self, capacity: u64) -> Result<u64, BenchError> {
        let range = self.size.map_or(capacity, |s| s.min(capacity));
        if range < self.bs {
            return Err(BenchError::RangeTooSmall { range, bs: self.bs });
        }
        Ok(range)
    }

    /// Says at start what is about to run.
    fn announce(&self, range: u64, capacity: u64) {
        info!(
            "bench: {} over {}: bs={} iodepth={} queues={} over {range} of {capacity} bytes, {} s after {} s warm-up",
            self.rw, self.transport, self.bs, self.iodepth, self.queues, self.seconds, self.warmup
        );
    }
}

impl TryFrom<BenchArgs> for BenchConfig {
    type Error = BenchError;

    fn try_from(a: BenchArgs) -> Result<Self, Self::Error> {
        let size = |what: &'static str, text: &str| {
            config::parse_size(text).map_err(|source| BenchError::Size { what, source })
        };
        if a.doorbells.is_some() && !a.nvme {
            return Err(BenchError::NvmeOnly("--doorbells"));
        }
        BenchConfig {
            transport: if a.nvme {
                BenchTransport::Nvme
            } else {
                BenchTransport::VhostUser
            },
            rw: a.rw.parse()?,
            bs: size("--bs", &a.bs)?,
            iodepth: a.iodepth,
            queues: a.queues,
            queue_size: a.queue_size,
            seconds: a.seconds,
            warmup: a.warmup,
            size: a.size.as_deref().map(|s| size("--size", s)).transpose()?,
            seed: a.seed,
            doorbells: a.doorbells.unwrap_or_default(),
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
         {queue_size} ({why}; raise --queue-size for more)"
    )]
    IoDepth {
        /// Asked for.
        iodepth: u16,
        /// Entries per queue.
        queue_size: u16,
        /// The most that fit.
        max: u16,
        /// Why that many.
        why: &'static str,
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
        source: DeviceError,
    },
    /// --nvme, and no vfio-user server answers at the socket.
    #[error(
        "{} does not answer as a vfio-user NVMe controller (for a vhost-user-blk backend, \
         leave out --nvme)",
        socket.display()
    )]
    NotNvme {
        /// The socket.
        socket: PathBuf,
        /// What answered instead.
        #[source]
        why: NotVfioUser,
    },
    /// An option of the NVMe host without --nvme.
    #[error("{0} is for an NVMe controller: add --nvme, or leave it out")]
    NvmeOnly(&'static str),
    /// The backend cannot take writes.
    #[error("The device is read-only and the workload {0} writes")]
    ReadOnly(Rw),
    /// The controller's queues are smaller than --queue-size.
    #[error(
        "--queue-size {size} is more than the controller's queues hold ({max} entries, CAP.MQES)"
    )]
    QueueTooLarge {
        /// Asked for.
        size: u16,
        /// The most the controller takes.
        max: u32,
    },
    /// The controller grants fewer I/O queue pairs than --queues.
    #[error("The controller grants {granted} I/O queue pairs, fewer than --queues {asked}")]
    TooFewQueues {
        /// Asked for.
        asked: u16,
        /// Granted.
        granted: u32,
    },
    /// A block is more than one command may move.
    #[error("Block size {bs} is more than the controller's largest transfer, {max} bytes (MDTS)")]
    TransferTooLarge {
        /// Block size.
        bs: u64,
        /// MDTS in bytes.
        max: u64,
    },
    /// A block is not a whole number of the namespace's blocks.
    #[error("Block size {bs} is not a multiple of the namespace's {lba}-byte blocks")]
    LbaMismatch {
        /// Block size.
        bs: u64,
        /// The namespace's block size.
        lba: u64,
    },
    /// Submitting or waiting on a queue failed.
    #[error("Queue {queue} failed")]
    Queue {
        /// Queue index.
        queue: u16,
        /// The cause.
        #[source]
        source: DeviceError,
    },
    /// Nothing completed on a queue with requests in flight.
    #[error("q={queue}: nothing completed within {waited:?}")]
    Stalled {
        /// Queue index.
        queue: u16,
        /// How long.
        waited: Duration,
    },
    /// The device completed a request not in flight.
    #[error("q={queue}: a completion of slot {slot}, which holds no request in flight")]
    UnknownCompletion {
        /// Queue index.
        queue: u16,
        /// The slot the completion names.
        slot: usize,
    },
    /// A queue gave a new request the slot of one still in flight.
    #[error("q={queue}: slot {slot} given to a request while another holds it")]
    SlotInUse {
        /// Queue index.
        queue: u16,
        /// The slot.
        slot: usize,
    },
    /// A request completed with a status other than OK.
    #[error("q={queue} op={op} offset={offset} len={len} completed with status {status}")]
    Request {
        /// Queue index.
        queue: u16,
        /// "read" or "write".
        op: &'static str,
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The status the device wrote, in its own words.
        status: String,
    },
    /// A worker thread panicked.
    #[error("The worker of queue {0} panicked")]
    Panicked(u16),
    /// Writing the JSON result failed.
    #[error("Cannot encode the result as JSON")]
    Json(#[source] serde_json::Error),
}

/// What went wrong in the driver of a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    VhostUser(#[from] vhost_user_driver::Error),
    #[error(transparent)]
    Nvme(#[from] nvme_driver::Error),
}

/// What a device's load gave, before the figures are made of it.
#[derive(Debug)]
struct Measured {
    /// Each queue's outcome, in order.
    outcomes: Vec<Result<load::QueueOutcome, BenchError>>,
    /// The disk's bytes.
    capacity: u64,
    /// The bytes the offsets were drawn from.
    range: u64,
}

impl Measured {
    /// Says what loads what, then runs `config`'s workload on `queues` over
    /// the first `range` bytes of a disk of `capacity`.
    fn load<Q: load::LoadQueue + Send>(
        queues: Vec<Q>,
        config: &BenchConfig,
        range: u64,
        capacity: u64,
    ) -> Measured {
        config.announce(range, capacity);
        Measured {
            outcomes: load::run_queues(queues, config, range / config.bs, STALL),
            capacity,
            range,
        }
    }
}

/// Connects to `socket` as `config.transport` says, runs `config`'s
/// workload, and returns what it measured. A request that completes with a
/// status other than OK stops the run with its details.
pub fn measure(socket: &Path, config: &BenchConfig) -> Result<BenchResult, BenchError> {
    let config = config.clone().check()?;
    let measured = match config.transport {
        BenchTransport::VhostUser => vhost_user::measure(socket, &config)?,
        BenchTransport::Nvme => nvme::measure(socket, &config)?,
    };
    let (total, queues) = load::totals(&config, measured.outcomes)?;
    Ok(BenchResult {
        total,
        queues,
        capacity_bytes: measured.capacity,
        range_bytes: measured.range,
        config,
    })
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

/// The result as a table.
pub fn table(result: &BenchResult) -> String {
    let c = &result.config;
    let mut s = format!(
        "{} over {} bs={} iodepth={} queues={}: {:.1} s over {} bytes\n\
         {:<6} {:>10} {:>9} {:>9} {:>9} {:>9}\n",
        c.rw,
        c.transport,
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
    fn an_nvme_queue_holds_one_request_fewer_than_its_size() {
        let nvme = |iodepth, queue_size| {
            BenchConfig {
                transport: BenchTransport::Nvme,
                iodepth,
                queue_size,
                ..BenchConfig::default()
            }
            .check()
        };
        assert!(nvme(255, 256).is_ok());
        let e = nvme(256, 256).unwrap_err();
        assert!(matches!(e, BenchError::IoDepth { max: 255, .. }), "{e:?}");
        assert!(e.to_string().contains("one entry fewer"), "{e}");
        assert!(nvme(1, 2).is_ok());
    }

    #[test]
    fn the_range_is_the_disk_or_size_of_it() {
        let c = BenchConfig {
            size: Some(1 << 20),
            ..BenchConfig::default()
        };
        assert_eq!(c.range(64 << 20).unwrap(), 1 << 20);
        assert_eq!(c.range(8192).unwrap(), 8192);
        assert!(matches!(
            c.range(2048),
            Err(BenchError::RangeTooSmall { range: 2048, .. })
        ));
        assert!(!BenchConfig::default().writes());
        let mix = BenchConfig {
            rw: Rw::Mix { read_percent: 99 },
            ..BenchConfig::default()
        };
        assert!(mix.writes());
    }
}
