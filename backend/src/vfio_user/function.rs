//! What the transport and the PCI function behind it share: BAR0 accesses,
//! guest memory, interrupts.

use std::sync::Arc;

use crate::GuestMemory;

/// The PCI function behind the transport: BAR0 accesses, guest memory, interrupts.
pub trait PciFunction: Send + Sync {
    fn bar0_size(&self) -> u64;
    fn bar0_read(&self, offset: u64, data: &mut [u8]);
    fn bar0_write(&self, offset: u64, data: &[u8]);
    /// Called once, before the first client: `mem` is updated in place on every
    /// DMA map and unmap and emptied when a client leaves (after [`reset`]).
    ///
    /// [`reset`]: PciFunction::reset
    fn attach(&self, mem: GuestMemory, irqs: Arc<dyn Interrupts>);
    /// A function-level reset: on the client's DEVICE_RESET and when it leaves.
    fn reset(&self);
}

/// The function's MSI-X vectors.
pub trait Interrupts: Send + Sync {
    fn signal(&self, vector: u16);
}
