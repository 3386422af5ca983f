//! Guest-physical addresses and the segments a request moves data through.

use std::fmt;
use std::ops::Range;

use serde::{Serialize, Serializer};

use vm_memory::{GuestAddress, GuestMemoryBackend};

/// A guest-physical address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

impl Gpa {
    pub fn checked_add(self, bytes: u64) -> Option<Gpa> {
        self.0.checked_add(bytes).map(Gpa)
    }
}

impl From<Gpa> for GuestAddress {
    fn from(gpa: Gpa) -> Self {
        GuestAddress(gpa.0)
    }
}

/// Addresses read best in hex: they serialise as `"0x1f2c000"`.
impl Serialize for Gpa {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A contiguous range of guest-physical memory that a request reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Segment {
    pub gpa: Gpa,
    pub len: u32,
}

impl Segment {
    pub fn new(gpa: Gpa, len: u32) -> Self {
        Segment { gpa, len }
    }

    pub fn len_usize(&self) -> usize {
        // A u32 always fits in usize on the 64-bit hosts dmaprobe runs on.
        self.len as usize
    }

    /// The guest page numbers (of `page_size` bytes) the segment touches.
    pub fn pages(&self, page_size: u64) -> Range<u64> {
        let first = self.gpa.0 / page_size;
        let end = self.gpa.0.saturating_add(u64::from(self.len).max(1) - 1) / page_size + 1;
        first..end
    }

    /// Whether every byte of the segment is backed by guest memory.
    pub fn is_in<M: GuestMemoryBackend>(&self, mem: &M) -> bool {
        mem.check_range(self.gpa.into(), self.len_usize())
    }
}

/// The total length of `segments` in bytes.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// The guest pages (of `page_size` bytes) that `segments` touch, each once:
/// sorted, disjoint ranges of page numbers, adjacent ones joined. However
/// often segments name the same pages, there are no more ranges than
/// distinct pages.
pub fn distinct_pages(segments: &[Segment], page_size: u64) -> Vec<Range<u64>> {
    let mut pages: Vec<Range<u64>> = segments.iter().map(|s| s.pages(page_size)).collect();
    pages.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in pages {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn segments_must_lie_in_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        assert!(Segment::new(Gpa(0), 0x2000).is_in(&mem));
        assert!(Segment::new(Gpa(0x1000), 0x1000).is_in(&mem));
        assert!(!Segment::new(Gpa(0x1000), 0x1001).is_in(&mem));
        assert!(!Segment::new(Gpa(u64::MAX), 1).is_in(&mem));
    }

    #[test]
    fn pages_touched() {
        assert_eq!(Segment::new(Gpa(0x1000), 0x1000).pages(4096), 1..2);
        assert_eq!(Segment::new(Gpa(0x1200), 0x1000).pages(4096), 1..3);
        assert_eq!(Segment::new(Gpa(0x1fff), 1).pages(4096), 1..2);
    }

    #[test]
    fn distinct_pages_are_sorted_joined_and_named_once() {
        let seg = |gpa, len| Segment::new(Gpa(gpa), len);
        // Two pages named 65,536 times, alternating, as a PRP list may.
        let prp: Vec<_> = (0..65_536u64)
            .map(|i| seg(0x1000 + (i % 2) * 0x2000, 4096))
            .collect();
        assert_eq!(distinct_pages(&prp, 4096), vec![1..2, 3..4]);
        // Out of order, overlapping, adjacent and contained ones join.
        let segs = [
            seg(0x9000, 0x1000),
            seg(0x1800, 0x1000),
            seg(0x3000, 0x1000),
            seg(0x2000, 0x100),
            seg(0x8000, 0x2000),
            seg(0x20_0000, 1),
        ];
        assert_eq!(distinct_pages(&segs, 4096), vec![1..4, 8..10, 0x200..0x201]);
        assert_eq!(distinct_pages(&[], 4096), vec![]);
        // The last page of the address space.
        assert_eq!(
            distinct_pages(&[seg(u64::MAX, 1), seg(u64::MAX - 4095, 4096)], 4096),
            vec![u64::MAX / 4096..u64::MAX / 4096 + 1]
        );
    }
}
