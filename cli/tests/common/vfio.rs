//! A vfio-user client's side, as QEMU's `vfio-user-pci` plays it: guest
//! memory from a memfd, DMA-mapped to the server and mapped here too, MSI-X
//! vectors as eventfds, and the `vfio_user` crate's `Client` for the rest.
//! Shared by the transport's tests (tests/vfio_user.rs) and the NVMe
//! interface's (tests/nvme.rs).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

/// The seals QEMU's memory-backend-memfd adds (seal=on, its default).
const QEMU_SEALS: libc::c_int = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// A memfd of `size` bytes as QEMU's memory-backend-memfd makes it.
pub fn memfd(size: u64) -> File {
    memfd_with(size, Some(QEMU_SEALS))
}

/// A memfd of `size` bytes with `seals` added after sizing it; with None, one
/// created without MFD_ALLOW_SEALING (memory-backend-memfd with seal=off).
pub fn memfd_with(size: u64, seals: Option<libc::c_int>) -> File {
    let allow = if seals.is_some() {
        libc::MFD_ALLOW_SEALING
    } else {
        0
    };
    // SAFETY: memfd_create reads the NUL-terminated name; the descriptor it
    // returns is new and becomes the File's alone.
    let fd = unsafe { libc::memfd_create(c"vfio-user-test".as_ptr(), libc::MFD_CLOEXEC | allow) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("size the memfd");
    if let Some(seals) = seals.filter(|&s| s != 0) {
        // SAFETY: fcntl on a descriptor we own; F_ADD_SEALS touches no memory.
        let added = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(added, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    file
}

/// A new non-blocking eventfd.
pub fn eventfd() -> File {
    // SAFETY: eventfd takes no pointers; the descriptor is new and the File's alone.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    unsafe { File::from_raw_fd(fd) }
}

/// The eventfd's count (which reading resets), or None if it was not signalled.
pub fn take_count(efd: &File) -> Option<u64> {
    let mut b = [0; 8];
    (&*efd)
        .read_exact(&mut b)
        .ok()
        .map(|()| u64::from_ne_bytes(b))
}

/// Connects a `Client` to `socket`, retrying while the server is not yet
/// listening (a daemon child binds its socket a little after it starts).
pub fn connect(socket: &Path, within: Duration) -> Client {
    let deadline = Instant::now() + within;
    loop {
        match Client::new(socket) {
            Ok(client) => return client,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "vfio-user connect to {}: {e:?}",
                    socket.display()
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Guest memory: a memfd DMA-mapped to the server at IOVA 0 and mapped
/// shared here, so what the device writes the test reads and the other way
/// round.
pub struct GuestRam {
    file: File,
    mem: GuestMemoryMmap<()>,
    size: u64,
}

impl GuestRam {
    /// `size` bytes of memory, DMA-mapped through `client` at IOVA 0.
    pub fn map(client: &mut Client, size: u64) -> GuestRam {
        GuestRam::map_windows(client, size, &[size])
    }

    /// `size` bytes of memory, DMA-mapped through `client` at IOVA 0 as
    /// windows of the memfd that end at each of `ends` (the last one `size`),
    /// so a test can unmap one and keep the others.
    pub fn map_windows(client: &mut Client, size: u64, ends: &[u64]) -> GuestRam {
        assert_eq!(ends.last(), Some(&size), "the windows cover the memory");
        let file = memfd(size);
        let local = FileOffset::new(file.try_clone().expect("dup the memfd"), 0);
        let len = usize::try_from(size).expect("fits");
        let mem =
            GuestMemoryMmap::<()>::from_ranges_with_files([(GuestAddress(0), len, Some(local))])
                .expect("map the memfd here");
        let mut start = 0;
        for &end in ends {
            client
                .dma_map(start, start, end - start, file.as_raw_fd())
                .expect("DMA_MAP");
            start = end;
        }
        GuestRam { file, mem, size }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn memfd(&self) -> &File {
        &self.file
    }

    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("write guest memory at {gpa:#x}: {e}"));
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.mem
            .read_slice(&mut out, GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("read guest memory at {gpa:#x}: {e}"));
        out
    }

    pub fn fill(&self, gpa: u64, byte: u8, len: usize) {
        self.write(gpa, &vec![byte; len]);
    }

    /// A little-endian dword, read once (as a driver polls a phase tag).
    pub fn load32(&self, gpa: u64) -> u32 {
        self.mem
            .load::<u32>(GuestAddress(gpa), std::sync::atomic::Ordering::Acquire)
            .unwrap_or_else(|e| panic!("load guest memory at {gpa:#x}: {e}"))
    }
}

/// One eventfd per MSI-X vector `0..n`, handed to the server with SET_IRQS.
pub fn msix_eventfds(client: &mut Client, n: u32) -> Vec<File> {
    let efds: Vec<File> = (0..n).map(|_| eventfd()).collect();
    let fds: Vec<_> = efds.iter().map(AsRawFd::as_raw_fd).collect();
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            n,
            &fds,
        )
        .expect("SET_IRQS");
    efds
}
