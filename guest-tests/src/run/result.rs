//! What a test run yields: the [`Evidence`] gathered while the guest ran,
//! and the judged [`TestResult`] with its [`CheckRecord`]s.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::config::{Daemon, Transport};
use crate::protocol::{Event, Verdict};

/// One check, from the guest or the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRecord {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The outcome of one test on one kernel, with all its evidence.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestResult {
    pub test: String,
    pub kernel: String,
    pub kernel_release: Option<String>,
    /// The backend that served the disk.
    pub daemon: Daemon,
    /// How the guest reached it.
    pub transport: Transport,
    pub verdict: Verdict,
    /// One line naming the evidence, unless it passed.
    pub reason: String,
    pub checks: Vec<CheckRecord>,
    pub notes: Vec<(String, String)>,
    pub kernel_log_errors: Vec<String>,
    /// What the device saw (findings from its ledger, informational ones included).
    pub findings: Vec<serde_json::Value>,
    /// The end of the console, kept when the guest did not finish.
    pub console_tail: Vec<String>,
    /// The SVG timeline of a failed test, once saved where the user asked.
    pub timeline: Option<PathBuf>,
    pub seconds: f64,
    /// Where the seconds went.
    #[serde(default)]
    pub timing: Timing,
}

/// Where a test's seconds went, over all its boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// From QEMU's start to the guest's first event.
    pub boot: f64,
    /// From the guest's first event to QEMU's exit: the test itself.
    pub guest: f64,
    /// The rest: the disk made, the daemon started and stopped, the host's
    /// checks, the verdict.
    pub host: f64,
}

/// What one guest run produced.
#[derive(Debug, Default)]
pub(super) struct Evidence {
    pub(super) events: Vec<Event>,
    pub(super) console: Vec<String>,
    pub(super) checks: Vec<CheckRecord>,
    /// The harness's notes, beside the guest's.
    pub(super) notes: Vec<(String, String)>,
    /// The device's ledger: every request and finding of the run.
    pub(super) ledger: Vec<serde_json::Value>,
    /// Harness trouble: the run cannot be judged.
    pub(super) error: Option<String>,
    /// Why the host skipped the test without booting it (the kernel's config
    /// lacks options it needs).
    pub(super) skip: Option<String>,
    /// The boots' share of the time (`host` is left to the judge).
    pub(super) timing: Timing,
}
