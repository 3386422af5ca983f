//! Self-tests of the harness, accepted by the runner only with `--allow-selftests`.
//!
//! - `selftest-fail` fails on purpose: it writes a pattern with O_DIRECT, reads
//!   it back correctly, and then checks it against the pattern of a different
//!   seed, as a test with a wrong expectation would.
//! - `selftest-hang` never ends, as a guest stuck in the kernel would not.

use wire::pattern::fill_pattern;

use crate::io::{check_pattern, AlignedBuf, Cache, Fd, UNTOUCHED};
use crate::{Ctx, OrStop, Stop};

const LEN: usize = 4096;

pub fn fail(ctx: &Ctx) -> Result<(), Stop> {
    let fd = Fd::open(ctx.disk()?, Cache::Direct).or_error()?;
    let (written, expected) = (ctx.seed(1), ctx.seed(2));
    let mut buf = AlignedBuf::new(LEN, 0).or_error()?;
    fill_pattern(written, 0, buf.as_mut_slice());
    fd.write_all_at(buf.as_slice(), 0).or_fail()?;
    buf.as_mut_slice().fill(UNTOUCHED);
    fd.read_exact_at(buf.as_mut_slice(), 0).or_fail()?;
    let result = check_pattern(expected, 0, buf.as_slice())
        .map(|()| format!("{LEN} B at byte 0 match the expected pattern"))
        .map_err(|m| Stop::Fail(format!("O_DIRECT read of {LEN} B at byte 0: {m}")));
    ctx.record("deliberately wrong expectation", result)
}

pub fn hang(_ctx: &Ctx) -> Result<(), Stop> {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
