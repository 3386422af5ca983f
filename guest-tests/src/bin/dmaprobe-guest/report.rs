//! The channels out of the guest: events to the host on the second serial port,
//! and test markers into the kernel log.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use guest_tests::protocol::Event;

/// Where events go: the host reads this serial port into a file.
pub const SERIAL: &str = "/dev/ttyS1";

/// Writes [`Event`]s, one JSON line each, flushed and drained as they are made,
/// so the host has every event up to the moment a guest hangs or panics.
#[derive(Debug)]
pub struct Reporter {
    sink: Sink,
}

#[derive(Debug)]
enum Sink {
    Serial(File),
    Stdout,
}

impl Reporter {
    /// Opens [`SERIAL`]; falls back to stdout (and says so on stderr).
    pub fn open() -> Reporter {
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(SERIAL);
        match opened {
            Ok(file) => {
                if let Err(e) = make_raw(&file) {
                    eprintln!(
                        "dmaprobe-guest: cannot set {SERIAL} raw ({e}); lines may end in CRLF"
                    );
                }
                Reporter {
                    sink: Sink::Serial(file),
                }
            }
            Err(e) => {
                eprintln!("dmaprobe-guest: cannot open {SERIAL} ({e}); events go to stdout");
                Reporter { sink: Sink::Stdout }
            }
        }
    }

    /// Writes one event; a failure is told on stderr, and the tests go on.
    pub fn emit(&self, event: &Event) {
        let line = event.to_line();
        let written = match &self.sink {
            Sink::Serial(file) => write_drained(file, line.as_bytes()),
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(line.as_bytes()).and_then(|()| out.flush())
            }
        };
        if let Err(e) = written {
            eprintln!(
                "dmaprobe-guest: cannot write event ({e}): {}",
                line.trim_end()
            );
        }
    }
}

/// Writes `bytes` to a tty and waits until the UART has sent them.
fn write_drained(mut file: &File, bytes: &[u8]) -> io::Result<()> {
    file.write_all(bytes)?;
    loop {
        // SAFETY: tcdrain only reads the file descriptor, which `file` keeps open.
        if unsafe { libc::tcdrain(file.as_raw_fd()) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Raw output: no LF to CRLF. (The baud rate is left alone: QEMU's UART does
/// not pace output by it, and the libc crate's versioned `cfsetospeed` does not
/// link with `+crt-static`.)
fn make_raw(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: termios is plain data, so all-zero is a valid value; every call gets
    // a pointer to that local and a descriptor `file` keeps open.
    let rc = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        libc::tcsetattr(fd, libc::TCSANOW, &t)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes a line to the kernel log (`/dev/kmsg`), so the console log on the first
/// serial port can be split by test. Failure is ignored: the log is a courtesy.
/// The newline matters: without it the kernel keeps the record open for a
/// continuation and does not print it until another message follows.
pub fn kmsg(line: &str) {
    if let Ok(mut f) = OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}
