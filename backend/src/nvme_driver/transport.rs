//! How the driver reaches a controller: [`Transport`] for its BAR0 registers
//! and interrupts, [`HostMemory`] for the memory its queues, PRP lists and
//! data buffers live in. Everything NVMe above them is the same whichever
//! way the controller is reached.

use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use dma::Gpa;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use super::error::Error;
use crate::GuestMemory;

/// The memory the host shares with the controller, at the addresses the
/// controller uses (guest-physical, or IOVA: the same here).
pub trait HostMemory {
    fn read_mem(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error>;

    fn write_mem(&self, gpa: Gpa, data: &[u8]) -> Result<(), Error>;

    /// A little-endian dword read at once with acquire ordering: a phase tag
    /// is polled while the controller may be writing its entry, so the rest
    /// of the entry is read only after the dword that says it is there.
    fn load32(&self, gpa: Gpa) -> Result<u32, Error>;

    /// A little-endian dword written at once with release ordering: a
    /// shadow doorbell, which the controller reads while the host may be
    /// writing it, announces the entries written before it.
    fn store32(&self, gpa: Gpa, value: u32) -> Result<(), Error>;

    /// `len` bytes from `gpa`.
    fn read_vec(&self, gpa: Gpa, len: usize) -> Result<Vec<u8>, Error> {
        let mut out = vec![0; len];
        self.read_mem(gpa, &mut out)?;
        Ok(out)
    }

    /// `len` bytes of `byte` at `gpa`.
    fn fill(&self, gpa: Gpa, byte: u8, len: usize) -> Result<(), Error> {
        self.write_mem(gpa, &vec![byte; len])
    }
}

/// Whether an interrupt vector fired, as far as the transport can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interrupt {
    /// It fired since it was last asked.
    Fired,
    /// It did not.
    Quiet,
    /// This transport does not see interrupts: the driver takes a posted
    /// completion as soon as it sees it.
    Unseen,
}

/// How the driver reaches the controller's BAR0 and interrupts, and which
/// memory the two share. Register accesses take `&self`, as MMIO does, so
/// queues on several threads can ring their doorbells.
pub trait Transport {
    type Memory: HostMemory;

    fn memory(&self) -> &Self::Memory;

    fn read32(&self, offset: u64) -> Result<u32, Error>;

    fn read64(&self, offset: u64) -> Result<u64, Error>;

    fn write32(&self, offset: u64, value: u32) -> Result<(), Error>;

    fn write64(&self, offset: u64, value: u64) -> Result<(), Error>;

    /// Whether MSI-X vector `vector` fired since it was last asked.
    fn interrupt(&self, _vector: u16) -> Result<Interrupt, Error> {
        Ok(Interrupt::Unseen)
    }

    /// Blocks until interrupt vector `vector` (None: a polled queue) may
    /// have fired, for `within` at most; [`Transport::interrupt`] then says
    /// whether it did. A transport that cannot block on its interrupts
    /// sleeps a little (a millisecond at most) and lets the caller look.
    fn wait_interrupt(&self, _vector: Option<u16>, within: Duration) -> Result<(), Error> {
        thread::sleep(within.min(POLL));
        Ok(())
    }

    /// Forgets the interrupts that fired so far: what a controller signalled
    /// before a reset announces nothing in the queues after it.
    fn clear_interrupts(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// How long a transport that cannot block on an interrupt sleeps before its
/// caller looks at a completion queue again.
pub(super) const POLL: Duration = Duration::from_millis(1);

fn memory_error(gpa: Gpa, len: usize) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |source| Error::Memory { gpa, len, source }
}

impl HostMemory for GuestMemoryMmap<()> {
    fn read_mem(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.read_slice(buf, gpa.into())
            .map_err(memory_error(gpa, buf.len()))
    }

    fn write_mem(&self, gpa: Gpa, data: &[u8]) -> Result<(), Error> {
        self.write_slice(data, gpa.into())
            .map_err(memory_error(gpa, data.len()))
    }

    fn load32(&self, gpa: Gpa) -> Result<u32, Error> {
        self.load::<u32>(GuestAddress(gpa.0), Ordering::Acquire)
            .map(u32::from_le)
            .map_err(memory_error(gpa, 4))
    }

    fn store32(&self, gpa: Gpa, value: u32) -> Result<(), Error> {
        self.store(value.to_le(), GuestAddress(gpa.0), Ordering::Release)
            .map_err(memory_error(gpa, 4))
    }
}

/// Memory as the daemon's transports hand it to a controller: the host side
/// of an in-process controller reads and writes the same.
impl HostMemory for GuestMemory {
    fn read_mem(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.memory().read_mem(gpa, buf)
    }

    fn write_mem(&self, gpa: Gpa, data: &[u8]) -> Result<(), Error> {
        self.memory().write_mem(gpa, data)
    }

    fn load32(&self, gpa: Gpa) -> Result<u32, Error> {
        self.memory().load32(gpa)
    }

    fn store32(&self, gpa: Gpa, value: u32) -> Result<(), Error> {
        self.memory().store32(gpa, value)
    }
}
