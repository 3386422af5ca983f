//! The PCI device around the function, as the `vfio_user` crate's
//! `ServerBackend`: region reads and writes checked and routed (config
//! space, BAR0 to the function, BAR4's MSI-X table and PBA), DMA windows
//! mapped and unmapped, SET_IRQS, resets; every refusal counted and logged.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, info, warn};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR4_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_ERR_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, ServerBackend};

use super::config_space::{ConfigSpace, MsixLayout, PciIds, CONFIG_SIZE};
use super::dma_memory::{DmaMemory, Shrink};
use super::function::PciFunction;
use super::msix::Msix;
use super::request_error::RequestError;
use super::stats::VfioUserStats;
use crate::counters::{bump, RateLimit};

/// The PCI device around the function, as the crate's `ServerBackend`.
pub(super) struct Transport {
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
    /// The device around `function` (whose BAR0 is `function_bar0` bytes,
    /// mapped as `bar0_size`) with `ids` and the MSI-X of `layout`, at
    /// power-on; the function is attached to the (still empty) guest memory
    /// and the MSI-X vectors.
    pub(super) fn attach(
        function: Arc<dyn PciFunction>,
        function_bar0: u64,
        bar0_size: u64,
        layout: MsixLayout,
        ids: PciIds,
    ) -> Transport {
        let stats = Arc::new(VfioUserStats::default());
        let msix = Arc::new(Msix::new(layout.vectors, stats.clone()));
        let dma = DmaMemory::default();
        function.attach(dma.memory(), msix.clone());
        Transport {
            config: ConfigSpace::new(ids, bar0_size, &layout),
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
        }
    }

    pub(super) fn stats(&self) -> &Arc<VfioUserStats> {
        &self.stats
    }

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

    pub(super) fn reset(&mut self) {
        bump(&self.stats.resets);
        info!("vfio-user: device reset");
        self.function.reset();
        self.config.reset();
        self.msix.reset();
        self.msix_table = self.layout.power_on_table();
    }

    pub(super) fn disconnect(&mut self) {
        bump(&self.stats.connections);
        self.connected = false;
        self.stats.connected.store(false, Ordering::Relaxed);
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
            self.stats.connected.store(true, Ordering::Relaxed);
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
