//! `dmaprobe bench` against an in-process dmaprobe (`backend::serve::Daemon`)
//! and against qemu-storage-daemon, through `dmaprobe::bench::measure` and
//! through the real command line; `dmaprobe bench --nvme` against a
//! `dmaprobe serve --nvme` child, and against sockets that are not a
//! vfio-user controller's.
//!
//! Needs `qemu-storage-daemon` on PATH (Debian: qemu-utils); fails, not skips,
//! without it.

mod common;

use common::child::Serve;
use common::served::Served;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use dmaprobe::bench::{self, BenchArgs, BenchConfig, BenchError, BenchResult, BenchTransport, Rw};
use serde_json::Value;
use tempfile::TempDir;

const QSD: &str = "qemu-storage-daemon";

/// A short run: enough requests for the percentiles to mean something.
fn short(rw: Rw, queues: u16) -> BenchConfig {
    BenchConfig {
        rw,
        queues,
        seconds: 1.0,
        warmup: 0.2,
        ..BenchConfig::default()
    }
}

/// A daemon serving in this process, as `dmaprobe serve --socket S --mem 64M
/// --queues 2 --no-control` would.
fn served() -> Served {
    Served::start_exactly(&["--mem", "64M", "--queues", "2", "--no-control"])
}

/// A qemu-storage-daemon child on a raw image in a temp dir; killed and
/// reaped on drop.
struct Qsd {
    child: Child,
    socket: PathBuf,
    dir: TempDir,
}

impl Qsd {
    fn start(num_queues: u16) -> Qsd {
        match Process::new(QSD).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("`{QSD} --version` failed: {:?}", out.status),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("{QSD} is not on PATH; install qemu-utils (Debian)")
            }
            Err(e) => panic!("cannot run {QSD}: {e}"),
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("disk.raw");
        let socket = dir.path().join("blk.sock");
        File::create(&image)
            .and_then(|f| f.set_len(64 << 20))
            .expect("create image");
        let child = Process::new(QSD)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=f,filename={}", image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("qsd.log")).expect("log file"))
            .stderr(File::create(dir.path().join("qsd.err")).expect("log file"))
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut qsd = Qsd { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !qsd.socket.exists() {
            if let Some(status) = qsd.child.try_wait().expect("try_wait") {
                panic!("{QSD} exited early with {status}:\n{}", qsd.output());
            }
            assert!(
                Instant::now() < deadline,
                "{QSD} did not create its socket:\n{}",
                qsd.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
        qsd
    }

    fn output(&self) -> String {
        ["qsd.log", "qsd.err"]
            .iter()
            .map(|f| fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a user would check of a result on `queues` queues.
fn assert_sane(r: &BenchResult, queues: u16) {
    assert_eq!(r.queues.len(), usize::from(queues), "{r:?}");
    for q in &r.queues {
        assert!(q.ios > 0, "queue {:?} completed nothing: {r:?}", q.queue);
        assert!(q.iops > 0.0 && q.mbps > 0.0, "{q:?}");
        assert!(q.p50_us > 0.0, "{q:?}");
        assert!(
            q.p50_us <= q.p99_us && q.p99_us <= q.p999_us && q.p999_us <= q.max_us,
            "{q:?}"
        );
    }
    let t = &r.total;
    assert_eq!(t.ios, r.queues.iter().map(|q| q.ios).sum::<u64>());
    assert_eq!(t.reads, r.queues.iter().map(|q| q.reads).sum::<u64>());
    assert_eq!(t.writes, r.queues.iter().map(|q| q.writes).sum::<u64>());
    assert_eq!(t.ios, t.reads + t.writes);
    assert_eq!(t.bytes, t.ios * r.config.bs);
    assert!(t.p50_us <= t.p99_us && t.p99_us <= t.p999_us, "{t:?}");
    let iops_sum: f64 = r.queues.iter().map(|q| q.iops).sum();
    assert!((t.iops - iops_sum).abs() <= 0.01 * iops_sum, "{t:?}");
}

#[test]
fn randread_on_two_queues_of_dmaprobe() {
    let served = served();
    let r = bench::measure(&served.socket(), &short(Rw::RandRead, 2)).expect("measure");
    assert_sane(&r, 2);
    assert_eq!(r.total.writes, 0);
    assert_eq!(r.capacity_bytes, 64 << 20);
    assert_eq!(r.range_bytes, 64 << 20);
}

#[test]
fn mix_on_two_queues_of_dmaprobe_reads_about_seventy_percent() {
    let served = served();
    let config = BenchConfig {
        size: Some(8 << 20),
        ..short(Rw::Mix { read_percent: 70 }, 2)
    };
    let r = bench::measure(&served.socket(), &config).expect("measure");
    assert_sane(&r, 2);
    assert_eq!(r.range_bytes, 8 << 20);
    let share = r.total.reads as f64 / r.total.ios as f64;
    assert!((0.6..0.8).contains(&share), "read share {share}: {r:?}");
}

#[test]
fn randwrite_on_two_queues_of_qemu_storage_daemon() {
    let qsd = Qsd::start(2);
    let r = bench::measure(&qsd.socket, &short(Rw::RandWrite, 2))
        .unwrap_or_else(|e| panic!("measure: {e:?}\n{}", qsd.output()));
    assert_sane(&r, 2);
    assert_eq!(r.total.reads, 0);
    assert_eq!(r.capacity_bytes, 64 << 20);
}

fn args(extra: &[&str]) -> BenchArgs {
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: BenchArgs,
    }
    let argv = ["bench", "--socket", "/nonexistent"]
        .into_iter()
        .chain(extra.iter().copied());
    Wrap::try_parse_from(argv).expect("arguments parse").args
}

#[test]
fn invalid_configurations_are_refused_clearly() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["--bs", "1000"],
            "Block size 1000 is not a multiple of 512",
        ),
        (&["--iodepth", "0"], "iodepth 0 is out of range"),
        (&["--iodepth", "200"], "at most 85 with queue size 256"),
        (&["--rw", "mix:150"], "Unknown workload \"mix:150\""),
        (&["--bs", "4q"], "Bad --bs"),
        (&["--seconds", "0"], "--seconds 0 is out of range"),
    ];
    for (extra, message) in cases {
        let e = BenchConfig::try_from(args(extra)).expect_err("refused");
        assert!(e.to_string().contains(message), "{extra:?}: {e}");
    }
    // measure checks too, before it connects.
    let bad = BenchConfig {
        bs: 1000,
        ..BenchConfig::default()
    };
    assert!(matches!(
        bench::measure(Path::new("/nonexistent"), &bad),
        Err(BenchError::BlockSize(1000))
    ));
    // A valid configuration against no socket fails at setup, naming it.
    let e = bench::measure(Path::new("/nonexistent"), &short(Rw::Read, 1)).unwrap_err();
    assert!(matches!(e, BenchError::Setup { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent"), "{e}");
}

#[test]
fn the_cli_prints_json() {
    let served = served();
    let socket = served.socket();
    let out = Process::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .args(["bench", "--socket"])
        .arg(&socket)
        .args(["--seconds", "1", "--queues", "2", "--json"])
        .output()
        .expect("run dmaprobe bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let num = |v: &serde_json::Value, k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("no number {k} in {v}"))
    };
    assert!(num(&v, "iops") > 0.0, "{v}");
    assert!(num(&v, "mbps") > 0.0, "{v}");
    assert!(num(&v, "p50_us") <= num(&v, "p99_us"), "{v}");
    assert!(num(&v, "p99_us") <= num(&v, "p999_us"), "{v}");
    let queues = v["queues"].as_array().expect("queues array");
    assert_eq!(queues.len(), 2, "{v}");
    assert!(queues.iter().all(|q| num(q, "ios") > 0.0), "{v}");
    assert_eq!(v["config"]["rw"], "randread", "{v}");
    assert_eq!(v["config"]["bs"], 4096, "{v}");
    assert_eq!(v["config"]["iodepth"], 32, "{v}");

    // And a refused configuration exits 1 with the reason.
    let out = Process::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .args(["bench", "--socket"])
        .arg(&socket)
        .args(["--bs", "1000"])
        .output()
        .expect("run dmaprobe bench");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Block size 1000"), "{stderr}");
}

// ---------------------------------------------------------------------------
// --nvme

/// How long a `dmaprobe bench` of a second or so may take on a loaded
/// machine before the test calls it hung.
const BENCH_WAIT: Duration = Duration::from_secs(60);

/// A `dmaprobe serve --nvme EXTRA` child on a 16 MiB disk file of zeroes,
/// with its vfio-user socket there. Its write cache is on (the default):
/// what the writes carry reaches the file when the daemon stops.
fn serve_nvme(extra: &[&str]) -> Serve {
    let mut args = vec!["--nvme"];
    args.extend_from_slice(extra);
    let s = Serve::with(&args).no_ledger().start();
    // The control socket is bound first; the device's follows.
    let deadline = Instant::now() + BENCH_WAIT;
    while !s.socket.exists() {
        assert!(
            Instant::now() < deadline,
            "no vfio-user socket:\n{}",
            s.output()
        );
        thread::sleep(Duration::from_millis(10));
    }
    s
}

/// `dmaprobe bench ARGS` as a child, killed if it has not exited within
/// [`BENCH_WAIT`] (the test then fails: a hang).
fn bench_cli(args: &[&str]) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Process::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("stdout file"))
        .stderr(File::create(&err).expect("stderr file"))
        .spawn()
        .expect("run dmaprobe bench");
    let deadline = Instant::now() + BENCH_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "dmaprobe bench {args:?} hung for {BENCH_WAIT:?}:\n{}",
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: fs::read(&out).unwrap_or_default(),
        stderr: fs::read(&err).unwrap_or_default(),
    }
}

/// `dmaprobe bench --nvme --socket S --json ARGS` against `s`, which must
/// succeed: its JSON.
fn bench_nvme_json(s: &Serve, args: &[&str]) -> Value {
    let socket = s.socket.to_str().expect("a UTF-8 path");
    let mut all = vec!["--nvme", "--socket", socket, "--json"];
    all.extend_from_slice(args);
    let out = bench_cli(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dmaprobe bench {all:?}: {:?}\n{stdout}\n{}\ndaemon:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        s.output()
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

/// Every `bs` block of the disk is zeroes or the whole of one buffer's data
/// (`bench::buffer_data` of `queues` × `iodepth` buffers): what the writes
/// carried landed whole and in place, page by page through their PRPs. The
/// count of blocks written.
fn assert_disk_holds_whole_buffers(s: &Serve, bs: usize, queues: u16, iodepth: usize) -> usize {
    let mut buffers: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    for q in 0..queues {
        for i in 0..iodepth {
            let data = bench::buffer_data(1, q, i, bs);
            buffers.insert(data[..16].to_vec(), data);
        }
    }
    let disk = fs::read(&s.disk).expect("read the disk file");
    let mut written = 0;
    for (n, block) in disk.chunks(bs).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let whole = buffers
            .get(&block[..16])
            .is_some_and(|data| data[..] == *block);
        assert!(
            whole,
            "block {n} of {bs} bytes is neither zeroes nor one buffer's data"
        );
        written += 1;
    }
    written
}

#[test]
fn nvme_randwrite_and_randread_at_4k_and_128k() {
    for (bs, bytes) in [("4k", 4096), ("128k", 128 << 10)] {
        // A disk of zeroes for each block size, so every written block is
        // one write's.
        let mut s = serve_nvme(&[]);
        let run = |rw: &str| {
            let v = bench_nvme_json(
                &s,
                &[
                    "--rw",
                    rw,
                    "--bs",
                    bs,
                    "--iodepth",
                    "8",
                    "--queues",
                    "2",
                    "--seconds",
                    "1",
                    "--warmup",
                    "0.2",
                ],
            );
            assert_eq!(v["config"]["transport"], "nvme", "{v}");
            assert_eq!(v["config"]["bs"], bytes, "{v}");
            assert!(num(&v, "iops") > 0.0 && num(&v, "mbps") > 0.0, "{v}");
            assert!(num(&v, "p50_us") <= num(&v, "p99_us"), "{v}");
            let queues = v["queues"].as_array().expect("queues");
            assert_eq!(queues.len(), 2, "{v}");
            assert!(queues.iter().all(|q| num(q, "ios") > 0.0), "{v}");
            assert_eq!(num(&v, "capacity_bytes"), 16.0 * 1048576.0, "{v}");
            v
        };
        let w = run("randwrite");
        assert_eq!(num(&w, "reads"), 0.0, "{w}");
        let r = run("randread");
        assert_eq!(num(&r, "writes"), 0.0, "{r}");
        // SIGTERM: the daemon flushes its write cache to the file and stops.
        assert!(s.terminate().success(), "{}", s.output());
        let written = assert_disk_holds_whole_buffers(&s, bytes, 2, 8);
        assert!(written > 0, "bs {bs}: nothing on the disk after {w}");
    }
}

#[test]
fn nvme_refuses_what_the_controller_cannot_run() {
    let s = serve_nvme(&["--lbs", "4096", "--max-transfer", "128K", "--read-only"]);
    let nvme = |f: fn(&mut BenchConfig)| {
        let mut c = BenchConfig {
            transport: BenchTransport::Nvme,
            ..short(Rw::RandRead, 1)
        };
        f(&mut c);
        bench::measure(&s.socket, &c)
    };
    let e = nvme(|c| c.bs = 256 << 10).unwrap_err();
    assert!(
        matches!(e, BenchError::TransferTooLarge { max: 131072, .. }),
        "{e:?}"
    );
    let e = nvme(|c| c.bs = 512).unwrap_err();
    assert!(
        matches!(e, BenchError::LbaMismatch { lba: 4096, .. }),
        "{e:?}"
    );
    let e = nvme(|c| c.rw = Rw::RandWrite).unwrap_err();
    assert!(matches!(e, BenchError::ReadOnly(Rw::RandWrite)), "{e:?}");
    let e = nvme(|c| c.queue_size = 2048).unwrap_err();
    assert!(
        matches!(e, BenchError::QueueTooLarge { max: 1024, .. }),
        "{e:?}"
    );
    // What it can run, it runs, the same daemon after every refusal.
    let r = nvme(|c| c.seconds = 0.5).expect("a read-only randread");
    assert_sane(&r, 1);
    assert_eq!(r.capacity_bytes, 16 << 20);
}

#[test]
fn nvme_against_a_vhost_user_socket_fails_at_once_and_says_why() {
    let served = served();
    let qsd = Qsd::start(1);
    let cases = [
        (served.socket(), "It closed the connection without a reply"),
        (
            qsd.socket.clone(),
            "Its reply is not a vfio-user VERSION reply",
        ),
    ];
    for (socket, why) in cases {
        let socket = socket.to_str().expect("a UTF-8 path").to_owned();
        let start = Instant::now();
        let out = bench_cli(&["--nvme", "--socket", &socket, "--seconds", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(out.stdout.is_empty());
        let expected = format!(
            "dmaprobe bench: error: {socket} does not answer as a vfio-user NVMe \
             controller (for a vhost-user-blk backend, leave out --nvme): {why}"
        );
        assert_eq!(stderr.trim(), expected);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }
    // The vhost-user daemon goes on serving.
    let r = bench::measure(&served.socket(), &short(Rw::RandRead, 1)).expect("measure");
    assert_sane(&r, 1);
}

#[test]
fn nvme_while_another_client_is_connected_says_so() {
    use backend::nvme_driver::{HostRam, VfioUser};
    let s = serve_nvme(&[]);
    // The daemon serves one vfio-user client at a time: a second connection
    // waits in the listen queue and nobody answers it.
    let ram = HostRam::new(1 << 20).expect("guest memory");
    let first = VfioUser::connect(&s.socket, BENCH_WAIT, ram, &[1 << 20], 1).expect("connect");
    let socket = s.socket.to_str().expect("a UTF-8 path");
    let out = bench_cli(&["--nvme", "--socket", socket, "--seconds", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.ends_with("No reply within 5s (is another client connected?)\n"),
        "{stderr}"
    );
    drop(first);
    let v = bench_nvme_json(&s, &["--seconds", "0.5", "--warmup", "0"]);
    assert!(num(&v, "iops") > 0.0, "{v}");
}

/// With shadow doorbells (the default, as Linux takes them) the host
/// writes no completion head register and a tail register only when the
/// controller asks (an idle one asks for each; one that has not yet written
/// its EventIdx after the last command fetches the next from the slot
/// unasked); with `--doorbells registers`, both for every command. At one
/// request in flight every command is a batch of its own; the admin
/// queue's commands ring a tail and a head each.
#[test]
fn nvme_shadow_doorbells_spare_the_registers() {
    let s = serve_nvme(&[]);
    let counters = || s.ctl_json(&["status"])["nvme"]["controller"]["counters"].clone();
    let mut before = counters();
    for how in ["shadow", "registers"] {
        let v = bench_nvme_json(
            &s,
            &[
                "--doorbells",
                how,
                "--iodepth",
                "1",
                "--seconds",
                "0.5",
                "--warmup",
                "0",
            ],
        );
        assert_eq!(v["config"]["doorbells"], how, "{v}");
        let c = counters();
        let grew = |key: &str| c[key].as_u64().unwrap() - before[key].as_u64().unwrap();
        let io = grew("io_commands");
        let io_registers = grew("mmio_doorbells") - 2 * grew("admin_commands");
        assert!(io > 0, "{c:#}");
        if how == "shadow" {
            assert_eq!(grew("dbbuf_configs"), 1, "{c:#}");
            assert!(grew("shadow_updates") >= io, "{c:#}");
            assert!(0 < io_registers && io_registers <= io, "tails only: {c:#}");
        } else {
            assert_eq!(grew("dbbuf_configs"), 0, "{c:#}");
            assert_eq!(grew("shadow_updates"), 0, "{c:#}");
            assert_eq!(io_registers, 2 * io, "{c:#}");
        }
        before = c;
    }
    let e = BenchConfig::try_from(args(&["--doorbells", "registers"])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "--doorbells is for an NVMe controller: add --nvme, or leave it out"
    );
}

/// More MSI-X eventfds than the `vfio_user` server takes in one message
/// (16): the driver hands them over one per message, as QEMU does by the
/// server's max_msg_fds, and every queue runs.
#[test]
fn nvme_on_twenty_queues_hands_over_twenty_one_eventfds() {
    let s = serve_nvme(&[]);
    let v = bench_nvme_json(
        &s,
        &[
            "--queues",
            "20",
            "--iodepth",
            "1",
            "--seconds",
            "0.3",
            "--warmup",
            "0",
        ],
    );
    let queues = v["queues"].as_array().expect("queues");
    assert_eq!(queues.len(), 20, "{v}");
    assert!(queues.iter().all(|q| num(q, "ios") > 0.0), "{v}");
}
