//! Queues as the host keeps them: where each lies, the submission tail it
//! has written to, the completion head and phase tag it reads at, and which
//! doorbell tells the controller.

use std::collections::VecDeque;

use dma::Gpa;

use super::command::{Completion, Sqe};
use super::error::Error;
use super::prp::offset;
use crate::nvme::controller::DOORBELLS;

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

/// A submission queue: the host writes entries at its tail.
#[derive(Debug)]
pub(super) struct SubmissionQueue {
    pub base: Gpa,
    pub entries: u16,
    pub tail: u16,
    pub cqid: u16,
}

impl SubmissionQueue {
    /// Where the next entry goes.
    pub fn slot(&self) -> Result<Gpa, Error> {
        offset(self.base, u64::from(self.tail) * Sqe::SIZE as u64)
    }

    pub fn advance(&mut self) {
        self.tail = next(self.tail, self.entries);
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
}

fn next(index: u16, entries: u16) -> u16 {
    let n = (u32::from(index) + 1) % u32::from(entries.max(1));
    u16::try_from(n).unwrap_or_default()
}

/// The doorbells, `stride` bytes apart (4 << CAP.DSTRD): queue `qid`'s
/// submission tail, then its completion head.
#[derive(Clone, Copy, Debug)]
pub(super) struct Doorbells {
    pub stride: u64,
}

impl Doorbells {
    pub fn sq_tail(self, qid: u16) -> u64 {
        DOORBELLS + 2 * u64::from(qid) * self.stride
    }

    pub fn cq_head(self, qid: u16) -> u64 {
        DOORBELLS + (2 * u64::from(qid) + 1) * self.stride
    }
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
    fn doorbells_follow_the_stride() {
        let d = Doorbells { stride: 4 };
        assert_eq!(
            (d.sq_tail(0), d.cq_head(0), d.sq_tail(1), d.cq_head(1)),
            (0x1000, 0x1004, 0x1008, 0x100c)
        );
        let d = Doorbells { stride: 16 };
        assert_eq!((d.sq_tail(1), d.cq_head(1)), (0x1020, 0x1030));
    }
}
