//! Serving a parsed request, in two steps around the DMA engine's wait:
//! [`prepare`] checks everything that can be checked at arrival (ranges,
//! alignment, discard segments) and says what the engine should see;
//! [`perform`] moves the data through the engine and the namespace.

use dma::fault::Effect;
use dma::{Arrival, Engine, Op, Segment, Ticket};
use nvme_model::{LbaRange, Namespace, NamespaceError};
use vm_memory::bitmap::{BitmapSlice, MS};
use vm_memory::{GuestMemoryBackend, VolatileSlice};

use crate::blk::{RequestType, Status, DWZ_SEGMENT_LEN, ID_BYTES};
use crate::request::{sector_offset, Malformed, Request};

/// Why a well-formed chain still failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("Malformed request: {0}")]
    Malformed(Malformed),
    #[error("Media error")]
    Media(#[source] NamespaceError),
    #[error("Guest memory access failed")]
    Memory(#[source] dma::TransferError),
    #[error("Fault injected: {0}")]
    Injected(&'static str, crate::blk::Status),
    #[error("The power was cut after the request arrived")]
    CutOff,
}

impl ExecError {
    /// What the ledger records as the request's outcome, when more is known
    /// than its status.
    pub fn outcome(&self) -> Option<&'static str> {
        match self {
            ExecError::Media(NamespaceError::UnrecoveredRead { .. }) => {
                Some("unrecovered-read-error")
            }
            ExecError::Media(NamespaceError::WriteFault { .. }) => Some("write-fault"),
            ExecError::CutOff => Some("cut-off"),
            ExecError::Injected("power-cut", _) => Some("power-cut"),
            _ => None,
        }
    }
}

impl From<Malformed> for ExecError {
    fn from(m: Malformed) -> Self {
        ExecError::Malformed(m)
    }
}

/// What a request needs from the device besides guest memory.
#[derive(Debug)]
pub struct ExecContext<'a> {
    pub ns: &'a Namespace,
    pub engine: &'a Engine,
    pub serial: &'a [u8; ID_BYTES],
}

/// A request checked at arrival: what the engine sees of it, and the work
/// [`perform`] does after the engine's wait.
#[derive(Debug)]
pub struct Prepared {
    pub work: Work,
    pub arrival: Arrival,
    /// The namespace's power epoch at arrival: after a power cut the request
    /// no longer reaches the media.
    pub epoch: u64,
}

/// What a prepared request does to the media.
#[derive(Debug)]
pub enum Work {
    Read(LbaRange),
    /// With `fua` (NVMe's Force Unit Access) the blocks are stable when the
    /// write completes, whatever the write cache holds of others.
    Write {
        range: LbaRange,
        fua: bool,
    },
    Flush,
    GetId(usize),
    /// Ranges, each with its unmap flag.
    Zero(Vec<(LbaRange, bool)>),
}

/// Checks `req` against the namespace and, for discard and write-zeroes, reads
/// its segment list.
pub fn prepare<M: GuestMemoryBackend>(
    ns: &Namespace,
    mem: &M,
    queue: u16,
    req: &Request,
    buf: &mut Vec<u8>,
) -> Result<Prepared, ExecError> {
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
            (Op::GetId, Work::GetId(n))
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

/// A request of `op` from `queue` that does `work` with the guest memory of
/// `segments`, as it arrives now: the engine sees its first block and its
/// length (for discard and write-zeroes those of its ranges).
pub fn prepared(
    ns: &Namespace,
    queue: u16,
    op: Op,
    work: Work,
    segments: Vec<Segment>,
) -> Prepared {
    let (lba, len) = match &work {
        Work::Zero(ranges) => (
            ranges.first().map_or(0, |(r, _)| r.start().0),
            ranges.iter().map(|(r, _)| r.len()).sum(),
        ),
        Work::Read(r) | Work::Write { range: r, .. } => {
            (r.start().0, dma::segment::total_len(&segments))
        }
        _ => (0, dma::segment::total_len(&segments)),
    };
    Prepared {
        work,
        epoch: ns.power_epoch(),
        arrival: Arrival {
            op,
            queue,
            lba,
            len,
            segments,
        },
    }
}

impl Work {
    /// The media byte ranges (offset, length) the request touches.
    pub fn media_ranges(&self) -> Vec<(u64, u64)> {
        let r = |range: &LbaRange| (range.offset().0, range.len());
        match self {
            Work::Read(range) | Work::Write { range, .. } => vec![r(range)],
            Work::Zero(ranges) => ranges.iter().map(|(range, _)| r(range)).collect(),
            Work::Flush | Work::GetId(_) => Vec::new(),
        }
    }
}

/// Moves the data of a prepared request; returns the number of data bytes
/// written into guest memory. `buf` is scratch space, reused across requests.
/// What must be stable when the request completes (a write with `fua`, or
/// any change with the write cache off) the namespace syncs itself.
/// A fault effect on the ticket shapes what happens (the engine itself corrupts
/// or misplaces data; here requests fail, or writes reach the media torn).
/// A request from an earlier power `epoch` than the media's fails.
pub fn perform<M: GuestMemoryBackend>(
    ctx: &ExecContext<'_>,
    mem: &M,
    work: &Work,
    epoch: u64,
    ticket: &mut Ticket,
    buf: &mut Vec<u8>,
) -> Result<u32, ExecError> {
    let ns = ctx.ns;
    let effect = ticket.effect;
    match effect {
        Some(Effect::Error { unsupp }) => {
            let status = if unsupp {
                Status::Unsupp
            } else {
                Status::IoErr
            };
            return Err(ExecError::Injected("error", status));
        }
        Some(Effect::PowerCut) => {
            let cut = ns.power_cut(None).map_err(ExecError::Media)?;
            log::info!(
                "power cut by a fault rule: {} blocks lost ({} volatile writes)",
                cut.lost_blocks,
                cut.writes
            );
            return Err(ExecError::Injected("power-cut", Status::IoErr));
        }
        _ => {}
    }
    if epoch != ns.power_epoch() && !matches!(work, Work::GetId(_)) {
        return Err(ExecError::CutOff);
    }
    match work {
        Work::Read(range) => {
            if !ctx.engine.read_needs_buffer(ticket) {
                if let Some(guest) = guest_buffers(mem, &ticket.arrival.segments) {
                    ctx.engine
                        .deliver(mem, ticket, |_| read_into(ns, *range, &guest))?;
                    return Ok(u32::try_from(range.len()).unwrap_or(u32::MAX));
                }
            }
            buf.resize(len_of(range), 0);
            ns.read(*range, buf).map_err(ExecError::Media)?;
            ctx.engine
                .to_guest(mem, ticket, buf)
                .map_err(ExecError::Memory)?;
            if let Some(Effect::Partial { .. }) = effect {
                return Err(ExecError::Injected("partial", Status::IoErr));
            }
            Ok(u32::try_from(range.len()).unwrap_or(u32::MAX))
        }
        Work::Write { range, fua } => {
            buf.resize(len_of(range), 0);
            ctx.engine
                .from_guest(mem, ticket, buf)
                .map_err(ExecError::Memory)?;
            let (stored, failure) = match effect {
                Some(Effect::Partial { bytes }) => (bytes, Some("partial")),
                Some(Effect::Torn { bytes, fail }) => (bytes, fail.then_some("torn")),
                _ => (range.len(), None),
            };
            // Only whole blocks reach the media.
            let blocks = stored.min(range.len()) >> ns.lba_size().shift();
            if blocks > 0 {
                let part = ns
                    .check_range(range.start(), blocks)
                    .map_err(|_| ExecError::Malformed(Malformed::OutOfRange))?;
                let data = &buf[..len_of(&part)];
                if *fua {
                    ns.write_stable(part, data)
                } else {
                    ns.write(part, data)
                }
                .map_err(ExecError::Media)?;
            }
            match failure {
                Some(what) => Err(ExecError::Injected(what, Status::IoErr)),
                None => Ok(0),
            }
        }
        Work::Flush => {
            ns.flush().map_err(ExecError::Media)?;
            Ok(0)
        }
        Work::GetId(n) => {
            ctx.engine
                .to_guest(mem, ticket, &ctx.serial[..*n])
                .map_err(ExecError::Memory)?;
            Ok(u32::try_from(*n).unwrap_or(0))
        }
        Work::Zero(ranges) => {
            // Write-zeroes reads back as zeros whatever deallocation does; with
            // or without UNMAP it gives the space back where the backing can
            // (a punched hole). Only discard follows `--deallocate`.
            for &(range, _unmap) in ranges {
                let done = if ticket.arrival.op == Op::Discard {
                    ns.deallocate(range)
                } else {
                    ns.write_zeroes(range)
                };
                done.map_err(ExecError::Media)?;
            }
            Ok(0)
        }
    }
}

/// A request's guest memory as buffers the media can be read into directly,
/// without a copy through a host buffer (what an NVMe drive does with PRPs).
/// `None` when a segment is not one piece of mapped guest memory: the buffered
/// path then moves the data, and reports what fails.
fn guest_buffers<'a, M: GuestMemoryBackend>(
    mem: &'a M,
    segments: &[Segment],
) -> Option<Vec<VolatileSlice<'a, MS<'a, M>>>> {
    segments
        .iter()
        .map(|s| mem.get_slice(s.gpa.into(), s.len_usize()).ok())
        .collect()
}

/// Reads `range` from the media into `slices`, in order.
fn read_into<B: BitmapSlice>(
    ns: &Namespace,
    range: LbaRange,
    slices: &[VolatileSlice<'_, B>],
) -> Result<(), ExecError> {
    let guards: Vec<_> = slices.iter().map(VolatileSlice::ptr_guard_mut).collect();
    let mut iov: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        })
        .collect();
    // SAFETY: each iovec is a slice of mapped guest memory, kept mapped by its
    // guard until after the call; guest memory is only ever reached through
    // volatile accesses, never through Rust references.
    unsafe { ns.read_vectored(range, &mut iov) }.map_err(ExecError::Media)?;
    for s in slices {
        s.bitmap().mark_dirty(0, s.len());
    }
    Ok(())
}

fn len_of(range: &LbaRange) -> usize {
    // A request's data is at most seg_max * size_max bytes (request::parse).
    usize::try_from(range.len()).unwrap_or(0)
}

fn writable(ns: &Namespace) -> Result<(), Malformed> {
    if ns.read_only() {
        Err(Malformed::ReadOnly)
    } else {
        Ok(())
    }
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
    ns.check_range(start, blocks)
        .map_err(|_| Malformed::OutOfRange)
}

/// Reads and checks every segment of a discard / write-zeroes payload before any
/// of them is carried out.
fn dwz_ranges<M: GuestMemoryBackend>(
    ns: &Namespace,
    mem: &M,
    req: &Request,
    buf: &mut Vec<u8>,
) -> Result<Vec<(LbaRange, bool)>, ExecError> {
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
    dma::from_guest(mem, &req.data, buf).map_err(ExecError::Memory)?;
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
