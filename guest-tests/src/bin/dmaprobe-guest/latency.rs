//! `latency-instant`, `latency-nvme`, `latency-sata`: the device's media
//! latency model (`dmaprobe serve --latency PRESET`) as a program in the guest
//! sees it, one test per preset.
//!
//! At queue depth 1 with O_DIRECT, the test times 4 KiB reads at random
//! offsets for [`RANDOM_FOR`], then 128 KiB sequential reads for
//! [`SEQUENTIAL_FOR`]. After each data read it makes the same read of the
//! mailbox, which the device answers without its media model: the mailbox
//! reads are the baseline of the guest, QEMU and the device under TCG, taken
//! in the same moments as the data reads. Notes give p50, p99 and mean in µs
//! of both, and the model's floor for the read.
//!
//! Checks, for a preset that adds time: the p50 of the data reads is at least
//! the model's floor ([`LatencySpec::min_service`]: no device answers faster
//! than its media); and the data reads' p50 exceeds the mailbox reads' p50 by
//! at least three quarters of that floor — the time is the media model's, not
//! the emulator's, which by itself can exceed the floor. `latency-instant`
//! reports its figures with no bound.

use std::time::{Duration, Instant};

use nvme_model::{LatencySpec, MediaOp};
use wire::mailbox::mailbox_offset;
use wire::splitmix::SplitMix64;

use crate::io::{AlignedBuf, Cache, Fd};
use crate::{Ctx, OrStop, Stop};

/// How long 4 KiB random reads are timed.
const RANDOM_FOR: Duration = Duration::from_secs(3);
/// How long 128 KiB sequential reads are timed.
const SEQUENTIAL_FOR: Duration = Duration::from_secs(2);
/// Reads of each kind not counted at the start (first touches, JIT warm-up).
const WARM_UP: usize = 20;

pub fn instant(ctx: &Ctx) -> Result<(), Stop> {
    run(ctx, "instant")
}

pub fn nvme(ctx: &Ctx) -> Result<(), Stop> {
    run(ctx, "nvme")
}

pub fn sata(ctx: &Ctx) -> Result<(), Stop> {
    run(ctx, "sata")
}

/// Latencies of one kind of read, sorted.
struct Sample(Vec<Duration>);

impl Sample {
    fn new(mut v: Vec<Duration>) -> Sample {
        v.sort_unstable();
        Sample(v)
    }

    /// The `p`th percentile (nearest rank).
    fn pct(&self, p: usize) -> Duration {
        let n = self.0.len();
        let rank = (n * p).div_ceil(100).clamp(1, n.max(1));
        self.0.get(rank - 1).copied().unwrap_or_default()
    }

    fn mean(&self) -> Duration {
        let n = u32::try_from(self.0.len()).unwrap_or(u32::MAX).max(1);
        self.0.iter().sum::<Duration>() / n
    }

    fn summary(&self) -> String {
        format!(
            "p50 {} µs, p99 {} µs, mean {} µs over {} reads",
            self.pct(50).as_micros(),
            self.pct(99).as_micros(),
            self.mean().as_micros(),
            self.0.len()
        )
    }
}

fn run(ctx: &Ctx, preset: &str) -> Result<(), Stop> {
    let spec = LatencySpec::preset(preset)
        .ok_or_else(|| Stop::Error(format!("no latency preset {preset:?}")))?;
    let disk = ctx.disk()?;
    let fd = Fd::open_read(disk, Cache::Direct).or_error()?;
    let name = disk.trim_start_matches("/dev/");
    let sectors: u64 = std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .or_error()?
        .trim()
        .parse()
        .map_err(|_| Stop::Error(format!("/sys/block/{name}/size is not a number")))?;
    let size = sectors * 512;
    let mailbox = mailbox_offset(size).ok_or_else(|| {
        Stop::Error(format!(
            "{disk} of {size} B has no mailbox: the test needs --mailbox"
        ))
    })?;
    ctx.note("latency-preset", preset);

    let mut offsets = SplitMix64(ctx.seed(1));
    let blocks = mailbox / 4096;
    let random = measure(&fd, 4096, mailbox, RANDOM_FOR, |_| {
        offsets.below(blocks) * 4096
    })?;
    let chunk = 128 << 10;
    let chunks = mailbox / chunk;
    let sequential = measure(&fd, 128 << 10, mailbox, SEQUENTIAL_FOR, |i| {
        (i % chunks) * chunk
    })?;

    for (name, bytes, (data, baseline)) in [
        ("4k-randread", 4096u64, random),
        ("128k-seqread", 128 << 10, sequential),
    ] {
        let floor = spec.min_service(MediaOp::Read, bytes);
        ctx.note(name, data.summary());
        ctx.note(&format!("{name}-mailbox"), baseline.summary());
        ctx.note(&format!("{name}-floor-us"), floor.as_micros().to_string());
        if spec.is_instant() {
            continue;
        }
        let (p50, base) = (data.pct(50), baseline.pct(50));
        ctx.check(
            &format!("{name}: p50 at least the model's floor"),
            p50 >= floor,
            format!(
                "p50 {} µs; the {preset} model serves a {bytes}-byte read in at least {} µs",
                p50.as_micros(),
                floor.as_micros()
            ),
        );
        let added = p50.saturating_sub(base);
        ctx.check(
            &format!("{name}: the device adds the media time"),
            added >= floor.mul_f64(0.75),
            format!(
                "p50 {} µs against {} µs for mailbox reads of the same size: {} µs added; \
                 the model's floor is {} µs",
                p50.as_micros(),
                base.as_micros(),
                added.as_micros(),
                floor.as_micros()
            ),
        );
    }
    Ok(())
}

/// Reads of `len` bytes at `offset(i)` for the `i`th, each followed by the
/// same read of the mailbox at `mailbox`, for `period`; the latencies of both.
fn measure(
    fd: &Fd,
    len: usize,
    mailbox: u64,
    period: Duration,
    mut offset: impl FnMut(u64) -> u64,
) -> Result<(Sample, Sample), Stop> {
    let mut buf = AlignedBuf::new(len, 0).or_error()?;
    let timed = |buf: &mut AlignedBuf, at: u64| -> Result<Duration, Stop> {
        let start = Instant::now();
        fd.read_exact_at(buf.as_mut_slice(), at).or_fail()?;
        Ok(start.elapsed())
    };
    let (mut data, mut baseline) = (Vec::new(), Vec::new());
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < period || data.is_empty() {
        let d = timed(&mut buf, offset(i))?;
        let b = timed(&mut buf, mailbox)?;
        if i >= WARM_UP as u64 {
            data.push(d);
            baseline.push(b);
        }
        i += 1;
    }
    Ok((Sample::new(data), Sample::new(baseline)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let s = Sample::new((1..=100).rev().map(Duration::from_micros).collect());
        assert_eq!(s.pct(50), Duration::from_micros(50));
        assert_eq!(s.pct(99), Duration::from_micros(99));
        assert_eq!(s.pct(100), Duration::from_micros(100));
        assert_eq!(s.mean(), Duration::from_nanos(50_500));
        let one = Sample::new(vec![Duration::from_micros(7)]);
        assert_eq!(
            (one.pct(50), one.pct(99)),
            (Duration::from_micros(7), Duration::from_micros(7))
        );
        assert_eq!(Sample::new(Vec::new()).pct(50), Duration::ZERO);
    }
}
