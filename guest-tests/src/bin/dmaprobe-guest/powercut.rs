//! What a file system keeps when the disk misbehaves: a power cut between two
//! boots, and a bad block under a file.
//!
//! `power-cut-ext4` runs in two boots against one daemon and disk; the host
//! cuts the power (`{"cmd":"power-cut"}` on the control socket) in between.
//! 1. Boot 1: mount ext4 with `commit=600` (no journal commit behind the
//!    test's back), write `/synced.bin` through the page cache and fsync it,
//!    write `/unsynced.bin` with O_DIRECT and no fsync, then power off with no
//!    sync and no unmount, once the events are out.
//! 2. Boot 2: the file system must have been left unclean (its superblock
//!    says the journal needs recovery); mount it (the journal is replayed);
//!    `/synced.bin` must hold its data; what is left of `/unsynced.bin` is a
//!    note (ext4 may or may not have committed it); unmount. The host then
//!    checks `/synced.bin` and runs e2fsck.
//!
//! `bad-block-ext4`: a 64 KiB file written with O_DIRECT and fsync'd; the
//! device is told through the mailbox that the 4 KiB block under the file's
//! start fails reads. An O_DIRECT read of the file must fail with EIO (ENODATA
//! over NVMe, whose unrecovered read error is a medium error); an
//! O_DIRECT rewrite of that block must succeed, and the file then reads back
//! whole. The host checks the file and runs e2fsck.

use std::fs;
use std::io as stdio;

use serde_json::json;
use wire::pattern::fill_pattern;

use crate::ext4::{drop_caches, first_lba, Mount};
use crate::io::{check_pattern, AlignedBuf, Cache, Fd, IoError, PAGE, UNTOUCHED};
use crate::mailbox::Mailbox;
use crate::{Ctx, OrStop, Stop};

const MOUNT_POINT: &str = "/mnt";
const SYNCED: &str = "/synced.bin";
const UNSYNCED: &str = "/unsynced.bin";
const FILE_LEN: usize = 2 << 20;
const DIRECT_CHUNK: usize = 128 << 10;

pub fn power_cut(ctx: &Ctx) -> Result<(), Stop> {
    match ctx.params().boot {
        1 => before_cut(ctx),
        2 => after_cut(ctx),
        n => Err(Stop::Error(format!("power-cut-ext4 has no boot {n}"))),
    }
}

fn path(name: &str) -> String {
    format!("{MOUNT_POINT}{name}")
}

fn before_cut(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let mount = Mount::with_options(disk, MOUNT_POINT, "ext4", "commit=600")?;
    let synced_seed = ctx.seed(1);
    ctx.record(
        &format!("buffered write and fsync {SYNCED}"),
        write_synced(synced_seed),
    )?;
    ctx.file(SYNCED, FILE_LEN, synced_seed);
    ctx.record(
        &format!("O_DIRECT write {UNSYNCED}, no fsync"),
        write_unsynced(ctx.seed(2)),
    )?;
    ctx.note(
        "boot 1 left",
        format!(
            "{SYNCED} ({FILE_LEN} B, fsync'd) and {UNSYNCED} ({FILE_LEN} B, O_DIRECT, \
             no fsync) on ext4 mounted with commit=600; power off without sync or unmount"
        ),
    );
    mount.leave_mounted();
    ctx.power_off_unsynced();
    Ok(())
}

fn write_synced(seed: u64) -> Result<String, Stop> {
    let fd = Fd::create(path(SYNCED), Cache::Buffered).or_fail()?;
    let mut data = vec![0; FILE_LEN];
    fill_pattern(seed, 0, &mut data);
    fd.write_all_at(&data, 0).or_fail()?;
    fd.sync().or_fail()?;
    Ok(format!("{FILE_LEN} B, fsync"))
}

fn write_unsynced(seed: u64) -> Result<String, Stop> {
    let fd = Fd::create(path(UNSYNCED), Cache::Direct).or_fail()?;
    let mut buf = AlignedBuf::new(DIRECT_CHUNK, 0).or_error()?;
    for offset in (0..FILE_LEN).step_by(DIRECT_CHUNK) {
        fill_pattern(seed, offset as u64, buf.as_mut_slice());
        fd.write_all_at(buf.as_slice(), offset as u64).or_fail()?;
    }
    Ok(format!(
        "{FILE_LEN} B in {} O_DIRECT writes",
        FILE_LEN / DIRECT_CHUNK
    ))
}

fn after_cut(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let recover = needs_recovery(disk)?;
    ctx.check(
        "boot 1 left the file system unclean (needs_recovery)",
        recover,
        if recover {
            "set: the journal is replayed at mount"
        } else {
            "clear: the file system was unmounted cleanly, so no power cut was seen"
        },
    );
    let mount = Mount::ext4(disk, MOUNT_POINT)?;
    ctx.record(
        &format!("{SYNCED} intact after the power cut"),
        read_whole(SYNCED, ctx.seed(1)),
    )?;
    ctx.note(
        &format!("{UNSYNCED} after the power cut"),
        describe_unsynced(ctx.seed(2)),
    );
    ctx.record("unmount", mount.unmount())?;
    Ok(())
}

/// Whether ext4's superblock says the journal needs recovery (the file
/// system was not unmounted).
fn needs_recovery(disk: &str) -> Result<bool, Stop> {
    /// The superblock's offset on the disk, and its fields' offsets in it.
    const SUPER: usize = 1024;
    const MAGIC: usize = 0x38;
    const INCOMPAT: usize = 0x60;
    const INCOMPAT_RECOVER: u32 = 0x4;
    let fd = Fd::open_read(disk, Cache::Direct).or_error()?;
    let mut buf = AlignedBuf::new(PAGE, 0).or_error()?;
    fd.read_exact_at(buf.as_mut_slice(), 0).or_error()?;
    let sb = &buf.as_slice()[SUPER..];
    if sb[MAGIC..MAGIC + 2] != [0x53, 0xef] {
        return Err(Stop::Error(format!("{disk} holds no ext4 superblock")));
    }
    let incompat = u32::from_le_bytes([
        sb[INCOMPAT],
        sb[INCOMPAT + 1],
        sb[INCOMPAT + 2],
        sb[INCOMPAT + 3],
    ]);
    Ok(incompat & INCOMPAT_RECOVER != 0)
}

/// Reads a file through the page cache; it must hold [`FILE_LEN`] B of its pattern.
fn read_whole(name: &str, seed: u64) -> Result<String, Stop> {
    let p = path(name);
    let data = fs::read(&p).map_err(|e| Stop::Fail(format!("Cannot read {p}: {e}")))?;
    if data.len() != FILE_LEN {
        return Err(Stop::Fail(format!(
            "{p} has {} B, want {FILE_LEN}",
            data.len()
        )));
    }
    check_pattern(seed, 0, &data).map_err(|m| Stop::Fail(format!("{p}: {m}")))?;
    Ok(format!("{FILE_LEN} B match"))
}

/// What is left of the file written without fsync: missing, empty, partial
/// (how many of its 4 KiB blocks hold their data) or intact.
fn describe_unsynced(seed: u64) -> String {
    let p = path(UNSYNCED);
    let data = match fs::read(&p) {
        Err(e) if e.kind() == stdio::ErrorKind::NotFound => return "missing".into(),
        Err(e) => return format!("unreadable: {e}"),
        Ok(d) => d,
    };
    if data.is_empty() {
        return "empty (0 B)".into();
    }
    let blocks = data.len().div_ceil(PAGE);
    let good = data
        .chunks(PAGE)
        .enumerate()
        .filter(|(i, b)| check_pattern(seed, (i * PAGE) as u64, b).is_ok())
        .count();
    let zero = data
        .chunks(PAGE)
        .filter(|b| b.iter().all(|&x| x == 0))
        .count();
    if data.len() == FILE_LEN && good == blocks {
        format!("intact ({FILE_LEN} B)")
    } else {
        format!(
            "partial: {} B, {good} of {blocks} 4 KiB blocks hold their data, {zero} are zeros",
            data.len()
        )
    }
}

const BAD_FILE: &str = "/bad.bin";
const BAD_LEN: usize = 64 << 10;
/// One 4 KiB file-system block in 512-byte LBAs.
const BLOCK_LBAS: u64 = (PAGE / 512) as u64;

pub fn bad_block(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let mailbox = Mailbox::open(disk)?;
    let mount = Mount::ext4(disk, MOUNT_POINT)?;
    let p = path(BAD_FILE);
    let seed = ctx.seed(1);
    let fd = Fd::create(&p, Cache::Direct).or_fail()?;
    let mut buf = AlignedBuf::new(BAD_LEN, 0).or_error()?;
    fill_pattern(seed, 0, buf.as_mut_slice());
    ctx.record(
        &format!("O_DIRECT write and fsync {BAD_FILE}"),
        fd.write_all_at(buf.as_slice(), 0)
            .and_then(|()| fd.sync())
            .map(|()| format!("{BAD_LEN} B"))
            .or_fail(),
    )?;
    fail_first_block(ctx, &mailbox, &fd, &p)?;
    drop_caches()?;
    read_fails_over_bad_block(ctx, disk, &fd, &mut buf)?;

    let block = &mut buf.as_mut_slice()[..PAGE];
    fill_pattern(seed, 0, block);
    ctx.record(
        "O_DIRECT rewrite of the bad block succeeds",
        fd.write_all_at(block, 0)
            .map(|()| format!("{PAGE} B at byte 0"))
            .or_fail(),
    )?;

    buf.as_mut_slice().fill(UNTOUCHED);
    ctx.record(
        &format!("O_DIRECT read of {BAD_FILE} after the rewrite"),
        fd.read_exact_at(buf.as_mut_slice(), 0)
            .or_fail()
            .and_then(|()| {
                check_pattern(seed, 0, buf.as_slice()).map_err(|m| Stop::Fail(format!("{p}: {m}")))
            })
            .map(|()| format!("{BAD_LEN} B match")),
    )?;
    let left = mailbox.call(json!({"cmd": "media-error", "action": "list"}))?;
    ctx.note(
        "media errors after the rewrite",
        left["media_errors"].to_string(),
    );
    fd.sync().or_fail()?;
    ctx.file(BAD_FILE, BAD_LEN, seed);
    drop(fd);
    ctx.record("unmount", mount.unmount())?;
    Ok(())
}

/// Tells the device that reads of the disk block under the start of the
/// file `fd` (at `p`) fail, and notes what it answered.
fn fail_first_block(ctx: &Ctx, mailbox: &Mailbox, fd: &Fd, p: &str) -> Result<(), Stop> {
    let lba = first_lba(fd, p)?;
    let added = mailbox.call(json!({
        "cmd": "media-error", "action": "add", "lba": lba, "blocks": BLOCK_LBAS, "kind": "read"
    }))?;
    ctx.note(
        "media error",
        format!(
            "reads of LBA {lba}+{BLOCK_LBAS} (the first block of {BAD_FILE}) fail: {}",
            added["media_errors"]
        ),
    );
    Ok(())
}

/// Checks that an O_DIRECT read of the whole file `fd` into `buf` fails
/// with the errno of a medium error on `disk`'s transport.
fn read_fails_over_bad_block(
    ctx: &Ctx,
    disk: &str,
    fd: &Fd,
    buf: &mut AlignedBuf,
) -> Result<(), Stop> {
    buf.as_mut_slice().fill(UNTOUCHED);
    let read = fd.read_at(buf.as_mut_slice(), 0);
    // The kernel's errno for a medium error: virtio-blk reports only an I/O
    // error; NVMe's Unrecovered Read Error is BLK_STS_MEDIUM, ENODATA.
    let (errno, name) = if disk.starts_with("/dev/nvme") {
        (libc::ENODATA, "ENODATA")
    } else {
        (libc::EIO, "EIO")
    };
    ctx.record(
        &format!("O_DIRECT read over the bad block fails with {name}"),
        match read {
            Err(IoError::Read { ref source, .. }) if source.raw_os_error() == Some(errno) => {
                Ok(name.into())
            }
            Err(e) => Err(Stop::Fail(format!(
                "failed, but not with {name}: {}",
                crate::one_line(&e)
            ))),
            Ok(n) => Err(Stop::Fail(format!("read {n} B without an error"))),
        },
    )?;
    Ok(())
}
