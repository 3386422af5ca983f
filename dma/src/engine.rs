//! The engine: what happens to a request between its arrival and its completion.
//!
//! An interface calls, for every request that carries data:
//! 1. [`Engine::arrive`]: the request gets an id and a [`Ticket`]; the fault plan
//!    decides how it waits; a read's destination gets its canary, a write's
//!    source is hashed; overlap with other requests in flight is checked.
//! 2. After the wait, [`Engine::to_guest`] or [`Engine::from_guest`]: the canary
//!    or the hash is checked, then the data moves.
//! 3. [`Engine::complete`]: the request is recorded in the ledger; a watch, if
//!    asked for, comes back to the interface to run later with [`Engine::watch`].
//!
//! Every check is a switch ([`Checks`]); with all off, arrival costs an id, a
//! look at an empty fault plan and a clock read.
//!
//! A ticket keeps no copy of the request's data, so what a waiting request
//! costs grows with its segments (which the interfaces bound by count), not
//! with the bytes they name, however often they name the same memory:
//! - the canary is not kept: it is a function of the request id and the
//!   offset ([`canary::fill`]), so the check at DMA time makes it again, 4 KiB
//!   at a time ([`canary::check_stamped`]);
//! - a write source is kept as one hash per segment;
//! - for a watch, what the device wrote is kept as one mark (8 bytes: a
//!   hash and the zero and free-poison bytes counted) per 512-byte block of
//!   each distinct segment; segments that name the same memory again are
//!   marked once, with what the device wrote there last;
//! - the overlap check keeps each request's distinct pages, as 64-page chunks
//!   with a bit per page, in one index by chunk: an arrival looks up its own
//!   chunks, not every other request's segments.
//!
//! What a guest can grow or drive is bounded: the zero-buffer suspects by
//! [`MAX_ZERO_SUSPECTS`] pages, the bits a `corrupt` effect flips by the
//! request's own bits and [`MAX_CORRUPT_BITS`], a test tag by [`MAX_TAG_BYTES`]
//! and a mark's label by [`MAX_LABEL_BYTES`] (longer ones are refused, so
//! nothing a guest names is copied into records past that), a finding's detail
//! by [`MAX_DETAIL_BYTES`], the ledger by its count and bytes
//! ([`crate::ledger`]), and the reads waiting for their watch by
//! [`WatchLimits`] (4096 of them and 1 GiB of guest memory watched, by
//! default); a read past them is not watched, and counted
//! ([`WatchFigures::refused`]).
//! The zero page may be any page, the last of the address space too.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::canary;
use crate::fault::{Decision, Effect, FaultPlan, Wait, MAX_CORRUPT_BITS};
use crate::finding::{Finding, FindingKind};
use crate::ledger::{
    Entry, Ledger, RequestRecord, TextTooLong, MAX_DETAIL_BYTES, MAX_LABEL_BYTES, MAX_TAG_BYTES,
};
use crate::request::{Arrival, Op, ReqId};
use crate::segment::{Gpa, Segment};
use crate::transfer::{self, TransferError};

/// Guest pages are 4 KiB for overlap and zero-page tracking.
pub const PAGE: u64 = 4096;

/// All-zero write sources from one page this many times make it a suspected zero buffer.
const ZERO_SUSPECT_THRESHOLD: u64 = 3;

/// The most pages whose all-zero write sources the engine counts, looking for a
/// zero buffer: 65,536 (256 MiB of guest pages; about 2 MiB of host memory).
/// Past it the page first seen is forgotten, so a guest writing zeros from
/// ever-new pages cannot grow the count, and a zero buffer is still found when
/// it is used three times within the last 65,536 distinct all-zero source pages.
pub const MAX_ZERO_SUSPECTS: usize = 65_536;

/// Which checks run. Each can be switched while the device runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checks {
    /// Stamp canaries into read destinations, check them at DMA time.
    pub canary: bool,
    /// Hash write sources at arrival, compare at DMA time.
    pub snapshot: bool,
    /// Look for requests in flight on the same guest page.
    pub overlap: bool,
    /// Record every request in the ledger (findings are always recorded).
    pub ledger: bool,
}

/// The engine's configuration at start.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub checks: Checks,
    pub ledger_capacity: usize,
    pub zero_page: Option<Gpa>,
    pub seed: u64,
    /// How many watches may be pending, over how much guest memory.
    pub watch_limits: WatchLimits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            checks: Checks::default(),
            ledger_capacity: crate::ledger::DEFAULT_CAPACITY,
            zero_page: None,
            seed: 0,
            watch_limits: WatchLimits::default(),
        }
    }
}

/// A request between arrival and completion.
///
/// It keeps no copy of the request's data: see the module's docs.
#[derive(Debug)]
pub struct Ticket {
    pub id: ReqId,
    pub arrival: Arrival,
    pub wait: Wait,
    pub watch: Option<Duration>,
    /// What a fault rule changes about this request, if anything.
    pub effect: Option<Effect>,
    tag: Option<String>,
    arrived_ns: u64,
    dma_ns: Option<u64>,
    /// Whether the canary was stamped into every destination segment; it is
    /// made again to be checked.
    stamped: bool,
    /// The hash of each source segment at arrival.
    hashes: Option<Vec<u64>>,
    /// What the device wrote into guest memory, marked for a watch.
    written: Option<Written>,
    tracked: bool,
}

impl Ticket {
    /// The test tag the request arrived under.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The heap memory the ticket holds: its segments, tag, source hashes and
    /// marks, each in proportion to the request's segments.
    pub fn retained_bytes(&self) -> usize {
        vec_bytes(&self.arrival.segments)
            + self.tag.as_ref().map_or(0, String::capacity)
            + self.hashes.as_ref().map_or(0, vec_bytes)
            + self.written.as_ref().map_or(0, Written::retained_bytes)
    }
}

/// The heap memory a vector holds.
fn vec_bytes<T>(v: &Vec<T>) -> usize {
    v.capacity() * std::mem::size_of::<T>()
}

/// A post-completion check to run later.
#[derive(Debug)]
pub struct WatchTask {
    pub id: ReqId,
    pub due: Duration,
    op: Op,
    queue: u16,
    lba: u64,
    tag: Option<String>,
    written: Written,
}

impl WatchTask {
    /// The heap memory the watch holds: its tag, distinct segments and marks.
    pub fn retained_bytes(&self) -> usize {
        self.tag.as_ref().map_or(0, String::capacity) + self.written.retained_bytes()
    }
}

/// The bytes a [`Mark`] stands for: 512-byte blocks of guest memory.
const BLOCK: u64 = 512;

/// A block's worth of what the device wrote, in 8 bytes: a 44-bit hash of its
/// bytes, and how many of them were zero and free-poison (10 bits each: a
/// block has at most 512 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mark(u64);

impl Mark {
    const COUNT_BITS: u32 = 10;
    const COUNTS: u64 = (1 << (2 * Self::COUNT_BITS)) - 1;

    /// The mark of `bytes`, at most a block of them.
    fn of(bytes: &[u8]) -> Mark {
        let count = |v: u8| bytes.iter().filter(|&&b| b == v).count() as u64;
        let hash = xxhash_rust::xxh3::xxh3_64(bytes) & !Self::COUNTS;
        Mark(hash | (count(0) << Self::COUNT_BITS) | count(canary::FREE_POISON))
    }

    /// Whether `bytes` are, as far as a 44-bit hash tells, the ones marked.
    fn matches(self, bytes: &[u8]) -> bool {
        (xxhash_rust::xxh3::xxh3_64(bytes) ^ self.0) & !Self::COUNTS == 0
    }

    fn zeros(self) -> u64 {
        (self.0 >> Self::COUNT_BITS) & ((1 << Self::COUNT_BITS) - 1)
    }

    fn poison(self) -> u64 {
        self.0 & ((1 << Self::COUNT_BITS) - 1)
    }
}

/// The blocks of `seg` (cut at 512-byte boundaries of guest memory): each
/// one's offset in the segment and length.
fn blocks(seg: Segment) -> impl Iterator<Item = (u64, usize)> {
    let (start, len) = (seg.gpa.0, u64::from(seg.len));
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        // Up to the next block boundary; the address is in guest memory, so
        // the sum does not wrap.
        let to_boundary = BLOCK - start.wrapping_add(at) % BLOCK;
        let n = to_boundary.min(len - at);
        let block = (at, n as usize);
        at += n;
        Some(block)
    })
}

/// How many blocks `seg` covers.
fn block_count(seg: Segment) -> usize {
    blocks(seg).count()
}

/// What a read's DMA wrote into guest memory, kept for its watch: the
/// distinct destination segments, in the order they first appear, and each
/// one's marks, one per block. A segment named again (two descriptors for
/// one buffer) is marked once, with what the device wrote there last, which
/// is what memory held when the DMA ended.
#[derive(Debug)]
struct Written {
    segments: Vec<Segment>,
    marks: Vec<Mark>,
    /// Its place among the pending watches, given back when it is dropped.
    _slot: WatchSlot,
}

impl Written {
    /// The distinct segments of `segments`, and for each one where its data
    /// starts in the request's data the last time it is named.
    fn distinct(segments: &[Segment]) -> Vec<(Segment, usize)> {
        let mut index: HashMap<Segment, usize> = HashMap::new();
        let mut distinct: Vec<(Segment, usize)> = Vec::new();
        let mut at = 0usize;
        for &seg in segments {
            match index.get(&seg) {
                Some(&i) => distinct[i].1 = at,
                None => {
                    index.insert(seg, distinct.len());
                    distinct.push((seg, at));
                }
            }
            at += seg.len_usize();
        }
        distinct
    }

    /// Marks what `data` put into each of the `distinct` segments.
    fn mark(distinct: &[(Segment, usize)], data: &[u8], slot: WatchSlot) -> Written {
        let mut marks = Vec::with_capacity(slot.blocks);
        for &(seg, from) in distinct {
            for (at, n) in blocks(seg) {
                let at = from + at as usize;
                marks.push(Mark::of(&data[at..at + n]));
            }
        }
        Written {
            segments: distinct.iter().map(|&(seg, _)| seg).collect(),
            marks,
            _slot: slot,
        }
    }

    fn retained_bytes(&self) -> usize {
        vec_bytes(&self.segments) + vec_bytes(&self.marks)
    }
}

/// How many completed reads may wait for their watch at once, and how much
/// guest memory they may watch together (counted in whole 512-byte blocks,
/// each one's mark 8 bytes). A read past either is not watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WatchLimits {
    pub watches: usize,
    pub bytes: u64,
}

impl Default for WatchLimits {
    /// 4096 watches, 1 GiB of guest memory (16 MiB of marks).
    fn default() -> Self {
        WatchLimits {
            watches: 4096,
            bytes: 1 << 30,
        }
    }
}

/// The pending watches at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WatchFigures {
    /// Reads whose watch is pending (from their DMA until the watch ran or
    /// was dropped).
    pub pending: usize,
    /// The guest memory they watch, in whole 512-byte blocks.
    pub pending_bytes: u64,
    /// Reads that a rule asked to watch but were not, past the limits.
    pub refused: u64,
    pub limits: WatchLimits,
}

/// The pending watches, counted against their limits.
#[derive(Debug, Default)]
struct WatchBudget {
    limits: WatchLimits,
    watches: usize,
    blocks: u64,
}

/// A pending watch's share of the [`WatchBudget`], given back when dropped,
/// whether the watch ran or was dropped unrun (a queue stopped, a frontend
/// left).
#[derive(Debug)]
struct WatchSlot {
    budget: Arc<Mutex<WatchBudget>>,
    blocks: usize,
}

impl WatchSlot {
    /// A slot for a watch of `blocks` blocks, if the limits leave room.
    fn take(budget: &Arc<Mutex<WatchBudget>>, blocks: usize) -> Option<WatchSlot> {
        let mut b = lock(budget);
        let wanted = b.blocks.saturating_add(blocks as u64);
        if b.watches >= b.limits.watches || wanted.saturating_mul(BLOCK) > b.limits.bytes {
            return None;
        }
        b.watches += 1;
        b.blocks = wanted;
        Some(WatchSlot {
            budget: Arc::clone(budget),
            blocks,
        })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut b = lock(&self.budget);
        b.watches -= 1;
        b.blocks -= self.blocks as u64;
    }
}

/// Guest pages per chunk of the overlap index: a bit each in a `u64`.
const CHUNK_PAGES: u64 = 64;

/// The requests in flight, for the overlap check: each request's distinct
/// pages as 64-page chunks with a bit per page, indexed by chunk. An arrival
/// looks up its own chunks; a completion takes out exactly what its arrival
/// put in.
#[derive(Debug, Default)]
struct InFlight {
    /// (chunk, request) → the chunk's pages the request touches.
    chunks: BTreeMap<(u64, ReqId), Pages>,
    /// Each request's chunks, to take it out again.
    requests: HashMap<ReqId, Vec<u64>>,
}

/// A request's pages within one chunk.
#[derive(Clone, Copy, Debug)]
struct Pages {
    /// Bit `i`: page `chunk * 64 + i`.
    mask: u64,
    writes_memory: bool,
}

/// The distinct pages of `segments`, as (chunk, mask) in chunk order.
fn page_chunks(segments: &[Segment]) -> Vec<(u64, u64)> {
    let mut chunks: Vec<(u64, u64)> = Vec::new();
    for r in crate::segment::distinct_pages(segments, PAGE) {
        let mut page = r.start;
        while page < r.end {
            let (chunk, bit) = (page / CHUNK_PAGES, page % CHUNK_PAGES);
            let n = (CHUNK_PAGES - bit).min(r.end - page);
            let mask = (u64::MAX >> (CHUNK_PAGES - n)) << bit;
            match chunks.last_mut() {
                Some((c, m)) if *c == chunk => *m |= mask,
                _ => chunks.push((chunk, mask)),
            }
            page += n;
        }
    }
    chunks
}

#[derive(Debug, Default)]
struct ZeroState {
    /// Page-aligned ([`page_start`]).
    page: Option<Gpa>,
    /// Page number → how often an all-zero write came from it; at most
    /// [`MAX_ZERO_SUSPECTS`] pages.
    suspects: HashMap<u64, u64>,
    /// The pages in `suspects`, first seen first: the next to forget.
    seen: VecDeque<u64>,
}

impl ZeroState {
    /// Counts an all-zero write sourced from page number `page`: how many
    /// there have been since the page was last forgotten.
    fn suspect(&mut self, page: u64) -> u64 {
        if let Some(n) = self.suspects.get_mut(&page) {
            *n = n.saturating_add(1);
            return *n;
        }
        if self.seen.len() >= MAX_ZERO_SUSPECTS {
            if let Some(oldest) = self.seen.pop_front() {
                self.suspects.remove(&oldest);
            }
        }
        self.seen.push_back(page);
        self.suspects.insert(page, 1);
        1
    }
}

/// The start of the page holding `gpa`.
fn page_start(gpa: Gpa) -> Gpa {
    Gpa(gpa.0 - gpa.0 % PAGE)
}

/// The DMA engine. One per device, shared by every queue and connection.
#[derive(Debug)]
pub struct Engine {
    canary: AtomicBool,
    snapshot: AtomicBool,
    overlap: AtomicBool,
    ledger_on: AtomicBool,
    faults: FaultPlan,
    ledger: Mutex<Ledger>,
    inflight: Mutex<InFlight>,
    watches: Arc<Mutex<WatchBudget>>,
    watches_refused: AtomicU64,
    zero: Mutex<ZeroState>,
    tag: Mutex<Option<String>>,
    /// Whether `tag` is set: the hot path looks here, not in the mutex.
    tagged: AtomicBool,
    rng: crate::rng::SeededRng,
    next_id: AtomicU64,
    findings: [AtomicU64; FindingKind::ALL.len()],
    epoch: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the data path down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Engine {
            canary: AtomicBool::new(config.checks.canary),
            snapshot: AtomicBool::new(config.checks.snapshot),
            overlap: AtomicBool::new(config.checks.overlap),
            ledger_on: AtomicBool::new(config.checks.ledger),
            faults: FaultPlan::new(config.seed),
            ledger: Mutex::new(Ledger::new(config.ledger_capacity)),
            inflight: Mutex::new(InFlight::default()),
            watches: Arc::new(Mutex::new(WatchBudget {
                limits: config.watch_limits,
                ..WatchBudget::default()
            })),
            watches_refused: AtomicU64::new(0),
            zero: Mutex::new(ZeroState {
                page: config.zero_page.map(page_start),
                ..ZeroState::default()
            }),
            tag: Mutex::new(None),
            tagged: AtomicBool::new(false),
            rng: crate::rng::SeededRng::new(config.seed ^ 0xc0_22e7),
            next_id: AtomicU64::new(1),
            findings: Default::default(),
            epoch: Instant::now(),
        }
    }

    pub fn faults(&self) -> &FaultPlan {
        &self.faults
    }

    pub fn checks(&self) -> Checks {
        Checks {
            canary: self.canary.load(Ordering::Relaxed),
            snapshot: self.snapshot.load(Ordering::Relaxed),
            overlap: self.overlap.load(Ordering::Relaxed),
            ledger: self.ledger_on.load(Ordering::Relaxed),
        }
    }

    pub fn set_checks(&self, c: Checks) {
        self.canary.store(c.canary, Ordering::Relaxed);
        self.snapshot.store(c.snapshot, Ordering::Relaxed);
        self.overlap.store(c.overlap, Ordering::Relaxed);
        self.ledger_on.store(c.ledger, Ordering::Relaxed);
    }

    /// Registers the guest's zero page (page-aligned down, as
    /// [`EngineConfig::zero_page`] is). Any page will do, the last of the
    /// address space too.
    pub fn set_zero_page(&self, gpa: Option<Gpa>) {
        lock(&self.zero).page = gpa.map(page_start);
    }

    pub fn zero_page(&self) -> Option<Gpa> {
        lock(&self.zero).page
    }

    /// Sets how many reads may wait for their watch, and how much guest
    /// memory they may watch together (the watches pending stay).
    pub fn set_watch_limits(&self, limits: WatchLimits) {
        lock(&self.watches).limits = limits;
    }

    pub fn watch_limits(&self) -> WatchLimits {
        lock(&self.watches).limits
    }

    /// The watches pending, and the reads not watched for want of room.
    pub fn watch_figures(&self) -> WatchFigures {
        let b = lock(&self.watches);
        WatchFigures {
            pending: b.watches,
            pending_bytes: b.blocks.saturating_mul(BLOCK),
            refused: self.watches_refused.load(Ordering::Relaxed),
            limits: b.limits,
        }
    }

    /// The test tag that requests arriving from now on carry. A tag longer
    /// than [`MAX_TAG_BYTES`] is refused and the one in force stays.
    pub fn set_tag(&self, tag: Option<String>) -> Result<(), TextTooLong> {
        if let Some(t) = &tag {
            TextTooLong::check("tag", t, MAX_TAG_BYTES)?;
        }
        let mut t = lock(&self.tag);
        self.tagged.store(tag.is_some(), Ordering::Release);
        *t = tag;
        Ok(())
    }

    pub fn tag(&self) -> Option<String> {
        if !self.tagged.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.tag).clone()
    }

    /// The time for a request's record: only the ledger reads it, so with the
    /// ledger off the clock is not read at all.
    fn stamp_ns(&self) -> u64 {
        if self.ledger_on.load(Ordering::Relaxed) {
            self.now_ns()
        } else {
            0
        }
    }

    /// Nanoseconds since the engine started.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// How many findings of each kind were recorded.
    pub fn finding_counts(&self) -> Vec<(FindingKind, u64)> {
        FindingKind::ALL
            .iter()
            .zip(&self.findings)
            .map(|(&k, n)| (k, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Records a named moment in the ledger (always, like findings) and
    /// returns its time. A label longer than [`MAX_LABEL_BYTES`] is refused.
    pub fn mark(&self, label: &str) -> Result<u64, TextTooLong> {
        TextTooLong::check("label", label, MAX_LABEL_BYTES)?;
        let at_ns = self.now_ns();
        self.ledger().push(Entry::Mark(crate::ledger::MarkRecord {
            label: label.to_owned(),
            at_ns,
            tag: self.tag(),
        }));
        Ok(at_ns)
    }

    /// Sets every finding count back to zero (the ledger keeps its entries).
    pub fn reset_finding_counts(&self) {
        for n in &self.findings {
            n.store(0, Ordering::Relaxed);
        }
    }

    /// A request arrives: decide its wait, stamp canaries, hash sources, check overlap.
    pub fn arrive<M: GuestMemoryBackend>(&self, mem: &M, arrival: Arrival) -> Ticket {
        let id = ReqId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let tag = self.tag();
        let Decision {
            wait,
            watch,
            effect,
        } = if self.faults.is_empty() {
            Decision {
                wait: Wait::None,
                watch: None,
                effect: None,
            }
        } else {
            self.faults.decide(&arrival, tag.as_deref())
        };
        let mut t = Ticket {
            id,
            arrival,
            wait,
            watch,
            effect,
            tag,
            arrived_ns: self.stamp_ns(),
            dma_ns: None,
            stamped: false,
            hashes: None,
            written: None,
            tracked: false,
        };
        if t.arrival.segments.is_empty() {
            return t;
        }
        if t.arrival.op.writes_memory() {
            self.check_zero_page_target(&t);
            if self.canary.load(Ordering::Relaxed) {
                t.stamped = self.stamp(mem, &t);
            }
        }
        if t.arrival.op.reads_memory() && self.snapshot.load(Ordering::Relaxed) {
            t.hashes = hash_segments(mem, &t.arrival.segments);
        }
        if self.overlap.load(Ordering::Relaxed) {
            self.track(&mut t);
        }
        t
    }

    /// Device-to-memory DMA: checks the canary, then copies `data` into the
    /// request's segments (as a fault effect shapes them: corrupted, partial, or
    /// one page off).
    pub fn to_guest<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        t: &mut Ticket,
        data: &[u8],
    ) -> Result<(), TransferError> {
        if std::mem::take(&mut t.stamped) {
            self.check_canary(mem, t);
        }
        match t.effect {
            None => transfer::to_guest(mem, &t.arrival.segments, data)?,
            Some(Effect::Corrupt { bits }) => {
                let mut bad = data.to_vec();
                self.flip_bits(&mut bad, bits);
                transfer::to_guest(mem, &t.arrival.segments, &bad)?;
            }
            Some(Effect::Partial { bytes }) => {
                let n = usize::try_from(bytes).unwrap_or(usize::MAX).min(data.len());
                let segs = truncated(&t.arrival.segments, n);
                transfer::to_guest(mem, &segs, &data[..n])?;
            }
            Some(Effect::WrongPage) => {
                transfer::to_guest(mem, &next_page(&t.arrival.segments), data)?;
            }
            Some(_) => transfer::to_guest(mem, &t.arrival.segments, data)?,
        }
        t.dma_ns = Some(self.stamp_ns());
        // A watch compares with what the guest was given; with an effect that
        // changed or moved the data there is nothing true to compare with.
        if t.watch.is_some() && t.effect.is_none() {
            let distinct = Written::distinct(&t.arrival.segments);
            let blocks = distinct.iter().map(|&(seg, _)| block_count(seg)).sum();
            match WatchSlot::take(&self.watches, blocks) {
                Some(slot) => t.written = Some(Written::mark(&distinct, data, slot)),
                None => {
                    self.watches_refused.fetch_add(1, Ordering::Relaxed);
                    log::debug!("req={} not watched: too many watches pending", t.id);
                }
            }
        }
        Ok(())
    }

    /// Whether a read's data must pass through a host buffer and
    /// [`Engine::to_guest`]: an effect changes or moves it, or a watch marks
    /// it. Otherwise the device may move it straight into guest memory and
    /// tell the engine through [`Engine::deliver`].
    pub fn read_needs_buffer(&self, t: &Ticket) -> bool {
        t.effect.is_some() || t.watch.is_some()
    }

    /// Device-to-memory DMA that the caller carries out: `dma` moves the data
    /// into the ticket's segments itself (say, straight from the media). Around
    /// it the engine does what [`Engine::to_guest`] does: canaries are checked
    /// before, the DMA time is stamped after.
    pub fn deliver<E>(
        &self,
        mem: &impl GuestMemoryBackend,
        t: &mut Ticket,
        dma: impl FnOnce(&[Segment]) -> Result<(), E>,
    ) -> Result<(), E> {
        if std::mem::take(&mut t.stamped) {
            self.check_canary(mem, t);
        }
        dma(&t.arrival.segments)?;
        t.dma_ns = Some(self.stamp_ns());
        Ok(())
    }

    /// Memory-to-device DMA: copies the request's segments into `buf`, then
    /// compares them with their arrival hashes and looks for zero sources.
    pub fn from_guest<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        t: &mut Ticket,
        buf: &mut [u8],
    ) -> Result<(), TransferError> {
        if t.effect == Some(Effect::WrongPage) {
            transfer::from_guest(mem, &next_page(&t.arrival.segments), buf)?;
        } else {
            transfer::from_guest(mem, &t.arrival.segments, buf)?;
        }
        t.dma_ns = Some(self.stamp_ns());
        // The wrong-page mutant read other memory: its hashes do not apply.
        if let Some(hashes) = t
            .hashes
            .take()
            .filter(|_| t.effect != Some(Effect::WrongPage))
        {
            self.check_sources(t, buf, &hashes);
        }
        self.check_zero_sources(t, buf);
        if let Some(Effect::Corrupt { bits }) = t.effect {
            self.flip_bits(buf, bits);
        }
        Ok(())
    }

    /// Flips `bits` distinct bits of `data`, at places the seeded generator
    /// picks; all of them when `data` has fewer. The work is one draw per flip,
    /// never more than the data's bits nor [`MAX_CORRUPT_BITS`], whatever the rule.
    fn flip_bits(&self, data: &mut [u8], bits: u32) {
        let total = u64::try_from(data.len())
            .unwrap_or(u64::MAX)
            .saturating_mul(8);
        let k = u64::from(bits.min(MAX_CORRUPT_BITS)).min(total);
        // Floyd's sampling: k distinct bits out of `total`, in k draws.
        let mut flipped = HashSet::new();
        for j in total - k..total {
            let t = self.rng.in_range(0, j);
            let bit = if flipped.insert(t) {
                t
            } else {
                flipped.insert(j);
                j
            };
            if let Ok(byte) = usize::try_from(bit / 8) {
                data[byte] ^= 1 << (bit % 8);
            }
        }
    }

    /// The request completed with `status`: record it; hand back its watch, if any.
    pub fn complete(&self, mut t: Ticket, status: &str) -> Option<WatchTask> {
        if t.tracked {
            let mut inflight = lock(&self.inflight);
            for chunk in inflight.requests.remove(&t.id).unwrap_or_default() {
                inflight.chunks.remove(&(chunk, t.id));
            }
        }
        if self.ledger_on.load(Ordering::Relaxed) {
            let record = RequestRecord {
                request: t.id,
                op: t.arrival.op,
                queue: t.arrival.queue,
                lba: t.arrival.lba,
                len: t.arrival.len,
                segments: t.arrival.segments.clone(),
                moved_to: (t.effect == Some(Effect::WrongPage) && t.dma_ns.is_some())
                    .then(|| next_page(&t.arrival.segments)),
                arrived_ns: t.arrived_ns,
                dma_ns: t.dma_ns,
                completed_ns: self.now_ns(),
                wait: t.wait.to_string(),
                status: status.to_owned(),
                tag: t.tag.clone(),
            };
            self.ledger().push(Entry::Request(record));
        }
        let due = t.watch?;
        let written = t.written.take()?;
        Some(WatchTask {
            id: t.id,
            due,
            op: t.arrival.op,
            queue: t.arrival.queue,
            lba: t.arrival.lba,
            tag: t.tag,
            written,
        })
    }

    /// Re-reads a completed read's destination: if what the device wrote has
    /// been replaced by zeros or free-poison, the data went to a page nobody owned.
    pub fn watch<M: GuestMemoryBackend>(&self, mem: &M, w: &WatchTask) {
        let written = &w.written;
        // As when the whole destination was read back at once: all or nothing.
        if !written.segments.iter().all(|s| s.is_in(mem)) {
            return;
        }
        let mut marks = written.marks.iter();
        let mut now = [0u8; BLOCK as usize];
        for seg in &written.segments {
            // Only blocks that changed tell what happened: blocks now all
            // zeros or all free-poison mean the page was freed; a block with
            // anything else is the guest using its memory again, as it may
            // once the read completed. What changed in a block that is all
            // zeros now is every byte the device had not written as zero.
            let (mut zeros, mut poison, mut other) = (0u64, 0u64, false);
            for (at, n) in blocks(*seg) {
                let Some(&was) = marks.next() else { return };
                let now = &mut now[..n];
                if mem.read_slice(now, GuestAddress(seg.gpa.0 + at)).is_err() {
                    return;
                }
                if was.matches(now) {
                    continue;
                }
                // A block that changed into all zeros had fewer than `n`.
                if now.iter().all(|&b| b == 0) {
                    zeros += (n as u64).saturating_sub(was.zeros());
                } else if now.iter().all(|&b| b == canary::FREE_POISON) {
                    poison += (n as u64).saturating_sub(was.poison());
                } else {
                    other = true;
                }
            }
            let (class, gone) = match (other, zeros, poison) {
                (false, gone, 0) if gone > 0 => ("zeros", gone),
                (false, 0, gone) if gone > 0 => ("free-poison", gone),
                _ => continue,
            };
            self.record(Finding {
                finding: FindingKind::DataVanishedAfterCompletion,
                info: false,
                request: w.id,
                op: w.op,
                queue: w.queue,
                lba: w.lba,
                gpa: seg.gpa,
                len: u64::from(seg.len),
                class: Some(class.into()),
                bytes: gone,
                other_request: None,
                at_ns: self.now_ns(),
                tag: w.tag.clone(),
                detail: format!(
                    "{gone} B the device wrote at {} were {class} {} ms after completion: \
                     the page was freed",
                    seg.gpa,
                    w.due.as_millis()
                ),
            });
        }
    }

    /// Stamps the canary into every destination segment; whether it all went in.
    fn stamp<M: GuestMemoryBackend>(&self, mem: &M, t: &Ticket) -> bool {
        let mut req_offset = 0u64;
        for seg in &t.arrival.segments {
            let len = u64::from(seg.len);
            let put = |at: u64, bytes: &[u8]| mem.write_slice(bytes, GuestAddress(seg.gpa.0 + at));
            if !seg.is_in(mem) || canary::stamp(t.id, req_offset, len, put).is_err() {
                return false;
            }
            req_offset += len;
        }
        true
    }

    /// Checks each destination segment's canary, made again from the
    /// request's id and the segment's offset in it.
    fn check_canary<M: GuestMemoryBackend>(&self, mem: &M, t: &Ticket) {
        // As when the whole destination was read back at once: all or nothing.
        if !t.arrival.segments.iter().all(|s| s.is_in(mem)) {
            return;
        }
        let mut req_offset = 0u64;
        for seg in &t.arrival.segments {
            let len = u64::from(seg.len);
            let found = |at: u64, buf: &mut [u8]| mem.read_slice(buf, GuestAddress(seg.gpa.0 + at));
            let damage = canary::check_stamped(t.id, req_offset, len, found);
            req_offset += len;
            let d = match damage {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(_) => return,
            };
            let other = match d.overwrite {
                canary::Overwrite::Canary(id) => Some(id),
                _ => None,
            };
            let detail = format!(
                "{} of {} B of the read's destination at {} were overwritten ({}) \
                 before the DMA: the guest reused memory it had handed to the device",
                d.bytes,
                seg.len,
                seg.gpa,
                d.overwrite.name()
            );
            let mut f = self.finding(t, FindingKind::BufferReusedDuringDma, *seg, d.bytes, detail);
            f.gpa = Gpa(seg.gpa.0 + d.first);
            f.class = Some(d.overwrite.name().into());
            f.other_request = other;
            self.record(f);
        }
    }

    fn check_sources(&self, t: &Ticket, buf: &[u8], hashes: &[u64]) {
        let mut at = 0usize;
        for (seg, &before) in t.arrival.segments.iter().zip(hashes) {
            let n = seg.len_usize();
            let after = xxhash_rust::xxh3::xxh3_64(&buf[at..at + n]);
            at += n;
            if after == before {
                continue;
            }
            let detail = format!(
                "the {} B write source at {} changed between arrival and DMA",
                seg.len, seg.gpa
            );
            let kind = FindingKind::SourceChangedDuringDma;
            self.record(self.finding(t, kind, *seg, u64::from(seg.len), detail));
        }
    }

    fn check_zero_page_target(&self, t: &Ticket) {
        let Some(zp) = self.zero_page() else { return };
        for seg in &t.arrival.segments {
            if !seg.pages(PAGE).contains(&(zp.0 / PAGE)) {
                continue;
            }
            let detail = format!(
                "a {} targets the zero page at {zp}: every zero-filled page of the guest \
                 would change",
                t.arrival.op.name()
            );
            let kind = FindingKind::DmaToZeroPage;
            self.record(self.finding(t, kind, *seg, u64::from(seg.len), detail));
        }
    }

    fn check_zero_sources(&self, t: &Ticket, buf: &[u8]) {
        let zp = self.zero_page();
        let suspects = self.snapshot.load(Ordering::Relaxed) || zp.is_some();
        if !suspects {
            return;
        }
        let mut at = 0usize;
        for seg in &t.arrival.segments {
            let n = seg.len_usize();
            let data = &buf[at..at + n];
            at += n;
            // The bytes of this segment that lie on the zero page, if any: a
            // merged segment may run from a page of data into it.
            // Ends are inclusive (last bytes): the last page of the address
            // space ends at u64::MAX, one short of what `start + len` says.
            let on_zero_page = zp.and_then(|z| {
                let seg_last = seg.gpa.0.saturating_add(u64::from(seg.len).checked_sub(1)?);
                // `z` is page-aligned, so this is its page's last byte.
                let zero_last = z.0.saturating_add(PAGE - 1);
                let start = seg.gpa.0.max(z.0);
                let last = seg_last.min(zero_last);
                (start <= last).then(|| {
                    // Both within the segment: `last - gpa` < `len` <= u32::MAX.
                    let from = usize::try_from(start - seg.gpa.0).unwrap_or(0);
                    let to = usize::try_from(last - seg.gpa.0).unwrap_or(0) + 1;
                    &data[from..to]
                })
            });
            if let Some(zero_bytes) = on_zero_page {
                let nonzero = zero_bytes.iter().filter(|&&b| b != 0).count() as u64;
                let (kind, detail) = if nonzero == 0 {
                    (
                        FindingKind::ZeroPageSource,
                        format!("a {} B write was sourced from the zero page", seg.len),
                    )
                } else {
                    (
                        FindingKind::ZeroPageCorrupted,
                        format!(
                            "a write sourced from the zero page at {} carried {nonzero} non-zero \
                             bytes: the zero page was written",
                            seg.gpa
                        ),
                    )
                };
                self.record(self.finding(t, kind, *seg, nonzero, detail));
            } else if data.iter().all(|&b| b == 0) {
                let page = seg.gpa.0 / PAGE;
                let n = lock(&self.zero).suspect(page);
                if n == ZERO_SUSPECT_THRESHOLD {
                    let detail = format!(
                        "all-zero write sources came from the page at {:#x} {n} times: \
                         likely a zero buffer",
                        page * PAGE
                    );
                    self.record(self.finding(t, FindingKind::SuspectedZeroBuffer, *seg, 0, detail));
                }
            }
        }
    }

    fn finding(
        &self,
        t: &Ticket,
        kind: FindingKind,
        seg: Segment,
        bytes: u64,
        detail: String,
    ) -> Finding {
        Finding {
            finding: kind,
            info: kind.is_info(),
            request: t.id,
            op: t.arrival.op,
            queue: t.arrival.queue,
            lba: t.arrival.lba,
            gpa: seg.gpa,
            len: u64::from(seg.len),
            class: None,
            bytes,
            other_request: None,
            at_ns: self.now_ns(),
            tag: t.tag.clone(),
            detail,
        }
    }

    /// Indexes the request's distinct pages and reports each request in
    /// flight that shares one with it (when either writes memory), on the
    /// lowest page they share. Under the lock an arrival costs a look-up per
    /// 64-page chunk of its own pages, however many segments name them.
    fn track(&self, t: &mut Ticket) {
        let chunks = page_chunks(&t.arrival.segments);
        let writes_memory = t.arrival.op.writes_memory();
        let mut clashes: Vec<(ReqId, u64)> = Vec::new();
        let mut seen = HashSet::new();
        let mut inflight = lock(&self.inflight);
        for &(chunk, mask) in &chunks {
            let holders = inflight
                .chunks
                .range((chunk, ReqId(0))..=(chunk, ReqId(u64::MAX)));
            for (&(_, other), p) in holders {
                let shared = mask & p.mask;
                if shared != 0 && (writes_memory || p.writes_memory) && seen.insert(other) {
                    let page = chunk * CHUNK_PAGES + u64::from(shared.trailing_zeros());
                    clashes.push((other, page));
                }
            }
            let pages = Pages {
                mask,
                writes_memory,
            };
            inflight.chunks.insert((chunk, t.id), pages);
        }
        let chunks = chunks.into_iter().map(|(chunk, _)| chunk).collect();
        inflight.requests.insert(t.id, chunks);
        drop(inflight);
        t.tracked = true;
        for (other, page) in clashes {
            let mut f = self.finding(
                t,
                FindingKind::OverlappingInFlightDma,
                Segment::new(Gpa(page * PAGE), 4096),
                0,
                format!(
                    "requests {} ({}) and {other} are in flight on the guest page at {:#x}, \
                     and at least one writes memory",
                    t.id,
                    t.arrival.op.name(),
                    page * PAGE
                ),
            );
            f.other_request = Some(other);
            self.record(f);
        }
    }

    /// Guest pages the overlap check holds, summed over the requests in
    /// flight: each request's distinct pages, once.
    pub fn in_flight_pages(&self) -> usize {
        lock(&self.inflight)
            .chunks
            .values()
            .map(|p| p.mask.count_ones() as usize)
            .sum()
    }

    fn record(&self, mut f: Finding) {
        truncate_at_char(&mut f.detail, MAX_DETAIL_BYTES);
        if let Some(i) = FindingKind::ALL.iter().position(|&k| k == f.finding) {
            self.findings[i].fetch_add(1, Ordering::Relaxed);
        }
        log::debug!("finding {}: {}", f.finding.name(), f.detail);
        self.ledger().push(Entry::Finding(f));
    }
}

/// Cuts `text` to at most `max` bytes, at a character boundary.
fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let end = (0..=max)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(end);
    }
}

/// The first `n` bytes of `segments`.
fn truncated(segments: &[Segment], n: usize) -> Vec<Segment> {
    let mut left = n;
    let mut out = Vec::new();
    for s in segments {
        if left == 0 {
            break;
        }
        let take = left.min(s.len_usize());
        out.push(Segment::new(s.gpa, u32::try_from(take).unwrap_or(s.len)));
        left -= take;
    }
    out
}

/// The same segments, one guest page further on.
fn next_page(segments: &[Segment]) -> Vec<Segment> {
    segments
        .iter()
        .map(|s| Segment::new(Gpa(s.gpa.0.saturating_add(PAGE)), s.len))
        .collect()
}

fn hash_segments<M: GuestMemoryBackend>(mem: &M, segments: &[Segment]) -> Option<Vec<u64>> {
    let mut scratch = Vec::new();
    segments
        .iter()
        .map(|s| {
            scratch.resize(s.len_usize(), 0);
            mem.read_slice(&mut scratch, s.gpa.into()).ok()?;
            Some(xxhash_rust::xxh3::xxh3_64(&scratch))
        })
        .collect()
}

/// Whether `op` is one whose data segments the engine moves.
pub fn moves_data(op: Op) -> bool {
    op.writes_memory() || op.reads_memory()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::canary::FREE_POISON;
    use crate::fault::{Action, RuleSpec, MAX_CORRUPT_BITS};

    type Mem = GuestMemoryMmap<()>;
    /// Segments as (gpa, len).
    type Segs = &'static [(u64, u32)];

    /// A read's destination.
    const DST: u64 = 0x1_0000;
    /// Another read's destination, on other pages.
    const OTHER: u64 = 0x3_0000;
    /// A write's source.
    const SRC: u64 = 0x4_0000;
    /// The guest's zero page.
    const ZP: u64 = 0x5_0000;
    const LEN: u32 = 4096;
    const N: usize = LEN as usize;

    fn mem() -> Mem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn engine(checks: Checks) -> Engine {
        Engine::new(EngineConfig {
            checks,
            ..EngineConfig::default()
        })
    }

    fn canary_on() -> Checks {
        Checks {
            canary: true,
            ..Checks::default()
        }
    }

    fn snapshot_on() -> Checks {
        Checks {
            snapshot: true,
            ..Checks::default()
        }
    }

    fn overlap_on() -> Checks {
        Checks {
            overlap: true,
            ..Checks::default()
        }
    }

    fn with_zero_page() -> Engine {
        Engine::new(EngineConfig {
            zero_page: Some(Gpa(ZP)),
            ..EngineConfig::default()
        })
    }

    fn arrival(op: Op, segments: &[(u64, u32)]) -> Arrival {
        let segments: Vec<Segment> = segments
            .iter()
            .map(|&(gpa, len)| Segment::new(Gpa(gpa), len))
            .collect();
        Arrival {
            op,
            queue: 1,
            lba: 8,
            len: crate::segment::total_len(&segments),
            segments,
        }
    }

    fn read(gpa: u64, len: u32) -> Arrival {
        arrival(Op::Read, &[(gpa, len)])
    }

    fn write(gpa: u64, len: u32) -> Arrival {
        arrival(Op::Write, &[(gpa, len)])
    }

    fn peek(mem: &Mem, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        b
    }

    fn poke(mem: &Mem, gpa: u64, bytes: &[u8]) {
        mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }

    /// Data with no zero and no free-poison byte, so any zeroing or poisoning shows.
    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 0xa9) as u8 + 1).collect()
    }

    fn findings(e: &Engine) -> Vec<Finding> {
        e.ledger().findings().cloned().collect()
    }

    fn count(e: &Engine, kind: FindingKind) -> u64 {
        e.finding_counts()
            .into_iter()
            .find(|&(k, _)| k == kind)
            .map_or(0, |(_, n)| n)
    }

    /// The one finding recorded, checked against the counters.
    fn the_finding(e: &Engine) -> Finding {
        let all = findings(e);
        assert_eq!(all.len(), 1, "{all:#?}");
        let f = all.into_iter().next().unwrap();
        assert_eq!(count(e, f.finding), 1);
        f
    }

    fn assert_no_findings(e: &Engine) {
        assert_eq!(findings(e), vec![]);
        assert!(e.finding_counts().iter().all(|&(_, n)| n == 0));
    }

    /// Where `after` differs from `before`: (offset of the first change, bytes changed).
    fn diff(before: &[u8], after: &[u8]) -> (u64, u64) {
        let changed: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        (changed[0] as u64, changed.len() as u64)
    }

    /// A 4 KiB read at DST: it arrives, `spoil` may change guest memory, the
    /// DMA runs and the request completes. Returns the read's id and what
    /// `spoil` changed in the destination as (first offset, bytes).
    fn read_spoiled(e: &Engine, mem: &Mem, spoil: impl FnOnce(&Mem)) -> (ReqId, (u64, u64)) {
        let mut t = e.arrive(mem, read(DST, LEN));
        let stamped = peek(mem, DST, N);
        spoil(mem);
        let changed = diff(&stamped, &peek(mem, DST, N));
        let d = data(N);
        e.to_guest(mem, &mut t, &d).unwrap();
        assert_eq!(peek(mem, DST, N), d, "the data lands after the check");
        let id = t.id;
        assert!(e.complete(t, "ok").is_none());
        (id, changed)
    }

    fn assert_reused(e: &Engine, id: ReqId, changed: (u64, u64), class: &str) -> Finding {
        let f = the_finding(e);
        assert_eq!(f.finding, FindingKind::BufferReusedDuringDma);
        assert!(!f.info);
        assert_eq!(f.request, id);
        assert_eq!((f.op, f.queue, f.lba), (Op::Read, 1, 8));
        assert_eq!(f.gpa, Gpa(DST + changed.0));
        assert_eq!(f.len, u64::from(LEN));
        assert_eq!(f.class.as_deref(), Some(class));
        assert_eq!(f.bytes, changed.1);
        f
    }

    // buffer-reused-during-dma

    #[test]
    fn canary_zeroed_before_dma_is_reuse_by_zeros() {
        let (e, mem) = (engine(canary_on()), mem());
        let (id, changed) = read_spoiled(&e, &mem, |m| poke(m, DST + 512, &[0; 1024]));
        assert_eq!(changed, (512, 1024));
        let f = assert_reused(&e, id, changed, "zeros");
        assert_eq!(f.other_request, None);
    }

    #[test]
    fn canary_poisoned_before_dma_is_reuse_by_free_poison() {
        let (e, mem) = (engine(canary_on()), mem());
        let (id, changed) = read_spoiled(&e, &mem, |m| poke(m, DST + 2048, &[FREE_POISON; 100]));
        assert_eq!(changed, (2048, 100));
        let f = assert_reused(&e, id, changed, "free-poison");
        assert_eq!(f.other_request, None);
    }

    #[test]
    fn canary_of_another_request_is_reuse_by_other_canary() {
        let (e, mem) = (engine(canary_on()), mem());
        let mut other = None;
        let (id, changed) = read_spoiled(&e, &mem, |m| {
            let t = e.arrive(m, read(OTHER, LEN));
            let theirs = peek(m, OTHER, 256);
            poke(m, DST + 1024, &theirs);
            other = Some(t);
        });
        let other = other.unwrap();
        assert_ne!(other.id, id);
        let f = assert_reused(&e, id, changed, "other-canary");
        assert_eq!(f.other_request, Some(other.id));
        // The other read's own canary is intact: nothing more to report.
        let mut other = other;
        e.to_guest(&mem, &mut other, &data(N)).unwrap();
        assert_eq!(findings(&e).len(), 1);
    }

    #[test]
    fn canary_overwritten_by_data_is_reuse_by_other_data() {
        let (e, mem) = (engine(canary_on()), mem());
        let (id, changed) = read_spoiled(&e, &mem, |m| {
            poke(m, DST + 300, b"not a canary: a page of somebody's file")
        });
        let f = assert_reused(&e, id, changed, "other-data");
        assert_eq!(f.other_request, None);
    }

    #[test]
    fn canary_damage_is_placed_in_its_segment() {
        let (e, mem) = (engine(canary_on()), mem());
        let second = DST + 0x2000;
        let mut t = e.arrive(&mem, arrival(Op::Read, &[(DST, 512), (second, 1024)]));
        let stamped = peek(&mem, second, 1024);
        poke(&mem, second + 200, &[0; 100]);
        let (first, bytes) = diff(&stamped, &peek(&mem, second, 1024));
        let d = data(1536);
        e.to_guest(&mem, &mut t, &d).unwrap();
        assert_eq!(peek(&mem, DST, 512), d[..512]);
        assert_eq!(peek(&mem, second, 1024), d[512..]);
        let f = the_finding(&e);
        assert_eq!(f.finding, FindingKind::BufferReusedDuringDma);
        assert_eq!(f.request, t.id);
        assert_eq!(f.gpa, Gpa(second + first));
        assert_eq!(f.len, 1024);
        assert_eq!(f.class.as_deref(), Some("zeros"));
        assert_eq!(bytes, 100);
        assert_eq!(f.bytes, bytes);
    }

    #[test]
    fn untouched_canary_is_no_finding() {
        let (e, mem) = (engine(canary_on()), mem());
        let (_, _) = {
            let mut t = e.arrive(&mem, read(DST, LEN));
            assert_ne!(peek(&mem, DST, N), vec![0u8; N], "the canary is stamped");
            e.to_guest(&mem, &mut t, &data(N)).unwrap();
            (t.id, e.complete(t, "ok"))
        };
        assert_eq!(peek(&mem, DST, N), data(N));
        assert_no_findings(&e);
    }

    #[test]
    fn without_canaries_overwrites_go_unseen() {
        let (e, mem) = (engine(Checks::default()), mem());
        let (_, changed) = read_spoiled(&e, &mem, |m| poke(m, DST, &[FREE_POISON; 1024]));
        assert_eq!(changed, (0, 1024), "the destination did change");
        assert_no_findings(&e);
    }

    // source-changed-during-dma

    /// A 4 KiB write from SRC (filled with data first): it arrives, `spoil`
    /// may change the source, the DMA runs. Returns its id and what the device got.
    fn write_spoiled(e: &Engine, mem: &Mem, spoil: impl FnOnce(&Mem)) -> (ReqId, Vec<u8>) {
        poke(mem, SRC, &data(N));
        let mut t = e.arrive(mem, write(SRC, LEN));
        spoil(mem);
        let mut buf = vec![0u8; N];
        e.from_guest(mem, &mut t, &mut buf).unwrap();
        assert_eq!(buf, peek(mem, SRC, N), "the device gets what is in memory");
        let id = t.id;
        assert!(e.complete(t, "ok").is_none());
        (id, buf)
    }

    #[test]
    fn source_changed_before_dma_is_a_finding() {
        let (e, mem) = (engine(snapshot_on()), mem());
        let (id, buf) = write_spoiled(&e, &mem, |m| poke(m, SRC + 4000, &[0x55]));
        assert_eq!(buf[4000], 0x55);
        let f = the_finding(&e);
        assert_eq!(f.finding, FindingKind::SourceChangedDuringDma);
        assert!(!f.info);
        assert_eq!(f.request, id);
        assert_eq!(f.op, Op::Write);
        assert_eq!(f.gpa, Gpa(SRC));
        assert_eq!(f.len, u64::from(LEN));
        assert_eq!(f.class, None);
        assert_eq!(f.bytes, u64::from(LEN), "a hash tells that, not how many");
        assert_eq!(f.other_request, None);
    }

    #[test]
    fn unchanged_source_is_no_finding() {
        let (e, mem) = (engine(snapshot_on()), mem());
        let (_, buf) = write_spoiled(&e, &mem, |_| {});
        assert_eq!(buf, data(N));
        assert_no_findings(&e);
    }

    #[test]
    fn without_snapshots_source_changes_go_unseen() {
        let (e, mem) = (engine(Checks::default()), mem());
        let (_, buf) = write_spoiled(&e, &mem, |m| poke(m, SRC + 4000, &[0x55]));
        assert_eq!(buf[4000], 0x55);
        assert_no_findings(&e);
    }

    // dma-to-zero-page

    fn read_to(e: &Engine, mem: &Mem, segments: &[(u64, u32)]) -> ReqId {
        let a = arrival(Op::Read, segments);
        let mut t = e.arrive(mem, a);
        let len = usize::try_from(t.arrival.len).unwrap();
        e.to_guest(mem, &mut t, &data(len)).unwrap();
        let id = t.id;
        e.complete(t, "ok");
        id
    }

    #[test]
    fn read_into_the_zero_page_is_a_finding() {
        let mem = mem();
        // (segments, the segment expected in the finding)
        let cases: [(Segs, (u64, u32)); 5] = [
            (&[(ZP, LEN)], (ZP, LEN)),
            (&[(ZP + 0x800, 512)], (ZP + 0x800, 512)),
            (&[(ZP - 0x800, LEN)], (ZP - 0x800, LEN)),
            (&[(ZP + 4095, 1)], (ZP + 4095, 1)),
            (&[(DST, 512), (ZP + 0x200, 512)], (ZP + 0x200, 512)),
        ];
        for (segments, (gpa, len)) in cases {
            let e = with_zero_page();
            let id = read_to(&e, &mem, segments);
            let f = the_finding(&e);
            assert_eq!(f.finding, FindingKind::DmaToZeroPage, "{segments:x?}");
            assert!(!f.info);
            assert_eq!(f.request, id);
            assert_eq!(f.op, Op::Read);
            assert_eq!(f.gpa, Gpa(gpa), "{segments:x?}");
            assert_eq!(f.len, u64::from(len));
            assert_eq!(f.bytes, u64::from(len));
            assert_eq!(f.class, None);
        }
    }

    #[test]
    fn zero_page_given_mid_page_is_aligned_down() {
        let e = engine(Checks::default());
        e.set_zero_page(Some(Gpa(ZP + 0x123)));
        assert_eq!(e.zero_page(), Some(Gpa(ZP)));
        let mem = mem();
        let id = read_to(&e, &mem, &[(ZP + 0x800, 512)]);
        let f = the_finding(&e);
        assert_eq!((f.finding, f.request), (FindingKind::DmaToZeroPage, id));
    }

    #[test]
    fn reads_next_to_the_zero_page_are_no_finding() {
        let (e, mem) = (with_zero_page(), mem());
        read_to(&e, &mem, &[(ZP - 4096, LEN)]);
        read_to(&e, &mem, &[(ZP - 1, 1)]);
        read_to(&e, &mem, &[(ZP + 4096, LEN)]);
        read_to(&e, &mem, &[(ZP - 4096, 2048), (ZP + 4096, 2048)]);
        assert_no_findings(&e);
        // Nor without a zero page.
        let e = engine(Checks::default());
        read_to(&e, &mem, &[(ZP, LEN)]);
        assert_no_findings(&e);
    }

    // zero-page-corrupted and zero-page-source

    fn write_from(e: &Engine, mem: &Mem, segments: &[(u64, u32)]) -> (ReqId, Vec<u8>) {
        let mut t = e.arrive(mem, arrival(Op::Write, segments));
        let mut buf = vec![0u8; usize::try_from(t.arrival.len).unwrap()];
        e.from_guest(mem, &mut t, &mut buf).unwrap();
        let id = t.id;
        e.complete(t, "ok");
        (id, buf)
    }

    #[test]
    fn write_of_non_zero_bytes_from_the_zero_page_is_corruption() {
        let (e, mem) = (with_zero_page(), mem());
        for at in [10, 2000, 4095] {
            poke(&mem, ZP + at, &[0x01]);
        }
        let (id, _) = write_from(&e, &mem, &[(ZP, LEN)]);
        let f = the_finding(&e);
        assert_eq!(f.finding, FindingKind::ZeroPageCorrupted);
        assert!(!f.info);
        assert_eq!(f.request, id);
        assert_eq!(f.op, Op::Write);
        assert_eq!(f.gpa, Gpa(ZP));
        assert_eq!(f.len, u64::from(LEN));
        assert_eq!(f.bytes, 3);
        assert_eq!(count(&e, FindingKind::ZeroPageSource), 0);
    }

    #[test]
    fn write_of_zeros_from_the_zero_page_is_only_info() {
        let (e, mem) = (with_zero_page(), mem());
        let (id, buf) = write_from(&e, &mem, &[(ZP + 0x200, 512)]);
        assert_eq!(buf, vec![0u8; 512]);
        let f = the_finding(&e);
        assert_eq!(f.finding, FindingKind::ZeroPageSource);
        assert!(f.info);
        assert_eq!(f.request, id);
        assert_eq!(f.gpa, Gpa(ZP + 0x200));
        assert_eq!(f.len, 512);
        assert_eq!(f.bytes, 0);
        assert_eq!(count(&e, FindingKind::ZeroPageCorrupted), 0);
    }

    #[test]
    fn writes_from_elsewhere_are_no_zero_page_finding() {
        let (e, mem) = (with_zero_page(), mem());
        poke(&mem, ZP + 4096, &data(N));
        write_from(&e, &mem, &[(ZP + 4096, LEN)]);
        write_from(&e, &mem, &[(ZP - 512, 512)]);
        assert_no_findings(&e);
    }

    /// A guest's block layer merges physically contiguous pages into one
    /// segment, so a write segment can run from a page of data into the zero
    /// page. Only the bytes on the zero page say whether it was written.
    #[test]
    fn data_next_to_the_zero_page_is_not_zero_page_corruption() {
        let (e, mem) = (with_zero_page(), mem());
        poke(&mem, ZP - 2048, &data(2048));
        write_from(&e, &mem, &[(ZP - 2048, LEN)]);
        assert_eq!(
            count(&e, FindingKind::ZeroPageCorrupted),
            0,
            "{:#?}",
            findings(&e)
        );
        assert_eq!(count(&e, FindingKind::ZeroPageSource), 1);
    }

    /// The zero page may be anywhere, the last page of the address space too:
    /// nothing overflows, and it is still found there.
    #[test]
    fn a_zero_page_at_the_top_of_the_address_space_does_not_overflow() {
        const TOP: u64 = u64::MAX - 4095;
        let mem = mem();
        for zp in [TOP, u64::MAX] {
            let e = Engine::new(EngineConfig {
                checks: snapshot_on(),
                zero_page: Some(Gpa(zp)),
                ..EngineConfig::default()
            });
            assert_eq!(e.zero_page(), Some(Gpa(TOP)), "configured as {zp:#x}");
            e.set_zero_page(Some(Gpa(zp)));
            assert_eq!(e.zero_page(), Some(Gpa(TOP)), "set to {zp:#x}");
            // Writes from ordinary memory are compared with it.
            write_from(&e, &mem, &[(SRC, LEN)]);
            assert_no_findings(&e);
            // A read into the top page is a DMA to the zero page.
            let _r = e.arrive(&mem, read(TOP, LEN));
            assert_eq!(count(&e, FindingKind::DmaToZeroPage), 1, "{zp:#x}");
            // Write sources up there (no guest memory is: the bytes are given)
            // reaching into it, and ending at the very top.
            for (gpa, n) in [(TOP - 2048, 1), (TOP, 2)] {
                let t = e.arrive(&mem, arrival(Op::Write, &[(gpa, LEN)]));
                e.check_zero_sources(&t, &[0; N]);
                assert_eq!(count(&e, FindingKind::ZeroPageSource), n, "{gpa:#x}");
            }
        }
    }

    // suspected-zero-buffer

    /// A guest writing zeros from ever-new pages does not grow the suspect
    /// map past its bound; the oldest page is forgotten, and found again when
    /// it is used three more times.
    #[test]
    fn zero_buffer_suspects_are_bounded() {
        let pages = MAX_ZERO_SUSPECTS as u64;
        let zb = pages * PAGE;
        let size = usize::try_from(zb + PAGE).unwrap();
        let mem = Mem::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let e = engine(snapshot_on());
        write_from(&e, &mem, &[(zb, 512)]);
        write_from(&e, &mem, &[(zb, 512)]);
        for page in 0..pages {
            write_from(&e, &mem, &[(page * PAGE, 512)]);
        }
        let remembered = lock(&e.zero).suspects.len();
        assert!(
            remembered <= MAX_ZERO_SUSPECTS,
            "{remembered} pages remembered, more than {MAX_ZERO_SUSPECTS}"
        );
        assert_no_findings(&e);
        write_from(&e, &mem, &[(zb, 512)]);
        write_from(&e, &mem, &[(zb, 512)]);
        assert_no_findings(&e);
        let (id, _) = write_from(&e, &mem, &[(zb, 512)]);
        let f = the_finding(&e);
        assert_eq!(
            (f.finding, f.request),
            (FindingKind::SuspectedZeroBuffer, id)
        );
        assert_eq!(f.gpa, Gpa(zb));
        assert!(lock(&e.zero).suspects.len() <= MAX_ZERO_SUSPECTS);
    }

    #[test]
    fn third_all_zero_write_from_one_page_is_a_suspected_zero_buffer() {
        const ZB: u64 = 0x6_0000;
        let (e, mem) = (engine(snapshot_on()), mem());
        let mut third = None;
        for n in 1..=4u64 {
            let (id, buf) = write_from(&e, &mem, &[(ZB, LEN)]);
            assert_eq!(buf, vec![0u8; N]);
            if n == 3 {
                third = Some(id);
            }
            let want = u64::from(n >= 3);
            assert_eq!(
                count(&e, FindingKind::SuspectedZeroBuffer),
                want,
                "after write {n}"
            );
        }
        let f = the_finding(&e);
        assert_eq!(f.finding, FindingKind::SuspectedZeroBuffer);
        assert!(f.info);
        assert_eq!(Some(f.request), third);
        assert_eq!(f.gpa, Gpa(ZB));
        assert_eq!(f.len, u64::from(LEN));
        assert_eq!(f.bytes, 0);
    }

    #[test]
    fn zero_writes_are_counted_per_page() {
        const ZB: u64 = 0x6_0000;
        let (e, mem) = (engine(snapshot_on()), mem());
        write_from(&e, &mem, &[(ZB, 512)]);
        write_from(&e, &mem, &[(ZB + 4096, 512)]);
        write_from(&e, &mem, &[(ZB + 512, 512)]);
        assert_no_findings(&e);
        let (id, _) = write_from(&e, &mem, &[(ZB + 3584, 512)]);
        let f = the_finding(&e);
        assert_eq!(
            (f.finding, f.request),
            (FindingKind::SuspectedZeroBuffer, id)
        );
        assert_eq!(f.gpa, Gpa(ZB + 3584));
    }

    #[test]
    fn writes_with_data_are_no_suspected_zero_buffer() {
        let (e, mem) = (engine(snapshot_on()), mem());
        poke(&mem, SRC, &data(N));
        for _ in 0..5 {
            write_from(&e, &mem, &[(SRC, LEN)]);
        }
        // One non-zero byte is enough.
        poke(&mem, OTHER + 4095, &[1]);
        for _ in 0..5 {
            write_from(&e, &mem, &[(OTHER, LEN)]);
        }
        assert_no_findings(&e);
        // Zero sources are not tracked with snapshots off and no zero page.
        let e = engine(Checks::default());
        for _ in 0..5 {
            write_from(&e, &mem, &[(DST, LEN)]);
        }
        assert_no_findings(&e);
    }

    // fault effects

    /// A read of `len` bytes at DST under a `corrupt` rule of `bits` (built
    /// without the parser, as a caller of the library may): how many bits of
    /// the data differ in guest memory.
    fn corrupted_read(bits: u32, len: u32) -> u32 {
        let (e, mem) = (engine(Checks::default()), mem());
        let mut spec = RuleSpec::parse("op=read,action=corrupt").unwrap();
        spec.action = Action::Effect(Effect::Corrupt { bits });
        e.faults().add(spec);
        let mut t = e.arrive(&mem, read(DST, len));
        let d = data(len as usize);
        e.to_guest(&mem, &mut t, &d).unwrap();
        peek(&mem, DST, len as usize)
            .iter()
            .zip(&d)
            .map(|(a, b)| (a ^ b).count_ones())
            .sum()
    }

    #[test]
    fn corrupt_flips_n_bits_and_never_more_than_the_request_has() {
        assert_eq!(corrupted_read(1, LEN), 1);
        assert_eq!(corrupted_read(5, LEN), 5);
        assert_eq!(corrupted_read(MAX_CORRUPT_BITS, LEN), MAX_CORRUPT_BITS);
        // A 2-byte read has 16 bits: all of them flip, and no more work is done.
        assert_eq!(corrupted_read(MAX_CORRUPT_BITS, 2), 16);
        let start = Instant::now();
        assert_eq!(corrupted_read(u32::MAX, 2), 16);
        assert_eq!(corrupted_read(u32::MAX, LEN), MAX_CORRUPT_BITS);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?} to corrupt 2 bytes",
            start.elapsed()
        );
    }

    // overlapping-in-flight-dma

    fn assert_overlap(e: &Engine, id: ReqId, other: ReqId, page: u64) {
        let f = the_finding(e);
        assert_eq!(f.finding, FindingKind::OverlappingInFlightDma);
        assert!(!f.info);
        assert_eq!(f.request, id);
        assert_eq!(f.other_request, Some(other));
        assert_eq!(f.gpa, Gpa(page));
        assert_eq!(f.len, PAGE);
        assert_eq!(f.class, None);
        assert_eq!(f.bytes, 0);
    }

    #[test]
    fn read_and_write_in_flight_on_one_page_overlap() {
        let (e, mem) = (engine(overlap_on()), mem());
        let r = e.arrive(&mem, read(DST, LEN));
        let w = e.arrive(&mem, write(DST + 0x800, 512));
        assert_overlap(&e, w.id, r.id, DST);

        // The other way round, named from the read's side.
        let e = engine(overlap_on());
        let w = e.arrive(&mem, write(DST + 0x800, 512));
        let r = e.arrive(&mem, arrival(Op::Read, &[(OTHER, 512), (DST - 512, 1024)]));
        assert_overlap(&e, r.id, w.id, DST);
    }

    #[test]
    fn two_reads_in_flight_on_one_page_overlap() {
        let (e, mem) = (engine(overlap_on()), mem());
        let a = e.arrive(&mem, read(DST, 512));
        let b = e.arrive(&mem, read(DST + 1024, 512));
        assert_overlap(&e, b.id, a.id, DST);
    }

    #[test]
    fn requests_that_do_not_both_write_memory_or_share_a_page_do_not_overlap() {
        let (e, mem) = (engine(overlap_on()), mem());
        let _w1 = e.arrive(&mem, write(DST, LEN));
        let _w2 = e.arrive(&mem, write(DST + 0x800, 512));
        let _r = e.arrive(&mem, read(DST + 4096, LEN));
        let _r2 = e.arrive(&mem, read(DST - 4096, LEN));
        assert_no_findings(&e);
        // Overlap off: nothing is tracked.
        let e = engine(Checks::default());
        let _r = e.arrive(&mem, read(DST, LEN));
        let _w = e.arrive(&mem, write(DST, LEN));
        assert_no_findings(&e);
    }

    #[test]
    fn completed_requests_are_out_of_flight() {
        let (e, mem) = (engine(overlap_on()), mem());
        let mut r = e.arrive(&mem, read(DST, LEN));
        e.to_guest(&mem, &mut r, &data(N)).unwrap();
        e.complete(r, "ok");
        let w = e.arrive(&mem, write(DST, LEN));
        let r = e.arrive(&mem, read(OTHER, LEN));
        e.complete(w, "ok");
        e.complete(r, "ok");
        let _r = e.arrive(&mem, read(DST, LEN));
        let _r2 = e.arrive(&mem, read(OTHER, LEN));
        assert_no_findings(&e);
    }

    // data-vanished-after-completion

    fn watching() -> Engine {
        let e = engine(Checks::default());
        e.faults()
            .add(RuleSpec::parse("op=read,action=watch,ms=10").unwrap());
        e
    }

    /// A watched 4 KiB read at DST, completed, then `after` changes memory and
    /// the watch runs. Returns the read's id.
    fn watched_read(e: &Engine, mem: &Mem, after: impl FnOnce(&Mem)) -> ReqId {
        let mut t = e.arrive(mem, read(DST, LEN));
        assert_eq!(t.watch, Some(Duration::from_millis(10)));
        e.to_guest(mem, &mut t, &data(N)).unwrap();
        let id = t.id;
        let w = e
            .complete(t, "ok")
            .expect("a watched read hands back a watch");
        assert_eq!((w.id, w.due), (id, Duration::from_millis(10)));
        after(mem);
        e.watch(mem, &w);
        id
    }

    fn assert_vanished(e: &Engine, id: ReqId, class: &str, bytes: u64) {
        let f = the_finding(e);
        assert_eq!(f.finding, FindingKind::DataVanishedAfterCompletion);
        assert!(!f.info);
        assert_eq!(f.request, id);
        assert_eq!(f.op, Op::Read);
        assert_eq!(f.gpa, Gpa(DST));
        assert_eq!(f.len, u64::from(LEN));
        assert_eq!(f.class.as_deref(), Some(class));
        assert_eq!(f.bytes, bytes);
    }

    #[test]
    fn data_zeroed_after_completion_vanished() {
        let (e, mem) = (watching(), mem());
        let id = watched_read(&e, &mem, |m| poke(m, DST, &[0; N]));
        assert_vanished(&e, id, "zeros", u64::from(LEN));
    }

    #[test]
    fn data_poisoned_after_completion_vanished() {
        let (e, mem) = (watching(), mem());
        let id = watched_read(&e, &mem, |m| poke(m, DST, &[FREE_POISON; N]));
        assert_vanished(&e, id, "free-poison", u64::from(LEN));
    }

    #[test]
    fn data_kept_after_completion_is_no_finding() {
        let (e, mem) = (watching(), mem());
        watched_read(&e, &mem, |_| {});
        assert_no_findings(&e);
        // Unwatched requests hand back no watch.
        let mut t = e.arrive(&mem, write(SRC, LEN));
        assert_eq!(t.watch, None);
        let mut buf = vec![0u8; N];
        e.from_guest(&mem, &mut t, &mut buf).unwrap();
        assert!(e.complete(t, "ok").is_none());
        let e = engine(Checks::default());
        let mut t = e.arrive(&mem, read(DST, LEN));
        e.to_guest(&mem, &mut t, &data(N)).unwrap();
        assert!(e.complete(t, "ok").is_none());
    }

    /// The class comes from the bytes that changed, not from the whole segment.
    #[test]
    fn data_partly_zeroed_after_completion_vanished_into_zeros() {
        let (e, mem) = (watching(), mem());
        let id = watched_read(&e, &mem, |m| poke(m, DST, &[0; 1024]));
        assert_vanished(&e, id, "zeros", 1024);
    }

    /// Once the read completed the guest may reuse its buffer; new data with
    /// some zero bytes in it is not a vanish.
    #[test]
    fn new_data_after_completion_is_no_finding() {
        let (e, mem) = (watching(), mem());
        watched_read(&e, &mem, |m| {
            poke(
                m,
                DST,
                b"the guest's next use of its own buffer\0\0\0\0 with some zeros",
            )
        });
        assert_no_findings(&e);
    }

    // The ledger and the fault plan.

    fn requests(e: &Engine) -> Vec<RequestRecord> {
        e.ledger()
            .since(0)
            .0
            .into_iter()
            .filter_map(|n| match n.entry {
                Entry::Request(r) => Some(r),
                Entry::Finding(_) | Entry::Mark(_) => None,
            })
            .collect()
    }

    #[test]
    fn ledger_records_requests_with_their_times_and_waits() {
        let e = engine(Checks {
            ledger: true,
            ..Checks::default()
        });
        e.faults()
            .add(RuleSpec::parse("op=read,action=delay,ms=5").unwrap());
        e.faults()
            .add(RuleSpec::parse("op=write,action=hold").unwrap());
        e.set_tag(Some("t1".into())).unwrap();
        let mem = mem();
        let mut r = e.arrive(&mem, read(DST, LEN));
        assert_eq!(r.wait, Wait::Delay(Duration::from_millis(5)));
        std::thread::sleep(Duration::from_millis(1));
        e.to_guest(&mem, &mut r, &data(N)).unwrap();
        std::thread::sleep(Duration::from_millis(1));
        let (rid, _) = (r.id, e.complete(r, "ok"));
        let mut w = e.arrive(&mem, write(SRC, LEN));
        assert_eq!(w.wait, Wait::Hold);
        e.from_guest(&mem, &mut w, &mut [0u8; N]).unwrap();
        let wid = w.id;
        e.complete(w, "ioerr");
        e.set_tag(None).unwrap();
        let f = e.arrive(&mem, arrival(Op::Flush, &[]));
        assert_eq!(f.wait, Wait::None);
        let fid = f.id;
        e.complete(f, "ok");

        let recs = requests(&e);
        let summary: Vec<_> = recs
            .iter()
            .map(|r| {
                (
                    r.request,
                    r.op,
                    r.wait.as_str(),
                    r.status.as_str(),
                    r.tag.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (rid, Op::Read, "delay 5 ms", "ok", Some("t1")),
                (wid, Op::Write, "hold", "ioerr", Some("t1")),
                (fid, Op::Flush, "none", "ok", None),
            ]
        );
        let read = &recs[0];
        assert_eq!(read.segments, vec![Segment::new(Gpa(DST), LEN)]);
        assert_eq!((read.queue, read.lba, read.len), (1, 8, u64::from(LEN)));
        let dma = read.dma_ns.unwrap();
        assert!(read.arrived_ns < dma && dma < read.completed_ns, "{read:?}");
        let write = &recs[1];
        assert!(write.arrived_ns <= write.dma_ns.unwrap());
        assert!(write.dma_ns.unwrap() <= write.completed_ns);
        assert_eq!(recs[2].dma_ns, None, "a flush moves no data");
        assert!(read.completed_ns <= write.arrived_ns);
    }

    #[test]
    fn ledger_off_records_findings_but_no_requests() {
        let (e, mem) = (engine(canary_on()), mem());
        let (id, _) = read_spoiled(&e, &mem, |m| poke(m, DST, &[0; 64]));
        let (entries, next) = e.ledger().since(0);
        assert_eq!(entries.len(), 1);
        assert_eq!(next, 2);
        match &entries[0].entry {
            Entry::Finding(f) => assert_eq!(
                (f.finding, f.request),
                (FindingKind::BufferReusedDuringDma, id)
            ),
            other => panic!("{other:?}"),
        }
        // Switched on, the next request is recorded after its finding.
        e.set_checks(Checks {
            canary: true,
            ledger: true,
            ..Checks::default()
        });
        let (id2, _) = read_spoiled(&e, &mem, |m| poke(m, DST, &[0; 64]));
        let kinds: Vec<_> = e
            .ledger()
            .since(0)
            .0
            .into_iter()
            .map(|n| match n.entry {
                Entry::Finding(f) => ("finding", f.request),
                Entry::Request(r) => ("request", r.request),
                Entry::Mark(_) => ("mark", ReqId(0)),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![("finding", id), ("finding", id2), ("request", id2)]
        );
    }

    /// A guest names tags and marks through its mailbox: one past the cap is
    /// refused, so it is never copied into the records that follow.
    #[test]
    fn tags_and_labels_past_their_cap_are_refused_and_never_recorded() {
        let e = engine(Checks {
            ledger: true,
            ..Checks::default()
        });
        let mem = mem();
        e.set_tag(Some("t1".into())).unwrap();
        let long = "x".repeat(1 << 20);
        let too_long = |field| TextTooLong {
            field,
            len: 1 << 20,
            max: 256,
        };
        assert_eq!(e.set_tag(Some(long.clone())), Err(too_long("tag")));
        assert_eq!(e.mark(&long), Err(too_long("label")));
        assert_eq!(
            too_long("tag").to_string(),
            "tag is 1048576 bytes, longer than the limit of 256"
        );
        assert_eq!((MAX_TAG_BYTES, MAX_LABEL_BYTES), (256, 256));
        read_to(&e, &mem, &[(DST, 512)]);
        for n in e.ledger().since(0).0 {
            let (what, tag, label) = match &n.entry {
                Entry::Request(r) => ("request", r.tag.as_deref(), None),
                Entry::Finding(f) => ("finding", f.tag.as_deref(), None),
                Entry::Mark(m) => ("mark", m.tag.as_deref(), Some(m.label.as_str())),
            };
            let tag_len = tag.map_or(0, str::len);
            let label_len = label.map_or(0, str::len);
            assert!(
                tag_len <= 256 && label_len <= 256,
                "a {what} holds a {tag_len}-byte tag and a {label_len}-byte label"
            );
        }
        assert_eq!(
            e.tag().as_deref(),
            Some("t1"),
            "a refused tag leaves the one in force"
        );
        // At the cap is allowed.
        e.set_tag(Some("y".repeat(MAX_TAG_BYTES))).unwrap();
        e.mark(&"z".repeat(MAX_LABEL_BYTES)).unwrap();
        assert_eq!(e.tag().map(|t| t.len()), Some(256));
        let marks: Vec<_> = e
            .ledger()
            .since(0)
            .0
            .into_iter()
            .filter_map(|n| match n.entry {
                Entry::Mark(m) => Some((m.label.len(), m.tag.map_or(0, |t| t.len()))),
                _ => None,
            })
            .collect();
        assert_eq!(marks, vec![(256, 256)]);
    }

    /// A finding's detail is the engine's own text, but it is kept in the
    /// ledger: whatever built it, what is recorded is at most the cap.
    #[test]
    fn finding_details_are_bounded() {
        let (e, mem) = (engine(canary_on()), mem());
        let t = e.arrive(&mem, read(DST, LEN));
        let seg = Segment::new(Gpa(DST), LEN);
        let detail = format!("{}é", "d".repeat(255));
        e.record(e.finding(&t, FindingKind::BufferReusedDuringDma, seg, 1, detail));
        let f = the_finding(&e);
        assert!(
            f.detail.len() <= MAX_DETAIL_BYTES,
            "a finding's detail of {} bytes was recorded",
            f.detail.len()
        );
        assert!(f.detail.starts_with(&"d".repeat(255)), "{}", f.detail);
        e.complete(t, "ok");
    }

    #[test]
    fn ledger_ring_is_bounded_and_counts_what_it_dropped() {
        let e = Engine::new(EngineConfig {
            checks: Checks {
                ledger: true,
                ..Checks::default()
            },
            ledger_capacity: 4,
            ..EngineConfig::default()
        });
        let mem = mem();
        let ids: Vec<ReqId> = (0..10).map(|_| read_to(&e, &mem, &[(DST, 512)])).collect();
        let l = e.ledger();
        assert_eq!((l.len(), l.capacity(), l.dropped()), (4, 4, 6));
        let (kept, next) = l.since(0);
        assert_eq!(next, 11);
        assert_eq!(
            kept.iter().map(|n| n.seq).collect::<Vec<_>>(),
            vec![7, 8, 9, 10]
        );
        let kept_ids: Vec<_> = kept
            .iter()
            .map(|n| match &n.entry {
                Entry::Request(r) => r.request,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kept_ids, ids[6..]);
    }

    #[test]
    fn delay_rules_set_the_tickets_wait() {
        let (e, mem) = (engine(Checks::default()), mem());
        let t = e.arrive(&mem, read(DST, LEN));
        assert_eq!((t.wait, t.watch), (Wait::None, None));
        e.complete(t, "ok");
        e.faults()
            .add(RuleSpec::parse("op=read,action=delay,ms=5").unwrap());
        let r = e.arrive(&mem, read(DST, LEN));
        assert_eq!(r.wait, Wait::Delay(Duration::from_millis(5)));
        assert_eq!(r.watch, None);
        let w = e.arrive(&mem, write(SRC, LEN));
        assert_eq!(w.wait, Wait::None);
    }

    #[test]
    fn data_moves_with_every_check_on() {
        let e = Engine::new(EngineConfig {
            checks: Checks {
                canary: true,
                snapshot: true,
                overlap: true,
                ledger: true,
            },
            zero_page: Some(Gpa(ZP)),
            ..EngineConfig::default()
        });
        let mem = mem();
        let segments = [(DST, 512), (OTHER + 100, 3584)];
        let mut r = e.arrive(&mem, arrival(Op::Read, &segments));
        let d = data(N);
        e.to_guest(&mem, &mut r, &d).unwrap();
        assert_eq!(peek(&mem, DST, 512), d[..512]);
        assert_eq!(peek(&mem, OTHER + 100, 3584), d[512..]);
        e.complete(r, "ok");
        let mut w = e.arrive(&mem, arrival(Op::Write, &segments));
        let mut buf = vec![0u8; N];
        e.from_guest(&mem, &mut w, &mut buf).unwrap();
        assert_eq!(buf, d);
        e.complete(w, "ok");
        assert_no_findings(&e);
        assert_eq!(requests(&e).len(), 2);
    }

    // What a waiting or watched request keeps.

    /// Segments of the aliasing request: a virtio indirect table's worth.
    const ALIASES: usize = 254;
    /// Each segment is the whole of one 64 KiB buffer.
    const ALIASED: u32 = 64 << 10;
    const BUF: u64 = 0x8_0000;

    /// A read whose 254 segments are one 64 KiB buffer, with canaries on and
    /// watched: at arrival, after its DMA and while watched, what the engine
    /// keeps of it grows with its segments, not with the 15.9 MiB they name.
    #[test]
    fn a_request_of_aliased_segments_keeps_no_copy_of_its_data() {
        let (e, mem) = (engine(canary_on()), mem());
        e.faults()
            .add(RuleSpec::parse("op=read,action=watch,ms=10").unwrap());
        let mut t = e.arrive(&mem, arrival(Op::Read, &[(BUF, ALIASED); ALIASES]));
        assert_eq!(t.arrival.len, ALIASES as u64 * u64::from(ALIASED));
        let bound = 64 * ALIASES;
        assert!(
            t.retained_bytes() <= bound,
            "a waiting ticket keeps {} B for {ALIASES} segments",
            t.retained_bytes()
        );
        let len = usize::try_from(t.arrival.len).unwrap();
        e.to_guest(&mem, &mut t, &data(len)).unwrap();
        assert!(
            t.retained_bytes() <= bound,
            "after its DMA the ticket keeps {} B",
            t.retained_bytes()
        );
        let w = e.complete(t, "ok").expect("the read is watched");
        assert!(
            w.retained_bytes() <= bound,
            "its watch keeps {} B",
            w.retained_bytes()
        );
        e.watch(&mem, &w);
    }

    /// An NVMe PRP list alternating between two pages names 65,536 segments:
    /// with 300 other requests in flight, the overlap check holds its two
    /// distinct pages, finds the one request that shares a page with it, and
    /// lets go of both pages at completion.
    #[test]
    fn a_request_of_many_segments_over_two_pages_holds_only_those_pages() {
        const ENTRIES: usize = 65_536;
        let (e, mem) = (engine(overlap_on()), mem());
        let page_b = DST + 2 * PAGE;
        // 299 reads each on a page of its own, far from both, and one on the
        // first of the two pages.
        let mut others: Vec<Ticket> = (0..299u64)
            .map(|i| e.arrive(&mem, read(0x100_0000 + 2 * i * PAGE, LEN)))
            .collect();
        let sharer = e.arrive(&mem, read(DST + 512, 512));
        let sharer_id = sharer.id;
        others.push(sharer);
        assert_no_findings(&e);
        assert_eq!(e.in_flight_pages(), 300);

        let segments: Vec<(u64, u32)> = (0..ENTRIES)
            .map(|i| (if i % 2 == 0 { DST } else { page_b }, LEN))
            .collect();
        let prp = e.arrive(&mem, arrival(Op::Read, &segments));
        assert_eq!(prp.arrival.segments.len(), ENTRIES);
        assert_eq!(
            e.in_flight_pages(),
            302,
            "its two distinct pages, once each"
        );
        assert_overlap(&e, prp.id, sharer_id, DST);

        e.complete(prp, "ok");
        assert_eq!(e.in_flight_pages(), 300);
        for t in others {
            e.complete(t, "ok");
        }
        assert_eq!(e.in_flight_pages(), 0);
        let inflight = lock(&e.inflight);
        assert!(inflight.chunks.is_empty() && inflight.requests.is_empty());
    }

    /// Every request in flight that shares a page with an arrival, when
    /// either writes memory, and the lowest page they share: worked out pair
    /// by pair, segment by segment, as the check once did it.
    fn overlaps_pair_by_pair(arriving: &Ticket, in_flight: &[Ticket]) -> Vec<(ReqId, Gpa)> {
        let mut want: Vec<(ReqId, Gpa)> = in_flight
            .iter()
            .filter(|o| arriving.arrival.op.writes_memory() || o.arrival.op.writes_memory())
            .filter_map(|o| {
                let lowest = arriving
                    .arrival
                    .segments
                    .iter()
                    .flat_map(|s| {
                        o.arrival.segments.iter().map(|q| {
                            let (p, q) = (s.pages(PAGE), q.pages(PAGE));
                            p.start.max(q.start)..p.end.min(q.end)
                        })
                    })
                    .filter(|r| !r.is_empty())
                    .map(|r| r.start)
                    .min()?;
                Some((o.id, Gpa(lowest * PAGE)))
            })
            .collect();
        want.sort();
        want
    }

    /// Random reads and writes of up to four segments over 200 pages (three
    /// 64-page chunks and a part), arriving and completing in random order:
    /// each arrival's findings are exactly the pairs worked out one by one,
    /// the index holds each live request's distinct pages, and nothing once
    /// all have completed.
    #[test]
    fn overlap_findings_are_the_pairs_that_share_a_page() {
        let rng = crate::rng::SeededRng::new(16);
        let mem = mem();
        let mut overlaps = 0;
        for _ in 0..150 {
            let e = engine(overlap_on());
            let mut live: Vec<Ticket> = Vec::new();
            for _ in 0..12 {
                if !live.is_empty() && rng.chance(0.3) {
                    let i = rng.in_range(0, live.len() as u64 - 1) as usize;
                    e.complete(live.swap_remove(i), "ok");
                }
                let op = if rng.chance(0.5) { Op::Read } else { Op::Write };
                let segments: Vec<(u64, u32)> = (0..rng.in_range(1, 4))
                    .map(|_| {
                        let gpa = rng.in_range(0, 200 * 16) * 256;
                        let most = if rng.chance(0.8) { 3 * 4096 } else { 70 * 4096 };
                        (gpa, rng.in_range(1, most) as u32)
                    })
                    .collect();
                let before = findings(&e).len();
                let t = e.arrive(&mem, arrival(op, &segments));
                let mut got: Vec<(ReqId, Gpa)> = findings(&e)[before..]
                    .iter()
                    .map(|f| {
                        assert_eq!(
                            (f.finding, f.request),
                            (FindingKind::OverlappingInFlightDma, t.id)
                        );
                        (f.other_request.unwrap(), f.gpa)
                    })
                    .collect();
                got.sort();
                assert_eq!(got, overlaps_pair_by_pair(&t, &live), "{segments:x?}");
                overlaps += got.len();
                live.push(t);
                let distinct: u64 = live
                    .iter()
                    .flat_map(|t| crate::segment::distinct_pages(&t.arrival.segments, PAGE))
                    .map(|r| r.end - r.start)
                    .sum();
                assert_eq!(e.in_flight_pages() as u64, distinct);
            }
            for t in live {
                e.complete(t, "ok");
            }
            let inflight = lock(&e.inflight);
            assert!(inflight.chunks.is_empty() && inflight.requests.is_empty());
        }
        assert!(overlaps > 500, "only {overlaps} overlaps tried");
    }

    /// A rule watching every read for ten minutes: the first 4096 reads wait
    /// for their watch, the rest are served unwatched and counted; a watch
    /// that ran, or was dropped unrun, makes room again. The guest memory
    /// watched is limited too.
    #[test]
    fn reads_past_the_watch_limits_are_served_unwatched_and_counted() {
        let e = engine(Checks::default());
        e.faults()
            .add(RuleSpec::parse("op=read,action=watch,ms=600000").unwrap());
        let mem = mem();
        assert_eq!(
            e.watch_limits(),
            WatchLimits {
                watches: 4096,
                bytes: 1 << 30
            }
        );
        let read = |e: &Engine| {
            let mut t = e.arrive(&mem, read(DST, LEN));
            assert_eq!(t.watch, Some(Duration::from_secs(600)));
            e.to_guest(&mem, &mut t, &data(N)).unwrap();
            e.complete(t, "ok")
        };
        let mut pending: Vec<WatchTask> = (0..4096).map(|_| read(&e).unwrap()).collect();
        for _ in 0..4 {
            assert!(read(&e).is_none(), "a read past the cap is not watched");
        }
        assert_eq!(peek(&mem, DST, N), data(N), "it is served all the same");
        let figures = |pending, refused| WatchFigures {
            pending,
            pending_bytes: pending as u64 * u64::from(LEN),
            refused,
            limits: e.watch_limits(),
        };
        assert_eq!(e.watch_figures(), figures(4096, 4));
        e.watch(&mem, &pending.pop().unwrap());
        drop(pending.pop());
        assert_eq!(e.watch_figures(), figures(4094, 4));
        pending.extend(read(&e));
        pending.extend(read(&e));
        assert!(read(&e).is_none());
        assert_eq!(e.watch_figures(), figures(4096, 5));
        drop(pending);
        assert_eq!(e.watch_figures(), figures(0, 5));

        // Two pages of guest memory watched at most: the third read waits
        // for room, as a read of three pages would.
        e.set_watch_limits(WatchLimits {
            watches: 4096,
            bytes: 2 * PAGE,
        });
        let two: Vec<_> = (0..2).map(|_| read(&e).unwrap()).collect();
        assert!(read(&e).is_none());
        assert_eq!(e.watch_figures(), figures(2, 6));
        drop(two);
        assert_no_findings(&e);
    }

    /// A watch is kept per distinct segment: a destination named twice is
    /// compared with what the device wrote there last, which is what memory
    /// held after the DMA, and reported once.
    #[test]
    fn a_destination_named_twice_is_watched_once_with_what_landed_last() {
        let (e, mem) = (watching(), mem());
        let mut t = e.arrive(&mem, arrival(Op::Read, &[(DST, LEN), (DST, LEN)]));
        let d = data(2 * N);
        e.to_guest(&mem, &mut t, &d).unwrap();
        assert_eq!(peek(&mem, DST, N), d[N..]);
        let id = t.id;
        let w = e.complete(t, "ok").unwrap();
        e.watch(&mem, &w);
        assert_no_findings(&e);
        poke(&mem, DST, &[0; N]);
        e.watch(&mem, &w);
        assert_vanished(&e, id, "zeros", u64::from(LEN));
    }

    /// Zeros where the device had written zeros are no change: the bytes
    /// reported are those that were not zero, block by block.
    #[test]
    fn a_vanish_counts_only_the_bytes_that_changed() {
        let (e, mem) = (watching(), mem());
        let mut t = e.arrive(&mem, read(DST + 100, 3000));
        let mut d = data(3000);
        d[10..50].fill(0);
        d[2000..2300].fill(FREE_POISON);
        e.to_guest(&mem, &mut t, &d).unwrap();
        let w = e.complete(t, "ok").unwrap();
        poke(&mem, DST + 100, &[FREE_POISON; 3000]);
        e.watch(&mem, &w);
        let f = the_finding(&e);
        assert_eq!((f.gpa, f.len), (Gpa(DST + 100), 3000));
        assert_eq!((f.class.as_deref(), f.bytes), (Some("free-poison"), 2700));
    }
}
