//! The zero page and O_DIRECT, both ways, and the pin counter while requests
//! are held.
//!
//! - `zero-page-write-source`: an O_DIRECT write from anonymous memory that was
//!   never touched (mapped to the zero page, or not at all). The disk must
//!   hold zeros, and while the device holds the write the pin counter must not
//!   count the zero page. The device's view (a zero-page source, or not) is a
//!   note; a non-zero byte from the zero page would be its finding.
//!   [`write_source_by`] is that test with the write issued another way
//!   (`passthru-zero-page-write-source`: an NVMe passthrough Write).
//! - `zero-page-read-target`: an O_DIRECT read into anonymous memory that was
//!   only read (so mapped to the zero page). The kernel must give the read a
//!   page of its own: the device must never be told to write into the zero
//!   page (its `dma-to-zero-page` finding fails the test), and the program
//!   sees the data.
//! - `dio-pin-accounting`: while the device holds a read and then a write, the
//!   pin counter is read: it says whether this kernel pins O_DIRECT pages
//!   (FOLL_PIN, Linux 6.5 on) or only references them. A property of the
//!   kernel, reported, not a failure. The pins must be released, and each
//!   request's data must land: the read's in its page, the write's on the
//!   disk, and the device's ledger must show it moved them where it was told.

use std::sync::Arc;
use std::thread;

use crate::held::{first_gpa, Hold, Setup, LBA, OFFSET};
use crate::io::{check_pattern, AlignedBuf, Fd, PAGE, UNTOUCHED};
use crate::mailbox::Mailbox;
use crate::mm::{pfn, pins, zero_page_gpa, AnonPage};
use crate::{Ctx, OrStop, Stop};

pub fn write_source(ctx: &Ctx) -> Result<(), Stop> {
    // Something that is not zeros first, so the write has to change it.
    let Setup { mailbox, fd, .. } = Setup::new(ctx, false)?;
    let writer = fd.clone();
    write_source_by(ctx, &mailbox, &fd, move |page| {
        // SAFETY: the mapping lives as long as `page`, borrowed for this call;
        // the kernel only reads it.
        let src = unsafe { std::slice::from_raw_parts(page.addr() as *const u8, PAGE) };
        writer.write_all_at(src, OFFSET).or_fail()
    })
}

/// The body of the zero-page write-source tests: `write` writes the whole
/// never-touched page to byte [`OFFSET`] of the disk (from a thread of its
/// own: it returns when the write completes); `fd` (O_DIRECT) reads it back.
pub fn write_source_by(
    ctx: &Ctx,
    mailbox: &Mailbox,
    fd: &Fd,
    write: impl FnOnce(&AnonPage) -> Result<(), Stop> + Send + 'static,
) -> Result<(), Stop> {
    let zero = zero_page_gpa()?;
    let page = Arc::new(AnonPage::map()?);
    let hold = Hold::next(mailbox, "write", LBA)?;
    let pins_before = pins()?;
    let writer = {
        let page = page.clone();
        thread::spawn(move || write(&page))
    };
    let held = hold.wait_held()?;
    let pins_during = pins()?;
    hold.release()?;
    writer
        .join()
        .map_err(|_| Stop::Error("the writer thread panicked".into()))??;

    let source = first_gpa(&held);
    ctx.note("zero-page", format!("{zero:#x}"));
    ctx.note("device-read-from", source.clone());
    ctx.note(
        "source-is-zero-page",
        (u64::from_str_radix(source.trim_start_matches("0x"), 16).ok() == Some(zero)).to_string(),
    );
    ctx.check(
        "the zero page is not pinned",
        pins_during - pins_before <= 0,
        format!(
            "the pin counter moved by {} while the write was held",
            pins_during - pins_before
        ),
    );
    let mut back = AlignedBuf::new(PAGE, 0).or_error()?;
    back.as_mut_slice().fill(UNTOUCHED);
    fd.read_exact_at(back.as_mut_slice(), OFFSET).or_fail()?;
    let nonzero = back.as_slice().iter().filter(|&&b| b != 0).count();
    ctx.check(
        "the disk holds zeros",
        nonzero == 0,
        format!("{nonzero} of {PAGE} B read back are not zero"),
    );
    Ok(())
}

pub fn read_target(ctx: &Ctx) -> Result<(), Stop> {
    let Setup { mailbox, fd, seed } = Setup::new(ctx, true)?;

    let zero = zero_page_gpa()?;
    let page = Arc::new(AnonPage::map()?);
    let _ = page.read(0);
    let before = pfn(page.addr())?;
    ctx.note(
        "buffer-before-read",
        before.map_or("not present".into(), |p| format!("{:#x}", p * PAGE as u64)),
    );
    let hold = Hold::next(&mailbox, "read", LBA)?;
    let reader = {
        let (fd, page) = (fd.clone(), page.clone());
        thread::spawn(move || {
            // SAFETY: the mapping lives as long as `page`, held by this thread; the
            // kernel writes it by DMA, no Rust reference aliases it.
            let dst = unsafe { std::slice::from_raw_parts_mut(page.addr() as *mut u8, PAGE) };
            fd.read_exact_at(dst, OFFSET)
        })
    };
    let held = hold.wait_held()?;
    hold.release()?;
    reader
        .join()
        .map_err(|_| Stop::Error("the reader thread panicked".into()))?
        .or_fail()?;
    let target = first_gpa(&held);
    ctx.note("device-wrote-at", target.clone());
    ctx.check(
        "the device was not told to write the zero page",
        u64::from_str_radix(target.trim_start_matches("0x"), 16).ok() != Some(zero),
        format!("the read's destination is {target}; the zero page is {zero:#x}"),
    );
    ctx.record(
        "the program sees the data",
        check_pattern(seed, OFFSET, &page.bytes(0, PAGE))
            .map(|()| format!("{PAGE} B match"))
            .map_err(|m| Stop::Fail(format!("the buffer after the read: {m}"))),
    )
}

pub fn pin_accounting(ctx: &Ctx) -> Result<(), Stop> {
    let Setup { mailbox, fd, seed } = Setup::new(ctx, false)?;
    let mut rises = Vec::new();
    for op in ["read", "write"] {
        let page = Arc::new(AnonPage::map()?);
        page.fill(WRITTEN);
        let hold = Hold::next(&mailbox, op, LBA)?;
        let before = pins()?;
        let io = {
            let (fd, page) = (fd.clone(), page.clone());
            thread::spawn(move || {
                let p = page.addr() as *mut u8;
                if op == "read" {
                    // SAFETY: the mapping lives as long as `page`; the kernel writes it.
                    fd.read_exact_at(unsafe { std::slice::from_raw_parts_mut(p, PAGE) }, OFFSET)
                } else {
                    // SAFETY: as above; the kernel only reads it.
                    fd.write_all_at(unsafe { std::slice::from_raw_parts(p, PAGE) }, OFFSET)
                }
            })
        };
        hold.wait_held()?;
        let during = pins()?;
        hold.release()?;
        io.join()
            .map_err(|_| Stop::Error(format!("the {op} thread panicked")))?
            .or_fail()?;
        let after = pins()?;
        ctx.note(
            &format!("pins-while-{op}-held"),
            (during - before).to_string(),
        );
        ctx.check(
            &format!("the pins taken for the {op} are released"),
            after - before <= 0,
            format!(
                "the pin counter is {} above where it started",
                after - before
            ),
        );
        rises.push(during - before);
        hold.check_landed(ctx)?;
        check_data(ctx, op, &fd, &page, seed)?;
    }
    let pins_pages = rises.iter().all(|&r| r >= 1);
    ctx.note(
        "dio-pins-pages",
        format!(
            "{} (the pin counter rose by {} for the read and {} for the write)",
            if pins_pages { "yes" } else { "no" },
            rises[0],
            rises[1]
        ),
    );
    Ok(())
}

/// What `dio-pin-accounting` writes: its page before the read, and the data
/// of the write.
const WRITTEN: u8 = 0x5a;

/// Checks that the held `op` moved its data: the read brought the pattern
/// [`Setup`] wrote into `page`; the write put `page`'s bytes on the disk.
fn check_data(ctx: &Ctx, op: &str, fd: &Fd, page: &AnonPage, seed: u64) -> Result<(), Stop> {
    if op == "read" {
        let found = check_pattern(seed, OFFSET, &page.bytes(0, PAGE));
        let detail = found
            .as_ref()
            .err()
            .map_or("the disk's pattern".to_owned(), ToString::to_string);
        ctx.check("the read's data is in its page", found.is_ok(), detail);
        return Ok(());
    }
    let mut back = AlignedBuf::new(PAGE, 0).or_error()?;
    fd.read_exact_at(back.as_mut_slice(), OFFSET).or_fail()?;
    let wrong = back.as_slice().iter().filter(|&&b| b != WRITTEN).count();
    ctx.check(
        "the write's data is on the disk",
        wrong == 0,
        format!("{wrong} of {PAGE} bytes read back are not the page's {WRITTEN:#x}"),
    );
    Ok(())
}
