//! UNIX sockets the daemon listens on: bound mode 0600 ([`bind_socket`]),
//! a stale socket replaced and anything else at the path refused
//! ([`check_socket_path`]), and removed at exit only while still the one
//! bound ([`SocketFile`]). `dmaprobe serve` binds the vhost-user and the
//! vfio-user socket here.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "{0} exists and is not a socket: give --socket another path \
         (only a stale socket there is replaced)"
    )]
    NotASocket(PathBuf),
    #[error("Cannot remove the stale socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("Cannot listen on {0}")]
    Bind(PathBuf, #[source] io::Error),
}

/// Whether a socket is at `path` (a stale one, to be replaced); anything
/// else there is refused.
pub fn check_socket_path(path: &Path) -> Result<bool, SocketError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(true),
        Ok(_) => Err(SocketError::NotASocket(path.to_owned())),
        // Nothing there, or nothing we may look at: bind says which.
        Err(_) => Ok(false),
    }
}

/// Listens on a UNIX socket at `path` that only its owner may connect to. A
/// stale socket there is replaced; anything else is refused.
///
/// `socket`, `bind`, `chmod 0600`, note the inode, `listen`. Nobody can
/// connect before the socket listens (connect is refused), so nobody connects
/// through the mode bind gave it, and the inode is known before anyone could
/// have talked to the daemon through it. A umask around bind would do as well
/// for the mode but is the whole process's: another thread creating a file
/// meanwhile (the control thread, tests that start daemons side by side) would
/// get it, and two such swaps that overlap leave the wrong one behind.
pub fn bind_socket(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let fail = |e| SocketError::Bind(path.to_owned(), e);
    if check_socket_path(path)? {
        fs::remove_file(path).map_err(|e| SocketError::RemoveStale(path.to_owned(), e))?;
    }
    let fd = bind_unix(path).map_err(fail)?;
    let listening = || -> io::Result<SocketFile> {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        let file = SocketFile::of(path)?;
        // SAFETY: listen takes no pointers; `fd` is a bound socket of ours.
        match unsafe { libc::listen(fd.as_raw_fd(), libc::SOMAXCONN) } {
            0 => Ok(file),
            // Dropping `file` removes the socket.
            _ => Err(io::Error::last_os_error()),
        }
    };
    match listening() {
        Ok(file) => Ok((UnixListener::from(fd), file)),
        Err(e) => {
            if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = fs::remove_file(path);
            }
            Err(fail(e))
        }
    }
}

/// A stream socket bound at `path`, not yet listening.
fn bind_unix(path: &Path) -> io::Result<OwnedFd> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a UNIX socket path is 1 to {} bytes, without NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, &from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = from as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    let len = libc::socklen_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: socket takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call and
    // `len` is within it.
    let bound = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A socket the daemon bound, known by its inode and change time: dropping it
/// removes the path only if the path still names that socket, so nothing that
/// someone put there since (another daemon's socket, a file) is removed. In
/// doubt it is left: a stale socket is replaced by the next daemon.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: (u64, u64, i64, i64),
}

impl SocketFile {
    /// The socket now at `path`.
    pub fn of(path: &Path) -> io::Result<SocketFile> {
        let m = fs::symlink_metadata(path)?;
        if !m.file_type().is_socket() {
            return Err(io::Error::other("not a socket"));
        }
        Ok(SocketFile {
            path: path.to_owned(),
            id: Self::identity(&m),
        })
    }

    fn identity(m: &fs::Metadata) -> (u64, u64, i64, i64) {
        (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the socket bound.
    pub fn is_ours(&self) -> bool {
        fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && Self::identity(&m) == self.id)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = fs::remove_file(&self.path);
        }
    }
}
