//! A host for the controller's tests: guest memory, a handler and interrupts
//! that record what reaches them, and the host driver
//! ([`crate::nvme_driver`]) in process, doing the register and queue work a
//! Linux nvme driver does (enable, admin commands, I/O queue pairs, reaping
//! completions by their phase tag). A command here runs before its doorbell
//! write returns, so each is checked to complete at once, alone; on a
//! controller serving its I/O queues on threads ([`Host::new_on`]), every
//! host step that writes a register waits for the threads to settle first,
//! so the same checks hold.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use dma::Gpa;
use nvme_model::{Deallocate, Geometry, LbaSize};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::command::Sqe;
use super::controller::reg;
use super::controller::Controller;
use super::handler::{CommandTag, Interrupts, IoCommand, IoHandler};
use super::identify::Identity;
use super::status::NvmeStatus;
use crate::nvme_driver::command::number_of_queues;
pub use crate::nvme_driver::Completion;
use crate::nvme_driver::{
    write_list, AdminQueues, Driver, HostMemory, InProcess, IoQueuePair, CC_LINUX,
};

/// Guest memory: 8 MiB at 0.
pub const MEM_SIZE: usize = 8 << 20;
/// The admin queues, 32 entries each (Linux's NVME_AQ_DEPTH).
pub const ASQ: u64 = 0x1_0000;
pub const ACQ: u64 = 0x1_1000;
pub const ADMIN_ENTRIES: u16 = 32;
/// Where identify and log data land.
pub const ADMIN_BUF: u64 = 0x8_0000;
/// Data buffers start here.
pub const DATA: u64 = 0x10_0000;

/// The submission queue `qid`'s base; its completion queue is a page above.
pub fn sq_base(qid: u16) -> u64 {
    0x2_0000 + u64::from(qid) * 0x4000
}

pub fn cq_base(qid: u16) -> u64 {
    sq_base(qid) + 0x2000
}

/// An identity for a 64 MiB disk with a write cache, four I/O queues of up
/// to 64 entries and five vectors.
pub fn identity(lbs: LbaSize) -> Identity {
    Identity {
        serial: "dmaprobe-test".into(),
        vendor_id: 0,
        lbs,
        blocks: (64 << 20) >> lbs.shift(),
        read_only: false,
        geometry: Geometry::default_for(lbs),
        write_cache: Some(true),
        deallocate: Deallocate::Zeroes,
        dsm: true,
        write_zeroes: true,
        io_queues: 4,
        queue_entries: 64,
        vectors: 5,
        doorbell_buffer: true,
    }
}

/// What a test has the handler do as each command arrives.
pub type SubmitHook = Box<dyn Fn(&Recorder, &IoCommand) + Send + Sync>;

/// Records what the controller hands over; completes at once when told to.
#[derive(Default)]
pub struct Recorder {
    pub ctrl: OnceLock<Weak<Controller>>,
    pub immediate: AtomicBool,
    /// Runs first in every `submit`.
    pub on_submit: Mutex<Option<SubmitHook>>,
    pub submitted: Mutex<Vec<IoCommand>>,
    pub resets: AtomicU32,
    pub shutdowns: AtomicU32,
    pub write_cache: Mutex<Vec<bool>>,
    pub refuse_write_cache: AtomicBool,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("submitted", &self.submitted)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn take(&self) -> Vec<IoCommand> {
        std::mem::take(&mut *self.submitted.lock().unwrap())
    }

    fn controller(&self) -> Arc<Controller> {
        self.ctrl.get().and_then(Weak::upgrade).unwrap()
    }
}

impl IoHandler for Recorder {
    fn submit(&self, cmd: IoCommand) {
        if let Some(hook) = &*self.on_submit.lock().unwrap() {
            hook(self, &cmd);
        }
        let tag = cmd.tag;
        self.submitted.lock().unwrap().push(cmd);
        if self.immediate.load(Ordering::Relaxed) {
            self.controller().complete(tag, NvmeStatus::Success, 0);
        }
    }

    fn set_write_cache(&self, enabled: bool) -> Result<(), NvmeStatus> {
        if self.refuse_write_cache.load(Ordering::Relaxed) {
            return Err(NvmeStatus::InternalError);
        }
        self.write_cache.lock().unwrap().push(enabled);
        Ok(())
    }

    fn shutdown(&self) {
        self.shutdowns.fetch_add(1, Ordering::Relaxed);
    }

    fn reset(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct Irqs(pub Mutex<Vec<u16>>);

impl Irqs {
    pub fn take(&self) -> Vec<u16> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl Interrupts for Irqs {
    fn signal(&self, vector: u16) {
        self.0.lock().unwrap().push(vector);
    }
}

/// The host side: the driver in process, and what it drives.
#[derive(Debug)]
pub struct Host {
    pub mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    pub ctrl: Arc<Controller>,
    pub handler: Arc<Recorder>,
    pub irqs: Arc<Irqs>,
    pub driver: Driver<InProcess>,
}

/// Where the admin queues lie.
const ADMIN: AdminQueues = AdminQueues {
    sq: Gpa(ASQ),
    cq: Gpa(ACQ),
    entries: ADMIN_ENTRIES,
};

impl Host {
    /// A controller with memory and interrupts attached, not yet enabled.
    pub fn new(identity: Identity) -> Host {
        Host::new_on(false, identity)
    }

    /// The same, its I/O queues served on threads of their own if `threads`.
    pub fn new_on(threads: bool, identity: Identity) -> Host {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        );
        let handler = Arc::new(Recorder::default());
        handler.immediate.store(true, Ordering::Relaxed);
        let ctrl = Arc::new(Controller::new(identity, handler.clone()));
        if threads {
            ctrl.serve_on_threads();
        }
        handler.ctrl.set(Arc::downgrade(&ctrl)).unwrap();
        let irqs = Arc::new(Irqs::default());
        ctrl.attach(mem.clone(), irqs.clone());
        let driver = Driver::new(InProcess::new(ctrl.clone(), mem.clone()));
        Host {
            mem,
            ctrl,
            handler,
            irqs,
            driver,
        }
    }

    /// A host that has probed the controller as Linux does and has `pairs`
    /// I/O queue pairs of `entries`.
    pub fn probed(identity: Identity, pairs: u16, entries: u16) -> Host {
        Host::probed_on(false, identity, pairs, entries)
    }

    /// The same, its I/O queues served on threads of their own if `threads`.
    pub fn probed_on(threads: bool, identity: Identity, pairs: u16, entries: u16) -> Host {
        let mut host = Host::new_on(threads, identity);
        host.enable();
        let c = host.admin(number_of_queues(pairs, pairs));
        assert_eq!(c.status(), Some(NvmeStatus::Success));
        for qid in 1..=pairs {
            host.create_pair(qid, entries);
        }
        host
    }

    pub fn read32(&self, offset: u64) -> u32 {
        self.driver.read32(offset).unwrap()
    }

    pub fn read64(&self, offset: u64) -> u64 {
        self.driver.read64(offset).unwrap()
    }

    pub fn write32(&self, offset: u64, value: u32) {
        self.driver.write32(offset, value).unwrap();
        self.settle();
    }

    /// Two dword writes, low then high, as Linux's lo_hi_writeq.
    pub fn write64(&self, offset: u64, value: u64) {
        self.driver.write64(offset, value).unwrap();
        self.settle();
    }

    /// Waits for the queues' threads, if any, to serve what they were woken
    /// for.
    pub fn settle(&self) {
        self.ctrl.settle();
    }

    pub fn csts(&self) -> u32 {
        self.read32(reg::CSTS)
    }

    pub fn write_mem(&self, at: u64, bytes: &[u8]) {
        self.mem.write_mem(Gpa(at), bytes).unwrap();
    }

    pub fn read_mem(&self, at: u64, len: usize) -> Vec<u8> {
        self.mem.read_vec(Gpa(at), len).unwrap()
    }

    /// Writes PRP list entries at `at`.
    pub fn write_list(&self, at: u64, entries: &[u64]) {
        write_list(&self.mem, Gpa(at), entries).unwrap();
    }

    /// Linux's sequence: disable and wait for RDY 0, program the admin
    /// queue, write CC with the entry sizes, then set EN and wait for RDY.
    pub fn enable(&mut self) {
        self.driver.enable(ADMIN, CC_LINUX).unwrap();
    }

    /// Takes over the admin queue of a controller the caller enabled itself.
    pub fn enable_admin_only(&mut self) {
        self.driver.enable(ADMIN, 0).unwrap();
    }

    /// Knows about a queue the controller was told of (by the caller).
    pub fn track_sq(&mut self, qid: u16, entries: u16) {
        self.driver.track_sq(qid, Gpa(sq_base(qid)), entries, qid);
    }

    pub fn track_cq(&mut self, qid: u16, entries: u16) {
        self.driver
            .track_cq(qid, Gpa(cq_base(qid)), entries, Some(qid))
            .unwrap();
    }

    pub fn forget(&mut self, qid: u16) {
        self.driver.forget(qid);
    }

    /// A command identifier not used before.
    pub fn cid(&mut self) -> u16 {
        self.driver.next_cid()
    }

    /// Places `sqe` at the queue's tail without ringing.
    pub fn place(&mut self, qid: u16, sqe: Sqe) {
        self.driver.place(qid, &sqe).unwrap();
    }

    pub fn ring_sq(&self, qid: u16) {
        self.driver.ring_sq(qid).unwrap();
        self.settle();
    }

    pub fn submit(&mut self, qid: u16, sqe: Sqe) {
        self.driver.submit(qid, &sqe).unwrap();
        self.settle();
    }

    /// Every new completion of the queue, by phase tag; rings its head
    /// doorbell if there were any.
    pub fn reap(&mut self, cqid: u16) -> Vec<Completion> {
        let got = self.driver.reap(cqid).unwrap();
        self.settle();
        got
    }

    /// Runs an admin command and returns its one completion.
    pub fn admin(&mut self, sqe: Sqe) -> Completion {
        let cid = self.driver.issue(0, sqe).unwrap();
        let got = self.reap(0);
        assert_eq!(got.len(), 1, "one completion for admin cid {cid}: {got:?}");
        assert_eq!(got[0].cid, cid);
        got[0]
    }

    /// Creates completion queue and submission queue `qid` with `entries`,
    /// the CQ on vector `qid`, as Linux's nvme_create_queue does.
    pub fn create_pair(&mut self, qid: u16, entries: u16) {
        let pair = IoQueuePair {
            qid,
            sq: Gpa(sq_base(qid)),
            cq: Gpa(cq_base(qid)),
            entries,
            vector: Some(qid),
        };
        self.driver
            .create_io_pair(pair)
            .unwrap_or_else(|e| panic!("create queue pair {qid}: {e}"));
    }

    /// Runs one I/O command on queue `qid` and returns its completion.
    pub fn io(&mut self, qid: u16, sqe: Sqe) -> Completion {
        self.submit(qid, sqe);
        let got = self.reap(qid);
        assert_eq!(got.len(), 1, "one completion: {got:?}");
        got[0]
    }

    /// The tags of what the handler holds (with `immediate` off).
    pub fn held(&self) -> Vec<CommandTag> {
        self.handler.take().into_iter().map(|c| c.tag).collect()
    }
}
