//! `splice-truncate`: splice from an O_DIRECT file races with truncate while
//! the device holds the read (the pattern of the syzbot report against the
//! ITER_PIPE conversion).
//!
//! On the ext4 file system the host made: a 64 KiB file of pattern; the device
//! holds the read of its first block; one thread splices the file (opened
//! O_DIRECT) into a pipe, another truncates the file to zero meanwhile; then the
//! read is released. Whatever the splice returns must be the file's data, and
//! the kernel must log nothing and the device see nothing wrong (both fail the
//! test through the runner); the host's e2fsck must pass.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use wire::pattern::fill_pattern;

use crate::ext4::{first_lba, Mount};
use crate::held::Hold;
use crate::io::{check_pattern, AlignedBuf, Cache, Fd};
use crate::mailbox::Mailbox;
use crate::{Ctx, OrStop, Stop};

const FILE: &str = "/mnt/splice.bin";
const LEN: usize = 64 << 10;

pub fn run(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let mailbox = Mailbox::open(disk)?;
    let mount = Mount::ext4(disk, "/mnt")?;
    let seed = ctx.seed(1);
    let lba = {
        let fd = Fd::create(FILE, Cache::Direct).or_error()?;
        let mut data = AlignedBuf::new(LEN, 0).or_error()?;
        fill_pattern(seed, 0, data.as_mut_slice());
        fd.write_all_at(data.as_slice(), 0).or_fail()?;
        fd.sync().or_fail()?;
        first_lba(&fd, FILE)?
    };

    let hold = Hold::next(&mailbox, "read", lba)?;
    let src = Arc::new(Fd::open(FILE, Cache::Direct).or_error()?);
    let mut pipe = [0; 2];
    // SAFETY: pipe2 fills the two-int array it is given.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Stop::Error("pipe2 failed".into()));
    }
    let (rd, wr) = (pipe[0], pipe[1]);
    // The pipe must hold the whole splice, or the splice waits for a reader.
    // SAFETY: F_SETPIPE_SZ on our own pipe.
    unsafe { libc::fcntl(wr, libc::F_SETPIPE_SZ, (LEN * 2) as libc::c_int) };
    let splicer = {
        let src = src.clone();
        thread::spawn(move || {
            let mut off: libc::loff_t = 0;
            // SAFETY: both descriptors are open for the call; `off` is ours.
            let n = unsafe { libc::splice(src.raw(), &mut off, wr, std::ptr::null_mut(), LEN, 0) };
            (n, std::io::Error::last_os_error())
        })
    };
    hold.wait_held()?;
    mailbox.mark("truncate");
    let truncater = thread::spawn(|| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(FILE)
            .and_then(|f| f.set_len(0))
    });
    thread::sleep(Duration::from_millis(200));
    mailbox.mark("release");
    hold.release()?;
    let (n, err) = splicer
        .join()
        .map_err(|_| Stop::Error("the splice thread panicked".into()))?;
    let truncated = truncater
        .join()
        .map_err(|_| Stop::Error("the truncate thread panicked".into()))?;
    ctx.note("splice-returned", format!("{n} ({err})"));
    ctx.note("truncate", format!("{truncated:?}"));
    let got = usize::try_from(n).unwrap_or(0);
    let mut data = vec![0u8; got];
    let mut read = 0;
    while read < got {
        // SAFETY: reading into the unread tail of our own buffer.
        let r = unsafe { libc::read(rd, data[read..].as_mut_ptr().cast(), got - read) };
        if r <= 0 {
            break;
        }
        read += usize::try_from(r).unwrap_or(0);
    }
    // SAFETY: closing the pipe's two ends, ours, once.
    unsafe {
        libc::close(rd);
        libc::close(wr);
    }
    drop(src);
    ctx.check(
        "what the splice returned is the file's data",
        read == got && check_pattern(seed, 0, &data[..read]).is_ok(),
        format!("the splice returned {n}; {read} B read from the pipe"),
    );
    ctx.record("unmount", mount.unmount())
}
