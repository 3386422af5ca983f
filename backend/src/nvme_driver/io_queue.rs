//! [`IoQueue`]: an I/O queue pair taken out of the [`Driver`](super::Driver)
//! to be driven on a thread of its own, as a load generator drives it: as
//! many commands placed as there is room for, one tail doorbell for all of
//! them, every completion posted reaped at once with one head doorbell
//! (each a shadow slot when the controller was given shadow doorbells, and
//! a register only when its EventIdx asks), and a wait that blocks on the
//! queue's interrupt rather than polling. Register accesses go through the
//! shared [`Transport`], which every queue borrows.

use std::time::{Duration, Instant};

use super::command::{Completion, Sqe};
use super::error::Error;
use super::queue::{CompletionQueue, Doorbell, Doorbells, SubmissionQueue};
use super::transport::{HostMemory, Transport};

/// A submission queue and the completion queue that it alone completes to,
/// with the command identifiers the caller's: it never overwrites an entry
/// the controller may not have fetched ([`IoQueue::room`]).
#[derive(Debug)]
pub struct IoQueue {
    qid: u16,
    sq: SubmissionQueue,
    cq: CompletionQueue,
    doorbells: Doorbells,
    /// The tail the controller was last told of: entries placed past it
    /// are not yet rung.
    told_tail: u16,
    doorbell_counts: DoorbellCounts,
}

/// How an [`IoQueue`] told the controller of its doorbells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoorbellCounts {
    /// Doorbell register writes.
    pub registers: u64,
    /// Doorbells told through a shadow slot alone (the EventIdx did not ask
    /// for the register).
    pub shadow_only: u64,
}

impl IoQueue {
    pub(super) fn new(
        qid: u16,
        sq: SubmissionQueue,
        cq: CompletionQueue,
        doorbells: Doorbells,
    ) -> IoQueue {
        IoQueue {
            qid,
            told_tail: sq.tail,
            sq,
            cq,
            doorbells,
            doorbell_counts: DoorbellCounts::default(),
        }
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Entries of each of the two queues.
    pub fn entries(&self) -> u16 {
        self.sq.entries
    }

    /// Entries that can be placed now: one fewer than the queue's size, less
    /// those the controller had not fetched when it last posted a
    /// completion. Reaping makes room.
    pub fn room(&self) -> u16 {
        self.sq.room()
    }

    /// Writes `sqe` (its command identifier the caller's) at the tail,
    /// without ringing; [`Error::QueueFull`] when there is no room.
    pub fn place<T: Transport>(&mut self, transport: &T, sqe: &Sqe) -> Result<(), Error> {
        if self.room() == 0 {
            return Err(Error::QueueFull {
                qid: self.qid,
                entries: self.sq.entries,
            });
        }
        let at = self.sq.slot()?;
        transport.memory().write_mem(at, &sqe.to_bytes())?;
        self.sq.advance();
        Ok(())
    }

    /// Rings the tail doorbell if anything was placed since it last rang
    /// (with shadow doorbells, writes the slot and the register only if
    /// the controller's EventIdx asks).
    pub fn ring<T: Transport>(&mut self, transport: &T) -> Result<(), Error> {
        let (old, new) = (self.told_tail, self.sq.tail);
        if old == new {
            return Ok(());
        }
        let rung = self
            .doorbells
            .tell(transport, self.qid, Doorbell::SqTail, Some(old), new)?;
        self.told_tail = new;
        self.count(rung);
        Ok(())
    }

    /// How this queue told the controller of its doorbells so far.
    pub fn doorbell_counts(&self) -> DoorbellCounts {
        self.doorbell_counts
    }

    fn count(&mut self, rung: bool) {
        let c = &mut self.doorbell_counts;
        if rung {
            c.registers += 1;
        } else {
            c.shadow_only += 1;
        }
    }

    /// Appends every completion posted now to `out`, at most one pass of the
    /// ring, and rings the head doorbell once if there were any; their
    /// submission queue heads make room. Returns how many.
    pub fn reap<T: Transport>(
        &mut self,
        transport: &T,
        out: &mut Vec<Completion>,
    ) -> Result<usize, Error> {
        let mem = transport.memory();
        let old = self.cq.head;
        let mut n = 0;
        while n < usize::from(self.cq.entries) && self.cq.posted(mem, 0)? {
            let c = self.cq.take(mem)?;
            if c.sqid == self.qid {
                self.sq.report_head(c.sq_head);
            }
            out.push(c);
            n += 1;
        }
        if n > 0 {
            let rung = self.doorbells.tell(
                transport,
                self.qid,
                Doorbell::CqHead,
                Some(old),
                self.cq.head,
            )?;
            self.count(rung);
        }
        Ok(n)
    }

    /// Reaps, and if nothing was posted blocks on the queue's interrupt
    /// until something is, for `within` at most: [`Error::Quiet`] then.
    /// Returns how many completions were appended to `out`.
    pub fn wait<T: Transport>(
        &mut self,
        transport: &T,
        out: &mut Vec<Completion>,
        within: Duration,
    ) -> Result<usize, Error> {
        let deadline = Instant::now().checked_add(within);
        loop {
            // The interrupt is taken before the ring is read: a completion
            // posted after the read below signals again, and the wait wakes.
            if let Some(vector) = self.cq.vector {
                transport.interrupt(vector)?;
            }
            let n = self.reap(transport, out)?;
            if n > 0 {
                return Ok(n);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Quiet {
                    cqid: self.qid,
                    waited: within,
                });
            }
            let left = deadline.map_or(Duration::MAX, |d| d - now);
            transport.wait_interrupt(self.cq.vector, left)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    use std::thread;

    use dma::Gpa;
    use nvme_model::{Deallocate, Geometry, Lba, LbaSize};
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::nvme::NvmeStatus;
    use crate::nvme::{CommandTag, Controller, Identity, Interrupts, IoCommand, IoHandler};
    use crate::nvme_driver::command::{self, io_op, CC_LINUX};
    use crate::nvme_driver::{AdminQueues, Driver, InProcess, IoQueuePair, Prp, ShadowBuffers};

    const ENTRIES: u16 = 8;

    /// Completes what it is handed at once, or holds it to be completed by
    /// the test.
    #[derive(Debug, Default)]
    struct Handler {
        ctrl: OnceLock<Weak<Controller>>,
        hold: AtomicBool,
        held: Mutex<Vec<CommandTag>>,
    }

    impl Handler {
        fn controller(&self) -> Arc<Controller> {
            self.ctrl.get().and_then(Weak::upgrade).expect("controller")
        }

        fn complete_held(&self) -> usize {
            let held = std::mem::take(&mut *self.held.lock().unwrap());
            for &tag in &held {
                self.controller().complete(tag, NvmeStatus::Success, 0);
            }
            held.len()
        }
    }

    impl IoHandler for Handler {
        fn submit(&self, cmd: IoCommand) {
            if self.hold.load(Ordering::Relaxed) {
                self.held.lock().unwrap().push(cmd.tag);
            } else {
                self.controller().complete(cmd.tag, NvmeStatus::Success, 0);
            }
        }
    }

    struct NoInterrupts;

    impl Interrupts for NoInterrupts {
        fn signal(&self, _vector: u16) {}
    }

    /// A controller in process with I/O queue pair 1 of `ENTRIES`, taken
    /// out of the driver.
    fn queue() -> (Driver<InProcess>, IoQueue, Arc<Handler>) {
        queue_with(false)
    }

    /// The same; with `shadow`, the controller offers shadow doorbells and
    /// the driver takes them (buffers at 0x4000 and 0x5000) before it
    /// creates the pair.
    fn queue_with(shadow: bool) -> (Driver<InProcess>, IoQueue, Arc<Handler>) {
        let lbs = LbaSize::B512;
        let identity = Identity {
            serial: "io-queue".into(),
            vendor_id: 0,
            lbs,
            blocks: (1 << 20) >> lbs.shift(),
            read_only: false,
            geometry: Geometry::default_for(lbs),
            write_cache: None,
            deallocate: Deallocate::Zeroes,
            dsm: true,
            write_zeroes: true,
            io_queues: 1,
            queue_entries: ENTRIES,
            vectors: 2,
            doorbell_buffer: shadow,
        };
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
        );
        let handler = Arc::new(Handler::default());
        let ctrl = Arc::new(Controller::new(identity, handler.clone()));
        handler.ctrl.set(Arc::downgrade(&ctrl)).unwrap();
        ctrl.attach(mem.clone(), Arc::new(NoInterrupts));
        let mut driver = Driver::new(InProcess::new(ctrl, mem));
        let admin = AdminQueues {
            sq: Gpa(0),
            cq: Gpa(0x1000),
            entries: 4,
        };
        driver.enable(admin, CC_LINUX).unwrap();
        driver.request_queues(1, 1).unwrap();
        if shadow {
            let buffers = ShadowBuffers {
                doorbells: Gpa(0x4000),
                event_idx: Gpa(0x5000),
            };
            driver.shadow_doorbells(buffers).unwrap();
        }
        let pair = IoQueuePair {
            qid: 1,
            sq: Gpa(0x2000),
            cq: Gpa(0x3000),
            entries: ENTRIES,
            vector: Some(1),
        };
        driver.create_io_pair(pair).unwrap();
        let q = driver.take_io_queue(1).unwrap();
        (driver, q, handler)
    }

    /// A one-block read into the page at 0x8000, with command identifier `cid`.
    fn read(driver: &Driver<InProcess>, cid: u16) -> Sqe {
        let prp = Prp::new(driver.memory(), Gpa(0x8000), &[], 512, None).unwrap();
        command::rw(io_op::READ, 1, Lba(u64::from(cid)), 1, &prp).with_cid(cid)
    }

    #[test]
    fn a_full_queue_refuses_until_completions_report_its_head() {
        let (driver, mut q, handler) = queue();
        let t = driver.transport();
        handler.hold.store(true, Ordering::Relaxed);
        for cid in 0..ENTRIES - 1 {
            assert_eq!(q.room(), ENTRIES - 1 - cid);
            q.place(t, &read(&driver, cid)).unwrap();
        }
        assert!(matches!(
            q.place(t, &read(&driver, 99)),
            Err(Error::QueueFull {
                qid: 1,
                entries: ENTRIES
            })
        ));
        q.ring(t).unwrap();
        assert_eq!(handler.held.lock().unwrap().len(), 7, "all fetched");
        assert_eq!(q.room(), 0, "no completion has said so yet");
        assert_eq!(handler.complete_held(), 7);
        let mut out = Vec::new();
        assert_eq!(q.reap(t, &mut out).unwrap(), 7);
        let cids: Vec<u16> = out.iter().map(|c| c.cid).collect();
        assert_eq!(cids, (0..7).collect::<Vec<_>>());
        assert!(out.iter().all(|c| c.is_success() && c.sqid == 1));
        assert_eq!(q.room(), ENTRIES - 1);
    }

    #[test]
    fn batches_wrap_both_rings_many_times() {
        for shadow in [false, true] {
            let (driver, mut q, _handler) = queue_with(shadow);
            let batches = run_batches(&driver, &mut q);
            let registers = driver.transport().controller().counters();
            let counts = q.doorbell_counts();
            if shadow {
                // The controller is idle at each batch: the tail rings; it
                // never waits for room: the head does not.
                assert_eq!(
                    counts,
                    DoorbellCounts {
                        registers: batches,
                        shadow_only: batches
                    }
                );
                assert!(registers.shadow_updates.load(Ordering::Relaxed) >= batches);
            } else {
                let both = DoorbellCounts {
                    registers: 2 * batches,
                    shadow_only: 0,
                };
                assert_eq!(counts, both);
                assert_eq!(registers.shadow_updates.load(Ordering::Relaxed), 0);
            }
        }
    }

    /// Batches of one to `ENTRIES - 1` reads, each rung once and waited
    /// for, checked in order; how many batches.
    fn run_batches(driver: &Driver<InProcess>, q: &mut IoQueue) -> u64 {
        let t = driver.transport();
        let mut out = Vec::new();
        let mut next = 0u16;
        let mut batches = 0;
        for batch in (1..=ENTRIES - 1).cycle().take(40) {
            batches += 1;
            let first = next;
            for _ in 0..batch {
                q.place(t, &read(driver, next)).unwrap();
                next = next.wrapping_add(1);
            }
            q.ring(t).unwrap();
            out.clear();
            assert_eq!(
                q.wait(t, &mut out, Duration::from_secs(1)).unwrap(),
                usize::from(batch)
            );
            let cids: Vec<u16> = out.iter().map(|c| c.cid).collect();
            assert_eq!(cids, (first..next).collect::<Vec<_>>());
            assert!(out.iter().all(Completion::is_success));
            assert_eq!(q.room(), ENTRIES - 1);
        }
        batches
    }

    #[test]
    fn a_wait_returns_what_another_thread_completes_and_times_out_on_nothing() {
        let (driver, mut q, handler) = queue();
        let t = driver.transport();
        let mut out = Vec::new();
        assert!(matches!(
            q.wait(t, &mut out, Duration::from_millis(5)),
            Err(Error::Quiet { cqid: 1, .. })
        ));
        handler.hold.store(true, Ordering::Relaxed);
        q.place(t, &read(&driver, 5)).unwrap();
        q.ring(t).unwrap();
        let completer = {
            let handler = handler.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                handler.complete_held()
            })
        };
        assert_eq!(q.wait(t, &mut out, Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(completer.join().unwrap(), 1);
        assert_eq!((out[0].cid, out[0].sqid), (5, 1));
    }

    #[test]
    fn only_a_pair_of_its_own_is_taken_and_shadow_doorbells_come_first() {
        let (mut driver, _q, _handler) = queue();
        assert!(matches!(
            driver.take_io_queue(1),
            Err(Error::NoQueue { .. })
        ));
        assert!(matches!(
            driver.take_io_queue(0),
            Err(Error::InvalidConfig(_))
        ));
        // A queue taken out keeps ringing registers: no shadow doorbells now.
        let buffers = ShadowBuffers {
            doorbells: Gpa(0x4000),
            event_idx: Gpa(0x5000),
        };
        assert!(matches!(
            driver.shadow_doorbells(buffers),
            Err(Error::InvalidConfig(_))
        ));
    }
}
