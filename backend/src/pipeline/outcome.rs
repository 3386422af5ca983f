//! How a request ends, in the pipeline's own words. No interface's statuses
//! appear here: each interface maps these to its own at its edge
//! (virtio-blk to `VIRTIO_BLK_S_*` in `virtio_blk::device`, NVMe to
//! `NvmeStatus` in `nvme::device`).

use crate::counters::Mistake;

/// How a request ended, for the interface to tell its guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done; `written` bytes of data went into guest memory.
    Done {
        written: u32,
    },
    Failed(Failure),
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The guest's mistake: blocks or memory the device cannot serve.
    Refused(Refusal),
    /// A block the test made bad, read.
    UnrecoveredRead,
    /// A block the test made fail writes, written.
    WriteFault,
    /// The power was cut after the request arrived.
    CutOff,
    /// The backing failed.
    Media,
    /// A fault rule's error.
    Injected(InjectedError),
    /// The mailbox refused the command.
    Mailbox,
    /// The daemon is stopping with the request still waiting.
    Stopped,
}

/// What the pipeline refuses a request for, whichever interface it came
/// from: at its preparation ([`block_range`](super::work::block_range),
/// [`writable`](super::work::writable)), or when its data moves and its
/// guest memory is gone. Each kind is counted under its name in `malformed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the block range overflows or ends past the capacity")]
    OutOfRange,
    #[error("the device is read-only")]
    ReadOnly,
    #[error("the request's guest memory is not there")]
    OutsideMemory,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Refusal::OutOfRange,
        Refusal::ReadOnly,
        Refusal::OutsideMemory,
    ];
}

impl Mistake for Refusal {
    fn name(self) -> &'static str {
        match self {
            Refusal::OutOfRange => "out-of-range",
            Refusal::ReadOnly => "read-only",
            Refusal::OutsideMemory => "outside-memory",
        }
    }
}

/// The error a fault rule's `error` action injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedError {
    /// The request failed (the rule's default).
    IoError,
    /// The request is not supported (the rule's `unsupp`).
    Unsupported,
}
