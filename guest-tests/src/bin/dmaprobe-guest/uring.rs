//! `io-uring-fixed-fork`: does a read into an io_uring registered (fixed)
//! buffer reach the program when the process forks and writes to the page
//! while the read is in flight?
//!
//! An anonymous page is registered with the ring as a fixed buffer
//! (`IORING_REGISTER_BUFFERS`). Registration pins the page for as long as it
//! stays registered (FOLL_PIN | FOLL_LONGTERM), independently of any I/O. An
//! `IORING_OP_READ_FIXED` of 512 B from an O_DIRECT descriptor goes into the
//! start of the page; the device holds it (through the mailbox) while the
//! process forks (the child exits at once) and the parent writes elsewhere in
//! the page. Then the read is released and its completion reaped. The
//! parent's page must hold the data.
//!
//! A pinned page is copied for the child at fork, so the parent keeps the page
//! the device writes. A kernel that shared it copy-on-write instead would give
//! the parent a fresh copy on its write and the DMA would land in the page the
//! parent left. The evidence is the page frame before fork and after the
//! parent's write, and the guest-physical address the device was given.
//!
//! Pin notes, each counted from just before the registration: after it
//! (`pins-after-register`), while the read is held (`pins-while-held`), and
//! after unregistering (`pins-after-unregister`). A kernel without io_uring,
//! or with it disabled (`kernel.io_uring_disabled`), skips the test.
//!
//! The ring is driven by raw syscalls (`io_uring_setup`, `io_uring_enter`,
//! `io_uring_register`) and its three shared mappings: the submission ring,
//! the completion ring and the submission queue entries, with the layouts of
//! `include/uapi/linux/io_uring.h`. [`Ring`] also serves the NVMe passthrough
//! tests (`passthru`): set up with 128-byte submission and 32-byte completion
//! entries, it carries `IORING_OP_URING_CMD`, a command for the file's driver.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::mem::{align_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::held::{
    check_read_waits, first_gpa, mark_after_fork, returned_while_held, Hold, Setup, FORK_READ_LEN,
    LBA, OFFSET, OLD, TOUCH, TOUCH_AT,
};
use crate::io::{check_pattern, PAGE};
use crate::mailbox::Mailbox;
use crate::mm::{fork_and_wait, frame_gpa, pfn, pins, AnonPage};
use crate::{one_line, Ctx, OrStop, Stop};

/// Submission queue entries asked of `io_uring_setup` (the kernel may round up).
const ENTRIES: u32 = 4;
/// Tags the read's completion.
const READ_TAG: u64 = 1;
/// How long the released read may take to complete.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);

pub fn fixed_fork(ctx: &Ctx) -> Result<(), Stop> {
    let Setup { mailbox, seed, .. } = Setup::new(ctx, true)?;
    let (ring, reader) = ring_and_reader(ctx)?;

    let page = AnonPage::map()?;
    page.fill(OLD);
    let pfn_before = pfn(page.addr())?;
    let pins_before = pins().ok();
    ring.register_buffer(page.addr(), PAGE).or_error()?;
    let pins_registered = pins().ok();

    // Kept to the end of the test: dropping it removes the device's rule.
    let hold = Hold::next(&mailbox, "read", LBA)?;
    let held = read_held_across_fork(&mailbox, &ring, &reader, &page, pfn_before, &hold)?;
    ring.unregister_buffers().or_error()?;
    let pins_unregistered = pins().ok();

    ctx.note("page-before-fork", frame_gpa(pfn_before));
    ctx.note("page-after-fork", frame_gpa(held.pfn_after));
    ctx.note("device-wrote-at", held.gpa.clone());
    if let Some(before) = pins_before {
        let since = |p: Option<i64>| p.map_or("?".to_owned(), |p| (p - before).to_string());
        ctx.note("pins-after-register", since(pins_registered));
        ctx.note("pins-while-held", since(held.pins_during));
        ctx.note("pins-after-unregister", since(pins_unregistered));
    }

    check_read_waits(
        ctx,
        held.returned_early,
        "the read's completion came while the device held it",
    );
    ctx.record("the read completes", judge_completion(&held.cqe))?;
    ctx.check(
        "the other half of the page kept the write",
        page.read(TOUCH_AT) == TOUCH,
        format!("byte {TOUCH_AT} holds {:#04x}", page.read(TOUCH_AT)),
    );
    let result = judge_parents_data(seed, &page, &held, pfn_before);
    ctx.record("the parent sees the data", result)
}

/// The ring (the test is skipped where the kernel has no io_uring), noted,
/// and the disk opened with O_DIRECT for it.
fn ring_and_reader(ctx: &Ctx) -> Result<(Ring, File), Stop> {
    let ring = match Ring::setup(ENTRIES) {
        Ok(ring) => ring,
        Err(e) if e.unsupported() => {
            return Err(Stop::Skip(format!("{}{}", one_line(&e), disabled_sysctl())))
        }
        Err(e) => return Err(Stop::Error(one_line(&e))),
    };
    ctx.note("ring", ring.describe());
    // The ring takes a raw descriptor, which `Fd` keeps to itself.
    let disk = ctx.disk()?;
    let reader = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(disk)
        .map_err(|e| Stop::Error(format!("cannot open {disk} with O_DIRECT: {e}")))?;
    Ok((ring, reader))
}

/// What the read held across fork left: where the device was told to
/// write, the pin counter while it was held, the parent's page frame after
/// its write, and the read's completion.
struct HeldRead {
    gpa: String,
    /// Its completion came while the device still held it.
    returned_early: bool,
    pins_during: Option<i64>,
    pfn_after: Option<u64>,
    cqe: Cqe,
}

/// Submits the read into the registered `page` (whose frame before fork
/// was `pfn_before`); while the device holds it, forks (the child exits at
/// once) and writes to the page, each moment marked in the device's ledger;
/// then releases the read and reaps its completion.
fn read_held_across_fork(
    mailbox: &Mailbox,
    ring: &Ring,
    reader: &File,
    page: &AnonPage,
    pfn_before: Option<u64>,
    hold: &Hold,
) -> Result<HeldRead, Stop> {
    ring.read_fixed(reader, page.addr(), FORK_READ_LEN, OFFSET, 0, READ_TAG)
        .or_error()?;
    let held = hold.wait_held()?;
    let gpa = first_gpa(&held);
    let mut early = None;
    let returned_early = returned_while_held(|| {
        early = early
            .take()
            .or_else(|| ring.try_completion().ok().flatten());
        early.is_some()
    });
    let pins_during = pins().ok();

    mailbox.mark("fork");
    let status = fork_and_wait(|| {})?;
    page.write(TOUCH_AT, TOUCH);
    let pfn_after = pfn(page.addr())?;
    mark_after_fork(mailbox, "parent wrote", pfn_before, pfn_after);

    hold.release()?;
    let cqe = match early {
        Some(cqe) => cqe,
        None => ring.wait_completion(COMPLETION_TIMEOUT).or_error()?,
    };
    if status != 0 {
        return Err(Stop::Error(format!(
            "the child exited with status {status}"
        )));
    }
    Ok(HeldRead {
        gpa,
        returned_early,
        pins_during,
        pfn_after,
        cqe,
    })
}

/// Whether the read's completion is its own and moved all its bytes.
fn judge_completion(cqe: &Cqe) -> Result<String, Stop> {
    match cqe.read_res(READ_TAG)? {
        res if res == FORK_READ_LEN as i32 => Ok(format!("res = {FORK_READ_LEN}")),
        res => Err(Stop::Fail(format!("res = {res}, not {FORK_READ_LEN}"))),
    }
}

/// Whether the parent's first [`FORK_READ_LEN`] bytes of `page` hold the
/// data read; if not, one line saying where the device was told to write.
fn judge_parents_data(
    seed: u64,
    page: &AnonPage,
    held: &HeldRead,
    pfn_before: Option<u64>,
) -> Result<String, Stop> {
    let got = page.bytes(0, FORK_READ_LEN);
    let gpa = &held.gpa;
    let parent_page = frame_gpa(held.pfn_after);
    check_pattern(seed, OFFSET, &got)
        .map(|()| format!("the parent's {FORK_READ_LEN} B hold the data read"))
        .map_err(|m| {
            let why = if got.iter().all(|&b| b == OLD) {
                let place = if pfn_before != held.pfn_after {
                    format!("which the parent had left (it now maps {parent_page})")
                } else if *gpa == parent_page {
                    "the parent's own page, yet the data is not there".to_owned()
                } else {
                    format!("not the parent's page {parent_page}")
                };
                format!(
                    "the parent's buffer kept its old bytes; the device was given \
                     GPA {gpa} for the {FORK_READ_LEN} B, {place}"
                )
            } else {
                format!("the parent's buffer is wrong: {m}")
            };
            Stop::Fail(why)
        })
}

/// `; kernel.io_uring_disabled = N` if the sysctl exists (Linux 6.6 on).
pub fn disabled_sysctl() -> String {
    fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|v| format!("; kernel.io_uring_disabled = {}", v.trim()))
        .unwrap_or_default()
}

// The io_uring ABI, from include/uapi/linux/io_uring.h.

/// `IORING_OP_READ_FIXED`: a read into a registered buffer.
const IORING_OP_READ_FIXED: u8 = 4;
/// `IORING_OP_URING_CMD`: a command for the file's driver (`file_operations.uring_cmd`);
/// 46 on Linux 5.19 to 6.12 at least (`enum io_uring_op`).
const IORING_OP_URING_CMD: u8 = 46;
/// `io_uring_setup` flags: 128-byte submission entries (an 80-byte command area
/// for `IORING_OP_URING_CMD`), 32-byte completion entries (16 bytes more for
/// the driver's result).
pub const IORING_SETUP_SQE128: u32 = 1 << 10;
pub const IORING_SETUP_CQE32: u32 = 1 << 11;
/// Bytes of a submission entry and a completion entry, without those flags.
const SQE_SIZE: usize = 64;
const CQE_SIZE: usize = 16;
/// Bytes of command data in a 128-byte submission entry, from `addr3` on.
const CMD_AREA: usize = 80;
/// `io_uring_enter` flag: wait for (and reap into the ring) `min_complete` completions.
const IORING_ENTER_GETEVENTS: libc::c_uint = 1;
/// `io_uring_register` opcodes.
const IORING_REGISTER_BUFFERS: libc::c_uint = 0;
const IORING_UNREGISTER_BUFFERS: libc::c_uint = 1;
/// `mmap` offsets of the ring fd's three regions.
const IORING_OFF_SQ_RING: libc::off_t = 0;
const IORING_OFF_CQ_RING: libc::off_t = 0x800_0000;
const IORING_OFF_SQES: libc::off_t = 0x1000_0000;

/// `struct io_sqring_offsets`: where the submission ring's fields sit in its mapping.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SqRingOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

/// `struct io_cqring_offsets`: where the completion ring's fields sit in its mapping.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct CqRingOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

/// `struct io_uring_params`: in, the flags; out, the sizes, features and offsets.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqRingOffsets,
    cq_off: CqRingOffsets,
}

/// `struct io_uring_sqe`, with the fields a fixed-buffer read uses.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Sqe {
    opcode: u8,
    flags: u8,
    ioprio: u16,
    fd: i32,
    /// The file offset.
    off: u64,
    /// The user address to read into (inside the registered buffer).
    addr: u64,
    len: u32,
    rw_flags: u32,
    user_data: u64,
    /// Which registered buffer `addr` lies in.
    buf_index: u16,
    personality: u16,
    splice_fd_in: i32,
    addr3: u64,
    pad: u64,
}

/// `struct io_uring_sqe` as `IORING_OP_URING_CMD` uses it in a ring of
/// 128-byte entries: `cmd_op` where `off` was, and the driver's command `C` in
/// the [`CMD_AREA`] bytes that begin at `addr3`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CmdSqe<C: Copy> {
    opcode: u8,
    flags: u8,
    ioprio: u16,
    fd: i32,
    /// Which command of the driver's (e.g. `NVME_URING_CMD_IO`).
    cmd_op: u32,
    pad1: u32,
    addr: u64,
    len: u32,
    uring_cmd_flags: u32,
    user_data: u64,
    buf_index: u16,
    personality: u16,
    splice_fd_in: i32,
    cmd: CmdArea<C>,
}

/// The command area: the driver's command, the rest zeros.
#[repr(C)]
#[derive(Clone, Copy)]
union CmdArea<C: Copy> {
    cmd: C,
    bytes: [u8; CMD_AREA],
}

impl<C: Copy> CmdArea<C> {
    fn new(cmd: C) -> Self {
        let mut area = CmdArea {
            bytes: [0; CMD_AREA],
        };
        area.cmd = cmd;
        area
    }
}

/// `struct io_uring_cqe`: one completion (the first 16 bytes of a 32-byte one).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Cqe {
    pub user_data: u64,
    /// Bytes moved, or a negated errno.
    pub res: i32,
    pub flags: u32,
}

impl Cqe {
    /// The errno of a completion that failed (its `res` negated).
    pub fn errno(&self) -> Option<i32> {
        (self.res < 0).then_some(-self.res)
    }

    /// The `res` of the completion of the read tagged `tag`, for the caller
    /// to judge; an error if the completion is another's, a failure with
    /// the errno if the read failed.
    pub fn read_res(&self, tag: u64) -> Result<i32, Stop> {
        if self.user_data != tag {
            return Err(Stop::Error(format!(
                "the completion is tagged {:#x}, not the read's {tag:#x}",
                self.user_data
            )));
        }
        match self.errno() {
            Some(errno) => Err(Stop::Fail(format!(
                "res = {} ({})",
                self.res,
                io::Error::from_raw_os_error(errno)
            ))),
            None => Ok(self.res),
        }
    }
}

const _: () = assert!(size_of::<Params>() == 120);
const _: () = assert!(size_of::<Sqe>() == SQE_SIZE);
const _: () = assert!(size_of::<CmdSqe<[u64; CMD_AREA / 8]>>() == 2 * SQE_SIZE);
const _: () = assert!(size_of::<Cqe>() == CQE_SIZE);

/// Why a ring operation failed.
#[derive(Debug, Error)]
pub enum UringError {
    #[error("io_uring_setup failed")]
    Setup(#[source] io::Error),
    #[error("Cannot map the ring's {what}")]
    Map {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("IORING_REGISTER_BUFFERS of {len} B at {addr:#x} failed")]
    Register {
        addr: usize,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("IORING_UNREGISTER_BUFFERS failed")]
    Unregister(#[source] io::Error),
    #[error("The submission queue is full")]
    QueueFull,
    #[error("A {entry}-byte submission entry does not fit a ring of {ring}-byte entries")]
    EntrySize { entry: usize, ring: usize },
    #[error("io_uring_enter failed")]
    Enter(#[source] io::Error),
    #[error("io_uring_enter consumed {0} submissions, not 1")]
    NotConsumed(libc::c_long),
    #[error("No completion within {} s", .0.as_secs())]
    Timeout(Duration),
}

impl UringError {
    /// The kernel has no io_uring (ENOSYS) or does not allow it here (EPERM).
    pub fn unsupported(&self) -> bool {
        matches!(self, UringError::Setup(e)
            if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)))
    }

    /// As [`unsupported`](Self::unsupported), or the kernel refused the setup
    /// flags asked of it (EINVAL: it does not know one).
    pub fn unsupported_with_flags(&self) -> bool {
        self.unsupported()
            || matches!(self, UringError::Setup(e) if e.raw_os_error() == Some(libc::EINVAL))
    }
}

/// A shared mapping of part of the ring fd, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(
        fd: &OwnedFd,
        len: usize,
        offset: libc::off_t,
        what: &'static str,
    ) -> Result<Mapping, UringError> {
        // SAFETY: a shared mapping of the ring fd at an address of the kernel's
        // choosing, at one of the offsets io_uring defines; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(UringError::Map {
                what,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(UringError::Map {
            what,
            source: io::Error::other("mmap gave null"),
        })?;
        Ok(Mapping { ptr, len })
    }

    /// A pointer to the `T` at byte `offset`, checked to lie inside the mapping
    /// and to be aligned for `T` (the mapping itself is page-aligned).
    fn at<T>(&self, offset: usize) -> *mut T {
        assert!(offset + size_of::<T>() <= self.len && offset.is_multiple_of(align_of::<T>()));
        // SAFETY: the offset is inside the mapping (checked above).
        unsafe { self.ptr.as_ptr().add(offset).cast::<T>() }
    }

    /// The `u32` the kernel and this program share at byte `offset`.
    fn atomic(&self, offset: u32) -> &AtomicU32 {
        // SAFETY: `at` checks bounds and alignment; AtomicU32 has the layout of
        // u32; the mapping lives as long as `self`, which the reference borrows.
        // The kernel accesses these words atomically too.
        unsafe { &*self.at::<AtomicU32>(offset as usize) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped by `Mapping::new` with this length, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An io_uring instance: its fd and the three shared mappings. Single-threaded
/// use only: one submitter, one reaper.
#[derive(Debug)]
pub struct Ring {
    params: Params,
    /// Bytes of one submission and one completion entry (the setup flags say).
    sqe_size: usize,
    cqe_size: usize,
    sq: Mapping,
    cq: Mapping,
    sqes: Mapping,
    fd: OwnedFd,
}

impl Ring {
    /// `io_uring_setup` with room for `entries` submissions, and the mappings.
    pub fn setup(entries: u32) -> Result<Ring, UringError> {
        Self::setup_with(entries, 0)
    }

    /// As [`Ring::setup`], with `flags` (`IORING_SETUP_*`; of the ones that
    /// change the entries' sizes, [`IORING_SETUP_SQE128`] and
    /// [`IORING_SETUP_CQE32`]).
    pub fn setup_with(entries: u32, flags: u32) -> Result<Ring, UringError> {
        let mut params = Params {
            flags,
            ..Params::default()
        };
        // SAFETY: io_uring_setup reads and writes the `Params` it is given, which
        // has the kernel's layout (its size is checked above) and outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_io_uring_setup,
                entries,
                &mut params as *mut Params,
            )
        };
        if fd < 0 {
            return Err(UringError::Setup(io::Error::last_os_error()));
        }
        // SAFETY: the fd was just returned by io_uring_setup and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let sqe_size = if flags & IORING_SETUP_SQE128 != 0 {
            2 * SQE_SIZE
        } else {
            SQE_SIZE
        };
        let cqe_size = if flags & IORING_SETUP_CQE32 != 0 {
            2 * CQE_SIZE
        } else {
            CQE_SIZE
        };
        let sq_len = params.sq_off.array as usize + params.sq_entries as usize * 4;
        let cq_len = params.cq_off.cqes as usize + params.cq_entries as usize * cqe_size;
        let sqes_len = params.sq_entries as usize * sqe_size;
        // Mapped separately even when the kernel offers one mapping for both
        // rings (IORING_FEAT_SINGLE_MMAP): that works on every kernel.
        let sq = Mapping::new(&fd, sq_len, IORING_OFF_SQ_RING, "submission ring")?;
        let cq = Mapping::new(&fd, cq_len, IORING_OFF_CQ_RING, "completion ring")?;
        let sqes = Mapping::new(&fd, sqes_len, IORING_OFF_SQES, "submission entries")?;
        Ok(Ring {
            params,
            sqe_size,
            cqe_size,
            sq,
            cq,
            sqes,
            fd,
        })
    }

    /// The ring's sizes and the kernel's feature bits, for a note.
    pub fn describe(&self) -> String {
        format!(
            "{} submission entries of {} B and {} completion entries of {} B, features {:#x}",
            self.params.sq_entries,
            self.sqe_size,
            self.params.cq_entries,
            self.cqe_size,
            self.params.features
        )
    }

    /// Registers `len` bytes at `addr` as fixed buffer 0. The kernel pins the
    /// pages until they are unregistered or the ring is closed.
    pub fn register_buffer(&self, addr: usize, len: usize) -> Result<(), UringError> {
        let iov = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: the kernel reads one iovec from `iov`, which outlives the call;
        // the memory it describes is the caller's mapping, which the kernel pins.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.fd.as_raw_fd(),
                IORING_REGISTER_BUFFERS,
                &iov as *const libc::iovec,
                1 as libc::c_uint,
            )
        };
        if r < 0 {
            return Err(UringError::Register {
                addr,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Drops every registered buffer (and its pins).
    pub fn unregister_buffers(&self) -> Result<(), UringError> {
        // SAFETY: IORING_UNREGISTER_BUFFERS takes no argument.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                self.fd.as_raw_fd(),
                IORING_UNREGISTER_BUFFERS,
                std::ptr::null::<libc::c_void>(),
                0 as libc::c_uint,
            )
        };
        if r < 0 {
            return Err(UringError::Unregister(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Submits `IORING_OP_READ_FIXED`: `len` bytes at `offset` of `file` into
    /// `addr`, which lies in registered buffer `buf_index`. Returns once the
    /// kernel has taken the entry; the read completes later.
    pub fn read_fixed(
        &self,
        file: &File,
        addr: usize,
        len: usize,
        offset: u64,
        buf_index: u16,
        user_data: u64,
    ) -> Result<(), UringError> {
        self.submit(Sqe {
            opcode: IORING_OP_READ_FIXED,
            fd: file.as_raw_fd(),
            off: offset,
            addr: addr as u64,
            len: len as u32,
            user_data,
            buf_index,
            ..Sqe::default()
        })
    }

    /// Submits `IORING_OP_URING_CMD`: command `cmd_op` of `file`'s driver,
    /// with `cmd` (e.g. `struct nvme_uring_cmd`) in the entry's command area.
    /// The ring must have been set up with [`IORING_SETUP_SQE128`]. Returns
    /// once the kernel has taken the entry; the command completes later.
    pub fn uring_cmd<C: Copy>(
        &self,
        file: &File,
        cmd_op: u32,
        cmd: C,
        user_data: u64,
    ) -> Result<(), UringError> {
        const { assert!(size_of::<C>() <= CMD_AREA) };
        self.submit(CmdSqe {
            opcode: IORING_OP_URING_CMD,
            flags: 0,
            ioprio: 0,
            fd: file.as_raw_fd(),
            cmd_op,
            pad1: 0,
            addr: 0,
            len: 0,
            uring_cmd_flags: 0,
            user_data,
            buf_index: 0,
            personality: 0,
            splice_fd_in: 0,
            cmd: CmdArea::new(cmd),
        })
    }

    /// Puts `entry` (a submission entry of the ring's size) on the
    /// submission queue and has the kernel take it.
    fn submit<E: Copy>(&self, entry: E) -> Result<(), UringError> {
        if size_of::<E>() != self.sqe_size {
            return Err(UringError::EntrySize {
                entry: size_of::<E>(),
                ring: self.sqe_size,
            });
        }
        let off = &self.params.sq_off;
        let head = self.sq.atomic(off.head).load(Ordering::Acquire);
        let tail = self.sq.atomic(off.tail).load(Ordering::Relaxed);
        if tail.wrapping_sub(head) >= self.params.sq_entries {
            return Err(UringError::QueueFull);
        }
        let mask = self.sq.atomic(off.ring_mask).load(Ordering::Relaxed);
        let index = tail & mask;
        let slot = self.sqes.at::<E>(index as usize * self.sqe_size);
        let array = self.sq.at::<u32>(off.array as usize + index as usize * 4);
        // SAFETY: both pointers are inside their mappings (checked by `at`); the
        // kernel reads this slot and array entry only after it sees the new tail,
        // which is stored below with Release ordering.
        unsafe {
            slot.write(entry);
            array.write(index);
        }
        self.sq
            .atomic(off.tail)
            .store(tail.wrapping_add(1), Ordering::Release);
        let consumed = self.enter(1, 0, 0)?;
        if consumed != 1 {
            return Err(UringError::NotConsumed(consumed));
        }
        Ok(())
    }

    /// Waits up to `timeout` for one completion and consumes it.
    pub fn wait_completion(&self, timeout: Duration) -> Result<Cqe, UringError> {
        let start = Instant::now();
        loop {
            if let Some(cqe) = self.reap() {
                return Ok(cqe);
            }
            if start.elapsed() > timeout {
                return Err(UringError::Timeout(timeout));
            }
            self.run_completions()?;
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// One completion if there is one now, consumed; does not wait.
    pub fn try_completion(&self) -> Result<Option<Cqe>, UringError> {
        self.run_completions()?;
        Ok(self.reap())
    }

    /// Completions may wait as task work for this task to enter the kernel;
    /// GETEVENTS with no minimum runs it without blocking.
    fn run_completions(&self) -> Result<(), UringError> {
        self.enter(0, 0, IORING_ENTER_GETEVENTS).map(drop)
    }

    /// Consumes the completion at the head of the ring, if any (the first 16
    /// bytes of it in a ring of 32-byte entries).
    fn reap(&self) -> Option<Cqe> {
        let off = &self.params.cq_off;
        let head = self.cq.atomic(off.head).load(Ordering::Relaxed);
        let tail = self.cq.atomic(off.tail).load(Ordering::Acquire);
        if head == tail {
            return None;
        }
        let mask = self.cq.atomic(off.ring_mask).load(Ordering::Relaxed);
        let at = off.cqes as usize + (head & mask) as usize * self.cqe_size;
        // SAFETY: the entry is inside the mapping (checked by `at`) and the
        // kernel filled it before publishing the tail loaded with Acquire;
        // it does not reuse the slot until the head moves past it.
        let cqe = unsafe { self.cq.at::<Cqe>(at).read() };
        self.cq
            .atomic(off.head)
            .store(head.wrapping_add(1), Ordering::Release);
        Some(cqe)
    }

    /// `io_uring_enter`; returns the number of submissions consumed.
    fn enter(
        &self,
        to_submit: libc::c_uint,
        min_complete: libc::c_uint,
        flags: libc::c_uint,
    ) -> Result<libc::c_long, UringError> {
        loop {
            // SAFETY: no signal mask is passed (null, size 0); the kernel reads
            // the submission ring this ring owns.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd.as_raw_fd(),
                    to_submit,
                    min_complete,
                    flags,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            if r >= 0 {
                return Ok(r);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(UringError::Enter(e));
            }
        }
    }
}
