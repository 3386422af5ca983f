//! PRP walking: where in guest memory a command's data lies.
//!
//! A command names its data with two Physical Region Page entries (NVMe 1.4,
//! 4.3). PRP1 points at the first byte and may start inside a page; the data
//! continues to the end of that page. If one more page is enough, PRP2 points
//! at it; otherwise PRP2 points at a PRP list: page pointers, eight bytes each,
//! to the end of the list's page, where the last entry points at the next page
//! of the list when more are needed. Every page pointer but PRP1 is
//! page-aligned. The memory page is 4 KiB: the controller offers CC.MPS 0 only.
//!
//! [`segments`] turns PRP1, PRP2 and a length into the merged guest-physical
//! [`Segment`]s the data moves through, reading list pages from guest memory,
//! or says what was wrong with them.

use dma::{Gpa, Segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::status::NvmeStatus;

/// The memory page size (CC.MPS 0).
pub const PAGE: u64 = 4096;
const PAGE_MASK: u64 = PAGE - 1;
/// A PRP entry's size in a list.
const ENTRY: u64 = 8;
/// The most bytes any command moves, whatever the caller allows: 65536
/// blocks of 4 KiB (the most one read or write can name). It bounds the list
/// entries a walk reads.
pub const MAX_TRANSFER: u64 = 1 << 28;

/// What was wrong with a command's PRPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrpError {
    #[error("PRP1 {0} is not dword-aligned")]
    Prp1Unaligned(Gpa),
    #[error("PRP entry {0} is not page-aligned")]
    EntryUnaligned(Gpa),
    #[error("PRP list pointer {0} is not qword-aligned")]
    ListUnaligned(Gpa),
    #[error("PRP list at {0} lies outside guest memory")]
    ListOutside(Gpa),
    #[error("Data at {gpa} of {len} bytes lies outside guest memory")]
    DataOutside { gpa: Gpa, len: u32 },
    #[error("PRP entry {0} runs past the end of the address space")]
    Overflow(Gpa),
    #[error("Transfer of {len} bytes is larger than the limit of {max}")]
    TooLong { len: u64, max: u64 },
}

impl PrpError {
    /// The status the command completes with.
    pub fn status(self) -> NvmeStatus {
        match self {
            PrpError::Prp1Unaligned(_)
            | PrpError::EntryUnaligned(_)
            | PrpError::ListUnaligned(_) => NvmeStatus::PrpOffsetInvalid,
            PrpError::ListOutside(_) | PrpError::DataOutside { .. } | PrpError::Overflow(_) => {
                NvmeStatus::DataTransferError
            }
            PrpError::TooLong { .. } => NvmeStatus::InvalidField,
        }
    }
}

/// The guest-physical segments of a transfer of `len` bytes described by
/// `prp1` and `prp2`, in order, with neighbouring pages merged. `max` is the
/// most bytes a command may move (MDTS, or the controller's own cap); it also
/// bounds how many list entries are read. A zero length names no memory and
/// PRPs are not looked at.
pub fn segments<M: GuestMemoryBackend>(
    mem: &M,
    prp1: u64,
    prp2: u64,
    len: u64,
    max: u64,
) -> Result<Vec<Segment>, PrpError> {
    let max = max.min(MAX_TRANSFER);
    if len > max {
        return Err(PrpError::TooLong { len, max });
    }
    let mut out = Segments::default();
    if len == 0 {
        return Ok(out.0);
    }
    if prp1 & 3 != 0 {
        return Err(PrpError::Prp1Unaligned(Gpa(prp1)));
    }
    let first = len.min(PAGE - (prp1 & PAGE_MASK));
    out.push(prp1, first)?;
    let mut left = len - first;
    if left > 0 && left <= PAGE {
        page_aligned(prp2)?;
        out.push(prp2, left)?;
    } else if left > PAGE {
        if prp2 & (ENTRY - 1) != 0 {
            return Err(PrpError::ListUnaligned(Gpa(prp2)));
        }
        let mut list = prp2;
        let mut entries = [0u8; PAGE as usize];
        while left > 0 {
            // The entries this page of the list holds; the last of them points
            // at the next page when the data needs more than it holds.
            let room = (PAGE - (list & PAGE_MASK)) / ENTRY;
            let needed = left.div_ceil(PAGE);
            let (data, chained) = if needed <= room {
                (needed, false)
            } else {
                (room - 1, true)
            };
            let bytes = &mut entries[..to_usize((data + u64::from(chained)) * ENTRY)];
            mem.read_slice(bytes, GuestAddress(list))
                .map_err(|_| PrpError::ListOutside(Gpa(list)))?;
            let mut pointers = bytes
                .chunks_exact(to_usize(ENTRY))
                .map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()));
            for entry in pointers.by_ref().take(to_usize(data)) {
                page_aligned(entry)?;
                let n = left.min(PAGE);
                out.push(entry, n)?;
                left -= n;
            }
            if chained {
                let next = pointers.next().unwrap_or_default();
                page_aligned(next)?;
                list = next;
            }
        }
    }
    for seg in &out.0 {
        if !seg.is_in(mem) {
            return Err(PrpError::DataOutside {
                gpa: seg.gpa,
                len: seg.len,
            });
        }
    }
    Ok(out.0)
}

fn page_aligned(entry: u64) -> Result<(), PrpError> {
    if entry & PAGE_MASK == 0 {
        Ok(())
    } else {
        Err(PrpError::EntryUnaligned(Gpa(entry)))
    }
}

/// At most one page's worth: always fits.
fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Segments under construction: a piece that starts where the last one ends
/// extends it.
#[derive(Default)]
struct Segments(Vec<Segment>);

impl Segments {
    /// Appends `len` (1 to [`PAGE`]) bytes at `gpa`.
    fn push(&mut self, gpa: u64, len: u64) -> Result<(), PrpError> {
        gpa.checked_add(len - 1)
            .ok_or(PrpError::Overflow(Gpa(gpa)))?;
        let len = u32::try_from(len).map_err(|_| PrpError::Overflow(Gpa(gpa)))?;
        if let Some(last) = self.0.last_mut() {
            let end = last.gpa.0.checked_add(u64::from(last.len));
            if end == Some(gpa) {
                if let Some(merged) = last.len.checked_add(len) {
                    last.len = merged;
                    return Ok(());
                }
            }
        }
        self.0.push(Segment::new(Gpa(gpa), len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::GuestMemoryMmap;

    const MIB: u64 = 1 << 20;
    const MAX: u64 = 4 * MIB;

    /// 4 MiB of guest memory at 0, and a 64 KiB region at 16 MiB: addresses
    /// can fall in the hole between them or past the end.
    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 4 << 20),
            (GuestAddress(16 * MIB), 64 << 10),
        ])
        .unwrap()
    }

    fn write_list(mem: &GuestMemoryMmap<()>, at: u64, entries: &[u64]) {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    fn seg(gpa: u64, len: u32) -> Segment {
        Segment::new(Gpa(gpa), len)
    }

    #[test]
    fn zero_length_names_nothing() {
        let mem = memory();
        assert_eq!(segments(&mem, 3, 5, 0, MAX), Ok(vec![]));
    }

    #[test]
    fn prp1_alone_with_an_offset() {
        let mem = memory();
        assert_eq!(
            segments(&mem, 0x1200, 0xdead, 512, MAX),
            Ok(vec![seg(0x1200, 512)])
        );
        // Up to the end of PRP1's page: PRP2 is not looked at.
        assert_eq!(
            segments(&mem, 0x1200, 0xdead, 0xe00, MAX),
            Ok(vec![seg(0x1200, 0xe00)])
        );
    }

    #[test]
    fn prp2_is_the_second_page() {
        let mem = memory();
        assert_eq!(
            segments(&mem, 0x1200, 0x8000, 0x1000, MAX),
            Ok(vec![seg(0x1200, 0xe00), seg(0x8000, 0x200)])
        );
        assert_eq!(
            segments(&mem, 0x1000, 0x8000, 0x2000, MAX),
            Ok(vec![seg(0x1000, 0x1000), seg(0x8000, 0x1000)])
        );
        // Contiguous pages merge.
        assert_eq!(
            segments(&mem, 0x1000, 0x2000, 0x2000, MAX),
            Ok(vec![seg(0x1000, 0x2000)])
        );
    }

    #[test]
    fn prp2_as_a_data_pointer_must_be_page_aligned() {
        let mem = memory();
        assert_eq!(
            segments(&mem, 0x1000, 0x8200, 0x2000, MAX),
            Err(PrpError::EntryUnaligned(Gpa(0x8200)))
        );
        assert_eq!(
            PrpError::EntryUnaligned(Gpa(0x8200)).status(),
            NvmeStatus::PrpOffsetInvalid
        );
    }

    #[test]
    fn prp1_must_be_dword_aligned() {
        let mem = memory();
        assert_eq!(
            segments(&mem, 0x1001, 0, 8, MAX),
            Err(PrpError::Prp1Unaligned(Gpa(0x1001)))
        );
        assert_eq!(segments(&mem, 0x1004, 0, 8, MAX), Ok(vec![seg(0x1004, 8)]));
    }

    #[test]
    fn a_list_names_the_pages_after_the_first() {
        let mem = memory();
        write_list(&mem, 0x10_0000, &[0x20_0000, 0x5000, 0x6000]);
        assert_eq!(
            segments(&mem, 0x3800, 0x10_0000, 0x800 + 0x2800, MAX),
            Ok(vec![
                seg(0x3800, 0x800),
                seg(0x20_0000, 0x1000),
                seg(0x5000, 0x1800)
            ])
        );
    }

    #[test]
    fn a_list_may_start_inside_its_page() {
        let mem = memory();
        // Two entries fit before the end of the page: no chaining needed.
        write_list(&mem, 0x10_0ff0, &[0x7000, 0x9000]);
        assert_eq!(
            segments(&mem, 0x1000, 0x10_0ff0, 0x3000, MAX),
            Ok(vec![
                seg(0x1000, 0x1000),
                seg(0x7000, 0x1000),
                seg(0x9000, 0x1000)
            ])
        );
        // A list pointer needs only qword alignment.
        assert_eq!(
            segments(&mem, 0x1000, 0x10_0ff4, 0x3000, MAX),
            Err(PrpError::ListUnaligned(Gpa(0x10_0ff4)))
        );
    }

    #[test]
    fn lists_chain_through_their_last_entry() {
        let mem = memory();
        // 600 pages after the first: 511 in the first list page, whose last
        // entry points at the second list page holding the other 89.
        // Descending, so no two pages merge.
        let pages: Vec<u64> = (0..600).map(|i| 0x3f_f000 - i * PAGE).collect();
        let mut first: Vec<u64> = pages[..511].to_vec();
        first.push(0x11_0000);
        write_list(&mem, 0x10_0000, &first);
        write_list(&mem, 0x11_0000, &pages[511..]);
        let got = segments(&mem, 0, 0x10_0000, 601 * PAGE, MAX).unwrap();
        assert_eq!(got.len(), 601);
        assert_eq!(got[0], seg(0, 0x1000));
        for (s, &p) in got[1..].iter().zip(&pages) {
            assert_eq!(*s, seg(p, 0x1000));
        }
    }

    #[test]
    fn a_list_starting_at_the_last_slot_of_a_page_only_chains() {
        let mem = memory();
        write_list(&mem, 0x10_0ff8, &[0x11_0000]);
        write_list(&mem, 0x11_0000, &[0x7000, 0x9000]);
        assert_eq!(
            segments(&mem, 0x1000, 0x10_0ff8, 0x3000, MAX),
            Ok(vec![
                seg(0x1000, 0x1000),
                seg(0x7000, 0x1000),
                seg(0x9000, 0x1000)
            ])
        );
    }

    #[test]
    fn the_chain_pointer_must_be_page_aligned() {
        let mem = memory();
        let mut first: Vec<u64> = (0..511).map(|i| 0x20_0000 + i * PAGE).collect();
        first.push(0x11_0008);
        write_list(&mem, 0x10_0000, &first);
        assert_eq!(
            segments(&mem, 0, 0x10_0000, 600 * PAGE, MAX),
            Err(PrpError::EntryUnaligned(Gpa(0x11_0008)))
        );
    }

    #[test]
    fn list_entries_must_be_page_aligned() {
        let mem = memory();
        write_list(&mem, 0x10_0000, &[0x5000, 0x6010]);
        assert_eq!(
            segments(&mem, 0x1000, 0x10_0000, 0x3000, MAX),
            Err(PrpError::EntryUnaligned(Gpa(0x6010)))
        );
    }

    #[test]
    fn a_list_outside_guest_memory() {
        let mem = memory();
        let err = segments(&mem, 0x1000, 8 * MIB, 0x3000, MAX).unwrap_err();
        assert_eq!(err, PrpError::ListOutside(Gpa(8 * MIB)));
        assert_eq!(err.status(), NvmeStatus::DataTransferError);
        // A list whose next page is outside.
        write_list(&mem, 16 * MIB + (64 << 10) - 8, &[64 * MIB]);
        assert_eq!(
            segments(&mem, 0x1000, 16 * MIB + (64 << 10) - 8, 0x3000, MAX),
            Err(PrpError::ListOutside(Gpa(64 * MIB)))
        );
    }

    #[test]
    fn data_outside_guest_memory() {
        let mem = memory();
        // In the hole, past the end, and running off a region's end.
        for (prp1, len) in [(8 * MIB, 512), (32 * MIB, 4096), (4 * MIB - 512, 1024)] {
            let prp2 = (prp1 & !PAGE_MASK) + PAGE;
            let err = segments(&mem, prp1, prp2, len, MAX).unwrap_err();
            assert!(matches!(err, PrpError::DataOutside { .. }), "{err}");
            assert_eq!(err.status(), NvmeStatus::DataTransferError);
        }
        write_list(&mem, 0x10_0000, &[0x5000, 64 * MIB]);
        assert_eq!(
            segments(&mem, 0x1000, 0x10_0000, 0x3000, MAX),
            Err(PrpError::DataOutside {
                gpa: Gpa(64 * MIB),
                len: 0x1000
            })
        );
    }

    #[test]
    fn addresses_near_u64_max_do_not_overflow() {
        let mem = memory();
        // The last four bytes of the address space, then PRP2's page: no
        // arithmetic overflows, and no memory is there.
        let top = !3u64;
        assert_eq!(
            segments(&mem, top, 0x1000, 8, MAX),
            Err(PrpError::DataOutside {
                gpa: Gpa(top),
                len: 4
            })
        );
        let last_page = !PAGE_MASK;
        assert!(matches!(
            segments(&mem, 0x1000, last_page, 0x2000, MAX),
            Err(PrpError::DataOutside { .. })
        ));
        write_list(&mem, 0x10_0000, &[last_page, 0x5000]);
        assert!(matches!(
            segments(&mem, 0x1000, 0x10_0000, 0x3000, MAX),
            Err(PrpError::DataOutside { .. })
        ));
        // A list pointer at the top of the address space.
        assert_eq!(
            segments(&mem, 0x1000, !7u64, 0x3000, MAX),
            Err(PrpError::ListOutside(Gpa(!7u64)))
        );
        assert_eq!(
            segments(&mem, 0, 0, u64::MAX, u64::MAX),
            Err(PrpError::TooLong {
                len: u64::MAX,
                max: MAX_TRANSFER
            })
        );
    }

    #[test]
    fn transfers_past_the_limit_are_refused_before_reading_lists() {
        let mem = memory();
        let err = segments(&mem, 0x1000, 64 * MIB, 0x10_0001, 0x10_0000).unwrap_err();
        assert_eq!(
            err,
            PrpError::TooLong {
                len: 0x10_0001,
                max: 0x10_0000
            }
        );
        assert_eq!(err.status(), NvmeStatus::InvalidField);
    }

    /// Splits segments into page-bounded pieces, for comparing layouts.
    fn pieces(segs: &[Segment]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for s in segs {
            let (mut at, end) = (s.gpa.0, s.gpa.0 + u64::from(s.len));
            while at < end {
                let n = (end - at).min(PAGE - (at & PAGE_MASK));
                out.push((at, n));
                at += n;
            }
        }
        out
    }

    proptest! {
        /// A PRP layout as a host builds it — PRP1 with a dword offset, then
        /// arbitrary distinct pages, through a list chained over list pages
        /// when needed — walks back to exactly those pages, in order.
        #[test]
        fn walks_back_what_a_host_built(
            offset in (0u64..1024).prop_map(|d| d * 4),
            len in 1u64..(1200 * PAGE),
            page_picks in proptest::collection::vec(0u64..900, 1201),
            list_offset in (0u64..512).prop_map(|e| e * 8),
        ) {
            let mem = memory();
            let data_page = |i: u64| 0x4_0000 + i * PAGE; // up to ~3.8 MiB
            let prp1 = data_page(page_picks[0]) + offset;
            let first = len.min(PAGE - offset);
            let rest = (len - first).div_ceil(PAGE);
            let pages: Vec<u64> = page_picks[1..=rest as usize].iter().map(|&p| data_page(p)).collect();
            let mut prp2 = 0;
            if rest == 1 {
                prp2 = pages[0];
            } else if rest > 1 {
                // List pages live below the data pages.
                let mut list = 0x1000 + list_offset;
                prp2 = list;
                let mut left = &pages[..];
                let mut next_list_page = 0x1000 + PAGE;
                loop {
                    let room = ((PAGE - (list & PAGE_MASK)) / 8) as usize;
                    if left.len() <= room {
                        write_list(&mem, list, left);
                        break;
                    }
                    let mut entries = left[..room - 1].to_vec();
                    entries.push(next_list_page);
                    write_list(&mem, list, &entries);
                    left = &left[room - 1..];
                    list = next_list_page;
                    next_list_page += PAGE;
                }
            }
            let got = segments(&mem, prp1, prp2, len, 8 * MIB).unwrap();
            let mut want = vec![(prp1, first)];
            let mut left = len - first;
            for &p in &pages {
                let n = left.min(PAGE);
                want.push((p, n));
                left -= n;
            }
            prop_assert_eq!(pieces(&got), want);
            // Merged: no segment starts where the previous one ends.
            for w in got.windows(2) {
                prop_assert_ne!(w[0].gpa.0 + u64::from(w[0].len), w[1].gpa.0);
            }
        }

        /// Any PRPs over any memory contents: never a panic; what is accepted
        /// covers exactly the length, inside guest memory, page-aligned after
        /// the first piece.
        #[test]
        fn any_prps_are_a_layout_or_an_error(
            prp1 in prop_oneof![0u64..(5 * MIB), any::<u64>()],
            prp2 in prop_oneof![0u64..(5 * MIB), any::<u64>()],
            len in prop_oneof![0u64..(64 * PAGE), any::<u64>()],
            junk in proptest::collection::vec(any::<u64>(), 0..600),
        ) {
            let mem = memory();
            write_list(&mem, 0x10_0000, &junk);
            if prp2 < 4 * MIB - 8 * 600 {
                write_list(&mem, prp2 & !7, &junk);
            }
            if let Ok(segs) = segments(&mem, prp1, prp2, len, MAX) {
                prop_assert_eq!(dma::segment::total_len(&segs), len);
                for (i, (at, _)) in pieces(&segs).into_iter().enumerate() {
                    prop_assert!(i == 0 || at & PAGE_MASK == 0);
                }
                for s in &segs {
                    prop_assert!(s.is_in(&mem));
                }
            }
        }
    }
}
