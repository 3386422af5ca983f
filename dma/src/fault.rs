//! The fault plan: rules that match requests and say what to do with them.
//!
//! A rule is one line of comma-separated `key=value` pairs, the same on the
//! command line, in files and on the control socket:
//!
//! ```text
//! op=read,action=delay,ms=1000
//! op=read,lba=0-7,nth=2,action=hold
//! op=write,every=3,count=2,action=delay,ms=50-200
//! ```
//!
//! Match keys (all optional; a request must satisfy every one given):
//! `op` (read, write, flush, discard, write-zeroes, get-id, any), `lba` (N or
//! N-M, inclusive, on the request's first block), `queue`, `size` (bytes, N or
//! N-M), `tag` (the test tag in force). Selectors (at most one): `nth=N` (only
//! the N-th matching request), `every=N` (every N-th), `prob=P` (each with
//! probability P, from the seeded generator); default every match. `count=N`
//! retires the rule after it has fired N times.
//!
//! Actions that decide when the data moves: `delay` (`ms=N` or `ms=MIN-MAX`),
//! `hold` (until released). One that looks after it: `watch` (re-check a read's
//! destination `ms=N` after completion). Ones that change what happens
//! ([`Effect`]): `error` (`status=ioerr|unsupp`, no data moves), `partial`
//! (`bytes=N`: move the first N bytes, then fail), `torn` (`bytes=N`: a write
//! stores only its first N bytes, rounded down to whole blocks, and reports
//! `status=ok|ioerr`), `corrupt` (`bits=N`: flip N bits of the data moved), and
//! two deliberately broken devices used to validate a test suite:
//! `complete-before-dma` (`ms=N`: complete at once, move the data N ms later,
//! or at the release when a hold matched too) and
//! `wrong-page` (move the data into, or out of, the neighbouring guest page).
//! And one for the media: `power-cut` (power is lost as the request reaches
//! the media: what was not stable is gone, and the request fails).
//!
//! A request gets the first wait, the first watch and the first effect of the
//! rules that fire on it.
//!
//! # Limits
//!
//! A guest can add rules through its mailbox, so every value is bounded as the
//! rule is parsed, and a value past its bound is refused with the key, the
//! value and the limit (at the key's column):
//!
//! | key | allowed | why |
//! |---|---|---|
//! | `bits` | 1 to [`MAX_CORRUPT_BITS`] (4096); at most the request's own bits are flipped | each flip is work on the queue's thread |
//! | `ms` | 0 to [`MAX_MS`] (600000, 10 min), `MIN <= MAX` | past every guest I/O timeout; keeps a request from parking for days |
//! | `bytes` | 0 to [`MAX_BYTES`] (1 GiB); past the request's length, the whole request | larger says nothing more |
//! | `nth`, `every`, `count` | 1 to 2^64−1 | 0 would never fire; a large value costs nothing (a counter compare) |
//! | `prob` | 0 to 1 | a probability |
//! | `lba`, `size` | `N` or `N-M`, `N <= M`, 0 to 2^64−1 | a compare |
//! | `queue` | 0 to 65535 | a queue index |
//! | `tag` | at most [`MAX_TAG_BYTES`] (256) bytes, the cap on test tags | a longer tag could never be in force; the rule keeps its text |
//!
//! No value (nor key) may hold `,` or `=`: a rule given as separate keys and
//! values ([`RuleSpec::from_pairs`], a TOML fault file's table) must not be
//! able to carry a second key inside a value, and every rule prints back as a
//! line that parses to it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use serde::Serialize;

use crate::ledger::{TextTooLong, MAX_TAG_BYTES};
use crate::request::{Arrival, Op};
use crate::rng::SeededRng;

/// The most bits one `corrupt` rule may flip in a request (`bits=N`): 4096,
/// a whole 512-byte block's worth, far past what any checksum needs to see.
/// Each flip is a draw of the generator on the queue's thread while the request
/// is served, so this bounds the work per request; a request with fewer bits
/// has every one of them flipped, no more ([`MAX_CORRUPT_BITS`] is the most
/// the engine does, whatever the rule).
pub const MAX_CORRUPT_BITS: u32 = 4096;

/// The longest `ms` of `delay`, `watch` and `complete-before-dma`: 600000
/// (10 min). It is longer than the guest's own I/O timeouts (Linux: 30 s for
/// virtio-blk and NVMe by default), so every timeout and abort path can be
/// reached, and short enough that a forgotten rule lets its request go within
/// minutes. A request that must wait longer is what `hold` is for.
pub const MAX_MS: u64 = 600_000;

/// The largest `bytes` of `partial` and `torn`: 1 GiB, more than any one
/// request moves. Past a request's length the whole request moves (or is
/// stored), so a larger value would say nothing more.
pub const MAX_BYTES: u64 = 1 << 30;

/// A rule that did not parse: what and where (a byte column, from 1).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("at column {column}: {message}")]
pub struct RuleError {
    pub column: usize,
    pub message: String,
}

/// Which matching requests a rule fires on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selector {
    All,
    Nth(u64),
    Every(u64),
    Prob(f64),
}

/// What a rule does to a request it fires on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    Delay {
        min_ms: u64,
        max_ms: u64,
    },
    Hold,
    Watch {
        ms: u64,
    },
    #[serde(untagged)]
    Effect(Effect),
}

/// A change to what a request does, beyond when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Effect {
    /// Fail without moving data.
    Error { unsupp: bool },
    /// Move the first `bytes` bytes, then fail.
    Partial { bytes: u64 },
    /// A write stores only its first `bytes` bytes (whole blocks); `fail` chooses the status.
    Torn { bytes: u64, fail: bool },
    /// Flip `bits` bits of the data moved.
    Corrupt { bits: u32 },
    /// Complete at once; move the data `ms` later.
    CompleteBeforeDma { ms: u64 },
    /// Move the data into (read) or out of (write) the next guest page.
    WrongPage,
    /// Cut the power as the request reaches the media; the request fails.
    PowerCut,
}

impl Effect {
    pub fn name(self) -> &'static str {
        match self {
            Effect::Error { .. } => "error",
            Effect::Partial { .. } => "partial",
            Effect::Torn { .. } => "torn",
            Effect::Corrupt { .. } => "corrupt",
            Effect::CompleteBeforeDma { .. } => "complete-before-dma",
            Effect::WrongPage => "wrong-page",
            Effect::PowerCut => "power-cut",
        }
    }
}

/// How a request waits before its data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    None,
    Delay(Duration),
    Hold,
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::None => write!(f, "none"),
            Wait::Delay(d) => write!(f, "delay {} ms", d.as_millis()),
            Wait::Hold => write!(f, "hold"),
        }
    }
}

/// A rule as written, without its counters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RuleSpec {
    pub op: Option<Op>,
    pub lba: Option<(u64, u64)>,
    pub queue: Option<u16>,
    pub size: Option<(u64, u64)>,
    pub tag: Option<String>,
    pub select: Selector,
    pub count: Option<u64>,
    #[serde(flatten)]
    pub action: Action,
}

impl RuleSpec {
    /// Parses the line form.
    pub fn parse(line: &str) -> Result<RuleSpec, RuleError> {
        let mut parts = Vec::new();
        let mut column = 1;
        for part in line.split(',') {
            let here = column;
            column += part.len() + 1;
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (key, value) = part.split_once('=').ok_or_else(|| RuleError {
                column: here,
                message: format!("{part:?} is not key=value"),
            })?;
            parts.push((here, key, value));
        }
        RuleSpec::build(parts)
    }

    /// Builds a rule from keys and values given apart, as a TOML fault file's
    /// table gives them: the rule their line form `key=value,...` gives, and
    /// errors at their column in that line. Nothing is re-parsed from text, and
    /// a key or value holding `,` or `=` is refused: `tag = "x,nth=1"` must not
    /// become a tag and a selector.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<RuleSpec, RuleError> {
        let mut column = 1;
        let parts: Vec<_> = pairs
            .into_iter()
            .map(|(key, value)| {
                let here = column;
                column += key.len() + value.len() + 2;
                (here, key, value)
            })
            .collect();
        RuleSpec::build(parts)
    }

    /// The rule of `(column, key, value)` parts.
    fn build<'a>(parts: Vec<(usize, &'a str, &'a str)>) -> Result<RuleSpec, RuleError> {
        let mut b = Builder::default();
        let mut action_column = 1;
        for (column, key, value) in parts {
            let err = |message: String| RuleError { column, message };
            let (key, value) = (key.trim(), value.trim());
            let separator = |text: &str| text.chars().find(|&c| c == ',' || c == '=');
            if let Some(c) = separator(key) {
                return Err(err(format!(
                    "key {key:?} holds {c:?}: a key cannot hold ',' or '='"
                )));
            }
            if let Some(c) = separator(value) {
                return Err(err(format!(
                    "{key} value {value:?} holds {c:?}: a value cannot hold ',' or '='"
                )));
            }
            if key == "action" {
                action_column = column;
            }
            b.set(key, value).map_err(err)?;
        }
        // What is left to find wrong concerns the action and its parameters.
        b.build().map_err(|message| RuleError {
            column: action_column,
            message,
        })
    }

    fn matches(&self, a: &Arrival, tag: Option<&str>) -> bool {
        self.matches_fields(a.op, a.lba, a.queue, a.len, tag)
    }

    /// Whether a request with these fields satisfies the rule's match keys.
    pub fn matches_fields(
        &self,
        op: Op,
        lba: u64,
        queue: u16,
        len: u64,
        tag: Option<&str>,
    ) -> bool {
        self.op.is_none_or(|o| o == op)
            && self.lba.is_none_or(|(lo, hi)| (lo..=hi).contains(&lba))
            && self.queue.is_none_or(|q| q == queue)
            && self.size.is_none_or(|(lo, hi)| (lo..=hi).contains(&len))
            && self.tag.as_deref().is_none_or(|t| Some(t) == tag)
    }

    /// Parses match keys alone (no action), e.g. to pick held requests to release.
    pub fn parse_match(line: &str) -> Result<RuleSpec, RuleError> {
        if line.split(',').any(|p| p.trim().starts_with("action")) {
            return Err(RuleError {
                column: 1,
                message: "a match takes no action".into(),
            });
        }
        let sep = if line.trim().is_empty() { "" } else { "," };
        RuleSpec::parse(&format!("{line}{sep}action=hold"))
    }
}

#[derive(Default)]
struct Builder {
    op: Option<Option<Op>>,
    lba: Option<(u64, u64)>,
    queue: Option<u16>,
    size: Option<(u64, u64)>,
    tag: Option<String>,
    select: Option<Selector>,
    count: Option<u64>,
    action: Option<String>,
    ms: Option<(u64, u64)>,
    bytes: Option<u64>,
    bits: Option<u32>,
    status: Option<String>,
}

impl Builder {
    /// Sets one `key=value` of a rule line, refusing a key given twice. One
    /// arm per key, so every key's parse and limit is found in one place;
    /// longer than 80 lines for that reason.
    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let dup = |set: bool| {
            if set {
                Err(format!("{key} given twice"))
            } else {
                Ok(())
            }
        };
        match key {
            "op" => {
                dup(self.op.is_some())?;
                self.op = Some(match value {
                    "any" => None,
                    v => Some(Op::from_name(v).ok_or_else(|| {
                        format!(
                            "unknown op {v:?} (read, write, flush, discard, write-zeroes, get-id, any)"
                        )
                    })?),
                });
            }
            "lba" => {
                dup(self.lba.is_some())?;
                self.lba = Some(range(key, value, u64::MAX)?);
            }
            "size" => {
                dup(self.size.is_some())?;
                self.size = Some(range(key, value, u64::MAX)?);
            }
            "queue" => {
                dup(self.queue.is_some())?;
                let n = number(key, value, 0, u16::MAX.into())?;
                self.queue = Some(u16::try_from(n).map_err(|_| format!("queue {n} is too large"))?);
            }
            "tag" => {
                dup(self.tag.is_some())?;
                TextTooLong::check("tag", value, MAX_TAG_BYTES).map_err(|e| e.to_string())?;
                self.tag = Some(value.to_owned());
            }
            "nth" | "every" => {
                dup(self.select.is_some())?;
                let n = number(key, value, 1, u64::MAX)?;
                self.select = Some(if key == "nth" {
                    Selector::Nth(n)
                } else {
                    Selector::Every(n)
                });
            }
            "prob" => {
                dup(self.select.is_some())?;
                let p: f64 = value
                    .parse()
                    .map_err(|_| format!("prob {value:?} is not a number"))?;
                // NaN is in no range, and refused here.
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("prob {value} is not between 0 and 1"));
                }
                self.select = Some(Selector::Prob(p));
            }
            "count" => {
                dup(self.count.is_some())?;
                self.count = Some(number(key, value, 1, u64::MAX)?);
            }
            "action" => {
                dup(self.action.is_some())?;
                self.action = Some(value.to_owned());
            }
            "ms" => {
                dup(self.ms.is_some())?;
                self.ms = Some(range(key, value, MAX_MS)?);
            }
            "bytes" => {
                dup(self.bytes.is_some())?;
                self.bytes = Some(number(key, value, 0, MAX_BYTES)?);
            }
            "bits" => {
                dup(self.bits.is_some())?;
                let n = number(key, value, 1, MAX_CORRUPT_BITS.into())?;
                self.bits = Some(u32::try_from(n).map_err(|_| format!("bits {n} is too many"))?);
            }
            "status" => {
                dup(self.status.is_some())?;
                if !["ok", "ioerr", "unsupp"].contains(&value) {
                    return Err(format!("unknown status {value:?} (ok, ioerr, unsupp)"));
                }
                self.status = Some(value.to_owned());
            }
            other => {
                return Err(format!(
                    "unknown key {other:?} (op, lba, queue, size, tag, nth, every, prob, \
                     count, action, ms, bytes, bits, status)"
                ))
            }
        }
        Ok(())
    }

    fn build(self) -> Result<RuleSpec, String> {
        let action = self.action()?;
        Ok(RuleSpec {
            op: self.op.flatten(),
            lba: self.lba,
            queue: self.queue,
            size: self.size,
            tag: self.tag,
            select: self.select.unwrap_or(Selector::All),
            count: self.count,
            action,
        })
    }

    fn action(&self) -> Result<Action, String> {
        let name = self.action.as_deref().ok_or(
            "no action (delay, hold, watch, error, partial, torn, corrupt, \
             complete-before-dma, wrong-page, power-cut)",
        )?;
        // Each action takes only its own parameters.
        let takes: &[&str] = match name {
            "delay" | "watch" | "complete-before-dma" => &["ms"],
            "error" => &["status"],
            "partial" => &["bytes"],
            "torn" => &["bytes", "status"],
            "corrupt" => &["bits"],
            _ => &[],
        };
        for (param, given) in [
            ("ms", self.ms.is_some()),
            ("bytes", self.bytes.is_some()),
            ("bits", self.bits.is_some()),
            ("status", self.status.is_some()),
        ] {
            if given && !takes.contains(&param) {
                return Err(format!("{name} takes no {param}"));
            }
        }
        let one_ms = || match self.ms {
            Some((ms, hi)) if ms == hi => Ok(ms),
            Some(_) => Err(format!("{name} takes one ms value")),
            None => Err(format!("{name} needs ms=N")),
        };
        let status = self.status.as_deref();
        Ok(match name {
            "delay" => {
                let (min_ms, max_ms) = self.ms.ok_or("delay needs ms=N or ms=MIN-MAX")?;
                Action::Delay { min_ms, max_ms }
            }
            "hold" => Action::Hold,
            "watch" => Action::Watch { ms: one_ms()? },
            "error" => Action::Effect(Effect::Error {
                unsupp: match status {
                    None | Some("ioerr") => false,
                    Some("unsupp") => true,
                    Some(s) => return Err(format!("error takes status=ioerr or unsupp, not {s}")),
                },
            }),
            "partial" => Action::Effect(Effect::Partial {
                bytes: self.bytes.ok_or("partial needs bytes=N")?,
            }),
            "torn" => Action::Effect(Effect::Torn {
                bytes: self.bytes.ok_or("torn needs bytes=N")?,
                fail: match status {
                    None | Some("ok") => false,
                    Some("ioerr") => true,
                    Some(s) => return Err(format!("torn takes status=ok or ioerr, not {s}")),
                },
            }),
            "corrupt" => Action::Effect(Effect::Corrupt {
                bits: self.bits.unwrap_or(1),
            }),
            "complete-before-dma" => Action::Effect(Effect::CompleteBeforeDma { ms: one_ms()? }),
            "wrong-page" => Action::Effect(Effect::WrongPage),
            "power-cut" => Action::Effect(Effect::PowerCut),
            other => {
                return Err(format!(
                    "unknown action {other:?} (delay, hold, watch, error, partial, torn, \
                     corrupt, complete-before-dma, wrong-page, power-cut)"
                ))
            }
        })
    }
}

/// A whole number in `min..=max`; the refusal names the key, the value and the bound.
fn number(key: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    let over = || format!("{key} {value} is over the limit of {max}");
    let n: u64 = match value.parse() {
        Ok(n) => n,
        // Digits that do not fit in 64 bits are past any limit.
        Err(_) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(over())
        }
        Err(_) => return Err(format!("{key} {value:?} is not a number")),
    };
    if n < min {
        return Err(format!("{key} {n} is below the minimum of {min}"));
    }
    if n > max {
        return Err(over());
    }
    Ok(n)
}

/// `N` or `N-M` (inclusive, N <= M), each at most `max`.
fn range(key: &str, value: &str, max: u64) -> Result<(u64, u64), String> {
    match value.split_once('-') {
        None => number(key, value, 0, max).map(|n| (n, n)),
        Some((lo, hi)) => {
            let (lo, hi) = (
                number(key, lo.trim(), 0, max)?,
                number(key, hi.trim(), 0, max)?,
            );
            if lo > hi {
                Err(format!("{key} range {lo}-{hi} is backwards"))
            } else {
                Ok((lo, hi))
            }
        }
    }
}

/// The line form, as `parse` reads it.
impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = |(lo, hi): (u64, u64)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        };
        let mut parts = Vec::new();
        if let Some(op) = self.op {
            parts.push(format!("op={}", op.name()));
        }
        if let Some(l) = self.lba {
            parts.push(format!("lba={}", range(l)));
        }
        if let Some(q) = self.queue {
            parts.push(format!("queue={q}"));
        }
        if let Some(sz) = self.size {
            parts.push(format!("size={}", range(sz)));
        }
        if let Some(t) = &self.tag {
            parts.push(format!("tag={t}"));
        }
        match self.select {
            Selector::All => {}
            Selector::Nth(n) => parts.push(format!("nth={n}")),
            Selector::Every(n) => parts.push(format!("every={n}")),
            Selector::Prob(p) => parts.push(format!("prob={p}")),
        }
        if let Some(c) = self.count {
            parts.push(format!("count={c}"));
        }
        parts.push(match self.action {
            Action::Delay { min_ms, max_ms } => {
                format!("action=delay,ms={}", range((min_ms, max_ms)))
            }
            Action::Hold => "action=hold".into(),
            Action::Watch { ms } => format!("action=watch,ms={ms}"),
            Action::Effect(e) => match e {
                Effect::Error { unsupp } => {
                    format!(
                        "action=error,status={}",
                        if unsupp { "unsupp" } else { "ioerr" }
                    )
                }
                Effect::Partial { bytes } => format!("action=partial,bytes={bytes}"),
                Effect::Torn { bytes, fail } => format!(
                    "action=torn,bytes={bytes},status={}",
                    if fail { "ioerr" } else { "ok" }
                ),
                Effect::Corrupt { bits } => format!("action=corrupt,bits={bits}"),
                Effect::CompleteBeforeDma { ms } => format!("action=complete-before-dma,ms={ms}"),
                Effect::WrongPage => "action=wrong-page".into(),
                Effect::PowerCut => "action=power-cut".into(),
            },
        });
        write!(f, "{}", parts.join(","))
    }
}

/// A rule in the plan, with its counters.
#[derive(Debug)]
pub struct Rule {
    pub id: u64,
    pub spec: RuleSpec,
    matched: AtomicU64,
    fired: AtomicU64,
}

impl Rule {
    pub fn matched(&self) -> u64 {
        self.matched.load(Ordering::Relaxed)
    }

    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }

    pub fn expired(&self) -> bool {
        self.spec.count.is_some_and(|c| self.fired() >= c)
    }

    /// Counts a matching request and says whether the rule's selector picks it.
    /// Every matching request counts, whatever other rules do with it.
    fn selects(&self, rng: &SeededRng) -> bool {
        if self.expired() {
            return false;
        }
        let n = self.matched.fetch_add(1, Ordering::Relaxed) + 1;
        match self.spec.select {
            Selector::All => true,
            Selector::Nth(k) => n == k,
            Selector::Every(k) => n.is_multiple_of(k),
            Selector::Prob(p) => rng.chance(p),
        }
    }

    /// Takes one firing from the rule's budget: whether it may still fire.
    fn claim(&self) -> bool {
        // Counting may race with another queue; a count is a budget, so claim a slot.
        let prev = self.fired.fetch_add(1, Ordering::Relaxed);
        self.spec.count.is_none_or(|c| prev < c)
    }
}

/// What the plan decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub wait: Wait,
    /// Re-check the destination this long after completion.
    pub watch: Option<Duration>,
    pub effect: Option<Effect>,
}

/// The rules in force, in the order they were added.
#[derive(Debug)]
pub struct FaultPlan {
    rules: RwLock<Vec<std::sync::Arc<Rule>>>,
    /// How many rules there are: the hot path looks here, not under the lock.
    count: std::sync::atomic::AtomicUsize,
    next_id: AtomicU64,
    rng: SeededRng,
}

impl FaultPlan {
    pub fn new(seed: u64) -> Self {
        FaultPlan {
            rules: RwLock::new(Vec::new()),
            count: std::sync::atomic::AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            rng: SeededRng::new(seed),
        }
    }

    /// Adds a rule; returns its id.
    pub fn add(&self, spec: RuleSpec) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rule = std::sync::Arc::new(Rule {
            id,
            spec,
            matched: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        });
        if let Ok(mut rules) = self.rules.write() {
            rules.push(rule);
            self.count.store(rules.len(), Ordering::Release);
        }
        id
    }

    /// Removes a rule; whether it was there.
    pub fn remove(&self, id: u64) -> bool {
        let Ok(mut rules) = self.rules.write() else {
            return false;
        };
        let before = rules.len();
        rules.retain(|r| r.id != id);
        self.count.store(rules.len(), Ordering::Release);
        rules.len() != before
    }

    pub fn rules(&self) -> Vec<std::sync::Arc<Rule>> {
        self.rules.read().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// Applies every rule to a request: the first delay or hold that fires sets
    /// the wait; a watch that fires adds a post-completion check.
    pub fn decide(&self, a: &Arrival, tag: Option<&str>) -> Decision {
        let mut d = Decision {
            wait: Wait::None,
            watch: None,
            effect: None,
        };
        let Ok(rules) = self.rules.read() else {
            return d;
        };
        for rule in rules.iter() {
            if !rule.spec.matches(a, tag) || !rule.selects(&self.rng) {
                continue;
            }
            // A rule whose slot an earlier rule took does not fire, and keeps its budget.
            let free = match rule.spec.action {
                Action::Delay { .. } | Action::Hold => d.wait == Wait::None,
                Action::Watch { .. } => d.watch.is_none(),
                Action::Effect(_) => d.effect.is_none(),
            };
            if !free || !rule.claim() {
                continue;
            }
            match rule.spec.action {
                Action::Delay { min_ms, max_ms } => {
                    let ms = self.rng.in_range(min_ms, max_ms);
                    d.wait = Wait::Delay(Duration::from_millis(ms));
                }
                Action::Hold => d.wait = Wait::Hold,
                Action::Watch { ms } => d.watch = Some(Duration::from_millis(ms)),
                Action::Effect(e) => d.effect = Some(e),
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(op: Op, lba: u64, queue: u16, len: u64) -> Arrival {
        Arrival {
            op,
            queue,
            lba,
            len,
            segments: Vec::new(),
        }
    }

    #[test]
    fn the_documented_forms_parse() {
        let r = RuleSpec::parse("op=read,action=delay,ms=1000").unwrap();
        assert_eq!(r.op, Some(Op::Read));
        assert_eq!(
            r.action,
            Action::Delay {
                min_ms: 1000,
                max_ms: 1000
            }
        );
        let r = RuleSpec::parse("op=read,lba=0-7,nth=2,action=hold").unwrap();
        assert_eq!(r.lba, Some((0, 7)));
        assert_eq!(r.select, Selector::Nth(2));
        let r =
            RuleSpec::parse(" op = write , every=3, count=2, action=delay, ms=50-200 ").unwrap();
        assert_eq!(r.select, Selector::Every(3));
        assert_eq!(r.count, Some(2));
    }

    #[test]
    fn bad_rules_say_what_and_where() {
        let e = RuleSpec::parse("op=read,action=delay,ms=abc").unwrap_err();
        assert_eq!(e.column, 22);
        assert!(e.message.contains("ms"), "{e}");
        let e = RuleSpec::parse("op=reed,action=hold").unwrap_err();
        assert_eq!(e.column, 1);
        assert!(e.message.contains("reed"));
        let e = RuleSpec::parse("op=read,action=bogus").unwrap_err();
        assert_eq!(e.column, 9);
        assert!(RuleSpec::parse("op=read")
            .unwrap_err()
            .message
            .contains("no action"));
        assert!(RuleSpec::parse("action=delay").is_err());
        assert!(RuleSpec::parse("action=hold,nth=0").is_err());
        assert!(RuleSpec::parse("action=hold,nth=1,every=2").is_err());
        assert!(RuleSpec::parse("action=hold,lba=9-3").is_err());
        assert!(RuleSpec::parse("action=hold,colour=red").is_err());
        assert!(RuleSpec::parse("action=hold,prob=1.5").is_err());
        assert_eq!(RuleSpec::parse("action=hold,op").unwrap_err().column, 13);
    }

    /// Every numeric parameter has a bound, checked as the rule is parsed: the
    /// refusal names the key, the value and the limit, at the key's column.
    #[test]
    fn parameters_past_their_limits_are_refused_naming_the_limit() {
        let (bits, ms, bytes) = (
            MAX_CORRUPT_BITS.to_string(),
            MAX_MS.to_string(),
            MAX_BYTES.to_string(),
        );
        // (line, column, what the message names)
        let cases: Vec<(String, usize, Vec<&str>)> = vec![
            (
                "action=corrupt,bits=4294967295".into(),
                16,
                vec!["bits", "4294967295", &bits],
            ),
            (
                format!("action=corrupt,bits={}", MAX_CORRUPT_BITS + 1),
                16,
                vec!["bits", &bits],
            ),
            (
                "action=corrupt,bits=99999999999999999999999".into(),
                16,
                vec!["bits", "99999999999999999999999", &bits],
            ),
            ("action=corrupt,bits=0".into(), 16, vec!["bits", "0", "1"]),
            (
                format!("action=delay,ms={}", MAX_MS + 1),
                14,
                vec!["ms", &ms],
            ),
            (
                "op=read,action=delay,ms=5-18446744073709551615".into(),
                22,
                vec!["ms", "18446744073709551615", &ms],
            ),
            (
                format!("action=watch,ms={}", MAX_MS + 1),
                14,
                vec!["ms", &ms],
            ),
            (
                "action=complete-before-dma,ms=86400000".into(),
                28,
                vec!["ms", "86400000", &ms],
            ),
            (
                format!("action=partial,bytes={}", MAX_BYTES + 1),
                16,
                vec!["bytes", &bytes],
            ),
            (
                "action=torn,bytes=18446744073709551615".into(),
                13,
                vec!["bytes", "18446744073709551615", &bytes],
            ),
            ("count=0,action=hold".into(), 1, vec!["count", "0", "1"]),
            ("nth=0,action=hold".into(), 1, vec!["nth", "0", "1"]),
            ("every=0,action=hold".into(), 1, vec!["every", "0", "1"]),
            (
                "queue=65536,action=hold".into(),
                1,
                vec!["queue", "65536", "65535"],
            ),
            (
                "prob=NaN,action=hold".into(),
                1,
                vec!["prob", "NaN", "0", "1"],
            ),
            ("prob=inf,action=hold".into(), 1, vec!["prob", "inf"]),
            ("prob=-0.5,action=hold".into(), 1, vec!["prob", "-0.5"]),
            ("lba=9-3,action=hold".into(), 1, vec!["lba", "9-3"]),
            (
                "size=4096-512,action=hold".into(),
                1,
                vec!["size", "4096-512"],
            ),
            ("action=delay,ms=20-10".into(), 14, vec!["ms", "20-10"]),
        ];
        for (line, column, names) in cases {
            let e = match RuleSpec::parse(&line) {
                Ok(spec) => panic!("{line} was accepted: {spec}"),
                Err(e) => e,
            };
            assert_eq!(e.column, column, "{line}: {e}");
            for n in names {
                assert!(e.message.contains(n), "{line}: {e:?} does not name {n}");
            }
        }
        // The limits themselves are allowed.
        for line in [
            format!("action=corrupt,bits={MAX_CORRUPT_BITS}"),
            format!("action=delay,ms=0-{MAX_MS}"),
            format!("action=watch,ms={MAX_MS}"),
            format!("action=complete-before-dma,ms={MAX_MS}"),
            format!("action=partial,bytes={MAX_BYTES}"),
            "action=torn,bytes=0".into(),
            "count=1,nth=18446744073709551615,action=hold".into(),
            "every=18446744073709551615,action=hold".into(),
            "prob=0,action=hold".into(),
            "prob=1,action=hold".into(),
            "queue=65535,lba=18446744073709551615,action=hold".into(),
        ] {
            RuleSpec::parse(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
        }
    }

    /// A rule's `tag=` is guest text (rules come through the mailbox too): past
    /// the cap on tags it is refused, with its length and the cap, at its column.
    #[test]
    fn a_tag_past_its_cap_is_refused_at_its_column() {
        let line = format!("op=read,tag={},action=hold", "t".repeat(257));
        let e = match RuleSpec::parse(&line) {
            Ok(spec) => panic!(
                "a rule with a {}-byte tag was accepted",
                spec.tag.unwrap().len()
            ),
            Err(e) => e,
        };
        assert_eq!(e.column, 9, "{e}");
        for n in ["tag", "257", "256"] {
            assert!(e.message.contains(n), "{e:?} does not name {n}");
        }
        let long = "t".repeat(1 << 20);
        let e = RuleSpec::from_pairs([("tag", long.as_str()), ("action", "hold")])
            .expect_err("a 1 MiB tag is refused");
        assert!(e.message.contains("1048576"), "{e}");
        let at_cap = format!("tag={},action=hold", "t".repeat(256));
        assert_eq!(
            RuleSpec::parse(&at_cap).unwrap().tag.map(|t| t.len()),
            Some(256)
        );
    }

    /// A TOML fault file gives keys and values apart: a value must not carry
    /// another key into the rule.
    #[test]
    fn values_given_apart_cannot_inject_keys() {
        let injected = RuleSpec::from_pairs([("tag", "x,nth=1"), ("action", "hold")]);
        let e = injected.expect_err("a tag holding ',' is refused");
        assert_eq!(e.column, 1);
        assert!(
            e.message.contains("tag") && e.message.contains("','"),
            "{e}"
        );
        let e = RuleSpec::from_pairs([("op", "read"), ("tag", "a=b"), ("action", "hold")])
            .expect_err("a tag holding '=' is refused");
        assert_eq!(e.column, 9, "{e}");
        assert!(e.message.contains("'='"), "{e}");
        // A key cannot carry one either.
        let e = RuleSpec::from_pairs([("op=read,nth", "1"), ("action", "hold")])
            .expect_err("a key holding separators is refused");
        assert_eq!(e.column, 1);
        // The line form refuses '=' in a value as well.
        assert!(RuleSpec::parse("tag=a=b,action=hold").is_err());
        // Pairs that are fine give the rule their line gives, and errors the
        // same column in that line.
        let pairs = [
            ("op", "read"),
            ("lba", "0-7"),
            ("nth", "2"),
            ("action", "hold"),
        ];
        assert_eq!(
            RuleSpec::from_pairs(pairs).unwrap(),
            RuleSpec::parse("op=read,lba=0-7,nth=2,action=hold").unwrap()
        );
        let e = RuleSpec::from_pairs([("op", "read"), ("action", "delay"), ("ms", "abc")]);
        assert_eq!(
            e,
            Err(RuleSpec::parse("op=read,action=delay,ms=abc").unwrap_err())
        );
    }

    #[test]
    fn every_action_parses() {
        let action = |l: &str| RuleSpec::parse(l).unwrap().action;
        assert_eq!(
            action("action=error"),
            Action::Effect(Effect::Error { unsupp: false })
        );
        assert_eq!(
            action("action=error,status=unsupp"),
            Action::Effect(Effect::Error { unsupp: true })
        );
        assert_eq!(
            action("action=partial,bytes=512"),
            Action::Effect(Effect::Partial { bytes: 512 })
        );
        assert_eq!(
            action("action=torn,bytes=4096,status=ioerr"),
            Action::Effect(Effect::Torn {
                bytes: 4096,
                fail: true
            })
        );
        assert_eq!(
            action("action=corrupt"),
            Action::Effect(Effect::Corrupt { bits: 1 })
        );
        assert_eq!(
            action("action=corrupt,bits=8"),
            Action::Effect(Effect::Corrupt { bits: 8 })
        );
        assert_eq!(
            action("action=complete-before-dma,ms=20"),
            Action::Effect(Effect::CompleteBeforeDma { ms: 20 })
        );
        assert_eq!(
            action("action=wrong-page"),
            Action::Effect(Effect::WrongPage)
        );
        assert_eq!(action("action=watch,ms=5"), Action::Watch { ms: 5 });
    }

    #[test]
    fn the_line_form_round_trips() {
        for line in [
            "op=read,action=delay,ms=1000",
            "op=read,lba=0-7,nth=2,action=hold",
            "op=write,queue=1,size=512-4096,tag=t,every=3,count=2,action=delay,ms=50-200",
            "prob=0.5,action=corrupt,bits=3",
            "action=torn,bytes=4096,status=ioerr",
            "op=get-id,action=error,status=unsupp",
            "action=complete-before-dma,ms=20",
            "action=wrong-page",
            "action=power-cut",
            "op=read,action=watch,ms=5",
        ] {
            let spec = RuleSpec::parse(line).unwrap();
            assert_eq!(spec.to_string(), line);
            assert_eq!(RuleSpec::parse(&spec.to_string()).unwrap(), spec);
        }
    }

    #[test]
    fn selectors_and_counts() {
        let plan = FaultPlan::new(1);
        plan.add(RuleSpec::parse("op=read,nth=2,action=hold").unwrap());
        let waits: Vec<Wait> = (0..4)
            .map(|_| plan.decide(&arrival(Op::Read, 0, 0, 512), None).wait)
            .collect();
        assert_eq!(waits, vec![Wait::None, Wait::Hold, Wait::None, Wait::None]);

        let plan = FaultPlan::new(1);
        plan.add(RuleSpec::parse("every=2,count=2,action=delay,ms=5").unwrap());
        let fired = (0..10)
            .filter(|_| plan.decide(&arrival(Op::Write, 0, 0, 512), None).wait != Wait::None)
            .count();
        assert_eq!(fired, 2);
        assert!(plan.rules()[0].expired());
    }

    #[test]
    fn match_fields() {
        let plan = FaultPlan::new(1);
        plan.add(
            RuleSpec::parse("op=write,lba=10-20,queue=1,size=4096,tag=t1,action=hold").unwrap(),
        );
        let hold = |a: Arrival, tag| plan.decide(&a, tag).wait == Wait::Hold;
        assert!(hold(arrival(Op::Write, 15, 1, 4096), Some("t1")));
        assert!(!hold(arrival(Op::Read, 15, 1, 4096), Some("t1")));
        assert!(!hold(arrival(Op::Write, 21, 1, 4096), Some("t1")));
        assert!(!hold(arrival(Op::Write, 15, 0, 4096), Some("t1")));
        assert!(!hold(arrival(Op::Write, 15, 1, 512), Some("t1")));
        assert!(!hold(arrival(Op::Write, 15, 1, 4096), Some("t2")));
        assert!(!hold(arrival(Op::Write, 15, 1, 4096), None));
    }

    #[test]
    fn random_delays_repeat_with_the_seed() {
        let delays = |seed| {
            let plan = FaultPlan::new(seed);
            plan.add(RuleSpec::parse("action=delay,ms=1-1000").unwrap());
            (0..8)
                .map(|_| plan.decide(&arrival(Op::Read, 0, 0, 512), None).wait)
                .collect::<Vec<_>>()
        };
        assert_eq!(delays(3), delays(3));
        assert_ne!(delays(3), delays(4));
    }

    #[test]
    fn first_wait_wins_and_watch_adds() {
        let plan = FaultPlan::new(1);
        plan.add(RuleSpec::parse("op=read,action=watch,ms=50").unwrap());
        plan.add(RuleSpec::parse("op=read,action=delay,ms=10").unwrap());
        plan.add(RuleSpec::parse("op=read,action=hold").unwrap());
        let d = plan.decide(&arrival(Op::Read, 0, 0, 512), None);
        assert_eq!(d.wait, Wait::Delay(Duration::from_millis(10)));
        assert_eq!(d.watch, Some(Duration::from_millis(50)));
        assert_eq!(d.effect, None);
        assert!(plan.remove(2));
        assert_eq!(
            plan.decide(&arrival(Op::Read, 0, 0, 512), None).wait,
            Wait::Hold
        );
    }
}
