//! Protocol tests of `dmaprobe serve`, without QEMU.
//!
//! Each test starts its own daemon on a raw file in a temp dir, drives it over
//! its vhost-user socket with `backend::vhost_user_driver`, and checks what a guest and
//! the host would see: features and config space, status bytes and used
//! lengths, data in guest memory and in the file, the daemon's life across
//! disconnects and signals. A [`Serve`] kills and reaps its child on drop and
//! prints the daemon's output when the test fails.

mod common;

use std::path::Path;
use std::thread;
use std::time::Duration;

use backend::vhost_user_driver::{
    features, id_string, link, request_type, write_table, BlkRequest, Buffer, Completion,
    CompletionKind, Descriptor, DiscardRange, FrontendConfig, GuestAddress, GuestRam, Next, Queue,
    RequestType, Sector, Segment, StatusByte, DESC_F_INDIRECT, DESC_F_NEXT,
};
use common::child::{within, Serve, Start, SOON};
use common::pattern;

/// The size of the disk file most tests use.
const DISK: u64 = 8 << 20;
const DISK_SECTORS: u64 = DISK / 512;
/// Guest-physical address far outside the frontend's guest memory.
const FAR: u64 = 1 << 40;

// ---------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------

/// `dmaprobe serve EXTRA` as these tests run it: without the ledger (they
/// check the device, not what it records) and with every request in its log
/// (debug), for the report of a failed test.
fn serve<'a>(extra: &'a [&'a str]) -> Start<'a> {
    Serve::with(extra).no_ledger().log("info,backend=debug")
}

/// Starts the daemon on a fresh, sparse file of [`DISK`] bytes.
fn start(extra: &[&str]) -> Serve {
    serve(extra).disk_file(DISK, &[]).start()
}

fn no_event_idx() -> FrontendConfig {
    FrontendConfig {
        event_idx: false,
        ..FrontendConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Requests with data split over several buffers
// ---------------------------------------------------------------------------

/// Submits one request whose data lives in fresh buffers of `sizes` bytes,
/// filled from `fill` first; waits for it and returns the completion and the
/// buffers' contents afterwards, joined.
fn run_request(
    q: &mut Queue,
    kind: RequestType,
    sector: Sector,
    sizes: &[usize],
    fill: &[u8],
) -> (Completion, Vec<u8>) {
    assert_eq!(sizes.iter().sum::<usize>(), fill.len(), "sizes and fill");
    let ram = q.ram().clone();
    let bufs: Vec<Buffer> = sizes
        .iter()
        .map(|&n| ram.alloc(n).expect("alloc"))
        .collect();
    let mut at = 0;
    for b in &bufs {
        b.write_at(0, &fill[at..at + b.len()]).expect("fill buffer");
        at += b.len();
    }
    let segs: Vec<Segment> = bufs
        .iter()
        .map(|b| Segment::of(b).expect("segment"))
        .collect();
    let req = BlkRequest {
        kind,
        sector,
        data: &segs,
    };
    let id = q.submit(&req).expect("submit");
    q.kick().expect("kick");
    let done = q.wait_for(id, SOON).expect("completion");
    let back = bufs
        .iter()
        .flat_map(|b| b.read().expect("read buffer"))
        .collect();
    (done, back)
}

/// Writes `data` at `sector` from buffers of `sizes`; expects OK and used len 1.
fn write_segments(q: &mut Queue, sector: Sector, data: &[u8], sizes: &[usize]) {
    let (done, _) = run_request(q, RequestType::Out, sector, sizes, data);
    assert_eq!(done.status(), Some(StatusByte::OK), "write at {sector:?}");
    assert_eq!(done.len, 1, "a write's used length is the status byte");
}

/// Reads into buffers of `sizes` at `sector`; expects OK and used len
/// data + 1; returns the data.
fn read_segments(q: &mut Queue, sector: Sector, sizes: &[usize]) -> Vec<u8> {
    let len: usize = sizes.iter().sum();
    let (done, back) = run_request(q, RequestType::In, sector, sizes, &vec![0xee; len]);
    assert_eq!(done.status(), Some(StatusByte::OK), "read at {sector:?}");
    assert_eq!(
        usize::try_from(done.len).expect("len"),
        len + 1,
        "a read's used length is data + status"
    );
    back
}

// ---------------------------------------------------------------------------
// 1. Features and config space
// ---------------------------------------------------------------------------

#[test]
fn features_and_config_space_for_both_block_sizes() {
    for lbs in [512u32, 4096] {
        let d = start(&["--lbs", &lbs.to_string(), "--queues", "3"]);
        let mut fe = d.connect_with(FrontendConfig::default());
        let n = *fe.negotiated();
        for (bit, name) in [
            (features::VERSION_1, "VERSION_1"),
            (features::BLK_FLUSH, "FLUSH"),
            (features::BLK_DISCARD, "DISCARD"),
            (features::BLK_WRITE_ZEROES, "WRITE_ZEROES"),
            (features::BLK_MQ, "MQ"),
            (features::BLK_CONFIG_WCE, "CONFIG_WCE"),
            (features::BLK_BLK_SIZE, "BLK_SIZE"),
            (features::BLK_SEG_MAX, "SEG_MAX"),
            (features::RING_EVENT_IDX, "EVENT_IDX"),
            (features::RING_INDIRECT_DESC, "INDIRECT_DESC"),
            (features::PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        ] {
            assert_ne!(n.offered & bit, 0, "{name} not offered: {:#x}", n.offered);
        }
        assert_eq!(
            n.offered & features::BLK_RO,
            0,
            "RO offered without --read-only"
        );
        assert_eq!(n.backend_queues, 3);

        let c = fe.get_config().expect("get_config");
        assert_eq!(c.capacity, DISK_SECTORS, "capacity in 512-byte sectors");
        assert_eq!(c.capacity_bytes(), DISK);
        assert_eq!(c.blk_size, lbs, "blk_size");
        assert_eq!(c.num_queues, 3, "num_queues");
        assert!(c.seg_max > 0 && c.seg_max <= 254, "seg_max {}", c.seg_max);
        assert!(c.size_max >= 4096, "size_max {}", c.size_max);
        assert!(c.max_discard_sectors > 0 && c.max_discard_seg > 0, "{c:?}");
        assert!(
            c.max_write_zeroes_sectors > 0 && c.max_write_zeroes_seg > 0,
            "{c:?}"
        );
        assert_eq!(
            u64::from(c.discard_sector_alignment) * 512,
            u64::from(lbs),
            "discard alignment is one block"
        );

        // Exactly the asked length, for any window, including past the end.
        // (A vhost-user message carries at most 4 KiB: 1 KiB is "the whole".)
        let whole = fe.get_config_bytes(0, 1024).expect("whole config space");
        assert_eq!(whole.len(), 1024);
        assert_eq!(whole[..c.raw.len()], c.raw[..]);
        for (offset, len) in [
            (0u32, 1u32),
            (0, 8),
            (20, 4),
            (34, 2),
            (0, 60),
            (56, 16),
            (60, 12),
            (0, 72),
            (100, 8),
            (0, 256),
            (4000, 96),
            (4095, 1),
        ] {
            let got = fe.get_config_bytes(offset, len).expect("get_config_bytes");
            assert_eq!(got.len(), len as usize, "({offset}, {len})");
            let at = offset as usize;
            let zeros = vec![0u8; len as usize];
            let want = whole.get(at..at + len as usize).unwrap_or(&zeros);
            assert_eq!(
                got[..],
                want[..],
                "({offset}, {len}) differs from the same bytes of a whole read"
            );
        }
        assert!(
            whole[256..].iter().all(|&b| b == 0),
            "config past 256 bytes"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Every request type, checked against the file
// ---------------------------------------------------------------------------

fn requests_land_in_the_file(config: FrontendConfig) {
    let event_idx = config.event_idx;
    let d = start(&["--serial", "dmaprobe-test-01"]);
    let mut fe = d.connect_with(config);
    assert_eq!(fe.negotiated().has(features::RING_EVENT_IDX), event_idx);
    let q = fe.queue(0).expect("queue");

    // (sector, data split into buffers of these sizes)
    let cases: [(u64, &[usize]); 9] = [
        (0, &[512]),
        (1, &[4096]),
        (100, &[3 * 512]),
        (300, &[512, 3584, 8192, 16384]),
        (2048, &[128 << 10]),
        (4096, &[1 << 20]),
        (8192, &[256 << 10, 256 << 10, 256 << 10, 256 << 10]),
        (DISK_SECTORS - 16, &[4096]),
        (DISK_SECTORS - 1, &[512]),
    ];
    for (i, &(sector, sizes)) in cases.iter().enumerate() {
        let len: usize = sizes.iter().sum();
        let data = pattern(i as u64 + 1, len);
        write_segments(q, Sector(sector), &data, sizes);
        // Read back in one buffer, and split differently.
        assert!(
            read_segments(q, Sector(sector), &[len]) == data,
            "sector {sector} len {len}: read differs from write"
        );
        let first = (len / 3).next_multiple_of(512);
        let split = [first, len - first];
        let split: &[usize] = if len > 512 { &split } else { &[len] };
        assert_eq!(split.iter().sum::<usize>(), len);
        assert!(
            read_segments(q, Sector(sector), split) == data,
            "split read"
        );
    }
    assert_eq!(q.flush().expect("flush"), StatusByte::OK);
    for (i, &(sector, sizes)) in cases.iter().enumerate() {
        let len: usize = sizes.iter().sum();
        assert!(
            d.disk_at(sector, len) == pattern(i as u64 + 1, len),
            "file at sector {sector} does not hold the data"
        );
    }

    let (status, id) = q.get_id().expect("get_id");
    assert_eq!(status, StatusByte::OK);
    assert_eq!(id_string(&id), "dmaprobe-test-01");
    // GET_ID into a larger buffer: 20 bytes, used len 21.
    let (done, raw) = run_request(q, RequestType::GetId, Sector(0), &[64], &[0xee; 64]);
    assert_eq!(done.status(), Some(StatusByte::OK));
    assert_eq!(done.len, 21, "GET_ID writes 20 bytes and the status");
    assert_eq!(&raw[..16], b"dmaprobe-test-01");
    assert_eq!(&raw[16..20], &[0; 4], "id NUL-padded to 20 bytes");
    assert!(
        raw[20..].iter().all(|&b| b == 0xee),
        "bytes past 20 untouched"
    );

    // Discard and write-zeroes (with and without UNMAP) in a 64 KiB region of
    // data; each zeroes exactly its ranges.
    let base = 12288u64;
    let data = pattern(77, 64 << 10);
    write_segments(q, Sector(base), &data, &[64 << 10]);
    let mut expected = data.clone();
    let ranges: [(u32, &[DiscardRange]); 3] = [
        (
            request_type::DISCARD,
            &[DiscardRange {
                sector: Sector(base + 8),
                num_sectors: 8,
                flags: 0,
            }],
        ),
        (
            request_type::WRITE_ZEROES,
            &[
                DiscardRange {
                    sector: Sector(base + 32),
                    num_sectors: 1,
                    flags: 0,
                },
                DiscardRange {
                    sector: Sector(base + 40),
                    num_sectors: 16,
                    flags: 0,
                },
            ],
        ),
        (
            request_type::WRITE_ZEROES,
            &[DiscardRange {
                sector: Sector(base + 100),
                num_sectors: 9,
                flags: DiscardRange::UNMAP,
            }],
        ),
    ];
    for (kind, rs) in ranges {
        let status = if kind == request_type::DISCARD {
            q.discard(rs).expect("discard")
        } else {
            q.write_zeroes(rs).expect("write_zeroes")
        };
        assert_eq!(status, StatusByte::OK, "type {kind} {rs:?}");
        for r in rs {
            let from = usize::try_from((r.sector.0 - base) * 512).expect("offset");
            let to = from + usize::try_from(r.num_sectors).expect("n") * 512;
            expected[from..to].fill(0);
        }
        let back = read_segments(q, Sector(base), &[64 << 10]);
        assert!(back == expected, "device: type {kind} {rs:?}");
        assert!(
            d.disk_at(base, 64 << 10) == expected,
            "file: type {kind} {rs:?}"
        );
    }
    assert_eq!(q.in_flight(), 0);
    assert_eq!(q.stats().unknown_used, 0);
    assert_eq!(d.disk_len(), DISK, "the file keeps its size");
}

#[test]
fn requests_land_in_the_file_with_event_idx() {
    requests_land_in_the_file(FrontendConfig::default());
}

#[test]
fn requests_land_in_the_file_without_event_idx() {
    requests_land_in_the_file(no_event_idx());
}

#[test]
fn lbs_4096_refuses_requests_not_aligned_to_4096() {
    let d = start(&["--lbs", "4096"]);
    let mut fe = d.connect_with(FrontendConfig::default());
    let q = fe.queue(0).expect("queue");

    let before = pattern(1, 16384);
    write_segments(q, Sector(0), &before, &[16384]);
    write_segments(q, Sector(8), &pattern(2, 4096), &[512, 3584]);
    let last = DISK_SECTORS - 8;
    write_segments(q, Sector(last), &pattern(3, 4096), &[4096]);
    assert!(read_segments(q, Sector(last), &[4096]) == pattern(3, 4096));
    assert!(d.disk_at(last, 4096) == pattern(3, 4096));
    let mut now = before.clone();
    now[4096..8192].copy_from_slice(&pattern(2, 4096));

    // 512-byte aligned, not 4096-byte aligned: start or length.
    for (kind, sector, len) in [
        (RequestType::Out, 1, 4096),
        (RequestType::Out, 4, 4096),
        (RequestType::Out, 8, 512),
        (RequestType::Out, 8, 6144),
        (RequestType::In, 1, 4096),
        (RequestType::In, 8, 512),
        (RequestType::In, last + 4, 4096),
    ] {
        let (done, _) = run_request(q, kind, Sector(sector), &[len], &pattern(9, len));
        assert_eq!(
            done.status(),
            Some(StatusByte::IOERR),
            "{kind:?} sector {sector} len {len}"
        );
        assert_eq!(done.len, 1, "{kind:?} sector {sector} len {len}");
    }
    for (sector, num_sectors) in [(1, 8), (8, 4), (8, 12)] {
        let r = [DiscardRange {
            sector: Sector(sector),
            num_sectors,
            flags: 0,
        }];
        assert_eq!(q.discard(&r).expect("discard"), StatusByte::IOERR, "{r:?}");
        assert_eq!(q.write_zeroes(&r).expect("wz"), StatusByte::IOERR, "{r:?}");
    }
    assert!(
        d.disk_at(0, 16384) == now,
        "refused requests changed the file"
    );
    let r = [DiscardRange {
        sector: Sector(16),
        num_sectors: 8,
        flags: 0,
    }];
    assert_eq!(q.write_zeroes(&r).expect("wz"), StatusByte::OK);
    now[8192..12288].fill(0);
    assert!(read_segments(q, Sector(0), &[16384]) == now);
    assert!(d.disk_at(0, 16384) == now);
}

// ---------------------------------------------------------------------------
// 3. Malformed chains
// ---------------------------------------------------------------------------

/// Hand-built chains on one queue, with buffers for a header, data, a status
/// byte and indirect tables.
struct Raw<'a> {
    q: &'a mut Queue,
    ram: GuestRam,
    hdr: Buffer,
    data: Buffer,
    status: Buffer,
    table: Buffer,
    table2: Buffer,
    /// Good write+read pairs done so far (each at its own sector).
    good: u64,
}

const DATA_FILL: u8 = 0x5a;
const GOOD_BASE: u64 = 8192;

fn r(addr: u64, len: u32) -> Descriptor {
    Descriptor::readable(GuestAddress(addr), len)
}

fn w(addr: u64, len: u32) -> Descriptor {
    Descriptor::writable(GuestAddress(addr), len)
}

fn linked(descs: &[Descriptor]) -> Vec<Descriptor> {
    let mut v = descs.to_vec();
    link(&mut v);
    v
}

impl<'a> Raw<'a> {
    fn new(q: &'a mut Queue) -> Self {
        let ram = q.ram().clone();
        let alloc = |n| ram.alloc(n).expect("alloc");
        Raw {
            hdr: alloc(64),
            data: alloc(16384),
            status: alloc(64),
            table: alloc(8192),
            table2: alloc(4096),
            ram: ram.clone(),
            q,
            good: 0,
        }
    }

    fn h(&self) -> u64 {
        self.hdr.gpa().0
    }
    fn d(&self) -> u64 {
        self.data.gpa().0
    }
    fn s(&self) -> u64 {
        self.status.gpa().0
    }

    /// Writes a header and presets the data buffer (to see whether the device
    /// wrote into it).
    fn header(&self, kind: u32, sector: u64) {
        self.data.fill(DATA_FILL).expect("preset data");
        self.hdr
            .write_at(
                0,
                &backend::vhost_user_driver::encode_header(kind, Sector(sector)),
            )
            .expect("header");
    }

    /// Discard / write-zeroes payload at the start of the data buffer.
    fn ranges(&self, ranges: &[DiscardRange]) -> u32 {
        let bytes: Vec<u8> = ranges.iter().flat_map(|r| r.encode()).collect();
        self.data.write_at(0, &bytes).expect("ranges");
        u32::try_from(bytes.len()).expect("payload length")
    }

    /// Pushes `descs` exactly as given, kicks, and waits for the used entry.
    fn run(&mut self, descs: &[Descriptor]) -> Completion {
        self.status
            .fill(StatusByte::UNWRITTEN.0)
            .expect("preset status");
        let id = self.q.push_chain(descs).expect("push_chain");
        self.q.kick().expect("kick");
        let done = self.q.wait_for(id, SOON).expect("completion");
        assert_eq!(done.kind, CompletionKind::Raw);
        done
    }

    /// Runs `descs` and checks the used length and the byte at the status
    /// buffer (`StatusByte::UNWRITTEN`: the device must not have written it).
    fn expect(&mut self, case: &str, descs: &[Descriptor], status: StatusByte, used_len: u32) {
        let done = self.run(descs);
        let got = StatusByte(self.status.read().expect("status")[0]);
        assert_eq!(
            (got, done.len),
            (status, used_len),
            "{case}: (status, used len)"
        );
    }

    fn data_untouched(&self, case: &str) {
        assert!(
            self.data
                .read()
                .expect("data")
                .iter()
                .all(|&b| b == DATA_FILL),
            "{case}: the device wrote into the data buffer"
        );
    }

    /// A good write and read on the same queue, which must succeed.
    fn good_io(&mut self, d: &Serve, case: &str) {
        self.good += 1;
        let sector = Sector(GOOD_BASE + 8 * self.good);
        let data = pattern(1000 + self.good, 4096);
        assert_eq!(
            self.q.write(sector, &data).expect("good write"),
            StatusByte::OK,
            "good write after {case}"
        );
        let (status, back) = self.q.read(sector, 4096).expect("good read");
        assert_eq!(status, StatusByte::OK, "good read after {case}");
        assert!(back == data, "good read after {case} returned other data");
        assert!(
            d.disk_at(sector.0, 4096) == data,
            "good write after {case} is not in the file"
        );
    }
}

#[test]
fn malformed_chains_get_an_error_and_the_daemon_keeps_serving() {
    use request_type::{DISCARD, GET_ID, IN, OUT, WRITE_ZEROES};
    let mut d = start(&[]);
    let mut fe = d.connect_with(FrontendConfig::default());
    let config = fe.get_config().expect("config");
    let mem_end = fe.ram().size();
    let q = fe.queue(0).expect("queue");
    let qsize = q.size();
    let cap = config.capacity;
    let seg_max = config.seg_max;

    // A known pattern at sectors 0..64 that no refused request may change.
    let guard = pattern(4242, 64 * 512);
    q.write(Sector(0), &guard).expect("write guard");
    let mut raw = Raw::new(q);
    let (h, dd, s) = (raw.h(), raw.d(), raw.s());
    let unwritten = StatusByte::UNWRITTEN;

    // Each case: set up the header (and payload), run, check, then a good
    // write+read on the same queue.
    macro_rules! case {
        ($name:expr, $descs:expr, $status:expr, $len:expr) => {{
            raw.expect($name, &$descs, $status, $len);
            raw.good_io(&d, $name);
        }};
    }

    // -- No status byte the device can write: used length 0, nothing written.
    raw.header(OUT, 8);
    case!(
        "no status descriptor (write)",
        linked(&[r(h, 16), r(dd, 512)]),
        unwritten,
        0
    );
    raw.header(IN, 8);
    case!(
        "no status descriptor (read)",
        linked(&[r(h, 16)]),
        unwritten,
        0
    );
    raw.header(OUT, 8);
    case!(
        "status descriptor not writable (write)",
        linked(&[r(h, 16), r(dd, 512), r(s, 1)]),
        unwritten,
        0
    );
    raw.header(IN, 8);
    case!(
        "status outside guest memory",
        linked(&[r(h, 16), w(dd, 512), w(FAR, 1)]),
        unwritten,
        0
    );
    raw.data_untouched("status outside guest memory");
    case!(
        "status straddling the end of guest memory",
        linked(&[r(h, 16), w(dd, 512), w(mem_end - 1, 2)]),
        unwritten,
        0
    );

    // -- Status descriptor readable on a read: the last writable byte (the
    // end of the data buffer) is where the any-layout status goes.
    raw.header(IN, 8);
    raw.expect(
        "status descriptor not writable (read)",
        &linked(&[r(h, 16), w(dd, 512), r(s, 1)]),
        unwritten,
        1,
    );
    let data = raw.data.read().expect("data");
    assert_eq!(
        data[511],
        StatusByte::IOERR.0,
        "status at the last writable byte"
    );
    assert!(data[..511].iter().all(|&b| b == DATA_FILL), "no data read");
    raw.good_io(&d, "status descriptor not writable (read)");
    raw.header(IN, 8);
    case!(
        "readable descriptor after a writable one",
        linked(&[r(h, 16), w(dd, 512), r(dd + 4096, 16), w(s, 1)]),
        StatusByte::IOERR,
        1
    );

    // -- Bad header.
    raw.header(IN, 8);
    case!(
        "header of 8 bytes",
        linked(&[r(h, 8), w(dd, 512), w(s, 1)]),
        StatusByte::IOERR,
        1
    );
    case!(
        "header of 15 bytes",
        linked(&[r(h, 15), w(s, 1)]),
        StatusByte::IOERR,
        1
    );
    let hdr_before = raw.hdr.read().expect("header");
    case!(
        "header in a writable descriptor",
        linked(&[w(h, 16), w(dd, 512), w(s, 1)]),
        StatusByte::IOERR,
        1
    );
    assert_eq!(
        raw.hdr.read().expect("header"),
        hdr_before,
        "header written"
    );
    case!(
        "header outside guest memory",
        linked(&[r(FAR, 16), w(dd, 512), w(s, 1)]),
        StatusByte::IOERR,
        1
    );

    // -- Data of the wrong direction.
    raw.header(IN, 8);
    case!(
        "read with device-readable data",
        linked(&[r(h, 16), r(dd, 512), w(s, 1)]),
        StatusByte::IOERR,
        1
    );
    raw.data_untouched("read with device-readable data");
    raw.header(OUT, 8);
    case!(
        "write with device-writable data",
        linked(&[r(h, 16), w(dd, 512), w(s, 1)]),
        StatusByte::IOERR,
        1
    );
    raw.header(GET_ID, 0);
    case!(
        "GET_ID with device-readable data",
        linked(&[r(h, 16), r(dd, 20), w(s, 1)]),
        StatusByte::IOERR,
        1
    );

    // -- Data outside guest memory.
    raw.header(IN, 8);
    case!(
        "read into memory outside the guest",
        linked(&[r(h, 16), w(FAR, 512), w(s, 1)]),
        StatusByte::IOERR,
        1
    );
    case!(
        "read straddling the end of guest memory",
        linked(&[r(h, 16), w(mem_end - 256, 512), w(s, 1)]),
        StatusByte::IOERR,
        1
    );
    case!(
        "read with a second data segment outside the guest",
        linked(&[r(h, 16), w(dd, 512), w(FAR, 512), w(s, 1)]),
        StatusByte::IOERR,
        1
    );
    raw.header(OUT, 8);
    case!(
        "write from memory outside the guest",
        linked(&[r(h, 16), r(FAR, 512), w(s, 1)]),
        StatusByte::IOERR,
        1
    );

    // -- Sector ranges.
    for (sector, len, what) in [
        (u64::MAX, 512, "sector u64::MAX"),
        (u64::MAX / 512 + 1, 512, "byte offset overflows"),
        (u64::MAX / 512, 1024, "byte end overflows"),
        (cap - 1, 1024, "range ending past the capacity"),
        (cap, 512, "range starting at the capacity"),
        (8, 100, "length not a multiple of 512"),
        (8, 1000, "length not a multiple of 512"),
    ] {
        for (kind, dir) in [(IN, "read"), (OUT, "write")] {
            raw.header(kind, sector);
            let data = if kind == IN { w(dd, len) } else { r(dd, len) };
            let name = format!("{dir}: {what} (sector {sector}, {len} bytes)");
            case!(
                &name,
                linked(&[r(h, 16), data, w(s, 1)]),
                StatusByte::IOERR,
                1
            );
            if kind == IN {
                raw.data_untouched(&name);
            }
        }
    }

    // -- Discard and write-zeroes payloads.
    let range = |sector: u64, num_sectors: u32, flags: u32| DiscardRange {
        sector: Sector(sector),
        num_sectors,
        flags,
    };
    for (kind, ranges, status, what) in [
        (
            DISCARD,
            vec![range(cap - 8, 16, 0)],
            StatusByte::IOERR,
            "past the end",
        ),
        (
            WRITE_ZEROES,
            vec![range(cap, 1, 0)],
            StatusByte::IOERR,
            "past the end",
        ),
        (
            DISCARD,
            vec![range(u64::MAX, 1, 0)],
            StatusByte::IOERR,
            "sector u64::MAX",
        ),
        (
            DISCARD,
            vec![range(8, 8, 0), range(cap - 8, 16, 0)],
            StatusByte::IOERR,
            "a good range then a bad one",
        ),
        (
            WRITE_ZEROES,
            vec![range(8, 8, 0), range(16, 3, 0), range(cap, 8, 0)],
            StatusByte::IOERR,
            "good ranges then a bad one",
        ),
        (
            DISCARD,
            vec![range(8, 8, 1)],
            StatusByte::UNSUPP,
            "the UNMAP flag",
        ),
        (
            WRITE_ZEROES,
            vec![range(8, 8, 2)],
            StatusByte::UNSUPP,
            "reserved flag bit 1",
        ),
        (
            WRITE_ZEROES,
            vec![range(8, 8, 1 << 31)],
            StatusByte::UNSUPP,
            "reserved flag bit 31",
        ),
        (
            DISCARD,
            (0..=config.max_discard_seg)
                .map(|i| range(8 + u64::from(i), 1, 0))
                .collect(),
            StatusByte::IOERR,
            "more ranges than max_discard_seg",
        ),
    ] {
        raw.header(kind, 0);
        let len = raw.ranges(&ranges);
        let name = format!("type {kind}: {what}");
        case!(&name, linked(&[r(h, 16), r(dd, len), w(s, 1)]), status, 1);
    }
    for (kind, len) in [(DISCARD, 24), (DISCARD, 8), (WRITE_ZEROES, 17)] {
        raw.header(kind, 0);
        raw.ranges(&[range(8, 8, 0), range(16, 8, 0)]);
        let name = format!("type {kind}: payload of {len} bytes");
        case!(
            &name,
            linked(&[r(h, 16), r(dd, len), w(s, 1)]),
            StatusByte::IOERR,
            1
        );
    }
    raw.header(WRITE_ZEROES, 0);
    case!(
        "write-zeroes without payload",
        linked(&[r(h, 16), w(s, 1)]),
        StatusByte::IOERR,
        1
    );

    // -- Unknown types.
    for kind in [2u32, 3, 14, 99, u32::MAX] {
        raw.header(kind, 0);
        let name = format!("unknown type {kind}");
        case!(&name, linked(&[r(h, 16), w(s, 1)]), StatusByte::UNSUPP, 1);
        case!(
            &name,
            linked(&[r(h, 16), w(dd, 512), w(s, 1)]),
            StatusByte::UNSUPP,
            1
        );
    }

    // -- Broken chains: loops, next out of range. No status: used length 0.
    raw.header(IN, 8);
    let mut looped = linked(&[r(h, 16), w(dd, 512), w(s, 1)]);
    looped[2] = looped[2].with_flags(DESC_F_NEXT).with_next(Next::Entry(0));
    case!("a loop back to the head", looped, unwritten, 0);
    raw.data_untouched("a loop back to the head");
    let mut self_loop = linked(&[r(h, 16)]);
    self_loop[0] = self_loop[0]
        .with_flags(DESC_F_NEXT)
        .with_next(Next::Entry(0));
    case!("a descriptor pointing at itself", self_loop, unwritten, 0);
    let mut dangling = linked(&[r(h, 16), w(dd, 512), w(s, 1)]);
    dangling[2] = dangling[2]
        .with_flags(DESC_F_NEXT)
        .with_next(Next::Raw(qsize));
    case!("next out of range", dangling, unwritten, 0);

    // -- Bad heads in the avail ring: nothing to return, since the used ring
    // cannot name them; the queue goes on.
    for head in [qsize, u16::MAX] {
        raw.q.publish_head(head).expect("publish_head");
        raw.q.kick().expect("kick");
        raw.good_io(&d, &format!("head {head} in the avail ring"));
    }
    let mut rest = Vec::new();
    raw.q.poll(&mut rest).expect("poll");
    assert!(rest.is_empty(), "used entries for bad heads: {rest:?}");
    assert_eq!(raw.q.stats().unknown_used, 0);

    // -- Indirect tables.
    let (t, t2) = (raw.table.gpa(), raw.table2.gpa());
    raw.header(IN, 8);
    let inner = linked(&[r(h, 16), w(dd, 4096), w(s, 1)]);
    write_table(&raw.ram, t, &inner).expect("table");
    raw.expect(
        "a good indirect read",
        &[Descriptor::indirect(t, 3)],
        StatusByte::OK,
        4097,
    );
    assert!(raw.data.read().expect("data")[..4096] == guard[4096..8192]);
    let bad_len = |len: u32| Descriptor {
        addr: t,
        len,
        flags: DESC_F_INDIRECT,
        next: Next::Auto,
    };
    case!("an indirect table of 40 bytes", [bad_len(40)], unwritten, 0);
    case!("an indirect table of 0 bytes", [bad_len(0)], unwritten, 0);
    case!(
        "an indirect table outside guest memory",
        [Descriptor::indirect(GuestAddress(FAR), 3)],
        unwritten,
        0
    );
    raw.header(IN, 8);
    let nested = linked(&[r(h, 16), w(dd, 4096), Descriptor::indirect(t2, 1)]);
    write_table(&raw.ram, t, &nested).expect("table");
    write_table(&raw.ram, t2, &[w(s, 1)]).expect("table2");
    case!(
        "a nested indirect table",
        [Descriptor::indirect(t, 3)],
        unwritten,
        0
    );
    raw.data_untouched("a nested indirect table");
    let mut table_loop = inner.clone();
    table_loop[2] = table_loop[2]
        .with_flags(DESC_F_NEXT)
        .with_next(Next::Entry(0));
    write_table(&raw.ram, t, &table_loop).expect("table");
    case!(
        "a loop in an indirect table",
        [Descriptor::indirect(t, 3)],
        unwritten,
        0
    );

    // -- More data segments than seg_max (only possible with indirect tables),
    // and exactly seg_max.
    for (n, status, used) in [
        (seg_max, StatusByte::OK, seg_max * 512 + 1),
        (seg_max + 1, StatusByte::IOERR, 1),
    ] {
        let mut descs = vec![r(h, 16)];
        descs.extend((0..n).map(|i| w(dd + u64::from(i % 32) * 512, 512)));
        descs.push(w(s, 1));
        link(&mut descs);
        write_table(&raw.ram, t, &descs).expect("table");
        let entries = u16::try_from(descs.len()).expect("entries");
        let name = format!("{n} data segments (seg_max {seg_max})");
        case!(&name, [Descriptor::indirect(t, entries)], status, used);
    }

    // Nothing refused reached the media; the file kept its size; the daemon
    // is alive and the queue has nothing left over.
    raw.q.flush().expect("flush");
    assert!(
        d.disk_at(0, guard.len()) == guard,
        "a refused request changed the media"
    );
    assert_eq!(d.disk_len(), DISK, "the file changed size");
    assert_eq!(raw.q.stats().unknown_used, 0);
    drop(raw);
    drop(fe);
    d.assert_alive();
    // And the next frontend is served.
    let mut fe = d.connect_with(FrontendConfig::default());
    let (status, back) = fe.read(0, Sector(0), guard.len()).expect("read");
    assert_eq!(status, StatusByte::OK);
    assert!(back == guard);
    d.assert_alive();
}

#[test]
fn read_only_device_refuses_every_write() {
    let content = pattern(5, 1 << 20);
    let mut d = serve(&["--read-only"])
        .disk_file(DISK, &[(0, &content[..])])
        .start();
    let mut fe = d.connect_with(FrontendConfig::default());
    assert!(fe.negotiated().has(features::BLK_RO), "RO not offered");
    let q = fe.queue(0).expect("queue");

    let (done, _) = run_request(q, RequestType::Out, Sector(0), &[4096], &[0xab; 4096]);
    assert_eq!(
        (done.status(), done.len),
        (Some(StatusByte::IOERR), 1),
        "write"
    );
    let (done, _) = run_request(q, RequestType::Out, Sector(8), &[512; 3], &[0xab; 1536]);
    assert_eq!(
        (done.status(), done.len),
        (Some(StatusByte::IOERR), 1),
        "write"
    );
    let range = [DiscardRange {
        sector: Sector(0),
        num_sectors: 8,
        flags: 0,
    }];
    assert_eq!(
        q.discard(&range).expect("discard"),
        StatusByte::IOERR,
        "discard"
    );
    assert_eq!(
        q.write_zeroes(&range).expect("wz"),
        StatusByte::IOERR,
        "write-zeroes"
    );
    assert_eq!(q.flush().expect("flush"), StatusByte::OK, "flush");
    let (status, id) = q.get_id().expect("get_id");
    assert_eq!(
        (status, id_string(&id).as_str()),
        (StatusByte::OK, "dmaprobe")
    );
    assert!(read_segments(q, Sector(0), &[1 << 20]) == content, "read");
    assert!(d.disk_at(0, content.len()) == content, "the file changed");
    d.assert_alive();
}

// ---------------------------------------------------------------------------
// 4. Queues in parallel
// ---------------------------------------------------------------------------

/// Submits `depth` writes at once on `q`, then `depth` reads of the same
/// sectors; completions are taken in whatever order they come.
fn deep_round_trip(q: &mut Queue, first: u64, depth: usize, len: usize, seed: u64) {
    let ram = q.ram().clone();
    let bufs: Vec<Buffer> = (0..depth).map(|_| ram.alloc(len).expect("alloc")).collect();
    let sector = |i: usize| Sector(first + (i * len / 512) as u64);
    let mut by_chain = vec![usize::MAX; usize::from(q.size())];
    for (read, kind) in [(false, RequestType::Out), (true, RequestType::In)] {
        for (i, buf) in bufs.iter().enumerate() {
            if read {
                buf.fill(0xee).expect("clear");
            } else {
                buf.write_at(0, &pattern(seed + i as u64, len))
                    .expect("fill");
            }
            let seg = [Segment::of(buf).expect("segment")];
            let req = BlkRequest {
                kind,
                sector: sector(i),
                data: &seg,
            };
            by_chain[q.submit(&req).expect("submit").index()] = i;
        }
        q.kick().expect("kick");
        assert_eq!(q.in_flight(), depth);
        let mut done = Vec::with_capacity(depth);
        while done.len() < depth {
            q.wait(&mut done, SOON).expect("completions");
        }
        assert_eq!(done.len(), depth, "more completions than requests");
        let mut seen = vec![false; depth];
        for c in &done {
            assert_eq!(c.status(), Some(StatusByte::OK), "{kind:?} {c:?}");
            let want_len = if read { len + 1 } else { 1 };
            assert_eq!(usize::try_from(c.len).expect("len"), want_len, "{c:?}");
            let i = by_chain[c.chain().expect("known chain").index()];
            assert!(!seen[i], "request {i} completed twice");
            seen[i] = true;
            if read {
                assert!(
                    bufs[i].read().expect("buffer") == pattern(seed + i as u64, len),
                    "read {i} at {:?} returned other data",
                    sector(i)
                );
            }
        }
    }
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn two_queues_in_parallel_with_many_requests_in_flight() {
    let mut d = start(&["--queues", "2", "--queue-size", "128"]);
    let mut fe = d.connect_with(FrontendConfig {
        num_queues: 2,
        queue_size: 128,
        ..FrontendConfig::default()
    });
    const DEPTH: usize = 40;
    const ROUNDS: u64 = 4;
    let lens = [4096usize, 8192, 512, 65536];
    // Each queue has its own region, large enough for the longest round.
    let region = (DEPTH * 65536 / 512) as u64;
    let seed = |qi: u64, round: u64| qi << 32 | round << 16;
    thread::scope(|s| {
        for (qi, q) in fe.queues_mut().iter_mut().enumerate() {
            let qi = qi as u64;
            s.spawn(move || {
                for round in 0..ROUNDS {
                    let len = lens[usize::try_from(round).expect("round")];
                    deep_round_trip(q, qi * region, DEPTH, len, seed(qi, round));
                }
            });
        }
    });
    for (i, q) in fe.queues_mut().iter().enumerate() {
        let stats = q.stats();
        assert_eq!(
            stats.submitted,
            ROUNDS * 2 * DEPTH as u64,
            "queue {i}: {stats:?}"
        );
        assert_eq!(stats.completed, stats.submitted, "queue {i}: {stats:?}");
        assert_eq!(stats.unknown_used, 0, "queue {i}: {stats:?}");
    }
    // The last round's data is in the file, in each queue's region.
    let last = lens[lens.len() - 1];
    for qi in 0..2u64 {
        for i in 0..DEPTH {
            let sector = qi * region + (i * last / 512) as u64;
            assert!(
                d.disk_at(sector, last) == pattern(seed(qi, ROUNDS - 1) + i as u64, last),
                "queue {qi} request {i} is not in the file"
            );
        }
    }
    d.assert_alive();
}

// ---------------------------------------------------------------------------
// 5. Disconnect and reconnect
// ---------------------------------------------------------------------------

#[test]
fn a_second_frontend_reads_what_the_first_wrote() {
    let d = start(&[]);
    let cases = [(0u64, 4096usize), (777, 512), (DISK_SECTORS - 64, 32768)];
    {
        let mut fe = d.connect_with(FrontendConfig::default());
        for (i, &(sector, len)) in cases.iter().enumerate() {
            let status = fe.write(0, Sector(sector), &pattern(i as u64, len));
            assert_eq!(status.expect("write"), StatusByte::OK);
        }
    }
    for config in [no_event_idx(), FrontendConfig::default()] {
        let mut fe = d.connect_with(config);
        assert_eq!(fe.get_config().expect("config").capacity, DISK_SECTORS);
        for (i, &(sector, len)) in cases.iter().enumerate() {
            let (status, back) = fe.read(0, Sector(sector), len).expect("read");
            assert_eq!(status, StatusByte::OK);
            assert!(back == pattern(i as u64, len), "sector {sector}");
        }
    }
}

/// A vhost-user session set up as far as SET_MEM_TABLE, then dropped.
fn connect_up_to_set_mem_table(socket: &Path) {
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
    use vm_memory::GuestMemoryBackend;

    let ram = GuestRam::new(1 << 20).expect("guest ram");
    let mut vu = Frontend::connect(socket, 1).expect("connect");
    vu.set_owner().expect("SET_OWNER");
    let offered = vu.get_features().expect("GET_FEATURES");
    vu.set_features(offered & (features::VERSION_1 | features::PROTOCOL_FEATURES))
        .expect("SET_FEATURES");
    let proto = vu.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    vu.set_protocol_features(
        proto & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
    )
    .expect("SET_PROTOCOL_FEATURES");
    let regions = ram
        .mem()
        .iter()
        .map(|region| VhostUserMemoryRegionInfo::from_guest_region(region).expect("region"))
        .collect::<Vec<_>>();
    vu.set_mem_table(&regions).expect("SET_MEM_TABLE");
}

#[test]
fn frontends_that_vanish_mid_session_do_not_stop_the_daemon() {
    let mut d = start(&[]);
    let good = |d: &mut Serve, seed: u64| {
        let mut fe = d.connect_with(FrontendConfig::default());
        let data = pattern(seed, 8192);
        assert_eq!(
            fe.write(0, Sector(15000), &data).expect("write"),
            StatusByte::OK
        );
        let (status, back) = fe.read(0, Sector(15000), 8192).expect("read");
        assert_eq!(status, StatusByte::OK);
        assert!(back == data, "after frontend {seed}");
        d.assert_alive();
    };
    good(&mut d, 0);

    // Many requests submitted and kicked, more published without a kick, then
    // gone without waiting for any of them.
    {
        let mut fe = d.connect_with(FrontendConfig::default());
        let q = fe.queue(0).expect("queue");
        let ram = q.ram().clone();
        let bufs: Vec<Buffer> = (0..80).map(|_| ram.alloc(65536).expect("alloc")).collect();
        for (i, buf) in bufs.iter().enumerate() {
            let seg = [Segment::of(buf).expect("segment")];
            let req = BlkRequest {
                kind: if i % 2 == 0 {
                    RequestType::Out
                } else {
                    RequestType::In
                },
                sector: Sector(128 * i as u64),
                data: &seg,
            };
            q.submit(&req).expect("submit");
            if i == 63 {
                q.kick().expect("kick");
            }
        }
        q.publish().expect("publish");
    }
    good(&mut d, 1);

    // Gone right after SET_MEM_TABLE.
    connect_up_to_set_mem_table(&d.socket);
    good(&mut d, 2);

    // Gone right after connecting, before any message.
    drop(std::os::unix::net::UnixStream::connect(&d.socket).expect("connect"));
    good(&mut d, 3);
    d.assert_idle("after the frontends vanished", Duration::from_millis(300));
}

#[test]
fn an_avail_index_more_than_a_queue_ahead_is_survived() {
    for event_idx in [false, true] {
        let mut d = start(&[]);
        let mut fe = d.connect_with(FrontendConfig {
            event_idx,
            ..FrontendConfig::default()
        });
        let ram = fe.ram().clone();
        let q = fe.queue(0).expect("queue");
        let data = pattern(8, 4096);
        assert_eq!(q.write(Sector(64), &data).expect("write"), StatusByte::OK);
        // One request done: avail.idx is 1. Claim a queue and one more entries.
        let idx_at = GuestAddress(q.avail_ring().0 + 2);
        let good_idx = ram.read_vec(idx_at, 2).expect("avail.idx");
        assert_eq!(good_idx, [1, 0]);
        let bogus = 1 + q.size() + 1;
        ram.write(idx_at, &bogus.to_le_bytes())
            .expect("bogus avail.idx");
        q.force_notify().expect("kick");
        d.assert_idle(
            &format!("avail.idx {bogus} with next avail 1 (event_idx {event_idx})"),
            Duration::from_millis(300),
        );
        // The driver puts the index back; the queue works again.
        ram.write(idx_at, &good_idx).expect("restore avail.idx");
        let (status, back) = q.read(Sector(64), 4096).expect("read");
        assert_eq!((status, back == data), (StatusByte::OK, true));
        drop(fe);
        d.assert_alive();
    }
}

#[test]
fn stopping_a_busy_queue_leaves_no_worker_spinning() {
    for event_idx in [false, true] {
        let mut d = start(&[]);
        let config = FrontendConfig {
            event_idx,
            ..FrontendConfig::default()
        };
        let mut fe = d.connect_with(config.clone());
        let q = fe.queue(0).expect("queue");
        let ram = q.ram().clone();
        let bufs: Vec<Buffer> = (0..64)
            .map(|_| ram.alloc(256 << 10).expect("alloc"))
            .collect();
        for (i, buf) in bufs.iter().enumerate() {
            let seg = [Segment::of(buf).expect("segment")];
            let req = BlkRequest {
                kind: RequestType::In,
                sector: Sector(512 * (i as u64 % 16)),
                data: &seg,
            };
            q.submit(&req).expect("submit");
        }
        q.kick().expect("kick");
        // GET_VRING_BASE while the device works through the queue, as QEMU
        // does when the guest resets the device with requests in flight.
        let base = within("GET_VRING_BASE", SOON, move || {
            let base = fe.stop_queue(0).map_err(|e| e.to_string());
            (fe, base, bufs)
        });
        let (fe, base, bufs) = base;
        let base = base.expect("GET_VRING_BASE");
        assert!(base <= 64, "next avail {base}");
        d.assert_idle(
            &format!("queue stopped (event_idx {event_idx}, next avail {base})"),
            Duration::from_millis(300),
        );
        drop(fe);
        drop(bufs);
        let mut fe = d.connect_with(config);
        let data = pattern(3, 4096);
        assert_eq!(
            fe.write(0, Sector(15000), &data).expect("write"),
            StatusByte::OK
        );
        let (status, back) = fe.read(0, Sector(15000), 4096).expect("read");
        assert_eq!((status, back == data), (StatusByte::OK, true));
        d.assert_idle(
            &format!("next frontend (event_idx {event_idx})"),
            Duration::from_millis(300),
        );
    }
}

// ---------------------------------------------------------------------------
// 6. Signals
// ---------------------------------------------------------------------------

#[test]
fn sigterm_stops_the_daemon_cleanly_with_the_data_in_the_file() {
    let mut d = start(&[]);
    let mut fe = d.connect_with(FrontendConfig::default());
    let cases = [(0u64, 4096usize), (4000, 65536), (DISK_SECTORS - 1, 512)];
    for (i, &(sector, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 50, len);
        assert_eq!(
            fe.write(0, Sector(sector), &data).expect("write"),
            StatusByte::OK
        );
    }
    // The frontend is still connected, and never flushed.
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    for (i, &(sector, len)) in cases.iter().enumerate() {
        assert!(
            d.disk_at(sector, len) == pattern(i as u64 + 50, len),
            "sector {sector} not in the file"
        );
    }
    assert_eq!(d.disk_len(), DISK);
    assert!(!d.socket.exists(), "the socket was left behind");
    drop(fe);
}

#[test]
fn sigint_between_frontends_exits_zero() {
    let mut d = start(&[]);
    {
        let mut fe = d.connect_with(no_event_idx());
        let data = pattern(60, 4096);
        assert_eq!(
            fe.write(0, Sector(8), &data).expect("write"),
            StatusByte::OK
        );
    }
    d.signal(libc::SIGINT);
    let status = d.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "exit status after SIGINT: {status}");
    assert!(d.disk_at(8, 4096) == pattern(60, 4096));
}

// ---------------------------------------------------------------------------
// 7. The file is never resized
// ---------------------------------------------------------------------------

#[test]
fn an_existing_file_is_used_at_its_own_size() {
    let ends = pattern(88, 4096);
    let mut d = serve(&[])
        .disk_file(DISK, &[(0, &ends[..]), (DISK_SECTORS - 8, &ends[..])])
        .start();
    let mut fe = d.connect_with(FrontendConfig::default());
    assert_eq!(fe.get_config().expect("config").capacity_bytes(), DISK);
    let (status, head) = fe.read(0, Sector(0), 4096).expect("read head");
    assert_eq!((status, head == ends), (StatusByte::OK, true), "head kept");
    let (status, tail) = fe
        .read(0, Sector(DISK_SECTORS - 8), 4096)
        .expect("read tail");
    assert_eq!((status, tail == ends), (StatusByte::OK, true), "tail kept");
    drop(fe);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(Duration::from_secs(5)).success());
    assert_eq!(d.disk_len(), DISK);

    // A missing file is created at --size.
    let d = serve(&[]).size(Some("4M")).start();
    let mut fe = d.connect_with(FrontendConfig::default());
    assert_eq!(fe.get_config().expect("config").capacity_bytes(), 4 << 20);
    assert_eq!(d.disk_len(), 4 << 20);
}

#[test]
fn a_size_that_differs_from_the_file_is_refused_and_the_file_is_kept() {
    for (size, bytes) in [("16M", 16u64 << 20), ("4M", 4 << 20)] {
        let ends = pattern(88, 4096);
        let mut d = serve(&["--size", size])
            .disk_file(DISK, &[(0, &ends[..]), (DISK_SECTORS - 8, &ends[..])])
            .spawn();
        let status = d.wait_exit(SOON);
        assert!(
            !status.success(),
            "--size {size} on an 8 MiB file: {status}"
        );
        let err = d.stderr();
        for needle in [
            d.disk.display().to_string(),
            DISK.to_string(),
            bytes.to_string(),
        ] {
            assert!(err.contains(&needle), "stderr lacks {needle:?}:\n{err}");
        }
        assert_eq!(d.disk_len(), DISK, "--size {size} resized the file");
        assert!(d.disk_at(0, 4096) == ends && d.disk_at(DISK_SECTORS - 8, 4096) == ends);
        assert!(!d.socket.exists(), "a socket despite the error");
    }

    // A missing file without --size.
    let mut d = serve(&[]).size(None).spawn();
    let status = d.wait_exit(SOON);
    assert!(!status.success(), "no file and no --size: {status}");
    let err = d.stderr();
    assert!(err.contains(&d.disk.display().to_string()), "{err}");
    assert!(!d.disk.exists(), "a file was created without --size");
}
