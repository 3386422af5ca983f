//! The media model end to end: a real `dmaprobe serve` child on a disk file, a
//! frontend on its vhost-user socket and `dmaprobe ctl` on its control socket.
//! What a flush makes stable survives a power cut and a kill -9 of the daemon;
//! what it does not is lost; bad blocks fail reads and writes with IOERR until
//! rewritten or cleared, and the ledger says why. A write the guest is told
//! is stable (the cache off, or a driver that cannot flush) is synced to the
//! disk file before it completes, and `status` counts the syncs.

mod common;

use common::child::*;
use common::pattern;

use backend::vhost_user_driver::{DiscardRange, Sector, StatusByte};
use serde_json::Value;

/// Reads `len` bytes at `sector` through queue 0, expecting success.
fn read_ok(fe: &mut backend::vhost_user_driver::BlkFrontend, sector: u64, len: usize) -> Vec<u8> {
    let (status, data) = fe.read(0, Sector(sector), len).expect("read");
    assert_eq!(status, StatusByte::OK, "read at sector {sector}");
    data
}

fn flush_ok(fe: &mut backend::vhost_user_driver::BlkFrontend) {
    assert_eq!(fe.flush(0).expect("flush"), StatusByte::OK);
}

/// Runs `dmaprobe serve --mem 16M ARGS`, expects it to refuse to start, and
/// returns what it said.
fn refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .arg("serve")
        .arg("--socket")
        .arg(dir.path().join("s"))
        .args(["--mem", "16M"])
        .args(args)
        .output()
        .expect("run dmaprobe serve");
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn counter(s: &Serve, name: &str) -> u64 {
    s.ctl_json(&["status"])["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[test]
fn a_power_cut_loses_what_no_flush_made_stable() {
    let s = Serve::start(&["--write-cache", "1M"]);
    let mut fe = s.connect(1);
    let (stable, volatile) = (pattern(1, LEN), pattern(2, LEN));
    write_ok(&mut fe, 0, &stable);
    write_ok(&mut fe, 8, &stable);
    flush_ok(&mut fe);
    write_ok(&mut fe, 8, &volatile);
    write_ok(&mut fe, 16, &volatile);
    let st = s.ctl_json(&["status"]);
    assert_eq!(st["write_cache"]["volatile_bytes"], 2 * LEN, "{st}");
    assert_eq!(st["write_cache"]["volatile_writes"], 2, "{st}");
    let human = s.ctl_ok(&["status"]);
    assert!(
        human.contains("write cache: on, 8 of 1024 KiB volatile (2 writes)"),
        "{human}"
    );

    let out = s.ctl_ok(&["power-cut"]);
    assert_eq!(
        words(&out),
        words("power cut #1: 16 blocks lost, 0 kept, of 2 volatile writes")
    );
    // The guest of the moment reads what a fresh boot would.
    assert_eq!(read_ok(&mut fe, 0, LEN), stable);
    assert_eq!(read_ok(&mut fe, 8, LEN), stable);
    assert_eq!(read_ok(&mut fe, 16, LEN), vec![0; LEN]);
    assert_eq!(s.disk_at(8, LEN), stable);
    assert_eq!(s.ctl_json(&["status"])["power_cuts"], 1);
}

#[test]
fn a_disconnect_is_not_a_flush() {
    let s = Serve::start(&["--write-cache", "1M"]);
    let mut fe = s.connect(1);
    write_ok(&mut fe, 0, &pattern(1, LEN));
    drop(fe);
    // The next guest on the same disk (as between the boots of a test in
    // `dmaprobe run`): once it is connected, the daemon is done with the
    // first, and the write is still volatile.
    let mut fe = s.connect(1);
    let out = s.ctl_ok(&["power-cut"]);
    assert_eq!(
        words(&out),
        words("power cut #1: 8 blocks lost, 0 kept, of 1 volatile writes")
    );
    assert_eq!(read_ok(&mut fe, 0, LEN), vec![0; LEN]);
}

#[test]
fn writethrough_writes_survive_a_power_cut() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    // The driver turns the cache off (virtio-blk `writeback` = 0).
    fe.set_config_bytes(32, &[0]).expect("set_config");
    let data = pattern(3, LEN);
    write_ok(&mut fe, 40, &data);
    let cut = s.ctl_json(&["power-cut"]);
    assert_eq!(cut["lost_blocks"], 0, "{cut}");
    assert_eq!(read_ok(&mut fe, 40, LEN), data);
    assert_eq!(s.ctl_json(&["status"])["write_cache"]["enabled"], false);
}

/// One range of `sectors` 512-byte sectors from `sector`, for discard and
/// write-zeroes.
fn sectors(sector: u64, sectors: u32) -> [DiscardRange; 1] {
    [DiscardRange {
        sector: Sector(sector),
        num_sectors: sectors,
        flags: 0,
    }]
}

#[test]
fn without_a_write_cache_every_change_is_synced_before_it_completes() {
    let s = Serve::start(&["--write-cache", "off"]);
    let mut fe = s.connect(1);
    // The guest is told writethrough, so it will never flush: each write,
    // write-zeroes and discard must be on the disk when it completes.
    assert_eq!(fe.get_config().expect("config").writeback, 0);
    let before = s.syncs();
    write_ok(&mut fe, 48, &pattern(12, LEN));
    assert_eq!(s.syncs(), before + 1, "a write");
    let zeroes = fe.write_zeroes(0, &sectors(48, 8)).expect("write-zeroes");
    assert_eq!(zeroes, StatusByte::OK);
    assert_eq!(s.syncs(), before + 2, "a write-zeroes");
    assert_eq!(
        fe.discard(0, &sectors(48, 8)).expect("discard"),
        StatusByte::OK
    );
    assert_eq!(s.syncs(), before + 3, "a discard");
    // Asking for writeback changes nothing: there is no cache to run.
    fe.set_config_bytes(32, &[1]).expect("set_config");
    assert_eq!(fe.get_config().expect("config").writeback, 0);
    write_ok(&mut fe, 56, &pattern(13, LEN));
    assert_eq!(s.syncs(), before + 4, "a write after asking for writeback");
    assert!(
        s.ctl_ok(&["status"])
            .contains(&format!("backing: file, synced {} times", before + 4)),
        "{}",
        s.ctl_ok(&["status"])
    );
}

#[test]
fn the_guest_turning_the_cache_off_makes_each_write_sync() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    assert_eq!(fe.get_config().expect("config").writeback, 1);
    let before = s.syncs();
    // Writeback: a write is not synced, a flush is.
    write_ok(&mut fe, 64, &pattern(14, LEN));
    assert_eq!(s.syncs(), before, "a write behind the cache");
    flush_ok(&mut fe);
    assert_eq!(s.syncs(), before + 1, "a flush");
    // Writethrough: switching flushes, then every write is synced.
    fe.set_config_bytes(32, &[0]).expect("set_config");
    assert_eq!(fe.get_config().expect("config").writeback, 0);
    assert_eq!(s.syncs(), before + 2, "the switch");
    write_ok(&mut fe, 72, &pattern(15, LEN));
    assert_eq!(s.syncs(), before + 3, "a writethrough write");
    let zeroes = fe.write_zeroes(0, &sectors(72, 8)).expect("write-zeroes");
    assert_eq!(zeroes, StatusByte::OK);
    assert_eq!(s.syncs(), before + 4, "a writethrough write-zeroes");
}

#[test]
fn a_torn_power_cut_keeps_a_leading_part_of_each_write() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    let data = pattern(4, 16 * 512);
    write_ok(&mut fe, 64, &data);
    let cut = s.ctl_json(&["power-cut", "--torn", "--seed", "3"]);
    let kept = cut["kept_blocks"].as_u64().expect("kept") as usize;
    assert_eq!(cut["lost_blocks"].as_u64(), Some(16 - kept as u64), "{cut}");
    let back = read_ok(&mut fe, 64, data.len());
    assert_eq!(back[..kept * 512], data[..kept * 512]);
    assert!(back[kept * 512..].iter().all(|&b| b == 0));
}

#[test]
fn flushed_data_survives_a_kill_9_of_the_daemon() {
    let mut s = Serve::start(&[]);
    let data = pattern(5, LEN);
    {
        let mut fe = s.connect(1);
        write_ok(&mut fe, 128, &data);
        flush_ok(&mut fe);
    }
    s.kill_and_restart(&[]);
    let mut fe = s.connect(1);
    assert_eq!(read_ok(&mut fe, 128, LEN), data);
}

#[test]
fn a_request_held_across_a_power_cut_fails() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    s.ctl_ok(&["add-rule", "op=write,action=hold"]);
    let buf = fe.ram().alloc_aligned(LEN, 4096).expect("alloc");
    buf.write_at(0, &pattern(6, LEN)).expect("fill");
    let q = fe.queue(0).expect("queue 0");
    let id = submit(q, backend::vhost_user_driver::RequestType::Out, 200, &buf);
    s.wait_held(1);
    s.ctl_ok(&["power-cut"]);
    s.ctl_ok(&["release", "--all"]);
    let done = q.wait_for(id, SOON).expect("completion");
    assert_eq!(status(&done), StatusByte::IOERR);
    assert_eq!(
        s.disk_at(200, LEN),
        vec![0; LEN],
        "a write from before the cut landed"
    );
    assert_eq!(counter(&s, "cut_off"), 1);
    let outcome: Vec<Value> = s
        .ledger_requests()
        .into_iter()
        .filter(|r| r["status"] == "cut-off")
        .collect();
    assert_eq!(outcome.len(), 1, "the ledger names why");
}

#[test]
fn a_fault_rule_cuts_the_power() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    let data = pattern(7, LEN);
    write_ok(&mut fe, 300, &data);
    s.ctl_ok(&["add-rule", "op=flush,nth=1,action=power-cut"]);
    assert_eq!(fe.flush(0).expect("flush"), StatusByte::IOERR);
    assert_eq!(read_ok(&mut fe, 300, LEN), vec![0; LEN]);
    assert_eq!(s.ctl_json(&["status"])["power_cuts"], 1);
}

#[test]
fn a_bad_block_fails_reads_until_rewritten() {
    let s = Serve::start(&["--media-error", "1000+8:read"]);
    let mut fe = s.connect(1);
    let (status_, _) = fe.read(0, Sector(996), LEN).expect("read");
    assert_eq!(status_, StatusByte::IOERR);
    // Neighbours read fine.
    read_ok(&mut fe, 1008, LEN);
    let listed = s.ctl_ok(&["media-error", "list"]);
    assert_eq!(words(&listed), words("LBA 1000+8: read errors"));
    // Rewriting the blocks remaps them.
    let data = pattern(8, LEN);
    write_ok(&mut fe, 1000, &data);
    assert_eq!(read_ok(&mut fe, 1000, LEN), data);
    assert_eq!(s.ctl_ok(&["media-error", "list"]).trim(), "no bad blocks");
    assert_eq!(counter(&s, "unrecovered_reads"), 1);
    let why: Vec<Value> = s
        .ledger_requests()
        .into_iter()
        .filter(|r| r["status"] == "unrecovered-read-error")
        .collect();
    assert_eq!(why.len(), 1, "the ledger names why");
}

#[test]
fn a_write_fault_stays_until_cleared() {
    let s = Serve::start(&[]);
    let mut fe = s.connect(1);
    s.ctl_ok(&["media-error", "add", "2000", "write", "--blocks", "2"]);
    let data = pattern(9, LEN);
    assert_eq!(
        fe.write(0, Sector(2000), &data).expect("write"),
        StatusByte::IOERR
    );
    let zero = DiscardRange {
        sector: Sector(2000),
        num_sectors: 8,
        flags: 0,
    };
    assert_eq!(
        fe.write_zeroes(0, &[zero]).expect("write-zeroes"),
        StatusByte::IOERR
    );
    assert_eq!(s.disk_at(2000, LEN), vec![0; LEN]);
    assert_eq!(counter(&s, "write_faults"), 2);
    let cleared = s.ctl_json(&["media-error", "clear"]);
    assert_eq!(cleared["cleared_blocks"], 2);
    write_ok(&mut fe, 2000, &data);
    assert_eq!(read_ok(&mut fe, 2000, LEN), data);
}

#[test]
fn bad_media_options_stop_the_daemon_with_the_cause() {
    for (args, why) in [
        (
            &["--media-error", "99999999+8:read"][..],
            "past the capacity",
        ),
        (&["--media-error", "7:scratch"][..], "read or write"),
        (&["--write-cache", "lots"][..], "--write-cache"),
        (&["--deallocate", "shred"][..], "zeroes"),
    ] {
        let stderr = refused(args);
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}

#[test]
fn deallocated_blocks_keep_their_data_when_asked() {
    let s = Serve::start(&["--deallocate", "keep"]);
    let mut fe = s.connect(1);
    let data = pattern(10, LEN);
    write_ok(&mut fe, 3000, &data);
    let range = DiscardRange {
        sector: Sector(3000),
        num_sectors: 8,
        flags: 0,
    };
    assert_eq!(fe.discard(0, &[range]).expect("discard"), StatusByte::OK);
    assert_eq!(read_ok(&mut fe, 3000, LEN), data);
    // Write-zeroes zeroes, with UNMAP too, whatever discard does.
    let unmap = DiscardRange {
        flags: DiscardRange::UNMAP,
        ..range
    };
    assert_eq!(
        fe.write_zeroes(0, &[unmap]).expect("write-zeroes"),
        StatusByte::OK
    );
    assert_eq!(read_ok(&mut fe, 3000, LEN), vec![0; LEN]);
}

#[test]
fn the_geometry_asked_for_is_what_the_guest_is_told_and_held_to() {
    let s = Serve::start(&[
        "--lbs",
        "4096",
        "--max-transfer",
        "64K",
        "--optimal-transfer",
        "32K",
        "--discard-granularity",
        "16K",
        "--max-discard-segments",
        "2",
        "--max-write-zeroes",
        "1M",
    ]);
    let mut fe = s.connect(1);
    let c = fe.get_config().expect("config");
    assert_eq!((c.seg_max, c.size_max), (16, 4096), "64 KiB in pages");
    assert_eq!(c.opt_io_size, 8, "32 KiB in 4 KiB blocks");
    assert_eq!(c.discard_sector_alignment, 32, "16 KiB in sectors");
    assert_eq!(c.max_discard_seg, 2);
    assert_eq!(c.max_write_zeroes_sectors, 2048);

    // Up to the maximum transfer, and not past it.
    let data = pattern(11, 64 << 10);
    write_ok(&mut fe, 0, &data);
    let (status_, _) = fe.read(0, Sector(0), 128 << 10).expect("read");
    assert_eq!(status_, StatusByte::IOERR);
    assert_eq!(read_ok(&mut fe, 0, 64 << 10), data);

    // A discard of 48 KiB from 8 KiB deallocates the one whole 16 KiB granule
    // inside it (16-32 KiB) and leaves the rest.
    let range = |from_kib: u64, kib: u32| DiscardRange {
        sector: Sector(from_kib * 2),
        num_sectors: kib * 2,
        flags: 0,
    };
    assert_eq!(
        fe.discard(0, &[range(8, 24)]).expect("discard"),
        StatusByte::OK
    );
    let back = read_ok(&mut fe, 0, 64 << 10);
    let kib = |k: usize| &back[k << 10..(k + 4) << 10];
    assert_eq!(kib(8), &data[8 << 10..12 << 10]);
    assert_eq!(kib(16), vec![0; 4096].as_slice());
    assert_eq!(kib(28), vec![0; 4096].as_slice());
    assert_eq!(kib(32), &data[32 << 10..36 << 10]);
    // More ranges than allowed, or a write-zeroes range past its limit: IOERR.
    let three = [range(0, 4), range(8, 4), range(16, 4)];
    assert_eq!(fe.discard(0, &three).expect("discard"), StatusByte::IOERR);
    assert_eq!(
        fe.write_zeroes(0, &[range(0, 2048)]).expect("wz"),
        StatusByte::IOERR
    );
    assert_eq!(
        fe.write_zeroes(0, &[range(0, 1024)]).expect("wz"),
        StatusByte::OK
    );
}

#[test]
fn a_bad_geometry_stops_the_daemon_with_the_cause() {
    for (args, why) in [
        (&["--max-transfer", "6K"][..], "multiple of 4096"),
        (&["--max-transfer", "2M"][..], "--queue-size 1024"),
        (
            &["--lbs", "4096", "--discard-granularity", "512"][..],
            "4096-byte blocks",
        ),
        (
            &["--optimal-transfer", "1M", "--max-transfer", "64K"][..],
            "larger than --max-transfer",
        ),
        (&["--max-discard-segments", "1000"][..], "1 to 256"),
    ] {
        let stderr = refused(args);
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}
