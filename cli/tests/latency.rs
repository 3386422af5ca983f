//! The media latency model (`--latency`) seen through the real vhost-user
//! protocol: an in-process daemon driven by the frontend driver.
//!
//! Model times here are tens to hundreds of milliseconds, so that lower
//! bounds are exact (a request is never completed before its time) and the
//! few upper bounds keep a wide margin on a loaded 2-core machine.

mod common;

use common::served::Served;

use std::thread;
use std::time::{Duration, Instant};

use backend::vhost_user_driver::{
    BlkRequest, Buffer, ChainId, DiscardRange, Queue, RequestType, Sector, Segment, StatusByte,
};
use dma::schedule::Release;

/// How long anything that should happen soon may take on a loaded machine.
const SOON: Duration = Duration::from_secs(10);
const LEN: usize = 4096;
const MS: Duration = Duration::from_millis(1);

/// What only these tests ask of the in-process daemon.
impl Served {
    fn delayed_by_latency(&self) -> u64 {
        self.daemon.counters().snapshot().latency_delayed
    }

    fn status(&self) -> serde_json::Value {
        self.daemon.state().status()
    }

    /// Waits until exactly one request is parked; returns whether it is held.
    fn wait_parked_one_held(&self) -> bool {
        let deadline = Instant::now() + SOON;
        loop {
            let parked = self.daemon.parked();
            if let [one] = parked.as_slice() {
                return one.held;
            }
            assert!(Instant::now() < deadline, "parked: {parked:?}");
            thread::sleep(MS);
        }
    }
}

/// How long `f` takes.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

fn submit_read(q: &mut Queue, sector: u64, buf: &Buffer) -> ChainId {
    let seg = [Segment::of(buf).expect("buffer fits a descriptor")];
    q.submit(&BlkRequest {
        kind: RequestType::In,
        sector: Sector(sector),
        data: &seg,
    })
    .expect("submit")
}

#[test]
fn every_media_command_takes_its_time_and_get_id_none() {
    let s = Served::start(&[
        "--latency",
        "read=60ms,write=30ms,flush=90ms,discard=90ms,jitter=0",
    ]);
    assert_eq!(
        s.status()["latency"],
        "read=60ms,write=30ms,flush=90ms,discard=90ms,read-bw=unlimited,\
         write-bw=unlimited,depth=unlimited,jitter=0%"
    );
    let mut fe = s.connect(1);
    let data = common::pattern(1, LEN);
    let (st, took) = timed(|| fe.write(0, Sector(8), &data).expect("write"));
    assert_eq!(st, StatusByte::OK);
    assert!(took >= 30 * MS, "write took {took:?}");
    let ((st, back), took) = timed(|| fe.read(0, Sector(8), LEN).expect("read"));
    assert_eq!(st, StatusByte::OK);
    assert!(back == data, "the data arrives after the media time");
    assert!(took >= 60 * MS, "read took {took:?}");
    let (st, took) = timed(|| fe.flush(0).expect("flush"));
    assert_eq!(st, StatusByte::OK);
    assert!(took >= 90 * MS, "flush took {took:?}");
    let range = DiscardRange {
        sector: Sector(64),
        num_sectors: 8,
        flags: 0,
    };
    let (st, took) = timed(|| fe.discard(0, &[range]).expect("discard"));
    assert_eq!(st, StatusByte::OK);
    assert!(took >= 90 * MS, "discard took {took:?}");
    let (st, took) = timed(|| fe.write_zeroes(0, &[range]).expect("write-zeroes"));
    assert_eq!(st, StatusByte::OK);
    assert!(took >= 90 * MS, "write-zeroes took {took:?}");
    assert_eq!(s.delayed_by_latency(), 5);
    // GET_ID is the controller's answer, not the media's: no time added.
    let ((st, _), _) = timed(|| fe.get_id(0).expect("get-id"));
    assert_eq!(st, StatusByte::OK);
    assert_eq!(s.delayed_by_latency(), 5);
}

#[test]
fn requests_beyond_the_depth_wait_for_a_slot() {
    let s = Served::start(&["--latency", "read=150ms,depth=2"]);
    let mut fe = s.connect(1);
    let bufs: Vec<Buffer> = (0..4)
        .map(|_| fe.ram().alloc_aligned(LEN, 4096).expect("alloc"))
        .collect();
    let q = fe.queue(0).unwrap();
    let start = Instant::now();
    let ids: Vec<ChainId> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| submit_read(q, 8 * i as u64, b))
        .collect();
    q.kick().expect("kick");
    let mut done: Vec<Duration> = ids
        .into_iter()
        .map(|id| {
            let c = q.wait_for(id, SOON).expect("the read completes");
            assert_eq!(c.status(), Some(StatusByte::OK));
            start.elapsed()
        })
        .collect();
    done.sort();
    // Two served at once, the other two after them.
    assert!(done[0] >= 150 * MS, "{done:?}");
    assert!(done[1] < 280 * MS, "the second slot was not used: {done:?}");
    assert!(done[2] >= 300 * MS, "the depth did not hold: {done:?}");
    assert_eq!(s.delayed_by_latency(), 4);
}

#[test]
fn a_delay_adds_to_the_media_time_and_a_hold_counts_from_its_release() {
    let s = Served::start(&["--latency", "read=200ms"]);
    let mut fe = s.connect(1);

    s.rule("op=read,lba=8,action=delay,ms=150");
    let ((st, _), took) = timed(|| fe.read(0, Sector(8), LEN).expect("read"));
    assert_eq!(st, StatusByte::OK);
    assert!(took >= 350 * MS, "delay + media took {took:?}");

    s.rule("op=read,lba=16,action=hold");
    let buf = fe.ram().alloc_aligned(LEN, 4096).expect("alloc");
    let q = fe.queue(0).unwrap();
    let id = submit_read(q, 16, &buf);
    q.kick().expect("kick");
    assert!(s.wait_parked_one_held(), "the read is held");
    thread::sleep(100 * MS);
    let released = Instant::now();
    assert_eq!(s.daemon.release(Release::All), 1);
    // Released, it waits for the media: parked again, no longer held.
    assert!(
        !s.wait_parked_one_held(),
        "after release the read waits for the media"
    );
    let q = fe.queue(0).unwrap();
    let c = q.wait_for(id, SOON).expect("the released read completes");
    assert_eq!(c.status(), Some(StatusByte::OK));
    let after = released.elapsed();
    assert!(after >= 200 * MS, "completed {after:?} after its release");
    assert_eq!(s.delayed_by_latency(), 2);
}

#[test]
fn a_stopping_queue_completes_a_held_request_without_media_time() {
    let s = Served::start(&["--latency", "read=10s"]);
    let mut fe = s.connect(1);
    s.rule("op=read,action=hold");
    let buf = fe.ram().alloc_aligned(LEN, 4096).expect("alloc");
    let q = fe.queue(0).unwrap();
    submit_read(q, 0, &buf);
    q.kick().expect("kick");
    assert!(s.wait_parked_one_held());
    let (_, took) = timed(|| fe.stop_queue(0).expect("GET_VRING_BASE"));
    assert!(took < 5 * 1000 * MS, "stopping took {took:?}");
    assert!(s.daemon.parked().is_empty(), "{:?}", s.daemon.parked());
    assert_eq!(s.delayed_by_latency(), 0);
}

#[test]
fn mailbox_io_takes_no_latency() {
    let s = Served::start(&["--latency", "read=2s", "--mailbox"]);
    let mut fe = s.connect(1);
    let capacity = fe.get_config().expect("config").capacity_bytes();
    let mailbox = wire::mailbox::mailbox_offset(capacity).expect("a mailbox");
    let ((st, _), took) = timed(|| fe.read(0, Sector(mailbox / 512), LEN).expect("read"));
    assert_eq!(st, StatusByte::OK);
    assert!(took < 2 * 1000 * MS, "a mailbox read took {took:?}");
    assert_eq!(s.delayed_by_latency(), 0);
}

#[test]
fn instant_is_the_default_and_adds_nothing() {
    let s = Served::start(&[]);
    assert_eq!(s.status()["latency"], "instant");
    let mut fe = s.connect(1);
    assert_eq!(
        fe.write(0, Sector(0), &[7; LEN]).expect("write"),
        StatusByte::OK
    );
    assert_eq!(fe.read(0, Sector(0), LEN).expect("read").0, StatusByte::OK);
    assert_eq!(fe.flush(0).expect("flush"), StatusByte::OK);
    assert_eq!(s.delayed_by_latency(), 0);
    assert!(s.daemon.parked().is_empty());
}
