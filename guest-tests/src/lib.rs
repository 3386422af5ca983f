//! dmaprobe's guest side.
//!
//! - [`protocol`]: what the guest binary tells the host, one JSON object per line
//!   on the guest's second serial port, and the data patterns both sides compute.
//! - `src/bin/dmaprobe-guest/`: the binary run inside the guest, one module per test.
//!
//! The host-side runner (kernels, initramfs, QEMU, verdicts, reports) builds on
//! the protocol: it reads the events, checks on the host what the guest says it
//! wrote, and joins that with the kernel log into a verdict.

pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod klog;
pub mod mailbox;
pub mod modules;
pub mod process;
pub mod protocol;
pub mod report;
pub mod run;
pub mod suite;
pub mod timeline;
