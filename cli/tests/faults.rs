//! Every fault rule key and every action, seen through the real vhost-user
//! protocol: an in-process daemon (`backend::serve::Daemon`) on a raw file in a
//! temp dir, configured from `dmaprobe serve` arguments, driven by the frontend
//! driver (`backend::vhost_user_driver`). Each test checks what a user of the device
//! would: the status byte and used length, the bytes in guest memory, the bytes
//! in the disk file as the host reads it, the timing, and the request's ledger
//! record (`--ledger` turns recording on).
//!
//! The last tests run the real `dmaprobe serve` binary with bad rules.
//!
//! Timing: lower bounds are exact (a delay is never cut short); upper bounds
//! are generous, for a loaded 2-core machine; waits poll with a deadline.

mod common;

use common::pattern;
use common::served::Served;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use backend::control::commands::carry_out;
use backend::vhost_user_driver::{
    BlkFrontend, BlkRequest, Buffer, ChainId, Completion, DiscardRange, Queue, RequestType, Sector,
    Segment, StatusByte,
};
use dma::ledger::RequestRecord;
use dma::schedule::Release;
use dma::{FindingKind, Op};
use wire::control::Command as Ctl;

/// How long anything that should happen soon may take on a loaded machine.
const SOON: Duration = Duration::from_secs(5);
/// Bytes per request in most tests: one page.
const LEN: usize = 4096;
/// What the frontend writes into a read's destination before submitting it.
const PREFILL: u8 = 0x5c;
/// What only these tests ask of the in-process daemon.
impl Served {
    fn remove_rule(&self, id: u64) {
        assert!(self.daemon.engine().faults().remove(id), "rule {id}");
    }

    /// (matched, fired, expired) of rule `id`.
    fn counts(&self, id: u64) -> (u64, u64, bool) {
        let rules = self.daemon.engine().faults().rules();
        let r = rules.iter().find(|r| r.id == id).expect("the rule");
        (r.matched(), r.fired(), r.expired())
    }

    /// `len` bytes of the disk file at `sector`, read by the host.
    fn disk_at(&self, sector: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(self.disk())
            .and_then(|f| f.read_exact_at(&mut buf, sector * 512))
            .expect("read the disk file");
        buf
    }

    /// Puts `data` into the disk file at `sector`, from the host.
    fn put_disk(&self, sector: u64, data: &[u8]) {
        OpenOptions::new()
            .write(true)
            .open(self.disk())
            .and_then(|f| f.write_all_at(data, sector * 512))
            .expect("write the disk file");
    }

    /// Waits until exactly `n` requests have been recorded since `cursor`.
    fn wait_records(&self, cursor: u64, n: usize) -> Vec<RequestRecord> {
        let deadline = Instant::now() + SOON;
        loop {
            let records = self.records_since(cursor);
            if records.len() >= n || Instant::now() >= deadline {
                assert_eq!(records.len(), n, "records since {cursor}: {records:#?}");
                return records;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// The one request recorded since `cursor`.
    fn one_record(&self, cursor: u64) -> RequestRecord {
        self.wait_records(cursor, 1).remove(0)
    }
}

/// A page-aligned buffer of `len` bytes, every byte `byte`.
fn filled(fe: &BlkFrontend, len: usize, byte: u8) -> Buffer {
    let buf = fe.ram().alloc_aligned(len, 4096).expect("alloc");
    buf.fill(byte).expect("fill");
    buf
}

/// A page-aligned buffer holding `data`.
fn holding(fe: &BlkFrontend, data: &[u8]) -> Buffer {
    let buf = fe.ram().alloc_aligned(data.len(), 4096).expect("alloc");
    buf.write_at(0, data).expect("write");
    buf
}

fn seg(buf: &Buffer) -> Segment {
    Segment::of(buf).expect("buffer fits a descriptor")
}

/// Places a request in `q`'s avail ring and kicks.
fn submit(q: &mut Queue, kind: RequestType, sector: u64, data: &[Segment]) -> ChainId {
    let id = q
        .submit(&BlkRequest {
            kind,
            sector: Sector(sector),
            data,
        })
        .expect("submit");
    q.kick().expect("kick");
    id
}

/// Submits and waits for completion.
fn run(q: &mut Queue, kind: RequestType, sector: u64, data: &[Segment]) -> Completion {
    let id = submit(q, kind, sector, data);
    q.wait_for(id, SOON)
        .unwrap_or_else(|e| panic!("{kind:?} at {sector}: {e}"))
}

fn status(c: &Completion) -> StatusByte {
    c.status().expect("a blk completion")
}

/// What a read did: status, used length, the destination afterwards.
#[derive(Debug)]
struct ReadOutcome {
    status: StatusByte,
    used: u32,
    data: Vec<u8>,
}

/// Reads `len` bytes at `sector` on `queue` into a destination pre-filled with [`PREFILL`].
fn read(fe: &mut BlkFrontend, queue: u16, sector: u64, len: usize) -> ReadOutcome {
    let buf = filled(fe, len, PREFILL);
    let c = run(
        fe.queue(queue).unwrap(),
        RequestType::In,
        sector,
        &[seg(&buf)],
    );
    ReadOutcome {
        status: status(&c),
        used: c.len,
        data: buf.read().unwrap(),
    }
}

/// Writes `data` at `sector` on `queue`; returns the status and used length.
fn write(fe: &mut BlkFrontend, queue: u16, sector: u64, data: &[u8]) -> (StatusByte, u32) {
    let buf = holding(fe, data);
    let c = run(
        fe.queue(queue).unwrap(),
        RequestType::Out,
        sector,
        &[seg(&buf)],
    );
    (status(&c), c.len)
}

fn read_status(fe: &mut BlkFrontend, sector: u64, len: usize) -> StatusByte {
    read(fe, 0, sector, len).status
}

/// Bits that differ between `a` and `b`.
fn bits_differing(a: &[u8], b: &[u8]) -> u32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum()
}

/// Milliseconds between two ledger times.
fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e6
}

fn summary(r: &RequestRecord) -> (Op, &str) {
    (r.op, r.status.as_str())
}

// ---------------------------------------------------------------------------
// Match keys
// ---------------------------------------------------------------------------

/// Sectors each op of [`every_op`] works on.
const OP_READ_AT: u64 = 0;
const OP_WRITE_AT: u64 = 8;
const OP_DISCARD_AT: u64 = 16;
const OP_ZEROES_AT: u64 = 24;

/// Issues one request of each op, in the order of `Op`'s variants; checks each
/// one's effect on guest memory and disk against its status; returns the
/// statuses.
fn every_op(s: &Served, fe: &mut BlkFrontend, round: u64) -> Vec<(Op, StatusByte)> {
    let (old_r, old_w, old_d, old_z, new_w) = (
        pattern(round * 10 + 1, LEN),
        pattern(round * 10 + 2, LEN),
        pattern(round * 10 + 3, LEN),
        pattern(round * 10 + 4, LEN),
        pattern(round * 10 + 5, LEN),
    );
    s.put_disk(OP_READ_AT, &old_r);
    s.put_disk(OP_WRITE_AT, &old_w);
    s.put_disk(OP_DISCARD_AT, &old_d);
    s.put_disk(OP_ZEROES_AT, &old_z);
    let mut out = Vec::new();

    let r = read(fe, 0, OP_READ_AT, LEN);
    if r.status.is_ok() {
        assert!(r.data == old_r, "an OK read returns the disk's data");
    } else {
        assert!(
            r.data.iter().all(|&b| b == PREFILL),
            "a failed read moves nothing"
        );
    }
    out.push((Op::Read, r.status));

    let (st, _) = write(fe, 0, OP_WRITE_AT, &new_w);
    let want = if st.is_ok() { &new_w } else { &old_w };
    assert!(
        s.disk_at(OP_WRITE_AT, LEN) == *want,
        "write {st}: the disk holds the new data iff OK"
    );
    out.push((Op::Write, st));

    out.push((Op::Flush, fe.flush(0).expect("flush")));

    let range = |sector| DiscardRange {
        sector: Sector(sector),
        num_sectors: (LEN / 512) as u32,
        flags: 0,
    };
    let st = fe.discard(0, &[range(OP_DISCARD_AT)]).expect("discard");
    let disk = s.disk_at(OP_DISCARD_AT, LEN);
    if st.is_ok() {
        assert!(
            disk.iter().all(|&b| b == 0),
            "discarded blocks read as zeros"
        );
    } else {
        assert!(disk == old_d, "a failed discard leaves the data");
    }
    out.push((Op::Discard, st));

    let st = fe
        .write_zeroes(0, &[range(OP_ZEROES_AT)])
        .expect("write-zeroes");
    let disk = s.disk_at(OP_ZEROES_AT, LEN);
    if st.is_ok() {
        assert!(disk.iter().all(|&b| b == 0), "zeroed blocks read as zeros");
    } else {
        assert!(disk == old_z, "a failed write-zeroes leaves the data");
    }
    out.push((Op::WriteZeroes, st));

    let id = filled(fe, 20, PREFILL);
    let c = run(fe.queue(0).unwrap(), RequestType::GetId, 0, &[seg(&id)]);
    let got = id.read().unwrap();
    if status(&c).is_ok() {
        assert_eq!(backend::vhost_user_driver::id_string(&got), "dmaprobe");
    } else {
        assert!(
            got.iter().all(|&b| b == PREFILL),
            "a failed get-id moves nothing"
        );
    }
    out.push((Op::GetId, status(&c)));
    out
}

const ALL_OPS: [Op; 6] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Discard,
    Op::WriteZeroes,
    Op::GetId,
];

#[test]
fn op_picks_out_each_operation_and_any_picks_all() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    for (round, name) in (1..).zip([
        "read",
        "write",
        "flush",
        "discard",
        "write-zeroes",
        "get-id",
        "any",
    ]) {
        let id = s.rule(&format!("op={name},action=error"));
        let cursor = s.cursor();
        let got = every_op(&s, &mut fe, round);
        let want: Vec<(Op, StatusByte)> = ALL_OPS
            .iter()
            .map(|&op| {
                let hit = name == "any" || op.name() == name;
                (
                    op,
                    if hit {
                        StatusByte::IOERR
                    } else {
                        StatusByte::OK
                    },
                )
            })
            .collect();
        assert_eq!(got, want, "op={name}");

        let records = s.wait_records(cursor, ALL_OPS.len());
        let recorded: Vec<(Op, &str)> = records.iter().map(summary).collect();
        let expected: Vec<(Op, &str)> = want
            .iter()
            .map(|&(op, st)| (op, if st.is_ok() { "ok" } else { "ioerr" }))
            .collect();
        assert_eq!(recorded, expected, "op={name}: the ledger");
        let rules = s.daemon.engine().faults().rules();
        let hits = if name == "any" { 6 } else { 1 };
        assert_eq!(s.counts(id), (hits, hits, false), "op={name}: {rules:?}");
        s.remove_rule(id);
    }
    s.assert_alive();
}

#[test]
fn lba_matches_one_block_or_an_inclusive_range_of_first_blocks() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let one = s.rule("op=read,lba=100,action=error");
    let range = s.rule("op=read,lba=200-207,action=error");
    let cursor = s.cursor();
    // (sector, bytes, fails): 512-byte blocks, so the lba is the sector.
    let cases: [(u64, usize, bool); 10] = [
        (99, 512, false),
        (100, 512, true),
        (101, 512, false),
        (96, 4096, false), // covers 100, but starts at 96
        (199, 512, false),
        (200, 512, true),
        (203, 4096, true),
        (207, 512, true),
        (208, 512, false),
        (192, 8192, false), // covers the whole range, starts before it
    ];
    for &(sector, len, fails) in &cases {
        let st = read_status(&mut fe, sector, len);
        let want = if fails {
            StatusByte::IOERR
        } else {
            StatusByte::OK
        };
        assert_eq!(st, want, "a {len} B read at lba {sector}");
    }
    let records = s.wait_records(cursor, cases.len());
    for (r, &(sector, len, fails)) in records.iter().zip(&cases) {
        assert_eq!(
            (r.op, r.lba, r.len, r.status.as_str()),
            (
                Op::Read,
                sector,
                len as u64,
                if fails { "ioerr" } else { "ok" }
            )
        );
    }
    assert_eq!(s.counts(one), (1, 1, false));
    assert_eq!(s.counts(range), (3, 3, false));
}

#[test]
fn lba_is_counted_in_logical_blocks() {
    let s = Served::on_disk(&["--lbs", "4096"]);
    let mut fe = s.connect(1);
    s.rule("op=read,lba=3,action=error");
    let cursor = s.cursor();
    // Block 3 of 4096 B is sector 24.
    assert_eq!(read_status(&mut fe, 24, 4096), StatusByte::IOERR);
    assert_eq!(read_status(&mut fe, 16, 4096), StatusByte::OK);
    assert_eq!(read_status(&mut fe, 32, 4096), StatusByte::OK);
    assert_eq!(
        read_status(&mut fe, 16, 8192),
        StatusByte::OK,
        "blocks 2-3 start at 2"
    );
    let lbas: Vec<u64> = s.wait_records(cursor, 4).iter().map(|r| r.lba).collect();
    assert_eq!(lbas, vec![3, 2, 4, 2]);
}

#[test]
fn lba_matches_the_first_block_of_a_write_zeroes_or_discard() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    s.rule("op=write-zeroes,lba=64,action=error");
    s.rule("op=discard,lba=64-71,action=error");
    let range = DiscardRange {
        sector: Sector(64),
        num_sectors: 8,
        flags: 0,
    };
    let cursor = s.cursor();
    let wz = fe.write_zeroes(0, &[range]).unwrap();
    let discard = fe.discard(0, &[range]).unwrap();
    let records = s.wait_records(cursor, 2);
    assert_eq!(
        (wz, discard),
        (StatusByte::IOERR, StatusByte::IOERR),
        "rules for lba 64 and 64-71; the ledger says: {records:#?}"
    );
    for r in &records {
        assert_eq!((r.lba, r.len), (64, 4096), "{r:?}");
    }
}

#[test]
fn queue_matches_one_queue() {
    let s = Served::on_disk(&["--queues", "2"]);
    let mut fe = s.connect(2);
    s.rule("queue=1,action=error");
    s.put_disk(40, &pattern(1, LEN));
    let cursor = s.cursor();
    let r0 = read(&mut fe, 0, 40, LEN);
    let r1 = read(&mut fe, 1, 40, LEN);
    let (w0, _) = write(&mut fe, 0, 48, &pattern(2, LEN));
    let (w1, _) = write(&mut fe, 1, 56, &pattern(3, LEN));
    assert_eq!(
        (r0.status, r1.status, w0, w1),
        (
            StatusByte::OK,
            StatusByte::IOERR,
            StatusByte::OK,
            StatusByte::IOERR
        )
    );
    assert!(r0.data == pattern(1, LEN));
    assert!(r1.data.iter().all(|&b| b == PREFILL));
    assert!(s.disk_at(48, LEN) == pattern(2, LEN));
    assert!(s.disk_at(56, LEN).iter().all(|&b| b == 0));
    let got: Vec<(u16, Op, String)> = s
        .wait_records(cursor, 4)
        .into_iter()
        .map(|r| (r.queue, r.op, r.status))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, Op::Read, "ok".into()),
            (1, Op::Read, "ioerr".into()),
            (0, Op::Write, "ok".into()),
            (1, Op::Write, "ioerr".into()),
        ]
    );
}

#[test]
fn size_matches_an_inclusive_byte_range() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    s.rule("op=read,size=1024-2048,action=error");
    s.rule("op=write,size=4096,action=error");
    let cursor = s.cursor();
    let reads = [
        (512, false),
        (1024, true),
        (1536, true),
        (2048, true),
        (2560, false),
    ];
    for &(len, fails) in &reads {
        let want = if fails {
            StatusByte::IOERR
        } else {
            StatusByte::OK
        };
        assert_eq!(read_status(&mut fe, 0, len), want, "a {len} B read");
    }
    // Size counts the bytes of all data segments: 2 × 2048 is 4096.
    let (a, b) = (holding(&fe, &[1; 2048]), holding(&fe, &[2; 2048]));
    let c = run(
        fe.queue(0).unwrap(),
        RequestType::Out,
        0,
        &[seg(&a), seg(&b)],
    );
    assert_eq!(status(&c), StatusByte::IOERR, "4096 B in two segments");
    assert_eq!(write(&mut fe, 0, 0, &[3; 3584]).0, StatusByte::OK);
    assert_eq!(write(&mut fe, 0, 0, &[4; 4608]).0, StatusByte::OK);
    let got: Vec<(u64, &str)> = s
        .wait_records(cursor, 8)
        .iter()
        .map(|r| (r.len, if r.status == "ok" { "ok" } else { "ioerr" }))
        .collect();
    assert_eq!(
        got,
        vec![
            (512, "ok"),
            (1024, "ioerr"),
            (1536, "ioerr"),
            (2048, "ioerr"),
            (2560, "ok"),
            (4096, "ioerr"),
            (3584, "ok"),
            (4608, "ok"),
        ]
    );
}

#[test]
fn tag_matches_requests_between_begin_and_end() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    s.rule("tag=t1,action=error");
    let control = |cmd: Ctl| carry_out(s.daemon.state(), cmd).expect("the command");
    let cursor = s.cursor();
    let untagged = read_status(&mut fe, 0, 512);
    let begun = control(Ctl::Begin { tag: "t1".into() });
    assert_eq!(begun["tag"], "t1");
    let in_t1 = (
        read_status(&mut fe, 0, 512),
        write(&mut fe, 0, 8, &[7; 512]).0,
    );
    control(Ctl::Begin { tag: "t2".into() });
    let in_t2 = read_status(&mut fe, 0, 512);
    let ended = control(Ctl::End);
    assert_eq!(ended["ended"], "t2");
    let after = read_status(&mut fe, 0, 512);
    assert_eq!(
        (untagged, in_t1, in_t2, after),
        (
            StatusByte::OK,
            (StatusByte::IOERR, StatusByte::IOERR),
            StatusByte::OK,
            StatusByte::OK
        )
    );
    let got: Vec<(Op, Option<String>, String)> = s
        .wait_records(cursor, 5)
        .into_iter()
        .map(|r| (r.op, r.tag, r.status))
        .collect();
    let t = |s: &str| Some(s.to_owned());
    assert_eq!(
        got,
        vec![
            (Op::Read, None, "ok".into()),
            (Op::Read, t("t1"), "ioerr".into()),
            (Op::Write, t("t1"), "ioerr".into()),
            (Op::Read, t("t2"), "ok".into()),
            (Op::Read, None, "ok".into()),
        ]
    );
    assert!(s.disk_at(8, 512).iter().all(|&b| b == 0));
}

/// Which of `n` reads (interleaved with writes the rule does not match) fail.
fn failing_reads(s: &Served, fe: &mut BlkFrontend, n: usize) -> Vec<bool> {
    let cursor = s.cursor();
    let fails: Vec<bool> = (0..n)
        .map(|i| {
            assert_eq!(
                write(fe, 0, 64, &[i as u8; 512]).0,
                StatusByte::OK,
                "writes do not count"
            );
            read_status(fe, 64, 512) == StatusByte::IOERR
        })
        .collect();
    let recorded: Vec<bool> = s
        .wait_records(cursor, 2 * n)
        .iter()
        .filter(|r| r.op == Op::Read)
        .map(|r| r.status == "ioerr")
        .collect();
    assert_eq!(recorded, fails, "the ledger agrees");
    fails
}

#[test]
fn nth_fires_on_the_nth_matching_request_only() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let id = s.rule("op=read,nth=3,action=error");
    let fails = failing_reads(&s, &mut fe, 7);
    assert_eq!(fails, [false, false, true, false, false, false, false]);
    assert_eq!(s.counts(id), (7, 1, false));
}

// The module docs: "A request gets the first wait, the first watch and the
// first effect of the rules that fire on it": rules fire on their own count.
#[test]
fn nth_counts_every_matching_request_even_one_an_earlier_rule_decided() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let first = s.rule("op=read,nth=1,action=error");
    let second = s.rule("op=read,nth=2,action=error,status=unsupp");
    let got: Vec<StatusByte> = (0..3).map(|_| read_status(&mut fe, 0, 512)).collect();
    let counts = (s.counts(first), s.counts(second));
    assert_eq!(
        got,
        [StatusByte::IOERR, StatusByte::UNSUPP, StatusByte::OK],
        "the second read is the nth=2 rule's; rule counters (matched, fired, expired): \
         {counts:?}"
    );
    assert_eq!(counts.1 .0, 3, "the second rule matched all three reads");
}

#[test]
fn every_fires_on_every_nth_matching_request() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let id = s.rule("op=read,every=3,action=error");
    let fails = failing_reads(&s, &mut fe, 7);
    assert_eq!(fails, [false, false, true, false, false, true, false]);
    assert_eq!(s.counts(id), (7, 2, false));
}

#[test]
fn count_retires_a_rule_after_it_fired_that_often() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let id = s.rule("op=read,count=2,action=error");
    assert_eq!(failing_reads(&s, &mut fe, 4), [true, true, false, false]);
    let (_, fired, expired) = s.counts(id);
    assert_eq!((fired, expired), (2, true));
    s.remove_rule(id);

    let id = s.rule("op=read,every=2,count=2,action=error");
    let fails = failing_reads(&s, &mut fe, 8);
    assert_eq!(
        fails,
        [false, true, false, true, false, false, false, false]
    );
    let (_, fired, expired) = s.counts(id);
    assert_eq!((fired, expired), (2, true));
}

/// Which of 40 reads a `prob=P` rule fails, on a daemon started with `--seed SEED`.
fn prob_sequence(seed: &str, p: &str) -> Vec<bool> {
    let s = Served::on_disk(&["--seed", seed]);
    let mut fe = s.connect(1);
    s.rule(&format!("op=read,prob={p},action=error"));
    let fails: Vec<bool> = (0..40)
        .map(|_| read_status(&mut fe, 0, 512) == StatusByte::IOERR)
        .collect();
    let recorded: Vec<bool> = s
        .wait_records(1, 40)
        .iter()
        .map(|r| r.status == "ioerr")
        .collect();
    assert_eq!(recorded, fails, "the ledger agrees");
    fails
}

#[test]
fn prob_fires_as_its_seed_says() {
    let a = prob_sequence("7", "0.5");
    let again = prob_sequence("7", "0.5");
    let other = prob_sequence("8", "0.5");
    assert_eq!(a, again, "the same seed, the same requests fail");
    assert_ne!(a, other, "another seed, another sequence");
    let n = a.iter().filter(|&&f| f).count();
    assert!((5..=35).contains(&n), "about half of 40 fail: {n}");
    assert!(
        prob_sequence("7", "0").iter().all(|&f| !f),
        "prob=0 never fires"
    );
    assert!(
        prob_sequence("7", "1").iter().all(|&f| f),
        "prob=1 always fires"
    );
}

// ---------------------------------------------------------------------------
// Actions
// ---------------------------------------------------------------------------

#[test]
fn delay_holds_a_request_back_for_exactly_its_time_at_least() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    s.rule("op=read,lba=8,action=delay,ms=300");
    let data = pattern(1, LEN);
    s.put_disk(8, &data);
    let cursor = s.cursor();

    let start = Instant::now();
    let r = read(&mut fe, 0, 8, LEN);
    let elapsed = start.elapsed();
    assert_eq!((r.status, r.used), (StatusByte::OK, LEN as u32 + 1));
    assert!(r.data == data);
    assert!(
        elapsed >= Duration::from_millis(300),
        "completed after {elapsed:?}, before its 300 ms delay"
    );
    assert!(elapsed < SOON, "{elapsed:?}");
    let rec = s.one_record(cursor);
    assert_eq!(
        (rec.wait.as_str(), rec.status.as_str()),
        ("delay 300 ms", "ok")
    );
    let dma = rec.dma_ns.expect("the data moved");
    assert!(ms_between(rec.arrived_ns, dma) >= 300.0, "{rec:?}");
    assert!(dma <= rec.completed_ns);

    // Another lba: not delayed.
    let cursor = s.cursor();
    assert_eq!(read_status(&mut fe, 16, LEN), StatusByte::OK);
    assert_eq!(s.one_record(cursor).wait, "none");
}

#[test]
fn a_delay_range_picks_each_delay_within_it() {
    let s = Served::on_disk(&["--seed", "3"]);
    let mut fe = s.connect(1);
    s.rule("op=read,action=delay,ms=100-400");
    let cursor = s.cursor();
    // Six reads at once: each waits its own delay.
    let bufs: Vec<Buffer> = (0..6).map(|_| filled(&fe, 512, PREFILL)).collect();
    let q = fe.queue(0).unwrap();
    let start = Instant::now();
    let ids: Vec<ChainId> = bufs
        .iter()
        .map(|b| submit(q, RequestType::In, 0, &[seg(b)]))
        .collect();
    let mut done = Vec::new();
    for id in ids {
        let c = q.wait_for(id, SOON).expect("a delayed read");
        assert_eq!(status(&c), StatusByte::OK);
        done.push(start.elapsed());
    }
    let records = s.wait_records(cursor, 6);
    let mut delays = Vec::new();
    for r in &records {
        let ms: u64 = r
            .wait
            .strip_prefix("delay ")
            .and_then(|w| w.strip_suffix(" ms"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a delay: {r:?}"));
        assert!((100..=400).contains(&ms), "{ms} ms is outside 100-400");
        let dma = r.dma_ns.expect("moved");
        assert!(
            ms_between(r.arrived_ns, dma) >= ms as f64,
            "the data moved before its {ms} ms: {r:?}"
        );
        delays.push(ms);
    }
    assert!(
        delays.iter().any(|&d| d != delays[0]),
        "six random delays are not all the same: {delays:?}"
    );
    let min = *delays.iter().min().unwrap();
    assert!(
        done.iter().all(|&d| d >= Duration::from_millis(min)),
        "none completes before the shortest delay ({min} ms): {done:?}"
    );
    assert!(
        done.iter().all(|&d| d >= Duration::from_millis(100)),
        "{done:?}"
    );
}

#[test]
fn hold_keeps_a_request_until_it_is_released() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    s.rule("lba=32,action=hold");
    let data = pattern(2, LEN);
    s.put_disk(32, &data);

    // A read.
    let cursor = s.cursor();
    let buf = filled(&fe, LEN, PREFILL);
    let start = Instant::now();
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 32, &[seg(&buf)]);
    let p = s.wait_parked(1).remove(0);
    assert_eq!(
        (p.op, p.lba, p.len, p.held),
        (Op::Read, 32, LEN as u64, true)
    );
    // Still pending well after anything immediate would have completed.
    let q = fe.queue(0).unwrap();
    assert!(q.wait_for(id, Duration::from_millis(300)).is_err(), "held");
    assert!(buf.read().unwrap().iter().all(|&b| b == PREFILL));
    assert_eq!(s.records_since(cursor), Vec::new(), "not complete yet");
    assert_eq!(s.daemon.release(Release::One(p.request)), 1);
    let c = q.wait_for(id, SOON).expect("released");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!((status(&c), c.len), (StatusByte::OK, LEN as u32 + 1));
    assert!(buf.read().unwrap() == data);
    let rec = s.one_record(cursor);
    assert_eq!((rec.request, rec.wait.as_str()), (p.request, "hold"));
    assert!(ms_between(rec.arrived_ns, rec.dma_ns.unwrap()) >= 300.0);

    // A write: the disk keeps the old data while it is held.
    let new = pattern(3, LEN);
    let src = holding(&fe, &new);
    let id = submit(fe.queue(0).unwrap(), RequestType::Out, 32, &[seg(&src)]);
    let p = s.wait_parked(1).remove(0);
    assert_eq!((p.op, p.held), (Op::Write, true));
    thread::sleep(Duration::from_millis(100));
    assert!(s.disk_at(32, LEN) == data, "held: not written yet");
    assert_eq!(s.daemon.release(Release::All), 1);
    let c = fe.queue(0).unwrap().wait_for(id, SOON).expect("released");
    assert_eq!(status(&c), StatusByte::OK);
    assert!(s.disk_at(32, LEN) == new);
}

#[test]
fn watch_finds_a_destination_zeroed_after_completion_and_nothing_else() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    s.rule("op=read,action=watch,ms=1000");
    let data = pattern(4, LEN);
    s.put_disk(0, &data);

    // Left alone after completion: no finding.
    let cursor = s.cursor();
    let kept = filled(&fe, LEN, PREFILL);
    let c = run(fe.queue(0).unwrap(), RequestType::In, 0, &[seg(&kept)]);
    assert_eq!((status(&c), c.len), (StatusByte::OK, LEN as u32 + 1));
    let kept_rec = s.one_record(cursor);

    // The program frees the page right after the read: it is cleared.
    let cursor = s.cursor();
    let zeroed = filled(&fe, LEN, PREFILL);
    let c = run(fe.queue(0).unwrap(), RequestType::In, 0, &[seg(&zeroed)]);
    zeroed.fill(0).unwrap();
    assert_eq!((status(&c), c.len), (StatusByte::OK, LEN as u32 + 1));
    let rec = s.one_record(cursor);
    assert_eq!(rec.status, "ok");

    // Watches run in the order they are due: once the second has found
    // something, the first has looked too.
    let deadline = Instant::now() + Duration::from_millis(1000) + SOON;
    while s.findings().is_empty() {
        assert!(Instant::now() < deadline, "the zeroed page was never found");
        thread::sleep(Duration::from_millis(10));
    }
    let found = s.findings();
    assert_eq!(found.len(), 1, "{found:#?}");
    let f = &found[0];
    assert_eq!(f.finding, FindingKind::DataVanishedAfterCompletion);
    assert_eq!(f.finding.name(), "data-vanished-after-completion");
    assert_eq!((f.request, f.op, f.lba), (rec.request, Op::Read, 0));
    assert_ne!(f.request, kept_rec.request);
    assert_eq!((f.gpa.0, f.len), (zeroed.gpa().0, LEN as u64));
    // Bytes that were already zero did not change.
    let changed = data.iter().filter(|&&b| b != 0).count() as u64;
    assert_eq!((f.class.as_deref(), f.bytes), (Some("zeros"), changed));
    assert!(
        ms_between(rec.completed_ns, f.at_ns) >= 1000.0,
        "the watch looked before its 1000 ms: {f:?} {rec:?}"
    );
    assert!(kept.read().unwrap() == data);
}

#[test]
fn error_fails_with_the_chosen_status_and_moves_no_data() {
    for (rule, want, name) in [
        ("action=error", StatusByte::IOERR, "ioerr"),
        ("action=error,status=ioerr", StatusByte::IOERR, "ioerr"),
        ("action=error,status=unsupp", StatusByte::UNSUPP, "unsupp"),
    ] {
        let s = Served::on_disk(&["--fault", rule]);
        let mut fe = s.connect(1);
        let (old, new) = (pattern(5, LEN), pattern(6, LEN));
        s.put_disk(8, &old);
        let cursor = s.cursor();
        let r = read(&mut fe, 0, 8, LEN);
        assert_eq!((r.status, r.used), (want, 1), "{rule}: status only");
        assert!(
            r.data.iter().all(|&b| b == PREFILL),
            "{rule}: no data moved"
        );
        let (st, used) = write(&mut fe, 0, 8, &new);
        assert_eq!((st, used), (want, 1), "{rule}");
        assert!(s.disk_at(8, LEN) == old, "{rule}: the disk is unchanged");
        for rec in s.wait_records(cursor, 2) {
            assert_eq!(rec.status, name, "{rule}: {rec:?}");
            assert_eq!(rec.dma_ns, None, "{rule}: no DMA: {rec:?}");
        }
        assert_eq!(s.daemon.counters().snapshot().injected, 2);
    }
}

#[test]
fn partial_read_moves_exactly_the_first_bytes_and_fails() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let data = pattern(7, LEN);
    s.put_disk(0, &data);
    let id = s.rule("op=read,action=partial,bytes=1000");
    let cursor = s.cursor();
    let r = read(&mut fe, 0, 0, LEN);
    assert_eq!(r.status, StatusByte::IOERR);
    assert!(
        r.data[..1000] == data[..1000],
        "the first 1000 bytes are the data"
    );
    let rest = r.data[1000..].iter().position(|&b| b != PREFILL);
    assert_eq!(rest, None, "nothing after byte 1000 is touched");
    // The device wrote 1000 data bytes and the status, but counts only the status.
    assert_eq!(r.used, 1);
    let rec = s.one_record(cursor);
    assert_eq!((rec.status.as_str(), rec.len), ("ioerr", LEN as u64));
    assert!(rec.dma_ns.is_some(), "some data moved");
    assert!(s.disk_at(0, LEN) == data, "a read leaves the disk alone");

    // Across two segments: the first whole, the second in part.
    let (a, b) = (filled(&fe, 2048, PREFILL), filled(&fe, 2048, PREFILL));
    s.remove_rule(id);
    let id = s.rule("op=read,action=partial,bytes=3000");
    let c = run(
        fe.queue(0).unwrap(),
        RequestType::In,
        0,
        &[seg(&a), seg(&b)],
    );
    assert_eq!(status(&c), StatusByte::IOERR);
    assert!(a.read().unwrap() == data[..2048]);
    let b = b.read().unwrap();
    assert!(b[..952] == data[2048..3000]);
    assert!(b[952..].iter().all(|&x| x == PREFILL));

    // More bytes than the read has: all of it moves, and it still fails.
    s.remove_rule(id);
    s.rule("op=read,action=partial,bytes=100000");
    let r = read(&mut fe, 0, 0, LEN);
    assert_eq!(r.status, StatusByte::IOERR);
    assert!(r.data == data);
}

#[test]
fn partial_write_stores_whole_blocks_of_the_first_bytes_and_fails() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let (old, new) = (pattern(8, LEN), pattern(9, LEN));
    s.put_disk(0, &old);
    s.rule("op=write,action=partial,bytes=1500");
    let cursor = s.cursor();
    let (st, used) = write(&mut fe, 0, 0, &new);
    assert_eq!((st, used), (StatusByte::IOERR, 1));
    let disk = s.disk_at(0, LEN);
    assert!(
        disk[..1024] == new[..1024],
        "two whole blocks of 512 stored"
    );
    assert!(disk[1024..] == old[1024..], "the rest is old");
    assert_eq!(s.one_record(cursor).status, "ioerr");

    // 4096-byte blocks: 6000 of 8192 bytes is one block.
    let s = Served::on_disk(&["--lbs", "4096"]);
    let mut fe = s.connect(1);
    let (old, new) = (pattern(10, 2 * LEN), pattern(11, 2 * LEN));
    s.put_disk(0, &old);
    s.rule("op=write,action=partial,bytes=6000");
    assert_eq!(write(&mut fe, 0, 0, &new).0, StatusByte::IOERR);
    let disk = s.disk_at(0, 2 * LEN);
    assert!(disk[..LEN] == new[..LEN]);
    assert!(disk[LEN..] == old[LEN..]);
}

#[test]
fn torn_write_stores_the_first_blocks_with_the_chosen_status() {
    for (rule, want, name) in [
        ("op=write,action=torn,bytes=2048", StatusByte::OK, "ok"),
        (
            "op=write,action=torn,bytes=2048,status=ok",
            StatusByte::OK,
            "ok",
        ),
        (
            "op=write,action=torn,bytes=2100,status=ioerr",
            StatusByte::IOERR,
            "ioerr",
        ),
    ] {
        let s = Served::on_disk(&["--fault", rule]);
        let mut fe = s.connect(1);
        let (old, new) = (pattern(12, LEN), pattern(13, LEN));
        s.put_disk(16, &old);
        let cursor = s.cursor();
        let (st, _) = write(&mut fe, 0, 16, &new);
        assert_eq!(st, want, "{rule}");
        let disk = s.disk_at(16, LEN);
        assert!(
            disk[..2048] == new[..2048],
            "{rule}: the first 2048 B are new"
        );
        assert!(disk[2048..] == old[2048..], "{rule}: the rest is old");
        assert_eq!(s.one_record(cursor).status, name, "{rule}");
        // A read under the same rule is not torn.
        let r = read(&mut fe, 0, 16, LEN);
        assert_eq!(r.status, StatusByte::OK, "{rule}");
        assert!(r.data == disk, "{rule}");
    }
}

#[test]
fn corrupt_flips_bits_of_the_data_moved() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let data = pattern(14, LEN);
    s.put_disk(0, &data);

    // One bit: exactly one differs.
    let id = s.rule("op=read,action=corrupt");
    let cursor = s.cursor();
    let r = read(&mut fe, 0, 0, LEN);
    assert_eq!((r.status, r.used), (StatusByte::OK, LEN as u32 + 1));
    assert_eq!(bits_differing(&r.data, &data), 1);
    assert_eq!(s.one_record(cursor).status, "ok");
    assert!(
        s.disk_at(0, LEN) == data,
        "a read does not corrupt the disk"
    );
    s.remove_rule(id);

    // Several bits: N distinct bits flip, exactly N differ.
    let id = s.rule("op=read,action=corrupt,bits=5");
    for _ in 0..4 {
        let r = read(&mut fe, 0, 0, LEN);
        assert_eq!(r.status, StatusByte::OK);
        let n = bits_differing(&r.data, &data);
        assert_eq!(n, 5, "{n} bits differ");
    }
    s.remove_rule(id);

    // A write: the disk gets the flipped data; the source is untouched.
    s.rule("op=write,action=corrupt,bits=3");
    let new = pattern(15, LEN);
    let src = holding(&fe, &new);
    let c = run(fe.queue(0).unwrap(), RequestType::Out, 8, &[seg(&src)]);
    assert_eq!((status(&c), c.len), (StatusByte::OK, 1));
    let n = bits_differing(&s.disk_at(8, LEN), &new);
    assert_eq!(n, 3, "{n} bits differ on disk");
    assert!(src.read().unwrap() == new, "the source is unchanged");
}

#[test]
fn complete_before_dma_completes_at_once_and_moves_the_data_later() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let data = pattern(16, LEN);
    s.put_disk(0, &data);
    s.rule("op=read,action=complete-before-dma,ms=2000");
    let cursor = s.cursor();

    let buf = filled(&fe, LEN, PREFILL);
    let start = Instant::now();
    let c = run(fe.queue(0).unwrap(), RequestType::In, 0, &[seg(&buf)]);
    let completed = start.elapsed();
    let at_completion = buf.read().unwrap();
    assert_eq!((status(&c), c.len), (StatusByte::OK, LEN as u32 + 1));
    assert!(
        completed < Duration::from_millis(2000),
        "the used entry came after {completed:?}, not at once"
    );
    assert!(
        at_completion.iter().all(|&b| b == PREFILL),
        "completed, but the destination still holds the pre-fill"
    );
    // The data lands later.
    let deadline = start + Duration::from_millis(2000) + SOON;
    while buf.read().unwrap() != data {
        assert!(Instant::now() < deadline, "the data never landed");
        thread::sleep(Duration::from_millis(5));
    }
    let landed = start.elapsed();
    assert!(
        landed >= Duration::from_millis(2000),
        "landed after {landed:?}"
    );
    let rec = s.one_record(cursor);
    assert_eq!(rec.status, "ok-before-dma");
    assert!(ms_between(rec.arrived_ns, rec.dma_ns.unwrap()) >= 2000.0);

    // A write: OK at once, on the disk later.
    s.rule("op=write,action=complete-before-dma,ms=500");
    let new = pattern(17, LEN);
    let src = holding(&fe, &new);
    let start = Instant::now();
    let c = run(fe.queue(0).unwrap(), RequestType::Out, 8, &[seg(&src)]);
    assert_eq!(status(&c), StatusByte::OK);
    assert!(start.elapsed() < Duration::from_millis(500));
    assert!(
        s.disk_at(8, LEN).iter().all(|&b| b == 0),
        "not on the disk yet"
    );
    let deadline = start + SOON;
    while s.disk_at(8, LEN) != new {
        assert!(Instant::now() < deadline, "the write never landed");
        thread::sleep(Duration::from_millis(5));
    }
    assert!(start.elapsed() >= Duration::from_millis(500));
}

#[test]
fn complete_before_dma_under_a_hold_moves_the_data_at_the_release() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let data = pattern(19, LEN);
    s.put_disk(40, &data);
    s.rule("lba=40,action=hold");
    s.rule("action=complete-before-dma,ms=100");

    // The guest hears "done" at once; the device still lists the read as held.
    let buf = filled(&fe, LEN, PREFILL);
    let c = run(fe.queue(0).unwrap(), RequestType::In, 40, &[seg(&buf)]);
    assert_eq!((status(&c), c.len), (StatusByte::OK, LEN as u32 + 1));
    let p = s.wait_parked(1).remove(0);
    assert_eq!((p.op, p.lba, p.held), (Op::Read, 40, true));
    // Past the mutant's own delay, the data has not moved: the hold keeps it.
    thread::sleep(Duration::from_millis(300));
    assert!(buf.read().unwrap().iter().all(|&b| b == PREFILL));
    assert_eq!(s.daemon.release(Release::All), 1);
    let deadline = Instant::now() + SOON;
    while buf.read().unwrap() != data {
        assert!(Instant::now() < deadline, "the data never landed");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn wrong_page_moves_the_data_one_page_off() {
    let s = Served::on_disk(&[]);
    let mut fe = s.connect(1);
    let data = pattern(18, LEN);
    s.put_disk(0, &data);
    s.rule("action=wrong-page");

    // A read into the first of two pages: the data lands in the second.
    let two = filled(&fe, 2 * LEN, PREFILL);
    two.write_at(LEN, &[0x33; LEN]).unwrap();
    let first = Segment {
        gpa: two.gpa(),
        len: LEN as u32,
    };
    let cursor = s.cursor();
    let c = run(fe.queue(0).unwrap(), RequestType::In, 0, &[first]);
    assert_eq!((status(&c), c.len), (StatusByte::OK, LEN as u32 + 1));
    let mem = two.read().unwrap();
    assert!(
        mem[..LEN].iter().all(|&b| b == PREFILL),
        "the destination keeps its pre-fill"
    );
    assert!(mem[LEN..] == data, "the next page got the data");
    let rec = s.one_record(cursor);
    assert_eq!((rec.status.as_str(), rec.segments.len()), ("ok", 1));
    assert_eq!(
        rec.segments[0].gpa.0,
        two.gpa().0,
        "the ledger names the destination the guest gave"
    );
    let moved: Vec<(u64, u32)> = rec
        .moved_to
        .iter()
        .flatten()
        .map(|s| (s.gpa.0, s.len))
        .collect();
    assert_eq!(
        moved,
        [(two.gpa().0 + LEN as u64, LEN as u32)],
        "and the memory the data went to"
    );

    // A write from the first of two pages: the disk gets the second.
    let (mine, next) = (pattern(19, LEN), pattern(20, LEN));
    two.write_at(0, &mine).unwrap();
    two.write_at(LEN, &next).unwrap();
    let c = run(fe.queue(0).unwrap(), RequestType::Out, 8, &[first]);
    assert_eq!(status(&c), StatusByte::OK);
    assert!(
        s.disk_at(8, LEN) == next,
        "the disk has the next page's data"
    );
}

// ---------------------------------------------------------------------------
// Rules from the command line and from files
// ---------------------------------------------------------------------------

#[test]
fn the_documented_cli_delay_delays_every_read_by_a_second() {
    let s = Served::on_disk(&["--fault", "op=read,action=delay,ms=1000"]);
    let rules = s.daemon.engine().faults().rules();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].spec.to_string(), "op=read,action=delay,ms=1000");
    let mut fe = s.connect(1);
    let cursor = s.cursor();
    for sector in [0, 4096] {
        let start = Instant::now();
        assert_eq!(read_status(&mut fe, sector, LEN), StatusByte::OK);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(1),
            "a read at {sector} took {took:?}"
        );
    }
    let (st, _) = write(&mut fe, 0, 8, &pattern(21, LEN));
    assert_eq!(st, StatusByte::OK);
    // In arrival order: a delayed read is recorded after the guest is told,
    // so the write that follows may be recorded first.
    let mut records = s.wait_records(cursor, 3);
    records.sort_by_key(|r| r.request);
    let waits: Vec<String> = records.into_iter().map(|r| r.wait).collect();
    assert_eq!(waits, ["delay 1000 ms", "delay 1000 ms", "none"]);
}

#[test]
fn a_fault_file_sets_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("faults.toml");
    fs::write(
        &file,
        "[[rule]]\nop = \"read\"\nlba = \"0-7\"\nnth = 2\naction = \"hold\"\n\n\
         [[rule]]\nop = \"write\"\naction = \"error\"\nstatus = \"unsupp\"\n",
    )
    .unwrap();
    let s = Served::on_disk(&["--faults", file.to_str().unwrap()]);
    let mut fe = s.connect(1);
    assert_eq!(read_status(&mut fe, 0, 512), StatusByte::OK);
    let buf = filled(&fe, 512, PREFILL);
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 7, &[seg(&buf)]);
    let p = s.wait_parked(1).remove(0);
    assert_eq!((p.lba, p.held), (7, true), "the second read of 0-7 is held");
    assert_eq!(
        read_status(&mut fe, 0, 512),
        StatusByte::OK,
        "the third is not"
    );
    assert_eq!(write(&mut fe, 0, 0, &[1; 512]).0, StatusByte::UNSUPP);
    s.daemon.release(Release::All);
    let c = fe.queue(0).unwrap().wait_for(id, SOON).unwrap();
    assert_eq!(status(&c), StatusByte::OK);
}

/// Runs the real `dmaprobe serve` with `args` and expects it to refuse to start:
/// non-zero, soon, no socket bound. Returns its stderr.
fn serve_refuses(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("blk.sock");
    let mut child = Process::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(["--mem", "16M"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(dir.path().join("err")).unwrap())
        .spawn()
        .expect("spawn dmaprobe serve");
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dmaprobe serve {args:?} is still running");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stderr = fs::read_to_string(dir.path().join("err")).unwrap();
    assert!(!status.success(), "{args:?}: {status}; {stderr}");
    assert!(!socket.exists(), "{args:?}: the socket was bound");
    assert!(
        !Path::new(&format!("{}.ctl", socket.display())).exists(),
        "{args:?}: the control socket was bound"
    );
    stderr
}

#[test]
fn a_bad_fault_rule_stops_serve_before_it_binds_and_says_where() {
    for (rule, column, why) in [
        ("op=read,action=delay,ms=abc", "column 22", "not a number"),
        ("op=read,action=bogus", "column 9", "unknown action"),
        ("op=read,colour=red,action=hold", "column 9", "unknown key"),
        ("op=reed,action=hold", "column 1", "unknown op"),
        ("op=read,ms=5", "column 1", "no action"),
    ] {
        let stderr = serve_refuses(&["--fault", "op=write,action=hold", "--fault", rule]);
        assert!(
            stderr.contains(rule) && stderr.contains(column) && stderr.contains(why),
            "{rule}: expected the rule, {column:?} and {why:?} in:\n{stderr}"
        );
    }
}

#[test]
fn a_bad_fault_file_stops_serve_before_it_binds_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let bad_rule = write(
        "bad-rule.toml",
        "[[rule]]\naction = \"hold\"\n\n[[rule]]\nop = \"read\"\naction = \"bogus\"\n",
    );
    let stderr = serve_refuses(&["--faults", &bad_rule]);
    assert!(
        stderr.contains("rule 2") && stderr.contains("bogus") && stderr.contains("bad-rule.toml"),
        "{stderr}"
    );

    let bad_value = write(
        "bad-value.toml",
        "[[rule]]\naction = \"delay\"\nms = \"1-x\"\n",
    );
    let stderr = serve_refuses(&["--faults", &bad_value]);
    assert!(
        stderr.contains("rule 1") && stderr.contains("column") && stderr.contains("not a number"),
        "{stderr}"
    );

    let syntax = write("syntax.toml", "[[rule]]\naction = \"hold\"\n[[rule]\n");
    let stderr = serve_refuses(&["--faults", &syntax]);
    assert!(
        stderr.contains("syntax.toml") && stderr.contains("line 3"),
        "{stderr}"
    );

    let stderr = serve_refuses(&["--faults", "/nonexistent/faults.toml"]);
    assert!(stderr.contains("/nonexistent/faults.toml"), "{stderr}");
}
