//! The namespace an interface talks to.
//!
//! Every LBA range a command names goes through [`Namespace::check_range`], the one
//! bounds function; the operations take only the [`LbaRange`] it returns.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::backing::{Backing, BackingError, BackingKind};
use crate::cache::{CacheStatus, PowerCut, WriteCache};
use crate::geometry::{Geometry, GeometryError};
use crate::media::{MediaErrorKind, MediaErrors};
use crate::units::{ByteOffset, Lba, LbaSize};
use wire::splitmix::SplitMix64;

/// Why a range was refused. An interface reports either as "LBA out of range".
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
    #[error("Unrecovered read error at LBA {lba}")]
    UnrecoveredRead { lba: u64 },
    #[error("Write fault at LBA {lba}")]
    WriteFault { lba: u64 },
    #[error("Backing of {size} bytes holds less than one {lbs}-byte block")]
    TooSmall { size: u64, lbs: LbaSize },
    #[error(transparent)]
    Range(#[from] RangeError),
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

/// What deallocated blocks read back as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Deallocate {
    /// Zeros (NVMe DLFEAT "read zeroes"); the backing's space is given back.
    #[default]
    Zeroes,
    /// Their old data: deallocation is a hint the drive ignores.
    Keep,
}

/// An NVMe-like namespace: a number of logical blocks over a backing, with an
/// optional volatile write cache, bad blocks, and a deallocation behaviour.
#[derive(Debug)]
pub struct Namespace {
    backing: Backing,
    lbs: LbaSize,
    blocks: u64,
    read_only: bool,
    cache: Option<WriteCache>,
    /// Whether the host runs the cache (else writes are stable at once).
    cache_enabled: AtomicBool,
    media: MediaErrors,
    deallocate: Deallocate,
    geometry: Geometry,
    /// Power cuts so far: commands from before a cut must not touch the media
    /// after it.
    power_epoch: AtomicU64,
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
            cache: None,
            cache_enabled: AtomicBool::new(true),
            media: MediaErrors::default(),
            deallocate: Deallocate::Zeroes,
            geometry: Geometry::default_for(lbs),
            power_epoch: AtomicU64::new(0),
        })
    }

    /// Adds a volatile write cache of `bytes` (rounded down to whole 4 KiB
    /// units, at least one).
    pub fn with_write_cache(mut self, bytes: u64) -> Self {
        self.cache = Some(WriteCache::new(self.lbs.bytes(), bytes));
        self
    }

    pub fn with_deallocate(mut self, deallocate: Deallocate) -> Self {
        self.deallocate = deallocate;
        self
    }

    /// Sets the transfer and deallocation limits, after checking them.
    pub fn with_geometry(mut self, geometry: Geometry) -> Result<Self, GeometryError> {
        geometry.check(self.lbs)?;
        self.geometry = geometry;
        Ok(self)
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Whether writes may be volatile: a cache exists and the host runs it.
    pub fn write_cache_enabled(&self) -> bool {
        self.cache.is_some() && self.cache_enabled.load(Ordering::Acquire)
    }

    /// The host turns the cache on (write-back) or off (write-through); turning
    /// it off makes what it holds stable first. Write-through, every change
    /// syncs the backing before it returns.
    pub fn set_write_cache(&self, enabled: bool) -> Result<(), NamespaceError> {
        if !enabled && self.write_cache_enabled() {
            self.flush()?;
        }
        self.cache_enabled.store(enabled, Ordering::Release);
        Ok(())
    }

    pub fn cache_status(&self) -> Option<CacheStatus> {
        self.cache.as_ref().map(WriteCache::status)
    }

    /// The namespace's bad blocks.
    pub fn media_errors(&self) -> &MediaErrors {
        &self.media
    }

    /// Power is lost and comes back: whatever was not stable is gone (with
    /// `tear_seed`, each volatile write keeps a random leading part of its
    /// blocks). Commands from before the cut fail if they reach the media after.
    pub fn power_cut(&self, tear_seed: Option<u64>) -> Result<PowerCut, NamespaceError> {
        let cut = match &self.cache {
            Some(cache) => {
                let mut locked = cache.lock();
                self.power_epoch.fetch_add(1, Ordering::AcqRel);
                let mut rng = tear_seed.map(SplitMix64);
                let mut draw = |n: u64| rng.as_mut().map_or(0, |r| r.below(n + 1));
                let tear: Option<&mut dyn FnMut(u64) -> u64> =
                    tear_seed.is_some().then_some(&mut draw);
                locked.power_cut(&self.backing, tear)?
            }
            None => {
                self.power_epoch.fetch_add(1, Ordering::AcqRel);
                PowerCut::default()
            }
        };
        Ok(cut)
    }

    /// How many power cuts there have been.
    pub fn power_epoch(&self) -> u64 {
        self.power_epoch.load(Ordering::Acquire)
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

    /// How many times the backing file was synced (`fdatasync`): by a flush,
    /// and by every write made stable before it completed (Force Unit Access,
    /// or the write cache off). Always 0 for a memory backing.
    pub fn syncs(&self) -> u64 {
        self.backing.syncs()
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
        self.readable(range)?;
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
        self.readable(range)?;
        // SAFETY: passed on from the caller.
        unsafe { self.backing.read_vectored_at(range.offset.0, iov) }?;
        Ok(())
    }

    /// Writes `buf`: volatile behind a running write cache; without one
    /// (write-through) stable, and the backing synced, before returning.
    pub fn write(&self, range: LbaRange, buf: &[u8]) -> Result<(), NamespaceError> {
        self.write_as(range, buf, false)
    }

    /// Writes `buf` and makes those blocks stable before returning (a write
    /// with Force Unit Access): a power cut keeps them, while what the write
    /// cache holds of other blocks stays volatile. The backing is synced.
    pub fn write_stable(&self, range: LbaRange, buf: &[u8]) -> Result<(), NamespaceError> {
        self.write_as(range, buf, true)
    }

    fn write_as(&self, range: LbaRange, buf: &[u8], stable: bool) -> Result<(), NamespaceError> {
        self.writable()?;
        check_len(range, buf.len())?;
        if let Some(lba) = self
            .media
            .first_bad(range.start.0, range.blocks, MediaErrorKind::Write)
        {
            return Err(NamespaceError::WriteFault { lba });
        }
        self.change(range, stable, |b| b.write_at(range.offset.0, buf))
    }

    /// Makes every completed write stable.
    pub fn flush(&self) -> Result<(), NamespaceError> {
        match &self.cache {
            Some(cache) => {
                let mut locked = cache.lock();
                self.backing.flush()?;
                locked.flushed();
            }
            None => self.backing.flush()?,
        }
        Ok(())
    }

    /// Deallocates the whole units of the discard granularity inside the range:
    /// they read back as zeros, or keep their data (see [`Deallocate`]).
    pub fn deallocate(&self, range: LbaRange) -> Result<(), NamespaceError> {
        self.writable()?;
        if self.deallocate == Deallocate::Keep {
            return Ok(());
        }
        let g = self.geometry.discard_granularity >> self.lbs.shift();
        let start = range.start.0.div_ceil(g) * g;
        let end = (range.start.0 + range.blocks) / g * g;
        if start >= end {
            return Ok(());
        }
        let units = self.check_range(Lba(start), end - start)?;
        self.change(units, false, |b| b.zero(units.offset.0, units.len))
    }

    /// Writes zeros over the range.
    pub fn write_zeroes(&self, range: LbaRange) -> Result<(), NamespaceError> {
        self.writable()?;
        if let Some(lba) = self
            .media
            .first_bad(range.start.0, range.blocks, MediaErrorKind::Write)
        {
            return Err(NamespaceError::WriteFault { lba });
        }
        self.change(range, false, |b| b.zero(range.offset.0, range.len))
    }

    /// Changes the blocks of `range` through `apply`; rewritten blocks lose
    /// their read errors. Behind the write cache when it runs, the change is
    /// volatile unless `stable` (Force Unit Access). A stable change — with
    /// `stable`, or with no cache running (write-through) — is synced to the
    /// backing before this returns: the interface completes it once it
    /// returns, and the guest counts on it surviving a crash of the host.
    fn change(
        &self,
        range: LbaRange,
        stable: bool,
        apply: impl FnOnce(&Backing) -> Result<(), BackingError>,
    ) -> Result<(), NamespaceError> {
        let sync = match &self.cache {
            Some(cache) if self.cache_enabled.load(Ordering::Acquire) => {
                let mut locked = cache.lock();
                locked.before_change(&self.backing, range.start.0, range.blocks)?;
                apply(&self.backing)?;
                if stable {
                    locked.made_stable(&self.backing, range.start.0, range.blocks)?;
                }
                stable
            }
            _ => {
                apply(&self.backing)?;
                true
            }
        };
        self.media.rewritten(range.start.0, range.blocks);
        if sync {
            // Outside the cache's lock: other commands go on meanwhile.
            self.backing.flush()?;
        }
        Ok(())
    }

    fn readable(&self, range: LbaRange) -> Result<(), NamespaceError> {
        match self
            .media
            .first_bad(range.start.0, range.blocks, MediaErrorKind::Read)
        {
            Some(lba) => Err(NamespaceError::UnrecoveredRead { lba }),
            None => Ok(()),
        }
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

    /// The drive's behaviours around the bytes: the write cache and power cuts,
    /// media errors, and deallocation.
    fn media_conformance(make: &dyn Fn(u64) -> Backing) {
        let bs = 512usize;
        let ns = Namespace::new(make(1 << 20), LbaSize::B512, false)
            .unwrap()
            .with_write_cache(64 * 512);
        let r = |lba, n| ns.check_range(Lba(lba), n).unwrap();
        let read = |lba, n| {
            let mut buf = vec![0u8; n as usize * bs];
            ns.read(ns.check_range(Lba(lba), n).unwrap(), &mut buf)
                .map(|()| buf)
        };
        let fill = |byte: u8, n: u64| vec![byte; n as usize * bs];

        // Flushed data survives a power cut; the rest is lost.
        ns.write(r(0, 4), &fill(1, 4)).unwrap();
        ns.flush().unwrap();
        ns.write(r(2, 4), &fill(2, 4)).unwrap();
        ns.write_zeroes(r(0, 1)).unwrap();
        let epoch = ns.power_epoch();
        let cut = ns.power_cut(None).unwrap();
        assert_eq!(cut.lost_blocks, 5);
        assert_eq!(ns.power_epoch(), epoch + 1);
        assert_eq!(read(0, 4).unwrap(), fill(1, 4));
        assert_eq!(read(4, 2).unwrap(), fill(0, 2));

        // Write-through (the cache off): every write is stable at once.
        ns.set_write_cache(false).unwrap();
        assert!(!ns.write_cache_enabled());
        ns.write(r(8, 2), &fill(3, 2)).unwrap();
        assert_eq!(ns.power_cut(None).unwrap().lost_blocks, 0);
        assert_eq!(read(8, 2).unwrap(), fill(3, 2));
        // Turning the cache off makes what it held stable.
        ns.set_write_cache(true).unwrap();
        ns.write(r(10, 1), &fill(4, 1)).unwrap();
        ns.set_write_cache(false).unwrap();
        ns.set_write_cache(true).unwrap();
        ns.power_cut(None).unwrap();
        assert_eq!(read(10, 1).unwrap(), fill(4, 1));

        // A torn cut keeps a leading part of each write, reproducibly.
        let torn = |seed| {
            ns.write(r(16, 8), &fill(0, 8)).unwrap();
            ns.flush().unwrap();
            ns.write(r(16, 8), &fill(5, 8)).unwrap();
            let cut = ns.power_cut(Some(seed)).unwrap();
            let back = read(16, 8).unwrap();
            let kept = back.chunks(bs).take_while(|b| b[0] == 5).count();
            assert!(back
                .chunks(bs)
                .skip(kept)
                .all(|b| b.iter().all(|&x| x == 0)));
            assert_eq!(kept as u64, cut.kept_blocks);
            kept
        };
        assert_eq!(torn(7), torn(7));
        assert!(
            (0..32)
                .map(torn)
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 2
        );

        // A read error fails reads until the block is rewritten.
        ns.media_errors().add(20, 2, MediaErrorKind::Read);
        assert!(matches!(
            read(19, 4),
            Err(NamespaceError::UnrecoveredRead { lba: 20 })
        ));
        ns.write(r(21, 1), &fill(6, 1)).unwrap();
        assert!(matches!(
            read(19, 4),
            Err(NamespaceError::UnrecoveredRead { lba: 20 })
        ));
        assert_eq!(read(21, 1).unwrap(), fill(6, 1));
        ns.write_zeroes(r(20, 1)).unwrap();
        assert!(read(19, 4).is_ok());
        // A write fault fails writes, leaves the data alone, and stays until cleared.
        ns.media_errors().add(30, 1, MediaErrorKind::Write);
        assert!(matches!(
            ns.write(r(29, 2), &fill(7, 2)),
            Err(NamespaceError::WriteFault { lba: 30 })
        ));
        assert_eq!(read(29, 2).unwrap(), fill(0, 2));
        assert!(read(30, 1).is_ok());
        assert_eq!(ns.media_errors().clear(None, None), 1);
        ns.write(r(29, 2), &fill(7, 2)).unwrap();
        ns.flush().unwrap();

        // Deallocation: whole granules only; or nothing at all with Keep.
        let ns = Namespace::new(make(1 << 20), LbaSize::B512, false)
            .unwrap()
            .with_deallocate(Deallocate::Zeroes)
            .with_geometry(Geometry {
                discard_granularity: 8 * 512,
                ..Geometry::default_for(LbaSize::B512)
            })
            .unwrap();
        let r = |lba, n| ns.check_range(Lba(lba), n).unwrap();
        ns.write(r(0, 32), &fill(8, 32)).unwrap();
        ns.deallocate(r(4, 20)).unwrap();
        let mut back = vec![0u8; 32 * bs];
        ns.read(r(0, 32), &mut back).unwrap();
        let blocks: Vec<u8> = back.chunks(bs).map(|b| b[0]).collect();
        assert_eq!(blocks[..8], [8; 8]);
        assert_eq!(blocks[8..24], [0; 16]);
        assert_eq!(blocks[24..], [8; 8]);
        let ns = Namespace::new(make(1 << 20), LbaSize::B512, false)
            .unwrap()
            .with_deallocate(Deallocate::Keep);
        let r = |lba, n| ns.check_range(Lba(lba), n).unwrap();
        ns.write(r(0, 4), &fill(9, 4)).unwrap();
        ns.deallocate(r(0, 4)).unwrap();
        let mut back = fill(0, 4);
        ns.read(r(0, 4), &mut back).unwrap();
        assert_eq!(back, fill(9, 4));
        // Write-zeroes always zeroes, whatever deallocation does.
        ns.write_zeroes(r(0, 4)).unwrap();
        ns.read(r(0, 4), &mut back).unwrap();
        assert_eq!(back, fill(0, 4));
    }

    #[test]
    fn memory_conformance() {
        conformance(&|size| Backing::memory(size).unwrap());
        media_conformance(&|size| Backing::memory(size).unwrap());
    }

    #[test]
    fn file_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::cell::Cell::new(0);
        let make = |size| {
            n.set(n.get() + 1);
            let path = dir.path().join(format!("disk{}", n.get()));
            Backing::file(&path, Some(size), false).unwrap()
        };
        conformance(&make);
        media_conformance(&make);
    }

    #[test]
    fn stable_changes_sync_a_file_backing_before_they_return() {
        let dir = tempfile::tempdir().unwrap();
        let file =
            |name: &str| Backing::file(&dir.path().join(name), Some(1 << 20), false).unwrap();
        let data = [7u8; 8 * 512];
        let changes = |ns: &Namespace| {
            let r = ns.check_range(Lba(0), 8).unwrap();
            ns.write(r, &data).unwrap();
            ns.write_zeroes(r).unwrap();
            ns.deallocate(r).unwrap();
        };

        // Behind a running cache only a write with Force Unit Access and a
        // flush sync the file.
        let ns = Namespace::new(file("cached"), LbaSize::B512, false)
            .unwrap()
            .with_write_cache(64 * 512);
        changes(&ns);
        assert_eq!(ns.syncs(), 0);
        ns.write_stable(ns.check_range(Lba(8), 8).unwrap(), &data)
            .unwrap();
        assert_eq!(ns.syncs(), 1);
        ns.flush().unwrap();
        assert_eq!(ns.syncs(), 2);
        // Write-through: turning the cache off syncs, then every change does.
        ns.set_write_cache(false).unwrap();
        assert_eq!(ns.syncs(), 3);
        changes(&ns);
        assert_eq!(ns.syncs(), 6);

        // No cache at all: every change.
        let ns = Namespace::new(file("uncached"), LbaSize::B512, false).unwrap();
        changes(&ns);
        assert_eq!(ns.syncs(), 3);

        // Memory has nothing to sync, and counts nothing.
        let ns = Namespace::new(Backing::memory(1 << 20).unwrap(), LbaSize::B512, false)
            .unwrap()
            .with_write_cache(64 * 512);
        ns.write_stable(ns.check_range(Lba(0), 8).unwrap(), &data)
            .unwrap();
        ns.flush().unwrap();
        ns.set_write_cache(false).unwrap();
        changes(&ns);
        assert_eq!(ns.syncs(), 0);
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
