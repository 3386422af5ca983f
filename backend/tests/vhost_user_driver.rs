//! The vhost-user driver (the frontend side QEMU plays) against the
//! reference backend, qemu-storage-daemon's
//! vhost-user-blk export, on a raw image in a temp dir.
//!
//! Needs `qemu-storage-daemon` on PATH (Debian: qemu-utils); fails, not skips,
//! without it.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use backend::vhost_user_driver::{
    features, id_string, link, write_table, BlkFrontend, BlkRequest, Completion, CompletionKind,
    Descriptor, DiscardRange, FrontendConfig, GuestAddress, Queue, RequestType, Sector, Segment,
    StatusByte, DESC_F_NEXT,
};
use tempfile::TempDir;
use wire::pattern::pattern;

const IMAGE_SIZE: u64 = 64 << 20;
const QSD: &str = "qemu-storage-daemon";

/// A running qemu-storage-daemon, killed on drop.
struct Qsd {
    child: Child,
    socket: PathBuf,
    image: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Qsd {
    fn start(num_queues: u16) -> Qsd {
        match Command::new(QSD).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("`{QSD} --version` failed: {:?}", out.status),
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "{QSD} is not on PATH; install qemu-utils (Debian) to run the reference-backend tests"
            ),
            Err(e) => panic!("cannot run {QSD}: {e}"),
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("disk.raw");
        let socket = dir.path().join("blk.sock");
        let log = dir.path().join("qsd.log");
        File::create(&image)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .expect("create image");
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f,filename={}", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("log file"))
            .stderr(File::create(dir.path().join("qsd.err")).expect("log file"))
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut qsd = Qsd {
            child,
            socket,
            image,
            log,
            _dir: dir,
        };
        qsd.wait_for_socket();
        qsd
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket.exists() {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("{QSD} exited early with {status}:\n{}", self.output());
            }
            assert!(
                Instant::now() < deadline,
                "{QSD} did not create its socket:\n{}",
                self.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> String {
        let err = self.log.with_file_name("qsd.err");
        format!(
            "{}{}",
            fs::read_to_string(&self.log).unwrap_or_default(),
            fs::read_to_string(err).unwrap_or_default()
        )
    }

    fn connect(&self, config: FrontendConfig) -> BlkFrontend {
        BlkFrontend::connect(&self.socket, config)
            .unwrap_or_else(|e| panic!("connect: {e:?}\n{}", self.output()))
    }

    /// `len` bytes of the image file at byte `offset`, read on the host.
    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(&self.image).expect("open image");
        f.seek(SeekFrom::Start(offset)).expect("seek image");
        let mut buf = vec![0; len];
        f.read_exact(&mut buf).expect("read image");
        buf
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sector_offset(sector: Sector) -> u64 {
    sector.byte_offset().expect("sector in range")
}

#[test]
fn config_matches_the_image_and_get_id_answers() {
    let qsd = Qsd::start(1);
    let mut fe = qsd.connect(FrontendConfig::default());

    let n = *fe.negotiated();
    assert!(n.has(features::VERSION_1 | features::PROTOCOL_FEATURES | features::RING_EVENT_IDX));
    assert!(
        n.has(features::BLK_FLUSH),
        "qsd offers FLUSH: {:#x}",
        n.offered
    );

    let config = fe.get_config().expect("get_config");
    assert_eq!(config.capacity, IMAGE_SIZE / 512);
    assert_eq!(config.capacity_bytes(), IMAGE_SIZE);
    assert_eq!(config.blk_size, 512);
    assert!(config.seg_max > 0, "{config:?}");
    assert_eq!(config.num_queues, 1);

    let (status, id) = fe.get_id(0).expect("get_id");
    assert_eq!(status, StatusByte::OK);
    assert_eq!(id.len(), 20);
    assert!(!id_string(&id).is_empty(), "empty id: {id:?}");
}

#[test]
fn writes_read_back_and_land_in_the_image() {
    for event_idx in [true, false] {
        let qsd = Qsd::start(1);
        let mut fe = qsd.connect(FrontendConfig {
            event_idx,
            ..FrontendConfig::default()
        });
        assert_eq!(fe.negotiated().has(features::RING_EVENT_IDX), event_idx);

        let cases = [
            (Sector(0), 512),
            (Sector(1), 4096),
            (Sector(100), 3 * 512),
            (Sector(2048), 128 << 10),
            (Sector(IMAGE_SIZE / 512 - 8), 4096),
        ];
        for (i, &(sector, len)) in cases.iter().enumerate() {
            let data = pattern(i as u64 + 1, len);
            assert_eq!(fe.write(0, sector, &data).expect("write"), StatusByte::OK);
            let (status, back) = fe.read(0, sector, len).expect("read");
            assert_eq!(status, StatusByte::OK);
            assert!(
                back == data,
                "sector {} len {len}: read differs from write",
                sector.0
            );
        }
        assert_eq!(fe.flush(0).expect("flush"), StatusByte::OK);
        for (i, &(sector, len)) in cases.iter().enumerate() {
            assert!(
                qsd.image_bytes(sector_offset(sector), len) == pattern(i as u64 + 1, len),
                "image at sector {} does not hold the data",
                sector.0
            );
        }

        // Reading past the end is an error status, not a transport failure.
        let (status, _) = fe
            .read(0, Sector(IMAGE_SIZE / 512), 512)
            .expect("read past end");
        assert_eq!(status, StatusByte::IOERR);

        let q = fe.queue(0).expect("queue");
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.stats().unknown_used, 0);
        assert_eq!(q.stats().completed, q.stats().submitted);
    }
}

#[test]
fn write_zeroes_and_discard_are_accepted() {
    let qsd = Qsd::start(1);
    let mut fe = qsd.connect(FrontendConfig::default());
    let n = *fe.negotiated();
    assert!(
        n.has(features::BLK_WRITE_ZEROES | features::BLK_DISCARD),
        "{:#x}",
        n.offered
    );
    let config = fe.get_config().expect("get_config");
    assert!(config.max_write_zeroes_sectors > 0, "{config:?}");

    let data = pattern(7, 64 << 10);
    assert_eq!(
        fe.write(0, Sector(512), &data).expect("write"),
        StatusByte::OK
    );
    let range = DiscardRange {
        sector: Sector(520),
        num_sectors: 16,
        flags: 0,
    };
    assert_eq!(
        fe.write_zeroes(0, &[range]).expect("write_zeroes"),
        StatusByte::OK
    );
    let (status, back) = fe.read(0, Sector(512), data.len()).expect("read");
    assert_eq!(status, StatusByte::OK);
    let (before, rest) = back.split_at(8 * 512);
    let (zeroed, after) = rest.split_at(16 * 512);
    assert!(before == &data[..8 * 512]);
    assert!(
        zeroed.iter().all(|&b| b == 0),
        "write-zeroes range not zero"
    );
    assert!(after == &data[24 * 512..]);

    let discard = DiscardRange {
        sector: Sector(4096),
        num_sectors: 64,
        flags: 0,
    };
    assert_eq!(fe.discard(0, &[discard]).expect("discard"), StatusByte::OK);
}

/// Submits `depth` writes at once on `q`, then `depth` reads of the same
/// sectors, collecting completions in whatever order they come.
fn deep_round_trip(q: &mut Queue, first: Sector, depth: usize, len: usize, seed: u64) {
    let ram = q.ram().clone();
    let bufs: Vec<_> = (0..depth).map(|_| ram.alloc(len).expect("alloc")).collect();
    let sector_of = |i: usize| Sector(first.0 + (i * len / 512) as u64);

    let mut by_chain = vec![usize::MAX; usize::from(q.size())];
    for (i, buf) in bufs.iter().enumerate() {
        buf.write_at(0, &pattern(seed + i as u64, len))
            .expect("fill");
        let seg = [Segment::of(buf).expect("segment")];
        let req = BlkRequest {
            kind: RequestType::Out,
            sector: sector_of(i),
            data: &seg,
        };
        by_chain[q.submit(&req).expect("submit write").index()] = i;
    }
    q.kick().expect("kick");
    assert_eq!(q.in_flight(), depth);
    let done = collect(q, depth);
    let mut seen = vec![false; depth];
    for c in &done {
        assert_eq!(c.status(), Some(StatusByte::OK), "{c:?}");
        let i = by_chain[c.chain().expect("known chain").index()];
        assert!(!seen[i], "request {i} completed twice");
        seen[i] = true;
    }

    for buf in &bufs {
        buf.fill(0).expect("clear");
    }
    for (i, buf) in bufs.iter().enumerate() {
        let seg = [Segment::of(buf).expect("segment")];
        let req = BlkRequest {
            kind: RequestType::In,
            sector: sector_of(i),
            data: &seg,
        };
        by_chain[q.submit(&req).expect("submit read").index()] = i;
    }
    q.kick().expect("kick");
    for c in collect(q, depth) {
        assert_eq!(c.status(), Some(StatusByte::OK), "{c:?}");
        assert_eq!(
            c.len,
            u32::try_from(len + 1).expect("len"),
            "used len {c:?}"
        );
        let i = by_chain[c.chain().expect("known chain").index()];
        assert!(
            bufs[i].read().expect("read buf") == pattern(seed + i as u64, len),
            "request {i}"
        );
    }
    assert_eq!(q.in_flight(), 0);
    assert_eq!(q.stats().unknown_used, 0);
}

fn collect(q: &mut Queue, n: usize) -> Vec<Completion> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        q.wait(&mut out, Duration::from_secs(10))
            .expect("completions");
    }
    assert_eq!(out.len(), n, "more completions than requests");
    out
}

#[test]
fn two_queues_in_parallel_with_32_in_flight_each() {
    let qsd = Qsd::start(2);
    let mut fe = qsd.connect(FrontendConfig {
        num_queues: 2,
        queue_size: 128,
        ..FrontendConfig::default()
    });
    assert_eq!(fe.negotiated().backend_queues, 2);
    assert_eq!(fe.get_config().expect("config").num_queues, 2);
    const DEPTH: usize = 32;
    const LEN: usize = 4096;
    const REGION: u64 = (DEPTH * LEN / 512) as u64;
    thread::scope(|s| {
        for (i, q) in fe.queues_mut().iter_mut().enumerate() {
            s.spawn(move || {
                for round in 0..4u64 {
                    let first = Sector(i as u64 * REGION);
                    deep_round_trip(q, first, DEPTH, LEN, (i as u64) << 32 | round << 16);
                }
            });
        }
    });
    for (i, q) in fe.queues_mut().iter().enumerate() {
        let stats = q.stats();
        eprintln!("queue {i}: {stats:?}");
        assert!(stats.interrupts > 0, "queue {i}: {stats:?}");
        assert_eq!(
            stats.submitted,
            4 * 2 * DEPTH as u64,
            "queue {i}: {stats:?}"
        );
        assert_eq!(stats.completed, stats.submitted, "queue {i}: {stats:?}");
    }
    // The last round's data is on the host.
    for qi in 0..2u64 {
        for r in [0usize, DEPTH - 1] {
            let sector = Sector(qi * REGION + (r * LEN / 512) as u64);
            let want = pattern((qi << 32 | 3 << 16) + r as u64, LEN);
            assert!(
                qsd.image_bytes(sector_offset(sector), LEN) == want,
                "q{qi} request {r}"
            );
        }
    }
}

#[test]
fn hand_built_chains_direct_and_indirect() {
    let qsd = Qsd::start(1);
    let mut fe = qsd.connect(FrontendConfig::default());
    assert!(fe.negotiated().has(features::RING_INDIRECT_DESC));
    let ram = fe.ram().clone();
    let q = fe.queue(0).expect("queue");

    // A write built descriptor by descriptor: header, data split in two, status.
    let header = ram.alloc(16).expect("alloc");
    header
        .write_at(0, &backend::vhost_user_driver::encode_header(1, Sector(64)))
        .expect("header");
    let data = ram.alloc(1024).expect("alloc");
    data.write_at(0, &pattern(99, 1024)).expect("data");
    let status = ram.alloc(1).expect("alloc");
    status.fill(0xff).expect("status");
    let mut chain = [
        Descriptor::readable(header.gpa(), 16),
        Descriptor::readable(data.gpa(), 512),
        Descriptor::readable(GuestAddress(data.gpa().0 + 512), 512),
        Descriptor::writable(status.gpa(), 1),
    ];
    link(&mut chain);
    assert!(chain[..3].iter().all(|d| d.flags & DESC_F_NEXT != 0));
    let id = q.push_chain(&chain).expect("push");
    q.kick().expect("kick");
    let done = q.wait_for(id, Duration::from_secs(10)).expect("completion");
    assert_eq!(done.kind, CompletionKind::Raw);
    assert_eq!(done.len, 1, "a write returns only the status byte");
    assert_eq!(status.read().expect("status"), [0]);

    // The same data read back through an indirect table.
    let table = ram.alloc(3 * 16).expect("alloc");
    header
        .write_at(0, &backend::vhost_user_driver::encode_header(0, Sector(64)))
        .expect("header");
    data.fill(0).expect("clear");
    status.fill(0xff).expect("status");
    let mut inner = [
        Descriptor::readable(header.gpa(), 16),
        Descriptor::writable(data.gpa(), 1024),
        Descriptor::writable(status.gpa(), 1),
    ];
    link(&mut inner);
    write_table(&ram, table.gpa(), &inner).expect("table");
    let id = q
        .push_chain(&[Descriptor::indirect(table.gpa(), 3)])
        .expect("push");
    q.kick().expect("kick");
    let done = q.wait_for(id, Duration::from_secs(10)).expect("completion");
    assert_eq!(done.len, 1025);
    assert_eq!(status.read().expect("status"), [0]);
    assert!(data.read().expect("data") == pattern(99, 1024));
    assert!(qsd.image_bytes(64 * 512, 1024) == pattern(99, 1024));
}

#[test]
fn connect_fails_cleanly_without_a_backend() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = BlkFrontend::connect(dir.path().join("none.sock"), FrontendConfig::default())
        .expect_err("no socket");
    assert!(err.to_string().contains("Cannot connect"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn too_many_queues_is_an_error() {
    let qsd = Qsd::start(1);
    let err = BlkFrontend::connect(
        &qsd.socket,
        FrontendConfig {
            num_queues: 4,
            ..FrontendConfig::default()
        },
    )
    .expect_err("qsd has one queue");
    assert!(
        matches!(
            err,
            backend::vhost_user_driver::Error::TooManyQueues {
                offered: 1,
                wanted: 4
            }
        ),
        "{err:?}"
    );
}

/// Keeps `depth` 4 KiB random reads in flight on `q` for `duration`, the way
/// `dmaprobe bench` will; returns the number completed.
fn keep_busy(q: &mut Queue, depth: usize, duration: Duration, seed: u64) -> u64 {
    const LEN: usize = 4096;
    let ram = q.ram().clone();
    let bufs: Vec<_> = (0..depth).map(|_| ram.alloc(LEN).expect("alloc")).collect();
    let sectors = IMAGE_SIZE / 512;
    let mut rng = seed | 1;
    let mut next_sector = move || {
        // xorshift64: spread requests over the image, 4 KiB aligned.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        Sector(rng % (sectors / 8) * 8)
    };
    let mut buf_of = vec![usize::MAX; usize::from(q.size())];
    let submit = |q: &mut Queue, b: usize, sector: Sector| {
        let seg = [Segment::of(&bufs[b]).expect("segment")];
        let req = BlkRequest {
            kind: RequestType::In,
            sector,
            data: &seg,
        };
        q.submit(&req).expect("submit").index()
    };
    for b in 0..depth {
        buf_of[submit(q, b, next_sector())] = b;
    }
    q.kick().expect("kick");
    let deadline = Instant::now() + duration;
    let mut done = 0u64;
    let mut out = Vec::with_capacity(depth);
    while Instant::now() < deadline {
        out.clear();
        q.wait(&mut out, Duration::from_secs(10))
            .expect("completions");
        for c in &out {
            assert_eq!(c.status(), Some(StatusByte::OK), "{c:?}");
            let b = buf_of[c.chain().expect("known chain").index()];
            buf_of[submit(q, b, next_sector())] = b;
        }
        done += out.len() as u64;
        q.kick().expect("kick");
    }
    let mut rest = Vec::new();
    while q.in_flight() > 0 {
        q.wait(&mut rest, Duration::from_secs(10)).expect("drain");
    }
    done + rest.len() as u64
}

#[test]
fn sustained_iodepth_32_on_two_queues() {
    let qsd = Qsd::start(2);
    let mut fe = qsd.connect(FrontendConfig {
        num_queues: 2,
        ..FrontendConfig::default()
    });
    let duration = Duration::from_millis(500);
    let started = Instant::now();
    let total: u64 = thread::scope(|s| {
        let handles: Vec<_> = fe
            .queues_mut()
            .iter_mut()
            .enumerate()
            .map(|(i, q)| s.spawn(move || keep_busy(q, 32, duration, 0x1234 + i as u64)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("queue thread"))
            .sum()
    });
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "qsd: {total} reads of 4 KiB in {secs:.2} s = {:.0} IOPS",
        total as f64 / secs
    );
    assert!(total > 64, "only {total} requests completed");
    for q in fe.queues_mut() {
        assert_eq!(q.stats().unknown_used, 0);
        assert_eq!(q.in_flight(), 0);
    }
}
