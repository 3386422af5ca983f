//! Holding one of the test's own requests at the device, through the mailbox:
//! what the pinning tests start with ([`Setup`]), a rule that holds the next
//! request of one op at one LBA, a wait until the device lists it, and its
//! release. And the evidence such a request leaves when the process forks
//! while it is held: [`ForkedRead`] for a read, [`disk_holds_parents`] for a
//! write.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wire::pattern::fill_pattern;

use crate::io::{check_pattern, AlignedBuf, Cache, Fd, PAGE};
use crate::mailbox::Mailbox;
use crate::mm::frame_gpa;
use crate::{Ctx, OrStop, Stop};

/// Where the pinning tests keep their data: byte 1 MiB, LBA 2048 with 512 B blocks.
pub const OFFSET: u64 = 1 << 20;
pub const LBA: u64 = OFFSET / 512;

/// The disk's mailbox, an O_DIRECT descriptor, and the seed of the page of
/// pattern written at [`OFFSET`].
pub struct Setup {
    pub mailbox: Mailbox,
    pub fd: Arc<Fd>,
    pub seed: u64,
}

impl Setup {
    /// Opens the disk and writes a page of pattern at [`OFFSET`]; with
    /// `host_checks`, tells the host to check it is still there at the end.
    pub fn new(ctx: &Ctx, host_checks: bool) -> Result<Setup, Stop> {
        let disk = ctx.disk()?;
        let mailbox = Mailbox::open(disk)?;
        let fd = Arc::new(Fd::open(disk, Cache::Direct).or_error()?);
        let seed = ctx.seed(1);
        let mut data = AlignedBuf::new(PAGE, 0).or_error()?;
        fill_pattern(seed, OFFSET, data.as_mut_slice());
        fd.write_all_at(data.as_slice(), OFFSET).or_fail()?;
        if host_checks {
            ctx.wrote(OFFSET, PAGE, seed);
        }
        Ok(Setup { mailbox, fd, seed })
    }
}

const HELD_TIMEOUT: Duration = Duration::from_secs(10);

/// A hold rule at the device for the next `op` at `lba`; removed on drop.
pub struct Hold<'a> {
    mailbox: &'a Mailbox,
    op: &'static str,
    lba: u64,
    rule: Value,
}

impl<'a> Hold<'a> {
    pub fn next(mailbox: &'a Mailbox, op: &'static str, lba: u64) -> Result<Self, Stop> {
        let rule = mailbox.call(json!({"cmd": "add-rule",
            "rule": format!("op={op},lba={lba},count=1,action=hold")}))?;
        Ok(Hold {
            mailbox,
            op,
            lba,
            rule,
        })
    }

    /// Waits until the device holds the request; returns its listing (with
    /// the guest memory it will move data to or from).
    pub fn wait_held(&self) -> Result<Value, Stop> {
        let start = Instant::now();
        loop {
            let held = self.mailbox.call(json!({"cmd": "held"}))?;
            let found = held.as_array().and_then(|h| {
                h.iter()
                    .find(|p| p["held"] == true && p["op"] == self.op && p["lba"] == self.lba)
                    .cloned()
            });
            if let Some(p) = found {
                return Ok(p);
            }
            if start.elapsed() > HELD_TIMEOUT {
                return Err(Stop::Error(format!(
                    "the device never held the {} of LBA {}: held = {held}",
                    self.op, self.lba
                )));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lets the held request go.
    pub fn release(&self) -> Result<(), Stop> {
        let r = self.mailbox.call(json!({"cmd": "release",
            "match": format!("op={},lba={}", self.op, self.lba)}))?;
        if r["released"] == 1 {
            Ok(())
        } else {
            Err(Stop::Error(format!("the release answered {r}")))
        }
    }
}

impl Hold<'_> {
    /// Checks in the device's ledger, once the released request completed,
    /// that its data moved to or from the guest memory the kernel gave the
    /// device, and nowhere else: the evidence of where it landed when the
    /// process that could have looked is gone.
    pub fn check_landed(&self, ctx: &Ctx) -> Result<(), Stop> {
        let start = Instant::now();
        let record = loop {
            let page = self
                .mailbox
                .call(json!({"cmd": "ledger", "since": 0, "limit": 100000}))?;
            let found = page["entries"].as_array().and_then(|entries| {
                entries
                    .iter()
                    .rev()
                    .find(|e| e["kind"] == "request" && e["op"] == self.op && e["lba"] == self.lba)
                    .cloned()
            });
            match found {
                Some(record) => break record,
                None if start.elapsed() > HELD_TIMEOUT => {
                    return Err(Stop::Error(format!(
                        "the device's ledger has no record of the {} of LBA {}",
                        self.op, self.lba
                    )))
                }
                None => thread::sleep(Duration::from_millis(20)),
            }
        };
        let given = first_gpa(&record);
        let moved = &record["moved_to"][0]["gpa"];
        ctx.check(
            &format!("the device moved the {}'s data where it was told", self.op),
            moved.is_null(),
            match moved.as_str() {
                None => format!("the device's ledger: at {given}"),
                Some(to) => {
                    format!("the device's ledger: at {to}, not at {given}, the page it was given")
                }
            },
        );
        Ok(())
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let _ = self
            .mailbox
            .call(json!({"cmd": "remove-rule", "id": self.rule["id"]}));
    }
}

/// The guest-physical address of a held request's first segment, from the
/// device's listing ("?" if it lists none).
pub fn first_gpa(held: &Value) -> String {
    held["segments"][0]["gpa"]
        .as_str()
        .unwrap_or("?")
        .to_owned()
}

/// The shape of every read held across fork: [`FORK_READ_LEN`] bytes into the
/// start of an anonymous page that held [`OLD`], while the parent (or child)
/// writes [`TOUCH`] at [`TOUCH_AT`].
pub const FORK_READ_LEN: usize = 512;
/// What the page holds before the read.
pub const OLD: u8 = 0x11;
/// Where in the page, and what, the writer after fork writes.
pub const TOUCH_AT: usize = 2048;
pub const TOUCH: u8 = 0x33;

/// `pins-while-held`: how far the pin counter rose while the device held
/// the request (nothing if the counter could not be read).
pub fn note_pins(ctx: &Ctx, before: Option<i64>, during: Option<i64>) {
    if let (Some(before), Some(during)) = (before, during) {
        ctx.note("pins-while-held", (during - before).to_string());
    }
}

/// Checks that a read held across fork is still pending while the device
/// holds it: one that `returned` was completed before its data moved (a
/// device that completes before its DMA).
pub fn check_read_waits(ctx: &Ctx, returned: bool, detail: &str) {
    ctx.check("the read waits for the device", !returned, detail);
}

/// How long [`returned_while_held`] watches a held read.
const EARLY: Duration = Duration::from_millis(100);

/// Whether a read the device holds returns (`returned()` becomes true)
/// within [`EARLY`]: on a sound device it never does, so the wait decides
/// nothing but how soon a device that completes before its DMA is caught.
pub fn returned_while_held(mut returned: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < EARLY {
        if returned() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    returned()
}

/// How the mark that dates the page move for the timeline ends: the moment
/// the process left the page it had before fork (`page-before-fork`) for
/// another (`page-after-fork`).
pub const LEFT_PAGE: &str = "process left its page";

/// Marks `what` in the device's ledger (the write, or the pin, that followed
/// the fork), as `"{what}; `[`LEFT_PAGE`]`"` if the page's frame moved from
/// `before` (before fork) to `after`. Called as soon as `after` is read, so
/// the mark lands right after the move, with nothing else between.
pub fn mark_after_fork(mailbox: &Mailbox, what: &str, before: Option<u64>, after: Option<u64>) {
    if before == after {
        mailbox.mark(what);
    } else {
        mailbox.mark(&format!("{what}; {LEFT_PAGE}"));
    }
}

/// A read into the start of a page, held while the process forked and then
/// released: where the device put the data, and the page the parent mapped
/// before fork and after its write.
#[derive(Debug)]
pub struct ForkedRead<'a> {
    /// Where the device was told to write (its listing of the held read).
    pub gpa: &'a str,
    /// The page's frame before fork and after the write that followed it.
    pub before: Option<u64>,
    pub after: Option<u64>,
}

impl ForkedRead<'_> {
    /// Whether `got`, the parent's first [`FORK_READ_LEN`] bytes, hold
    /// `fill_pattern(seed, offset)`; if not, one line saying where the data went.
    pub fn judge(&self, seed: u64, offset: u64, got: &[u8]) -> Result<String, Stop> {
        let len = FORK_READ_LEN;
        check_pattern(seed, offset, got)
            .map(|()| format!("the parent's {len} B hold the data read"))
            .map_err(|m| {
                Stop::Fail(if got.iter().all(|&b| b == OLD) {
                    format!(
                        "the parent's buffer kept its old bytes; the device wrote {len} B at GPA {} {}",
                        self.gpa,
                        if self.before != self.after {
                            format!(
                                "after the page had left the parent (it now maps {})",
                                frame_gpa(self.after)
                            )
                        } else {
                            "but the parent does not see them".to_owned()
                        }
                    )
                } else {
                    format!("the parent's buffer is wrong: {m}")
                })
            })
    }
}

/// Whether `back`, read from byte `offset` after a write held across fork
/// whose child then filled its page with `child`, holds the parent's
/// `fill_pattern(seed, offset)`; if not, one line counting the child's bytes.
pub fn disk_holds_parents(seed: u64, offset: u64, back: &[u8], child: u8) -> Result<String, Stop> {
    check_pattern(seed, offset, back)
        .map(|()| format!("{} B at byte {offset} are the parent's", back.len()))
        .map_err(|m| {
            let childs = back.iter().filter(|&&b| b == child).count();
            Stop::Fail(format!(
                "the disk does not hold the parent's data ({childs} B are the child's {child:#04x}): {m}"
            ))
        })
}
