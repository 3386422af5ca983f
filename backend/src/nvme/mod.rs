//! dmaprobe's NVMe controller: what a guest's own nvme driver talks to, with
//! the transport and the data movement left to others.
//!
//! Three parts meet here. A *transport* (vfio-user) forwards BAR0 reads and
//! writes to [`Controller::bar0_read`] / [`Controller::bar0_write`], gives the
//! controller guest memory and the MSI-X vectors ([`Controller::attach`],
//! [`Interrupts`]) and resets it ([`Controller::reset`]). The *controller*
//! (this module) keeps the registers and the queues, runs admin commands
//! itself, and decodes and checks NVM commands. An [`IoHandler`] gets each
//! checked NVM command as an [`IoCommand`] — op, blocks, guest-physical
//! segments — moves the data (through the DMA engine), and completes it with
//! [`Controller::complete`], at once or later, from any thread.
//!
//! - [`controller`]: the registers, enable / reset / shutdown, doorbells, the
//!   submission and completion paths.
//! - [`queue`]: submission and completion queues: fetching entries, posting
//!   completions with the phase tag, what is in flight.
//! - [`command`]: the 64-byte submission entry and its fields; opcodes.
//! - [`admin`]: the admin command set: queues, identify, features, log pages,
//!   abort, asynchronous events.
//! - [`io`]: NVM commands (read, write, flush, write zeroes, dataset
//!   management) decoded and bounds-checked into [`IoCommand`]s.
//! - [`identify`]: [`Identity`], what the controller says about itself and its
//!   one namespace, and the identify data structures and log pages built from
//!   it.
//! - [`prp`]: PRP entries and lists into guest-physical segments.
//! - [`status`]: [`NvmeStatus`], the completion statuses.
//! - [`handler`]: what the controller hands on and is handed:
//!   [`IoHandler`], [`IoCommand`], [`CommandTag`], [`Interrupts`].
//! - [`features`]: the features the controller keeps (Get / Set Features).
//! - [`shadow`]: shadow doorbells: Doorbell Buffer Config, and the host's
//!   Shadow Doorbell and EventIdx buffers.
//! - `workers`: the threads that serve the I/O submission queues.
//! - [`report`]: what `ctl status` shows of the controller and its transport.
//! - [`device`]: [`NvmeDevice`](device::NvmeDevice), the glue: the
//!   controller as the vfio-user transport's PCI function, its NVM commands
//!   taken through the request [`Pipeline`](crate::pipeline::Pipeline).
//!
//! A command flows: SQ tail doorbell (or its shadow slot) → fetch the entry
//! from guest memory → admin: run, post the completion; NVM (on the queue's
//! thread): decode, check, walk the PRPs → [`IoHandler::submit`] →
//! [`Controller::complete`] → completion entry in the CQ, interrupt on its
//! vector. A submission queue stops fetching while its
//! completion queue has no room left for another completion, and goes on at
//! that CQ's head doorbell: what a host leaves unconsumed bounds what the
//! controller holds.
//!
//! Whatever the guest gets wrong is a completion status (a malformed command)
//! or the controller fatal status CSTS.CFS (a malformed doorbell write or a
//! queue the controller cannot reach), a counter and a rate-limited log line;
//! never a panic.

pub mod admin;
pub mod command;
pub mod controller;
pub mod device;
pub mod features;
pub mod handler;
pub mod identify;
pub mod io;
pub mod prp;
pub mod queue;
pub mod report;
pub mod shadow;
pub mod status;
#[cfg(test)]
mod test_utils;
mod workers;

pub use controller::{Controller, NvmeCounters, BAR0_SIZE};
pub use handler::{BlockRange, CommandTag, Interrupts, IoCommand, IoHandler, IoOp};
pub use identify::Identity;
pub use status::NvmeStatus;
