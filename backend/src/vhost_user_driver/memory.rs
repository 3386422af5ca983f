//! The frontend's guest memory: one memfd-backed region at guest-physical 0, shared
//! with the backend by `SET_MEM_TABLE`, and a first-fit allocator for rings and
//! data buffers inside it.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::error::Error;

/// The allocator never hands out the first page, so guest-physical 0 stays a
/// recognisably bogus address for tests.
const FIRST_ALLOCATABLE: u64 = 4096;
/// Allocation granule: every buffer starts and ends on a 64-byte boundary.
const GRANULE: u64 = 64;

/// Guest memory as the frontend sees it: a cheap, cloneable handle.
///
/// Addresses are guest-physical ([`GuestAddress`]); the single region starts at 0
/// and its backend-visible userspace address is the host mapping address.
#[derive(Clone)]
pub struct GuestRam {
    inner: Arc<RamInner>,
}

struct RamInner {
    mem: GuestMemoryMmap,
    memfd: File,
    size: u64,
    alloc: Mutex<Allocator>,
}

impl fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.inner.size)
            .field("free", &self.free_bytes())
            .finish_non_exhaustive()
    }
}

impl GuestRam {
    /// Creates `size` bytes of zeroed, shareable guest memory (a memfd mapped
    /// `MAP_SHARED`).
    pub fn new(size: usize) -> Result<Self, Error> {
        let size64 = u64::try_from(size).map_err(|_| Error::InvalidConfig("mem_size too large"))?;
        if size64 <= FIRST_ALLOCATABLE {
            return Err(Error::InvalidConfig("mem_size must exceed one page"));
        }
        let name: &CStr = c"dmaprobe-frontend";
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no
        // other memory-safety preconditions.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::MemFd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create, is open, and nothing
        // else owns it.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size64).map_err(Error::MemFd)?;
        let file_offset = FileOffset::new(memfd.try_clone().map_err(Error::MemFd)?, 0);
        let mem =
            GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size, Some(file_offset))])
                .map_err(Error::Mmap)?;
        Ok(GuestRam {
            inner: Arc::new(RamInner {
                mem,
                memfd,
                size: size64,
                alloc: Mutex::new(Allocator::new(FIRST_ALLOCATABLE, size64)),
            }),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The vm-memory view, for callers who want `Bytes` directly.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.inner.mem
    }

    /// The memfd backing guest memory (the backend maps the same file).
    pub fn memfd(&self) -> &File {
        &self.inner.memfd
    }

    /// The host virtual address where `gpa` is mapped in this process.
    pub fn host_address(&self, gpa: GuestAddress) -> Result<u64, Error> {
        let ptr = self
            .inner
            .mem
            .get_host_address(gpa)
            .map_err(|source| Error::GuestMemory {
                gpa: gpa.0,
                len: 0,
                source,
            })?;
        Ok(ptr as u64)
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: GuestAddress, buf: &mut [u8]) -> Result<(), Error> {
        self.inner
            .mem
            .read_slice(buf, gpa)
            .map_err(|source| Error::GuestMemory {
                gpa: gpa.0,
                len: buf.len(),
                source,
            })
    }

    /// Reads `len` bytes of guest memory at `gpa`.
    pub fn read_vec(&self, gpa: GuestAddress, len: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0; len];
        self.read(gpa, &mut buf)?;
        Ok(buf)
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: GuestAddress, data: &[u8]) -> Result<(), Error> {
        self.inner
            .mem
            .write_slice(data, gpa)
            .map_err(|source| Error::GuestMemory {
                gpa: gpa.0,
                len: data.len(),
                source,
            })
    }

    /// Sets `len` bytes at `gpa` to `byte`.
    pub fn fill(&self, gpa: GuestAddress, len: usize, byte: u8) -> Result<(), Error> {
        self.write(gpa, &vec![byte; len])
    }

    /// Allocates a page-aligned buffer of `len` bytes. Freed when the
    /// [`Buffer`] is dropped. The contents are whatever was there before.
    pub fn alloc(&self, len: usize) -> Result<Buffer, Error> {
        self.alloc_aligned(len, 4096)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc_aligned(&self, len: usize, align: u64) -> Result<Buffer, Error> {
        if !align.is_power_of_two() {
            return Err(Error::InvalidConfig("alignment must be a power of two"));
        }
        let len64 = u64::try_from(len).map_err(|_| Error::OutOfMemory { len })?;
        let gpa = self
            .allocator()
            .alloc(len64, align.max(GRANULE))
            .ok_or(Error::OutOfMemory { len })?;
        Ok(Buffer {
            gpa: GuestAddress(gpa),
            len,
            ram: self.clone(),
        })
    }

    /// Bytes still free for allocation.
    pub fn free_bytes(&self) -> u64 {
        self.allocator().free_bytes()
    }

    fn allocator(&self) -> MutexGuard<'_, Allocator> {
        // A panic while holding the lock cannot leave the free list torn:
        // every mutation is completed before returning.
        self.inner
            .alloc
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, gpa: GuestAddress, len: usize) {
        self.allocator()
            .free(gpa.0, u64::try_from(len).unwrap_or(u64::MAX));
    }

    /// Whether `[gpa, gpa + len)` lies inside guest memory.
    pub fn contains(&self, gpa: GuestAddress, len: u64) -> bool {
        let region_end = self.inner.mem.iter().map(|r| r.last_addr().0).max();
        match (gpa.0.checked_add(len), region_end) {
            (Some(end), Some(last)) => len == 0 || end - 1 <= last,
            _ => false,
        }
    }
}

/// A buffer in guest memory, returned to the allocator on drop.
pub struct Buffer {
    gpa: GuestAddress,
    len: usize,
    ram: GuestRam,
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("gpa", &format_args!("{:#x}", self.gpa.0))
            .field("len", &self.len)
            .finish()
    }
}

impl Buffer {
    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> GuestAddress {
        self.gpa
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's contents.
    pub fn read(&self) -> Result<Vec<u8>, Error> {
        self.ram.read_vec(self.gpa, self.len)
    }

    /// Writes `data` at byte `offset` into the buffer.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), Error> {
        if !matches!(offset.checked_add(data.len()), Some(end) if end <= self.len) {
            return Err(Error::BufferOverflow {
                offset,
                len: data.len(),
                size: self.len,
            });
        }
        self.ram
            .write(GuestAddress(self.gpa.0 + offset as u64), data)
    }

    /// Sets every byte to `byte`.
    pub fn fill(&self, byte: u8) -> Result<(), Error> {
        self.ram.fill(self.gpa, self.len, byte)
    }

    /// Gives up ownership without freeing: for memory a device may still
    /// write to (a request that timed out).
    pub fn leak(self) -> (GuestAddress, usize) {
        let parts = (self.gpa, self.len);
        std::mem::forget(self);
        parts
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.ram.release(self.gpa, self.len);
    }
}

/// A first-fit free list over `[start, end)`, coalescing on free.
#[derive(Debug)]
struct Allocator {
    /// start -> length of each free block.
    free: BTreeMap<u64, u64>,
}

impl Allocator {
    fn new(start: u64, end: u64) -> Self {
        let mut free = BTreeMap::new();
        if end > start {
            free.insert(start, end - start);
        }
        Allocator { free }
    }

    fn rounded(len: u64) -> Option<u64> {
        len.max(1).checked_next_multiple_of(GRANULE)
    }

    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let len = Self::rounded(len)?;
        let (start, block_len, at) = self.free.iter().find_map(|(&start, &block_len)| {
            let at = start.checked_next_multiple_of(align)?;
            let end = at.checked_add(len)?;
            (end <= start + block_len).then_some((start, block_len, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        let tail = start + block_len - (at + len);
        if tail > 0 {
            self.free.insert(at + len, tail);
        }
        Some(at)
    }

    fn free(&mut self, start: u64, len: u64) {
        let Some(mut len) = Self::rounded(len) else {
            return;
        };
        let mut start = start;
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back() {
            if prev + prev_len == start {
                self.free.remove(&prev);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(next_len) = self.free.remove(&(start + len)) {
            len += next_len;
        }
        self.free.insert(start, len);
    }

    fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_aligns_splits_and_coalesces() {
        let mut a = Allocator::new(4096, 1 << 20);
        let total = a.free_bytes();
        let x = a.alloc(100, 4096).unwrap();
        assert_eq!(x % 4096, 0);
        let y = a.alloc(5000, 64).unwrap();
        assert!(y >= x + 128);
        let z = a.alloc(1, 8192).unwrap();
        assert_eq!(z % 8192, 0);
        a.free(y, 5000);
        a.free(x, 100);
        a.free(z, 1);
        assert_eq!(a.free_bytes(), total);
        assert_eq!(a.free.len(), 1, "blocks coalesce back into one");
    }

    #[test]
    fn allocator_reports_exhaustion() {
        let mut a = Allocator::new(4096, 8192);
        assert!(a.alloc(4097, 64).is_none());
        assert_eq!(a.alloc(4096, 64), Some(4096));
        assert!(a.alloc(1, 64).is_none());
        assert!(a.alloc(u64::MAX, 64).is_none());
    }

    #[test]
    fn guest_ram_buffers_round_trip_and_free_on_drop() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let before = ram.free_bytes();
        {
            let buf = ram.alloc(10).unwrap();
            assert!(buf.gpa().0 >= FIRST_ALLOCATABLE);
            buf.write_at(2, b"abc").unwrap();
            assert_eq!(&buf.read().unwrap()[2..5], b"abc");
            assert!(buf.write_at(8, b"abc").is_err());
            assert!(ram.host_address(buf.gpa()).unwrap() != 0);
        }
        assert_eq!(ram.free_bytes(), before);
        assert!(ram.contains(GuestAddress(0), 1 << 20));
        assert!(!ram.contains(GuestAddress(1), 1 << 20));
        assert!(ram.read_vec(GuestAddress((1 << 20) - 1), 2).is_err());
    }
}
