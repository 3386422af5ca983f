//! NVMe passthrough commands with a user buffer, held at the device: does the
//! block layer's mapping of user memory for a request keep the pages pinned
//! across fork, and leave the zero page alone?
//!
//! - `passthru-read-fork-cow`: as `dio-read-fork-cow` (the parent writes), with
//!   the read an NVMe Read of one 512-byte block into the start of an
//!   anonymous page, issued with `ioctl(NVME_IOCTL_IO_CMD)` on the namespace's
//!   block device from a thread of its own (the ioctl blocks). The device
//!   holds it while the process forks and the parent writes at byte 2048;
//!   then it is released. The parent's first 512 B must hold the data.
//! - `passthru-uring-read-fork-cow`: the same read as io_uring's
//!   `IORING_OP_URING_CMD` with `NVME_URING_CMD_IO` on the namespace's generic
//!   character device (`/dev/ngXnY`), the ring set up with 128-byte
//!   submission and 32-byte completion entries; the completion is reaped
//!   after the release (its `res` is the NVMe status).
//! - `passthru-write-fork`: as `dio-write-fork`, with an NVMe Write of the
//!   whole page (eight blocks); the child rewrites the page after fork. The
//!   disk must hold the parent's data.
//! - `passthru-zero-page-write-source`: as `zero-page-write-source`, with an
//!   NVMe Write of a never-touched page.
//!
//! The disk must be an NVMe namespace (`--transport nvme`): virtio-blk has no
//! passthrough, and the tests skip.
//!
//! What the kernel does, on both 6.1 and 6.12: the ioctl
//! (`nvme_user_cmd()` → `nvme_submit_user_cmd()`) and the uring command
//! (`nvme_uring_cmd_io()`) reach `nvme_map_user_request()`
//! (drivers/nvme/host/ioctl.c), which calls `blk_rq_map_user_io()` →
//! `blk_rq_map_user()` → `blk_rq_map_user_iov()` (block/blk-map.c). That copies
//! through a kernel buffer (`bio_copy_user_iov()`) only if it is given
//! `map_data` (nvme passes NULL), if the queue may bounce
//! (`blk_queue_may_bounce()`: nvme asks for no bouncing), if the buffer is
//! misaligned for the queue's DMA alignment and pad (nvme: 3 and 0, set in
//! `nvme_set_queue_limits()` on 6.1 and `nvme_set_ctrl_limits()` on 6.12), if
//! the iterator is not of user memory (6.1: `import_single_range()` makes an
//! ITER_IOVEC, which `iter_is_iovec()` accepts; 6.12: `import_ubuf()` makes an
//! ITER_UBUF, which `user_backed_iter()` accepts), or if the buffer has gaps
//! against the virt boundary (nvme: `NVME_CTRL_PAGE_SIZE - 1`;
//! `iov_iter_gap_alignment()` is 0 for one segment). None holds for 512 B or
//! 4 KiB at a page's start, so `bio_map_user_iov()` maps the program's own
//! page: the device moves data to and from it.
//!
//! - 6.1: `bio_map_user_iov()` takes the page with `iov_iter_get_pages2()`
//!   (`get_user_pages_fast()`: a reference, FOLL_WRITE for a read) and
//!   `blk_rq_unmap_user()` drops it with `put_page()`. A reference does not
//!   make fork copy the page (`page_needs_cow_for_dma()` asks for a pin), so
//!   fork shares it copy-on-write; the parent's write after fork finds it
//!   shared and referenced and gives the parent a copy (`do_wp_page()`), and
//!   the device's read lands in the page the parent left: the reads fail.
//! - 6.12 (since 6.5): `iov_iter_extract_pages()` (`pin_user_pages_fast()`:
//!   FOLL_PIN) with `BIO_PAGE_PINNED`, unpinned by `bio_release_page()`. Fork
//!   copies a pinned page for the child at once (`folio_needs_cow_for_dma()`)
//!   and the parent keeps the page the device writes: the reads pass.
//! - The write passes on both: after fork the child's write gives the child a
//!   copy, and the page the device reads stays the parent's.
//! - The zero page: a write's buffer is taken without FOLL_WRITE, so a
//!   never-touched page is mapped to the zero page and the device reads it.
//!   6.1 takes a reference, which the pin counter does not count; 6.12's
//!   `try_grab_folio()` takes no pin on the zero page (`is_zero_folio()`).
//!   The counter must not rise on either.
//!
//! The NVMe ABI is that of include/uapi/linux/nvme_ioctl.h, the ioctl numbers
//! those of include/uapi/asm-generic/ioctl.h.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use thiserror::Error;
use wire::pattern::fill_pattern;

use crate::held::{
    check_read_waits, disk_holds_parents, first_gpa, mark_after_fork, note_pins, ForkedRead, Hold,
    Setup, FORK_READ_LEN, LBA, OFFSET, OLD, TOUCH, TOUCH_AT,
};
use crate::io::{wait_for, AlignedBuf, Cache, Fd, PAGE};
use crate::mailbox::Mailbox;
use crate::mm::{fork_and_wait, frame_gpa, pfn, pins, AnonPage};
use crate::uring::{disabled_sysctl, Cqe, Ring, IORING_SETUP_CQE32, IORING_SETUP_SQE128};
use crate::{one_line, zero, Ctx, OrStop, Stop};

/// The disk's block size the tests address ([`LBA`] is in these).
const BLOCK: usize = 512;
/// What the child of `passthru-write-fork` fills its page with.
const CHILD: u8 = 0x77;
/// Submission entries asked of `io_uring_setup`.
const ENTRIES: u32 = 4;
/// Tags the uring read's completion.
const READ_TAG: u64 = 1;
/// How long the released uring read may take to complete.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the generic character device may lag the block device.
const CHAR_DEVICE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn read_fork_cow(ctx: &Ctx) -> Result<(), Stop> {
    let ns = Arc::new(Namespace::open(ctx)?);
    read_fork(ctx, &Via::Ioctl(ns))
}

pub fn uring_read_fork_cow(ctx: &Ctx) -> Result<(), Stop> {
    let ns = Namespace::open(ctx)?;
    let path = UringPath::open(ctx, &ns)?;
    read_fork(ctx, &Via::Uring(&path))
}

pub fn write_fork(ctx: &Ctx) -> Result<(), Stop> {
    let ns = Arc::new(Namespace::open(ctx)?);
    let disk = ctx.disk()?;
    let mailbox = Mailbox::open(disk)?;
    let fd = Fd::open(disk, Cache::Direct).or_error()?;
    let seed = ctx.seed(1);
    let page = Arc::new(AnonPage::map()?);
    let mut data = vec![0u8; PAGE];
    fill_pattern(seed, OFFSET, &mut data);
    for (i, &b) in data.iter().enumerate() {
        page.write(i, b);
    }
    ctx.note("page-before-fork", frame_gpa(pfn(page.addr())?));

    let hold = Hold::next(&mailbox, "write", LBA)?;
    let pins_before = pins().ok();
    let write = InFlight::Thread({
        let page = page.clone();
        thread::spawn(move || ns.io(Op::Write, page.addr(), PAGE, LBA))
    });
    let held = match hold.wait_held() {
        Ok(held) => held,
        Err(stop) => return Err(write.never_held(stop)),
    };
    let pins_during = pins().ok();
    mailbox.mark("fork");
    let status = fork_and_wait(|| {
        for i in 0..PAGE {
            page.write(i, CHILD);
        }
    })?;
    mailbox.mark("child wrote and exited");
    hold.release()?;
    let completed = write.finish();
    if status != 0 {
        return Err(Stop::Error(format!(
            "the child exited with status {status}"
        )));
    }
    ctx.wrote(OFFSET, PAGE, seed);

    ctx.note("device-read-from", first_gpa(&held));
    note_pins(ctx, pins_before, pins_during);
    ctx.record("the write completes", completed)?;
    let mut back = AlignedBuf::new(PAGE, 0).or_error()?;
    fd.read_exact_at(back.as_mut_slice(), OFFSET).or_fail()?;
    ctx.record(
        "the disk holds the parent's data",
        disk_holds_parents(seed, OFFSET, back.as_slice(), CHILD),
    )
}

pub fn zero_page_write_source(ctx: &Ctx) -> Result<(), Stop> {
    let ns = Namespace::open(ctx)?;
    // Something that is not zeros first, so the write has to change it.
    let Setup { mailbox, fd, .. } = Setup::new(ctx, false)?;
    zero::write_source_by(ctx, &mailbox, &fd, move |page| {
        ns.io(Op::Write, page.addr(), PAGE, LBA).or_fail()
    })
}

/// The body of the read-fork-cow tests: the read reaches the device `via`
/// the ioctl or io_uring.
fn read_fork(ctx: &Ctx, via: &Via<'_>) -> Result<(), Stop> {
    let Setup { mailbox, seed, .. } = Setup::new(ctx, true)?;
    ctx.note("read-lba", LBA.to_string());

    let page = Arc::new(AnonPage::map()?);
    page.fill(OLD);
    let pfn_before = pfn(page.addr())?;

    let hold = Hold::next(&mailbox, "read", LBA)?;
    let pins_before = pins().ok();
    let read = via.read(&page)?;
    let held = match hold.wait_held() {
        Ok(held) => held,
        Err(stop) => return Err(read.never_held(stop)),
    };
    if let InFlight::Thread(t) = &read {
        check_read_waits(
            ctx,
            t.is_finished(),
            "the ioctl returned while the device held the read",
        );
    }
    let gpa = first_gpa(&held);
    let pins_during = pins().ok();

    mailbox.mark("fork");
    let status = fork_and_wait(|| {})?;
    page.write(TOUCH_AT, TOUCH);
    let pfn_after = pfn(page.addr())?;
    mark_after_fork(&mailbox, "parent wrote", pfn_before, pfn_after);

    hold.release()?;
    let completed = read.finish();
    if status != 0 {
        return Err(Stop::Error(format!(
            "the child exited with status {status}"
        )));
    }

    ctx.note("page-before-fork", frame_gpa(pfn_before));
    ctx.note("page-after-fork", frame_gpa(pfn_after));
    ctx.note("device-wrote-at", gpa.clone());
    note_pins(ctx, pins_before, pins_during);
    ctx.record("the read completes", completed)?;
    ctx.check(
        "the other half of the page kept the write",
        page.read(TOUCH_AT) == TOUCH,
        format!("byte {TOUCH_AT} holds {:#04x}", page.read(TOUCH_AT)),
    );
    let evidence = ForkedRead {
        gpa: &gpa,
        before: pfn_before,
        after: pfn_after,
    };
    ctx.record(
        "the parent sees the data",
        evidence.judge(seed, OFFSET, &page.bytes(0, FORK_READ_LEN)),
    )
}

/// The disk under test, if it is an NVMe namespace.
fn nvme_disk(ctx: &Ctx) -> Result<&'static str, Stop> {
    let disk = ctx.disk()?;
    if disk.starts_with("/dev/nvme") {
        Ok(disk)
    } else {
        Err(Stop::Skip(format!(
            "{disk} is virtio-blk, which has no NVMe passthrough: run with --transport nvme"
        )))
    }
}

/// The generic character device of a namespace's block device:
/// `/dev/nvme0n1` → `/dev/ng0n1`.
fn generic_char_device(disk: &str) -> Option<String> {
    disk.strip_prefix("/dev/nvme")
        .filter(|rest| rest.contains('n'))
        .map(|rest| format!("/dev/ng{rest}"))
}

/// The NVMe namespace under test: its block device, open for passthrough
/// ioctls, and its namespace id.
#[derive(Debug)]
struct Namespace {
    fd: Fd,
    nsid: u32,
}

impl Namespace {
    /// Opens the disk under test for passthrough and asks its namespace id
    /// (`NVME_IOCTL_ID`; 1 if that fails). Skips on virtio-blk; the disk's
    /// blocks must be of [`BLOCK`] bytes.
    fn open(ctx: &Ctx) -> Result<Namespace, Stop> {
        let disk = nvme_disk(ctx)?;
        let name = disk.trim_start_matches("/dev/");
        let sysfs = format!("/sys/block/{name}/queue/logical_block_size");
        let block = fs::read_to_string(&sysfs)
            .map_err(|e| Stop::Error(format!("cannot read {sysfs}: {e}")))?;
        if block.trim() != BLOCK.to_string() {
            return Err(Stop::Error(format!(
                "{disk} has {} B blocks; the passthrough tests address {BLOCK} B blocks",
                block.trim()
            )));
        }
        let fd = Fd::open(disk, Cache::Buffered).or_error()?;
        // SAFETY: NVME_IOCTL_ID takes no argument; it returns the namespace id
        // or -1.
        let id = unsafe { libc::ioctl(fd.raw(), NVME_IOCTL_ID as libc::Ioctl) };
        let nsid = match u32::try_from(id) {
            Ok(nsid) if nsid > 0 => {
                ctx.note("nsid", format!("{nsid} (NVME_IOCTL_ID)"));
                nsid
            }
            _ => {
                let e = io::Error::last_os_error();
                ctx.note("nsid", format!("1 (NVME_IOCTL_ID answered {id}: {e})"));
                1
            }
        };
        Ok(Namespace { fd, nsid })
    }

    /// Moves `len` bytes between the user memory at `addr` and the blocks
    /// from `lba` on with `NVME_IOCTL_IO_CMD`; returns when the device has
    /// completed the command.
    fn io(&self, op: Op, addr: usize, len: usize, lba: u64) -> Result<(), PassthruError> {
        let mut cmd = NvmeCmd::data(op, self.nsid, addr, len, lba);
        // SAFETY: the kernel reads and writes the 72-byte command (its layout is
        // the kernel's, its size checked below), which outlives the call; it
        // moves data to or from `len` bytes at `addr`, which the caller keeps
        // mapped and touches only by volatile access (the kernel checks the
        // range and fails with EFAULT if it is not mapped).
        let r = unsafe {
            libc::ioctl(
                self.fd.raw(),
                NVME_IOCTL_IO_CMD as libc::Ioctl,
                &mut cmd as *mut NvmeCmd,
            )
        };
        match r {
            0 => Ok(()),
            r if r < 0 => Err(PassthruError::Ioctl {
                op,
                len,
                lba,
                source: io::Error::last_os_error(),
            }),
            status => Err(PassthruError::Status {
                op,
                len,
                lba,
                status,
            }),
        }
    }
}

/// The uring command's way to the namespace: a ring of 128-byte submission
/// and 32-byte completion entries, and the generic character device.
#[derive(Debug)]
struct UringPath {
    ring: Ring,
    dev: File,
    path: String,
    nsid: u32,
}

impl UringPath {
    /// Skips where the kernel has no io_uring, does not allow it, has no
    /// 128-byte entries, or has no generic character device.
    fn open(ctx: &Ctx, ns: &Namespace) -> Result<UringPath, Stop> {
        let disk = nvme_disk(ctx)?;
        let path = generic_char_device(disk)
            .ok_or_else(|| Stop::Error(format!("{disk} is not named /dev/nvmeXnY")))?;
        if !wait_for(&path, CHAR_DEVICE_TIMEOUT) {
            return Err(Stop::Skip(format!(
                "{path} missing after {} s: no NVMe generic character device",
                CHAR_DEVICE_TIMEOUT.as_secs()
            )));
        }
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Stop::Error(format!("cannot open {path}: {e}")))?;
        let ring = match Ring::setup_with(ENTRIES, IORING_SETUP_SQE128 | IORING_SETUP_CQE32) {
            Ok(ring) => ring,
            Err(e) if e.unsupported_with_flags() => {
                return Err(Stop::Skip(format!(
                    "{} (IORING_SETUP_SQE128 | IORING_SETUP_CQE32){}",
                    one_line(&e),
                    disabled_sysctl()
                )))
            }
            Err(e) => return Err(Stop::Error(one_line(&e))),
        };
        ctx.note("ring", ring.describe());
        ctx.note("char-device", path.clone());
        Ok(UringPath {
            ring,
            dev,
            path,
            nsid: ns.nsid,
        })
    }
}

/// How the held read reaches the device.
#[derive(Debug)]
enum Via<'a> {
    /// `NVME_IOCTL_IO_CMD` on the block device, from a thread of its own.
    Ioctl(Arc<Namespace>),
    /// `IORING_OP_URING_CMD` on the generic character device.
    Uring(&'a UringPath),
}

impl<'a> Via<'a> {
    /// Starts the NVMe Read of [`FORK_READ_LEN`] B at [`LBA`] into the start of `page`.
    fn read(&self, page: &Arc<AnonPage>) -> Result<InFlight<'a>, Stop> {
        match self {
            Via::Ioctl(ns) => {
                let (ns, page) = (ns.clone(), page.clone());
                Ok(InFlight::Thread(thread::spawn(move || {
                    ns.io(Op::Read, page.addr(), FORK_READ_LEN, LBA)
                })))
            }
            Via::Uring(u) => {
                let cmd = NvmeCmd::data(Op::Read, u.nsid, page.addr(), FORK_READ_LEN, LBA);
                u.ring
                    .uring_cmd(&u.dev, NVME_URING_CMD_IO, cmd, READ_TAG)
                    .or_error()?;
                Ok(InFlight::Ring(u))
            }
        }
    }
}

/// A passthrough command the device may be holding.
enum InFlight<'a> {
    /// A thread blocked in the ioctl (it holds the page's mapping).
    Thread(JoinHandle<Result<(), PassthruError>>),
    /// A submission on the ring, its completion not yet reaped.
    Ring(&'a UringPath),
}

impl InFlight<'_> {
    /// What to report when the device never held the command: `stop`, unless
    /// the command had already ended, refused by the kernel (a uring command
    /// it lacks: Skip) or completed without a hold.
    fn never_held(self, stop: Stop) -> Stop {
        let ended = match self {
            InFlight::Thread(t) if t.is_finished() => Some(match t.join() {
                Ok(Ok(())) => "NVMe status 0".to_owned(),
                Ok(Err(e)) => one_line(&e),
                Err(_) => "its thread panicked".to_owned(),
            }),
            InFlight::Thread(_) => None,
            InFlight::Ring(u) => match u.ring.try_completion() {
                Ok(Some(cqe)) if matches!(-cqe.res, libc::EINVAL | libc::EOPNOTSUPP) => {
                    return Stop::Skip(format!(
                        "NVME_URING_CMD_IO on {}: {}",
                        u.path,
                        io::Error::from_raw_os_error(-cqe.res)
                    ));
                }
                Ok(Some(cqe)) => Some(format!("res = {}", cqe.res)),
                Ok(None) => None,
                Err(e) => Some(one_line(&e)),
            },
        };
        match ended {
            Some(how) => Stop::Error(format!(
                "{}; the command had ended without being held ({how})",
                stop.reason()
            )),
            None => stop,
        }
    }

    /// Waits for the command after its release; one line for its check.
    fn finish(self) -> Result<String, Stop> {
        match self {
            InFlight::Thread(t) => t
                .join()
                .map_err(|_| Stop::Error("the passthrough thread panicked".into()))?
                .map(|()| "NVMe status 0".to_owned())
                .or_fail(),
            InFlight::Ring(u) => {
                let cqe = u.ring.wait_completion(COMPLETION_TIMEOUT).or_error()?;
                judge_cqe(&cqe)
            }
        }
    }
}

/// The uring read's completion: `res` is the NVMe status, or a negated errno.
fn judge_cqe(cqe: &Cqe) -> Result<String, Stop> {
    match cqe.read_res(READ_TAG)? {
        0 => Ok("res = 0 (NVMe status 0)".to_owned()),
        res => Err(Stop::Fail(format!("res = {res:#x}: NVMe status"))),
    }
}

/// Why a passthrough command failed.
#[derive(Debug, Error)]
enum PassthruError {
    #[error("NVMe {op} of {len} B at LBA {lba} failed")]
    Ioctl {
        op: Op,
        len: usize,
        lba: u64,
        #[source]
        source: io::Error,
    },
    #[error("NVMe {op} of {len} B at LBA {lba} completed with status {status:#x}")]
    Status {
        op: Op,
        len: usize,
        lba: u64,
        status: i32,
    },
}

/// The NVM command set's data commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl Op {
    fn opcode(self) -> u8 {
        match self {
            Op::Write => 0x01,
            Op::Read => 0x02,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Read => "Read",
            Op::Write => "Write",
        })
    }
}

// The NVMe passthrough ABI, from include/uapi/linux/nvme_ioctl.h.

/// `struct nvme_passthru_cmd`, and `struct nvme_uring_cmd`, whose layout is
/// the same with `result` named `rsvd2`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct NvmeCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    /// The user buffer.
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    /// Starting LBA, low and high 32 bits.
    cdw10: u32,
    cdw11: u32,
    /// Number of blocks, 0-based.
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(size_of::<NvmeCmd>() == 72);

impl NvmeCmd {
    /// A Read or Write of namespace `nsid` that moves `len` bytes (whole
    /// blocks) between the user memory at `addr` and the blocks from `lba` on.
    fn data(op: Op, nsid: u32, addr: usize, len: usize, lba: u64) -> NvmeCmd {
        NvmeCmd {
            opcode: op.opcode(),
            nsid,
            addr: addr as u64,
            data_len: len as u32,
            cdw10: (lba & 0xffff_ffff) as u32,
            cdw11: (lba >> 32) as u32,
            cdw12: (len / BLOCK - 1) as u32,
            ..NvmeCmd::default()
        }
    }
}

// Ioctl numbers as include/uapi/asm-generic/ioctl.h makes them: the
// direction in bits 30-31, the argument's size in 16-29, the type in 8-15,
// the number in 0-7.
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < 1 << 14);
    (dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

/// `_IO(ty, nr)`.
const fn io_none(ty: u8, nr: u8) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}

/// `_IOWR(ty, nr, T)`.
const fn iowr<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}

/// `NVME_IOCTL_ID`: the namespace id of the device opened.
const NVME_IOCTL_ID: u32 = io_none(b'N', 0x40);
/// `NVME_IOCTL_IO_CMD`: run an I/O command, `struct nvme_passthru_cmd`.
const NVME_IOCTL_IO_CMD: u32 = iowr::<NvmeCmd>(b'N', 0x43);
/// `NVME_URING_CMD_IO`: the uring command for an I/O command, `struct nvme_uring_cmd`.
const NVME_URING_CMD_IO: u32 = iowr::<NvmeCmd>(b'N', 0x80);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // As the C preprocessor makes them from the 6.1 and 6.12 headers.
        assert_eq!(NVME_IOCTL_ID, 0x4e40);
        assert_eq!(NVME_IOCTL_IO_CMD, 0xc048_4e43);
        assert_eq!(NVME_URING_CMD_IO, 0xc048_4e80);
    }

    #[test]
    fn the_generic_device_follows_the_namespace() {
        assert_eq!(
            generic_char_device("/dev/nvme0n1").as_deref(),
            Some("/dev/ng0n1")
        );
        assert_eq!(
            generic_char_device("/dev/nvme12n3").as_deref(),
            Some("/dev/ng12n3")
        );
        assert_eq!(generic_char_device("/dev/vda"), None);
        assert_eq!(generic_char_device("/dev/nvme0"), None);
    }

    #[test]
    fn a_data_command_names_its_blocks_zero_based() {
        let c = NvmeCmd::data(Op::Read, 1, 0x1000, 512, (1 << 32) + 2048);
        assert_eq!((c.opcode, c.nsid, c.addr, c.data_len), (2, 1, 0x1000, 512));
        assert_eq!((c.cdw10, c.cdw11, c.cdw12), (2048, 1, 0));
        let w = NvmeCmd::data(Op::Write, 1, 0, PAGE, 0);
        assert_eq!((w.opcode, w.cdw12), (1, 7));
    }
}
