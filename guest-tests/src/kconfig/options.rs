//! The kernel options the suite needs, in the groups tests name in
//! [`TestSpec::kconfig`](crate::suite::TestSpec).

/// A kernel option the suite needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigOption {
    /// Its name without `CONFIG_`.
    pub name: &'static str,
    /// The name later kernels know it by, where they renamed it.
    pub renamed: Option<&'static str>,
    /// Only `=y` will do: the guest needs it before any module is loaded, or
    /// the initramfs packs no module of it. Otherwise `=m` will do: the
    /// initramfs loads the module (`dmaprobe run --modules`).
    pub built_in: bool,
    /// What the suite uses it for.
    pub why: &'static str,
}

pub(super) const fn built_in(name: &'static str, why: &'static str) -> ConfigOption {
    ConfigOption {
        name,
        renamed: None,
        built_in: true,
        why,
    }
}

pub(super) const fn module_ok(name: &'static str, why: &'static str) -> ConfigOption {
    ConfigOption {
        name,
        renamed: None,
        built_in: false,
        why,
    }
}

/// What every test needs: the boot, the initramfs and `/init`, the guest
/// program, the serial ports that carry the kernel log and the guest's
/// events, and the power-off that ends QEMU.
pub const EVERY_TEST: &[ConfigOption] = &[
    built_in("64BIT", "the guest program and busybox are x86-64"),
    built_in(
        "BLK_DEV_INITRD",
        "the guest boots from an initramfs (an uncompressed cpio)",
    ),
    built_in("BINFMT_ELF", "the guest program and busybox"),
    built_in(
        "BINFMT_SCRIPT",
        "/init is a busybox shell script (built in: it runs before any module)",
    ),
    built_in(
        "DEVTMPFS",
        "/init mounts devtmpfs on /dev: the disk and the serial ports appear there",
    ),
    built_in(
        "PROC_FS",
        "/proc: the command line, /proc/vmstat (the pin counters), /proc/self/pagemap",
    ),
    built_in("SYSFS", "/sys/block: the disk's size and block size"),
    built_in("FUTEX", "the guest program's threads and locks"),
    built_in("PRINTK", "the kernel log, which the verdict reads"),
    built_in("TTY", "the serial ports"),
    built_in(
        "SERIAL_8250",
        "ttyS0 carries the kernel log, ttyS1 the guest's events \
         (built in: the initramfs loads no serial module)",
    ),
    built_in(
        "SERIAL_8250_CONSOLE",
        "console=ttyS0: the kernel log, which the verdict reads",
    ),
    built_in(
        "ACPI",
        "the guest powers off through ACPI, and QEMU exits (without it a boot runs into its timeout)",
    ),
    built_in("PCI", "the disk is a PCI device"),
    built_in("BLOCK", "the block layer"),
];

/// The nvme driver: the disk over NVMe, and the passthrough tests' ioctls
/// and generic character device.
const NVME_DRIVER: ConfigOption = built_in(
    "BLK_DEV_NVME",
    "the nvme driver: /dev/nvme0n1, its passthrough ioctls and /dev/ngXnY \
     (built in: the initramfs loads no nvme module)",
);

/// What every test over virtio-blk needs.
const VIRTIO_BLK_DISK: &[ConfigOption] = &[
    built_in("VIRTIO_MENU", "the virtio drivers"),
    module_ok("VIRTIO_PCI", "virtio over PCI"),
    built_in("BLK_DEV", "the block device drivers"),
    module_ok("VIRTIO_BLK", "the virtio-blk driver: /dev/vda"),
];

/// What every test over NVMe needs.
const NVME_DISK: &[ConfigOption] = &[
    NVME_DRIVER,
    built_in(
        "PCI_MSI",
        "dmaprobe's NVMe controller interrupts by MSI-X only",
    ),
];

/// What every test over each interface needs, by the interface's name (as
/// `dmaprobe run --transport` names it).
pub const INTERFACES: &[(&str, &[ConfigOption])] =
    &[("virtio-blk", VIRTIO_BLK_DISK), ("nvme", NVME_DISK)];

/// ext4, which the host makes on the disk.
pub const EXT4: &[ConfigOption] = &[built_in(
    "EXT4_FS",
    "ext4 (built in: the initramfs loads no ext4 module)",
)];

/// xfs, which the host makes on the disk.
pub const XFS: &[ConfigOption] = &[module_ok("XFS_FS", "xfs")];

/// vfat, which the host makes on the disk: its legacy direct I/O. The guest
/// mounts it with `codepage=437,iocharset=ascii`, whatever the kernel's
/// defaults (the modules are suite.rs's `FAT_MODULES`).
pub const VFAT: &[ConfigOption] = &[
    module_ok("FAT_FS", "FAT, under vfat"),
    module_ok("VFAT_FS", "vfat"),
    module_ok("NLS_CODEPAGE_437", "vfat's codepage=437"),
    module_ok("NLS_ASCII", "vfat's iocharset=ascii"),
];

/// UDF, which the host makes on the disk: legacy direct I/O that allocates.
pub const UDF: &[ConfigOption] = &[module_ok("UDF_FS", "UDF")];

/// `/proc/sys/vm/drop_caches`: buffered reads that come from the disk.
pub const DROP_CACHES: &[ConfigOption] = &[ConfigOption {
    name: "PROC_SYSCTL",
    renamed: Some("SYSCTL"),
    built_in: true,
    why: "/proc/sys: vm.drop_caches, so that buffered reads come from the disk",
}];

/// `/proc/self/pagemap`: the frames behind the test's pages (the zero
/// page's, and whether a page moved across fork).
pub const PAGEMAP: &[ConfigOption] = &[built_in(
    "PROC_PAGE_MONITOR",
    "/proc/self/pagemap: the frames behind the test's pages",
)];

/// io_uring.
pub const IO_URING: &[ConfigOption] = &[built_in("IO_URING", "io_uring")];

/// NVMe passthrough (these tests skip over virtio-blk).
pub const NVME_PASSTHROUGH: &[ConfigOption] = &[NVME_DRIVER];

/// fio, as the tests run it: libaio, its jobs in System V shared memory.
pub const FIO: &[ConfigOption] = &[
    built_in("AIO", "fio's libaio engine"),
    built_in(
        "SYSVIPC",
        "fio keeps its jobs in System V shared memory (shmget)",
    ),
];

/// `posix_fadvise`: a buffered writer reads back from the disk.
pub const FADVISE: &[ConfigOption] = &[built_in(
    "ADVISE_SYSCALLS",
    "posix_fadvise(POSIX_FADV_DONTNEED): the buffered writer reads back from the disk",
)];
