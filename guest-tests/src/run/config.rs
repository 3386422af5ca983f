//! What a run is asked to do: [`RunConfig`], and the choices in it: the
//! [`Transport`] the guest reaches the disk by, the [`Daemon`] that serves
//! it, a [`Mutant`] device.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::accel::Accel;
use super::logs::path_component;
use crate::initramfs::VIRTIO_BLK_MODULES;
use crate::kernel::Kernel;
use crate::suite::TestSpec;

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The kernels, in the reports' order; two of one name are told apart
    /// ([`distinct_names`]).
    pub kernels: Vec<Kernel>,
    pub tests: Vec<&'static TestSpec>,
    /// The `dmaprobe` executable that serves the disk.
    pub dmaprobe: PathBuf,
    /// Which backend serves the disk.
    pub daemon: Daemon,
    pub guest_bin: PathBuf,
    /// Host programs the selected tests run in the guest (packed into the initramfs).
    pub programs: Vec<PathBuf>,
    pub busybox: PathBuf,
    pub qemu: PathBuf,
    /// A QEMU with `vfio-user-pci` (10.1 or later), for the NVMe transport.
    pub qemu_nvme: PathBuf,
    /// The transports to run the tests over, one pass each.
    pub transports: Vec<Transport>,
    pub queues: u16,
    pub seed: u64,
    /// Keep each run's console, events and daemon log here.
    pub keep_logs: Option<PathBuf>,
    /// Multiplies every test's timeout (slow machines).
    pub timeout_scale: f64,
    /// Run against a deliberately broken device.
    pub mutant: Option<Mutant>,
    /// Where the SVG timelines of failed tests go.
    pub timelines: Option<PathBuf>,
    /// How long a soak test's workload runs.
    pub soak_seconds: u64,
    /// The part of the run's cases this process runs ([`RunConfig::cases`]).
    pub shard: Shard,
    /// How many cases run at once.
    pub jobs: usize,
    /// How QEMU runs the guests.
    pub accel: Accel,
}

impl RunConfig {
    /// Every case of the run, kernel by kernel, each kernel's transports in
    /// turn, each transport's tests in order: the reports' order, whichever
    /// part of it this process runs and however many at once.
    pub fn cases(&self) -> Vec<Case> {
        let kernels = distinct_names(&self.kernels);
        self.matrix()
            .map(|(k, t, test)| Case {
                kernel: t.column(&kernels[k].name),
                test: test.name.to_owned(),
            })
            .collect()
    }

    /// The cases as (kernel, by its place in `kernels`; transport; test),
    /// in the order of [`RunConfig::cases`].
    pub(super) fn matrix(
        &self,
    ) -> impl Iterator<Item = (usize, Transport, &'static TestSpec)> + '_ {
        (0..self.kernels.len()).flat_map(move |k| {
            self.transports
                .iter()
                .flat_map(move |&t| self.tests.iter().map(move |&test| (k, t, test)))
        })
    }
}

/// One cell of the reports: a test on a kernel's column (its name, with
/// ` nvme` for the NVMe pass).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Case {
    pub kernel: String,
    pub test: String,
}

/// Shard `index` of `count` (`--shard I/N`, 1-based): case `c` of the run's
/// [`cases`](RunConfig::cases) is this shard's when `c % count == index - 1`,
/// so `1/N` ... `N/N` take every case once between them, and each takes
/// some of every kernel and transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// The whole run.
    pub const ALL: Shard = Shard { index: 1, count: 1 };

    /// Whether case number `case` (0-based) is this shard's.
    pub fn takes(self, case: usize) -> bool {
        case % self.count as usize == (self.index - 1) as usize
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || format!("{s:?} is not I/N (shard I of N, 1 <= I <= N), e.g. 1/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: u32 = i.trim().parse().map_err(|_| bad())?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// How the guest reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// virtio-blk over vhost-user: `/dev/vda`.
    VirtioBlk,
    /// The guest's nvme driver, dmaprobe's NVMe controller over vfio-user:
    /// `/dev/nvme0n1`.
    Nvme,
}

impl Transport {
    pub const ALL: [Transport; 2] = [Transport::VirtioBlk, Transport::Nvme];

    pub fn name(self) -> &'static str {
        match self {
            Transport::VirtioBlk => "virtio-blk",
            Transport::Nvme => "nvme",
        }
    }

    /// The modules a guest over this transport loads unless built in.
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            Transport::VirtioBlk => &VIRTIO_BLK_MODULES,
            Transport::Nvme => &[],
        }
    }

    /// The disk as the guest names it.
    pub fn guest_disk(self) -> &'static str {
        match self {
            Transport::VirtioBlk => "/dev/vda",
            Transport::Nvme => "/dev/nvme0n1",
        }
    }

    /// A kernel's column in the reports: the NVMe runs have their own.
    pub(super) fn column(self, kernel: &str) -> String {
        match self {
            Transport::VirtioBlk => kernel.to_owned(),
            Transport::Nvme => format!("{kernel} nvme"),
        }
    }
}

/// The kernels, each with a name no earlier one has: a name taken, as a
/// column of the reports (over any transport) or as the file name of one,
/// gets a suffix (`-2`, `-3`, ...), so neither columns nor kept files merge.
pub fn distinct_names(kernels: &[Kernel]) -> Vec<Kernel> {
    let files = |name: &str| Transport::ALL.map(|t| path_component(&t.column(name)));
    let mut taken = HashSet::new();
    kernels
        .iter()
        .map(|kernel| {
            let mut kernel = kernel.clone();
            let base = kernel.name.clone();
            let mut n = 1;
            while files(&kernel.name).iter().any(|f| taken.contains(f)) {
                n += 1;
                kernel.name = format!("{base}-{n}");
            }
            taken.extend(files(&kernel.name));
            kernel
        })
        .collect()
}

/// The vhost-user-blk backend that serves each test's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Daemon {
    /// `dmaprobe serve` with the test's options and a ledger.
    Dmaprobe,
    /// QEMU's reference backend on the same disk file with the same queue
    /// count and block size: the same guest on an ordinary device, which tells
    /// a kernel's fault from dmaprobe's. It has none of dmaprobe's features
    /// (fault rules, the mailbox, the ledger), so no findings either.
    QemuStorageDaemon,
}

impl Daemon {
    pub const ALL: [Daemon; 2] = [Daemon::Dmaprobe, Daemon::QemuStorageDaemon];

    /// The name `--daemon` takes.
    pub fn name(self) -> &'static str {
        match self {
            Daemon::Dmaprobe => "dmaprobe",
            Daemon::QemuStorageDaemon => QSD,
        }
    }

    /// What the process is called in messages.
    pub(super) fn label(self) -> &'static str {
        match self {
            Daemon::Dmaprobe => "dmaprobe serve",
            Daemon::QemuStorageDaemon => QSD,
        }
    }
}

/// qemu-storage-daemon's executable (Debian: qemu-utils), found on `PATH`.
pub const QSD: &str = "qemu-storage-daemon";

/// A deliberately broken device, to show that the suite notices one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mutant {
    /// Every request completes at once; its data moves 100 ms later.
    CompleteBeforeDma,
    /// Every request's data moves into, or out of, the next guest page.
    WrongPage,
}

impl Mutant {
    pub const ALL: [Mutant; 2] = [Mutant::CompleteBeforeDma, Mutant::WrongPage];

    pub fn name(self) -> &'static str {
        match self {
            Mutant::CompleteBeforeDma => "complete-before-dma",
            Mutant::WrongPage => "wrong-page",
        }
    }

    /// The fault rule that makes the device broken.
    pub fn rule(self) -> &'static str {
        match self {
            Mutant::CompleteBeforeDma => "action=complete-before-dma,ms=100",
            Mutant::WrongPage => "action=wrong-page",
        }
    }
}

#[cfg(test)]
impl RunConfig {
    /// A configuration with made-up paths, for unit tests.
    pub(crate) fn for_tests(daemon: Daemon) -> RunConfig {
        RunConfig {
            kernels: Vec::new(),
            tests: Vec::new(),
            dmaprobe: PathBuf::from("/x/dmaprobe"),
            daemon,
            guest_bin: PathBuf::from("/x/dmaprobe-guest"),
            programs: Vec::new(),
            busybox: PathBuf::from(crate::initramfs::BUSYBOX),
            qemu: PathBuf::from("qemu-system-x86_64"),
            qemu_nvme: PathBuf::from("/x/qemu-11"),
            transports: vec![Transport::VirtioBlk],
            queues: 3,
            seed: 1,
            keep_logs: None,
            timeout_scale: 1.0,
            mutant: None,
            timelines: None,
            soak_seconds: 60,
            shard: Shard::ALL,
            jobs: 1,
            accel: Accel::Tcg,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_take_every_case_once_between_them() {
        for count in 1..=5u32 {
            let shards: Vec<Shard> = (1..=count).map(|index| Shard { index, count }).collect();
            for case in 0..23 {
                assert_eq!(shards.iter().filter(|s| s.takes(case)).count(), 1);
            }
        }
        assert_eq!("2/3".parse(), Ok(Shard { index: 2, count: 3 }));
        assert_eq!(Shard { index: 2, count: 3 }.to_string(), "2/3");
        for bad in ["0/3", "4/3", "1", "a/b", "1/0", "/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn nvme_runs_have_a_column_of_their_own() {
        assert_eq!(Transport::Nvme.column("debian-6.12"), "debian-6.12 nvme");
    }

    fn kernel(name: &str) -> Kernel {
        Kernel {
            name: name.into(),
            image: PathBuf::from("/k/bzImage"),
            modules: None,
            release: None,
        }
    }

    #[test]
    fn kernels_of_one_name_are_told_apart() {
        let names = |given: &[&str]| -> Vec<String> {
            let kernels: Vec<Kernel> = given.iter().map(|n| kernel(n)).collect();
            distinct_names(&kernels)
                .into_iter()
                .map(|k| k.name)
                .collect()
        };
        assert_eq!(
            names(&["debian-6.1", "debian-6.12"]),
            ["debian-6.1", "debian-6.12"]
        );
        assert_eq!(
            names(&["6.13.0", "6.13.0", "6.13.0", "6.13.0-2"]),
            ["6.13.0", "6.13.0-2", "6.13.0-3", "6.13.0-2-2"]
        );
        // Names that differ only where a file name cannot.
        assert_eq!(names(&["a/b", "a_b", "a b"]), ["a/b", "a_b-2", "a b"]);
        // One kernel's NVMe column is not another's, nor are their files.
        assert_eq!(
            names(&["k", "k nvme", "k-nvme"]),
            ["k", "k nvme-2", "k-nvme-3"]
        );
    }
}
