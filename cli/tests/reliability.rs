//! What must hold whatever the guest or the host does to the daemon: requests
//! are completed or failed, never left dangling; the daemon stops cleanly.

mod common;

use common::child::*;
use common::pattern;

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use backend::vhost_user_driver::{
    encode_header, link, BlkFrontend, Buffer, ChainId, Descriptor, Error as FrontendError,
    FrontendConfig, GuestAddress, GuestRam, Queue, RequestType, Sector, StatusByte,
};
use serde_json::Value;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::GuestMemoryBackend;

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

    // SAFETY: kill(2) touches no memory of ours; the daemon is our child and
    // has not been reaped, so its pid cannot have been reused.
    let sent = unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(sent, 0, "kill");
    for id in ids {
        let done = q.wait_for(id, SOON).expect("the guest hears back");
        assert_eq!(status(&done), StatusByte::IOERR);
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
        assert!(used.iter().all(|c| status(c) == StatusByte::OK));
    }
}

// ---------------------------------------------------------------------------
// Guest memory removed while a request waits
// ---------------------------------------------------------------------------

/// Where the second region of guest memory goes: above the first (8 MiB).
const EXTRA_GPA: u64 = 1 << 32;
/// Its size.
const EXTRA_SIZE: usize = 1 << 20;
/// The offset in it of the page the requests use.
const EXTRA_PAGE: u64 = 0x1000;
/// What the region holds until the daemon writes into it.
const EXTRA_FILL: u8 = 0xa7;
/// The sector of the requests under test; the fault rules match its LBA only.
const SECTOR: u64 = 64;
/// Where the I/O after each case goes, clear of the rules.
const GOOD_SECTOR: u64 = 512;

/// A frontend that can add and remove memory regions (CONFIGURE_MEM_SLOTS).
fn connect_with_mem_slots(s: &Serve) -> BlkFrontend {
    let config = FrontendConfig {
        mem_size: 8 << 20,
        timeout: SOON,
        mem_slots: true,
        ..FrontendConfig::default()
    };
    let deadline = Instant::now() + SOON;
    loop {
        match BlkFrontend::connect(&s.socket, config.clone()) {
            Ok(fe) => return fe,
            Err(FrontendError::Connect { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect: {e:?}"),
        }
    }
}

/// A second region of guest memory, added after the memory table as a
/// hot-plugged DIMM is: its own memfd, which this process keeps mapped (at 0
/// of its own view) to see the bytes after the daemon has let the region go.
struct Extra {
    ram: GuestRam,
    info: VhostUserMemoryRegionInfo,
}

impl Extra {
    fn add(s: &Serve, fe: &mut BlkFrontend) -> Extra {
        let ram = GuestRam::new(EXTRA_SIZE).expect("memfd");
        ram.fill(GuestAddress(0), EXTRA_SIZE, EXTRA_FILL)
            .expect("fill");
        let region = ram.mem().iter().next().expect("one region");
        let mut info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        info.guest_phys_addr = EXTRA_GPA;
        fe.vhost().add_mem_region(&info).expect("ADD_MEM_REG");
        let extra = Extra { ram, info };
        assert!(extra.mapped_by(s), "the daemon maps the added region");
        extra
    }

    /// The guest-physical address of the page the requests use.
    fn gpa(&self) -> u64 {
        EXTRA_GPA + EXTRA_PAGE
    }

    /// Every byte of the region, as this process sees it.
    fn bytes(&self) -> Vec<u8> {
        self.ram
            .read_vec(GuestAddress(0), EXTRA_SIZE)
            .expect("read the region")
    }

    /// The bytes of the page the requests use.
    fn page(&self) -> Vec<u8> {
        self.ram
            .read_vec(GuestAddress(EXTRA_PAGE), LEN)
            .expect("read the page")
    }

    /// REM_MEM_REG, then waits until the daemon has unmapped the region: from
    /// then on no access of the daemon's can reach it.
    fn remove(&self, s: &Serve, fe: &mut BlkFrontend) {
        fe.vhost()
            .remove_mem_region(&self.info)
            .expect("REM_MEM_REG");
        let deadline = Instant::now() + SOON;
        while self.mapped_by(s) {
            assert!(
                Instant::now() < deadline,
                "the daemon still maps the region {SOON:?} after REM_MEM_REG"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the daemon has the region's memfd mapped (/proc/PID/maps names
    /// the file's inode).
    fn mapped_by(&self, s: &Serve) -> bool {
        let ino = self
            .ram
            .memfd()
            .metadata()
            .expect("fstat")
            .ino()
            .to_string();
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.child.id()))
            .expect("the daemon's maps");
        maps.lines().any(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            f.get(4) == Some(&ino.as_str()) && f.get(5).is_some_and(|p| p.starts_with("/memfd:"))
        })
    }
}

/// The header and status byte of a hand-built request, in the first region.
struct Chain {
    hdr: Buffer,
    status: Buffer,
}

impl Chain {
    fn new(fe: &BlkFrontend) -> Chain {
        Chain {
            hdr: fe.ram().alloc(16).expect("alloc"),
            status: fe.ram().alloc(1).expect("alloc"),
        }
    }

    /// Pushes header, `data` and a status byte at `status_at` (this chain's
    /// own status byte when `None`), and kicks.
    fn submit(
        &self,
        q: &mut Queue,
        kind: RequestType,
        data: Descriptor,
        status_at: Option<u64>,
    ) -> ChainId {
        self.hdr
            .write_at(0, &encode_header(kind.code(), Sector(SECTOR)))
            .expect("header");
        self.status.fill(StatusByte::UNWRITTEN.0).expect("status");
        let at = status_at.unwrap_or(self.status.gpa().0);
        let mut descs = [
            Descriptor::readable(self.hdr.gpa(), 16),
            data,
            Descriptor::writable(GuestAddress(at), 1),
        ];
        link(&mut descs);
        let id = q.push_chain(&descs).expect("push_chain");
        q.kick().expect("kick");
        id
    }

    fn status(&self) -> StatusByte {
        StatusByte(self.status.read().expect("status")[0])
    }
}

/// A write and a read at another sector on queue 0, which must succeed.
fn serves_after(s: &mut Serve, fe: &mut BlkFrontend, case: &str) {
    s.assert_alive();
    let data = pattern(77, LEN);
    assert_eq!(
        fe.write(0, Sector(GOOD_SECTOR), &data).expect("write"),
        StatusByte::OK,
        "a write after {case}"
    );
    let (st, back) = fe.read(0, Sector(GOOD_SECTOR), LEN).expect("read");
    assert_eq!(st, StatusByte::OK, "a read after {case}");
    assert!(back == data, "a read after {case} returned other data");
    s.assert_alive();
}

/// No finding of any kind, counted or in the ledger.
fn assert_no_findings(s: &Serve, case: &str) {
    let st = s.ctl_json(&["status"]);
    let counted: u64 = st["findings"]
        .as_object()
        .expect("finding counts")
        .values()
        .map(|n| n.as_u64().expect("a count"))
        .sum();
    let listed = s.ctl_json(&["findings"]);
    assert_eq!(
        (counted, listed["findings"].as_array().map(Vec::len)),
        (0, Some(0)),
        "{case}: findings: {listed}"
    );
}

/// The ledger's only request at `SECTOR`: its outcome.
fn outcome_at_sector(s: &Serve) -> String {
    let at: Vec<_> = s
        .ledger_requests()
        .into_iter()
        .filter(|r| r["lba"] == SECTOR)
        .collect();
    assert_eq!(at.len(), 1, "one request at LBA {SECTOR}: {at:?}");
    at[0]["status"].as_str().expect("status").to_owned()
}

fn counter(s: &Serve, name: &str) -> Value {
    s.ctl_json(&["status"])["counters"][name].clone()
}

fn outside_memory(s: &Serve) -> Value {
    s.ctl_json(&["status"])["counters"]["malformed"]["outside-memory"].clone()
}

#[test]
fn a_held_read_into_a_removed_region_fails_and_leaves_the_region_alone() {
    for checks in [&[][..], &["--canary"]] {
        let case = format!("a held read, checks {checks:?}");
        let mut args = vec!["--fault", "op=read,lba=64,action=hold"];
        args.extend_from_slice(checks);
        let mut s = Serve::start(&args);
        let mut fe = connect_with_mem_slots(&s);
        let extra = Extra::add(&s, &mut fe);
        let chain = Chain::new(&fe);
        let data = Descriptor::writable(GuestAddress(extra.gpa()), LEN as u32);
        let id = chain.submit(fe.queue(0).unwrap(), RequestType::In, data, None);
        s.wait_held(1);
        let stamped = extra.page() != vec![EXTRA_FILL; LEN];
        // The canary is stamped at arrival, while the region is still there.
        assert_eq!(stamped, !checks.is_empty(), "{case}: canary stamped");
        extra.remove(&s, &mut fe);
        let before = extra.bytes();

        s.ctl_ok(&["release", "--all"]);
        let done = fe.queue(0).unwrap().wait_for(id, SOON).expect("used entry");
        assert_eq!((chain.status(), done.len), (StatusByte::IOERR, 1), "{case}");
        assert!(
            extra.bytes() == before,
            "{case}: the daemon wrote into the removed region"
        );
        assert_eq!(outcome_at_sector(&s), "ioerr", "{case}");
        assert_eq!(outside_memory(&s), 1, "{case}");
        assert_no_findings(&s, &case);
        serves_after(&mut s, &mut fe, &case);
    }
}

#[test]
fn a_held_write_from_a_removed_region_fails_and_the_disk_keeps_its_bytes() {
    let mut s = Serve::start(&["--snapshot"]);
    let mut fe = connect_with_mem_slots(&s);
    let old = pattern(5, LEN);
    write_ok(&mut fe, SECTOR, &old);
    s.ctl_ok(&["add-rule", "op=write,lba=64,action=hold"]);
    let extra = Extra::add(&s, &mut fe);
    extra
        .ram
        .write(GuestAddress(EXTRA_PAGE), &pattern(6, LEN))
        .expect("the write's source");
    let chain = Chain::new(&fe);
    let data = Descriptor::readable(GuestAddress(extra.gpa()), LEN as u32);
    let id = chain.submit(fe.queue(0).unwrap(), RequestType::Out, data, None);
    s.wait_held(1);
    extra.remove(&s, &mut fe);

    s.ctl_ok(&["release", "--all"]);
    let done = fe.queue(0).unwrap().wait_for(id, SOON).expect("used entry");
    assert_eq!((chain.status(), done.len), (StatusByte::IOERR, 1));
    let (st, back) = fe.read(0, Sector(SECTOR), LEN).expect("read back");
    assert_eq!(st, StatusByte::OK);
    assert!(back == old, "the failed write changed the device's data");
    assert_eq!(fe.flush(0).expect("flush"), StatusByte::OK);
    assert!(
        s.disk_at(SECTOR, LEN) == old,
        "the failed write reached the disk file"
    );
    let writes: Vec<_> = s
        .ledger_requests()
        .into_iter()
        .filter(|r| r["lba"] == SECTOR && r["op"] == "write")
        .map(|r| r["status"].clone())
        .collect();
    assert_eq!(writes, ["ok", "ioerr"], "the two writes' outcomes");
    assert_eq!(outside_memory(&s), 1);
    assert_no_findings(&s, "a held write");
    serves_after(&mut s, &mut fe, "a held write");
}

#[test]
fn a_delayed_read_into_a_removed_region_fails_and_leaves_the_region_alone() {
    // Long enough that the region is surely gone before the delay ends.
    let mut s = Serve::start(&["--fault", "op=read,lba=64,action=delay,ms=1000"]);
    let mut fe = connect_with_mem_slots(&s);
    let extra = Extra::add(&s, &mut fe);
    let chain = Chain::new(&fe);
    let data = Descriptor::writable(GuestAddress(extra.gpa()), LEN as u32);
    let id = chain.submit(fe.queue(0).unwrap(), RequestType::In, data, None);
    let waiting = s.wait_held(1);
    assert_eq!(waiting[0]["held"], false, "delayed, not held: {waiting:?}");
    extra.remove(&s, &mut fe);
    assert_eq!(
        s.ctl_json(&["held"]).as_array().map(Vec::len),
        Some(1),
        "the delay ran out before the region was removed"
    );

    let done = fe.queue(0).unwrap().wait_for(id, SOON).expect("used entry");
    assert_eq!((chain.status(), done.len), (StatusByte::IOERR, 1));
    assert!(
        extra.bytes() == vec![EXTRA_FILL; EXTRA_SIZE],
        "the daemon wrote into the removed region"
    );
    assert_eq!(outcome_at_sector(&s), "ioerr");
    assert_eq!(outside_memory(&s), 1);
    serves_after(&mut s, &mut fe, "a delayed read");
}

#[test]
fn a_status_byte_in_a_removed_region_is_not_written_and_the_chain_still_completes() {
    let mut s = Serve::start(&["--fault", "op=read,lba=64,action=hold"]);
    let mut fe = connect_with_mem_slots(&s);
    let extra = Extra::add(&s, &mut fe);
    let chain = Chain::new(&fe);
    let buf = prefilled(&fe);
    let data = Descriptor::writable(buf.gpa(), LEN as u32);
    let id = chain.submit(
        fe.queue(0).unwrap(),
        RequestType::In,
        data,
        Some(extra.gpa()),
    );
    s.wait_held(1);
    extra.remove(&s, &mut fe);

    s.ctl_ok(&["release", "--all"]);
    let done = fe.queue(0).unwrap().wait_for(id, SOON).expect("used entry");
    assert_eq!(done.len, 0, "no status byte written: used length 0");
    assert!(
        extra.bytes() == vec![EXTRA_FILL; EXTRA_SIZE],
        "the daemon wrote into the removed region"
    );
    assert_eq!(chain.status(), StatusByte::UNWRITTEN);
    assert_eq!(counter(&s, "no_status"), 1);
    assert_eq!(outcome_at_sector(&s), "no-status");
    serves_after(&mut s, &mut fe, "a status byte in a removed region");
}
