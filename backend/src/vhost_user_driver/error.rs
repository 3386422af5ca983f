//! What can go wrong driving a vhost-user-blk device.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad parameter from the caller.
    #[error("Invalid frontend configuration: {0}")]
    InvalidConfig(&'static str),
    /// memfd creation or sizing failed.
    #[error("Cannot create guest memory file")]
    MemFd(#[source] std::io::Error),
    /// Mapping the memfd failed.
    #[error("Cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// A guest memory access fell outside guest memory.
    #[error("Guest memory access at {gpa:#x} (+{len}) failed")]
    GuestMemory {
        /// Guest-physical address.
        gpa: u64,
        /// Bytes accessed.
        len: usize,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The allocator has no room.
    #[error("Out of guest memory for a {len}-byte buffer")]
    OutOfMemory {
        /// Bytes asked for.
        len: usize,
    },
    /// A write past the end of a [`Buffer`](super::Buffer).
    #[error("Write of {len} bytes at offset {offset} overflows a {size}-byte buffer")]
    BufferOverflow {
        /// Offset into the buffer.
        offset: usize,
        /// Bytes written.
        len: usize,
        /// Buffer size.
        size: usize,
    },
    /// A buffer too large for one descriptor.
    #[error("A {len}-byte buffer does not fit one descriptor")]
    TooLarge {
        /// Bytes.
        len: usize,
    },
    /// Eventfd creation, read, write or poll failed.
    #[error("Eventfd operation failed")]
    EventFd(#[source] std::io::Error),
    /// Connecting to the socket failed.
    #[error("Cannot connect to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// A vhost-user request failed or the reply was bad.
    #[error("vhost-user {request} failed")]
    Protocol {
        /// The request, e.g. "SET_MEM_TABLE".
        request: &'static str,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
    /// The backend does not offer a feature the configuration requires.
    #[error("Backend does not offer {name}")]
    MissingFeature {
        /// Feature name.
        name: &'static str,
    },
    /// More queues asked for than the backend has.
    #[error("Backend has {offered} queues, {wanted} requested")]
    TooManyQueues {
        /// Queues the backend reports.
        offered: u64,
        /// Queues asked for.
        wanted: u16,
    },
    /// No queue with that index.
    #[error("No queue {0}")]
    NoSuchQueue(u16),
    /// Not enough free descriptors or avail ring entries.
    #[error("Queue {queue} is full: {needed} descriptors needed, {free} free")]
    QueueFull {
        /// Queue index.
        queue: u16,
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A chain with no descriptors.
    #[error("A chain needs at least one descriptor")]
    EmptyChain,
    /// `Next::Entry` names an entry outside the list.
    #[error("Descriptor {entry} points at entry {next}, outside the chain")]
    BadNextEntry {
        /// The descriptor.
        entry: usize,
        /// Its `Next::Entry`.
        next: usize,
    },
    /// A descriptor slot outside the table.
    #[error("Descriptor slot {slot} is outside a {size}-entry table")]
    BadSlot {
        /// The slot.
        slot: u16,
        /// Table size.
        size: u16,
    },
    /// The device moved `used.idx` by more than the queue size.
    #[error("Queue {queue}: used.idx jumped to {used_idx} from {last_used}")]
    UsedIndexJump {
        /// Queue index.
        queue: u16,
        /// The device's used.idx.
        used_idx: u16,
        /// Our last seen used.idx.
        last_used: u16,
    },
    /// Nothing completed in time.
    #[error("Queue {queue}: no completion within {waited:?}")]
    Timeout {
        /// Queue index.
        queue: u16,
        /// How long we waited.
        waited: Duration,
    },
}
