//! The storage media behind dmaprobe: an NVMe-like namespace.
//!
//! This crate keeps the bytes. It knows nothing of virtio or guest memory: every
//! operation works on byte buffers (or raw I/O vectors the interface vouches
//! for) and logical block addresses.
//!
//! - [`units`]: the units the media speaks in — [`Lba`], [`LbaSize`], [`ByteOffset`].
//! - [`backing`]: where the bytes live — sparse memory (a memfd) or a raw file.
//! - [`namespace`]: the namespace an interface talks to: geometry, the one checked
//!   bounds function, and read, write, flush, deallocate and write-zeroes.
//! - [`geometry`]: transfer sizes and deallocate / write-zeroes limits, checked
//!   once.
//! - [`cache`]: the volatile write cache — what a flush makes stable and a power
//!   cut takes away.
//! - [`media`]: bad blocks — unrecovered read errors and write faults.
//! - [`latency`]: how long the media takes: per-command base times, time per
//!   byte, a queue depth and seeded jitter, with presets (instant, nvme, sata).
//!
//! Data flows interface → [`Namespace`] (bounds checked once, in LBAs) →
//! [`Backing`] (positioned reads and writes in bytes). An interface asks
//! [`Latency`] how long a command takes and completes it that much later.

pub mod backing;
pub mod cache;
pub mod geometry;
pub mod latency;
pub mod media;
pub mod namespace;
pub mod units;

pub use backing::{Backing, BackingError};
pub use cache::{CacheStatus, PowerCut};
pub use geometry::{Geometry, GeometryError};
pub use latency::{Latency, LatencySpec, LatencySpecError, MediaOp};
pub use media::{BadRange, MediaErrorKind, MediaErrors};
pub use namespace::{Deallocate, LbaRange, Namespace, NamespaceError, RangeError};
pub use units::{ByteOffset, Lba, LbaSize, LbaSizeError};
