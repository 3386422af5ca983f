//! The driver side of a split virtqueue, written directly into guest memory.
//!
//! A [`Queue`] owns its descriptor table, avail ring and used ring (one guest
//! memory area per queue), a kick and a call eventfd, and the bookkeeping of
//! which descriptor slots belong to which chain in flight. Chains go in with
//! [`Queue::push_chain`] (exactly the descriptors given, malformed or not) or the
//! virtio-blk helpers in `blk.rs`; [`Queue::kick`] publishes them; completions
//! come back, in whatever order the device chooses, from [`Queue::poll`] and
//! [`Queue::wait`].

use std::collections::VecDeque;
use std::fmt;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vhost::VringConfigData;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::error::Error;
use super::memory::{Buffer, GuestRam};
use super::status::{StatusByte, STATUS_UNWRITTEN};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (device-writable).
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;

/// Size of one descriptor in the table.
pub const DESC_SIZE: u64 = 16;
/// Bytes of per-chain scratch space: a virtio-blk header at 0, status at 16.
pub(crate) const SCRATCH_SIZE: u64 = 32;

const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Where a descriptor's `next` field points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The slot of the following entry of the same list (0 for the last entry).
    Auto,
    /// The slot of entry `i` of the same list (`i` may point backwards: a loop).
    Entry(usize),
    /// This value, verbatim (may be out of range).
    Raw(u16),
}

/// One descriptor as the driver writes it. Flags are written exactly as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer (not checked: may be out of range).
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// `DESC_F_*` bits.
    pub flags: u16,
    /// Where `next` points.
    pub next: Next,
}

impl Descriptor {
    /// A device-readable buffer.
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Descriptor {
            addr,
            len,
            flags: 0,
            next: Next::Auto,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Descriptor {
            addr,
            len,
            flags: DESC_F_WRITE,
            next: Next::Auto,
        }
    }

    /// A descriptor pointing at an indirect table of `entries` descriptors.
    pub fn indirect(table: GuestAddress, entries: u16) -> Self {
        Descriptor {
            addr: table,
            len: u32::from(entries) * 16,
            flags: DESC_F_INDIRECT,
            next: Next::Auto,
        }
    }

    /// The same descriptor with `flags` added.
    pub fn with_flags(mut self, flags: u16) -> Self {
        self.flags |= flags;
        self
    }

    /// The same descriptor with `next`.
    pub fn with_next(mut self, next: Next) -> Self {
        self.next = next;
        self
    }

    /// The 16 bytes of the descriptor with `next` resolved to `next_slot`.
    pub fn encode(&self, next_slot: u16) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.addr.0.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next_slot.to_le_bytes());
        raw
    }
}

/// Sets `DESC_F_NEXT` on every descriptor but the last, clears it on the last,
/// and points each `next` at the following entry: a well-formed chain.
pub fn link(descs: &mut [Descriptor]) {
    let last = descs.len().saturating_sub(1);
    for (i, d) in descs.iter_mut().enumerate() {
        d.next = Next::Auto;
        if i < last {
            d.flags |= DESC_F_NEXT;
        } else {
            d.flags &= !DESC_F_NEXT;
        }
    }
}

/// Resolves the `next` of entry `i` through `slot_of` (entry index -> slot).
fn resolve_next(
    descs: &[Descriptor],
    i: usize,
    slot_of: impl Fn(usize) -> Option<u16>,
) -> Result<u16, Error> {
    match descs[i].next {
        Next::Auto => Ok(slot_of(i + 1).unwrap_or(0)),
        Next::Entry(j) => slot_of(j).ok_or(Error::BadNextEntry { entry: i, next: j }),
        Next::Raw(raw) => Ok(raw),
    }
}

/// Writes `descs` as a descriptor table at `table` (for indirect tables:
/// `Next::Entry(i)` and `Next::Auto` are indices into this table).
pub fn write_table(ram: &GuestRam, table: GuestAddress, descs: &[Descriptor]) -> Result<(), Error> {
    let mut bytes = Vec::with_capacity(descs.len() * 16);
    for i in 0..descs.len() {
        let next = resolve_next(descs, i, |j| {
            (j < descs.len()).then(|| u16::try_from(j).ok()).flatten()
        })?;
        bytes.extend_from_slice(&descs[i].encode(next));
    }
    ram.write(table, &bytes)
}

/// Identifies a chain by its head descriptor slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChainId(pub u16);

impl ChainId {
    /// The head slot as an index, for tables indexed by chain.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// What a used-ring entry completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionKind {
    /// A virtio-blk request built by the blk helpers, with the status byte the
    /// device wrote (`0xff` if it wrote none).
    Blk(StatusByte),
    /// A chain pushed with [`Queue::push_chain`].
    Raw,
    /// An id that names no chain in flight (a device bug, or a head published
    /// with [`Queue::publish_head`]).
    Unknown,
}

/// One used-ring entry, as the device wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The `id` field: the head slot of the chain.
    pub id: u32,
    /// The `len` field: bytes the device says it wrote.
    pub len: u32,
    /// What the id refers to.
    pub kind: CompletionKind,
}

impl Completion {
    /// The chain this completes, unless the id was unknown.
    pub fn chain(&self) -> Option<ChainId> {
        match self.kind {
            CompletionKind::Unknown => None,
            _ => u16::try_from(self.id).ok().map(ChainId),
        }
    }

    /// The virtio-blk status, for blk requests.
    pub fn status(&self) -> Option<StatusByte> {
        match self.kind {
            CompletionKind::Blk(status) => Some(status),
            _ => None,
        }
    }
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains placed in the avail ring.
    pub submitted: u64,
    /// Used entries read.
    pub completed: u64,
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Notifications skipped because the device asked for none.
    pub kicks_suppressed: u64,
    /// Times the call eventfd was found signalled.
    pub interrupts: u64,
    /// Wake-ups that found no new used entry.
    pub spurious_wakeups: u64,
    /// Used entries whose id named no chain in flight.
    pub unknown_used: u64,
}

#[derive(Debug)]
pub(crate) enum ChainKind {
    Raw,
    Blk,
}

#[derive(Debug)]
struct ChainState {
    slots: Vec<u16>,
    kind: ChainKind,
}

/// The driver side of one split virtqueue.
pub struct Queue {
    index: u16,
    size: u16,
    ram: GuestRam,
    area: Buffer,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    scratch: GuestAddress,
    kick: EventFd,
    call: EventFd,
    event_idx: bool,
    pub(crate) timeout: Duration,
    free: Vec<u16>,
    chains: Vec<Option<ChainState>>,
    /// Where the next head goes in the avail ring.
    next_avail: Wrapping<u16>,
    /// `avail.idx` as last published.
    published: Wrapping<u16>,
    /// `avail.idx` when notification was last decided.
    notified: Wrapping<u16>,
    /// Next used-ring entry to read.
    last_used: Wrapping<u16>,
    /// Heads in the avail ring whose used entry has not arrived.
    outstanding: usize,
    pending: VecDeque<Completion>,
    stats: QueueStats,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("index", &self.index)
            .field("size", &self.size)
            .field("area", &self.area)
            .field("event_idx", &self.event_idx)
            .field("next_avail", &self.next_avail.0)
            .field("last_used", &self.last_used.0)
            .field("outstanding", &self.outstanding)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn align_up(x: u64, align: u64) -> u64 {
    x.next_multiple_of(align)
}

impl Queue {
    /// Lays out a queue of `size` entries (a power of two) in a fresh area of
    /// `ram` and zeroes it.
    pub(crate) fn new(
        index: u16,
        size: u16,
        ram: &GuestRam,
        event_idx: bool,
        timeout: Duration,
    ) -> Result<Self, Error> {
        if !size.is_power_of_two() {
            return Err(Error::InvalidConfig("queue_size must be a power of two"));
        }
        let n = u64::from(size);
        let avail_off = n * DESC_SIZE;
        let used_off = align_up(avail_off + 6 + 2 * n, 4);
        let scratch_off = align_up(used_off + 6 + 8 * n, 64);
        let total = scratch_off + SCRATCH_SIZE * n;
        let total = usize::try_from(total).map_err(|_| Error::InvalidConfig("queue too large"))?;
        let area = ram.alloc(total)?;
        area.fill(0)?;
        let base = area.gpa();
        let kick = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        Ok(Queue {
            index,
            size,
            ram: ram.clone(),
            desc: base,
            avail: GuestAddress(base.0 + avail_off),
            used: GuestAddress(base.0 + used_off),
            scratch: GuestAddress(base.0 + scratch_off),
            area,
            kick,
            call,
            event_idx,
            timeout,
            // Popped from the end: slot 0 is handed out first.
            free: (0..size).rev().collect(),
            chains: (0..size).map(|_| None).collect(),
            next_avail: Wrapping(0),
            published: Wrapping(0),
            notified: Wrapping(0),
            last_used: Wrapping(0),
            outstanding: 0,
            pending: VecDeque::new(),
            stats: QueueStats::default(),
        })
    }

    /// The queue's index on the device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Number of descriptors (and ring entries).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest memory the queue lives in.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_table(&self) -> GuestAddress {
        self.desc
    }

    /// Guest-physical address of the avail ring.
    pub fn avail_ring(&self) -> GuestAddress {
        self.avail
    }

    /// Guest-physical address of the used ring.
    pub fn used_ring(&self) -> GuestAddress {
        self.used
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX is in use on this queue.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Free descriptor slots.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains in the avail ring without a used entry yet.
    pub fn in_flight(&self) -> usize {
        self.outstanding
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The timeout the blocking blk helpers use.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub(crate) fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    pub(crate) fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The ring addresses as the backend wants them: host virtual addresses of
    /// this process's mapping.
    pub(crate) fn vring_config(&self) -> Result<VringConfigData, Error> {
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: self.ram.host_address(self.desc)?,
            used_ring_addr: self.ram.host_address(self.used)?,
            avail_ring_addr: self.ram.host_address(self.avail)?,
            log_addr: None,
        })
    }

    /// Guest-physical address of the scratch area of the chain headed at `head`.
    pub(crate) fn scratch(&self, head: u16) -> GuestAddress {
        GuestAddress(self.scratch.0 + u64::from(head) * SCRATCH_SIZE)
    }

    /// Takes `n` free descriptor slots (and one avail ring entry).
    pub(crate) fn reserve(&mut self, n: usize) -> Result<Vec<u16>, Error> {
        if n == 0 {
            return Err(Error::EmptyChain);
        }
        if self.outstanding >= usize::from(self.size) || self.free.len() < n {
            return Err(Error::QueueFull {
                queue: self.index,
                needed: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        let mut slots = self.free.split_off(at);
        slots.reverse();
        Ok(slots)
    }

    /// Returns slots taken by [`Queue::reserve`] that were not used.
    pub(crate) fn unreserve(&mut self, slots: Vec<u16>) {
        self.free.extend(slots.into_iter().rev());
    }

    /// Writes `descs` into the table at `slots` (entry i at slots[i]).
    pub(crate) fn write_chain(&self, slots: &[u16], descs: &[Descriptor]) -> Result<(), Error> {
        for (i, (&slot, d)) in slots.iter().zip(descs).enumerate() {
            let next = resolve_next(descs, i, |j| slots.get(j).copied())?;
            self.write_descriptor_raw(slot, &d.encode(next))?;
        }
        Ok(())
    }

    /// Puts the chain headed at `slots[0]` in the avail ring (not yet published).
    pub(crate) fn enqueue(&mut self, slots: Vec<u16>, kind: ChainKind) -> Result<ChainId, Error> {
        let head = slots[0];
        if let Err(e) = self.write_avail_entry(head) {
            self.unreserve(slots);
            return Err(e);
        }
        self.chains[usize::from(head)] = Some(ChainState { slots, kind });
        Ok(ChainId(head))
    }

    fn write_avail_entry(&mut self, head: u16) -> Result<(), Error> {
        let pos = u64::from(self.next_avail.0 % self.size);
        let addr = GuestAddress(self.avail.0 + 4 + 2 * pos);
        self.ram.write(addr, &head.to_le_bytes())?;
        self.next_avail += 1;
        self.outstanding += 1;
        self.stats.submitted += 1;
        Ok(())
    }

    /// Places `descs` in free descriptor slots, exactly as given (flags are not
    /// touched; see [`link`] for a well-formed chain), and puts the first one's
    /// slot in the avail ring. Call [`Queue::kick`] to publish.
    pub fn push_chain(&mut self, descs: &[Descriptor]) -> Result<ChainId, Error> {
        let slots = self.reserve(descs.len())?;
        if let Err(e) = self.write_chain(&slots, descs) {
            self.unreserve(slots);
            return Err(e);
        }
        self.enqueue(slots, ChainKind::Raw)
    }

    /// Puts an arbitrary `head` value in the avail ring (e.g. out of range, or
    /// a slot already in flight). Not tracked: its used entry, if any, comes
    /// back as [`CompletionKind::Unknown`] unless it names a chain in flight.
    pub fn publish_head(&mut self, head: u16) -> Result<(), Error> {
        if self.outstanding >= usize::from(self.size) {
            return Err(Error::QueueFull {
                queue: self.index,
                needed: 1,
                free: 0,
            });
        }
        self.write_avail_entry(head)
    }

    /// Overwrites descriptor `slot` of the table (for tests that change a
    /// chain after it was placed).
    pub fn write_descriptor(&self, slot: u16, desc: &Descriptor, next: u16) -> Result<(), Error> {
        self.write_descriptor_raw(slot, &desc.encode(next))
    }

    fn write_descriptor_raw(&self, slot: u16, raw: &[u8; 16]) -> Result<(), Error> {
        if slot >= self.size {
            return Err(Error::BadSlot {
                slot,
                size: self.size,
            });
        }
        let addr = GuestAddress(self.desc.0 + u64::from(slot) * DESC_SIZE);
        self.ram.write(addr, raw)
    }

    /// Makes everything pushed so far visible to the device (`avail.idx`).
    pub fn publish(&mut self) -> Result<(), Error> {
        // Release: descriptors and ring entries are visible before the index.
        self.ram
            .mem()
            .store(
                self.next_avail.0.to_le(),
                GuestAddress(self.avail.0 + 2),
                Ordering::Release,
            )
            .map_err(|source| Error::GuestMemory {
                gpa: self.avail.0 + 2,
                len: 2,
                source,
            })?;
        self.published = self.next_avail;
        Ok(())
    }

    /// Notifies the device of what was published since the last notification,
    /// unless it asked not to be (`avail_event` with EVENT_IDX, else the
    /// `VRING_USED_F_NO_NOTIFY` flag). Returns whether the kick fd was written.
    pub fn notify(&mut self) -> Result<bool, Error> {
        // The index store must be visible before we read the device's wishes.
        fence(Ordering::SeqCst);
        let new = self.published;
        let old = std::mem::replace(&mut self.notified, new);
        let needed = if self.event_idx {
            let event =
                Wrapping(self.load_u16(GuestAddress(self.used.0 + 4 + 8 * u64::from(self.size)))?);
            (new - event - Wrapping(1)).0 < (new - old).0
        } else {
            let flags = self.load_u16(self.used)?;
            new != old && flags & VRING_USED_F_NO_NOTIFY == 0
        };
        if needed {
            self.force_notify()?;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(needed)
    }

    /// Writes the kick eventfd regardless of what the device asked for.
    pub fn force_notify(&mut self) -> Result<(), Error> {
        self.kick.write(1).map_err(Error::EventFd)?;
        self.stats.kicks += 1;
        Ok(())
    }

    /// [`Queue::publish`] then [`Queue::notify`].
    pub fn kick(&mut self) -> Result<bool, Error> {
        self.publish()?;
        self.notify()
    }

    fn load_u16(&self, addr: GuestAddress) -> Result<u16, Error> {
        let v: u16 = self
            .ram
            .mem()
            .load(addr, Ordering::Acquire)
            .map_err(|source| Error::GuestMemory {
                gpa: addr.0,
                len: 2,
                source,
            })?;
        Ok(u16::from_le(v))
    }

    fn used_idx(&self) -> Result<Wrapping<u16>, Error> {
        self.load_u16(GuestAddress(self.used.0 + 2)).map(Wrapping)
    }

    /// Reads every new used entry into `pending`. Returns how many.
    fn harvest(&mut self) -> Result<usize, Error> {
        let used_idx = self.used_idx()?;
        let n = (used_idx - self.last_used).0;
        if n > self.size {
            return Err(Error::UsedIndexJump {
                queue: self.index,
                used_idx: used_idx.0,
                last_used: self.last_used.0,
            });
        }
        for _ in 0..n {
            let pos = u64::from(self.last_used.0 % self.size);
            let mut raw = [0u8; 8];
            self.ram
                .read(GuestAddress(self.used.0 + 4 + 8 * pos), &mut raw)?;
            let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
            let len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
            self.last_used += 1;
            let completion = self.retire(id, len)?;
            self.pending.push_back(completion);
        }
        self.stats.completed += u64::from(n);
        Ok(usize::from(n))
    }

    fn retire(&mut self, id: u32, len: u32) -> Result<Completion, Error> {
        self.outstanding = self.outstanding.saturating_sub(1);
        let chain = u16::try_from(id)
            .ok()
            .filter(|&head| head < self.size)
            .and_then(|head| self.chains[usize::from(head)].take());
        let kind = match chain {
            Some(ChainState { slots, kind }) => {
                let head = slots[0];
                self.free.extend(slots.into_iter().rev());
                match kind {
                    ChainKind::Raw => CompletionKind::Raw,
                    ChainKind::Blk => {
                        let mut status = [STATUS_UNWRITTEN];
                        self.ram
                            .read(GuestAddress(self.scratch(head).0 + 16), &mut status)?;
                        CompletionKind::Blk(StatusByte(status[0]))
                    }
                }
            }
            None => {
                self.stats.unknown_used += 1;
                warn!(
                    "q={} used entry names no chain in flight: id={id} len={len}",
                    self.index
                );
                CompletionKind::Unknown
            }
        };
        debug!("q={} used id={id} len={len} {kind:?}", self.index);
        Ok(Completion { id, len, kind })
    }

    /// Appends every completion available now to `out`, without blocking.
    /// Returns how many were appended.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, Error> {
        self.harvest()?;
        let n = self.pending.len();
        out.extend(self.pending.drain(..));
        Ok(n)
    }

    /// Blocks until at least one completion is available (or `timeout`
    /// passes: [`Error::Timeout`]), then appends all available to `out`.
    pub fn wait(&mut self, out: &mut Vec<Completion>, timeout: Duration) -> Result<usize, Error> {
        self.wait_until(timeout, |q| !q.pending.is_empty())?;
        self.poll(out)
    }

    /// Blocks until the chain `id` completes and returns its completion. Other
    /// completions that arrive meanwhile stay queued for [`Queue::poll`].
    pub fn wait_for(&mut self, id: ChainId, timeout: Duration) -> Result<Completion, Error> {
        let is_it = |c: &Completion| c.id == u32::from(id.0) && c.kind != CompletionKind::Unknown;
        self.wait_until(timeout, |q| q.pending.iter().any(is_it))?;
        let pos = self.pending.iter().position(is_it);
        pos.and_then(|pos| self.pending.remove(pos))
            .ok_or(Error::Timeout {
                queue: self.index,
                waited: timeout,
            })
    }

    /// Harvests until `done(self)` or the timeout; sleeps on the call eventfd
    /// in between, arming `used_event` first when EVENT_IDX is on.
    fn wait_until(&mut self, timeout: Duration, done: impl Fn(&Self) -> bool) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            self.harvest()?;
            if done(self) {
                return Ok(());
            }
            if self.event_idx {
                // Ask for an interrupt when the next used entry is written.
                let used_event = GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size));
                self.ram
                    .mem()
                    .store(self.last_used.0.to_le(), used_event, Ordering::Release)
                    .map_err(|source| Error::GuestMemory {
                        gpa: used_event.0,
                        len: 2,
                        source,
                    })?;
                fence(Ordering::SeqCst);
                // The device may have added entries before it saw used_event.
                if self.used_idx()? != self.last_used {
                    continue;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    queue: self.index,
                    waited: timeout,
                });
            }
            if self.sleep_on_call(deadline - now)? {
                self.stats.interrupts += 1;
                if self.used_idx()? == self.last_used {
                    self.stats.spurious_wakeups += 1;
                }
            }
        }
    }

    /// Waits up to `timeout` for the call eventfd; clears it. Returns whether it
    /// was signalled.
    fn sleep_on_call(&self, timeout: Duration) -> Result<bool, Error> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up so a sub-millisecond remainder still sleeps.
        let ms = timeout.as_micros().div_ceil(1000);
        let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and the
        // count is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(Error::EventFd(err));
        }
        if rc == 0 {
            return Ok(false);
        }
        match self.call.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(Error::EventFd(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue as DeviceQueue, QueueT};

    /// A device-side view of `q` from virtio-queue, as a backend would see it.
    fn device(q: &Queue, event_idx: bool) -> DeviceQueue {
        let mut dq = DeviceQueue::new(q.size()).unwrap();
        dq.set_size(q.size());
        let split = |a: GuestAddress| {
            let lo = u32::try_from(a.0 & 0xffff_ffff).unwrap();
            let hi = u32::try_from(a.0 >> 32).unwrap();
            (Some(lo), Some(hi))
        };
        let (lo, hi) = split(q.desc_table());
        dq.set_desc_table_address(lo, hi);
        let (lo, hi) = split(q.avail_ring());
        dq.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(q.used_ring());
        dq.set_used_ring_address(lo, hi);
        dq.set_event_idx(event_idx);
        dq.set_ready(true);
        dq
    }

    #[test]
    fn chains_round_trip_through_a_device_queue_out_of_order() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut q = Queue::new(0, 8, &ram, false, Duration::from_secs(1)).unwrap();
        let mut dq = device(&q, false);
        let mut a = [
            Descriptor::readable(GuestAddress(0x10000), 16),
            Descriptor::writable(GuestAddress(0x20000), 512),
        ];
        link(&mut a);
        let ia = q.push_chain(&a).unwrap();
        let ib = q
            .push_chain(&[Descriptor::writable(GuestAddress(0x30000), 1)])
            .unwrap();
        assert!(q.kick().unwrap(), "first kick is always needed");

        let mem = ram.mem();
        let ca = dq.pop_descriptor_chain(mem).unwrap();
        let cb = dq.pop_descriptor_chain(mem).unwrap();
        assert!(dq.pop_descriptor_chain(mem).is_none());
        assert_eq!(ca.head_index(), ia.0);
        let descs: Vec<_> = ca.collect();
        assert_eq!(descs.len(), 2);
        assert_eq!(descs[0].addr(), GuestAddress(0x10000));
        assert!(!descs[0].is_write_only());
        assert!(descs[1].is_write_only());
        assert_eq!(descs[1].len(), 512);

        // Complete b before a.
        dq.add_used(mem, cb.head_index(), 1).unwrap();
        dq.add_used(mem, ia.0, 512).unwrap();
        let mut out = Vec::new();
        assert_eq!(q.poll(&mut out).unwrap(), 2);
        assert_eq!(out[0].chain(), Some(ib));
        assert_eq!(out[0].kind, CompletionKind::Raw);
        assert_eq!((out[1].chain(), out[1].len), (Some(ia), 512));
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.free_descriptors(), 8);
    }

    #[test]
    fn malformed_chains_are_written_verbatim() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut q = Queue::new(0, 4, &ram, false, Duration::from_secs(1)).unwrap();
        // A two-entry loop.
        let looped = [
            Descriptor::readable(GuestAddress(0x10000), 16)
                .with_flags(DESC_F_NEXT)
                .with_next(Next::Entry(1)),
            Descriptor::writable(GuestAddress(u64::MAX - 4), 1)
                .with_flags(DESC_F_NEXT)
                .with_next(Next::Entry(0)),
        ];
        let id = q.push_chain(&looped).unwrap();
        let d0 = ram
            .read_vec(GuestAddress(q.desc_table().0 + 16 * u64::from(id.0)), 16)
            .unwrap();
        let slot1 = u16::from_le_bytes([d0[14], d0[15]]);
        let d1 = ram
            .read_vec(GuestAddress(q.desc_table().0 + 16 * u64::from(slot1)), 16)
            .unwrap();
        assert_eq!(u16::from_le_bytes([d1[14], d1[15]]), id.0);
        assert_eq!(
            u64::from_le_bytes(d1[0..8].try_into().unwrap()),
            u64::MAX - 4
        );
        assert!(matches!(
            q.push_chain(&[Descriptor::readable(GuestAddress(0), 1).with_next(Next::Entry(5))]),
            Err(Error::BadNextEntry { entry: 0, next: 5 })
        ));
        assert_eq!(
            q.free_descriptors(),
            2,
            "a rejected chain returns its slots"
        );
        assert!(matches!(q.push_chain(&[]), Err(Error::EmptyChain)));
    }

    #[test]
    fn event_idx_suppresses_kicks_and_arms_interrupts() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut q = Queue::new(0, 8, &ram, true, Duration::from_millis(50)).unwrap();
        let mut dq = device(&q, true);
        let mem = ram.mem();
        q.push_chain(&[Descriptor::writable(GuestAddress(0x10000), 8)])
            .unwrap();
        assert!(q.kick().unwrap());
        // The device consumes, and sets avail_event = its next_avail (1) when it
        // re-enables notifications.
        let c = dq.pop_descriptor_chain(mem).unwrap();
        dq.enable_notification(mem).unwrap();
        q.push_chain(&[Descriptor::writable(GuestAddress(0x10000), 8)])
            .unwrap();
        assert!(q.kick().unwrap(), "avail_event == old idx: kick");
        q.push_chain(&[Descriptor::writable(GuestAddress(0x10000), 8)])
            .unwrap();
        assert!(!q.kick().unwrap(), "device has not caught up: no kick");
        assert_eq!(q.stats().kicks_suppressed, 1);

        // Nothing used yet: wait times out and leaves used_event armed at 0.
        let mut out = Vec::new();
        assert!(matches!(
            q.wait(&mut out, Duration::from_millis(20)),
            Err(Error::Timeout { .. })
        ));
        dq.add_used(mem, c.head_index(), 8).unwrap();
        assert!(
            dq.needs_notification(mem).unwrap(),
            "used_event armed by wait"
        );
        assert_eq!(q.wait(&mut out, Duration::from_millis(20)).unwrap(), 1);
    }

    #[test]
    fn wait_for_keeps_other_completions_and_unknown_ids_are_reported() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut q = Queue::new(0, 4, &ram, false, Duration::from_secs(1)).unwrap();
        let mut dq = device(&q, false);
        let mem = ram.mem();
        let a = q
            .push_chain(&[Descriptor::writable(GuestAddress(0x10000), 8)])
            .unwrap();
        let b = q
            .push_chain(&[Descriptor::writable(GuestAddress(0x10000), 8)])
            .unwrap();
        q.kick().unwrap();
        dq.pop_descriptor_chain(mem).unwrap();
        dq.pop_descriptor_chain(mem).unwrap();
        dq.add_used(mem, a.0, 0).unwrap();
        dq.add_used(mem, 3, 7).unwrap(); // never submitted
        dq.add_used(mem, b.0, 0).unwrap();
        let got = q.wait_for(b, Duration::from_millis(10)).unwrap();
        assert_eq!(got.chain(), Some(b));
        let mut out = Vec::new();
        q.poll(&mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].chain(), Some(a));
        assert_eq!((out[1].id, out[1].kind), (3, CompletionKind::Unknown));
        assert_eq!(q.stats().unknown_used, 1);
    }

    #[test]
    fn indirect_tables_resolve_next_within_the_table() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let table = ram.alloc(64).unwrap();
        let mut descs = [
            Descriptor::readable(GuestAddress(0x10000), 16),
            Descriptor::writable(GuestAddress(0x20000), 1),
        ];
        link(&mut descs);
        write_table(&ram, table.gpa(), &descs).unwrap();
        let raw = table.read().unwrap();
        assert_eq!(u16::from_le_bytes([raw[12], raw[13]]), DESC_F_NEXT);
        assert_eq!(u16::from_le_bytes([raw[14], raw[15]]), 1);
        assert_eq!(u16::from_le_bytes([raw[28], raw[29]]), DESC_F_WRITE);
    }
}
