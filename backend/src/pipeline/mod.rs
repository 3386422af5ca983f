//! The life of a request once its interface has decoded and prepared it, the
//! same whichever interface the guest talks to (virtio-blk or NVMe): the
//! guest mailbox, the engine's arrival, the wait (a delay, a hold, the
//! media's time) in the scheduler, the I/O pool for large reads and long
//! zero-fills, the data's move ([`work::perform`]), and the reply through
//! the interface's [`Reply`]: a status byte and a used ring entry, or a
//! completion queue entry.
//!
//! An interface calls [`Pipeline::submit`]. What completes at once comes back
//! as an [`Outcome`] for the interface to tell the guest itself (so a queue's
//! thread can batch its notifications); what waits or goes to the pool takes a
//! [`Reply`] along and tells the guest when it is done.
//!
//! The pipeline speaks its own words ([`outcome`]): a request is refused
//! ([`Refusal`]) or fails ([`Failure`]) in no interface's terms, and each
//! interface maps them to its own statuses at its edge.
//!
//! - [`work`]: what a prepared request is ([`Prepared`], [`Work`]), the checks every interface's preparation shares,
//!   and [`perform`](work::perform), which moves the data.
//! - [`outcome`]: how a request ends.
//! - [`mailbox`]: the guest's control commands in the disk's last MiB.
//! - [`iopool`]: the threads that serve large reads and long zero-fills off
//!   their queue's thread.
//! - this file: [`Pipeline`], the scheduler's jobs, the pool's hand-off.

pub mod iopool;
pub mod mailbox;
pub mod outcome;
pub mod work;

use std::io;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dma::fault::Effect;
use dma::schedule::{FollowUp, ParkedInfo, Release};
use dma::{Engine, Scheduler, Ticket, Wait, WatchTask};
use log::{debug, warn};
use nvme_model::{Latency, MediaOp, Namespace, NamespaceError};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use iopool::{Handover, IoPool, Task};
use mailbox::Mailbox;
use work::{Prepared, Work, WorkError};

use crate::control::protocol::ControlFn;
use crate::counters::{bump, Counters};
use crate::GuestMemory;

pub use outcome::{Failure, InjectedError, Outcome, Refusal};

/// Reads of at least this many bytes are served by the I/O pool, off their
/// queue's thread.
const POOL_READ_BYTES: u64 = 64 << 10;
/// Discards and write-zeroes of at least this many bytes are too: where the
/// backing cannot punch a hole, every zero is written (up to the 2 GiB a
/// command may ask for by default).
const POOL_ZERO_BYTES: u64 = 1 << 20;
/// The most threads in the I/O pool.
const POOL_THREADS: usize = 4;

/// Where the outcome of a request that waited goes: the interface's way of
/// telling the guest.
pub trait Reply: Send {
    /// Tells the guest; returns the word the ledger records for it ("ok",
    /// "ioerr", "no-status" when the guest could not be told, ...).
    fn send(
        self: Box<Self>,
        core: &Core,
        mem: &GuestMemoryMmap<()>,
        outcome: Outcome,
    ) -> &'static str;
}

/// A request as the log names it.
#[derive(Clone, Copy, Debug)]
pub struct Label {
    pub op: &'static str,
    pub sector: u64,
    pub len: u32,
}

/// What a submitted request became.
// `Now` carries the ticket by value: it is the common case, and a box would
// cost every request an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Submitted {
    /// Over already: the interface tells the guest, then hands the
    /// [`Finish`] back to [`Pipeline::finish`].
    Now(Outcome, Finish),
    /// Waiting or in the pool: its [`Reply`] tells the guest later.
    Later,
}

/// A request served at once, to be recorded once the guest has been told.
#[derive(Debug)]
#[must_use]
pub struct Finish {
    /// `None` for what never reached the engine (the mailbox) or is still
    /// moving (the complete-before-dma mutant).
    ticket: Option<Ticket>,
    /// The ledger's word for a failure that says more than its status.
    why: Option<&'static str>,
}

impl Finish {
    fn none() -> Self {
        Finish {
            ticket: None,
            why: None,
        }
    }
}

/// The ledger's word for a request: the interface's (`told`), unless the
/// guest was told a failure the engine knows more of; "no-status" always wins.
fn ledger_word(why: Option<&'static str>, told: &'static str) -> &'static str {
    match why {
        Some(why) if told != "no-status" => why,
        _ => told,
    }
}

/// What the interfaces, the scheduler's thread and the pool share.
#[derive(Debug)]
pub struct Core {
    pub ns: Arc<Namespace>,
    pub engine: Arc<Engine>,
    pub counters: Arc<Counters>,
    mem: RwLock<Option<GuestMemory>>,
    mailbox: Option<Mailbox>,
    /// The media latency model; `None` when instant (nothing to add).
    latency: Option<Arc<Latency>>,
}

/// A request waiting in the scheduler, with what it needs to finish.
struct Pending {
    label: Label,
    work: Work,
    /// The power epoch it arrived in.
    epoch: u64,
    ticket: Ticket,
    /// `None` when it was completed to the guest already (the
    /// `complete-before-dma` mutant): only the data is left to move.
    reply: Option<Box<dyn Reply>>,
    /// Held, with the media's time still to come: it counts from the release.
    media_due: bool,
}

/// What the scheduler runs.
enum Job {
    Io(Box<Pending>),
    Watch(WatchTask),
}

/// The request pipeline of one frontend's connection: the namespace, engine
/// and counters outlive it.
#[derive(Debug)]
pub struct Pipeline {
    core: Arc<Core>,
    scheduler: Mutex<Option<Scheduler<Job>>>,
    /// Serves long zero-fills, and large reads when `pool_reads`, off the
    /// queues' threads.
    pool: IoPool,
    /// Whether large reads go to the pool: only when the queues' threads
    /// leave a CPU idle for it.
    pool_reads: bool,
}

impl Pipeline {
    /// A pipeline for an interface of `queues` queues over `ns`; with
    /// `control`, the last MiB of the disk is the guest mailbox, whose
    /// commands `control` answers; with `latency`, requests complete when the
    /// media model says.
    pub fn new(
        ns: Arc<Namespace>,
        engine: Arc<Engine>,
        counters: Arc<Counters>,
        queues: u16,
        control: Option<ControlFn>,
        latency: Option<Arc<Latency>>,
    ) -> io::Result<Self> {
        let block = usize::try_from(ns.lba_size().bytes()).unwrap_or(512);
        let mailbox = control.and_then(|c| Mailbox::new(ns.capacity_bytes(), block, c));
        let core = Arc::new(Core {
            mailbox,
            ns,
            engine,
            counters,
            mem: RwLock::new(None),
            latency,
        });
        let job_core = core.clone();
        let scheduler = Scheduler::new("dma-scheduler", move |job| job_core.run_job(job))?;
        // The pool uses the CPUs the queues' threads leave idle; with none
        // idle it still has a thread, for zero-fills alone.
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let spare = cpus.saturating_sub(usize::from(queues)).min(POOL_THREADS);
        Ok(Pipeline {
            core,
            scheduler: Mutex::new(Some(scheduler)),
            pool: IoPool::new(spare.max(1))?,
            pool_reads: spare > 0,
        })
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Guest memory changed (the frontend's memory table).
    pub fn set_memory(&self, mem: GuestMemory) -> io::Result<()> {
        let mut slot = self
            .core
            .mem
            .write()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?;
        *slot = Some(mem);
        Ok(())
    }

    /// Takes a prepared request into the engine. It completes now (the
    /// outcome comes back), or waits in the scheduler or goes to the I/O pool
    /// with the reply `reply` makes, which tells the guest later.
    pub fn submit(
        &self,
        mem: &GuestMemoryMmap<()>,
        label: Label,
        prepared: Prepared,
        reply: impl FnOnce() -> Box<dyn Reply>,
        buf: &mut Vec<u8>,
    ) -> Submitted {
        let core = &self.core;
        if let Some(mb) = &core.mailbox {
            if let Some(outcome) = mailbox_io(mb, mem, &prepared, &core.counters) {
                return Submitted::Now(outcome, Finish::none());
            }
        }
        let Prepared {
            work,
            arrival,
            epoch,
        } = prepared;
        let q = arrival.queue;
        let mut ticket = core.engine.arrive(mem, arrival);
        if let Some(Effect::CompleteBeforeDma { ms }) = ticket.effect {
            return self.complete_before_dma(label, work, epoch, ticket, ms);
        }
        let (wait, media_due) = core.with_media_time(&work, ticket.wait);
        if wait != Wait::None {
            debug!("q={q} req={} waits: {wait}", ticket.id);
            self.park((
                parked_info(&ticket),
                wait,
                Job::Io(Box::new(Pending {
                    label,
                    work,
                    epoch,
                    ticket,
                    reply: Some(reply()),
                    media_due,
                })),
            ));
            return Submitted::Later;
        }
        if let Some((send, atomic)) = self.pool_route(&work, &ticket) {
            let task = Core::pool_task(core, atomic, label, work, epoch, ticket, reply());
            if let Err(task) = send(&self.pool, q, task) {
                task();
            }
            return Submitted::Later;
        }
        let (outcome, why) = core.perform(mem, label, &work, epoch, &mut ticket, buf);
        Submitted::Now(
            outcome,
            Finish {
                ticket: Some(ticket),
                why,
            },
        )
    }

    /// A broken device on purpose: the guest hears "done" now, the data
    /// moves later: at the release of a hold that also matched (so a test can
    /// act while the completed request's DMA is pending), else `ms` from now.
    fn complete_before_dma(
        &self,
        label: Label,
        work: Work,
        epoch: u64,
        mut ticket: Ticket,
        ms: u64,
    ) -> Submitted {
        let written = match work {
            Work::Read(_) | Work::DeviceData(_) => label.len,
            _ => 0,
        };
        if ticket.wait != Wait::Hold {
            ticket.wait = Wait::Delay(Duration::from_millis(ms));
        }
        self.park((
            parked_info(&ticket),
            ticket.wait,
            Job::Io(Box::new(Pending {
                label,
                work,
                epoch,
                ticket,
                reply: None,
                media_due: false,
            })),
        ));
        Submitted::Now(Outcome::Done { written }, Finish::none())
    }

    /// How a request that need not wait goes to the I/O pool, and the guest
    /// memory it moves its data in there; `None` when it is served here.
    fn pool_route(&self, work: &Work, ticket: &Ticket) -> Option<(Handover, GuestMemory)> {
        let send: Handover = match work {
            // A large read that only moves data goes to the pool if a thread
            // there is free (the queue's thread goes on), else it is served
            // here all the same.
            Work::Read(range)
                if self.pool_reads
                    && range.len() >= POOL_READ_BYTES
                    && !self.core.engine.read_needs_buffer(ticket) =>
            {
                IoPool::submit
            }
            // A long zero-fill always goes, queued behind the pool's work if
            // need be: the queue's thread (virtio-blk's or NVMe's) would
            // stall for as long as it writes zeros. It completes when done; a
            // flush that arrives meanwhile may complete first, as both
            // protocols allow: a flush covers the writes completed before it
            // (virtio 1.2 5.2.6.2, NVMe 1.4 6.8), and commands in flight
            // together are not ordered.
            Work::Zero(ranges)
                if ranges.iter().map(|(r, _)| r.len()).sum::<u64>() >= POOL_ZERO_BYTES =>
            {
                IoPool::queue
            }
            _ => return None,
        };
        self.core.mem().map(|atomic| (send, atomic))
    }

    /// Records a request served at once, now that the guest has been told
    /// (`told`: the ledger's word for how), and parks the watch that may follow.
    pub fn finish(&self, finish: Finish, told: &'static str) {
        let Some(ticket) = finish.ticket else { return };
        if let Some(w) = self
            .core
            .engine
            .complete(ticket, ledger_word(finish.why, told))
        {
            self.park(watch_job(w));
        }
    }

    /// Every request of queue `q` still waiting completes now, without its
    /// media time, and the queue's work in the pool finishes: the queue stops.
    pub fn drain_queue(&self, q: u16) {
        self.pool.wait_idle(q);
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
            if let Job::Io(p) = &mut job {
                p.media_due = false;
            }
            if let Some(next) = self.core.run_job(job) {
                self.park(next);
            }
        }
    }

    /// The device was reset: what is still waiting is abandoned (its guest
    /// is not told: the reset voided it), and the pipeline goes on.
    pub fn abandon_waiting(&self) {
        for job in self
            .with_scheduler(Scheduler::drain_all)
            .unwrap_or_default()
        {
            if let Job::Io(p) = job {
                self.core.engine.complete(p.ticket, "abandoned");
            }
        }
        self.pool.wait_all_idle();
    }

    /// The frontend has gone: what is still waiting is abandoned, nothing can
    /// complete.
    pub fn abandon(&self) {
        for job in self.take_waiting() {
            if let Job::Io(p) = job {
                self.core.engine.complete(p.ticket, "abandoned");
            }
        }
    }

    /// The daemon is stopping with the frontend still connected: every
    /// request still waiting (delayed or held) fails now, so the guest is told
    /// rather than left waiting for a device that is gone. Returns how many
    /// were failed.
    pub fn fail_waiting(&self) -> usize {
        let mem = self.core.mem();
        let mut failed = 0;
        for job in self.take_waiting() {
            let Job::Io(p) = job else { continue };
            let Pending { ticket, reply, .. } = *p;
            match (&mem, reply) {
                (Some(atomic), Some(reply)) => {
                    reply.send(
                        &self.core,
                        &atomic.memory(),
                        Outcome::Failed(Failure::Stopped),
                    );
                    self.core.engine.complete(ticket, "failed-at-stop");
                    failed += 1;
                }
                // Completed already (the complete-before-dma mutant), or no
                // memory to tell the guest in.
                _ => {
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
}

impl Core {
    pub fn mem(&self) -> Option<GuestMemory> {
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
                    label,
                    work,
                    epoch,
                    mut ticket,
                    reply,
                    media_due: _,
                } = *p;
                let mut buf = Vec::new();
                let Some(reply) = reply else {
                    // Told "done" already; now the data moves.
                    let done = work::perform(
                        &self.ns,
                        &self.engine,
                        &*mem,
                        &work,
                        epoch,
                        &mut ticket,
                        &mut buf,
                    );
                    let word = if done.is_ok() {
                        "ok-before-dma"
                    } else {
                        "failed-after-completion"
                    };
                    return self.engine.complete(ticket, word).map(watch_job);
                };
                let (outcome, why) = self.perform(&mem, label, &work, epoch, &mut ticket, &mut buf);
                let told = reply.send(self, &mem, outcome);
                self.engine
                    .complete(ticket, ledger_word(why, told))
                    .map(watch_job)
            }
        }
    }

    /// The I/O pool's task for a request: it moves the data in `atomic`'s
    /// memory, tells the guest through `reply` and records the request.
    fn pool_task(
        core: &Arc<Core>,
        atomic: GuestMemory,
        label: Label,
        work: Work,
        epoch: u64,
        mut ticket: Ticket,
        reply: Box<dyn Reply>,
    ) -> Task {
        let core = core.clone();
        Box::new(move || {
            let mem = atomic.memory();
            let mut buf = Vec::new();
            let (outcome, why) = core.perform(&mem, label, &work, epoch, &mut ticket, &mut buf);
            let told = reply.send(&core, &mem, outcome);
            // No watch follows: a watched read keeps its buffer, never
            // pooled; a zero-fill moves no data into guest memory.
            let _ = core.engine.complete(ticket, ledger_word(why, told));
        })
    }

    /// Moves a request's data; how it ended, and the ledger's word for a
    /// failure that says more than its status.
    fn perform(
        &self,
        mem: &GuestMemoryMmap<()>,
        label: Label,
        work: &Work,
        epoch: u64,
        ticket: &mut Ticket,
        buf: &mut Vec<u8>,
    ) -> (Outcome, Option<&'static str>) {
        let q = ticket.arrival.queue;
        match work::perform(&self.ns, &self.engine, mem, work, epoch, ticket, buf) {
            Ok(written) => (Outcome::Done { written }, None),
            Err(e) => (
                Outcome::Failed(self.count_failure(q, label, &e)),
                e.outcome(),
            ),
        }
    }

    /// Counts and logs a request whose data failed to move; returns why it
    /// failed.
    fn count_failure(&self, q: u16, label: Label, e: &WorkError) -> Failure {
        let failure = match e {
            WorkError::Refused(r) => {
                self.counters.count_malformed(*r);
                Failure::Refused(*r)
            }
            WorkError::Media(NamespaceError::UnrecoveredRead { .. }) => {
                // A bad block the test put there: counted, not logged.
                bump(&self.counters.unrecovered_reads);
                return Failure::UnrecoveredRead;
            }
            WorkError::Media(NamespaceError::WriteFault { .. }) => {
                bump(&self.counters.write_faults);
                return Failure::WriteFault;
            }
            WorkError::CutOff => {
                bump(&self.counters.cut_off);
                return Failure::CutOff;
            }
            WorkError::Media(_) => {
                bump(&self.counters.media_errors);
                Failure::Media
            }
            WorkError::Memory(_) => {
                self.counters.count_malformed(Refusal::OutsideMemory);
                Failure::Refused(Refusal::OutsideMemory)
            }
            WorkError::Injected(_, error) => {
                bump(&self.counters.injected);
                // An injected fault is the test's doing: no warning for it.
                return Failure::Injected(*error);
            }
        };
        let cause = std::error::Error::source(e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        self.guest_error(
            q,
            format_args!(
                "op={} sector={} len={} failed: {e}{cause}",
                label.op, label.sector, label.len
            ),
        );
        failure
    }

    /// A log line for something the guest did; rate-limited.
    pub fn guest_error(&self, q: u16, msg: std::fmt::Arguments<'_>) {
        if self.counters.may_log() {
            warn!("q={q} {msg}");
        }
    }
}

/// Serves a request that touches the mailbox, or `None` for one that does
/// not. The mailbox takes whole writes of a command and reads of its answer.
fn mailbox_io(
    mb: &Mailbox,
    mem: &GuestMemoryMmap<()>,
    prepared: &Prepared,
    counters: &Counters,
) -> Option<Outcome> {
    let ranges = prepared.work.media_ranges();
    let &(offset, _) = ranges.iter().find(|(o, l)| mb.touches(*o, *l))?;
    let data = &prepared.arrival.segments;
    let served = match prepared.work {
        Work::Read(_) => mb.read(mem, offset, data, counters),
        Work::Write { .. } => mb.write(mem, offset, data, counters),
        _ => {
            bump(&counters.mailbox_refused);
            Err(mailbox::Refused)
        }
    };
    Some(match (served, &prepared.work) {
        (Ok(()), Work::Read(_)) => Outcome::Done {
            written: u32::try_from(dma::segment::total_len(data)).unwrap_or(u32::MAX),
        },
        (Ok(()), _) => Outcome::Done { written: 0 },
        (Err(mailbox::Refused), _) => Outcome::Failed(Failure::Mailbox),
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
/// moves. The device's own data (GET_ID) is answered by the controller, not
/// the media.
fn media_op(work: &Work) -> Option<(MediaOp, u64)> {
    match work {
        Work::Read(r) => Some((MediaOp::Read, r.len())),
        Work::Write { range, .. } => Some((MediaOp::Write, range.len())),
        Work::Flush => Some((MediaOp::Flush, 0)),
        Work::Zero(ranges) => Some((MediaOp::Discard, ranges.iter().map(|(r, _)| r.len()).sum())),
        Work::DeviceData(_) => None,
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
