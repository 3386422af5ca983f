//! Reports of a run: the table a person reads, and JSON with all the evidence.

use std::fmt::Write as _;

use serde::Serialize;

use crate::protocol::Verdict;
use crate::run::TestResult;

/// The verdict matrix, tests down and kernels across, then one line of evidence
/// for every result that did not pass.
pub fn table(results: &[TestResult]) -> String {
    let mut kernels: Vec<&str> = Vec::new();
    let mut tests: Vec<&str> = Vec::new();
    for r in results {
        if !kernels.contains(&r.kernel.as_str()) {
            kernels.push(&r.kernel);
        }
        if !tests.contains(&r.test.as_str()) {
            tests.push(&r.test);
        }
    }
    let first = tests.iter().map(|t| t.len()).max().unwrap_or(4).max(4);
    let widths: Vec<usize> = kernels.iter().map(|k| k.len().max(5)).collect();
    let mut out = String::new();
    let _ = write!(out, "{:first$}", "test");
    for (k, w) in kernels.iter().zip(&widths) {
        let _ = write!(out, "  {k:w$}");
    }
    out.push('\n');
    for t in &tests {
        let _ = write!(out, "{t:first$}");
        for (k, w) in kernels.iter().zip(&widths) {
            let cell = results
                .iter()
                .find(|r| r.test == *t && r.kernel == *k)
                .map_or("-", |r| verdict_word(r.verdict));
            let _ = write!(out, "  {cell:w$}");
        }
        out.push('\n');
    }
    let not_passed: Vec<&TestResult> = results
        .iter()
        .filter(|r| r.verdict != Verdict::Pass)
        .collect();
    if !not_passed.is_empty() {
        out.push('\n');
        for r in not_passed {
            let _ = writeln!(
                out,
                "{} {} on {}: {}",
                verdict_word(r.verdict),
                r.test,
                r.kernel,
                r.reason
            );
            for line in &r.console_tail {
                let _ = writeln!(out, "    | {line}");
            }
        }
    }
    out
}

pub fn verdict_word(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "PASS",
        Verdict::Fail => "FAIL",
        Verdict::Skip => "SKIP",
        Verdict::Error => "ERROR",
    }
}

/// Whether the run as a whole succeeded: nothing failed or errored.
pub fn all_good(results: &[TestResult]) -> bool {
    results
        .iter()
        .all(|r| matches!(r.verdict, Verdict::Pass | Verdict::Skip))
}

#[derive(Serialize)]
struct JsonReport<'a> {
    dmaprobe_version: &'static str,
    results: &'a [TestResult],
}

/// The whole run as JSON.
pub fn json(results: &[TestResult]) -> String {
    serde_json::to_string_pretty(&JsonReport {
        dmaprobe_version: env!("CARGO_PKG_VERSION"),
        results,
    })
    .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(test: &str, kernel: &str, verdict: Verdict, reason: &str) -> TestResult {
        TestResult {
            test: test.into(),
            kernel: kernel.into(),
            kernel_release: None,
            verdict,
            reason: reason.into(),
            checks: Vec::new(),
            notes: Vec::new(),
            kernel_log_errors: Vec::new(),
            console_tail: Vec::new(),
            seconds: 1.0,
        }
    }

    #[test]
    fn table_has_a_cell_per_test_and_kernel_and_the_evidence() {
        let r = [
            result("smoke", "debian-6.1", Verdict::Pass, ""),
            result("smoke", "debian-6.12", Verdict::Pass, ""),
            result("ext4", "debian-6.1", Verdict::Fail, "fsck found errors"),
            result("ext4", "debian-6.12", Verdict::Pass, ""),
        ];
        let t = table(&r);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("debian-6.1") && lines[0].contains("debian-6.12"));
        assert!(lines[1].starts_with("smoke") && lines[1].matches("PASS").count() == 2);
        assert!(lines[2].starts_with("ext4") && lines[2].contains("FAIL"));
        assert!(t.contains("FAIL ext4 on debian-6.1: fsck found errors"));
        assert!(!all_good(&r));
        assert!(all_good(&r[..2]));
        let j: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        assert_eq!(j["results"][2]["verdict"], "FAIL");
    }
}
