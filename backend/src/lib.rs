//! dmaprobe's backend: the device the guest sees, its control plane, and the
//! command line.
//!
//! A chain flows: [`device`] (the vhost-user backend, one worker per queue) →
//! [`request`] (parse the descriptor chain) → [`execute`] (check it against the
//! namespace) → [`pipeline`] (the mailbox, the DMA engine's wait, then the data
//! moved by [`execute`]) → status and used ring. [`mailbox`] serves the guest's
//! control commands from the disk's last MiB. Large reads are served off their
//! queue's thread by [`iopool`].
//!
//! - [`blk`]: virtio-blk features, request types, statuses, config space.
//! - [`counters`]: what the device served and refused; rate-limited logging.
//! - [`process`]: the daemon's own memory, open descriptors and threads, for
//!   `status`.
//! - [`serve`]: `dmaprobe serve`: the media, the listen loop, signals.
//! - [`control`]: the JSON-lines control protocol and its socket; [`ctl`] is
//!   `dmaprobe ctl`, its client.
//! - [`config`], [`cli`]: the command line and the checked configuration.
//! - [`runner`]: `dmaprobe run`, on top of the `guest-tests` runner.
//! - [`frontend`]: a vhost-user-blk *frontend* (the side QEMU plays), used by
//!   the tests and benchmarks to drive dmaprobe or qemu-storage-daemon.
//! - [`bench`]: `dmaprobe bench`, a load generator on top of [`frontend`].

pub mod bench;
pub mod cli;
pub mod config;
pub mod control;
pub mod counters;
pub mod ctl;
pub mod nvme;
pub mod pipeline;
pub mod runner;
pub mod serve;
pub mod unix_socket;
pub mod vfio_user;
pub mod vhost_user_driver;
pub mod virtio_blk;

/// Guest memory as the transports hand it over and the interfaces and the
/// pipeline share it: replaced whole when the frontend maps or unmaps memory.
pub type GuestMemory = vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>;
