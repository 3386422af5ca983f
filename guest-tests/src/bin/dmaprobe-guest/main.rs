//! dmaprobe-guest: the test program inside the guest.
//!
//! A busybox `/init` starts it after loading virtio-blk; the disk under test is
//! `/dev/vda`, served by dmaprobe, or the one `dmaprobe.disk` names
//! (`/dev/nvme0n1` over NVMe). It reads [`GuestParams`] from `/proc/cmdline`,
//! runs the tests named there in order, reports every step as an [`Event`], and
//! exits 0 so that `/init` can power off.
//!
//! - `main.rs`: the test table ([`TESTS`]), the per-test context ([`Ctx`]) and how
//!   a test's result becomes a [`Verdict`].
//! - [`report`]: the event channel (`/dev/ttyS1`, else stdout) and `/dev/kmsg` markers.
//! - [`io`]: aligned buffers, exact positional I/O with errno text, the pattern check.
//! - [`smoke`]: the raw disk's size, and O_DIRECT and buffered data round trips.
//! - [`ext4`]: files written and read through ext4, buffered and O_DIRECT.
//! - [`delay`]: a read the device delays moves its data at the end of the delay.
//! - [`mailbox`]: the guest's end of the device mailbox (control commands).
//! - [`hold`]: a program holds its own read through the mailbox and releases it.
//! - [`mm`]: anonymous pages, their frames, the pin counters, fork.
//! - [`cow`]: an O_DIRECT read held across fork: does the parent keep its data?
//!   From the raw disk, a file on ext4 (iomap) or on vfat (fs/direct-io.c).
//! - [`lifetimes`]: writes across fork, reads from many threads across fork, unmap.
//! - [`held`]: holding the test's own requests at the device through the mailbox.
//! - [`zero`]: the zero page as an O_DIRECT source and target; the pin counter.
//! - [`uring`]: an io_uring read into a registered buffer, held across fork.
//! - [`passthru`]: NVMe passthrough reads and writes (ioctl, io_uring
//!   command) held across fork, and from the zero page (`--transport nvme`).
//! - [`splice`]: splice from an O_DIRECT file racing with truncate, the read held.
//! - [`iomap`]: sub-block O_DIRECT writes into holes and unwritten extents.
//! - [`dio_zeroing`]: the legacy direct-I/O code's zero padding (UDF), from
//!   the zero page, which must not be pinned.
//! - [`fio`]: fio's 4k random read at QD32, IOPS and latency as notes (opt-in).
//! - [`powercut`]: files on ext4 with and without fsync across a power cut
//!   (two boots); a media error under a file fails its read until rewritten.
//! - [`restart`]: O_DIRECT writes and fsyncs while the host kills the daemon
//!   with SIGKILL and starts it again: nothing flushed is lost.
//! - [`latency`]: QD1 O_DIRECT read latency against the device's media latency
//!   model, with mailbox reads as the baseline (opt-in).
//! - [`soak`]: fio, writers and the pinning patterns at once for a configured
//!   time, under the fault plan of the seed (opt-in).
//! - [`selftest`]: tests that fail or hang on purpose, to check the reports.
//!
//! For each test the host sees `begin`, the test's `check` (and `wrote`, `file`,
//! `note`) events, then `end` with the verdict; `hello` comes first, `done` last.
//!
//! To add a test: write `fn run(&Ctx) -> Result<(), Stop>` in its own module and
//! add a row to [`TESTS`].

mod cow;
mod delay;
mod dio_zeroing;
mod ext4;
mod fio;
mod held;
mod hold;
mod io;
mod iomap;
mod latency;
mod lifetimes;
mod mailbox;
mod mm;
mod passthru;
mod powercut;
mod report;
mod restart;
mod selftest;
mod smoke;
mod soak;
mod splice;
mod uring;
mod zero;

use std::cell::RefCell;
use std::error::Error as StdError;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use guest_tests::protocol::{Event, GuestParams, HostAction, Verdict};

use report::Reporter;

/// The disk under test when the command line names none: virtio-blk's.
const VIRTIO_DISK: &str = "/dev/vda";

/// The disk under test (`dmaprobe.disk`, set once at start).
static DISK: OnceLock<String> = OnceLock::new();

/// The disk under test: `/dev/vda` over virtio-blk, `/dev/nvme0n1` over NVMe.
pub fn disk_path() -> &'static str {
    DISK.get().map_or(VIRTIO_DISK, String::as_str)
}

/// How long to wait for the disk to appear.
const DISK_TIMEOUT: Duration = Duration::from_secs(10);

/// A test body. `Ok` means it ran to the end; it passes if none of its checks failed.
pub type TestFn = fn(&Ctx) -> Result<(), Stop>;

/// Every test the guest knows, by the name used in `dmaprobe.tests=`.
const TESTS: &[(&str, TestFn)] = &[
    ("smoke", smoke::run),
    ("ext4", ext4::run),
    ("delayed-read", delay::run),
    ("mailbox-hold", hold::run),
    ("dio-read-fork-cow", cow::parent_writes),
    ("dio-read-fork-cow-child", cow::child_writes),
    ("dio-read-fork-cow-ext4", cow::ext4_file),
    ("dio-read-fork-cow-vfat", cow::vfat_file),
    ("dio-read-fork-cow-threads", lifetimes::threads),
    ("dio-write-fork", lifetimes::write_fork),
    ("dio-write-fork-vfat", lifetimes::write_fork_vfat),
    ("dio-unmap-exit", lifetimes::unmap),
    ("dio-exit", lifetimes::exit),
    ("dio-pin-accounting", zero::pin_accounting),
    ("zero-page-write-source", zero::write_source),
    ("zero-page-read-target", zero::read_target),
    ("io-uring-fixed-fork", uring::fixed_fork),
    ("passthru-read-fork-cow", passthru::read_fork_cow),
    ("passthru-write-fork", passthru::write_fork),
    (
        "passthru-zero-page-write-source",
        passthru::zero_page_write_source,
    ),
    (
        "passthru-uring-read-fork-cow",
        passthru::uring_read_fork_cow,
    ),
    ("splice-truncate", splice::run),
    ("iomap-zeroing-ext4", iomap::ext4),
    ("iomap-zeroing-xfs", iomap::xfs),
    ("dio-zeroing-udf", dio_zeroing::udf),
    ("fio-randread", fio::randread),
    ("power-cut-ext4", powercut::power_cut),
    ("bad-block-ext4", powercut::bad_block),
    ("daemon-restart", restart::run),
    ("latency-instant", latency::instant),
    ("latency-nvme", latency::nvme),
    ("latency-sata", latency::sata),
    ("soak", soak::run),
    ("selftest-fail", selftest::fail),
    ("selftest-hang", selftest::hang),
];

/// Set by a test that leaves its file system for a power cut: after `done`
/// the guest powers off at once, without the sync that `/init`'s
/// `poweroff -f` does.
static POWER_OFF_UNSYNCED: AtomicBool = AtomicBool::new(false);

/// Why a test stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The kernel misbehaved or the data is wrong.
    Fail(String),
    /// The kernel lacks what the test needs.
    Skip(String),
    /// The harness went wrong (a missing disk, a failed allocation).
    Error(String),
}

impl Stop {
    pub fn reason(&self) -> &str {
        match self {
            Stop::Fail(r) | Stop::Skip(r) | Stop::Error(r) => r,
        }
    }
}

/// Turns any error into a [`Stop`], choosing whose fault it is.
pub trait OrStop<T> {
    /// The kernel's fault: the verdict is Fail.
    fn or_fail(self) -> Result<T, Stop>;
    /// The harness's fault: the verdict is Error.
    fn or_error(self) -> Result<T, Stop>;
}

impl<T, E: StdError> OrStop<T> for Result<T, E> {
    fn or_fail(self) -> Result<T, Stop> {
        self.map_err(|e| Stop::Fail(one_line(&e)))
    }
    fn or_error(self) -> Result<T, Stop> {
        self.map_err(|e| Stop::Error(one_line(&e)))
    }
}

/// An error and its causes on one line, outermost first.
pub fn one_line(err: &dyn StdError) -> String {
    let mut s = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// What a running test can see and say.
#[derive(Debug)]
pub struct Ctx<'a> {
    params: &'a GuestParams,
    out: &'a Reporter,
    test: &'a str,
    /// Details of the checks that failed, in order.
    failed: RefCell<Vec<String>>,
}

impl Ctx<'_> {
    pub fn params(&self) -> &GuestParams {
        self.params
    }

    /// The seed for the `k`th pattern of a test (k >= 1), distinct for each k.
    pub fn seed(&self, k: u64) -> u64 {
        self.params.seed.wrapping_add(k << 32)
    }

    /// Waits for the disk under test; its absence is the harness's fault.
    pub fn disk(&self) -> Result<&'static str, Stop> {
        let disk = disk_path();
        if io::wait_for(disk, DISK_TIMEOUT) {
            Ok(disk)
        } else {
            Err(Stop::Error(format!(
                "{disk} missing after {} s (its driver not loaded?)",
                DISK_TIMEOUT.as_secs()
            )))
        }
    }

    /// Reports one check; a failed one makes the test fail at its end.
    pub fn check(&self, name: &str, ok: bool, detail: impl Into<String>) -> bool {
        let detail = detail.into();
        if !ok {
            self.failed.borrow_mut().push(format!("{name}: {detail}"));
        }
        self.out.emit(&Event::Check {
            test: self.test.to_owned(),
            name: name.to_owned(),
            ok,
            detail,
        });
        ok
    }

    /// Reports the result of one step as a check. A [`Stop::Fail`] is only
    /// recorded, so the test goes on to gather more evidence; Skip and Error
    /// are recorded and passed up.
    pub fn record(&self, name: &str, result: Result<String, Stop>) -> Result<(), Stop> {
        match result {
            Ok(detail) => {
                self.check(name, true, detail);
                Ok(())
            }
            Err(stop) => {
                self.check(name, false, stop.reason());
                match stop {
                    Stop::Fail(_) => Ok(()),
                    Stop::Skip(_) | Stop::Error(_) => Err(stop),
                }
            }
        }
    }

    /// Tells the host the raw disk holds `fill_pattern(seed, offset)` at `offset..offset + len`.
    pub fn wrote(&self, offset: u64, len: usize, seed: u64) {
        self.out.emit(&Event::Wrote {
            test: self.test.to_owned(),
            offset,
            len: len as u64,
            seed,
        });
    }

    /// Tells the host the file system holds `fill_pattern(seed, 0)` in `path` (from its root).
    pub fn file(&self, path: &str, len: usize, seed: u64) {
        self.out.emit(&Event::File {
            test: self.test.to_owned(),
            path: path.to_owned(),
            len: len as u64,
            seed,
        });
    }

    /// Asks for the guest to power off without a sync once every test has
    /// ended and `done` is out (a power cut as the kernel sees it).
    pub fn power_off_unsynced(&self) {
        POWER_OFF_UNSYNCED.store(true, Ordering::Relaxed);
    }

    /// Asks the host to act on the device now (see [`HostAction`]); the
    /// guest carries on at once and must notice the effect itself.
    pub fn host(&self, action: HostAction) {
        self.out.emit(&Event::Host {
            test: self.test.to_owned(),
            action,
        });
    }

    /// Reports a property of the kernel, not a pass or fail by itself.
    pub fn note(&self, key: &str, value: impl Into<String>) {
        self.out.emit(&Event::Note {
            test: self.test.to_owned(),
            key: key.to_owned(),
            value: value.into(),
        });
    }

    /// The verdict of a test that returned `result`, with its failed checks.
    fn verdict(&self, result: Result<(), Stop>) -> (Verdict, String) {
        let failed = self.failed.borrow();
        let more = match failed.len() {
            0 | 1 => String::new(),
            n => format!(" (and {} more failed checks)", n - 1),
        };
        match result {
            Ok(()) => match failed.first() {
                None => (Verdict::Pass, String::new()),
                Some(first) => (Verdict::Fail, format!("{first}{more}")),
            },
            Err(Stop::Fail(reason)) => (Verdict::Fail, reason),
            Err(Stop::Skip(reason)) => (Verdict::Skip, reason),
            Err(Stop::Error(reason)) => (Verdict::Error, reason),
        }
    }
}

fn main() {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
        eprintln!("dmaprobe-guest: cannot read /proc/cmdline ({e}); running no tests");
        String::new()
    });
    let params = GuestParams::from_cmdline(&cmdline);
    if let Some(disk) = &params.disk {
        let _ = DISK.set(disk.clone());
    }
    let out = Reporter::open();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    out.emit(&Event::Hello {
        kernel,
        tests: params.tests.clone(),
    });
    if params.mailbox {
        register_zero_page(&out);
    }
    for name in &params.tests {
        run_test(&params, &out, name);
    }
    out.emit(&Event::Done);
    if POWER_OFF_UNSYNCED.load(Ordering::Relaxed) {
        // Every event is drained to the UART by now (Reporter::emit).
        report::kmsg("dmaprobe: power off without sync");
        // SAFETY: reboot(2) takes no pointers; with POWER_OFF it returns only
        // on failure.
        unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF) };
        eprintln!(
            "dmaprobe-guest: power off failed ({}); /init powers off with a sync",
            std::io::Error::last_os_error()
        );
    }
}

/// Tells the device where the zero page is, so that it can see DMA into it and
/// writes sourced from it. A note says how it went; a failure is left to the
/// tests that need the mailbox to find.
fn register_zero_page(out: &Reporter) {
    let note = |value: String| {
        out.emit(&Event::Note {
            test: String::new(),
            key: "zero-page".into(),
            value,
        })
    };
    io::wait_for(disk_path(), DISK_TIMEOUT);
    let registered = mm::zero_page_gpa().and_then(|gpa| {
        let mailbox = mailbox::Mailbox::open(disk_path())?;
        mailbox.call(serde_json::json!({"cmd": "zero-page", "gpa": format!("{gpa:#x}")}))?;
        Ok(gpa)
    });
    match registered {
        Ok(gpa) => note(format!("{gpa:#x} registered with the device")),
        Err(e) => note(format!("not registered: {}", e.reason())),
    }
}

/// Runs one test between its markers; nothing a test does can stop the others.
fn run_test(params: &GuestParams, out: &Reporter, name: &str) {
    report::kmsg(&format!("dmaprobe: begin {name}"));
    out.emit(&Event::Begin {
        test: name.to_owned(),
    });
    let start = Instant::now();
    let (verdict, reason) = match TESTS.iter().find(|(n, _)| *n == name) {
        None => (Verdict::Error, "unknown test".to_owned()),
        Some((_, body)) => {
            let ctx = Ctx {
                params,
                out,
                test: name,
                failed: RefCell::new(Vec::new()),
            };
            // A panic is a bug in this program: the test's verdict is Error.
            // The panic hook has already printed the message on stderr.
            let result = panic::catch_unwind(AssertUnwindSafe(|| body(&ctx)))
                .unwrap_or_else(|payload| Err(Stop::Error(panic_message(payload.as_ref()))));
            ctx.note("elapsed-ms", start.elapsed().as_millis().to_string());
            ctx.verdict(result)
        }
    };
    out.emit(&Event::End {
        test: name.to_owned(),
        verdict,
        reason,
    });
    report::kmsg(&format!("dmaprobe: end {name}"));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let msg = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("test panicked: {msg}")
}
