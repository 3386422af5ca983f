//! What must hold whatever the guest or the host does to the daemon: requests
//! are completed or failed, never left dangling; the daemon stops cleanly.

mod common;

use common::child::*;
use common::pattern;

use std::time::{Duration, Instant};

use backend::frontend::{RequestType, Status};
use serde_json::Value;

#[test]
fn sigterm_with_requests_held_fails_them_and_exits_cleanly() {
    let mut s = Serve::start(&[]);
    let mut fe = s.connect(1);
    s.ctl_ok(&["add-rule", "action=hold"]);
    let read = prefilled(&fe);
    let write = prefilled(&fe);
    write.write_at(0, &pattern(1, LEN)).expect("fill");
    let q = fe.queue(0).expect("queue 0");
    let ids = [
        submit(q, RequestType::In, 0, &read),
        submit(q, RequestType::Out, 8, &write),
    ];
    s.wait_held(2);

    // SAFETY: kill(2) only sends a signal to the daemon we started.
    let sent = unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "kill");
    for id in ids {
        let done = q.wait_for(id, SOON).expect("the guest hears back");
        assert_eq!(status(&done), Status::IOERR);
    }
    let deadline = Instant::now() + SOON;
    let exit = loop {
        if let Some(st) = s.child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit}");
    // The held write never reached the media, and the ledger says why.
    assert_eq!(s.disk_at(8, LEN), vec![0; LEN]);
    let ledger = std::fs::read_to_string(s.dir.path().join("ledger.jsonl")).expect("ledger");
    let failed = ledger
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "request" && e["status"] == "failed-at-stop")
        .count();
    assert_eq!(failed, 2, "{ledger}");
}

#[test]
fn a_queue_stopped_under_large_reads_has_completed_every_one_it_took() {
    // Reads of 128 KiB go to the I/O pool, off the queue's thread; stopping
    // the queue must still find each one it took in the used ring.
    const BIG: usize = 128 << 10;
    let s = Serve::start(&[]);
    write_ok(&mut s.connect(1), 0, &pattern(2, BIG));
    for round in 0..20 {
        // A fresh frontend each round: its ring starts empty.
        let mut fe = s.connect(1);
        let bufs: Vec<_> = (0..24)
            .map(|_| fe.ram().alloc_aligned(BIG, 4096).expect("alloc"))
            .collect();
        let q = fe.queue(0).expect("queue 0");
        for b in &bufs {
            submit(q, RequestType::In, 0, b);
        }
        let taken = fe.stop_queue(0).expect("GET_VRING_BASE");
        let mut used = Vec::new();
        fe.queue(0).unwrap().poll(&mut used).unwrap();
        assert_eq!(
            used.len() as u32,
            taken,
            "round {round}: every request taken has its used entry"
        );
        assert!(used.iter().all(|c| status(c) == Status::OK));
    }
}
