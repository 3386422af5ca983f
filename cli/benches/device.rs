//! What the DMA engine's checks cost the device end to end: 4 KiB random reads
//! and 4 KiB random writes at queue depth 32 on one queue, through the real
//! vhost-user protocol, in requests per second.
//!
//! `cargo bench -p dmaprobe --bench device`
//!
//! The daemon (`backend::serve::Daemon`) serves in this process on a socket in
//! a temp dir, over 256 MiB of memory media filled with data beforehand; the
//! frontend driver (`backend::vhost_user_driver::BlkFrontend`) keeps 32 requests in
//! flight. Two configurations take turns on the same connection, switched with
//! `Engine::set_checks` between rounds:
//!
//! - A: everything off, as `dmaprobe serve` starts without options: no fault
//!   rules, no checks, no ledger;
//! - B: canaries, source snapshots and the ledger on, the checks that
//!   `dmaprobe serve --canary --snapshot --ledger FILE` sets.
//!
//! After a warm-up of each, A and B alternate for several rounds (the machine
//! is shared and noisy); every round is printed, then the medians and B/A.
//!
//! There is no build of the device without the engine, so "everything off
//! against no dma" is estimated, not measured: the engine's own cost per
//! request with every check off is (b) - (a) of `cargo bench -p dma --bench
//! engine`, read here from that bench's last results, set against A's time per
//! request, 1e9 / IOPS ns. Run the engine bench first for that part.
//!
//! `DMAPROBE_BENCH_ROUNDS` (default 6) and `DMAPROBE_BENCH_SECS` (default 2)
//! change the rounds and their length.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use backend::config::ServeConfig;
use backend::serve::Daemon;
use backend::vhost_user_driver::{
    BlkFrontend, BlkRequest, Buffer, FrontendConfig, Queue, RequestType, Sector, Segment,
    StatusByte,
};
use clap::Parser;
use dma::{Checks, Engine};
use dmaprobe::args::{Cli, Command};
use nvme_model::{Lba, Namespace};
use wire::pattern::pattern;

/// Bytes per request.
const LEN: usize = 4096;
/// Requests kept in flight.
const DEPTH: usize = 32;
/// The media, as `--mem` takes it, and in bytes.
const MEDIA: &str = "256M";
const MEDIA_BYTES: u64 = 256 << 20;
/// The warm-up of each configuration and workload.
const WARM_UP: Duration = Duration::from_secs(1);
/// How long a single completion may take on a loaded machine.
const SOON: Duration = Duration::from_secs(10);
/// The goal for everything off against no dma (issue 4).
const TARGET_PERCENT: f64 = 5.0;

/// The `ServeConfig` that `dmaprobe serve --socket SOCKET --mem 256M --queues 1
/// --no-control ARGS` gives.
fn serve_config(socket: &Path, args: &[&str]) -> ServeConfig {
    let socket = socket.to_str().expect("utf-8 temp path");
    let argv = [
        "dmaprobe",
        "serve",
        "--socket",
        socket,
        "--mem",
        MEDIA,
        "--queues",
        "1",
        "--no-control",
    ]
    .into_iter()
    .chain(args.iter().copied());
    match Cli::try_parse_from(argv)
        .expect("the arguments parse")
        .command
    {
        Command::Serve(a) => ServeConfig::try_from(*a).expect("a valid configuration"),
        other => panic!("not a serve command: {other:?}"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Read,
    Write,
}

impl Workload {
    fn kind(self) -> RequestType {
        match self {
            Workload::Read => RequestType::In,
            Workload::Write => RequestType::Out,
        }
    }

    /// The engine bench's group for the same requests.
    fn engine_group(self) -> &'static str {
        match self {
            Workload::Read => "read-4k",
            Workload::Write => "write-4k",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Workload::Read => "read",
            Workload::Write => "write",
        })
    }
}

/// Writes data over the whole media, so that reads find real bytes rather
/// than holes in the memfd.
fn fill_media(ns: &Namespace) {
    const CHUNK: usize = 1 << 20;
    let data = pattern(0xd1, CHUNK);
    let per_chunk = (CHUNK as u64) / ns.lba_size().bytes();
    let mut lba = 0;
    while lba < ns.blocks() {
        let blocks = per_chunk.min(ns.blocks() - lba);
        let range = ns.check_range(Lba(lba), blocks).expect("in range");
        let bytes = usize::try_from(blocks * ns.lba_size().bytes()).expect("chunk size");
        ns.write(range, &data[..bytes]).expect("fill the media");
        lba += blocks;
    }
}

/// Every request the ledger has recorded, whether still kept or dropped.
fn ledger_total(engine: &Engine) -> u64 {
    let ledger = engine.ledger();
    ledger.len() as u64 + ledger.dropped()
}

fn findings(engine: &Engine) -> u64 {
    engine.finding_counts().iter().map(|&(_, n)| n).sum()
}

/// CPU time used by this process so far, every thread: the frontend's and the
/// daemon's.
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a constant
    // the kernel knows; the return value is checked.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    Duration::new(
        u64::try_from(ts.tv_sec).expect("non-negative seconds"),
        u32::try_from(ts.tv_nsec).expect("nanoseconds below 1e9"),
    )
}

/// A round's outcome.
struct Rate {
    completed: u64,
    secs: f64,
    /// CPU time of the whole process over the same span.
    cpu: Duration,
}

impl Rate {
    fn iops(&self) -> f64 {
        self.completed as f64 / self.secs
    }

    /// CPU time per request, in µs, of frontend and device together: less
    /// sensitive to other load on the machine than IOPS.
    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.completed as f64
    }
}

/// Keeps `bufs.len()` requests of `kind` in flight on `q` at random 4 KiB
/// aligned places for `duration`; counts those completed by then. The ones
/// still in flight at the end are drained and not counted.
fn keep_busy(
    q: &mut Queue,
    bufs: &[Buffer],
    kind: RequestType,
    duration: Duration,
    rng: &mut u64,
) -> Rate {
    let sectors_per_request = (LEN / 512) as u64;
    let places = MEDIA_BYTES / LEN as u64;
    let mut next_sector = || {
        // xorshift64
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        Sector(*rng % places * sectors_per_request)
    };
    let mut buf_of = vec![usize::MAX; usize::from(q.size())];
    let submit = |q: &mut Queue, b: usize, sector: Sector| {
        let seg = [Segment::of(&bufs[b]).expect("segment")];
        let req = BlkRequest {
            kind,
            sector,
            data: &seg,
        };
        q.submit(&req).expect("submit").index()
    };

    let start = Instant::now();
    let cpu_start = process_cpu();
    let deadline = start + duration;
    for b in 0..bufs.len() {
        buf_of[submit(q, b, next_sector())] = b;
    }
    q.kick().expect("kick");
    let mut completed = 0u64;
    let mut out = Vec::with_capacity(bufs.len());
    let (secs, cpu) = loop {
        out.clear();
        q.wait(&mut out, SOON).expect("completions");
        for c in &out {
            assert_eq!(c.status(), Some(StatusByte::OK), "{c:?}");
        }
        completed += out.len() as u64;
        let now = Instant::now();
        if now >= deadline {
            break ((now - start).as_secs_f64(), process_cpu() - cpu_start);
        }
        for c in &out {
            let b = buf_of[c.chain().expect("known chain").index()];
            buf_of[submit(q, b, next_sector())] = b;
        }
        q.kick().expect("kick");
    };
    let mut rest = Vec::new();
    while q.in_flight() > 0 {
        q.wait(&mut rest, SOON).expect("drain");
    }
    assert!(
        rest.iter().all(|c| c.status() == Some(StatusByte::OK)),
        "{rest:?}"
    );
    Rate {
        completed,
        secs,
        cpu,
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a whole number")),
        Err(_) => default,
    }
}

/// The `target` directory this bench was built into (…/target/release/deps/device-…).
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_owned()))
        .filter(|dir| dir.join("criterion").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A figure of the engine bench's last run: ns per request, and how long ago
/// it was measured.
struct EngineFigure {
    ns: f64,
    age: Option<Duration>,
}

/// The engine bench's estimate for `group/function`, the middle figure
/// criterion prints (the slope if it has one, else the mean).
fn engine_figure(group: &str, function: &str) -> Option<EngineFigure> {
    let path = target_dir()
        .join("criterion")
        .join(group)
        .join(function)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(&path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let ns = ["slope", "mean"]
        .iter()
        .find_map(|k| json.get(k)?.get("point_estimate")?.as_f64())?;
    let age = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    Some(EngineFigure { ns, age })
}

/// Prints the estimate of everything off against no dma for `workload`, whose
/// A rounds ran at `iops_a`.
fn print_estimate(workload: Workload, iops_a: f64) {
    let group = workload.engine_group();
    let (Some(plain), Some(off)) = (
        engine_figure(group, "plain"),
        engine_figure(group, "engine-checks-off"),
    ) else {
        println!(
            "  {workload}: no results of the engine bench ({group}) in {}; \
             run `cargo bench -p dma --bench engine` first",
            target_dir().join("criterion").display()
        );
        return;
    };
    let overhead = off.ns - plain.ns;
    let per_request = 1e9 / iops_a;
    let percent = 100.0 * overhead / per_request;
    // Without the engine's share, the same device would take this long.
    let no_dma_iops = 1e9 / (per_request - overhead.max(0.0));
    let age = [plain.age, off.age]
        .into_iter()
        .flatten()
        .max()
        .map_or(String::new(), |a| {
            format!(", measured {:.0} s ago", a.as_secs_f64())
        });
    println!(
        "  {workload}: engine bench {group}: (b) checks off {:.0} ns - (a) plain copy {:.0} ns \
         = {overhead:.0} ns per request{age}",
        off.ns, plain.ns
    );
    println!(
        "  {workload}: A at {iops_a:.0} IOPS = {per_request:.0} ns per request on one queue; \
         the engine with everything off is {percent:.2}% of that \
         (no dma: ~{no_dma_iops:.0} IOPS, A/no-dma {:.3}); target within {TARGET_PERCENT}%: {}",
        iops_a / no_dma_iops,
        if percent <= TARGET_PERCENT {
            "met"
        } else {
            "NOT met"
        }
    );
}

fn main() {
    let rounds = usize::try_from(env_or("DMAPROBE_BENCH_ROUNDS", 6).max(1)).expect("rounds");
    let round = Duration::from_secs(env_or("DMAPROBE_BENCH_SECS", 2).max(1));

    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("blk.sock");
    let ledger_file = dir.path().join("ledger.jsonl");
    let ledger_arg = ledger_file.to_str().expect("utf-8 temp path");
    let serve = serve_config(&socket, &[]);
    let with_checks = serve_config(&socket, &["--canary", "--snapshot", "--ledger", ledger_arg]);
    assert!(serve.faults.is_empty(), "A has no fault rules");
    // The configurations compared, A and B: the checks each sets.
    let configs = [serve.dma.checks, with_checks.dma.checks];
    assert_eq!(configs[0], Checks::default(), "A has every check off");
    assert!(configs[1].canary && configs[1].snapshot && configs[1].ledger);

    let daemon = Daemon::start(&serve).expect("the daemon starts");
    fill_media(daemon.namespace());
    let mut fe = BlkFrontend::connect(
        &socket,
        FrontendConfig {
            mem_size: 16 << 20,
            num_queues: 1,
            timeout: SOON,
            ..FrontendConfig::default()
        },
    )
    .expect("the frontend connects");
    let ram = fe.ram().clone();
    let alloc = |seed: u64| -> Vec<Buffer> {
        (0..DEPTH)
            .map(|i| {
                let b = ram.alloc_aligned(LEN, LEN as u64).expect("alloc");
                // Write sources with data: all-zero ones are tracked as zero buffers.
                b.write_at(0, &pattern(seed + i as u64, LEN)).expect("fill");
                b
            })
            .collect()
    };
    let read_bufs = alloc(0x100);
    let write_bufs = alloc(0x200);
    let q = fe.queue(0).expect("queue 0");
    let engine = daemon.engine().clone();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let workloads = [Workload::Read, Workload::Write];

    println!(
        "dmaprobe device bench: 4 KiB random reads and writes, queue depth {DEPTH}, one queue, \
         {MEDIA} memory media"
    );
    println!("  A: everything off (no rules, no checks, no ledger)");
    println!("  B: canary + snapshot + ledger (--canary --snapshot --ledger)");
    println!(
        "  warm-up {} s of each; {rounds} rounds of {} s, A and B alternating",
        WARM_UP.as_secs(),
        round.as_secs()
    );

    let mut run = |checks: Checks, workload: Workload, duration: Duration| -> Rate {
        engine.set_checks(checks);
        let bufs = match workload {
            Workload::Read => &read_bufs,
            Workload::Write => &write_bufs,
        };
        let ledger_before = ledger_total(&engine);
        let rate = keep_busy(q, bufs, workload.kind(), duration, &mut rng);
        let recorded = ledger_total(&engine) - ledger_before;
        if checks.ledger {
            assert!(recorded >= rate.completed, "B records every request");
        } else {
            assert_eq!(recorded, 0, "A records nothing");
        }
        if let Some(e) = daemon.failure() {
            panic!("the daemon stopped: {e}");
        }
        rate
    };

    for workload in workloads {
        for checks in configs {
            run(checks, workload, WARM_UP);
        }
    }

    // rates[workload][config]: one per round.
    let mut rates: [[Vec<Rate>; 2]; 2] = Default::default();
    println!();
    println!("round  workload  A IOPS   B IOPS   B/A    A CPU us/req  B CPU us/req");
    for r in 1..=rounds {
        for (w, &workload) in workloads.iter().enumerate() {
            for (c, checks) in configs.into_iter().enumerate() {
                rates[w][c].push(run(checks, workload, round));
            }
            let (a, b) = (&rates[w][0][r - 1], &rates[w][1][r - 1]);
            println!(
                "{r:<5}  {workload:<8}  {:<7.0}  {:<7.0}  {:<5.3}  {:<12.2}  {:.2}",
                a.iops(),
                b.iops(),
                b.iops() / a.iops(),
                a.cpu_us(),
                b.cpu_us()
            );
        }
    }

    assert_eq!(findings(&engine), 0, "a clean run has no findings");

    println!();
    println!("median of {rounds} rounds:");
    let mut medians_a = [0.0; 2];
    for (w, &workload) in workloads.iter().enumerate() {
        let of =
            |c: usize, f: fn(&Rate) -> f64| median(&rates[w][c].iter().map(f).collect::<Vec<_>>());
        let (a, b) = (of(0, Rate::iops), of(1, Rate::iops));
        medians_a[w] = a;
        let ratios: Vec<f64> = rates[w][1]
            .iter()
            .zip(&rates[w][0])
            .map(|(b, a)| b.iops() / a.iops())
            .collect();
        println!(
            "  {workload:<5}  A {a:.0} IOPS  B {b:.0} IOPS  B/A {:.3} \
             (median of the rounds' B/A {:.3}); CPU per request A {:.2} us, B {:.2} us",
            b / a,
            median(&ratios),
            of(0, Rate::cpu_us),
            of(1, Rate::cpu_us)
        );
    }

    println!();
    println!(
        "everything off against no dma: an ESTIMATE derived from two measurements \
         (the engine bench's per-request cost and A's IOPS above), not a measured device without dma"
    );
    for (w, &workload) in workloads.iter().enumerate() {
        print_estimate(workload, medians_a[w]);
    }
}
