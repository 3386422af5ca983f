//! `delayed-read`: the data of a delayed read moves when the device says, not
//! before.
//!
//! The host serves the disk with `op=read,lba=2048,action=delay,ms=1000`. The
//! test writes a pattern at LBA 2048 (byte 1 MiB), then reads it back with
//! O_DIRECT into a buffer holding its own bytes. While the read is in flight a
//! second thread looks at the buffer: it must still hold the program's bytes.
//! When the read returns, at least a second later, the buffer holds the data.

use std::thread;
use std::time::{Duration, Instant};

use wire::pattern::fill_pattern;

use crate::io::{check_pattern, AlignedBuf, Cache, Fd, UNTOUCHED};
use crate::{Ctx, OrStop, Stop};

/// Byte 1 MiB: LBA 2048 with 512-byte blocks, the LBA the host's rule delays.
const OFFSET: u64 = 1 << 20;
const LEN: usize = 4096;
/// The device's delay, as the host configures it.
const DELAY: Duration = Duration::from_millis(1000);
/// When the second thread looks at the buffer.
const PROBE_AT: Duration = Duration::from_millis(300);

pub fn run(ctx: &Ctx) -> Result<(), Stop> {
    let fd = Fd::open(ctx.disk()?, Cache::Direct).or_error()?;
    let seed = ctx.seed(1);
    let mut buf = AlignedBuf::new(LEN, 0).or_error()?;
    fill_pattern(seed, OFFSET, buf.as_mut_slice());
    fd.write_all_at(buf.as_slice(), OFFSET).or_fail()?;
    ctx.wrote(OFFSET, LEN, seed);
    buf.as_mut_slice().fill(UNTOUCHED);

    let addr = buf.as_slice().as_ptr() as usize;
    let start = Instant::now();
    let probe = thread::spawn(move || {
        thread::sleep(PROBE_AT);
        let seen: Vec<u8> = (0..LEN)
            // SAFETY: the buffer lives until after this thread is joined; the
            // kernel may write it at any moment, so each byte is read volatile.
            .map(|i| unsafe { std::ptr::read_volatile((addr + i) as *const u8) })
            .collect();
        (start.elapsed(), seen)
    });
    let read = fd.read_exact_at(buf.as_mut_slice(), OFFSET);
    let took = start.elapsed();
    let (probed_at, seen) = probe
        .join()
        .map_err(|_| Stop::Error("the probe thread panicked".into()))?;
    read.or_fail()?;

    ctx.note("read-ms", took.as_millis().to_string());
    ctx.check(
        "the read waited for the device",
        took >= DELAY.mul_f32(0.9),
        format!(
            "the O_DIRECT read took {} ms; the device delays it {} ms",
            took.as_millis(),
            DELAY.as_millis()
        ),
    );
    if probed_at >= took {
        return Err(Stop::Error(format!(
            "the probe ran at {} ms, after the read had returned at {} ms",
            probed_at.as_millis(),
            took.as_millis()
        )));
    }
    let untouched = seen.iter().filter(|&&b| b == UNTOUCHED).count();
    ctx.check(
        "the buffer kept its own bytes while the read was in flight",
        untouched == LEN,
        format!(
            "at {} ms, {untouched} of {LEN} B still held {UNTOUCHED:#04x}",
            probed_at.as_millis()
        ),
    );
    ctx.record(
        "the data arrived at completion",
        check_pattern(seed, OFFSET, buf.as_slice())
            .map(|()| format!("{LEN} B at byte {OFFSET} match"))
            .map_err(|m| Stop::Fail(format!("O_DIRECT read of {LEN} B at byte {OFFSET}: {m}"))),
    )
}
