//! `mailbox-hold`: a program holds its own O_DIRECT read through the device
//! mailbox, sees that it stays pending, releases it, and gets its data.
//!
//! The host serves the disk with `--mailbox`. Steps: write a pattern at byte
//! 1 MiB; ask the device to hold the next read of that block; read it from a
//! second thread; after 2 s the read must still be pending, and the device
//! must list it as held; release it; the read returns the pattern.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::held::{Setup, LBA, OFFSET};
use crate::io::{check_pattern, AlignedBuf, PAGE, UNTOUCHED};
use crate::{Ctx, OrStop, Stop};

const LEN: usize = PAGE;
const PENDING_FOR: Duration = Duration::from_secs(2);

pub fn run(ctx: &Ctx) -> Result<(), Stop> {
    let Setup { mailbox, fd, seed } = Setup::new(ctx, true)?;
    let lba = LBA;
    let rule = format!("op=read,lba={lba},count=1,action=hold");
    let added = mailbox.call(json!({"cmd": "add-rule", "rule": rule}))?;
    ctx.note("rule", format!("{rule} (id {})", added["id"]));

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (fd, done) = (fd.clone(), done.clone());
        thread::spawn(move || {
            let mut buf = AlignedBuf::new(LEN, 0)?;
            buf.as_mut_slice().fill(UNTOUCHED);
            let start = Instant::now();
            let r = fd.read_exact_at(buf.as_mut_slice(), OFFSET);
            done.store(true, Ordering::SeqCst);
            r.map(|()| (buf, start.elapsed()))
        })
    };
    thread::sleep(PENDING_FOR);
    let still_pending = !done.load(Ordering::SeqCst);
    ctx.check(
        "the read is pending while held",
        still_pending,
        format!(
            "after {} s the O_DIRECT read had {}returned",
            PENDING_FOR.as_secs(),
            if still_pending { "not " } else { "" }
        ),
    );
    let held = mailbox.call(json!({"cmd": "held"}))?;
    let listed = held.as_array().is_some_and(|h| {
        h.iter()
            .any(|p| p["held"] == true && p["op"] == "read" && p["lba"] == lba)
    });
    ctx.check(
        "the device lists the read as held",
        listed,
        format!("held: {held}"),
    );
    let released =
        mailbox.call(json!({"cmd": "release", "match": format!("op=read,lba={lba}")}))?;
    ctx.check(
        "the release reaches it",
        released["released"] == 1,
        format!("release answered {released}"),
    );
    let (data, took) = reader
        .join()
        .map_err(|_| Stop::Error("the reader thread panicked".into()))?
        .or_fail()?;
    ctx.note("read-ms", took.as_millis().to_string());
    let _ = mailbox.call(json!({"cmd": "remove-rule", "id": added["id"]}));
    ctx.record(
        "the released read returns the data",
        check_pattern(seed, OFFSET, data.as_slice())
            .map(|()| {
                format!(
                    "{LEN} B at byte {OFFSET} match, after {} ms",
                    took.as_millis()
                )
            })
            .map_err(|m| Stop::Fail(format!("O_DIRECT read of {LEN} B at byte {OFFSET}: {m}"))),
    )
}
