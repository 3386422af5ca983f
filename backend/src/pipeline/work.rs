//! The shared half of serving a request: what a prepared request is
//! ([`Prepared`]: the engine's [`Arrival`] and the [`Work`] it does), and
//! [`perform`], which moves its data through the engine and the namespace
//! once the engine's wait is over. Each interface prepares its own requests
//! (virtio-blk in `crate::virtio_blk::prepare`, NVMe in `crate::nvme::device`).

use dma::fault::Effect;
use dma::{Arrival, Engine, Op, Segment, Ticket};
use nvme_model::{Lba, LbaRange, Namespace, NamespaceError};
use vm_memory::bitmap::{BitmapSlice, MS};
use vm_memory::{GuestMemoryBackend, VolatileSlice};

use super::outcome::{InjectedError, Refusal};

/// Why a prepared request failed when its data moved.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error("Refused: {0}")]
    Refused(Refusal),
    #[error("Media error")]
    Media(#[source] NamespaceError),
    #[error("Guest memory access failed")]
    Memory(#[source] dma::TransferError),
    #[error("Fault injected: {0}")]
    Injected(&'static str, InjectedError),
    #[error("The power was cut after the request arrived")]
    CutOff,
}

impl WorkError {
    /// What the ledger records as the request's outcome, when more is known
    /// than its status.
    pub fn outcome(&self) -> Option<&'static str> {
        match self {
            WorkError::Media(NamespaceError::UnrecoveredRead { .. }) => {
                Some("unrecovered-read-error")
            }
            WorkError::Media(NamespaceError::WriteFault { .. }) => Some("write-fault"),
            WorkError::CutOff => Some("cut-off"),
            WorkError::Injected("power-cut", _) => Some("power-cut"),
            _ => None,
        }
    }
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
    /// Bytes the device answers with from its own state, not from the media
    /// (virtio-blk's GET_ID): they go into guest memory as a read's data
    /// does, through the engine (so fault rules, holds and canaries apply),
    /// with no media time and whatever power cuts came between.
    DeviceData(Vec<u8>),
    /// Ranges, each with its unmap flag.
    Zero(Vec<(LbaRange, bool)>),
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
            Work::Flush | Work::DeviceData(_) => Vec::new(),
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
    ns: &Namespace,
    engine: &Engine,
    mem: &M,
    work: &Work,
    epoch: u64,
    ticket: &mut Ticket,
    buf: &mut Vec<u8>,
) -> Result<u32, WorkError> {
    injected_failure(ns, ticket.effect)?;
    if epoch != ns.power_epoch() && !matches!(work, Work::DeviceData(_)) {
        return Err(WorkError::CutOff);
    }
    match work {
        Work::Read(range) => read(ns, engine, mem, *range, ticket, buf),
        Work::Write { range, fua } => write(ns, engine, mem, *range, *fua, ticket, buf),
        Work::Flush => {
            ns.flush().map_err(WorkError::Media)?;
            Ok(0)
        }
        Work::DeviceData(bytes) => {
            engine
                .to_guest(mem, ticket, bytes)
                .map_err(WorkError::Memory)?;
            Ok(u32::try_from(bytes.len()).unwrap_or(0))
        }
        Work::Zero(ranges) => zero(ns, ranges, ticket.arrival.op),
    }
}

/// The failure a fault effect makes of the request before any data moves:
/// an injected error, or a power cut (the request fails, the media loses
/// what was volatile).
fn injected_failure(ns: &Namespace, effect: Option<Effect>) -> Result<(), WorkError> {
    match effect {
        Some(Effect::Error { unsupp }) => {
            let error = if unsupp {
                InjectedError::Unsupported
            } else {
                InjectedError::IoError
            };
            Err(WorkError::Injected("error", error))
        }
        Some(Effect::PowerCut) => {
            let cut = ns.power_cut(None).map_err(WorkError::Media)?;
            log::info!(
                "power cut by a fault rule: {} blocks lost ({} volatile writes)",
                cut.lost_blocks,
                cut.writes
            );
            Err(WorkError::Injected("power-cut", InjectedError::IoError))
        }
        _ => Ok(()),
    }
}

/// A read: from the media straight into guest memory when nothing needs the
/// data in a host buffer, else through `buf` (where the engine shapes it; a
/// partial read fails after its data moved).
fn read<M: GuestMemoryBackend>(
    ns: &Namespace,
    engine: &Engine,
    mem: &M,
    range: LbaRange,
    ticket: &mut Ticket,
    buf: &mut Vec<u8>,
) -> Result<u32, WorkError> {
    let effect = ticket.effect;
    if !engine.read_needs_buffer(ticket) {
        if let Some(guest) = guest_buffers(mem, &ticket.arrival.segments) {
            engine.deliver(mem, ticket, |_| read_into(ns, range, &guest))?;
            return Ok(u32::try_from(range.len()).unwrap_or(u32::MAX));
        }
    }
    buf.resize(len_of(&range), 0);
    ns.read(range, buf).map_err(WorkError::Media)?;
    engine
        .to_guest(mem, ticket, buf)
        .map_err(WorkError::Memory)?;
    if let Some(Effect::Partial { .. }) = effect {
        return Err(WorkError::Injected("partial", InjectedError::IoError));
    }
    Ok(u32::try_from(range.len()).unwrap_or(u32::MAX))
}

/// A write: from guest memory through `buf` to the media, stable at once
/// with `fua`. A partial or torn write stores only its first whole blocks,
/// and fails if the fault says so.
fn write<M: GuestMemoryBackend>(
    ns: &Namespace,
    engine: &Engine,
    mem: &M,
    range: LbaRange,
    fua: bool,
    ticket: &mut Ticket,
    buf: &mut Vec<u8>,
) -> Result<u32, WorkError> {
    let effect = ticket.effect;
    buf.resize(len_of(&range), 0);
    engine
        .from_guest(mem, ticket, buf)
        .map_err(WorkError::Memory)?;
    let (stored, failure) = match effect {
        Some(Effect::Partial { bytes }) => (bytes, Some("partial")),
        Some(Effect::Torn { bytes, fail }) => (bytes, fail.then_some("torn")),
        _ => (range.len(), None),
    };
    // Only whole blocks reach the media.
    let blocks = stored.min(range.len()) >> ns.lba_size().shift();
    if blocks > 0 {
        let part = block_range(ns, range.start(), blocks).map_err(WorkError::Refused)?;
        let data = &buf[..len_of(&part)];
        if fua {
            ns.write_stable(part, data)
        } else {
            ns.write(part, data)
        }
        .map_err(WorkError::Media)?;
    }
    match failure {
        Some(what) => Err(WorkError::Injected(what, InjectedError::IoError)),
        None => Ok(0),
    }
}

/// Discard (`op`) or write-zeroes over `ranges`, in order. Write-zeroes
/// reads back as zeros whatever deallocation does; with or without UNMAP it
/// gives the space back where the backing can (a punched hole). Only
/// discard follows `--deallocate`.
fn zero(ns: &Namespace, ranges: &[(LbaRange, bool)], op: Op) -> Result<u32, WorkError> {
    for &(range, _unmap) in ranges {
        let done = if op == Op::Discard {
            ns.deallocate(range)
        } else {
            ns.write_zeroes(range)
        };
        done.map_err(WorkError::Media)?;
    }
    Ok(0)
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
) -> Result<(), WorkError> {
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
    unsafe { ns.read_vectored(range, &mut iov) }.map_err(WorkError::Media)?;
    for s in slices {
        s.bitmap().mark_dirty(0, s.len());
    }
    Ok(())
}

fn len_of(range: &LbaRange) -> usize {
    // A request's data is at most seg_max * size_max bytes (request::parse).
    usize::try_from(range.len()).unwrap_or(0)
}

/// The `blocks` blocks from `start`, if they lie inside the namespace: the
/// one bounds check of every interface's preparation.
pub fn block_range(ns: &Namespace, start: Lba, blocks: u64) -> Result<LbaRange, Refusal> {
    ns.check_range(start, blocks)
        .map_err(|_| Refusal::OutOfRange)
}

/// Whether requests may change the namespace.
pub fn writable(ns: &Namespace) -> Result<(), Refusal> {
    if ns.read_only() {
        Err(Refusal::ReadOnly)
    } else {
        Ok(())
    }
}
