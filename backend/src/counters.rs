//! Counters of what the device served and refused, and a rate limit for the log
//! lines a guest can trigger over and over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Something a guest got wrong, counted under its name in `malformed`:
/// virtio-blk's malformed chains and requests
/// (`virtio_blk::request::Malformed`) and the pipeline's refusals
/// (`pipeline::Refusal`) alike, so one kind has one counter whichever
/// interface it came through.
pub trait Mistake: Copy {
    /// Its name: one of [`MISTAKES`].
    fn name(self) -> &'static str;
}

/// The kinds of guest mistake `malformed` counts, by name, as `status`
/// reports them.
pub const MISTAKES: [&str; 13] = [
    "broken-chain",
    "no-status",
    "readable-after-writable",
    "short-header",
    "outside-memory",
    "wrong-direction",
    "too-large",
    "unaligned",
    "out-of-range",
    "bad-segment-list",
    "bad-flags",
    "unsupported",
    "read-only",
];

/// What the device has done since it started. Shared by every queue and connection.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub completed_ok: AtomicU64,
    pub ioerr: AtomicU64,
    pub unsupp: AtomicU64,
    /// Chains returned with no status byte written (there was nowhere to write it).
    pub no_status: AtomicU64,
    /// Backing I/O that failed (the host's disk, not a simulated bad block).
    pub media_errors: AtomicU64,
    /// Reads of bad blocks (`--media-error`, `ctl media-error`).
    pub unrecovered_reads: AtomicU64,
    /// Writes to bad blocks.
    pub write_faults: AtomicU64,
    /// Requests from before a power cut, failed when they reached the media after it.
    pub cut_off: AtomicU64,
    /// Requests failed by a fault rule.
    pub injected: AtomicU64,
    /// Commands the guest sent through the mailbox, and writes to it refused.
    pub mailbox_commands: AtomicU64,
    pub mailbox_refused: AtomicU64,
    /// Requests the media latency model made wait (`--latency`).
    pub latency_delayed: AtomicU64,
    malformed: [AtomicU64; MISTAKES.len()],
    limiter: RateLimit,
}

/// The counters at one moment, as the control socket reports them.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CounterSnapshot {
    pub requests: u64,
    pub completed_ok: u64,
    pub ioerr: u64,
    pub unsupp: u64,
    pub no_status: u64,
    pub media_errors: u64,
    pub unrecovered_reads: u64,
    pub write_faults: u64,
    pub cut_off: u64,
    pub injected: u64,
    pub mailbox_commands: u64,
    pub mailbox_refused: u64,
    pub latency_delayed: u64,
    pub malformed: std::collections::BTreeMap<&'static str, u64>,
}

impl Counters {
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            requests: get(&self.requests),
            completed_ok: get(&self.completed_ok),
            ioerr: get(&self.ioerr),
            unsupp: get(&self.unsupp),
            no_status: get(&self.no_status),
            media_errors: get(&self.media_errors),
            unrecovered_reads: get(&self.unrecovered_reads),
            write_faults: get(&self.write_faults),
            cut_off: get(&self.cut_off),
            injected: get(&self.injected),
            mailbox_commands: get(&self.mailbox_commands),
            mailbox_refused: get(&self.mailbox_refused),
            latency_delayed: get(&self.latency_delayed),
            malformed: self.malformed_all().collect(),
        }
    }

    /// Sets every counter back to zero.
    pub fn reset(&self) {
        for c in [
            &self.requests,
            &self.completed_ok,
            &self.ioerr,
            &self.unsupp,
            &self.no_status,
            &self.media_errors,
            &self.unrecovered_reads,
            &self.write_faults,
            &self.cut_off,
            &self.injected,
            &self.mailbox_commands,
            &self.mailbox_refused,
            &self.latency_delayed,
        ]
        .into_iter()
        .chain(&self.malformed)
        {
            c.store(0, Ordering::Relaxed);
        }
    }

    pub fn count_malformed(&self, m: impl Mistake) {
        if let Some(c) = self.malformed_counter(m) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn malformed(&self, m: impl Mistake) -> u64 {
        self.malformed_counter(m)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The counter of `m`'s kind. Every kind has one (the tests of
    /// `Malformed` and `Refusal` check their names against [`MISTAKES`]).
    fn malformed_counter(&self, m: impl Mistake) -> Option<&AtomicU64> {
        let at = MISTAKES.iter().position(|&name| name == m.name());
        debug_assert!(at.is_some(), "no counter for {}", m.name());
        self.malformed.get(at?)
    }

    /// Every malformed-input counter with its name.
    pub fn malformed_all(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        MISTAKES
            .iter()
            .zip(&self.malformed)
            .map(|(&name, c)| (name, c.load(Ordering::Relaxed)))
    }

    /// Whether a guest-triggered log line may be printed now.
    pub fn may_log(&self) -> bool {
        self.limiter.allow()
    }
}

pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Allows a burst of lines per interval, then says how many it held back.
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<LimitState>,
    burst: u32,
    interval: Duration,
}

#[derive(Debug)]
struct LimitState {
    window: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(10, Duration::from_secs(5))
    }
}

impl RateLimit {
    pub fn new(burst: u32, interval: Duration) -> Self {
        RateLimit {
            state: Mutex::new(LimitState {
                window: None,
                used: 0,
                suppressed: 0,
            }),
            burst,
            interval,
        }
    }

    pub fn allow(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        if s.window
            .is_none_or(|w| now.duration_since(w) >= self.interval)
        {
            if s.suppressed > 0 {
                log::warn!("{} similar log lines suppressed", s.suppressed);
            }
            *s = LimitState {
                window: Some(now),
                used: 0,
                suppressed: 0,
            };
        }
        if s.used < self.burst {
            s.used += 1;
            true
        } else {
            s.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Refusal;
    use crate::virtio_blk::request::Malformed;

    #[test]
    fn rate_limit_allows_a_burst_then_holds_back() {
        let r = RateLimit::new(3, Duration::from_secs(3600));
        assert_eq!((0..10).filter(|_| r.allow()).count(), 3);
        let r = RateLimit::new(1, Duration::ZERO);
        assert!(r.allow() && r.allow());
    }

    #[test]
    fn malformed_counters_are_separate() {
        let c = Counters::default();
        c.count_malformed(Malformed::NoStatus);
        c.count_malformed(Malformed::NoStatus);
        c.count_malformed(Malformed::OutOfRange);
        assert_eq!(c.malformed(Malformed::NoStatus), 2);
        assert_eq!(c.malformed(Malformed::OutOfRange), 1);
        assert_eq!(c.malformed(Malformed::BadFlags), 0);
    }

    /// Each kind of mistake, from either vocabulary, has its own counter,
    /// and `status` shows every counter.
    #[test]
    fn every_mistake_has_a_counter_under_its_name() {
        let malformed: Vec<&str> = Malformed::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(malformed, MISTAKES);
        for r in Refusal::ALL {
            assert!(MISTAKES.contains(&r.name()), "{r:?}");
        }
        let c = Counters::default();
        c.count_malformed(Refusal::OutOfRange);
        c.count_malformed(Malformed::OutOfRange);
        assert_eq!(c.malformed(Malformed::OutOfRange), 2);
        assert_eq!(c.malformed_all().count(), MISTAKES.len());
    }
}
