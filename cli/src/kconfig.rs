//! `dmaprobe kconfig`: the kernel options the guest suite needs, as a config
//! fragment, or a kernel's config checked against them
//! ([`guest_tests::kconfig`]).

use std::path::{Path, PathBuf};

use clap::Args;
use guest_tests::kconfig::{self, Found, KconfigError, KernelConfig, Needer};
use guest_tests::suite::{TestSpec, TESTS};

#[derive(Debug, Args)]
pub struct KconfigArgs {
    /// Check this kernel config (a build tree's .config, or Debian's
    /// /boot/config-RELEASE) instead of printing the fragment: each option it
    /// lacks, with the tests that need it.
    #[arg(long, value_name = "FILE")]
    pub check: Option<PathBuf>,
}

/// Runs `dmaprobe kconfig`: prints the fragment, or checks `--check`'s
/// config; `Ok(false)` when that lacks an option.
pub fn run(args: KconfigArgs) -> Result<bool, KconfigError> {
    let tests: Vec<&'static TestSpec> = TESTS.iter().collect();
    match args.check {
        None => {
            print!("{}", kconfig::fragment(&tests));
            Ok(true)
        }
        Some(path) => {
            let config = KernelConfig::read(&path)?;
            let (report, complete) = check(&path, &config, &tests);
            print!("{report}");
            Ok(complete)
        }
    }
}

/// What `config` (read from `path`) lacks of what `tests` need, one line per
/// option, and whether it lacks nothing.
pub fn check(path: &Path, config: &KernelConfig, tests: &[&'static TestSpec]) -> (String, bool) {
    let total = kconfig::options(tests).len();
    let missing = kconfig::missing(config, tests);
    let mut out = String::new();
    for (lack, needers) in &missing {
        let state = match lack.found {
            Found::Module => format!("CONFIG_{}=m, must be built in", lack.name),
            Found::NotSet | Found::Absent | Found::BuiltIn => format!("{lack} is not set"),
        };
        let who: Vec<String> = needers.iter().map(Needer::to_string).collect();
        out += &format!("{state} ({}): {}\n", lack.option.why, who.join(", "));
    }
    if missing.is_empty() {
        out += &format!(
            "{}: has every option the suite needs ({total})\n",
            path.display()
        );
    } else {
        out += &format!(
            "{}: lacks {} of the {total} options the suite needs; dmaprobe run skips \
             the tests named when it finds this config beside the kernel\n",
            path.display(),
            missing.len()
        );
    }
    (out, missing.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_each_missing_option_and_the_tests_that_need_it() {
        let tests: Vec<&'static TestSpec> = TESTS.iter().collect();
        let full = kconfig::fragment(&tests);
        let path = Path::new("/k/.config");
        let (report, complete) = check(path, &KernelConfig::parse(&full), &tests);
        assert!(complete, "{report}");
        assert_eq!(report.lines().count(), 1, "{report}");
        assert!(report.contains("has every option"), "{report}");

        let lacking = full
            .replace("CONFIG_UDF_FS=y", "# CONFIG_UDF_FS is not set")
            .replace("CONFIG_BLK_DEV_NVME=y", "CONFIG_BLK_DEV_NVME=m");
        let (report, complete) = check(path, &KernelConfig::parse(&lacking), &tests);
        assert!(!complete);
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.len(), 3, "{report}");
        assert!(
            lines[0].starts_with("CONFIG_BLK_DEV_NVME=m, must be built in (the nvme driver"),
            "{report}"
        );
        assert!(
            lines[0].ends_with(
                ": every test over nvme, passthru-read-fork-cow, passthru-write-fork, \
                 passthru-zero-page-write-source, passthru-uring-read-fork-cow"
            ),
            "{report}"
        );
        assert!(
            lines[1].starts_with("CONFIG_UDF_FS is not set (UDF): dio-zeroing-udf"),
            "{report}"
        );
        assert!(lines[2].contains("lacks 2 of the"), "{report}");
    }
}
