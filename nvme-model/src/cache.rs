//! The volatile write cache: what writes changed, until a flush makes it stable.
//!
//! The backing always holds the newest data, so reads look nothing up. The
//! cache keeps the *stable* contents of every 4 KiB unit written since it was
//! last stable, an undo log:
//! - a flush forgets them: the new data is stable;
//! - a power cut writes them back: the new data is lost, and the media holds
//!   what it held at the last flush. A torn cut keeps, for each write, a random
//!   leading part of its blocks (sector granularity, the newest write deciding
//!   a block written twice), as a drive that lost power while writing its cache
//!   back would;
//! - a full cache destages its oldest writes: they become stable without a
//!   flush, as on a drive whose cache filled up. A command larger than the
//!   whole cache goes straight to stable media.
//!
//! The stable contents live in one arena of `capacity` units, reserved up
//! front and touched only as it fills, so a write costs one positioned read of
//! its units' old contents and no allocation.
//!
//! The log of writes (what a torn cut tears, the newest write of a block
//! deciding it) keeps only writes that are still the newest of some block: a
//! rewrite of cached blocks drops the writes it supersedes, as a drive's cache
//! overwrites an entry in place. So the log, like the arena, is bounded by
//! the blocks the cache holds, not by the number of writes, however a guest
//! rewrites without flushing.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use crate::backing::{Backing, BackingError};

/// The unit the cache keeps stable contents in, in bytes.
pub const UNIT: u64 = 4096;
const UNIT_BYTES: usize = UNIT as usize;

/// What a power cut did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PowerCut {
    /// Blocks put back to their stable contents.
    pub lost_blocks: u64,
    /// Blocks of volatile writes that reached the media anyway (torn cuts).
    pub kept_blocks: u64,
    /// Writes that were volatile.
    pub writes: u64,
}

/// What the cache holds, for status reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStatus {
    pub capacity_bytes: u64,
    /// Bytes whose stable contents differ, or may differ, from the media's.
    pub volatile_bytes: u64,
    pub volatile_writes: u64,
    /// Bytes made stable because the cache was full.
    pub destaged_bytes: u64,
}

#[derive(Debug)]
pub struct WriteCache {
    block: u64,
    /// In units.
    capacity: usize,
    /// The most blocks the log may have a newest write for: twice the
    /// capacity in blocks (a backstop; the units bound it first).
    log_blocks: u64,
    state: Mutex<State>,
}

/// A unit whose stable contents the cache keeps.
#[derive(Clone, Copy, Debug)]
struct Kept {
    /// The write that first changed it since it was stable.
    owner: u64,
    /// Where in the arena its stable contents are.
    slot: usize,
}

/// A write since the last flush, in blocks.
#[derive(Clone, Copy, Debug)]
struct Write {
    id: u64,
    start: u64,
    blocks: u64,
    /// Stable when it completed (Force Unit Access): a power cut keeps it.
    stable: bool,
    /// Of its blocks, how many it is still the newest write of.
    live: u64,
}

#[derive(Debug, Default)]
struct State {
    kept: HashMap<u64, Kept, BuildHasherDefault<UnitHasher>>,
    /// Stable contents, a unit per slot.
    arena: Vec<u8>,
    free: Vec<usize>,
    /// Writes since the last flush that are the newest write of some block,
    /// by id: oldest first.
    writes: BTreeMap<u64, Write>,
    /// The newest write of each block written since the last flush (and not
    /// destaged since).
    newest: HashMap<u64, u64, BuildHasherDefault<UnitHasher>>,
    next_write: u64,
    destaged: u64,
}

/// Unit numbers are well spread already: a multiply mixes them enough.
#[derive(Debug, Default)]
struct UnitHasher(u64);

impl Hasher for UnitHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The cache, locked for one command: its changes to the backing happen under
/// the lock, so a flush or power cut never sees half a command.
#[derive(Debug)]
pub struct Locked<'a> {
    cache: &'a WriteCache,
    state: MutexGuard<'a, State>,
}

impl WriteCache {
    /// A cache of `capacity` bytes (whole units, at least one) in front of a
    /// namespace of `block`-byte blocks.
    pub fn new(block: u64, capacity: u64) -> Self {
        let capacity = usize::try_from(capacity / UNIT)
            .unwrap_or(usize::MAX)
            .max(1);
        WriteCache {
            block,
            capacity,
            log_blocks: (capacity as u64).saturating_mul(UNIT).saturating_mul(2) / block.max(1),
            state: Mutex::new(State {
                // Reserved, not touched: memory is used as the cache fills.
                arena: Vec::with_capacity(capacity.saturating_mul(UNIT_BYTES)),
                ..State::default()
            }),
        }
    }

    pub fn lock(&self) -> Locked<'_> {
        Locked {
            cache: self,
            state: self.state.lock().unwrap_or_else(PoisonError::into_inner),
        }
    }

    pub fn status(&self) -> CacheStatus {
        let st = self.lock();
        CacheStatus {
            capacity_bytes: self.capacity as u64 * UNIT,
            volatile_bytes: st.state.kept.len() as u64 * UNIT,
            volatile_writes: st.state.writes.len() as u64,
            destaged_bytes: st.state.destaged * UNIT,
        }
    }

    /// The units that `blocks` blocks from `start` touch.
    fn units(&self, start: u64, blocks: u64) -> std::ops::Range<u64> {
        let from = start.saturating_mul(self.block);
        let to = start.saturating_add(blocks).saturating_mul(self.block);
        from / UNIT..to.div_ceil(UNIT)
    }
}

impl Locked<'_> {
    /// Before `blocks` blocks from `start` change: remembers what is stable of
    /// them. A command larger than the cache is stable at once, and so are the
    /// units it covers.
    pub fn before_change(
        &mut self,
        backing: &Backing,
        start: u64,
        blocks: u64,
    ) -> Result<(), BackingError> {
        if blocks == 0 {
            return Ok(());
        }
        let units = self.cache.units(start, blocks);
        let capacity = self.cache.capacity;
        if units.end - units.start > capacity as u64 {
            let State { kept, free, .. } = &mut *self.state;
            kept.retain(|u, k| {
                let covered = units.contains(u);
                if covered {
                    free.push(k.slot);
                }
                !covered
            });
            return Ok(());
        }
        // Room for every unit (and in the log for its blocks) first, by
        // destaging the oldest writes.
        let log_blocks = self.cache.log_blocks;
        while self.state.kept.len() + (units.end - units.start) as usize > capacity
            || (self.state.newest.len() as u64).saturating_add(blocks) > log_blocks
        {
            if !self.destage_oldest() {
                break;
            }
        }
        let st = &mut *self.state;
        let id = st.next_write;
        st.next_write += 1;
        let mut new = Vec::new();
        for u in units.clone() {
            if !st.kept.contains_key(&u) {
                let slot = st.alloc();
                st.kept.insert(u, Kept { owner: id, slot });
                new.push((u, slot));
            }
        }
        if let Err(e) = st.read_stable(backing, &new) {
            for (u, slot) in new {
                st.kept.remove(&u);
                st.free.push(slot);
            }
            return Err(e);
        }
        st.log(
            Write {
                id,
                start,
                blocks,
                stable: false,
                live: blocks,
            },
            |s, b| self.cache.units(s, b),
        );
        Ok(())
    }

    /// The blocks `before_change` was just told of hold their new contents
    /// and are stable (a write with Force Unit Access): the write is kept
    /// whole by a power cut, and the stable copies of its units take those
    /// blocks' new contents, so a later volatile write of them goes back to
    /// these. (A command larger than the cache was stable at once.)
    pub fn made_stable(
        &mut self,
        backing: &Backing,
        start: u64,
        blocks: u64,
    ) -> Result<(), BackingError> {
        let bs = self.cache.block;
        let st = &mut *self.state;
        let Some(w) = st
            .writes
            .values_mut()
            .next_back()
            .filter(|w| w.id + 1 == st.next_write && w.start == start && w.blocks == blocks)
        else {
            return Ok(());
        };
        w.stable = true;
        for u in self.cache.units(start, blocks) {
            let Some(k) = st.kept.get(&u).copied() else {
                continue;
            };
            let first = (u * UNIT / bs).max(start);
            let last = ((u + 1) * UNIT / bs).min(start + blocks);
            for b in first..last {
                let at = k.slot * UNIT_BYTES + (b * bs - u * UNIT) as usize;
                backing.read_at(b * bs, &mut st.arena[at..at + bs as usize])?;
            }
        }
        Ok(())
    }

    /// Everything volatile is now stable.
    pub fn flushed(&mut self) {
        let st = &mut *self.state;
        st.kept.clear();
        st.writes.clear();
        st.newest.clear();
        st.free.clear();
        st.arena.clear();
    }

    /// Power is lost: volatile blocks go back to their stable contents. With
    /// `tear`, each write keeps a leading part of its blocks, of a length
    /// drawn from `tear` (called with the write's block count, it returns how
    /// many to keep).
    pub fn power_cut(
        &mut self,
        backing: &Backing,
        mut tear: Option<&mut dyn FnMut(u64) -> u64>,
    ) -> Result<PowerCut, BackingError> {
        let bs = self.cache.block;
        let st = &mut *self.state;
        // How many leading blocks each write keeps; the newest write of a
        // block decides whether it keeps its new data.
        let kept_len: HashMap<u64, u64, BuildHasherDefault<UnitHasher>> = st
            .writes
            .values()
            .map(|w| {
                let kept = if w.stable {
                    w.blocks
                } else {
                    tear.as_mut().map_or(0, |t| t(w.blocks).min(w.blocks))
                };
                (w.id, kept)
            })
            .collect();
        let keep = |b: u64| {
            let id = *st.newest.get(&b)?;
            let w = st.writes.get(&id)?;
            Some(b - w.start < kept_len.get(&id).copied().unwrap_or(0))
        };
        let mut cut = PowerCut {
            writes: st.writes.len() as u64,
            ..PowerCut::default()
        };
        let size = backing.size();
        for (&u, k) in &st.kept {
            let unit = &st.arena[k.slot * UNIT_BYTES..][..UNIT_BYTES];
            let first = u * UNIT / bs;
            let last = ((u + 1) * UNIT).min(size) / bs;
            for b in first..last {
                match keep(b) {
                    Some(true) => cut.kept_blocks += 1,
                    Some(false) => {
                        let at = (b * bs - u * UNIT) as usize;
                        backing.write_at(b * bs, &unit[at..at + bs as usize])?;
                        cut.lost_blocks += 1;
                    }
                    // Not written since the unit was kept: as it was.
                    None => {}
                }
            }
        }
        self.flushed();
        Ok(cut)
    }
}

impl Locked<'_> {
    /// Makes the oldest write's units stable; false when there is none.
    fn destage_oldest(&mut self) -> bool {
        let Some((_, w)) = self.state.writes.pop_first() else {
            return false;
        };
        let st = &mut *self.state;
        for b in w.start..w.start + w.blocks {
            if st.newest.get(&b) == Some(&w.id) {
                st.newest.remove(&b);
            }
        }
        for u in self.cache.units(w.start, w.blocks) {
            if let Some(k) = st.kept.get(&u).copied().filter(|k| k.owner == w.id) {
                st.kept.remove(&u);
                st.free.push(k.slot);
                st.destaged += 1;
            }
        }
        true
    }
}

impl State {
    /// Logs a write as the newest of its blocks. A write left the newest of
    /// none leaves the log ([`State::drop_superseded`]). (`units` maps blocks
    /// to the units they touch.)
    fn log(&mut self, w: Write, units: impl Fn(u64, u64) -> std::ops::Range<u64>) {
        self.writes.insert(w.id, w);
        for b in w.start..w.start + w.blocks {
            let Some(old) = self.newest.insert(b, w.id) else {
                continue;
            };
            let Some(o) = self.writes.get_mut(&old) else {
                continue;
            };
            o.live -= 1;
            if o.live == 0 {
                let o = *o;
                self.drop_superseded(o, &units);
            }
        }
    }

    /// Takes `o`, the newest write of no block any more, out of the log. The
    /// units it was the first to change pass to the newest writer of its
    /// blocks in each (newer than `o`, so still in the log), so that
    /// destaging that one makes them stable.
    fn drop_superseded(&mut self, o: Write, units: impl Fn(u64, u64) -> std::ops::Range<u64>) {
        self.writes.remove(&o.id);
        let mut heirs: HashMap<u64, u64, BuildHasherDefault<UnitHasher>> = HashMap::default();
        for b in o.start..o.start + o.blocks {
            if let Some(&id) = self.newest.get(&b) {
                let u = units(b, 1).start;
                let heir = heirs.entry(u).or_insert(id);
                *heir = (*heir).max(id);
            }
        }
        for (u, heir) in heirs {
            if let Some(k) = self.kept.get_mut(&u).filter(|k| k.owner == o.id) {
                k.owner = heir;
            }
        }
    }

    /// A free slot in the arena, growing it (within its reservation) if none.
    fn alloc(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            let slot = self.arena.len() / UNIT_BYTES;
            self.arena.resize(self.arena.len() + UNIT_BYTES, 0);
            slot
        })
    }

    /// Reads the media's contents of `units` into their slots: one read per
    /// run of units that are adjacent on the media and in the arena.
    fn read_stable(
        &mut self,
        backing: &Backing,
        units: &[(u64, usize)],
    ) -> Result<(), BackingError> {
        let size = backing.size();
        let mut i = 0;
        while i < units.len() {
            let (u, slot) = units[i];
            let mut n = 1;
            while i + n < units.len() && units[i + n] == (u + n as u64, slot + n) {
                n += 1;
            }
            let from = u * UNIT;
            let len = (n as u64 * UNIT).min(size - from) as usize;
            backing.read_at(from, &mut self.arena[slot * UNIT_BYTES..][..len])?;
            i += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of 512 bytes, eight to a unit; a cache of eight units.
    fn setup(block: u64) -> (Backing, WriteCache) {
        (
            Backing::memory(64 * UNIT).unwrap(),
            WriteCache::new(block, 8 * UNIT),
        )
    }

    fn write(backing: &Backing, cache: &WriteCache, start: u64, blocks: u64, byte: u8) {
        let bs = cache.block;
        let mut c = cache.lock();
        c.before_change(backing, start, blocks).unwrap();
        backing
            .write_at(start * bs, &vec![byte; (blocks * bs) as usize])
            .unwrap();
    }

    fn block(backing: &Backing, bs: u64, b: u64) -> u8 {
        let mut buf = vec![0u8; bs as usize];
        backing.read_at(b * bs, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == buf[0]), "block {b} is mixed");
        buf[0]
    }

    /// A write with Force Unit Access survives a cut, whole even when the
    /// cut tears writes; the volatile blocks around it in its unit, and a
    /// volatile rewrite of it, go back: the rewrite to the stable write's data.
    #[test]
    fn a_stable_write_survives_a_cut_and_its_neighbours_do_not() {
        let (backing, cache) = setup(512);
        write(&backing, &cache, 0, 8, 1);
        cache.lock().flushed();
        write(&backing, &cache, 0, 2, 2);
        {
            let mut c = cache.lock();
            c.before_change(&backing, 2, 2).unwrap();
            backing.write_at(2 * 512, &[3; 1024]).unwrap();
            c.made_stable(&backing, 2, 2).unwrap();
        }
        write(&backing, &cache, 3, 1, 4);
        write(&backing, &cache, 4, 1, 5);
        let mut tear_all = |_| 0;
        cache
            .lock()
            .power_cut(&backing, Some(&mut tear_all))
            .unwrap();
        let blocks: Vec<u8> = (0..6).map(|b| block(&backing, 512, b)).collect();
        assert_eq!(blocks, [1, 1, 3, 3, 1, 1]);
    }

    #[test]
    fn a_cut_loses_what_was_not_flushed() {
        let (backing, cache) = setup(512);
        write(&backing, &cache, 0, 2, 1);
        cache.lock().flushed();
        write(&backing, &cache, 1, 2, 2);
        write(&backing, &cache, 2, 1, 3);
        write(&backing, &cache, 20, 1, 4);
        let status = cache.status();
        assert_eq!(
            (status.volatile_bytes, status.volatile_writes),
            (2 * UNIT, 3)
        );
        let cut = cache.lock().power_cut(&backing, None).unwrap();
        assert_eq!(
            cut,
            PowerCut {
                lost_blocks: 3,
                kept_blocks: 0,
                writes: 3
            }
        );
        assert_eq!(
            [0, 1, 2, 3, 20].map(|b| block(&backing, 512, b)),
            [1, 1, 0, 0, 0]
        );
        assert_eq!(cache.status().volatile_bytes, 0);
    }

    #[test]
    fn a_torn_cut_keeps_a_leading_part_of_each_write() {
        let (backing, cache) = setup(512);
        write(&backing, &cache, 0, 4, 1);
        write(&backing, &cache, 10, 4, 2);
        let mut keep = |n: u64| n / 2;
        let cut = cache.lock().power_cut(&backing, Some(&mut keep)).unwrap();
        assert_eq!((cut.kept_blocks, cut.lost_blocks), (4, 4));
        let blocks = |from| {
            (from..from + 4)
                .map(|b| block(&backing, 512, b))
                .collect::<Vec<_>>()
        };
        assert_eq!(blocks(0), [1, 1, 0, 0]);
        assert_eq!(blocks(10), [2, 2, 0, 0]);
    }

    #[test]
    fn the_newest_write_of_a_block_decides_a_torn_cut() {
        let (backing, cache) = setup(512);
        write(&backing, &cache, 0, 4, 1);
        write(&backing, &cache, 2, 1, 2);
        // The first write keeps all its blocks, the second none.
        let mut calls = 0;
        let mut keep = |n: u64| {
            calls += 1;
            if calls == 1 {
                n
            } else {
                0
            }
        };
        cache.lock().power_cut(&backing, Some(&mut keep)).unwrap();
        assert_eq!(
            (0..4).map(|b| block(&backing, 512, b)).collect::<Vec<_>>(),
            [1, 1, 0, 1]
        );
    }

    #[test]
    fn a_full_cache_destages_its_oldest_writes() {
        let (backing, cache) = setup(4096);
        write(&backing, &cache, 0, 4, 1);
        write(&backing, &cache, 4, 4, 2);
        write(&backing, &cache, 8, 2, 3);
        let status = cache.status();
        assert_eq!(
            (status.volatile_bytes, status.destaged_bytes),
            (6 * UNIT, 4 * UNIT)
        );
        cache.lock().power_cut(&backing, None).unwrap();
        assert_eq!([0, 4, 8].map(|b| block(&backing, 4096, b)), [1, 0, 0]);
    }

    #[test]
    fn a_command_larger_than_the_cache_is_stable_at_once() {
        let (backing, cache) = setup(4096);
        write(&backing, &cache, 3, 1, 1);
        write(&backing, &cache, 0, 16, 2);
        assert_eq!(cache.status().volatile_bytes, 0);
        cache.lock().power_cut(&backing, None).unwrap();
        assert_eq!(block(&backing, 4096, 3), 2);
    }

    #[test]
    fn rewrites_keep_the_first_stable_contents() {
        let (backing, cache) = setup(512);
        write(&backing, &cache, 5, 1, 1);
        cache.lock().flushed();
        write(&backing, &cache, 5, 1, 2);
        write(&backing, &cache, 5, 1, 3);
        cache.lock().power_cut(&backing, None).unwrap();
        assert_eq!(block(&backing, 512, 5), 1);
    }

    /// A guest that rewrites cached blocks without ever flushing: the log
    /// keeps only the newest write of each block (it used to grow by one
    /// entry per write, without bound), nothing is destaged, and a cut still
    /// puts every block back to its contents at the flush.
    #[test]
    fn rewrites_without_a_flush_keep_the_log_within_the_blocks_cached() {
        let (backing, cache) = setup(512);
        write(&backing, &cache, 0, 8, 1);
        cache.lock().flushed();
        for i in 0..100_000u64 {
            write(&backing, &cache, i % 16, 1 + i % 3, 2 + (i % 200) as u8);
        }
        let status = cache.status();
        assert!(status.volatile_writes <= 18, "{status:?}");
        assert_eq!(
            (status.volatile_bytes, status.destaged_bytes),
            (3 * UNIT, 0),
            "{status:?}"
        );
        assert!(cache.lock().state.newest.len() <= 18);
        let cut = cache.lock().power_cut(&backing, None).unwrap();
        assert_eq!(cut.lost_blocks, 18, "{cut:?}");
        let blocks: Vec<u8> = (0..18).map(|b| block(&backing, 512, b)).collect();
        assert_eq!(blocks, [[1; 8].as_slice(), &[0; 10]].concat());
    }

    /// Units pass from a superseded write to the write that superseded it, so
    /// a full cache still destages them: the arena never outgrows the cache.
    #[test]
    fn superseded_writes_hand_their_units_on_and_a_full_cache_still_destages() {
        let (backing, cache) = setup(512);
        // Units 0-3, rewritten whole: the first write leaves the log.
        write(&backing, &cache, 0, 32, 1);
        write(&backing, &cache, 0, 32, 2);
        write(&backing, &cache, 32, 32, 3);
        assert_eq!(cache.status().volatile_writes, 2);
        // Eight new units: everything before must make room.
        write(&backing, &cache, 64, 64, 4);
        let status = cache.status();
        assert_eq!(
            (status.volatile_bytes, status.destaged_bytes),
            (8 * UNIT, 8 * UNIT),
            "{status:?}"
        );
        assert!(cache.lock().state.arena.capacity() <= 8 * UNIT_BYTES);
    }

    #[test]
    fn slots_are_reused_after_a_flush() {
        let (backing, cache) = setup(4096);
        for round in 0..5 {
            write(&backing, &cache, round, 8, round as u8);
            cache.lock().flushed();
        }
        assert!(cache.lock().state.arena.capacity() <= 8 * UNIT_BYTES);
    }
}
