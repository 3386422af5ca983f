//! The volatile write cache: what writes changed, until a flush makes it stable.
//!
//! The backing always holds the newest data, so reads look nothing up. The
//! cache keeps the *stable* contents of every block written since it was last
//! stable, an undo log:
//! - a flush forgets them: the new data is stable;
//! - a power cut writes them back: the new data is lost, and the media holds
//!   what it held at the last flush. A torn cut keeps, for each write, a random
//!   leading part of the blocks it changed (sector granularity, the order in a
//!   write kept), as a drive that lost power while destaging would;
//! - a full cache destages its oldest writes: they become stable without a
//!   flush, as on a drive whose cache filled up. A command larger than the
//!   whole cache goes straight to stable media.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;

use crate::backing::{Backing, BackingError};

/// What a power cut did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PowerCut {
    /// Blocks put back to their stable contents.
    pub lost_blocks: u64,
    /// Blocks of volatile writes that reached the media anyway (torn cuts).
    pub kept_blocks: u64,
    /// Volatile writes: those that first changed a block since it was stable.
    pub writes: u64,
}

/// What the cache holds, for status reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStatus {
    pub capacity_blocks: u64,
    pub volatile_blocks: u64,
    pub volatile_writes: u64,
    /// Blocks made stable because the cache was full.
    pub destaged_blocks: u64,
}

#[derive(Debug)]
pub struct WriteCache {
    block: usize,
    capacity: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The stable contents of each volatile block, with the write that first
    /// changed it since it was stable.
    stable: HashMap<u64, (u64, Box<[u8]>)>,
    /// Volatile writes, oldest first: each with the blocks it first changed, in
    /// ascending order.
    writes: VecDeque<(u64, Vec<u64>)>,
    next_write: u64,
    destaged: u64,
}

/// The cache, locked for one command: its changes to the backing happen under
/// the lock, so a flush or power cut never sees half a command.
#[derive(Debug)]
pub struct Locked<'a> {
    cache: &'a WriteCache,
    state: MutexGuard<'a, State>,
}

impl WriteCache {
    /// A cache of `capacity` blocks of `block` bytes.
    pub fn new(block: usize, capacity: usize) -> Self {
        WriteCache {
            block,
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
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
            capacity_blocks: self.capacity as u64,
            volatile_blocks: st.state.stable.len() as u64,
            volatile_writes: st.state.writes.len() as u64,
            destaged_blocks: st.state.destaged,
        }
    }
}

impl Locked<'_> {
    /// Before `blocks` blocks from `start` change: remembers what is stable of
    /// them. A command larger than the cache is stable at once, and so are the
    /// blocks it covers.
    pub fn before_change(
        &mut self,
        backing: &Backing,
        start: u64,
        blocks: u64,
    ) -> Result<(), BackingError> {
        let bs = self.cache.block;
        let st = &mut *self.state;
        if blocks > self.cache.capacity as u64 {
            let end = start.saturating_add(blocks);
            st.stable.retain(|b, _| !(start..end).contains(b));
            return Ok(());
        }
        let new: Vec<u64> = (start..start + blocks)
            .filter(|b| !st.stable.contains_key(b))
            .collect();
        let (Some(&lo), Some(&hi)) = (new.first(), new.last()) else {
            return Ok(());
        };
        // One read of the span that holds them (at most the cache's size).
        let mut old = vec![0u8; (hi - lo + 1) as usize * bs];
        backing.read_at(lo * bs as u64, &mut old)?;
        let id = st.next_write;
        st.next_write += 1;
        for &b in &new {
            let at = (b - lo) as usize * bs;
            st.stable.insert(b, (id, old[at..at + bs].into()));
        }
        st.writes.push_back((id, new));
        self.destage_overflow();
        Ok(())
    }

    /// Everything volatile is now stable.
    pub fn flushed(&mut self) {
        self.state.stable.clear();
        self.state.writes.clear();
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
        let bs = self.cache.block as u64;
        let st = &mut *self.state;
        let mut cut = PowerCut {
            writes: st.writes.len() as u64,
            ..PowerCut::default()
        };
        for (id, blocks) in &st.writes {
            let mine: Vec<u64> = blocks
                .iter()
                .copied()
                .filter(|b| st.stable.get(b).is_some_and(|(w, _)| w == id))
                .collect();
            let keep = tear
                .as_mut()
                .map_or(0, |t| t(mine.len() as u64).min(mine.len() as u64));
            for (i, b) in mine.iter().enumerate() {
                if (i as u64) < keep {
                    cut.kept_blocks += 1;
                } else if let Some((_, data)) = st.stable.get(b) {
                    backing.write_at(b * bs, data)?;
                    cut.lost_blocks += 1;
                }
            }
        }
        st.stable.clear();
        st.writes.clear();
        Ok(cut)
    }

    fn destage_overflow(&mut self) {
        let st = &mut *self.state;
        while st.stable.len() > self.cache.capacity {
            let Some((id, blocks)) = st.writes.pop_front() else {
                break;
            };
            for b in blocks {
                if st.stable.get(&b).is_some_and(|(w, _)| *w == id) {
                    st.stable.remove(&b);
                    st.destaged += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 512;

    fn setup() -> (Backing, WriteCache) {
        (
            Backing::memory(64 * BS as u64).unwrap(),
            WriteCache::new(BS, 8),
        )
    }

    fn write(backing: &Backing, cache: &WriteCache, start: u64, blocks: u64, byte: u8) {
        let mut c = cache.lock();
        c.before_change(backing, start, blocks).unwrap();
        backing
            .write_at(start * BS as u64, &vec![byte; blocks as usize * BS])
            .unwrap();
    }

    fn block(backing: &Backing, b: u64) -> u8 {
        let mut buf = [0u8; BS];
        backing.read_at(b * BS as u64, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == buf[0]), "block {b} is mixed");
        buf[0]
    }

    #[test]
    fn a_cut_loses_what_was_not_flushed() {
        let (backing, cache) = setup();
        write(&backing, &cache, 0, 2, 1);
        cache.lock().flushed();
        write(&backing, &cache, 1, 2, 2);
        write(&backing, &cache, 2, 1, 3);
        assert_eq!(cache.status().volatile_blocks, 2);
        let cut = cache.lock().power_cut(&backing, None).unwrap();
        assert_eq!(
            cut,
            PowerCut {
                lost_blocks: 2,
                kept_blocks: 0,
                writes: 1
            }
        );
        assert_eq!([0, 1, 2].map(|b| block(&backing, b)), [1, 1, 0]);
        assert_eq!(cache.status().volatile_blocks, 0);
    }

    #[test]
    fn a_torn_cut_keeps_a_leading_part_of_each_write() {
        let (backing, cache) = setup();
        write(&backing, &cache, 0, 4, 1);
        write(&backing, &cache, 10, 4, 2);
        let mut keep = |n: u64| n / 2;
        let cut = cache.lock().power_cut(&backing, Some(&mut keep)).unwrap();
        assert_eq!((cut.kept_blocks, cut.lost_blocks), (4, 4));
        assert_eq!(
            (0..4).map(|b| block(&backing, b)).collect::<Vec<_>>(),
            [1, 1, 0, 0]
        );
        assert_eq!(
            (10..14).map(|b| block(&backing, b)).collect::<Vec<_>>(),
            [2, 2, 0, 0]
        );
    }

    #[test]
    fn a_full_cache_destages_its_oldest_writes() {
        let (backing, cache) = setup();
        write(&backing, &cache, 0, 4, 1);
        write(&backing, &cache, 4, 4, 2);
        write(&backing, &cache, 8, 2, 3);
        let status = cache.status();
        assert_eq!((status.volatile_blocks, status.destaged_blocks), (6, 4));
        cache.lock().power_cut(&backing, None).unwrap();
        assert_eq!([0, 4, 8].map(|b| block(&backing, b)), [1, 0, 0]);
    }

    #[test]
    fn a_command_larger_than_the_cache_is_stable_at_once() {
        let (backing, cache) = setup();
        write(&backing, &cache, 3, 1, 1);
        write(&backing, &cache, 0, 16, 2);
        assert_eq!(cache.status().volatile_blocks, 0);
        cache.lock().power_cut(&backing, None).unwrap();
        assert_eq!(block(&backing, 3), 2);
    }

    #[test]
    fn rewrites_keep_the_first_stable_contents() {
        let (backing, cache) = setup();
        write(&backing, &cache, 5, 1, 1);
        cache.lock().flushed();
        write(&backing, &cache, 5, 1, 2);
        write(&backing, &cache, 5, 1, 3);
        assert_eq!(cache.status().volatile_writes, 1);
        cache.lock().power_cut(&backing, None).unwrap();
        assert_eq!(block(&backing, 5), 1);
    }
}
