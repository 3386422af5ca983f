//! What can go wrong driving an NVMe controller.

use std::path::PathBuf;
use std::time::Duration;

use dma::Gpa;

use super::command::Completion;

/// Errors of the host driver: the transport failing, the controller not
/// answering as the specification says, or a command completing with an
/// error where the driver needed it to succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host memory access fell outside host memory.
    #[error("Host memory access at {gpa} (+{len}) failed")]
    Memory {
        gpa: Gpa,
        len: usize,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// An address computed from a queue base or a buffer ran past `u64::MAX`.
    #[error("Address {base} + {offset:#x} overflows")]
    AddressOverflow { base: Gpa, offset: u64 },
    /// memfd or eventfd creation, sizing or sealing failed.
    #[error("Cannot create {what}")]
    Create {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Mapping host memory here failed.
    #[error("Cannot map host memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// Reading an interrupt's eventfd failed.
    #[error("Cannot read the eventfd of vector {vector}")]
    EventFd {
        vector: u16,
        #[source]
        source: std::io::Error,
    },
    /// A bad parameter from the caller.
    #[error("Invalid driver configuration: {0}")]
    InvalidConfig(&'static str),
    /// Connecting to the vfio-user socket failed until the deadline.
    #[error("Cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: vfio_user::Error,
    },
    /// Nothing listens at the socket.
    #[error("Cannot connect to {}", path.display())]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something answers at the socket, but not as a vfio-user server does.
    #[error("{} does not answer as a vfio-user server", path.display())]
    NotVfioUser {
        path: PathBuf,
        #[source]
        why: NotVfioUser,
    },
    /// A vfio-user request failed.
    #[error("vfio-user {request} failed")]
    Vfio {
        request: &'static str,
        #[source]
        source: vfio_user::Error,
    },
    /// The controller set CSTS.CFS.
    #[error("The controller is fatal (CSTS {csts:#x})")]
    Fatal { csts: u32 },
    /// CSTS.RDY did not follow CC.EN.
    #[error("CSTS.RDY did not become {ready} within {waited:?}")]
    NotReady { ready: bool, waited: Duration },
    /// The driver does not know that queue.
    #[error("No {kind} queue {qid}")]
    NoQueue { kind: &'static str, qid: u16 },
    /// An interrupt vector the transport has no eventfd for.
    #[error("No eventfd for vector {vector}")]
    NoVector { vector: u16 },
    /// A command the driver needed failed.
    #[error("{command} completed with SCT {:#x} SC {:#x}", completion.code().0, completion.code().1)]
    Failed {
        command: &'static str,
        completion: Completion,
    },
    /// Nothing completed in time.
    #[error("Completion queue {cqid}: no completion of command {cid} within {waited:?}")]
    Timeout {
        cqid: u16,
        cid: u16,
        waited: Duration,
    },
    /// A queue with commands in flight completed none in time.
    #[error("Completion queue {cqid}: nothing completed within {waited:?}")]
    Quiet { cqid: u16, waited: Duration },
    /// An I/O queue's submission queue has no free entry.
    #[error("Submission queue {qid} is full ({entries} entries, one always empty)")]
    QueueFull { qid: u16, entries: u16 },
    /// A completion entry was posted but its interrupt never came.
    #[error("Completion queue {cqid}: a completion was posted but vector {vector} never fired")]
    NoInterrupt { cqid: u16, vector: u16 },
    /// Identify data shorter than the field read.
    #[error("Identify data of {len} bytes is too short")]
    ShortIdentify { len: usize },
    /// A namespace's LBA format names a block size outside 512 B to 2 GiB.
    #[error("The namespace's LBA format has LBADS {lbads}")]
    BadLbaFormat { lbads: u8 },
    /// A PRP needs more pages than it was given.
    #[error("{len} bytes from {start} need {needed} pages after the first, {given} given")]
    TooFewPages {
        start: Gpa,
        len: usize,
        needed: usize,
        given: usize,
    },
    /// A PRP over more than two pages needs a list, and none was given or
    /// it was not qword-aligned.
    #[error("A transfer over {pages} pages needs a qword-aligned PRP list")]
    NoList { pages: usize },
    /// Data for a PRP of another length.
    #[error("{given} bytes for a {len}-byte buffer")]
    LengthMismatch { given: usize, len: usize },
}

/// How a socket showed that no vfio-user server is behind it.
#[derive(Debug, thiserror::Error)]
pub enum NotVfioUser {
    #[error("It closed the connection without a reply")]
    Closed,
    #[error("No reply within {0:?} (is another client connected?)")]
    Silent(Duration),
    #[error("Its reply is not a vfio-user VERSION reply")]
    Foreign,
    #[error("The exchange failed")]
    Io(#[source] std::io::Error),
}
