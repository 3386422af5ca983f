//! A request as dma sees it: what it moves, where, and when each step happened.

use std::fmt;

use serde::Serialize;

use crate::segment::Segment;

/// A request's id, unique for the life of the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ReqId(pub u64);

impl fmt::Display for ReqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a request does, in storage terms (every interface maps onto these).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    GetId,
}

impl Op {
    /// Whether the device writes guest memory for this op (device-to-memory DMA).
    pub fn writes_memory(self) -> bool {
        matches!(self, Op::Read | Op::GetId)
    }

    /// Whether the device reads guest memory as data for this op (memory-to-device DMA).
    pub fn reads_memory(self) -> bool {
        matches!(self, Op::Write)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write-zeroes",
            Op::GetId => "get-id",
        }
    }

    pub fn from_name(name: &str) -> Option<Op> {
        [
            Op::Read,
            Op::Write,
            Op::Flush,
            Op::Discard,
            Op::WriteZeroes,
            Op::GetId,
        ]
        .into_iter()
        .find(|op| op.name() == name)
    }
}

/// What an interface tells dma about a request when it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub op: Op,
    pub queue: u16,
    /// The first logical block, in the interface's block size.
    pub lba: u64,
    /// Bytes of data moved.
    pub len: u64,
    /// The guest-physical data segments (empty for ops without data).
    pub segments: Vec<Segment>,
}
