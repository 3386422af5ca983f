//! The DMA engine seen through the real vhost-user protocol: an in-process
//! daemon (`backend::serve::Daemon`) on a socket in a temp dir, driven by the
//! frontend driver (`backend::vhost_user_driver`), with fault rules, checks and the
//! ledger set as `dmaprobe serve` would set them.
//!
//! Timing: lower bounds are exact (a delay is never cut short); upper bounds
//! are generous, for a loaded 2-core machine. The one deliberate sleep is the
//! probe of a delayed read's buffer while it is in flight, and every such
//! probe is confirmed afterwards with `Daemon::parked()`.

mod common;

use common::child::submit;

use common::pattern;
use common::served::Served;

use std::thread;
use std::time::{Duration, Instant};

use backend::vhost_user_driver::{
    BlkFrontend, BlkRequest, Buffer, Completion, RequestType, Sector, Segment, StatusByte,
};
use dma::fault::Action;
use dma::ledger::RequestRecord;
use dma::schedule::{ParkedInfo, Release};
use dma::{Finding, FindingKind, Op, ReqId, RuleSpec};

/// How long anything that should happen soon may take on a loaded machine.
const SOON: Duration = Duration::from_secs(5);
/// Bytes per request in most tests: one page.
const LEN: usize = 4096;
/// What the frontend writes into a read's destination before submitting it.
const PREFILL: u8 = 0x5c;

/// What only these tests ask of the in-process daemon.
impl Served {
    /// Waits until exactly one request is parked and returns it.
    fn wait_parked_one(&self) -> ParkedInfo {
        self.wait_parked(1).remove(0)
    }

    fn findings_of(&self, id: ReqId) -> Vec<Finding> {
        self.findings()
            .into_iter()
            .filter(|f| f.request == id)
            .collect()
    }

    /// Waits until the ledger holds the record of request `id`.
    fn wait_record(&self, id: ReqId) -> RequestRecord {
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(r) = self.records().into_iter().find(|r| r.request == id) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "request {id} never reached the ledger: {:?}",
                self.records()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A fresh destination of [`LEN`] bytes filled with [`PREFILL`].
fn prefilled(fe: &BlkFrontend) -> Buffer {
    let buf = fe.ram().alloc_aligned(LEN, 4096).expect("alloc");
    buf.fill(PREFILL).expect("fill");
    buf
}

fn status(c: &Completion) -> StatusByte {
    c.status().expect("a blk completion")
}

fn write_ok(fe: &mut BlkFrontend, queue: u16, sector: u64, data: &[u8]) {
    assert_eq!(
        fe.write(queue, Sector(sector), data).expect("write"),
        StatusByte::OK
    );
}

/// Whether `buf` is request `id`'s canary: every 16-byte unit, as the canary
/// module decodes it, names the request and the unit's own offset.
fn is_canary_of(buf: &[u8], id: ReqId) -> bool {
    let units: Vec<(usize, ReqId, u32)> = dma::canary::find_canaries(buf)
        .filter(|&(pos, _, _)| pos % 16 == 0)
        .collect();
    units.len() == buf.len() / 16
        && units
            .iter()
            .all(|&(pos, unit_id, off)| unit_id == id && u32::try_from(pos) == Ok(off))
}

#[test]
fn the_cli_fault_rule_parses() {
    let c = common::serve_config(&[
        "--socket",
        "/tmp/unused.sock",
        "--mem",
        "16M",
        "--fault",
        "op=read,action=delay,ms=1000",
        "--canary",
    ]);
    assert_eq!(c.faults.len(), 1);
    assert_eq!(c.faults[0].op, Some(Op::Read));
    assert_eq!(
        c.faults[0].action,
        Action::Delay {
            min_ms: 1000,
            max_ms: 1000
        }
    );
    assert_eq!(
        c.faults[0],
        RuleSpec::parse("op=read,action=delay,ms=1000").unwrap()
    );
    assert!(c.dma.checks.canary && !c.dma.checks.snapshot && !c.dma.checks.ledger);
}

/// A read delayed by 300 ms: completes no earlier; while it waits its
/// destination holds what was there (or the canary); after, the data.
fn delayed_read(s: &Served, canary: bool) {
    let mut fe = s.connect(1);
    let data = pattern(1, LEN);
    write_ok(&mut fe, 0, 64, &data);
    let buf = prefilled(&fe);

    let start = Instant::now();
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 64, &buf);
    // Arrived (so a canary would be in place), then probed at ~100 ms.
    let parked = s.wait_parked_one();
    assert_eq!((parked.op, parked.lba, parked.held), (Op::Read, 64, false));
    thread::sleep(Duration::from_millis(100).saturating_sub(start.elapsed()));
    let during = buf.read().unwrap();
    // Still parked after the probe, so the probe saw the buffer before the DMA.
    let still: Vec<ReqId> = s.daemon.parked().iter().map(|p| p.request).collect();
    assert_eq!(still, vec![parked.request], "in flight at the probe");
    if canary {
        assert!(
            is_canary_of(&during, parked.request),
            "canary on: the destination holds the canary while the read waits: {:02x?}",
            &during[..32]
        );
    } else {
        assert!(
            during.iter().all(|&b| b == PREFILL),
            "canary off: the destination is untouched while the read waits: {:02x?}",
            &during[..32]
        );
    }
    assert_ne!(during, data, "the data landed before its delay was over");

    let done = fe.queue(0).unwrap().wait_for(id, SOON).expect("completes");
    let elapsed = start.elapsed();
    assert_eq!(status(&done), StatusByte::OK);
    assert!(
        elapsed >= Duration::from_millis(300),
        "completed after {elapsed:?}, before its 300 ms delay"
    );
    assert!(elapsed < SOON, "completed after {elapsed:?}");
    assert!(buf.read().unwrap() == data, "the data after completion");
    assert!(s.daemon.parked().is_empty());
    assert_eq!(
        s.findings(),
        Vec::new(),
        "an untouched destination is no finding"
    );
}

#[test]
fn a_delayed_read_lands_only_after_its_delay() {
    let s = Served::start(&[]);
    s.rule("op=read,action=delay,ms=300");
    delayed_read(&s, false);
}

#[test]
fn a_delayed_read_with_canary_shows_the_canary_until_the_dma() {
    let s = Served::start(&["--fault", "op=read,action=delay,ms=300", "--canary"]);
    delayed_read(&s, true);
}

#[test]
fn a_held_read_blocks_neither_its_queue_nor_another() {
    let s = Served::start(&["--queues", "2"]);
    let mut fe = s.connect(2);
    let (held_data, q0_data, q1_data) = (pattern(2, LEN), pattern(3, LEN), pattern(4, LEN));
    write_ok(&mut fe, 0, 80, &held_data);
    write_ok(&mut fe, 0, 88, &q0_data);
    write_ok(&mut fe, 1, 96, &q1_data);
    s.rule("op=read,lba=80,action=hold");

    let (held_buf, q0_buf, q1_buf) = (prefilled(&fe), prefilled(&fe), prefilled(&fe));
    let held = submit(fe.queue(0).unwrap(), RequestType::In, 80, &held_buf);
    let p = s.wait_parked_one();
    assert_eq!(
        (p.op, p.queue, p.lba, p.len, p.held),
        (Op::Read, 0, 80, LEN as u64, true)
    );

    // Submitted after the held one, on the same queue and on another.
    let later = submit(fe.queue(0).unwrap(), RequestType::In, 88, &q0_buf);
    let other = submit(fe.queue(1).unwrap(), RequestType::In, 96, &q1_buf);
    let c = fe.queue(1).unwrap().wait_for(other, SOON).expect("q1 read");
    assert_eq!(status(&c), StatusByte::OK);
    assert!(q1_buf.read().unwrap() == q1_data);
    let mut order = Vec::new();
    let q0 = fe.queue(0).unwrap();
    let c = q0.wait_for(later, SOON).expect("the later q0 read");
    order.push(c.chain());
    assert_eq!(status(&c), StatusByte::OK);
    assert!(q0_buf.read().unwrap() == q0_data);

    // The held one is still parked, and has not been touched.
    let still = s.daemon.parked();
    assert_eq!(still.len(), 1);
    assert_eq!((still[0].request, still[0].held), (p.request, true));
    let mut none = Vec::new();
    assert_eq!(q0.poll(&mut none).unwrap(), 0, "{none:?}");
    assert_eq!(q0.in_flight(), 1);
    assert!(held_buf.read().unwrap().iter().all(|&b| b == PREFILL));

    assert_eq!(s.daemon.release(Release::All), 1);
    let q0 = fe.queue(0).unwrap();
    let c = q0
        .wait_for(held, SOON)
        .expect("the held read after release");
    order.push(c.chain());
    assert_eq!(status(&c), StatusByte::OK);
    assert_eq!(
        order,
        vec![Some(later), Some(held)],
        "completions out of submission order"
    );
    assert!(held_buf.read().unwrap() == held_data);
    assert!(s.daemon.parked().is_empty());
}

#[test]
fn a_write_source_changed_while_held_is_found_and_the_change_is_written() {
    let s = Served::start(&["--snapshot"]);
    s.rule("op=write,lba=200-201,action=hold");
    let mut fe = s.connect(1);
    let (before, after) = (pattern(5, LEN), pattern(6, LEN));

    // Changed while held: a finding, and the disk gets the changed bytes.
    let src = fe.ram().alloc_aligned(LEN, 4096).unwrap();
    src.write_at(0, &before).unwrap();
    let id = submit(fe.queue(0).unwrap(), RequestType::Out, 200, &src);
    let p = s.wait_parked_one();
    assert_eq!((p.op, p.lba, p.held), (Op::Write, 200, true));
    src.write_at(0, &after).unwrap();
    assert_eq!(s.daemon.release(Release::One(p.request)), 1);
    let c = fe.queue(0).unwrap().wait_for(id, SOON).expect("the write");
    assert_eq!(status(&c), StatusByte::OK);
    let found = s.findings_of(p.request);
    assert_eq!(found.len(), 1, "{found:?}");
    let f = &found[0];
    assert_eq!(f.finding, FindingKind::SourceChangedDuringDma);
    assert_eq!(f.finding.name(), "source-changed-during-dma");
    assert!(!f.info);
    assert_eq!((f.op, f.queue, f.lba), (Op::Write, 0, 200));
    assert_eq!((f.gpa.0, f.len), (src.gpa().0, LEN as u64));
    let (st, disk) = fe.read(0, Sector(200), LEN).unwrap();
    assert_eq!(st, StatusByte::OK);
    assert!(
        disk == after,
        "the disk holds what the source held at the end of the wait"
    );

    // Unchanged while held: no finding.
    src.write_at(0, &before).unwrap();
    let id = submit(fe.queue(0).unwrap(), RequestType::Out, 201, &src);
    let p = s.wait_parked_one();
    assert_eq!(s.daemon.release(Release::All), 1);
    let c = fe.queue(0).unwrap().wait_for(id, SOON).expect("the write");
    assert_eq!(status(&c), StatusByte::OK);
    assert_eq!(s.findings_of(p.request), Vec::new());
    assert!(fe.read(0, Sector(201), LEN).unwrap().1 == before);
}

/// Data a program might put in a page it reused: no zeros, no 0xaa, no canary.
fn other_data(len: usize) -> Vec<u8> {
    b"a page of the program's own data"
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// How the frontend overwrites a held read's destination.
struct Reuse {
    at: usize,
    bytes: Vec<u8>,
    class: Option<&'static str>,
}

#[test]
fn a_read_destination_reused_while_held_is_found_and_classified() {
    let s = Served::start(&["--canary"]);
    let mut fe = s.connect(1);
    let data = pattern(7, LEN);
    write_ok(&mut fe, 0, 300, &data);
    s.rule("op=read,action=hold");
    let other = other_data(512);
    let cases = [
        // Freed and cleared (init_on_free): the whole page.
        Reuse {
            at: 0,
            bytes: vec![0; LEN],
            class: Some("zeros"),
        },
        // Freed and poisoned: the second half.
        Reuse {
            at: 2048,
            bytes: vec![0xaa; 2048],
            class: Some("free-poison"),
        },
        // Reused for something else: 512 bytes in the middle, on a canary unit
        // boundary (the test after this one starts inside a unit).
        Reuse {
            at: 1024,
            bytes: other,
            class: Some("other-data"),
        },
        // Left alone: no finding.
        Reuse {
            at: 0,
            bytes: Vec::new(),
            class: None,
        },
    ];
    for case in &cases {
        let buf = prefilled(&fe);
        let id = submit(fe.queue(0).unwrap(), RequestType::In, 300, &buf);
        let p = s.wait_parked_one();
        let canary = buf.read().unwrap();
        assert!(
            is_canary_of(&canary, p.request),
            "the canary is in place while held: {:02x?}",
            &canary[..32]
        );
        buf.write_at(case.at, &case.bytes).unwrap();
        let now = buf.read().unwrap();
        let first = canary.iter().zip(&now).position(|(a, b)| a != b);
        let changed = canary.iter().zip(&now).filter(|(a, b)| a != b).count() as u64;

        assert_eq!(s.daemon.release(Release::One(p.request)), 1);
        let c = fe.queue(0).unwrap().wait_for(id, SOON).expect("the read");
        assert_eq!(status(&c), StatusByte::OK);
        assert!(buf.read().unwrap() == data, "the data lands all the same");

        let found = s.findings_of(p.request);
        let Some(class) = case.class else {
            assert_eq!(found, Vec::new(), "an untouched canary is no finding");
            continue;
        };
        assert_eq!(found.len(), 1, "{class}: {found:?}");
        let f = &found[0];
        assert_eq!(f.finding, FindingKind::BufferReusedDuringDma, "{class}");
        assert_eq!(f.finding.name(), "buffer-reused-during-dma");
        assert_eq!(f.class.as_deref(), Some(class));
        assert_eq!((f.op, f.queue, f.lba), (Op::Read, 0, 300));
        assert_eq!(f.bytes, changed, "{class}: bytes changed");
        let first = first.expect("the overwrite changed the canary") as u64;
        assert_eq!(f.gpa.0, buf.gpa().0 + first, "{class}: where");
        assert_eq!(f.other_request, None);
    }
}

// Regression: before the canary's check byte, the unit at 992 below (its magic
// intact, its id half overwritten) was taken for another request's canary:
// class "other-canary" with a made-up other_request.
#[test]
fn other_data_written_from_the_middle_of_a_canary_unit_is_other_data() {
    let s = Served::start(&["--canary"]);
    let mut fe = s.connect(1);
    s.rule("op=read,action=hold");
    let buf = prefilled(&fe);
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 0, &buf);
    let p = s.wait_parked_one();
    // Offset 1000 is byte 8 of the unit at 992: that unit keeps its magic and
    // half of its id; the program's bytes replace the rest.
    buf.write_at(1000, &other_data(512)).unwrap();
    assert_eq!(s.daemon.release(Release::All), 1);
    let c = fe.queue(0).unwrap().wait_for(id, SOON).expect("the read");
    assert_eq!(status(&c), StatusByte::OK);
    let found = s.findings_of(p.request);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].class.as_deref(), found[0].other_request),
        (Some("other-data"), None),
        "request {} (the only one in flight): {:?}",
        p.request,
        found[0]
    );
}

#[test]
fn stopping_a_queue_completes_its_held_request() {
    let s = Served::start(&["--ledger", "/dev/null", "--queues", "2"]);
    let mut fe = s.connect(2);
    let data = pattern(8, LEN);
    write_ok(&mut fe, 0, 400, &data);
    s.rule("op=read,action=hold");
    let (buf, other_buf) = (prefilled(&fe), prefilled(&fe));
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 400, &buf);
    let other = submit(fe.queue(1).unwrap(), RequestType::In, 400, &other_buf);
    let parked = s.wait_parked(2);
    assert!(parked.iter().all(|p| p.held), "{parked:?}");
    let p = parked
        .iter()
        .find(|p| p.queue == 0)
        .expect("q0's read")
        .clone();

    // Two chains have been made available: the write before, and the held read.
    assert_eq!(fe.stop_queue(0).expect("GET_VRING_BASE"), 2);
    // GET_VRING_BASE has been answered: the used entry must be there already.
    let mut used = Vec::new();
    fe.queue(0).unwrap().poll(&mut used).unwrap();
    assert_eq!(used.len(), 1, "the held request's used entry: {used:?}");
    assert_eq!(used[0].chain(), Some(id));
    assert_eq!(status(&used[0]), StatusByte::OK);
    assert_eq!(used[0].len, LEN as u32 + 1);
    assert!(buf.read().unwrap() == data);
    let r = s.wait_record(p.request);
    assert_eq!((r.status.as_str(), r.wait.as_str()), ("ok", "hold"));

    // The other queue's held read is not touched by stopping queue 0.
    let left = s.daemon.parked();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!((left[0].queue, left[0].held), (1, true));
    assert!(other_buf.read().unwrap().iter().all(|&b| b == PREFILL));
    assert_eq!(s.daemon.release(Release::Queue(1)), 1);
    let c = fe
        .queue(1)
        .unwrap()
        .wait_for(other, SOON)
        .expect("q1's read");
    assert_eq!(status(&c), StatusByte::OK);
    assert!(other_buf.read().unwrap() == data);
    s.assert_alive();
}

#[test]
fn a_frontend_that_leaves_with_a_held_request_does_not_stop_the_daemon() {
    let s = Served::start(&["--ledger", "/dev/null"]);
    s.rule("op=read,nth=1,action=hold");
    let mut fe = s.connect(1);
    let data = pattern(9, LEN);
    write_ok(&mut fe, 0, 500, &data);
    let buf = prefilled(&fe);
    submit(fe.queue(0).unwrap(), RequestType::In, 500, &buf);
    let p = s.wait_parked_one();
    drop(fe);

    let r = s.wait_record(p.request);
    assert_eq!(r.status, "abandoned");
    assert_eq!(r.dma_ns, None, "no DMA into a frontend that has gone");
    assert!(buf.read().unwrap().iter().all(|&b| b == PREFILL));
    s.assert_alive();

    let mut fe = s.connect(1);
    let (st, back) = fe.read(0, Sector(500), LEN).expect("a read");
    assert_eq!(st, StatusByte::OK);
    assert!(back == data);
    write_ok(&mut fe, 0, 508, &pattern(10, LEN));
    assert!(s.daemon.parked().is_empty());
    s.assert_alive();
}

/// (queue, op, sector, bytes): requests on both queues, all ops with data and a flush.
const MIX: [(u16, RequestType, u64, usize); 5] = [
    (0, RequestType::Out, 600, LEN),
    (1, RequestType::In, 600, LEN),
    (1, RequestType::Out, 700, 512),
    (0, RequestType::In, 700, 512),
    (0, RequestType::Flush, 0, 0),
];

fn run_mix(s: &Served) {
    let mut fe = s.connect(2);
    let start = Instant::now();
    for (i, &(q, kind, sector, len)) in MIX.iter().enumerate() {
        let queue = fe.queue(q).unwrap();
        let c = if len == 0 {
            let id = queue
                .submit(&BlkRequest {
                    kind,
                    sector: Sector(sector),
                    data: &[],
                })
                .unwrap();
            queue.kick().unwrap();
            queue.wait_for(id, SOON)
        } else {
            let buf = queue.ram().alloc(len).unwrap();
            buf.write_at(0, &pattern(20 + i as u64, len)).unwrap();
            let id = submit(queue, kind, sector, &buf);
            queue.wait_for(id, SOON)
        }
        .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(status(&c), StatusByte::OK, "request {i}");
        assert!(s.daemon.parked().is_empty());
    }
    assert!(start.elapsed() < SOON, "{:?}", start.elapsed());
}

#[test]
fn with_everything_off_requests_complete_at_once_and_leave_no_trace() {
    let s = Served::start(&["--queues", "2"]);
    assert_eq!(s.daemon.engine().checks(), dma::Checks::default());
    assert!(s.daemon.engine().faults().is_empty());
    run_mix(&s);
    assert_eq!(s.records(), Vec::new());
    assert_eq!(s.daemon.engine().ledger().len(), 0);
}

#[test]
fn with_the_ledger_on_every_request_is_recorded_in_order_of_its_steps() {
    let s = Served::start(&["--queues", "2", "--ledger", "/dev/null"]);
    assert!(s.daemon.engine().checks().ledger);
    run_mix(&s);
    let records = s.records();
    assert_eq!(records.len(), MIX.len(), "{records:?}");
    for (i, (r, &(q, kind, sector, len))) in records.iter().zip(&MIX).enumerate() {
        let op = match kind {
            RequestType::In => Op::Read,
            RequestType::Out => Op::Write,
            _ => Op::Flush,
        };
        assert_eq!(
            (r.op, r.queue, r.lba, r.len),
            (op, q, sector, len as u64),
            "request {i}"
        );
        assert_eq!((r.status.as_str(), r.wait.as_str()), ("ok", "none"));
        match r.dma_ns {
            Some(dma) => assert!(
                r.arrived_ns <= dma && dma <= r.completed_ns,
                "request {i}: {r:?}"
            ),
            None => assert!(op == Op::Flush && r.arrived_ns <= r.completed_ns, "{r:?}"),
        }
        assert_eq!(r.segments.len(), usize::from(len > 0));
    }
    assert_eq!(s.findings(), Vec::new());
}

/// A rule watches every read for ten minutes. A read whose eight descriptors
/// all name one 4 KiB buffer is served (the last descriptor's data stays) and
/// its pending watch covers that buffer once; with room for one pending
/// watch, the next read is served unwatched and counted. `ctl status` shows
/// both under `watches`.
#[test]
fn pending_watches_are_limited_and_shown_in_the_status() {
    let s = Served::start(&["--max-watches", "1", "--max-watched", "1G"]);
    let mut fe = s.connect(1);
    s.rule("op=read,action=watch,ms=600000");
    let watches = || s.daemon.state().status()["watches"].clone();
    let figures = |pending: u64, refused: u64| {
        serde_json::json!({
            "pending": pending,
            "pending_bytes": pending * LEN as u64,
            "refused": refused,
            "limits": {"watches": 1, "bytes": 1u64 << 30},
        })
    };
    assert_eq!(watches(), figures(0, 0));
    let data = pattern(30, 8 * LEN);
    write_ok(&mut fe, 0, 0, &data);

    let aliased = prefilled(&fe);
    let eight = [Segment::of(&aliased).expect("a descriptor"); 8];
    let q = fe.queue(0).unwrap();
    let request = BlkRequest {
        kind: RequestType::In,
        sector: Sector(0),
        data: &eight,
    };
    let id = q.submit(&request).expect("submit");
    q.kick().expect("kick");
    let c = q.wait_for(id, SOON).expect("the aliased read");
    assert_eq!((status(&c), c.len), (StatusByte::OK, 8 * LEN as u32 + 1));
    assert!(aliased.read().unwrap() == data[7 * LEN..]);
    assert_eq!(watches(), figures(1, 0), "one buffer watched, once");

    let other = prefilled(&fe);
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 0, &other);
    let c = fe
        .queue(0)
        .unwrap()
        .wait_for(id, SOON)
        .expect("the next read");
    assert_eq!(status(&c), StatusByte::OK);
    assert!(other.read().unwrap() == data[..LEN], "served all the same");
    assert_eq!(watches(), figures(1, 1));
    assert_eq!(s.findings(), Vec::new());
    s.assert_alive();
}
