//! `dio-zeroing-udf`: the zero padding of the legacy direct-I/O code
//! (fs/direct-io.c), with the zero page as its source.
//!
//! When a direct write is finer than the file system's block and lands in a
//! block that `get_block` has just allocated (`buffer_new`), `do_direct_IO`
//! and `__blockdev_direct_IO` call `dio_zero_block()`, which writes the rest
//! of the block from `ZERO_PAGE(0)` through `submit_page_section()`. On 6.1
//! that takes a reference on the zero page (`get_page`); from 6.5 on it goes
//! through `dio_pin_page()`, whose `folio_add_pin()` leaves the zero page
//! alone, and `BIO_PAGE_PINNED` bios unpin with `unpin_user_page()`, which
//! does the same. The zero page must never be pinned.
//!
//! Of the file systems Debian's cloud kernels build, FAT, exFAT and UDF use
//! this code. FAT never lets it allocate (`fat_direct_IO` sends a write past
//! the initialised size to the page cache), nor does exFAT on 6.1
//! (`i_size_aligned`; 6.12's exFAT does, by another rule). UDF allocates on
//! both (`udf_get_block` sets `buffer_new`), with blocks of up to 4 KiB over
//! a 512-byte-sector disk. `blockdev_direct_IO`
//! passes `DIO_SKIP_HOLES`, so a block inside the file is never allocated by
//! a direct write (it falls back to the page cache): the write must be past
//! the end of the file.
//!
//! Each case: a file whose first 4 KiB block is written and synced, then a
//! 512 B O_DIRECT write into block 2 (block 1 stays a hole), at the head, the
//! middle and the tail of the block. The device holds the write (every write
//! under the case's tag) while the pin counter is read: it must move exactly
//! as it does for the same 512 B write over an allocated block, which needs
//! no padding (the baseline, measured first), so that nothing of the padding
//! is counted as pinned. Then the device must have seen all 8 sectors of the
//! block written (its ledger), the file must read back exactly, and the
//! host's udfinfo must find the volume closed after the unmount. Where the
//! padding came from (the zero page, registered with the device at start) is
//! a note.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wire::pattern::fill_pattern;

use crate::ext4::{block_lba, Mount};
use crate::io::{AlignedBuf, Cache, Fd, PAGE};
use crate::iomap::{reads_back, written_sectors};
use crate::mailbox::Mailbox;
use crate::mm::{pins, zero_page_gpa};
use crate::{Ctx, OrStop, Stop};

const BLOCK: u64 = 4096;
const LEN: usize = 512;
/// How long the device may take to list the write's first request.
const FIRST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait, after the first, for the rest of the block's requests.
const REST_TIMEOUT: Duration = Duration::from_secs(3);

pub fn udf(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let mailbox = Mailbox::open(disk)?;
    let zero = zero_page_gpa()?;
    ctx.note("zero-page", format!("{zero:#x}"));
    // No data inside the inode (UDF's in-ICB files): every file has blocks.
    let mount = Mount::with_options(disk, "/mnt", "udf", "noadinicb")?;
    let baseline = baseline(&mailbox, ctx.seed(4))?;
    ctx.note("pins-while-unpadded-write-held", baseline.to_string());
    for (k, (pos, where_)) in [(0, "head"), (1536, "middle"), (BLOCK - LEN as u64, "tail")]
        .into_iter()
        .enumerate()
    {
        let k = k as u64 + 1;
        let result = one_case(ctx, &mailbox, zero, baseline, pos, ctx.seed(k), k);
        ctx.record(&format!("past-eof {where_}"), result)?;
    }
    ctx.record("unmount", mount.unmount())
}

/// A file of one 4 KiB block of `fill_pattern(seed ^ 1, 0)`, written and synced.
fn one_block_file(path: &str, seed: u64) -> Result<Arc<Fd>, Stop> {
    let fd = Fd::create(path, Cache::Direct).or_error()?;
    let mut first = AlignedBuf::new(PAGE, 0).or_error()?;
    fill_pattern(seed ^ 1, 0, first.as_mut_slice());
    fd.write_all_at(first.as_slice(), 0).or_fail()?;
    fd.sync().or_fail()?;
    Ok(Arc::new(fd))
}

/// What the pin counter does while the device holds a 512 B direct write
/// that needs no padding (over the file's allocated first block): the
/// buffer's own share, with which a padded write's must agree.
///
/// The counter is not simply +1 per pinned page on every kernel: on 6.12 the
/// legacy code's extra pins (`dio_pin_page()`, `folio_add_pin()`) are not
/// counted as acquired while their `unpin_user_page()` is counted as
/// released, so a held one-page write reads -1. Only the difference between
/// the two writes is the padding's.
fn baseline(mailbox: &Mailbox, seed: u64) -> Result<i64, Stop> {
    let path = "/mnt/unpadded";
    let fd = one_block_file(path, seed)?;
    let (_, rise) = held_write(mailbox, &fd, 1536, LEN as u64, seed, "zeroing-baseline")?;
    Ok(rise)
}

/// One write past the end of a file and its checks; the detail says what
/// the device saw.
fn one_case(
    ctx: &Ctx,
    mailbox: &Mailbox,
    zero: u64,
    baseline: i64,
    pos: u64,
    seed: u64,
    k: u64,
) -> Result<String, Stop> {
    let path = format!("/mnt/zeroing-{k}");
    let fd = one_block_file(&path, seed)?;
    let at = 2 * BLOCK + pos;
    let cursor = mailbox.call(json!({"cmd": "mark", "label": format!("write {path}")}))?;
    let (held, rise) = held_write(mailbox, &fd, at, BLOCK, seed, &format!("zeroing-{k}"))?;

    let (from_zero, segments) = zero_page_bytes(&held, zero);
    ctx.note(
        &format!("case-{k}-padding-source"),
        format!(
            "{from_zero} of {} B held in {segments} segment(s) came from the zero page",
            total_bytes(&held)
        ),
    );
    if rise != baseline {
        return Err(Stop::Fail(format!(
            "the pin counter moved by {rise} while the padded write was held, by {baseline} \
             for the same write without padding: the padding's pages ({from_zero} B from \
             the zero page) were counted as pinned"
        )));
    }
    let lba = block_lba(&fd, &path, 2)?;
    let seen = written_sectors(mailbox, cursor["at_ns"].as_u64().unwrap_or(0), lba)?;
    if seen.len() < 8 {
        return Err(Stop::Fail(format!(
            "the device saw only sectors {seen:?} of the block's 8 (LBA {lba}): the padding was not written"
        )));
    }
    drop(fd);
    reads_back(&path, seed, at, true)?;
    Ok(format!(
        "512 B at byte {at}; the device wrote all 8 sectors of the block (LBA {lba}), \
         {from_zero} B from the zero page; the pin counter moved as without padding \
         ({rise}); the file reads back exactly"
    ))
}

/// A 512 B O_DIRECT write of `fill_pattern(seed, at)` at byte `at` of `fd`,
/// every request of it held under `tag` (until `expect` bytes are held)
/// while the pin counter is read; then released, and the file synced. Returns what the device held and how far
/// the counter moved from before the write to while it was held.
fn held_write(
    mailbox: &Mailbox,
    fd: &Arc<Fd>,
    at: u64,
    expect: u64,
    seed: u64,
    tag: &str,
) -> Result<(Vec<Value>, i64), Stop> {
    let mut data = AlignedBuf::new(LEN, 0).or_error()?;
    fill_pattern(seed, at, data.as_mut_slice());
    let hold = TagHold::start(mailbox, tag.to_owned())?;
    let pins_before = pins()?;
    let writer = {
        let fd = fd.clone();
        thread::spawn(move || fd.write_all_at(data.as_slice(), at))
    };
    let held = hold.wait_for(expect)?;
    let pins_during = pins()?;
    hold.release()?;
    writer
        .join()
        .map_err(|_| Stop::Error("the writer thread panicked".into()))?
        .or_fail()?;
    fd.sync().or_fail()?;
    Ok((held, pins_during - pins_before))
}

/// Every write arriving under a test tag, held until released: the writes
/// of one direct I/O, whatever blocks the file system picks. On drop, the
/// tag ends, the rule goes and whatever it still holds is let go.
struct TagHold<'a> {
    mailbox: &'a Mailbox,
    tag: String,
    rule: Value,
}

impl<'a> TagHold<'a> {
    fn start(mailbox: &'a Mailbox, tag: String) -> Result<Self, Stop> {
        mailbox.call(json!({"cmd": "begin", "tag": tag}))?;
        let rule = mailbox.call(json!({"cmd": "add-rule",
            "rule": format!("op=write,tag={tag},action=hold")}));
        let rule = match rule {
            Ok(rule) => rule,
            Err(e) => {
                let _ = mailbox.call(json!({"cmd": "end"}));
                return Err(e);
            }
        };
        Ok(TagHold { mailbox, tag, rule })
    }

    /// The held writes of the tag, once their bytes reach `bytes` (or some
    /// are held and no more came for [`REST_TIMEOUT`]).
    fn wait_for(&self, bytes: u64) -> Result<Vec<Value>, Stop> {
        let start = Instant::now();
        let mut first_seen: Option<Instant> = None;
        loop {
            let listing = self.mailbox.call(json!({"cmd": "held"}))?;
            let held: Vec<Value> = listing
                .as_array()
                .map(|h| {
                    h.iter()
                        .filter(|p| p["held"] == true && p["tag"] == self.tag.as_str())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            if !held.is_empty() {
                let since = *first_seen.get_or_insert_with(Instant::now);
                if total_bytes(&held) >= bytes || since.elapsed() > REST_TIMEOUT {
                    return Ok(held);
                }
            } else if start.elapsed() > FIRST_TIMEOUT {
                return Err(Stop::Error(format!(
                    "the device held no write under tag {} in {} s: held = {listing}",
                    self.tag,
                    FIRST_TIMEOUT.as_secs()
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the tag and the rule, so that nothing after the write is held,
    /// then lets the tag's writes go.
    fn release(self) -> Result<(), Stop> {
        self.stop_holding();
        let r = self.mailbox.call(json!({"cmd": "release",
            "match": format!("tag={}", self.tag)}))?;
        if r["released"].as_u64() > Some(0) {
            Ok(())
        } else {
            Err(Stop::Error(format!("the release answered {r}")))
        }
    }

    fn stop_holding(&self) {
        let _ = self.mailbox.call(json!({"cmd": "end"}));
        let _ = self
            .mailbox
            .call(json!({"cmd": "remove-rule", "id": self.rule["id"]}));
    }
}

impl Drop for TagHold<'_> {
    fn drop(&mut self) {
        self.stop_holding();
        let _ = self.mailbox.call(json!({"cmd": "release",
            "match": format!("tag={}", self.tag)}));
    }
}

fn total_bytes(held: &[Value]) -> u64 {
    held.iter().filter_map(|p| p["len"].as_u64()).sum()
}

/// The bytes of the held requests whose guest memory is the zero page at
/// `zero`, and how many segments they had in all.
fn zero_page_bytes(held: &[Value], zero: u64) -> (u64, usize) {
    let segments: Vec<&Value> = held
        .iter()
        .flat_map(|p| p["segments"].as_array().map(Vec::as_slice).unwrap_or(&[]))
        .collect();
    let on_zero = segments
        .iter()
        .filter(|s| {
            let gpa = s["gpa"].as_str().unwrap_or("");
            u64::from_str_radix(gpa.trim_start_matches("0x"), 16)
                .is_ok_and(|g| g / PAGE as u64 == zero / PAGE as u64)
        })
        .filter_map(|s| s["len"].as_u64())
        .sum();
    (on_zero, segments.len())
}
