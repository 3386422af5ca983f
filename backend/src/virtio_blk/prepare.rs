//! The virtio-blk half of serving a request: [`prepare`] checks a parsed
//! request against the namespace at arrival (ranges, alignment, discard
//! segments) and says what the engine should see and what work
//! [`perform`](crate::pipeline::work::perform) does after its wait.

use dma::{Op, Segment};
use nvme_model::{LbaRange, Namespace};
use vm_memory::GuestMemoryBackend;

use super::request::{sector_offset, Malformed, Request};
use super::{RequestType, DWZ_SEGMENT_LEN, ID_BYTES};
use crate::pipeline::work::{block_range, prepared, writable, Prepared, Work};
use crate::pipeline::Refusal;

/// Why a parsed request cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("Malformed request: {0}")]
    Malformed(Malformed),
    #[error("Guest memory access failed")]
    Memory(#[source] dma::TransferError),
}

impl PrepareError {
    /// The mistake it is counted as, and answered for.
    pub fn mistake(&self) -> Malformed {
        match self {
            PrepareError::Malformed(m) => *m,
            PrepareError::Memory(_) => Malformed::OutsideMemory,
        }
    }
}

impl From<Malformed> for PrepareError {
    fn from(m: Malformed) -> Self {
        PrepareError::Malformed(m)
    }
}

impl From<Refusal> for PrepareError {
    fn from(r: Refusal) -> Self {
        PrepareError::Malformed(r.into())
    }
}

/// The pipeline's refusals, in virtio-blk's words.
impl From<Refusal> for Malformed {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::OutOfRange => Malformed::OutOfRange,
            Refusal::ReadOnly => Malformed::ReadOnly,
            Refusal::OutsideMemory => Malformed::OutsideMemory,
        }
    }
}

/// Checks `req` against the namespace and, for discard and write-zeroes, reads
/// its segment list; GET_ID answers with `serial`.
pub fn prepare<M: GuestMemoryBackend>(
    ns: &Namespace,
    mem: &M,
    queue: u16,
    req: &Request,
    serial: &[u8; ID_BYTES],
    buf: &mut Vec<u8>,
) -> Result<Prepared, PrepareError> {
    let lba = sector_offset(req.sector).map_or(0, |off| off >> ns.lba_size().shift());
    let mut segments = Vec::new();
    let (op, work) = match req.op {
        RequestType::In => {
            segments.clone_from(&req.data);
            (
                Op::Read,
                Work::Read(lba_range(ns, req.sector, req.data_len)?),
            )
        }
        RequestType::Out => {
            writable(ns)?;
            segments.clone_from(&req.data);
            (
                Op::Write,
                Work::Write {
                    range: lba_range(ns, req.sector, req.data_len)?,
                    fua: false,
                },
            )
        }
        RequestType::Flush => (Op::Flush, Work::Flush),
        RequestType::GetId => {
            let n = (req.data_len as usize).min(ID_BYTES);
            segments.clone_from(&req.data);
            truncate_segments(&mut segments, n);
            (Op::GetId, Work::DeviceData(serial[..n].to_vec()))
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            writable(ns)?;
            let op = if req.op == RequestType::Discard {
                Op::Discard
            } else {
                Op::WriteZeroes
            };
            (op, Work::Zero(dwz_ranges(ns, mem, req, buf)?))
        }
        RequestType::Unsupported(_) => return Err(Malformed::Unsupported.into()),
    };
    let mut p = prepared(ns, queue, op, work, segments);
    if !matches!(p.work, Work::Zero(_) | Work::Read(_) | Work::Write { .. }) {
        p.arrival.lba = lba;
    }
    Ok(p)
}

/// The blocks that `bytes` bytes from 512-byte `sector` cover: both must be
/// aligned to the logical block size, and the range must lie inside the namespace.
pub fn lba_range(ns: &Namespace, sector: u64, bytes: u32) -> Result<LbaRange, Malformed> {
    let lbs = ns.lba_size();
    let offset = sector_offset(sector).ok_or(Malformed::OutOfRange)?;
    let start = lbs
        .lba_at(nvme_model::ByteOffset(offset))
        .ok_or(Malformed::Unaligned)?;
    let blocks = lbs
        .blocks_in(u64::from(bytes))
        .ok_or(Malformed::Unaligned)?;
    Ok(block_range(ns, start, blocks)?)
}

/// Reads and checks every segment of a discard / write-zeroes payload before any
/// of them is carried out.
fn dwz_ranges<M: GuestMemoryBackend>(
    ns: &Namespace,
    mem: &M,
    req: &Request,
    buf: &mut Vec<u8>,
) -> Result<Vec<(LbaRange, bool)>, PrepareError> {
    let g = ns.geometry();
    let (max_segments, max_bytes) = match req.op {
        RequestType::Discard => (g.max_discard_segments, g.max_discard),
        _ => (g.max_write_zeroes_segments, g.max_write_zeroes),
    };
    let n = req.data_len / DWZ_SEGMENT_LEN;
    if req.data_len == 0 || !req.data_len.is_multiple_of(DWZ_SEGMENT_LEN) || n > max_segments {
        return Err(Malformed::BadSegmentList.into());
    }
    buf.resize(req.data_len as usize, 0);
    dma::from_guest(mem, &req.data, buf).map_err(PrepareError::Memory)?;
    let allowed_flags = match req.op {
        RequestType::WriteZeroes => virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        _ => 0,
    };
    buf.chunks_exact(DWZ_SEGMENT_LEN as usize)
        .map(|s| {
            let sector = u64::from_le_bytes(s[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(s[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(s[12..16].try_into().unwrap_or_default());
            if flags & !allowed_flags != 0 {
                return Err(Malformed::BadFlags.into());
            }
            let bytes = u64::from(sectors) << 9;
            if bytes > max_bytes {
                return Err(Malformed::BadSegmentList.into());
            }
            // Within the limits, which fit the u32 lba_range takes.
            let bytes = u32::try_from(bytes).map_err(|_| Malformed::BadSegmentList)?;
            Ok((lba_range(ns, sector, bytes)?, flags & allowed_flags != 0))
        })
        .collect()
}

fn truncate_segments(segs: &mut Vec<Segment>, bytes: usize) {
    let mut left = bytes;
    segs.retain_mut(|s| {
        if left == 0 {
            return false;
        }
        let take = left.min(s.len_usize());
        s.len = u32::try_from(take).unwrap_or(s.len);
        left -= take;
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvme_model::{Backing, Lba, LbaSize};

    fn ns(lbs: LbaSize) -> Namespace {
        Namespace::new(Backing::memory(1 << 20).unwrap(), lbs, false).unwrap()
    }

    #[test]
    fn sector_ranges() {
        let n = ns(LbaSize::B512);
        assert_eq!(lba_range(&n, 2047, 512).unwrap().start(), Lba(2047));
        assert_eq!(lba_range(&n, 2047, 1024), Err(Malformed::OutOfRange));
        assert_eq!(lba_range(&n, 0, 100), Err(Malformed::Unaligned));
        assert_eq!(lba_range(&n, u64::MAX, 512), Err(Malformed::OutOfRange));
        assert_eq!(
            lba_range(&n, u64::MAX / 512, 512),
            Err(Malformed::OutOfRange)
        );
        let n = ns(LbaSize::B4096);
        assert_eq!(lba_range(&n, 8, 4096).unwrap().start(), Lba(1));
        assert_eq!(lba_range(&n, 1, 4096), Err(Malformed::Unaligned));
        assert_eq!(lba_range(&n, 8, 512), Err(Malformed::Unaligned));
    }

    #[test]
    fn get_id_truncates_segments() {
        let mut segs = vec![
            Segment::new(dma::Gpa(0), 8),
            Segment::new(dma::Gpa(100), 64),
        ];
        truncate_segments(&mut segs, 20);
        assert_eq!(
            segs,
            vec![
                Segment::new(dma::Gpa(0), 8),
                Segment::new(dma::Gpa(100), 12)
            ]
        );
    }
}
