//! A host NVMe driver: the part a guest's Linux nvme driver plays against
//! dmaprobe's controller, written once for every way of reaching one.
//!
//! It enables the controller, identifies it, creates I/O queue pairs, puts
//! commands in host memory, rings doorbells and takes completions back by
//! their phase tag. It serves the controller's unit tests and the
//! `nvme_command` fuzz target in process, and the integration tests and
//! `dmaprobe bench --nvme` over a vfio-user socket. It sends whatever entry
//! it is handed, so a test can send a malformed command or an odd PRP; an
//! [`IoQueue`] taken out of it is a load generator's queue pair, which never
//! overfills its submission queue and sleeps on its interrupt.
//!
//! A command flows: a builder in [`command`] (or [`Sqe::new`] and any
//! field) → [`Driver::issue`] (a command identifier, the entry at the SQ
//! tail in host memory, the tail doorbell) → the controller → the entry in
//! the CQ, its phase tag flipped, and the vector's interrupt →
//! [`Driver::completion`] (the entry read once an interrupt announced it,
//! the head doorbell, a [`Completion`]). Bringing a controller up:
//! [`Driver::enable`] (CC.EN = 0, the admin queues, CC, CC.EN = 1, CSTS.RDY)
//! → [`Driver::identify`] → [`Driver::request_queues`] →
//! [`Driver::create_io_pair`].
//!
//! - `driver.rs`: [`Driver`], the registers, the queues and the waits;
//!   `queue.rs`: the queues as the host keeps them ([`AdminQueues`] and
//!   [`IoQueuePair`] say where they lie); `io_queue.rs`: [`IoQueue`], a
//!   pair driven on its own (place while there is room, ring once, reap all,
//!   wait on the interrupt).
//! - [`identify`]: [`ControllerData`] and [`NamespaceData`], what a host
//!   reads of the identify data.
//! - [`command`]: the commands Linux sends, built as [`Sqe`]s whose every
//!   field stays settable, and [`Completion`], the entry as read back.
//! - `prp.rs`: [`Prp`], a buffer as PRP1, PRP2 and a PRP list.
//! - `transport.rs`: how registers ([`Transport`]) and host memory
//!   ([`HostMemory`]) are reached; `in_process.rs`: [`InProcess`], a
//!   [`Controller`](crate::nvme::Controller) in this process;
//!   [`vfio_user`]: [`VfioUser`], a controller behind a vfio-user socket, and
//!   its memory [`HostRam`]; [`vfio_user::probe`], whether a vfio-user
//!   server answers at a socket at all.
//! - `error.rs`: [`Error`].
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use backend::nvme_driver::{command, AdminQueues, Driver, Gpa, HostRam, VfioUser, CC_LINUX};
//! # fn main() -> Result<(), backend::nvme_driver::Error> {
//! let ram = HostRam::new(16 << 20)?;
//! let vfio = VfioUser::connect(Path::new("/tmp/nvme.sock"), Duration::from_secs(1), ram, &[16 << 20], 2)?;
//! let mut nvme = Driver::new(vfio);
//! let admin = AdminQueues { sq: Gpa(0), cq: Gpa(0x1000), entries: 32 };
//! nvme.enable(admin, CC_LINUX)?;
//! let id = nvme.identify(0x01, 0, Gpa(0x2000))?;
//! # Ok(()) }
//! ```

pub mod command;
mod driver;
mod error;
pub mod identify;
mod in_process;
mod io_queue;
mod prp;
mod queue;
mod transport;
pub mod vfio_user;

pub use command::{Completion, Sqe, CC_LINUX};
pub use dma::Gpa;
pub use driver::{Driver, DEFAULT_TIMEOUT};
pub use error::{Error, NotVfioUser};
pub use identify::{ControllerData, NamespaceData};
pub use in_process::InProcess;
pub use io_queue::{DoorbellCounts, IoQueue};
pub use prp::{write_list, Prp};
pub use queue::{ring_doorbell, AdminQueues, IoQueuePair};
pub use transport::{HostMemory, Interrupt, Transport};
pub use vfio_user::{HostRam, VfioUser};

/// The register offsets and fields, as the controller defines them.
pub use crate::nvme::controller::{cc, csts, reg, DOORBELLS};
/// The memory page size the driver builds PRPs for (CC.MPS 0).
pub use crate::nvme::prp::PAGE;
pub use crate::nvme::shadow::ShadowBuffers;
pub use crate::nvme::NvmeStatus;
