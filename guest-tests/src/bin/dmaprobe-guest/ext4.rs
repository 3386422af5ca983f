//! `ext4`: files written through ext4 (4 KiB blocks, made by the host on the
//! whole disk) come back, and stay on the disk for the host to check.
//!
//! Steps, each reported as a check:
//! 1. Mount `/dev/vda` on `/mnt` (no ext4 in the kernel: Skip).
//! 2. `/buffered.bin`: 1 MiB + 123 B written through the page cache in chunks of
//!    200000 B (so chunk edges fall mid-page), fsync'd.
//! 3. `/direct.bin`: 2 MiB written with O_DIRECT in 128 KiB chunks from a
//!    page-aligned buffer, fsync'd.
//! 4. Both files read with O_DIRECT in whole 4 KiB-aligned chunks (the last
//!    chunk of `/buffered.bin` reaches past its end; only its length counts),
//!    then `drop_caches`, then both read through the page cache.
//! 5. sync and unmount. The host then runs e2fsck and checks the `file` events.

use std::ffi::CString;
use std::fs;
use std::io as stdio;

use wire::pattern::fill_pattern;

use crate::io::{check_pattern, round_up, AlignedBuf, Cache, Fd, PAGE, UNTOUCHED};
use crate::{Ctx, OrStop, Stop};

const MOUNT_POINT: &str = "/mnt";
const BUFFERED_CHUNK: usize = 200_000;
const DIRECT_CHUNK: usize = 128 << 10;

/// A file this test leaves on the file system.
#[derive(Debug)]
struct TestFile {
    /// From the file system's root, as the host names it.
    name: &'static str,
    len: usize,
    seed: u64,
}

impl TestFile {
    fn path(&self) -> String {
        format!("{MOUNT_POINT}{}", self.name)
    }
}

pub fn run(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let mount = Mount::ext4(disk, MOUNT_POINT)?;
    let buffered = TestFile {
        name: "/buffered.bin",
        len: (1 << 20) + 123,
        seed: ctx.seed(1),
    };
    let direct = TestFile {
        name: "/direct.bin",
        len: 2 << 20,
        seed: ctx.seed(2),
    };
    ctx.record(
        &format!("buffered write {}", buffered.name),
        write_buffered(ctx, &buffered),
    )?;
    ctx.record(
        &format!("O_DIRECT write {}", direct.name),
        write_direct(ctx, &direct),
    )?;
    for file in [&buffered, &direct] {
        ctx.record(
            &format!("O_DIRECT read {}", file.name),
            read_direct(ctx, file),
        )?;
    }
    drop_caches()?;
    for file in [&buffered, &direct] {
        ctx.record(&format!("buffered read {}", file.name), read_buffered(file))?;
    }
    ctx.record("unmount", mount.unmount())?;
    Ok(())
}

/// Writes the file through the page cache in [`BUFFERED_CHUNK`]s and fsyncs it.
fn write_buffered(ctx: &Ctx, file: &TestFile) -> Result<String, Stop> {
    let fd = Fd::create(file.path(), Cache::Buffered).or_fail()?;
    let mut data = vec![0; file.len];
    fill_pattern(file.seed, 0, &mut data);
    let mut writes = 0;
    for (i, chunk) in data.chunks(BUFFERED_CHUNK).enumerate() {
        fd.write_all_at(chunk, (i * BUFFERED_CHUNK) as u64)
            .or_fail()?;
        writes += 1;
    }
    fd.sync().or_fail()?;
    ctx.file(file.name, file.len, file.seed);
    Ok(format!("{} B in {writes} writes, fsync", file.len))
}

/// Writes the file with O_DIRECT in [`DIRECT_CHUNK`]s and fsyncs it.
fn write_direct(ctx: &Ctx, file: &TestFile) -> Result<String, Stop> {
    let fd = Fd::create(file.path(), Cache::Direct).or_fail()?;
    let mut buf = AlignedBuf::new(DIRECT_CHUNK, 0).or_error()?;
    let mut writes = 0;
    for offset in (0..file.len).step_by(DIRECT_CHUNK) {
        let len = DIRECT_CHUNK.min(file.len - offset);
        let chunk = &mut buf.as_mut_slice()[..len];
        fill_pattern(file.seed, offset as u64, chunk);
        fd.write_all_at(chunk, offset as u64).or_fail()?;
        writes += 1;
    }
    fd.sync().or_fail()?;
    ctx.file(file.name, file.len, file.seed);
    Ok(format!("{} B in {writes} O_DIRECT writes, fsync", file.len))
}

/// Reads the file with O_DIRECT in page-aligned chunks of up to [`DIRECT_CHUNK`]
/// and compares what is within its length. What the last read left past the
/// end of the file is a note (0xee: untouched; zeros; anything else is stale
/// data exposed).
fn read_direct(ctx: &Ctx, file: &TestFile) -> Result<String, Stop> {
    let path = file.path();
    let fd = Fd::open_read(&path, Cache::Direct).or_fail()?;
    let size = fd.len().or_fail()?;
    if size != file.len as u64 {
        return Err(Stop::Fail(format!("{path} is {size} B, want {}", file.len)));
    }
    let mut buf = AlignedBuf::new(DIRECT_CHUNK, 0).or_error()?;
    let mut offset = 0;
    let mut reads = 0;
    while offset < file.len {
        let want = DIRECT_CHUNK.min(round_up(file.len - offset, PAGE));
        let expect = want.min(file.len - offset);
        let chunk = &mut buf.as_mut_slice()[..want];
        chunk.fill(UNTOUCHED);
        let got = fd.read_at(chunk, offset as u64).or_fail()?;
        reads += 1;
        if got != expect {
            return Err(Stop::Fail(format!(
                "O_DIRECT read of {want} B at byte {offset} of {path} returned {got} B, want {expect}"
            )));
        }
        check_pattern(file.seed, offset as u64, &chunk[..got]).map_err(|m| {
            Stop::Fail(format!(
                "O_DIRECT read of {want} B at byte {offset} of {path}: {m}"
            ))
        })?;
        if got < want {
            ctx.note(
                &format!("O_DIRECT read past EOF of {}", file.name),
                describe_tail(&chunk[got..]),
            );
        }
        offset += got;
    }
    Ok(format!("{} B in {reads} O_DIRECT reads", file.len))
}

/// What a buffer's tail past the end of a file holds.
fn describe_tail(tail: &[u8]) -> String {
    let n = tail.len();
    if tail.iter().all(|&b| b == UNTOUCHED) {
        format!("{n} B past EOF left untouched (0xee)")
    } else if tail.iter().all(|&b| b == 0) {
        format!("{n} B past EOF zeroed")
    } else {
        let other = tail.iter().filter(|&&b| b != UNTOUCHED && b != 0).count();
        format!("{n} B past EOF, {other} B neither 0xee nor zero")
    }
}

/// Reads the whole file through the page cache and compares it.
fn read_buffered(file: &TestFile) -> Result<String, Stop> {
    let path = file.path();
    let data = fs::read(&path).map_err(|e| Stop::Fail(format!("Cannot read {path}: {e}")))?;
    if data.len() != file.len {
        return Err(Stop::Fail(format!(
            "buffered read of {path} gave {} B, want {}",
            data.len(),
            file.len
        )));
    }
    check_pattern(file.seed, 0, &data)
        .map_err(|m| Stop::Fail(format!("buffered read of {path}: {m}")))?;
    Ok(format!("{} B after drop_caches", file.len))
}

/// Writes back dirty data and empties the page cache, so the next buffered
/// reads come from the device.
pub fn drop_caches() -> Result<(), Stop> {
    sync();
    fs::write("/proc/sys/vm/drop_caches", "3")
        .map_err(|e| Stop::Error(format!("Cannot drop caches: {e}")))
}

fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// The FIBMAP ioctl (linux/fs.h): a file's block to the file system's block.
const FIBMAP: libc::Ioctl = 1;
/// The FIGETBSZ ioctl (linux/fs.h): the file system's block size, the unit
/// of FIBMAP's answer.
const FIGETBSZ: libc::Ioctl = 2;

/// The disk LBA (512-byte units) of the first block of the open file at
/// `path`: what a hold rule names to catch the file's first read.
pub fn first_lba(fd: &Fd, path: &str) -> Result<u64, Stop> {
    block_lba(fd, path, 0)
}

/// The file system's block size for the open file at `path` (FIGETBSZ):
/// 4096 on the suite's ext4 and xfs, 512 on its vfat, 4096 on its UDF.
pub fn block_size(fd: &Fd, path: &str) -> Result<u64, Stop> {
    let mut size: libc::c_int = 0;
    // SAFETY: FIGETBSZ writes one int, which `size` is.
    if unsafe { libc::ioctl(fd.raw(), FIGETBSZ, &mut size) } != 0 || size < 512 {
        return Err(Stop::Error(format!(
            "FIGETBSZ of {path} failed ({size}): {}",
            stdio::Error::last_os_error()
        )));
    }
    Ok(u64::try_from(size).unwrap_or(0))
}

/// The disk LBA (512-byte units) of the file's file-system block `index`
/// (FIBMAP, in units of [`block_size`]).
pub fn block_lba(fd: &Fd, path: &str, index: u64) -> Result<u64, Stop> {
    let size = block_size(fd, path)?;
    let mut block = libc::c_int::try_from(index)
        .map_err(|_| Stop::Error(format!("block {index} of {path} is past FIBMAP's reach")))?;
    // SAFETY: FIBMAP reads and writes one int, which `block` is.
    if unsafe { libc::ioctl(fd.raw(), FIBMAP, &mut block) } != 0 || block <= 0 {
        return Err(Stop::Error(format!(
            "FIBMAP of block {index} of {path} failed: {}",
            stdio::Error::last_os_error()
        )));
    }
    Ok(u64::try_from(block).unwrap_or(0) * (size / 512))
}

/// vfat's code page and character set, named rather than left to the
/// kernel's defaults (`FAT_DEFAULT_CODEPAGE`, `FAT_DEFAULT_IOCHARSET`), so
/// that what it needs is the same on every kernel: the modules the host packs
/// for vfat and the options `dmaprobe kconfig` lists (Debian's defaults).
const VFAT_OPTIONS: &str = "codepage=437,iocharset=ascii";

/// A mounted file system, unmounted on drop if [`Mount::unmount`] was not called
/// (so a failing test still leaves a clean file system for the host's e2fsck).
#[derive(Debug)]
pub struct Mount {
    target: CString,
    mounted: bool,
}

impl Mount {
    pub fn ext4(source: &str, target: &str) -> Result<Mount, Stop> {
        Self::fs(source, target, "ext4")
    }

    /// Mounts `source` on `target` as `kind` (ext4, xfs, vfat); vfat with
    /// [`VFAT_OPTIONS`].
    pub fn fs(source: &str, target: &str, kind: &str) -> Result<Mount, Stop> {
        let options = if kind == "vfat" { VFAT_OPTIONS } else { "" };
        Self::with_options(source, target, kind, options)
    }

    /// Mounts `source` on `target` as `kind` with file-system `options`
    /// (`commit=600`; empty for none).
    pub fn with_options(
        source: &str,
        target: &str,
        kind: &str,
        options: &str,
    ) -> Result<Mount, Stop> {
        fs::create_dir_all(target)
            .map_err(|e| Stop::Error(format!("Cannot create {target}: {e}")))?;
        let cstr = |s: &str| CString::new(s).map_err(|_| Stop::Error(format!("NUL in path {s:?}")));
        let (src, tgt, fstype, data) = (cstr(source)?, cstr(target)?, cstr(kind)?, cstr(options)?);
        let data_ptr = if options.is_empty() {
            std::ptr::null()
        } else {
            data.as_ptr().cast::<libc::c_void>()
        };
        // SAFETY: the pointers are NUL-terminated strings that outlive the
        // call; a null data pointer means no mount options.
        let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fstype.as_ptr(), 0, data_ptr) };
        if rc != 0 {
            let e = stdio::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENODEV) => Stop::Skip(format!("kernel has no {kind}")),
                _ => Stop::Error(format!(
                    "Cannot mount {source} on {target} as {kind} (is the disk formatted?): {e}"
                )),
            });
        }
        Ok(Mount {
            target: tgt,
            mounted: true,
        })
    }

    /// Leaves the file system mounted, unsynced, for a power cut to find.
    pub fn leave_mounted(mut self) {
        self.mounted = false;
    }

    /// Syncs and unmounts; a failure is reported (the host's e2fsck would be
    /// checking a file system still in use).
    pub fn unmount(mut self) -> Result<String, Stop> {
        self.mounted = false;
        sync();
        // SAFETY: `target` is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::umount2(self.target.as_ptr(), 0) };
        if rc != 0 {
            let e = stdio::Error::last_os_error();
            return Err(Stop::Error(format!("Cannot unmount {MOUNT_POINT}: {e}")));
        }
        Ok(format!("sync, unmount {MOUNT_POINT}"))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            sync();
            // SAFETY: as in `unmount`. The result is ignored: this is cleanup
            // after a test that already stopped for another reason.
            unsafe { libc::umount2(self.target.as_ptr(), 0) };
        }
    }
}
