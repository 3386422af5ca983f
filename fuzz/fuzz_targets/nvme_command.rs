//! The NVMe controller under whatever a guest can do: arbitrary submission
//! entries on the admin queue and two I/O queues over arbitrary guest memory
//! contents (PRP lists, dataset management ranges, the queues themselves),
//! arbitrary register and doorbell writes, resets, and the handler completing
//! what it holds in any order with any status.
//!
//! Nothing may panic, and every command that reaches the handler must have
//! been checked: its blocks inside the namespace, its data exactly its blocks
//! and inside guest memory, nothing that changes the media of a write
//! protected namespace.
//!
//! The input is a configuration byte, then records, each a kind byte and its
//! bytes (so seeds can be written by hand):
//! - 0 admin command: 64 bytes of submission entry;
//! - 1 I/O command: queue (1 or 2 by parity), 64 bytes of submission entry;
//! - 2 memory: 3-byte address, length, that many bytes;
//! - 3 register write: 2-byte offset, length (at most 8), that many bytes;
//! - 4 doorbell: 2-byte doorbell index, 4-byte value;
//! - 5 completion: which held command, which status, 4-byte dword 0;
//! - 6 reap: which completion queue (0 to 2);
//! - 7 reset (and the host sets the controller up again).

#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backend::nvme::{
    CommandTag, Controller, Identity, Interrupts, IoCommand, IoHandler, IoOp, NvmeStatus,
};
use backend::nvme_driver::{
    AdminQueues, Driver, Gpa, HostMemory, InProcess, IoQueuePair, Sqe, CC_LINUX, DOORBELLS,
};
use libfuzzer_sys::fuzz_target;
use nvme_model::{Deallocate, Geometry, LbaSize};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory: 256 KiB at 0 and 64 KiB at 1 MiB, so addresses can fall in
/// the hole or run off a region's end.
const REGIONS: [(u64, usize); 2] = [(0, 256 << 10), (0x10_0000, 64 << 10)];
const SPAN: u64 = 0x11_0000;
/// Queues set up before the records run: admin, then two I/O pairs.
const ENTRIES: u16 = 8;
const ASQ: u64 = 0x1000;
const ACQ: u64 = 0x2000;
fn sq_base(qid: u16) -> u64 {
    0x3000 + u64::from(qid) * 0x2000
}
fn cq_base(qid: u16) -> u64 {
    sq_base(qid) + 0x1000
}

/// Checks every command it gets against what the controller promised, and
/// holds it until a completion record.
struct Checker {
    mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    identity: Identity,
    max_transfer: u64,
    held: Mutex<Vec<CommandTag>>,
}

impl IoHandler for Checker {
    fn submit(&self, cmd: IoCommand) {
        let id = &self.identity;
        let in_range = |start: u64, blocks: u64| {
            start
                .checked_add(blocks)
                .is_some_and(|end| end <= id.blocks)
        };
        let data = dma::segment::total_len(&cmd.segments);
        match &cmd.op {
            IoOp::Read | IoOp::Write => {
                assert!(cmd.nlb >= 1);
                assert!(in_range(cmd.slba.0, u64::from(cmd.nlb)), "{cmd:?}");
                assert_eq!(data, u64::from(cmd.nlb) << id.lbs.shift(), "{cmd:?}");
                assert!(data <= self.max_transfer);
                let mem = self.mem.memory();
                for s in &cmd.segments {
                    assert!(s.is_in(&*mem), "{s:?} of {cmd:?}");
                }
                assert!(cmd.op == IoOp::Read || !id.read_only);
            }
            IoOp::Flush => assert_eq!(data, 0),
            IoOp::WriteZeroes { .. } => {
                assert!(id.write_zeroes && !id.read_only && data == 0);
                assert!(in_range(cmd.slba.0, u64::from(cmd.nlb)), "{cmd:?}");
            }
            IoOp::Deallocate(ranges) => {
                assert!(id.dsm && !id.read_only && data == 0);
                assert!(!ranges.is_empty() && ranges.len() <= 256);
                for r in ranges {
                    assert!(r.blocks > 0 && in_range(r.start.0, u64::from(r.blocks)));
                }
            }
        }
        self.held.lock().unwrap().push(cmd.tag);
    }
}

struct NoInterrupts;

impl Interrupts for NoInterrupts {
    fn signal(&self, _vector: u16) {}
}

/// The controller and the host driver that sets it up and feeds it.
struct Host {
    ctrl: Arc<Controller>,
    checker: Arc<Checker>,
    driver: Driver<InProcess>,
}

impl Host {
    /// Enables the controller and creates I/O queue pairs 1 and 2, as a
    /// driver does; errors are the input's business.
    fn set_up(&mut self) {
        let admin = AdminQueues {
            sq: Gpa(ASQ),
            cq: Gpa(ACQ),
            entries: ENTRIES,
        };
        let _ = self.driver.enable(admin, CC_LINUX);
        for qid in 1..=2u16 {
            let pair = IoQueuePair {
                qid,
                sq: Gpa(sq_base(qid)),
                cq: Gpa(cq_base(qid)),
                entries: ENTRIES,
                vector: Some(qid),
            };
            let _ = self.driver.create_io_pair(pair);
        }
    }

    fn submit(&mut self, qid: u16, entry: &[u8; 64]) {
        let _ = self.driver.submit(qid, &Sqe::from_bytes(entry));
    }

    /// Consumes new completions by phase tag and rings the head doorbell.
    fn reap(&mut self, qid: u16) {
        let _ = self.driver.reap(qid);
    }
}

fn identity(config: u8) -> Identity {
    let lbs = if config & 1 != 0 {
        LbaSize::B4096
    } else {
        LbaSize::B512
    };
    let mut geometry = Geometry::default_for(lbs);
    if config & 8 != 0 {
        geometry.max_transfer = Some(64 << 10);
    }
    Identity {
        serial: "fuzz".into(),
        vendor_id: 0,
        lbs,
        blocks: (4 << 20) >> lbs.shift(),
        read_only: config & 2 != 0,
        geometry,
        write_cache: (config & 4 == 0).then_some(true),
        deallocate: Deallocate::Zeroes,
        dsm: config & 16 == 0,
        write_zeroes: config & 32 == 0,
        io_queues: 3,
        queue_entries: 16,
        vectors: 4,
        doorbell_buffer: config & 64 == 0,
    }
}

/// Takes `n` bytes from the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Some(head)
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let Some(&[config]) = take(&mut data, 1) else {
        return;
    };
    let mut host = Host::new(config);
    host.set_up();
    for _ in 0..256 {
        let Some(&[kind]) = take(&mut data, 1) else {
            break;
        };
        if host.record(kind, &mut data).is_none() {
            break;
        }
    }

    // Whatever is still held completes; the queues drain.
    let held = std::mem::take(&mut *host.checker.held.lock().unwrap());
    for tag in held {
        host.ctrl.complete(tag, NvmeStatus::Success, 0);
    }
    for qid in 0..3 {
        host.reap(qid);
    }
});

impl Host {
    /// A controller of the identity `config` picks, memory and no
    /// interrupts attached, and the driver in process.
    fn new(config: u8) -> Host {
        let regions: Vec<_> = REGIONS.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
        let mem =
            GuestMemoryAtomic::new(GuestMemoryMmap::<()>::from_ranges(&regions).expect("memory"));
        let identity = identity(config);
        let checker = Arc::new(Checker {
            mem: mem.clone(),
            identity: identity.clone(),
            max_transfer: identity.max_transfer(),
            held: Mutex::new(Vec::new()),
        });
        let ctrl = Arc::new(Controller::new(identity, checker.clone()));
        ctrl.attach(mem.clone(), Arc::new(NoInterrupts));
        let mut driver = Driver::new(InProcess::new(ctrl.clone(), mem));
        // A command runs before its doorbell write returns: there is nothing
        // to wait for.
        driver.set_timeout(Duration::ZERO);
        Host {
            ctrl,
            checker,
            driver,
        }
    }

    /// Runs the record of `kind` from the front of `data`; None when the
    /// input ends inside it.
    fn record(&mut self, kind: u8, data: &mut &[u8]) -> Option<()> {
        match kind % 8 {
            0 => take(data, 64).map(|e| {
                self.submit(0, e.try_into().expect("64 bytes"));
                self.reap(0);
            }),
            1 => take(data, 65).map(|e| {
                let qid = 1 + u16::from(e[0] & 1);
                self.submit(qid, e[1..].try_into().expect("64 bytes"));
            }),
            2 => take(data, 4).and_then(|h| {
                let at = u64::from(u32::from_le_bytes([h[0], h[1], h[2], 0])) % SPAN;
                take(data, usize::from(h[3])).map(|bytes| {
                    let _ = self.driver.memory().write_mem(Gpa(at), bytes);
                })
            }),
            3 => take(data, 3).and_then(|h| {
                let offset = u64::from(u16::from_le_bytes([h[0], h[1]]));
                take(data, usize::from(h[2] % 9)).map(|bytes| {
                    self.ctrl.bar0_write(offset, bytes);
                    let mut back = [0u8; 8];
                    self.ctrl.bar0_read(offset, &mut back[..bytes.len()]);
                })
            }),
            4 => take(data, 6).map(|h| {
                let index = u64::from(u16::from_le_bytes([h[0], h[1]]));
                let value = u32::from_le_bytes([h[2], h[3], h[4], h[5]]);
                let _ = self.driver.write32(DOORBELLS + (index % 0xc00) * 4, value);
            }),
            5 => take(data, 6).map(|h| self.complete_held(h)),
            6 => take(data, 1).map(|h| self.reap(u16::from(h[0] % 3))),
            _ => {
                self.ctrl.reset();
                self.checker.held.lock().unwrap().clear();
                self.set_up();
                Some(())
            }
        }
    }

    /// Completes the held command `h[0]` picks with the status `h[1]` picks
    /// and dword 0 from `h[2..6]`.
    fn complete_held(&mut self, h: &[u8]) {
        let tag = {
            let mut held = self.checker.held.lock().unwrap();
            (!held.is_empty()).then(|| {
                let i = usize::from(h[0]) % held.len();
                held.swap_remove(i)
            })
        };
        if let Some(tag) = tag {
            let status = NvmeStatus::ALL[usize::from(h[1]) % NvmeStatus::ALL.len()];
            let dw0 = u32::from_le_bytes([h[2], h[3], h[4], h[5]]);
            self.ctrl.complete(tag, status, dw0);
        }
    }
}
