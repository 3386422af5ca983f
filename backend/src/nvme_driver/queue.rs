//! Queues as the host keeps them: where each lies, the submission tail it
//! has written to and the head the controller last reported, the completion
//! head and phase tag it reads at, and which doorbell tells the controller
//! (a register, or a shadow slot in host memory).

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};

use dma::Gpa;

use super::command::{Completion, Sqe};
use super::error::Error;
use super::prp::offset;
use super::transport::{HostMemory, Transport};
use crate::nvme::controller::DOORBELLS;
use crate::nvme::shadow::{need_event, ShadowBuffers, ShadowSlot};

/// Where the admin queues lie and how long they are (AQA, ASQ, ACQ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminQueues {
    pub sq: Gpa,
    pub cq: Gpa,
    pub entries: u16,
}

/// An I/O submission queue and the completion queue of the same identifier
/// it completes to, as Linux pairs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoQueuePair {
    pub qid: u16,
    pub sq: Gpa,
    pub cq: Gpa,
    pub entries: u16,
    /// The completion queue's MSI-X vector; None: polled.
    pub vector: Option<u16>,
}

/// A submission queue: the host writes entries at its tail; the controller
/// says how far it has fetched (its head) in each completion.
#[derive(Debug)]
pub(super) struct SubmissionQueue {
    pub base: Gpa,
    pub entries: u16,
    pub tail: u16,
    /// The head the last completion from this queue reported.
    pub head: u16,
    pub cqid: u16,
}

impl SubmissionQueue {
    pub fn new(base: Gpa, entries: u16, cqid: u16) -> SubmissionQueue {
        SubmissionQueue {
            base,
            entries,
            tail: 0,
            head: 0,
            cqid,
        }
    }

    /// Where the next entry goes.
    pub fn slot(&self) -> Result<Gpa, Error> {
        offset(self.base, u64::from(self.tail) * Sqe::SIZE as u64)
    }

    pub fn advance(&mut self) {
        self.tail = next(self.tail, self.entries);
    }

    /// Takes the head a completion reports; one past the end of the ring is
    /// the controller's mistake, and ignored.
    pub fn report_head(&mut self, head: u16) {
        if head < self.entries {
            self.head = head;
        }
    }

    /// Entries that can be placed without overwriting one the controller
    /// may not have fetched yet: the ring holds one fewer than its size
    /// (head = tail is empty), less those between the head and the tail.
    pub fn room(&self) -> u16 {
        let entries = u32::from(self.entries.max(1));
        let used = (u32::from(self.tail) + entries - u32::from(self.head) % entries) % entries;
        u16::try_from(entries - 1 - used).unwrap_or_default()
    }
}

/// A completion queue: the host reads entries at its head while their phase
/// tag is the one the current pass through the ring posts.
#[derive(Debug)]
pub(super) struct CompletionQueue {
    pub base: Gpa,
    pub entries: u16,
    pub head: u16,
    pub phase: bool,
    pub vector: Option<u16>,
    /// Entries from the head that an interrupt taken after they were posted
    /// announced: a driver takes a completion only once one did.
    pub announced: u16,
    /// Completions taken while waiting for another command's.
    pub early: VecDeque<Completion>,
}

impl CompletionQueue {
    pub fn new(base: Gpa, entries: u16, vector: Option<u16>) -> CompletionQueue {
        CompletionQueue {
            base,
            entries,
            head: 0,
            phase: true,
            vector,
            announced: 0,
            early: VecDeque::new(),
        }
    }

    /// The entry `i` places past the head, and the phase tag it carries once
    /// the controller posted it (the other one past the end of the ring).
    pub fn peek(&self, i: u16) -> Result<(Gpa, bool), Error> {
        let entries = u32::from(self.entries.max(1));
        let at = u32::from(self.head) + u32::from(i);
        let phase = if at >= entries {
            !self.phase
        } else {
            self.phase
        };
        let slot = u64::from(at % entries);
        Ok((offset(self.base, slot * Completion::SIZE as u64)?, phase))
    }

    /// Past the head entry; the phase tag flips at the end of the ring.
    pub fn advance(&mut self) {
        self.head = next(self.head, self.entries);
        if self.head == 0 {
            self.phase = !self.phase;
        }
        self.announced = self.announced.saturating_sub(1);
    }

    /// Bytes of ring memory.
    pub fn len(&self) -> usize {
        usize::from(self.entries) * Completion::SIZE
    }

    /// Whether the entry `i` places past the head is new: its phase tag is
    /// the one this pass through the ring posts.
    pub fn posted(&self, mem: &impl HostMemory, i: u16) -> Result<bool, Error> {
        let (at, phase) = self.peek(i)?;
        let dw3 = mem.load32(offset(at, 12)?)?;
        Ok((dw3 >> 16 & 1 == 1) == phase)
    }

    /// Reads the head entry and moves past it, without ringing.
    pub fn take(&mut self, mem: &impl HostMemory) -> Result<Completion, Error> {
        let (at, _) = self.peek(0)?;
        let mut b = [0u8; Completion::SIZE];
        mem.read_mem(at, &mut b)?;
        self.advance();
        Ok(Completion::parse(&b))
    }
}

fn next(index: u16, entries: u16) -> u16 {
    let n = (u32::from(index) + 1) % u32::from(entries.max(1));
    u16::try_from(n).unwrap_or_default()
}

/// The doorbells, `stride` bytes apart (4 << CAP.DSTRD): queue `qid`'s
/// submission tail, then its completion head; with `shadow`, the I/O
/// queues' doorbells are the host's shadow slots, and a register is written
/// only when the controller's EventIdx asks for it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Doorbells {
    pub stride: u64,
    pub shadow: Option<ShadowBuffers>,
}

/// Which of a queue pair's two doorbells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Doorbell {
    SqTail,
    CqHead,
}

impl Doorbells {
    /// The register of queue `qid`'s doorbell `which`.
    pub fn register(self, qid: u16, which: Doorbell) -> u64 {
        let index = 2 * u64::from(qid) + u64::from(which == Doorbell::CqHead);
        DOORBELLS + index * self.stride
    }

    /// Tells the controller that queue `qid`'s doorbell `which` moved from
    /// `old` to `new` (`old` None: the register is written whatever the
    /// EventIdx says); whether the register was written.
    pub fn tell<T: Transport>(
        self,
        transport: &T,
        qid: u16,
        which: Doorbell,
        old: Option<u16>,
        new: u16,
    ) -> Result<bool, Error> {
        let slot = self.shadow.and_then(|s| match which {
            Doorbell::SqTail => s.sq(qid),
            Doorbell::CqHead => s.cq(qid),
        });
        ring_doorbell(transport, self.register(qid, which), slot, old, new)
    }
}

/// Writes `new` to the doorbell register at `register`; with a shadow
/// `slot`, to the slot first, then (after a full barrier, which pairs with
/// the controller's fence after its EventIdx write) to the register only if
/// `new` went past the EventIdx since `old`, as Linux's
/// `nvme_dbbuf_update_and_check_event` does (or, `old` None, whatever it
/// says). Whether the register was written.
pub fn ring_doorbell<T: Transport>(
    transport: &T,
    register: u64,
    slot: Option<ShadowSlot>,
    old: Option<u16>,
    new: u16,
) -> Result<bool, Error> {
    if let Some(slot) = slot {
        let mem = transport.memory();
        mem.store32(slot.doorbell, u32::from(new))?;
        if let Some(old) = old {
            fence(Ordering::SeqCst);
            // The slot is a dword; the index is its low 16 bits.
            let event_idx = mem.load32(slot.event_idx)? as u16;
            if !need_event(event_idx, new, old) {
                return Ok(false);
            }
        }
    }
    transport.write32(register, u32::from(new))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_tag_flips_at_the_end_of_the_ring() {
        let mut cq = CompletionQueue::new(Gpa(0x1000), 4, None);
        assert_eq!(cq.peek(3).unwrap(), (Gpa(0x1030), true));
        assert_eq!(cq.peek(4).unwrap(), (Gpa(0x1000), false));
        for _ in 0..3 {
            cq.advance();
        }
        assert_eq!((cq.head, cq.phase), (3, true));
        cq.advance();
        assert_eq!((cq.head, cq.phase), (0, false));
        assert_eq!(cq.peek(1).unwrap(), (Gpa(0x1010), false));
    }

    #[test]
    fn room_is_what_lies_between_the_tail_and_the_reported_head() {
        let mut sq = SubmissionQueue::new(Gpa(0), 4, 1);
        assert_eq!(sq.room(), 3, "one slot always stays empty");
        for left in [2, 1, 0] {
            sq.advance();
            assert_eq!(sq.room(), left);
        }
        sq.report_head(2);
        assert_eq!((sq.tail, sq.room()), (3, 2));
        sq.advance();
        assert_eq!((sq.tail, sq.room()), (0, 1), "the tail wraps");
        sq.report_head(4);
        assert_eq!(sq.head, 2, "a head past the ring is ignored");
        sq.report_head(0);
        assert_eq!(sq.room(), 3);
    }

    #[test]
    fn doorbells_follow_the_stride() {
        let d = Doorbells {
            stride: 4,
            shadow: None,
        };
        assert_eq!(
            (
                d.register(0, Doorbell::SqTail),
                d.register(0, Doorbell::CqHead),
                d.register(1, Doorbell::SqTail),
                d.register(1, Doorbell::CqHead)
            ),
            (0x1000, 0x1004, 0x1008, 0x100c)
        );
        let d = Doorbells {
            stride: 16,
            shadow: None,
        };
        assert_eq!(
            (
                d.register(1, Doorbell::SqTail),
                d.register(1, Doorbell::CqHead)
            ),
            (0x1020, 0x1030)
        );
    }
}
