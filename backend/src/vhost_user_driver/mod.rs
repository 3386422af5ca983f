//! A vhost-user-blk driver that plays QEMU's part: the vhost-user *frontend*
//! a vhost-user-blk device (dmaprobe's, or qemu-storage-daemon) serves, with
//! the guest's virtio-blk driver and its memory simulated in this process.
//!
//! It drives any vhost-user-blk backend over its socket, for the protocol tests
//! (including deliberately malformed descriptor chains) and for `dmaprobe bench`.
//!
//! - `session.rs`: [`BlkFrontend`], the vhost-user session: feature
//!   negotiation, memory table, vring setup, config space; `features.rs`: the
//!   feature bits it knows by name.
//! - `memory.rs`: [`GuestRam`], the memfd-backed guest memory shared with the
//!   backend, and its buffer allocator ([`Buffer`]).
//! - `ring.rs`: [`Queue`], the driver side of a split virtqueue written directly
//!   in guest memory: arbitrary descriptor chains in, used entries out, kick and
//!   call eventfds, EVENT_IDX.
//! - `blk.rs`: virtio-blk on a [`Queue`]: well-formed request chains, config
//!   space ([`BlkConfig`]), blocking helpers and async submit; request types
//!   are the device's own ([`RequestType`]); `status.rs`: [`StatusByte`], the
//!   status byte as read back (any byte a device may write).
//! - `error.rs`: [`Error`].
//!
//! Data flow: `BlkFrontend::connect` creates the guest memory and the queues and
//! hands the backend the memfd, the ring addresses and the eventfds. From then on
//! the vhost-user socket is idle; requests go through a [`Queue`] (guest memory
//! plus eventfds), so each queue can run on its own thread (`queues_mut`).
//!
//! ```no_run
//! use backend::vhost_user_driver::{BlkFrontend, FrontendConfig, Sector};
//! # fn main() -> Result<(), backend::vhost_user_driver::Error> {
//! let mut fe = BlkFrontend::connect("/tmp/blk.sock", FrontendConfig::default())?;
//! let status = fe.write(0, Sector(8), &[0xab; 4096])?;
//! let (status, data) = fe.read(0, Sector(8), 4096)?;
//! # Ok(()) }
//! ```

mod blk;
mod error;
pub mod features;
mod memory;
mod ring;
mod session;
mod status;

pub use blk::{
    encode_header, id_string, request_type, BlkConfig, BlkRequest, DiscardRange, Sector, Segment,
};
pub use error::Error;
pub use memory::{Buffer, GuestRam};
pub use ring::{
    link, write_table, ChainId, Completion, CompletionKind, Descriptor, Next, Queue, QueueStats,
    DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE,
};
pub use session::{BlkFrontend, FrontendConfig, Negotiated};
pub use status::StatusByte;
pub use vm_memory::GuestAddress;

/// The request types and the GET_ID length, as the device defines them.
pub use crate::virtio_blk::{RequestType, ID_BYTES};
