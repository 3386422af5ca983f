//! A virtio-blk request from whatever a guest can put in front of the device:
//! any descriptor chain over any guest memory contents, under any advertised
//! limits. Whatever `request::parse` accepts then goes the whole way a request
//! goes — checked against the namespace, through the DMA engine with every
//! check on, to the media — and every rejection must name a status.

#![no_main]

use arbitrary::Arbitrary;
use backend::pipeline::work::perform;
use backend::virtio_blk::prepare::prepare;
use backend::virtio_blk::request::{self, Limits};
use dma::{Checks, Engine, EngineConfig};
use libfuzzer_sys::fuzz_target;
use nvme_model::{Backing, LbaSize, Namespace};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: two regions with a hole between, so addresses can fall in
/// the gap or run off a region's end.
const REGIONS: [(u64, usize); 2] = [(0, 64 << 10), (0x2_0000, 16 << 10)];

#[derive(Debug, Arbitrary)]
struct Input {
    descriptors: Vec<(u32, u32, u16)>,
    seg_max: u8,
    size_max_pages: u8,
    lbs_4k: bool,
    /// Where the contents go, and what they are.
    writes: Vec<(u16, Vec<u8>)>,
}

fuzz_target!(|input: Input| {
    let regions: Vec<_> = REGIONS.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&regions).expect("guest memory");
    for (at, bytes) in input.writes.iter().take(16) {
        let _ = mem.write_slice(bytes, GuestAddress(u64::from(*at)));
    }
    // Addresses mostly near guest memory, sometimes anywhere.
    let chain: Vec<Descriptor> = input
        .descriptors
        .iter()
        .take(300)
        .map(|&(addr, len, flags)| {
            let addr = if addr & 1 == 0 {
                u64::from(addr) % 0x3_0000
            } else {
                u64::from(addr) << 20
            };
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    let limits = Limits {
        seg_max: u32::from(input.seg_max).max(1),
        size_max: (u32::from(input.size_max_pages) + 1) * 4096,
    };
    let req = match request::parse(&mem, chain.into_iter(), limits) {
        Ok(req) => req,
        Err(rejected) => {
            let _ = rejected.reason.status();
            return;
        }
    };
    let lbs = if input.lbs_4k {
        LbaSize::B4096
    } else {
        LbaSize::B512
    };
    let ns = Namespace::new(Backing::memory(1 << 20).expect("memfd"), lbs, false)
        .expect("namespace")
        .with_write_cache(64 << 10);
    let engine = Engine::new(EngineConfig {
        checks: Checks {
            canary: true,
            snapshot: true,
            overlap: true,
            ledger: true,
        },
        ledger_capacity: 64,
        zero_page: Some(dma::Gpa(0x1000)),
        seed: 1,
        watch_limits: dma::WatchLimits::default(),
    });
    let mut buf = Vec::new();
    let Ok(prepared) = prepare(&ns, &mem, 0, &req, &[b'x'; 20], &mut buf) else {
        return;
    };
    let mut ticket = engine.arrive(&mem, prepared.arrival);
    let done = perform(
        &ns,
        &engine,
        &mem,
        &prepared.work,
        prepared.epoch,
        &mut ticket,
        &mut buf,
    );
    let _ = engine.complete(ticket, if done.is_ok() { "ok" } else { "ioerr" });
});
