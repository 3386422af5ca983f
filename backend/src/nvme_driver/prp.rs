//! A buffer as a command names it: PRP1, PRP2 and, past two pages, a PRP
//! list in host memory (NVMe 1.4, 4.3), built as Linux's nvme_setup_prps
//! builds it. The pages after the first are the caller's to choose, in any
//! order, so a test can scatter them; a PRP the builder would never make
//! (unaligned, past memory) goes straight into [`Sqe::with_prps`] and
//! [`write_list`].
//!
//! [`Sqe::with_prps`]: super::Sqe::with_prps

use dma::Gpa;

use super::error::Error;
use super::transport::HostMemory;
use crate::nvme::prp::PAGE;

/// A PRP list entry's size.
const ENTRY: u64 = 8;
/// The page as a length (4096 fits any usize).
const PAGE_LEN: usize = PAGE as usize;
/// The entries a list page holds.
const PAGE_ENTRIES: usize = PAGE_LEN / 8;

/// Where a command's data lies: PRP1, PRP2, and the pieces of host memory
/// they name, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prp {
    pub prp1: u64,
    pub prp2: u64,
    pieces: Vec<(Gpa, usize)>,
}

impl Prp {
    /// `len` bytes from `start` (dword-aligned, anywhere in its page) to the
    /// end of its page, then on `pages` in order. PRP2 is the second page,
    /// or past two pages a PRP list written at `list`, and on the pages after
    /// it when it runs past the end of its page, the last entry of each list
    /// page pointing at the next.
    pub fn new(
        mem: &impl HostMemory,
        start: Gpa,
        pages: &[Gpa],
        len: usize,
        list: Option<Gpa>,
    ) -> Result<Prp, Error> {
        let into_first = usize::try_from(PAGE - start.0 % PAGE).unwrap_or(usize::MAX);
        let first = len.min(into_first);
        let rest = len - first;
        let needed = rest.div_ceil(PAGE_LEN);
        let Some(pages) = pages.get(..needed) else {
            return Err(Error::TooFewPages {
                start,
                len,
                needed,
                given: pages.len(),
            });
        };
        let mut pieces = vec![(start, first)];
        let mut left = rest;
        for &page in pages {
            let n = left.min(PAGE_LEN);
            pieces.push((page, n));
            left -= n;
        }
        let prp2 = match pages {
            [] => 0,
            [one] => one.0,
            _ => match list.filter(|l| l.0 % ENTRY == 0) {
                Some(list) => write_chained_list(mem, list, pages)?.0,
                None => return Err(Error::NoList { pages: pages.len() }),
            },
        };
        Ok(Prp {
            prp1: start.0,
            prp2,
            pieces,
        })
    }

    /// PRP1 and PRP2 as given, naming no memory the driver knows: for a
    /// command that is to fail on them (unaligned, past memory, a list of
    /// the caller's own from [`write_list`]).
    pub fn raw(prp1: u64, prp2: u64) -> Prp {
        Prp {
            prp1,
            prp2,
            pieces: Vec::new(),
        }
    }

    /// `len` bytes from `start` on the pages that follow its own.
    pub fn contiguous(
        mem: &impl HostMemory,
        start: Gpa,
        len: usize,
        list: Option<Gpa>,
    ) -> Result<Prp, Error> {
        let base = start.0 - start.0 % PAGE;
        let count = u64::try_from(len).unwrap_or(u64::MAX).div_ceil(PAGE);
        let pages = (1..=count)
            .map(|i| offset(Gpa(base), i * PAGE))
            .collect::<Result<Vec<_>, _>>()?;
        Prp::new(mem, start, &pages, len, list)
    }

    /// The pieces of memory, in the order the data runs through them.
    pub fn pieces(&self) -> &[(Gpa, usize)] {
        &self.pieces
    }

    pub fn len(&self) -> usize {
        self.pieces.iter().map(|&(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts `data`, exactly the buffer's length, into its pieces.
    pub fn write(&self, mem: &impl HostMemory, data: &[u8]) -> Result<(), Error> {
        if data.len() != self.len() {
            return Err(Error::LengthMismatch {
                given: data.len(),
                len: self.len(),
            });
        }
        let mut at = 0;
        for &(gpa, n) in &self.pieces {
            mem.write_mem(gpa, &data[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// The buffer's bytes, its pieces joined.
    pub fn read(&self, mem: &impl HostMemory) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(self.len());
        for &(gpa, n) in &self.pieces {
            out.extend(mem.read_vec(gpa, n)?);
        }
        Ok(out)
    }

    /// Every byte of the buffer set to `byte`.
    pub fn fill(&self, mem: &impl HostMemory, byte: u8) -> Result<(), Error> {
        for &(gpa, n) in &self.pieces {
            mem.fill(gpa, byte, n)?;
        }
        Ok(())
    }
}

/// Writes PRP list entries at `at`, as they are.
pub fn write_list(mem: &impl HostMemory, at: Gpa, entries: &[u64]) -> Result<(), Error> {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_mem(at, &bytes)
}

/// Writes `pages` as a PRP list from `list` on: what fits to the end of its
/// page, the last entry pointing at the next page when more follow.
fn write_chained_list(mem: &impl HostMemory, list: Gpa, pages: &[Gpa]) -> Result<Gpa, Error> {
    let mut at = list;
    let mut rest = pages;
    while !rest.is_empty() {
        let room = usize::try_from((PAGE - at.0 % PAGE) / ENTRY).unwrap_or(PAGE_ENTRIES);
        let next = offset(Gpa(at.0 - at.0 % PAGE), PAGE)?;
        let mut entries: Vec<u64> = Vec::with_capacity(room);
        if rest.len() <= room {
            entries.extend(rest.iter().map(|p| p.0));
            rest = &[];
        } else {
            let (now, later) = rest.split_at(room - 1);
            entries.extend(now.iter().map(|p| p.0));
            entries.push(next.0);
            rest = later;
        }
        write_list(mem, at, &entries)?;
        at = next;
    }
    Ok(list)
}

/// `base + bytes`, or why not.
pub(super) fn offset(base: Gpa, bytes: u64) -> Result<Gpa, Error> {
    base.checked_add(bytes).ok_or(Error::AddressOverflow {
        base,
        offset: bytes,
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn one_and_two_pages_need_no_list() {
        let mem = memory();
        let p = Prp::new(&mem, Gpa(0x1200), &[], 512, None).unwrap();
        assert_eq!(
            (p.prp1, p.prp2, p.pieces()),
            (0x1200, 0, &[(Gpa(0x1200), 512)][..])
        );
        let p = Prp::new(&mem, Gpa(0x1800), &[Gpa(0x9000)], 4096, None).unwrap();
        assert_eq!(p.prp2, 0x9000);
        assert_eq!(p.pieces(), [(Gpa(0x1800), 0x800), (Gpa(0x9000), 0x800)]);
        assert!(matches!(
            Prp::new(&mem, Gpa(0x1800), &[], 4096, None),
            Err(Error::TooFewPages { needed: 1, .. })
        ));
    }

    #[test]
    fn a_list_near_the_end_of_its_page_chains_to_the_next() {
        let mem = memory();
        let pages: Vec<Gpa> = (0..6).map(|i| Gpa(0x2_0000 + i * PAGE)).collect();
        let p = Prp::new(&mem, Gpa(0x1000), &pages, 7 * 4096, Some(Gpa(0x5fe8))).unwrap();
        assert_eq!(p.prp2, 0x5fe8);
        let words = |at: u64, n: usize| -> Vec<u64> {
            mem.read_vec(Gpa(at), n * 8)
                .unwrap()
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        // Three entries fit: two pages and the pointer to the next list page.
        assert_eq!(words(0x5fe8, 3), [0x2_0000, 0x2_1000, 0x6000]);
        assert_eq!(words(0x6000, 4), [0x2_2000, 0x2_3000, 0x2_4000, 0x2_5000]);
        assert!(matches!(
            Prp::new(&mem, Gpa(0x1000), &pages, 7 * 4096, None),
            Err(Error::NoList { pages: 6 })
        ));
    }

    #[test]
    fn data_goes_through_the_pieces_in_order() {
        let mem = memory();
        let p = Prp::new(&mem, Gpa(0x1f00), &[Gpa(0x8000)], 0x200, None).unwrap();
        let data: Vec<u8> = (0..=255).cycle().take(0x200).collect();
        p.write(&mem, &data).unwrap();
        assert_eq!(p.read(&mem).unwrap(), data);
        assert_eq!(mem.read_vec(Gpa(0x8000), 0x100).unwrap(), data[0x100..]);
        assert!(p.write(&mem, &data[1..]).is_err());
    }
}
