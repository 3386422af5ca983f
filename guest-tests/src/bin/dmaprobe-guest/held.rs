//! Holding one of the test's own requests at the device, through the mailbox:
//! what the pinning tests start with ([`Setup`]), a rule that holds the next
//! request of one op at one LBA, a wait until the device lists it, and its
//! release.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use guest_tests::protocol::fill_pattern;
use serde_json::{json, Value};

use crate::io::{AlignedBuf, Cache, Fd, PAGE};
use crate::mailbox::Mailbox;
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

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let _ = self
            .mailbox
            .call(json!({"cmd": "remove-rule", "id": self.rule["id"]}));
    }
}
