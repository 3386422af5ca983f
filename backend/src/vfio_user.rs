//! The vfio-user transport of the NVMe front-end: one PCI function served to
//! QEMU's `-device vfio-user-pci` (QEMU ≥ 10.1) on a UNIX socket, with the
//! `vfio_user` crate's [`Server`].
//!
//! The function behind it ([`PciFunction`], the NVMe controller) sees only BAR0
//! accesses, guest memory and interrupts. Around it this module plays the PCI
//! device:
//!
//! - **Config space** ([`ConfigSpace`]): class code 01 08 02 (NVM Express), a
//!   64-bit memory BAR0 of the function's size, an MSI-X capability whose table
//!   and PBA live in a 64-bit BAR4, BAR sizing and the command register as a
//!   device answers them. QEMU's vfio-pci emulates the MSI-X table itself and
//!   hands one eventfd per vector through SET_IRQS; it forwards PBA reads here.
//! - **BAR0** accesses go to the function unchanged.
//! - **Guest memory** arrives by fd in DMA_MAP (memory-backend-memfd, share=on):
//!   each window is mapped shared at its IOVA, which is the guest-physical
//!   address for vfio-user-pci without a vIOMMU, into one [`GuestMemoryAtomic`]
//!   the function gets at attach and that is republished on every map and unmap
//!   ([`DmaMemory`]). A window must lie inside its file, and the file must not
//!   shrink under it ([`shrink_seal`]).
//! - **Interrupts** ([`Msix`], the function's [`Interrupts`]): `signal(v)` writes
//!   vector v's eventfd; a vector with no eventfd drops the interrupt, a masked
//!   one sets its pending bit; each is counted.
//!
//! Trust: the guest is untrusted; the frontend (QEMU, which owns guest memory)
//! is trusted as the VMM is. A device access past the end of a mapped file is a
//! SIGBUS in the daemon, so a memfd must be sealed with F_SEAL_SHRINK (QEMU's
//! memory-backend-memfd seal=on, the default) or its window is refused. A file
//! the kernel cannot seal (memory-backend-file on tmpfs or hugetlbfs) is taken
//! with a warning: a frontend that truncates it can still kill the daemon.
//!
//! A message flows: `Server::run` (the crate: framing, VERSION, DEVICE_GET_INFO,
//! region and IRQ info) → [`Transport`] (this module's `ServerBackend`: bounds,
//! config space, DMA windows, SET_IRQS, reset) → the function. Whatever a client
//! gets wrong is an error reply, a counter and a rate-limited log line; a
//! connection ends with the function reset and its memory unmapped, and the
//! server listens for the next one.
//!
//! Limits of vfio_user 0.1.7 this module works around or lives with (see
//! [`VfioUserServer::serve_connection`]):
//! - It panics on a VERSION message whose JSON is not NUL-terminated or whose
//!   size is smaller than the header: the connection is caught and dropped.
//! - A refused request with a payload it did not read (REGION_WRITE to a region
//!   index past the last, an unknown command with data) leaves the rest of the
//!   payload in the stream, which it then parses as messages: that connection is
//!   garbage until the client closes it.
//! - Error replies carry errno 0 unless the crate itself found the input
//!   invalid (EINVAL); the crate logs every refused request at error level.
//! - No DMA_READ/DMA_WRITE: a window without an fd is accepted (QEMU maps ROMs
//!   that way) but unreachable, and counted.
//! - Its `DmaUnmapFlags` names differ from the protocol's bits; the bits are read
//!   as QEMU sends them (1: dirty bitmap, 2: unmap all).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{debug, info, warn};
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR4_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS, VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

use crate::counters::{bump, RateLimit};
use crate::serve::{bind_socket, SocketError, SocketFile};

/// The guest memory the function reads and writes.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The PCI function behind the transport: BAR0 accesses, guest memory, interrupts.
pub trait PciFunction: Send + Sync {
    fn bar0_size(&self) -> u64;
    fn bar0_read(&self, offset: u64, data: &mut [u8]);
    fn bar0_write(&self, offset: u64, data: &[u8]);
    /// Called once, before the first client: `mem` is updated in place on every
    /// DMA map and unmap and emptied when a client leaves (after [`reset`]).
    ///
    /// [`reset`]: PciFunction::reset
    fn attach(&self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>, irqs: Arc<dyn Interrupts>);
    /// A function-level reset: on the client's DEVICE_RESET and when it leaves.
    fn reset(&self);
}

/// The function's MSI-X vectors.
pub trait Interrupts: Send + Sync {
    fn signal(&self, vector: u16);
}

/// The IDs the function presents in config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    pub revision: u8,
}

impl PciIds {
    /// dmaprobe's own IDs. dmaprobe owns no PCI-SIG vendor ID, and any assigned
    /// one (Intel's, Red Hat's 1b36 that QEMU's nvme uses) would claim another
    /// company's hardware, and could pull in the quirks Linux keys on it. Vendor
    /// 0x0000 is assigned to nobody: it is not in the PCI ID Repository, Linux
    /// only treats the whole dword 0 (vendor and device both 0) as an empty slot,
    /// and its nvme driver binds by class code, so a vendor-0 function with a
    /// non-zero device ID probes as a plain NVMe controller. The device ID
    /// belongs to the vendor's space, so 0x0001 claims nothing either.
    /// Override with [`VfioUserOptions::ids`] (e.g. to compare with QEMU's
    /// 1b36:0010).
    pub const DMAPROBE: PciIds = PciIds {
        vendor: 0x0000,
        device: 0x0001,
        subsystem_vendor: 0x0000,
        subsystem: 0x0001,
        revision: 0,
    };
}

/// How the transport presents the function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfioUserOptions {
    pub ids: PciIds,
    /// MSI-X table size, 1–2048. Linux's nvme driver wants one per I/O queue it
    /// makes (one per CPU) plus the admin queue's, and shares them otherwise.
    pub msix_vectors: u16,
}

impl Default for VfioUserOptions {
    fn default() -> Self {
        VfioUserOptions {
            ids: PciIds::DMAPROBE,
            msix_vectors: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    #[error("MSI-X vectors must be 1 to {MAX_VECTORS}, not {0}")]
    Vectors(u16),
    #[error("The function's BAR0 size {0:#x} is zero or too large")]
    Bar0Size(u64),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("Cannot accept a vfio-user connection")]
    Accept(#[source] io::Error),
}

/// What the transport did and refused since it started, for every connection.
#[derive(Debug, Default)]
pub struct VfioUserStats {
    /// Connections that ended (the client closed, vanished, or was dropped).
    pub connections: AtomicU64,
    /// Connections dropped because the vfio_user crate panicked on a message.
    pub broken_connections: AtomicU64,
    /// Requests answered with an error by this module.
    pub refused: AtomicU64,
    pub dma_maps: AtomicU64,
    pub dma_unmaps: AtomicU64,
    /// DMA windows accepted but unreachable: no fd (the client would need
    /// DMA_READ/WRITE) or read-only.
    pub dma_unreachable: AtomicU64,
    /// DMA windows mapped from a file that cannot be sealed against
    /// shrinking: the frontend is trusted not to truncate it.
    pub dma_unsealed: AtomicU64,
    /// Vectors given an eventfd by SET_IRQS.
    pub eventfds_set: AtomicU64,
    pub irqs_delivered: AtomicU64,
    /// Interrupts dropped: the vector has no eventfd (or does not exist).
    pub irqs_dropped: AtomicU64,
    /// Interrupts held as pending on a masked vector.
    pub irqs_masked: AtomicU64,
    /// Eventfd writes that failed (not an eventfd, closed).
    pub irqs_failed: AtomicU64,
    pub resets: AtomicU64,
}

/// [`VfioUserStats`] at one moment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VfioUserStatsSnapshot {
    pub connections: u64,
    pub broken_connections: u64,
    pub refused: u64,
    pub dma_maps: u64,
    pub dma_unmaps: u64,
    pub dma_unreachable: u64,
    pub dma_unsealed: u64,
    pub eventfds_set: u64,
    pub irqs_delivered: u64,
    pub irqs_dropped: u64,
    pub irqs_masked: u64,
    pub irqs_failed: u64,
    pub resets: u64,
}

impl VfioUserStats {
    pub fn snapshot(&self) -> VfioUserStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VfioUserStatsSnapshot {
            connections: get(&self.connections),
            broken_connections: get(&self.broken_connections),
            refused: get(&self.refused),
            dma_maps: get(&self.dma_maps),
            dma_unmaps: get(&self.dma_unmaps),
            dma_unreachable: get(&self.dma_unreachable),
            dma_unsealed: get(&self.dma_unsealed),
            eventfds_set: get(&self.eventfds_set),
            irqs_delivered: get(&self.irqs_delivered),
            irqs_dropped: get(&self.irqs_dropped),
            irqs_masked: get(&self.irqs_masked),
            irqs_failed: get(&self.irqs_failed),
            resets: get(&self.resets),
        }
    }
}

/// Serves one [`PciFunction`] on a vfio-user socket, one client at a time.
pub struct VfioUserServer {
    server: Server,
    transport: Transport,
    socket: PathBuf,
    /// The socket [`VfioUserServer::new`] bound, removed with the server.
    _socket_file: Option<SocketFile>,
}

impl std::fmt::Debug for VfioUserServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserServer")
            .field("socket", &self.socket)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl VfioUserServer {
    /// Listens on `socket` (mode 0600; a stale socket there is replaced,
    /// anything else refused) and attaches the function to the (still empty)
    /// guest memory and the MSI-X vectors. The socket goes with the server.
    pub fn new(
        socket: &Path,
        function: Arc<dyn PciFunction>,
        options: VfioUserOptions,
    ) -> Result<VfioUserServer, VfioUserError> {
        check_options(function.as_ref(), &options)?;
        let (listener, file) = bind_socket(socket)?;
        Self::serve_on(listener, socket, Some(file), function, options)
    }

    /// Serves on `listener`, bound at `socket` by the caller, who removes it.
    pub fn with_listener(
        listener: UnixListener,
        socket: &Path,
        function: Arc<dyn PciFunction>,
        options: VfioUserOptions,
    ) -> Result<VfioUserServer, VfioUserError> {
        Self::serve_on(listener, socket, None, function, options)
    }

    fn serve_on(
        listener: UnixListener,
        socket: &Path,
        socket_file: Option<SocketFile>,
        function: Arc<dyn PciFunction>,
        options: VfioUserOptions,
    ) -> Result<VfioUserServer, VfioUserError> {
        let (bar0_size, function_bar0) = check_options(function.as_ref(), &options)?;
        let layout = MsixLayout::new(options.msix_vectors);

        let region_size = |index| match index {
            VFIO_PCI_BAR0_REGION_INDEX => bar0_size,
            VFIO_PCI_BAR4_REGION_INDEX => layout.bar_size,
            VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE as u64,
            _ => 0,
        };
        let regions = (0..VFIO_PCI_NUM_REGIONS)
            .map(|index| {
                let size = region_size(index);
                ServerRegion {
                    region_info: vfio_region_info {
                        argsz: std::mem::size_of::<vfio_region_info>() as u32,
                        flags: if size == 0 {
                            0
                        } else {
                            VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
                        },
                        index,
                        cap_offset: 0,
                        size,
                        offset: 0,
                    },
                    sparse_areas: Vec::new(),
                    mmap_fd: None,
                }
            })
            .collect();
        // The crate looks IRQ infos up by position: one per index, in order.
        let irqs = (0..VFIO_PCI_NUM_IRQS)
            .map(|index| {
                let (flags, count) = match index {
                    // No INTx (interrupt pin 0) and no MSI capability.
                    VFIO_PCI_INTX_IRQ_INDEX | VFIO_PCI_MSI_IRQ_INDEX => (0, 0),
                    VFIO_PCI_MSIX_IRQ_INDEX => {
                        (VFIO_IRQ_INFO_EVENTFD, u32::from(options.msix_vectors))
                    }
                    // Accepted and never fired; offering them spares QEMU's
                    // "Could not enable error recovery" warning.
                    _ => (VFIO_IRQ_INFO_EVENTFD, 1),
                };
                IrqInfo {
                    index,
                    flags,
                    count,
                }
            })
            .collect();
        // From a descriptor, the crate's server never unlinks the path.
        let server = Server::from_owned_fd(OwnedFd::from(listener), true, irqs, regions);

        let stats = Arc::new(VfioUserStats::default());
        let msix = Arc::new(Msix::new(options.msix_vectors, stats.clone()));
        let dma = DmaMemory::default();
        function.attach(dma.memory(), msix.clone());
        info!(
            "vfio-user: listening on {} (BAR0 {bar0_size:#x}, {} MSI-X vectors)",
            socket.display(),
            options.msix_vectors
        );
        Ok(VfioUserServer {
            server,
            transport: Transport {
                config: ConfigSpace::new(options.ids, bar0_size, &layout),
                function,
                function_bar0,
                bar0_size,
                msix_table: layout.power_on_table(),
                layout,
                msix,
                dma,
                err_eventfd: None,
                req_eventfd: None,
                stats,
                limiter: RateLimit::default(),
                connected: false,
                warned_unsealed: false,
            },
            socket: socket.to_owned(),
            _socket_file: socket_file,
        })
    }

    /// Serves clients until accepting one fails.
    pub fn serve(&mut self) -> Result<(), VfioUserError> {
        loop {
            self.serve_connection()?;
        }
    }

    /// Accepts one client and serves it until it leaves; then resets the
    /// function, unmaps its memory and forgets its eventfds. A connection that
    /// breaks (a stream error, a message the crate panics on) ends the same way:
    /// only a failing accept is an error.
    pub fn serve_connection(&mut self) -> Result<(), VfioUserError> {
        let transport = &mut self.transport;
        let server = &self.server;
        // The crate unwraps on some malformed VERSION messages; the panic unwinds
        // out of run(), dropping the stream, and nothing of ours is mid-update.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| server.run(transport)));
        match outcome {
            Ok(Ok(())) => info!("vfio-user: client disconnected"),
            Ok(Err(vfio_user::Error::SocketAccept(e))) => return Err(VfioUserError::Accept(e)),
            Ok(Err(e)) => warn!("vfio-user: connection ended: {e}"),
            Err(_) => {
                bump(&self.transport.stats.broken_connections);
                warn!("vfio-user: the vfio_user crate panicked on a client's message; connection dropped");
            }
        }
        self.transport.disconnect();
        Ok(())
    }

    pub fn stats(&self) -> Arc<VfioUserStats> {
        self.transport.stats.clone()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// The vector count checked, and BAR0's size as mapped and as the function gave it.
fn check_options(
    function: &dyn PciFunction,
    options: &VfioUserOptions,
) -> Result<(u64, u64), VfioUserError> {
    if !(1..=MAX_VECTORS).contains(&options.msix_vectors) {
        return Err(VfioUserError::Vectors(options.msix_vectors));
    }
    let function_bar0 = function.bar0_size();
    let bar0_size = bar_size(function_bar0).ok_or(VfioUserError::Bar0Size(function_bar0))?;
    Ok((bar0_size, function_bar0))
}

/// A memory BAR's size for `size` bytes: a power of two, at least a page.
fn bar_size(size: u64) -> Option<u64> {
    (size > 0 && size <= MAX_BAR_SIZE).then(|| size.max(PAGE_SIZE).next_power_of_two())
}

const PAGE_SIZE: u64 = 4096;
const MAX_BAR_SIZE: u64 = 1 << 40;
const MAX_VECTORS: u16 = 2048;
/// As QEMU's default `max_dma_maps`.
const MAX_DMA_MAPPINGS: usize = 65535;

// ---------------------------------------------------------------------------
// Config space

const CONFIG_SIZE: usize = 256;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const CLASS_PROG_IF: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
const LATENCY_TIMER: usize = 0x0d;
const BAR0: usize = 0x10;
const BAR4: usize = 0x20;
const SUBSYSTEM_VENDOR: usize = 0x2c;
const CAPABILITIES: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const MSIX_CAP: usize = 0x40;

const STATUS_CAP_LIST: u16 = 1 << 4;
/// Memory space, bus master, parity error response, SERR#, INTx disable.
const COMMAND_WRITABLE: u16 = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 8) | (1 << 10);
/// Memory BAR, 64-bit, not prefetchable.
const BAR_MEM64: u32 = 0b100;
const CAP_ID_MSIX: u8 = 0x11;
/// MSI-X Enable and Function Mask, the writable bits of Message Control.
const MSIX_CONTROL_WRITABLE: u16 = 0xc000;
/// Mass storage, Non-Volatile Memory controller, NVM Express.
const CLASS_NVME: [u8; 3] = [0x02, 0x08, 0x01];

/// Where MSI-X lives in BAR4: the table at 0, the PBA on the next page.
#[derive(Clone, Copy, Debug)]
struct MsixLayout {
    vectors: u16,
    table_len: u64,
    pba_offset: u64,
    pba_len: u64,
    bar_size: u64,
}

impl MsixLayout {
    fn new(vectors: u16) -> MsixLayout {
        let table_len = u64::from(vectors) * 16;
        let pba_offset = table_len.next_multiple_of(PAGE_SIZE);
        let pba_len = u64::from(vectors).div_ceil(64) * 8;
        MsixLayout {
            vectors,
            table_len,
            pba_offset,
            pba_len,
            bar_size: (pba_offset + pba_len).next_power_of_two(),
        }
    }

    /// Every entry masked (Vector Control bit 0), as after a reset.
    fn power_on_table(&self) -> Vec<u8> {
        let mut table = vec![0u8; self.table_len as usize];
        for entry in table.chunks_exact_mut(16) {
            entry[12] = 1;
        }
        table
    }
}

/// A type 0 header with the MSI-X capability; what a write may change is in a
/// mask, so BAR sizing and read-only fields behave as on a device.
#[derive(Clone)]
struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    power_on: [u8; CONFIG_SIZE],
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("header", &&self.bytes[..0x40])
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    fn new(ids: PciIds, bar0_size: u64, msix: &MsixLayout) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            power_on: [0; CONFIG_SIZE],
        };
        c.put(0x00, &ids.vendor.to_le_bytes());
        c.put(0x02, &ids.device.to_le_bytes());
        c.put(STATUS, &STATUS_CAP_LIST.to_le_bytes());
        c.put(0x08, &[ids.revision]);
        c.put(CLASS_PROG_IF, &CLASS_NVME);
        c.put(BAR0, &BAR_MEM64.to_le_bytes());
        c.put(BAR4, &BAR_MEM64.to_le_bytes());
        c.put(SUBSYSTEM_VENDOR, &ids.subsystem_vendor.to_le_bytes());
        c.put(SUBSYSTEM_VENDOR + 2, &ids.subsystem.to_le_bytes());
        c.put(CAPABILITIES, &[MSIX_CAP as u8]);
        // Interrupt pin 0: no INTx. The MSI-X capability is the last one.
        c.put(MSIX_CAP, &[CAP_ID_MSIX, 0]);
        c.put(MSIX_CAP + 2, &(msix.vectors - 1).to_le_bytes());
        let bir4 = |offset: u64| (offset as u32 | 4).to_le_bytes();
        c.put(MSIX_CAP + 4, &bir4(0));
        c.put(MSIX_CAP + 8, &bir4(msix.pba_offset));

        c.allow(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        c.allow(CACHE_LINE_SIZE, &[0xff, 0xff]); // and the latency timer
        c.allow(BAR0, &(!(bar0_size - 1) & !0xf).to_le_bytes());
        c.allow(BAR4, &(!(msix.bar_size - 1) & !0xf).to_le_bytes());
        c.allow(INTERRUPT_LINE, &[0xff]);
        c.allow(MSIX_CAP + 2, &MSIX_CONTROL_WRITABLE.to_le_bytes());
        debug_assert_eq!(LATENCY_TIMER, CACHE_LINE_SIZE + 1);
        c.power_on = c.bytes;
        c
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.bytes[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn allow(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// `offset..offset + data.len()` must be inside the space (checked by the caller).
    fn read(&self, offset: usize, data: &mut [u8]) {
        data.copy_from_slice(&self.bytes[offset..offset + data.len()]);
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        let bytes = &mut self.bytes[offset..offset + data.len()];
        let masks = &self.writable[offset..offset + data.len()];
        for ((b, &m), &new) in bytes.iter_mut().zip(masks).zip(data) {
            *b = (*b & !m) | (new & m);
        }
    }

    fn reset(&mut self) {
        self.bytes = self.power_on;
    }
}

// ---------------------------------------------------------------------------
// Interrupts

#[derive(Debug, Default)]
struct Vector {
    eventfd: Option<File>,
    masked: bool,
    pending: bool,
}

/// The MSI-X vectors as eventfds; the function's [`Interrupts`].
#[derive(Debug)]
pub struct Msix {
    vectors: Box<[Mutex<Vector>]>,
    stats: Arc<VfioUserStats>,
    limiter: RateLimit,
}

impl Interrupts for Msix {
    fn signal(&self, vector: u16) {
        let Some(v) = self.vectors.get(usize::from(vector)) else {
            bump(&self.stats.irqs_dropped);
            if self.limiter.allow() {
                warn!(
                    "vfio-user: interrupt on vector {vector}, past the table's {}",
                    self.vectors.len()
                );
            }
            return;
        };
        let mut v = lock(v);
        if v.eventfd.is_none() {
            bump(&self.stats.irqs_dropped);
            debug!("vfio-user: vector {vector} has no eventfd: interrupt dropped");
        } else if v.masked {
            v.pending = true;
            bump(&self.stats.irqs_masked);
        } else {
            self.fire(vector, &v);
        }
    }
}

impl Msix {
    fn new(vectors: u16, stats: Arc<VfioUserStats>) -> Msix {
        Msix {
            vectors: (0..vectors).map(|_| Mutex::default()).collect(),
            stats,
            limiter: RateLimit::default(),
        }
    }

    fn fire(&self, vector: u16, v: &Vector) {
        let Some(fd) = &v.eventfd else { return };
        match (&*fd).write(&1u64.to_ne_bytes()) {
            // A full counter is an interrupt already pending.
            Ok(_) => bump(&self.stats.irqs_delivered),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => bump(&self.stats.irqs_delivered),
            Err(e) => {
                bump(&self.stats.irqs_failed);
                if self.limiter.allow() {
                    warn!("vfio-user: signalling vector {vector} failed: {e}");
                }
            }
        }
    }

    fn range(
        &self,
        index: u32,
        start: u32,
        count: u32,
    ) -> Result<std::ops::Range<usize>, RequestError> {
        let end = start.checked_add(count);
        match end {
            Some(end) if end as usize <= self.vectors.len() => Ok(start as usize..end as usize),
            _ => Err(RequestError::IrqRange {
                index,
                start,
                count,
                available: self.vectors.len() as u32,
            }),
        }
    }

    fn set_irqs(
        &self,
        action: u32,
        data: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), RequestError> {
        let index = VFIO_PCI_MSIX_IRQ_INDEX;
        match (action, data) {
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) if count == 0 => {
                self.clear();
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) => {
                for v in self.range(index, start, count)? {
                    self.signal(v as u16);
                }
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD) => {
                let range = self.range(index, start, count)?;
                if fds.is_empty() {
                    // QEMU sends a run of -1 fds (unset vectors) as no fds.
                    for v in &self.vectors[range] {
                        lock(v).eventfd = None;
                    }
                } else if fds.len() == range.len() {
                    for fd in &fds {
                        set_nonblocking(fd).map_err(RequestError::Eventfd)?;
                    }
                    for (i, fd) in range.zip(fds) {
                        let mut v = lock(&self.vectors[i]);
                        v.eventfd = Some(fd);
                        bump(&self.stats.eventfds_set);
                        if v.pending && !v.masked {
                            v.pending = false;
                            self.fire(i as u16, &v);
                        }
                    }
                } else {
                    return Err(RequestError::IrqFds {
                        index,
                        count,
                        fds: fds.len(),
                    });
                }
            }
            (VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_DATA_NONE) => {
                for v in &self.vectors[self.range(index, start, count)?] {
                    lock(v).masked = true;
                }
            }
            (VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE) => {
                for i in self.range(index, start, count)? {
                    let mut v = lock(&self.vectors[i]);
                    v.masked = false;
                    if std::mem::take(&mut v.pending) {
                        self.fire(i as u16, &v);
                    }
                }
            }
            _ => {
                return Err(RequestError::IrqFlags {
                    index,
                    flags: action | data,
                })
            }
        }
        Ok(())
    }

    /// PBA bits `8 * byte .. 8 * byte + 8`.
    fn pending_byte(&self, byte: usize) -> u8 {
        (0..8)
            .filter(|bit| {
                self.vectors
                    .get(byte * 8 + bit)
                    .is_some_and(|v| lock(v).pending)
            })
            .fold(0, |acc, bit| acc | (1 << bit))
    }

    /// Unmasked, nothing pending; the eventfds stay (a device reset).
    fn reset(&self) {
        for v in self.vectors.iter() {
            let mut v = lock(v);
            v.masked = false;
            v.pending = false;
        }
    }

    /// No eventfds either (interrupts disabled, or the client left).
    fn clear(&self) {
        for v in self.vectors.iter() {
            *lock(v) = Vector::default();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An eventfd from the client must never block the function's thread.
fn set_nonblocking(fd: &File) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Guest memory

#[derive(Debug)]
struct Mapping {
    start: u64,
    size: u64,
    region: Arc<GuestRegionMmap<()>>,
}

impl Mapping {
    fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The DMA windows the client mapped, published as one guest memory.
#[derive(Debug)]
struct DmaMemory {
    /// Sorted by start, not overlapping.
    mappings: Vec<Mapping>,
    atomic: GuestMemory,
}

impl Default for DmaMemory {
    fn default() -> Self {
        DmaMemory {
            mappings: Vec::new(),
            atomic: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        }
    }
}

impl DmaMemory {
    fn memory(&self) -> GuestMemory {
        self.atomic.clone()
    }

    /// Maps `size` bytes of `file` from `offset` at `address`; returns whether
    /// the file's size is sealed or only trusted.
    fn map(
        &mut self,
        offset: u64,
        address: u64,
        size: u64,
        file: File,
    ) -> Result<Shrink, RequestError> {
        let bad_range = || RequestError::DmaRange { address, size };
        let end = address
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or_else(bad_range)?;
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(RequestError::DmaUnaligned(offset));
        }
        if self.mappings.len() >= MAX_DMA_MAPPINGS {
            return Err(RequestError::DmaTooMany);
        }
        // The window must be inside the file, for good: a device access past
        // its end would be a SIGBUS in the daemon. The seals first, so the size
        // read next cannot shrink after it is checked.
        let shrink = shrink_seal(&file)?;
        let meta = file.metadata().map_err(RequestError::DmaFile)?;
        let file_end = offset.checked_add(size).ok_or_else(bad_range)?;
        if !meta.is_file() || meta.len() < file_end {
            return Err(RequestError::DmaPastFile {
                offset,
                size,
                file_size: meta.is_file().then_some(meta.len()),
            });
        }
        let at = self.mappings.partition_point(|m| m.start < address);
        let overlaps_prev = at > 0 && self.mappings[at - 1].end() > address;
        let overlaps_next = self.mappings.get(at).is_some_and(|m| m.start < end);
        if overlaps_prev || overlaps_next {
            return Err(RequestError::DmaOverlap { address, size });
        }
        let len = usize::try_from(size).map_err(|_| bad_range())?;
        let mmap = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(RequestError::Mmap)?;
        let region = GuestRegionMmap::new(mmap, GuestAddress(address)).ok_or_else(bad_range)?;
        self.mappings.insert(
            at,
            Mapping {
                start: address,
                size,
                region: Arc::new(region),
            },
        );
        self.publish();
        Ok(shrink)
    }

    /// Removes the windows inside `address..address + size`; one that is only
    /// partly inside is refused, as VFIO type1 does, and nothing changes.
    fn unmap(&mut self, address: u64, size: u64) -> Result<usize, RequestError> {
        let end = address
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or(RequestError::DmaRange { address, size })?;
        let touched = |m: &Mapping| m.start < end && m.end() > address;
        if self
            .mappings
            .iter()
            .any(|m| touched(m) && (m.start < address || m.end() > end))
        {
            return Err(RequestError::DmaSplit { address, size });
        }
        let before = self.mappings.len();
        self.mappings.retain(|m| !touched(m));
        let removed = before - self.mappings.len();
        if removed > 0 {
            self.publish();
        }
        Ok(removed)
    }

    fn clear(&mut self) {
        self.mappings.clear();
        self.publish();
    }

    fn publish(&self) {
        let regions: Vec<_> = self.mappings.iter().map(|m| m.region.clone()).collect();
        // Sorted and disjoint by construction; an empty map is the only other case.
        let mem = GuestMemoryMmap::from_arc_regions(regions).unwrap_or_default();
        self.atomic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(mem);
    }
}

/// Whether a DMA window's file can shrink under its mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shrink {
    /// Sealed with F_SEAL_SHRINK, which cannot be undone: the size checked at
    /// map time is final.
    Sealed,
    /// A file the kernel cannot seal: only the frontend keeps it whole.
    Trusted,
}

/// Refuses a memfd that is not sealed against shrinking.
///
/// F_GET_SEALS answers for memfds and for files on tmpfs and hugetlbfs, and
/// fails with EINVAL on other filesystems. A tmpfs or hugetlbfs file (QEMU's
/// memory-backend-file) can never be sealed and reads as F_SEAL_SEAL alone, as
/// does a memfd made without MFD_ALLOW_SEALING (memory-backend-memfd with
/// seal=off); the name the kernel gives memfds tells the two apart.
fn shrink_seal(file: &File) -> Result<Shrink, RequestError> {
    // SAFETY: fcntl on a descriptor we own; F_GET_SEALS touches no memory.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(Shrink::Trusted),
            _ => Err(RequestError::DmaSeals(e)),
        };
    }
    if seals & libc::F_SEAL_SHRINK != 0 {
        Ok(Shrink::Sealed)
    } else if seals & libc::F_SEAL_SEAL == 0 || is_memfd(file) {
        // Only memfd_create makes a file that can still take seals.
        Err(RequestError::DmaUnsealed { seals })
    } else {
        Ok(Shrink::Trusted)
    }
}

/// Whether `file` is a memfd: the kernel names them `/memfd:NAME (deleted)`.
/// Without /proc, an unsealable memfd passes for a tmpfs file.
fn is_memfd(file: &File) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .is_ok_and(|path| path.as_os_str().as_bytes().starts_with(b"/memfd:"))
}

// ---------------------------------------------------------------------------
// The vfio_user ServerBackend

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("No region {0}")]
    NoRegion(u32),
    #[error("Access of {len} bytes at {offset:#x} is outside region {region} ({size:#x} bytes)")]
    OutOfRange {
        region: u32,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("DMA range {address:#x}+{size:#x} is empty or wraps")]
    DmaRange { address: u64, size: u64 },
    #[error("DMA file offset {0:#x} is not page aligned")]
    DmaUnaligned(u64),
    #[error("Too many DMA mappings (at most {MAX_DMA_MAPPINGS})")]
    DmaTooMany,
    #[error("Cannot stat the DMA window's fd")]
    DmaFile(#[source] io::Error),
    #[error("Cannot read the DMA window's file seals")]
    DmaSeals(#[source] io::Error),
    #[error("The DMA window's memfd can shrink (seals {seals:#x}, no F_SEAL_SHRINK): use memory-backend-memfd with seal=on, QEMU's default")]
    DmaUnsealed { seals: libc::c_int },
    #[error("DMA window {offset:#x}+{size:#x} is past the end of its file (size {file_size:?}; not a regular file if none)")]
    DmaPastFile {
        offset: u64,
        size: u64,
        file_size: Option<u64>,
    },
    #[error("DMA window {address:#x}+{size:#x} overlaps a mapped one")]
    DmaOverlap { address: u64, size: u64 },
    #[error("DMA unmap of {address:#x}+{size:#x} would split a mapping")]
    DmaSplit { address: u64, size: u64 },
    #[error("Unsupported DMA unmap flags {0:#x}")]
    DmaUnmapFlags(u32),
    #[error("Cannot map the DMA window")]
    Mmap(#[source] MmapRegionError),
    #[error("IRQ index {index}: vectors {start}+{count} are not within its {available}")]
    IrqRange {
        index: u32,
        start: u32,
        count: u32,
        available: u32,
    },
    #[error("IRQ index {index}: {fds} fds for {count} vectors")]
    IrqFds { index: u32, count: u32, fds: usize },
    #[error("IRQ index {index}: unsupported SET_IRQS flags {flags:#x}")]
    IrqFlags { index: u32, flags: u32 },
    #[error("Cannot make the eventfd non-blocking")]
    Eventfd(#[source] io::Error),
}

/// The PCI device around the function, as the crate's `ServerBackend`.
struct Transport {
    function: Arc<dyn PciFunction>,
    function_bar0: u64,
    bar0_size: u64,
    config: ConfigSpace,
    layout: MsixLayout,
    /// The MSI-X table as the client wrote it. QEMU emulates the table and
    /// never sends these accesses; a client that does reads back what it wrote.
    msix_table: Vec<u8>,
    msix: Arc<Msix>,
    dma: DmaMemory,
    err_eventfd: Option<File>,
    req_eventfd: Option<File>,
    stats: Arc<VfioUserStats>,
    limiter: RateLimit,
    /// Whether the current client has sent anything to the backend yet.
    connected: bool,
    /// Whether the current client was warned that its memory can shrink.
    warned_unsealed: bool,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("bar0_size", &self.bar0_size)
            .field("layout", &self.layout)
            .field("dma", &self.dma.mappings)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Transport {
    fn region_size(&self, region: u32) -> u64 {
        match region {
            VFIO_PCI_BAR0_REGION_INDEX => self.bar0_size,
            VFIO_PCI_BAR4_REGION_INDEX => self.layout.bar_size,
            VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE as u64,
            _ => 0,
        }
    }

    /// `offset` as an index, if the access is inside the region.
    fn check(&self, region: u32, offset: u64, len: usize) -> Result<u64, RequestError> {
        let size = self.region_size(region);
        if size == 0 {
            return Err(RequestError::NoRegion(region));
        }
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(offset),
            _ => Err(RequestError::OutOfRange {
                region,
                offset,
                len,
                size,
            }),
        }
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), RequestError> {
        let offset = self.check(region, offset, data.len())?;
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => self.config.read(offset as usize, data),
            VFIO_PCI_BAR0_REGION_INDEX => {
                // Past the function's own size, up to the power of two: zeros.
                let inside = self
                    .function_bar0
                    .saturating_sub(offset)
                    .min(data.len() as u64);
                let (ours, rest) = data.split_at_mut(inside as usize);
                if !ours.is_empty() {
                    self.function.bar0_read(offset, ours);
                }
                rest.fill(0);
            }
            _ => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = self.bar4_byte(offset + i as u64);
                }
            }
        }
        Ok(())
    }

    fn bar4_byte(&self, at: u64) -> u8 {
        let l = &self.layout;
        if at < l.table_len {
            self.msix_table[at as usize]
        } else if (l.pba_offset..l.pba_offset + l.pba_len).contains(&at) {
            self.msix.pending_byte((at - l.pba_offset) as usize)
        } else {
            0
        }
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), RequestError> {
        let offset = self.check(region, offset, data.len())?;
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => self.config.write(offset as usize, data),
            VFIO_PCI_BAR0_REGION_INDEX => {
                let inside = self
                    .function_bar0
                    .saturating_sub(offset)
                    .min(data.len() as u64);
                if inside > 0 {
                    self.function.bar0_write(offset, &data[..inside as usize]);
                }
            }
            _ => {
                // The table is plain memory; the PBA is read-only.
                for (i, &b) in data.iter().enumerate() {
                    let at = offset + i as u64;
                    if at < self.layout.table_len {
                        self.msix_table[at as usize] = b;
                    }
                }
            }
        }
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), RequestError> {
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let data = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let unsupported = RequestError::IrqFlags { index, flags };
        match index {
            VFIO_PCI_MSIX_IRQ_INDEX => self.msix.set_irqs(action, data, start, count, fds),
            VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX => {
                let slot = if index == VFIO_PCI_ERR_IRQ_INDEX {
                    &mut self.err_eventfd
                } else {
                    &mut self.req_eventfd
                };
                match (action, data, start, count, fds.len()) {
                    (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE, _, 0, 0)
                    | (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, 0, 1, 0) => {
                        *slot = None;
                        Ok(())
                    }
                    (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, 0, 1, 1) => {
                        *slot = fds.into_iter().next();
                        Ok(())
                    }
                    _ => Err(unsupported),
                }
            }
            // INTx and MSI have no vectors: only "disable all" makes sense.
            _ => match (action, data, count) {
                (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE, 0) => Ok(()),
                _ => Err(RequestError::IrqRange {
                    index,
                    start,
                    count,
                    available: 0,
                }),
            },
        }
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), RequestError> {
        let writable = flags.contains(DmaMapFlags::READ_WRITE);
        let Some(file) = fd.filter(|_| writable) else {
            // QEMU maps ROM and other fd-less RAM this way and fails the guest if
            // refused; the device just cannot reach it.
            bump(&self.stats.dma_unreachable);
            debug!(
                "vfio-user: DMA window gpa={address:#x} len={size:#x} unreachable ({})",
                if writable { "no fd" } else { "read-only" }
            );
            return Ok(());
        };
        if self.dma.map(offset, address, size, file)? == Shrink::Trusted {
            bump(&self.stats.dma_unsealed);
            if !std::mem::replace(&mut self.warned_unsealed, true) {
                warn!(
                    "vfio-user: guest memory at gpa={address:#x} is a file that cannot be sealed \
                     against shrinking (memory-backend-file?): the frontend is trusted not to \
                     truncate it, which would kill the daemon with SIGBUS; \
                     memory-backend-memfd is sealed"
                );
            }
        }
        bump(&self.stats.dma_maps);
        debug!("vfio-user: DMA map gpa={address:#x} len={size:#x} offset={offset:#x}");
        Ok(())
    }

    fn dma_unmap(
        &mut self,
        flags: DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> Result<(), RequestError> {
        // Bits as QEMU and the protocol send them (the crate's names differ).
        const UNMAP_ALL: u32 = 1 << 1;
        let bits = flags.bits();
        if bits == UNMAP_ALL {
            self.dma.clear();
        } else if bits != 0 {
            // GET_DIRTY_BITMAP (bit 0) included: no migration here.
            return Err(RequestError::DmaUnmapFlags(bits));
        } else {
            let removed = self.dma.unmap(address, size)?;
            debug!("vfio-user: DMA unmap gpa={address:#x} len={size:#x}: {removed} windows");
        }
        bump(&self.stats.dma_unmaps);
        Ok(())
    }

    fn reset(&mut self) {
        bump(&self.stats.resets);
        info!("vfio-user: device reset");
        self.function.reset();
        self.config.reset();
        self.msix.reset();
        self.msix_table = self.layout.power_on_table();
    }

    fn disconnect(&mut self) {
        bump(&self.stats.connections);
        self.connected = false;
        self.warned_unsealed = false;
        self.function.reset();
        self.config.reset();
        self.msix.clear();
        self.msix_table = self.layout.power_on_table();
        self.err_eventfd = None;
        self.req_eventfd = None;
        self.dma.clear();
    }

    fn first_contact(&mut self) {
        if !self.connected {
            self.connected = true;
            info!("vfio-user: serving a client");
        }
    }

    /// Counts and logs a refusal; `io::Error` only here, at the crate's boundary.
    fn answer(&self, what: &str, result: Result<(), RequestError>) -> io::Result<()> {
        result.map_err(|e| {
            bump(&self.stats.refused);
            if self.limiter.allow() {
                warn!("vfio-user: refused {what}: {e}");
            }
            io::Error::new(io::ErrorKind::InvalidInput, e)
        })
    }
}

impl ServerBackend for Transport {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.first_contact();
        let result = self.read(region, offset, data);
        self.answer("region read", result)
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.first_contact();
        let result = self.write(region, offset, data);
        self.answer("region write", result)
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        self.first_contact();
        let result = Transport::dma_map(self, flags, offset, address, size, fd);
        self.answer("DMA map", result)
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        self.first_contact();
        let result = Transport::dma_unmap(self, flags, address, size);
        self.answer("DMA unmap", result)
    }

    fn reset(&mut self) -> io::Result<()> {
        self.first_contact();
        Transport::reset(self);
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        self.first_contact();
        let result = Transport::set_irqs(self, index, flags, start, count, fds);
        self.answer("SET_IRQS", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfd() -> File {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; the descriptor it returns is new
        // and becomes the File's alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: as above.
        unsafe { File::from_raw_fd(fd) }
    }

    fn read_eventfd(f: &File) -> Option<u64> {
        use std::io::Read;
        let mut b = [0; 8];
        (&*f)
            .read_exact(&mut b)
            .ok()
            .map(|()| u64::from_ne_bytes(b))
    }

    fn config() -> ConfigSpace {
        ConfigSpace::new(PciIds::DMAPROBE, 0x4000, &MsixLayout::new(64))
    }

    fn read32(c: &ConfigSpace, offset: usize) -> u32 {
        let mut b = [0; 4];
        c.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_keeps_the_type_bits() {
        let mut c = config();
        c.write(BAR0, &u32::MAX.to_le_bytes());
        c.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, BAR0), !(0x4000u32 - 1) | BAR_MEM64);
        assert_eq!(read32(&c, BAR0 + 4), u32::MAX);
        c.write(BAR0, &0xfebf_1234u32.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xfebf_0000 | BAR_MEM64);
        c.reset();
        assert_eq!(read32(&c, BAR0), BAR_MEM64);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = config();
        let before = c.bytes;
        c.write(0, &[0xff; 4]); // IDs
        c.write(0x08, &[0xff; 4]); // revision, class
        c.write(CAPABILITIES, &[0xff]);
        c.write(MSIX_CAP, &[0xff; 12]);
        let mut after = c.bytes;
        // Only Message Control's top bits moved.
        assert_eq!(after[MSIX_CAP + 3], before[MSIX_CAP + 3] | 0xc0);
        after[MSIX_CAP + 3] = before[MSIX_CAP + 3];
        assert_eq!(after, before);
    }

    #[test]
    fn msix_layout_keeps_table_and_pba_apart_inside_the_bar() {
        for n in [1, 63, 64, 65, 256, 2048] {
            let l = MsixLayout::new(n);
            assert!(l.table_len <= l.pba_offset, "{n}");
            assert!(l.pba_offset + l.pba_len <= l.bar_size, "{n}");
            assert!(
                l.bar_size.is_power_of_two() && l.bar_size >= PAGE_SIZE,
                "{n}"
            );
            assert_eq!(l.pba_offset % 8, 0);
        }
    }

    #[test]
    fn bar_size_rounds_up_to_a_power_of_two_page() {
        assert_eq!(bar_size(0), None);
        assert_eq!(bar_size(1), Some(4096));
        assert_eq!(bar_size(0x1008), Some(0x2000));
        assert_eq!(bar_size(MAX_BAR_SIZE + 1), None);
        assert_eq!(bar_size(u64::MAX), None);
    }

    #[test]
    fn masked_vector_holds_its_interrupt_as_pending_until_unmasked() {
        let stats = Arc::new(VfioUserStats::default());
        let msix = Msix::new(4, stats.clone());
        let efd = eventfd();
        let file = efd.try_clone().unwrap();
        let none = VFIO_IRQ_SET_DATA_NONE;
        msix.set_irqs(
            VFIO_IRQ_SET_ACTION_TRIGGER,
            VFIO_IRQ_SET_DATA_EVENTFD,
            2,
            1,
            vec![file],
        )
        .unwrap();
        msix.set_irqs(VFIO_IRQ_SET_ACTION_MASK, none, 2, 1, vec![])
            .unwrap();
        msix.signal(2);
        assert_eq!(msix.pending_byte(0), 0b100);
        assert_eq!(read_eventfd(&efd), None, "a masked vector must not fire");
        msix.set_irqs(VFIO_IRQ_SET_ACTION_UNMASK, none, 2, 1, vec![])
            .unwrap();
        assert_eq!(read_eventfd(&efd), Some(1));
        assert_eq!(msix.pending_byte(0), 0);
        msix.signal(0); // no eventfd
        msix.signal(9); // no such vector
        let s = stats.snapshot();
        assert_eq!((s.irqs_masked, s.irqs_delivered, s.irqs_dropped), (1, 1, 2));
    }

    #[test]
    fn irq_ranges_are_checked_without_overflow() {
        let msix = Msix::new(4, Arc::default());
        let trig = VFIO_IRQ_SET_ACTION_TRIGGER;
        assert!(msix
            .set_irqs(trig, VFIO_IRQ_SET_DATA_NONE, u32::MAX, 2, vec![])
            .is_err());
        assert!(msix
            .set_irqs(trig, VFIO_IRQ_SET_DATA_NONE, 3, 2, vec![])
            .is_err());
        assert!(msix
            .set_irqs(trig, VFIO_IRQ_SET_DATA_NONE, 0, 4, vec![])
            .is_ok());
    }
}
