//! dmaprobe's DMA engine: moves bytes between guest memory and byte buffers.
//!
//! dma knows guest memory (through vm-memory, every access bounds-checked) and
//! nothing of virtio: a front-end hands it the guest-physical segments of a
//! request, and dma moves the bytes between those segments and a buffer that the
//! media model fills or drains.
//!
//! - [`segment`]: guest-physical addresses and segments, and their validation.
//! - [`transfer`]: the copies to and from guest memory, with partial transfers
//!   reported as values.
//!
//! Later parts of the engine (delays and holds, canaries, source snapshots, the
//! ledger) sit around [`transfer`]: they decide *when* it runs and watch guest
//! memory before and after.

pub mod segment;
pub mod transfer;

pub use segment::{Gpa, Segment};
pub use transfer::{from_guest, to_guest, PartialTransfer, TransferError};
