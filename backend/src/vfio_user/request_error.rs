//! Why the transport refused a client's request.

use std::io;

use vm_memory::mmap::MmapRegionError;

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
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
    #[error("Too many DMA mappings (at most {0})")]
    DmaTooMany(usize),
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
