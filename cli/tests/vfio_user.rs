//! The vfio-user transport over a real socket: the `vfio_user` crate's `Client`
//! drives a server whose function keeps its BAR0 as plain memory and records
//! every call; raw messages stand in where the Client cannot (it cannot read an
//! error reply, and cannot send a broken message). Guest memory is a memfd
//! sealed as QEMU's memory-backend-memfd seals it.
//!
//! Guest memory that could shrink under the daemon is tested against
//! `dmaprobe serve --nvme` as a child process, whose controller fetches
//! commands from guest memory when a doorbell rings: a SIGBUS there kills the
//! daemon, not the test.
//!
//! `qemu_guest_nvme_driver_probes_the_function` (ignored: run with
//! `--ignored`) boots the Debian 6.12 kernel under the QEMU that
//! scripts/setup-qemu-vfio-user provides, with `-device vfio-user-pci` on a
//! stub NVMe controller, and checks that Linux's nvme driver probes it and
//! gets one admin command back through guest memory and an MSI-X interrupt.

mod common;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend::vfio_user::{
    GuestMemory, Interrupts, PciFunction, VfioUserOptions, VfioUserServer, VfioUserStats,
};
use common::child::{Serve, SOON};
use common::vfio::{eventfd, memfd, memfd_with, take_count};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR1_REGION_INDEX,
    VFIO_PCI_BAR4_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_NUM_REGIONS,
};
use vfio_user::Client;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// What the test function was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Read(u64, usize),
    Write(u64, Vec<u8>),
}

/// A function whose BAR0 is plain memory.
#[derive(Default)]
struct TestFunction {
    size: u64,
    regs: Mutex<Vec<u8>>,
    calls: Mutex<Vec<Call>>,
    mem: Mutex<Option<GuestMemory>>,
    irqs: Mutex<Option<Arc<dyn Interrupts>>>,
    resets: AtomicU64,
}

impl TestFunction {
    fn new(size: u64) -> Arc<TestFunction> {
        Arc::new(TestFunction {
            size,
            regs: Mutex::new(vec![0; size as usize]),
            ..Default::default()
        })
    }

    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn memory(&self) -> GuestMemory {
        self.mem.lock().unwrap().clone().expect("attached")
    }

    fn signal(&self, vector: u16) {
        self.irqs
            .lock()
            .unwrap()
            .as_ref()
            .expect("attached")
            .signal(vector);
    }
}

impl PciFunction for TestFunction {
    fn bar0_size(&self) -> u64 {
        self.size
    }

    fn bar0_read(&self, offset: u64, data: &mut [u8]) {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Read(offset, data.len()));
        let o = offset as usize;
        data.copy_from_slice(&self.regs.lock().unwrap()[o..o + data.len()]);
    }

    fn bar0_write(&self, offset: u64, data: &[u8]) {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Write(offset, data.to_vec()));
        let o = offset as usize;
        self.regs.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
    }

    fn attach(&self, mem: GuestMemory, irqs: Arc<dyn Interrupts>) {
        *self.mem.lock().unwrap() = Some(mem);
        *self.irqs.lock().unwrap() = Some(irqs);
    }

    fn reset(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
    }
}

/// A server for `function` serving clients on a thread; it outlives the test.
struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stats: Arc<VfioUserStats>,
}

fn serve(function: Arc<dyn PciFunction>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vfio-user.sock");
    let mut server = VfioUserServer::new(&socket, function, VfioUserOptions::default()).unwrap();
    let stats = server.stats();
    std::thread::spawn(move || server.serve());
    Fixture {
        _dir: dir,
        socket,
        stats,
    }
}

fn config(client: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0; len];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, offset, &mut data)
        .unwrap();
    data
}

fn config32(client: &mut Client, offset: u64) -> u32 {
    u32::from_le_bytes(config(client, offset, 4).try_into().unwrap())
}

#[test]
fn config_space_is_an_nvme_function_with_a_64bit_bar0_and_msix() {
    let f = TestFunction::new(0x3000);
    let fx = serve(f.clone());
    let mut client = Client::new(&fx.socket).unwrap();

    // Regions as the client learnt them: BAR0 rounded up to a power of two.
    assert_eq!(
        client.region(VFIO_PCI_BAR0_REGION_INDEX).unwrap().size,
        0x4000
    );
    assert_eq!(
        client.region(VFIO_PCI_CONFIG_REGION_INDEX).unwrap().size,
        256
    );
    assert_eq!(client.region(VFIO_PCI_BAR1_REGION_INDEX).unwrap().size, 0);
    let bar4 = client.region(VFIO_PCI_BAR4_REGION_INDEX).unwrap().size;
    assert!(bar4 >= 4096 && bar4.is_power_of_two());
    assert!(client.region(VFIO_PCI_NUM_REGIONS - 1).is_some());

    let header = config(&mut client, 0, 64);
    assert_eq!(
        &header[0x09..0x0c],
        &[0x02, 0x08, 0x01],
        "class code NVM Express"
    );
    assert_eq!(header[0x0e], 0, "type 0 header, single function");
    assert_ne!(
        u16::from_le_bytes([header[6], header[7]]) & (1 << 4),
        0,
        "capability list"
    );
    assert_eq!(header[0x3d], 0, "no INTx pin");
    assert_eq!(
        config32(&mut client, 0x10) & 0xf,
        0b0100,
        "BAR0: 64-bit memory"
    );

    // BAR sizing as the BIOS does it.
    let bar0 = VFIO_PCI_CONFIG_REGION_INDEX;
    client.region_write(bar0, 0x10, &[0xff; 8]).unwrap();
    assert_eq!(config32(&mut client, 0x10), !(0x4000 - 1) | 0b0100);
    assert_eq!(config32(&mut client, 0x14), u32::MAX);
    client
        .region_write(bar0, 0x10, &0xfebf_0000u32.to_le_bytes())
        .unwrap();
    client.region_write(bar0, 0x14, &[0; 4]).unwrap();
    assert_eq!(config32(&mut client, 0x10), 0xfebf_0004);
    client.region_write(bar0, 0x20, &[0xff; 4]).unwrap();
    assert_eq!(config32(&mut client, 0x20), !(bar4 as u32 - 1) | 0b0100);

    // Command register: memory space and bus master stick, I/O space does not.
    client.region_write(bar0, 0x04, &[0x07, 0x00]).unwrap();
    assert_eq!(config(&mut client, 0x04, 2), [0x06, 0x00]);

    // The capability list: MSI-X, table at BAR4 offset 0, PBA in BAR4 after it.
    let cap = header[0x34] as u64;
    let msix = config(&mut client, cap, 12);
    assert_eq!(msix[0], 0x11, "MSI-X capability id");
    assert_eq!(msix[1], 0, "the last capability");
    let vectors = (u16::from_le_bytes([msix[2], msix[3]]) & 0x7ff) + 1;
    assert_eq!(vectors, VfioUserOptions::default().msix_vectors);
    let table = u32::from_le_bytes(msix[4..8].try_into().unwrap());
    let pba = u32::from_le_bytes(msix[8..12].try_into().unwrap());
    assert_eq!((table & 7, table & !7), (4, 0));
    assert_eq!(pba & 7, 4);
    assert!(u64::from(pba & !7) >= u64::from(vectors) * 16 && u64::from(pba & !7) < bar4);
    let info = client.get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap();
    assert_eq!(
        (info.count, info.flags),
        (u32::from(vectors), VFIO_IRQ_INFO_EVENTFD)
    );
    // MSI-X Enable is writable, the table size is not.
    client.region_write(bar0, cap + 2, &[0xff, 0xff]).unwrap();
    assert_eq!(
        config(&mut client, cap + 2, 2),
        (0xc000 | (vectors - 1)).to_le_bytes()
    );

    // Config space is not BAR0: the function saw nothing.
    assert_eq!(f.calls(), []);
}

#[test]
fn bar0_accesses_reach_the_function_unchanged() {
    let f = TestFunction::new(0x3000);
    let fx = serve(f.clone());
    let mut client = Client::new(&fx.socket).unwrap();

    client
        .region_write(VFIO_PCI_BAR0_REGION_INDEX, 0x14, &[1, 2, 3, 4])
        .unwrap();
    client
        .region_write(VFIO_PCI_BAR0_REGION_INDEX, 0x1008, &[9; 8])
        .unwrap();
    let mut cc = [0; 4];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x14, &mut cc)
        .unwrap();
    assert_eq!(cc, [1, 2, 3, 4]);
    assert_eq!(
        f.calls(),
        [
            Call::Write(0x14, vec![1, 2, 3, 4]),
            Call::Write(0x1008, vec![9; 8]),
            Call::Read(0x14, 4),
        ]
    );
    assert_eq!(&f.regs.lock().unwrap()[0x1008..0x1010], &[9; 8]);

    // Past the function's 0x3000 bytes, inside the 0x4000 BAR: zeros, and the
    // function is not asked; an access straddling the end is cut at it.
    let mut tail = [0xaa; 8];
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x3800, &mut tail)
        .unwrap();
    assert_eq!(tail, [0; 8]);
    client
        .region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x2ffc, &mut tail)
        .unwrap();
    assert_eq!(f.calls(), [Call::Read(0x2ffc, 4)]);

    client.reset().unwrap();
    assert_eq!(f.resets.load(Ordering::Relaxed), 1);
}

#[test]
fn dma_map_makes_the_memfd_the_functions_guest_memory_at_the_iova() {
    let f = TestFunction::new(0x2000);
    let fx = serve(f.clone());
    let mut client = Client::new(&fx.socket).unwrap();
    let fd = memfd(4 << 20);
    fd.write_all_at(b"low window", 0x1000).unwrap();
    fd.write_all_at(b"high window", (2 << 20) + 0x20).unwrap();

    // Two windows of one memfd, as QEMU maps RAM below and above 4 GiB.
    client.dma_map(0, 0, 2 << 20, fd.as_raw_fd()).unwrap();
    client
        .dma_map(2 << 20, 0x1_0000_0000, 2 << 20, fd.as_raw_fd())
        .unwrap();
    let mem = f.memory();
    let mut buf = [0u8; 11];
    mem.memory()
        .read_slice(&mut buf[..10], GuestAddress(0x1000))
        .unwrap();
    assert_eq!(&buf[..10], b"low window");
    mem.memory()
        .read_slice(&mut buf, GuestAddress(0x1_0000_0020))
        .unwrap();
    assert_eq!(&buf, b"high window");
    // Shared: what the device writes, the client's memory holds.
    mem.memory()
        .write_slice(b"from the device", GuestAddress(0x1_0000_1000))
        .unwrap();
    let mut back = [0u8; 15];
    fd.read_exact_at(&mut back, (2 << 20) + 0x1000).unwrap();
    assert_eq!(&back, b"from the device");
    assert_eq!(mem.memory().num_regions(), 2);

    // A held snapshot survives the unmap; the published memory loses it.
    let held = mem.memory();
    client.dma_unmap(0x1_0000_0000, 2 << 20).unwrap();
    assert!(mem
        .memory()
        .read_slice(&mut buf, GuestAddress(0x1_0000_0020))
        .is_err());
    held.read_slice(&mut buf, GuestAddress(0x1_0000_0020))
        .unwrap();
    assert_eq!(&buf, b"high window");
    assert_eq!(mem.memory().num_regions(), 1);

    // The client leaving unmaps the rest and resets the function.
    client.shutdown().unwrap();
    drop(client);
    wait_for(|| fx.stats.connections.load(Ordering::Relaxed) == 1);
    assert_eq!(mem.memory().num_regions(), 0);
    assert_eq!(f.resets.load(Ordering::Relaxed), 1);
    let s = fx.stats.snapshot();
    assert_eq!((s.dma_maps, s.dma_unmaps, s.refused), (2, 1, 0));
}

#[test]
fn set_irqs_eventfds_fire_on_signal_and_unset_vectors_drop() {
    let f = TestFunction::new(0x2000);
    let fx = serve(f.clone());
    let mut client = Client::new(&fx.socket).unwrap();
    let (e0, e1) = (eventfd(), eventfd());
    let trigger = VFIO_IRQ_SET_ACTION_TRIGGER;

    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | trigger,
            0,
            2,
            &[e0.as_raw_fd(), e1.as_raw_fd()],
        )
        .unwrap();
    f.signal(1);
    f.signal(1);
    assert_eq!(take_count(&e1), Some(2));
    assert_eq!(take_count(&e0), None);
    f.signal(0);
    assert_eq!(take_count(&e0), Some(1));

    // DATA_NONE + TRIGGER fires vectors from the client's side (loopback).
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | trigger,
            1,
            1,
            &[],
        )
        .unwrap();
    assert_eq!(take_count(&e1), Some(1));

    // QEMU unsets a run of vectors by sending no fds for them.
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | trigger,
            1,
            1,
            &[],
        )
        .unwrap();
    f.signal(1);
    f.signal(5);
    f.signal(u16::MAX);
    assert_eq!(take_count(&e1), None);
    // Disable all: count 0.
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_NONE | trigger,
            0,
            0,
            &[],
        )
        .unwrap();
    f.signal(0);
    assert_eq!(take_count(&e0), None);

    let s = fx.stats.snapshot();
    assert_eq!(
        (s.eventfds_set, s.irqs_delivered, s.irqs_dropped),
        (2, 4, 4)
    );
}

/// Polls `cond` for up to 5 s.
fn wait_for(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Raw messages

const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const SET_IRQS: u16 = 8;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const FLAG_ERROR: u32 = 1 << 5;

/// A vfio-user client that writes messages by hand.
struct Raw {
    stream: UnixStream,
    id: u16,
}

#[derive(Debug)]
struct Reply {
    command: u16,
    flags: u32,
    error: u32,
    body: Vec<u8>,
}

impl Reply {
    fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

impl Raw {
    /// Connects, retrying while the server is not yet listening (a daemon
    /// child binds its socket a little after it starts).
    fn connect(path: &Path) -> Raw {
        let deadline = Instant::now() + SOON;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Raw { stream, id: 0 }
    }

    fn send(&mut self, command: u16, body: &[u8], fds: &[RawFd]) {
        self.id = self.id.wrapping_add(1);
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&self.id.to_le_bytes());
        msg.extend_from_slice(&command.to_le_bytes());
        msg.extend_from_slice(&(16 + body.len() as u32).to_le_bytes());
        msg.extend_from_slice(&[0; 8]); // flags: command; error
        msg.extend_from_slice(body);
        if fds.is_empty() {
            self.stream.write_all(&msg).unwrap();
        } else {
            self.stream.send_with_fds(&[&msg[..]], fds).unwrap();
        }
    }

    fn reply(&mut self) -> Reply {
        self.try_reply().expect("a reply")
    }

    /// The reply, or why none came (the server closed the connection or died).
    fn try_reply(&mut self) -> io::Result<Reply> {
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h)?;
        let le16 = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let le32 = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        assert_eq!(le16(0), self.id, "reply to the last message");
        let mut body = vec![0; le32(4) as usize - 16];
        self.stream.read_exact(&mut body)?;
        Ok(Reply {
            command: le16(2),
            flags: le32(8),
            error: le32(12),
            body,
        })
    }

    fn request(&mut self, command: u16, body: &[u8], fds: &[RawFd]) -> Reply {
        self.send(command, body, fds);
        self.reply()
    }

    fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Reply {
        self.request(REGION_READ, &region_access(region, offset, count), &[])
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Reply {
        let mut body = region_access(region, offset, data.len() as u32);
        body.extend_from_slice(data);
        self.request(REGION_WRITE, &body, &[])
    }

    fn dma_map(&mut self, offset: u64, address: u64, size: u64, fds: &[RawFd]) -> Reply {
        let mut body = Vec::new();
        body.extend_from_slice(&32u32.to_le_bytes()); // argsz
        body.extend_from_slice(&3u32.to_le_bytes()); // read | write
        for v in [offset, address, size] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        self.request(DMA_MAP, &body, fds)
    }

    fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> Reply {
        let mut body = Vec::new();
        body.extend_from_slice(&24u32.to_le_bytes());
        body.extend_from_slice(&flags.to_le_bytes());
        body.extend_from_slice(&address.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        self.request(DMA_UNMAP, &body, &[])
    }

    fn set_irqs(&mut self, index: u32, flags: u32, start: u32, count: u32, fds: &[RawFd]) -> Reply {
        let mut body = Vec::new();
        for v in [20, flags, index, start, count] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        self.request(SET_IRQS, &body, fds)
    }

    /// The connection still answers in step: config space's vendor dword.
    fn assert_in_step(&mut self) {
        let r = self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 8, 4);
        assert!(!r.is_error(), "{r:?}");
        assert_eq!(
            &r.body[16..],
            &[0x00, 0x02, 0x08, 0x01],
            "revision and class code"
        );
    }
}

fn region_access(region: u32, offset: u64, count: u32) -> Vec<u8> {
    let mut body = offset.to_le_bytes().to_vec();
    body.extend_from_slice(&region.to_le_bytes());
    body.extend_from_slice(&count.to_le_bytes());
    body
}

#[test]
fn malformed_requests_get_error_replies_and_the_connection_goes_on() {
    let f = TestFunction::new(0x2000);
    let fx = serve(f.clone());
    let mut raw = Raw::connect(&fx.socket);
    raw.assert_in_step();

    let refusals: Vec<(&str, Reply)> = vec![
        (
            "region index past the last",
            raw.region_read(VFIO_PCI_NUM_REGIONS, 0, 4),
        ),
        (
            "a region of size 0",
            raw.region_read(VFIO_PCI_BAR1_REGION_INDEX, 0, 4),
        ),
        (
            "read past BAR0",
            raw.region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x1ffc, 8),
        ),
        (
            "offset that wraps",
            raw.region_read(VFIO_PCI_BAR0_REGION_INDEX, u64::MAX - 1, 4),
        ),
        (
            "write past config space",
            raw.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0xfe, &[0; 4]),
        ),
        ("an unknown command", raw.request(99, &[], &[])),
        ("DMA_READ (unsupported)", raw.request(11, &[], &[])),
        ("DMA map past the end of the memfd", {
            let fd = memfd(1 << 20);
            raw.dma_map(0, 0, 2 << 20, &[fd.as_raw_fd()])
        }),
        ("DMA map at an unaligned file offset", {
            let fd = memfd(1 << 20);
            raw.dma_map(0x10, 0, 0x1000, &[fd.as_raw_fd()])
        }),
        ("DMA map of size 0", {
            let fd = memfd(1 << 20);
            raw.dma_map(0, 0, 0, &[fd.as_raw_fd()])
        }),
        ("DMA map that wraps", {
            let fd = memfd(1 << 20);
            raw.dma_map(0, u64::MAX - 0xfff, 0x2000, &[fd.as_raw_fd()])
        }),
        ("DMA map with two fds", {
            let fd = memfd(1 << 20);
            raw.dma_map(0, 0, 0x1000, &[fd.as_raw_fd(), fd.as_raw_fd()])
        }),
        (
            "DMA unmap with the dirty-bitmap flag",
            raw.dma_unmap(1, 0, 0x1000),
        ),
        (
            "SET_IRQS past the table",
            raw.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0x21, 60, 10, &[]),
        ),
        (
            "SET_IRQS range that wraps",
            raw.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0x21, u32::MAX, 2, &[]),
        ),
        ("SET_IRQS with fewer fds than vectors", {
            let e = eventfd();
            raw.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0x24, 0, 2, &[e.as_raw_fd()])
        }),
        (
            "SET_IRQS with DATA_BOOL",
            raw.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, 0x22, 0, 1, &[]),
        ),
        ("SET_IRQS on INTx", raw.set_irqs(0, 0x21, 0, 1, &[])),
        (
            "SET_IRQS index past the last",
            raw.set_irqs(7, 0x21, 0, 0, &[]),
        ),
    ];
    for (what, reply) in &refusals {
        assert!(reply.is_error(), "{what}: {reply:?}");
        raw.assert_in_step();
    }
    // Where the crate itself found the input invalid, errno is EINVAL.
    assert_eq!(refusals[0].1.error, libc::EINVAL as u32);
    assert_eq!(refusals[0].1.command, REGION_READ);

    // Nothing reached the function, and valid requests still work.
    assert_eq!(f.calls(), []);
    let fd = memfd(1 << 20);
    assert!(!raw
        .dma_map(0, 0x10_0000, 1 << 20, &[fd.as_raw_fd()])
        .is_error());
    let overlapping = raw.dma_map(0, 0x18_0000, 1 << 20, &[fd.as_raw_fd()]);
    assert!(overlapping.is_error(), "overlapping window");
    let splitting = raw.dma_unmap(0, 0x10_0000, 0x1000);
    assert!(splitting.is_error(), "unmap of part of a window");
    assert_eq!(f.memory().memory().num_regions(), 1);
    assert!(!raw.dma_unmap(2, 0, 0).is_error(), "unmap all");
    assert_eq!(f.memory().memory().num_regions(), 0);
    // A window without an fd (the client would want DMA_READ/WRITE) is taken
    // but the device cannot reach it.
    assert!(!raw.dma_map(0, 0x20_0000, 0x1000, &[]).is_error());
    assert_eq!(f.memory().memory().num_regions(), 0);

    let s = fx.stats.snapshot();
    assert!(s.refused >= 13, "{s:?}");
    assert_eq!((s.dma_unreachable, s.broken_connections), (1, 0));
}

#[test]
fn a_message_the_crate_panics_on_drops_that_connection_only() {
    let f = TestFunction::new(0x2000);
    let fx = serve(f.clone());
    let fd = memfd(1 << 20);
    {
        let mut raw = Raw::connect(&fx.socket);
        assert!(!raw.dma_map(0, 0, 1 << 20, &[fd.as_raw_fd()]).is_error());
        // VERSION whose JSON is not NUL-terminated: vfio_user 0.1.7 unwraps.
        let mut body = vec![0, 0, 1, 0];
        body.extend_from_slice(br#"{"capabilities":{}}"#);
        raw.send(VERSION, &body, &[]);
        let mut byte = [0u8; 1];
        assert_eq!(raw.stream.read(&mut byte).unwrap(), 0, "connection closed");
    }
    wait_for(|| fx.stats.connections.load(Ordering::Relaxed) == 1);
    let s = fx.stats.snapshot();
    assert_eq!(s.broken_connections, 1);
    // The broken connection's memory is gone and the function was reset.
    assert_eq!(f.memory().memory().num_regions(), 0);
    assert_eq!(f.resets.load(Ordering::Relaxed), 1);

    // The next client is served as usual.
    let mut client = Client::new(&fx.socket).unwrap();
    assert_eq!(config(&mut client, 0x09, 3), [0x02, 0x08, 0x01]);
    let mut raw_after = Raw::connect(&fx.socket);
    drop(client);
    raw_after.assert_in_step();
}

// ---------------------------------------------------------------------------
// Guest memory that cannot shrink
//
// The daemon maps each DMA window of the client's file shared. Were the file
// truncated under the mapping, the device's next access to it (the SQ fetch of
// a doorbell) would be a SIGBUS that kills the daemon. So a memfd must be
// sealed against shrinking, as QEMU's memory-backend-memfd seals it by default.

#[test]
fn dma_map_refuses_a_memfd_that_can_shrink_and_trusts_a_file_that_cannot_be_sealed() {
    let f = TestFunction::new(0x2000);
    let fx = serve(f.clone());
    let mut raw = Raw::connect(&fx.socket);
    let size = 1 << 20;
    let file_in = |dir: &Path| {
        let file = tempfile::tempfile_in(dir).expect("a file");
        file.set_len(size).expect("size the file");
        file
    };
    let cases = [
        (
            "a memfd that cannot be sealed (seal=off)",
            memfd_with(size, None),
            false,
        ),
        ("a memfd with no seals", memfd_with(size, Some(0)), false),
        (
            "a memfd sealed against growing only",
            memfd_with(size, Some(libc::F_SEAL_GROW | libc::F_SEAL_SEAL)),
            false,
        ),
        (
            "a memfd sealed against shrinking only",
            memfd_with(size, Some(libc::F_SEAL_SHRINK)),
            true,
        ),
        ("a memfd sealed as QEMU seals it", memfd(size), true),
        // memory-backend-file: the kernel cannot seal these, the frontend is
        // trusted not to truncate them.
        ("a tmpfs file", file_in(Path::new("/dev/shm")), true),
        (
            "a file on the build's filesystem",
            file_in(Path::new(env!("CARGO_TARGET_TMPDIR"))),
            true,
        ),
    ];
    let mut at = 0;
    for (what, file, accepted) in &cases {
        let reply = raw.dma_map(0, at, size, &[file.as_raw_fd()]);
        assert_eq!(!reply.is_error(), *accepted, "{what}: {reply:?}");
        raw.assert_in_step();
        at += size;
    }
    assert_eq!(f.memory().memory().num_regions(), 4);
    let s = fx.stats.snapshot();
    assert_eq!((s.dma_maps, s.dma_unsealed, s.refused), (4, 2, 3), "{s:?}");
}

/// Guest memory of the tests against the daemon: 1 MiB at IOVA 0, the admin
/// submission queue in its first page, the completion queue in the second.
const RAM: u64 = 1 << 20;
const ASQ: u64 = 0;
const ACQ: u64 = 0x1000;

/// Writes a register of BAR0, which must be accepted.
fn bar0_write(raw: &mut Raw, offset: u64, data: &[u8]) {
    let reply = raw.region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, data);
    assert!(!reply.is_error(), "BAR0 write at {offset:#x}: {reply:?}");
}

fn csts(raw: &mut Raw) -> u32 {
    let reply = raw.region_read(VFIO_PCI_BAR0_REGION_INDEX, 0x1c, 4);
    assert!(!reply.is_error(), "CSTS: {reply:?}");
    u32::from_le_bytes(reply.body[16..20].try_into().unwrap())
}

/// Memory space and bus mastering on, then the controller reset and enabled
/// with two-entry admin queues at ASQ and ACQ. Whether it became ready is for
/// the caller to check.
/// A client with guest memory sealed as QEMU seals it, mapped, and the
/// controller enabled with its admin queues.
fn ready_client(socket: &Path) -> (Raw, File) {
    let mut raw = Raw::connect(socket);
    let ram = memfd(RAM);
    let map = raw.dma_map(0, 0, RAM, &[ram.as_raw_fd()]);
    assert!(!map.is_error(), "{map:?}");
    enable_admin(&mut raw);
    wait_for_csts(&mut raw, 1);
    (raw, ram)
}

fn enable_admin(raw: &mut Raw) {
    let reply = raw.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &[0x06, 0x00]);
    assert!(!reply.is_error(), "command register: {reply:?}");
    bar0_write(raw, 0x14, &0u32.to_le_bytes());
    wait_for_csts(raw, 0);
    bar0_write(raw, 0x24, &(1u32 << 16 | 1).to_le_bytes());
    bar0_write(raw, 0x28, &ASQ.to_le_bytes());
    bar0_write(raw, 0x30, &ACQ.to_le_bytes());
    // EN, 64-byte SQ entries, 16-byte CQ entries, 4 KiB pages.
    bar0_write(raw, 0x14, &(6u32 << 16 | 4 << 20 | 1).to_le_bytes());
}

/// Polls CSTS until its RDY bit (and everything else) reads `want`.
fn wait_for_csts(raw: &mut Raw, want: u32) {
    let deadline = Instant::now() + SOON;
    loop {
        let got = csts(raw);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "CSTS {got:#x}, not {want:#x}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The SQ 0 tail doorbell write that submits the admin queue's first entry.
fn ring_admin_doorbell(raw: &mut Raw) -> io::Result<Reply> {
    let mut body = region_access(VFIO_PCI_BAR0_REGION_INDEX, SQ0TDBL, 4);
    body.extend_from_slice(&1u32.to_le_bytes());
    raw.send(REGION_WRITE, &body, &[]);
    raw.try_reply()
}

/// Get Features (Number of Queues) as the first entry of a freshly enabled
/// admin queue in `ram`; returns the status of its completion once the
/// controller posts it there (phase tag stripped, 0 is success).
fn get_features_status(raw: &mut Raw, ram: &File) -> u16 {
    let cid: u16 = 0x77;
    let mut sqe = [0u8; 64];
    sqe[0] = 0x0a;
    sqe[2..4].copy_from_slice(&cid.to_le_bytes());
    sqe[40..44].copy_from_slice(&7u32.to_le_bytes());
    ram.write_all_at(&sqe, ASQ).unwrap();
    ram.write_all_at(&[0; 16], ACQ).unwrap();
    let reply = ring_admin_doorbell(raw).expect("a reply to the doorbell");
    assert!(!reply.is_error(), "doorbell: {reply:?}");
    let deadline = Instant::now() + SOON;
    let mut cqe = [0u8; 16];
    loop {
        ram.read_exact_at(&mut cqe, ACQ).unwrap();
        if cqe[14] & 1 == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no completion in guest memory");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(u16::from_le_bytes([cqe[12], cqe[13]]), cid, "{cqe:?}");
    u16::from_le_bytes([cqe[14], cqe[15]]) >> 1
}

/// `answered` is the daemon's reply to the last request: none, and the
/// daemon has died — panics with how it did.
fn assert_lives(s: &mut Serve, answered: io::Result<Reply>, what: &str) {
    if let Err(e) = answered {
        let deadline = Instant::now() + SOON;
        while Instant::now() < deadline {
            if let Some(status) = s.child.try_wait().expect("try_wait") {
                panic!("{what} killed dmaprobe serve ({status}); the client saw {e}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no reply to {what} ({e}), though dmaprobe serve lives");
    }
    s.assert_alive();
}

#[test]
fn a_memfd_that_can_shrink_is_refused_so_truncating_it_cannot_kill_the_daemon() {
    let mut s = Serve::start(&["--nvme"]);
    let mut raw = Raw::connect(&s.socket);
    let ram = memfd_with(RAM, None);
    let map = raw.dma_map(0, 0, RAM, &[ram.as_raw_fd()]);
    // The client shrinks its memory to nothing and rings a doorbell: were the
    // memfd mapped, the SQ fetch would read past its end.
    enable_admin(&mut raw);
    ram.set_len(0).expect("an unsealed memfd can be truncated");
    let answered = ring_admin_doorbell(&mut raw);
    assert_lives(&mut s, answered, "the doorbell after the truncation");
    assert!(map.is_error(), "an unsealed memfd was mapped: {map:?}");
    let log = std::fs::read_to_string(s.dir.path().join("serve.err")).unwrap();
    assert!(
        log.contains("refused DMA map") && log.contains("seal=on"),
        "the log names neither the refusal nor its remedy:\n{log}"
    );

    // The daemon serves the next client, whose memory is sealed.
    drop(raw);
    let (mut raw, ram) = ready_client(&s.socket);
    assert_eq!(get_features_status(&mut raw, &ram), 0);
    s.assert_alive();
}

#[test]
fn sealed_guest_memory_cannot_be_truncated_and_the_doorbell_after_the_attempt_is_served() {
    let mut s = Serve::start(&["--nvme"]);
    let (mut raw, ram) = ready_client(&s.socket);
    let truncated = ram.set_len(0);
    assert_eq!(
        truncated.map_err(|e| e.raw_os_error()),
        Err(Some(libc::EPERM)),
        "truncating a memfd sealed against shrinking"
    );
    assert_eq!(ram.metadata().unwrap().len(), RAM);
    assert_eq!(get_features_status(&mut raw, &ram), 0);
    s.assert_alive();
}

// ---------------------------------------------------------------------------
// Under QEMU

/// Just enough of an NVMe controller for Linux's nvme driver to probe it and
/// run one admin command round trip: CAP (MQES 63, CQR, TO 500 ms, the NVM
/// command set), VS 1.4, CSTS.RDY following CC.EN, and an admin queue that
/// answers every command with Invalid Command Opcode (do not retry): the SQE
/// is read from guest memory, the CQE written there, and vector 0 signalled.
/// The driver then gives up on Identify, shuts the controller down (CSTS.SHST
/// reports it complete at once) and fails the probe.
struct StubNvme {
    state: Mutex<StubState>,
    mem: Mutex<Option<GuestMemory>>,
    irqs: Mutex<Option<Arc<dyn Interrupts>>>,
    cap_reads: AtomicU64,
    enabled: AtomicBool,
    /// ASQ and ACQ, when CC.EN was set, resolved in the guest memory.
    admin_queues_mapped: AtomicBool,
    /// Admin commands read from guest memory and completed there.
    completed: AtomicU64,
}

struct StubState {
    regs: [u8; 0x1000],
    sq_head: u16,
    cq_tail: u16,
    phase: bool,
}

const CC: usize = 0x14;
const CSTS: usize = 0x1c;
const SQ0TDBL: u64 = 0x1000;

impl StubNvme {
    fn new() -> Arc<StubNvme> {
        let mut regs = [0u8; 0x1000];
        let cap: u64 = 63 | (1 << 16) | (1 << 24) | (1 << 37);
        regs[..8].copy_from_slice(&cap.to_le_bytes());
        regs[8..12].copy_from_slice(&0x0001_0400u32.to_le_bytes());
        Arc::new(StubNvme {
            state: Mutex::new(StubState {
                regs,
                sq_head: 0,
                cq_tail: 0,
                phase: true,
            }),
            mem: Mutex::new(None),
            irqs: Mutex::new(None),
            cap_reads: AtomicU64::new(0),
            enabled: AtomicBool::new(false),
            admin_queues_mapped: AtomicBool::new(false),
            completed: AtomicU64::new(0),
        })
    }

    fn reg32(st: &StubState, o: usize) -> u32 {
        u32::from_le_bytes(st.regs[o..o + 4].try_into().unwrap())
    }

    fn reg64(st: &StubState, o: usize) -> u64 {
        u64::from_le_bytes(st.regs[o..o + 8].try_into().unwrap())
    }

    /// Completes the admin commands up to the new submission queue tail.
    fn ring(&self, st: &mut StubState, tail: u16) {
        let Some(mem) = self.mem.lock().unwrap().clone() else {
            return;
        };
        let mem = mem.memory();
        let aqa = Self::reg32(st, 0x24);
        let (sq_size, cq_size) = ((aqa & 0xfff) as u16 + 1, ((aqa >> 16) & 0xfff) as u16 + 1);
        let (asq, acq) = (Self::reg64(st, 0x28), Self::reg64(st, 0x30));
        while st.sq_head != tail % sq_size {
            let mut sqe = [0u8; 64];
            let at = asq + u64::from(st.sq_head) * 64;
            if mem.read_slice(&mut sqe, GuestAddress(at)).is_err() {
                return;
            }
            st.sq_head = (st.sq_head + 1) % sq_size;
            let cid = u16::from_le_bytes([sqe[2], sqe[3]]);
            // Invalid Command Opcode, Do Not Retry, and the phase tag.
            let status: u16 = (1 << 15) | (0x01 << 1) | u16::from(st.phase);
            let mut cqe = [0u8; 16];
            cqe[8..10].copy_from_slice(&st.sq_head.to_le_bytes());
            cqe[12..14].copy_from_slice(&cid.to_le_bytes());
            cqe[14..16].copy_from_slice(&status.to_le_bytes());
            let at = acq + u64::from(st.cq_tail) * 16;
            if mem.write_slice(&cqe, GuestAddress(at)).is_err() {
                return;
            }
            st.cq_tail = (st.cq_tail + 1) % cq_size;
            if st.cq_tail == 0 {
                st.phase = !st.phase;
            }
            self.completed.fetch_add(1, Ordering::Relaxed);
            if let Some(irqs) = &*self.irqs.lock().unwrap() {
                irqs.signal(0);
            }
        }
    }
}

impl PciFunction for StubNvme {
    fn bar0_size(&self) -> u64 {
        0x2000 // registers and the admin queue's doorbells
    }

    fn bar0_read(&self, offset: u64, data: &mut [u8]) {
        if offset < 8 {
            self.cap_reads.fetch_add(1, Ordering::Relaxed);
        }
        let st = self.state.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = st.regs.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn bar0_write(&self, offset: u64, data: &[u8]) {
        let mut st = self.state.lock().unwrap();
        if offset == SQ0TDBL && data.len() == 4 {
            let tail = u32::from_le_bytes(data.try_into().unwrap()) as u16;
            self.ring(&mut st, tail);
            return;
        }
        for (i, &b) in data.iter().enumerate() {
            let at = offset as usize + i;
            if (0x0c..0x1000).contains(&at) && at != CSTS {
                st.regs[at] = b; // CAP, VS and CSTS are read-only
            }
        }
        if offset as usize == CC {
            let cc = Self::reg32(&st, CC);
            let (enabled, shutdown) = (cc & 1 != 0, (cc >> 14) & 3 != 0);
            // RDY follows EN; a shutdown notification completes at once.
            st.regs[CSTS] = u8::from(enabled) | if shutdown { 0b1000 } else { 0 };
            (st.sq_head, st.cq_tail, st.phase) = (0, 0, true);
            if enabled {
                self.enabled.store(true, Ordering::Relaxed);
                let (asq, acq) = (Self::reg64(&st, 0x28), Self::reg64(&st, 0x30));
                if let Some(mem) = &*self.mem.lock().unwrap() {
                    let m = mem.memory();
                    let mapped = m.find_region(GuestAddress(asq)).is_some()
                        && m.find_region(GuestAddress(acq)).is_some();
                    self.admin_queues_mapped.store(mapped, Ordering::Relaxed);
                }
            }
        }
    }

    fn attach(&self, mem: GuestMemory, irqs: Arc<dyn Interrupts>) {
        *self.mem.lock().unwrap() = Some(mem);
        *self.irqs.lock().unwrap() = Some(irqs);
    }

    fn reset(&self) {
        let mut st = self.state.lock().unwrap();
        st.regs[CC..CC + 4].fill(0);
        st.regs[CSTS] = 0;
    }
}

#[test]
#[ignore = "boots the Debian 6.12 kernel under scripts/setup-qemu-vfio-user's QEMU (about 10 s)"]
fn qemu_guest_nvme_driver_probes_the_function() {
    let cache = guest_tests::kernel::cache_dir();
    let qemu = cache.join("qemu-vfio-user/bin/qemu-system-x86_64");
    assert!(
        qemu.exists(),
        "{} is missing: run scripts/setup",
        qemu.display()
    );
    let kernel = guest_tests::kernel::Kernel::resolve("debian-6.12", None).unwrap();

    let stub = StubNvme::new();
    let fx = serve(stub.clone());
    let device = format!(
        r#"{{"driver":"vfio-user-pci","socket":{{"type":"unix","path":"{}"}}}}"#,
        fx.socket.display()
    );
    let mut child = std::process::Command::new(&qemu)
        .args(["-accel", "tcg", "-smp", "1", "-m", "512M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-machine", "q35,memory-backend=mem"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel.image)
        .args(["-append", "console=ttyS0 panic=-1"])
        .args(["-serial", "stdio"])
        .args(["-device", &device])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let console = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = console.join().unwrap();
    let errors = errors.join().unwrap();
    let nvme: Vec<&str> = console.lines().filter(|l| l.contains("nvme")).collect();
    let context = format!(
        "QEMU {status:?}\nstderr:\n{errors}\nnvme lines:\n{}\nconsole:\n{console}",
        nvme.join("\n")
    );
    assert!(status.is_some(), "QEMU timed out\n{context}");
    assert!(
        console.contains("[0000:0001] type 00 class 0x010802"),
        "the guest's PCI scan did not list the function\n{context}"
    );
    assert!(
        console.contains("nvme nvme0: pci function"),
        "the nvme driver did not bind\n{context}"
    );
    let s = fx.stats.snapshot();
    assert!(
        stub.cap_reads.load(Ordering::Relaxed) > 0,
        "CAP never read\n{context}"
    );
    assert!(
        stub.enabled.load(Ordering::Relaxed),
        "CC.EN never set\n{context}"
    );
    assert!(
        stub.admin_queues_mapped.load(Ordering::Relaxed),
        "the admin queues are not in the DMA-mapped memory ({s:?})\n{context}"
    );
    assert!(s.eventfds_set > 0, "no MSI-X eventfd ({s:?})\n{context}");
    assert!(
        stub.completed.load(Ordering::Relaxed) > 0 && s.irqs_delivered > 0,
        "no admin command completed with an interrupt ({s:?})\n{context}"
    );
    eprintln!("{}\n{s:?}", nvme.join("\n"));
}
