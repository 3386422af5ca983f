//! Where a namespace's bytes live.
//!
//! Both backings are a file descriptor used with positioned reads and writes, so
//! one code path serves both and several queues can use it at once without a lock:
//! - memory: an anonymous memfd. It is sparse — untouched blocks cost no memory —
//!   and deallocating punches a hole that gives the memory back.
//! - a raw file (or block device): created at the requested size if missing, its
//!   own size used if present, never truncated. It is locked while open
//!   (`flock`: exclusive, shared when read-only), so a second process that
//!   locks it too is refused rather than writing under the first; the kernel
//!   drops the lock when the file is closed or its process dies, `kill -9`
//!   included.
//!
//! [`Backing::flush`] makes a file's data durable (`fdatasync`) and counts it,
//! so a user can see that what the guest was told is stable was synced.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Zeros are written in pieces of this size where a hole cannot be punched.
const ZERO_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("Cannot create the memory backing")]
    Memfd(#[source] io::Error),
    #[error("Cannot set the size of the backing to {size} bytes")]
    SetSize {
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is {actual} bytes but --size asks for {requested}; \
         it is never resized: drop --size to use it as it is, or give another file"
    )]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        requested: u64,
    },
    #[error("{path} does not exist; give --size to create it")]
    NoSize { path: PathBuf },
    #[error(
        "{path} is in use: another process holds a lock on it (another daemon serving it?); \
         stop that process or give another --disk"
    )]
    Locked { path: PathBuf },
    #[error("A backing of 0 bytes holds no block")]
    Empty,
    #[error("I/O on the backing at byte {offset} failed")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// Takes `file`'s advisory lock without waiting: exclusive, or shared when
/// `read_only` (read-only users may share a file; nobody shares with a
/// writer). A file system that cannot lock is warned about and used unlocked.
fn lock(file: &File, read_only: bool) -> io::Result<()> {
    let how = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    loop {
        // SAFETY: flock takes no pointers; the descriptor is owned by `file`.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => {
                log::warn!("the backing file cannot be locked ({e}): used without a lock");
                return Ok(());
            }
            _ => return Err(e),
        }
    }
}

/// What holds the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    Memory,
    File,
}

impl BackingKind {
    /// Its name in `status`: "memory" or "file".
    pub fn name(self) -> &'static str {
        match self {
            BackingKind::Memory => "memory",
            BackingKind::File => "file",
        }
    }
}

/// The bytes of a namespace.
#[derive(Debug)]
pub struct Backing {
    file: File,
    kind: BackingKind,
    size: u64,
    /// Successful `fdatasync`s of a file backing.
    syncs: AtomicU64,
}

impl Backing {
    /// A sparse memory backing of `size` bytes.
    pub fn memory(size: u64) -> Result<Self, BackingError> {
        if size == 0 {
            return Err(BackingError::Empty);
        }
        // SAFETY: the name is a valid NUL-terminated string and the flags are valid;
        // the return value is checked before use.
        let fd = unsafe { libc::memfd_create(c"dmaprobe-media".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(BackingError::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| BackingError::SetSize { size, source })?;
        Ok(Backing {
            file,
            kind: BackingKind::Memory,
            size,
            syncs: AtomicU64::new(0),
        })
    }

    /// A raw file at `path`. A missing file is created with `size` bytes; an existing
    /// one keeps its size, and `size`, if given, must match it.
    pub fn file(path: &Path, size: Option<u64>, read_only: bool) -> Result<Self, BackingError> {
        let open_err = |source| BackingError::Open {
            path: path.to_owned(),
            source,
        };
        let exists = path.exists();
        if !exists && size.is_none() {
            return Err(BackingError::NoSize {
                path: path.to_owned(),
            });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only || !exists)
            .create(!exists)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let actual = if meta.file_type().is_block_device() {
            file.seek(SeekFrom::End(0)).map_err(open_err)?
        } else {
            meta.len()
        };
        if let (true, Some(requested)) = (exists, size) {
            if requested != actual {
                return Err(BackingError::SizeMismatch {
                    path: path.to_owned(),
                    actual,
                    requested,
                });
            }
        }
        // Locked before anything is written to it (a new file's size included).
        lock(&file, read_only).map_err(|source| match source.raw_os_error() {
            Some(libc::EWOULDBLOCK) => BackingError::Locked {
                path: path.to_owned(),
            },
            _ => open_err(source),
        })?;
        let size = match (exists, size) {
            (false, Some(size)) => {
                if size == 0 {
                    return Err(BackingError::Empty);
                }
                file.set_len(size)
                    .map_err(|source| BackingError::SetSize { size, source })?;
                size
            }
            _ => actual,
        };
        if size == 0 {
            return Err(BackingError::Empty);
        }
        Ok(Backing {
            file,
            kind: BackingKind::File,
            size,
            syncs: AtomicU64::new(0),
        })
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| BackingError::Io { offset, source })
    }

    /// Reads the bytes at `offset` straight into the buffers `iov` describes, in
    /// order, with as few system calls as the kernel allows (one `preadv` for a
    /// whole request, usually).
    ///
    /// # Safety
    /// Every `iovec` must describe memory that is valid for writes of its length
    /// for the whole call, and that no Rust reference covers.
    pub unsafe fn read_vectored_at(
        &self,
        offset: u64,
        iov: &mut [libc::iovec],
    ) -> Result<(), BackingError> {
        let fail = |at: u64, source| BackingError::Io { offset: at, source };
        let mut at = offset;
        let mut iov = iov;
        // The kernel takes at most IOV_MAX buffers per call; more are read in turns.
        const IOV_MAX: usize = 1024;
        while !iov.is_empty() {
            let batch = iov.len().min(IOV_MAX);
            let pos = libc::off_t::try_from(at)
                .map_err(|_| fail(at, io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
            // SAFETY: the caller vouches for the buffers; `batch` of them exist and
            // the count fits in a c_int (at most IOV_MAX).
            let n = unsafe {
                libc::preadv(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    batch as libc::c_int,
                    pos,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(fail(at, e));
            }
            if n == 0 {
                return Err(fail(at, io::ErrorKind::UnexpectedEof.into()));
            }
            at += n as u64;
            // Skip what was filled; a buffer filled in part keeps its rest.
            let mut left = n as usize;
            while let Some(first) = iov.first_mut() {
                if left < first.iov_len {
                    // SAFETY: `left` is inside the buffer, so the pointer stays in it.
                    first.iov_base = unsafe { first.iov_base.cast::<u8>().add(left) }.cast();
                    first.iov_len -= left;
                    break;
                }
                left -= first.iov_len;
                iov = &mut iov[1..];
            }
        }
        Ok(())
    }

    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackingError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| BackingError::Io { offset, source })
    }

    /// Makes everything written so far stable: `fdatasync` for a file;
    /// nothing to do for memory, which a crash of the host loses anyway.
    pub fn flush(&self) -> Result<(), BackingError> {
        match self.kind {
            BackingKind::Memory => Ok(()),
            BackingKind::File => {
                self.file
                    .sync_data()
                    .map_err(|source| BackingError::Io { offset: 0, source })?;
                self.syncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// How many times [`Backing::flush`] synced a file backing (0 for memory).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Makes `len` bytes at `offset` read back as zeros, giving their space back
    /// where the file system can.
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        if len == 0 {
            return Ok(());
        }
        match self.punch_hole(offset, len) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY)) => {
                self.write_zeros(offset, len)
            }
            Err(source) => Err(BackingError::Io { offset, source }),
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self`.
        let ret = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zeros(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        let zeros = vec![0u8; ZERO_CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(ZERO_CHUNK, |left| left.min(ZERO_CHUNK));
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_in_use_is_refused_until_it_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let first = Backing::file(&path, Some(8192), false).unwrap();
        // Another open of the same file, as a second process would.
        for read_only in [false, true] {
            match Backing::file(&path, None, read_only) {
                Err(BackingError::Locked { path: p }) => assert_eq!(p, path),
                other => panic!("read_only {read_only}: {other:?}"),
            }
        }
        let e = Backing::file(&path, None, false).unwrap_err().to_string();
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains("another process"),
            "{e}"
        );
        drop(first);
        let again = Backing::file(&path, None, false).unwrap();
        assert_eq!(again.size(), 8192);
    }

    #[test]
    fn read_only_users_share_a_file_and_a_writer_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        drop(Backing::file(&path, Some(4096), false).unwrap());
        let a = Backing::file(&path, None, true).unwrap();
        let b = Backing::file(&path, None, true).unwrap();
        assert!(matches!(
            Backing::file(&path, None, false),
            Err(BackingError::Locked { .. })
        ));
        drop((a, b));
        assert!(Backing::file(&path, None, false).is_ok());
    }
}
