//! The namespace a front-end talks to.
//!
//! Every LBA range a command names goes through [`Namespace::check_range`], the one
//! bounds function; the operations take only the [`LbaRange`] it returns.

use crate::backing::{Backing, BackingError, BackingKind};
use crate::units::{ByteOffset, Lba, LbaSize};

/// Why a range was refused. A front-end reports either as "LBA out of range".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("Range at LBA {start} of {blocks} blocks overflows")]
    Overflow { start: u64, blocks: u64 },
    #[error("Range at LBA {start} of {blocks} blocks ends past the capacity of {capacity} blocks")]
    OutOfRange {
        start: u64,
        blocks: u64,
        capacity: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("The namespace is read-only")]
    ReadOnly,
    #[error("Buffer of {buf} bytes for a range of {range} bytes")]
    LengthMismatch { buf: usize, range: u64 },
    #[error("Backing of {size} bytes holds less than one {lbs}-byte block")]
    TooSmall { size: u64, lbs: LbaSize },
    #[error(transparent)]
    Backing(#[from] BackingError),
}

/// A range of blocks known to lie inside its namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbaRange {
    start: Lba,
    blocks: u64,
    offset: ByteOffset,
    len: u64,
}

impl LbaRange {
    pub fn start(&self) -> Lba {
        self.start
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Where the range starts, in bytes.
    pub fn offset(&self) -> ByteOffset {
        self.offset
    }

    /// The length of the range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }
}

/// An NVMe-like namespace: a number of logical blocks over a backing.
#[derive(Debug)]
pub struct Namespace {
    backing: Backing,
    lbs: LbaSize,
    blocks: u64,
    read_only: bool,
}

impl Namespace {
    /// A namespace over `backing` with blocks of `lbs`. A backing whose size is not
    /// a multiple of the block size loses its tail.
    pub fn new(backing: Backing, lbs: LbaSize, read_only: bool) -> Result<Self, NamespaceError> {
        let size = backing.size();
        let blocks = size >> lbs.shift();
        if blocks == 0 {
            return Err(NamespaceError::TooSmall { size, lbs });
        }
        if !lbs.is_aligned(size) {
            log::warn!(
                "backing size {size} is not a multiple of {lbs}: the last {} bytes are unused",
                size & (lbs.bytes() - 1)
            );
        }
        Ok(Namespace {
            backing,
            lbs,
            blocks,
            read_only,
        })
    }

    pub fn lba_size(&self) -> LbaSize {
        self.lbs
    }

    /// The capacity in logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.blocks << self.lbs.shift()
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn backing_kind(&self) -> BackingKind {
        self.backing.kind()
    }

    /// The one bounds check for every command: `blocks` blocks from `start` must lie
    /// inside the namespace. An empty range is valid anywhere up to the capacity.
    pub fn check_range(&self, start: Lba, blocks: u64) -> Result<LbaRange, RangeError> {
        let end = start.0.checked_add(blocks).ok_or(RangeError::Overflow {
            start: start.0,
            blocks,
        })?;
        if end > self.blocks {
            return Err(RangeError::OutOfRange {
                start: start.0,
                blocks,
                capacity: self.blocks,
            });
        }
        // Cannot overflow: end <= self.blocks, and the capacity in bytes fits in u64.
        Ok(LbaRange {
            start,
            blocks,
            offset: ByteOffset(start.0 << self.lbs.shift()),
            len: blocks << self.lbs.shift(),
        })
    }

    pub fn read(&self, range: LbaRange, buf: &mut [u8]) -> Result<(), NamespaceError> {
        check_len(range, buf.len())?;
        self.backing.read_at(range.offset.0, buf)?;
        Ok(())
    }

    /// Reads `range` straight into the buffers `iov` describes (together exactly
    /// the range's length): the device writing its data into host memory it was
    /// given, with no copy in between.
    ///
    /// # Safety
    /// Every `iovec` must describe memory that is valid for writes of its length
    /// for the whole call, and that no Rust reference covers.
    pub unsafe fn read_vectored(
        &self,
        range: LbaRange,
        iov: &mut [libc::iovec],
    ) -> Result<(), NamespaceError> {
        check_len(
            range,
            iov.iter().fold(0usize, |n, v| n.saturating_add(v.iov_len)),
        )?;
        // SAFETY: passed on from the caller.
        unsafe { self.backing.read_vectored_at(range.offset.0, iov) }?;
        Ok(())
    }

    pub fn write(&self, range: LbaRange, buf: &[u8]) -> Result<(), NamespaceError> {
        self.writable()?;
        check_len(range, buf.len())?;
        self.backing.write_at(range.offset.0, buf)?;
        Ok(())
    }

    /// Makes every completed write stable.
    pub fn flush(&self) -> Result<(), NamespaceError> {
        self.backing.flush()?;
        Ok(())
    }

    /// Deallocates the range: it reads back as zeros.
    pub fn deallocate(&self, range: LbaRange) -> Result<(), NamespaceError> {
        self.writable()?;
        self.backing.zero(range.offset.0, range.len)?;
        Ok(())
    }

    /// Writes zeros over the range.
    pub fn write_zeroes(&self, range: LbaRange) -> Result<(), NamespaceError> {
        self.writable()?;
        self.backing.zero(range.offset.0, range.len)?;
        Ok(())
    }

    fn writable(&self) -> Result<(), NamespaceError> {
        if self.read_only {
            Err(NamespaceError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

fn check_len(range: LbaRange, buf: usize) -> Result<(), NamespaceError> {
    if u64::try_from(buf).ok() == Some(range.len) {
        Ok(())
    } else {
        Err(NamespaceError::LengthMismatch {
            buf,
            range: range.len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One conformance test body, run against every backing.
    fn conformance(make: &dyn Fn(u64) -> Backing) {
        for lbs in [LbaSize::B512, LbaSize::B4096] {
            let ns = Namespace::new(make(1 << 20), lbs, false).unwrap();
            let bs = usize::try_from(lbs.bytes()).unwrap();
            assert_eq!(ns.capacity_bytes(), 1 << 20);
            assert_eq!(ns.blocks(), (1 << 20) / lbs.bytes());

            // Never-written blocks read as zeros.
            let r = ns.check_range(Lba(3), 2).unwrap();
            let mut buf = vec![0xffu8; 2 * bs];
            ns.read(r, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0));

            // Written blocks read back; neighbours are untouched.
            let data: Vec<u8> = (0..4 * bs)
                .map(|i| u8::try_from(i % 251).unwrap())
                .collect();
            let w = ns.check_range(Lba(10), 4).unwrap();
            ns.write(w, &data).unwrap();
            let mut back = vec![0u8; 4 * bs];
            ns.read(w, &mut back).unwrap();
            assert_eq!(back, data);
            let mut neighbour = vec![0xffu8; bs];
            ns.read(ns.check_range(Lba(9), 1).unwrap(), &mut neighbour)
                .unwrap();
            assert!(neighbour.iter().all(|&b| b == 0));
            ns.flush().unwrap();

            // Deallocated blocks read back as zeros; the rest keep their data.
            ns.deallocate(ns.check_range(Lba(11), 1).unwrap()).unwrap();
            ns.read(w, &mut back).unwrap();
            assert_eq!(back[..bs], data[..bs]);
            assert!(back[bs..2 * bs].iter().all(|&b| b == 0));
            assert_eq!(back[2 * bs..], data[2 * bs..]);

            // Write-zeroes likewise.
            ns.write_zeroes(ns.check_range(Lba(12), 2).unwrap())
                .unwrap();
            ns.read(w, &mut back).unwrap();
            assert_eq!(back[..bs], data[..bs]);
            assert!(back[bs..].iter().all(|&b| b == 0));

            // The last block is usable, one past it is not.
            let last = Lba(ns.blocks() - 1);
            ns.write(ns.check_range(last, 1).unwrap(), &data[..bs])
                .unwrap();
            assert!(ns.check_range(Lba(ns.blocks()), 1).is_err());

            // A buffer that does not match its range is refused, not truncated.
            assert!(matches!(
                ns.write(w, &data[..bs]),
                Err(NamespaceError::LengthMismatch { .. })
            ));
        }
    }

    #[test]
    fn memory_conformance() {
        conformance(&|size| Backing::memory(size).unwrap());
    }

    #[test]
    fn file_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::cell::Cell::new(0);
        conformance(&|size| {
            n.set(n.get() + 1);
            let path = dir.path().join(format!("disk{}", n.get()));
            Backing::file(&path, Some(size), false).unwrap()
        });
    }

    #[test]
    fn bounds_at_u64_max() {
        let ns = Namespace::new(Backing::memory(1 << 20).unwrap(), LbaSize::B512, false).unwrap();
        assert_eq!(
            ns.check_range(Lba(u64::MAX), 1),
            Err(RangeError::Overflow {
                start: u64::MAX,
                blocks: 1
            })
        );
        assert_eq!(
            ns.check_range(Lba(1), u64::MAX),
            Err(RangeError::Overflow {
                start: 1,
                blocks: u64::MAX
            })
        );
        assert!(matches!(
            ns.check_range(Lba(u64::MAX), 0),
            Err(RangeError::OutOfRange { .. })
        ));
        assert!(matches!(
            ns.check_range(Lba(2047), 2),
            Err(RangeError::OutOfRange { .. })
        ));
        assert!(ns.check_range(Lba(2047), 1).is_ok());
        assert!(ns.check_range(Lba(2048), 0).is_ok());
    }

    #[test]
    fn vectored_reads_fill_buffers_in_order() {
        let ns = Namespace::new(Backing::memory(1 << 20).unwrap(), LbaSize::B512, false).unwrap();
        let r = ns.check_range(Lba(3), 4).unwrap();
        let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 1) as u8).collect();
        ns.write(r, &data).unwrap();
        // Uneven pieces, one of them empty, and more of them than one call takes.
        let mut out = vec![0u8; 2048];
        let mut cuts = vec![0];
        cuts.extend((0..=1100).chain([1500, 2048]));
        let mut iov: Vec<libc::iovec> = cuts
            .windows(2)
            .map(|w| libc::iovec {
                // SAFETY: the offset is inside `out`.
                iov_base: unsafe { out.as_mut_ptr().add(w[0]) }.cast(),
                iov_len: w[1] - w[0],
            })
            .collect();
        // SAFETY: every iovec lies in `out`, which nothing else touches meanwhile.
        unsafe { ns.read_vectored(r, &mut iov) }.unwrap();
        assert_eq!(out, data);
        // The buffers must add up to the range.
        let mut short = [libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: 512,
        }];
        // SAFETY: as above.
        let e = unsafe { ns.read_vectored(r, &mut short) };
        assert!(matches!(e, Err(NamespaceError::LengthMismatch { .. })));
    }

    #[test]
    fn read_only_refuses_changes() {
        let ns = Namespace::new(Backing::memory(1 << 20).unwrap(), LbaSize::B512, true).unwrap();
        let r = ns.check_range(Lba(0), 1).unwrap();
        assert!(matches!(
            ns.write(r, &[0; 512]),
            Err(NamespaceError::ReadOnly)
        ));
        assert!(matches!(ns.deallocate(r), Err(NamespaceError::ReadOnly)));
        assert!(matches!(ns.write_zeroes(r), Err(NamespaceError::ReadOnly)));
        let mut buf = [1u8; 512];
        ns.read(r, &mut buf).unwrap();
    }

    #[test]
    fn file_is_created_kept_and_never_resized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        assert!(matches!(
            Backing::file(&path, None, false),
            Err(BackingError::NoSize { .. })
        ));
        {
            let ns = Namespace::new(
                Backing::file(&path, Some(8192), false).unwrap(),
                LbaSize::B512,
                false,
            )
            .unwrap();
            ns.write(ns.check_range(Lba(1), 1).unwrap(), &[7; 512])
                .unwrap();
            ns.flush().unwrap();
        }
        // Reopened without a size: same size, same data.
        let ns = Namespace::new(
            Backing::file(&path, None, false).unwrap(),
            LbaSize::B512,
            false,
        )
        .unwrap();
        assert_eq!(ns.capacity_bytes(), 8192);
        let mut buf = [0u8; 512];
        ns.read(ns.check_range(Lba(1), 1).unwrap(), &mut buf)
            .unwrap();
        assert_eq!(buf, [7; 512]);
        // A different size is refused, and the file keeps its size.
        assert!(matches!(
            Backing::file(&path, Some(4096), false),
            Err(BackingError::SizeMismatch { .. })
        ));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
    }

    #[test]
    fn memory_is_sparse() {
        // A terabyte of media costs nothing until written.
        let ns = Namespace::new(Backing::memory(1 << 40).unwrap(), LbaSize::B4096, false).unwrap();
        let r = ns.check_range(Lba(ns.blocks() - 1), 1).unwrap();
        ns.write(r, &[5; 4096]).unwrap();
        let mut buf = [0u8; 4096];
        ns.read(r, &mut buf).unwrap();
        assert_eq!(buf, [5; 4096]);
    }

    #[test]
    fn size_not_a_block_multiple_loses_its_tail() {
        let ns =
            Namespace::new(Backing::memory(4096 + 100).unwrap(), LbaSize::B4096, false).unwrap();
        assert_eq!(ns.blocks(), 1);
        let too_small = Namespace::new(Backing::memory(100).unwrap(), LbaSize::B512, false);
        assert!(matches!(too_small, Err(NamespaceError::TooSmall { .. })));
    }
}
