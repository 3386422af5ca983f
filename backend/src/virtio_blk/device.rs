//! The vhost-user-blk device: the `VhostUserBackend` implementation, the queue
//! loop that pops chains, parses them and hands them to the request
//! [`Pipeline`], and the virtio-blk end of a request: its status byte, its
//! used ring entry and the notification.
//!
//! A chain's life: parse ([`request::parse`]) → prepare
//! ([`prepare`]) → [`Pipeline::submit`] (the mailbox, the engine's
//! arrival, now or parked in the scheduler until its delay passes or it is
//! released, the data's move) → status byte, used ring, notification, here at
//! once or through a `ChainReply` later.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dma::Engine;
use log::{debug, warn};
use nvme_model::geometry::PAGE;
use nvme_model::{Latency, Namespace};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config_space::{ConfigSpace, CONFIG_WRITEBACK_OFFSET};
use super::prepare::{prepare, PrepareError};
use super::request::{self, Limits, Rejected};
use super::{Status, ID_BYTES, SECTOR_SHIFT, SIZE_MAX};
use crate::control::protocol::ControlFn;
use crate::counters::{bump, Counters};
use crate::pipeline::{Core, Failure, InjectedError, Label, Outcome, Pipeline, Reply, Submitted};
use crate::GuestMemory;

type Vring = VringRwLock<GuestMemory>;

/// The device's fixed shape, from the configuration.
#[derive(Debug, Clone)]
pub struct DeviceShape {
    pub queues: u16,
    pub queue_size: u16,
    pub serial: String,
}

/// One vhost-user-blk device, serving one frontend connection. The namespace,
/// engine and counters outlive it and are handed to the device for the next one.
#[derive(Debug)]
pub struct BlkDevice {
    pipeline: Arc<Pipeline>,
    shape: DeviceShape,
    /// What GET_ID answers: the serial, cut to 20 bytes or NUL-padded.
    serial: [u8; ID_BYTES],
    /// Whether the driver negotiated VIRTIO_RING_F_EVENT_IDX.
    event_idx: Arc<AtomicBool>,
    /// One exit event per worker thread (one thread per queue).
    exits: Vec<(EventConsumer, EventNotifier)>,
    /// Held by a queue's thread from popping a chain until it is completed or
    /// handed on (parked, pooled): stopping the queue waits for it.
    serving: Vec<Mutex<()>>,
    /// Set while a queue has not signalled the guest since it was started.
    /// A daemon that died (or a queue stopped) may have put completions in
    /// the used ring without the interrupt reaching the guest, and with
    /// EVENT_IDX the next completion may not ask for one: the first pass
    /// over a started queue signals the guest whatever the ring says.
    unsignalled: Vec<AtomicBool>,
    /// The exit events' consumers handed to vhost-user-backend, by worker.
    /// It turns each into a raw descriptor for its epoll and never closes it,
    /// one descriptor lost per connection and queue, so
    /// [`BlkDevice::close_handed_out`] closes them once the daemon is gone.
    handed_out: Mutex<Vec<(RawFd, usize)>>,
}

/// The reply of a chain that waited: its status byte, its used ring entry and
/// a notification.
struct ChainReply {
    q: u16,
    head: u16,
    status_at: dma::Gpa,
    vring: Vring,
    event_idx: Arc<AtomicBool>,
}

impl Reply for ChainReply {
    fn send(
        self: Box<Self>,
        core: &Core,
        mem: &GuestMemoryMmap<()>,
        outcome: Outcome,
    ) -> &'static str {
        let (status, written) = status_of(outcome);
        let (len, told) = tell(core, self.q, mem, Some(self.status_at), status, written);
        add_used(core, self.q, &self.vring, self.head, len);
        signal(self.q, &self.vring, &self.event_idx);
        told
    }
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
        let exits = (0..shape.queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        let pipeline = Arc::new(Pipeline::new(
            ns,
            engine,
            counters,
            shape.queues,
            control,
            latency,
        )?);
        let serving = (0..shape.queues).map(|_| Mutex::new(())).collect();
        let unsignalled = (0..shape.queues).map(|_| AtomicBool::new(true)).collect();
        let mut serial = [0u8; ID_BYTES];
        let n = shape.serial.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&shape.serial.as_bytes()[..n]);
        Ok(BlkDevice {
            pipeline,
            shape,
            serial,
            event_idx: Arc::new(AtomicBool::new(false)),
            exits,
            serving,
            unsignalled,
            handed_out: Mutex::new(Vec::new()),
        })
    }

    fn core(&self) -> &Core {
        self.pipeline.core()
    }

    /// Tells every worker thread to stop and abandons what is still parked: the
    /// frontend has gone, so nothing can complete.
    pub fn shut_down(&self) {
        for (_, notifier) in &self.exits {
            let _ = notifier.notify();
        }
        self.pipeline.abandon();
    }

    /// Closes the exit events' descriptors that vhost-user-backend kept open;
    /// call it once the `VhostUserDaemon` that asked for them is dropped. A
    /// descriptor is closed only while it is still the very file this device
    /// handed out (`kcmp`), so a library that closed it itself, and a number
    /// reused since, are left alone.
    pub fn close_handed_out(&self) {
        let handed_out = match self.handed_out.lock() {
            Ok(mut h) => std::mem::take(&mut *h),
            Err(_) => return,
        };
        for (fd, thread) in handed_out {
            let Some((ours, _)) = self.exits.get(thread) else {
                continue;
            };
            if same_open_file(fd, ours.as_raw_fd()) {
                // SAFETY: `fd` is open and is a duplicate of our own exit
                // event's consumer that nothing else owns: vhost-user-backend
                // took it with `into_raw_fd` and dropped everything that used
                // it with the daemon.
                unsafe { libc::close(fd) };
            }
        }
    }

    /// The request pipeline: what the control plane drives (holds,
    /// releases, the requests waiting).
    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// What the guest may send: with a maximum transfer, segments of a page
    /// and as many as make it (so no request can be larger); otherwise as many
    /// as the queue holds besides header and status, each up to `SIZE_MAX`.
    fn limits(&self) -> Limits {
        let descriptors = u32::from(self.shape.queue_size).saturating_sub(2).max(1);
        match self.core().ns.geometry().max_transfer {
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

    fn config(&self) -> ConfigSpace {
        ConfigSpace {
            capacity_sectors: self.core().ns.capacity_bytes() >> SECTOR_SHIFT,
            lbs: self.core().ns.lba_size(),
            size_max: self.limits().size_max,
            seg_max: self.limits().seg_max,
            geometry: *self.core().ns.geometry(),
            num_queues: self.shape.queues,
            // Writeback only while the media's cache runs: with none
            // (`--write-cache off`) the guest is told writethrough and never
            // flushes, and every write is synced before it completes.
            writeback: self.core().ns.write_cache_enabled(),
        }
    }

    /// Serves every available chain of one queue, then tells the guest.
    fn process_queue(&self, q: u16, vring: &Vring) {
        let Some(atomic) = self.core().mem() else {
            return;
        };
        let mem = atomic.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut buf = Vec::new();
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    self.core()
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
                    add_used(self.core(), q, vring, head, len);
                    used += 1;
                }
            }
            if used > 0 {
                signal(q, vring, &self.event_idx);
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
                    self.core().guest_error(
                        q,
                        format_args!("avail ring says more but no chain can be popped"),
                    );
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    self.core()
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
    /// `None` when the request waits or is in the pool and completes later.
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
        let core = self.core();
        bump(&core.counters.requests);
        let req = match request::parse(mem, chain, self.limits()) {
            Ok(req) => req,
            Err(rejected) => {
                count_rejected(core, q, &rejected);
                let status = rejected.reason.status();
                return Some(tell(core, q, mem, rejected.status_at, status, 0).0);
            }
        };
        debug!(
            "q={q} op={} sector={} len={}",
            req.op.name(),
            req.sector,
            req.data_len
        );
        let label = Label {
            op: req.op.name(),
            sector: req.sector,
            len: req.data_len,
        };
        let prepared = match prepare(&core.ns, mem, q, &req, &self.serial, buf) {
            Ok(p) => p,
            Err(e) => {
                let status = count_refused(core, q, label, &e);
                return Some(tell(core, q, mem, Some(req.status), status, 0).0);
            }
        };
        let reply = || -> Box<dyn Reply> {
            Box::new(ChainReply {
                q,
                head,
                status_at: req.status,
                vring: vring.clone(),
                event_idx: self.event_idx.clone(),
            })
        };
        match self.pipeline.submit(mem, label, prepared, reply, buf) {
            Submitted::Now(outcome, finish) => {
                let (status, written) = status_of(outcome);
                let (len, told) = tell(core, q, mem, Some(req.status), status, written);
                self.pipeline.finish(finish, told);
                Some(len)
            }
            Submitted::Later => None,
        }
    }
}

/// Whether two descriptors of this process name one open file; `false` when
/// the kernel cannot say.
fn same_open_file(a: RawFd, b: RawFd) -> bool {
    /// `kcmp`'s comparison of two file descriptors.
    const KCMP_FILE: libc::c_long = 0;
    let pid = libc::c_long::from(std::process::id() as libc::pid_t);
    // SAFETY: kcmp only compares kernel objects of the given process; it reads
    // and writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a),
            libc::c_long::from(b),
        )
    };
    r == 0
}

/// The status byte for a request's outcome, and the bytes of data it wrote:
/// the pipeline's words in virtio-blk's. Every failure is IOERR but an
/// injected "unsupported", which is UNSUPP.
fn status_of(outcome: Outcome) -> (Status, u32) {
    match outcome {
        Outcome::Done { written } => (Status::Ok, written),
        Outcome::Failed(Failure::Injected(InjectedError::Unsupported)) => (Status::Unsupp, 0),
        Outcome::Failed(
            Failure::Refused(_)
            | Failure::Injected(InjectedError::IoError)
            | Failure::UnrecoveredRead
            | Failure::WriteFault
            | Failure::CutOff
            | Failure::Media
            | Failure::Mailbox
            | Failure::Stopped,
        ) => (Status::IoErr, 0),
    }
}

/// Writes a request's status byte; returns the used length to report (the
/// `written` data bytes and the status byte) and the ledger's word for what
/// the guest was told.
fn tell(
    core: &Core,
    q: u16,
    mem: &GuestMemoryMmap<()>,
    status_at: Option<dma::Gpa>,
    status: Status,
    written: u32,
) -> (u32, &'static str) {
    let Some(at) = status_at else {
        bump(&core.counters.no_status);
        return (0, "no-status");
    };
    if let Err(e) = mem.write_obj(status as u8, at.into()) {
        core.guest_error(q, format_args!("cannot write the status byte at {at}: {e}"));
        bump(&core.counters.no_status);
        return (0, "no-status");
    }
    match status {
        Status::Ok => bump(&core.counters.completed_ok),
        Status::IoErr => bump(&core.counters.ioerr),
        Status::Unsupp => bump(&core.counters.unsupp),
    }
    (written.saturating_add(1), status.name())
}

fn add_used(core: &Core, q: u16, vring: &Vring, head: u16, len: u32) {
    if let Err(e) = vring.add_used(head, len) {
        core.guest_error(q, format_args!("cannot add used entry {head}: {e}"));
    }
}

fn signal(q: u16, vring: &Vring, event_idx: &AtomicBool) {
    let needed = !event_idx.load(Ordering::Relaxed) || vring.needs_notification().unwrap_or(true);
    if needed {
        if let Err(e) = vring.signal_used_queue() {
            warn!("q={q} cannot signal the guest: {e}");
        }
    }
}

fn count_rejected(core: &Core, q: u16, r: &Rejected) {
    core.counters.count_malformed(r.reason);
    let op = r.op.map_or("?", |op| op.name());
    core.guest_error(q, format_args!("op={op} refused: {}", r.reason));
}

/// Counts and logs a parsed request that cannot be served; returns the
/// status it is answered with.
fn count_refused(core: &Core, q: u16, label: Label, e: &PrepareError) -> Status {
    let mistake = e.mistake();
    core.counters.count_malformed(mistake);
    let cause = std::error::Error::source(e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    core.guest_error(
        q,
        format_args!(
            "op={} sector={} len={} failed: {e}{cause}",
            label.op, label.sector, label.len
        ),
    );
    mistake.status()
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
        super::device_features(self.core().ns.read_only())
    }

    fn acked_features(&self, features: u64) {
        // Not a place to learn the driver's: QEMU acks the features it
        // knows (without VIRTIO_BLK_F_FLUSH) when it connects, before any
        // driver has negotiated.
        debug!("features acked: {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        match (offset, buf) {
            (CONFIG_WRITEBACK_OFFSET, &[wce]) => {
                // Write-through: the drive's cache is off, what it held made
                // stable. Without a cache writeback cannot be had, and the
                // byte reads 0 again.
                let ns = &self.core().ns;
                if let Err(e) = ns.set_write_cache(wce != 0) {
                    warn!("cannot flush the write cache on switching to writethrough: {e}");
                }
                log::info!(
                    "cache mode: {}",
                    if ns.write_cache_enabled() {
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

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        self.pipeline.set_memory(mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.shape.queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = self.exits.get(thread_index)?;
        let (consumer, notifier) = (consumer.try_clone().ok()?, notifier.try_clone().ok()?);
        if let Ok(mut handed_out) = self.handed_out.lock() {
            handed_out.push((consumer.as_raw_fd(), thread_index));
        }
        Some((consumer, notifier))
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
        // Stopping: what was held completes now, without its media time.
        self.pipeline.drain_queue(q);
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
