//! The vhost-user-blk device: the `VhostUserBackend` implementation and the
//! queue loop that pops chains, parses them, serves them and completes them.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use log::{debug, warn};
use nvme_model::Namespace;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk::{self, BlkConfig, Status, CONFIG_WRITEBACK_OFFSET, ID_BYTES, SIZE_MAX};
use crate::counters::{bump, Counters};
use crate::execute::{execute, ExecContext, ExecError};
use crate::request::{self, Limits, Rejected};

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The device's fixed shape, from the configuration.
#[derive(Debug, Clone)]
pub struct DeviceShape {
    pub queues: u16,
    pub queue_size: u16,
    pub serial: String,
}

/// One vhost-user-blk device, serving one frontend connection. The namespace and
/// counters outlive it and are handed to the device for the next connection.
#[derive(Debug)]
pub struct BlkDevice {
    ns: Arc<Namespace>,
    counters: Arc<Counters>,
    shape: DeviceShape,
    serial: [u8; ID_BYTES],
    writeback: AtomicBool,
    event_idx: AtomicBool,
    mem: RwLock<Option<Mem>>,
    /// One exit event per worker thread (one thread per queue).
    exits: Vec<(EventConsumer, EventNotifier)>,
}

impl BlkDevice {
    pub fn new(
        ns: Arc<Namespace>,
        counters: Arc<Counters>,
        shape: DeviceShape,
    ) -> io::Result<Self> {
        let mut serial = [0u8; ID_BYTES];
        let n = shape.serial.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&shape.serial.as_bytes()[..n]);
        let exits = (0..shape.queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkDevice {
            ns,
            counters,
            shape,
            serial,
            writeback: AtomicBool::new(true),
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            exits,
        })
    }

    /// Tells every worker thread to stop; used once the frontend has gone.
    pub fn stop_workers(&self) {
        for (_, notifier) in &self.exits {
            let _ = notifier.notify();
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            seg_max: self.seg_max(),
            size_max: SIZE_MAX,
        }
    }

    /// Data segments per request: the queue size less header and status.
    fn seg_max(&self) -> u32 {
        u32::from(self.shape.queue_size).saturating_sub(2).max(1)
    }

    fn config(&self) -> BlkConfig {
        BlkConfig {
            capacity_sectors: self.ns.capacity_bytes() >> blk::SECTOR_SHIFT,
            lbs: self.ns.lba_size(),
            seg_max: self.seg_max(),
            num_queues: self.shape.queues,
            writeback: self.writeback.load(Ordering::Relaxed),
        }
    }

    /// Serves every available chain of one queue, then tells the guest.
    fn process_queue(&self, q: usize, vring: &VringRwLock<Mem>) {
        let Some(atomic) = self.mem.read().ok().and_then(|m| m.clone()) else {
            return;
        };
        let mem = atomic.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut buf = Vec::new();
        loop {
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    self.guest_error(q, format_args!("cannot disable notifications: {e}"));
                }
            }
            let mut served = 0usize;
            loop {
                let chain = match vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone())
                {
                    Some(chain) => chain,
                    None => break,
                };
                let head = chain.head_index();
                let used_len = self.serve_chain(q, &mem, chain, &mut buf);
                if let Err(e) = vring.add_used(head, used_len) {
                    self.guest_error(q, format_args!("cannot add used entry {head}: {e}"));
                }
                served += 1;
            }
            if served > 0 {
                self.signal(q, vring, event_idx);
            }
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    self.guest_error(q, format_args!("cannot enable notifications: {e}"));
                    break;
                }
            }
        }
    }

    fn signal(&self, q: usize, vring: &VringRwLock<Mem>, event_idx: bool) {
        let needed = !event_idx || vring.needs_notification().unwrap_or(true);
        if needed {
            if let Err(e) = vring.signal_used_queue() {
                warn!("q={q} cannot signal the guest: {e}");
            }
        }
    }

    /// Parses and serves one chain; returns the used length to report.
    fn serve_chain<C>(
        &self,
        q: usize,
        mem: &GuestMemoryMmap<()>,
        chain: C,
        buf: &mut Vec<u8>,
    ) -> u32
    where
        C: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        bump(&self.counters.requests);
        let (status, status_at, written) = match request::parse(mem, chain, self.limits()) {
            Ok(req) => {
                let ctx = ExecContext {
                    ns: &self.ns,
                    serial: &self.serial,
                    writeback: self.writeback.load(Ordering::Relaxed),
                };
                debug!(
                    "q={q} op={} sector={} len={}",
                    req.op.name(),
                    req.sector,
                    req.data_len
                );
                match execute(&ctx, mem, &req, buf) {
                    Ok(written) => (Status::Ok, Some(req.status), written),
                    Err(e) => {
                        self.count_exec_error(q, &req, &e);
                        let status = match e {
                            ExecError::Malformed(m) => m.status(),
                            _ => Status::IoErr,
                        };
                        (status, Some(req.status), 0)
                    }
                }
            }
            Err(rejected) => {
                self.count_rejected(q, &rejected);
                (rejected.reason.status(), rejected.status_at, 0)
            }
        };
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

    fn count_rejected(&self, q: usize, r: &Rejected) {
        self.counters.count_malformed(r.reason);
        let op = r.op.map_or("?", |op| op.name());
        self.guest_error(q, format_args!("op={op} refused: {}", r.reason));
    }

    fn count_exec_error(&self, q: usize, req: &request::Request, e: &ExecError) {
        match e {
            ExecError::Malformed(m) => self.counters.count_malformed(*m),
            ExecError::Media(_) => bump(&self.counters.media_errors),
            ExecError::Memory(_) => self
                .counters
                .count_malformed(request::Malformed::OutsideMemory),
        }
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
    }

    /// A log line for something the guest did; rate-limited.
    fn guest_error(&self, q: usize, msg: std::fmt::Arguments<'_>) {
        if self.counters.may_log() {
            warn!("q={q} {msg}");
        }
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        usize::from(self.shape.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shape.queue_size)
    }

    fn features(&self) -> u64 {
        blk::device_features(self.ns.read_only())
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
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        match (offset, buf) {
            (CONFIG_WRITEBACK_OFFSET, &[wce]) => {
                self.writeback.store(wce != 0, Ordering::Relaxed);
                log::info!(
                    "cache mode: {}",
                    if wce != 0 {
                        "writeback"
                    } else {
                        "writethrough"
                    }
                );
                Ok(())
            }
            _ => {
                debug!("ignored config write at {offset} of {} bytes", buf.len());
                Ok(())
            }
        }
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        let mut slot = self
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

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Returning an error would end this worker's loop: nothing a guest does may.
        if evset != EventSet::IN {
            debug!("q={thread_id} unexpected event set {evset:?}");
            return Ok(());
        }
        // One queue per worker thread: the thread's only vring is its queue.
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(thread_id, vring),
            None => debug!("q={thread_id} unknown event {device_event}"),
        }
        Ok(())
    }
}
