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

/// Writes `script` to `path` as an executable, without this process ever
/// holding a writable descriptor on it: a test thread that forks while
/// another writes the file would hand the child that descriptor, and
/// executing the file until the child execs fails with "Text file busy".
/// A `sh` child writes it instead.
pub fn write_executable(path: &std::path::Path, script: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut sh = Command::new("sh")
        .args(["-c", r#"cat > "$1" && chmod 755 "$1""#, "sh"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sh starts");
    sh.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(
        sh.wait().unwrap().success(),
        "cannot write {}",
        path.display()
    );
}
