//! Fixtures for tests of the reports, in this crate and in the cli's tests
//! (feature `test-utils`).

use crate::protocol::Verdict;
use crate::run::{Daemon, TestResult, Transport};

/// A result of `test` in `kernel`'s column (over NVMe when the column ends in
/// ` nvme`) with `verdict`, and `reason` its evidence line; it took a second.
pub fn result(test: &str, kernel: &str, verdict: Verdict, reason: &str) -> TestResult {
    TestResult {
        test: test.into(),
        kernel: kernel.into(),
        kernel_release: None,
        daemon: Daemon::Dmaprobe,
        transport: if kernel.ends_with(" nvme") {
            Transport::Nvme
        } else {
            Transport::VirtioBlk
        },
        verdict,
        reason: reason.into(),
        checks: Vec::new(),
        notes: Vec::new(),
        kernel_log_errors: Vec::new(),
        findings: Vec::new(),
        console_tail: Vec::new(),
        timeline: None,
        seconds: 1.0,
        timing: Default::default(),
    }
}
