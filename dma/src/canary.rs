//! Canaries: what dma writes into a read's destination at arrival, and how it
//! tells, at DMA time, what overwrote it.
//!
//! The canary is a run of 16-byte units, each `b"DmC"`, a check byte, the
//! request id (u64 LE) and the unit's byte offset within the request (u32 LE),
//! the last two XORed with fixed masks so that small numbers do not leave the
//! canary mostly zeros. The check byte folds the id and offset bytes, so a unit
//! that was partly overwritten is not taken for another request's. A stray copy
//! found anywhere names the request and the place it came from.

use serde::Serialize;

use crate::request::ReqId;

const MAGIC: [u8; 3] = *b"DmC";
const UNIT: usize = 16;
const ID_MASK: u64 = 0x5bd1_e995_c3a5_c85c;
const OFFSET_MASK: u32 = 0x9e37_79b9;

/// The byte the kernel's page poisoning writes into freed pages.
pub const FREE_POISON: u8 = 0xaa;

/// Fills `buf` with the canary of request `id` for the bytes at `req_offset..`
/// of the request's data.
///
/// A part unit at either end is cut from a whole one; everything between is
/// written a whole unit at a time.
pub fn fill(id: ReqId, req_offset: u64, buf: &mut [u8]) {
    let units = Units::new(id);
    let skip = (req_offset % UNIT as u64) as usize;
    let mut unit_offset = req_offset - skip as u64;
    let head = if skip == 0 {
        0
    } else {
        (UNIT - skip).min(buf.len())
    };
    let (head_buf, rest) = buf.split_at_mut(head);
    if head > 0 {
        head_buf.copy_from_slice(&units.at(unit_offset)[skip..skip + head]);
        unit_offset += UNIT as u64;
    }
    let mut whole = rest.chunks_exact_mut(UNIT);
    for chunk in &mut whole {
        chunk.copy_from_slice(&units.at(unit_offset));
        unit_offset += UNIT as u64;
    }
    let tail = whole.into_remainder();
    let n = tail.len();
    if n > 0 {
        tail.copy_from_slice(&units.at(unit_offset)[..n]);
    }
}

/// The check byte of a unit: its id and offset bytes folded together.
fn check_byte(u: &[u8]) -> u8 {
    u[4..UNIT].iter().fold(0x5a, |c, &b| c ^ b)
}

/// The units of one request's canary: the magic and id bytes, and their part
/// of the check byte, worked out once.
struct Units {
    template: [u8; UNIT],
    id_check: u8,
}

impl Units {
    fn new(id: ReqId) -> Units {
        let mut template = [0u8; UNIT];
        template[..3].copy_from_slice(&MAGIC);
        template[4..12].copy_from_slice(&(id.0 ^ ID_MASK).to_le_bytes());
        // With the offset bytes still zero, this is the id's part alone.
        let id_check = check_byte(&template);
        Units { template, id_check }
    }

    /// The unit at byte `unit_offset` of the request.
    fn at(&self, unit_offset: u64) -> [u8; UNIT] {
        let mut u = self.template;
        // The offset wraps past 4 GiB; requests are far smaller.
        let off = (unit_offset as u32 ^ OFFSET_MASK).to_le_bytes();
        u[12..].copy_from_slice(&off);
        u[3] = off.iter().fold(self.id_check, |c, &b| c ^ b);
        u
    }
}

/// What replaced a canary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "request")]
pub enum Overwrite {
    /// Zeros: typical of a page freed with init_on_free, or reused and cleared.
    Zeros,
    /// The 0xaa free-poison pattern: the page was freed.
    Poison,
    /// Another request's canary: two requests were handed the same memory.
    Canary(ReqId),
    /// Anything else: the memory was reused for other data.
    Data,
}

impl Overwrite {
    pub fn name(self) -> &'static str {
        match self {
            Overwrite::Zeros => "zeros",
            Overwrite::Poison => "free-poison",
            Overwrite::Canary(_) => "other-canary",
            Overwrite::Data => "other-data",
        }
    }
}

/// How a canary was damaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Damage {
    /// Bytes that differ from the canary.
    pub bytes: u64,
    /// Offset of the first of them within the checked buffer.
    pub first: u64,
    pub overwrite: Overwrite,
}

/// Compares what is in memory (`found`) with the canary that was stamped
/// (`expected`); `None` if it is intact.
pub fn check(expected: &[u8], found: &[u8]) -> Option<Damage> {
    // The common case, an intact canary, is one comparison of the slices.
    if expected == found {
        return None;
    }
    let mut bytes = 0u64;
    let mut first = None;
    let mut all_zero = true;
    let mut all_poison = true;
    for (i, (&e, &f)) in expected.iter().zip(found).enumerate() {
        if e != f {
            bytes += 1;
            first.get_or_insert(i as u64);
            all_zero &= f == 0;
            all_poison &= f == FREE_POISON;
        }
    }
    let first = first?;
    let overwrite = if all_zero {
        Overwrite::Zeros
    } else if all_poison {
        Overwrite::Poison
    } else if let Some(other) = find_foreign(expected, found) {
        Overwrite::Canary(other)
    } else {
        Overwrite::Data
    };
    Some(Damage {
        bytes,
        first,
        overwrite,
    })
}

/// The id of another request's canary unit found in `found`, if any.
fn find_foreign(expected: &[u8], found: &[u8]) -> Option<ReqId> {
    let own = find_canaries(expected).next().map(|(_, id, _)| id);
    find_canaries(found)
        .map(|(_, id, _)| id)
        .find(|&id| Some(id) != own)
}

/// Every canary unit in `buf`: (position, request, offset within that request).
pub fn find_canaries(buf: &[u8]) -> impl Iterator<Item = (usize, ReqId, u32)> + '_ {
    buf.windows(UNIT).enumerate().filter_map(|(pos, w)| {
        if w[..3] != MAGIC || w[3] != check_byte(w) {
            return None;
        }
        let id = u64::from_le_bytes(w[4..12].try_into().ok()?) ^ ID_MASK;
        let off = u32::from_le_bytes(w[12..16].try_into().ok()?) ^ OFFSET_MASK;
        Some((pos, ReqId(id), off))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canary(id: u64, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        fill(ReqId(id), off, &mut b);
        b
    }

    #[test]
    fn canary_encodes_request_and_offset() {
        let c = canary(42, 512, 64);
        let units: Vec<_> = find_canaries(&c).collect();
        assert_eq!(units[0], (0, ReqId(42), 512));
        assert!(units.contains(&(16, ReqId(42), 528)));
        // A slice starting mid-unit continues the same sequence.
        let whole = canary(42, 0, 100);
        assert_eq!(canary(42, 7, 93), whole[7..].to_vec());
    }

    /// The canary as the format defines it, one byte at a time.
    fn canary_by_definition(id: u64, off: u64, len: usize) -> Vec<u8> {
        (off..off + len as u64)
            .map(|at| {
                let unit_offset = at - at % UNIT as u64;
                let mut u = [0u8; UNIT];
                u[..3].copy_from_slice(&MAGIC);
                u[4..12].copy_from_slice(&(id ^ ID_MASK).to_le_bytes());
                u[12..].copy_from_slice(&(unit_offset as u32 ^ OFFSET_MASK).to_le_bytes());
                u[3] = check_byte(&u);
                u[(at - unit_offset) as usize]
            })
            .collect()
    }

    #[test]
    fn fill_matches_the_format_at_any_offset_and_length() {
        for id in [0, 1, 42, u64::MAX] {
            for off in [0, 1, 7, 15, 16, 17, 4095, 4096, (1 << 32) - 3] {
                for len in [0, 1, 5, 15, 16, 17, 31, 32, 33, 100, 4096] {
                    assert_eq!(
                        canary(id, off, len),
                        canary_by_definition(id, off, len),
                        "id {id} offset {off} len {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_partly_overwritten_unit_is_not_another_canary() {
        let c = canary(1, 0, 64);
        let mut f = c.clone();
        // Data over the id field of the second unit, its magic left intact.
        f[16 + 6..16 + 12].copy_from_slice(b"userda");
        assert_eq!(check(&c, &f).unwrap().overwrite, Overwrite::Data);
        assert_eq!(find_canaries(&f).count(), 3);
    }

    #[test]
    fn intact_canary_is_not_damage() {
        let c = canary(1, 0, 4096);
        assert_eq!(check(&c, &c), None);
    }

    #[test]
    fn overwrites_are_classified() {
        let c = canary(1, 0, 4096);
        let mut zeros = c.clone();
        zeros[100..612].fill(0);
        let d = check(&c, &zeros).unwrap();
        assert_eq!(d.overwrite, Overwrite::Zeros);
        assert_eq!(d.first, 100);
        // A zero byte that was already zero in the canary is not counted.
        assert!(d.bytes <= 512 && d.bytes > 480, "{}", d.bytes);

        let mut poison = c.clone();
        poison.fill(FREE_POISON);
        assert_eq!(check(&c, &poison).unwrap().overwrite, Overwrite::Poison);
        // Every byte but those that were 0xaa in the canary already.
        assert!(check(&c, &poison).unwrap().bytes > 4000);

        let mut other = c.clone();
        other[1024..2048].copy_from_slice(&canary(7, 0, 1024));
        assert_eq!(
            check(&c, &other).unwrap().overwrite,
            Overwrite::Canary(ReqId(7))
        );

        let mut data = c.clone();
        data[0..8].copy_from_slice(b"userdata");
        assert_eq!(check(&c, &data).unwrap().overwrite, Overwrite::Data);
    }
}
