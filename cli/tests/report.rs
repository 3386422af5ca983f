//! `dmaprobe report merge` as a CI job runs it: the JSON reports of a run's
//! shards, written as `dmaprobe run --shard I/N --json` writes them, joined
//! into the table, JSON and JUnit one unsharded run would have given, with
//! its exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use guest_tests::protocol::Verdict;
use guest_tests::report::{self, Matrix};
use guest_tests::run::{Case, Shard, TestResult};
use guest_tests::test_utils::result;

/// A run of smoke, ext4 and xfs over virtio-blk and NVMe on one kernel: six
/// cases, in the reports' order, each with its result.
fn run_of_six(failing: Option<&str>) -> (Vec<Case>, Vec<TestResult>) {
    let mut cases = Vec::new();
    let mut results = Vec::new();
    for kernel in ["debian-6.12", "debian-6.12 nvme"] {
        for test in ["smoke", "ext4", "xfs"] {
            let case = format!("{test} on {kernel}");
            let (verdict, reason) = if failing == Some(case.as_str()) {
                (Verdict::Fail, "fsck found errors")
            } else {
                (Verdict::Pass, "")
            };
            cases.push(Case {
                kernel: kernel.into(),
                test: test.into(),
            });
            results.push(result(test, kernel, verdict, reason));
        }
    }
    (cases, results)
}

/// Each shard's report of the run, `DIR/shard-I.json`, for the shards given.
fn write_shards(
    dir: &Path,
    count: u32,
    shards: &[u32],
    cases: &[Case],
    results: &[TestResult],
) -> Vec<PathBuf> {
    shards
        .iter()
        .map(|&index| {
            let shard = Shard { index, count };
            let mine: Vec<TestResult> = (results.iter().enumerate())
                .filter(|&(c, _)| shard.takes(c))
                .map(|(_, r)| r.clone())
                .collect();
            let matrix = Matrix {
                shard,
                cases: cases.to_vec(),
            };
            let file = dir.join(format!("shard-{index}.json"));
            std::fs::write(&file, report::json(&mine, &matrix)).expect("write a shard's report");
            file
        })
        .collect()
}

/// `dmaprobe report merge ARGS...`.
fn merge(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .args(["report", "merge"])
        .args(args)
        .output()
        .expect("run dmaprobe")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn shards_merge_into_what_one_unsharded_run_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (cases, results) = run_of_six(None);
    let files = write_shards(dir.path(), 3, &[3, 1, 2], &cases, &results);
    let json = dir.path().join("merged.json");
    let junit = dir.path().join("report.xml");
    let mut args: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    args.extend([Path::new("--json"), &json, Path::new("--junit"), &junit]);
    let out = merge(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\n", report::table(&results)));
    // Tests down, a column per kernel and transport.
    assert_eq!(
        text(&out.stdout).lines().next(),
        Some("test   debian-6.12  debian-6.12 nvme")
    );
    assert_eq!(text(&out.stderr), "");
    let whole = Matrix {
        shard: Shard::ALL,
        cases: cases.clone(),
    };
    assert_eq!(
        std::fs::read_to_string(&json).unwrap(),
        report::json(&results, &whole)
    );
    assert_eq!(
        std::fs::read_to_string(&junit).unwrap(),
        report::junit(&results)
    );
    // The merged report is a report of the whole run: it merges alone.
    let out = merge(&[&json]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}\n", report::table(&results)));
}

#[test]
fn a_failed_test_in_any_shard_exits_1_with_its_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let (cases, results) = run_of_six(Some("xfs on debian-6.12 nvme"));
    let files = write_shards(dir.path(), 2, &[1, 2], &cases, &results);
    let args: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let out = merge(&args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("\nFAIL xfs on debian-6.12 nvme: fsck found errors\n"),
        "{stdout}"
    );
}

#[test]
fn a_missing_shard_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cases, results) = run_of_six(None);
    let files = write_shards(dir.path(), 4, &[1, 2, 4], &cases, &results);
    let json = dir.path().join("merged.json");
    let mut args: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    args.extend([Path::new("--json"), &json]);
    let out = merge(&args);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "dmaprobe report: error: No report of shard 3/4 (1 case: xfs on debian-6.12): \
         run the missing shard 3/4 again\n"
    );
    assert_eq!(text(&out.stdout), "");
    assert!(!json.exists(), "a refused merge writes no report");
    // A file that is not there is named too.
    let gone = dir.path().join("shard-3.json");
    let out = merge(&[&files[0], &gone]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "dmaprobe report: error: Cannot read {}: ",
            gone.display()
        )),
        "{stderr}"
    );
}
