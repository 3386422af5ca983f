//! What parsing a virtio-blk descriptor chain costs, per request: a 4 KiB read,
//! a 4 KiB write, a 128 KiB read in 32 segments of 4 KiB, a flush, and a
//! discard of one range, each as header, data and status descriptors, under
//! the limits the device advertises with its default queue size of 256.
//!
//! Each request is parsed two ways:
//!
//! - `descriptors`: from descriptors already read, as `request.rs`'s unit tests
//!   hand them to `request::parse`: the parser alone (the header read from
//!   guest memory, the segments checked against it).
//! - `ring`: from a `virtio_queue::DescriptorChain` over a descriptor table in
//!   guest memory, as the device pops it: the parser plus the walk of the
//!   table (each descriptor read and checked by the chain iterator).
//!
//! `cargo bench -p backend --bench parse`

use std::hint::black_box;
use std::time::Duration;

use backend::vhost_user_driver::{encode_header, DiscardRange, RequestType, Sector};
use backend::virtio_blk::request::{parse, Limits, Request};
use backend::virtio_blk::{self, SIZE_MAX};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

/// The device's default queue size, and the limits it advertises with it
/// (`seg_max` is the queue size less header and status).
const QUEUE_SIZE: u16 = 256;
const LIMITS: Limits = Limits {
    seg_max: QUEUE_SIZE as u32 - 2,
    size_max: SIZE_MAX,
};
/// VRING_DESC_F_NEXT, VRING_DESC_F_WRITE.
const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// Where things lie in guest memory: the queue from 0 (as `MockSplitQueue`
/// puts it), then the header, the status byte, a discard range and the data.
const HEADER: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const RANGE: u64 = 0x10_2000;
const DATA: u64 = 0x20_0000;
const MEM_SIZE: usize = 4 << 20;
const SEG: u32 = 4096;
const SECTOR: u64 = 8;

/// One request as the guest lays it out.
struct Case {
    name: &'static str,
    kind: RequestType,
    /// Data descriptors: device-writable or not by `kind`.
    data: Vec<(u64, u32)>,
}

impl Case {
    /// Address, length and flags of each descriptor, without NEXT.
    fn layout(&self) -> Vec<(u64, u32, u16)> {
        let data_flags = if self.kind.device_writes_data() {
            WRITE
        } else {
            0
        };
        let mut v = vec![(HEADER, virtio_blk::HEADER_LEN, 0)];
        v.extend(self.data.iter().map(|&(addr, len)| (addr, len, data_flags)));
        v.push((STATUS, 1, WRITE));
        v
    }

    /// Guest memory with the header (and the discard range) written.
    fn mem(&self) -> Mem {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        mem.write_slice(
            &encode_header(self.kind.code(), Sector(SECTOR)),
            GuestAddress(HEADER),
        )
        .unwrap();
        let range = DiscardRange {
            sector: Sector(SECTOR),
            num_sectors: 8,
            flags: 0,
        };
        mem.write_slice(&range.encode(), GuestAddress(RANGE))
            .unwrap();
        mem
    }

    /// The descriptors as the chain iterator yields them: each but the last
    /// points at the next.
    fn descriptors(&self) -> Vec<Descriptor> {
        let layout = self.layout();
        let last = layout.len() - 1;
        layout
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let (flags, next) = if i < last {
                    (flags | NEXT, i as u16 + 1)
                } else {
                    (flags, 0)
                };
                Descriptor::new(addr, len, flags, next)
            })
            .collect()
    }

    /// What `parse` must return.
    fn expected(&self) -> (RequestType, u32, usize) {
        let len = self.data.iter().map(|&(_, len)| len).sum();
        (self.kind, len, self.data.len())
    }
}

fn cases() -> Vec<Case> {
    let pages =
        |n: u64| -> Vec<(u64, u32)> { (0..n).map(|i| (DATA + i * u64::from(SEG), SEG)).collect() };
    vec![
        Case {
            name: "read-4k",
            kind: RequestType::In,
            data: pages(1),
        },
        Case {
            name: "write-4k",
            kind: RequestType::Out,
            data: pages(1),
        },
        Case {
            name: "read-128k-32x4k",
            kind: RequestType::In,
            data: pages(32),
        },
        Case {
            name: "flush",
            kind: RequestType::Flush,
            data: Vec::new(),
        },
        Case {
            name: "discard-1-range",
            kind: RequestType::Discard,
            data: vec![(RANGE, DiscardRange::SIZE as u32)],
        },
    ]
}

fn check(case: &Case, req: Result<Request, impl std::fmt::Debug>) {
    let req = req.unwrap_or_else(|e| panic!("{}: {e:?}", case.name));
    let (op, len, segments) = case.expected();
    assert_eq!(
        (req.op, req.data_len, req.data.len(), req.sector),
        (op, len, segments, SECTOR),
        "{}",
        case.name
    );
    assert_eq!(req.status.0, STATUS, "{}", case.name);
}

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    for case in cases() {
        let mem = case.mem();

        let descs = case.descriptors();
        check(&case, parse(&mem, descs.iter().copied(), LIMITS));
        g.bench_function(BenchmarkId::new("descriptors", case.name), |b| {
            b.iter(|| parse(&mem, black_box(&descs).iter().copied(), LIMITS))
        });

        let queue = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let raw: Vec<RawDescriptor> = descs.iter().copied().map(RawDescriptor::from).collect();
        let chain = queue.build_desc_chain(&raw).unwrap();
        check(&case, parse(&mem, chain.clone(), LIMITS));
        g.bench_function(BenchmarkId::new("ring", case.name), |b| {
            b.iter(|| parse(&mem, black_box(&chain).clone(), LIMITS))
        });
    }
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
    targets = parsing
}
criterion_main!(benches);
