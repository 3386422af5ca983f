//! What the engine costs per request: 4 KiB reads and writes moved
//! (a) by the plain copies, (b) through the engine with every check off and
//! (c) through the engine with canaries, source snapshots and the ledger on;
//! and what `--overlap` costs a request of many segments over few pages (an
//! NVMe PRP list alternating between two pages, 65,536 entries) arriving
//! while 300 other requests are in flight.
//!
//! `cargo bench -p dma --bench engine`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dma::{Arrival, Checks, Engine, EngineConfig, Gpa, Op, Segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const LEN: u32 = 4096;
const N: usize = LEN as usize;
/// A read's destination.
const DST: u64 = 0x1_0000;
/// A write's source.
const SRC: u64 = 0x4_0000;

fn mem() -> Mem {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    // A source with data: an all-zero one would be counted as a zero buffer.
    mem.write_slice(&data(), GuestAddress(SRC)).unwrap();
    mem
}

fn data() -> Vec<u8> {
    (0..N).map(|i| (i % 251) as u8 + 1).collect()
}

fn arrival(op: Op, gpa: u64) -> Arrival {
    Arrival {
        op,
        queue: 0,
        lba: 0,
        len: u64::from(LEN),
        segments: vec![Segment::new(Gpa(gpa), LEN)],
    }
}

fn engine(checks: Checks) -> Engine {
    Engine::new(EngineConfig {
        checks,
        ..EngineConfig::default()
    })
}

/// The three ways a request's data moves, by name.
fn variants() -> [(&'static str, Option<Checks>); 3] {
    [
        ("plain", None),
        ("engine-checks-off", Some(Checks::default())),
        (
            "engine-canary-snapshot-ledger",
            Some(Checks {
                canary: true,
                snapshot: true,
                overlap: false,
                ledger: true,
            }),
        ),
    ]
}

fn reads(c: &mut Criterion) {
    let mem = mem();
    let data = data();
    let dst = [Segment::new(Gpa(DST), LEN)];
    let mut g = c.benchmark_group("read-4k");
    g.throughput(Throughput::Elements(1));
    for (name, checks) in variants() {
        match checks {
            None => {
                g.bench_function(name, |b| {
                    b.iter(|| dma::to_guest(&mem, black_box(&dst), black_box(&data)).unwrap())
                });
            }
            Some(checks) => {
                let e = engine(checks);
                g.bench_function(name, |b| {
                    b.iter(|| {
                        let mut t = e.arrive(&mem, arrival(Op::Read, DST));
                        e.to_guest(&mem, &mut t, black_box(&data)).unwrap();
                        e.complete(t, "ok")
                    })
                });
                let findings: u64 = e.finding_counts().iter().map(|&(_, n)| n).sum();
                assert_eq!(findings, 0, "a clean run has no findings");
            }
        };
    }
    g.finish();
}

fn writes(c: &mut Criterion) {
    let mem = mem();
    let mut buf = vec![0u8; N];
    let src = [Segment::new(Gpa(SRC), LEN)];
    let mut g = c.benchmark_group("write-4k");
    g.throughput(Throughput::Elements(1));
    for (name, checks) in variants() {
        match checks {
            None => {
                g.bench_function(name, |b| {
                    b.iter(|| dma::from_guest(&mem, black_box(&src), black_box(&mut buf)).unwrap())
                });
            }
            Some(checks) => {
                let e = engine(checks);
                g.bench_function(name, |b| {
                    b.iter(|| {
                        let mut t = e.arrive(&mem, arrival(Op::Write, SRC));
                        e.from_guest(&mem, &mut t, black_box(&mut buf)).unwrap();
                        e.complete(t, "ok")
                    })
                });
                let findings: u64 = e.finding_counts().iter().map(|&(_, n)| n).sum();
                assert_eq!(findings, 0, "a clean run has no findings");
            }
        };
    }
    g.finish();
}

/// Requests in flight while the PRP-list request arrives, one page each.
const IN_FLIGHT: u64 = 300;
/// Entries of the PRP-list request, alternating between two pages.
const PRP_ENTRIES: u64 = 65_536;

fn overlap_arrival(c: &mut Criterion) {
    let mem = Mem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let e = engine(Checks {
        overlap: true,
        ..Checks::default()
    });
    // Reads on pages of their own, from page 16 on: none shares a page with
    // the request measured, so its arrival has every one to compare with and
    // nothing to report.
    let others: Vec<_> = (0..IN_FLIGHT)
        .map(|i| e.arrive(&mem, arrival(Op::Read, (16 + i) * u64::from(LEN))))
        .collect();
    let prp = Arrival {
        op: Op::Read,
        queue: 0,
        lba: 0,
        len: PRP_ENTRIES * u64::from(LEN),
        segments: (0..PRP_ENTRIES)
            .map(|i| Segment::new(Gpa((i % 2) * 2 * u64::from(LEN)), LEN))
            .collect(),
    };
    let mut g = c.benchmark_group("overlap-arrival");
    g.throughput(Throughput::Elements(1));
    g.bench_function("prp-65536-alternating-300-in-flight", |b| {
        b.iter(|| {
            let t = e.arrive(&mem, black_box(&prp).clone());
            e.complete(t, "ok")
        })
    });
    g.finish();
    let findings: u64 = e.finding_counts().iter().map(|&(_, n)| n).sum();
    assert_eq!(findings, 0, "no page is shared");
    for t in others {
        e.complete(t, "ok");
    }
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
    targets = reads, writes, overlap_arrival
}
criterion_main!(benches);
