//! The controller behind a vfio-user socket, reached as QEMU's
//! `vfio-user-pci` reaches it: the `vfio_user` crate's [`Client`] for BAR0
//! and config space, host memory from a memfd sealed as QEMU's
//! memory-backend-memfd seals it, DMA-mapped to the server at IOVA 0 and
//! mapped here too ([`HostRam`]), and one eventfd per MSI-X vector.
//!
//! [`VfioUser::connect`] does the client's part of bringing a function up:
//! connect (retrying while the server is not yet listening), DMA_MAP,
//! SET_IRQS, and the command register's memory space and bus master bits.
//! [`probe`] first asks whether a vfio-user server is there at all: the
//! crate's [`Client`] waits without end for a reply, and takes one too short
//! for a VERSION reply for a panic.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use dma::Gpa;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use super::error::{Error, NotVfioUser};
use super::transport::{HostMemory, Interrupt, Transport, POLL};

/// The seals QEMU's memory-backend-memfd adds (seal=on, its default); the
/// server refuses memory that could shrink under it.
pub const QEMU_SEALS: libc::c_int = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
/// The PCI command register: memory space and bus master enabled.
const COMMAND_REGISTER: u64 = 0x04;
const MEMORY_AND_BUS_MASTER: [u8; 2] = [0x06, 0x00];
/// How long to wait before trying a socket nobody listens on again.
const RECONNECT: Duration = Duration::from_millis(20);

/// A memfd of `size` bytes with `seals` added after sizing it; with None,
/// one created without MFD_ALLOW_SEALING (memory-backend-memfd seal=off).
pub fn memfd(size: u64, seals: Option<libc::c_int>) -> Result<File, Error> {
    let failed = |source| Error::Create {
        what: "a memfd",
        source,
    };
    let allow = if seals.is_some() {
        libc::MFD_ALLOW_SEALING
    } else {
        0
    };
    // SAFETY: memfd_create reads the NUL-terminated name and nothing else.
    let fd = unsafe { libc::memfd_create(c"dmaprobe-host".as_ptr(), libc::MFD_CLOEXEC | allow) };
    if fd < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    // SAFETY: the descriptor was just returned by memfd_create, is open, and
    // nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(failed)?;
    if let Some(seals) = seals.filter(|&s| s != 0) {
        // SAFETY: fcntl on a descriptor we own; F_ADD_SEALS touches no memory.
        let added = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        if added != 0 {
            return Err(failed(io::Error::last_os_error()));
        }
    }
    Ok(file)
}

/// A new non-blocking eventfd.
pub fn eventfd() -> Result<File, Error> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Create {
            what: "an eventfd",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: the descriptor is new, open, and the File's alone.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The count of a non-blocking eventfd (which reading resets), or None if it
/// was not signalled.
pub fn take_count(efd: &File) -> io::Result<Option<u64>> {
    let mut b = [0; 8];
    match (&*efd).read_exact(&mut b) {
        Ok(()) => Ok(Some(u64::from_ne_bytes(b))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Blocks until `fd` is readable or `within` has passed (a signal ends the
/// wait early, as if it had passed).
fn wait_readable(fd: &File, within: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up: a wait of less than a millisecond still waits.
    let ms = libc::c_int::try_from(within.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Host memory: a memfd sealed as QEMU seals it, mapped shared here, so what
/// the device writes the host reads and the other way round.
pub struct HostRam {
    file: File,
    mem: GuestMemoryMmap<()>,
    size: u64,
}

impl fmt::Debug for HostRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRam")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl HostRam {
    /// `size` bytes of zeroed memory.
    pub fn new(size: u64) -> Result<HostRam, Error> {
        let len = usize::try_from(size).map_err(|_| Error::InvalidConfig("memory too large"))?;
        let file = memfd(size, Some(QEMU_SEALS))?;
        let dup = file.try_clone().map_err(|source| Error::Create {
            what: "a second descriptor of the memfd",
            source,
        })?;
        let local = FileOffset::new(dup, 0);
        let mem =
            GuestMemoryMmap::<()>::from_ranges_with_files([(GuestAddress(0), len, Some(local))])
                .map_err(Error::Mmap)?;
        Ok(HostRam { file, mem, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn memfd(&self) -> &File {
        &self.file
    }

    /// DMA-maps the memory through `client` at IOVA 0 as windows of the
    /// memfd that end at each of `ends` (the last one the memory's end), so
    /// one can be unmapped and the others kept.
    fn dma_map(&self, client: &mut Client, ends: &[u64]) -> Result<(), Error> {
        if ends.last() != Some(&self.size) || ends.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::InvalidConfig(
                "DMA windows must rise to the memory's end",
            ));
        }
        let mut start = 0;
        for &end in ends {
            client
                .dma_map(start, start, end - start, self.file.as_raw_fd())
                .map_err(|source| Error::Vfio {
                    request: "DMA_MAP",
                    source,
                })?;
            start = end;
        }
        Ok(())
    }
}

impl HostMemory for HostRam {
    fn read_mem(&self, gpa: Gpa, buf: &mut [u8]) -> Result<(), Error> {
        self.mem.read_mem(gpa, buf)
    }

    fn write_mem(&self, gpa: Gpa, data: &[u8]) -> Result<(), Error> {
        self.mem.write_mem(gpa, data)
    }

    fn load32(&self, gpa: Gpa) -> Result<u32, Error> {
        self.mem.load32(gpa)
    }

    fn store32(&self, gpa: Gpa, value: u32) -> Result<(), Error> {
        self.mem.store32(gpa, value)
    }
}

/// A vfio-user connection to an NVMe function: the client, the host memory
/// mapped to it, and an eventfd per MSI-X vector.
pub struct VfioUser {
    client: Mutex<Client>,
    ram: HostRam,
    irqs: Vec<File>,
}

impl fmt::Debug for VfioUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioUser")
            .field("ram", &self.ram)
            .field("vectors", &self.irqs.len())
            .finish_non_exhaustive()
    }
}

impl VfioUser {
    /// Connects to `socket` within `within`, DMA-maps `ram` as windows that
    /// end at `windows`, hands over `vectors` MSI-X eventfds and turns on
    /// memory space and bus mastering.
    pub fn connect(
        socket: &Path,
        within: Duration,
        ram: HostRam,
        windows: &[u64],
        vectors: u16,
    ) -> Result<VfioUser, Error> {
        let mut client = connect_client(socket, within)?;
        ram.dma_map(&mut client, windows)?;
        let irqs = (0..vectors)
            .map(|_| eventfd())
            .collect::<Result<Vec<_>, _>>()?;
        let vfio = |request| move |source| Error::Vfio { request, source };
        // One eventfd per message, as QEMU splits SET_IRQS by the server's
        // max_msg_fds: the `vfio_user` crate's server says 1 and drops a
        // connection whose message carries more than 16.
        for (vector, irq) in (0..).zip(&irqs) {
            client
                .set_irqs(
                    VFIO_PCI_MSIX_IRQ_INDEX,
                    VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                    vector,
                    1,
                    &[irq.as_raw_fd()],
                )
                .map_err(vfio("SET_IRQS"))?;
        }
        client
            .region_write(
                VFIO_PCI_CONFIG_REGION_INDEX,
                COMMAND_REGISTER,
                &MEMORY_AND_BUS_MASTER,
            )
            .map_err(vfio("REGION_WRITE of the command register"))?;
        Ok(VfioUser {
            client: Mutex::new(client),
            ram,
            irqs,
        })
    }

    pub fn ram(&self) -> &HostRam {
        &self.ram
    }

    /// The client, for what the driver does not do (DMA_UNMAP, say).
    pub fn client(&self) -> MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the connection (the server resets the function) and keeps the
    /// memory, to read what the device left there.
    pub fn disconnect(self) -> HostRam {
        self.ram
    }

    fn bar0_read(&self, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        self.client()
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, offset, data)
            .map_err(|source| Error::Vfio {
                request: "REGION_READ of BAR0",
                source,
            })
    }

    fn bar0_write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.client()
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, data)
            .map_err(|source| Error::Vfio {
                request: "REGION_WRITE of BAR0",
                source,
            })
    }
}

/// The VERSION command and the reply flag of a message header (vfio-user
/// 1.0, 2.1 and 3.2).
const VERSION: u16 = 1;
const REPLY: u32 = 1;
/// What a client offers in its VERSION message; the defaults otherwise.
const CAPABILITIES: &[u8] = b"{\"capabilities\":{}}\0";
/// A message header, and a VERSION message's major and minor fields.
const HEADER_LEN: usize = 16;
const VERSION_LEN: usize = HEADER_LEN + 4;
/// The message identifier of the probe's VERSION message.
const PROBE_ID: u16 = 0x7072;

/// Whether a vfio-user server answers at `socket`: a VERSION message on a
/// connection of its own, and the header of a VERSION reply within `within`
/// (then the connection closes; a server takes the next client). Nothing
/// listening is [`Error::Unreachable`]; something else answering, or
/// nothing answering in time, [`Error::NotVfioUser`].
pub fn probe(socket: &Path, within: Duration) -> Result<(), Error> {
    let mut stream = UnixStream::connect(socket).map_err(|source| Error::Unreachable {
        path: socket.to_owned(),
        source,
    })?;
    let not = |why| Error::NotVfioUser {
        path: socket.to_owned(),
        why,
    };
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => not(NotVfioUser::Silent(within)),
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => not(NotVfioUser::Closed),
        _ => not(NotVfioUser::Io(e)),
    };
    let timeout = Some(within.max(Duration::from_millis(1)));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(io)?;
    let size = u32::try_from(VERSION_LEN + CAPABILITIES.len()).unwrap_or(u32::MAX);
    let mut message = Vec::with_capacity(VERSION_LEN + CAPABILITIES.len());
    message.extend(PROBE_ID.to_le_bytes());
    message.extend(VERSION.to_le_bytes());
    message.extend(size.to_le_bytes());
    message.extend([0; 8]); // flags: a command; error: none
    message.extend([0, 0, 1, 0]); // version 0.1, as the crate's client says
    message.extend(CAPABILITIES);
    stream.write_all(&message).map_err(io)?;
    let mut reply = [0u8; HEADER_LEN];
    stream.read_exact(&mut reply).map_err(io)?;
    let id = u16::from_le_bytes([reply[0], reply[1]]);
    let command = u16::from_le_bytes([reply[2], reply[3]]);
    let size = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
    let flags = u32::from_le_bytes([reply[8], reply[9], reply[10], reply[11]]);
    if id != PROBE_ID || command != VERSION || flags & REPLY == 0 {
        return Err(not(NotVfioUser::Foreign));
    }
    // The rest of the reply read, the connection closes cleanly: the server
    // sees a client that left, not one that reset the connection.
    let rest = usize::try_from(size)
        .unwrap_or(0)
        .saturating_sub(HEADER_LEN);
    io::copy(
        &mut (&mut stream).take(rest.min(1 << 16) as u64),
        &mut io::sink(),
    )
    .map_err(io)?;
    Ok(())
}

/// Connects a [`Client`] to `socket`, trying again while nobody listens yet
/// (a daemon binds its socket a little after it starts).
fn connect_client(socket: &Path, within: Duration) -> Result<Client, Error> {
    let deadline = Instant::now().checked_add(within);
    loop {
        match Client::new(socket) {
            Ok(client) => return Ok(client),
            Err(source) if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Err(Error::Connect {
                    path: socket.to_owned(),
                    source,
                })
            }
            Err(_) => thread::sleep(RECONNECT),
        }
    }
}

impl Transport for VfioUser {
    type Memory = HostRam;

    fn memory(&self) -> &HostRam {
        &self.ram
    }

    fn read32(&self, offset: u64) -> Result<u32, Error> {
        let mut b = [0; 4];
        self.bar0_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read64(&self, offset: u64) -> Result<u64, Error> {
        let mut b = [0; 8];
        self.bar0_read(offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn write32(&self, offset: u64, value: u32) -> Result<(), Error> {
        self.bar0_write(offset, &value.to_le_bytes())
    }

    /// One 8-byte region write: the message carries it whole.
    fn write64(&self, offset: u64, value: u64) -> Result<(), Error> {
        self.bar0_write(offset, &value.to_le_bytes())
    }

    fn interrupt(&self, vector: u16) -> Result<Interrupt, Error> {
        let efd = self
            .irqs
            .get(usize::from(vector))
            .ok_or(Error::NoVector { vector })?;
        match take_count(efd) {
            Ok(Some(_)) => Ok(Interrupt::Fired),
            Ok(None) => Ok(Interrupt::Quiet),
            Err(source) => Err(Error::EventFd { vector, source }),
        }
    }

    /// poll(2) on the vector's eventfd, which stays signalled for
    /// [`Transport::interrupt`] to read.
    fn wait_interrupt(&self, vector: Option<u16>, within: Duration) -> Result<(), Error> {
        let Some(vector) = vector else {
            thread::sleep(within.min(POLL));
            return Ok(());
        };
        let efd = self
            .irqs
            .get(usize::from(vector))
            .ok_or(Error::NoVector { vector })?;
        wait_readable(efd, within).map_err(|source| Error::EventFd { vector, source })
    }

    fn clear_interrupts(&self) -> Result<(), Error> {
        for (vector, efd) in (0u16..).zip(&self.irqs) {
            take_count(efd).map_err(|source| Error::EventFd { vector, source })?;
        }
        Ok(())
    }
}
