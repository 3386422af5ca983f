//! [`Driver`]: the register and queue work of a host's nvme driver over any
//! [`Transport`].

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use dma::Gpa;

use super::command::{self, Completion, Sqe};
use super::error::Error;
use super::io_queue::IoQueue;
use super::queue::{
    AdminQueues, CompletionQueue, Doorbell, Doorbells, IoQueuePair, SubmissionQueue,
};
use super::transport::{HostMemory, Interrupt, Transport};
use crate::nvme::controller::{cc, csts, reg};
use crate::nvme::identify::IDENTIFY_LEN;
use crate::nvme::shadow::ShadowBuffers;

/// How long a command may take before the driver gives up on it, unless
/// told otherwise ([`Driver::set_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the driver looks again at CSTS.
const POLL: Duration = Duration::from_millis(1);
/// CAP.TO's unit.
const READY_UNIT: Duration = Duration::from_millis(500);

/// A host's nvme driver: enables the controller, creates queues, submits
/// commands and takes their completions, keeping the tails, heads and phase
/// tags the controller expects it to. Any entry it is handed goes in as it
/// is, so a test can send what no real host would.
#[derive(Debug)]
pub struct Driver<T: Transport> {
    transport: T,
    sqs: BTreeMap<u16, SubmissionQueue>,
    cqs: BTreeMap<u16, CompletionQueue>,
    doorbells: Doorbells,
    /// Whether an I/O queue was taken out: it keeps the doorbells it was
    /// taken with.
    lent: bool,
    next_cid: u16,
    timeout: Duration,
}

impl<T: Transport> Driver<T> {
    /// A driver that knows no queues yet; [`Driver::enable`] sets up the
    /// admin queues.
    pub fn new(transport: T) -> Driver<T> {
        Driver {
            transport,
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            doorbells: Doorbells {
                stride: 4,
                shadow: None,
            },
            lent: false,
            next_cid: 0,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn into_transport(self) -> T {
        self.transport
    }

    pub fn memory(&self) -> &T::Memory {
        self.transport.memory()
    }

    /// How long [`Driver::completion`] waits.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn read32(&self, offset: u64) -> Result<u32, Error> {
        self.transport.read32(offset)
    }

    pub fn read64(&self, offset: u64) -> Result<u64, Error> {
        self.transport.read64(offset)
    }

    pub fn write32(&self, offset: u64, value: u32) -> Result<(), Error> {
        self.transport.write32(offset, value)
    }

    pub fn write64(&self, offset: u64, value: u64) -> Result<(), Error> {
        self.transport.write64(offset, value)
    }

    pub fn csts(&self) -> Result<u32, Error> {
        self.read32(reg::CSTS)
    }

    /// Waits, as long as CAP.TO allows, for CSTS.RDY to become `ready`; a
    /// controller that goes fatal meanwhile is an error at once.
    pub fn wait_ready(&self, ready: bool) -> Result<(), Error> {
        let to = u32::try_from(self.read64(reg::CAP)? >> 24 & 0xff).unwrap_or(1);
        let waited = READY_UNIT * to.max(1);
        let deadline = Instant::now() + waited;
        loop {
            let csts = self.csts()?;
            if csts & csts::CFS != 0 {
                return Err(Error::Fatal { csts });
            }
            if (csts & csts::RDY != 0) == ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady { ready, waited });
            }
            thread::sleep(POLL);
        }
    }

    /// CC.EN = 0 and the wait for CSTS.RDY to clear: the controller resets
    /// and forgets every queue, and so does the driver.
    pub fn disable(&mut self) -> Result<(), Error> {
        self.write32(reg::CC, 0)?;
        self.sqs.clear();
        self.cqs.clear();
        self.wait_ready(false)
    }

    /// Linux's sequence: disable, the admin completion queue zeroed, AQA,
    /// ASQ and ACQ programmed, CC written with `config`, then with EN too,
    /// and the wait for CSTS.RDY. Interrupts from before are forgotten.
    pub fn enable(&mut self, admin: AdminQueues, config: u32) -> Result<(), Error> {
        self.disable()?;
        self.transport.clear_interrupts()?;
        let dstrd = self.read64(reg::CAP)? >> 32 & 0xf;
        // A reset forgot any shadow doorbells.
        self.doorbells = Doorbells {
            stride: 4 << dstrd,
            shadow: None,
        };
        self.track_cq(0, admin.cq, admin.entries, Some(0))?;
        self.track_sq(0, admin.sq, admin.entries, 0);
        let size = u32::from(admin.entries.wrapping_sub(1));
        self.write32(reg::AQA, size << 16 | size)?;
        self.write64(reg::ASQ, admin.sq.0)?;
        self.write64(reg::ACQ, admin.cq.0)?;
        self.write32(reg::CC, config & !cc::EN)?;
        self.write32(reg::CC, config | cc::EN)?;
        self.wait_ready(true)
    }

    /// Knows of submission queue `qid`, told to the controller by the caller.
    pub fn track_sq(&mut self, qid: u16, base: Gpa, entries: u16, cqid: u16) {
        self.sqs
            .insert(qid, SubmissionQueue::new(base, entries, cqid));
    }

    /// Knows of completion queue `qid`, its memory zeroed (no phase tag
    /// set) before the caller tells the controller of it.
    pub fn track_cq(
        &mut self,
        qid: u16,
        base: Gpa,
        entries: u16,
        vector: Option<u16>,
    ) -> Result<(), Error> {
        let cq = CompletionQueue::new(base, entries, vector);
        self.memory().fill(base, 0, cq.len())?;
        self.cqs.insert(qid, cq);
        Ok(())
    }

    /// Forgets the queues `qid`, deleted by the caller.
    pub fn forget(&mut self, qid: u16) {
        self.sqs.remove(&qid);
        self.cqs.remove(&qid);
    }

    /// Creates the completion queue, then the submission queue, of `pair`,
    /// as Linux's nvme_create_queue does.
    pub fn create_io_pair(&mut self, pair: IoQueuePair) -> Result<(), Error> {
        let IoQueuePair {
            qid,
            sq,
            cq,
            entries,
            vector,
        } = pair;
        self.track_cq(qid, cq, entries, vector)?;
        let create_cq = command::create_cq(qid, entries, cq, vector);
        self.admin_ok("Create I/O Completion Queue", create_cq)?;
        self.admin_ok(
            "Create I/O Submission Queue",
            command::create_sq(qid, entries, sq, qid),
        )?;
        self.track_sq(qid, sq, entries, qid);
        Ok(())
    }

    /// Set Features, Number of Queues: the submission and completion queue
    /// counts granted (from 1).
    pub fn request_queues(&mut self, sqs: u16, cqs: u16) -> Result<(u32, u32), Error> {
        let c = self.admin_ok("Set Features", command::number_of_queues(sqs, cqs))?;
        Ok(((c.dw0 & 0xffff) + 1, (c.dw0 >> 16) + 1))
    }

    /// Doorbell Buffer Config: from now on the I/O queues' doorbells are
    /// `buffers`' shadow slots (the controller set each existing queue's to
    /// what it knows). Queues taken out as [`IoQueue`]s afterwards write a
    /// register only when the controller's EventIdx asks; this driver's own
    /// rings write both. Refused once a queue was taken out: it would go on
    /// writing registers the controller no longer reads.
    pub fn shadow_doorbells(&mut self, buffers: ShadowBuffers) -> Result<(), Error> {
        if self.lent {
            return Err(Error::InvalidConfig(
                "shadow doorbells come before any I/O queue is taken out",
            ));
        }
        self.admin_ok(
            "Doorbell Buffer Config",
            command::doorbell_buffer_config(buffers),
        )?;
        self.doorbells.shadow = Some(buffers);
        Ok(())
    }

    /// Identify with CNS `cns` for `nsid` into the page at `data`: the 4 KiB
    /// the controller wrote.
    pub fn identify(&mut self, cns: u32, nsid: u32, data: Gpa) -> Result<Vec<u8>, Error> {
        self.admin_ok("Identify", command::identify(cns, nsid, data))?;
        self.memory().read_vec(data, IDENTIFY_LEN)
    }

    /// A command identifier for the next command.
    pub fn next_cid(&mut self) -> u16 {
        let cid = self.next_cid;
        self.next_cid = cid.wrapping_add(1);
        cid
    }

    /// Writes `sqe` at submission queue `qid`'s tail and moves the tail,
    /// without ringing; the entry goes in as it is, and a queue the host
    /// never lets the controller drain wraps over its own entries (an
    /// [`IoQueue`] refuses to).
    pub fn place(&mut self, qid: u16, sqe: &Sqe) -> Result<(), Error> {
        let sq = self.sqs.get_mut(&qid).ok_or_else(|| no_sq(qid))?;
        let at = sq.slot()?;
        self.transport.memory().write_mem(at, &sqe.to_bytes())?;
        sq.advance();
        Ok(())
    }

    /// Entries submission queue `qid` can take without overwriting one the
    /// controller may not have fetched, as far as its completions said.
    pub fn sq_room(&self, qid: u16) -> Result<u16, Error> {
        Ok(self.sqs.get(&qid).ok_or_else(|| no_sq(qid))?.room())
    }

    /// Takes I/O queue pair `qid` (a submission queue and the completion
    /// queue of the same identifier, which it alone completes to) out of the
    /// driver, to be driven on a thread of its own over
    /// [`Driver::transport`]. Commands identifiers are then the caller's.
    pub fn take_io_queue(&mut self, qid: u16) -> Result<IoQueue, Error> {
        let sq = self.sqs.get(&qid).ok_or_else(|| no_sq(qid))?;
        if qid == 0 || sq.cqid != qid || self.sqs.values().filter(|s| s.cqid == qid).count() != 1 {
            return Err(Error::InvalidConfig(
                "an I/O queue is a submission queue with a completion queue of its own",
            ));
        }
        self.cq(qid)?;
        let (Some(sq), Some(cq)) = (self.sqs.remove(&qid), self.cqs.remove(&qid)) else {
            return Err(no_cq(qid));
        };
        self.lent = true;
        Ok(IoQueue::new(qid, sq, cq, self.doorbells))
    }

    /// Tells the controller of what was placed: the tail doorbell (with
    /// shadow doorbells, the shadow slot and then the register all the same:
    /// this driver shows the controller every doorbell).
    pub fn ring_sq(&self, qid: u16) -> Result<(), Error> {
        let tail = self.sqs.get(&qid).ok_or_else(|| no_sq(qid))?.tail;
        self.doorbells
            .tell(&self.transport, qid, Doorbell::SqTail, None, tail)
            .map(drop)
    }

    /// Places `sqe`, command identifier and all, and rings.
    pub fn submit(&mut self, qid: u16, sqe: &Sqe) -> Result<(), Error> {
        self.place(qid, sqe)?;
        self.ring_sq(qid)
    }

    /// Submits `sqe` with a command identifier of the driver's, returned.
    pub fn issue(&mut self, qid: u16, sqe: Sqe) -> Result<u16, Error> {
        let cid = self.next_cid();
        self.submit(qid, &sqe.with_cid(cid))?;
        Ok(cid)
    }

    /// Runs `sqe` on queue `qid`: its completion, whatever the status.
    pub fn run(&mut self, qid: u16, sqe: Sqe) -> Result<Completion, Error> {
        let cid = self.issue(qid, sqe)?;
        self.completion(qid, cid)
    }

    /// Runs an admin command: its completion, whatever the status.
    pub fn admin(&mut self, sqe: Sqe) -> Result<Completion, Error> {
        self.run(0, sqe)
    }

    /// Runs an admin command the driver needs to succeed.
    pub fn admin_ok(&mut self, command: &'static str, sqe: Sqe) -> Result<Completion, Error> {
        let completion = self.admin(sqe)?;
        if completion.is_success() {
            Ok(completion)
        } else {
            Err(Error::Failed {
                command,
                completion,
            })
        }
    }

    /// Every completion of queue `cqid` there is now (those taken earlier
    /// first), by phase tag, at most one pass of the ring; the head doorbell
    /// rung once if any were new.
    pub fn reap(&mut self, cqid: u16) -> Result<Vec<Completion>, Error> {
        let cq = self.cq_mut(cqid)?;
        let mut out: Vec<Completion> = cq.early.drain(..).collect();
        let entries = cq.entries;
        let mut result = Ok(());
        let mut moved = false;
        for _ in 0..entries {
            match self.take_posted(cqid) {
                Ok(Some(c)) => {
                    out.push(c);
                    moved = true;
                }
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if moved {
            self.ring_cq(cqid)?;
        }
        result.map(|()| out)
    }

    /// The completion of command `cid` of submission queue `qid`, within the
    /// timeout; others its completion queue posts first are kept for later.
    pub fn completion(&mut self, qid: u16, cid: u16) -> Result<Completion, Error> {
        let cqid = self.sqs.get(&qid).ok_or_else(|| no_sq(qid))?.cqid;
        let ours = |c: &Completion| c.sqid == qid && c.cid == cid;
        let cq = self.cq_mut(cqid)?;
        if let Some(i) = cq.early.iter().position(ours) {
            if let Some(c) = cq.early.remove(i) {
                return Ok(c);
            }
        }
        let start = Instant::now();
        loop {
            let left = self.timeout.saturating_sub(start.elapsed());
            match self.take_within(cqid, left)? {
                Some(c) if ours(&c) => return Ok(c),
                Some(c) => self.cq_mut(cqid)?.early.push_back(c),
                None => {
                    return Err(Error::Timeout {
                        cqid,
                        cid,
                        waited: self.timeout,
                    })
                }
            }
        }
    }

    /// The next completion of queue `cqid` within `within` (one taken
    /// earlier first), or None.
    pub fn next_completion(
        &mut self,
        cqid: u16,
        within: Duration,
    ) -> Result<Option<Completion>, Error> {
        match self.cq_mut(cqid)?.early.pop_front() {
            Some(c) => Ok(Some(c)),
            None => self.take_within(cqid, within),
        }
    }

    /// The next completion entry of queue `cqid` within `within`, once an
    /// interrupt on its vector announced it (where the transport sees
    /// interrupts); its head doorbell is rung. A completion that no
    /// interrupt follows is an error.
    fn take_within(&mut self, cqid: u16, within: Duration) -> Result<Option<Completion>, Error> {
        let deadline = Instant::now().checked_add(within);
        loop {
            let new = self.posted(cqid, 0)?;
            let cq = self.cq_mut(cqid)?;
            let (announced, vector) = (cq.announced, cq.vector);
            if new && announced > 0 {
                return self.consume(cqid).map(Some);
            }
            let interrupt = match vector {
                Some(v) => self.transport.interrupt(v)?,
                None => Interrupt::Unseen,
            };
            if interrupt != Interrupt::Quiet {
                let count = self.count_posted(cqid)?;
                self.cq_mut(cqid)?.announced = count;
                if count > 0 {
                    continue;
                }
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return match (new, vector) {
                    (true, Some(vector)) => Err(Error::NoInterrupt { cqid, vector }),
                    _ => Ok(None),
                };
            }
            let left = deadline.map_or(Duration::MAX, |d| d - now);
            self.transport.wait_interrupt(vector, left)?;
        }
    }

    /// Whether the entry `i` places past the head of queue `cqid` is new.
    fn posted(&self, cqid: u16, i: u16) -> Result<bool, Error> {
        self.cq(cqid)?.posted(self.memory(), i)
    }

    /// How many new entries follow each other from the head (at most all
    /// but one: the controller leaves one slot empty).
    fn count_posted(&self, cqid: u16) -> Result<u16, Error> {
        let entries = self.cq(cqid)?.entries;
        for i in 0..entries.saturating_sub(1) {
            if !self.posted(cqid, i)? {
                return Ok(i);
            }
        }
        Ok(entries.saturating_sub(1))
    }

    /// Takes the head entry and rings the head doorbell.
    fn consume(&mut self, cqid: u16) -> Result<Completion, Error> {
        let c = self.take(cqid)?;
        self.ring_cq(cqid)?;
        Ok(c)
    }

    /// The head entry if it is new, moved past without ringing.
    fn take_posted(&mut self, cqid: u16) -> Result<Option<Completion>, Error> {
        if self.posted(cqid, 0)? {
            self.take(cqid).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Reads the head entry and moves past it, without ringing; the
    /// submission queue it names learns its head.
    fn take(&mut self, cqid: u16) -> Result<Completion, Error> {
        let cq = self.cqs.get_mut(&cqid).ok_or_else(|| no_cq(cqid))?;
        let c = cq.take(self.transport.memory())?;
        if let Some(sq) = self.sqs.get_mut(&c.sqid) {
            sq.report_head(c.sq_head);
        }
        Ok(c)
    }

    fn ring_cq(&self, cqid: u16) -> Result<(), Error> {
        let head = self.cq(cqid)?.head;
        self.doorbells
            .tell(&self.transport, cqid, Doorbell::CqHead, None, head)
            .map(drop)
    }

    fn cq(&self, cqid: u16) -> Result<&CompletionQueue, Error> {
        self.cqs.get(&cqid).ok_or_else(|| no_cq(cqid))
    }

    fn cq_mut(&mut self, cqid: u16) -> Result<&mut CompletionQueue, Error> {
        self.cqs.get_mut(&cqid).ok_or_else(|| no_cq(cqid))
    }
}

fn no_sq(qid: u16) -> Error {
    Error::NoQueue {
        kind: "submission",
        qid,
    }
}

fn no_cq(qid: u16) -> Error {
    Error::NoQueue {
        kind: "completion",
        qid,
    }
}
