//! A vhost-user-blk frontend driver: the side QEMU normally plays.
//!
//! It drives any vhost-user-blk backend over its socket, for the protocol tests
//! (including deliberately malformed descriptor chains) and for `dmaprobe bench`.
//!
//! - `memory`: [`GuestRam`], the memfd-backed guest memory shared with the
//!   backend, and its buffer allocator ([`Buffer`]).
//! - `ring`: [`Queue`], the driver side of a split virtqueue written directly
//!   in guest memory: arbitrary descriptor chains in, used entries out, kick and
//!   call eventfds, EVENT_IDX.
//! - `blk`: virtio-blk on a [`Queue`]: well-formed request chains, status,
//!   config space ([`BlkConfig`]), blocking helpers and async submit.
//! - this file: [`BlkFrontend`], the vhost-user session: feature negotiation,
//!   memory table, vring setup, config space.
//!
//! Data flow: `BlkFrontend::connect` creates the guest memory and the queues and
//! hands the backend the memfd, the ring addresses and the eventfds. From then on
//! the control socket is idle; requests go through a [`Queue`] (guest memory plus
//! eventfds), so each queue can run on its own thread (`queues_mut`).
//!
//! ```no_run
//! use backend::frontend::{BlkFrontend, FrontendConfig, Sector};
//! # fn main() -> Result<(), backend::frontend::Error> {
//! let mut fe = BlkFrontend::connect("/tmp/blk.sock", FrontendConfig::default())?;
//! let status = fe.write(0, Sector(8), &[0xab; 4096])?;
//! let (status, data) = fe.read(0, Sector(8), 4096)?;
//! # Ok(()) }
//! ```

mod blk;
mod memory;
mod ring;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::{debug, info};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::GuestMemoryBackend;

pub use blk::{
    encode_header, id_string, request_type, BlkConfig, BlkRequest, DiscardRange, RequestType,
    Sector, Segment, Status, HEADER_SIZE, ID_BYTES,
};
pub use memory::{Buffer, GuestRam};
pub use ring::{
    link, write_table, ChainId, Completion, CompletionKind, Descriptor, Next, Queue, QueueStats,
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE,
};
pub use vm_memory::GuestAddress;

/// Virtio feature bits (as `u64` masks) the frontend knows by name.
pub mod features {
    use virtio_bindings::virtio_blk as blk;
    use virtio_bindings::virtio_config as config;
    use virtio_bindings::virtio_ring as ring;

    /// VIRTIO_BLK_F_SIZE_MAX.
    pub const BLK_SIZE_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SIZE_MAX;
    /// VIRTIO_BLK_F_SEG_MAX.
    pub const BLK_SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
    /// VIRTIO_BLK_F_GEOMETRY.
    pub const BLK_GEOMETRY: u64 = 1 << blk::VIRTIO_BLK_F_GEOMETRY;
    /// VIRTIO_BLK_F_RO.
    pub const BLK_RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
    /// VIRTIO_BLK_F_BLK_SIZE.
    pub const BLK_BLK_SIZE: u64 = 1 << blk::VIRTIO_BLK_F_BLK_SIZE;
    /// VIRTIO_BLK_F_FLUSH.
    pub const BLK_FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;
    /// VIRTIO_BLK_F_TOPOLOGY.
    pub const BLK_TOPOLOGY: u64 = 1 << blk::VIRTIO_BLK_F_TOPOLOGY;
    /// VIRTIO_BLK_F_CONFIG_WCE.
    pub const BLK_CONFIG_WCE: u64 = 1 << blk::VIRTIO_BLK_F_CONFIG_WCE;
    /// VIRTIO_BLK_F_MQ.
    pub const BLK_MQ: u64 = 1 << blk::VIRTIO_BLK_F_MQ;
    /// VIRTIO_BLK_F_DISCARD.
    pub const BLK_DISCARD: u64 = 1 << blk::VIRTIO_BLK_F_DISCARD;
    /// VIRTIO_BLK_F_WRITE_ZEROES.
    pub const BLK_WRITE_ZEROES: u64 = 1 << blk::VIRTIO_BLK_F_WRITE_ZEROES;
    /// VIRTIO_BLK_F_SECURE_ERASE.
    pub const BLK_SECURE_ERASE: u64 = 1 << blk::VIRTIO_BLK_F_SECURE_ERASE;
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub const RING_INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// VIRTIO_RING_F_EVENT_IDX.
    pub const RING_EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
    /// VHOST_USER_F_PROTOCOL_FEATURES (bit 30).
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// VIRTIO_F_VERSION_1.
    pub const VERSION_1: u64 = 1 << config::VIRTIO_F_VERSION_1;

    /// What [`super::FrontendConfig::default`] asks for besides VERSION_1,
    /// PROTOCOL_FEATURES and EVENT_IDX: the blk features the helpers understand,
    /// and indirect descriptors (for hand-built chains).
    pub const DEFAULT: u64 = BLK_SIZE_MAX
        | BLK_SEG_MAX
        | BLK_GEOMETRY
        | BLK_RO
        | BLK_BLK_SIZE
        | BLK_FLUSH
        | BLK_TOPOLOGY
        | BLK_CONFIG_WCE
        | BLK_MQ
        | BLK_DISCARD
        | BLK_WRITE_ZEROES
        | RING_INDIRECT_DESC;
}

/// Errors of the frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad parameter from the caller.
    #[error("Invalid frontend configuration: {0}")]
    InvalidConfig(&'static str),
    /// memfd creation or sizing failed.
    #[error("Cannot create guest memory file")]
    MemFd(#[source] std::io::Error),
    /// Mapping the memfd failed.
    #[error("Cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// A guest memory access fell outside guest memory.
    #[error("Guest memory access at {gpa:#x} (+{len}) failed")]
    GuestMemory {
        /// Guest-physical address.
        gpa: u64,
        /// Bytes accessed.
        len: usize,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The allocator has no room.
    #[error("Out of guest memory for a {len}-byte buffer")]
    OutOfMemory {
        /// Bytes asked for.
        len: usize,
    },
    /// A write past the end of a [`Buffer`].
    #[error("Write of {len} bytes at offset {offset} overflows a {size}-byte buffer")]
    BufferOverflow {
        /// Offset into the buffer.
        offset: usize,
        /// Bytes written.
        len: usize,
        /// Buffer size.
        size: usize,
    },
    /// A buffer too large for one descriptor.
    #[error("A {len}-byte buffer does not fit one descriptor")]
    TooLarge {
        /// Bytes.
        len: usize,
    },
    /// Eventfd creation, read, write or poll failed.
    #[error("Eventfd operation failed")]
    EventFd(#[source] std::io::Error),
    /// Connecting to the socket failed.
    #[error("Cannot connect to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// A vhost-user request failed or the reply was bad.
    #[error("vhost-user {request} failed")]
    Protocol {
        /// The request, e.g. "SET_MEM_TABLE".
        request: &'static str,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// The backend does not offer a feature the configuration requires.
    #[error("Backend does not offer {name}")]
    MissingFeature {
        /// Feature name.
        name: &'static str,
    },
    /// More queues asked for than the backend has.
    #[error("Backend has {offered} queues, {wanted} requested")]
    TooManyQueues {
        /// Queues the backend reports.
        offered: u64,
        /// Queues asked for.
        wanted: u16,
    },
    /// No queue with that index.
    #[error("No queue {0}")]
    NoSuchQueue(u16),
    /// Not enough free descriptors or avail ring entries.
    #[error("Queue {queue} is full: {needed} descriptors needed, {free} free")]
    QueueFull {
        /// Queue index.
        queue: u16,
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A chain with no descriptors.
    #[error("A chain needs at least one descriptor")]
    EmptyChain,
    /// `Next::Entry` names an entry outside the list.
    #[error("Descriptor {entry} points at entry {next}, outside the chain")]
    BadNextEntry {
        /// The descriptor.
        entry: usize,
        /// Its `Next::Entry`.
        next: usize,
    },
    /// A descriptor slot outside the table.
    #[error("Descriptor slot {slot} is outside a {size}-entry table")]
    BadSlot {
        /// The slot.
        slot: u16,
        /// Table size.
        size: u16,
    },
    /// The device moved `used.idx` by more than the queue size.
    #[error("Queue {queue}: used.idx jumped to {used_idx} from {last_used}")]
    UsedIndexJump {
        /// Queue index.
        queue: u16,
        /// The device's used.idx.
        used_idx: u16,
        /// Our last seen used.idx.
        last_used: u16,
    },
    /// Nothing completed in time.
    #[error("Queue {queue}: no completion within {waited:?}")]
    Timeout {
        /// Queue index.
        queue: u16,
        /// How long we waited.
        waited: Duration,
    },
}

/// What to set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendConfig {
    /// Guest memory size in bytes (rings and data buffers live here).
    pub mem_size: usize,
    /// Queues to set up (the backend must have at least this many).
    pub num_queues: u16,
    /// Entries per queue, a power of two.
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX (required of the backend when set).
    pub event_idx: bool,
    /// Virtio features wanted besides VERSION_1, PROTOCOL_FEATURES and
    /// EVENT_IDX; the negotiated set is this and what the backend offers.
    pub features: u64,
    /// Negotiate REPLY_ACK (when offered) and ask for an ack on every request,
    /// so a failing request shows up where it happened.
    pub reply_ack: bool,
    /// Negotiate CONFIGURE_MEM_SLOTS (required of the backend when set), so
    /// that regions can be added and removed after the memory table
    /// (`vhost().add_mem_region`, `remove_mem_region`), as a guest's memory
    /// hot-plug and unplug does.
    pub mem_slots: bool,
    /// Timeout of the blocking helpers.
    pub timeout: Duration,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            mem_size: 64 << 20,
            num_queues: 1,
            queue_size: 256,
            event_idx: true,
            features: features::DEFAULT,
            reply_ack: true,
            mem_slots: false,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Features and protocol features as negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Virtio features the backend offered.
    pub offered: u64,
    /// Virtio features acked (`SET_FEATURES`).
    pub acked: u64,
    /// Protocol features the backend offered.
    pub protocol_offered: VhostUserProtocolFeatures,
    /// Protocol features acked.
    pub protocol_acked: VhostUserProtocolFeatures,
    /// Queues the backend reports (`GET_QUEUE_NUM`; 1 without MQ).
    pub backend_queues: u64,
}

impl Negotiated {
    /// Whether every bit of `mask` was acked.
    pub fn has(&self, mask: u64) -> bool {
        self.acked & mask == mask
    }
}

/// A connected vhost-user-blk session with its guest memory and queues.
pub struct BlkFrontend {
    vu: Frontend,
    ram: GuestRam,
    queues: Vec<Queue>,
    negotiated: Negotiated,
    config: FrontendConfig,
    socket: PathBuf,
}

impl fmt::Debug for BlkFrontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlkFrontend")
            .field("socket", &self.socket)
            .field("negotiated", &self.negotiated)
            .field("ram", &self.ram)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

fn protocol(request: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Protocol { request, source }
}

impl BlkFrontend {
    /// Connects to `socket` and sets up a device as `config` asks: owner,
    /// features, protocol features, memory table, and every queue enabled.
    pub fn connect(socket: impl AsRef<Path>, config: FrontendConfig) -> Result<Self, Error> {
        let socket = socket.as_ref().to_path_buf();
        if config.num_queues == 0 {
            return Err(Error::InvalidConfig("num_queues must be at least 1"));
        }
        let ram = GuestRam::new(config.mem_size)?;
        let mut vu =
            Frontend::connect(&socket, u64::from(config.num_queues)).map_err(|source| {
                Error::Connect {
                    path: socket.clone(),
                    source,
                }
            })?;
        vu.set_owner().map_err(protocol("SET_OWNER"))?;

        let offered = vu.get_features().map_err(protocol("GET_FEATURES"))?;
        for (bit, name) in [
            (features::VERSION_1, "VIRTIO_F_VERSION_1"),
            (
                features::PROTOCOL_FEATURES,
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ),
        ] {
            if offered & bit == 0 {
                return Err(Error::MissingFeature { name });
            }
        }
        if config.event_idx && offered & features::RING_EVENT_IDX == 0 {
            return Err(Error::MissingFeature {
                name: "VIRTIO_RING_F_EVENT_IDX",
            });
        }
        if config.num_queues > 1 && offered & features::BLK_MQ == 0 {
            return Err(Error::MissingFeature {
                name: "VIRTIO_BLK_F_MQ",
            });
        }
        let mut wanted = (config.features & !features::RING_EVENT_IDX)
            | features::VERSION_1
            | features::PROTOCOL_FEATURES;
        if config.event_idx {
            wanted |= features::RING_EVENT_IDX;
        }
        let acked = wanted & offered;
        vu.set_features(acked).map_err(protocol("SET_FEATURES"))?;

        let protocol_offered = vu
            .get_protocol_features()
            .map_err(protocol("GET_PROTOCOL_FEATURES"))?;
        let mut protocol_wanted = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ;
        if config.reply_ack {
            protocol_wanted |= VhostUserProtocolFeatures::REPLY_ACK;
        }
        if config.mem_slots {
            if !protocol_offered.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
                return Err(Error::MissingFeature {
                    name: "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS",
                });
            }
            protocol_wanted |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        }
        let protocol_acked = protocol_offered & protocol_wanted;
        vu.set_protocol_features(protocol_acked)
            .map_err(protocol("SET_PROTOCOL_FEATURES"))?;
        if protocol_acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }

        let backend_queues = if protocol_acked.contains(VhostUserProtocolFeatures::MQ) {
            vu.get_queue_num().map_err(protocol("GET_QUEUE_NUM"))?
        } else {
            1
        };
        if backend_queues < u64::from(config.num_queues) {
            return Err(Error::TooManyQueues {
                offered: backend_queues,
                wanted: config.num_queues,
            });
        }

        let regions = ram
            .mem()
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region)
                    .map_err(protocol("SET_MEM_TABLE"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        vu.set_mem_table(&regions)
            .map_err(protocol("SET_MEM_TABLE"))?;

        let event_idx = acked & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(usize::from(config.num_queues));
        for index in 0..config.num_queues {
            let q = Queue::new(index, config.queue_size, &ram, event_idx, config.timeout)?;
            let i = usize::from(index);
            vu.set_vring_num(i, q.size())
                .map_err(protocol("SET_VRING_NUM"))?;
            vu.set_vring_base(i, 0)
                .map_err(protocol("SET_VRING_BASE"))?;
            vu.set_vring_addr(i, &q.vring_config()?)
                .map_err(protocol("SET_VRING_ADDR"))?;
            vu.set_vring_kick(i, q.kick_fd())
                .map_err(protocol("SET_VRING_KICK"))?;
            vu.set_vring_call(i, q.call_fd())
                .map_err(protocol("SET_VRING_CALL"))?;
            queues.push(q);
        }
        for i in 0..queues.len() {
            vu.set_vring_enable(i, true)
                .map_err(protocol("SET_VRING_ENABLE"))?;
        }

        let negotiated = Negotiated {
            offered,
            acked,
            protocol_offered,
            protocol_acked,
            backend_queues,
        };
        info!(
            "frontend connected to {}: features={acked:#x} protocol={:#x} queues={}",
            socket.display(),
            protocol_acked.bits(),
            queues.len()
        );
        debug!(
            "frontend offered features={offered:#x} protocol={:#x}",
            protocol_offered.bits()
        );
        Ok(BlkFrontend {
            vu,
            ram,
            queues,
            negotiated,
            config,
            socket,
        })
    }

    /// The negotiated features.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The configuration the session was set up with.
    pub fn config(&self) -> &FrontendConfig {
        &self.config
    }

    /// Guest memory (clone it to keep a handle).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The underlying vhost-user connection, for protocol tests that send their
    /// own messages.
    pub fn vhost(&mut self) -> &mut Frontend {
        &mut self.vu
    }

    /// Queue `index`.
    pub fn queue(&mut self, index: u16) -> Result<&mut Queue, Error> {
        self.queues
            .get_mut(usize::from(index))
            .ok_or(Error::NoSuchQueue(index))
    }

    /// All queues, e.g. to run each on its own scoped thread.
    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// `len` bytes of config space at `offset`, as the backend sends them.
    pub fn get_config_bytes(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, Error> {
        let buf = vec![0u8; usize::try_from(len).map_err(|_| Error::TooLarge { len: 0 })?];
        let (_, payload) = self
            .vu
            .get_config(offset, len, VhostUserConfigFlags::empty(), &buf)
            .map_err(protocol("GET_CONFIG"))?;
        Ok(payload)
    }

    /// Writes config space at `offset`, as a driver does (virtio-blk lets it
    /// write only the `writeback` byte).
    pub fn set_config_bytes(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Error> {
        self.vu
            .set_config(offset, VhostUserConfigFlags::WRITABLE, bytes)
            .map_err(protocol("SET_CONFIG"))
    }

    /// The virtio-blk config space (the first [`BlkConfig::SIZE`] bytes),
    /// parsed.
    pub fn get_config(&mut self) -> Result<BlkConfig, Error> {
        let len = u32::try_from(BlkConfig::SIZE).map_err(|_| Error::TooLarge { len: 0 })?;
        Ok(BlkConfig::parse(&self.get_config_bytes(0, len)?))
    }

    /// Stops queue `index` (`GET_VRING_BASE`) and returns the backend's next
    /// avail index. The queue is unusable afterwards.
    pub fn stop_queue(&mut self, index: u16) -> Result<u32, Error> {
        self.queue(index)?;
        self.vu
            .get_vring_base(usize::from(index))
            .map_err(protocol("GET_VRING_BASE"))
    }

    /// Reads `len` bytes at `sector` on `queue` (blocking; see [`Queue::read`]).
    pub fn read(
        &mut self,
        queue: u16,
        sector: Sector,
        len: usize,
    ) -> Result<(Status, Vec<u8>), Error> {
        self.queue(queue)?.read(sector, len)
    }

    /// Writes `data` at `sector` on `queue` (blocking).
    pub fn write(&mut self, queue: u16, sector: Sector, data: &[u8]) -> Result<Status, Error> {
        self.queue(queue)?.write(sector, data)
    }

    /// Flushes on `queue` (blocking).
    pub fn flush(&mut self, queue: u16) -> Result<Status, Error> {
        self.queue(queue)?.flush()
    }

    /// GET_ID on `queue` (blocking): the raw 20 bytes.
    pub fn get_id(&mut self, queue: u16) -> Result<(Status, Vec<u8>), Error> {
        self.queue(queue)?.get_id()
    }

    /// Discards `ranges` on `queue` (blocking).
    pub fn discard(&mut self, queue: u16, ranges: &[DiscardRange]) -> Result<Status, Error> {
        self.queue(queue)?.discard(ranges)
    }

    /// Writes zeroes over `ranges` on `queue` (blocking).
    pub fn write_zeroes(&mut self, queue: u16, ranges: &[DiscardRange]) -> Result<Status, Error> {
        self.queue(queue)?.write_zeroes(ranges)
    }
}
