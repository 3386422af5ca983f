//! The daemon killed with SIGKILL and started again while the guest writes.
//!
//! `daemon-restart`, on the raw disk with a mailbox:
//! 1. [`WRITERS`] threads write 4 KiB records with O_DIRECT, each its own
//!    place in one pattern (record `r` at byte `r * 4096`, thread `t` writing
//!    the records `t`, `t + WRITERS`, ...), each with an fsync of the disk (a
//!    flush) after every [`FLUSH_EVERY`] of its records; so several writes and
//!    flushes are in flight at any time.
//! 2. Once every thread has flushed [`BEFORE`] records, the guest asks the host
//!    (a `host` event) to kill the daemon with SIGKILL and start it again on
//!    the same disk and socket. QEMU reconnects; the requests in flight when
//!    the daemon died stall until the new daemon serves them.
//! 3. Meanwhile the guest asks the mailbox for the daemon's uptime: a new
//!    daemon's starts again from zero. Once it is seen, the threads write
//!    [`AFTER`] more records between them, and the guest asks for the next
//!    restart, [`RESTARTS`] times in all; then the threads flush and stop.
//! 4. Every write and fsync must have succeeded, and every record written
//!    must read back. The host then checks that the backing file holds every
//!    record of the prefix that completed flushes cover.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use guest_tests::protocol::HostAction;
use serde_json::json;
use wire::pattern::fill_pattern;

use crate::io::{check_pattern, AlignedBuf, Cache, Fd, PAGE};
use crate::mailbox::Mailbox;
use crate::{Ctx, OrStop, Stop};

/// Threads writing at once.
const WRITERS: usize = 4;
/// Records each thread has flushed before the restart is asked for.
const BEFORE: u64 = 16;
/// Records written, between the threads, after each new daemon is seen.
const AFTER: u64 = 64;
/// How many times the daemon is killed and started again.
const RESTARTS: usize = 4;
/// Each thread fsyncs after this many of its records.
const FLUSH_EVERY: u64 = 4;
/// How long the guest waits to see a new daemon before it gives up.
const NOTICE_WITHIN: Duration = Duration::from_secs(60);
/// How often the guest asks the mailbox for the daemon's uptime.
const POLL: Duration = Duration::from_millis(10);
/// How many times a mailbox call is tried: the daemon may die between the
/// command's write and the answer's read, and the new one has no answer yet.
const MAILBOX_TRIES: u32 = 3;

/// What the writers share with the thread watching for the new daemon.
#[derive(Debug, Default)]
struct Writing {
    /// Records each thread has written (each write completed).
    written: [AtomicU64; WRITERS],
    /// Records each thread had written before its last completed fsync.
    flushed: [AtomicU64; WRITERS],
    /// The longest a write or fsync took, in µs: the outage as the guest felt it.
    longest_us: AtomicU64,
    /// Set to make the writers flush and stop.
    stop: AtomicBool,
    /// The first write or fsync that failed.
    failure: Mutex<Option<String>>,
}

impl Writing {
    fn total_written(&self) -> u64 {
        self.written.iter().map(|w| w.load(Ordering::Acquire)).sum()
    }

    fn min_flushed(&self) -> u64 {
        self.flushed
            .iter()
            .map(|f| f.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    fn failed(&self) -> bool {
        self.failure.lock().map_or(true, |f| f.is_some())
    }

    fn fail(&self, what: String) {
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(what);
        }
        self.stop.store(true, Ordering::Release);
    }

    /// Runs `op`, keeping the longest time any took.
    fn timed<T>(&self, op: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = op();
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.longest_us.fetch_max(us, Ordering::AcqRel);
        out
    }
}

/// When the guest saw a new daemon.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// Records written, between the threads, when it was seen.
    after_records: u64,
    /// How long after asking for the restart.
    after_asking: Duration,
}

pub fn run(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let mailbox = Mailbox::open(disk)?;
    let fd = Fd::open(disk, Cache::Direct).or_error()?;
    let seed = ctx.seed(1);
    // Records fit before the mailbox.
    let records = mailbox.offset() / PAGE as u64;
    let w = Writing::default();

    let seen = thread::scope(|s| {
        for t in 0..WRITERS {
            let (w, fd) = (&w, &fd);
            s.spawn(move || writer(w, fd, seed, t, records));
        }
        let seen = restarts(ctx, &w, &mailbox);
        w.stop.store(true, Ordering::Release);
        seen
    });
    let seen = seen?;
    let total = w.total_written();
    let longest = Duration::from_micros(w.longest_us.load(Ordering::Acquire));
    let failure = w.failure.lock().map_or(None, |f| f.clone());

    ctx.check(
        "every write and fsync succeeded across the restart",
        failure.is_none(),
        failure.unwrap_or_else(|| {
            format!(
                "{total} records of 4 KiB from {WRITERS} threads, each fsyncing after every \
                 {FLUSH_EVERY}; the longest write or fsync took {} ms",
                longest.as_millis()
            )
        }),
    );
    let seen_all = seen.len() == RESTARTS
        && seen
            .last()
            .is_some_and(|s| total >= s.after_records + AFTER);
    ctx.check(
        &format!("the guest saw {RESTARTS} new daemons and wrote on through each"),
        seen_all,
        if seen_all {
            seen.iter()
                .map(|s| {
                    format!(
                        "after record {}: {} ms",
                        s.after_records,
                        s.after_asking.as_millis()
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            format!(
                "{} of {RESTARTS} seen; then the daemon's uptime did not start again within \
                 {} s of asking",
                seen.len(),
                NOTICE_WITHIN.as_secs()
            )
        },
    );
    ctx.record("every record written reads back", read_back(&fd, seed, &w))?;
    // Every thread's records up to its last completed fsync are flushed, so
    // the records below WRITERS times the fewest flushed by any thread are.
    let flushed = w.min_flushed() * WRITERS as u64;
    ctx.wrote(0, usize::try_from(flushed).or_error()? * PAGE, seed);
    ctx.note("records written", total.to_string());
    ctx.note(
        "longest write or fsync (ms)",
        longest.as_millis().to_string(),
    );
    Ok(())
}

/// Thread `t` writes its records until told to stop (or the disk is full),
/// then flushes them.
fn writer(w: &Writing, fd: &Fd, seed: u64, t: usize, records: u64) {
    let mut buf = match AlignedBuf::new(PAGE, 0) {
        Ok(b) => b,
        Err(e) => return w.fail(format!("writer {t}: {e}")),
    };
    let mut k = 0u64;
    loop {
        let record = k * WRITERS as u64 + t as u64;
        if w.stop.load(Ordering::Acquire) || record >= records {
            break;
        }
        let offset = record * PAGE as u64;
        fill_pattern(seed, offset, buf.as_mut_slice());
        if let Err(e) = w.timed(|| fd.write_all_at(buf.as_slice(), offset)) {
            return w.fail(format!("record {record}: {}", crate::one_line(&e)));
        }
        k += 1;
        w.written[t].store(k, Ordering::Release);
        if k.is_multiple_of(FLUSH_EVERY) && !flush(w, fd, t, k) {
            return;
        }
    }
    if !k.is_multiple_of(FLUSH_EVERY) {
        flush(w, fd, t, k);
    }
}

/// An fsync by thread `t`, which has written `k` records; whether it succeeded.
fn flush(w: &Writing, fd: &Fd, t: usize, k: u64) -> bool {
    match w.timed(|| fd.sync()) {
        Ok(()) => {
            w.flushed[t].store(k, Ordering::Release);
            true
        }
        Err(e) => {
            w.fail(format!(
                "fsync by writer {t} after {k} records: {}",
                crate::one_line(&e)
            ));
            false
        }
    }
}

/// Once the writers are under way, asks for [`RESTARTS`] restarts, each once
/// the last new daemon has been seen and [`AFTER`] more records written;
/// stops at the first new daemon that never comes.
fn restarts(ctx: &Ctx, w: &Writing, mailbox: &Mailbox) -> Result<Vec<Seen>, Stop> {
    while w.min_flushed() < BEFORE {
        if w.failed() {
            return Ok(Vec::new());
        }
        thread::sleep(POLL);
    }
    let mut seen = Vec::new();
    while seen.len() < RESTARTS {
        match restart(ctx, w, mailbox)? {
            Some(s) => seen.push(s),
            None => break,
        }
    }
    Ok(seen)
}

/// Asks for a restart, waits to see the new daemon, then for [`AFTER`] more
/// records; `None` if the new daemon never came.
fn restart(ctx: &Ctx, w: &Writing, mailbox: &Mailbox) -> Result<Option<Seen>, Stop> {
    let mut last_uptime = uptime(mailbox)?;
    ctx.host(HostAction::RestartDaemon);
    let asked = Instant::now();
    let seen = loop {
        if w.failed() || asked.elapsed() > NOTICE_WITHIN {
            return Ok(None);
        }
        let now = uptime(mailbox)?;
        if now < last_uptime {
            break Seen {
                after_records: w.total_written(),
                after_asking: asked.elapsed(),
            };
        }
        last_uptime = now;
        thread::sleep(POLL);
    };
    while w.total_written() < seen.after_records + AFTER && !w.failed() {
        thread::sleep(POLL);
    }
    Ok(Some(seen))
}

/// The daemon's uptime in seconds, from its status through the mailbox.
fn uptime(mailbox: &Mailbox) -> Result<f64, Stop> {
    let mut last = None;
    for _ in 0..MAILBOX_TRIES {
        match mailbox.call(json!({"cmd": "status"})) {
            Ok(status) => {
                return status["uptime_s"].as_f64().ok_or_else(|| {
                    Stop::Error(format!("the device's status has no uptime_s: {status}"))
                })
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Stop::Error("no mailbox call was made".into())))
}

/// Reads back every record each thread wrote.
fn read_back(fd: &Fd, seed: u64, w: &Writing) -> Result<String, Stop> {
    let mut buf = AlignedBuf::new(PAGE, 0).or_error()?;
    let mut n = 0;
    for (t, written) in w.written.iter().enumerate() {
        for k in 0..written.load(Ordering::Acquire) {
            let offset = (k * WRITERS as u64 + t as u64) * PAGE as u64;
            fd.read_exact_at(buf.as_mut_slice(), offset).or_fail()?;
            check_pattern(seed, offset, buf.as_slice()).map_err(|m| Stop::Fail(m.to_string()))?;
            n += 1;
        }
    }
    Ok(format!("{n} records of 4 KiB"))
}
