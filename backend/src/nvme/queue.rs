//! Submission and completion queues in guest memory (NVMe 1.4, 4.1).
//!
//! A submission queue is a ring of 64-byte entries the host fills and
//! announces with the tail doorbell; the controller consumes from the head. A
//! completion queue is a ring of 16-byte entries the controller fills, marking
//! each new entry with the phase tag (1 on the first pass, inverted on every
//! wrap); the host consumes and announces its head with the head doorbell.
//! A completion queue keeps one slot empty: with `entries - 1` unconsumed
//! entries it is full, and further completions wait here until the host makes
//! room. The controller fetches no command whose completion would have to
//! wait (see `Controller::fetch`), so what waits stays below the queue's
//! size.
//!
//! With shadow doorbells ([`super::shadow`]) an I/O queue also has a slot in
//! the host's Shadow Doorbell and EventIdx buffers: the tail or head is read
//! from the first, and the second says when the host must ring.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{fence, Ordering};

use dma::Gpa;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::command::{Cqe, Sqe};
use super::handler::CommandTag;
use super::shadow::ShadowSlot;

/// Why a queue cannot go on: each makes the controller fatal (CSTS.CFS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("Submission queue {qid} entry at {gpa} lies outside guest memory")]
    SqEntryUnreachable { qid: u16, gpa: Gpa },
    #[error("Completion queue {qid} entry at {gpa} lies outside guest memory")]
    CqEntryUnreachable { qid: u16, gpa: Gpa },
    #[error("Doorbell of queue {qid} written with {value}, past its {entries} entries")]
    BeyondSize { qid: u16, value: u32, entries: u16 },
    #[error("Completion queue {qid} head {head} is past the {posted} entries posted from {from}")]
    HeadPastTail {
        qid: u16,
        head: u16,
        from: u16,
        posted: u16,
    },
    #[error("Doorbell of queue {qid}, which does not exist")]
    NoSuchQueue { qid: u16 },
    #[error("Shadow doorbell of queue {qid} at {gpa} lies outside guest memory")]
    ShadowUnreachable { qid: u16, gpa: Gpa },
}

/// A submission queue.
#[derive(Debug)]
pub struct SubQueue {
    pub qid: u16,
    pub base: Gpa,
    pub entries: u16,
    pub head: u16,
    pub tail: u16,
    /// The completion queue its commands complete to.
    pub cqid: u16,
    /// Tells this queue from an earlier one with the same identifier.
    pub incarnation: u64,
    /// Command identifiers fetched and not yet completed.
    pub in_flight: HashSet<u16>,
    /// The Delete I/O Submission Queue command waiting for `in_flight` to
    /// drain; the queue fetches nothing meanwhile.
    pub deleting: Option<CommandTag>,
    /// Its tail doorbell's slots, when the host shadows it.
    pub shadow: Option<ShadowSlot>,
}

impl SubQueue {
    pub fn new(qid: u16, base: Gpa, entries: u16, cqid: u16, incarnation: u64) -> SubQueue {
        SubQueue {
            qid,
            base,
            entries,
            head: 0,
            tail: 0,
            cqid,
            incarnation,
            in_flight: HashSet::new(),
            deleting: None,
            shadow: None,
        }
    }

    pub fn tag(&self, cid: u16) -> CommandTag {
        CommandTag {
            qid: self.qid,
            cid,
            incarnation: self.incarnation,
        }
    }

    /// The tail doorbell: `value` must name a slot of the queue.
    pub fn set_tail(&mut self, value: u32) -> Result<(), QueueError> {
        match u16::try_from(value) {
            Ok(tail) if tail < self.entries => {
                self.tail = tail;
                Ok(())
            }
            _ => Err(QueueError::BeyondSize {
                qid: self.qid,
                value,
                entries: self.entries,
            }),
        }
    }

    /// Whether the host has submitted nothing past the head.
    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Takes the tail from the shadow slot, if the queue has one; whether
    /// it moved. A value past the queue is the error a doorbell write of it
    /// would be.
    pub fn read_shadow<M: GuestMemoryBackend>(&mut self, mem: &M) -> Result<bool, QueueError> {
        let Some(slot) = self.shadow else {
            return Ok(false);
        };
        let qid = self.qid;
        let value = slot
            .doorbell(mem)
            .map_err(|gpa| QueueError::ShadowUnreachable { qid, gpa })?;
        if value == u32::from(self.tail) {
            return Ok(false);
        }
        self.set_tail(value)?;
        Ok(true)
    }

    /// Going idle: the EventIdx at the tail fetched up to, so that the host
    /// rings for its next command.
    pub fn arm<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), QueueError> {
        let Some(slot) = self.shadow else {
            return Ok(());
        };
        let qid = self.qid;
        slot.set_event_idx(mem, self.tail)
            .map_err(|gpa| QueueError::ShadowUnreachable { qid, gpa })
    }

    /// Reads the entry at the head and consumes it; `None` when the queue is
    /// empty.
    pub fn fetch<M: GuestMemoryBackend>(&mut self, mem: &M) -> Option<Result<Sqe, QueueError>> {
        if self.is_empty() {
            return None;
        }
        let gpa = slot(self.base, self.head, Sqe::SIZE);
        self.head = next(self.head, self.entries);
        let mut bytes = [0u8; Sqe::SIZE];
        Some(
            gpa.ok_or(QueueError::SqEntryUnreachable {
                qid: self.qid,
                gpa: self.base,
            })
            .and_then(|gpa| {
                mem.read_slice(&mut bytes, gpa.into())
                    .map_err(|_| QueueError::SqEntryUnreachable { qid: self.qid, gpa })
            })
            .map(|()| Sqe::from_bytes(&bytes)),
        )
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct CompQueue {
    pub qid: u16,
    pub base: Gpa,
    pub entries: u16,
    pub head: u16,
    pub tail: u16,
    /// The phase tag of the pass the tail is on.
    pub phase: bool,
    /// The MSI-X vector, if interrupts are enabled.
    pub vector: Option<u16>,
    /// Submission queues completing here.
    pub sqs: u16,
    /// Completions waiting for room. The controller fetches a command only
    /// if its completion will find room (`Controller::fetch`), which keeps
    /// this empty, and below `entries` in any case.
    pub waiting: VecDeque<Cqe>,
    /// Its head doorbell's slots, when the host shadows it.
    pub shadow: Option<ShadowSlot>,
    /// A submission queue stopped for want of room here: the EventIdx asks
    /// the host to ring its next head.
    pub awaited: bool,
}

impl CompQueue {
    pub fn new(qid: u16, base: Gpa, entries: u16, vector: Option<u16>) -> CompQueue {
        CompQueue {
            qid,
            base,
            entries,
            head: 0,
            tail: 0,
            phase: true,
            vector,
            sqs: 0,
            waiting: VecDeque::new(),
            shadow: None,
            awaited: false,
        }
    }

    /// Entries posted and not yet consumed by the host.
    pub fn posted(&self) -> u16 {
        distance(self.head, self.tail, self.entries)
    }

    pub fn is_full(&self) -> bool {
        self.posted() + 1 >= self.entries
    }

    /// Posts `cqe`, or keeps it until the host makes room. Returns whether an
    /// entry went to memory (and the host should be interrupted).
    pub fn post<M: GuestMemoryBackend>(&mut self, mem: &M, cqe: Cqe) -> Result<bool, QueueError> {
        if !self.waiting.is_empty() || self.is_full() {
            self.waiting.push_back(cqe);
            return Ok(false);
        }
        self.write(mem, cqe)?;
        Ok(true)
    }

    /// The head doorbell: `value` must be a slot no further than the tail.
    /// Then posts what waited for room; returns whether anything was posted.
    pub fn set_head<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        value: u32,
    ) -> Result<bool, QueueError> {
        let head = match u16::try_from(value) {
            Ok(head) if head < self.entries => head,
            _ => {
                return Err(QueueError::BeyondSize {
                    qid: self.qid,
                    value,
                    entries: self.entries,
                })
            }
        };
        if distance(self.head, head, self.entries) > self.posted() {
            return Err(QueueError::HeadPastTail {
                qid: self.qid,
                head,
                from: self.head,
                posted: self.posted(),
            });
        }
        self.head = head;
        let mut posted = false;
        while !self.is_full() {
            let Some(cqe) = self.waiting.pop_front() else {
                break;
            };
            self.write(mem, cqe)?;
            posted = true;
        }
        Ok(posted)
    }

    /// Takes the head from the shadow slot, if the queue has one, and posts
    /// what waited for room: `None` if it did not move, else whether
    /// anything was posted. A value the head doorbell could not take is the
    /// same error.
    pub fn read_shadow<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
    ) -> Result<Option<bool>, QueueError> {
        let Some(slot) = self.shadow else {
            return Ok(None);
        };
        let qid = self.qid;
        let value = slot
            .doorbell(mem)
            .map_err(|gpa| QueueError::ShadowUnreachable { qid, gpa })?;
        if value == u32::from(self.head) {
            return Ok(None);
        }
        self.set_head(mem, value).map(Some)
    }

    /// A submission queue waits for room here (`true`), or found it
    /// (`false`): the EventIdx moves to the head, or back to the tail.
    pub fn set_awaited<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        awaited: bool,
    ) -> Result<(), QueueError> {
        if self.awaited == awaited {
            return Ok(());
        }
        self.awaited = awaited;
        self.set_event_idx(mem)
    }

    /// The EventIdx where the host need not ring (the tail: its head never
    /// passes it), or, while a submission queue waits for room, at the head
    /// the controller knows, so that the host's next head rings.
    pub fn set_event_idx<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), QueueError> {
        let Some(slot) = self.shadow else {
            return Ok(());
        };
        let at = if self.awaited { self.head } else { self.tail };
        let qid = self.qid;
        slot.set_event_idx(mem, at)
            .map_err(|gpa| QueueError::ShadowUnreachable { qid, gpa })
    }

    /// Writes `cqe` at the tail: dwords 0-2 first, then dword 3 with the
    /// phase tag, so a host that sees the new phase sees the whole entry.
    /// A shadowed queue's EventIdx moves with the tail first, so a host
    /// that sees the entry sees the EventIdx past it.
    fn write<M: GuestMemoryBackend>(&mut self, mem: &M, cqe: Cqe) -> Result<(), QueueError> {
        let unreachable = |gpa| QueueError::CqEntryUnreachable { qid: self.qid, gpa };
        let gpa = slot(self.base, self.tail, Cqe::SIZE).ok_or(unreachable(self.base))?;
        let dw3 = gpa.checked_add(12).ok_or(unreachable(gpa))?;
        if let Some(shadow) = self.shadow.filter(|_| !self.awaited) {
            let qid = self.qid;
            shadow
                .set_event_idx(mem, next(self.tail, self.entries))
                .map_err(|gpa| QueueError::ShadowUnreachable { qid, gpa })?;
        }
        mem.write_slice(&cqe.head_bytes(), gpa.into())
            .map_err(|_| unreachable(gpa))?;
        fence(Ordering::Release);
        mem.store(
            cqe.dw3(self.phase),
            GuestAddress::from(dw3),
            Ordering::Release,
        )
        .map_err(|_| unreachable(gpa))?;
        self.tail = next(self.tail, self.entries);
        if self.tail == 0 {
            self.phase = !self.phase;
        }
        Ok(())
    }
}

/// The address of slot `index` of a ring of `size`-byte entries at `base`.
fn slot(base: Gpa, index: u16, size: usize) -> Option<Gpa> {
    let size = u64::try_from(size).ok()?;
    base.checked_add(u64::from(index) * size)
}

fn next(index: u16, entries: u16) -> u16 {
    if index + 1 >= entries {
        0
    } else {
        index + 1
    }
}

/// How many steps from `from` forward to `to` on a ring of `entries`.
fn distance(from: u16, to: u16, entries: u16) -> u16 {
    if to >= from {
        to - from
    } else {
        entries - from + to
    }
}

/// Whether a ring of `entries` entries of `size` bytes at `base` lies in
/// guest memory.
pub fn ring_in_memory<M: GuestMemoryBackend>(
    mem: &M,
    base: Gpa,
    entries: u16,
    size: usize,
) -> bool {
    usize::from(entries)
        .checked_mul(size)
        .is_some_and(|len| mem.check_range(base.into(), len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::status::NvmeStatus;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn cqe(cid: u16) -> Cqe {
        Cqe {
            dw0: 0,
            sq_head: 0,
            sqid: 1,
            cid,
            status: NvmeStatus::Success,
        }
    }

    fn dw3_at(mem: &GuestMemoryMmap<()>, base: u64, slot: u64) -> u32 {
        mem.read_obj(GuestAddress(base + slot * 16 + 12)).unwrap()
    }

    #[test]
    fn phase_flips_on_wrap_and_a_full_queue_waits() {
        let mem = memory();
        let mut cq = CompQueue::new(1, Gpa(0x4000), 4, Some(1));
        for cid in 0..3 {
            assert_eq!(cq.post(&mem, cqe(cid)), Ok(true));
        }
        // Three of four slots: full; the fourth completion waits.
        assert!(cq.is_full());
        assert_eq!(cq.post(&mem, cqe(3)), Ok(false));
        for slot in 0..3 {
            assert_eq!(dw3_at(&mem, 0x4000, slot) >> 16 & 1, 1);
        }
        // The host consumes two: the waiting one goes to slot 3, phase 1.
        assert_eq!(cq.set_head(&mem, 2), Ok(true));
        assert_eq!(dw3_at(&mem, 0x4000, 3) & 0xffff, 3);
        assert_eq!(dw3_at(&mem, 0x4000, 3) >> 16 & 1, 1);
        // The next wraps to slot 0 with phase 0.
        assert_eq!(cq.post(&mem, cqe(4)), Ok(true));
        assert_eq!(dw3_at(&mem, 0x4000, 0), 4);
    }

    #[test]
    fn head_may_not_pass_the_tail() {
        let mem = memory();
        let mut cq = CompQueue::new(2, Gpa(0x4000), 8, None);
        cq.post(&mem, cqe(1)).unwrap();
        cq.post(&mem, cqe(2)).unwrap();
        assert!(matches!(
            cq.set_head(&mem, 3),
            Err(QueueError::HeadPastTail {
                qid: 2,
                head: 3,
                ..
            })
        ));
        assert!(matches!(
            cq.set_head(&mem, 8),
            Err(QueueError::BeyondSize { .. })
        ));
        assert_eq!(cq.set_head(&mem, 2), Ok(false));
        assert_eq!(cq.set_head(&mem, 2), Ok(false));
        assert!(cq.set_head(&mem, 1).is_err(), "backwards is past the tail");
    }

    #[test]
    fn sq_fetches_in_order_and_wraps() {
        let mem = memory();
        let mut sq = SubQueue::new(1, Gpa(0x8000), 3, 1, 7);
        for (i, cid) in [10u16, 11, 12].into_iter().enumerate() {
            let at = 0x8000 + 64 * i as u64;
            mem.write_slice(&Sqe::new(0x02, cid).to_bytes(), GuestAddress(at))
                .unwrap();
        }
        assert!(sq.fetch(&mem).is_none());
        sq.set_tail(2).unwrap();
        assert_eq!(sq.fetch(&mem).unwrap().unwrap().cid(), 10);
        assert_eq!(sq.fetch(&mem).unwrap().unwrap().cid(), 11);
        assert!(sq.fetch(&mem).is_none());
        sq.set_tail(1).unwrap();
        assert_eq!(sq.fetch(&mem).unwrap().unwrap().cid(), 12);
        assert_eq!(sq.fetch(&mem).unwrap().unwrap().cid(), 10);
        assert_eq!(sq.head, 1);
        assert!(sq.set_tail(3).is_err());
        assert!(sq.set_tail(0x1_0001).is_err());
        assert_eq!(sq.tag(5).incarnation, 7);
    }

    #[test]
    fn unreachable_entries_are_errors() {
        let mem = memory();
        let mut sq = SubQueue::new(1, Gpa(!0xfffu64), 4, 1, 0);
        sq.set_tail(1).unwrap();
        assert!(matches!(
            sq.fetch(&mem),
            Some(Err(QueueError::SqEntryUnreachable { .. }))
        ));
        let mut cq = CompQueue::new(1, Gpa(2 << 20), 4, None);
        assert!(matches!(
            cq.post(&mem, cqe(1)),
            Err(QueueError::CqEntryUnreachable { .. })
        ));
        assert!(!ring_in_memory(&mem, Gpa((1 << 20) - 4096), 512, 16));
        assert!(ring_in_memory(&mem, Gpa((1 << 20) - 8192), 512, 16));
    }
}
