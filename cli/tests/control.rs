//! The control plane end to end: a real `dmaprobe serve` child process on a disk
//! file in a temp dir, a frontend (`backend::vhost_user_driver`) on its vhost-user
//! socket, and the real `dmaprobe ctl` (or a raw UNIX stream) on its control
//! socket. Each test checks what the person at the terminal would see and what
//! the guest's requests then do.
//!
//! Timing: waits poll with deadlines; nothing depends on a sleep being long
//! enough, except the checks that a held request has *not* completed, which
//! can only err towards passing.

mod common;

use common::child::*;
use common::pattern;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use backend::vhost_user_driver::{BlkFrontend, Buffer, ChainId, RequestType, Sector, StatusByte};
use serde_json::{json, Value};

/// The longest request line the daemon accepts (control.rs `MAX_LINE`).
const MAX_LINE: usize = 1 << 20;

#[test]
fn a_read_held_by_a_ctl_rule_is_listed_and_released_by_id() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    let data = pattern(1, LEN);
    write_ok(&mut fe, 72, &data);
    assert_eq!(s.ctl_ok(&["held"]), "nothing is waiting\n");

    let added = s.ctl_ok(&["add-rule", "op=read,action=hold"]);
    let rule = added_rule_id(&added);
    let rules = s.ctl_ok(&["rules"]);
    assert_eq!(
        words(&rules),
        [
            rule.to_string().as_str(),
            "matched",
            "0",
            "fired",
            "0",
            "op=read,action=hold"
        ]
    );

    let buf = prefilled(&fe);
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 72, &buf);
    let held = s.wait_held(1);
    let h = &held[0];
    assert_eq!(
        (&h["op"], &h["queue"], &h["lba"], &h["len"], &h["held"]),
        (
            &json!("read"),
            &json!(0),
            &json!(72),
            &json!(LEN),
            &json!(true)
        ),
        "{h}"
    );
    let req = h["request"].as_u64().expect("a request id");
    // The person's view: one line with the id, queue, op, lba, length, state.
    let human = s.ctl_ok(&["held"]);
    assert_eq!(
        words(&human)[..8],
        [
            req.to_string().as_str(),
            "q0",
            "read",
            "lba",
            "72",
            "4096",
            "B",
            "held"
        ],
        "{human}"
    );
    assert_eq!(human.lines().count(), 1, "{human}");

    // Not completed while held.
    let q = fe.queue(0).unwrap();
    assert!(completes_within(q, id, Duration::from_millis(200)).is_none());
    assert!(buf.read().unwrap().iter().all(|&b| b == PREFILL));

    assert_eq!(s.ctl_ok(&["release", &req.to_string()]), "released 1\n");
    let c = fe.queue(0).unwrap().wait_for(id, SOON).expect("released");
    assert_eq!((status(&c), c.len), (StatusByte::OK, LEN as u32 + 1));
    assert!(buf.read().unwrap() == data, "the data after release");
    assert_eq!(s.ctl_ok(&["held"]), "nothing is waiting\n");
    assert_eq!(
        s.ctl_ok(&["release", &req.to_string()]),
        "released 0\n",
        "gone"
    );
    let rules = s.ctl_json(&["rules"]);
    assert_eq!(
        (&rules[0]["matched"], &rules[0]["fired"]),
        (&json!(1), &json!(1))
    );
}

#[test]
fn the_held_listing_lines_up_in_columns() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    s.ctl_ok(&["add-rule", "op=read,action=hold"]);
    let (a, b) = (prefilled(&fe), prefilled(&fe));
    submit(fe.queue(0).unwrap(), RequestType::In, 8, &a);
    submit(fe.queue(0).unwrap(), RequestType::In, 30000, &b);
    s.wait_held(2);
    let human = s.ctl_ok(&["held"]);
    let columns: Vec<Option<usize>> = human.lines().map(|l| l.find(" B ")).collect();
    assert_eq!(columns.len(), 2, "{human}");
    assert_eq!(
        columns[0], columns[1],
        "the length column of lba 8 and lba 30000:\n{human}"
    );
    s.ctl_ok(&["release", "--all"]);
}

#[test]
fn release_all_by_queue_and_by_match() {
    let s = Serve::start(&["--queues", "2"]);
    let mut fe = s.connect(2);
    for (i, sector) in [8u64, 16, 24, 32].into_iter().enumerate() {
        s.put_disk(sector, &pattern(10 + i as u64, LEN));
    }
    s.ctl_ok(&["add-rule", "op=read,action=hold"]);
    // (queue, sector)
    let reads = [(0u16, 8u64), (0, 16), (1, 24), (1, 32)];
    let bufs: Vec<Buffer> = reads.iter().map(|_| prefilled(&fe)).collect();
    let ids: Vec<ChainId> = reads
        .iter()
        .zip(&bufs)
        .map(|(&(q, sector), b)| submit(fe.queue(q).unwrap(), RequestType::In, sector, b))
        .collect();
    s.wait_held(4);
    let done = |fe: &mut BlkFrontend, i: usize| {
        let (q, sector) = reads[i];
        let c = fe
            .queue(q)
            .unwrap()
            .wait_for(ids[i], SOON)
            .expect("released");
        assert_eq!(status(&c), StatusByte::OK);
        assert!(
            bufs[i].read().unwrap() == s.disk_at(sector, LEN),
            "read {i}'s data"
        );
    };
    let pending = |fe: &mut BlkFrontend, i: usize| {
        let q = fe.queue(reads[i].0).unwrap();
        assert!(
            completes_within(q, ids[i], Duration::from_millis(100)).is_none(),
            "read {i} is still held"
        );
    };

    let bad = s.ctl_fails(&["release", "--match", "op=read,lba=x"]);
    assert!(bad.contains("lba") && bad.contains("not a number"), "{bad}");
    assert_eq!(
        s.ctl_ok(&["release", "--match", "op=read,lba=16-20"]),
        "released 1\n"
    );
    done(&mut fe, 1);
    pending(&mut fe, 0);
    assert_eq!(s.wait_held(3).len(), 3);

    assert_eq!(s.ctl_ok(&["release", "--queue", "1"]), "released 2\n");
    done(&mut fe, 2);
    done(&mut fe, 3);
    pending(&mut fe, 0);
    let left = s.wait_held(1);
    assert_eq!((&left[0]["queue"], &left[0]["lba"]), (&json!(0), &json!(8)));

    assert_eq!(s.ctl_ok(&["release", "--all"]), "released 1\n");
    done(&mut fe, 0);
    assert_eq!(s.ctl_ok(&["release", "--all"]), "released 0\n");
    let none = s.ctl_fails(&["release"]);
    assert!(none.contains("exactly one of"), "{none}");
}

#[test]
fn a_watch_after_completion_is_not_listed_as_a_waiting_request() {
    let s = Serve::start(&["--fault", "op=read,action=watch,ms=5000"]);
    let mut fe = s.connect(1);
    let (st, _) = fe.read(0, Sector(0), LEN).expect("a watched read");
    assert_eq!(st, StatusByte::OK);
    let st = s.ctl_json(&["status"]);
    let held = s.ctl_ok(&["held"]);
    assert_eq!(
        (&st["held"], &st["delayed"]),
        (&json!(0), &json!(0)),
        "the read completed; `ctl held` says:\n{held}"
    );
    assert_eq!(held, "nothing is waiting\n");
}

// ---------------------------------------------------------------------------
// Rules while traffic runs
// ---------------------------------------------------------------------------

/// One write of the traffic thread: when it was submitted, when it completed,
/// and its status.
struct Sent {
    submitted: Instant,
    completed: Instant,
    status: StatusByte,
}

#[test]
fn a_rule_added_while_traffic_runs_changes_what_follows() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    let log = Mutex::new(Vec::<Sent>::new());
    let stop = AtomicBool::new(false);
    // Waits until at least `n` writes were submitted after `t`.
    let wait_writes_after = |t: Instant, n: usize| {
        let deadline = Instant::now() + SOON;
        loop {
            let count = log
                .lock()
                .unwrap()
                .iter()
                .filter(|w| w.submitted > t)
                .count();
            if count >= n {
                return;
            }
            assert!(Instant::now() < deadline, "traffic stalled");
            thread::sleep(Duration::from_millis(5));
        }
    };
    let (t0, t1, t2, t3) = thread::scope(|scope| {
        let q = fe.queue(0).unwrap();
        let traffic = scope.spawn(|| {
            // Write a new pattern, read it back; a failed write leaves the old one.
            let mut on_disk = vec![0u8; LEN];
            let src = q.ram().alloc(LEN).unwrap();
            let dst = q.ram().alloc(LEN).unwrap();
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let data = pattern(100 + i, LEN);
                src.write_at(0, &data).unwrap();
                let submitted = Instant::now();
                let id = submit(q, RequestType::Out, 200, &src);
                let c = q.wait_for(id, SOON).expect("a write");
                log.lock().unwrap().push(Sent {
                    submitted,
                    completed: Instant::now(),
                    status: status(&c),
                });
                if status(&c).is_ok() {
                    on_disk = data;
                }
                let id = submit(q, RequestType::In, 200, &dst);
                let c = q.wait_for(id, SOON).expect("a read");
                assert_eq!(status(&c), StatusByte::OK, "reads are never failed");
                assert!(dst.read().unwrap() == on_disk, "read {i} back");
            }
        });
        let start = Instant::now();
        wait_writes_after(start, 10);
        let t0 = Instant::now();
        let rule = added_rule_id(&s.ctl_ok(&["add-rule", "op=write,action=error"]));
        let t1 = Instant::now();
        wait_writes_after(t1, 10);
        let rules = s.ctl_json(&["rules"]);
        assert!(rules[0]["fired"].as_u64().unwrap() >= 10, "{rules}");
        let t2 = Instant::now();
        s.ctl_ok(&["remove-rule", &rule.to_string()]);
        let t3 = Instant::now();
        wait_writes_after(t3, 10);
        stop.store(true, Ordering::Relaxed);
        traffic.join().expect("the traffic thread");
        (t0, t1, t2, t3)
    });
    let log = log.into_inner().unwrap();
    let statuses = |pick: &dyn Fn(&Sent) -> bool| -> Vec<StatusByte> {
        log.iter().filter(|w| pick(w)).map(|w| w.status).collect()
    };
    let before = statuses(&|w| w.completed < t0);
    let during = statuses(&|w| w.submitted > t1 && w.completed < t2);
    let after = statuses(&|w| w.submitted > t3);
    assert!(before.len() >= 10 && during.len() >= 10 && after.len() >= 10);
    assert!(before.iter().all(|st| st.is_ok()), "before: {before:?}");
    assert!(
        during.iter().all(|&st| st == StatusByte::IOERR),
        "with the rule: {during:?}"
    );
    assert!(
        after.iter().all(|st| st.is_ok()),
        "after removal: {after:?}"
    );
    assert_eq!(s.ctl_ok(&["rules"]), "no rules\n");
    let gone = s.ctl_fails(&["remove-rule", "1"]);
    assert!(gone.contains("no rule 1"), "{gone}");
}

// ---------------------------------------------------------------------------
// Findings, the ledger, status, checks, zero page, tags
// ---------------------------------------------------------------------------

#[test]
fn findings_show_a_read_buffer_reused_while_held() {
    let s = Serve::start(&["--canary"]);
    let mut fe = s.connect(1);
    assert!(s.ctl_ok(&["findings"]).starts_with("no findings\n"));
    write_ok(&mut fe, 40, &pattern(2, LEN));
    s.ctl_ok(&["add-rule", "op=read,action=hold"]);
    let buf = prefilled(&fe);
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 40, &buf);
    let req = s.wait_held(1)[0]["request"].as_u64().unwrap();
    // The program gives the page away while the read is in flight: cleared.
    buf.fill(0).unwrap();
    s.ctl_ok(&["release", "--all"]);
    let c = fe.queue(0).unwrap().wait_for(id, SOON).expect("the read");
    assert_eq!(status(&c), StatusByte::OK);

    let human = s.ctl_ok(&["findings"]);
    let want = format!(
        "buffer-reused-during-dma req {req} read lba 40 gpa {:#x}:",
        buf.gpa().0
    );
    assert!(human.contains(&want), "expected {want:?} in:\n{human}");
    let f = s.ctl_json(&["findings"]);
    let list = f["findings"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{f}");
    assert_eq!(
        (&list[0]["finding"], &list[0]["request"], &list[0]["class"]),
        (
            &json!("buffer-reused-during-dma"),
            &json!(req),
            &json!("zeros")
        )
    );
    let next = f["next"].as_u64().unwrap();
    assert!(next > list[0]["seq"].as_u64().unwrap());
    let later = s.ctl_ok(&["findings", "--since", &next.to_string()]);
    assert!(later.starts_with("no findings\n"), "{later}");
    let status = s.ctl_json(&["status"]);
    assert_eq!(
        status["findings"]["buffer-reused-during-dma"], 1,
        "{status}"
    );
}

#[test]
fn the_ledger_pages_with_since_and_limit() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    for i in 0..5u64 {
        write_ok(&mut fe, 8 * i, &pattern(i, 512));
    }
    let mut seen = Vec::new();
    let mut cursor = 0;
    let mut pages = 0;
    loop {
        let page = s.ctl_json(&["ledger", "--since", &cursor.to_string(), "--limit", "2"]);
        let entries = page["entries"].as_array().unwrap().clone();
        let more = page["more"] == json!(true);
        pages += 1;
        assert!(entries.len() <= 2, "{page}");
        let next = page["next"].as_u64().unwrap();
        if let Some(last) = entries.last() {
            assert_eq!(next, last["seq"].as_u64().unwrap() + 1, "{page}");
        }
        seen.extend(entries);
        cursor = next;
        if !more {
            break;
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3, "5 entries in pages of 2");
    let seqs: Vec<u64> = seen.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let lbas: Vec<u64> = seen.iter().map(|e| e["lba"].as_u64().unwrap()).collect();
    assert_eq!(lbas, [0, 8, 16, 24, 32]);
    assert!(seen
        .iter()
        .all(|e| e["kind"] == "request" && e["op"] == "write" && e["status"] == "ok"));

    // The person's view: one JSON line per entry, then the cursor.
    let human = s.ctl_ok(&["ledger", "--since", "3", "--limit", "2"]);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 3, "{human}");
    for (line, seq) in lines[..2].iter().zip([3, 4]) {
        let e: Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(e["seq"], seq);
    }
    assert_eq!(lines[2], "next cursor: 5 (more)");
    assert_eq!(s.ctl_ok(&["ledger", "--since", "6"]), "next cursor: 6\n");
}

#[test]
fn a_ledger_page_of_limit_0_skips_nothing() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    for i in 0..3u64 {
        write_ok(&mut fe, 8 * i, &[1; 512]);
    }
    let out = s.ctl(&["--json", "ledger", "--since", "1", "--limit", "0"]);
    if !out.status.success() {
        return; // Refusing a limit of 0 is as good.
    }
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page["entries"], json!([]));
    assert!(
        page["next"].as_u64().unwrap() <= 1,
        "entries 1-3 were not returned, yet next is past them: {page}"
    );
}

#[test]
fn status_shows_the_counters_and_reset_clears_them() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    // Through --socket: ctl finds the control socket beside the vhost-user one.
    let out = ctl_at(&["--socket", s.socket.to_str().unwrap()], &["status"]);
    assert!(out.status.success(), "{}", texts(&out).1);
    assert!(texts(&out).0.starts_with("dmaprobe "));

    for i in 0..3 {
        write_ok(&mut fe, 8 * i, &[i as u8 + 1; 512]);
    }
    for _ in 0..2 {
        assert_eq!(fe.read(0, Sector(0), 512).unwrap().0, StatusByte::OK);
    }
    s.ctl_ok(&["add-rule", "lba=99,action=error"]);
    assert_eq!(fe.read(0, Sector(99), 512).unwrap().0, StatusByte::IOERR);

    let st = s.ctl_json(&["status"]);
    let c = &st["counters"];
    assert_eq!(
        (
            &c["requests"],
            &c["completed_ok"],
            &c["ioerr"],
            &c["injected"]
        ),
        (&json!(6), &json!(5), &json!(1), &json!(1)),
        "{st}"
    );
    assert_eq!((&st["connected"], &st["rules"]), (&json!(true), &json!(1)));
    let human = s.ctl_ok(&["status"]);
    for want in [
        "frontend connected",
        "requests 6  ok 5  ioerr 1  unsupp 0  no-status 0  injected 1  media errors 0",
        "rules: 1",
        "checks: ledger",
        "ledger: 6 entries, 0 dropped",
    ] {
        assert!(human.contains(want), "expected {want:?} in:\n{human}");
    }

    s.ctl_ok(&["reset"]);
    let c = s.ctl_json(&["status"])["counters"].clone();
    assert_eq!((&c["requests"], &c["ioerr"]), (&json!(0), &json!(0)), "{c}");
    assert!(s.ctl_ok(&["status"]).contains("requests 0  ok 0  ioerr 0"));

    // The frontend leaves: the status says so.
    drop(fe);
    let deadline = Instant::now() + SOON;
    while s.ctl_json(&["status"])["connected"] != json!(false) {
        assert!(Instant::now() < deadline, "still connected");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(s.ctl_ok(&["status"]).contains("no frontend"));
}

#[test]
fn status_shows_the_daemons_own_memory_descriptors_and_threads() {
    let s = Serve::start(&[]);
    let idle = s.ctl_json(&["status"])["process"].clone();
    let fds = |p: &Value| p["open_fds"].as_u64().expect("open fds");
    assert!(idle["rss_bytes"].as_u64().unwrap() > 0, "{idle}");
    assert!(idle["rss_anon_bytes"].as_u64().unwrap() <= idle["rss_bytes"].as_u64().unwrap());
    assert!(idle["threads"].as_u64().unwrap() >= 2, "{idle}");
    // The figures are the daemon's, not ctl's: about what /proc shows of
    // the child (the asking client's connection, two descriptors, is among
    // them; the connections of earlier ctl runs may still be closing).
    let listed = fs::read_dir(format!("/proc/{}/fd", s.child.id()))
        .unwrap()
        .count() as u64;
    assert!(
        fds(&idle).abs_diff(listed) <= 3,
        "{idle}: /proc lists {listed}"
    );
    let human = s.ctl_ok(&["status"]);
    assert!(
        human.contains("process: rss ") && human.contains("open fds "),
        "{human}"
    );

    // A frontend brings its socket, guest memory (shared: counted in RSS
    // once touched) and its queue's kick and call eventfds.
    let mut fe = s.connect(1);
    write_ok(&mut fe, 8, &pattern(3, LEN));
    let busy = s.ctl_json(&["status"])["process"].clone();
    assert!(fds(&busy) >= fds(&idle) + 3, "{idle} -> {busy}");
    assert!(busy["rss_shmem_bytes"].as_u64().unwrap() > 0, "{busy}");
}

/// A frontend that comes and goes leaves no descriptor behind. It used to
/// leave one eventfd per queue (vhost-user-backend keeps the exit events it is
/// given open): 17 descriptors idle, 18 after one frontend, 21 after four. A
/// soak does not see that (one frontend for the whole run); a daemon serving
/// many guests one after another would run out of descriptors.
#[test]
fn frontends_that_come_and_go_leave_no_descriptors() {
    let s = Serve::start(&["--queues", "2"]);
    let fds = |s: &Serve| s.ctl_json(&["status"])["process"]["open_fds"].as_u64();
    // The baseline may still count a control connection of the start-up
    // probe that the daemon has not yet seen close: fewer later is no leak.
    let idle = fds(&s);
    for round in 0..4 {
        let mut fe = s.connect(2);
        write_ok(&mut fe, 8, &pattern(3, LEN));
        drop(fe);
        let deadline = Instant::now() + SOON;
        while s.ctl_json(&["status"])["connected"] != json!(false) || fds(&s) > idle {
            assert!(
                Instant::now() < deadline,
                "after frontend {round}: {:?} open fds, {idle:?} before any",
                fds(&s)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn checks_switch_the_canary_on_and_off_at_run_time() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    s.ctl_ok(&["add-rule", "op=read,action=hold"]);
    let st = s.ctl_json(&["status"]);
    assert_eq!(st["checks"]["canary"], false);

    // With the canary on, a held read's destination holds the canary.
    let shown = s.ctl_ok(&["checks", "--canary", "on"]);
    let shown: Value = serde_json::from_str(shown.trim()).expect("the checks as JSON");
    assert_eq!(
        shown,
        json!({"canary": true, "snapshot": false, "overlap": false, "ledger": true})
    );
    assert_eq!(s.ctl_json(&["status"])["checks"]["canary"], true);
    let held_read = |fe: &mut BlkFrontend| -> Vec<u8> {
        let buf = prefilled(fe);
        let id = submit(fe.queue(0).unwrap(), RequestType::In, 0, &buf);
        s.wait_held(1);
        let during = buf.read().unwrap();
        s.ctl_ok(&["release", "--all"]);
        let c = fe.queue(0).unwrap().wait_for(id, SOON).expect("the read");
        assert_eq!(status(&c), StatusByte::OK);
        during
    };
    let during = held_read(&mut fe);
    let units = dma::canary::find_canaries(&during).count();
    assert_eq!(
        units,
        LEN / 16,
        "the destination is all canary: {units} units"
    );

    let shown = s.ctl_json(&["checks", "--canary", "off"]);
    assert_eq!(shown["canary"], false);
    let during = held_read(&mut fe);
    assert!(
        during.iter().all(|&b| b == PREFILL),
        "canary off: untouched"
    );
    let bad = s.ctl(&["checks", "--canary", "maybe"]);
    assert!(!bad.status.success());
    assert!(texts(&bad).1.contains("not on or off"), "{}", texts(&bad).1);
}

#[test]
fn zero_page_registers_the_guest_zero_page_and_forgets_it() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    let page = prefilled(&fe);
    let gpa = format!("{:#x}", page.gpa().0);
    let set = s.ctl_json(&["zero-page", &gpa]);
    assert_eq!(set["zero_page"], json!(gpa), "{set}");
    assert_eq!(s.ctl_json(&["status"])["zero_page"], json!(gpa));

    // A read into the zero page is found.
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 0, &page);
    fe.queue(0).unwrap().wait_for(id, SOON).expect("the read");
    let f = s.ctl_json(&["findings"]);
    let list = f["findings"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{f}");
    assert_eq!(
        (&list[0]["finding"], &list[0]["gpa"]),
        (&json!("dma-to-zero-page"), &json!(gpa))
    );

    // Forgotten: no more findings.
    assert_eq!(s.ctl_json(&["zero-page"])["zero_page"], Value::Null);
    assert_eq!(s.ctl_json(&["status"])["zero_page"], Value::Null);
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 0, &page);
    fe.queue(0).unwrap().wait_for(id, SOON).expect("the read");
    assert_eq!(
        s.ctl_json(&["findings"])["findings"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let bad = s.ctl_fails(&["zero-page", "0xzz"]);
    assert!(bad.contains("not an address"), "{bad}");
}

#[test]
fn begin_and_end_tag_the_requests_between_them() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    write_ok(&mut fe, 0, &[1; 512]);
    let begun = s.ctl_json(&["begin", "fork-read"]);
    assert_eq!(begun["tag"], "fork-read");
    write_ok(&mut fe, 8, &[2; 512]);
    s.ctl_ok(&["add-rule", "tag=fork-read,op=read,action=hold"]);
    let buf = prefilled(&fe);
    let id = submit(fe.queue(0).unwrap(), RequestType::In, 8, &buf);
    let held = s.wait_held(1);
    assert_eq!(held[0]["tag"], "fork-read", "{held:?}");
    assert_eq!(s.ctl_json(&["status"])["tag"], "fork-read");
    s.ctl_ok(&["release", "--all"]);
    fe.queue(0).unwrap().wait_for(id, SOON).expect("the read");
    let ended = s.ctl_json(&["end"]);
    assert_eq!(ended["ended"], "fork-read");
    write_ok(&mut fe, 16, &[3; 512]);
    assert_eq!(s.ctl_json(&["status"])["tag"], Value::Null);

    let tags: Vec<(String, Value)> = s
        .ledger_requests()
        .into_iter()
        .map(|r| (r["op"].as_str().unwrap().to_owned(), r["tag"].clone()))
        .collect();
    assert_eq!(
        tags,
        vec![
            ("write".into(), Value::Null),
            ("write".into(), json!("fork-read")),
            ("read".into(), json!("fork-read")),
            ("write".into(), Value::Null),
        ]
    );
}

/// A guest drives `begin`, `mark` and `add-rule` through its mailbox, so a tag
/// or label is guest text: one past the cap (256 bytes) is refused with the
/// field, its length and the cap, and nothing of it reaches a record.
#[test]
fn an_overlong_tag_or_label_is_refused_naming_the_field_and_the_cap() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    let mut c = Client::connect(&s.control);
    // As long as a control line (or a mailbox frame) can carry.
    let long = "t".repeat(MAX_LINE - 100);
    let len = long.len().to_string();
    let brief = |a: &Value| a.to_string().chars().take(160).collect::<String>();
    let cases = [
        (json!({"v": 1, "cmd": "begin", "tag": long}), "tag"),
        (json!({"v": 1, "cmd": "mark", "label": long}), "label"),
        (
            json!({"v": 1, "cmd": "add-rule", "rule": format!("tag={long},action=hold")}),
            "tag",
        ),
    ];
    for (request, field) in cases {
        let a = c.ask(&request.to_string());
        assert_eq!(
            a["ok"],
            json!(false),
            "a {field} of {len} bytes was accepted: {}",
            brief(&a)
        );
        let error = a["error"].as_str().expect("an error message");
        assert!(
            error.len() < 400,
            "the answer quotes it all back: {}",
            brief(&a)
        );
        for n in [field, len.as_str(), "256"] {
            assert!(error.contains(n), "{error:?} does not name {n}");
        }
        c.assert_works("after the refusal");
    }
    assert_eq!(s.ctl_json(&["status"])["tag"], Value::Null);
    assert_eq!(s.ctl_json(&["rules"]), json!([]));

    // At the cap is fine, and is what the next request carries.
    let at_cap = "t".repeat(256);
    assert_eq!(s.ctl_json(&["begin", &at_cap])["tag"], json!(at_cap));
    write_ok(&mut fe, 0, &[1; 512]);
    let tags: Vec<Value> = s
        .ledger_requests()
        .into_iter()
        .map(|r| r["tag"].clone())
        .collect();
    assert_eq!(tags, vec![json!(at_cap)]);
}

// ---------------------------------------------------------------------------
// The protocol over a raw stream
// ---------------------------------------------------------------------------

/// A control client speaking the JSON-lines protocol directly.
struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect to the control socket");
        stream.set_read_timeout(Some(SOON)).unwrap();
        Client {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    fn answer(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("an answer");
        assert!(line.ends_with('\n'), "a whole line: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    fn ask(&mut self, line: &str) -> Value {
        self.send(format!("{line}\n").as_bytes());
        self.answer()
    }

    fn assert_works(&mut self, who: &str) {
        let a = self.ask(r#"{"v":1,"cmd":"status"}"#);
        assert_eq!((&a["v"], &a["ok"]), (&json!(1), &json!(true)), "{who}: {a}");
        assert!(a["result"]["counters"].is_object(), "{who}: {a}");
    }
}

/// An error answer whose message contains `why`.
fn assert_refused(a: &Value, why: &str) {
    assert_eq!((&a["v"], &a["ok"]), (&json!(1), &json!(false)), "{a}");
    let error = a["error"].as_str().expect("an error message");
    assert!(error.contains(why), "expected {why:?} in {error:?}");
    assert!(a.get("result").is_none(), "{a}");
}

#[test]
fn bad_requests_are_refused_and_the_connection_stays_usable() {
    let s = Serve::start(&[]);
    let mut a = Client::connect(&s.control);
    let mut b = Client::connect(&s.control);
    b.assert_works("the second client");
    // The second client is half-way through a line the whole time.
    b.send(br#"{"v":1,"cmd":"#);

    let too_long = format!(
        r#"{{"v":1,"cmd":"status","pad":"{}"}}"#,
        "x".repeat(MAX_LINE)
    );
    let cases: [(&[u8], &str); 7] = [
        (b"{not json\n", "not JSON"),
        (br#"{"v":1,"cmd":"fly"}"#, "fly"),
        (br#"{"v":2,"cmd":"status"}"#, "version"),
        (br#"{"v":1}"#, "cmd"),
        (br#"{"v":1,"cmd":"release","id":"seven"}"#, "release"),
        (too_long.as_bytes(), "longer"),
        (b"\xff\xfe{}", "UTF-8"),
    ];
    for (line, why) in cases {
        a.send(line);
        if !line.ends_with(b"\n") {
            a.send(b"\n");
        }
        assert_refused(&a.answer(), why);
        a.assert_works("after a bad request");
    }
    // An error from a command that parsed.
    assert_refused(
        &a.ask(r#"{"v":1,"cmd":"add-rule","rule":"op=read"}"#),
        "no action",
    );
    assert_refused(&a.ask(r#"{"cmd":"remove-rule","id":42}"#), "no rule 42");
    // `v` may be left out.
    assert_eq!(a.ask(r#"{"cmd":"held"}"#)["result"], json!([]));

    // ctl raw sends a line as it is and reports the daemon's refusal.
    let raw = s.ctl_ok(&["raw", r#"{"cmd":"held"}"#]);
    assert_eq!(raw.trim(), "[]");
    let refused = s.ctl_fails(&["raw", r#"{"v":1,"cmd":"fly"}"#]);
    assert!(refused.contains("fly"), "{refused}");

    // The second client finishes its line and is answered.
    b.send(b"\"held\"}\n");
    let held = b.answer();
    assert_eq!((&held["ok"], &held["result"]), (&json!(true), &json!([])));
    b.assert_works("the second client, at the end");
}

/// The daemon's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM")
}

#[test]
fn an_overlong_line_is_refused_without_buffering_it_whole() {
    let s = Serve::start(&[]);
    let mut c = Client::connect(&s.control);
    c.assert_works("before");
    let before = peak_rss_kib(s.child.id());
    // 96 MiB in one line.
    let chunk = vec![b'x'; 1 << 20];
    c.send(b"{\"v\":1,\"cmd\":\"status\",\"pad\":\"");
    for _ in 0..96 {
        c.send(&chunk);
    }
    c.send(b"\"}\n");
    assert_refused(&c.answer(), "longer");
    c.assert_works("after");
    let grew_mib = peak_rss_kib(s.child.id()).saturating_sub(before) / 1024;
    assert!(
        grew_mib < 16,
        "refusing a 96 MiB line made the daemon {grew_mib} MiB bigger"
    );
}

#[test]
fn clients_that_leave_mid_request_harm_nothing() {
    let mut s = Serve::start(&[]);
    let mut fe = s.connect(1);
    let mut stayer = Client::connect(&s.control);
    // More than the daemon serves at once (32): each must give its place back.
    for i in 0..40 {
        let mut c = UnixStream::connect(&s.control).expect("connect");
        let half: &[u8] = if i % 2 == 0 {
            br#"{"v":1,"cmd":"rele"#
        } else {
            br#"{"v":1,"cmd":"status""#
        };
        // Past the places the daemon serves at once, it may refuse and close
        // before the half line is sent: the write then meets a closed socket
        // (EPIPE), which is that refusal, not a failure.
        let _ = c.write_all(half);
        if i % 3 == 0 {
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
        drop(c);
    }
    stayer.assert_works("a client connected throughout");
    // New clients still get a place.
    let deadline = Instant::now() + SOON;
    loop {
        let mut fresh = Client::connect(&s.control);
        let a = fresh.ask(r#"{"v":1,"cmd":"status"}"#);
        if a["ok"] == json!(true) {
            break;
        }
        assert_refused(&a, "too many");
        assert!(Instant::now() < deadline, "places are never given back");
        thread::sleep(Duration::from_millis(20));
    }
    s.assert_alive();
    write_ok(&mut fe, 0, &[9; 512]);
    assert_eq!(fe.read(0, Sector(0), 512).unwrap().1, vec![9; 512]);
    assert!(s.ctl_ok(&["status"]).contains("requests 2"));
}

/// With all 32 places taken, the next client is told so and counted.
#[test]
fn a_client_past_the_32_places_is_refused_and_counted() {
    let mut s = Serve::start(&["--control-idle-timeout", "0"]);
    let mut busy = Client::connect(&s.control);
    let _held: Vec<UnixStream> = (0..31)
        .map(|_| UnixStream::connect(&s.control).expect("connect"))
        .collect();
    busy.assert_works("the first client");
    // The daemon counts a client when it accepts it: wait for the 31 others.
    let deadline = Instant::now() + SOON;
    loop {
        // A refused client may find the socket closed before it has sent its
        // line (EPIPE); the refusal is still there to read.
        let mut c = Client::connect(&s.control);
        let _ = c.writer.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n");
        let a = c.answer();
        if a["ok"] == json!(false) {
            assert_refused(&a, "too many");
            break;
        }
        assert!(Instant::now() < deadline, "a 33rd client was never refused");
        thread::sleep(Duration::from_millis(20));
    }
    let status = busy.ask(r#"{"v":1,"cmd":"status"}"#);
    let control = &status["result"]["control"];
    assert!(control["refused_busy"].as_u64().unwrap() >= 1, "{control}");
    assert_eq!(control["closed_idle"], json!(0), "no timeout: {control}");
    assert_eq!(control["max_clients"], json!(32), "{control}");
    s.assert_alive();
}

/// Clients that connect and say nothing, or trickle a line a byte at a time,
/// are closed after `--control-idle-timeout` and counted, so they cannot keep
/// places for ever; a client that keeps asking stays.
#[test]
fn idle_control_clients_are_closed_and_counted() {
    const IDLE: Duration = Duration::from_secs(2);
    let mut s = Serve::start(&["--control-idle-timeout", "2"]);
    let mut busy = Client::connect(&s.control);
    busy.assert_works("a client that asks");
    let mut idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&s.control).expect("connect"))
        .collect();
    // One trickles a byte every 100 ms: each read is short, the line is not.
    // Its clock starts at the daemon's accept, after this connect.
    let start = Instant::now();
    let mut trickler = UnixStream::connect(&s.control).expect("connect");
    let mut closed = false;
    while start.elapsed() < SOON {
        if trickler.write_all(b" ").is_err() {
            closed = true;
            break;
        }
        // The client that asks stays: each line starts its deadline afresh.
        busy.assert_works("a client that keeps asking");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(closed, "a client trickling one line was never closed");
    assert!(
        start.elapsed() >= IDLE,
        "closed before its {IDLE:?} were up: {:?}",
        start.elapsed()
    );
    for (i, c) in idle.iter_mut().enumerate() {
        c.set_read_timeout(Some(SOON)).unwrap();
        let mut byte = [0u8; 1];
        let n = std::io::Read::read(c, &mut byte)
            .unwrap_or_else(|e| panic!("idle client {i} was not closed: {e}"));
        assert_eq!(n, 0, "idle client {i} got an answer it did not ask for");
    }
    let status = busy.ask(r#"{"v":1,"cmd":"status"}"#);
    let control = &status["result"]["control"];
    assert_eq!(control["closed_idle"], json!(9), "{control}");
    s.assert_alive();
}

#[test]
fn the_control_socket_is_for_its_owner_only() {
    let s = Serve::start(&[]);
    let mode = fs::metadata(&s.control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {:o}", mode & 0o777);
    // A --control path of one's own choosing, too.
    let other = s.dir.path().join("elsewhere.ctl");
    let _elsewhere = Serve::start(&["--control", other.to_str().unwrap()]);
    let mode = fs::metadata(&other).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {:o}", mode & 0o777);
}

#[test]
fn a_control_path_that_is_a_regular_file_is_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("notes.txt");
    fs::write(&precious, "a file that is not a socket\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .arg("serve")
        .arg("--socket")
        .arg(dir.path().join("blk.sock"))
        .args(["--mem", "16M", "--control"])
        .arg(&precious)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dmaprobe serve");
    // Either it refuses (and exits) or it is serving; give it time to do either.
    let deadline = Instant::now() + SOON;
    while child.try_wait().unwrap().is_none()
        && !(fs::symlink_metadata(&precious).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }))
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        fs::read_to_string(&precious).ok().as_deref(),
        Some("a file that is not a socket\n"),
        "the file at the --control path is gone"
    );
}

#[test]
fn ctl_without_a_daemon_says_it_cannot_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody.ctl");
    let out = ctl_at(&["--control", missing.to_str().unwrap()], &["status"]);
    let (stdout, stderr) = texts(&out);
    assert!(!out.status.success(), "{stdout}");
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("Cannot reach the daemon") && stderr.contains("nobody.ctl"),
        "{stderr}"
    );
    // Found through --socket: the same.
    let sock = dir.path().join("gone.sock");
    let out = ctl_at(&["--socket", sock.to_str().unwrap()], &["held"]);
    assert!(!out.status.success());
    assert!(
        texts(&out).1.contains("Cannot reach the daemon")
            && texts(&out).1.contains("gone.sock.ctl"),
        "{}",
        texts(&out).1
    );
    // No socket named at all.
    let out = ctl_at(&[], &["status"]);
    assert!(!out.status.success());
    assert!(
        texts(&out).1.contains("No control socket"),
        "{}",
        texts(&out).1
    );
}
