//! The host side of each guest test: the disk it gets, and what the host checks
//! after the guest has shut down.

use std::time::Duration;

use crate::kconfig::options::{
    ConfigOption, DROP_CACHES, EXT4, FADVISE, FIO, IO_URING, NVME_PASSTHROUGH, PAGEMAP, UDF, VFAT,
    XFS,
};

/// A file system the host makes on a test's disk before the guest boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    Ext4,
    /// XFS wants at least 300 MB.
    Xfs,
    /// FAT (vfat) with 512-byte sectors and 4 KiB clusters: a file system
    /// whose direct I/O is the legacy code of fs/direct-io.c.
    Vfat,
    /// UDF with 4 KiB blocks over the 512-byte-sector disk: legacy direct I/O
    /// that allocates blocks, so a sub-block write is padded with zeros.
    Udf,
}

/// The disk a test gets: a fresh file for every run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub size: u64,
    pub lbs: u64,
    pub format: Option<Fs>,
}

/// When a test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    /// In the default suite.
    Default,
    /// Only when named: a measurement, not a verdict on the kernel, or a
    /// test too slow for the default suite.
    Named,
    /// Only when named with `--allow-selftests`: it fails or hangs on purpose.
    Selftest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestSpec {
    pub name: &'static str,
    /// One line for `--help` and reports.
    pub summary: &'static str,
    pub disk: DiskSpec,
    /// Extra `dmaprobe serve` arguments (fault rules, checks) for this test's disk.
    pub serve_args: &'static [&'static str],
    /// Kernel modules the test needs beyond virtio's (with their dependencies).
    pub modules: &'static [&'static str],
    /// The kernel options the test needs beyond every test's and its
    /// interface's ([`crate::kconfig`]): without them it cannot pass. A
    /// module option's module goes in `modules`.
    pub kconfig: &'static [&'static [ConfigOption]],
    /// Host programs the guest runs (found on `PATH`), packed into the
    /// initramfs at `/bin/NAME` with their libraries only when a selected test
    /// needs them.
    pub programs: &'static [&'static str],
    /// Whether the test runs when none are named.
    pub selection: Selection,
    /// How long each boot of the guest may take under TCG before it counts as hung.
    pub timeout: Duration,
    /// How many times the guest boots against the same daemon and disk (1 for
    /// most tests); the guest learns which boot it is from `dmaprobe.boot`.
    pub boots: u8,
    /// A control request (one JSON line) the runner sends to the daemon's
    /// control socket after each boot but the last, e.g. a power cut.
    pub between_boots: Option<&'static str>,
    /// The guest may ask the runner to kill the daemon with SIGKILL and start
    /// it again mid-boot (QEMU is told to reconnect to its socket).
    pub daemon_restarts: bool,
    /// A soak: the guest's workload runs for `--soak-seconds` (told to it as
    /// `dmaprobe.duration`, and added to the timeout), the daemon gets the
    /// fault plan of the run's seed (`soak::fault_plan`), and the runner
    /// samples the daemon's memory and descriptors while it runs.
    pub soak: bool,
    /// It measures time: under `--jobs` it runs with no other test beside it.
    pub alone: bool,
}

const MIB: u64 = 1 << 20;

/// What a test gets unless its entry says otherwise: a raw 64 MiB disk of
/// 512 B blocks, no options, in the default suite, one boot of up to 120 s,
/// beside other tests under `--jobs`.
const BASE: TestSpec = TestSpec {
    name: "",
    summary: "",
    disk: DiskSpec {
        size: 64 * MIB,
        lbs: 512,
        format: None,
    },
    serve_args: &[],
    modules: &[],
    kconfig: &[],
    programs: &[],
    selection: Selection::Default,
    timeout: Duration::from_secs(120),
    boots: 1,
    between_boots: None,
    daemon_restarts: false,
    soak: false,
    alone: false,
};

/// A test on a 64 MiB disk with a mailbox, through which the guest holds and
/// releases its own requests; it needs `kconfig` of the kernel.
const fn mailbox_test(
    name: &'static str,
    summary: &'static str,
    kconfig: &'static [&'static [ConfigOption]],
) -> TestSpec {
    TestSpec {
        name,
        summary,
        serve_args: &["--mailbox"],
        kconfig,
        ..BASE
    }
}

/// A `latency-*` test: the guest times its reads against the media latency
/// preset named in `serve_args` and in the test's name, with mailbox reads
/// (never delayed by the model) as the baseline.
const fn latency_test(
    name: &'static str,
    summary: &'static str,
    serve_args: &'static [&'static str],
) -> TestSpec {
    TestSpec {
        name,
        summary,
        serve_args,
        selection: Selection::Named,
        alone: true,
        ..BASE
    }
}

/// vfat and the code page and character set the guest mounts it with
/// (`codepage=437,iocharset=ascii`, as Debian's kernels default to;
/// `modules.builtin` drops those built in): [`VFAT`]'s options.
const FAT_MODULES: &[&str] = &["vfat", "nls_cp437", "nls_ascii"];

/// A test on a 64 MiB vfat disk with a mailbox: the legacy direct-I/O path;
/// it needs `kconfig` of the kernel ([`VFAT`] among them).
const fn vfat_test(
    name: &'static str,
    summary: &'static str,
    kconfig: &'static [&'static [ConfigOption]],
) -> TestSpec {
    TestSpec {
        name,
        summary,
        disk: DiskSpec {
            size: 64 * MIB,
            lbs: 512,
            format: Some(Fs::Vfat),
        },
        serve_args: &["--mailbox"],
        modules: FAT_MODULES,
        kconfig,
        ..BASE
    }
}

pub const TESTS: &[TestSpec] = &[
    TestSpec {
        name: "smoke",
        summary: "size and block size as configured; O_DIRECT and buffered I/O round trips, \
                  checked in the guest and on the host's backing file",
        disk: DiskSpec {
            size: 256 * MIB,
            lbs: 512,
            format: None,
        },
        ..BASE
    },
    TestSpec {
        name: "ext4",
        summary: "ext4 made on the host: files written and read back with O_DIRECT and \
                  buffered I/O, contents checked on the host, fsck clean",
        disk: DiskSpec {
            size: 256 * MIB,
            lbs: 512,
            format: Some(Fs::Ext4),
        },
        kconfig: &[EXT4, DROP_CACHES],
        ..BASE
    },
    TestSpec {
        name: "delayed-read",
        summary: "the device delays an O_DIRECT read by 1 s: the buffer keeps the program's \
                  bytes while the read is in flight, and holds the data after it",
        serve_args: &["--fault", "op=read,lba=2048,action=delay,ms=1000"],
        ..BASE
    },
    mailbox_test(
        "mailbox-hold",
        "a program holds its own O_DIRECT read through the device mailbox: pending \
                  after 2 s, listed as held, released, the data arrives",
        &[],
    ),
    mailbox_test(
        "dio-read-fork-cow",
        "an O_DIRECT read into part of a page is held while the process forks and \
                  the parent writes elsewhere in the page: the parent must get the data",
        &[PAGEMAP],
    ),
    TestSpec {
        name: "dio-read-fork-cow-ext4",
        summary: "as dio-read-fork-cow, with the O_DIRECT read from a file on ext4",
        disk: DiskSpec {
            size: 64 * MIB,
            lbs: 512,
            format: Some(Fs::Ext4),
        },
        serve_args: &["--mailbox"],
        kconfig: &[EXT4, PAGEMAP],
        ..BASE
    },
    vfat_test(
        "dio-read-fork-cow-vfat",
        "as dio-read-fork-cow, with the O_DIRECT read from a file on vfat: the legacy \
                  direct-I/O code of fs/direct-io.c (fat_direct_IO)",
        &[VFAT, PAGEMAP],
    ),
    mailbox_test(
        "dio-read-fork-cow-child",
        "as dio-read-fork-cow, but the child writes to the page after fork",
        &[PAGEMAP],
    ),
    mailbox_test(
        "dio-read-fork-cow-threads",
        "seven threads read into parts of one page, held across fork; an eighth read \
                  into the last part completes first: every part must get its data",
        &[PAGEMAP],
    ),
    mailbox_test(
        "dio-write-fork",
        "an O_DIRECT write held while the process forks and the child rewrites the page: \
                  the disk must get the parent's data",
        &[],
    ),
    vfat_test(
        "dio-write-fork-vfat",
        "as dio-write-fork, with the O_DIRECT write to a file on vfat (legacy direct I/O)",
        &[VFAT],
    ),
    mailbox_test(
        "dio-unmap-exit",
        "a page under a held O_DIRECT read is unmapped; another process's memory must \
                  stay intact after the release",
        &[],
    ),
    mailbox_test(
        "dio-exit",
        "the process owning a page under a held O_DIRECT read is killed; another \
         process's memory must stay intact after the release",
        &[],
    ),
    mailbox_test(
        "dio-pin-accounting",
        "while the device holds a read and then a write, the pin counter says whether \
                  the kernel pins O_DIRECT pages (a property, reported); the pins must be released",
        &[],
    ),
    mailbox_test(
        "zero-page-write-source",
        "an O_DIRECT write from never-touched memory: the disk holds zeros and the \
                  zero page is not pinned while the device holds the write",
        &[PAGEMAP],
    ),
    mailbox_test(
        "zero-page-read-target",
        "an O_DIRECT read into read-faulted (zero-page) memory: the device is never \
                  told to write the zero page, and the program sees the data",
        &[PAGEMAP],
    ),
    mailbox_test(
        "io-uring-fixed-fork",
        "an io_uring READ_FIXED into a registered buffer is held while the process forks \
         and the parent writes elsewhere in the page: the parent must get the data",
        &[IO_URING, PAGEMAP],
    ),
    mailbox_test(
        "passthru-read-fork-cow",
        "as dio-read-fork-cow, with an NVMe passthrough Read (NVME_IOCTL_IO_CMD); needs \
         --transport nvme",
        &[NVME_PASSTHROUGH, PAGEMAP],
    ),
    mailbox_test(
        "passthru-write-fork",
        "as dio-write-fork, with an NVMe passthrough Write (NVME_IOCTL_IO_CMD); needs \
         --transport nvme",
        &[NVME_PASSTHROUGH, PAGEMAP],
    ),
    mailbox_test(
        "passthru-zero-page-write-source",
        "as zero-page-write-source, with an NVMe passthrough Write (NVME_IOCTL_IO_CMD); \
         needs --transport nvme",
        &[NVME_PASSTHROUGH, PAGEMAP],
    ),
    mailbox_test(
        "passthru-uring-read-fork-cow",
        "as passthru-read-fork-cow, through io_uring (IORING_OP_URING_CMD on /dev/ngXnY); \
         needs --transport nvme",
        &[NVME_PASSTHROUGH, IO_URING, PAGEMAP],
    ),
    TestSpec {
        name: "splice-truncate",
        summary: "splice from an O_DIRECT file on ext4 races with truncate while the device \
                  holds the read: what arrives is the file's data, nothing logged or found",
        disk: DiskSpec {
            size: 64 * MIB,
            lbs: 512,
            format: Some(Fs::Ext4),
        },
        serve_args: &["--mailbox"],
        kconfig: &[EXT4],
        ..BASE
    },
    TestSpec {
        name: "iomap-zeroing-ext4",
        summary: "O_DIRECT 512 B writes into holes, unwritten extents and past EOF in 4 KiB \
                  ext4 blocks: the device sees the zero padding, the files read back, fsck passes",
        disk: DiskSpec {
            size: 64 * MIB,
            lbs: 512,
            format: Some(Fs::Ext4),
        },
        serve_args: &["--mailbox"],
        timeout: Duration::from_secs(180),
        kconfig: &[EXT4, DROP_CACHES],
        ..BASE
    },
    TestSpec {
        name: "iomap-zeroing-xfs",
        summary: "as iomap-zeroing-ext4, on xfs",
        disk: DiskSpec {
            size: 512 * MIB,
            lbs: 512,
            format: Some(Fs::Xfs),
        },
        serve_args: &["--mailbox"],
        modules: &["xfs"],
        timeout: Duration::from_secs(180),
        kconfig: &[XFS, DROP_CACHES],
        ..BASE
    },
    TestSpec {
        name: "dio-zeroing-udf",
        summary: "O_DIRECT 512 B writes past EOF into new 4 KiB UDF blocks (legacy direct I/O): \
                  the padding comes from the zero page, which is not pinned while the device \
                  holds it; the files read back; the host's udfinfo finds the volume closed",
        disk: DiskSpec {
            size: 64 * MIB,
            lbs: 512,
            format: Some(Fs::Udf),
        },
        serve_args: &["--mailbox"],
        modules: &["udf"],
        timeout: Duration::from_secs(180),
        kconfig: &[UDF, PAGEMAP],
        ..BASE
    },
    TestSpec {
        name: "power-cut-ext4",
        summary: "files on ext4 written with and without fsync, the power cut through the \
                  control socket, a second boot on the same disk: the fsync'd file is intact, \
                  fsck clean",
        disk: DiskSpec {
            size: 64 * MIB,
            lbs: 512,
            format: Some(Fs::Ext4),
        },
        serve_args: &["--write-cache", "32M"],
        // Two boots: 15 s on 6.12, 25 s on 6.1 under TCG.
        selection: Selection::Named,
        boots: 2,
        between_boots: Some(r#"{"v":1,"cmd":"power-cut"}"#),
        kconfig: &[EXT4],
        ..BASE
    },
    TestSpec {
        name: "bad-block-ext4",
        summary: "a media error under a file on ext4: its O_DIRECT read fails with EIO \
                  (ENODATA over NVMe), a rewrite of the block clears it, the data reads \
                  back, fsck clean",
        disk: DiskSpec {
            size: 64 * MIB,
            lbs: 512,
            format: Some(Fs::Ext4),
        },
        serve_args: &["--mailbox"],
        kconfig: &[EXT4, DROP_CACHES],
        ..BASE
    },
    TestSpec {
        name: "daemon-restart",
        summary: "O_DIRECT writes with fsync while the host kills the daemon with SIGKILL and \
                  starts it again; QEMU reconnects, the guest writes on, and every record \
                  flushed is in the backing file (runs only when named)",
        serve_args: &["--mailbox"],
        // A check of the device and QEMU, not a verdict on the kernel.
        selection: Selection::Named,
        daemon_restarts: true,
        ..BASE
    },
    TestSpec {
        name: "fio-randread",
        summary: "fio's 4k random read at QD32 on the raw disk for 10 s: IOPS and latency \
                  percentiles as notes, for comparing devices (runs only when named)",
        disk: DiskSpec {
            size: 256 * MIB,
            lbs: 512,
            format: None,
        },
        programs: &["fio"],
        selection: Selection::Named,
        timeout: Duration::from_secs(180),
        kconfig: &[FIO],
        alone: true,
        ..BASE
    },
    TestSpec {
        name: "soak",
        summary: "fio's verified random reads and writes, O_DIRECT and buffered writers with \
                  fsync, and O_DIRECT and io_uring reads across fork, all at once on ext4 for \
                  --soak-seconds under fault rules from the seed; the daemon's memory and fds \
                  sampled (runs only when named)",
        disk: DiskSpec {
            size: 512 * MIB,
            lbs: 512,
            format: Some(Fs::Ext4),
        },
        // The fault plan and --seed come from soak::fault_plan. The ledger
        // ring is small enough to fill early in the soak (about 40 s at the
        // 200 requests/s of TCG), so that the daemon's memory can level off;
        // the sampler counts findings the ring drops.
        serve_args: &[
            "--mailbox",
            "--canary",
            "--snapshot",
            "--ledger-capacity",
            "8192",
        ],
        programs: &["fio"],
        selection: Selection::Named,
        // Boot, fio's file, unmount and power-off; the workload's time is added.
        timeout: Duration::from_secs(180),
        soak: true,
        alone: true,
        kconfig: &[EXT4, FIO, FADVISE],
        ..BASE
    },
    latency_test(
        "latency-instant",
        "O_DIRECT 4k random and 128k sequential reads at QD1 with no media latency: \
         p50/p99/mean as notes, the baseline of the other latency tests (runs only when named)",
        &["--mailbox", "--latency", "instant"],
    ),
    latency_test(
        "latency-nvme",
        "as latency-instant against the nvme latency preset: the reads take at least what \
         the model says, and the time is the device's (runs only when named)",
        &["--mailbox", "--latency", "nvme"],
    ),
    latency_test(
        "latency-sata",
        "as latency-nvme, against the sata latency preset (runs only when named)",
        &["--mailbox", "--latency", "sata"],
    ),
    TestSpec {
        name: "selftest-fail",
        summary: "fails on purpose (checks the pattern against the wrong seed), to show how \
                  a FAIL is reported",
        selection: Selection::Selftest,
        ..BASE
    },
    TestSpec {
        name: "selftest-hang",
        summary: "never finishes, to show how a hung guest is reported",
        selection: Selection::Selftest,
        timeout: Duration::from_secs(45),
        ..BASE
    },
];

impl TestSpec {
    /// How long each boot may take: the timeout, times `scale` on a slow
    /// machine, plus the workload's `soak_seconds` for a soak.
    pub fn boot_timeout(&self, scale: f64, soak_seconds: u64) -> Duration {
        let soak = if self.soak { soak_seconds } else { 0 };
        Duration::from_secs_f64(self.timeout.as_secs_f64() * scale) + Duration::from_secs(soak)
    }

    /// What the test needs of dmaprobe itself, which another vhost-user-blk
    /// backend (qemu-storage-daemon) lacks: its `dmaprobe serve` options
    /// (fault rules, the mailbox), or `None` when any backend will do.
    pub fn dmaprobe_features(&self) -> Option<String> {
        let mut features = self.serve_args.join(" ");
        if let Some(request) = self.between_boots {
            if !features.is_empty() {
                features.push_str(", ");
            }
            features.push_str(&format!("between boots: {request}"));
        }
        (!features.is_empty()).then_some(features)
    }
}

pub fn find(name: &str) -> Option<&'static TestSpec> {
    TESTS.iter().find(|t| t.name == name)
}

/// The tests `dmaprobe run` runs when none are named.
pub fn default_tests() -> Vec<&'static TestSpec> {
    TESTS
        .iter()
        .filter(|t| t.selection == Selection::Default)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_runs_only_when_named_and_default_runs_do_not_pack_it() {
        let fio = find("fio-randread").unwrap();
        assert_eq!(fio.programs, ["fio"]);
        assert_eq!(fio.dmaprobe_features(), None);
        let defaults = default_tests();
        assert!(!defaults.iter().any(|t| t.name == fio.name));
        assert!(defaults.iter().all(|t| t.programs.is_empty()));
        assert!(!defaults.iter().any(|t| t.name.starts_with("selftest")));
    }

    #[test]
    fn tests_that_need_dmaprobe_say_what_for() {
        assert_eq!(find("smoke").unwrap().dmaprobe_features(), None);
        assert_eq!(find("ext4").unwrap().dmaprobe_features(), None);
        assert_eq!(
            find("mailbox-hold").unwrap().dmaprobe_features().as_deref(),
            Some("--mailbox")
        );
        let delayed = find("delayed-read").unwrap().dmaprobe_features().unwrap();
        assert!(delayed.starts_with("--fault op=read"), "{delayed}");
    }

    #[test]
    fn latency_tests_run_only_when_named_against_the_preset_they_name() {
        for preset in ["instant", "nvme", "sata"] {
            let t = find(&format!("latency-{preset}")).unwrap();
            assert_eq!(t.selection, Selection::Named);
            assert!(t.serve_args.ends_with(&["--latency", preset]), "{t:?}");
            assert!(t.serve_args.contains(&"--mailbox"), "{t:?}");
            assert!(nvme_model::LatencySpec::preset(preset).is_some());
        }
    }

    #[test]
    fn multi_boot_tests_say_what_happens_between_boots() {
        for t in TESTS {
            assert!(t.boots >= 1, "{}", t.name);
            assert_eq!(t.between_boots.is_some(), t.boots > 1, "{}", t.name);
        }
        let cut = find("power-cut-ext4").unwrap();
        assert_eq!(cut.boots, 2);
        let request: serde_json::Value = serde_json::from_str(cut.between_boots.unwrap()).unwrap();
        assert_eq!(request["cmd"], "power-cut");
        let features = cut.dmaprobe_features().unwrap();
        assert!(features.contains("between boots: "), "{features}");
    }

    #[test]
    fn only_the_soak_is_timed_and_its_timeout_grows_with_it() {
        let soak = find("soak").unwrap();
        assert!(soak.soak && soak.selection == Selection::Named);
        assert_eq!(soak.programs, ["fio"]);
        for check in ["--canary", "--snapshot", "--mailbox"] {
            assert!(soak.serve_args.contains(&check), "{check}");
        }
        assert_eq!(
            soak.boot_timeout(1.0, 600),
            soak.timeout + Duration::from_secs(600)
        );
        assert_eq!(
            soak.boot_timeout(2.0, 60),
            soak.timeout * 2 + Duration::from_secs(60)
        );
        for t in TESTS.iter().filter(|t| t.name != "soak") {
            assert!(!t.soak, "{}", t.name);
            assert_eq!(
                t.boot_timeout(1.5, 600),
                t.timeout.mul_f64(1.5),
                "{}",
                t.name
            );
        }
    }

    #[test]
    fn names_are_unique() {
        for (i, t) in TESTS.iter().enumerate() {
            assert!(
                TESTS[i + 1..].iter().all(|u| u.name != t.name),
                "{}",
                t.name
            );
        }
    }
}
