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

/// Whether `found` is the canary of request `id` for the bytes at
/// `req_offset..` of the request: [`fill`]'s output, compared a whole unit at
/// a time without being written out.
fn is_canary(id: ReqId, req_offset: u64, found: &[u8]) -> bool {
    let units = Units::new(id);
    let skip = (req_offset % UNIT as u64) as usize;
    let mut unit_offset = req_offset - skip as u64;
    let head = if skip == 0 {
        0
    } else {
        (UNIT - skip).min(found.len())
    };
    let (head_found, rest) = found.split_at(head);
    if head > 0 {
        if head_found != &units.at(unit_offset)[skip..skip + head] {
            return false;
        }
        unit_offset += UNIT as u64;
    }
    let mut whole = rest.chunks_exact(UNIT);
    // Differences gathered over every unit, then looked at once.
    let mut differ = 0u64;
    for unit in &mut whole {
        let (lo, hi) = units.halves(unit_offset);
        let (found_lo, found_hi) = unit.split_at(UNIT / 2);
        // Halves of a 16-byte unit are 8 bytes; were one not, it would differ.
        let word = |b: &[u8]| b.try_into().map_or(!0, u64::from_le_bytes);
        differ |= (word(found_lo) ^ lo) | (word(found_hi) ^ hi);
        unit_offset += UNIT as u64;
    }
    let tail = whole.remainder();
    differ == 0 && tail == &units.at(unit_offset)[..tail.len()]
}

/// The units of one request's canary: the magic and id bytes, and their part
/// of the check byte, worked out once.
struct Units {
    /// The unit with its check and offset bytes zero, as two little-endian
    /// words: bytes 0..8 and 8..16.
    template: (u64, u64),
    id_check: u8,
}

impl Units {
    fn new(id: ReqId) -> Units {
        let mut template = [0u8; UNIT];
        template[..3].copy_from_slice(&MAGIC);
        template[4..12].copy_from_slice(&(id.0 ^ ID_MASK).to_le_bytes());
        // With the offset bytes still zero, this is the id's part alone.
        let id_check = check_byte(&template);
        let (lo, hi) = template.split_at(UNIT / 2);
        let word = |b: &[u8]| b.try_into().map_or(0, u64::from_le_bytes);
        Units {
            template: (word(lo), word(hi)),
            id_check,
        }
    }

    /// The unit at byte `unit_offset` of the request.
    fn at(&self, unit_offset: u64) -> [u8; UNIT] {
        let (lo, hi) = self.halves(unit_offset);
        let mut u = [0u8; UNIT];
        u[..UNIT / 2].copy_from_slice(&lo.to_le_bytes());
        u[UNIT / 2..].copy_from_slice(&hi.to_le_bytes());
        u
    }

    /// The unit at byte `unit_offset` of the request as two little-endian
    /// words: the check byte is byte 3 of the first, the offset the high half
    /// of the second.
    fn halves(&self, unit_offset: u64) -> (u64, u64) {
        // The offset wraps past 4 GiB; requests are far smaller.
        let off = unit_offset as u32 ^ OFFSET_MASK;
        let folded = off ^ (off >> 16);
        let check = u32::from(self.id_check) ^ ((folded ^ (folded >> 8)) & 0xff);
        let (lo, hi) = self.template;
        (lo | (u64::from(check) << 24), hi | (u64::from(off) << 32))
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
    let mut tally = Tally::new();
    tally.add(0, expected, found);
    let foreign = || Ok::<_, std::convert::Infallible>(find_foreign(expected, found));
    match tally.damage(foreign) {
        Ok(damage) => damage,
        Err(never) => match never {},
    }
}

/// Bytes made and read at a time by [`stamp`] and [`check_stamped`].
const CHUNK: usize = 4096;

/// Chunks of at most [`CHUNK`] bytes over `0..len`: (offset, length).
fn chunks(len: u64) -> impl Iterator<Item = (u64, usize)> {
    let step = CHUNK as u64;
    (0..len.div_ceil(step)).map(move |i| {
        let at = i * step;
        // At most CHUNK, which is a usize.
        (at, (len - at).min(step) as usize)
    })
}

/// Stamps the canary of request `id` for bytes `req_offset..req_offset + len`
/// of the request, a chunk at a time: `write(at, bytes)` puts `bytes` at
/// `at..` of that range. No copy of the canary is kept; [`check_stamped`]
/// makes it again.
pub fn stamp<E>(
    id: ReqId,
    req_offset: u64,
    len: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut canary = [0u8; CHUNK];
    for (at, n) in chunks(len) {
        fill(id, req_offset + at, &mut canary[..n]);
        write(at, &canary[..n])?;
    }
    Ok(())
}

/// Compares what memory holds with the canary [`stamp`] put there for bytes
/// `req_offset..req_offset + len` of request `id`, without a copy of it: the
/// canary is made again a chunk at a time, and `read(at, buf)` fills `buf`
/// with what is at `at..` of the range. The answer is [`check`]'s for the
/// whole canary and the whole of what was found; an `Err` is `read`'s.
pub fn check_stamped<E>(
    id: ReqId,
    req_offset: u64,
    len: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Option<Damage>, E> {
    let mut found = [0u8; CHUNK];
    let mut tally = Tally::new();
    for (at, n) in chunks(len) {
        read(at, &mut found[..n])?;
        // An intact canary, the common case, is compared without making it.
        if is_canary(id, req_offset + at, &found[..n]) {
            continue;
        }
        let mut expected = [0u8; CHUNK];
        fill(id, req_offset + at, &mut expected[..n]);
        tally.add(at, &expected[..n], &found[..n]);
    }
    tally.damage(|| {
        // As `find_foreign`: the first unit of the canary itself names the
        // request, and the first unit found with another name is foreign.
        let canary = |at: u64, buf: &mut [u8]| {
            fill(id, req_offset + at, buf);
            Ok(())
        };
        let own = first_canary(len, canary, |_| true)?;
        first_canary(len, &mut read, |other| Some(other) != own)
    })
}

/// The bytes that differ from the canary, seen a part at a time in order.
struct Tally {
    bytes: u64,
    first: Option<u64>,
    all_zero: bool,
    all_poison: bool,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            bytes: 0,
            first: None,
            all_zero: true,
            all_poison: true,
        }
    }

    /// Adds the part at offset `at` of the checked range.
    fn add(&mut self, at: u64, expected: &[u8], found: &[u8]) {
        // The common case, an intact canary, is one comparison of the slices.
        if expected == found {
            return;
        }
        // Counted in locals, which the loop keeps in registers.
        let (mut bytes, mut first) = (0u64, None);
        let (mut all_zero, mut all_poison) = (true, true);
        for (i, (&e, &f)) in expected.iter().zip(found).enumerate() {
            if e != f {
                bytes += 1;
                first.get_or_insert(at + i as u64);
                all_zero &= f == 0;
                all_poison &= f == FREE_POISON;
            }
        }
        self.bytes += bytes;
        self.first = self.first.or(first);
        self.all_zero &= all_zero;
        self.all_poison &= all_poison;
    }

    /// The damage, once every part was added. `foreign` looks for another
    /// request's canary in what was found; it runs only when neither zeros
    /// nor free-poison tell what overwrote the canary.
    fn damage<E>(
        self,
        foreign: impl FnOnce() -> Result<Option<ReqId>, E>,
    ) -> Result<Option<Damage>, E> {
        let Some(first) = self.first else {
            return Ok(None);
        };
        let overwrite = if self.all_zero {
            Overwrite::Zeros
        } else if self.all_poison {
            Overwrite::Poison
        } else if let Some(other) = foreign()? {
            Overwrite::Canary(other)
        } else {
            Overwrite::Data
        };
        Ok(Some(Damage {
            bytes: self.bytes,
            first,
            overwrite,
        }))
    }
}

/// The id of another request's canary unit found in `found`, if any.
fn find_foreign(expected: &[u8], found: &[u8]) -> Option<ReqId> {
    let own = find_canaries(expected).next().map(|(_, id, _)| id);
    find_canaries(found)
        .map(|(_, id, _)| id)
        .find(|&id| Some(id) != own)
}

/// The first canary unit that `wanted` accepts in `len` bytes that `read`
/// gives a chunk at a time, as [`find_canaries`] would find it in all of them:
/// the last `UNIT - 1` bytes of a chunk are kept for the units that run on
/// into the next.
fn first_canary<E>(
    len: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    wanted: impl Fn(ReqId) -> bool,
) -> Result<Option<ReqId>, E> {
    let mut buf = [0u8; UNIT - 1 + CHUNK];
    let mut kept = 0;
    for (at, n) in chunks(len) {
        read(at, &mut buf[kept..kept + n])?;
        let seen = kept + n;
        if let Some((_, id, _)) = find_canaries(&buf[..seen]).find(|&(_, id, _)| wanted(id)) {
            return Ok(Some(id));
        }
        kept = seen.min(UNIT - 1);
        buf.copy_within(seen - kept..seen, 0);
    }
    Ok(None)
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

    /// The comparison that skips making an intact canary tells it from one
    /// with any single byte changed, at any offset and length.
    #[test]
    fn is_canary_finds_any_changed_byte() {
        for id in [0, 42, u64::MAX] {
            for off in [0, 7, 16, 4095, (1 << 32) - 3] {
                for len in [0, 1, 15, 16, 17, 33, 100, 4096] {
                    let c = canary_by_definition(id, off, len);
                    assert!(is_canary(ReqId(id), off, &c), "{id} {off} {len}");
                    for at in 0..len {
                        let mut spoilt = c.clone();
                        spoilt[at] ^= 0x40;
                        assert!(!is_canary(ReqId(id), off, &spoilt), "{id} {off} {len} {at}");
                    }
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

    /// `check_stamped` of what `found` holds, read a chunk at a time.
    fn check_in_chunks(id: u64, off: u64, found: &[u8]) -> Option<Damage> {
        let len = found.len() as u64;
        let read = |at: u64, buf: &mut [u8]| {
            let at = at as usize;
            buf.copy_from_slice(&found[at..at + buf.len()]);
            Ok::<_, ()>(())
        };
        check_stamped(ReqId(id), off, len, read).unwrap()
    }

    /// Made again a chunk at a time, the canary gives the same answer as the
    /// copy kept whole did: intact or not, which bytes, what overwrote them,
    /// whichever chunk the overwrite or another request's unit falls in.
    #[test]
    fn a_canary_made_again_in_chunks_is_checked_as_the_whole_copy_was() {
        let lens = [1, 15, 16, 31, 100, 4095, 4096, 4097, 8192 + 17, 3 * 4096];
        let mut cases = 0;
        for len in lens {
            for off in [0, 7, 3 * 4096 + 5] {
                let c = canary(9, off, len);
                let mut spoilt: Vec<Vec<u8>> = vec![c.clone()];
                for at in [0, len / 2, len.saturating_sub(8), 4096 - 8, 4096 + 3] {
                    if at >= len {
                        continue;
                    }
                    let end = (at + 600).min(len);
                    for fill_with in [0u8, FREE_POISON] {
                        let mut f = c.clone();
                        f[at..end].fill(fill_with);
                        spoilt.push(f);
                    }
                    // Another request's units, straddling a chunk boundary
                    // when `at` is near one.
                    let mut f = c.clone();
                    f[at..end].copy_from_slice(&canary(77, 160, end - at));
                    spoilt.push(f);
                    let mut f = c.clone();
                    f[at..end].copy_from_slice(&canary(9, 4096 * 50 + 32, end - at));
                    spoilt.push(f);
                    // One unit of another request's, alone, across a chunk boundary.
                    if at + 16 <= len {
                        let mut f = c.clone();
                        f[at..at + 16].copy_from_slice(&canary(77, 160, 16));
                        spoilt.push(f);
                    }
                    let mut f = c.clone();
                    let data: Vec<u8> = (0..end - at).map(|i| (i % 200) as u8 + 1).collect();
                    f[at..end].copy_from_slice(&data);
                    spoilt.push(f);
                }
                for found in spoilt {
                    assert_eq!(
                        check_in_chunks(9, off, &found),
                        check(&c, &found),
                        "len {len} offset {off}"
                    );
                    cases += 1;
                }
            }
        }
        assert!(cases > 300, "{cases}");
        // A range too short to hold a whole unit names no request of its
        // own, so its own units found in memory are taken for another's.
        let c = canary(9, 0, 64);
        let mut found = canary(9, 8, 20);
        found[..16].copy_from_slice(&c[16..32]);
        let short = check(&canary(9, 8, 20), &found).unwrap();
        assert_eq!(short.overwrite, Overwrite::Canary(ReqId(9)));
        assert_eq!(check_in_chunks(9, 8, &found), Some(short));
    }

    #[test]
    fn stamp_writes_the_canary_in_chunks() {
        for len in [0, 1, 4096, 4097, 10_000] {
            let mut out = vec![0u8; len];
            stamp(ReqId(3), 5, len as u64, |at, bytes| {
                let at = at as usize;
                out[at..at + bytes.len()].copy_from_slice(bytes);
                Ok::<_, ()>(())
            })
            .unwrap();
            assert_eq!(out, canary(3, 5, len), "len {len}");
        }
    }
}
