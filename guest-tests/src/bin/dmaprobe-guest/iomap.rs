//! `iomap-zeroing-ext4` / `iomap-zeroing-xfs`: O_DIRECT writes of 512 B into
//! 4 KiB file-system blocks over a 512-byte-sector disk.
//!
//! A direct write smaller than a block into a hole or an unwritten extent
//! leaves the rest of the block to the file system, which writes zeros around
//! the data (iomap's sub-block zeroing; 6.1 sources them from the zero page,
//! later kernels from a zeroed buffer). Cases: a hole and an unwritten extent
//! (fallocate), the 512 B at the head, the middle and the tail of the block,
//! and a block past the end of the file. For each: the device must see writes
//! covering the whole block (the padding) — read from its ledger through the
//! mailbox —, the file must read back exactly (O_DIRECT and through the page
//! cache), and the host's fsck must pass.

use std::collections::BTreeSet;

use serde_json::json;
use wire::pattern::{fill_pattern, pattern_mismatch};

use crate::ext4::{block_lba, drop_caches, Mount};
use crate::io::{AlignedBuf, Cache, Fd, PAGE};
use crate::mailbox::Mailbox;
use crate::{Ctx, OrStop, Stop};

const BLOCK: u64 = 4096;
const LEN: usize = 512;

#[derive(Clone, Copy)]
enum Space {
    Hole,
    Unwritten,
    PastEof,
}

pub fn ext4(ctx: &Ctx) -> Result<(), Stop> {
    run(ctx, "ext4")
}

pub fn xfs(ctx: &Ctx) -> Result<(), Stop> {
    run(ctx, "xfs")
}

fn run(ctx: &Ctx, kind: &str) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let mailbox = Mailbox::open(disk)?;
    let mount = Mount::fs(disk, "/mnt", kind)?;
    let mut k = 0;
    for (space, name) in [
        (Space::Hole, "hole"),
        (Space::Unwritten, "unwritten"),
        (Space::PastEof, "past-eof"),
    ] {
        for (pos, where_) in [(0, "head"), (1536, "middle"), (BLOCK - LEN as u64, "tail")] {
            k += 1;
            let case = format!("{name} {where_}");
            let result = one_case(&mailbox, space, pos, ctx.seed(k), k);
            ctx.record(&case, result)?;
        }
    }
    ctx.record("unmount", mount.unmount())
}

/// One write and its checks; the detail says what the device saw.
fn one_case(mailbox: &Mailbox, space: Space, pos: u64, seed: u64, k: u64) -> Result<String, Stop> {
    let path = format!("/mnt/iomap-{k}");
    let fd = Fd::create(&path, Cache::Direct).or_error()?;
    // Block 1 of the file takes the write; block 0 holds data for past-EOF.
    let target_block = match space {
        Space::PastEof => 2,
        _ => 1,
    };
    match space {
        Space::Hole => std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(4 * BLOCK))
            .or_error()?,
        Space::Unwritten => {
            // SAFETY: fallocate on our own descriptor with plain integers.
            if unsafe { libc::fallocate(fd.raw(), 0, 0, 4 * BLOCK as libc::off_t) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(Stop::Skip(format!("fallocate: {e}")));
            }
        }
        Space::PastEof => {
            let mut first = AlignedBuf::new(PAGE, 0).or_error()?;
            fill_pattern(seed ^ 1, 0, first.as_mut_slice());
            fd.write_all_at(first.as_slice(), 0).or_fail()?;
            fd.sync().or_fail()?;
        }
    }
    let at = target_block * BLOCK + pos;
    let mut data = AlignedBuf::new(LEN, 0).or_error()?;
    fill_pattern(seed, at, data.as_mut_slice());
    let cursor = mailbox.call(json!({"cmd": "mark", "label": format!("write {path}")}))?;
    fd.write_all_at(data.as_slice(), at).or_fail()?;
    fd.sync().or_fail()?;

    // What the device saw written to the block.
    let lba = block_lba(&fd, &path, target_block)?;
    let seen = written_sectors(mailbox, cursor["at_ns"].as_u64().unwrap_or(0), lba)?;
    if seen.len() < 8 {
        return Err(Stop::Fail(format!(
            "the device saw only sectors {seen:?} of the block's 8 (LBA {lba}): the padding was not written"
        )));
    }
    reads_back(&path, seed, at, matches!(space, Space::PastEof))?;
    Ok(format!(
        "512 B at byte {at}; the device wrote all 8 sectors of the block (LBA {lba}); the file reads back exactly"
    ))
}

/// Checks, with the page cache dropped first, that the file at `path` reads
/// back (O_DIRECT and buffered) as a 512 B write of `fill_pattern(seed, at)`
/// at byte `at` left it: the data, zeros around it, and with `first_block`
/// its first 4 KiB holding `fill_pattern(seed ^ 1, 0)`.
pub fn reads_back(path: &str, seed: u64, at: u64, first_block: bool) -> Result<(), Stop> {
    let size = std::fs::metadata(path).map(|m| m.len()).or_error()?;
    drop_caches()?;
    let (at_us, end) = (
        usize::try_from(at).unwrap_or(0),
        usize::try_from(at).unwrap_or(0) + LEN,
    );
    let start = if first_block { PAGE } else { 0 };
    for (how, bytes) in [
        ("O_DIRECT", read_direct(path, size)?),
        ("buffered", std::fs::read(path).or_error()?),
    ] {
        if bytes.len() < end {
            return Err(Stop::Fail(format!(
                "{how}: the file has {} B, want at least {end}",
                bytes.len()
            )));
        }
        if let Some(m) = pattern_mismatch(seed, at, &bytes[at_us..end]) {
            return Err(Stop::Fail(format!(
                "{how}: the data at byte {} is wrong",
                at_us + m
            )));
        }
        if start > 0 && pattern_mismatch(seed ^ 1, 0, &bytes[..start]).is_some() {
            return Err(Stop::Fail(format!("{how}: the first block lost its data")));
        }
        let stray = (start..at_us)
            .chain(end..bytes.len())
            .find(|&i| bytes[i] != 0);
        if let Some(i) = stray {
            return Err(Stop::Fail(format!(
                "{how}: byte {i} of the file is {:#04x}, not zero",
                bytes[i]
            )));
        }
    }
    Ok(())
}

/// The sectors of the block at `lba` that write requests arriving after
/// `since_ns` covered, from the device's ledger.
pub fn written_sectors(mailbox: &Mailbox, since_ns: u64, lba: u64) -> Result<BTreeSet<u64>, Stop> {
    let page = mailbox.call(json!({"cmd": "ledger", "since": 0, "limit": 100000}))?;
    let mut seen = BTreeSet::new();
    for e in page["entries"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        if e["kind"] != "request" || e["op"] != "write" || e["arrived_ns"].as_u64() < Some(since_ns)
        {
            continue;
        }
        let (first, len) = (
            e["lba"].as_u64().unwrap_or(0),
            e["len"].as_u64().unwrap_or(0),
        );
        for s in first..first + len / 512 {
            if (lba..lba + BLOCK / 512).contains(&s) {
                seen.insert(s);
            }
        }
    }
    Ok(seen)
}

fn read_direct(path: &str, size: u64) -> Result<Vec<u8>, Stop> {
    let fd = Fd::open_read(path, Cache::Direct).or_error()?;
    let len = usize::try_from(size.div_ceil(BLOCK) * BLOCK).unwrap_or(0);
    let mut buf = AlignedBuf::new(len, 0).or_error()?;
    let n = fd.read_at(buf.as_mut_slice(), 0).or_fail()?;
    let mut out = buf.as_slice()[..n.min(len)].to_vec();
    out.truncate(usize::try_from(size).unwrap_or(0));
    Ok(out)
}
