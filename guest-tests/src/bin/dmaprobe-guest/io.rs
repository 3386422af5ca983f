//! Raw I/O for the tests: page-aligned buffers, positional reads and writes that
//! either move every byte or say exactly what went wrong, and the pattern check
//! that turns a buffer into evidence.

use std::alloc::{self, Layout};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::slice;
use std::thread;
use std::time::{Duration, Instant};

use thiserror::Error;
use wire::pattern::{pattern_byte, pattern_mismatch};

/// The page size of every guest we boot (x86-64).
pub const PAGE: usize = 4096;

/// What a read buffer holds before the read, so bytes the read never touched stand out.
pub const UNTOUCHED: u8 = 0xee;

/// Why a file or device operation did not complete.
#[derive(Debug, Error)]
pub enum IoError {
    #[error("Cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Read of {len} B at byte {offset} of {path} failed")]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("Write of {len} B at byte {offset} of {path} failed")]
    Write {
        path: PathBuf,
        offset: u64,
        len: usize,
        #[source]
        source: io::Error,
    },
    /// A read met the end of the file, or a write made no progress, part way.
    #[error("Short {op} at byte {offset} of {path}: {done} of {expected} B")]
    Short {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        done: usize,
        expected: usize,
    },
    #[error("fsync of {path} failed")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot allocate {len} B at {shift} B past a page boundary")]
    Alloc { len: usize, shift: usize },
}

/// `len` zeroed bytes starting `shift` bytes past a page boundary, for O_DIRECT.
///
/// The allocation is `len + PAGE` bytes aligned to a page, so any `shift` up to
/// `PAGE` fits.
#[derive(Debug)]
pub struct AlignedBuf {
    base: NonNull<u8>,
    layout: Layout,
    shift: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize, shift: usize) -> Result<Self, IoError> {
        let alloc_err = IoError::Alloc { len, shift };
        if shift > PAGE {
            return Err(alloc_err);
        }
        let Some(layout) = len
            .checked_add(PAGE)
            .and_then(|size| Layout::from_size_align(size, PAGE).ok())
        else {
            return Err(alloc_err);
        };
        // SAFETY: the layout's size is at least PAGE bytes, never zero.
        let base = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(base).ok_or(alloc_err)?;
        Ok(AlignedBuf {
            base,
            layout,
            shift,
            len,
        })
    }

    /// How far past a page boundary the buffer starts.
    pub fn shift(&self) -> usize {
        self.shift
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `shift + len <= layout.size()`, so the range lies inside the
        // allocation, which was zeroed (so initialised) and lives as long as `self`.
        unsafe { slice::from_raw_parts(self.base.as_ptr().add(self.shift), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only live reference.
        unsafe { slice::from_raw_parts_mut(self.base.as_ptr().add(self.shift), self.len) }
    }
}

// SAFETY: an AlignedBuf owns its allocation alone, like a Vec<u8>; moving it to
// another thread moves that ownership.
unsafe impl Send for AlignedBuf {}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc_zeroed(self.layout)` and is freed only here.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}

/// Whether an open goes through the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    Buffered,
    /// `O_DIRECT`: the device DMAs straight to and from the caller's buffer.
    Direct,
}

impl Cache {
    fn flags(self) -> i32 {
        match self {
            Cache::Buffered => 0,
            Cache::Direct => libc::O_DIRECT,
        }
    }
}

/// An open file or block device, with its path for error messages.
#[derive(Debug)]
pub struct Fd {
    file: File,
    path: PathBuf,
}

impl Fd {
    /// The file descriptor, for ioctls.
    pub fn raw(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.file)
    }

    /// Opens an existing file or device for reading and writing.
    pub fn open(path: impl AsRef<Path>, cache: Cache) -> Result<Fd, IoError> {
        Self::with(OpenOptions::new().read(true).write(true), path, cache)
    }

    /// Opens an existing file or device for reading only.
    pub fn open_read(path: impl AsRef<Path>, cache: Cache) -> Result<Fd, IoError> {
        Self::with(OpenOptions::new().read(true), path, cache)
    }

    /// Creates (or truncates) a regular file for reading and writing.
    pub fn create(path: impl AsRef<Path>, cache: Cache) -> Result<Fd, IoError> {
        Self::with(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644),
            path,
            cache,
        )
    }

    fn with(
        options: &mut OpenOptions,
        path: impl AsRef<Path>,
        cache: Cache,
    ) -> Result<Fd, IoError> {
        let path = path.as_ref().to_owned();
        match options.custom_flags(cache.flags()).open(&path) {
            Ok(file) => Ok(Fd { file, path }),
            Err(source) => Err(IoError::Open { path, source }),
        }
    }

    /// One `pread`, retried on `EINTR`; may return fewer bytes than asked.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, IoError> {
        loop {
            match self.file.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(IoError::Read {
                        path: self.path.clone(),
                        offset,
                        len: buf.len(),
                        source,
                    })
                }
                Ok(n) => return Ok(n),
            }
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`, continuing after short reads.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), IoError> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = self.read_at(&mut buf[done..], at)?;
            if n == 0 {
                return Err(self.short("read", offset, done, buf.len()));
            }
            done += n;
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`, continuing after short writes.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<(), IoError> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match self.file.write_at(&buf[done..], at) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(IoError::Write {
                        path: self.path.clone(),
                        offset: at,
                        len: buf.len() - done,
                        source,
                    })
                }
                Ok(0) => return Err(self.short("write", offset, done, buf.len())),
                Ok(n) => done += n,
            }
        }
        Ok(())
    }

    /// `fsync`: data and metadata reach stable storage (the device gets a flush).
    pub fn sync(&self) -> Result<(), IoError> {
        self.file.sync_all().map_err(|source| IoError::Sync {
            path: self.path.clone(),
            source,
        })
    }

    /// The file's size as `stat` reports it.
    pub fn len(&self) -> Result<u64, IoError> {
        match self.file.metadata() {
            Ok(m) => Ok(m.len()),
            Err(source) => Err(IoError::Stat {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn short(&self, op: &'static str, offset: u64, done: usize, expected: usize) -> IoError {
        IoError::Short {
            op,
            path: self.path.clone(),
            offset,
            done,
            expected,
        }
    }
}

/// A buffer that does not hold the expected pattern: where and how it differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Index of the first differing byte within the buffer.
    pub at: usize,
    pub got: u8,
    pub want: u8,
    /// How many bytes differ in all.
    pub differing: usize,
    pub len: usize,
    /// The value every differing byte holds, if they all hold the same one
    /// (0x00: zeroed or freed pages; [`UNTOUCHED`]: the read never wrote there).
    pub uniform: Option<u8>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "first mismatch at +{} (got {:#04x}, want {:#04x}), {} of {} B differ",
            self.at, self.got, self.want, self.differing, self.len
        )?;
        if let Some(v) = self.uniform {
            write!(f, ", all {v:#04x}")?;
        }
        Ok(())
    }
}

/// Checks that `buf` holds [`fill_pattern`](wire::pattern::fill_pattern)`(seed, offset)`.
pub fn check_pattern(seed: u64, offset: u64, buf: &[u8]) -> Result<(), Mismatch> {
    let Some(at) = pattern_mismatch(seed, offset, buf) else {
        return Ok(());
    };
    let mut differing = 0;
    let mut uniform = Some(buf[at]);
    for (i, &b) in (offset..).zip(buf.iter()).skip(at) {
        if b != pattern_byte(seed, i) {
            differing += 1;
            if uniform != Some(b) {
                uniform = None;
            }
        }
    }
    Err(Mismatch {
        at,
        got: buf[at],
        want: pattern_byte(seed, offset + at as u64),
        differing,
        len: buf.len(),
        uniform,
    })
}

/// Waits up to `timeout` for `path` to exist (a device node may lag its driver).
pub fn wait_for(path: impl AsRef<Path>, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if path.as_ref().exists() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Rounds `n` up to a multiple of `align` (a power of two).
pub fn round_up(n: usize, align: usize) -> usize {
    n.next_multiple_of(align)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::pattern::fill_pattern;

    #[test]
    fn aligned_buf_starts_where_asked() {
        for shift in [0, 512, PAGE] {
            let mut b = AlignedBuf::new(8192, shift).expect("alloc");
            assert_eq!(b.as_slice().as_ptr() as usize % PAGE, shift % PAGE);
            assert_eq!(b.as_slice().len(), 8192);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice().fill(UNTOUCHED);
        }
        assert!(AlignedBuf::new(1, PAGE + 1).is_err());
        assert!(AlignedBuf::new(usize::MAX, 0).is_err());
    }

    #[test]
    fn mismatch_says_where_and_what() {
        let mut b = vec![0u8; 4096];
        fill_pattern(7, 1 << 20, &mut b);
        assert_eq!(check_pattern(7, 1 << 20, &b), Ok(()));
        b[512..].fill(0);
        let m = check_pattern(7, 1 << 20, &b).expect_err("must differ");
        assert_eq!(m.at, 512);
        assert_eq!(m.got, 0);
        assert_eq!(m.uniform, Some(0));
        // A few pattern bytes happen to be zero; nearly all of the tail differs.
        assert!(m.differing > 3500 && m.differing <= 3584, "{m}");
        assert!(m
            .to_string()
            .starts_with("first mismatch at +512 (got 0x00, want "));
    }

    #[test]
    fn rounds_up() {
        assert_eq!(round_up(0, 4096), 0);
        assert_eq!(round_up(1, 4096), 4096);
        assert_eq!(round_up(4096, 4096), 4096);
    }
}
