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

use guest_tests::protocol::fill_pattern;

use crate::ext4::{first_lba, Mount};
use crate::held::{Hold, Setup, LBA, OFFSET};
use crate::io::{check_pattern, AlignedBuf, Cache, Fd, PAGE};
use crate::mailbox::Mailbox;
use crate::mm::{fork_and_wait, pfn, pins, AnonPage};
use crate::{Ctx, OrStop, Stop};

/// The read: the first 512 B of the page.
const READ_LEN: usize = 512;
/// What the page holds before the read.
const OLD: u8 = 0x11;
/// Where in the page, and what, the writer after fork writes.
const TOUCH_AT: usize = 2048;
const TOUCH: u8 = 0x33;

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

/// `dio-read-fork-cow-ext4`: the read goes through a file on ext4.
pub fn ext4_file(ctx: &Ctx) -> Result<(), Stop> {
    let source = Source::ext4_file(ctx)?;
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

    /// A page of pattern in a file on the ext4 file system the host made; the
    /// hold rule names the file's first block on the disk (FIBMAP).
    fn ext4_file(ctx: &Ctx) -> Result<Source, Stop> {
        let disk = ctx.disk()?;
        let mailbox = Mailbox::open(disk)?;
        let mount = Mount::ext4(disk, "/mnt")?;
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

    let reader = {
        let (fd, page) = (fd.clone(), page.clone());
        thread::spawn(move || {
            // SAFETY: the page is mapped for the life of `page`, which this thread
            // holds; the kernel writes it by DMA, no Rust reference aliases it.
            let buf = unsafe { std::slice::from_raw_parts_mut(page.addr() as *mut u8, READ_LEN) };
            fd.read_exact_at(buf, offset)
        })
    };
    let held = hold.wait_held()?;
    let gpa = held["segments"][0]["gpa"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let pins_during = pins().ok();

    mailbox.mark("fork");
    let status = fork_and_wait(|| {
        if writer == Writer::Child {
            page.write(TOUCH_AT, TOUCH);
        }
    })?;
    if writer == Writer::Parent {
        page.write(TOUCH_AT, TOUCH);
        mailbox.mark("parent wrote");
    } else {
        mailbox.mark("child wrote and exited");
    }
    let pfn_after = pfn(page.addr())?;

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

    let hex = |p: Option<u64>| {
        p.map_or("not present".to_owned(), |p| {
            format!("{:#x}", p * PAGE as u64)
        })
    };
    ctx.note("page-before-fork", hex(pfn_before));
    ctx.note("page-after-write", hex(pfn_after));
    ctx.note("device-wrote-at", gpa.clone());
    if let (Some(before), Some(during)) = (pins_before, pins_during) {
        ctx.note("pins-while-held", (during - before).to_string());
    }
    ctx.check(
        "the other half of the page kept the write",
        page.read(TOUCH_AT) == if writer == Writer::Parent { TOUCH } else { OLD },
        format!("byte {TOUCH_AT} holds {:#04x}", page.read(TOUCH_AT)),
    );
    let got = page.bytes(0, READ_LEN);
    let result = check_pattern(seed, offset, &got)
        .map(|()| format!("the parent's {READ_LEN} B hold the data read"))
        .map_err(|m| {
            let moved = pfn_before != pfn_after;
            let why = if got.iter().all(|&b| b == OLD) {
                format!(
                    "the parent's buffer kept its old bytes; the device wrote {READ_LEN} B at GPA {gpa} {}",
                    if moved {
                        format!("after the page had left the parent (it now maps {})", hex(pfn_after))
                    } else {
                        "but the parent does not see them".to_owned()
                    }
                )
            } else {
                format!("the parent's buffer is wrong: {m}")
            };
            Stop::Fail(why)
        });
    ctx.record("the parent sees the data", result)
}
