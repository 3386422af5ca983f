//! The controller in this process: BAR0 through its own methods, host memory
//! the [`GuestMemory`] attached to it. A doorbell write runs the commands it
//! announces before it returns, so a completion is there to reap at once.
//! For the controller's unit tests and the fuzz target.

use std::sync::Arc;

use super::error::Error;
use super::transport::Transport;
use crate::nvme::command::low32;
use crate::nvme::Controller;
use crate::GuestMemory;

/// An in-process [`Controller`] and the memory attached to it (the caller
/// attaches it, with the interrupts it wants to see).
#[derive(Clone, Debug)]
pub struct InProcess {
    ctrl: Arc<Controller>,
    mem: GuestMemory,
}

impl InProcess {
    pub fn new(ctrl: Arc<Controller>, mem: GuestMemory) -> InProcess {
        InProcess { ctrl, mem }
    }

    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrl
    }
}

impl Transport for InProcess {
    type Memory = GuestMemory;

    fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn read32(&self, offset: u64) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        self.ctrl.bar0_read(offset, &mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn read64(&self, offset: u64) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.ctrl.bar0_read(offset, &mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn write32(&self, offset: u64, value: u32) -> Result<(), Error> {
        self.ctrl.bar0_write(offset, &value.to_le_bytes());
        Ok(())
    }

    /// Two dword writes, low then high, as Linux's lo_hi_writeq: the
    /// controller must take a 64-bit register in halves. Past the end of
    /// the address space the high half goes nowhere, as past BAR0.
    fn write64(&self, offset: u64, value: u64) -> Result<(), Error> {
        self.write32(offset, low32(value))?;
        self.write32(offset.saturating_add(4), low32(value >> 32))
    }
}
