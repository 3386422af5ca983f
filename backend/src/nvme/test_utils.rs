//! A host for the controller's tests: guest memory, a handler and interrupts
//! that record what reaches them, and the register and queue work a Linux
//! nvme driver does (enable, admin commands, I/O queue pairs, reaping
//! completions by their phase tag).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use nvme_model::{Deallocate, Geometry, LbaSize};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::command::{admin_op, Sqe};
use super::controller::Controller;
use super::controller::{cc, csts, reg, DOORBELLS};
use super::handler::{CommandTag, Interrupts, IoCommand, IoHandler};
use super::identify::Identity;
use super::status::NvmeStatus;

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
    }
}

/// Records what the controller hands over; completes at once when told to.
#[derive(Debug, Default)]
pub struct Recorder {
    pub ctrl: OnceLock<Weak<Controller>>,
    pub immediate: AtomicBool,
    pub submitted: Mutex<Vec<IoCommand>>,
    pub resets: AtomicU32,
    pub shutdowns: AtomicU32,
    pub write_cache: Mutex<Vec<bool>>,
    pub refuse_write_cache: AtomicBool,
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

/// A completion entry as the host reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub dw0: u32,
    pub sq_head: u16,
    pub sqid: u16,
    pub cid: u16,
    pub phase: bool,
    /// The status field: SC, SCT, CRD, M, DNR.
    pub field: u16,
}

impl Completion {
    pub fn status(&self) -> NvmeStatus {
        NvmeStatus::from_field(self.field).unwrap()
    }

    pub fn dnr(&self) -> bool {
        self.field & (1 << 14) != 0
    }
}

#[derive(Debug)]
struct HostSq {
    base: u64,
    entries: u16,
    tail: u16,
}

#[derive(Debug)]
struct HostCq {
    base: u64,
    entries: u16,
    head: u16,
    phase: bool,
}

/// The host side.
#[derive(Debug)]
pub struct Host {
    pub mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    pub ctrl: Arc<Controller>,
    pub handler: Arc<Recorder>,
    pub irqs: Arc<Irqs>,
    sqs: HashMap<u16, HostSq>,
    cqs: HashMap<u16, HostCq>,
    next_cid: u16,
}

impl Host {
    /// A controller with memory and interrupts attached, not yet enabled.
    pub fn new(identity: Identity) -> Host {
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        );
        let handler = Arc::new(Recorder::default());
        handler.immediate.store(true, Ordering::Relaxed);
        let ctrl = Arc::new(Controller::new(identity, handler.clone()));
        handler.ctrl.set(Arc::downgrade(&ctrl)).unwrap();
        let irqs = Arc::new(Irqs::default());
        ctrl.attach(mem.clone(), irqs.clone());
        Host {
            mem,
            ctrl,
            handler,
            irqs,
            sqs: HashMap::new(),
            cqs: HashMap::new(),
            next_cid: 0x100,
        }
    }

    /// A host that has probed the controller as Linux does and has `pairs`
    /// I/O queue pairs of `entries`.
    pub fn probed(identity: Identity, pairs: u16, entries: u16) -> Host {
        let mut host = Host::new(identity);
        host.enable();
        let c = host.admin(
            Sqe::new(admin_op::SET_FEATURES, 0)
                .with_cdw(10, 7)
                .with_cdw(11, u32::from(pairs - 1) | u32::from(pairs - 1) << 16),
        );
        assert_eq!(c.status(), NvmeStatus::Success);
        for qid in 1..=pairs {
            host.create_pair(qid, entries);
        }
        host
    }

    pub fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ctrl.bar0_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn read64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.ctrl.bar0_read(offset, &mut b);
        u64::from_le_bytes(b)
    }

    pub fn write32(&self, offset: u64, value: u32) {
        self.ctrl.bar0_write(offset, &value.to_le_bytes());
    }

    /// Two dword writes, low then high, as Linux's lo_hi_writeq.
    pub fn write64(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    pub fn csts(&self) -> u32 {
        self.read32(reg::CSTS)
    }

    pub fn write_mem(&self, at: u64, bytes: &[u8]) {
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(at))
            .unwrap();
    }

    pub fn read_mem(&self, at: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem
            .memory()
            .read_slice(&mut out, GuestAddress(at))
            .unwrap();
        out
    }

    /// Writes PRP list entries at `at`.
    pub fn write_list(&self, at: u64, entries: &[u64]) {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.write_mem(at, &bytes);
    }

    /// Linux's sequence: disable and wait for RDY 0, program the admin
    /// queue, write CC with the entry sizes, then set EN and wait for RDY.
    pub fn enable(&mut self) {
        self.write32(reg::CC, 0);
        assert_eq!(self.csts() & csts::RDY, 0);
        let n = u32::from(ADMIN_ENTRIES - 1);
        self.write32(reg::AQA, n | n << 16);
        self.write64(reg::ASQ, ASQ);
        self.write64(reg::ACQ, ACQ);
        let config = 6 << 16 | 4 << 20;
        self.write32(reg::CC, config);
        self.write32(reg::CC, config | cc::EN);
        assert_eq!(
            self.csts() & csts::RDY,
            csts::RDY,
            "CSTS {:#x}",
            self.csts()
        );
        self.sqs.clear();
        self.cqs.clear();
        self.sqs.insert(
            0,
            HostSq {
                base: ASQ,
                entries: ADMIN_ENTRIES,
                tail: 0,
            },
        );
        self.cqs.insert(
            0,
            HostCq {
                base: ACQ,
                entries: ADMIN_ENTRIES,
                head: 0,
                phase: true,
            },
        );
        // The admin queues' memory starts zeroed, as Linux allocates it.
        self.write_mem(ACQ, &[0; 32 * 16]);
    }

    /// Takes over the admin queue of a controller the caller enabled itself.
    pub fn enable_admin_only(&mut self) {
        self.write32(reg::CC, 0);
        let n = u32::from(ADMIN_ENTRIES - 1);
        self.write32(reg::AQA, n | n << 16);
        self.write64(reg::ASQ, ASQ);
        self.write64(reg::ACQ, ACQ);
        self.write32(reg::CC, cc::EN);
        assert_eq!(self.csts() & csts::RDY, csts::RDY);
        self.sqs.insert(
            0,
            HostSq {
                base: ASQ,
                entries: ADMIN_ENTRIES,
                tail: 0,
            },
        );
        self.cqs.insert(
            0,
            HostCq {
                base: ACQ,
                entries: ADMIN_ENTRIES,
                head: 0,
                phase: true,
            },
        );
        self.write_mem(ACQ, &[0; 32 * 16]);
    }

    /// Knows about a queue the controller was told of (by the caller).
    pub fn track_sq(&mut self, qid: u16, entries: u16) {
        self.sqs.insert(
            qid,
            HostSq {
                base: sq_base(qid),
                entries,
                tail: 0,
            },
        );
    }

    pub fn track_cq(&mut self, qid: u16, entries: u16) {
        self.write_mem(cq_base(qid), &vec![0; usize::from(entries) * 16]);
        self.cqs.insert(
            qid,
            HostCq {
                base: cq_base(qid),
                entries,
                head: 0,
                phase: true,
            },
        );
    }

    pub fn forget(&mut self, qid: u16) {
        self.sqs.remove(&qid);
        self.cqs.remove(&qid);
    }

    /// A command identifier not used before.
    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Places `sqe` at the queue's tail without ringing.
    pub fn place(&mut self, qid: u16, sqe: Sqe) {
        let sq = self.sqs.get_mut(&qid).unwrap();
        let at = sq.base + u64::from(sq.tail) * 64;
        sq.tail = (sq.tail + 1) % sq.entries;
        self.mem
            .memory()
            .write_slice(&sqe.to_bytes(), GuestAddress(at))
            .unwrap();
    }

    pub fn ring_sq(&self, qid: u16) {
        let tail = self.sqs[&qid].tail;
        self.write32(DOORBELLS + u64::from(qid) * 8, u32::from(tail));
    }

    pub fn submit(&mut self, qid: u16, sqe: Sqe) {
        self.place(qid, sqe);
        self.ring_sq(qid);
    }

    /// Every new completion of the queue, by phase tag; rings its head
    /// doorbell if there were any.
    pub fn reap(&mut self, cqid: u16) -> Vec<Completion> {
        let mem = self.mem.memory();
        let cq = self.cqs.get_mut(&cqid).unwrap();
        let mut out = Vec::new();
        loop {
            let at = cq.base + u64::from(cq.head) * 16;
            let mut e = [0u8; 16];
            mem.read_slice(&mut e, GuestAddress(at)).unwrap();
            let dw = |i: usize| u32::from_le_bytes(e[i * 4..i * 4 + 4].try_into().unwrap());
            let dw3 = dw(3);
            let phase = dw3 >> 16 & 1 == 1;
            if phase != cq.phase {
                break;
            }
            out.push(Completion {
                dw0: dw(0),
                sq_head: dw(2) as u16,
                sqid: (dw(2) >> 16) as u16,
                cid: dw3 as u16,
                phase,
                field: (dw3 >> 17) as u16,
            });
            cq.head = (cq.head + 1) % cq.entries;
            if cq.head == 0 {
                cq.phase = !cq.phase;
            }
        }
        if !out.is_empty() {
            let head = cq.head;
            drop(mem);
            self.write32(DOORBELLS + u64::from(cqid) * 8 + 4, u32::from(head));
        }
        out
    }

    /// Runs an admin command and returns its one completion.
    pub fn admin(&mut self, sqe: Sqe) -> Completion {
        let cid = self.cid();
        let sqe = Sqe::from_bytes(&{
            let mut b = sqe.to_bytes();
            b[2..4].copy_from_slice(&cid.to_le_bytes());
            b
        });
        self.submit(0, sqe);
        let got = self.reap(0);
        assert_eq!(got.len(), 1, "one completion for admin cid {cid}: {got:?}");
        assert_eq!(got[0].cid, cid);
        got[0]
    }

    /// Creates completion queue and submission queue `qid` with `entries`,
    /// the CQ on vector `qid`, as Linux's nvme_create_queue does.
    pub fn create_pair(&mut self, qid: u16, entries: u16) {
        self.track_cq(qid, entries);
        let size = u32::from(entries - 1) << 16;
        let c = self.admin(
            Sqe::new(admin_op::CREATE_CQ, 0)
                .with_prps(cq_base(qid), 0)
                .with_cdw(10, size | u32::from(qid))
                .with_cdw(11, u32::from(qid) << 16 | 0b11),
        );
        assert_eq!(c.status(), NvmeStatus::Success, "create CQ {qid}");
        let c = self.admin(
            Sqe::new(admin_op::CREATE_SQ, 0)
                .with_prps(sq_base(qid), 0)
                .with_cdw(10, size | u32::from(qid))
                .with_cdw(11, u32::from(qid) << 16 | 1),
        );
        assert_eq!(c.status(), NvmeStatus::Success, "create SQ {qid}");
        self.track_sq(qid, entries);
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
