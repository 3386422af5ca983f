//! The vfio-user transport of the NVMe interface: one PCI function served to
//! QEMU's `-device vfio-user-pci` (QEMU ≥ 10.1) on a UNIX socket, with the
//! `vfio_user` crate's [`Server`](::vfio_user::Server).
//!
//! The function behind it ([`PciFunction`], the NVMe controller) sees only BAR0
//! accesses, guest memory and interrupts. Around it this module plays the PCI
//! device:
//!
//! - **Config space** (`ConfigSpace`): class code 01 08 02 (NVM Express), a
//!   64-bit memory BAR0 of the function's size, an MSI-X capability whose table
//!   and PBA live in a 64-bit BAR4, BAR sizing and the command register as a
//!   device answers them. QEMU's vfio-pci emulates the MSI-X table itself and
//!   hands one eventfd per vector through SET_IRQS; it forwards PBA reads here.
//! - **BAR0** accesses go to the function unchanged.
//! - **Guest memory** arrives by fd in DMA_MAP (memory-backend-memfd, share=on):
//!   each window is mapped shared at its IOVA, which is the guest-physical
//!   address for vfio-user-pci without a vIOMMU, into one [`GuestMemory`]
//!   the function gets at attach and that is republished on every map and unmap
//!   (`DmaMemory`). A window must lie inside its file, and the file must not
//!   shrink under it (`shrink_seal`).
//! - **Interrupts** (`Msix`, the function's [`Interrupts`]): `signal(v)` writes
//!   vector v's eventfd; a vector with no eventfd drops the interrupt, a masked
//!   one sets its pending bit; each is counted.
//!
//! Trust: the guest is untrusted; the frontend (QEMU, which owns guest memory)
//! is trusted as the VMM is. A device access past the end of a mapped file is a
//! SIGBUS in the daemon, so a memfd must be sealed with F_SEAL_SHRINK (QEMU's
//! memory-backend-memfd seal=on, the default) or its window is refused. A file
//! the kernel cannot seal (memory-backend-file on tmpfs or hugetlbfs) is taken
//! with a warning: a frontend that truncates it can still kill the daemon.
//!
//! The files, one concern each: `function.rs` (the [`PciFunction`] and
//! [`Interrupts`] the transport serves), `server.rs` ([`VfioUserServer`]: the
//! listener, the regions and IRQs announced, one connection after another),
//! `config_space.rs` (the PCI header and the MSI-X capability),
//! `msix.rs` (the vectors as eventfds), `dma_memory.rs` (DMA windows and their
//! seals), `transport.rs` (the crate's `ServerBackend`), `request_error.rs`
//! (why a request is refused), `stats.rs` ([`VfioUserStats`]).
//!
//! A message flows: `Server::run` (the crate: framing, VERSION, DEVICE_GET_INFO,
//! region and IRQ info) → `Transport` (the `ServerBackend`: bounds, config
//! space, DMA windows, SET_IRQS, reset) → the function. Whatever a client
//! gets wrong is an error reply, a counter and a rate-limited log line; a
//! connection ends with the function reset and its memory unmapped, and the
//! server listens for the next one.
//!
//! Limits of vfio_user 0.1.7 this module works around or lives with (see
//! [`VfioUserServer::serve_connection`]):
//! - It panics on a VERSION message whose JSON is not NUL-terminated or whose
//!   size is smaller than the header: the connection is caught and dropped.
//! - A refused request with a payload it did not read (REGION_WRITE to a region
//!   index past the last, an unknown command with data) leaves the rest of the
//!   payload in the stream, which it then parses as messages: that connection is
//!   garbage until the client closes it.
//! - Error replies carry errno 0 unless the crate itself found the input
//!   invalid (EINVAL); the crate logs every refused request at error level.
//! - No DMA_READ/DMA_WRITE: a window without an fd is accepted (QEMU maps ROMs
//!   that way) but unreachable, and counted.
//! - Its `DmaUnmapFlags` names differ from the protocol's bits; the bits are read
//!   as QEMU sends them (1: dirty bitmap, 2: unmap all).

mod config_space;
mod dma_memory;
mod function;
mod msix;
mod request_error;
mod server;
mod stats;
mod transport;

/// The guest memory the function reads and writes.
pub use crate::GuestMemory;
pub use config_space::PciIds;
pub use function::{Interrupts, PciFunction};
pub use server::{VfioUserError, VfioUserOptions, VfioUserServer};
pub use stats::{VfioUserStats, VfioUserStatsSnapshot};
