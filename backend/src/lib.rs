//! dmaprobe's backend: the interfaces the guest sees, the request pipeline
//! they share, the control plane, and the command line.
//!
//! One folder per interface, each taking a guest's request as far as the
//! pipeline's prepared work and telling the guest how it ended, in its own
//! statuses:
//!
//! - [`virtio_blk`]: virtio-blk served to QEMU as a vhost-user-blk device. A
//!   chain flows: [`virtio_blk::device`] (one thread per queue pops it) →
//!   [`virtio_blk::request`] (parse the descriptor chain) →
//!   [`virtio_blk::prepare`] (check it against the namespace) → the pipeline
//!   → status byte, used ring entry, notification.
//! - [`nvme`]: an NVMe controller, served over [`vfio_user`] (the PCI function
//!   on a vfio-user socket). A command flows: SQ doorbell →
//!   [`nvme::controller`] (fetch, decode and check, PRPs walked) →
//!   [`nvme::device`] (prepared) → the pipeline → completion entry, MSI-X
//!   vector.
//!
//! - [`pipeline`]: what happens to a prepared request whichever interface it
//!   came from: the guest mailbox, the engine's arrival, the wait (delay,
//!   hold, media time), the I/O pool, the data's move
//!   ([`pipeline::work::perform`]), and the outcome in the pipeline's own
//!   words ([`pipeline::outcome`]), which each interface maps to its
//!   statuses.
//! - [`control`]: the JSON-lines control protocol, its commands, its socket,
//!   and the [`DaemonState`](control::state::DaemonState) they act on;
//!   [`ctl`] is `dmaprobe ctl`, its client.
//! - [`serve`]: `dmaprobe serve`: the media, the listen loop, signals;
//!   [`unix_socket`]: the sockets it binds.
//! - [`counters`]: what the device served and refused; rate-limited logging.
//! - [`config`], [`cli`]: the command line and the checked configuration.
//! - [`runner`]: `dmaprobe run`, on top of the `guest-tests` runner.
//! - [`vhost_user_driver`]: a vhost-user-blk *frontend* (the side QEMU
//!   plays), used by the tests and benchmarks to drive dmaprobe or
//!   qemu-storage-daemon; [`bench`](mod@bench): `dmaprobe bench`, a load generator on
//!   top of it.

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
