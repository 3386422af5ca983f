//! dmaprobe's device: the interfaces the guest sees, the request pipeline
//! they share, and the control plane. The command line (`dmaprobe serve`,
//! `ctl`, `bench`, `run`) is the `dmaprobe` crate on top of this one.
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
//!   on a vfio-user socket). A command flows: SQ doorbell (or its shadow
//!   slot) → [`nvme::controller`] (fetch, decode and check, PRPs walked; on
//!   the I/O queue's own thread) →
//!   [`nvme::device`] (prepared) → the pipeline → completion entry, MSI-X
//!   vector.
//!
//! - [`pipeline`]: what happens to a prepared request whichever interface it
//!   came from: the guest mailbox, the engine's arrival, the wait (delay,
//!   hold, media time), the I/O pool, the data's move
//!   ([`pipeline::work::perform`]), and the outcome in the pipeline's own
//!   words ([`pipeline::outcome`]), which each interface maps to its
//!   statuses.
//! - [`control`]: the daemon's side of the control protocol (the wire format
//!   is [`wire::control`]): its commands, its socket, and the
//!   [`DaemonState`](control::state::DaemonState) they act on.
//! - [`serve`]: the daemon: the media, the listen loop, signals, from a
//!   checked [`config::ServeConfig`]; [`unix_socket`]: the sockets it binds.
//! - [`counters`]: what the device served and refused; rate-limited logging.
//! - [`vhost_user_driver`]: a vhost-user-blk *frontend* (the side QEMU
//!   plays), used by `dmaprobe bench`, the tests and the benchmarks to drive
//!   dmaprobe or qemu-storage-daemon.
//! - [`nvme_driver`]: a host NVMe driver (the part a guest's nvme driver
//!   plays), in process against a [`nvme::Controller`] or over a vfio-user
//!   socket, used by the controller's tests, the fuzz target and the
//!   integration tests.

pub mod config;
pub mod control;
pub mod counters;
pub mod nvme;
pub mod nvme_driver;
pub mod pipeline;
pub mod serve;
pub mod unix_socket;
pub mod vfio_user;
pub mod vhost_user_driver;
pub mod virtio_blk;

/// Guest memory as the transports hand it over and the interfaces and the
/// pipeline share it: replaced whole when the frontend maps or unmaps memory.
pub type GuestMemory = vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>;
