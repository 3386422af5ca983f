//! The guest suite through `dmaprobe run`: real Debian kernels under QEMU with
//! dmaprobe attached. Needs `scripts/setup` (QEMU, busybox, kernels) and the
//! guest binary built beside `dmaprobe` (`cargo build --workspace`).
//!
//! On failure each test prints the run's output, which holds the verdict table,
//! the evidence and, for an ERROR, the last console lines.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

use serde_json::Value;

const DMAPROBE: &str = env!("CARGO_BIN_EXE_dmaprobe");

/// One guest run at a time: QEMU under TCG wants the machine's cores, and
/// guests starved by each other would make timeouts, not findings.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `dmaprobe run` with its work files under `json`'s directory.
fn dmaprobe_run(args: &[&str], json: &Path) -> (Output, Value) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(DMAPROBE)
        .env("TMPDIR", json.parent().unwrap())
        .arg("run")
        .args(args)
        .arg("--json")
        .arg(json)
        .output()
        .expect("run dmaprobe");
    let report = std::fs::read_to_string(json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    (out, report)
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn result<'a>(report: &'a Value, test: &str, kernel: &str) -> &'a Value {
    report["results"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find(|r| r["test"] == test && r["kernel"] == kernel)
        })
        .unwrap_or(&Value::Null)
}

/// The verdicts measured on Debian's kernels, as docs/tests.md documents them.
/// 6.1 predates the pinning of O_DIRECT pages (Linux 6.5): it loses the data
/// of a read held across fork when the parent writes to the page.
/// (test, kernel, verdict, whether the host also checks what the guest wrote)
const EXPECTED: &[(&str, &str, &str, bool)] = &[
    ("smoke", "debian-6.1", "PASS", true),
    ("smoke", "debian-6.12", "PASS", true),
    ("ext4", "debian-6.1", "PASS", true),
    ("ext4", "debian-6.12", "PASS", true),
    ("delayed-read", "debian-6.1", "PASS", true),
    ("delayed-read", "debian-6.12", "PASS", true),
    ("mailbox-hold", "debian-6.1", "PASS", true),
    ("mailbox-hold", "debian-6.12", "PASS", true),
    ("dio-read-fork-cow", "debian-6.1", "FAIL", true),
    ("dio-read-fork-cow", "debian-6.12", "PASS", true),
    ("dio-read-fork-cow-child", "debian-6.1", "PASS", true),
    ("dio-read-fork-cow-child", "debian-6.12", "PASS", true),
    ("dio-read-fork-cow-ext4", "debian-6.1", "FAIL", true),
    ("dio-read-fork-cow-ext4", "debian-6.12", "PASS", true),
    ("dio-read-fork-cow-vfat", "debian-6.1", "FAIL", true),
    ("dio-read-fork-cow-vfat", "debian-6.12", "PASS", true),
    ("dio-read-fork-cow-threads", "debian-6.1", "FAIL", true),
    ("dio-read-fork-cow-threads", "debian-6.12", "PASS", true),
    ("dio-write-fork", "debian-6.1", "PASS", true),
    ("dio-write-fork", "debian-6.12", "PASS", true),
    ("dio-write-fork-vfat", "debian-6.1", "PASS", true),
    ("dio-write-fork-vfat", "debian-6.12", "PASS", true),
    ("dio-unmap-exit", "debian-6.1", "PASS", false),
    ("dio-unmap-exit", "debian-6.12", "PASS", false),
    ("dio-exit", "debian-6.1", "PASS", false),
    ("dio-exit", "debian-6.12", "PASS", false),
    ("io-uring-fixed-fork", "debian-6.1", "PASS", true),
    ("io-uring-fixed-fork", "debian-6.12", "PASS", true),
    ("iomap-zeroing-ext4", "debian-6.1", "PASS", true),
    ("iomap-zeroing-ext4", "debian-6.12", "PASS", true),
    ("iomap-zeroing-xfs", "debian-6.1", "PASS", true),
    ("iomap-zeroing-xfs", "debian-6.12", "PASS", true),
    ("dio-zeroing-udf", "debian-6.1", "PASS", true),
    ("dio-zeroing-udf", "debian-6.12", "PASS", true),
    ("splice-truncate", "debian-6.1", "PASS", true),
    ("splice-truncate", "debian-6.12", "PASS", true),
    ("dio-pin-accounting", "debian-6.1", "PASS", false),
    ("dio-pin-accounting", "debian-6.12", "PASS", false),
    ("zero-page-write-source", "debian-6.1", "PASS", false),
    ("zero-page-write-source", "debian-6.12", "PASS", false),
    ("zero-page-read-target", "debian-6.1", "PASS", true),
    ("zero-page-read-target", "debian-6.12", "PASS", true),
    ("bad-block-ext4", "debian-6.1", "PASS", true),
    ("bad-block-ext4", "debian-6.12", "PASS", true),
    // Over virtio-blk there is no passthrough: run with --transport nvme.
    ("passthru-read-fork-cow", "debian-6.1", "SKIP", false),
    ("passthru-read-fork-cow", "debian-6.12", "SKIP", false),
    ("passthru-write-fork", "debian-6.1", "SKIP", false),
    ("passthru-write-fork", "debian-6.12", "SKIP", false),
    (
        "passthru-zero-page-write-source",
        "debian-6.1",
        "SKIP",
        false,
    ),
    (
        "passthru-zero-page-write-source",
        "debian-6.12",
        "SKIP",
        false,
    ),
    ("passthru-uring-read-fork-cow", "debian-6.1", "SKIP", false),
    ("passthru-uring-read-fork-cow", "debian-6.12", "SKIP", false),
];

#[test]
fn the_default_suite_gives_the_documented_verdicts_on_both_debian_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let (out, report) = dmaprobe_run(&[], &json);
    // A FAIL is expected (6.1), so the run exits 1.
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let results = report["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), EXPECTED.len(), "{}", show(&out));
    for &(test, kernel, verdict, host_checked) in EXPECTED {
        let r = result(&report, test, kernel);
        assert_eq!(
            r["verdict"],
            verdict,
            "{test} on {kernel}: {r}\n{}",
            show(&out)
        );
        if verdict == "SKIP" {
            let reason = r["reason"].as_str().unwrap_or("");
            assert!(reason.contains("--transport nvme"), "{r}");
            continue;
        }
        let checks = r["checks"].as_array().cloned().unwrap_or_default();
        let named =
            |c: &Value, host: bool| c["name"].as_str().unwrap_or("").starts_with("host:") == host;
        // The guest checked its data, and the host checked it again.
        assert!(
            checks.iter().any(|c| c["ok"] == true && named(c, false)),
            "{r}"
        );
        if host_checked {
            assert!(
                checks.iter().any(|c| c["ok"] == true && named(c, true)),
                "{r}"
            );
        }
        if verdict == "PASS" {
            assert!(checks.iter().all(|c| c["ok"] == true), "{r}");
        }
    }
    for kernel in ["debian-6.1", "debian-6.12"] {
        let ext4 = result(&report, "ext4", kernel);
        let fsck = |c: &Value| c["name"] == "host: e2fsck -fn is clean";
        assert!(
            ext4["checks"].as_array().unwrap().iter().any(fsck),
            "{ext4}"
        );
        // The delayed read really waited, and its buffer was untouched meanwhile.
        let delayed = result(&report, "delayed-read", kernel);
        for name in [
            "the read waited for the device",
            "the buffer kept its own bytes while the read was in flight",
        ] {
            let found = delayed["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == name);
            assert!(found, "{name}: {delayed}");
        }
    }
    // The pin counter tells the kernels apart, and the device saw the zero
    // page as the write's source on both.
    for (kernel, pins) in [("debian-6.1", "no"), ("debian-6.12", "yes")] {
        let r = result(&report, "dio-pin-accounting", kernel);
        let note = r["notes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n[0] == "dio-pins-pages"))
            .and_then(|n| n[1].as_str())
            .unwrap_or("");
        assert!(note.starts_with(pins), "{kernel}: {r}");
        let z = result(&report, "zero-page-write-source", kernel);
        let seen = z["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["finding"] == "zero-page-source");
        assert!(seen, "{kernel}: {z}");
    }
    // Sub-block zeroing: 6.1 writes the padding from the zero page, 6.12 from a
    // zeroed buffer of its own, which the device spots as it recurs.
    for (kernel, seen) in [
        ("debian-6.1", "zero-page-source"),
        ("debian-6.12", "suspected-zero-buffer"),
    ] {
        for test in ["iomap-zeroing-ext4", "iomap-zeroing-xfs"] {
            let r = result(&report, test, kernel);
            let found = r["findings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["finding"] == seen);
            assert!(found, "{test} on {kernel}: no {seen}: {r}");
        }
    }
    // The 6.1 failure names its evidence: where the device wrote, and that the
    // page had left the parent.
    let table = String::from_utf8_lossy(&out.stdout);
    // Each read lost on 6.1, through the block device and through the
    // legacy direct-I/O code, names the page the device wrote and the one
    // the parent maps now, on one line under the table.
    for test in ["dio-read-fork-cow", "dio-read-fork-cow-vfat"] {
        let cow = result(&report, test, "debian-6.1");
        let reason = cow["reason"].as_str().unwrap_or("");
        assert!(
            reason.contains("kept its old bytes")
                && reason.contains("at GPA 0x")
                && reason.contains("now maps 0x"),
            "{cow}"
        );
        assert!(
            table.contains(&format!("FAIL {test} on debian-6.1: ")),
            "{table}"
        );
    }
    // The legacy code pads a sub-block write with the zero page on both
    // kernels, and the pin counter moves for the padded write exactly as for
    // one without padding; the host checks the vfat and UDF volumes.
    for kernel in ["debian-6.1", "debian-6.12"] {
        let r = result(&report, "dio-zeroing-udf", kernel);
        assert!(
            r["findings"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["finding"] == "zero-page-source"),
            "{r}"
        );
        let cases = r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| {
                c["ok"] == true
                    && c["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("3584 B from the zero page"))
            })
            .count();
        assert_eq!(cases, 3, "{r}");
        for (test, check) in [
            (
                "dio-zeroing-udf",
                "host: udfinfo reads the volume, integrity closed",
            ),
            ("dio-read-fork-cow-vfat", "host: fsck.vfat -n is clean"),
            ("dio-write-fork-vfat", "host: fsck.vfat -n is clean"),
        ] {
            let r = result(&report, test, kernel);
            let found = r["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == check && c["ok"] == true);
            assert!(found, "{test} on {kernel}: no {check}: {r}");
        }
    }
}

#[test]
fn a_failing_guest_test_is_a_fail_with_its_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let (out, report) = dmaprobe_run(
        &[
            "--kernel",
            "debian-6.12",
            "--tests",
            "selftest-fail",
            "--allow-selftests",
        ],
        &json,
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let r = result(&report, "selftest-fail", "debian-6.12");
    assert_eq!(r["verdict"], "FAIL", "{r}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("first mismatch at +"),
        "{r}"
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("FAIL selftest-fail on debian-6.12: "),
        "{table}"
    );
}

#[test]
fn self_tests_need_their_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = dmaprobe_run(&["--tests", "selftest-fail"], &dir.path().join("r.json"));
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-selftests"));
}

#[test]
fn qemu_storage_daemon_refuses_tests_that_need_dmaprobe() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    for (tests, needs) in [
        ("smoke,delayed-read", "--fault op=read"),
        ("mailbox-hold", "--mailbox"),
    ] {
        let (out, _) = dmaprobe_run(
            &["--daemon", "qemu-storage-daemon", "--tests", tests],
            &json,
        );
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("needs dmaprobe's own features") && stderr.contains(needs),
            "{}",
            show(&out)
        );
        // Refused before anything booted: no report.
        assert!(!json.exists());
    }
}

#[test]
fn smoke_passes_against_qemu_storage_daemon_with_the_hosts_checks() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let (out, report) = dmaprobe_run(
        &[
            "--kernel",
            "debian-6.12",
            "--tests",
            "smoke",
            "--daemon",
            "qemu-storage-daemon",
        ],
        &json,
    );
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let r = result(&report, "smoke", "debian-6.12");
    assert_eq!(r["verdict"], "PASS", "{r}");
    assert_eq!(r["daemon"], "qemu-storage-daemon", "{r}");
    let checks = r["checks"].as_array().cloned().unwrap_or_default();
    let host = |c: &&Value| c["name"].as_str().unwrap_or("").starts_with("host:");
    assert!(checks.iter().filter(host).count() > 1, "{r}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{r}");
    // qemu-storage-daemon keeps no ledger.
    assert_eq!(r["findings"], Value::Array(Vec::new()), "{r}");
}

#[test]
fn a_power_cut_between_two_boots_keeps_the_fsynced_file_on_both_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let (out, report) = dmaprobe_run(&["--tests", "power-cut-ext4"], &json);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for kernel in ["debian-6.1", "debian-6.12"] {
        let r = result(&report, "power-cut-ext4", kernel);
        assert_eq!(r["verdict"], "PASS", "{r}");
        let checks = r["checks"].as_array().cloned().unwrap_or_default();
        assert!(checks.iter().all(|c| c["ok"] == true), "{r}");
        for name in [
            "boot 1 left the file system unclean (needs_recovery)",
            "/synced.bin intact after the power cut",
            "host: /synced.bin holds its 2097152 B",
            "host: e2fsck -fn is clean",
        ] {
            assert!(checks.iter().any(|c| c["name"] == name), "{name}: {r}");
        }
        // The cut lost the O_DIRECT writes no flush made stable.
        let notes = r["notes"].as_array().cloned().unwrap_or_default();
        let cut = notes
            .iter()
            .find(|n| n[0].as_str().unwrap_or("").contains("power-cut"))
            .and_then(|n| serde_json::from_str::<Value>(n[1].as_str()?).ok())
            .unwrap_or_default();
        assert!(cut["lost_blocks"].as_u64() > Some(0), "{r}");
    }
}

#[test]
fn a_daemon_killed_and_restarted_under_writes_loses_nothing_flushed_on_both_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let (out, report) = dmaprobe_run(&["--tests", "daemon-restart"], &json);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for kernel in ["debian-6.1", "debian-6.12"] {
        let r = result(&report, "daemon-restart", kernel);
        assert_eq!(r["verdict"], "PASS", "{r}");
        let checks = r["checks"].as_array().cloned().unwrap_or_default();
        assert!(checks.iter().all(|c| c["ok"] == true), "{r}");
        let named = |name: &str| checks.iter().filter(|c| c["name"] == name).count();
        // Four kills, each followed by a daemon serving again.
        assert_eq!(
            named("host: the daemon killed with SIGKILL and started again"),
            4,
            "{r}"
        );
        assert_eq!(
            named("the guest saw 4 new daemons and wrote on through each"),
            1,
            "{r}"
        );
        assert_eq!(named("every record written reads back"), 1, "{r}");
        // The host read back every record the flushes covered.
        let host = checks
            .iter()
            .find(|c| {
                c["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("host: backing holds the "))
            })
            .unwrap_or_else(|| panic!("no host check of the records: {r}"));
        assert_eq!(host["detail"], "matches", "{r}");
    }
}

#[test]
fn a_guest_that_does_not_finish_is_an_error_with_its_console() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let (out, report) = dmaprobe_run(
        &[
            "--kernel",
            "debian-6.12",
            "--tests",
            "selftest-hang",
            "--allow-selftests",
        ],
        &json,
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let r = result(&report, "selftest-hang", "debian-6.12");
    assert_eq!(r["verdict"], "ERROR", "{r}");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(reason.contains("did not finish"), "{r}");
    let tail = r["console_tail"].as_array().unwrap();
    let began = |l: &Value| {
        l.as_str()
            .unwrap_or("")
            .contains("dmaprobe: begin selftest-hang")
    };
    assert!(tail.iter().any(began), "{r}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("    | "),
        "{}",
        show(&out)
    );
    // Nothing is left running: no QEMU or daemon of this run (their paths are
    // under the run's TMPDIR) survives it.
    let ps = Command::new("pgrep")
        .args(["-f", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

/// Over NVMe (the guest's own nvme driver, dmaprobe's controller over
/// vfio-user) the pinning verdicts are those of virtio-blk: 6.1 loses the
/// O_DIRECT read across fork, 6.12 does not; smoke passes on both.
/// Over NVMe: the block layer's passthrough path (`bio_map_user_iov`),
/// by ioctl and by io_uring, loses a read held across fork on 6.1 and keeps
/// it on 6.12, as the block-device and legacy direct-I/O paths do; writes
/// and the zero page pass on both.
const EXPECTED_NVME: &[(&str, &str, &str)] = &[
    ("smoke", "PASS", "PASS"),
    ("dio-read-fork-cow", "FAIL", "PASS"),
    ("dio-read-fork-cow-vfat", "FAIL", "PASS"),
    ("dio-write-fork-vfat", "PASS", "PASS"),
    ("dio-zeroing-udf", "PASS", "PASS"),
    ("passthru-read-fork-cow", "FAIL", "PASS"),
    ("passthru-uring-read-fork-cow", "FAIL", "PASS"),
    ("passthru-write-fork", "PASS", "PASS"),
    ("passthru-zero-page-write-source", "PASS", "PASS"),
];

#[test]
fn over_nvme_the_verdicts_are_those_of_virtio_blk_and_passthrough_pins_from_6_5() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let tests: Vec<&str> = EXPECTED_NVME.iter().map(|e| e.0).collect();
    let (out, report) = dmaprobe_run(&["--transport", "nvme", "--tests", &tests.join(",")], &json);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for &(test, on_61, on_612) in EXPECTED_NVME {
        for (kernel, verdict) in [("debian-6.1", on_61), ("debian-6.12", on_612)] {
            let column = format!("{kernel} nvme");
            let r = result(&report, test, &column);
            assert_eq!(
                r["verdict"],
                verdict,
                "{test} on {column}: {r}\n{}",
                show(&out)
            );
            assert_eq!(r["transport"], "nvme", "{r}");
            let checks = r["checks"].as_array().cloned().unwrap_or_default();
            if verdict == "PASS" {
                assert!(
                    !checks.is_empty() && checks.iter().all(|c| c["ok"] == true),
                    "{r}"
                );
            } else {
                // One line naming the page the device wrote and the page the
                // parent maps now.
                let reason = r["reason"].as_str().unwrap_or("");
                assert!(
                    reason.contains("kept its old bytes")
                        && reason.contains("at GPA 0x")
                        && reason.contains("now maps 0x"),
                    "{r}"
                );
                assert!(
                    table.contains(&format!("FAIL {test} on {column}: ")),
                    "{table}"
                );
            }
        }
    }
    let note = |r: &Value, key: &str| {
        r["notes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n[0] == key))
            .and_then(|n| n[1].as_str())
            .unwrap_or("")
            .to_owned()
    };
    for kernel in ["debian-6.1", "debian-6.12"] {
        let column = format!("{kernel} nvme");
        // The passthrough write's source is the zero page, which is not pinned.
        let z = result(&report, "passthru-zero-page-write-source", &column);
        assert_eq!(note(z, "source-is-zero-page"), "true", "{z}");
        // The device moved the passthrough read's data to and from the
        // program's own page: the kernel mapped the buffer, not a bounce buffer.
        let r = result(&report, "passthru-read-fork-cow", &column);
        assert_eq!(
            note(r, "device-wrote-at"),
            note(r, "page-before-fork"),
            "{r}"
        );
    }
}

#[test]
fn a_kernel_not_in_the_catalogue_says_how_to_list_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(DMAPROBE)
        .args(["run", "--kernel", "debian-9", "--tests", "smoke"])
        .env("DMAPROBE_CACHE", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dmaprobe kernel list"),
        "{}",
        show(&out)
    );
}

/// A catalogue kernel that is not cached is fetched (from the mirror the
/// machine's apt sources name) before the run, into an empty cache.
#[test]
fn a_catalogue_kernel_not_cached_is_fetched_and_booted() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(DMAPROBE)
        .args(["run", "--kernel", "debian-5.10", "--tests", "smoke"])
        .env("DMAPROBE_CACHE", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stderr.contains("[debian-5.10] not in the cache: fetching it"),
        "{}",
        show(&out)
    );
    assert!(stderr.contains("smoke: PASS"), "{}", show(&out));
    let env = std::fs::read_to_string(dir.path().join("kernels/debian-5.10/kernel.env")).unwrap();
    assert!(env.contains("RELEASE=5.10."), "{env}");
}

#[test]
fn the_fork_verdicts_repeat_run_after_run() {
    let dir = tempfile::tempdir().unwrap();
    let tests = "dio-read-fork-cow,dio-read-fork-cow-threads";
    let mut seen = Vec::new();
    for run in 0..3 {
        let json = dir.path().join(format!("run{run}.json"));
        let (out, report) = dmaprobe_run(&["--tests", tests], &json);
        let verdicts: Vec<(String, String, String)> = report["results"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
                (s("test"), s("kernel"), s("verdict"))
            })
            .collect();
        assert_eq!(verdicts.len(), 4, "{}", show(&out));
        seen.push(verdicts);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    for (test, kernel, verdict) in &seen[0] {
        let want = if kernel == "debian-6.1" {
            "FAIL"
        } else {
            "PASS"
        };
        assert_eq!(verdict, want, "{test} on {kernel}");
    }
}

/// The tests that once stayed green against a mutant (dio-exit and
/// dio-pin-accounting against wrong-page, dio-exit and io-uring-fixed-fork
/// against complete-before-dma) and three that never did; scripts/mutants
/// runs the whole suite over both transports.
#[test]
fn each_mutant_turns_the_6_12_suite_red() {
    let tests =
        "smoke,delayed-read,dio-read-fork-cow,dio-exit,dio-pin-accounting,io-uring-fixed-fork";
    for mutant in ["complete-before-dma", "wrong-page"] {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("report.json");
        // A broken device may also hang the guest: a shorter timeout suffices.
        let (out, report) = dmaprobe_run(
            &[
                "--kernel",
                "debian-6.12",
                "--tests",
                tests,
                "--mutant",
                mutant,
                "--timeout-scale",
                "0.5",
            ],
            &json,
        );
        assert_eq!(out.status.code(), Some(1), "{mutant}: {}", show(&out));
        let results = report["results"].as_array().cloned().unwrap_or_default();
        assert_eq!(results.len(), 6, "{mutant}: {}", show(&out));
        for r in &results {
            assert!(
                r["verdict"] == "FAIL" || r["verdict"] == "ERROR",
                "{mutant} left {} green: {r}",
                r["test"]
            );
        }
    }
}

/// The verdict grid of a printed table and the cases of its evidence lines
/// (`FAIL test on kernel`), without the evidence itself: that names guest
/// addresses, which differ from boot to boot.
fn table_cases(stdout: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| match l.split_once(": ") {
            Some((case, _)) if !l.starts_with(' ') => case.to_owned(),
            _ => l.trim_end().to_owned(),
        })
        .collect()
}

#[test]
fn two_shards_at_once_merge_into_the_table_of_one_run_at_two_jobs() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "run",
        "--accel",
        "auto",
        "--tests",
        "smoke,delayed-read,dio-read-fork-cow",
    ];
    let run = |extra: &[&str], json: &str| {
        Command::new(DMAPROBE)
            .env("TMPDIR", dir.path())
            .args(args)
            .args(extra)
            .arg("--json")
            .arg(dir.path().join(json))
            .output()
            .expect("run dmaprobe")
    };
    let whole = run(&["--jobs", "2"], "whole.json");
    // dio-read-fork-cow FAILs on 6.1, so every run exits 1.
    assert_eq!(whole.status.code(), Some(1), "{}", show(&whole));
    let said = String::from_utf8_lossy(&whole.stderr);
    assert!(said.contains(", 2 at once (--jobs)"), "{said}");
    assert!(said.contains("guests run under "), "{said}");

    // The two shards run at the same time, in processes of their own.
    let shards: Vec<Output> = std::thread::scope(|s| {
        let runs: Vec<_> = ["1/2", "2/2"]
            .map(|shard| {
                let json = format!("shard-{}.json", &shard[..1]);
                s.spawn(move || run(&["--jobs", "1", "--shard", shard], &json))
            })
            .into_iter()
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for out in &shards {
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("of the 6 cases"), "{}", show(out));
    }
    let merged = Command::new(DMAPROBE)
        .args(["report", "merge"])
        .arg(dir.path().join("shard-2.json"))
        .arg(dir.path().join("shard-1.json"))
        .output()
        .expect("run dmaprobe report merge");
    assert_eq!(merged.status.code(), Some(1), "{}", show(&merged));
    assert_eq!(
        table_cases(&merged.stdout),
        table_cases(&whole.stdout),
        "merged:\n{}\nwhole:\n{}",
        show(&merged),
        show(&whole)
    );
    // The grid itself: six verdicts, the 6.1 fork read red.
    let grid = String::from_utf8_lossy(&whole.stdout);
    assert!(
        grid.contains("FAIL dio-read-fork-cow on debian-6.1: "),
        "{grid}"
    );
    assert_eq!(grid.matches("PASS").count(), 5, "{grid}");
}
