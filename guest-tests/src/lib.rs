//! dmaprobe's guest side.
//!
//! - [`protocol`]: what the guest binary tells the host, one JSON object per line
//!   on the guest's second serial port (the data pattern and the mailbox's
//!   frame, shared with the device, are in the `wire` crate).
//! - `src/bin/dmaprobe-guest/`: the binary run inside the guest, one module per test.
//!
//! The host-side runner: [`kernel`] (which kernel to boot), [`modules`] and
//! [`cpio`] → [`initramfs`] (what the guest boots from), [`suite`] (each test's
//! disk, device options and kernel options, the last from [`kconfig`], which
//! also checks a kernel's config against them), [`run`] (tests the kernel's
//! config lacks options for skipped unbooted; for the others a fresh disk and `dmaprobe serve` child
//! per test, or qemu-storage-daemon to compare, a QEMU boot, the guest's
//! events, the host's checks, a verdict joined with [`klog`] and the device's
//! findings), [`process`] (children that never outlive the run), [`report`]
//! and [`timeline`] (table, JSON, JUnit, SVG). [`soak`]: the soak's fault
//! plan, drawn from the seed, shared with the guest (`run` samples the
//! daemon's memory and descriptors while it runs). `test_utils` (tests, and
//! feature `test-utils`): results made by hand, for the reports' tests.
//!
//! Imports point one way: `run` uses the leaves (`kernel`, `suite`,
//! `kconfig`, `protocol`, `soak`, `timeline`, ...); [`report`] uses `run`'s results;
//! nothing uses `report`.

pub mod catalogue;
pub mod cpio;
pub mod initramfs;
pub mod kconfig;
pub mod kernel;
pub mod klog;
pub mod modules;
pub mod process;
pub mod protocol;
pub mod report;
pub mod run;
pub mod soak;
pub mod suite;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod timeline;
