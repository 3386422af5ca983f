//! The NVMe interface end to end, without QEMU: `dmaprobe serve --nvme` as a
//! child process, driven over vfio-user by the host NVMe driver
//! (`backend::nvme_driver`), which does what Linux's nvme driver does —
//! enable the controller, identify it, set up a pair of I/O queues, put
//! commands in guest memory, ring doorbells, and take completions from guest
//! memory when their MSI-X eventfd fires.
//!
//! Guest memory is a memfd mapped into the daemon (DMA_MAP at IOVA 0) and
//! here; its layout is in the constants below. Each test checks what a user
//! would: the bytes in the `--disk` file and in guest memory, the statuses of
//! the completion entries, and what `dmaprobe ctl` and the ledger say.

mod common;

use std::ops::Range;
use std::thread;
use std::time::{Duration, Instant};

use backend::nvme::identify::IDENTIFY_LEN;
use backend::nvme::shadow::ShadowSlot;
use backend::nvme_driver::command::fid::{NUMBER_OF_QUEUES, VOLATILE_WRITE_CACHE};
use backend::nvme_driver::command::{self, admin_op, io_op, AD, FUA};
use backend::nvme_driver::csts::{CFS, RDY};
use backend::nvme_driver::reg::{CAP, CSTS, VS};
use backend::nvme_driver::{
    ring_doorbell, write_list, AdminQueues, Completion, Driver, Gpa, HostMemory, HostRam,
    Interrupt, IoQueuePair, Prp, ShadowBuffers, Sqe, Transport, VfioUser, CC_LINUX, DOORBELLS,
    PAGE,
};
use common::child::{Serve, PREFILL, SOON};
use common::pattern;
use nvme_model::Lba;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// The host's side: guest memory and the driver

/// Guest memory: 16 MiB at IOVA 0.
const RAM: u64 = 16 << 20;
/// The admin queues, one page each.
const ASQ: u64 = 0x0000;
const ACQ: u64 = 0x1000;
/// I/O queue pair 1: a page of submission entries, a page of completion entries.
const IOSQ: u64 = 0x2000;
const IOCQ: u64 = 0x3000;
/// Identify data lands here.
const IDENT: u64 = 0x4000;
/// Dataset management ranges.
const RANGES: u64 = 0x5000;
/// PRP list pages: 16 of them.
const LISTS: u64 = 0x1_0000;
/// Data buffers: the rest.
const DATA: u64 = 0x10_0000;

const ADMIN_ENTRIES: u16 = 32;
const IO_ENTRIES: u16 = 64;
/// The disk of `Serve`: 16 MiB.
const DISK: u64 = 16 << 20;
const NSID: u32 = 1;

const ADMIN: AdminQueues = AdminQueues {
    sq: Gpa(ASQ),
    cq: Gpa(ACQ),
    entries: ADMIN_ENTRIES,
};
/// I/O queue pair 1, its completions on vector 1.
const IO_PAIR: IoQueuePair = IoQueuePair {
    qid: 1,
    sq: Gpa(IOSQ),
    cq: Gpa(IOCQ),
    entries: IO_ENTRIES,
    vector: Some(1),
};
/// MSI-X vectors: 0 for the admin queue, 1 for I/O queue 1.
const VECTORS: u16 = 2;

/// Statuses as (status code type, status code), NVMe 1.4 figures 128-130.
const SUCCESS: (u8, u8) = (0, 0x00);
const INVALID_OPCODE: (u8, u8) = (0, 0x01);
const INVALID_FIELD: (u8, u8) = (0, 0x02);
const DATA_TRANSFER_ERROR: (u8, u8) = (0, 0x04);
const ABORT_REQUESTED: (u8, u8) = (0, 0x07);
const INVALID_NAMESPACE: (u8, u8) = (0, 0x0b);
const PRP_OFFSET_INVALID: (u8, u8) = (0, 0x13);
const LBA_OUT_OF_RANGE: (u8, u8) = (0, 0x80);
const WRITE_FAULT: (u8, u8) = (2, 0x80);
const UNRECOVERED_READ_ERROR: (u8, u8) = (2, 0x81);

/// A read or write of `blocks` from `lba` of the namespace with the data
/// where `prp` says.
fn rw(opcode: u8, lba: u64, blocks: u32, prp: &Prp) -> Sqe {
    command::rw(opcode, NSID, Lba(lba), blocks, prp)
}

/// The host driver over a vfio-user client, with guest memory laid out as
/// above; whatever fails fails the test.
struct Nvme {
    driver: Driver<VfioUser>,
}

impl Nvme {
    /// Connects to the daemon's vfio-user socket, maps guest memory, hands
    /// over the MSI-X eventfds and turns on memory space and bus mastering.
    fn connect(s: &Serve) -> Nvme {
        Nvme::connect_windows(s, &[RAM])
    }

    /// The same with guest memory DMA-mapped as windows ending at `ends`.
    fn connect_windows(s: &Serve, ends: &[u64]) -> Nvme {
        let ram = HostRam::new(RAM).expect("guest memory");
        let vfio = VfioUser::connect(&s.socket, SOON, ram, ends, VECTORS).expect("vfio-user");
        let mut driver = Driver::new(vfio);
        driver.set_timeout(SOON);
        Nvme { driver }
    }

    fn ram(&self) -> &HostRam {
        self.driver.memory()
    }

    /// Closes the connection and keeps guest memory.
    fn disconnect(self) -> HostRam {
        self.driver.into_transport().disconnect()
    }

    /// Whether MSI-X vector `vector` fired since it was last asked.
    fn interrupt(&self, vector: u16) -> Interrupt {
        self.driver
            .transport()
            .interrupt(vector)
            .expect("the eventfd")
    }

    /// `len` bytes from `start` to the end of its page, then on `pages`,
    /// listed at `list` (0: no list) when there are more than one.
    fn prp(&self, start: u64, pages: &[u64], len: usize, list: u64) -> Prp {
        let pages: Vec<Gpa> = pages.iter().copied().map(Gpa).collect();
        let list = (list != 0).then_some(Gpa(list));
        Prp::new(self.ram(), Gpa(start), &pages, len, list).expect("a PRP")
    }

    /// `len` bytes from `start` on the pages that follow, listed at `list`.
    fn contiguous(&self, start: u64, len: usize, list: u64) -> Prp {
        Prp::contiguous(self.ram(), Gpa(start), len, Some(Gpa(list))).expect("a PRP")
    }

    fn read32(&self, offset: u64) -> u32 {
        self.driver.read32(offset).expect("BAR0 read")
    }

    fn read64(&self, offset: u64) -> u64 {
        self.driver.read64(offset).expect("BAR0 read")
    }

    fn write32(&self, offset: u64, value: u32) {
        self.driver.write32(offset, value).expect("BAR0 write");
    }

    fn csts(&self) -> u32 {
        self.read32(CSTS)
    }

    /// CC.EN = 0: the controller resets; CSTS clears.
    fn disable(&mut self) {
        self.driver.disable().expect("CC.EN = 0");
        assert_eq!(self.csts(), 0, "CSTS after CC.EN = 0");
    }

    /// The admin queues in fresh memory, then CC.EN = 1.
    fn enable(&mut self) {
        self.driver.enable(ADMIN, CC_LINUX).expect("CC.EN = 1");
    }

    /// What Linux does at probe: reset, enable, identify the controller, ask
    /// for queues, identify the namespace, create I/O queue pair 1 (vector 1).
    /// Returns Identify Controller and Identify Namespace.
    fn probe(&mut self) -> (Vec<u8>, Vec<u8>) {
        if self.csts() & RDY != 0 {
            self.disable();
        }
        self.enable();
        let ctrl = self.identify(0x01, 0);
        let c = self.admin(command::number_of_queues(1, 1));
        assert_eq!(c.code(), SUCCESS, "Set Features, Number of Queues");
        let ns = self.identify(0x00, NSID);
        self.create_io_queues();
        (ctrl, ns)
    }

    fn create_io_queues(&mut self) {
        self.driver
            .create_io_pair(IO_PAIR)
            .expect("I/O queue pair 1");
    }

    /// Identify with CNS `cns` for `nsid`: the 4 KiB of data.
    fn identify(&mut self, cns: u32, nsid: u32) -> Vec<u8> {
        self.prefill_identify();
        self.driver
            .identify(cns, nsid, Gpa(IDENT))
            .unwrap_or_else(|e| panic!("Identify CNS {cns} NSID {nsid}: {e}"))
    }

    fn try_identify(&mut self, cns: u32, nsid: u32) -> Completion {
        self.prefill_identify();
        self.admin(command::identify(cns, nsid, Gpa(IDENT)))
    }

    /// What the controller does not write of identify data shows.
    fn prefill_identify(&self) {
        self.ram()
            .fill(Gpa(IDENT), 0xee, IDENTIFY_LEN)
            .expect("guest memory");
    }

    /// Puts `sqe` in queue `qid` and rings its tail doorbell; returns its
    /// command identifier.
    fn submit(&mut self, qid: u16, sqe: Sqe) -> u16 {
        self.driver.issue(qid, sqe).expect("submit")
    }

    /// The next completion of queue `qid` within `within` (one taken
    /// earlier first), once an interrupt on its vector announced it.
    fn completion_within(&mut self, qid: u16, within: Duration) -> Option<Completion> {
        let c = self
            .driver
            .next_completion(qid, within)
            .unwrap_or_else(|e| panic!("q{qid}: {e}"));
        if let Some(c) = c {
            assert_eq!(c.sqid, qid, "{c:?}");
        }
        c
    }

    /// The completion of command `cid` of queue `qid`; others that come
    /// first are kept for later.
    fn completion(&mut self, qid: u16, cid: u16) -> Completion {
        self.driver
            .completion(qid, cid)
            .unwrap_or_else(|e| panic!("q{qid}: {e}"))
    }

    /// Runs an admin command.
    fn admin(&mut self, sqe: Sqe) -> Completion {
        let cid = self.submit(0, sqe);
        self.completion(0, cid)
    }

    /// Runs an NVM command on I/O queue 1.
    fn io(&mut self, sqe: Sqe) -> Completion {
        let cid = self.submit(1, sqe);
        self.completion(1, cid)
    }

    /// Writes `data` at `lba` from one contiguous buffer at `DATA`; asserts success.
    fn write_ok(&mut self, lba: u64, lbs: usize, data: &[u8]) {
        self.write_flags_ok(lba, lbs, data, 0);
    }

    /// The same with Force Unit Access.
    fn write_fua_ok(&mut self, lba: u64, lbs: usize, data: &[u8]) {
        self.write_flags_ok(lba, lbs, data, FUA);
    }

    /// A write with `flags` in the upper half of dword 12.
    fn write_flags_ok(&mut self, lba: u64, lbs: usize, data: &[u8], flags: u32) {
        let prp = self.contiguous(DATA, data.len(), LISTS);
        prp.write(self.ram(), data).expect("guest memory");
        let blocks = (data.len() / lbs) as u32;
        let c = self.io(rw(io_op::WRITE, lba, blocks, &prp).with_cdw(12, (blocks - 1) | flags));
        assert_eq!(c.code(), SUCCESS, "write of lba {lba}: {c:?}");
    }

    /// Write Zeroes of `blocks` from `lba`; asserts success.
    fn write_zeroes_ok(&mut self, lba: u64, blocks: u32) {
        let c = self.io(command::write_zeroes(NSID, Lba(lba), blocks));
        assert_eq!(c.code(), SUCCESS, "write zeroes of lba {lba}: {c:?}");
    }

    /// Flush of the namespace; asserts success.
    fn flush_ok(&mut self) {
        let c = self.io(command::flush(NSID));
        assert_eq!(c.code(), SUCCESS, "flush: {c:?}");
    }

    /// Reads `len` bytes at `lba` into one contiguous buffer at `DATA`
    /// (prefilled); asserts success and returns the data.
    fn read_ok(&mut self, lba: u64, lbs: usize, len: usize) -> Vec<u8> {
        let (c, data) = self.read(lba, lbs, len);
        assert_eq!(c.code(), SUCCESS, "read of lba {lba}: {c:?}");
        data
    }

    fn read(&mut self, lba: u64, lbs: usize, len: usize) -> (Completion, Vec<u8>) {
        let prp = self.contiguous(DATA, len, LISTS);
        prp.fill(self.ram(), PREFILL).expect("guest memory");
        let c = self.io(rw(io_op::READ, lba, (len / lbs) as u32, &prp));
        (c, prp.read(self.ram()).expect("guest memory"))
    }

    /// Get Features, Volatile Write Cache: whether it is on.
    fn write_cache(&mut self) -> bool {
        let c = self.admin(command::get_features(VOLATILE_WRITE_CACHE));
        assert_eq!(c.code(), SUCCESS, "Get Features: {c:?}");
        c.dw0 & 1 == 1
    }

    /// Set Features, Volatile Write Cache.
    fn set_write_cache(&mut self, on: bool) {
        let c = self.admin(command::set_features(VOLATILE_WRITE_CACHE, u32::from(on)));
        assert_eq!(c.code(), SUCCESS, "Set Features: {c:?}");
    }
}

/// The block size of the namespaces here (the default `--lbs`): an LBA is
/// also `Serve::disk_at`'s sector.
const LBS: usize = 512;

fn string(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("ASCII")
}

fn le16(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

fn le32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(d[at..at + 4].try_into().unwrap())
}

fn le64(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
}

/// Asserts that `got` is `want`; a failure says where they first differ
/// rather than printing both.
#[track_caller]
fn same(got: &[u8], want: &[u8], what: std::fmt::Arguments<'_>) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        let near = |b: &[u8]| b[at.min(b.len())..(at + 16).min(b.len())].to_vec();
        panic!(
            "{what}: {} bytes where {} were expected, the first difference at byte {at}: {:02x?} instead of {:02x?}",
            got.len(),
            want.len(),
            near(got),
            near(want)
        );
    }
}

/// Waits until `ctl held` lists nothing.
fn wait_nothing_held(s: &Serve, when: &str) {
    let deadline = Instant::now() + SOON;
    loop {
        let held = s.ctl_json(&["held"]);
        if held.as_array().is_some_and(Vec::is_empty) {
            return;
        }
        assert!(Instant::now() < deadline, "still held {when}: {held}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The ledger's request entries (through ctl) at `lba` of `op`.
fn ledger_at(s: &Serve, op: &str, lba: u64) -> Vec<Value> {
    s.ledger_requests()
        .into_iter()
        .filter(|r| r["op"] == op && r["lba"] == lba)
        .collect()
}

// ---------------------------------------------------------------------------
// Probing

#[test]
fn probe_reads_the_controller_and_namespace_linux_needs() {
    struct Case {
        args: &'static [&'static str],
        lbs: u64,
        mdts: u8,
        vwc: u8,
        dlfeat: u8,
    }
    let cases = [
        Case {
            args: &["--max-transfer", "128K"],
            lbs: 512,
            mdts: 5, // 2^5 pages of 4 KiB
            vwc: 0x07,
            dlfeat: 0x09,
        },
        Case {
            args: &[
                "--lbs",
                "4096",
                "--write-cache",
                "off",
                "--deallocate",
                "keep",
            ],
            lbs: 4096,
            mdts: 0,
            vwc: 0,
            dlfeat: 0x08,
        },
    ];
    for case in cases {
        let what = format!("{:?}", case.args);
        let mut args = vec!["--nvme"];
        args.extend_from_slice(case.args);
        let s = Serve::start(&args);
        let blocks = DISK / case.lbs;
        let last = pattern(case.lbs, case.lbs as usize);
        s.put_disk((blocks - 1) * case.lbs / 512, &last);
        let mut nvme = Nvme::connect(&s);

        // CAP: 1024 entries a queue, contiguous queues, the NVM command set,
        // 4 KiB pages only, doorbells 4 bytes apart; NVMe 1.4.
        let cap = nvme.read64(CAP);
        assert_eq!(cap & 0xffff, 1023, "{what}: CAP.MQES");
        assert_ne!(cap & 1 << 16, 0, "{what}: CAP.CQR");
        assert_ne!(cap >> 37 & 1, 0, "{what}: CAP.CSS NVM");
        assert_eq!(cap >> 32 & 0xf, 0, "{what}: CAP.DSTRD");
        assert_eq!(cap >> 48 & 0xff, 0, "{what}: CAP.MPSMIN/MPSMAX");
        assert_eq!(nvme.read32(VS), 0x0001_0400, "{what}: VS");
        assert_eq!(nvme.csts(), 0, "{what}: disabled at first");

        let (ctrl, ns) = nvme.probe();
        assert_eq!(
            string(&ctrl[4..24]),
            format!("{:<20}", "dmaprobe"),
            "{what}: SN"
        );
        assert_eq!(
            string(&ctrl[24..64]),
            format!("{:<40}", "dmaprobe"),
            "{what}: MN"
        );
        assert_eq!(ctrl[77], case.mdts, "{what}: MDTS");
        assert_eq!(le32(&ctrl, 80), 0x0001_0400, "{what}: VER");
        assert_eq!((ctrl[512], ctrl[513]), (0x66, 0x44), "{what}: SQES, CQES");
        assert_eq!(le32(&ctrl, 516), 1, "{what}: NN");
        assert_eq!(le16(&ctrl, 520), 0b1100, "{what}: ONCS: DSM, write zeroes");
        assert_eq!(ctrl[525], case.vwc, "{what}: VWC");

        assert_eq!(le64(&ns, 0), blocks, "{what}: NSZE");
        assert_eq!(le64(&ns, 8), blocks, "{what}: NCAP");
        assert_eq!((ns[25], ns[26]), (0, 0), "{what}: NLBAF, FLBAS");
        assert_eq!(
            ns[130],
            case.lbs.trailing_zeros() as u8,
            "{what}: LBAF0.LBADS"
        );
        assert_eq!(le16(&ns, 128), 0, "{what}: LBAF0.MS");
        assert_eq!(ns[33], case.dlfeat, "{what}: DLFEAT");

        let list = nvme.identify(0x02, 0);
        assert_eq!(le32(&list, 0), 1, "{what}: active namespaces");
        assert!(list[4..].iter().all(|&b| b == 0), "{what}: only one");
        let other = nvme.try_identify(0x00, 2);
        assert_eq!(other.code(), INVALID_NAMESPACE, "{what}: namespace 2");

        // Number of Queues: granted as asked, zero-based.
        nvme.disable();
        nvme.enable();
        let c = nvme.admin(
            Sqe::new(admin_op::SET_FEATURES, 0)
                .with_cdw(10, NUMBER_OF_QUEUES)
                .with_cdw(11, 3 << 16 | 3),
        );
        assert_eq!((c.code(), c.dw0), (SUCCESS, 3 << 16 | 3), "{what}");
        nvme.create_io_queues();

        // The last block is the disk file's last block.
        let lbs = case.lbs as usize;
        same(
            &nvme.read_ok(blocks - 1, lbs, lbs),
            &last,
            format_args!("{what}"),
        );
        let (c, _) = nvme.read(blocks, lbs, lbs);
        assert_eq!(c.code(), LBA_OUT_OF_RANGE, "{what}: one past the end");
    }
}

// ---------------------------------------------------------------------------
// Data

#[test]
fn data_moves_through_prp1_prp2_and_prp_lists_to_the_disk_file_and_back() {
    let s = Serve::start(&["--nvme"]);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();

    // Scattered pages: every other page from 4 MiB up, in reverse order, so
    // a transfer that went to the wrong page or in the wrong order shows.
    let scattered =
        |from: u64, n: u64| -> Vec<u64> { (0..n).rev().map(|i| from + 2 * i * PAGE).collect() };
    struct Case {
        what: &'static str,
        lba: u64,
        len: usize,
        /// The write's and the read's PRPs.
        out: Prp,
        back: Prp,
    }
    let cases = [
        Case {
            what: "PRP1 only, 512 bytes inside a page",
            lba: 100,
            len: 512,
            out: nvme.prp(DATA + 0x200, &[], 512, 0),
            back: nvme.prp(DATA + 0x1a00, &[], 512, 0),
        },
        Case {
            what: "PRP1 only, one whole page",
            lba: 200,
            len: 4096,
            out: nvme.prp(DATA + 0x2000, &[], 4096, 0),
            back: nvme.prp(DATA + 0x3000, &[], 4096, 0),
        },
        Case {
            what: "PRP1 at an offset and PRP2 on another page",
            lba: 300,
            len: 6 << 10,
            out: nvme.prp(DATA + 0x4400, &[DATA + 0x8_0000], 6 << 10, 0),
            back: nvme.prp(DATA + 0x5400, &[DATA + 0x9_0000], 6 << 10, 0),
        },
        Case {
            what: "64 KiB from an unaligned start through a PRP list",
            lba: 1000,
            len: 64 << 10,
            out: nvme.prp(DATA + 0x6200, &scattered(4 << 20, 16), 64 << 10, LISTS),
            back: nvme.prp(
                DATA + 0x7600,
                &scattered(6 << 20, 16),
                64 << 10,
                LISTS + PAGE,
            ),
        },
        Case {
            what: "256 KiB through a list that starts near the end of its page and chains",
            lba: 5000,
            len: 256 << 10,
            out: nvme.prp(
                DATA + 0x2_0000,
                &scattered(8 << 20, 63),
                256 << 10,
                LISTS + 2 * PAGE + 0xfe0,
            ),
            back: nvme.prp(
                DATA + 0x4_0000,
                &scattered(10 << 20, 63),
                256 << 10,
                LISTS + 6 * PAGE + 0xfe0,
            ),
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let what = case.what;
        let data = pattern(10 + i as u64, case.len);
        let blocks = (case.len / LBS) as u32;
        case.out.write(nvme.ram(), &data).unwrap();
        let c = nvme.io(rw(io_op::WRITE, case.lba, blocks, &case.out));
        assert_eq!(c.code(), SUCCESS, "{what}: write {c:?}");
        same(
            &s.disk_at(case.lba, case.len),
            &data,
            format_args!("{what}: the disk file"),
        );
        // The blocks around it are untouched.
        same(
            &s.disk_at(case.lba - 1, LBS),
            &[0; LBS],
            format_args!("{what}"),
        );
        same(
            &s.disk_at(case.lba + u64::from(blocks), LBS),
            &[0; LBS],
            format_args!("{what}"),
        );

        // Read back into other memory; the bytes just before the buffer stay.
        let before = case.back.prp1 - 4;
        nvme.ram().fill(Gpa(before), PREFILL, 4).unwrap();
        case.back.fill(nvme.ram(), PREFILL).unwrap();
        let c = nvme.io(rw(io_op::READ, case.lba, blocks, &case.back));
        assert_eq!(c.code(), SUCCESS, "{what}: read {c:?}");
        same(
            &case.back.read(nvme.ram()).unwrap(),
            &data,
            format_args!("{what}: read back"),
        );
        same(
            &nvme.ram().read_vec(Gpa(before), 4).unwrap(),
            &[PREFILL; 4],
            format_args!("{what}: before"),
        );
    }

    let flush = nvme.io(Sqe::new(io_op::FLUSH, 0).with_nsid(NSID));
    assert_eq!(flush.code(), SUCCESS, "flush");
    let flush_all = nvme.io(Sqe::new(io_op::FLUSH, 0).with_nsid(u32::MAX));
    assert_eq!(flush_all.code(), SUCCESS, "flush of every namespace");

    // Write zeroes: blocks 202 and 203 of the page at 200.
    let page = s.disk_at(200, 4096);
    let zeroes = Sqe::new(io_op::WRITE_ZEROES, 0)
        .with_nsid(NSID)
        .with_cdw(10, 202)
        .with_cdw(12, 1);
    let c = nvme.io(zeroes);
    assert_eq!(c.code(), SUCCESS, "write zeroes");
    let mut want = page.clone();
    want[1024..2048].fill(0);
    same(
        &s.disk_at(200, 4096),
        &want,
        format_args!("write zeroes in the disk file"),
    );
    same(
        &nvme.read_ok(200, LBS, 4096),
        &want,
        format_args!("write zeroes read back"),
    );

    // Dataset management, deallocate: blocks 1004-1011 and 1020-1023 of the
    // 64 KiB at 1000 read back as zeros (--deallocate zeroes, the default).
    let before = s.disk_at(1000, 16 << 10);
    let mut ranges = Vec::new();
    for (lba, n) in [(1004u64, 8u32), (1020, 4)] {
        ranges.extend_from_slice(&[0; 4]);
        ranges.extend_from_slice(&n.to_le_bytes());
        ranges.extend_from_slice(&lba.to_le_bytes());
    }
    nvme.ram().write_mem(Gpa(RANGES), &ranges).unwrap();
    let deallocate = Sqe::new(io_op::DATASET_MANAGEMENT, 0)
        .with_nsid(NSID)
        .with_prps(RANGES, 0)
        .with_cdw(10, 1)
        .with_cdw(11, AD);
    let c = nvme.io(deallocate);
    assert_eq!(c.code(), SUCCESS, "deallocate");
    let mut want = before.clone();
    want[4 * LBS..12 * LBS].fill(0);
    want[20 * LBS..24 * LBS].fill(0);
    same(
        &nvme.read_ok(1000, LBS, 16 << 10),
        &want,
        format_args!("deallocated blocks read as zeros"),
    );
    same(
        &s.disk_at(1000, 16 << 10),
        &want,
        format_args!("and the disk file holds zeros"),
    );
}

// ---------------------------------------------------------------------------
// The DMA engine

#[test]
fn a_held_read_completes_on_release_with_the_canary_before_and_the_data_after() {
    let mut s = Serve::start(&[
        "--nvme",
        "--canary",
        "--fault",
        "op=read,lba=64,action=hold",
    ]);
    let data = pattern(3, 4096);
    s.put_disk(64, &data);
    s.put_disk(8, &pattern(4, 4096));
    let mut nvme = Nvme::connect(&s);
    nvme.probe();

    let buf = nvme.prp(DATA, &[], 4096, 0);
    buf.fill(nvme.ram(), PREFILL).unwrap();
    let cid = nvme.submit(1, rw(io_op::READ, 64, 8, &buf));
    let held = s.wait_held(1);
    let h = &held[0];
    assert_eq!(
        (&h["op"], &h["queue"], &h["lba"], &h["len"], &h["held"]),
        (
            &json!("read"),
            &json!(1),
            &json!(64),
            &json!(4096),
            &json!(true)
        ),
        "{h}"
    );
    let req = h["request"].as_u64().expect("a request id");
    assert_eq!(nvme.completion_within(1, Duration::from_millis(300)), None);

    // The destination holds the canary of that request, whole.
    let during = buf.read(nvme.ram()).unwrap();
    let units: Vec<_> = dma::canary::find_canaries(&during).collect();
    let want: Vec<(usize, u64, u32)> = (0..256).map(|i| (16 * i, req, 16 * i as u32)).collect();
    assert_eq!(
        units
            .iter()
            .map(|&(at, id, offset)| (at, id.0, offset))
            .collect::<Vec<_>>(),
        want,
        "16-byte units naming request {req} and their offsets, end to end"
    );

    // The queue goes on meanwhile: another read completes first.
    let other = nvme.prp(DATA + 0x1000, &[], 4096, 0);
    let c = nvme.io(rw(io_op::READ, 8, 8, &other));
    assert_eq!(c.code(), SUCCESS);
    same(
        &other.read(nvme.ram()).unwrap(),
        &pattern(4, 4096),
        format_args!("the other read"),
    );

    assert_eq!(s.ctl_ok(&["release", "--all"]), "released 1\n");
    let c = nvme.completion(1, cid);
    assert_eq!(c.code(), SUCCESS, "{c:?}");
    same(
        &buf.read(nvme.ram()).unwrap(),
        &data,
        format_args!("the data after release"),
    );
    assert_eq!(s.ctl_ok(&["held"]), "nothing is waiting\n");

    // A write and a flush, for the ledger.
    nvme.write_ok(128, LBS, &pattern(5, 8192));
    nvme.flush_ok();

    let check = |entries: &[Value], whence: &str| {
        let find = |op: &str, lba: u64| -> Vec<&Value> {
            entries
                .iter()
                .filter(|r| r["op"] == op && r["lba"] == lba)
                .collect()
        };
        let r = find("read", 64);
        assert_eq!(r.len(), 1, "{whence}: {entries:?}");
        assert_eq!(
            (
                &r[0]["request"],
                &r[0]["queue"],
                &r[0]["len"],
                &r[0]["status"],
                &r[0]["wait"]
            ),
            (
                &json!(req),
                &json!(1),
                &json!(4096),
                &json!("ok"),
                &json!("hold")
            ),
            "{whence}: {}",
            r[0]
        );
        let r = find("read", 8);
        assert_eq!(r.len(), 1, "{whence}");
        assert_eq!(
            (&r[0]["status"], &r[0]["wait"]),
            (&json!("ok"), &json!("none"))
        );
        let w = find("write", 128);
        assert_eq!(w.len(), 1, "{whence}");
        assert_eq!(
            (&w[0]["len"], &w[0]["status"]),
            (&json!(8192), &json!("ok"))
        );
        assert_eq!(find("flush", 0).len(), 1, "{whence}: the flush");
    };
    check(&s.ledger_requests(), "ctl ledger");
    drop(nvme);
    let exit = s.terminate();
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    check(&s.ledger_file_requests(), "--ledger file");
}

// ---------------------------------------------------------------------------
// Media errors

/// A fault rule's error reaches the guest's driver as one it does not retry
/// (Do Not Retry), so the one-shot error a test injects is the error the
/// kernel sees, as over virtio-blk.
#[test]
fn an_injected_error_completes_once_with_do_not_retry() {
    let s = Serve::start(&["--nvme", "--fault", "op=read,lba=64,count=1,action=error"]);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    let (c, _) = nvme.read(64, LBS, LBS);
    assert_eq!(c.code(), DATA_TRANSFER_ERROR, "{c:?}");
    assert!(c.dnr(), "an injected error must not be retried away: {c:?}");
    nvme.read_ok(64, LBS, LBS);
}

#[test]
fn media_errors_complete_with_the_media_statuses() {
    let s = Serve::start(&[
        "--nvme",
        "--media-error",
        "1000:read",
        "--media-error",
        "2000+2:write",
    ]);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();

    let (c, _) = nvme.read(1000, LBS, LBS);
    assert_eq!(c.code(), UNRECOVERED_READ_ERROR, "{c:?}");
    assert!(c.dnr(), "a bad block stays bad: do not retry");
    nvme.read_ok(1001, LBS, LBS);

    let prp = nvme.prp(DATA, &[], LBS, 0);
    prp.write(nvme.ram(), &pattern(6, LBS)).unwrap();
    let c = nvme.io(rw(io_op::WRITE, 2000, 1, &prp));
    assert_eq!(c.code(), WRITE_FAULT, "{c:?}");
    assert!(c.dnr());
    same(
        &s.disk_at(2000, LBS),
        &[0; LBS],
        format_args!("the failed write did not land"),
    );
    let c = nvme.io(Sqe::new(io_op::WRITE_ZEROES, 0)
        .with_nsid(NSID)
        .with_cdw(10, 2001));
    assert_eq!(
        c.code(),
        WRITE_FAULT,
        "write zeroes on a write fault: {c:?}"
    );

    // Rewriting the bad block remaps it.
    let data = pattern(7, LBS);
    nvme.write_ok(1000, LBS, &data);
    same(
        &nvme.read_ok(1000, LBS, LBS),
        &data,
        format_args!("the rewritten block"),
    );

    let statuses = |op: &str, lba: u64| -> Vec<String> {
        ledger_at(&s, op, lba)
            .iter()
            .map(|r| r["status"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(statuses("read", 1000), ["unrecovered-read-error", "ok"]);
    assert_eq!(statuses("write", 2000), ["write-fault"]);
}

// ---------------------------------------------------------------------------
// Malformed commands

#[test]
fn malformed_commands_complete_with_the_specs_statuses() {
    let s = Serve::start(&["--nvme", "--max-transfer", "128K"]);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    let blocks = DISK / LBS as u64;
    let page = nvme.prp(DATA, &[], 4096, 0);
    let two = nvme.prp(DATA + 0x800, &[DATA + 0x1_0000], 4096, 0);
    let big = nvme.contiguous(DATA, 128 << 10, LISTS);
    // A list whose second entry is not page-aligned, and one whose second
    // entry lies past guest memory.
    let lists = [
        (LISTS + PAGE, [DATA + 0x2000, DATA + 0x3010, DATA + 0x4000]),
        (LISTS + 2 * PAGE, [DATA + 0x2000, RAM, DATA + 0x4000]),
    ];
    for (at, entries) in lists {
        write_list(nvme.ram(), Gpa(at), &entries).unwrap();
    }
    let write = |lba: u64, blocks: u32, prp1: u64, prp2: u64| {
        rw(io_op::WRITE, lba, blocks, &Prp::raw(prp1, prp2))
    };
    let cases: Vec<(&str, Sqe, (u8, u8))> = vec![
        (
            "a read past the last block",
            rw(io_op::READ, blocks - 1, 2, &two),
            LBA_OUT_OF_RANGE,
        ),
        (
            "a write at LBA u64::MAX",
            write(u64::MAX, 1, DATA, 0),
            LBA_OUT_OF_RANGE,
        ),
        (
            "write zeroes past the last block",
            Sqe::new(io_op::WRITE_ZEROES, 0)
                .with_nsid(NSID)
                .with_cdw(10, blocks as u32)
                .with_cdw(12, 0),
            LBA_OUT_OF_RANGE,
        ),
        (
            "a read of one block past MDTS",
            rw(io_op::READ, 0, 257, &big),
            INVALID_FIELD,
        ),
        (
            "a write of 128 KiB + 512 past MDTS",
            write(0, 257, big.prp1, big.prp2),
            INVALID_FIELD,
        ),
        (
            "an unknown NVM opcode",
            Sqe::new(0x7f, 0).with_nsid(NSID),
            INVALID_OPCODE,
        ),
        (
            "a vendor opcode",
            Sqe::new(0x80, 0).with_nsid(NSID),
            INVALID_OPCODE,
        ),
        (
            "namespace 2",
            rw(io_op::READ, 0, 8, &page).with_nsid(2),
            INVALID_NAMESPACE,
        ),
        (
            "PRP1 not dword-aligned",
            write(0, 1, DATA + 2, 0),
            PRP_OFFSET_INVALID,
        ),
        (
            "PRP2 not page-aligned",
            write(0, 8, DATA + 0x800, DATA + 0x1_0008),
            PRP_OFFSET_INVALID,
        ),
        (
            "a list entry not page-aligned",
            write(0, 24, DATA + 0x1000, LISTS + PAGE),
            PRP_OFFSET_INVALID,
        ),
        (
            "PRP1 past guest memory",
            write(0, 8, RAM, 0),
            DATA_TRANSFER_ERROR,
        ),
        (
            "PRP2 past guest memory",
            write(0, 16, DATA, RAM + PAGE),
            DATA_TRANSFER_ERROR,
        ),
        (
            "a list past guest memory",
            write(0, 24, DATA, 1 << 40),
            DATA_TRANSFER_ERROR,
        ),
        (
            "a list entry past guest memory",
            write(0, 24, DATA + 0x1000, LISTS + 2 * PAGE),
            DATA_TRANSFER_ERROR,
        ),
    ];
    page.write(nvme.ram(), &pattern(8, 4096)).unwrap();
    for (what, sqe, want) in cases {
        let c = nvme.io(sqe);
        assert_eq!(c.code(), want, "{what}: {c:?}");
        assert!(c.dnr(), "{what}: the same command fails again: DNR");
    }
    let c = nvme.admin(Sqe::new(0x7f, 0));
    assert_eq!(c.code(), INVALID_OPCODE, "an unknown admin opcode: {c:?}");

    // None of them wrote anything, and the controller goes on.
    same(
        &s.disk_at(0, 128 << 10),
        &[0; 128 << 10],
        format_args!("the disk file"),
    );
    assert_eq!(nvme.csts(), RDY);
    let data = pattern(9, 128 << 10);
    nvme.write_ok(0, LBS, &data);
    same(
        &nvme.read_ok(0, LBS, 128 << 10),
        &data,
        format_args!("128 KiB, MDTS exactly"),
    );
}

/// A dataset management range: its first LBA and how many blocks.
type DsmRange = (u64, u32);

/// What Identify CNS 06h tells the host (WZSL, DMRL, DMRSL) is what the
/// controller holds commands to, with limits that are not powers of two: at
/// each limit a command succeeds, one past it fails with Invalid Field in
/// Command and leaves the disk as it was.
#[test]
fn the_write_zeroes_and_deallocate_limits_the_host_is_told_are_enforced() {
    let s = Serve::start(&[
        "--nvme",
        "--max-write-zeroes",
        "24K",
        "--max-discard-segments",
        "5",
        "--max-discard",
        "12K",
    ]);
    let mut want = pattern(12, 128 * LBS);
    s.put_disk(0, &want);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    let nvm = nvme.identify(0x06, 0);
    let (wzsl, dmrl, dmrsl) = (nvm[1], u32::from(nvm[3]), le32(&nvm, 4));
    assert_eq!(
        (wzsl, dmrl, dmrsl),
        (2, 5, 24),
        "WZSL: 24 KiB down to 2^2 pages"
    );

    let check = |nvme: &mut Nvme, what: &str, sqe: Sqe, zeroed: Range<usize>, want: &mut [u8]| {
        let c = nvme.io(sqe);
        let code = if zeroed.is_empty() {
            INVALID_FIELD
        } else {
            SUCCESS
        };
        assert_eq!(c.code(), code, "{what}: {c:?}");
        want[zeroed.start * LBS..zeroed.end * LBS].fill(0);
        same(
            &s.disk_at(0, want.len()),
            want,
            format_args!("{what}: the disk file"),
        );
    };

    // WZSL: 2^n pages of 4 KiB, from LBA 0.
    let most = ((PAGE << wzsl) / LBS as u64) as u32;
    for (what, blocks, zeroed) in [
        ("write zeroes one block past WZSL", most + 1, 0..0),
        ("write zeroes at WZSL", most, 0..most as usize),
    ] {
        let sqe = Sqe::new(io_op::WRITE_ZEROES, 0)
            .with_nsid(NSID)
            .with_cdw(12, blocks - 1);
        check(&mut nvme, what, sqe, zeroed, &mut want);
    }

    // DMRL ranges of one block from LBA 64; a DMRSL range at LBA 96.
    let ranges: Vec<DsmRange> = (64..).map(|lba| (lba, 1)).take(dmrl as usize + 1).collect();
    let cases: [(&str, &[DsmRange], Range<usize>); 4] = [
        ("a range past DMRL", &ranges, 0..0),
        ("ranges at DMRL", &ranges[..dmrl as usize], 64..69),
        ("a range one block past DMRSL", &[(96, dmrsl + 1)], 0..0),
        ("a range at DMRSL", &[(96, dmrsl)], 96..120),
    ];
    for (what, ranges, zeroed) in cases {
        let mut list = Vec::new();
        for &(lba, n) in ranges {
            list.extend_from_slice(&[0; 4]);
            list.extend_from_slice(&n.to_le_bytes());
            list.extend_from_slice(&lba.to_le_bytes());
        }
        nvme.ram().write_mem(Gpa(RANGES), &list).unwrap();
        let sqe = Sqe::new(io_op::DATASET_MANAGEMENT, 0)
            .with_nsid(NSID)
            .with_prps(RANGES, 0)
            .with_cdw(10, ranges.len() as u32 - 1)
            .with_cdw(11, AD);
        check(&mut nvme, what, sqe, zeroed, &mut want);
    }
}

// ---------------------------------------------------------------------------
// Hostile doorbells and resets

#[test]
fn a_hostile_doorbell_makes_the_controller_fatal_until_reset_and_the_daemon_lives() {
    let mut s = Serve::start(&["--nvme"]);
    let data = pattern(11, 4096);
    s.put_disk(8, &data);
    let mut nvme = Nvme::connect(&s);
    let mistakes: [(&str, u64, u32); 4] = [
        (
            "an SQ tail beyond the queue's size",
            DOORBELLS + 8,
            u32::from(IO_ENTRIES) + 5,
        ),
        ("the SQ tail of a queue never created", DOORBELLS + 5 * 8, 1),
        ("a CQ head past the entries posted", DOORBELLS + 8 + 4, 7),
        ("an SQ tail of u32::MAX", DOORBELLS + 8, u32::MAX),
    ];
    for (what, doorbell, value) in mistakes {
        nvme.probe();
        same(
            &nvme.read_ok(8, LBS, 4096),
            &data,
            format_args!("{what}: before"),
        );
        nvme.write32(doorbell, value);
        assert_eq!(nvme.csts() & CFS, CFS, "{what}: CSTS.CFS");
        s.assert_alive();
        assert!(s.ctl_json(&["status"]).is_object(), "{what}: ctl status");
        // A fatal controller runs nothing.
        let prp = nvme.prp(DATA, &[], 4096, 0);
        nvme.submit(1, rw(io_op::READ, 8, 8, &prp));
        assert_eq!(
            nvme.completion_within(1, Duration::from_millis(100)),
            None,
            "{what}"
        );
        // CC.EN = 0 clears it; the next probe works.
        nvme.disable();
        nvme.probe();
        same(
            &nvme.read_ok(8, LBS, 4096),
            &data,
            format_args!("{what}: after the reset"),
        );
    }

    // A fatal controller left behind by a client that goes: the next client
    // gets a working controller.
    nvme.write32(DOORBELLS + 8, u32::from(IO_ENTRIES));
    assert_eq!(nvme.csts() & CFS, CFS);
    drop(nvme);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    same(
        &nvme.read_ok(8, LBS, 4096),
        &data,
        format_args!("a new client"),
    );
    s.assert_alive();
}

#[test]
fn a_reset_abandons_a_held_read_which_never_completes_and_the_controller_comes_back() {
    let s = Serve::start(&["--nvme", "--fault", "op=read,lba=64,count=1,action=hold"]);
    let data = pattern(12, 4096);
    s.put_disk(64, &data);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();

    let buf = nvme.prp(DATA, &[], 4096, 0);
    buf.fill(nvme.ram(), PREFILL).unwrap();
    nvme.submit(1, rw(io_op::READ, 64, 8, &buf));
    let req = s.wait_held(1)[0]["request"].as_u64().unwrap();

    nvme.disable();
    wait_nothing_held(&s, "after the reset");
    let r = ledger_at(&s, "read", 64);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (&r[0]["request"], &r[0]["status"]),
        (&json!(req), &json!("abandoned"))
    );
    assert_eq!(s.ctl_ok(&["release", "--all"]), "released 0\n");

    // No completion entry, no interrupt, no data: the reset voided the read.
    thread::sleep(Duration::from_millis(300));
    same(
        &nvme.ram().read_vec(Gpa(IOCQ), 16).unwrap(),
        &[0; 16],
        format_args!("the old completion queue"),
    );
    assert_eq!(nvme.interrupt(1), Interrupt::Quiet, "vector 1");
    same(
        &buf.read(nvme.ram()).unwrap(),
        &[PREFILL; 4096],
        format_args!("the read's buffer"),
    );

    // The controller comes back: identify, queues, and the same read.
    let (ctrl, _) = nvme.probe();
    assert_eq!(string(&ctrl[24..32]), "dmaprobe");
    same(
        &nvme.read_ok(64, LBS, 4096),
        &data,
        format_args!("the read after the reset"),
    );
    assert_eq!(
        nvme.ram().read_vec(Gpa(IOCQ + 16), 16).unwrap(),
        [0; 16],
        "one completion in the new queue, not two"
    );

    // A client that leaves with a read held resets the controller too.
    s.ctl_ok(&["add-rule", "op=read,lba=72,count=1,action=hold"]);
    s.put_disk(72, &data);
    let buf = nvme.prp(DATA + 0x1000, &[], 4096, 0);
    buf.fill(nvme.ram(), PREFILL).unwrap();
    nvme.submit(1, rw(io_op::READ, 72, 8, &buf));
    let req = s.wait_held(1)[0]["request"].as_u64().unwrap();
    let old = nvme.disconnect();
    wait_nothing_held(&s, "after the client left");
    let r = ledger_at(&s, "read", 72);
    assert_eq!(
        (&r[0]["request"], &r[0]["status"]),
        (&json!(req), &json!("abandoned"))
    );
    thread::sleep(Duration::from_millis(100));
    same(
        &buf.read(&old).unwrap(),
        &[PREFILL; 4096],
        format_args!("the read's buffer"),
    );
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    same(
        &nvme.read_ok(72, LBS, 4096),
        &data,
        format_args!("a new client"),
    );
}

#[test]
fn sigterm_tells_the_host_of_a_held_read_before_the_daemon_exits() {
    let mut s = Serve::start(&["--nvme", "--fault", "op=read,action=hold"]);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    let buf = nvme.prp(DATA, &[], 4096, 0);
    let cid = nvme.submit(1, rw(io_op::READ, 16, 8, &buf));
    s.wait_held(1);
    let exit = s.terminate();
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    // The daemon is gone: its last completion entry and interrupt are in
    // guest memory and the eventfd.
    let mut entry = [0; Completion::SIZE];
    nvme.ram().read_mem(Gpa(IOCQ), &mut entry).unwrap();
    let c = Completion::parse(&entry);
    let dw3 = nvme.ram().load32(Gpa(IOCQ + 12)).unwrap();
    assert_eq!(dw3 >> 16 & 1, 1, "phase tag: posted");
    assert_eq!((c.sqid, c.cid), (1, cid), "{c:?}");
    assert_eq!(nvme.interrupt(1), Interrupt::Fired, "vector 1 fired");
    assert_eq!(c.code(), ABORT_REQUESTED, "{c:?}");
    assert!(!c.dnr(), "the host may try again elsewhere");
    let r: Vec<Value> = s
        .ledger_file_requests()
        .into_iter()
        .filter(|r| r["op"] == "read" && r["lba"] == 16)
        .collect();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["status"], "failed-at-stop");
}

// ---------------------------------------------------------------------------
// The mailbox

#[test]
fn the_mailbox_answers_control_commands_over_nvme_while_a_read_is_held() {
    use wire::mailbox::{decode, encode, mailbox_offset};
    let s = Serve::start(&[
        "--nvme",
        "--mailbox",
        "--fault",
        "op=read,lba=8,action=hold",
    ]);
    let data = pattern(13, 4096);
    s.put_disk(8, &data);
    let mailbox = mailbox_offset(DISK).expect("a mailbox") / LBS as u64;
    let mut nvme = Nvme::connect(&s);
    nvme.probe();

    let held = nvme.prp(DATA + 0x10_0000, &[], 4096, 0);
    held.fill(nvme.ram(), PREFILL).unwrap();
    let held_cid = nvme.submit(1, rw(io_op::READ, 8, 8, &held));
    s.wait_held(1);

    // Asks and reads back the answer, as a guest program does.
    let mut ask = |seq: u32, command: &str| -> Value {
        let frame = encode(seq, command.as_bytes(), LBS);
        let out = nvme.contiguous(DATA, frame.len(), LISTS);
        out.write(nvme.ram(), &frame).unwrap();
        let c = nvme.io(rw(io_op::WRITE, mailbox, (frame.len() / LBS) as u32, &out));
        assert_eq!(c.code(), SUCCESS, "{command}: {c:?}");
        let answer = nvme.read_ok(mailbox, LBS, 4096);
        let (back, payload) = decode(&answer).expect("a framed answer");
        assert_eq!(back, seq, "{command}");
        serde_json::from_slice(payload).expect("JSON")
    };
    let answer = ask(7, r#"{"v":1,"cmd":"held"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    let list = answer["result"].as_array().expect("a list");
    assert_eq!(list.len(), 1, "{answer}");
    assert_eq!((&list[0]["lba"], &list[0]["queue"]), (&json!(8), &json!(1)));
    let answer = ask(8, r#"{"v":1,"cmd":"release","all":true}"#);
    assert_eq!(answer["result"], json!({"released": 1}), "{answer}");

    let c = nvme.completion(1, held_cid);
    assert_eq!(c.code(), SUCCESS, "{c:?}");
    same(
        &held.read(nvme.ram()).unwrap(),
        &data,
        format_args!("the released read's data"),
    );

    // Plain data written to the mailbox is refused, and nothing of it, or of
    // the commands, reaches the disk file.
    let junk = nvme.prp(DATA, &[], 512, 0);
    junk.write(nvme.ram(), &pattern(14, 512)).unwrap();
    let c = nvme.io(rw(io_op::WRITE, mailbox, 1, &junk));
    assert_ne!(c.code(), SUCCESS, "junk in the mailbox: {c:?}");
    same(
        &s.disk_at(mailbox, 4096),
        &[0; 4096],
        format_args!("the mailbox in the disk file"),
    );
}

// ---------------------------------------------------------------------------
// The volatile write cache

#[test]
fn a_power_cut_loses_unflushed_writes_unless_the_host_turned_the_write_cache_off() {
    let s = Serve::start(&["--nvme"]);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    assert!(nvme.write_cache(), "on from the start");
    let (a, b, c, d) = (
        pattern(20, 4096),
        pattern(21, 4096),
        pattern(22, 4096),
        pattern(23, 4096),
    );

    nvme.write_ok(300, LBS, &a);
    nvme.flush_ok();
    nvme.write_ok(400, LBS, &b);
    s.ctl_ok(&["power-cut"]);
    same(
        &nvme.read_ok(300, LBS, 4096),
        &a,
        format_args!("flushed: kept"),
    );
    same(
        &nvme.read_ok(400, LBS, 4096),
        &[0; 4096],
        format_args!("not flushed: lost"),
    );
    same(
        &s.disk_at(400, 4096),
        &[0; 4096],
        format_args!("lost in the disk file too"),
    );

    // Write-through: every write is stable when it completes.
    nvme.set_write_cache(false);
    assert!(!nvme.write_cache());
    nvme.write_ok(500, LBS, &c);
    s.ctl_ok(&["power-cut"]);
    same(
        &nvme.read_ok(500, LBS, 4096),
        &c,
        format_args!("written through: kept"),
    );

    // A controller reset returns the feature to its default, on, and the
    // media follows: what the host is told is what a power cut does.
    nvme.disable();
    nvme.probe();
    assert!(nvme.write_cache(), "on again after a reset");
    nvme.write_ok(600, LBS, &d);
    s.ctl_ok(&["power-cut"]);
    same(
        &nvme.read_ok(600, LBS, 4096),
        &[0; 4096],
        format_args!("the cache is on again: an unflushed write is lost"),
    );
}

#[test]
fn a_fua_write_is_stable_when_it_completes() {
    let s = Serve::start(&["--nvme"]);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    let data = pattern(24, 4096);
    let prp = nvme.prp(DATA, &[], 4096, 0);
    prp.write(nvme.ram(), &data).unwrap();
    let c = nvme.io(rw(io_op::WRITE, 700, 8, &prp).with_cdw(12, 7 | FUA));
    assert_eq!(c.code(), SUCCESS, "{c:?}");
    // A write without FUA right after it, in the same 4 KiB unit of the cache
    // and beyond: still volatile (FUA is no flush).
    let other = nvme.prp(DATA + 0x10_0000, &[], 4096, 0);
    other.write(nvme.ram(), &pattern(26, 4096)).unwrap();
    let c = nvme.io(rw(io_op::WRITE, 708, 8, &other));
    assert_eq!(c.code(), SUCCESS, "{c:?}");
    same(
        &nvme.read_ok(708, LBS, 4096),
        &pattern(26, 4096),
        format_args!("the write without FUA reached the media"),
    );
    s.ctl_ok(&["power-cut"]);
    same(
        &nvme.read_ok(700, LBS, 4096),
        &data,
        format_args!("a FUA write survives a power cut"),
    );
    same(
        &nvme.read_ok(708, LBS, 4096),
        &[0; 4096],
        format_args!("the write without FUA after it is lost"),
    );
}

// What the host is told is stable is synced to the disk file before its
// command completes, counted by `ctl status` as the backing's syncs: with the
// cache on, only a Flush or a write with Force Unit Access; with no cache, or
// the host turned it off, every write and write zeroes.

#[test]
fn without_a_write_cache_a_write_is_synced_before_it_completes() {
    let s = Serve::start(&["--nvme", "--write-cache", "off"]);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    let before = s.syncs();
    nvme.write_ok(8, LBS, &pattern(1, 4096));
    assert_eq!(s.syncs(), before + 1, "a write");
    nvme.write_zeroes_ok(8, 8);
    assert_eq!(s.syncs(), before + 2, "a write zeroes");
    assert_eq!(s.disk_at(8, 4096), vec![0; 4096]);
}

#[test]
fn with_the_write_cache_on_only_fua_writes_and_flushes_sync() {
    let s = Serve::start(&["--nvme"]);
    let mut nvme = Nvme::connect(&s);
    nvme.probe();
    let before = s.syncs();
    nvme.write_ok(16, LBS, &pattern(2, 4096));
    nvme.write_zeroes_ok(16, 8);
    assert_eq!(
        s.syncs(),
        before,
        "a plain write and write zeroes stay in the cache"
    );
    nvme.write_fua_ok(24, LBS, &pattern(3, 4096));
    assert_eq!(s.syncs(), before + 1, "a write with Force Unit Access");
    nvme.flush_ok();
    assert_eq!(s.syncs(), before + 2, "a flush");

    // The host turns the cache off: what it held is synced, and from then
    // on every write is.
    nvme.set_write_cache(false);
    assert!(!nvme.write_cache(), "the feature reads back");
    assert_eq!(s.syncs(), before + 3, "turning the cache off");
    nvme.write_ok(32, LBS, &pattern(4, 4096));
    assert_eq!(s.syncs(), before + 4, "a write through");
    nvme.set_write_cache(true);
    assert!(nvme.write_cache(), "the feature reads back");
    nvme.write_ok(40, LBS, &pattern(5, 4096));
    assert_eq!(s.syncs(), before + 4, "the cache on again");
}

// ---------------------------------------------------------------------------
// Guest memory going away

#[test]
fn guest_memory_unmapped_under_a_held_read_fails_it_with_a_data_transfer_error() {
    const SPLIT: u64 = 8 << 20;
    let s = Serve::start(&["--nvme", "--fault", "op=read,lba=64,action=hold"]);
    s.put_disk(64, &pattern(25, 4096));
    // Queues in the low window, the read's buffer in the high one.
    let mut nvme = Nvme::connect_windows(&s, &[SPLIT, RAM]);
    nvme.probe();
    let buf = nvme.prp(SPLIT + 0x10_0000, &[], 4096, 0);
    buf.fill(nvme.ram(), PREFILL).unwrap();
    let cid = nvme.submit(1, rw(io_op::READ, 64, 8, &buf));
    s.wait_held(1);

    nvme.driver
        .transport()
        .client()
        .dma_unmap(SPLIT, RAM - SPLIT)
        .expect("DMA_UNMAP");
    assert_eq!(s.ctl_ok(&["release", "--all"]), "released 1\n");
    let c = nvme.completion(1, cid);
    assert_eq!(c.code(), DATA_TRANSFER_ERROR, "{c:?}");
    same(
        &buf.read(nvme.ram()).unwrap(),
        &[PREFILL; 4096],
        format_args!("nothing reached the unmapped buffer"),
    );
    let r = ledger_at(&s, "read", 64);
    assert_eq!(r[0]["status"], "data-transfer-error", "{r:?}");

    // The controller goes on in the memory that is left.
    assert_eq!(nvme.csts(), RDY);
    s.ctl_ok(&["remove-rule", "1"]);
    same(
        &nvme.read_ok(64, LBS, 4096),
        &pattern(25, 4096),
        format_args!("a read after the unmap"),
    );
}

// ---------------------------------------------------------------------------
// Shadow doorbells and `ctl status`

/// The shadow doorbell and EventIdx pages.
const SHADOW: u64 = 0x6000;
const EVENT_IDX: u64 = 0x7000;

impl Nvme {
    /// Doorbell Buffer Config with the two pages (zeroed first, as Linux
    /// allocates them).
    fn configure_shadow_doorbells(&mut self) {
        self.ram().fill(Gpa(SHADOW), 0, 2 * PAGE as usize).unwrap();
        let buffers = ShadowBuffers {
            doorbells: Gpa(SHADOW),
            event_idx: Gpa(EVENT_IDX),
        };
        self.driver
            .shadow_doorbells(buffers)
            .expect("Doorbell Buffer Config");
    }

    fn dword(&self, at: u64) -> u16 {
        let v = self.ram().load32(Gpa(at)).expect("guest memory");
        u16::try_from(v & 0xffff).unwrap()
    }

    /// The host's side of the doorbell at `slot`, as Linux's nvme driver
    /// does it: the shadow slot, and the register only if the EventIdx asks.
    fn update_shadow(&self, slot: u64, old: u16, new: u16) -> bool {
        let shadow = ShadowSlot {
            doorbell: Gpa(SHADOW + slot),
            event_idx: Gpa(EVENT_IDX + slot),
        };
        let t = self.driver.transport();
        ring_doorbell(t, DOORBELLS + slot, Some(shadow), Some(old), new).expect("doorbell")
    }

    /// Runs `sqe` on I/O queue 1 with its tail in the shadow page (the
    /// `n`th command since the queue was created), then moves the head
    /// there. The driver rings the head register too when it takes the
    /// completion, an older value the controller does not use.
    fn io_shadowed(&mut self, n: u16, sqe: Sqe) -> Completion {
        let cid = self.driver.next_cid();
        self.driver.place(1, &sqe.with_cid(cid)).expect("place");
        let (old, new) = (n % IO_ENTRIES, (n + 1) % IO_ENTRIES);
        self.update_shadow(8, old, new);
        let c = self.completion(1, cid);
        self.update_shadow(12, old, new);
        c
    }
}

/// `ctl status --json` until `done` says it is there.
fn status_when(s: &Serve, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + SOON;
    loop {
        let status = s.ctl_json(&["status"]);
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: {status:#}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctl_status_shows_the_client_the_controller_its_queues_and_shadow_doorbells() {
    let s = Serve::start(&["--nvme"]);
    let status = s.ctl_json(&["status"]);
    assert_eq!(status["connected"], false);
    assert_eq!(status["nvme"]["client_connected"], false);
    assert_eq!(status["nvme"]["controller"]["enabled"], false);

    let mut nvme = Nvme::connect(&s);
    let (ctrl, _) = nvme.probe();
    assert_eq!(le16(&ctrl, 256), 1 << 8, "OACS: Doorbell Buffer Config");
    let status = s.ctl_json(&["status"]);
    let (n, ctrl) = (&status["nvme"], &status["nvme"]["controller"]);
    assert_eq!(status["connected"], true);
    assert_eq!(n["client_connected"], true);
    assert_eq!(n["transport"]["connected"], true);
    assert_eq!(
        (
            &ctrl["enabled"],
            &ctrl["ready"],
            &ctrl["fatal"],
            &ctrl["shutdown"]
        ),
        (&json!(true), &json!(true), &Value::Null, &json!("none"))
    );
    assert_eq!(ctrl["queue_threads"], true);
    assert_eq!(ctrl["shadow_doorbells"], Value::Null);
    let sqs = ctrl["submission_queues"].as_array().unwrap();
    assert_eq!(sqs.len(), 2, "{ctrl:#}");
    assert_eq!(
        (
            &sqs[1]["qid"],
            &sqs[1]["entries"],
            &sqs[1]["cq"],
            &sqs[1]["in_flight"]
        ),
        (&json!(1), &json!(IO_ENTRIES), &json!(1), &json!(0))
    );
    assert_eq!(sqs[0]["entries"], ADMIN_ENTRIES);
    let cqs = ctrl["completion_queues"].as_array().unwrap();
    assert_eq!((&cqs[1]["qid"], &cqs[1]["vector"]), (&json!(1), &json!(1)));
    let before = ctrl["counters"].clone();
    assert_eq!(before["admin_opcodes"]["identify"], 2);
    assert_eq!(before["admin_opcodes"]["create-cq"], 1);

    // Shadow doorbells, as a Linux guest uses them.
    nvme.configure_shadow_doorbells();
    let data = pattern(31, 4096);
    for n in 0..20u16 {
        let prp = nvme.contiguous(DATA, data.len(), LISTS);
        prp.write(nvme.ram(), &data).unwrap();
        let c = nvme.io_shadowed(n, rw(io_op::WRITE, u64::from(n) * 8, 8, &prp));
        assert_eq!(c.code(), SUCCESS, "write {n}: {c:?}");
    }
    let prp = nvme.contiguous(DATA, 4096, LISTS);
    let c = nvme.io_shadowed(20, rw(io_op::READ, 8, 8, &prp));
    assert_eq!(c.code(), SUCCESS);
    same(
        &prp.read(nvme.ram()).unwrap(),
        &data,
        format_args!("read back"),
    );
    assert_eq!(
        nvme.dword(EVENT_IDX + 8),
        21,
        "SQ EventIdx: the tail fetched"
    );
    assert_eq!(nvme.dword(EVENT_IDX + 12), 21, "CQ EventIdx: the CQ's tail");
    assert_eq!(s.disk_at(19 * 8, 4096), data);

    let status = s.ctl_json(&["status"]);
    let ctrl = &status["nvme"]["controller"];
    assert_eq!(
        ctrl["shadow_doorbells"],
        json!({"doorbells": "0x6000", "event_idx": "0x7000"})
    );
    assert_eq!(ctrl["submission_queues"][1]["shadowed"], true);
    assert_eq!(ctrl["submission_queues"][0]["shadowed"], false);
    let c = &ctrl["counters"];
    let grew = |key: &str| c[key].as_u64().unwrap() - before[key].as_u64().unwrap();
    assert_eq!(c["dbbuf_configs"], 1);
    assert_eq!(c["admin_opcodes"]["doorbell-buffer-config"], 1);
    assert_eq!(c["io_opcodes"], json!({"write": 20, "read": 1}));
    assert_eq!(grew("io_commands"), 21);
    assert!(grew("shadow_updates") >= 21, "{c:#}");
    // An idle controller asks for each tail; the driver rings each head
    // besides (and the admin queue's two).
    assert_eq!(grew("mmio_doorbells"), 21 + 21 + 2, "{c:#}");
    assert_eq!(
        c["statuses"]["success"],
        c["admin_commands"].as_u64().unwrap() + 21
    );
    assert_eq!(
        (&c["doorbell_errors"], &c["fatal"], &c["sq_stalls"]),
        (&json!(0), &json!(0), &json!(0))
    );
    let human = s.ctl_ok(&["status"]);
    for want in [
        "frontend connected",
        "nvme: vfio-user client connected   controller enabled, ready   I/O queues served on a thread each",
        "nvme queues: sq0 0 in flight of 32 -> cq0 (0 posted, vector 0)   sq1 0 in flight of 64 -> cq1",
        "buffer configs, 0 errors   shadow buffers at 0x6000 (EventIdx 0x7000)",
        "io 21 (read 1, write 20)",
    ] {
        assert!(human.contains(want), "{want:?} in\n{human}");
    }

    // The client goes: the controller is reset and forgets the buffers.
    let resets = c["resets"].as_u64().unwrap();
    nvme.disconnect();
    let status = status_when(&s, "the client gone", |st| {
        st["nvme"]["client_connected"] == false
    });
    let ctrl = &status["nvme"]["controller"];
    assert_eq!(status["connected"], false);
    assert_eq!(ctrl["enabled"], false);
    assert_eq!(ctrl["shadow_doorbells"], Value::Null);
    assert_eq!(ctrl["submission_queues"], json!([]));
    assert_eq!(ctrl["counters"]["resets"], resets + 1);
    assert!(s
        .ctl_ok(&["status"])
        .contains("nvme: no vfio-user client   controller disabled"));
}
