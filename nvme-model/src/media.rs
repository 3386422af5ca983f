//! Media errors: blocks that cannot be read back (an unrecovered read error)
//! or cannot be written (a write fault), as a worn or damaged drive has them.
//!
//! A read error stays until the blocks are rewritten (a write, write-zeroes or
//! deallocate over them remaps them, as a drive does) or it is cleared; a write
//! fault stays until it is cleared.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};

use serde::{Deserialize, Serialize};

/// What goes wrong on a bad block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MediaErrorKind {
    /// Reads fail: NVMe "Unrecovered Read Error".
    Read,
    /// Writes fail: NVMe "Write Fault".
    Write,
}

impl MediaErrorKind {
    pub fn name(self) -> &'static str {
        match self {
            MediaErrorKind::Read => "read",
            MediaErrorKind::Write => "write",
        }
    }
}

impl std::str::FromStr for MediaErrorKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(MediaErrorKind::Read),
            "write" => Ok(MediaErrorKind::Write),
            _ => Err(format!("{s:?} is not a media error kind: read or write")),
        }
    }
}

/// A run of bad blocks: `blocks` from `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BadRange {
    pub start: u64,
    pub blocks: u64,
    pub kind: MediaErrorKind,
}

impl BadRange {
    fn end(&self) -> u64 {
        self.start.saturating_add(self.blocks)
    }

    /// The first block this range shares with `blocks` blocks from `start`.
    fn first_common(&self, start: u64, blocks: u64) -> Option<u64> {
        let from = self.start.max(start);
        (from < self.end().min(start.saturating_add(blocks))).then_some(from)
    }
}

/// The bad blocks of a namespace. Checking costs one atomic load while there
/// are none.
#[derive(Debug, Default)]
pub struct MediaErrors {
    any: AtomicBool,
    ranges: RwLock<Vec<BadRange>>,
}

impl MediaErrors {
    /// Marks `blocks` blocks from `start` bad (the caller checked the range).
    pub fn add(&self, start: u64, blocks: u64, kind: MediaErrorKind) {
        if blocks == 0 {
            return;
        }
        let mut ranges = self.ranges.write().unwrap_or_else(PoisonError::into_inner);
        ranges.push(BadRange {
            start,
            blocks,
            kind,
        });
        self.any.store(true, Ordering::Release);
    }

    /// Clears the given kind (or all kinds) of error on blocks from `start`
    /// (or everywhere); returns the number of bad blocks made good.
    pub fn clear(&self, within: Option<(u64, u64)>, kind: Option<MediaErrorKind>) -> u64 {
        let (start, blocks) = within.unwrap_or((0, u64::MAX));
        self.remove(start, blocks, |k| kind.is_none_or(|want| want == k))
    }

    /// The blocks from `start` were rewritten: their read errors are gone.
    pub fn rewritten(&self, start: u64, blocks: u64) {
        if self.any.load(Ordering::Acquire) {
            self.remove(start, blocks, |k| k == MediaErrorKind::Read);
        }
    }

    /// The first block from `start` that fails an access of `kind`.
    pub fn first_bad(&self, start: u64, blocks: u64, kind: MediaErrorKind) -> Option<u64> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let ranges = self.ranges.read().unwrap_or_else(PoisonError::into_inner);
        ranges
            .iter()
            .filter(|r| r.kind == kind)
            .filter_map(|r| r.first_common(start, blocks))
            .min()
    }

    pub fn list(&self) -> Vec<BadRange> {
        let mut all = self
            .ranges
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        all.sort_by_key(|r| (r.start, r.kind.name()));
        all
    }

    fn remove(&self, start: u64, blocks: u64, pick: impl Fn(MediaErrorKind) -> bool) -> u64 {
        let end = start.saturating_add(blocks);
        let mut ranges = self.ranges.write().unwrap_or_else(PoisonError::into_inner);
        let mut cleared = 0;
        let mut kept = Vec::with_capacity(ranges.len());
        for r in ranges.drain(..) {
            if !pick(r.kind) || r.first_common(start, blocks).is_none() {
                kept.push(r);
                continue;
            }
            // Keep what lies before and after the cleared blocks.
            let cut_from = r.start.max(start);
            let cut_to = r.end().min(end);
            cleared += cut_to - cut_from;
            if r.start < cut_from {
                kept.push(BadRange {
                    blocks: cut_from - r.start,
                    ..r
                });
            }
            if cut_to < r.end() {
                kept.push(BadRange {
                    start: cut_to,
                    blocks: r.end() - cut_to,
                    ..r
                });
            }
        }
        *ranges = kept;
        self.any.store(!ranges.is_empty(), Ordering::Release);
        cleared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MediaErrorKind::{Read, Write};

    #[test]
    fn reads_fail_until_rewritten() {
        let m = MediaErrors::default();
        assert_eq!(m.first_bad(0, u64::MAX, Read), None);
        m.add(10, 5, Read);
        assert_eq!(m.first_bad(0, 10, Read), None);
        assert_eq!(m.first_bad(0, 11, Read), Some(10));
        assert_eq!(m.first_bad(12, 100, Read), Some(12));
        assert_eq!(m.first_bad(15, 100, Read), None);
        assert_eq!(m.first_bad(10, 5, Write), None);
        // Rewriting the middle leaves both ends bad.
        m.rewritten(11, 2);
        assert_eq!(m.first_bad(11, 2, Read), None);
        assert_eq!(m.first_bad(10, 1, Read), Some(10));
        assert_eq!(m.first_bad(13, 1, Read), Some(13));
        assert_eq!(m.list().len(), 2);
        m.rewritten(0, 100);
        assert!(m.list().is_empty());
        assert_eq!(m.first_bad(0, u64::MAX, Read), None);
    }

    #[test]
    fn write_faults_stay_until_cleared() {
        let m = MediaErrors::default();
        m.add(0, 8, Write);
        m.add(4, 8, Read);
        m.rewritten(0, 100);
        assert_eq!(m.first_bad(0, 100, Write), Some(0));
        assert_eq!(m.first_bad(0, 100, Read), None);
        assert_eq!(m.clear(Some((2, 2)), None), 2);
        assert_eq!(m.first_bad(2, 2, Write), None);
        assert_eq!(m.clear(None, Some(Write)), 6);
        assert_eq!(m.first_bad(0, u64::MAX, Write), None);
    }

    #[test]
    fn ranges_at_the_end_of_u64_do_not_overflow() {
        let m = MediaErrors::default();
        m.add(u64::MAX - 1, 10, Read);
        assert_eq!(m.first_bad(u64::MAX - 1, 1, Read), Some(u64::MAX - 1));
        assert_eq!(m.clear(Some((u64::MAX - 5, u64::MAX)), None), 1);
    }
}
