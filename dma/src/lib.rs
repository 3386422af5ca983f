//! dmaprobe's DMA engine: decides when data moves between guest memory and the
//! device, and watches guest memory around that moment.
//!
//! dma knows guest memory (through vm-memory, every access bounds-checked) and
//! nothing of virtio: an interface hands it a request's guest-physical segments,
//! and dma moves the bytes between those segments and a buffer that the media
//! model fills or drains.
//!
//! - [`request`]: a request as dma sees it ([`Arrival`], [`Op`], [`ReqId`]).
//! - [`segment`]: guest-physical addresses and segments.
//! - [`transfer`]: the copies to and from guest memory.
//! - [`fault`]: the rules that decide how a request waits (delay, hold) or is watched.
//! - [`canary`]: the pattern stamped into read destinations, made again to
//!   check it (no copy is kept), and its classification.
//! - [`finding`]: what the engine saw, with evidence.
//! - [`ledger`]: every request and finding, in a bounded ring, as JSON lines.
//! - [`engine`]: arrival, DMA and completion, with the checks around them.
//! - [`schedule`]: parks waiting requests without busy threads and runs them when due.
//! - [`rng`]: the seeded generator behind random delays and probabilities.
//!
//! A request flows: interface → [`Engine::arrive`] (a [`Ticket`]) → wait in the
//! [`Scheduler`] if the plan says so → [`Engine::to_guest`] / [`Engine::from_guest`]
//! → [`Engine::complete`] → optional watch. What a waiting or watched request
//! keeps grows with its segments, not with the bytes they name ([`engine`]).

pub mod canary;
pub mod engine;
pub mod fault;
pub mod finding;
pub mod ledger;
pub mod request;
pub mod rng;
pub mod schedule;
pub mod segment;
pub mod transfer;

pub use engine::{Checks, Engine, EngineConfig, Ticket, WatchFigures, WatchLimits, WatchTask};
pub use fault::{RuleSpec, Wait};
pub use finding::{Finding, FindingKind};
pub use request::{Arrival, Op, ReqId};
pub use schedule::Scheduler;
pub use segment::{Gpa, Segment};
pub use transfer::{from_guest, to_guest, PartialTransfer, TransferError};
