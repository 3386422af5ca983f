//! Child processes that never outlive the run: the daemon and QEMU.
//!
//! Each child gets `PR_SET_PDEATHSIG` (SIGKILL), so it dies with the runner even
//! if the runner is killed; a [`Child`] guard kills and reaps it when dropped.
//! After [`catch_interrupts`], SIGINT and SIGTERM only set a flag: waits end
//! early, the run stops, the guards clean up, and the runner exits.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{self, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set the interrupt flag instead of killing the runner.
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// Whether the run was interrupted (Ctrl-C or SIGTERM).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct Child {
    name: &'static str,
    inner: Option<process::Child>,
}

impl Child {
    pub fn spawn(name: &'static str, mut cmd: Command) -> io::Result<Child> {
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let inner = cmd.spawn()?;
        Ok(Child {
            name,
            inner: Some(inner),
        })
    }

    pub fn id(&self) -> Option<u32> {
        self.inner.as_ref().map(process::Child::id)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether it has exited, and how.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.inner.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for it to exit by itself (less if interrupted).
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline || interrupted() {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks it to stop with SIGTERM, then kills it if it has not exited in `grace`.
    pub fn terminate(&mut self, grace: Duration) -> io::Result<Option<ExitStatus>> {
        if let Some(pid) = self.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
            if self.try_wait()?.is_none() {
                // SAFETY: kill with a valid signal on our own child's pid.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        match self.wait_timeout(grace)? {
            Some(status) => Ok(Some(status)),
            None => {
                self.kill();
                Ok(None)
            }
        }
    }

    /// Collects its stdout and stderr, line by line, into `sink` on reader threads
    /// that end when it does.
    pub fn take_output(&mut self, sink: Arc<Mutex<Vec<String>>>) -> Vec<JoinHandle<()>> {
        let Some(c) = self.inner.as_mut() else {
            return Vec::new();
        };
        let pipes: Vec<Box<dyn Read + Send>> = [
            c.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
            c.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        pipes
            .into_iter()
            .map(|pipe| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(pipe);
                    let mut line = Vec::new();
                    while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                        let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                        if let Ok(mut s) = sink.lock() {
                            s.push(text);
                        }
                        line.clear();
                    }
                })
            })
            .collect()
    }

    /// Kills and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.inner.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}
