//! A `dmaprobe serve` child process with a frontend on its vhost-user socket
//! and `dmaprobe ctl` on its control socket: the fixture of the tests that
//! drive the daemon as a user does (control, media).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use backend::vhost_user_driver::{
    BlkFrontend, BlkRequest, Buffer, ChainId, Completion, Error as FrontendError, FrontendConfig,
    Queue, RequestType, Sector, Segment, StatusByte,
};
use serde_json::Value;
use tempfile::TempDir;

/// How long anything that should happen soon may take on a loaded machine.
pub const SOON: Duration = Duration::from_secs(10);
/// Bytes per request: one page.
pub const LEN: usize = 4096;
/// What the frontend writes into a read's destination before submitting it.
pub const PREFILL: u8 = 0x5c;

/// A `dmaprobe serve` child process on a 16 MiB disk file, with the ledger on;
/// killed and reaped on drop, its log printed if the test failed.
pub struct Serve {
    pub child: Child,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub disk: PathBuf,
}

impl Serve {
    pub fn start(extra: &[&str]) -> Serve {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("blk.sock");
        let disk = dir.path().join("disk.img");
        let control = match extra.iter().position(|&a| a == "--control") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => PathBuf::from(format!("{}.ctl", socket.display())),
        };
        let child = spawn(&dir, &socket, &disk, extra);
        let mut s = Serve {
            child,
            dir,
            socket,
            control,
            disk,
        };
        s.wait_ready();
        s
    }

    /// Kills the daemon with SIGKILL (no flush, no goodbye) and starts it
    /// again on the same disk file and sockets, with `extra` options.
    pub fn kill_and_restart(&mut self, extra: &[&str]) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
        self.child = spawn(&self.dir, &self.socket, &self.disk, extra);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + SOON;
        while UnixStream::connect(&self.control).is_err() {
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "no control socket after {SOON:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!("dmaprobe serve has exited: {status}");
        }
    }

    /// Connects a frontend with `queues` queues.
    pub fn connect(&self, queues: u16) -> BlkFrontend {
        let config = FrontendConfig {
            mem_size: 8 << 20,
            num_queues: queues,
            timeout: SOON,
            ..FrontendConfig::default()
        };
        let deadline = Instant::now() + SOON;
        loop {
            match BlkFrontend::connect(&self.socket, config.clone()) {
                Ok(fe) => return fe,
                Err(FrontendError::Connect { .. }) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect: {e:?}"),
            }
        }
    }

    /// Runs `dmaprobe ctl --control CONTROL ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl_at(&["--control", self.control.to_str().unwrap()], args)
    }

    /// Runs ctl, expects success, returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        let (stdout, stderr) = texts(&out);
        assert!(out.status.success(), "ctl {args:?}: {stderr}");
        assert_eq!(stderr, "", "ctl {args:?} wrote to stderr");
        stdout
    }

    /// Runs `ctl --json ARGS`, expects success, returns the result.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let stdout = self.ctl_ok(&all);
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("ctl --json {args:?}: {e}: {stdout}"))
    }

    /// Runs ctl, expects failure, returns its stderr.
    pub fn ctl_fails(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        let (stdout, stderr) = texts(&out);
        assert!(!out.status.success(), "ctl {args:?} succeeded: {stdout}");
        stderr
    }

    /// Waits until `ctl --json held` lists `n` requests; returns them.
    pub fn wait_held(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + SOON;
        loop {
            let held = self.ctl_json(&["held"]);
            let items = held.as_array().expect("held is a list").clone();
            if items.len() == n {
                return items;
            }
            assert!(
                items.len() < n && Instant::now() < deadline,
                "expected {n} held: {held}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn disk_at(&self, sector: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.disk)
            .and_then(|f| f.read_exact_at(&mut buf, sector * 512))
            .expect("read the disk file");
        buf
    }

    pub fn put_disk(&self, sector: u64, data: &[u8]) {
        OpenOptions::new()
            .write(true)
            .open(&self.disk)
            .and_then(|f| f.write_all_at(data, sector * 512))
            .expect("write the disk file");
    }

    /// Request entries of the ledger, through ctl.
    pub fn ledger_requests(&self) -> Vec<Value> {
        let l = self.ctl_json(&["ledger"]);
        l["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["kind"] == "request")
            .cloned()
            .collect()
    }

    /// How many times the daemon synced its disk file (`fdatasync`), from
    /// `ctl status`.
    pub fn syncs(&self) -> u64 {
        let st = self.ctl_json(&["status"]);
        assert_eq!(st["backing"]["kind"], "file", "{st}");
        st["backing"]["syncs"]
            .as_u64()
            .unwrap_or_else(|| panic!("no backing.syncs in {st}"))
    }

    /// Stops the daemon with SIGTERM (it flushes and writes its ledger) and
    /// waits for it to exit; returns how it exited.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) touches no memory of ours; the daemon is our child and
        // has not been reaped, so its pid cannot have been reused.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill");
        let deadline = Instant::now() + SOON;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Request entries of the ledger file (`--ledger`), written at exit.
    pub fn ledger_file_requests(&self) -> Vec<Value> {
        let path = self.dir.path().join("ledger.jsonl");
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
            .filter(|e| e["kind"] == "request")
            .collect()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let log = fs::read_to_string(self.dir.path().join("serve.err")).unwrap_or_default();
            let tail: String = log
                .chars()
                .rev()
                .take(16 << 10)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!("dmaprobe serve's log (the end):\n{tail}");
        }
    }
}

/// Starts `dmaprobe serve` on a 16 MiB disk file with the ledger on.
fn spawn(dir: &TempDir, socket: &Path, disk: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .arg("serve")
        .arg("--socket")
        .arg(socket)
        .arg("--disk")
        .arg(disk)
        .args(["--size", "16M", "--ledger"])
        .arg(dir.path().join("ledger.jsonl"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.path().join("serve.err"))
                .expect("stderr file"),
        )
        .spawn()
        .expect("spawn dmaprobe serve")
}

/// Runs `dmaprobe ctl PREFIX ARGS` with no DMAPROBE_CONTROL in the environment.
pub fn ctl_at(prefix: &[&str], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmaprobe"))
        .arg("ctl")
        .args(prefix)
        .args(args)
        .env_remove("DMAPROBE_CONTROL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run dmaprobe ctl")
}

pub fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn prefilled(fe: &BlkFrontend) -> Buffer {
    let buf = fe.ram().alloc_aligned(LEN, 4096).expect("alloc");
    buf.fill(PREFILL).expect("fill");
    buf
}

/// Submits a one-buffer request and kicks.
pub fn submit(q: &mut Queue, kind: RequestType, sector: u64, buf: &Buffer) -> ChainId {
    let seg = [Segment::of(buf).expect("buffer fits a descriptor")];
    let id = q
        .submit(&BlkRequest {
            kind,
            sector: Sector(sector),
            data: &seg,
        })
        .expect("submit");
    q.kick().expect("kick");
    id
}

pub fn status(c: &Completion) -> StatusByte {
    c.status().expect("a blk completion")
}

pub fn write_ok(fe: &mut BlkFrontend, sector: u64, data: &[u8]) {
    assert_eq!(
        fe.write(0, Sector(sector), data).expect("write"),
        StatusByte::OK
    );
}

/// Whether `q` has completed `id` within a short look.
pub fn completes_within(q: &mut Queue, id: ChainId, within: Duration) -> Option<Completion> {
    q.wait_for(id, within).ok()
}

/// The words of a text, for output whose spacing does not matter.
pub fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// The id in ctl's "rule N added".
pub fn added_rule_id(stdout: &str) -> u64 {
    stdout
        .trim()
        .strip_prefix("rule ")
        .and_then(|s| s.strip_suffix(" added"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not `rule N added`: {stdout:?}"))
}

// ---------------------------------------------------------------------------
// Holding and releasing
// ---------------------------------------------------------------------------
