//! The storage media behind dmaprobe: an NVMe-like namespace.
//!
//! This crate keeps the bytes. It knows nothing of virtio or guest memory: every
//! operation works on byte buffers and logical block addresses.
//!
//! - [`units`]: the units the media speaks in — [`Lba`], [`LbaSize`], [`ByteOffset`].
//! - [`backing`]: where the bytes live — sparse memory (a memfd) or a raw file.
//! - [`namespace`]: the namespace a front-end talks to: geometry, the one checked
//!   bounds function, and read, write, flush, deallocate and write-zeroes.
//!
//! Data flows front-end → [`Namespace`] (bounds checked once, in LBAs) →
//! [`Backing`] (positioned reads and writes in bytes).

pub mod backing;
pub mod namespace;
pub mod units;

pub use backing::{Backing, BackingError};
pub use namespace::{LbaRange, Namespace, NamespaceError, RangeError};
pub use units::{ByteOffset, Lba, LbaSize, LbaSizeError};
