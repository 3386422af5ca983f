//! The control socket: a UNIX socket only its owner may use, each client on
//! a thread of its own (at most [`MAX_CLIENTS`]), each request line with a
//! deadline, each answered by a [`ControlFn`].

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::protocol::ControlFn;
use wire::control::refusal;

/// The longest request line accepted.
const MAX_LINE: usize = 1 << 20;
/// Clients served at once; more are told so and closed.
pub const MAX_CLIENTS: usize = 32;

/// The default control socket: beside the vhost-user socket, `.ctl` added.
pub fn default_path(vhost_socket: &Path) -> PathBuf {
    let mut name = vhost_socket.as_os_str().to_owned();
    name.push(".ctl");
    PathBuf::from(name)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("Cannot listen on the control socket {0}")]
    Listen(PathBuf, #[source] io::Error),
    #[error("{0} exists and is not a socket: give --control another path")]
    NotASocket(PathBuf),
}

/// Control clients the socket turned away or closed (`control` in `status`).
#[derive(Debug, Default)]
pub struct ClientCounters {
    /// Told "too many control clients" and closed.
    refused_busy: AtomicU64,
    /// Closed after the idle timeout without a whole request line.
    closed_idle: AtomicU64,
}

impl ClientCounters {
    pub fn snapshot(&self) -> Value {
        json!({
            "max_clients": MAX_CLIENTS,
            "refused_busy": self.refused_busy.load(Ordering::Relaxed),
            "closed_idle": self.closed_idle.load(Ordering::Relaxed),
        })
    }
}

/// Serves the control socket on its own thread, each client on a thread of its
/// own, until the process ends; `answer` answers each request line, and
/// `counters` counts the clients turned away or closed. A client that sends
/// no whole request line for `idle` is closed, so that clients that connect
/// and wait cannot hold every place.
pub fn serve(
    path: &Path,
    answer: ControlFn,
    counters: Arc<ClientCounters>,
    idle: Option<Duration>,
) -> Result<(), ControlError> {
    let listen_err = |e| ControlError::Listen(path.to_owned(), e);
    // Replace a stale socket, never anything else.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(listen_err)?,
        Ok(_) => return Err(ControlError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    // Bind with a umask that leaves the socket to its owner from the start.
    // SAFETY: umask only swaps the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    log::info!("control socket on {}", path.display());
    let clients = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    clients.fetch_sub(1, Ordering::SeqCst);
                    counters.refused_busy.fetch_add(1, Ordering::Relaxed);
                    let busy = refusal("too many control clients");
                    let _ = writeln!(stream, "{busy}");
                    continue;
                }
                let (answer, counters, clients) =
                    (answer.clone(), counters.clone(), clients.clone());
                let spawned =
                    thread::Builder::new()
                        .name("control-client".into())
                        .spawn(move || {
                            serve_client(stream, &answer, &counters, idle);
                            clients.fetch_sub(1, Ordering::SeqCst);
                        });
                if spawned.is_err() {
                    log::warn!("cannot start a thread for a control client");
                }
            }
        })
        .map_err(listen_err)?;
    Ok(())
}

/// Answers a client's lines until it goes away, or sends no whole line for
/// `idle`. A client that vanishes mid-request harms nothing: the answer has
/// nowhere to go, and that is all.
fn serve_client(
    stream: UnixStream,
    answer: &ControlFn,
    counters: &ClientCounters,
    idle: Option<Duration>,
) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    // A client that does not read its answers is as idle as one that does
    // not write.
    if out.set_write_timeout(idle).is_err() {
        return;
    }
    let mut reader = BufReader::new(Deadline {
        stream,
        idle,
        until: None,
    });
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.get_mut().start();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    counters.closed_idle.fetch_add(1, Ordering::Relaxed);
                    log::debug!("control client closed: idle for {idle:?}");
                }
                return;
            }
            Ok(_) => {}
        }
        let response = if line.len() > MAX_LINE {
            // Skip the rest of the overlong line a buffer at a time, then say so.
            if !line.ends_with(b"\n") && !skip_line(&mut reader) {
                return;
            }
            refusal(format!("request longer than {MAX_LINE} bytes")).to_string()
        } else {
            match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => answer(text),
                Err(_) => refusal("request is not UTF-8").to_string(),
            }
        };
        if writeln!(out, "{response}").is_err() {
            return;
        }
    }
}

/// A client's stream with a deadline for each request line: every read waits
/// at most until it, however the client trickles its bytes.
struct Deadline {
    stream: UnixStream,
    idle: Option<Duration>,
    until: Option<Instant>,
}

impl Deadline {
    /// A new line starts: it has `idle` from now.
    fn start(&mut self) {
        self.until = self.idle.and_then(|idle| Instant::now().checked_add(idle));
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf).map_err(|e| match e.kind() {
            // What a read timeout gives on Linux.
            io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut.into(),
            _ => e,
        })
    }
}

/// Consumes input up to and including the next newline without keeping it;
/// false if the client went away first.
fn skip_line(reader: &mut impl BufRead) -> bool {
    loop {
        let (found, n) = match reader.fill_buf() {
            Ok([]) | Err(_) => return false,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
        };
        reader.consume(n);
        if found {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_path_is_beside_the_socket() {
        assert_eq!(
            default_path(Path::new("/run/dmaprobe.sock")),
            PathBuf::from("/run/dmaprobe.sock.ctl")
        );
    }
}
