//! `soak`: the suite's heaviest I/O, all at once, for `dmaprobe.duration`
//! seconds, on the ext4 file system the host made on the whole disk, while
//! the device applies the fault plan of the run's seed
//! (`guest_tests::soak::fault_plan`, which this program computes too, to know
//! how long its reads may wait and whether they may fail).
//!
//! Five workers run side by side until the time is up, each checking its own
//! data:
//! - fio (packed by the host): mixed 4–64 KiB random reads and writes at QD16
//!   with libaio and O_DIRECT on a 64 MiB file, every block written read back
//!   and verified (`verify=crc32c`, `verify_backlog`).
//! - An O_DIRECT writer: files of 64 KiB to 4 MiB written in 128 KiB
//!   chunks, fsync'd, read back with O_DIRECT and compared.
//! - A buffered writer: files of 64 KiB to 2 MiB written through the page
//!   cache in whole pages, fsync'd, dropped from the cache
//!   (`POSIX_FADV_DONTNEED`) and read back from the device. Each page is
//!   written once before the fsync, so no page changes while its writeback
//!   is in flight (which `--snapshot` would rightly report: virtio-blk asks
//!   for no stable pages).
//! - The dio-read-fork-cow pattern in a loop, the plan's delays standing in
//!   for holds: a thread reads 512 B with O_DIRECT from a file into a fresh
//!   anonymous page; once the device lists the read as waiting (asked
//!   through the mailbox), the process forks (the child exits), and if the
//!   device still lists the read, the parent writes elsewhere in the page.
//!   The page must then hold the data. On a kernel that references rather
//!   than pins the page (before Linux 6.5) the read lands in the page fork
//!   left behind, and the device's watch of the read sees that page freed.
//! - The io-uring-fixed-fork pattern in a loop: a READ_FIXED into a
//!   registered page, pinned on every kernel, with a fork and a write within
//!   the first half of the plan's shortest delay.
//!
//! Pages that reads went into are kept mapped for a second after their read
//! (longer than the plan's watches), so that a correct kernel never frees a
//! watched page. The files each writer wrote last, and the pinning loops'
//! source, are left for the host to check; then the file system is unmounted
//! for the host's e2fsck.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use guest_tests::soak::{fault_plan, FaultPlan, DEFAULT_SECONDS, PIN_READ_LEN};
use serde_json::json;
use wire::pattern::fill_pattern;
use wire::splitmix::SplitMix64;

use crate::ext4::{block_lba, Mount};
use crate::fio::FIO;
use crate::io::{check_pattern, AlignedBuf, Cache, Fd, IoError, PAGE, UNTOUCHED};
use crate::mailbox::Mailbox;
use crate::mm::{fork_and_wait, pfn, AnonPage};
use crate::uring::Ring;
use crate::{one_line, Ctx, OrStop, Stop};

const MOUNT_POINT: &str = "/mnt";
/// What the pinning loops read from (from the file system's root).
const PIN_SOURCE: &str = "/pin-source.bin";
const PIN_SOURCE_LEN: usize = 1 << 20;
const FIO_FILE: &str = "/fio.dat";
/// Files each writer cycles through; the last of each is left for the host.
const SLOTS: u64 = 4;
const DIRECT_CHUNK: usize = 128 << 10;
const BUFFERED_CHUNK: usize = 64 << 10;
/// How long a page a read went into stays mapped after the read: longer
/// than any watch of the plan (at most 200 ms).
const RETAIN: Duration = Duration::from_secs(1);
/// How many failures of a worker are told in full.
const TOLD: usize = 3;

/// The pinning loops' read: 512 B into the start of the page.
const READ_LEN: usize = PIN_READ_LEN as usize;
/// What the page holds before the read.
const OLD: u8 = 0x11;
/// Where in the page, and what, the parent writes after fork.
const TOUCH_AT: usize = 2048;
const TOUCH: u8 = 0x33;

pub fn run(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    if !Path::new(FIO).is_file() {
        return Err(Stop::Error(format!(
            "{FIO} is not in the initramfs (the host packs it for tests that need it)"
        )));
    }
    let seconds = ctx.params().duration.unwrap_or(DEFAULT_SECONDS);
    let plan = fault_plan(ctx.params().seed);
    let (lo, hi) = plan.pin_delay_ms;
    ctx.note(
        "workload",
        format!(
            "{seconds} s of fio randrw+verify, O_DIRECT and buffered writers, O_DIRECT and \
             io_uring reads across fork; the plan delays {READ_LEN} B reads {lo}-{hi} ms{}",
            if plan.pin_errors {
                " and fails some"
            } else {
                ""
            }
        ),
    );
    let mount = Mount::ext4(disk, MOUNT_POINT)?;
    let source_seed = ctx.seed(1);
    ctx.record(
        &format!("write the pinning loops' source {PIN_SOURCE}"),
        write_source(source_seed),
    )?;
    ctx.file(PIN_SOURCE, PIN_SOURCE_LEN, source_seed);
    let fd = Fd::open_read(path(PIN_SOURCE), Cache::Direct).or_error()?;
    let block_lbas = (0..(PIN_SOURCE_LEN / PAGE) as u64)
        .map(|i| block_lba(&fd, PIN_SOURCE, i))
        .collect::<Result<_, _>>()?;
    let source = PinSource {
        fd: &fd,
        seed: source_seed,
        block_lbas,
    };
    let forking = Mutex::new(());

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (direct_seed, buffered_seed, loop_seed) = (ctx.seed(2), ctx.seed(3), ctx.seed(4));
    let outcomes: Vec<thread::Result<Outcome>> = thread::scope(|s| {
        let workers = [
            s.spawn(|| fio(seconds)),
            s.spawn(|| direct_writer(direct_seed, deadline)),
            s.spawn(|| buffered_writer(buffered_seed, deadline)),
            s.spawn(|| dio_fork_loop(&source, &plan, loop_seed, deadline, &forking)),
            s.spawn(|| uring_fork_loop(source_seed, &plan, loop_seed ^ 1, deadline, &forking)),
        ];
        workers.into_iter().map(|w| w.join()).collect()
    });
    for outcome in outcomes {
        let outcome = outcome.map_err(|_| Stop::Error("a soak worker panicked".into()))?;
        for (key, value) in outcome.notes {
            ctx.note(&key, value);
        }
        for (name, ok, detail) in outcome.checks {
            ctx.check(&name, ok, detail);
        }
        for (name, len, seed) in outcome.files {
            ctx.file(&name, len, seed);
        }
    }
    drop(source);
    drop(fd);
    ctx.record("unmount", mount.unmount())?;
    Ok(())
}

/// What one worker did: its checks, notes, and the files it leaves.
#[derive(Debug, Default)]
struct Outcome {
    checks: Vec<(String, bool, String)>,
    notes: Vec<(String, String)>,
    /// Path from the file system's root, length, pattern seed.
    files: Vec<(String, usize, u64)>,
}

impl Outcome {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        self.checks.push((name.to_owned(), ok, detail));
    }
}

/// A worker's failures: how many, and the first few in full.
#[derive(Debug, Default)]
struct Failures {
    count: u64,
    first: Vec<String>,
}

impl Failures {
    fn add(&mut self, what: String) {
        self.count += 1;
        if self.first.len() < TOLD {
            self.first.push(what);
        }
    }

    /// The check of a worker that did `done`: passed if nothing failed.
    fn check(&self, out: &mut Outcome, name: &str, done: String) {
        if self.count == 0 {
            out.check(name, true, done);
        } else {
            out.check(
                name,
                false,
                format!("{} failed ({done}): {}", self.count, self.first.join("; ")),
            );
        }
    }
}

fn path(name: &str) -> String {
    format!("{MOUNT_POINT}{name}")
}

/// The pinning loops' source: a page-aligned file of pattern, fsync'd.
fn write_source(seed: u64) -> Result<String, Stop> {
    let fd = Fd::create(path(PIN_SOURCE), Cache::Direct).or_fail()?;
    let mut buf = AlignedBuf::new(PIN_SOURCE_LEN, 0).or_error()?;
    fill_pattern(seed, 0, buf.as_mut_slice());
    fd.write_all_at(buf.as_slice(), 0).or_fail()?;
    fd.sync().or_fail()?;
    Ok(format!("{PIN_SOURCE_LEN} B with O_DIRECT, fsync"))
}

/// fio's arguments for a run of `seconds`.
fn fio_args(seconds: u64) -> Vec<String> {
    [
        "--name=soak".to_owned(),
        format!("--filename={}", path(FIO_FILE)),
        "--size=64M".to_owned(),
        "--direct=1".to_owned(),
        "--ioengine=libaio".to_owned(),
        "--rw=randrw".to_owned(),
        "--rwmixread=50".to_owned(),
        "--bsrange=4k-64k".to_owned(),
        "--iodepth=16".to_owned(),
        "--verify=crc32c".to_owned(),
        "--verify_backlog=256".to_owned(),
        "--verify_fatal=1".to_owned(),
        "--verify_state_save=0".to_owned(),
        format!("--runtime={seconds}s"),
        "--time_based".to_owned(),
        "--output-format=json".to_owned(),
    ]
    .into()
}

/// What fio's one job did.
#[derive(Debug, PartialEq, Eq)]
struct FioFigures {
    /// The job's error (an errno; 0 when every I/O and verify succeeded).
    error: i64,
    reads: u64,
    writes: u64,
    read_kib: u64,
    write_kib: u64,
}

fn fio_figures(output: &str) -> Result<FioFigures, String> {
    let json = crate::fio::json(output).map_err(|e| one_line(&e))?;
    let int = |pointer: &str| {
        json.pointer(pointer)
            .and_then(|v| v.as_i64())
            .ok_or_else(|| format!("fio's output lacks {pointer}"))
    };
    let uint = |pointer: &str| int(pointer).map(|n| n.max(0) as u64);
    Ok(FioFigures {
        error: int("/jobs/0/error")?,
        reads: uint("/jobs/0/read/total_ios")?,
        writes: uint("/jobs/0/write/total_ios")?,
        read_kib: uint("/jobs/0/read/io_kbytes")?,
        write_kib: uint("/jobs/0/write/io_kbytes")?,
    })
}

fn fio(seconds: u64) -> Outcome {
    let mut out = Outcome::default();
    let name = "fio: random reads and writes, every write verified, without an error";
    let run = match Command::new(FIO).args(fio_args(seconds)).output() {
        Ok(run) => run,
        Err(e) => {
            out.check(name, false, format!("cannot run {FIO}: {e}"));
            return out;
        }
    };
    let stderr = String::from_utf8_lossy(&run.stderr).trim().to_owned();
    let told = |s: &str| {
        if s.is_empty() {
            String::new()
        } else {
            format!("; stderr: {s}")
        }
    };
    match fio_figures(&String::from_utf8_lossy(&run.stdout)) {
        Ok(f) => {
            out.notes.push((
                "fio".into(),
                format!(
                    "{} reads ({} MiB), {} writes ({} MiB) in {seconds} s",
                    f.reads,
                    f.read_kib >> 10,
                    f.writes,
                    f.write_kib >> 10
                ),
            ));
            out.check(
                name,
                run.status.success() && f.error == 0 && f.reads > 0 && f.writes > 0,
                format!(
                    "fio {}, job error {}, {} reads, {} writes{}",
                    run.status,
                    f.error,
                    f.reads,
                    f.writes,
                    told(&stderr)
                ),
            );
        }
        Err(e) => out.check(
            name,
            false,
            format!("{e} (fio {}{})", run.status, told(&stderr)),
        ),
    }
    out
}

/// Writes files with O_DIRECT, fsyncs them and reads them back, until `deadline`.
fn direct_writer(base_seed: u64, deadline: Instant) -> Outcome {
    let mut buf = match AlignedBuf::new(DIRECT_CHUNK, 0) {
        Ok(b) => b,
        Err(e) => {
            let mut out = Outcome::default();
            out.check("O_DIRECT writer", false, one_line(&e));
            return out;
        }
    };
    let writer = Writer {
        kind: "direct",
        max_pages: 1024,
        check: "O_DIRECT writer: files written, fsync'd and read back",
    };
    writer.run(base_seed, deadline, |path, len, seed| {
        direct_round(path, len, seed, &mut buf)
    })
}

/// One file of the O_DIRECT writer: write in chunks, fsync, read back, compare.
fn direct_round(path: &str, len: usize, seed: u64, buf: &mut AlignedBuf) -> Result<(), String> {
    let err = |e: IoError| one_line(&e);
    let fd = Fd::create(path, Cache::Direct).map_err(err)?;
    for at in (0..len).step_by(DIRECT_CHUNK) {
        let chunk = &mut buf.as_mut_slice()[..DIRECT_CHUNK.min(len - at)];
        fill_pattern(seed, at as u64, chunk);
        fd.write_all_at(chunk, at as u64).map_err(err)?;
    }
    fd.sync().map_err(err)?;
    for at in (0..len).step_by(DIRECT_CHUNK) {
        let chunk = &mut buf.as_mut_slice()[..DIRECT_CHUNK.min(len - at)];
        chunk.fill(UNTOUCHED);
        fd.read_exact_at(chunk, at as u64).map_err(err)?;
        check_pattern(seed, at as u64, chunk)
            .map_err(|m| format!("read back at byte {at}: {m}"))?;
    }
    Ok(())
}

/// Writes files through the page cache, fsyncs them, drops them from the
/// cache and reads them back from the device, until `deadline`.
fn buffered_writer(base_seed: u64, deadline: Instant) -> Outcome {
    let writer = Writer {
        kind: "buffered",
        max_pages: 512,
        check: "buffered writer: files written, fsync'd, dropped from the cache and read back",
    };
    writer.run(base_seed, deadline, buffered_round)
}

/// A writer of the soak: files of 16 to `max_pages` pages in [`SLOTS`]
/// slots (`/KIND-SLOT.bin`), each written, synced and read back by a round,
/// until the deadline; the last good file of each slot is left for the host
/// to check.
struct Writer {
    kind: &'static str,
    max_pages: u64,
    check: &'static str,
}

impl Writer {
    fn run(
        &self,
        base_seed: u64,
        deadline: Instant,
        mut round: impl FnMut(&str, usize, u64) -> Result<(), String>,
    ) -> Outcome {
        let mut out = Outcome::default();
        let mut rng = SplitMix64(base_seed);
        let mut failures = Failures::default();
        let mut last: Vec<Option<(usize, u64)>> = vec![None; SLOTS as usize];
        let (mut files, mut bytes) = (0u64, 0u64);
        let mut n = 0u64;
        while Instant::now() < deadline {
            let slot = (n % SLOTS) as usize;
            let name = format!("/{}-{slot}.bin", self.kind);
            let len = rng.in_range(16, self.max_pages) as usize * PAGE;
            let seed = base_seed.wrapping_add(n + 1);
            n += 1;
            last[slot] = None;
            match round(&path(&name), len, seed) {
                Ok(()) => {
                    last[slot] = Some((len, seed));
                    files += 1;
                    bytes += len as u64;
                }
                Err(e) => failures.add(format!("{name} ({len} B): {e}")),
            }
        }
        failures.check(
            &mut out,
            self.check,
            format!("{files} files, {} MiB", bytes >> 20),
        );
        out.files = files_left(&last, self.kind);
        out
    }
}

/// One file of the buffered writer. Whole pages at page offsets, each
/// written once: no page changes under writeback.
fn buffered_round(path: &str, len: usize, seed: u64) -> Result<(), String> {
    let err = |e: IoError| one_line(&e);
    let fd = Fd::create(path, Cache::Buffered).map_err(err)?;
    let mut chunk = vec![0u8; BUFFERED_CHUNK];
    for at in (0..len).step_by(BUFFERED_CHUNK) {
        let chunk = &mut chunk[..BUFFERED_CHUNK.min(len - at)];
        fill_pattern(seed, at as u64, chunk);
        fd.write_all_at(chunk, at as u64).map_err(err)?;
    }
    fd.sync().map_err(err)?;
    // SAFETY: posix_fadvise only takes the descriptor, which `fd` keeps open.
    let rc = unsafe { libc::posix_fadvise(fd.raw(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(format!(
            "POSIX_FADV_DONTNEED failed: {}",
            io::Error::from_raw_os_error(rc)
        ));
    }
    for at in (0..len).step_by(BUFFERED_CHUNK) {
        let chunk = &mut chunk[..BUFFERED_CHUNK.min(len - at)];
        chunk.fill(UNTOUCHED);
        fd.read_exact_at(chunk, at as u64).map_err(err)?;
        check_pattern(seed, at as u64, chunk)
            .map_err(|m| format!("read back at byte {at}: {m}"))?;
    }
    Ok(())
}

/// The host's `file` events of the files a writer left whole.
fn files_left(last: &[Option<(usize, u64)>], kind: &str) -> Vec<(String, usize, u64)> {
    last.iter()
        .enumerate()
        .filter_map(|(slot, f)| f.map(|(len, seed)| (format!("/{kind}-{slot}.bin"), len, seed)))
        .collect()
}

/// How long to wait before forking: within the first half of the shortest
/// delay the plan gives the read, so that the fork and the write land while
/// a delayed read waits.
fn fork_after(rng: &mut SplitMix64, plan: &FaultPlan) -> Duration {
    Duration::from_millis(rng.in_range(0, plan.pin_delay_ms.0 / 2))
}

/// Where the pinning loops read: a 512 B-aligned offset in the source.
fn pin_offset(rng: &mut SplitMix64) -> u64 {
    rng.in_range(0, (PIN_SOURCE_LEN / READ_LEN) as u64 - 1) * PIN_READ_LEN
}

/// Pages kept mapped for [`RETAIN`] after their reads, then unmapped; and
/// how many of them the kernel moved to another frame meanwhile (a watch of
/// the read would see the frame it left freed).
#[derive(Default)]
struct Retired {
    pages: VecDeque<(Instant, AnonPage, Option<u64>)>,
    moved: u64,
}

impl Retired {
    fn keep(&mut self, page: AnonPage) {
        let frame = pfn(page.addr()).ok().flatten();
        self.pages.push_back((Instant::now(), page, frame));
        while self
            .pages
            .front()
            .is_some_and(|(at, ..)| at.elapsed() > RETAIN)
        {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some((_, page, frame)) = self.pages.pop_front() {
            self.moved += u64::from(pfn(page.addr()).ok().flatten() != frame);
        }
    }

    /// Waits until the last page has been kept for [`RETAIN`], then unmaps
    /// all; returns how many moved.
    fn release(mut self) -> u64 {
        if let Some((at, ..)) = self.pages.back() {
            thread::sleep(RETAIN.saturating_sub(at.elapsed()));
        }
        while !self.pages.is_empty() {
            self.pop();
        }
        self.moved
    }
}

/// A read across fork that failed: what the page held and where it was.
fn lost(offset: u64, got: &[u8], wrote: bool, frames: (Option<u64>, Option<u64>)) -> String {
    let hex = |f: Option<u64>| f.map_or("none".into(), |f| format!("{:#x}", f * PAGE as u64));
    let held = if got.iter().all(|&b| b == OLD) {
        "kept its old bytes"
    } else if got.iter().all(|&b| b == 0) {
        "holds zeros"
    } else {
        // With --canary, the device's canary (stamped as the read arrived)
        // in a page copied while the read was in flight.
        &format!(
            "holds neither its old bytes nor the data (it starts {})",
            got.iter()
                .take(16)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    };
    format!(
        "the read of {READ_LEN} B at byte {offset} {}: the page {held} \
         (page {} before fork, {} after the write)",
        if wrote {
            "was waiting at the device through the fork and the parent's write"
        } else {
            "had no write after the fork"
        },
        hex(frames.0),
        hex(frames.1),
    )
}

/// How long the dio loop waits for the device to list its read as waiting;
/// a read the plan did not delay has returned long before.
const WAITING_TIMEOUT: Duration = Duration::from_millis(300);

/// What the dio loop reads from: the source's descriptor, its pattern seed,
/// and the disk LBA of each of its 4 KiB blocks (to find its reads among the
/// device's waiting requests).
struct PinSource<'a> {
    fd: &'a Fd,
    seed: u64,
    block_lbas: Vec<u64>,
}

impl PinSource<'_> {
    fn lba(&self, offset: u64) -> u64 {
        self.block_lbas[(offset / PAGE as u64) as usize] + offset % PAGE as u64 / PIN_READ_LEN
    }
}

/// Whether the device lists a 512 B read of `lba` as waiting (delayed).
fn waiting(mailbox: &Mailbox, lba: u64) -> Result<bool, Stop> {
    let listed = mailbox.call(json!({"cmd": "held"}))?;
    Ok(listed.as_array().is_some_and(|l| {
        l.iter()
            .any(|p| p["op"] == "read" && p["lba"] == lba && p["len"] == PIN_READ_LEN)
    }))
}

/// What a pinning loop counted of its reads, and how they failed.
#[derive(Debug, Default)]
struct Tally {
    reads: u64,
    /// Reads that failed with EIO, as the plan asks of some.
    eio: u64,
    failures: Failures,
}

impl Tally {
    /// A read that failed with `errno`: counted if the plan fails reads and
    /// this is its EIO, else a failure that `what` tells.
    fn read_failed(&mut self, plan: &FaultPlan, errno: Option<i32>, what: impl FnOnce() -> String) {
        if plan.pin_errors && errno == Some(libc::EIO) {
            self.eio += 1;
        } else {
            self.failures.add(what());
        }
    }
}

/// What the dio loop counted besides its reads.
#[derive(Debug, Default)]
struct DioCounts {
    /// The device still had the read waiting after the fork: the write came.
    raced: u64,
    /// The plan did not delay the read (it returned before the device listed it).
    undelayed: u64,
    /// The read's delay ran out during the fork: no write.
    outlasted: u64,
    /// How long each fork took (fork to the child reaped), in ms.
    fork_ms: Vec<u64>,
}

/// The dio-read-fork-cow pattern, over and over, until `deadline`, the
/// plan's delays standing in for the holds: a thread reads into a fresh
/// page; once the device lists the read as waiting, the process forks, and
/// if the device still lists it after the fork, the parent writes to the
/// page. The fork and the write then both fell while the kernel had the
/// page under I/O. When the read was not delayed, or its delay ran out
/// during the fork, nothing is written after the fork: a write would copy
/// a page whose read had completed (correctly) and free it, which a watch
/// of the read cannot tell from data lost. Forks of both pinning loops are
/// serialized by `forking`, so no other fork of this process falls between
/// the device's answer and the write.
fn dio_fork_loop(
    source: &PinSource,
    plan: &FaultPlan,
    seed: u64,
    deadline: Instant,
    forking: &Mutex<()>,
) -> Outcome {
    let mut out = Outcome::default();
    let name = "O_DIRECT reads across fork: every read reached the parent's page";
    let mailbox = match Mailbox::open(crate::disk_path()) {
        Ok(m) => m,
        Err(e) => {
            out.check(name, false, e.reason().to_owned());
            return out;
        }
    };
    let round = DioRound {
        source,
        plan,
        mailbox: &mailbox,
        forking,
    };
    let mut rng = SplitMix64(seed);
    let mut tally = Tally::default();
    let mut retired = Retired::default();
    let mut n = DioCounts::default();
    while Instant::now() < deadline {
        let page = match AnonPage::map() {
            Ok(p) => p,
            Err(e) => {
                tally.failures.add(e.reason().to_owned());
                break;
            }
        };
        round.run(&page, &mut rng, &mut n, &mut tally);
        retired.keep(page);
    }
    let moved = retired.release();
    report_dio_loop(&mut out, name, &tally, n, moved);
    out
}

/// What each round of the dio loop reads with: the source, the plan, the
/// mailbox that tells whether the device has the read waiting, and the lock
/// that serializes the pinning loops' forks.
struct DioRound<'a> {
    source: &'a PinSource<'a>,
    plan: &'a FaultPlan,
    mailbox: &'a Mailbox,
    forking: &'a Mutex<()>,
}

impl DioRound<'_> {
    /// One read into the fresh `page` across a fork, judged: counted in `n`
    /// and `tally`.
    fn run(&self, page: &AnonPage, rng: &mut SplitMix64, n: &mut DioCounts, tally: &mut Tally) {
        page.fill(OLD);
        let before = pfn(page.addr()).ok().flatten();
        let offset = pin_offset(rng);
        let (read, fork) = self.read_across_fork(page, offset, n);
        tally.reads += 1;
        let wrote = match fork {
            Ok(wrote) => wrote,
            Err(e) => {
                tally.failures.add(e);
                false
            }
        };
        match read {
            Err(e) => tally.failures.add(e),
            Ok(Err(e)) => {
                // Only a failed read can be the plan's EIO; a short one is not.
                let errno = match &e {
                    IoError::Read { source, .. } => source.raw_os_error(),
                    _ => None,
                };
                tally.read_failed(self.plan, errno, || one_line(&e));
            }
            Ok(Ok(())) => {
                let got = page.bytes(0, READ_LEN);
                if check_pattern(self.source.seed, offset, &got).is_err() {
                    let after = pfn(page.addr()).ok().flatten();
                    tally
                        .failures
                        .add(lost(offset, &got, wrote, (before, after)));
                } else if wrote && page.read(TOUCH_AT) != TOUCH {
                    tally.failures.add(format!(
                        "byte {TOUCH_AT} lost the parent's write: {:#04x}",
                        page.read(TOUCH_AT)
                    ));
                }
            }
        }
    }

    /// Reads at `offset` into `page` on a thread of its own while this one
    /// forks and writes as [`fork_while_waiting`] does; returns how the read
    /// ended and whether the parent wrote.
    fn read_across_fork(
        &self,
        page: &AnonPage,
        offset: u64,
        n: &mut DioCounts,
    ) -> (Result<Result<(), IoError>, String>, Result<bool, String>) {
        let lba = self.source.lba(offset);
        let done = AtomicBool::new(false);
        thread::scope(|s| {
            let reader = s.spawn(|| {
                // SAFETY: the page stays mapped until this scope ends; only
                // the kernel writes these 512 B while the read runs, and no
                // Rust reference to them exists.
                let buf =
                    unsafe { std::slice::from_raw_parts_mut(page.addr() as *mut u8, READ_LEN) };
                let r = self.source.fd.read_exact_at(buf, offset);
                done.store(true, Ordering::SeqCst);
                r
            });
            let fork = fork_while_waiting(self.mailbox, lba, &done, page, self.forking, n);
            let read = reader
                .join()
                .map_err(|_| "the reader thread panicked".to_owned());
            (read, fork)
        })
    }
}

/// The dio loop's note of what it counted, and its checks: every read
/// reached the parent's page, and some raced with a fork and a write.
fn report_dio_loop(out: &mut Outcome, name: &str, tally: &Tally, mut n: DioCounts, moved: u64) {
    n.fork_ms.sort_unstable();
    let pct = |p: usize| {
        n.fork_ms
            .get((n.fork_ms.len() * p / 100).min(n.fork_ms.len().saturating_sub(1)))
            .map_or("?".to_owned(), |ms| format!("{ms} ms"))
    };
    out.notes.push((
        "O_DIRECT fork loop".into(),
        format!(
            "{} reads: {} with the fork and the write while the device had the read waiting, \
             {} not delayed (no fork), {} whose delay ran out during the fork (no write), {} \
             failed with EIO as the plan asks; forks took {} (median), {} (max); pages moved \
             after their read: {moved}",
            tally.reads,
            n.raced,
            n.undelayed,
            n.outlasted,
            tally.eio,
            pct(50),
            pct(100)
        ),
    ));
    tally.failures.check(
        out,
        name,
        format!(
            "{} reads, {} raced with fork and a write",
            tally.reads, n.raced
        ),
    );
    out.check(
        "O_DIRECT reads across fork: forks and writes came while the device had reads waiting",
        n.raced > 0,
        format!("{} of {} reads", n.raced, tally.reads),
    );
}

/// Waits until the device lists the read of `lba` as waiting, forks, and
/// writes to the page if the device still lists it; returns whether it
/// wrote. Counts what happened in `n`.
fn fork_while_waiting(
    mailbox: &Mailbox,
    lba: u64,
    done: &AtomicBool,
    page: &AnonPage,
    forking: &Mutex<()>,
    n: &mut DioCounts,
) -> Result<bool, String> {
    let start = Instant::now();
    loop {
        if done.load(Ordering::SeqCst) || start.elapsed() > WAITING_TIMEOUT {
            n.undelayed += 1;
            return Ok(false);
        }
        if waiting(mailbox, lba).map_err(|e| e.reason().to_owned())? {
            break;
        }
    }
    let _serial = forking
        .lock()
        .map_err(|_| "a fork loop panicked".to_owned())?;
    let forked = Instant::now();
    let status = fork_and_wait(|| {}).map_err(|e| e.reason().to_owned())?;
    n.fork_ms.push(forked.elapsed().as_millis() as u64);
    if status != 0 {
        return Err(format!("the child exited with status {status}"));
    }
    if !waiting(mailbox, lba).map_err(|e| e.reason().to_owned())? {
        n.outlasted += 1;
        return Ok(false);
    }
    page.write(TOUCH_AT, TOUCH);
    n.raced += 1;
    Ok(true)
}

/// The io-uring-fixed-fork pattern, over and over, until `deadline`.
fn uring_fork_loop(
    source_seed: u64,
    plan: &FaultPlan,
    seed: u64,
    deadline: Instant,
    forking: &Mutex<()>,
) -> Outcome {
    let mut out = Outcome::default();
    let name = "io_uring fixed-buffer reads across fork: every read reached the parent's page";
    let ring = match Ring::setup(4) {
        Ok(r) => r,
        Err(e) if e.unsupported() => {
            out.notes
                .push(("io_uring".into(), format!("not run: {}", one_line(&e))));
            return out;
        }
        Err(e) => {
            out.check(name, false, one_line(&e));
            return out;
        }
    };
    let (file, page) = match source_and_registered_page(&ring) {
        Ok(x) => x,
        Err(e) => {
            out.check(name, false, e);
            return out;
        }
    };
    let round = UringRound {
        ring: &ring,
        file: &file,
        page: &page,
        plan,
        source_seed,
        forking,
    };
    let mut rng = SplitMix64(seed);
    let mut tally = Tally::default();
    while Instant::now() < deadline {
        // The last read's data turns to OLD bytes, not zeros: a watch of it
        // sees the program using its memory again, not a freed page.
        page.fill(OLD);
        let offset = pin_offset(&mut rng);
        tally.reads += 1;
        if let Err(e) = round.run(offset, &mut rng, &mut tally) {
            tally.failures.add(e);
            break;
        }
    }
    finish_uring_loop(&mut out, name, &ring, page, tally);
    out
}

/// The io_uring loop's end: the page unregistered, kept for [`RETAIN`] and
/// unmapped; its note, and the check of every read.
fn finish_uring_loop(out: &mut Outcome, name: &str, ring: &Ring, page: AnonPage, mut tally: Tally) {
    let unregistered = ring.unregister_buffers();
    let mut retired = Retired::default();
    retired.keep(page);
    let moved = retired.release();
    out.notes.push((
        "io_uring fork loop: page moved after its last read".into(),
        moved.to_string(),
    ));
    if let Err(e) = unregistered {
        tally.failures.add(one_line(&e));
    }
    tally.failures.check(
        out,
        name,
        format!(
            "{} reads{}",
            tally.reads,
            if tally.eio > 0 {
                format!(", {} failed with EIO as the plan asks", tally.eio)
            } else {
                String::new()
            }
        ),
    );
}

/// The io_uring loop's source opened with O_DIRECT, and a page of OLD bytes
/// registered with `ring` as fixed buffer 0.
fn source_and_registered_page(ring: &Ring) -> Result<(std::fs::File, AnonPage), String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path(PIN_SOURCE))
        .map_err(|e| format!("cannot open {PIN_SOURCE} with O_DIRECT: {e}"))?;
    let page = AnonPage::map().map_err(|e| e.reason().to_owned())?;
    page.fill(OLD);
    ring.register_buffer(page.addr(), PAGE)
        .map_err(|e| one_line(&e))?;
    Ok((file, page))
}

/// What each round of the io_uring loop reads with: the ring, the source,
/// the registered page, the plan, the source's pattern seed, and the lock
/// that serializes the pinning loops' forks.
struct UringRound<'a> {
    ring: &'a Ring,
    file: &'a std::fs::File,
    page: &'a AnonPage,
    plan: &'a FaultPlan,
    source_seed: u64,
    forking: &'a Mutex<()>,
}

impl UringRound<'_> {
    /// Read number `tally.reads`, at `offset`: submitted, then a fork and a
    /// write within the first half of the plan's shortest delay, then its
    /// completion judged. An error stops the loop.
    fn run(&self, offset: u64, rng: &mut SplitMix64, tally: &mut Tally) -> Result<(), String> {
        let read = tally.reads;
        self.ring
            .read_fixed(self.file, self.page.addr(), READ_LEN, offset, 0, read)
            .map_err(|e| one_line(&e))?;
        thread::sleep(fork_after(rng, self.plan));
        let forked = match self.forking.lock() {
            Ok(_serial) => {
                let forked = fork_and_wait(|| {});
                self.page.write(TOUCH_AT, TOUCH);
                forked
            }
            Err(_) => Err(Stop::Error("a fork loop panicked".into())),
        };
        let cqe = self
            .ring
            .wait_completion(Duration::from_secs(10))
            .map_err(|e| one_line(&e))?;
        if let Err(stop) = forked {
            tally.failures.add(stop.reason().to_owned());
        } else if cqe.user_data != read {
            tally
                .failures
                .add(format!("completion {:#x} for read {read}", cqe.user_data));
        } else if cqe.res != READ_LEN as i32 {
            tally.read_failed(self.plan, cqe.errno(), || {
                format!(
                    "the read of {READ_LEN} B at byte {offset} returned {}",
                    cqe.res
                )
            });
        } else if let Err(m) =
            check_pattern(self.source_seed, offset, &self.page.bytes(0, READ_LEN))
        {
            tally.failures.add(format!(
                "the io_uring read of {READ_LEN} B at byte {offset}: {m}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_runs_for_the_soaks_time_and_verifies_what_it_writes() {
        let args = fio_args(180).join(" ");
        for want in [
            "--runtime=180s --time_based",
            "--rw=randrw",
            "--direct=1",
            "--verify=crc32c",
            "--verify_backlog=256",
            "--verify_fatal=1",
            "--filename=/mnt/fio.dat",
        ] {
            assert!(args.contains(want), "{want} in {args}");
        }
        // Nothing fio reads is as small as the pinning loops' reads, which
        // the plan's rules pick out by size.
        assert!(args.contains("--bsrange=4k-64k"), "{args}");
    }

    #[test]
    fn reads_fios_figures() {
        const FIXTURE: &str = include_str!("../../../testdata/fio-randread.json");
        assert_eq!(
            fio_figures(FIXTURE).unwrap(),
            FioFigures {
                error: 0,
                reads: 144_615,
                writes: 0,
                read_kib: 578_584,
                write_kib: 0,
            }
        );
        assert!(fio_figures("fio: no output\n").is_err());
    }

    #[test]
    fn the_fork_comes_within_the_first_half_of_the_shortest_delay() {
        for seed in 0..50 {
            let plan = fault_plan(seed);
            let mut rng = SplitMix64(seed);
            for _ in 0..20 {
                let wait = fork_after(&mut rng, &plan);
                assert!(wait.as_millis() as u64 * 2 <= plan.pin_delay_ms.0);
                let at = pin_offset(&mut rng);
                assert!(
                    at.is_multiple_of(PIN_READ_LEN) && at as usize + READ_LEN <= PIN_SOURCE_LEN
                );
            }
        }
    }
}
