//! The kernel options the guest suite needs, and a kernel's config checked
//! against them.
//!
//! Each test names what it needs of the kernel beside its other needs, in
//! [`TestSpec::kconfig`](crate::suite::TestSpec), from the groups here; what
//! every test needs is [`EVERY_TEST`], and what every test over an interface
//! needs is in [`INTERFACES`]. An option is listed when a test cannot pass,
//! or cannot be judged, without it; what a test only uses where the kernel
//! has it (the soak's io_uring loop, the frames it reads from pagemap) is not.
//!
//! - [`options`]: the options, in groups, that tests name (a leaf the suite
//!   imports, so that the suite and this module do not import each other).
//! - [`fragment`]: every option, for the kernel's
//!   `scripts/kconfig/merge_config.sh`, with who needs each.
//! - [`KernelConfig`]: a `.config` (or Debian's `config-RELEASE`) read;
//!   [`missing`] says which options it lacks and which tests need them,
//!   [`skip_reason`] why one test cannot run on it.
//! - [`find_config`]: a kernel's config, where it lies beside the image or
//!   the modules.
//!
//! What needs no option: O_DIRECT on a block device and on each file system;
//! FIBMAP and FIGETBSZ; splice, fallocate, fork; the pin counters
//! (`nr_foll_pin_acquired`/`_released` in /proc/vmstat, from 5.7 on, beside
//! PROC_FS); the NVMe passthrough ioctls and the generic character device
//! `/dev/ngXnY` (part of the nvme driver, from 5.13 on) and io_uring's
//! `URING_CMD` on it (from 5.19 on). A kernel too old for one of them has the
//! option and lacks the feature: the guest skips those tests itself.

pub mod options;

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::kernel::{Kernel, Modules};
use crate::suite::TestSpec;

use options::*;

/// Who needs an option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needer {
    EveryTest,
    /// Every test over the interface of this name (`virtio-blk`, `nvme`).
    EveryTestOver(&'static str),
    Test(&'static str),
}

impl fmt::Display for Needer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Needer::EveryTest => f.write_str("every test"),
            Needer::EveryTestOver(interface) => write!(f, "every test over {interface}"),
            Needer::Test(name) => f.write_str(name),
        }
    }
}

/// What the options of an interface are: those of [`INTERFACES`] by its
/// name, none for a name it lacks.
fn interface(name: &str) -> &'static [ConfigOption] {
    INTERFACES
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(&[], |(_, options)| options)
}

/// Each needer with its options: every test, every test over each
/// interface, then `tests` in order.
fn needs<'a>(
    tests: &'a [&'static TestSpec],
) -> impl Iterator<Item = (Needer, &'static ConfigOption)> + 'a {
    let every = EVERY_TEST.iter().map(|o| (Needer::EveryTest, o));
    let over = INTERFACES.iter().flat_map(|&(name, options)| {
        options
            .iter()
            .map(move |o| (Needer::EveryTestOver(name), o))
    });
    let own = tests.iter().flat_map(|t| {
        t.kconfig
            .iter()
            .flat_map(|group| group.iter())
            .map(|o| (Needer::Test(t.name), o))
    });
    every.chain(over).chain(own)
}

/// Every option `tests` need (with every test's and every interface's), each
/// once, in the order first needed, with all who need it.
pub fn options(tests: &[&'static TestSpec]) -> Vec<(&'static ConfigOption, Vec<Needer>)> {
    let mut out: Vec<(&'static ConfigOption, Vec<Needer>)> = Vec::new();
    for (needer, option) in needs(tests) {
        match out.iter_mut().find(|(o, _)| o.name == option.name) {
            Some((_, needers)) if !needers.contains(&needer) => needers.push(needer),
            Some(_) => {}
            None => out.push((option, vec![needer])),
        }
    }
    out
}

/// How wide the fragment's comment lines may grow.
const FRAGMENT_WIDTH: usize = 78;

/// Every option `tests` need as a config fragment for the kernel's
/// `scripts/kconfig/merge_config.sh`: `CONFIG_X=y` lines, each under a
/// comment saying what it is for and who needs it.
pub fn fragment(tests: &[&'static TestSpec]) -> String {
    let mut out = String::from(
        "# The kernel options dmaprobe's guest suite needs (dmaprobe kconfig).\n\
         #\n\
         # Merge them into a kernel's config, in its source tree:\n\
         #   scripts/kconfig/merge_config.sh .config dmaprobe.config\n\
         # Each is given =y. Where a comment says \"=m will do\", a module works\n\
         # too when dmaprobe run is given the kernel's modules (--modules): the\n\
         # initramfs loads it. The others must be built in.\n\
         # Check a config: dmaprobe kconfig --check .config\n",
    );
    for (option, needers) in options(tests) {
        out.push('\n');
        let who: Vec<String> = needers.iter().map(Needer::to_string).collect();
        let mut needed = format!("needed by {}", who.join(", "));
        if !option.built_in {
            needed.push_str("; =m will do");
        }
        if let Some(later) = option.renamed {
            needed.push_str(&format!("; {later} in kernels that renamed it"));
        }
        out.push_str(&wrap_comment(option.why));
        out.push_str(&wrap_comment(&needed));
        for name in std::iter::once(option.name).chain(option.renamed) {
            out.push_str(&format!("CONFIG_{name}=y\n"));
        }
    }
    out
}

/// `text` as `#` comment lines of at most [`FRAGMENT_WIDTH`] characters
/// where its words allow, the later ones indented.
fn wrap_comment(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 4 && line.len() + 1 + word.len() > FRAGMENT_WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#  ");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

#[derive(Debug, thiserror::Error)]
pub enum KconfigError {
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} has no CONFIG_ lines: is it a kernel's .config?")]
    NotAConfig(PathBuf),
}

/// What a config says of an option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// `=y`.
    BuiltIn,
    /// `=m`.
    Module,
    /// `# CONFIG_X is not set`, or `=n`.
    NotSet,
    /// Not mentioned: its dependencies are off, or the kernel has no such option.
    Absent,
}

/// A kernel's config, read from a `.config` or Debian's `config-RELEASE`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// Each option mentioned, by its name without `CONFIG_`.
    options: HashMap<String, Found>,
}

impl KernelConfig {
    pub fn read(path: &Path) -> Result<KernelConfig, KconfigError> {
        let text = fs::read(path).map_err(|e| KconfigError::Read(path.to_owned(), e))?;
        let config = Self::parse(&String::from_utf8_lossy(&text));
        if config.options.is_empty() {
            return Err(KconfigError::NotAConfig(path.to_owned()));
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> KernelConfig {
        let options = text
            .lines()
            .filter_map(|line| {
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("# CONFIG_") {
                    let name = rest.strip_suffix(" is not set")?;
                    return Some((name.to_owned(), Found::NotSet));
                }
                let (name, value) = line.strip_prefix("CONFIG_")?.split_once('=')?;
                let found = match value.trim() {
                    "y" => Found::BuiltIn,
                    "m" => Found::Module,
                    _ => Found::NotSet,
                };
                Some((name.to_owned(), found))
            })
            .collect();
        KernelConfig { options }
    }

    /// What the config says of `option`, and the name it says it by: the
    /// first of its names the config mentions (the old name first, for a
    /// kernel that has both may give the new name another meaning).
    pub fn found(&self, option: &ConfigOption) -> (&'static str, Found) {
        std::iter::once(option.name)
            .chain(option.renamed)
            .find_map(|name| Some((name, *self.options.get(name)?)))
            .unwrap_or((option.name, Found::Absent))
    }

    /// How the config falls short of `option`, if it does.
    pub fn lack(&self, option: &'static ConfigOption) -> Option<Lack> {
        let (name, found) = self.found(option);
        let short = match found {
            Found::BuiltIn => false,
            Found::Module => option.built_in,
            Found::NotSet | Found::Absent => true,
        };
        short.then_some(Lack {
            option,
            name,
            found,
        })
    }
}

/// An option a config lacks, or has as a module where it must be built in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lack {
    pub option: &'static ConfigOption,
    /// The name the config knows it by.
    pub name: &'static str,
    pub found: Found,
}

impl fmt::Display for Lack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CONFIG_{}", self.name)?;
        match (self.found, self.option.renamed) {
            (Found::Module, _) => f.write_str(" (=m, must be =y)"),
            (Found::Absent, Some(later)) => write!(f, " (or CONFIG_{later})"),
            _ => Ok(()),
        }
    }
}

/// The options of `tests` (with every test's and every interface's) that
/// `config` lacks, each with who needs it.
pub fn missing(config: &KernelConfig, tests: &[&'static TestSpec]) -> Vec<(Lack, Vec<Needer>)> {
    options(tests)
        .into_iter()
        .filter_map(|(option, needers)| Some((config.lack(option)?, needers)))
        .collect()
}

/// Why `test` cannot run over `interface` (`virtio-blk`, `nvme`) on a kernel
/// of `config`: the options it lacks and who needs them, each named once,
/// e.g. "the kernel's config lacks CONFIG_UDF_FS (needed by
/// dio-zeroing-udf)"; `None` if it lacks none.
pub fn skip_reason(
    config: &KernelConfig,
    test: &'static TestSpec,
    interface: &'static str,
) -> Option<String> {
    let groups: [(Needer, Vec<&'static ConfigOption>); 3] = [
        (Needer::EveryTest, EVERY_TEST.iter().collect()),
        (
            Needer::EveryTestOver(interface),
            self::interface(interface).iter().collect(),
        ),
        (
            Needer::Test(test.name),
            test.kconfig.iter().flat_map(|g| g.iter()).collect(),
        ),
    ];
    let mut seen: Vec<&str> = Vec::new();
    let mut parts = Vec::new();
    for (who, options) in groups {
        let mut lacks = Vec::new();
        for option in options {
            if seen.contains(&option.name) {
                continue;
            }
            seen.push(option.name);
            lacks.extend(config.lack(option).map(|l| l.to_string()));
        }
        if !lacks.is_empty() {
            parts.push(format!("{} (needed by {who})", lacks.join(", ")));
        }
    }
    (!parts.is_empty()).then(|| format!("the kernel's config lacks {}", parts.join("; ")))
}

/// The config of `kernel`, where one lies beside it, in the order looked for:
///
/// - the file a cached kernel's `kernel.env` names (`CONFIG=relative/path`);
/// - `.config` at the top of a build tree whose `arch/ARCH/boot/` holds the
///   image, or beside the image (a `vmlinux` at the top);
/// - Debian's `config-RELEASE`, or `boot/config-RELEASE`, in the image's
///   directory or the one above (`ROOT/boot/vmlinuz-RELEASE`, a cached
///   kernel's `ROOT/vmlinuz`), for the kernel's release or the one the
///   image's name carries;
/// - in the modules directory: `.config` (a build tree's own modules are the
///   tree) or `config` (Debian's 7.x packages); or `boot/config-RELEASE` of
///   the root that holds `lib/modules/RELEASE` or `usr/lib/modules/RELEASE`.
///
/// The image's path is taken as given, then with its links resolved.
pub fn find_config(kernel: &Kernel) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    let images = std::iter::once(kernel.image.clone()).chain(fs::canonicalize(&kernel.image).ok());
    for image in images {
        let dir = image
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_owned);
        if let Some(config) =
            crate::catalogue::cached_env(&dir).and_then(|mut e| e.remove("CONFIG"))
        {
            candidates.push(dir.join(config));
        }
        if let Some(top) = build_tree_top(&image) {
            candidates.push(top.join(".config"));
        }
        candidates.push(dir.join(".config"));
        let from_name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .and_then(|n| {
                ["vmlinuz-", "vmlinux-", "bzImage-"]
                    .iter()
                    .find_map(|p| n.strip_prefix(p).map(str::to_owned))
            });
        for release in kernel.release.iter().chain(from_name.iter()) {
            for root in [Some(dir.as_path()), dir.parent()].into_iter().flatten() {
                candidates.push(root.join(format!("config-{release}")));
                candidates.push(root.join("boot").join(format!("config-{release}")));
            }
        }
    }
    if let Some(modules) = kernel.modules.as_ref().map(Modules::dir) {
        // A build tree's own modules are the tree.
        candidates.push(modules.join(".config"));
        candidates.push(modules.join("config"));
        if let Some(release) = modules.file_name() {
            let config = format!("config-{}", release.to_string_lossy());
            // ROOT/lib/modules/RELEASE, ROOT/usr/lib/modules/RELEASE.
            for root in [modules.ancestors().nth(3), modules.ancestors().nth(4)]
                .into_iter()
                .flatten()
            {
                candidates.push(root.join("boot").join(&config));
            }
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The top of the build tree whose `arch/ARCH/boot/` holds `image`.
fn build_tree_top(image: &Path) -> Option<&Path> {
    let boot = image.parent()?;
    let arch = boot.parent()?.parent()?;
    (boot.file_name()? == "boot" && arch.file_name()? == "arch").then(|| arch.parent())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::TESTS;

    fn all() -> Vec<&'static TestSpec> {
        TESTS.iter().collect()
    }

    fn find(name: &str) -> &'static TestSpec {
        crate::suite::find(name).unwrap()
    }

    /// Every option of the suite built in: a config that lacks nothing.
    fn full_config() -> String {
        options(&all())
            .iter()
            .map(|(o, _)| format!("CONFIG_{}=y\n", o.name))
            .collect()
    }

    /// `full_config` with `drop` left out and `replace` lines added.
    fn config_without(drop: &[&str], add: &str) -> KernelConfig {
        let text: String = full_config()
            .lines()
            .filter(|l| !drop.iter().any(|d| *l == format!("CONFIG_{d}=y")))
            .map(|l| format!("{l}\n"))
            .collect();
        KernelConfig::parse(&format!("{text}{add}"))
    }

    #[test]
    fn the_fragment_sets_every_option_of_every_test_and_interface() {
        let fragment = fragment(&all());
        let set = KernelConfig::parse(&fragment);
        let groups = TESTS
            .iter()
            .flat_map(|t| t.kconfig.iter().copied())
            .chain([EVERY_TEST])
            .chain(INTERFACES.iter().map(|(_, o)| *o));
        for option in groups.flatten() {
            for name in std::iter::once(option.name).chain(option.renamed) {
                assert!(
                    fragment.lines().any(|l| l == format!("CONFIG_{name}=y")),
                    "{name}"
                );
            }
            assert_eq!(set.lack(option), None, "{}", option.name);
        }
        // merge_config.sh reads every line that starts with CONFIG_ or
        // "# CONFIG_" as a setting: the comments must not.
        for line in fragment.lines().filter(|l| l.starts_with('#')) {
            assert!(!line.starts_with("# CONFIG_"), "{line}");
        }
        assert!(fragment.contains("dio-zeroing-udf"), "{fragment}");
    }

    #[test]
    fn the_fragment_says_who_needs_each_option_and_which_may_be_modules() {
        let fragment = fragment(&all());
        let comment_above = |setting: &str| {
            let lines: Vec<&str> = fragment.lines().collect();
            let at = lines.iter().position(|l| *l == setting).unwrap();
            let start = lines[..at]
                .iter()
                .rposition(|l| l.is_empty())
                .map_or(0, |i| i + 1);
            lines[start..at].join(" ")
        };
        let udf = comment_above("CONFIG_UDF_FS=y");
        assert!(
            udf.contains("dio-zeroing-udf") && udf.contains("=m will do"),
            "{udf}"
        );
        let ext4 = comment_above("CONFIG_EXT4_FS=y");
        assert!(
            ext4.contains("built in") && !ext4.contains("=m will do"),
            "{ext4}"
        );
        assert!(
            ext4.contains("splice-truncate") && ext4.contains("soak"),
            "{ext4}"
        );
        let nvme = comment_above("CONFIG_BLK_DEV_NVME=y");
        assert!(nvme.contains("every test over nvme"), "{nvme}");
        assert!(nvme.contains("passthru-uring-read-fork-cow"), "{nvme}");
        assert!(comment_above("CONFIG_DEVTMPFS=y").contains("every test"));
        assert!(fragment
            .lines()
            .all(|l| l.len() <= FRAGMENT_WIDTH || !l.contains(' ')));
    }

    #[test]
    fn an_option_is_the_same_wherever_it_is_listed() {
        let groups = TESTS
            .iter()
            .flat_map(|t| t.kconfig.iter().copied())
            .chain([EVERY_TEST])
            .chain(INTERFACES.iter().map(|(_, o)| *o));
        let mut seen: HashMap<&str, &ConfigOption> = HashMap::new();
        for option in groups.flatten() {
            let first = seen.entry(option.name).or_insert(option);
            assert_eq!(*first, option);
        }
    }

    #[test]
    fn a_test_that_may_have_a_module_packs_modules() {
        // An option =m satisfies must be loaded by someone: the initramfs
        // loads the test's modules.
        for t in TESTS {
            let module_ok = t.kconfig.iter().flat_map(|g| g.iter()).any(|o| !o.built_in);
            assert!(!module_ok || !t.modules.is_empty(), "{}", t.name);
        }
    }

    #[test]
    fn a_config_is_read_from_its_settings_and_not_set_lines() {
        let c = KernelConfig::parse(
            "# comment\nCONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x\"\nCONFIG_E=n\n",
        );
        let option = |name| module_ok(name, "");
        assert_eq!(c.found(&option("A")), ("A", Found::BuiltIn));
        assert_eq!(c.found(&option("B")), ("B", Found::Module));
        assert_eq!(c.found(&option("C")), ("C", Found::NotSet));
        assert_eq!(c.found(&option("D")), ("D", Found::NotSet));
        assert_eq!(c.found(&option("E")), ("E", Found::NotSet));
        assert_eq!(c.found(&option("F")), ("F", Found::Absent));
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("bzImage");
        fs::write(&image, b"\x7fELF not a config").unwrap();
        assert!(matches!(
            KernelConfig::read(&image),
            Err(KconfigError::NotAConfig(_))
        ));
    }

    #[test]
    fn a_module_will_not_do_where_the_option_must_be_built_in() {
        let c = KernelConfig::parse("CONFIG_UDF_FS=m\nCONFIG_EXT4_FS=m\n");
        assert_eq!(c.lack(&UDF[0]), None);
        let lack = c.lack(&EXT4[0]).unwrap();
        assert_eq!(lack.found, Found::Module);
        assert_eq!(lack.to_string(), "CONFIG_EXT4_FS (=m, must be =y)");
    }

    #[test]
    fn a_renamed_option_is_looked_for_by_the_name_the_config_knows() {
        let sysctl = &DROP_CACHES[0];
        // 7.x: only the new name.
        let new = KernelConfig::parse("CONFIG_SYSCTL=y\n");
        assert_eq!(new.lack(sysctl), None);
        // 6.x: SYSCTL is set by other options; PROC_SYSCTL decides.
        let old = KernelConfig::parse("CONFIG_SYSCTL=y\n# CONFIG_PROC_SYSCTL is not set\n");
        assert_eq!(old.lack(sysctl).unwrap().name, "PROC_SYSCTL");
        let neither = KernelConfig::parse("CONFIG_A=y\n");
        assert_eq!(
            neither.lack(sysctl).unwrap().to_string(),
            "CONFIG_PROC_SYSCTL (or CONFIG_SYSCTL)"
        );
    }

    #[test]
    fn check_names_the_tests_a_missing_option_would_skip() {
        let full = config_without(&[], "");
        assert!(missing(&full, &all()).is_empty());
        let c = config_without(&["UDF_FS", "VFAT_FS"], "# CONFIG_VFAT_FS is not set\n");
        let lacks = missing(&c, &all());
        let names: Vec<(String, Vec<String>)> = lacks
            .iter()
            .map(|(l, n)| (l.to_string(), n.iter().map(Needer::to_string).collect()))
            .collect();
        assert_eq!(
            names,
            [
                (
                    "CONFIG_VFAT_FS".to_owned(),
                    vec![
                        "dio-read-fork-cow-vfat".to_owned(),
                        "dio-write-fork-vfat".to_owned()
                    ]
                ),
                (
                    "CONFIG_UDF_FS".to_owned(),
                    vec!["dio-zeroing-udf".to_owned()]
                ),
            ]
        );
        let c = config_without(&["DEVTMPFS", "BLK_DEV_NVME"], "CONFIG_BLK_DEV_NVME=m\n");
        let lacks = missing(&c, &all());
        assert_eq!(lacks[0].0.name, "DEVTMPFS");
        assert_eq!(lacks[0].1, [Needer::EveryTest]);
        assert_eq!(lacks[1].0.found, Found::Module);
        assert_eq!(lacks[1].1[0], Needer::EveryTestOver("nvme"));
        assert!(lacks[1].1.contains(&Needer::Test("passthru-read-fork-cow")));
    }

    #[test]
    fn a_test_skips_for_its_own_options_its_interfaces_and_every_tests() {
        let c = config_without(&["UDF_FS"], "");
        let udf = find("dio-zeroing-udf");
        assert_eq!(
            skip_reason(&c, udf, "virtio-blk").as_deref(),
            Some("the kernel's config lacks CONFIG_UDF_FS (needed by dio-zeroing-udf)")
        );
        assert_eq!(skip_reason(&c, find("smoke"), "virtio-blk"), None);
        assert_eq!(skip_reason(&c, find("smoke"), "nvme"), None);

        let c = config_without(&["VIRTIO_BLK", "UDF_FS", "BLK_DEV_NVME"], "");
        assert_eq!(
            skip_reason(&c, udf, "virtio-blk").as_deref(),
            Some(
                "the kernel's config lacks CONFIG_VIRTIO_BLK (needed by every test over \
                 virtio-blk); CONFIG_UDF_FS (needed by dio-zeroing-udf)"
            )
        );
        assert_eq!(
            skip_reason(&c, find("smoke"), "nvme").as_deref(),
            Some("the kernel's config lacks CONFIG_BLK_DEV_NVME (needed by every test over nvme)")
        );
        // Named once, by the first who needs it.
        let passthru = find("passthru-read-fork-cow");
        assert_eq!(
            skip_reason(&c, passthru, "nvme").as_deref(),
            Some("the kernel's config lacks CONFIG_BLK_DEV_NVME (needed by every test over nvme)")
        );
        assert_eq!(
            skip_reason(&c, passthru, "virtio-blk").as_deref(),
            Some(
                "the kernel's config lacks CONFIG_VIRTIO_BLK (needed by every test over \
                 virtio-blk); CONFIG_BLK_DEV_NVME (needed by passthru-read-fork-cow)"
            )
        );
        let c = config_without(&["BINFMT_SCRIPT"], "");
        assert_eq!(
            skip_reason(&c, find("smoke"), "virtio-blk").as_deref(),
            Some("the kernel's config lacks CONFIG_BINFMT_SCRIPT (needed by every test)")
        );
    }

    fn kernel(image: &Path, modules: Option<&Path>, release: Option<&str>) -> Kernel {
        Kernel {
            name: "k".into(),
            image: image.to_owned(),
            modules: modules.map(|m| Modules::Indexed(m.to_owned())),
            release: release.map(str::to_owned),
        }
    }

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"CONFIG_A=y\n").unwrap();
    }

    #[test]
    fn a_build_trees_config_is_found_at_its_top() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("linux/arch/x86/boot/bzImage");
        touch(&image);
        assert_eq!(find_config(&kernel(&image, None, None)), None);
        touch(&dir.path().join("linux/.config"));
        assert_eq!(
            find_config(&kernel(&image, None, None)),
            Some(dir.path().join("linux/.config"))
        );
        let vmlinux = dir.path().join("linux/vmlinux");
        touch(&vmlinux);
        assert_eq!(
            find_config(&kernel(&vmlinux, None, None)),
            Some(dir.path().join("linux/.config"))
        );
    }

    #[test]
    fn a_debian_kernels_config_is_found_by_its_release() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("k");
        let release = "6.12.1-cloud-amd64";
        let image = root.join(format!("boot/vmlinuz-{release}"));
        touch(&image);
        std::os::unix::fs::symlink(format!("boot/vmlinuz-{release}"), root.join("vmlinuz"))
            .unwrap();
        let modules = root.join("lib/modules").join(release);
        fs::create_dir_all(&modules).unwrap();
        let config = root.join(format!("boot/config-{release}"));
        touch(&config);
        // The image by its own name, or by the cache's link to it.
        assert_eq!(
            find_config(&kernel(&image, None, None)),
            Some(config.clone())
        );
        let link = root.join("vmlinuz");
        assert_eq!(
            find_config(&kernel(&link, None, Some(release))),
            Some(config.clone())
        );
        // An image elsewhere, with the root's modules.
        let elsewhere = dir.path().join("bzImage");
        touch(&elsewhere);
        assert_eq!(
            find_config(&kernel(&elsewhere, Some(&modules), None)),
            Some(config.clone())
        );
        // 7.x: the config in the modules directory.
        fs::remove_file(&config).unwrap();
        assert_eq!(find_config(&kernel(&elsewhere, Some(&modules), None)), None);
        touch(&modules.join("config"));
        assert_eq!(
            find_config(&kernel(&elsewhere, Some(&modules), None)),
            Some(modules.join("config"))
        );
    }

    #[test]
    fn a_cached_kernels_env_names_its_config_first() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vmlinuz");
        touch(&image);
        touch(&dir.path().join("boot/config-7.3.4"));
        touch(&dir.path().join("lib/modules/7.3.4/config"));
        fs::write(
            dir.path().join("kernel.env"),
            "RELEASE=7.3.4\nVMLINUZ=vmlinuz\nCONFIG=lib/modules/7.3.4/config\n",
        )
        .unwrap();
        assert_eq!(
            find_config(&kernel(&image, None, Some("7.3.4"))),
            Some(dir.path().join("lib/modules/7.3.4/config"))
        );
    }
}
