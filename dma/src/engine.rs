//! The engine: what happens to a request between its arrival and its completion.
//!
//! A front-end calls, for every request that carries data:
//! 1. [`Engine::arrive`]: the request gets an id and a [`Ticket`]; the fault plan
//!    decides how it waits; a read's destination gets its canary, a write's
//!    source is hashed; overlap with other requests in flight is checked.
//! 2. After the wait, [`Engine::to_guest`] or [`Engine::from_guest`]: the canary
//!    or the hash is checked, then the data moves.
//! 3. [`Engine::complete`]: the request is recorded in the ledger; a watch, if
//!    asked for, comes back to the front-end to run later with [`Engine::watch`].
//!
//! Every check is a switch ([`Checks`]); with all off, arrival costs an id, a
//! look at an empty fault plan and a clock read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestMemoryBackend};

use crate::canary;
use crate::fault::{Decision, FaultPlan, Wait};
use crate::finding::{Finding, FindingKind};
use crate::ledger::{Entry, Ledger, RequestRecord};
use crate::request::{Arrival, Op, ReqId};
use crate::segment::{Gpa, Segment};
use crate::transfer::{self, TransferError};

/// Guest pages are 4 KiB for overlap and zero-page tracking.
pub const PAGE: u64 = 4096;

/// All-zero write sources from one page this many times make it a suspected zero buffer.
const ZERO_SUSPECT_THRESHOLD: u64 = 3;

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            checks: Checks::default(),
            ledger_capacity: crate::ledger::DEFAULT_CAPACITY,
            zero_page: None,
            seed: 0,
        }
    }
}

/// A request between arrival and completion.
#[derive(Debug)]
pub struct Ticket {
    pub id: ReqId,
    pub arrival: Arrival,
    pub wait: Wait,
    pub watch: Option<Duration>,
    tag: Option<String>,
    arrived_ns: u64,
    dma_ns: Option<u64>,
    /// The canary stamped into each destination segment, back to back.
    canary: Option<Vec<u8>>,
    /// The hash of each source segment at arrival.
    hashes: Option<Vec<u64>>,
    /// What the device wrote into guest memory, kept for a watch.
    written: Option<Vec<u8>>,
    tracked: bool,
}

/// A post-completion check to run later.
#[derive(Debug)]
pub struct WatchTask {
    pub id: ReqId,
    pub due: Duration,
    arrival: Arrival,
    tag: Option<String>,
    written: Vec<u8>,
}

/// A request in flight, for the overlap check.
#[derive(Debug)]
struct InFlight {
    pages: Vec<std::ops::Range<u64>>,
    writes_memory: bool,
}

#[derive(Debug, Default)]
struct ZeroState {
    page: Option<Gpa>,
    /// Page number → how often an all-zero write came from it.
    suspects: HashMap<u64, u64>,
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
    inflight: Mutex<HashMap<ReqId, InFlight>>,
    zero: Mutex<ZeroState>,
    tag: Mutex<Option<String>>,
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
            inflight: Mutex::new(HashMap::new()),
            zero: Mutex::new(ZeroState {
                page: config.zero_page,
                suspects: HashMap::new(),
            }),
            tag: Mutex::new(None),
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

    /// Registers the guest's zero page (page-aligned down).
    pub fn set_zero_page(&self, gpa: Option<Gpa>) {
        lock(&self.zero).page = gpa.map(|g| Gpa(g.0 - g.0 % PAGE));
    }

    pub fn zero_page(&self) -> Option<Gpa> {
        lock(&self.zero).page
    }

    /// The test tag that requests arriving from now on carry.
    pub fn set_tag(&self, tag: Option<String>) {
        *lock(&self.tag) = tag;
    }

    pub fn tag(&self) -> Option<String> {
        lock(&self.tag).clone()
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

    /// A request arrives: decide its wait, stamp canaries, hash sources, check overlap.
    pub fn arrive<M: GuestMemoryBackend>(&self, mem: &M, arrival: Arrival) -> Ticket {
        let id = ReqId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let tag = self.tag();
        let Decision { wait, watch } = if self.faults.is_empty() {
            Decision {
                wait: Wait::None,
                watch: None,
            }
        } else {
            self.faults.decide(&arrival, tag.as_deref())
        };
        let mut t = Ticket {
            id,
            arrival,
            wait,
            watch,
            tag,
            arrived_ns: self.now_ns(),
            dma_ns: None,
            canary: None,
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
                t.canary = self.stamp(mem, &t);
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
    /// request's segments.
    pub fn to_guest<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        t: &mut Ticket,
        data: &[u8],
    ) -> Result<(), TransferError> {
        if let Some(expected) = t.canary.take() {
            self.check_canary(mem, t, &expected);
        }
        transfer::to_guest(mem, &t.arrival.segments, data)?;
        t.dma_ns = Some(self.now_ns());
        if t.watch.is_some() {
            t.written = Some(data.to_vec());
        }
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
        transfer::from_guest(mem, &t.arrival.segments, buf)?;
        t.dma_ns = Some(self.now_ns());
        if let Some(hashes) = t.hashes.take() {
            self.check_sources(t, buf, &hashes);
        }
        self.check_zero_sources(t, buf);
        Ok(())
    }

    /// The request completed with `status`: record it; hand back its watch, if any.
    pub fn complete(&self, mut t: Ticket, status: &str) -> Option<WatchTask> {
        if t.tracked {
            lock(&self.inflight).remove(&t.id);
        }
        if self.ledger_on.load(Ordering::Relaxed) {
            let record = RequestRecord {
                request: t.id,
                op: t.arrival.op,
                queue: t.arrival.queue,
                lba: t.arrival.lba,
                len: t.arrival.len,
                segments: t.arrival.segments.clone(),
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
            arrival: t.arrival,
            tag: t.tag,
            written,
        })
    }

    /// Re-reads a completed read's destination: if what the device wrote has
    /// been replaced by zeros or free-poison, the data went to a page nobody owned.
    pub fn watch<M: GuestMemoryBackend>(&self, mem: &M, w: &WatchTask) {
        let mut now = vec![0u8; w.written.len()];
        if transfer::from_guest(mem, &w.arrival.segments, &mut now).is_err() {
            return;
        }
        let mut at = 0usize;
        for seg in &w.arrival.segments {
            let n = seg.len_usize();
            let (was, is) = (&w.written[at..at + n], &now[at..at + n]);
            at += n;
            let gone = was
                .iter()
                .zip(is)
                .filter(|(a, b)| a != b && (**b == 0 || **b == canary::FREE_POISON))
                .count();
            if gone == 0 {
                continue;
            }
            let class = if is.iter().all(|&b| b == 0) {
                "zeros"
            } else {
                "free-poison"
            };
            self.record(Finding {
                finding: FindingKind::DataVanishedAfterCompletion,
                info: false,
                request: w.id,
                op: w.arrival.op,
                queue: w.arrival.queue,
                lba: w.arrival.lba,
                gpa: seg.gpa,
                len: u64::from(seg.len),
                class: Some(class.into()),
                bytes: gone as u64,
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

    fn stamp<M: GuestMemoryBackend>(&self, mem: &M, t: &Ticket) -> Option<Vec<u8>> {
        let len = usize::try_from(crate::segment::total_len(&t.arrival.segments)).ok()?;
        let mut c = vec![0u8; len];
        canary::fill(t.id, 0, &mut c);
        transfer::to_guest(mem, &t.arrival.segments, &c).ok()?;
        Some(c)
    }

    fn check_canary<M: GuestMemoryBackend>(&self, mem: &M, t: &Ticket, expected: &[u8]) {
        let mut found = vec![0u8; expected.len()];
        if transfer::from_guest(mem, &t.arrival.segments, &mut found).is_err() {
            return;
        }
        let mut at = 0usize;
        for seg in &t.arrival.segments {
            let n = seg.len_usize();
            let damage = canary::check(&expected[at..at + n], &found[at..at + n]);
            at += n;
            let Some(d) = damage else { continue };
            let other = match d.overwrite {
                canary::Overwrite::Canary(id) => Some(id),
                _ => None,
            };
            self.record(Finding {
                finding: FindingKind::BufferReusedDuringDma,
                info: false,
                request: t.id,
                op: t.arrival.op,
                queue: t.arrival.queue,
                lba: t.arrival.lba,
                gpa: Gpa(seg.gpa.0 + d.first),
                len: u64::from(seg.len),
                class: Some(d.overwrite.name().into()),
                bytes: d.bytes,
                other_request: other,
                at_ns: self.now_ns(),
                tag: t.tag.clone(),
                detail: format!(
                    "{} of {} B of the read's destination at {} were overwritten ({}) \
                     before the DMA: the guest reused memory it had handed to the device",
                    d.bytes,
                    seg.len,
                    seg.gpa,
                    d.overwrite.name()
                ),
            });
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
            self.record(Finding {
                finding: FindingKind::SourceChangedDuringDma,
                info: false,
                request: t.id,
                op: t.arrival.op,
                queue: t.arrival.queue,
                lba: t.arrival.lba,
                gpa: seg.gpa,
                len: u64::from(seg.len),
                class: None,
                bytes: u64::from(seg.len),
                other_request: None,
                at_ns: self.now_ns(),
                tag: t.tag.clone(),
                detail: format!(
                    "the {} B write source at {} changed between arrival and DMA",
                    seg.len, seg.gpa
                ),
            });
        }
    }

    fn check_zero_page_target(&self, t: &Ticket) {
        let Some(zp) = self.zero_page() else { return };
        for seg in &t.arrival.segments {
            if !seg.pages(PAGE).contains(&(zp.0 / PAGE)) {
                continue;
            }
            self.record(Finding {
                finding: FindingKind::DmaToZeroPage,
                info: false,
                request: t.id,
                op: t.arrival.op,
                queue: t.arrival.queue,
                lba: t.arrival.lba,
                gpa: seg.gpa,
                len: u64::from(seg.len),
                class: None,
                bytes: u64::from(seg.len),
                other_request: None,
                at_ns: self.now_ns(),
                tag: t.tag.clone(),
                detail: format!(
                    "a {} targets the zero page at {zp}: every zero-filled page of the guest \
                     would change",
                    t.arrival.op.name()
                ),
            });
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
            let on_zero_page = zp.is_some_and(|z| seg.pages(PAGE).contains(&(z.0 / PAGE)));
            let nonzero = data.iter().filter(|&&b| b != 0).count() as u64;
            if on_zero_page {
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
            } else if nonzero == 0 {
                let page = seg.gpa.0 / PAGE;
                let n = {
                    let mut z = lock(&self.zero);
                    let n = z.suspects.entry(page).or_insert(0);
                    *n += 1;
                    *n
                };
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

    fn track(&self, t: &mut Ticket) {
        let pages: Vec<_> = t.arrival.segments.iter().map(|s| s.pages(PAGE)).collect();
        let writes_memory = t.arrival.op.writes_memory();
        let mut inflight = lock(&self.inflight);
        let mut clashes = Vec::new();
        for (other, f) in inflight.iter() {
            if !(writes_memory || f.writes_memory) {
                continue;
            }
            let shared = pages
                .iter()
                .flat_map(|p| {
                    f.pages
                        .iter()
                        .map(move |q| p.start.max(q.start)..p.end.min(q.end))
                })
                .find(|r| !r.is_empty());
            if let Some(r) = shared {
                clashes.push((*other, r.start));
            }
        }
        inflight.insert(
            t.id,
            InFlight {
                pages,
                writes_memory,
            },
        );
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

    fn record(&self, f: Finding) {
        if let Some(i) = FindingKind::ALL.iter().position(|&k| k == f.finding) {
            self.findings[i].fetch_add(1, Ordering::Relaxed);
        }
        log::debug!("finding {}: {}", f.finding.name(), f.detail);
        self.ledger().push(Entry::Finding(f));
    }
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
