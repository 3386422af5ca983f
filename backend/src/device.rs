//! The vhost-user-blk device: the `VhostUserBackend` implementation, the queue
//! loop that pops chains and serves them, and the jobs that the DMA engine's
//! scheduler runs for requests that wait.
//!
//! A chain's life: parse ([`crate::request`]) → prepare
//! ([`execute::prepare`]) → the engine's arrival → now, or parked in the
//! scheduler until its delay passes or it is released → perform
//! ([`execute::perform`]) → status byte, used ring, notification → the
//! engine's completion (and maybe a watch, parked in turn).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dma::fault::Effect;
use dma::schedule::{FollowUp, ParkedInfo, Release};
use dma::{Engine, Scheduler, Ticket, Wait, WatchTask};
use log::{debug, warn};
use nvme_model::geometry::PAGE;
use nvme_model::{Latency, MediaOp, Namespace, NamespaceError};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk::{
    self, BlkConfig, RequestType, Status, CONFIG_WRITEBACK_OFFSET, ID_BYTES, SIZE_MAX,
};
use crate::counters::{bump, Counters};
use crate::execute::{self, ExecContext, ExecError, Prepared, Work};
use crate::iopool::IoPool;
use crate::mailbox::{ControlFn, Mailbox};
use crate::request::{self, Limits, Rejected, Request};

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Vring = VringRwLock<Mem>;

/// Reads of at least this many bytes are served by the I/O pool, off their
/// queue's thread.
const POOL_READ_BYTES: u64 = 64 << 10;
/// The most threads in the I/O pool.
const POOL_THREADS: usize = 4;

/// The device's fixed shape, from the configuration.
#[derive(Debug, Clone)]
pub struct DeviceShape {
    pub queues: u16,
    pub queue_size: u16,
    pub serial: String,
}

/// What the queue workers and the scheduler's thread share.
#[derive(Debug)]
struct Core {
    ns: Arc<Namespace>,
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    serial: [u8; ID_BYTES],
    writeback: AtomicBool,
    event_idx: AtomicBool,
    mem: RwLock<Option<Mem>>,
    mailbox: Option<Mailbox>,
    /// The media latency model; `None` when instant (nothing to add).
    latency: Option<Arc<Latency>>,
}

/// A request waiting in the scheduler, with what it needs to finish.
struct Pending {
    /// Already completed to the guest (the `complete-before-dma` mutant): only
    /// the data is left to move.
    completed_early: bool,
    q: u16,
    head: u16,
    req: Request,
    work: Work,
    /// The power epoch it arrived in.
    epoch: u64,
    ticket: Ticket,
    vring: Vring,
    /// Held, with the media's time still to come: it counts from the release.
    media_due: bool,
}

/// What the scheduler runs.
enum Job {
    Io(Box<Pending>),
    Watch(WatchTask),
}

/// One vhost-user-blk device, serving one frontend connection. The namespace,
/// engine and counters outlive it and are handed to the device for the next one.
#[derive(Debug)]
pub struct BlkDevice {
    core: Arc<Core>,
    shape: DeviceShape,
    scheduler: Mutex<Option<Scheduler<Job>>>,
    /// One exit event per worker thread (one thread per queue).
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// Serves large reads off the queues' threads; none when the queues'
    /// threads have a CPU each already.
    pool: Option<IoPool>,
    /// Held by a queue's thread from popping a chain until it is completed or
    /// handed on (parked, pooled): stopping the queue waits for it.
    serving: Vec<Mutex<()>>,
    /// Set while a queue has not signalled the guest since it was started.
    /// A daemon that died (or a queue stopped) may have put completions in
    /// the used ring without the interrupt reaching the guest, and with
    /// EVENT_IDX the next completion may not ask for one: the first pass
    /// over a started queue signals the guest whatever the ring says.
    unsignalled: Vec<AtomicBool>,
}

impl BlkDevice {
    /// A device over `ns`; with `control`, the last MiB of the disk is the guest
    /// mailbox, whose commands `control` answers; with `latency`, requests
    /// complete when the media model says.
    pub fn new(
        ns: Arc<Namespace>,
        engine: Arc<Engine>,
        counters: Arc<Counters>,
        shape: DeviceShape,
        control: Option<ControlFn>,
        latency: Option<Arc<Latency>>,
    ) -> io::Result<Self> {
        let mut serial = [0u8; ID_BYTES];
        let n = shape.serial.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&shape.serial.as_bytes()[..n]);
        let exits = (0..shape.queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        let block = usize::try_from(ns.lba_size().bytes()).unwrap_or(512);
        let mailbox = control.and_then(|c| Mailbox::new(ns.capacity_bytes(), block, c));
        let core = Arc::new(Core {
            mailbox,
            ns,
            engine,
            counters,
            serial,
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            latency,
        });
        let job_core = core.clone();
        let scheduler = Scheduler::new("dma-scheduler", move |job| job_core.run_job(job))?;
        // The pool uses the CPUs the queues' threads leave idle.
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let spare = cpus
            .saturating_sub(usize::from(shape.queues))
            .min(POOL_THREADS);
        let pool = if spare > 0 {
            Some(IoPool::new(spare)?)
        } else {
            None
        };
        let serving = (0..shape.queues).map(|_| Mutex::new(())).collect();
        let unsignalled = (0..shape.queues).map(|_| AtomicBool::new(true)).collect();
        Ok(BlkDevice {
            core,
            shape,
            scheduler: Mutex::new(Some(scheduler)),
            exits,
            pool,
            serving,
            unsignalled,
        })
    }

    /// Tells every worker thread to stop and abandons what is still parked: the
    /// frontend has gone, so nothing can complete.
    pub fn shut_down(&self) {
        for (_, notifier) in &self.exits {
            let _ = notifier.notify();
        }
        for job in self.take_waiting() {
            if let Job::Io(p) = job {
                self.core.engine.complete(p.ticket, "abandoned");
            }
        }
    }

    /// The daemon is stopping with this frontend still connected: every
    /// request still waiting (delayed or held) fails with IOERR now, so the
    /// guest is told rather than left waiting for a device that is gone.
    /// Returns how many were failed.
    pub fn fail_waiting(&self) -> usize {
        let mem = self.core.mem();
        let mut failed = 0;
        for job in self.take_waiting() {
            let Job::Io(p) = job else { continue };
            let Pending {
                completed_early,
                q,
                head,
                req,
                ticket,
                vring,
                ..
            } = *p;
            match &mem {
                // Completed already (the complete-before-dma mutant): nothing to tell.
                Some(_) if completed_early => {
                    self.core.engine.complete(ticket, "abandoned");
                }
                Some(atomic) => {
                    let len =
                        self.core
                            .finish(q, &atomic.memory(), Some(req.status), Status::IoErr, 0);
                    self.core.add_used(q, &vring, head, len);
                    self.core.signal(q, &vring);
                    self.core.engine.complete(ticket, "failed-at-stop");
                    failed += 1;
                }
                None => {
                    self.core.engine.complete(ticket, "abandoned");
                }
            }
        }
        failed
    }

    /// Stops the scheduler and takes every job it still held.
    fn take_waiting(&self) -> Vec<Job> {
        self.scheduler
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .map(|mut s| s.shutdown())
            .unwrap_or_default()
    }

    /// Releases held requests; returns how many.
    pub fn release(&self, which: Release) -> usize {
        self.with_scheduler(|s| s.release(which)).unwrap_or(0)
    }

    /// Releases the held requests that `pick` chooses; returns how many.
    pub fn release_where(&self, pick: impl Fn(&ParkedInfo) -> bool) -> usize {
        self.with_scheduler(|s| s.release_where(pick)).unwrap_or(0)
    }

    /// Requests waiting for their delay or for a release (not the watches
    /// parked after completion).
    pub fn parked(&self) -> Vec<ParkedInfo> {
        let mut all = self.with_scheduler(Scheduler::parked).unwrap_or_default();
        all.retain(|p| !p.watch);
        all
    }

    fn with_scheduler<T>(&self, f: impl FnOnce(&Scheduler<Job>) -> T) -> Option<T> {
        self.scheduler.lock().ok()?.as_ref().map(f)
    }

    fn park(&self, (info, wait, job): FollowUp<Job>) {
        // Without a scheduler (shut down) the job is dropped with its connection.
        self.with_scheduler(|s| s.park(info, wait, job));
    }

    /// What the guest may send: with a maximum transfer, segments of a page
    /// and as many as make it (so no request can be larger); otherwise as many
    /// as the queue holds besides header and status, each up to `SIZE_MAX`.
    fn limits(&self) -> Limits {
        let descriptors = u32::from(self.shape.queue_size).saturating_sub(2).max(1);
        match self.core.ns.geometry().max_transfer {
            Some(max) => Limits {
                seg_max: u32::try_from(max / PAGE)
                    .unwrap_or(u32::MAX)
                    .min(descriptors),
                size_max: PAGE as u32,
            },
            None => Limits {
                seg_max: descriptors,
                size_max: SIZE_MAX,
            },
        }
    }

    fn config(&self) -> BlkConfig {
        BlkConfig {
            capacity_sectors: self.core.ns.capacity_bytes() >> blk::SECTOR_SHIFT,
            lbs: self.core.ns.lba_size(),
            size_max: self.limits().size_max,
            seg_max: self.limits().seg_max,
            geometry: *self.core.ns.geometry(),
            num_queues: self.shape.queues,
            writeback: self.core.writeback.load(Ordering::Relaxed),
        }
    }

    /// Serves every available chain of one queue, then tells the guest.
    fn process_queue(&self, q: u16, vring: &Vring) {
        let Some(atomic) = self.core.mem() else {
            return;
        };
        let mem = atomic.memory();
        let event_idx = self.core.event_idx.load(Ordering::Relaxed);
        let mut buf = Vec::new();
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    self.core
                        .guest_error(q, format_args!("cannot disable notifications: {e}"));
                }
            }
            let mut used = 0usize;
            let mut popped = 0usize;
            loop {
                let _serving = self.serving.get(usize::from(q)).map(Mutex::lock);
                let Some(chain) = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone())
                else {
                    break;
                };
                popped += 1;
                let head = chain.head_index();
                if let Some(len) = self.serve_chain(q, vring, &mem, head, chain, &mut buf) {
                    self.core.add_used(q, vring, head, len);
                    used += 1;
                }
            }
            if used > 0 {
                self.core.signal(q, vring);
            }
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                // More is available, but if nothing could be popped this round the
                // ring is unusable (a stopped queue, or an avail index the guest
                // broke): wait for the next kick rather than spin.
                Ok(true) if popped > 0 => continue,
                Ok(true) => {
                    self.core.guest_error(
                        q,
                        format_args!("avail ring says more but no chain can be popped"),
                    );
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    self.core
                        .guest_error(q, format_args!("cannot enable notifications: {e}"));
                    break;
                }
            }
        }
        // The first pass since the queue started: whatever the used ring
        // holds, the guest hears of it.
        let first = self
            .unsignalled
            .get(usize::from(q))
            .is_some_and(|f| f.swap(false, Ordering::Relaxed));
        if first {
            if let Err(e) = vring.signal_used_queue() {
                warn!("q={q} cannot signal the guest: {e}");
            }
        }
    }

    /// Parses and serves one chain. Returns the used length to report now, or
    /// `None` when the request waits in the scheduler and completes later.
    fn serve_chain<C>(
        &self,
        q: u16,
        vring: &Vring,
        mem: &GuestMemoryMmap<()>,
        head: u16,
        chain: C,
        buf: &mut Vec<u8>,
    ) -> Option<u32>
    where
        C: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let core = &self.core;
        bump(&core.counters.requests);
        let req = match request::parse(mem, chain, self.limits()) {
            Ok(req) => req,
            Err(rejected) => {
                core.count_rejected(q, &rejected);
                return Some(core.finish(q, mem, rejected.status_at, rejected.reason.status(), 0));
            }
        };
        debug!(
            "q={q} op={} sector={} len={}",
            req.op.name(),
            req.sector,
            req.data_len
        );
        let prepared = match execute::prepare(&core.ns, mem, q, &req, buf) {
            Ok(p) => p,
            Err(e) => {
                let status = core.count_exec_error(q, &req, &e);
                return Some(core.finish(q, mem, Some(req.status), status, 0));
            }
        };
        if let Some(mb) = &core.mailbox {
            if let Some((status, written)) = mailbox_io(mb, mem, &req, &prepared, &core.counters) {
                return Some(core.finish(q, mem, Some(req.status), status, written));
            }
        }
        let Prepared {
            work,
            arrival,
            epoch,
        } = prepared;
        let mut ticket = core.engine.arrive(mem, arrival);
        let mut wait = ticket.wait;
        let mut used = None;
        let mut media_due = false;
        if !matches!(ticket.effect, Some(Effect::CompleteBeforeDma { .. })) {
            (wait, media_due) = core.with_media_time(&work, wait);
        }
        if let Some(Effect::CompleteBeforeDma { ms }) = ticket.effect {
            // A broken device on purpose: the guest hears "done" now, the data moves later.
            let written = if req.op.device_writes_data() {
                req.data_len
            } else {
                0
            };
            used = Some(core.finish(q, mem, Some(req.status), Status::Ok, written));
            wait = Wait::Delay(Duration::from_millis(ms));
            ticket.wait = wait;
        } else if wait == Wait::None {
            // A large read that only moves data goes to the pool if a thread
            // there is free (the queue's thread goes on popping), else it is
            // served here all the same.
            let pooled = match (&self.pool, &work) {
                (Some(pool), Work::Read(range))
                    if range.len() >= POOL_READ_BYTES
                        && !core.engine.read_needs_buffer(&ticket) =>
                {
                    core.mem().map(|atomic| (pool, atomic))
                }
                _ => None,
            };
            if let Some((pool, atomic)) = pooled {
                let core = core.clone();
                let vring = vring.clone();
                let task: crate::iopool::Task = Box::new(move || {
                    let mem = atomic.memory();
                    let mut buf = Vec::new();
                    // No watch follows: a watched read keeps its buffer, never pooled.
                    let (len, _) =
                        core.perform_and_finish(&mem, &req, &work, epoch, ticket, &mut buf);
                    core.add_used(q, &vring, head, len);
                    core.signal(q, &vring);
                });
                if let Err(task) = pool.submit(q, task) {
                    task();
                }
                return None;
            }
            let (len, watch) = core.perform_and_finish(mem, &req, &work, epoch, ticket, buf);
            if let Some(w) = watch {
                self.park(watch_job(w));
            }
            return Some(len);
        }
        let info = parked_info(&ticket);
        debug!("q={q} req={} waits: {wait}", ticket.id);
        self.park((
            info,
            wait,
            Job::Io(Box::new(Pending {
                completed_early: used.is_some(),
                q,
                head,
                req,
                work,
                epoch,
                ticket,
                vring: vring.clone(),
                media_due,
            })),
        ));
        used
    }
}

/// Serves a request that touches the mailbox (status and data bytes written),
/// or `None` for one that does not.
fn mailbox_io(
    mb: &Mailbox,
    mem: &GuestMemoryMmap<()>,
    req: &Request,
    prepared: &Prepared,
    counters: &Counters,
) -> Option<(Status, u32)> {
    let ranges = prepared.work.media_ranges();
    let &(offset, _) = ranges.iter().find(|(o, l)| mb.touches(*o, *l))?;
    Some(match req.op {
        RequestType::In => {
            let status = mb.read(mem, offset, &req.data);
            let written = if status == Status::Ok {
                req.data_len
            } else {
                0
            };
            (status, written)
        }
        RequestType::Out => (mb.write(mem, offset, &req.data, counters), 0),
        _ => {
            bump(&counters.mailbox_refused);
            (Status::IoErr, 0)
        }
    })
}

fn parked_info(t: &Ticket) -> ParkedInfo {
    ParkedInfo {
        request: t.id,
        queue: t.arrival.queue,
        op: t.arrival.op,
        lba: t.arrival.lba,
        len: t.arrival.len,
        held: false,
        tag: t.tag().map(str::to_owned),
        segments: t.arrival.segments.clone(),
        watch: false,
        waited_ms: 0,
        since: None,
    }
}

/// What the media latency model sees of a request: its kind and the bytes it
/// moves. GET_ID is answered by the controller, not the media.
fn media_op(work: &Work) -> Option<(MediaOp, u64)> {
    match work {
        Work::Read(r) => Some((MediaOp::Read, r.len())),
        Work::Write(r) => Some((MediaOp::Write, r.len())),
        Work::Flush => Some((MediaOp::Flush, 0)),
        Work::Zero(ranges) => Some((MediaOp::Discard, ranges.iter().map(|(r, _)| r.len()).sum())),
        Work::GetId(_) => None,
    }
}

fn watch_job(w: WatchTask) -> FollowUp<Job> {
    let info = ParkedInfo {
        request: w.id,
        queue: u16::MAX,
        op: dma::Op::Read,
        lba: 0,
        len: 0,
        held: false,
        tag: None,
        segments: Vec::new(),
        watch: true,
        waited_ms: 0,
        since: None,
    };
    let due = w.due;
    (info, Wait::Delay(due), Job::Watch(w))
}

impl Core {
    fn mem(&self) -> Option<Mem> {
        self.mem.read().ok().and_then(|m| m.clone())
    }

    /// A request's wait with the media's time added (`--latency`), and whether
    /// media time is still due after it. No wait becomes the media time; a
    /// delay grows by it (the media sees the request when the delay ends); a
    /// hold stays a hold, and the media time counts from its release.
    fn with_media_time(&self, work: &Work, wait: Wait) -> (Wait, bool) {
        let (Some(latency), Some((op, bytes))) = (&self.latency, media_op(work)) else {
            return (wait, false);
        };
        let (before, at) = match wait {
            Wait::Hold => return (Wait::Hold, true),
            Wait::None => (Duration::ZERO, Instant::now()),
            Wait::Delay(d) => (d, Instant::now() + d),
        };
        let media = latency.delay(op, bytes, at);
        if media.is_zero() {
            return (wait, false);
        }
        bump(&self.counters.latency_delayed);
        (Wait::Delay(before + media), false)
    }

    /// Runs a job of the scheduler's: a request whose wait is over, or a watch.
    fn run_job(&self, job: Job) -> Option<FollowUp<Job>> {
        let Some(atomic) = self.mem() else {
            if let Job::Io(p) = job {
                self.engine.complete(p.ticket, "abandoned");
            }
            return None;
        };
        let mem = atomic.memory();
        match job {
            Job::Watch(w) => {
                self.engine.watch(&*mem, &w);
                None
            }
            Job::Io(mut p) => {
                if p.media_due {
                    // A released hold: now the media serves it.
                    p.media_due = false;
                    if let (wait @ Wait::Delay(_), _) = self.with_media_time(&p.work, Wait::None) {
                        return Some((parked_info(&p.ticket), wait, Job::Io(p)));
                    }
                }
                let Pending {
                    completed_early,
                    q,
                    head,
                    req,
                    work,
                    epoch,
                    mut ticket,
                    vring,
                    media_due: _,
                } = *p;
                let mut buf = Vec::new();
                if completed_early {
                    let ctx = self.exec_context();
                    let done = execute::perform(&ctx, &*mem, &work, epoch, &mut ticket, &mut buf);
                    let outcome = if done.is_ok() {
                        "ok-before-dma"
                    } else {
                        "failed-after-completion"
                    };
                    return self.engine.complete(ticket, outcome).map(watch_job);
                }
                let (len, watch) =
                    self.perform_and_finish(&mem, &req, &work, epoch, ticket, &mut buf);
                self.add_used(q, &vring, head, len);
                self.signal(q, &vring);
                watch.map(watch_job)
            }
        }
    }

    /// Moves a request's data, writes its status and tells the engine it is done.
    fn perform_and_finish(
        &self,
        mem: &GuestMemoryMmap<()>,
        req: &Request,
        work: &Work,
        epoch: u64,
        mut ticket: Ticket,
        buf: &mut Vec<u8>,
    ) -> (u32, Option<WatchTask>) {
        let q = ticket.arrival.queue;
        let ctx = self.exec_context();
        let (status, written, why) =
            match execute::perform(&ctx, mem, work, epoch, &mut ticket, buf) {
                Ok(written) => (Status::Ok, written, None),
                Err(e) => (self.count_exec_error(q, req, &e), 0, e.outcome()),
            };
        let len = self.finish(q, mem, Some(req.status), status, written);
        let outcome = if len == 0 {
            "no-status"
        } else {
            why.unwrap_or_else(|| status_name(status))
        };
        (len, self.engine.complete(ticket, outcome))
    }

    fn exec_context(&self) -> ExecContext<'_> {
        ExecContext {
            ns: &self.ns,
            engine: &self.engine,
            serial: &self.serial,
            writeback: self.writeback.load(Ordering::Relaxed),
        }
    }

    /// Writes the status byte; returns the used length to report.
    fn finish(
        &self,
        q: u16,
        mem: &GuestMemoryMmap<()>,
        status_at: Option<dma::Gpa>,
        status: Status,
        written: u32,
    ) -> u32 {
        let Some(at) = status_at else {
            bump(&self.counters.no_status);
            return 0;
        };
        if let Err(e) = mem.write_obj(status as u8, at.into()) {
            self.guest_error(q, format_args!("cannot write the status byte at {at}: {e}"));
            bump(&self.counters.no_status);
            return 0;
        }
        match status {
            Status::Ok => bump(&self.counters.completed_ok),
            Status::IoErr => bump(&self.counters.ioerr),
            Status::Unsupp => bump(&self.counters.unsupp),
        }
        written.saturating_add(1)
    }

    fn add_used(&self, q: u16, vring: &Vring, head: u16, len: u32) {
        if let Err(e) = vring.add_used(head, len) {
            self.guest_error(q, format_args!("cannot add used entry {head}: {e}"));
        }
    }

    fn signal(&self, q: u16, vring: &Vring) {
        let needed =
            !self.event_idx.load(Ordering::Relaxed) || vring.needs_notification().unwrap_or(true);
        if needed {
            if let Err(e) = vring.signal_used_queue() {
                warn!("q={q} cannot signal the guest: {e}");
            }
        }
    }

    fn count_rejected(&self, q: u16, r: &Rejected) {
        self.counters.count_malformed(r.reason);
        let op = r.op.map_or("?", |op| op.name());
        self.guest_error(q, format_args!("op={op} refused: {}", r.reason));
    }

    /// Counts and logs a failed request; returns the status the guest gets.
    fn count_exec_error(&self, q: u16, req: &Request, e: &ExecError) -> Status {
        let status = match e {
            ExecError::Malformed(m) => {
                self.counters.count_malformed(*m);
                m.status()
            }
            ExecError::Media(NamespaceError::UnrecoveredRead { .. }) => {
                // A bad block the test put there: counted, not logged.
                bump(&self.counters.unrecovered_reads);
                return Status::IoErr;
            }
            ExecError::Media(NamespaceError::WriteFault { .. }) => {
                bump(&self.counters.write_faults);
                return Status::IoErr;
            }
            ExecError::CutOff => {
                bump(&self.counters.cut_off);
                return Status::IoErr;
            }
            ExecError::Media(_) => {
                bump(&self.counters.media_errors);
                Status::IoErr
            }
            ExecError::Memory(_) => {
                self.counters
                    .count_malformed(request::Malformed::OutsideMemory);
                Status::IoErr
            }
            ExecError::Injected(_, status) => {
                bump(&self.counters.injected);
                // An injected fault is the test's doing: no warning for it.
                return *status;
            }
        };
        let cause = std::error::Error::source(e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        self.guest_error(
            q,
            format_args!(
                "op={} sector={} len={} failed: {e}{cause}",
                req.op.name(),
                req.sector,
                req.data_len
            ),
        );
        status
    }

    /// A log line for something the guest did; rate-limited.
    fn guest_error(&self, q: u16, msg: std::fmt::Arguments<'_>) {
        if self.counters.may_log() {
            warn!("q={q} {msg}");
        }
    }
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::IoErr => "ioerr",
        Status::Unsupp => "unsupp",
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.shape.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shape.queue_size)
    }

    fn features(&self) -> u64 {
        blk::device_features(self.core.ns.read_only())
    }

    fn acked_features(&self, features: u64) {
        debug!("features acked: {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.core.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        match (offset, buf) {
            (CONFIG_WRITEBACK_OFFSET, &[wce]) => {
                self.core.writeback.store(wce != 0, Ordering::Relaxed);
                // Write-through: the drive's cache is off, what it held made stable.
                if let Err(e) = self.core.ns.set_write_cache(wce != 0) {
                    warn!("cannot flush the write cache on switching to writethrough: {e}");
                }
                log::info!(
                    "cache mode: {}",
                    if wce != 0 {
                        "writeback"
                    } else {
                        "writethrough"
                    }
                );
            }
            _ => debug!("ignored config write at {offset} of {} bytes", buf.len()),
        }
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        let mut slot = self
            .core
            .mem
            .write()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?;
        *slot = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shape.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exits.get(thread_index)?;
        Some((consumer.try_clone().ok()?, notifier.try_clone().ok()?))
    }

    /// GET_VRING_BASE: every request of this queue still waiting completes now
    /// (its data moves, its status is written), before the frontend reads the
    /// ring's state; a job the scheduler is running finishes first.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Ok(q) = u16::try_from(queue_index) else {
            return Ok(());
        };
        // The ring is no longer ready, so nothing more is popped; the chain
        // being served finishes or is handed on, and the reads in the pool
        // complete, before the frontend reads the ring.
        drop(self.serving.get(usize::from(q)).map(Mutex::lock));
        if let Some(flag) = self.unsignalled.get(usize::from(q)) {
            flag.store(true, Ordering::Relaxed);
        }
        if let Some(pool) = &self.pool {
            pool.wait_idle(q);
        }
        let jobs = self
            .with_scheduler(|s| s.drain_queue(q))
            .unwrap_or_default();
        if !jobs.is_empty() {
            debug!(
                "q={q} stopping: completing {} waiting request(s) now",
                jobs.len()
            );
        }
        for mut job in jobs {
            // Stopping: what was held completes now, without its media time.
            if let Job::Io(p) = &mut job {
                p.media_due = false;
            }
            if let Some(next) = self.core.run_job(job) {
                self.park(next);
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Returning an error would end this worker's loop: nothing a guest does may.
        let q = u16::try_from(thread_id).unwrap_or(u16::MAX);
        if evset != EventSet::IN {
            debug!("q={q} unexpected event set {evset:?}");
            return Ok(());
        }
        // One queue per worker thread: the thread's only vring is its queue.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(q, vring),
            None => debug!("q={q} unknown event {device_event}"),
        }
        Ok(())
    }
}
