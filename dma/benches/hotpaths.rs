//! What each of the engine's per-request checks costs on its own, at 4 KiB
//! (one segment) and 128 KiB (32 segments of 4 KiB):
//!
//! - `canary-stamp`: [`canary::fill`] over a read's destination (the engine
//!   fills 4 KiB at a time, through [`canary::stamp`]), and [`Engine::arrive`]
//!   of a read with only canaries on, which also writes the canary into guest
//!   memory (and keeps no copy of it).
//! - `canary-check`: [`canary::check`] of each 4 KiB segment against a copy
//!   of the canary, with the canary intact (what every clean read finds) and
//!   overwritten by other data (what a read into reused memory finds: every
//!   byte compared and classified, and the buffer searched for other
//!   requests' canaries). `made-again+intact` is what `Engine::check_canary`
//!   does just before the DMA: [`canary::check_stamped`] of each segment,
//!   which makes the canary again and reads guest memory 4 KiB at a time.
//! - `source-hash`: xxh3 of each 4 KiB segment, as `Engine::check_sources`
//!   hashes the copied write source at DMA time, and [`Engine::arrive`] of a
//!   write with only source snapshots on (each source segment read from guest
//!   memory and hashed).
//! - `arrive-checks-off`: [`Engine::arrive`] with every check off, the part of
//!   the `arrive` figures above that is not the check.
//! - `ledger-append`: [`Ledger::push`] of a read's request record into a ledger
//!   below its capacity and into a full one, whose ring drops its oldest entry.
//!   The record is built beforehand, outside the timing.
//! - `ledger-json`: [`Ledger::write_json_lines`] of 1024 such records into a
//!   buffer in memory, per entry.
//!
//! Each figure is per request (or per entry), with the bytes or entries set as
//! criterion's throughput.
//!
//! `cargo bench -p dma --bench hotpaths`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use dma::canary::{self, Overwrite};
use dma::ledger::{Entry, Ledger, RequestRecord, DEFAULT_CAPACITY};
use dma::{Arrival, Checks, Engine, EngineConfig, Gpa, Op, ReqId, Segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;
type Group<'a> = BenchmarkGroup<'a, WallTime>;

/// Bytes per segment.
const SEG: u32 = 4096;
/// The requests measured: a name and a number of 4 KiB segments.
const SIZES: [(&str, u32); 2] = [("4k", 1), ("128k", 32)];
/// Where a request's segments start in guest memory; they follow each other
/// every other page, as a guest's scattered pages would.
const BASE: u64 = 0x10_0000;
const STRIDE: u64 = 2 * SEG as u64;
/// Guest memory: room for 32 segments after `BASE`.
const MEM_SIZE: usize = 4 << 20;
/// Request records in the ledger that `ledger-json` writes.
const JSON_ENTRIES: usize = 1024;

fn mem() -> Mem {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    // Sources with data: all-zero ones would be counted as zero buffers.
    let data = data(SEG);
    for s in segments(32) {
        mem.write_slice(&data, s.gpa.into()).unwrap();
    }
    mem
}

/// `n` segments of 4 KiB.
fn segments(n: u32) -> Vec<Segment> {
    (0..u64::from(n))
        .map(|i| Segment::new(Gpa(BASE + i * STRIDE), SEG))
        .collect()
}

/// What the device writes: never all zeros, never a canary.
fn data(len: u32) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 + 1).collect()
}

fn bytes(n: u32) -> u64 {
    u64::from(n) * u64::from(SEG)
}

fn arrival(op: Op, n: u32) -> Arrival {
    Arrival {
        op,
        queue: 0,
        lba: 0,
        len: bytes(n),
        segments: segments(n),
    }
}

fn engine(checks: Checks) -> Engine {
    Engine::new(EngineConfig {
        checks,
        ..EngineConfig::default()
    })
}

fn findings(e: &Engine) -> u64 {
    e.finding_counts().iter().map(|&(_, n)| n).sum()
}

/// `Engine::arrive` of `op` over `n` segments. The arrival is cloned and the
/// ticket dropped inside the timing, the same in every `arrive` figure.
fn bench_arrive(g: &mut Group<'_>, id: BenchmarkId, mem: &Mem, e: &Engine, op: Op, n: u32) {
    let a = arrival(op, n);
    g.bench_function(id, |b| b.iter(|| e.arrive(mem, black_box(&a).clone())));
}

fn canary_stamp(c: &mut Criterion) {
    let mem = mem();
    let e = engine(Checks {
        canary: true,
        ..Checks::default()
    });
    let mut g = c.benchmark_group("canary-stamp");
    for (name, n) in SIZES {
        g.throughput(Throughput::Bytes(bytes(n)));
        let mut buf = vec![0u8; bytes(n) as usize];
        g.bench_function(BenchmarkId::new("fill", name), |b| {
            b.iter(|| canary::fill(black_box(ReqId(7)), 0, black_box(&mut buf)))
        });
        bench_arrive(
            &mut g,
            BenchmarkId::new("arrive", name),
            &mem,
            &e,
            Op::Read,
            n,
        );
        // The canary is in guest memory.
        let t = e.arrive(&mem, arrival(Op::Read, n));
        let mut found = vec![0u8; buf.len()];
        dma::from_guest(&mem, &t.arrival.segments, &mut found).unwrap();
        assert_eq!(
            canary::find_canaries(&found).next().map(|(_, id, _)| id),
            Some(t.id)
        );
    }
    g.finish();
    assert_eq!(findings(&e), 0, "stamping alone finds nothing");
}

/// `canary::check` of each 4 KiB segment of `found` against `expected`; how
/// many were damaged.
fn check_segments(expected: &[u8], found: &[u8]) -> usize {
    expected
        .chunks(SEG as usize)
        .zip(found.chunks(SEG as usize))
        .filter(|(e, f)| canary::check(e, f).is_some())
        .count()
}

fn canary_check(c: &mut Criterion) {
    let mem = mem();
    let mut g = c.benchmark_group("canary-check");
    for (name, n) in SIZES {
        let len = bytes(n) as usize;
        g.throughput(Throughput::Bytes(bytes(n)));
        let mut expected = vec![0u8; len];
        canary::fill(ReqId(7), 0, &mut expected);
        // What a clean read finds: the canary, in a buffer of its own.
        let intact = expected.clone();
        let overwritten = data(bytes(n) as u32);
        assert_eq!(check_segments(&expected, &intact), 0);
        assert_eq!(check_segments(&expected, &overwritten), n as usize);
        assert_eq!(
            canary::check(&expected, &overwritten).map(|d| d.overwrite),
            Some(Overwrite::Data)
        );

        g.bench_function(BenchmarkId::new("intact", name), |b| {
            b.iter(|| check_segments(black_box(&expected), black_box(&intact)))
        });
        g.bench_function(BenchmarkId::new("overwritten", name), |b| {
            b.iter(|| check_segments(black_box(&expected), black_box(&overwritten)))
        });

        let segs = segments(n);
        dma::to_guest(&mem, &segs, &expected).unwrap();
        let check_in_memory = |segs: &[Segment]| {
            let mut damaged = 0;
            for (i, seg) in segs.iter().enumerate() {
                let read =
                    |at: u64, buf: &mut [u8]| mem.read_slice(buf, GuestAddress(seg.gpa.0 + at));
                let offset = i as u64 * u64::from(SEG);
                let d = canary::check_stamped(ReqId(7), offset, u64::from(seg.len), read);
                damaged += usize::from(d.unwrap().is_some());
            }
            damaged
        };
        assert_eq!(check_in_memory(&segs), 0);
        g.bench_function(BenchmarkId::new("made-again+intact", name), |b| {
            b.iter(|| check_in_memory(black_box(&segs)))
        });
    }
    g.finish();
}

fn source_hash(c: &mut Criterion) {
    let mem = mem();
    let e = engine(Checks {
        snapshot: true,
        ..Checks::default()
    });
    let mut g = c.benchmark_group("source-hash");
    for (name, n) in SIZES {
        g.throughput(Throughput::Bytes(bytes(n)));
        let buf: Vec<u8> = (0..n).flat_map(|_| data(SEG)).collect();
        g.bench_function(BenchmarkId::new("xxh3", name), |b| {
            b.iter(|| {
                black_box(&buf)
                    .chunks(SEG as usize)
                    .map(xxhash_rust::xxh3::xxh3_64)
                    .fold(0, |acc, h| acc ^ h)
            })
        });
        bench_arrive(
            &mut g,
            BenchmarkId::new("arrive", name),
            &mem,
            &e,
            Op::Write,
            n,
        );
        // What arrive hashed is what the DMA then finds: no finding.
        let mut t = e.arrive(&mem, arrival(Op::Write, n));
        let mut out = vec![0u8; buf.len()];
        e.from_guest(&mem, &mut t, &mut out).unwrap();
        assert_eq!(out, buf);
    }
    g.finish();
    assert_eq!(findings(&e), 0, "unchanged sources are no finding");
}

fn arrive_checks_off(c: &mut Criterion) {
    let mem = mem();
    let e = engine(Checks::default());
    let mut g = c.benchmark_group("arrive-checks-off");
    for (name, n) in SIZES {
        g.throughput(Throughput::Bytes(bytes(n)));
        bench_arrive(
            &mut g,
            BenchmarkId::new("read", name),
            &mem,
            &e,
            Op::Read,
            n,
        );
        bench_arrive(
            &mut g,
            BenchmarkId::new("write", name),
            &mem,
            &e,
            Op::Write,
            n,
        );
    }
    g.finish();
}

/// The record `Engine::complete` makes of a 4 KiB read.
fn record(id: u64) -> Entry {
    Entry::Request(RequestRecord {
        request: ReqId(id),
        op: Op::Read,
        queue: 0,
        lba: id * 8,
        len: u64::from(SEG),
        segments: segments(1),
        moved_to: None,
        arrived_ns: 1_000 * id,
        dma_ns: Some(1_000 * id + 400),
        completed_ns: 1_000 * id + 900,
        wait: "none".into(),
        status: "ok".into(),
        tag: None,
    })
}

/// Pushes `iters` records into `ledger` and times the pushes alone: the
/// records are built beforehand, in batches of at most 4096, and with `reset`
/// each batch goes into a new ledger of the default capacity (the old one
/// dropped outside the timing), so that it stays below capacity and within
/// what a new ledger allocates up front.
fn time_pushes(iters: u64, ledger: &mut Ledger, reset: bool) -> Duration {
    const BATCH: u64 = 4096;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        let mut entries = (0..n).map(record).collect::<Vec<_>>().into_iter();
        if reset {
            *ledger = Ledger::new(DEFAULT_CAPACITY);
        }
        let start = Instant::now();
        for e in entries.by_ref() {
            ledger.push(black_box(e));
        }
        total += start.elapsed();
        black_box(&*ledger);
        left -= n;
    }
    total
}

fn ledger_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("ledger-append");
    g.throughput(Throughput::Elements(1));
    let mut below = Ledger::new(DEFAULT_CAPACITY);
    g.bench_function("below-capacity", |b| {
        b.iter_custom(|iters| time_pushes(iters, &mut below, true))
    });
    assert_eq!(below.dropped(), 0, "a ledger below capacity drops nothing");
    // One past capacity: evicting before the benchmark runs (or is filtered out).
    let mut full = Ledger::new(DEFAULT_CAPACITY);
    for i in 0..=DEFAULT_CAPACITY as u64 {
        full.push(record(i));
    }
    assert!(full.dropped() > 0, "the full ledger dropped entries");
    g.bench_function("full-evicting", |b| {
        b.iter_custom(|iters| time_pushes(iters, &mut full, false))
    });
    g.finish();
    assert_eq!(full.len(), DEFAULT_CAPACITY);
}

fn ledger_json(c: &mut Criterion) {
    let mut ledger = Ledger::new(JSON_ENTRIES);
    for i in 0..JSON_ENTRIES as u64 {
        ledger.push(record(i));
    }
    let mut out = Vec::new();
    ledger.write_json_lines(&mut out).unwrap();
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), JSON_ENTRIES);
    eprintln!("ledger-json: {} B per line", out.len() / JSON_ENTRIES);
    let mut g = c.benchmark_group("ledger-json");
    g.throughput(Throughput::Elements(JSON_ENTRIES as u64));
    g.bench_function("write-json-lines", |b| {
        b.iter(|| {
            out.clear();
            black_box(&ledger).write_json_lines(&mut out).unwrap();
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = canary_stamp, canary_check, source_hash, arrive_checks_off, ledger_append, ledger_json
}
criterion_main!(benches);
