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
//! - [`device`]: [`NvmeDevice`](device::NvmeDevice), the glue: the
//!   controller as the vfio-user transport's PCI function, its NVM commands
//!   taken through the request [`Pipeline`](crate::pipeline::Pipeline).
//!
//! A command flows: SQ tail doorbell → fetch the entry from guest memory →
//! admin: run, post the completion; NVM: decode, check, walk the PRPs →
//! [`IoHandler::submit`] → [`Controller::complete`] → completion entry in the
//! CQ, interrupt on its vector. A submission queue stops fetching while its
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
pub mod identify;
pub mod io;
pub mod prp;
pub mod queue;
pub mod status;
#[cfg(test)]
mod test_utils;

use dma::Segment;
use nvme_model::Lba;

pub use controller::{Controller, NvmeCounters, BAR0_SIZE};
pub use identify::Identity;
pub use status::NvmeStatus;

/// The controller's MSI-X vectors, as the transport delivers them.
pub trait Interrupts: Send + Sync {
    /// Raises `vector` (the interrupt vector a completion queue was created with).
    fn signal(&self, vector: u16);
}

/// Where checked NVM commands go. The handler owns the data movement and the
/// media; the controller owns the queues.
pub trait IoHandler: Send + Sync {
    /// An NVM command decoded and bounds-checked; the handler completes it,
    /// now or later from any thread, with [`Controller::complete`] and the
    /// command's [`IoCommand::tag`]. Called without the controller's lock held:
    /// completing from inside `submit` is fine.
    fn submit(&self, cmd: IoCommand);

    /// The host turns the volatile write cache on or off (Set Features, Volatile
    /// Write Cache). Turning it off should make what it holds stable first. Only
    /// called when [`Identity::write_cache`] says a cache exists. The default
    /// accepts.
    fn set_write_cache(&self, enabled: bool) -> Result<(), NvmeStatus> {
        let _ = enabled;
        Ok(())
    }

    /// The host announced a shutdown (CC.SHN): make everything written so far
    /// stable. The controller reports the shutdown complete when this returns.
    fn shutdown(&self) {}

    /// The controller was reset (CC.EN cleared, or a function-level reset):
    /// every command handed over before is void and completing it does
    /// nothing. A handler that holds or delays commands should stop touching
    /// their guest memory now. Called after every command submitted before the
    /// reset has reached [`IoHandler::submit`].
    fn reset(&self) {}
}

/// Names a command for its completion: the submission queue it came from, its
/// command identifier, and which incarnation of that queue (a queue deleted
/// and created again, or a controller reset, makes older tags stale).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CommandTag {
    pub qid: u16,
    pub cid: u16,
    incarnation: u64,
}

/// A checked NVM command for the [`IoHandler`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoCommand {
    pub tag: CommandTag,
    pub op: IoOp,
    /// The first block, for reads, writes and write zeroes; for dataset
    /// management the first range's start; 0 for flush.
    pub slba: Lba,
    /// How many blocks (a count, from 1) reads, writes and write zeroes name;
    /// 0 for flush and dataset management (the ranges carry theirs).
    pub nlb: u32,
    /// Where the data lies in guest memory, in order, for reads and writes:
    /// together exactly `nlb` blocks. Empty for the other ops.
    pub segments: Vec<Segment>,
    /// Force Unit Access: the write (or read) must reach stable media.
    pub fua: bool,
}

/// What an [`IoCommand`] does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Media to guest memory.
    Read,
    /// Guest memory to media.
    Write,
    /// Make every completed write stable.
    Flush,
    /// Zero the blocks; `deallocate` (DEAC) lets the device deallocate them
    /// instead when deallocated blocks read as zeros.
    WriteZeroes { deallocate: bool },
    /// Dataset management with the deallocate attribute: the ranges, each
    /// bounds-checked and non-empty, in the order the host gave them.
    Deallocate(Vec<BlockRange>),
}

impl IoOp {
    /// A short name for logs and ledgers.
    pub fn name(&self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::WriteZeroes { .. } => "write-zeroes",
            IoOp::Deallocate(_) => "deallocate",
        }
    }
}

/// A range of blocks inside the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub start: Lba,
    pub blocks: u32,
}
