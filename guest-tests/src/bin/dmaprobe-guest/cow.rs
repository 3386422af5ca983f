//! `dio-read-fork-cow`: does the kernel keep a page pinned for an O_DIRECT read
//! across fork?
//!
//! A thread reads 512 B with O_DIRECT into the start of an anonymous page. The
//! device holds the read (through the mailbox) while the process forks and
//! the parent (or, in `dio-read-fork-cow-child`, the child) writes elsewhere in
//! that page. Then the read is released. The parent's page must hold the data.
//!
//! A kernel that only took a reference on the page (not a FOLL_PIN pin) lets
//! fork share it copy-on-write; the write after fork then gives the parent a
//! fresh copy, and the device's DMA lands in the old page, which the parent no
//! longer maps: the parent's buffer keeps its old bytes. With the pinning work
//! of Linux 6.5, fork copies a pinned page for the child at once and the parent
//! keeps the page the device writes.

use std::sync::Arc;
use std::thread;

use wire::pattern::fill_pattern;

use crate::ext4::{first_lba, Mount};
use crate::held::{
    check_read_waits, first_gpa, mark_after_fork, note_pins, ForkedRead, Hold, Setup,
    FORK_READ_LEN, LBA, OFFSET, OLD, TOUCH, TOUCH_AT,
};
use crate::io::{AlignedBuf, Cache, Fd, IoError, PAGE};
use crate::mailbox::Mailbox;
use crate::mm::{fork_and_wait, frame_gpa, pfn, pins, AnonPage};
use crate::{Ctx, OrStop, Stop};

/// Who writes to the page after fork.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Parent,
    Child,
}

pub fn parent_writes(ctx: &Ctx) -> Result<(), Stop> {
    run(ctx, Writer::Parent, Source::raw(ctx)?)
}

pub fn child_writes(ctx: &Ctx) -> Result<(), Stop> {
    run(ctx, Writer::Child, Source::raw(ctx)?)
}

/// `dio-read-fork-cow-ext4`: the read goes through a file on ext4 (iomap's
/// direct I/O, which maps the buffer with `bio_iov_iter_get_pages()`).
pub fn ext4_file(ctx: &Ctx) -> Result<(), Stop> {
    let source = Source::file(ctx, "ext4")?;
    run(ctx, Writer::Parent, source)
}

/// `dio-read-fork-cow-vfat`: the read goes through a file on vfat, whose
/// direct I/O is the legacy code of fs/direct-io.c: `fat_direct_IO` calls
/// `blockdev_direct_IO`, which takes the buffer's pages with
/// `iov_iter_get_pages2()` (references) on 6.1 and with
/// `iov_iter_extract_pages()` (pins, `BIO_PAGE_PINNED`) from 6.5 on.
pub fn vfat_file(ctx: &Ctx) -> Result<(), Stop> {
    let source = Source::file(ctx, "vfat")?;
    run(ctx, Writer::Parent, source)
}

/// What the held read reads: the raw disk, or a file on ext4.
struct Source {
    mailbox: Mailbox,
    fd: Arc<Fd>,
    /// Where in `fd` the read starts, and the pattern's offset there.
    offset: u64,
    /// The disk block the read reaches, for the hold rule.
    lba: u64,
    seed: u64,
    mount: Option<Mount>,
}

const FILE: &str = "/cow.bin";

impl Source {
    fn raw(ctx: &Ctx) -> Result<Source, Stop> {
        let Setup { mailbox, fd, seed } = Setup::new(ctx, true)?;
        Ok(Source {
            mailbox,
            fd,
            offset: OFFSET,
            lba: LBA,
            seed,
            mount: None,
        })
    }

    /// A page of pattern in a file on the file system (`kind`: ext4, vfat)
    /// the host made; the hold rule names the file's first block on the disk
    /// (FIBMAP).
    fn file(ctx: &Ctx, kind: &str) -> Result<Source, Stop> {
        let disk = ctx.disk()?;
        let mailbox = Mailbox::open(disk)?;
        let mount = Mount::fs(disk, "/mnt", kind)?;
        let path = format!("/mnt{FILE}");
        let seed = ctx.seed(1);
        let fd = Fd::create(&path, Cache::Direct).or_error()?;
        let mut data = AlignedBuf::new(PAGE, 0).or_error()?;
        fill_pattern(seed, 0, data.as_mut_slice());
        fd.write_all_at(data.as_slice(), 0).or_fail()?;
        fd.sync().or_fail()?;
        let lba = first_lba(&fd, &path)?;
        ctx.file(FILE, PAGE, seed);
        Ok(Source {
            mailbox,
            fd: Arc::new(fd),
            offset: 0,
            lba,
            seed,
            mount: Some(mount),
        })
    }
}

fn run(ctx: &Ctx, writer: Writer, source: Source) -> Result<(), Stop> {
    let Source {
        mailbox,
        fd,
        offset,
        lba,
        seed,
        mount,
    } = source;
    ctx.note("read-lba", lba.to_string());

    let page = Arc::new(AnonPage::map()?);
    page.fill(OLD);
    let pfn_before = pfn(page.addr())?;

    let hold = Hold::next(&mailbox, "read", lba)?;
    let pins_before = pins().ok();

    let reader = spawn_reader(&fd, &page, offset);
    let held = hold.wait_held()?;
    check_read_waits(
        ctx,
        reader.is_finished(),
        "the read returned while the device held it",
    );
    let gpa = first_gpa(&held);
    let pins_during = pins().ok();

    let (status, pfn_after) = fork_and_write(&mailbox, &page, pfn_before, writer)?;

    hold.release()?;
    reader
        .join()
        .map_err(|_| Stop::Error("the reader thread panicked".into()))?
        .or_fail()?;
    if status != 0 {
        return Err(Stop::Error(format!(
            "the child exited with status {status}"
        )));
    }
    if let Some(m) = mount {
        drop(fd);
        ctx.record("unmount", m.unmount())?;
    }

    ctx.note("page-before-fork", frame_gpa(pfn_before));
    ctx.note("page-after-fork", frame_gpa(pfn_after));
    ctx.note("device-wrote-at", gpa.clone());
    note_pins(ctx, pins_before, pins_during);
    ctx.check(
        "the other half of the page kept the write",
        page.read(TOUCH_AT) == if writer == Writer::Parent { TOUCH } else { OLD },
        format!("byte {TOUCH_AT} holds {:#04x}", page.read(TOUCH_AT)),
    );
    let evidence = ForkedRead {
        gpa: &gpa,
        before: pfn_before,
        after: pfn_after,
    };
    let result = evidence.judge(seed, offset, &page.bytes(0, FORK_READ_LEN));
    ctx.record("the parent sees the data", result)
}

/// Starts the O_DIRECT read of [`FORK_READ_LEN`] B at `offset` of `fd` into
/// the start of `page`, on a thread of its own.
fn spawn_reader(
    fd: &Arc<Fd>,
    page: &Arc<AnonPage>,
    offset: u64,
) -> thread::JoinHandle<Result<(), IoError>> {
    let (fd, page) = (fd.clone(), page.clone());
    thread::spawn(move || {
        // SAFETY: the page is mapped for the life of `page`, which this thread
        // holds; the kernel writes it by DMA, no Rust reference aliases it.
        let buf = unsafe { std::slice::from_raw_parts_mut(page.addr() as *mut u8, FORK_READ_LEN) };
        fd.read_exact_at(buf, offset)
    })
}

/// Forks, and the `writer` writes to the page (whose frame was
/// `pfn_before`): the child before it exits, or the parent once the child
/// is reaped; each moment marked in the device's ledger, the second with
/// the page move if the page moved. Returns the child's exit status and the
/// page's frame after.
fn fork_and_write(
    mailbox: &Mailbox,
    page: &AnonPage,
    pfn_before: Option<u64>,
    writer: Writer,
) -> Result<(i32, Option<u64>), Stop> {
    mailbox.mark("fork");
    let status = fork_and_wait(|| {
        if writer == Writer::Child {
            page.write(TOUCH_AT, TOUCH);
        }
    })?;
    let wrote = match writer {
        Writer::Parent => {
            page.write(TOUCH_AT, TOUCH);
            "parent wrote"
        }
        Writer::Child => "child wrote and exited",
    };
    let pfn_after = pfn(page.addr())?;
    mark_after_fork(mailbox, wrote, pfn_before, pfn_after);
    Ok((status, pfn_after))
}
