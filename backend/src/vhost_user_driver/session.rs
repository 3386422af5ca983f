//! [`BlkFrontend`], the vhost-user session: feature negotiation, memory
//! table, vring setup, config space; and the blocking request helpers that
//! run on one of its queues.

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

use super::blk::{BlkConfig, DiscardRange, Sector};
use super::error::Error;
use super::features;
use super::memory::GuestRam;
use super::ring::Queue;
use super::status::StatusByte;

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

/// GET_FEATURES, the features `config` requires checked, SET_FEATURES with
/// those wanted that the backend offers; returns (offered, acked).
fn negotiate_features(vu: &mut Frontend, config: &FrontendConfig) -> Result<(u64, u64), Error> {
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
    Ok((offered, acked))
}

/// GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES with CONFIG, MQ and what
/// `config` asks for (REPLY_ACK, then asked on every request;
/// CONFIGURE_MEM_SLOTS, required); returns (offered, acked).
fn negotiate_protocol_features(
    vu: &mut Frontend,
    config: &FrontendConfig,
) -> Result<(VhostUserProtocolFeatures, VhostUserProtocolFeatures), Error> {
    let offered = vu
        .get_protocol_features()
        .map_err(protocol("GET_PROTOCOL_FEATURES"))?;
    let mut wanted = VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ;
    if config.reply_ack {
        wanted |= VhostUserProtocolFeatures::REPLY_ACK;
    }
    if config.mem_slots {
        if !offered.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            return Err(Error::MissingFeature {
                name: "VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS",
            });
        }
        wanted |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    }
    let acked = offered & wanted;
    vu.set_protocol_features(acked)
        .map_err(protocol("SET_PROTOCOL_FEATURES"))?;
    if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    Ok((offered, acked))
}

/// The backend's queue count (GET_QUEUE_NUM with MQ, else 1), at least
/// `wanted`.
fn backend_queues(
    vu: &mut Frontend,
    protocol_acked: VhostUserProtocolFeatures,
    wanted: u16,
) -> Result<u64, Error> {
    let offered = if protocol_acked.contains(VhostUserProtocolFeatures::MQ) {
        vu.get_queue_num().map_err(protocol("GET_QUEUE_NUM"))?
    } else {
        1
    };
    if offered < u64::from(wanted) {
        return Err(Error::TooManyQueues { offered, wanted });
    }
    Ok(offered)
}

/// SET_MEM_TABLE: every region of `ram`.
fn set_mem_table(vu: &mut Frontend, ram: &GuestRam) -> Result<(), Error> {
    let regions = ram
        .mem()
        .iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(protocol("SET_MEM_TABLE"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    vu.set_mem_table(&regions)
        .map_err(protocol("SET_MEM_TABLE"))?;
    Ok(())
}

/// Each queue made in `ram` and handed to the backend (size, base,
/// addresses, kick and call eventfds), then every queue enabled.
fn set_up_queues(
    vu: &mut Frontend,
    ram: &GuestRam,
    config: &FrontendConfig,
    event_idx: bool,
) -> Result<Vec<Queue>, Error> {
    let mut queues = Vec::with_capacity(usize::from(config.num_queues));
    for index in 0..config.num_queues {
        let q = Queue::new(index, config.queue_size, ram, event_idx, config.timeout)?;
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
    Ok(queues)
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
        let (offered, acked) = negotiate_features(&mut vu, &config)?;
        let (protocol_offered, protocol_acked) = negotiate_protocol_features(&mut vu, &config)?;
        let backend_queues = backend_queues(&mut vu, protocol_acked, config.num_queues)?;
        set_mem_table(&mut vu, &ram)?;
        let event_idx = acked & features::RING_EVENT_IDX != 0;
        let queues = set_up_queues(&mut vu, &ram, &config, event_idx)?;
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
    ) -> Result<(StatusByte, Vec<u8>), Error> {
        self.queue(queue)?.read(sector, len)
    }

    /// Writes `data` at `sector` on `queue` (blocking).
    pub fn write(&mut self, queue: u16, sector: Sector, data: &[u8]) -> Result<StatusByte, Error> {
        self.queue(queue)?.write(sector, data)
    }

    /// Flushes on `queue` (blocking).
    pub fn flush(&mut self, queue: u16) -> Result<StatusByte, Error> {
        self.queue(queue)?.flush()
    }

    /// GET_ID on `queue` (blocking): the raw 20 bytes.
    pub fn get_id(&mut self, queue: u16) -> Result<(StatusByte, Vec<u8>), Error> {
        self.queue(queue)?.get_id()
    }

    /// Discards `ranges` on `queue` (blocking).
    pub fn discard(&mut self, queue: u16, ranges: &[DiscardRange]) -> Result<StatusByte, Error> {
        self.queue(queue)?.discard(ranges)
    }

    /// Writes zeroes over `ranges` on `queue` (blocking).
    pub fn write_zeroes(
        &mut self,
        queue: u16,
        ranges: &[DiscardRange],
    ) -> Result<StatusByte, Error> {
        self.queue(queue)?.write_zeroes(ranges)
    }
}
