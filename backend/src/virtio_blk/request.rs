//! Parsing a virtio-blk descriptor chain into a request.
//!
//! The chain is read as two byte streams, as the virtio 1.x "any layout" rule
//! allows: the device-readable descriptors (header, then data for writes and
//! discard/write-zeroes), followed by the device-writable ones (data for reads and
//! GET_ID, then the status byte, the last writable byte). Everything a guest can
//! get wrong becomes a [`Malformed`] with the status to report.

use dma::{Gpa, Segment};
use virtio_queue::desc::split::Descriptor;
use vm_memory::GuestMemoryBackend;

use super::{RequestType, Status, HEADER_LEN, SECTOR_SHIFT};
use crate::counters::Mistake;

/// Limits the device advertised to the guest.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most data segments in one request (config `seg_max`).
    pub seg_max: u32,
    /// The most bytes in one data segment (config `size_max`).
    pub size_max: u32,
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: RequestType,
    /// The first 512-byte sector named by the header.
    pub sector: u64,
    /// The data segments, in order: read by the device for writes and
    /// discard/write-zeroes payloads, written by it for reads and GET_ID.
    pub data: Vec<Segment>,
    /// The total length of `data` in bytes.
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: Gpa,
}

/// What the guest got wrong, in virtio-blk's words: a chain that cannot be
/// parsed, or a request that cannot be served (the pipeline's
/// [`Refusal`](crate::pipeline::Refusal)s among them, as virtio-blk names
/// them). Each kind has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the chain is broken (a loop, a bad index or a bad indirect table)")]
    BrokenChain,
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the header is shorter than 16 bytes or not device-readable")]
    ShortHeader,
    #[error("a descriptor lies outside guest memory")]
    OutsideMemory,
    #[error("data descriptors of the wrong direction for the request type")]
    WrongDirection,
    #[error("more data segments or bytes than the device advertised")]
    TooLarge,
    #[error("the data length is not a multiple of the block size")]
    Unaligned,
    #[error("the sector range overflows or ends past the capacity")]
    OutOfRange,
    #[error("a discard or write-zeroes segment list is malformed")]
    BadSegmentList,
    #[error("a discard or write-zeroes segment has flags that are not allowed")]
    BadFlags,
    #[error("the request type is not supported")]
    Unsupported,
    #[error("the device is read-only")]
    ReadOnly,
}

impl Malformed {
    pub const ALL: [Malformed; 13] = [
        Malformed::BrokenChain,
        Malformed::NoStatus,
        Malformed::ReadableAfterWritable,
        Malformed::ShortHeader,
        Malformed::OutsideMemory,
        Malformed::WrongDirection,
        Malformed::TooLarge,
        Malformed::Unaligned,
        Malformed::OutOfRange,
        Malformed::BadSegmentList,
        Malformed::BadFlags,
        Malformed::Unsupported,
        Malformed::ReadOnly,
    ];

    /// A stable name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            Malformed::BrokenChain => "broken-chain",
            Malformed::NoStatus => "no-status",
            Malformed::ReadableAfterWritable => "readable-after-writable",
            Malformed::ShortHeader => "short-header",
            Malformed::OutsideMemory => "outside-memory",
            Malformed::WrongDirection => "wrong-direction",
            Malformed::TooLarge => "too-large",
            Malformed::Unaligned => "unaligned",
            Malformed::OutOfRange => "out-of-range",
            Malformed::BadSegmentList => "bad-segment-list",
            Malformed::BadFlags => "bad-flags",
            Malformed::Unsupported => "unsupported",
            Malformed::ReadOnly => "read-only",
        }
    }

    /// The status the guest sees for this mistake.
    pub fn status(self) -> Status {
        match self {
            Malformed::Unsupported | Malformed::BadFlags => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

impl Mistake for Malformed {
    fn name(self) -> &'static str {
        Malformed::name(self)
    }
}

/// A chain that cannot be served: complete it with `status` at `status_at`, or,
/// where no status byte can be written, return it with length 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub reason: Malformed,
    pub op: Option<RequestType>,
    pub status_at: Option<Gpa>,
}

/// Parses the descriptors of one chain: the chain as two byte streams, its
/// status byte, its header, its data in the direction its type needs,
/// within the advertised limits.
pub fn parse<M: GuestMemoryBackend>(
    mem: &M,
    chain: impl Iterator<Item = Descriptor>,
    limits: Limits,
) -> Result<Request, Rejected> {
    let streams = Streams::of(chain);
    let status_at = streams.status_byte(mem).map_err(|reason| Rejected {
        reason,
        op: None,
        status_at: None,
    })?;
    let reject = |reason, op| Rejected {
        reason,
        op,
        status_at: Some(status_at),
    };
    streams.check(mem).map_err(|reason| reject(reason, None))?;
    let (op, sector, data_out) =
        read_header(mem, &streams.readable).map_err(|reason| reject(reason, None))?;
    let data =
        data_of(op, &streams.writable, data_out).map_err(|reason| reject(reason, Some(op)))?;
    let data_len = data_len(&data, limits).map_err(|reason| reject(reason, Some(op)))?;
    Ok(Request {
        op,
        sector,
        data,
        data_len,
        status: status_at,
    })
}

/// A chain read as the virtio 1.x "any layout" rule allows: the bytes of its
/// device-readable descriptors, then those of its device-writable ones.
struct Streams {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    /// A device-readable descriptor came after a device-writable one.
    out_of_order: bool,
    /// The chain iterator stopped early, on a descriptor that still points
    /// onwards: the chain loops or names something it cannot read.
    truncated: bool,
}

impl Streams {
    fn of(chain: impl Iterator<Item = Descriptor>) -> Streams {
        let mut readable: Vec<Segment> = Vec::new();
        let mut writable: Vec<Segment> = Vec::new();
        let mut last: Option<Descriptor> = None;
        let mut out_of_order = false;
        for desc in chain {
            last = Some(desc);
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment::new(Gpa(desc.addr().0), desc.len());
            if desc.is_write_only() {
                writable.push(seg);
            } else if writable.is_empty() {
                readable.push(seg);
            } else {
                out_of_order = true;
            }
        }
        Streams {
            readable,
            writable,
            out_of_order,
            truncated: last.is_none_or(|d| d.has_next() || d.refers_to_indirect_table()),
        }
    }

    /// Where the status byte goes: the last byte of the last writable
    /// descriptor. A chain without one, or a broken chain, gets no status.
    fn status_byte<M: GuestMemoryBackend>(&self, mem: &M) -> Result<Gpa, Malformed> {
        let status_at = self
            .writable
            .last()
            .and_then(|s| s.gpa.checked_add(u64::from(s.len) - 1))
            .filter(|&gpa| Segment::new(gpa, 1).is_in(mem));
        if self.truncated {
            return Err(Malformed::BrokenChain);
        }
        status_at.ok_or(if self.writable.is_empty() {
            Malformed::NoStatus
        } else {
            Malformed::OutsideMemory
        })
    }

    /// The descriptors in order, and inside guest memory.
    fn check<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), Malformed> {
        if self.out_of_order {
            return Err(Malformed::ReadableAfterWritable);
        }
        if self
            .readable
            .iter()
            .chain(&self.writable)
            .any(|s| !s.is_in(mem))
        {
            return Err(Malformed::OutsideMemory);
        }
        Ok(())
    }
}

/// The header at the start of the readable stream: the request's type and
/// first sector, and the readable bytes after it.
fn read_header<M: GuestMemoryBackend>(
    mem: &M,
    readable: &[Segment],
) -> Result<(RequestType, u64, Vec<Segment>), Malformed> {
    let (header, data_out) = split_at(readable, HEADER_LEN);
    if total(&header) < u64::from(HEADER_LEN) {
        return Err(Malformed::ShortHeader);
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    dma::from_guest(mem, &header, &mut raw).map_err(|_| Malformed::OutsideMemory)?;
    let op = RequestType::from_raw(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);
    Ok((op, sector, data_out))
}

/// The request's data: the readable bytes after the header (`data_out`) or
/// the writable ones before the status byte, as `op` moves data; the other
/// direction must be empty.
fn data_of(
    op: RequestType,
    writable: &[Segment],
    data_out: Vec<Segment>,
) -> Result<Vec<Segment>, Malformed> {
    // Everything writable but the status byte is data; more than a request's
    // length can say is refused, not cut to nothing.
    let data_in_len =
        u32::try_from(total(writable).saturating_sub(1)).map_err(|_| Malformed::TooLarge)?;
    let (data_in, _status) = split_at(writable, data_in_len);
    match op {
        RequestType::In | RequestType::GetId => {
            if !data_out.is_empty() {
                return Err(Malformed::WrongDirection);
            }
            Ok(data_in)
        }
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
            if !data_in.is_empty() {
                return Err(Malformed::WrongDirection);
            }
            Ok(data_out)
        }
        RequestType::Flush => {
            if !data_in.is_empty() || !data_out.is_empty() {
                return Err(Malformed::WrongDirection);
            }
            Ok(Vec::new())
        }
        RequestType::Unsupported(_) => Err(Malformed::Unsupported),
    }
}

/// The length of `data`, if it is within the segments and bytes advertised.
fn data_len(data: &[Segment], limits: Limits) -> Result<u32, Malformed> {
    let data_len = total(data);
    let seg_max = u64::from(limits.seg_max);
    let max_bytes = seg_max * u64::from(limits.size_max);
    if data.len() as u64 > seg_max || data_len > max_bytes {
        return Err(Malformed::TooLarge);
    }
    // Fits: at most seg_max * size_max, both u32 limits chosen to keep it small.
    u32::try_from(data_len).map_err(|_| Malformed::TooLarge)
}

fn total(segs: &[Segment]) -> u64 {
    dma::segment::total_len(segs)
}

/// Splits a byte stream of segments after `at` bytes.
fn split_at(segs: &[Segment], at: u32) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = at;
    for s in segs {
        if left >= s.len {
            head.push(*s);
            left -= s.len;
        } else if left == 0 {
            tail.push(*s);
        } else {
            head.push(Segment::new(s.gpa, left));
            tail.push(Segment::new(Gpa(s.gpa.0 + u64::from(left)), s.len - left));
            left = 0;
        }
    }
    (head, tail)
}

/// The byte offset a 512-byte sector names, or `None` on overflow.
pub fn sector_offset(sector: u64) -> Option<u64> {
    sector.checked_mul(1 << SECTOR_SHIFT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const W: u16 = 2; // VRING_DESC_F_WRITE
    const NEXT: u16 = 1; // VRING_DESC_F_NEXT
    const LIMITS: Limits = Limits {
        seg_max: 4,
        size_max: 4096,
    };

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap<()>, at: u64, t: u32, sector: u64) {
        mem.write_obj(t, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Descriptors as the chain iterator yields them (`next` is not followed here).
    fn chain(descs: &[(u64, u32, u16)]) -> Vec<Descriptor> {
        let n = descs.len();
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < n { flags | NEXT } else { flags };
                Descriptor::new(addr, len, next, 0)
            })
            .collect()
    }

    #[test]
    fn read_request() {
        let m = mem();
        header(&m, 0x1000, 0, 8);
        let r = parse(
            &m,
            chain(&[(0x1000, 16, 0), (0x2000, 4096, W), (0x3000, 1, W)]).into_iter(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(r.op, RequestType::In);
        assert_eq!(r.sector, 8);
        assert_eq!(r.data, vec![Segment::new(Gpa(0x2000), 4096)]);
        assert_eq!(r.status, Gpa(0x3000));
    }

    #[test]
    fn any_layout_write() {
        // Header and data in one descriptor; data in the writable part.
        let m = mem();
        header(&m, 0x1000, 1, 3);
        let r = parse(
            &m,
            chain(&[(0x1000, 16 + 512, 0), (0x3000, 1, W)]).into_iter(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(r.op, RequestType::Out);
        assert_eq!(r.data, vec![Segment::new(Gpa(0x1010), 512)]);
        // Status as the last byte of a longer writable descriptor.
        header(&m, 0x1000, 0, 3);
        let r = parse(
            &m,
            chain(&[(0x1000, 16, 0), (0x2000, 513, W)]).into_iter(),
            LIMITS,
        )
        .unwrap();
        assert_eq!(r.data, vec![Segment::new(Gpa(0x2000), 512)]);
        assert_eq!(r.status, Gpa(0x2200));
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        header(&m, 0x1000, 0, 0);
        type Case<'a> = (&'a [(u64, u32, u16)], Malformed, bool);
        let cases: &[Case] = &[
            (&[(0x1000, 16, 0)], Malformed::NoStatus, false),
            (
                &[(0x1000, 8, 0), (0x3000, 1, W)],
                Malformed::ShortHeader,
                true,
            ),
            (
                &[(0x1000, 16, W), (0x3000, 1, W)],
                Malformed::ShortHeader,
                true,
            ),
            (
                &[(0x1000, 16, 0), (0x3000, 1, W), (0x4000, 1, 0)],
                Malformed::ReadableAfterWritable,
                true,
            ),
            (
                &[(0x1000, 16, 0), (0xfff_0000, 512, W), (0x3000, 1, W)],
                Malformed::OutsideMemory,
                true,
            ),
            (
                &[(0x1000, 16, 0), (0xfff_0000, 1, W)],
                Malformed::OutsideMemory,
                false,
            ),
            (
                &[(0x1000, 16, 0), (0x4000, 512, 0), (0x3000, 1, W)],
                Malformed::WrongDirection,
                true,
            ),
        ];
        for (descs, want, has_status) in cases {
            let err = parse(&m, chain(descs).into_iter(), LIMITS).unwrap_err();
            assert_eq!(err.reason, *want, "{descs:?}");
            assert_eq!(err.status_at.is_some(), *has_status, "{descs:?}");
        }
    }

    #[test]
    fn too_many_segments_or_bytes() {
        let m = mem();
        header(&m, 0x1000, 0, 0);
        let mut descs = vec![(0x1000, 16, 0)];
        descs.extend((0..5).map(|i| (0x10000 + i * 0x1000, 512, W)));
        descs.push((0x3000, 1, W));
        let err = parse(&m, chain(&descs).into_iter(), LIMITS).unwrap_err();
        assert_eq!(err.reason, Malformed::TooLarge);
    }

    /// Device-writable descriptors of more than 4 GiB (aliasing one MiB of
    /// memory) are refused as too large, not taken for a read of 0 bytes.
    #[test]
    fn writable_bytes_past_4_gib_are_too_large() {
        let m = mem();
        header(&m, 0x1000, 0, 0);
        let mut descs = vec![(0x1000, 16, 0)];
        descs.extend((0..4097).map(|_| (0, 0x10_0000, W)));
        let err = parse(&m, chain(&descs).into_iter(), LIMITS).unwrap_err();
        assert_eq!(err.reason, Malformed::TooLarge);
        assert!(err.status_at.is_some());
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let m = mem();
        header(&m, 0x1000, 99, 0);
        let err = parse(
            &m,
            chain(&[(0x1000, 16, 0), (0x3000, 1, W)]).into_iter(),
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(err.reason, Malformed::Unsupported);
        assert_eq!(err.reason.status(), Status::Unsupp);
    }

    #[test]
    fn truncated_chain_is_broken() {
        let m = mem();
        header(&m, 0x1000, 0, 0);
        // The last descriptor still points onwards: the iterator stopped early.
        let mut d = chain(&[(0x1000, 16, 0), (0x3000, 1, W)]);
        d.truncate(1);
        let err = parse(&m, d.into_iter(), LIMITS).unwrap_err();
        assert_eq!(err.reason, Malformed::BrokenChain);
        assert_eq!(
            parse(&m, std::iter::empty(), LIMITS).unwrap_err().reason,
            Malformed::BrokenChain
        );
    }
}

#[cfg(test)]
mod proptests {
    //! `parse` against arbitrary descriptor lists: it never panics, and whatever
    //! it lets the device touch (data segments, the status byte) lies inside
    //! guest memory.

    use super::*;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;

    /// Guest memory: two regions with a hole between them.
    const REGIONS: [(u64, usize); 2] = [(0, 0x4000), (0x8000, 0x4000)];

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&REGIONS.map(|(start, len)| (GuestAddress(start), len)))
            .unwrap()
    }

    /// Whether `[gpa, gpa + len)` lies inside one region, checked without
    /// vm-memory.
    fn inside(gpa: u64, len: u64) -> bool {
        REGIONS.iter().any(|&(start, size)| {
            let end = start + size as u64;
            gpa >= start && gpa.checked_add(len).is_some_and(|e| e <= end)
        })
    }

    fn addr() -> impl Strategy<Value = u64> {
        prop_oneof![
            6 => 0u64..0x4000,
            6 => 0x8000u64..0xc000,
            1 => 0x3f00u64..0x4100,
            1 => 0x7f00u64..0x8100,
            1 => 0xbf00u64..0xc100,
            1 => (u64::MAX - 0x2000)..=u64::MAX,
            1 => Just(1u64 << 40),
            1 => any::<u64>(),
        ]
    }

    fn len() -> impl Strategy<Value = u32> {
        prop_oneof![
            2 => Just(0u32),
            4 => 1u32..=32,
            4 => 0u32..0x1400,
            2 => prop::sample::select(vec![1u32, 15, 16, 17, 511, 512, 513, 4096, 0x4000]),
            1 => (u32::MAX - 0x20)..=u32::MAX,
            1 => any::<u32>(),
        ]
    }

    /// Mostly just the WRITE flag; sometimes anything.
    fn flags() -> impl Strategy<Value = u16> {
        prop_oneof![
            20 => prop::bool::ANY.prop_map(|w| if w { WRITE } else { 0 }),
            1 => Just(INDIRECT),
            1 => any::<u16>(),
        ]
    }

    fn descriptor() -> impl Strategy<Value = (u64, u32, u16)> {
        (addr(), len(), flags())
    }

    /// Descriptor lists: shaped like a request (header, readable data,
    /// writable data, status; each part of any length and place), or
    /// anything at all.
    fn descriptors() -> impl Strategy<Value = Vec<(u64, u32, u16)>> {
        // Mostly well inside a region, sometimes anywhere.
        let place = || {
            prop_oneof![
                12 => prop_oneof![0u64..0x3000, 0x8000u64..0xb000],
                1 => addr(),
            ]
        };
        let size = || prop_oneof![12 => 1u32..=0x800, 1 => len()];
        let header_len = prop_oneof![6 => Just(16u32), 1 => len()];
        let status_len = prop_oneof![6 => Just(1u32), 1 => len()];
        let shaped = (
            (place(), header_len),
            prop::collection::vec((place(), size()), 0..3),
            prop::collection::vec((place(), size()), 0..4),
            (place(), status_len),
            // Data in one direction only (as a well-formed request has it), or both.
            prop_oneof![2 => Just(Some(true)), 2 => Just(Some(false)), 1 => Just(None)],
        )
            .prop_map(|(header, mut readable, mut writable, status, one_way)| {
                match one_way {
                    Some(true) => readable.clear(),
                    Some(false) => writable.clear(),
                    None => {}
                }
                let mut v = vec![(header.0, header.1, 0)];
                v.extend(readable.into_iter().map(|(a, l)| (a, l, 0)));
                v.extend(writable.into_iter().map(|(a, l)| (a, l, WRITE)));
                v.push((status.0, status.1, WRITE));
                v
            });
        prop_oneof![
            2 => shaped,
            1 => prop::collection::vec(descriptor(), 0..12),
        ]
    }

    /// A header: a known or arbitrary type, arbitrary reserved bits, a sector
    /// near 0, near u64::MAX or anywhere.
    fn header() -> impl Strategy<Value = [u8; 16]> {
        let kind = prop_oneof![
            3 => prop::sample::select(vec![0u32, 1, 4, 8, 11, 13]),
            1 => any::<u32>(),
        ];
        let sector = prop_oneof![0u64..0x100, (u64::MAX - 0x100)..=u64::MAX, any::<u64>()];
        (kind, any::<u32>(), sector).prop_map(|(kind, reserved, sector)| {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[4..8].copy_from_slice(&reserved.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            h
        })
    }

    fn limits() -> impl Strategy<Value = Limits> {
        (
            1u32..=8,
            prop::sample::select(vec![1u32, 512, 4096, 1 << 20, u32::MAX]),
        )
            .prop_map(|(seg_max, size_max)| Limits { seg_max, size_max })
    }

    /// How the list ends: as a complete chain, or as one the iterator cut short
    /// (the last descriptor still points onwards).
    fn cut_short() -> impl Strategy<Value = bool> {
        prop::bool::weighted(0.05)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn parse_keeps_the_device_inside_guest_memory(
            descs in descriptors(),
            cut in cut_short(),
            hdr in header(),
            limits in limits(),
        ) {
            let m = mem();
            // The header goes where the first descriptor points, when it fits.
            if let Some(&(first, _, _)) = descs.first() {
                if inside(first, 16) {
                    m.write_slice(&hdr, GuestAddress(first)).unwrap();
                }
            }
            let n = descs.len();
            let chain: Vec<Descriptor> = descs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let flags = if i + 1 < n || cut { flags | NEXT } else { flags & !NEXT };
                    Descriptor::new(addr, len, flags, 0)
                })
                .collect();

            match parse(&m, chain.into_iter(), limits) {
                Ok(req) => {
                    for s in &req.data {
                        prop_assert!(
                            inside(s.gpa.0, u64::from(s.len)),
                            "segment {:?} outside guest memory: {:?}", s, req
                        );
                    }
                    prop_assert!(inside(req.status.0, 1), "status outside: {:?}", req);
                    prop_assert_eq!(u64::from(req.data_len), total(&req.data));
                    prop_assert!(req.data.len() <= usize::try_from(limits.seg_max).unwrap());
                    prop_assert!(
                        u64::from(req.data_len)
                            <= u64::from(limits.seg_max) * u64::from(limits.size_max)
                    );
                    prop_assert!(!matches!(req.op, RequestType::Unsupported(_)));
                    if req.op == RequestType::Flush {
                        prop_assert!(req.data.is_empty());
                    }
                    prop_assert!(!cut, "accepted a chain that was cut short: {:?}", req);
                }
                Err(rejected) => {
                    if let Some(at) = rejected.status_at {
                        prop_assert!(
                            inside(at.0, 1),
                            "status for {:?} at {} outside guest memory", rejected.reason, at
                        );
                    }
                }
            }
        }

        /// Well-formed reads and writes, with header and data cut into
        /// descriptors anywhere (zero-length ones included) and, for reads, the
        /// status byte sharing the last data descriptor: parse returns exactly
        /// the data bytes, in order, and the status byte after them.
        #[test]
        fn any_layout_parses_to_the_same_request(
            write in any::<bool>(),
            sectors in 0u32..=8,
            sector in any::<u64>(),
            header_cuts in prop::collection::vec(0u32..=16, 0..4),
            data_cuts in prop::collection::vec(any::<u16>(), 0..6),
            shared_status in any::<bool>(),
        ) {
            const HDR: u64 = 0x100;
            const DATA: u64 = 0x1000;
            let m = mem();
            let kind: u32 = if write { 1 } else { 0 };
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            m.write_slice(&h, GuestAddress(HDR)).unwrap();

            let len = sectors * 512;
            let pieces = |base: u64, total: u32, cuts: &mut Vec<u32>, flags: u16| {
                cuts.sort_unstable();
                let mut at = 0;
                let mut out = Vec::new();
                for &c in cuts.iter().chain(std::iter::once(&total)) {
                    out.push(Descriptor::new(base + u64::from(at), c - at, flags | NEXT, 0));
                    at = c;
                }
                out
            };
            let mut descs = pieces(HDR, 16, &mut header_cuts.clone(), 0);
            let mut cuts: Vec<u32> = data_cuts.iter().map(|&c| u32::from(c) % (len + 1)).collect();
            let data_flags = if write { 0 } else { WRITE };
            descs.extend(pieces(DATA, len, &mut cuts, data_flags));
            let status = DATA + u64::from(len);
            if !write && shared_status {
                // The status byte is the last byte of the last data descriptor.
                let last = descs.pop().unwrap();
                descs.push(Descriptor::new(last.addr().0, last.len() + 1, WRITE | NEXT, 0));
            } else {
                descs.push(Descriptor::new(status, 1, WRITE | NEXT, 0));
            }
            let last = descs.pop().unwrap();
            descs.push(Descriptor::new(last.addr().0, last.len(), last.flags() & !NEXT, 0));

            let limits = Limits { seg_max: 16, size_max: 4096 };
            let req = parse(&m, descs.clone().into_iter(), limits);
            prop_assert!(req.is_ok(), "{:?} from {:?}", req, descs);
            let req = req.unwrap();
            prop_assert_eq!(req.op, if write { RequestType::Out } else { RequestType::In });
            prop_assert_eq!(req.sector, sector);
            prop_assert_eq!(req.data_len, len);
            prop_assert_eq!(req.status, Gpa(status));
            let mut at = DATA;
            for s in &req.data {
                prop_assert_eq!(s.gpa, Gpa(at), "data out of order: {:?}", req.data);
                prop_assert!(s.len > 0);
                at += u64::from(s.len);
            }
            prop_assert_eq!(at, DATA + u64::from(len));
        }
    }
}
