//! More page lifetimes around held O_DIRECT requests.
//!
//! - `dio-write-fork`: an O_DIRECT write from a page is held while the process
//!   forks and the child writes the whole page; the disk must get the parent's
//!   data, not the child's. `dio-write-fork-vfat` writes to a file on vfat
//!   instead, through the legacy direct-I/O code (fs/direct-io.c).
//! - `dio-read-fork-cow-threads` (the LTP dma_thread pattern): seven threads
//!   read with O_DIRECT into seven 512-byte parts of one page; the device holds
//!   them all while the process forks; then an eighth read, into the last part,
//!   runs to completion (its pinning for write breaks copy-on-write in the
//!   parent); then the seven are released. Every part must hold its data.
//! - `dio-unmap-exit` / `dio-exit`: the owner of a page under a held O_DIRECT
//!   read lets it go (unmaps it; or is killed); a second process fills 64 MiB
//!   with a pattern; the read is released. The other process's memory must be
//!   intact, and the device must see nothing wrong: a freed page the device
//!   later writes would be someone else's memory. The device's ledger must
//!   show the data went to the page it was given.

use std::sync::Arc;
use std::thread;

use serde_json::json;
use wire::pattern::fill_pattern;

use crate::ext4::{first_lba, Mount};
use crate::held::{
    check_read_waits, disk_holds_parents, first_gpa, mark_after_fork, returned_while_held, Hold,
    Setup, LBA, OFFSET,
};
use crate::io::{check_pattern, AlignedBuf, Cache, Fd, PAGE};
use crate::mailbox::Mailbox;
use crate::mm::{fork_and_wait, frame_gpa, pfn, AnonPage};
use crate::{Ctx, OrStop, Stop};

/// What the child of `dio-write-fork` fills its page with.
const CHILD: u8 = 0x77;

/// Where `dio-write-fork` writes: the raw disk at [`OFFSET`], or a file.
struct WriteTarget {
    mailbox: Mailbox,
    fd: Arc<Fd>,
    /// Where in `fd` the write goes; the pattern is keyed to it.
    offset: u64,
    /// The disk block the write reaches, for the hold rule.
    lba: u64,
    /// The file (from the file system's root) and its mount, for a file.
    file: Option<(&'static str, Mount)>,
}

pub fn write_fork(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let target = WriteTarget {
        mailbox: Mailbox::open(disk)?,
        fd: Arc::new(Fd::open(disk, Cache::Direct).or_error()?),
        offset: OFFSET,
        lba: LBA,
        file: None,
    };
    write_fork_into(ctx, target)
}

/// `dio-write-fork-vfat`: the write goes to a file on vfat, through the
/// legacy direct-I/O code (`fat_direct_IO`, `blockdev_direct_IO`). The file
/// already holds a page of other bytes, written and synced: FAT does a direct
/// write only over clusters it has allocated and initialised (past them,
/// `fat_direct_IO` returns 0 and the write goes through the page cache).
pub fn write_fork_vfat(ctx: &Ctx) -> Result<(), Stop> {
    const FILE: &str = "/fork.bin";
    let disk = ctx.disk()?;
    let mailbox = Mailbox::open(disk)?;
    let mount = Mount::fs(disk, "/mnt", "vfat")?;
    let path = format!("/mnt{FILE}");
    let fd = Fd::create(&path, Cache::Direct).or_error()?;
    let mut before = AlignedBuf::new(PAGE, 0).or_error()?;
    before.as_mut_slice().fill(0x55);
    fd.write_all_at(before.as_slice(), 0).or_fail()?;
    fd.sync().or_fail()?;
    let lba = first_lba(&fd, &path)?;
    ctx.note("write-lba", lba.to_string());
    let target = WriteTarget {
        mailbox,
        fd: Arc::new(fd),
        offset: 0,
        lba,
        file: Some((FILE, mount)),
    };
    write_fork_into(ctx, target)
}

fn write_fork_into(ctx: &Ctx, target: WriteTarget) -> Result<(), Stop> {
    let WriteTarget {
        mailbox,
        fd,
        offset,
        lba,
        file,
    } = target;
    let seed = ctx.seed(1);
    let page = Arc::new(AnonPage::map()?);
    let mut data = vec![0u8; PAGE];
    fill_pattern(seed, offset, &mut data);
    for (i, &b) in data.iter().enumerate() {
        page.write(i, b);
    }
    let hold = Hold::next(&mailbox, "write", lba)?;
    let writer = {
        let (fd, page) = (fd.clone(), page.clone());
        thread::spawn(move || {
            // SAFETY: the mapping lives as long as `page`, held by this thread; the
            // kernel reads it by DMA.
            let src = unsafe { std::slice::from_raw_parts(page.addr() as *const u8, PAGE) };
            fd.write_all_at(src, offset)
        })
    };
    let held = hold.wait_held()?;
    mailbox.mark("fork");
    let status = fork_and_wait(|| {
        for i in 0..PAGE {
            page.write(i, CHILD);
        }
    })?;
    mailbox.mark("child wrote and exited");
    hold.release()?;
    writer
        .join()
        .map_err(|_| Stop::Error("the writer thread panicked".into()))?
        .or_fail()?;
    if status != 0 {
        return Err(Stop::Error(format!(
            "the child exited with status {status}"
        )));
    }
    ctx.note("device-read-from", first_gpa(&held));
    let mut back = AlignedBuf::new(PAGE, 0).or_error()?;
    fd.read_exact_at(back.as_mut_slice(), offset).or_fail()?;
    match file {
        None => ctx.wrote(offset, PAGE, seed),
        Some((name, mount)) => {
            ctx.file(name, PAGE, seed);
            drop(fd);
            ctx.record("unmount", mount.unmount())?;
        }
    }
    ctx.record(
        "the disk holds the parent's data",
        disk_holds_parents(seed, offset, back.as_slice(), CHILD),
    )
}

const PARTS: usize = PAGE / 512;

pub fn threads(ctx: &Ctx) -> Result<(), Stop> {
    let Setup { mailbox, fd, seed } = Setup::new(ctx, true)?;

    let page = Arc::new(AnonPage::map()?);
    page.fill(0x11);
    let before = pfn(page.addr())?;
    let held_parts = PARTS - 1;
    let last = LBA + held_parts as u64 - 1;
    let rule = mailbox.call(json!({"cmd": "add-rule",
        "rule": format!("op=read,lba={LBA}-{last},count={held_parts},action=hold")}))?;
    let read_part = |part: usize| {
        let (fd, page) = (fd.clone(), page.clone());
        thread::spawn(move || {
            // SAFETY: each thread takes its own 512 B of the mapping, which lives as
            // long as `page`; the kernel writes it by DMA.
            let dst = unsafe {
                std::slice::from_raw_parts_mut((page.addr() + part * 512) as *mut u8, 512)
            };
            fd.read_exact_at(dst, OFFSET + part as u64 * 512)
        })
    };
    let readers: Vec<_> = (0..held_parts).map(read_part).collect();
    let held = wait_for_held(&mailbox, held_parts)?;
    mailbox.mark("fork");
    let status = fork_and_wait(|| {})?;
    // The eighth read is not held: pinning its part for write breaks COW.
    read_part(held_parts)
        .join()
        .map_err(|_| Stop::Error("a reader thread panicked".into()))?
        .or_fail()?;
    let after = pfn(page.addr())?;
    mark_after_fork(&mailbox, "eighth read done", before, after);
    let released = mailbox.call(json!({"cmd": "release", "all": true}))?;
    let mut failed = Vec::new();
    for (part, r) in readers.into_iter().enumerate() {
        r.join()
            .map_err(|_| Stop::Error("a reader thread panicked".into()))?
            .or_fail()?;
        let at = OFFSET + part as u64 * 512;
        if check_pattern(seed, at, &page.bytes(part * 512, 512)).is_err() {
            failed.push(part);
        }
    }
    let _ = mailbox.call(json!({"cmd": "remove-rule", "id": rule["id"]}));
    if status != 0 {
        return Err(Stop::Error(format!(
            "the child exited with status {status}"
        )));
    }
    ctx.note("page-before-fork", frame_gpa(before));
    ctx.note("page-after-fork", frame_gpa(after));
    ctx.note("released", released.to_string());
    ctx.note("device-wrote-at", held.join(" "));
    ctx.check(
        "the unheld read's part holds its data",
        check_pattern(
            seed,
            OFFSET + held_parts as u64 * 512,
            &page.bytes(held_parts * 512, 512),
        )
        .is_ok(),
        "the last 512 B".to_owned(),
    );
    let detail =
        if failed.is_empty() {
            format!("all {held_parts} held parts hold their data")
        } else {
            format!(
            "parts {failed:?} of {held_parts} kept their old bytes; the device wrote them at {} {}",
            held.join(" "),
            if before != after {
                format!("after the page had left the process (it now maps {})", frame_gpa(after))
            } else {
                "but the process does not see them".to_owned()
            }
        )
        };
    ctx.check("every held part holds its data", failed.is_empty(), detail);
    Ok(())
}

/// Waits until the device holds `n` reads; returns the guest addresses it
/// will write.
fn wait_for_held(mailbox: &Mailbox, n: usize) -> Result<Vec<String>, Stop> {
    let start = std::time::Instant::now();
    loop {
        let held = mailbox.call(json!({"cmd": "held"}))?;
        let reads: Vec<String> = held
            .as_array()
            .map(|h| {
                h.iter()
                    .filter(|p| p["held"] == true && p["op"] == "read")
                    .map(|p| p["segments"][0]["gpa"].as_str().unwrap_or("?").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        if reads.len() >= n {
            return Ok(reads);
        }
        if start.elapsed() > std::time::Duration::from_secs(10) {
            return Err(Stop::Error(format!(
                "the device held {} of {n} reads: {held}",
                reads.len()
            )));
        }
        thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Bytes of patterned memory the bystander process keeps and checks.
const BYSTANDER: usize = 64 << 20;

/// How the owner of a page under a held read lets it go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LetGo {
    /// The process unmaps the page.
    Unmap,
    /// The process is killed.
    Exit,
}

pub fn unmap(ctx: &Ctx) -> Result<(), Stop> {
    let_go(ctx, LetGo::Unmap)
}

pub fn exit(ctx: &Ctx) -> Result<(), Stop> {
    let_go(ctx, LetGo::Exit)
}

fn let_go(ctx: &Ctx, how: LetGo) -> Result<(), Stop> {
    let Setup { mailbox, fd, seed } = Setup::new(ctx, false)?;
    let hold = Hold::next(&mailbox, "read", LBA)?;
    // The owner: a thread of this process (unmap), or a process of its own (exit).
    let read_into = move |fd: &Fd, addr: usize| {
        // SAFETY: the page is let go while this read is in flight: that is the
        // test. The kernel keeps what it needs of it; this code never touches
        // the memory itself.
        let dst = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, 512) };
        fd.read_exact_at(dst, OFFSET)
    };
    let (owner_thread, owner_pid, held) = match how {
        LetGo::Unmap => {
            let page = AnonPage::map()?;
            page.fill(0x11);
            let addr = page.addr();
            let fd = fd.clone();
            let t = thread::spawn(move || read_into(&fd, addr));
            let held = hold.wait_held()?;
            let early = returned_while_held(|| t.is_finished());
            check_read_waits(ctx, early, "the read returned while the device held it");
            drop(page); // munmap, with the read in flight
            (Some(t), None, held)
        }
        LetGo::Exit => {
            let page = AnonPage::map()?;
            page.fill(0x11);
            // SAFETY: the child only reads into its page and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let code = i32::from(read_into(&fd, page.addr()).is_err());
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            let held = hold.wait_held()?;
            // The owner exits only once its read returned.
            let early = returned_while_held(|| {
                // SAFETY: polling our own child's state, without reaping it.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
                // SAFETY: a valid siginfo_t for waitid(2) to fill.
                unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
                // SAFETY: si_pid is set by waitid when a child changed state.
                let changed = unsafe { info.si_pid() };
                changed == pid
            });
            check_read_waits(
                ctx,
                early,
                "the owner's read returned while the device held it",
            );
            // SAFETY: killing our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            (None, Some(pid), held)
        }
    };
    // A bystander fills memory with a pattern: it would get the freed page if
    // the kernel let it go, and the device's write would then land in it.
    let bystander = Bystander::start(seed)?;
    thread::sleep(std::time::Duration::from_millis(500));
    mailbox.mark("release");
    hold.release()?;
    let read = match owner_thread {
        Some(t) => format!(
            "{:?}",
            t.join()
                .map_err(|_| Stop::Error("the reader thread panicked".into()))?
                .map_err(|e| e.to_string())
        ),
        None => format!(
            "the owner was killed: wait status {}",
            wait(owner_pid.unwrap_or(0))
        ),
    };
    let status = bystander.finish();
    // The owner is gone: the device's ledger says where the data went.
    hold.check_landed(ctx)?;
    ctx.note("device-wrote-at", first_gpa(&held));
    ctx.note("owner", read);
    ctx.check(
        "the other process's memory is intact",
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        format!(
            "the bystander's {} MiB of pattern: exit status {status}",
            BYSTANDER >> 20
        ),
    );
    Ok(())
}

/// A process that fills memory with a pattern, waits for a go, and exits 0 if
/// the pattern is intact.
struct Bystander {
    pid: libc::pid_t,
    go: i32,
}

impl Bystander {
    fn start(seed: u64) -> Result<Bystander, Stop> {
        let mut pipe = [0i32; 2];
        // SAFETY: a valid two-int array for pipe(2).
        if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
            return Err(Stop::Error("pipe failed".into()));
        }
        // SAFETY: the child only touches its own memory, reads a pipe and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut mem = vec![0u8; BYSTANDER];
            fill_pattern(seed ^ 0xb1, 0, &mut mem);
            let mut go = [0u8; 1];
            // SAFETY: reading one byte from our pipe into a local buffer.
            unsafe { libc::read(pipe[0], go.as_mut_ptr().cast(), 1) };
            let bad = wire::pattern::pattern_mismatch(seed ^ 0xb1, 0, &mem).is_some();
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(i32::from(bad)) }
        }
        Ok(Bystander { pid, go: pipe[1] })
    }

    /// Tells it to check its memory; its wait status.
    fn finish(self) -> i32 {
        // SAFETY: writing one byte to our own pipe.
        unsafe { libc::write(self.go, [1u8].as_ptr().cast(), 1) };
        wait(self.pid)
    }
}

/// Waits for a child; its wait status.
fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    status
}
