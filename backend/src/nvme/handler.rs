//! What the controller hands on and is handed: each checked NVM command as
//! an [`IoCommand`] (named for its completion by a [`CommandTag`]) to the
//! [`IoHandler`] that moves its data, and the transport's [`Interrupts`].

use dma::Segment;
use nvme_model::Lba;

use super::status::NvmeStatus;

/// The controller's MSI-X vectors, as the transport delivers them.
pub trait Interrupts: Send + Sync {
    /// Raises `vector` (the interrupt vector a completion queue was created with).
    fn signal(&self, vector: u16);
}

/// Where checked NVM commands go. The handler owns the data movement and the
/// media; the controller owns the queues.
pub trait IoHandler: Send + Sync {
    /// An NVM command decoded and bounds-checked; the handler completes it,
    /// now or later from any thread, with
    /// [`Controller::complete`](super::controller::Controller::complete) and
    /// the command's [`IoCommand::tag`]. Called without the controller's lock
    /// held: completing from inside `submit` is fine.
    fn submit(&self, cmd: IoCommand);

    /// The host turns the volatile write cache on or off (Set Features, Volatile
    /// Write Cache). Turning it off should make what it holds stable first. Only
    /// called when [`Identity::write_cache`](super::identify::Identity::write_cache)
    /// says a cache exists. The default accepts.
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
    pub(super) incarnation: u64,
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
