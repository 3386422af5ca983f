//! What a run is asked to do: [`RunConfig`], and the choices in it: the
//! [`Transport`] the guest reaches the disk by, the [`Daemon`] that serves
//! it, a [`Mutant`] device.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Serialize;

use super::logs::path_component;
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
}

/// How the guest reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
