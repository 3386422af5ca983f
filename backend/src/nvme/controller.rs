//! The controller: its registers (NVMe 1.4, 3.1), enable, reset and shutdown,
//! the doorbells, and the paths a command takes from its submission entry to
//! its completion.
//!
//! All state sits behind one lock, held only to change it: a doorbell write
//! sets a tail or a head; fetching takes entries off a submission queue and
//! into its in-flight set; a completion posts an entry. Admin commands run
//! under the lock on the thread that rang (the transport's). The I/O
//! submission queues are served on a thread each once
//! [`Controller::serve_on_threads`] is called (see `workers`), else on the
//! thread that rang: fetching under the lock, then decoding, checking and
//! handing each command to the [`IoHandler`] without it, in the order
//! fetched. What must happen without the lock — interrupts, the handler's
//! write cache, reset and shutdown calls — is collected in `Effects` and done
//! after it is released, so a handler may complete a command from inside
//! [`IoHandler::submit`].
//!
//! A second lock, the submission gate, orders submissions before a reset:
//! whoever fetches holds it shared until what it fetched has reached the
//! handler, a reset takes it exclusively before telling the handler, so the
//! handler never receives a command from before a reset after being told
//! of it.
//!
//! With shadow doorbells (`shadow`), an I/O queue's tail or head is read from
//! the host's buffer whenever the controller looks at the queue, and a
//! doorbell register write to it only says "look".

use std::fmt;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use dma::Gpa;
use log::{debug, warn};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use super::command::{bits, low32, Cqe, Sqe};
use super::features::Features;
use super::handler::{CommandTag, Interrupts, IoCommand, IoHandler};
use super::identify::{self, Health, Identity};
use super::queue::{ring_in_memory, CompQueue, QueueError, SubQueue};
use super::shadow::ShadowBuffers;
use super::status::NvmeStatus;
use super::workers::{Workers, BATCH};
use crate::counters::{bump, RateLimit};
use crate::GuestMemory;

/// Guest memory as the controller reads it, loaded from the [`GuestMemory`]
/// for one pass over its queues.
pub(super) type MappedMemory = GuestMemoryMmap<()>;

/// BAR0: the registers up to 0x1000, then a doorbell pair per queue (CAP.DSTRD
/// 0: four bytes apart), room for the admin queue and [`identify::MAX_IO_QUEUES`].
pub const BAR0_SIZE: u64 = 0x4000;
/// Where the doorbells start.
pub const DOORBELLS: u64 = 0x1000;

/// Register offsets.
pub mod reg {
    pub const CAP: u64 = 0x00;
    pub const VS: u64 = 0x08;
    pub const INTMS: u64 = 0x0c;
    pub const INTMC: u64 = 0x10;
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1c;
    pub const AQA: u64 = 0x24;
    pub const ASQ: u64 = 0x28;
    pub const ACQ: u64 = 0x30;
}

/// CC fields.
pub mod cc {
    pub const EN: u32 = 1;
    pub const SHN_MASK: u32 = 0x3 << 14;
    pub const SHN_SHIFT: u32 = 14;
}

/// CSTS fields.
pub mod csts {
    pub const RDY: u32 = 1;
    pub const CFS: u32 = 1 << 1;
    pub const SHST_MASK: u32 = 0x3 << 2;
    pub const SHST_OCCURRING: u32 = 0x1 << 2;
    pub const SHST_COMPLETE: u32 = 0x2 << 2;
}

/// CAP.TO: how long the host waits for CSTS.RDY, in 500 ms units.
const READY_TIMEOUT: u64 = 10;

/// Why the controller stopped (CSTS.CFS). Each is the guest's doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("Enabled with no guest memory attached")]
    NoMemory,
    #[error("Enabled with CC {0:#x}: only 4 KiB pages, the NVM command set and round robin work")]
    Config(u32),
    #[error("Enabled with an admin queue of {sq} / {cq} entries (at least 2 each)")]
    AdminQueueSize { sq: u32, cq: u32 },
    #[error("Admin queue at {0} is not page-aligned")]
    AdminQueueUnaligned(Gpa),
    #[error("Admin queue at {0} lies outside guest memory")]
    AdminQueueOutside(Gpa),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// A count per value of a byte (an opcode) or per status.
#[derive(Debug)]
pub struct Tally<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Tally<N> {
    fn default() -> Self {
        Tally(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> Tally<N> {
    pub fn bump(&self, i: usize) {
        if let Some(c) = self.0.get(i) {
            bump(c);
        }
    }

    /// The counts that are not zero, by index.
    pub fn counted(&self) -> Vec<(usize, u64)> {
        self.0
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

/// What the controller did and refused since it was created.
#[derive(Debug, Default)]
pub struct NvmeCounters {
    pub admin_commands: AtomicU64,
    /// NVM commands handed to the handler.
    pub io_commands: AtomicU64,
    /// Completions with an error status.
    pub failed: AtomicU64,
    /// Times the controller went fatal (CSTS.CFS).
    pub fatal: AtomicU64,
    /// Completions for commands of a deleted queue or from before a reset.
    pub stale_completions: AtomicU64,
    /// Register and doorbell writes ignored: bad size, a disabled or fatal
    /// controller, a queue being deleted, CC fields changed while enabled.
    pub ignored_writes: AtomicU64,
    /// Doorbell values refused (past the queue, a queue that does not
    /// exist, a head past the tail), by register or in a shadow slot: each
    /// made the controller fatal.
    pub doorbell_errors: AtomicU64,
    /// Times a submission queue with commands in it stopped fetching: its
    /// completion queue had no room left for another completion until the
    /// host consumed some.
    pub sq_stalls: AtomicU64,
    pub resets: AtomicU64,
    /// Doorbell register writes (each a message from the transport).
    pub mmio_doorbells: AtomicU64,
    /// Shadow doorbell slots read that held a new tail or head.
    pub shadow_updates: AtomicU64,
    /// Doorbell Buffer Config commands that succeeded.
    pub dbbuf_configs: AtomicU64,
    /// Commands fetched, by opcode.
    pub admin_opcodes: Tally<256>,
    pub io_opcodes: Tally<256>,
    /// Completions posted, by status (in [`NvmeStatus::ALL`]'s order).
    pub statuses: Tally<{ NvmeStatus::ALL.len() }>,
    // What the SMART / health log reports.
    pub read_commands: AtomicU64,
    pub write_commands: AtomicU64,
    pub blocks_read: AtomicU64,
    pub blocks_written: AtomicU64,
}

/// How a command fetched from a submission queue goes on.
#[derive(Debug)]
pub(super) enum Disposition {
    /// Complete it now.
    Done(NvmeStatus, u32),
    /// Hand it to the handler.
    Io(IoCommand),
    /// It completes later (an asynchronous event request, a queue deletion
    /// waiting for commands, a write cache change the handler makes).
    Held,
}

impl From<NvmeStatus> for Disposition {
    fn from(status: NvmeStatus) -> Self {
        Disposition::Done(status, 0)
    }
}

/// What to do once the state lock is released.
#[derive(Debug, Default)]
pub(super) struct Effects {
    pub vectors: Vec<u16>,
    /// Set Features, Volatile Write Cache: the command and the new setting.
    pub write_cache: Vec<(CommandTag, bool)>,
    pub reset: bool,
    pub shutdown: bool,
    /// I/O submission queues with something to fetch: woken on their
    /// threads, or served on this one.
    pub serve: Vec<u16>,
}

/// What one look at a submission queue found.
enum Fetched {
    /// The next command, in flight now.
    Command(Sqe, CommandTag),
    /// A command whose identifier was in flight: its completion is posted.
    Conflict,
    Empty,
    /// Its completion queue has no room for another completion.
    NoRoom(u16),
    /// Gone, being deleted, or the controller is fatal.
    Stopped,
}

/// The registers and queues.
pub(super) struct State {
    pub cc: u32,
    pub csts: u32,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
    pub intms: u32,
    pub mem: Option<GuestMemory>,
    /// Indexed by queue identifier; 0 is the admin queue.
    pub sqs: Vec<Option<SubQueue>>,
    pub cqs: Vec<Option<CompQueue>>,
    pub features: Features,
    /// Asynchronous event requests held.
    pub async_events: Vec<CommandTag>,
    /// Submission queues created so far: each gets a new incarnation.
    pub incarnations: u64,
    /// The host's shadow doorbell buffers (Doorbell Buffer Config).
    pub shadow: Option<ShadowBuffers>,
    /// Why the controller went fatal, until a reset.
    pub fault: Option<Fault>,
}

impl State {
    pub fn sq(&self, qid: u16) -> Option<&SubQueue> {
        self.sqs.get(usize::from(qid)).and_then(Option::as_ref)
    }

    pub fn sq_mut(&mut self, qid: u16) -> Option<&mut SubQueue> {
        self.sqs.get_mut(usize::from(qid)).and_then(Option::as_mut)
    }

    pub fn cq(&self, qid: u16) -> Option<&CompQueue> {
        self.cqs.get(usize::from(qid)).and_then(Option::as_ref)
    }

    pub fn cq_mut(&mut self, qid: u16) -> Option<&mut CompQueue> {
        self.cqs.get_mut(usize::from(qid)).and_then(Option::as_mut)
    }

    /// Whether completion queue `cqid` has room for the completion of one
    /// more command, counting what it holds (posted and not consumed, or
    /// waiting) and what the commands in flight to it will post. See
    /// [`Controller::fetch`] for the bound this keeps.
    pub fn cq_has_room(&self, cqid: u16) -> bool {
        let Some(cq) = self.cq(cqid) else {
            return false;
        };
        let in_flight: usize = self
            .sqs
            .iter()
            .flatten()
            .filter(|sq| sq.cqid == cqid)
            .map(|sq| sq.in_flight.len())
            .sum();
        let owed = usize::from(cq.posted()) + cq.waiting.len() + in_flight;
        owed < usize::from(cq.entries - 1)
    }

    pub fn io_queues_exist(&self) -> bool {
        self.sqs.iter().skip(1).any(Option::is_some) || self.cqs.iter().skip(1).any(Option::is_some)
    }

    pub fn fatal(&self) -> bool {
        self.csts & csts::CFS != 0
    }
}

/// An NVMe controller with one namespace. See the module documentation of
/// [`crate::nvme`] for how it meets its transport and its handler.
pub struct Controller {
    pub(super) identity: Identity,
    /// The most bytes an NVM command moves.
    pub(super) max_transfer: u64,
    pub(super) handler: Arc<dyn IoHandler>,
    state: Mutex<State>,
    irqs: RwLock<Option<Arc<dyn Interrupts>>>,
    gate: RwLock<()>,
    /// The I/O submission queues' threads, once asked for.
    workers: OnceLock<Workers>,
    pub(super) counters: NvmeCounters,
    limiter: RateLimit,
    started: Instant,
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("Controller")
            .field("identity", &self.identity)
            .field("cc", &format_args!("{:#x}", st.cc))
            .field("csts", &format_args!("{:#x}", st.csts))
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub const BAR0_SIZE: u64 = BAR0_SIZE;

    /// A disabled controller. Counts out of range in `identity` are clamped
    /// (see [`Identity`]). Its I/O submission queues are served on the
    /// thread that rings their doorbells until [`Controller::serve_on_threads`].
    pub fn new(identity: Identity, handler: Arc<dyn IoHandler>) -> Self {
        let identity = identity.clamped();
        let queues = usize::from(identity.io_queues) + 1;
        let features = Features::defaults(&identity);
        Controller {
            max_transfer: identity.max_transfer(),
            state: Mutex::new(State {
                cc: 0,
                csts: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                intms: 0,
                mem: None,
                sqs: (0..queues).map(|_| None).collect(),
                cqs: (0..queues).map(|_| None).collect(),
                features,
                async_events: Vec::new(),
                incarnations: 0,
                shadow: None,
                fault: None,
            }),
            irqs: RwLock::new(None),
            gate: RwLock::new(()),
            workers: OnceLock::new(),
            handler,
            identity,
            counters: NvmeCounters::default(),
            limiter: RateLimit::default(),
            started: Instant::now(),
        }
    }

    /// From now on each I/O submission queue is served on a thread of its
    /// own, started when its doorbell is first rung and woken by each
    /// doorbell write after: the transport's thread only records the
    /// doorbell. The threads end with the controller.
    pub fn serve_on_threads(self: &Arc<Self>) {
        let _ = self.workers.set(Workers::new(Arc::downgrade(self)));
    }

    /// Whether the I/O submission queues are served on threads of their own.
    pub fn on_threads(&self) -> bool {
        self.workers.get().is_some()
    }

    /// Gives the controller guest memory (which the transport may update in
    /// place as the guest maps and unmaps it) and its interrupts.
    pub fn attach(&self, mem: GuestMemory, irqs: Arc<dyn Interrupts>) {
        self.lock().mem = Some(mem);
        *self.irqs.write().unwrap_or_else(PoisonError::into_inner) = Some(irqs);
    }

    /// The identity in force (after clamping).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn counters(&self) -> &NvmeCounters {
        &self.counters
    }

    /// Whether the host runs the volatile write cache (Set Features 06h).
    pub fn write_cache_enabled(&self) -> bool {
        self.lock().features.write_cache
    }

    /// A read of BAR0 of any size at any offset: registers, zero elsewhere.
    pub fn bar0_read(&self, offset: u64, data: &mut [u8]) {
        let st = self.lock();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = u64::try_from(i).ok().and_then(|i| offset.checked_add(i));
            *byte = at.map_or(0, |at| {
                let dword = self.read_register(&st, at & !3).to_le_bytes();
                dword[usize::try_from(at & 3).unwrap_or_default()]
            });
        }
    }

    /// A write to BAR0 of any size at any offset: registers byte by byte,
    /// doorbells as whole aligned dwords (others are ignored). An SQ tail
    /// doorbell runs the admin commands, or has the I/O queue served.
    pub fn bar0_write(&self, offset: u64, data: &[u8]) {
        if data.is_empty() || offset >= BAR0_SIZE {
            return;
        }
        if offset >= DOORBELLS {
            let Ok(bytes) = <[u8; 4]>::try_from(data) else {
                return self.ignored(format_args!(
                    "doorbell write of {} bytes at {offset:#x}",
                    data.len()
                ));
            };
            if !offset.is_multiple_of(4) {
                return self.ignored(format_args!("unaligned doorbell write at {offset:#x}"));
            }
            let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
            let mut fx = Effects::default();
            {
                let mut st = self.lock();
                self.doorbell(&mut st, offset, u32::from_le_bytes(bytes), &mut fx);
            }
            let serve = std::mem::take(&mut fx.serve);
            self.run(fx);
            self.serve(serve);
            return;
        }
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            // Byte by byte into dwords, each with the mask of the bytes written.
            let mut dword = None::<(u64, u32, u32)>;
            for (at, &byte) in (offset..DOORBELLS).zip(data) {
                let base = at & !3;
                let shift = u32::try_from(at & 3).unwrap_or_default() * 8;
                match &mut dword {
                    Some((b, value, mask)) if *b == base => {
                        *value |= u32::from(byte) << shift;
                        *mask |= 0xff << shift;
                    }
                    _ => {
                        if let Some((b, value, mask)) = dword {
                            self.write_register(&mut st, b, value, mask, &mut fx);
                        }
                        dword = Some((base, u32::from(byte) << shift, 0xff << shift));
                    }
                }
            }
            if let Some((b, value, mask)) = dword {
                self.write_register(&mut st, b, value, mask, &mut fx);
            }
        }
        self.run(fx);
    }

    /// Completes a command the handler was given: posts its completion entry
    /// (with `dw0`, the command specific result) and raises its queue's
    /// vector. A tag of a deleted queue or from before a reset is ignored.
    pub fn complete(&self, tag: CommandTag, status: NvmeStatus, dw0: u32) {
        let mut fx = Effects::default();
        {
            let mut st = self.lock();
            let Some(mem) = st.mem.clone() else {
                return;
            };
            let mem = mem.memory();
            self.finish(&mut st, &mem, tag, status, dw0, &mut fx);
        }
        self.run(fx);
    }

    /// A function-level reset: the queues go, the registers return to their
    /// reset values, the handler is told. Not to be called from inside an
    /// [`IoHandler`] method (it waits for submissions under way).
    pub fn reset(&self) {
        {
            let mut st = self.lock();
            self.reset_queues(&mut st);
            st.cc = 0;
            st.aqa = 0;
            st.asq = 0;
            st.acq = 0;
            st.intms = 0;
        }
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        self.handler.reset();
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// CAP: MQES, CQR, TO, DSTRD 0, CSS NVM, MPSMIN = MPSMAX = 0 (4 KiB).
    pub fn capabilities(&self) -> u64 {
        let mqes = u64::from(self.identity.queue_entries - 1);
        let cqr = 1 << 16;
        let to = READY_TIMEOUT << 24;
        let css_nvm = 1 << 37;
        mqes | cqr | to | css_nvm
    }

    fn read_register(&self, st: &State, at: u64) -> u32 {
        let cap = self.capabilities();
        match at {
            reg::CAP => low32(cap),
            0x04 => low32(cap >> 32),
            reg::VS => identify::VERSION,
            reg::INTMS | reg::INTMC => st.intms,
            reg::CC => st.cc,
            reg::CSTS => st.csts,
            reg::AQA => st.aqa,
            reg::ASQ => low32(st.asq),
            0x2c => low32(st.asq >> 32),
            reg::ACQ => low32(st.acq),
            0x34 => low32(st.acq >> 32),
            _ => 0,
        }
    }

    /// Writes the bytes of `value` under `mask` to the register dword at `at`.
    fn write_register(&self, st: &mut State, at: u64, value: u32, mask: u32, fx: &mut Effects) {
        let merge = |old: u32| (old & !mask) | (value & mask);
        let merge_low = |old: u64| (old & !0xffff_ffff) | u64::from(merge(low32(old)));
        let merge_high = |old: u64| (old & 0xffff_ffff) | u64::from(merge(low32(old >> 32))) << 32;
        match at {
            reg::INTMS => st.intms |= value & mask,
            reg::INTMC => st.intms &= !(value & mask),
            reg::CC => self.set_cc(st, merge(st.cc), fx),
            reg::AQA => st.aqa = merge(st.aqa) & 0x0fff_0fff,
            reg::ASQ => st.asq = merge_low(st.asq),
            0x2c => st.asq = merge_high(st.asq),
            reg::ACQ => st.acq = merge_low(st.acq),
            0x34 => st.acq = merge_high(st.acq),
            _ => {}
        }
    }

    fn set_cc(&self, st: &mut State, new: u32, fx: &mut Effects) {
        let old = st.cc;
        match (old & cc::EN != 0, new & cc::EN != 0) {
            (true, false) => {
                st.cc = new;
                self.reset_queues(st);
                fx.reset = true;
            }
            (false, true) => {
                st.cc = new;
                self.enable(st);
            }
            (true, true) => {
                let kept = !cc::SHN_MASK;
                if (old ^ new) & kept != 0 {
                    self.ignored(format_args!(
                        "CC {old:#x} -> {new:#x} while enabled: only SHN may change"
                    ));
                }
                st.cc = (old & kept) | (new & cc::SHN_MASK);
            }
            (false, false) => st.cc = new,
        }
        if old & cc::SHN_MASK == 0 && st.cc & cc::SHN_MASK != 0 {
            debug!(
                "nvme: shutdown notification (CC.SHN {})",
                (st.cc & cc::SHN_MASK) >> cc::SHN_SHIFT
            );
            st.csts = (st.csts & !csts::SHST_MASK) | csts::SHST_OCCURRING;
            fx.shutdown = true;
        }
    }

    /// CC.EN 0 → 1: checks the configuration and the admin queue, creates it,
    /// sets CSTS.RDY; or goes fatal.
    fn enable(&self, st: &mut State) {
        if let Err(fault) = self.admin_queue(st) {
            self.fatal(st, fault);
            return;
        }
        st.csts = csts::RDY;
        debug!("nvme: enabled, CC {:#x}, AQA {:#x}", st.cc, st.aqa);
    }

    fn admin_queue(&self, st: &mut State) -> Result<(), Fault> {
        let mem = st.mem.clone().ok_or(Fault::NoMemory)?;
        let mem = mem.memory();
        let (mps, css, ams) = (bits(st.cc, 7, 10), bits(st.cc, 4, 6), bits(st.cc, 11, 13));
        if mps != 0 || css != 0 || ams != 0 {
            return Err(Fault::Config(st.cc));
        }
        let sq = bits(st.aqa, 0, 11) + 1;
        let cq = bits(st.aqa, 16, 27) + 1;
        let (Ok(sq_entries), Ok(cq_entries)) = (u16::try_from(sq), u16::try_from(cq)) else {
            return Err(Fault::AdminQueueSize { sq, cq });
        };
        if sq < 2 || cq < 2 {
            return Err(Fault::AdminQueueSize { sq, cq });
        }
        let (asq, acq) = (Gpa(st.asq), Gpa(st.acq));
        for base in [asq, acq] {
            if base.0 & 0xfff != 0 {
                return Err(Fault::AdminQueueUnaligned(base));
            }
        }
        if !ring_in_memory(&*mem, asq, sq_entries, Sqe::SIZE) {
            return Err(Fault::AdminQueueOutside(asq));
        }
        if !ring_in_memory(&*mem, acq, cq_entries, Cqe::SIZE) {
            return Err(Fault::AdminQueueOutside(acq));
        }
        let mut admin_cq = CompQueue::new(0, acq, cq_entries, Some(0));
        admin_cq.sqs = 1;
        st.cqs[0] = Some(admin_cq);
        let incarnation = self.next_incarnation(st);
        st.sqs[0] = Some(SubQueue::new(0, asq, sq_entries, 0, incarnation));
        Ok(())
    }

    pub(super) fn next_incarnation(&self, st: &mut State) -> u64 {
        st.incarnations += 1;
        st.incarnations
    }

    /// A controller reset (CC.EN 1 → 0 or FLR): every queue and held command
    /// goes, the shadow doorbell buffers are forgotten, features return to
    /// their defaults, CSTS clears.
    fn reset_queues(&self, st: &mut State) {
        bump(&self.counters.resets);
        let held: usize = st.sqs.iter().flatten().map(|sq| sq.in_flight.len()).sum();
        if held > 0 {
            debug!("nvme: reset with {held} commands in flight");
        }
        st.sqs.iter_mut().for_each(|q| *q = None);
        st.cqs.iter_mut().for_each(|q| *q = None);
        st.async_events.clear();
        st.features = Features::defaults(&self.identity);
        st.shadow = None;
        st.fault = None;
        st.csts = 0;
    }

    /// A doorbell register write. A shadowed I/O queue's value is read from
    /// its slot instead: the register's may be older.
    fn doorbell(&self, st: &mut State, offset: u64, value: u32, fx: &mut Effects) {
        bump(&self.counters.mmio_doorbells);
        if st.csts & csts::RDY == 0 || st.fatal() {
            return self.ignored(format_args!(
                "doorbell {offset:#x} = {value} while the controller is not ready (CSTS {:#x})",
                st.csts
            ));
        }
        let Some(mem) = st.mem.clone() else {
            return;
        };
        let mem = mem.memory();
        let index = (offset - DOORBELLS) / 4;
        let Ok(qid) = u16::try_from(index / 2) else {
            return;
        };
        if index % 2 == 1 {
            let result = match st.cq_mut(qid) {
                None => Err(QueueError::NoSuchQueue { qid }),
                Some(cq) if cq.shadow.is_some() => cq.read_shadow(&*mem).map(|moved| {
                    if moved.is_some() {
                        bump(&self.counters.shadow_updates);
                    }
                    cq.vector.filter(|_| moved == Some(true))
                }),
                Some(cq) => cq
                    .set_head(&*mem, value)
                    .map(|posted| cq.vector.filter(|_| posted)),
            };
            match result {
                Ok(vector) => {
                    fx.vectors.extend(vector);
                    self.resume(st, &mem, qid, fx);
                }
                Err(e) => self.doorbell_error(st, e),
            }
        } else {
            let result = match st.sq_mut(qid) {
                None => Err(QueueError::NoSuchQueue { qid }),
                Some(sq) if sq.deleting.is_some() => {
                    return self.ignored(format_args!(
                        "q={qid} tail doorbell while the queue is being deleted"
                    ));
                }
                // Fetching reads the slot.
                Some(sq) if sq.shadow.is_some() => Ok(()),
                Some(sq) => sq.set_tail(value),
            };
            match result {
                Ok(()) if qid == 0 => self.run_admin(st, &mem, fx),
                Ok(()) => fx.serve.push(qid),
                Err(e) => self.doorbell_error(st, e),
            }
        }
    }

    /// Runs the admin commands between the admin queue's head and tail, as
    /// long as its completion queue has room for their completions (see
    /// [`Controller::fetch`]).
    fn run_admin(&self, st: &mut State, mem: &MappedMemory, fx: &mut Effects) {
        loop {
            match self.fetch(st, mem, 0, fx) {
                Fetched::Command(sqe, tag) => {
                    bump(&self.counters.admin_commands);
                    match self.admin(st, mem, &sqe, tag, fx) {
                        Disposition::Done(status, dw0) => {
                            self.finish(st, mem, tag, status, dw0, fx);
                        }
                        Disposition::Io(_) | Disposition::Held => {}
                    }
                }
                Fetched::Conflict => {}
                Fetched::NoRoom(cqid) => return self.stall(0, cqid),
                Fetched::Empty | Fetched::Stopped => return,
            }
        }
    }

    /// Takes the next command off submission queue `qid` into flight, if
    /// its completion queue has room for its completion; a queue being
    /// deleted fetches nothing. What stays in the queue is fetched when the
    /// host consumes completions ([`Controller::resume`]).
    ///
    /// The bound. For a completion queue of `entries` slots, call *owed* the
    /// entries posted there and not yet consumed, plus the completions
    /// waiting, plus the commands in flight on every submission queue
    /// completing there. A command is fetched only while owed < `entries - 1`
    /// ([`State::cq_has_room`]), and the fetch adds one: the command goes in
    /// flight, or its Command ID Conflict is posted at once. Completing a
    /// command moves one from in flight to posted (or waiting; or drops it,
    /// on a fatal controller); the head doorbell only takes away; a queue is
    /// created with nothing in flight and deleted once it has none; a reset
    /// drops them all. So owed ≤ `entries - 1` at all times: `waiting.len()`
    /// and each submission queue's `in_flight.len()` stay below the
    /// completion queue's `entries`, whatever the host does. (A completion
    /// even finds posted + waiting ≤ `entries - 2`, so none ever waits.) The
    /// cost falls on a host with more commands outstanding than its
    /// completion queue holds: it waits for its own head doorbell, as on
    /// hardware. Linux never gets there: its queues come in pairs of one
    /// size, with at most `entries - 1` commands outstanding. With shadow
    /// doorbells the head the controller knows may lag the host's: the
    /// queue then reads the slot before it counts the queue full
    /// ([`Controller::await_room`]).
    fn fetch(&self, st: &mut State, mem: &MappedMemory, qid: u16, fx: &mut Effects) -> Fetched {
        if st.fatal() {
            return Fetched::Stopped;
        }
        let Some(sq) = st.sq(qid).filter(|sq| sq.deleting.is_none()) else {
            return Fetched::Stopped;
        };
        if sq.is_empty() {
            return Fetched::Empty;
        }
        let cqid = sq.cqid;
        if !st.cq_has_room(cqid) {
            return Fetched::NoRoom(cqid);
        }
        if let Some(cq) = st.cq_mut(cqid) {
            if let Err(e) = cq.set_awaited(mem, false) {
                self.fatal(st, e.into());
                return Fetched::Stopped;
            }
        }
        let Some(sq) = st.sq_mut(qid) else {
            return Fetched::Stopped;
        };
        let sqe = match sq.fetch(mem) {
            None => return Fetched::Empty,
            Some(Ok(sqe)) => sqe,
            Some(Err(e)) => {
                self.fatal(st, e.into());
                return Fetched::Stopped;
            }
        };
        let opcodes = if qid == 0 {
            &self.counters.admin_opcodes
        } else {
            &self.counters.io_opcodes
        };
        opcodes.bump(usize::from(sqe.opcode()));
        let tag = sq.tag(sqe.cid());
        if !sq.in_flight.insert(tag.cid) {
            self.guest_error(format_args!(
                "q={qid} cid={} submitted while in flight",
                tag.cid
            ));
            self.post(st, mem, qid, tag.cid, NvmeStatus::CommandIdConflict, 0, fx);
            return Fetched::Conflict;
        }
        Fetched::Command(sqe, tag)
    }

    /// Serves I/O submission queue `qid` once: fetches up to `limit`
    /// commands under the lock, then decodes and checks each and hands it
    /// to the handler (or completes it with its error) without the lock, in
    /// the order fetched. Returns whether there may be more to fetch. The
    /// caller holds the submission gate.
    fn serve_once(&self, qid: u16, limit: usize) -> bool {
        let mut fx = Effects::default();
        let mut fetched = Vec::new();
        let (mem, more) = {
            let mut st = self.lock();
            let Some(mem) = st.mem.clone() else {
                return false;
            };
            let mem = mem.memory();
            let more = self.fetch_io(&mut st, &mem, qid, limit, &mut fetched, &mut fx);
            (mem, more)
        };
        self.run(fx);
        for (sqe, tag) in fetched {
            match self.io(&mem, &sqe, tag) {
                Disposition::Io(cmd) => self.handler.submit(cmd),
                Disposition::Done(status, dw0) => self.complete(tag, status, dw0),
                Disposition::Held => {}
            }
        }
        more
    }

    /// Serves I/O submission queue `qid` until it is empty or waits for
    /// room, `BATCH` commands at a time, each batch under the submission
    /// gate: the queue's thread.
    pub(super) fn serve_queue(&self, qid: u16) {
        loop {
            let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
            if !self.serve_once(qid, BATCH) {
                return;
            }
        }
    }

    /// Fetches up to `limit` commands of I/O submission queue `qid` into
    /// `out`, the tail first read from its shadow slot. A queue that runs
    /// out of commands sets its EventIdx and looks once more; one that runs
    /// out of room reads its completion queue's head and, if still full,
    /// asks for the head doorbell. Returns whether it stopped at `limit`.
    fn fetch_io(
        &self,
        st: &mut State,
        mem: &MappedMemory,
        qid: u16,
        limit: usize,
        out: &mut Vec<(Sqe, CommandTag)>,
        fx: &mut Effects,
    ) -> bool {
        if !self.shadow_tail(st, mem, qid, false) {
            return false;
        }
        loop {
            if out.len() >= limit {
                return true;
            }
            match self.fetch(st, mem, qid, fx) {
                Fetched::Command(sqe, tag) => out.push((sqe, tag)),
                Fetched::Conflict => {}
                Fetched::Empty => {
                    if !self.shadow_tail(st, mem, qid, true) {
                        return false;
                    }
                    if st.sq(qid).is_none_or(SubQueue::is_empty) {
                        return false;
                    }
                }
                Fetched::NoRoom(cqid) => {
                    if !self.await_room(st, mem, cqid, fx) {
                        self.stall(qid, cqid);
                        return false;
                    }
                }
                Fetched::Stopped => return false,
            }
        }
    }

    /// Takes submission queue `qid`'s tail from its shadow slot, if it has
    /// one; first, when `arm`, with the EventIdx set at the tail fetched up
    /// to and a full fence (the host writes its slot, then reads the
    /// EventIdx: one of the two sees the other's write). Returns false if
    /// the controller went fatal.
    fn shadow_tail(&self, st: &mut State, mem: &MappedMemory, qid: u16, arm: bool) -> bool {
        let Some(sq) = st.sq_mut(qid).filter(|sq| sq.shadow.is_some()) else {
            return true;
        };
        let read = if arm {
            sq.arm(mem).and_then(|()| {
                fence(Ordering::SeqCst);
                sq.read_shadow(mem)
            })
        } else {
            sq.read_shadow(mem)
        };
        match read {
            Ok(moved) => {
                if moved {
                    bump(&self.counters.shadow_updates);
                }
                true
            }
            Err(e) => {
                self.doorbell_error(st, e);
                false
            }
        }
    }

    /// Completion queue `cqid` has no room by the head the controller
    /// knows. If it is shadowed, reads the host's head from the slot; if
    /// still full, moves the EventIdx to that head (the host rings its next
    /// head), fences and reads once more. Returns whether the head moved
    /// (look again).
    fn await_room(&self, st: &mut State, mem: &MappedMemory, cqid: u16, fx: &mut Effects) -> bool {
        let Some(cq) = st.cq_mut(cqid).filter(|cq| cq.shadow.is_some()) else {
            return false;
        };
        let read = cq.read_shadow(mem).and_then(|moved| match moved {
            Some(posted) => Ok(Some(posted)),
            None => cq.set_awaited(mem, true).and_then(|()| {
                fence(Ordering::SeqCst);
                cq.read_shadow(mem)
            }),
        });
        match read {
            Ok(Some(posted)) => {
                bump(&self.counters.shadow_updates);
                fx.vectors.extend(cq.vector.filter(|_| posted));
                true
            }
            Ok(None) => false,
            Err(e) => {
                self.doorbell_error(st, e);
                false
            }
        }
    }

    fn stall(&self, qid: u16, cqid: u16) {
        bump(&self.counters.sq_stalls);
        debug!("nvme: q={qid} stops fetching: completion queue {cqid} has no room");
    }

    /// The host consumed completions of queue `cqid`: the submission queues
    /// completing to it fetch what they left for want of room (an I/O queue
    /// with nothing left has nothing to be woken for: a new command rings).
    fn resume(&self, st: &mut State, mem: &MappedMemory, cqid: u16, fx: &mut Effects) {
        for sqid in 0..u16::try_from(st.sqs.len()).unwrap_or(u16::MAX) {
            let Some(sq) = st.sq(sqid).filter(|sq| sq.cqid == cqid) else {
                continue;
            };
            if sqid == 0 {
                self.run_admin(st, mem, fx);
            } else if !sq.is_empty() {
                fx.serve.push(sqid);
            }
        }
    }

    /// Has the I/O submission queues in `sqs` served: woken on their
    /// threads, or here (the caller holds the submission gate).
    fn serve(&self, mut sqs: Vec<u16>) {
        sqs.sort_unstable();
        sqs.dedup();
        for qid in sqs {
            if self.workers.get().is_some_and(|w| w.wake(qid)) {
                continue;
            }
            while self.serve_once(qid, usize::MAX) {}
        }
    }

    /// Waits until every queue's thread has served what it was woken for.
    #[cfg(test)]
    pub(super) fn settle(&self) {
        if let Some(w) = self.workers.get() {
            w.settle();
        }
    }

    /// The end of a command: it leaves its queue's in-flight set and its
    /// completion is posted; a queue deletion waiting for it completes too.
    pub(super) fn finish(
        &self,
        st: &mut State,
        mem: &MappedMemory,
        tag: CommandTag,
        status: NvmeStatus,
        dw0: u32,
        fx: &mut Effects,
    ) {
        let in_flight = |sq: &mut SubQueue| {
            (sq.incarnation == tag.incarnation && sq.in_flight.remove(&tag.cid))
                .then(|| sq.deleting.filter(|_| sq.in_flight.is_empty()))
        };
        let Some(deleted) = st.sq_mut(tag.qid).and_then(in_flight) else {
            bump(&self.counters.stale_completions);
            debug!(
                "nvme: q={} cid={} completion dropped: stale",
                tag.qid, tag.cid
            );
            return;
        };
        self.post(st, mem, tag.qid, tag.cid, status, dw0, fx);
        if let Some(delete) = deleted {
            self.remove_sq(st, tag.qid);
            self.finish(st, mem, delete, NvmeStatus::Success, 0, fx);
        }
    }

    pub(super) fn remove_sq(&self, st: &mut State, qid: u16) {
        if let Some(sq) = st.sqs.get_mut(usize::from(qid)).and_then(Option::take) {
            if let Some(cq) = st.cq_mut(sq.cqid) {
                cq.sqs = cq.sqs.saturating_sub(1);
            }
        }
    }

    /// Posts a completion entry for `cid` of submission queue `sqid`.
    #[allow(clippy::too_many_arguments)]
    fn post(
        &self,
        st: &mut State,
        mem: &MappedMemory,
        sqid: u16,
        cid: u16,
        status: NvmeStatus,
        dw0: u32,
        fx: &mut Effects,
    ) {
        if st.fatal() {
            return;
        }
        if !status.is_success() {
            bump(&self.counters.failed);
        }
        self.counters.statuses.bump(status.index());
        let Some((sq_head, cqid)) = st.sq(sqid).map(|sq| (sq.head, sq.cqid)) else {
            return;
        };
        let cqe = Cqe {
            dw0,
            sq_head,
            sqid,
            cid,
            status,
        };
        let Some(cq) = st.cq_mut(cqid) else {
            return;
        };
        match cq.post(mem, cqe) {
            Ok(posted) => fx.vectors.extend(cq.vector.filter(|_| posted)),
            Err(e) => self.fatal(st, e.into()),
        }
    }

    /// Everything that waited for the state lock to be released.
    fn run(&self, mut fx: Effects) {
        self.signal(&mut fx.vectors);
        for (tag, enabled) in fx.write_cache {
            let status = match self.handler.set_write_cache(enabled) {
                Ok(()) => {
                    self.lock().features.write_cache = enabled;
                    NvmeStatus::Success
                }
                Err(status) => status,
            };
            self.complete(tag, status, 0);
        }
        if fx.reset {
            let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
            self.handler.reset();
        }
        if fx.shutdown {
            self.handler.shutdown();
            let mut st = self.lock();
            if st.csts & csts::SHST_MASK == csts::SHST_OCCURRING {
                st.csts = (st.csts & !csts::SHST_MASK) | csts::SHST_COMPLETE;
            }
        }
    }

    fn signal(&self, vectors: &mut Vec<u16>) {
        if vectors.is_empty() {
            return;
        }
        vectors.sort_unstable();
        vectors.dedup();
        let irqs = self.irqs.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(irqs) = irqs.as_ref() {
            for &v in vectors.iter() {
                irqs.signal(v);
            }
        }
    }

    /// The SMART / health figures.
    pub(super) fn health(&self) -> Health {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Health {
            blocks_read: get(&self.counters.blocks_read),
            blocks_written: get(&self.counters.blocks_written),
            read_commands: get(&self.counters.read_commands),
            write_commands: get(&self.counters.write_commands),
            power_on_hours: self.started.elapsed().as_secs() / 3600,
        }
    }

    /// The controller stops: CSTS.CFS, until a reset.
    fn fatal(&self, st: &mut State, fault: Fault) {
        st.csts |= csts::CFS;
        st.fault.get_or_insert(fault);
        bump(&self.counters.fatal);
        if self.limiter.allow() {
            warn!("nvme: controller fatal status: {fault}");
        }
    }

    /// A doorbell value the controller cannot take, by register or from a
    /// shadow slot: fatal.
    fn doorbell_error(&self, st: &mut State, e: QueueError) {
        bump(&self.counters.doorbell_errors);
        self.fatal(st, e.into());
    }

    fn ignored(&self, what: fmt::Arguments<'_>) {
        bump(&self.counters.ignored_writes);
        if self.limiter.allow() {
            warn!("nvme: ignored {what}");
        }
    }

    /// A log line for a command the guest got wrong; rate-limited.
    pub(super) fn guest_error(&self, what: fmt::Arguments<'_>) {
        if self.limiter.allow() {
            warn!("nvme: {what}");
        } else {
            debug!("nvme: {what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use dma::Segment;
    use nvme_model::{Lba, LbaSize};

    use super::*;
    use crate::nvme::command::{admin_op, io_op};
    use crate::nvme::handler::IoOp;
    use crate::nvme::test_utils::*;

    fn identify(cns: u32, nsid: u32) -> Sqe {
        Sqe::new(admin_op::IDENTIFY, 0)
            .with_nsid(nsid)
            .with_prps(ADMIN_BUF, 0)
            .with_cdw(10, cns)
    }

    fn read(cid: u16, lba: u64, blocks: u32, prp1: u64, prp2: u64) -> Sqe {
        Sqe::new(io_op::READ, cid)
            .with_nsid(1)
            .with_prps(prp1, prp2)
            .with_cdw(10, lba as u32)
            .with_cdw(11, (lba >> 32) as u32)
            .with_cdw(12, blocks - 1)
    }

    fn u32_at(d: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(d[at..at + 4].try_into().unwrap())
    }

    /// The whole life of a Linux guest's controller: probe, identify, queues,
    /// I/O, wrap-around, queue deletion, shutdown, disable; each step as the
    /// Linux function that takes it.
    #[test]
    fn linux_probe_io_and_shutdown() {
        for threads in [false, true] {
            let mut host = Host::new_on(threads, identity(LbaSize::B512));
            probe_enables(&mut host);
            identify_controller(&mut host);
            set_up_io_queues(&mut host);
            scan_namespaces(&mut host);
            read_and_write(&mut host);
            wrap_around(&mut host);
            delete_io_queues(&mut host);
            shut_down_and_disable(&mut host);
        }
    }

    /// nvme_pci_enable: the capabilities and version read, the controller
    /// enabled.
    fn probe_enables(host: &mut Host) {
        // nvme_pci_enable: CAP and VS.
        let cap = host.read64(reg::CAP);
        assert_eq!(cap & 0xffff, 63, "MQES");
        assert_eq!(cap >> 16 & 1, 1, "CQR");
        assert_eq!(cap >> 32 & 0xf, 0, "DSTRD");
        assert_eq!(cap >> 37 & 1, 1, "CSS: NVM");
        assert_eq!(cap >> 48 & 0xff, 0, "MPSMIN = MPSMAX = 4 KiB");
        assert_ne!(cap >> 24 & 0xff, 0, "TO");
        assert_eq!(host.read32(reg::VS), 0x0001_0400);
        assert_eq!(host.csts(), 0);

        host.enable();
        assert_eq!(host.read64(reg::ASQ), ASQ);
        assert_eq!(host.read32(reg::CC), 6 << 16 | 4 << 20 | 1);
    }

    /// nvme_init_identify and what follows it: the controller's identity, its
    /// limits, its health log.
    fn identify_controller(host: &mut Host) {
        // nvme_init_identify.
        let c = host.admin(identify(1, 0));
        assert_eq!(c.status(), Some(NvmeStatus::Success));
        assert!(c.phase);
        assert_eq!(c.sqid, 0);
        assert_eq!(host.irqs.take(), vec![0], "admin completions on vector 0");
        let id = host.read_mem(ADMIN_BUF, 4096);
        assert_eq!(&id[4..17], b"dmaprobe-test");
        assert_eq!(id[77], 0, "MDTS: no limit");
        assert_eq!((id[512], id[513]), (0x66, 0x44));
        assert_eq!(u32_at(&id, 516), 1, "NN");
        // nvme_init_non_mdts_limits.
        assert_eq!(
            host.admin(identify(6, 0)).status(),
            Some(NvmeStatus::Success)
        );
        // nvme_hwmon_init.
        let smart = host.admin(
            Sqe::new(admin_op::GET_LOG_PAGE, 0)
                .with_nsid(0xffff_ffff)
                .with_prps(ADMIN_BUF, 0)
                .with_cdw(10, 2 | (512 / 4 - 1) << 16),
        );
        assert_eq!(smart.status(), Some(NvmeStatus::Success));
    }

    /// nvme_setup_io_queues and nvme_start_ctrl: the I/O queue pairs, an
    /// asynchronous event request left outstanding.
    fn set_up_io_queues(host: &mut Host) {
        // nvme_setup_io_queues: ask for 8, get the 4 there are.
        let c = host.admin(
            Sqe::new(admin_op::SET_FEATURES, 0)
                .with_cdw(10, 7)
                .with_cdw(11, 7 | 7 << 16),
        );
        assert_eq!(c.status(), Some(NvmeStatus::Success));
        assert_eq!(c.dw0, 3 | 3 << 16, "granted counts, zero-based");
        host.create_pair(1, 8);
        host.create_pair(2, 8);

        // nvme_start_ctrl: an asynchronous event request stays outstanding.
        let cid = host.cid();
        host.submit(0, Sqe::new(admin_op::ASYNC_EVENT_REQUEST, cid));
        assert!(host.reap(0).is_empty());
    }

    /// nvme_scan_work: the active namespace list, its descriptors, the
    /// namespace and the write cache.
    fn scan_namespaces(host: &mut Host) {
        // nvme_scan_work: active list, descriptors, namespace.
        assert_eq!(
            host.admin(identify(2, 0)).status(),
            Some(NvmeStatus::Success)
        );
        let list = host.read_mem(ADMIN_BUF, 8);
        assert_eq!((u32_at(&list, 0), u32_at(&list, 4)), (1, 0));
        assert_eq!(
            host.admin(identify(3, 1)).status(),
            Some(NvmeStatus::Success)
        );
        assert_eq!(host.read_mem(ADMIN_BUF, 2), vec![1, 8]);
        assert_eq!(
            host.admin(identify(0, 1)).status(),
            Some(NvmeStatus::Success)
        );
        let ns = host.read_mem(ADMIN_BUF, 4096);
        assert_eq!(u64::from_le_bytes(ns[0..8].try_into().unwrap()), 131072);
        assert_eq!(ns[130], 9, "LBADS");
        // Volatile write cache.
        let c = host.admin(Sqe::new(admin_op::GET_FEATURES, 0).with_cdw(10, 6));
        assert_eq!((c.status(), c.dw0), (Some(NvmeStatus::Success), 1));
        host.irqs.take();
    }

    /// I/O: a read across a page boundary on queue 1, a FUA write through a PRP
    /// list on queue 2.
    fn read_and_write(host: &mut Host) {
        // A 4 KiB read at an offset into a page: two segments.
        let c = host.io(1, read(7, 100, 8, DATA + 0x200, DATA + 0x3000));
        assert_eq!(
            (c.cid, c.sqid, c.status()),
            (7, 1, Some(NvmeStatus::Success))
        );
        assert_eq!(c.sq_head, 1);
        assert_eq!(host.irqs.take(), vec![1]);
        let cmds = host.handler.take();
        assert_eq!(cmds.len(), 1);
        let cmd = &cmds[0];
        assert_eq!(
            (cmd.op.clone(), cmd.slba, cmd.nlb),
            (IoOp::Read, Lba(100), 8)
        );
        assert_eq!(
            cmd.segments,
            vec![
                Segment::new(Gpa(DATA + 0x200), 0xe00),
                Segment::new(Gpa(DATA + 0x3000), 0x200)
            ]
        );

        // A 16 KiB FUA write through a PRP list on queue 2.
        host.write_list(
            DATA + 0x10_0000,
            &[DATA + 0x5000, DATA + 0x6000, DATA + 0x9000],
        );
        let write = Sqe::new(io_op::WRITE, 9)
            .with_nsid(1)
            .with_prps(DATA + 0x4000, DATA + 0x10_0000)
            .with_cdw(10, 2048)
            .with_cdw(12, 31 | 1 << 30);
        let c = host.io(2, write);
        assert_eq!(
            (c.cid, c.sqid, c.status()),
            (9, 2, Some(NvmeStatus::Success))
        );
        assert_eq!(host.irqs.take(), vec![2]);
        let cmd = host.handler.take().remove(0);
        assert_eq!((cmd.op, cmd.nlb, cmd.fua), (IoOp::Write, 32, true));
        assert_eq!(
            cmd.segments,
            vec![
                Segment::new(Gpa(DATA + 0x4000), 0x3000),
                Segment::new(Gpa(DATA + 0x9000), 0x1000)
            ]
        );
    }

    /// The queue wraps: the phase tag flips every pass.
    fn wrap_around(host: &mut Host) {
        // Wrap-around: 20 more reads on queue 1 (8 entries) one by one; the
        // phase tag flips every 8 completions.
        let mut phases = Vec::new();
        for i in 0..20u16 {
            let c = host.io(1, read(i, u64::from(i), 1, DATA, 0));
            assert_eq!((c.cid, c.status()), (i, Some(NvmeStatus::Success)));
            phases.push(c.phase);
        }
        // The first pass had used one slot before.
        let want: Vec<bool> = (1..21).map(|n| (n / 8) % 2 == 0).collect();
        assert_eq!(phases, want);
        assert_eq!(host.handler.take().len(), 20);
    }

    /// nvme_disable_io_queues: SQs first, then CQs.
    fn delete_io_queues(host: &mut Host) {
        // nvme_disable_io_queues: SQs first, then CQs.
        for qid in [1u16, 2] {
            let c = host.admin(Sqe::new(admin_op::DELETE_SQ, 0).with_cdw(10, u32::from(qid)));
            assert_eq!(c.status(), Some(NvmeStatus::Success));
            let c = host.admin(Sqe::new(admin_op::DELETE_CQ, 0).with_cdw(10, u32::from(qid)));
            assert_eq!(c.status(), Some(NvmeStatus::Success));
            host.forget(qid);
        }
    }

    /// Shutdown and disable, and the controller comes back.
    fn shut_down_and_disable(host: &mut Host) {
        // Shutdown: CC.SHN normal, CSTS.SHST complete, the handler flushed.
        host.write32(reg::CC, host.read32(reg::CC) | 1 << 14);
        assert_eq!(host.csts() & csts::SHST_MASK, csts::SHST_COMPLETE);
        assert_eq!(host.csts() & csts::RDY, csts::RDY);
        assert_eq!(host.handler.shutdowns.load(Relaxed), 1);

        // Disable: RDY clears, SHST clears, the handler is told.
        host.write32(reg::CC, 0);
        assert_eq!(host.csts(), 0);
        assert_eq!(host.handler.resets.load(Relaxed), 1);
        assert_eq!(host.ctrl.counters().fatal.load(Relaxed), 0);
        assert_eq!(host.ctrl.counters().io_commands.load(Relaxed), 22);

        // And it comes back.
        host.enable();
        assert_eq!(
            host.admin(identify(1, 0)).status(),
            Some(NvmeStatus::Success)
        );
    }

    #[test]
    fn completions_from_the_handler_later_and_out_of_order() {
        for threads in [false, true] {
            let mut host = Host::probed_on(threads, identity(LbaSize::B4096), 1, 16);
            host.handler.immediate.store(false, Relaxed);
            for cid in 0..4 {
                host.place(1, read(cid, u64::from(cid), 1, DATA, 0));
            }
            host.ring_sq(1);
            assert!(host.reap(1).is_empty());
            let tags = host.held();
            assert_eq!(tags.len(), 4);
            for &i in &[2usize, 0, 3, 1] {
                host.ctrl
                    .complete(tags[i], NvmeStatus::UnrecoveredReadError, 0);
            }
            let got = host.reap(1);
            let cids: Vec<u16> = got.iter().map(|c| c.cid).collect();
            assert_eq!(cids, vec![2, 0, 3, 1]);
            assert!(got
                .iter()
                .all(|c| c.status() == Some(NvmeStatus::UnrecoveredReadError) && c.dnr()));
            // Completing twice does nothing.
            host.ctrl.complete(tags[0], NvmeStatus::Success, 0);
            assert!(host.reap(1).is_empty());
            assert_eq!(host.ctrl.counters().stale_completions.load(Relaxed), 1);
        }
    }

    /// The cids, and the SQ heads they report, of completions.
    fn cids_and_heads(got: &[Completion]) -> (Vec<u16>, Vec<u16>) {
        got.iter().map(|c| (c.cid, c.sq_head)).unzip()
    }

    #[test]
    fn a_full_completion_queue_stops_fetching_until_the_host_makes_room() {
        for threads in [false, true] {
            let mut host = Host::probed_on(threads, identity(LbaSize::B4096), 1, 8);
            host.handler.immediate.store(false, Relaxed);
            // Eight slots, one kept empty: room for seven completions, so seven
            // commands are fetched and the next seven stay in the SQ.
            for cid in 0..7 {
                host.place(1, read(cid, u64::from(cid), 1, DATA, 0));
            }
            host.ring_sq(1);
            let first = host.held();
            assert_eq!(first.len(), 7);
            for cid in 7..14 {
                host.place(1, read(cid, u64::from(cid), 1, DATA, 0));
            }
            host.ring_sq(1);
            assert!(host.held().is_empty(), "no room: nothing fetched");
            // Completing makes no room; only the host consuming does.
            for t in &first {
                host.ctrl.complete(*t, NvmeStatus::Success, 0);
            }
            assert!(host.held().is_empty());
            let (cids, heads) = cids_and_heads(&host.reap(1));
            assert_eq!(cids, (0..7).collect::<Vec<_>>());
            assert_eq!(heads, vec![7; 7], "the SQ head stopped at 7");
            // The head doorbell resumed the queue: the rest, in order.
            let second = host.held();
            assert_eq!(
                second.iter().map(|t| t.cid).collect::<Vec<_>>(),
                (7..14).collect::<Vec<_>>()
            );
            for t in &second {
                host.ctrl.complete(*t, NvmeStatus::Success, 0);
            }
            let (cids, heads) = cids_and_heads(&host.reap(1));
            assert_eq!(cids, (7..14).collect::<Vec<_>>());
            assert_eq!(heads, vec![6; 7], "14 entries on a ring of 8");
            assert_eq!(host.ctrl.counters().fatal.load(Relaxed), 0);
        }
    }

    /// Submission queues completing to one completion queue share its room;
    /// consuming completions resumes the one that stopped.
    #[test]
    fn queues_sharing_a_completion_queue_share_its_room() {
        for threads in [false, true] {
            let mut host = Host::new_on(threads, identity(LbaSize::B4096));
            host.enable();
            let c = host.admin(
                Sqe::new(admin_op::SET_FEATURES, 0)
                    .with_cdw(10, 7)
                    .with_cdw(11, 1 | 1 << 16),
            );
            assert_eq!(c.status(), Some(NvmeStatus::Success));
            host.track_cq(1, 8);
            let c = host.admin(
                Sqe::new(admin_op::CREATE_CQ, 0)
                    .with_prps(cq_base(1), 0)
                    .with_cdw(10, 7 << 16 | 1)
                    .with_cdw(11, 1 << 16 | 0b11),
            );
            assert_eq!(c.status(), Some(NvmeStatus::Success));
            for sqid in [1u16, 2] {
                let c = host.admin(
                    Sqe::new(admin_op::CREATE_SQ, 0)
                        .with_prps(sq_base(sqid), 0)
                        .with_cdw(10, 7 << 16 | u32::from(sqid))
                        .with_cdw(11, 1 << 16 | 1),
                );
                assert_eq!(c.status(), Some(NvmeStatus::Success));
                host.track_sq(sqid, 8);
            }
            for cid in 0..5 {
                host.place(1, read(cid, 0, 1, DATA, 0));
                host.place(2, read(10 + cid, 0, 1, DATA, 0));
            }
            host.ring_sq(1);
            host.ring_sq(2);
            assert_eq!(
                host.handler.take().len(),
                7,
                "five from SQ 1, two from SQ 2"
            );
            let got = host.reap(1);
            let from: Vec<(u16, u16)> = got.iter().map(|c| (c.sqid, c.cid)).collect();
            let want: Vec<(u16, u16)> = (0..5)
                .map(|cid| (1, cid))
                .chain([(2, 10), (2, 11)])
                .collect();
            assert_eq!(from, want);
            // Consumed: SQ 2 goes on where it stopped.
            assert_eq!(host.handler.take().len(), 3);
            let got = host.reap(1);
            let from: Vec<(u16, u16, u16)> =
                got.iter().map(|c| (c.sqid, c.cid, c.sq_head)).collect();
            assert_eq!(from, vec![(2, 12, 5), (2, 13, 5), (2, 14, 5)]);
        }
    }

    /// A host that rings the tail doorbell over and over and never consumes a
    /// completion, reusing command identifiers: the controller stops fetching
    /// once the completion queue has no room left for another completion, on
    /// the admin queue too, and whether the handler completes at once or holds
    /// the commands (then every command after the first four is a Command ID
    /// Conflict, whose completion needs room too).
    #[test]
    fn a_host_that_never_consumes_completions_is_no_longer_fetched_from() {
        for threads in [false, true] {
            for (qid, holding) in [(0u16, false), (1, false), (1, true)] {
                let what = format!("q={qid} holding={holding}");
                let mut host = Host::probed_on(threads, identity(LbaSize::B4096), 1, 8);
                host.handler.immediate.store(!holding, Relaxed);
                let entries = if qid == 0 { ADMIN_ENTRIES } else { 8 };
                let head = host.ctrl.lock().sq(qid).unwrap().head;
                // Fewer on threads: each submission waits for the thread.
                let times = if threads { 10_000 } else { 100_000u32 };
                for i in 0..times {
                    let cid = (i % 4) as u16;
                    let sqe = match qid {
                        0 => Sqe::new(admin_op::GET_FEATURES, cid).with_cdw(10, 7),
                        _ => read(cid, 0, 1, DATA, 0),
                    };
                    host.submit(qid, sqe);
                }
                {
                    let st = host.ctrl.lock();
                    let (sq, cq) = (st.sq(qid).unwrap(), st.cq(qid).unwrap());
                    let owed = usize::from(cq.posted()) + cq.waiting.len() + sq.in_flight.len();
                    assert_eq!(owed, usize::from(entries - 1), "{what}");
                    assert!(cq.waiting.len() < usize::from(entries), "{what}");
                    assert!(sq.in_flight.len() < usize::from(entries), "{what}");
                }
                let reached = host.handler.take().len();
                let want = match (qid, holding) {
                    (0, _) => 0,
                    (_, false) => 7,
                    (_, true) => 4,
                };
                assert_eq!(
                    reached, want,
                    "{what}: the handler got only what can complete"
                );
                // The host sees the SQ head stop where the room ran out.
                let got = host.reap(qid);
                let completions = entries - 1 - if holding { 4 } else { 0 };
                let conflicts = got
                    .iter()
                    .filter(|c| c.status() == Some(NvmeStatus::CommandIdConflict))
                    .count();
                assert_eq!(got.len(), usize::from(completions), "{what}");
                assert_eq!(conflicts, if holding { 3 } else { 0 }, "{what}");
                let last = (head + entries - 1) % entries;
                assert_eq!(got.last().unwrap().sq_head, last, "{what}");
                assert_eq!(host.csts() & csts::CFS, 0, "{what}");
            }
        }
    }

    #[test]
    fn deleting_a_queue_waits_for_its_commands_and_late_tags_go_stale() {
        for threads in [false, true] {
            let mut host = Host::probed_on(threads, identity(LbaSize::B4096), 1, 8);
            host.handler.immediate.store(false, Relaxed);
            host.submit(1, read(1, 0, 1, DATA, 0));
            let held = host.held();
            let cid = host.cid();
            host.submit(0, Sqe::new(admin_op::DELETE_SQ, cid).with_cdw(10, 1));
            assert!(host.reap(0).is_empty(), "waits for the read");
            // The queue being deleted fetches nothing.
            host.submit(1, read(2, 0, 1, DATA, 0));
            assert!(host.held().is_empty());
            host.ctrl.complete(held[0], NvmeStatus::Success, 0);
            assert_eq!(host.reap(1).len(), 1);
            let c = host.reap(0);
            assert_eq!((c[0].cid, c[0].status()), (cid, Some(NvmeStatus::Success)));
            // Gone: its CQ may go; a late tag does nothing.
            let c = host.admin(Sqe::new(admin_op::DELETE_CQ, 0).with_cdw(10, 1));
            assert_eq!(c.status(), Some(NvmeStatus::Success));
            host.forget(1);
            host.create_pair(1, 8);
            host.ctrl.complete(held[0], NvmeStatus::Success, 0);
            assert!(host.reap(1).is_empty());
            assert_eq!(host.ctrl.counters().stale_completions.load(Relaxed), 1);
        }
    }

    #[test]
    fn reset_voids_commands_in_flight() {
        for threads in [false, true] {
            let mut host = Host::probed_on(threads, identity(LbaSize::B4096), 2, 8);
            host.handler.immediate.store(false, Relaxed);
            host.submit(1, read(1, 0, 1, DATA, 0));
            host.submit(2, read(2, 0, 1, DATA, 0));
            let held = host.held();
            assert_eq!(held.len(), 2);
            host.ctrl.reset();
            assert_eq!(host.handler.resets.load(Relaxed), 1);
            assert_eq!(host.read32(reg::CC), 0);
            assert_eq!(host.read32(reg::AQA), 0);
            host.enable();
            host.create_pair(1, 8);
            for t in held {
                host.ctrl.complete(t, NvmeStatus::Success, 0);
            }
            assert!(host.reap(1).is_empty());
            assert_eq!(host.ctrl.counters().stale_completions.load(Relaxed), 2);
        }
    }

    /// On threads, the commands reach the handler on the queue's own thread,
    /// not the one that rang.
    #[test]
    fn io_queues_are_served_on_threads_of_their_own() {
        let mut host = Host::probed_on(true, identity(LbaSize::B4096), 2, 8);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let theirs = seen.clone();
        *host.handler.on_submit.lock().unwrap() = Some(Box::new(move |_, cmd| {
            let name = std::thread::current().name().map(str::to_owned);
            theirs.lock().unwrap().push((cmd.tag.qid, name));
        }));
        host.io(1, read(1, 0, 1, DATA, 0));
        host.io(2, read(2, 0, 1, DATA, 0));
        host.io(1, read(3, 0, 1, DATA, 0));
        let seen = seen.lock().unwrap().clone();
        let name = |n: &str| Some(n.to_owned());
        assert_eq!(
            seen,
            vec![
                (1, name("nvme-sq1")),
                (2, name("nvme-sq2")),
                (1, name("nvme-sq1"))
            ]
        );
        assert!(host.ctrl.on_threads());
    }

    /// A reset from the transport's thread while a queue's thread is handing
    /// over a batch: the handler gets the whole batch before it hears of the
    /// reset, and their completions are stale.
    #[test]
    fn a_reset_waits_for_the_queue_thread_to_hand_over_its_batch() {
        use std::sync::mpsc;
        use std::time::Duration;
        let mut host = Host::probed_on(true, identity(LbaSize::B4096), 1, 16);
        host.handler.immediate.store(false, Relaxed);
        let (entered, entries) = mpsc::channel();
        let (go, gone) = mpsc::channel::<()>();
        let gone = Mutex::new(gone);
        *host.handler.on_submit.lock().unwrap() = Some(Box::new(move |r, cmd| {
            entered.send((cmd.tag.cid, r.resets.load(Relaxed))).unwrap();
            gone.lock().unwrap().recv().unwrap();
        }));
        for cid in 0..3 {
            host.place(1, read(cid, 0, 1, DATA, 0));
        }
        host.driver.ring_sq(1).unwrap();
        let wait = Duration::from_secs(10);
        assert_eq!(entries.recv_timeout(wait), Ok((0, 0)));
        let ctrl = host.ctrl.clone();
        let reset = std::thread::spawn(move || ctrl.reset());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(host.handler.resets.load(Relaxed), 0, "waits for the batch");
        go.send(()).unwrap();
        for cid in 1..3 {
            assert_eq!(entries.recv_timeout(wait), Ok((cid, 0)), "before the reset");
            go.send(()).unwrap();
        }
        reset.join().unwrap();
        assert_eq!(host.handler.resets.load(Relaxed), 1);
        for t in host.held() {
            host.ctrl.complete(t, NvmeStatus::Success, 0);
        }
        assert_eq!(host.ctrl.counters().stale_completions.load(Relaxed), 3);
        // The thread serves the next incarnation of its queue.
        *host.handler.on_submit.lock().unwrap() = None;
        host.handler.immediate.store(true, Relaxed);
        host.enable();
        host.create_pair(1, 16);
        assert_eq!(
            host.io(1, read(9, 0, 1, DATA, 0)).status(),
            Some(NvmeStatus::Success)
        );
    }

    #[test]
    fn doorbell_mistakes_make_the_controller_fatal_until_reset() {
        type Mistake = fn(&mut Host);
        let mistakes: [(&str, Mistake); 5] = [
            ("SQ tail past the queue", |h| {
                h.write32(DOORBELLS + 8, 8);
            }),
            ("SQ tail of a queue never created", |h| {
                h.write32(DOORBELLS + 3 * 8, 1);
            }),
            ("CQ head of a queue never created", |h| {
                h.write32(DOORBELLS + 4 * 8 + 4, 0);
            }),
            ("a doorbell past the last queue", |h| {
                h.write32(BAR0_SIZE - 4, 1);
            }),
            ("CQ head past the tail", |h| {
                h.write32(DOORBELLS + 8 + 4, 3);
            }),
        ];
        for (what, mistake) in mistakes {
            let mut host = Host::probed(identity(LbaSize::B4096), 1, 8);
            mistake(&mut host);
            assert_eq!(host.csts() & csts::CFS, csts::CFS, "{what}");
            // Nothing runs while fatal.
            host.submit(1, read(1, 0, 1, DATA, 0));
            assert!(host.reap(1).is_empty(), "{what}");
            assert!(host.handler.take().is_empty(), "{what}");
            // A reset clears it.
            host.write32(reg::CC, 0);
            assert_eq!(host.csts(), 0, "{what}");
            host.enable();
            assert_eq!(
                host.admin(identify(1, 0)).status(),
                Some(NvmeStatus::Success)
            );
        }
    }

    #[test]
    fn the_sqe_address_going_away_is_fatal() {
        let host = Host::probed(identity(LbaSize::B4096), 1, 8);
        // Guest memory shrinks under the controller (a DMA unmap).
        host.mem.lock().unwrap().replace(
            GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)]).unwrap(),
        );
        host.ring_sq(0);
        host.write32(DOORBELLS, 1);
        assert_eq!(host.csts() & csts::CFS, csts::CFS);
    }

    #[test]
    fn odd_doorbell_writes_are_ignored() {
        let mut host = Host::probed(identity(LbaSize::B4096), 1, 8);
        host.place(1, read(1, 0, 1, DATA, 0));
        host.ctrl.bar0_write(DOORBELLS + 8, &[1, 0]);
        host.ctrl.bar0_write(DOORBELLS + 9, &[1, 0, 0, 0]);
        host.ctrl
            .bar0_write(DOORBELLS + 8, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(host.handler.take().is_empty());
        assert_eq!(host.csts() & csts::CFS, 0);
        assert_eq!(host.ctrl.counters().ignored_writes.load(Relaxed), 3);
        host.ring_sq(1);
        assert_eq!(host.reap(1).len(), 1);
        // Doorbells of a disabled controller do nothing either.
        host.write32(reg::CC, 0);
        host.write32(DOORBELLS, 1);
        assert_eq!(host.csts(), 0);
    }

    #[test]
    fn bad_enables_are_fatal() {
        type Setup = fn(&Host);
        let cases: [(&str, Setup); 6] = [
            ("ASQ not page-aligned", |h| h.write64(reg::ASQ, ASQ + 0x40)),
            ("ACQ not page-aligned", |h| h.write64(reg::ACQ, ACQ + 8)),
            ("ASQ outside memory", |h| h.write64(reg::ASQ, 1 << 40)),
            ("an admin queue of one entry", |h| h.write32(reg::AQA, 0)),
            ("8 KiB pages", |h| h.write32(reg::CC, 1 << 7)),
            ("another command set", |h| h.write32(reg::CC, 7 << 4)),
        ];
        for (what, setup) in cases {
            let host = Host::new(identity(LbaSize::B512));
            host.write32(reg::AQA, 31 | 31 << 16);
            host.write64(reg::ASQ, ASQ);
            host.write64(reg::ACQ, ACQ);
            setup(&host);
            host.write32(reg::CC, host.read32(reg::CC) | cc::EN);
            assert_eq!(host.csts(), csts::CFS, "{what}");
        }
        // No memory attached yet.
        let ctrl = Controller::new(identity(LbaSize::B512), Arc::new(Recorder::default()));
        ctrl.bar0_write(reg::AQA, &(31u32 | 31 << 16).to_le_bytes());
        ctrl.bar0_write(reg::CC, &1u32.to_le_bytes());
        let mut csts = [0u8; 4];
        ctrl.bar0_read(reg::CSTS, &mut csts);
        assert_eq!(u32::from_le_bytes(csts), csts::CFS);
    }

    #[test]
    fn cc_fields_other_than_shn_hold_while_enabled() {
        let mut host = Host::new(identity(LbaSize::B512));
        host.enable();
        let before = host.read32(reg::CC);
        host.write32(reg::CC, before & !(0xf << 16) | 7 << 16);
        assert_eq!(host.read32(reg::CC), before);
        assert_eq!(host.csts(), csts::RDY);
        assert_eq!(
            host.admin(identify(1, 0)).status(),
            Some(NvmeStatus::Success)
        );
    }

    #[test]
    fn registers_take_any_size_and_offset() {
        let host = Host::new(identity(LbaSize::B512));
        // Byte writes build AQA; a 64-bit write sets ASQ; reads of any shape
        // see the same bytes.
        host.ctrl.bar0_write(reg::AQA, &[0x1f]);
        host.ctrl.bar0_write(reg::AQA + 2, &[0x0f, 0]);
        assert_eq!(host.read32(reg::AQA), 0x000f_001f);
        host.ctrl
            .bar0_write(reg::ASQ, &0x1234_5678_9abc_d000u64.to_le_bytes());
        assert_eq!(host.read64(reg::ASQ), 0x1234_5678_9abc_d000);
        let mut odd = [0u8; 3];
        host.ctrl.bar0_read(reg::ASQ + 1, &mut odd);
        assert_eq!(odd, [0xd0, 0xbc, 0x9a]);
        // Read-only and reserved registers ignore writes; everything past
        // the registers reads zero.
        host.write32(reg::VS, 0);
        assert_eq!(host.read32(reg::VS), 0x0001_0400);
        host.write32(reg::CSTS, 0xffff_ffff);
        assert_eq!(host.csts(), 0);
        assert_eq!(host.read32(0x38), 0, "CMBLOC");
        assert_eq!(host.read32(DOORBELLS), 0);
        // INTMS sets and INTMC clears bits of the same mask.
        host.write32(reg::INTMS, 0b101);
        host.write32(reg::INTMC, 0b001);
        assert_eq!(host.read32(reg::INTMS), 0b100);
        // No panic anywhere, whatever the shape.
        let mut buf = [0u8; 64];
        for offset in [
            0,
            1,
            0x13,
            0x3f,
            0xffd,
            0xfff,
            0x1001,
            BAR0_SIZE - 1,
            BAR0_SIZE,
            u64::MAX - 3,
        ] {
            for len in [0, 1, 2, 3, 5, 8, 64] {
                host.ctrl.bar0_read(offset, &mut buf[..len]);
                host.ctrl.bar0_write(offset, &buf[..len]);
            }
        }
    }

    #[test]
    fn interrupts_only_for_queues_that_want_them() {
        for threads in [false, true] {
            let mut host = Host::probed_on(threads, identity(LbaSize::B4096), 2, 8);
            // Queue 2 was created with interrupts; delete it and make it polled.
            for op in [admin_op::DELETE_SQ, admin_op::DELETE_CQ] {
                let c = host.admin(Sqe::new(op, 0).with_cdw(10, 2));
                assert_eq!(c.status(), Some(NvmeStatus::Success));
            }
            host.forget(2);
            host.track_cq(2, 8);
            let c = host.admin(
                Sqe::new(admin_op::CREATE_CQ, 0)
                    .with_prps(cq_base(2), 0)
                    .with_cdw(10, 7 << 16 | 2)
                    .with_cdw(11, 1),
            );
            assert_eq!(c.status(), Some(NvmeStatus::Success));
            let c = host.admin(
                Sqe::new(admin_op::CREATE_SQ, 0)
                    .with_prps(sq_base(2), 0)
                    .with_cdw(10, 7 << 16 | 2)
                    .with_cdw(11, 2 << 16 | 1),
            );
            assert_eq!(c.status(), Some(NvmeStatus::Success));
            host.track_sq(2, 8);
            host.irqs.take();
            assert_eq!(
                host.io(2, read(1, 0, 1, DATA, 0)).status(),
                Some(NvmeStatus::Success)
            );
            assert!(host.irqs.take().is_empty(), "polled queue");
            assert_eq!(
                host.io(1, read(2, 0, 1, DATA, 0)).status(),
                Some(NvmeStatus::Success)
            );
            assert_eq!(host.irqs.take(), vec![1]);
        }
    }

    #[test]
    fn completions_come_from_any_thread() {
        for threads in [false, true] {
            fn shared<T: Send + Sync>() {}
            shared::<Controller>();
            let mut host = Host::probed_on(threads, identity(LbaSize::B4096), 1, 64);
            host.handler.immediate.store(false, Relaxed);
            for cid in 0..32 {
                host.place(1, read(cid, 0, 1, DATA, 0));
            }
            host.ring_sq(1);
            let tags = host.held();
            let threads: Vec<_> = tags
                .chunks(8)
                .map(|chunk| {
                    let ctrl = host.ctrl.clone();
                    let chunk = chunk.to_vec();
                    std::thread::spawn(move || {
                        for t in chunk {
                            ctrl.complete(t, NvmeStatus::Success, 0);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let mut cids: Vec<u16> = host.reap(1).iter().map(|c| c.cid).collect();
            cids.sort_unstable();
            assert_eq!(cids, (0..32).collect::<Vec<_>>());
        }
    }
}
