//! Reports of a run: the table a person reads, JUnit for CI, and JSON with
//! all the evidence, which [`merge`] joins back into the whole run's when the
//! run was split in shards.

mod merge;

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::protocol::Verdict;
use crate::run::{Case, Shard, TestResult};

pub use merge::{merge, Gap, MergeError};

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
                .map_or("-", |r| r.verdict.word());
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
                r.verdict.word(),
                r.test,
                r.kernel,
                r.reason
            );
            for line in &r.console_tail {
                let _ = writeln!(out, "    | {line}");
            }
            if let Some(svg) = &r.timeline {
                let _ = writeln!(out, "    timeline: {}", svg.display());
            }
        }
    }
    out
}

/// The results as JUnit XML: a test suite per kernel, a test case per test;
/// FAIL is a failure and ERROR an error, each with its evidence.
pub fn junit(results: &[TestResult]) -> String {
    let mut kernels: Vec<&str> = Vec::new();
    for r in results {
        if !kernels.contains(&r.kernel.as_str()) {
            kernels.push(&r.kernel);
        }
    }
    let mut out = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"dmaprobe\">\n",
    );
    for k in kernels {
        let mine: Vec<&TestResult> = results.iter().filter(|r| r.kernel == k).collect();
        let count = |v: Verdict| mine.iter().filter(|r| r.verdict == v).count();
        let _ = writeln!(
            out,
            "  <testsuite name=\"dmaprobe.{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{:.1}\">",
            xml(k),
            mine.len(),
            count(Verdict::Fail),
            count(Verdict::Error),
            count(Verdict::Skip),
            mine.iter().map(|r| r.seconds).sum::<f64>()
        );
        for r in mine {
            let _ = write!(
                out,
                "    <testcase classname=\"dmaprobe.{}\" name=\"{}\" time=\"{:.1}\"",
                xml(k),
                xml(&r.test),
                r.seconds
            );
            let evidence = || {
                let mut e: Vec<String> = r
                    .checks
                    .iter()
                    .map(|c| {
                        format!(
                            "[{}] {}: {}",
                            if c.ok { "ok" } else { "FAILED" },
                            c.name,
                            c.detail
                        )
                    })
                    .collect();
                e.extend(r.kernel_log_errors.iter().map(|l| format!("kernel: {l}")));
                e.extend(r.console_tail.iter().map(|l| format!("console: {l}")));
                xml(&e.join("\n"))
            };
            match r.verdict {
                Verdict::Pass => out.push_str("/>\n"),
                Verdict::Skip => {
                    let _ = writeln!(
                        out,
                        ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                        xml(&r.reason)
                    );
                }
                Verdict::Fail | Verdict::Error => {
                    let tag = if r.verdict == Verdict::Fail {
                        "failure"
                    } else {
                        "error"
                    };
                    let _ = writeln!(
                        out,
                        ">\n      <{tag} message=\"{}\">{}</{tag}>\n    </testcase>",
                        xml(&r.reason),
                        evidence()
                    );
                }
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// Text escaped for XML attributes and content.
fn xml(s: &str) -> String {
    s.chars()
        .filter(|&c| c == '\n' || c == '\t' || !c.is_control())
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&apos;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// Whether the run as a whole succeeded: nothing failed or errored.
pub fn all_good(results: &[TestResult]) -> bool {
    results
        .iter()
        .all(|r| matches!(r.verdict, Verdict::Pass | Verdict::Skip))
}

/// What a report covers: every case of the run, in the reports' order, and
/// the shard of them this process ran (1/1 for the whole run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matrix {
    pub shard: Shard,
    pub cases: Vec<Case>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    dmaprobe_version: &'static str,
    matrix: &'a Matrix,
    results: &'a [TestResult],
}

/// The run (or its shard) as JSON.
pub fn json(results: &[TestResult], matrix: &Matrix) -> String {
    serde_json::to_string_pretty(&JsonReport {
        dmaprobe_version: env!("CARGO_PKG_VERSION"),
        matrix,
        results,
    })
    .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::result;

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
        let matrix = Matrix {
            shard: Shard::ALL,
            cases: Vec::new(),
        };
        let j: serde_json::Value = serde_json::from_str(&json(&r, &matrix)).unwrap();
        assert_eq!(j["results"][2]["verdict"], "FAIL");
    }

    #[test]
    fn junit_has_a_suite_per_kernel_and_escapes() {
        let r = [
            result("smoke", "debian-6.1", Verdict::Pass, ""),
            result("ext4", "debian-6.1", Verdict::Fail, "a <b> & \"c\""),
            result("smoke", "debian-6.12", Verdict::Error, "hung"),
        ];
        let x = junit(&r);
        assert_eq!(x.matches("<testsuite ").count(), 2);
        assert!(
            x.contains(r#"name="dmaprobe.debian-6.1" tests="2" failures="1" errors="0""#),
            "{x}"
        );
        assert!(
            x.contains(r#"<failure message="a &lt;b&gt; &amp; &quot;c&quot;">"#),
            "{x}"
        );
        assert!(x.contains(r#"<error message="hung">"#), "{x}");
        assert!(!x.contains("<b>"));
    }
}
