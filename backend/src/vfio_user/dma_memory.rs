//! Guest memory as the client maps it: DMA windows by fd, each mapped
//! shared at its IOVA and published together as one [`GuestMemory`]; a
//! window must lie inside its file, and a memfd must be sealed against
//! shrinking ([`shrink_seal`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, PoisonError};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};

use super::config_space::PAGE_SIZE;
use super::request_error::RequestError;
use crate::GuestMemory;

/// As QEMU's default `max_dma_maps`.
pub(super) const MAX_DMA_MAPPINGS: usize = 65535;

#[derive(Debug)]
pub(super) struct Mapping {
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
pub(super) struct DmaMemory {
    /// Sorted by start, not overlapping.
    pub(super) mappings: Vec<Mapping>,
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
    pub(super) fn memory(&self) -> GuestMemory {
        self.atomic.clone()
    }

    /// Maps `size` bytes of `file` from `offset` at `address`; returns whether
    /// the file's size is sealed or only trusted.
    pub(super) fn map(
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
            return Err(RequestError::DmaTooMany(MAX_DMA_MAPPINGS));
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
    pub(super) fn unmap(&mut self, address: u64, size: u64) -> Result<usize, RequestError> {
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

    pub(super) fn clear(&mut self) {
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
pub(super) enum Shrink {
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
