//! Long zero-fills leave their queue's thread free: the request pipeline
//! (the part both interfaces share) hands a large write-zeroes to its I/O
//! pool, which completes it when the zeros are in place, while the thread
//! that submitted it goes on serving. Driven in process, over a memory
//! backing, with a reply that tells the test instead of a guest.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use backend::counters::Counters;
use backend::pipeline::work::{self, Work};
use backend::pipeline::{Core, Label, Outcome, Pipeline, Reply, Submitted};
use dma::{Engine, EngineConfig, Gpa, Op, Segment};
use nvme_model::{Backing, Lba, LbaSize, Namespace};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
/// The zero-fill: 32 MiB from LBA 0.
const ZEROED: u64 = 32 * MIB;
const BLOCK: u64 = 512;

/// Tells the test how a request ended; with a gate, only once the test
/// opens it (the pool thread that runs it waits there, the request not yet
/// complete).
struct ToTest {
    outcomes: Sender<Outcome>,
    gate: Option<Receiver<()>>,
}

impl Reply for ToTest {
    fn send(
        self: Box<Self>,
        _core: &Core,
        _mem: &GuestMemoryMmap<()>,
        outcome: Outcome,
    ) -> &'static str {
        if let Some(gate) = &self.gate {
            let _ = gate.recv();
        }
        let _ = self.outcomes.send(outcome);
        "ok"
    }
}

/// A pipeline of one queue over a 64 MiB memory backing whose first
/// `ZEROED` bytes hold 0xaa, and 1 MiB of guest memory.
fn setup() -> (Arc<Namespace>, Pipeline, GuestMemoryMmap<()>) {
    let ns = Namespace::new(
        Backing::memory(64 * MIB).expect("memory"),
        LbaSize::B512,
        false,
    )
    .expect("namespace");
    let full = vec![0xaau8; MIB as usize];
    for mib in 0..ZEROED / MIB {
        let r = ns.check_range(Lba(mib * MIB / BLOCK), MIB / BLOCK).unwrap();
        ns.write(r, &full).expect("fill");
    }
    let ns = Arc::new(ns);
    let pipeline = Pipeline::new(
        ns.clone(),
        Arc::new(Engine::new(EngineConfig::default())),
        Arc::new(Counters::default()),
        1,
        None,
        None,
    )
    .expect("pipeline");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIB as usize)])
        .expect("guest memory");
    pipeline
        .set_memory(GuestMemoryAtomic::new(mem.clone()))
        .expect("set memory");
    (ns, pipeline, mem)
}

fn label(op: &'static str) -> Label {
    Label {
        op,
        sector: 0,
        len: 0,
    }
}

/// Submits a write-zeroes of `bytes` from LBA 0 on queue 0, its outcome sent
/// to `outcomes` once `gate` (if any) opens.
fn zero(
    ns: &Namespace,
    pipeline: &Pipeline,
    mem: &GuestMemoryMmap<()>,
    bytes: u64,
    outcomes: &Sender<Outcome>,
    gate: Option<Receiver<()>>,
) -> Submitted {
    let range = ns.check_range(Lba(0), bytes / BLOCK).unwrap();
    let work = Work::Zero(vec![(range, false)]);
    let prepared = work::prepared(ns, 0, Op::WriteZeroes, work, Vec::new());
    let outcomes = outcomes.clone();
    let reply = move || -> Box<dyn Reply> { Box::new(ToTest { outcomes, gate }) };
    pipeline.submit(mem, label("write-zeroes"), prepared, reply, &mut Vec::new())
}

/// Whether every byte of the zero-filled range reads back as zero.
fn all_zero(ns: &Namespace) -> bool {
    let mut buf = vec![0xffu8; MIB as usize];
    (0..ZEROED / MIB).all(|mib| {
        let r = ns.check_range(Lba(mib * MIB / BLOCK), MIB / BLOCK).unwrap();
        ns.read(r, &mut buf).expect("read");
        buf.iter().all(|&b| b == 0)
    })
}

#[test]
fn a_long_zero_fill_completes_off_the_submitting_thread_while_it_serves_on() {
    let (ns, pipeline, mem) = setup();
    let (outcomes, done) = mpsc::channel();
    let (open, gate) = mpsc::channel();
    let submitted = zero(&ns, &pipeline, &mem, ZEROED, &outcomes, Some(gate));
    assert!(
        matches!(submitted, Submitted::Later),
        "the zero-fill was served on the submitting thread: {submitted:?}"
    );

    // The zero-fill has not completed (its reply waits for the gate): a
    // read on the same queue is served at once all the same.
    let r = ns.check_range(Lba(ZEROED / BLOCK), 8).unwrap();
    let read = work::prepared(
        &ns,
        0,
        Op::Read,
        Work::Read(r),
        vec![Segment::new(Gpa(0x1000), 4096)],
    );
    let reply = || -> Box<dyn Reply> { unreachable!("a small read is served now") };
    match pipeline.submit(&mem, label("read"), read, reply, &mut Vec::new()) {
        Submitted::Now(outcome, finish) => {
            assert_eq!(outcome, Outcome::Done { written: 4096 });
            pipeline.finish(finish, "ok");
        }
        Submitted::Later => panic!("the read waited"),
    }
    assert!(done.try_recv().is_err(), "the zero-fill completed already");

    open.send(()).expect("open the gate");
    let outcome = done.recv_timeout(Duration::from_secs(30)).expect("done");
    assert_eq!(outcome, Outcome::Done { written: 0 });
    assert!(all_zero(&ns), "the zeros are in place when it completes");

    // A short one is served at once, as before.
    let short = zero(&ns, &pipeline, &mem, 4096, &outcomes, None);
    assert!(matches!(
        short,
        Submitted::Now(Outcome::Done { written: 0 }, _)
    ));
}

#[test]
fn stopping_a_queue_waits_for_its_zero_fill_in_the_pool() {
    let (ns, pipeline, mem) = setup();
    let pipeline = Arc::new(pipeline);
    let (outcomes, done) = mpsc::channel();
    let (open, gate) = mpsc::channel();
    let submitted = zero(&ns, &pipeline, &mem, ZEROED, &outcomes, Some(gate));
    assert!(matches!(submitted, Submitted::Later));

    let (stopped, drained) = mpsc::channel();
    let stopping = {
        let pipeline = pipeline.clone();
        thread::spawn(move || {
            pipeline.drain_queue(0);
            let _ = stopped.send(());
        })
    };
    // Still in the pool: the queue does not stop (however long this waits).
    assert_eq!(
        drained.recv_timeout(Duration::from_millis(100)),
        Err(RecvTimeoutError::Timeout)
    );
    open.send(()).expect("open the gate");
    drained
        .recv_timeout(Duration::from_secs(30))
        .expect("stopped");
    // By then the guest had been told.
    assert_eq!(done.try_recv(), Ok(Outcome::Done { written: 0 }));
    stopping.join().expect("the stopping thread");
    assert!(all_zero(&ns));
}
