//! One voice on the command line: every subcommand says an error as
//! `dmaprobe SUBCOMMAND: error: CAUSE` on one line of stderr, each reason
//! once, with the option as the user typed it, and no log decoration.

use std::process::{Command, Output};

const DMAPROBE: &str = env!("CARGO_BIN_EXE_dmaprobe");

fn dmaprobe(args: &[&str]) -> Output {
    Command::new(DMAPROBE)
        .args(args)
        .output()
        .expect("run dmaprobe")
}

/// The one line `args` print on stderr, checked for the shared form, and
/// the exit status.
fn error_line(args: &[&str]) -> (String, Option<i32>) {
    let out = dmaprobe(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
    let prefix = format!("dmaprobe {}: error: ", args[0]);
    assert!(lines[0].starts_with(&prefix), "{args:?}: {stderr}");
    (lines[0][prefix.len()..].to_owned(), out.status.code())
}

#[test]
fn every_subcommand_says_its_errors_alike() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone.sock");
    let gone = gone.to_str().unwrap();
    let sock = dir.path().join("d.sock");
    let sock = sock.to_str().unwrap();

    let (cause, status) = error_line(&["serve", "--socket", sock, "--mem", "0"]);
    assert_eq!(
        (cause.as_str(), status),
        ("--mem must be larger than zero", Some(1))
    );

    let (cause, status) = error_line(&["run", "--tests", "no-such-test"]);
    assert!(
        cause.starts_with("Unknown test \"no-such-test\""),
        "{cause}"
    );
    assert_eq!(status, Some(2));

    let (cause, status) = error_line(&["ctl", "--control", gone, "status"]);
    assert!(cause.contains(gone), "{cause}");
    assert_eq!(status, Some(1));

    let (cause, status) = error_line(&["bench", "--socket", gone, "--seconds", "1"]);
    assert!(cause.contains(gone), "{cause}");
    assert_eq!(status, Some(1));

    let (cause, status) = error_line(&["kconfig", "--check", gone]);
    assert!(cause.contains(gone), "{cause}");
    assert_eq!(status, Some(2));

    let (cause, status) = error_line(&["report", "merge", gone]);
    assert!(cause.contains(gone), "{cause}");
    assert_eq!(status, Some(2));
}

#[test]
fn a_bad_fault_rule_gives_its_reason_once() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("d.sock");
    let (cause, _) = error_line(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--mem",
        "1M",
        "--fault",
        "op=read,action=explode",
    ]);
    assert_eq!(cause.matches("unknown action").count(), 1, "{cause}");
    assert!(
        cause.starts_with("--fault \"op=read,action=explode\": at column 9"),
        "{cause}"
    );
}

#[test]
fn the_list_of_tests_keeps_its_columns_whatever_the_names() {
    let out = dmaprobe(&["run", "--list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let longest = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").len())
        .max()
        .unwrap();
    for line in text.lines() {
        let summary_at = line[longest..]
            .find(|c: char| c != ' ')
            .map(|i| i + longest);
        assert_eq!(summary_at, Some(longest + 2), "{line}");
    }
}
