//! A `dmaprobe serve` child process with a frontend on its vhost-user socket
//! and `dmaprobe ctl` on its control socket: the fixture of the tests that
//! drive the daemon as a user does (control, media, protocol, ...).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
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
/// Bytes of the start and of the end of each of the daemon's output streams
/// shown when a test fails (a looping daemon can log gigabytes).
const LOG_EXCERPT: u64 = 32 << 10;

/// A `dmaprobe serve` child process on `DIR/disk.img`, by default a 16 MiB
/// file it makes itself, with the ledger on (see [`Start`] for the rest);
/// killed and reaped on drop, its output printed if the test failed.
pub struct Serve {
    pub child: Child,
    pub dir: TempDir,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub disk: PathBuf,
    launch: Launch,
}

/// How a [`Serve`] is to start, when [`Serve::start`]'s defaults do not fit:
/// made by [`Serve::with`], run by [`Start::start`] or [`Start::spawn`].
pub struct Start<'a> {
    extra: &'a [&'a str],
    disk_file: Option<DiskFile<'a>>,
    launch: Launch,
}

/// A disk file of `len` bytes, sparse but for `data`: bytes at the 512-byte
/// sectors they start at.
struct DiskFile<'a> {
    len: u64,
    data: &'a [(u64, &'a [u8])],
}

/// What every run of one [`Serve`]'s daemon is given besides its extra
/// options, so that [`Serve::kill_and_restart`] starts it as it was started.
#[derive(Clone, Copy)]
struct Launch {
    size: Option<&'static str>,
    ledger: bool,
    log: &'static str,
}

impl<'a> Start<'a> {
    /// The disk file, made before the daemon starts: `len` bytes, sparse but
    /// for `data` (bytes at the sector they start at, as in
    /// [`Serve::put_disk`]). The daemon serves it at its own size, so without
    /// `--size` unless [`Start::size`] follows.
    pub fn disk_file(mut self, len: u64, data: &'a [(u64, &'a [u8])]) -> Self {
        self.disk_file = Some(DiskFile { len, data });
        self.launch.size = None;
        self
    }

    /// `--size SIZE`, the size at which the daemon makes a missing disk file
    /// (16M by default), or with None no `--size`.
    pub fn size(mut self, size: Option<&'static str>) -> Self {
        self.launch.size = size;
        self
    }

    /// Without `--ledger`, for tests of the device rather than of what the
    /// daemon records.
    pub fn no_ledger(mut self) -> Self {
        self.launch.ledger = false;
        self
    }

    /// The daemon's `RUST_LOG` ("info" by default), for a failed test's
    /// report.
    pub fn log(mut self, filter: &'static str) -> Self {
        self.launch.log = filter;
        self
    }

    /// Starts the daemon and waits until it serves its control socket (which
    /// it binds before the device's socket: [`Serve::connect`] retries until
    /// that one answers).
    pub fn start(self) -> Serve {
        let mut s = self.spawn();
        s.wait_ready();
        s
    }

    /// Starts the daemon without waiting for anything, for one that should
    /// refuse to start ([`Serve::wait_exit`]).
    pub fn spawn(self) -> Serve {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("blk.sock");
        let disk = dir.path().join("disk.img");
        if let Some(DiskFile { len, data }) = self.disk_file {
            let f = File::create(&disk).expect("create the disk file");
            f.set_len(len).expect("size the disk file");
            for &(sector, bytes) in data {
                f.write_all_at(bytes, sector * 512)
                    .expect("fill the disk file");
            }
        }
        let control = match self.extra.iter().position(|&a| a == "--control") {
            Some(i) => PathBuf::from(self.extra[i + 1]),
            None => PathBuf::from(format!("{}.ctl", socket.display())),
        };
        let child = self.launch.spawn(dir.path(), self.extra);
        Serve {
            child,
            dir,
            socket,
            control,
            disk,
            launch: self.launch,
        }
    }
}

impl Launch {
    /// Spawns `dmaprobe serve --socket DIR/blk.sock --disk DIR/disk.img
    /// [--size SIZE] [--ledger DIR/ledger.jsonl] EXTRA`, its output added to
    /// DIR/serve.out and DIR/serve.err.
    fn spawn(self, dir: &Path, extra: &[&str]) -> Child {
        let mut serve = Command::new(env!("CARGO_BIN_EXE_dmaprobe"));
        serve
            .arg("serve")
            .arg("--socket")
            .arg(dir.join("blk.sock"))
            .arg("--disk")
            .arg(dir.join("disk.img"));
        if let Some(size) = self.size {
            serve.args(["--size", size]);
        }
        if self.ledger {
            serve.arg("--ledger").arg(dir.join("ledger.jsonl"));
        }
        let output = |name: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        serve
            .args(extra)
            .env("RUST_LOG", self.log)
            .stdin(Stdio::null())
            .stdout(output("serve.out"))
            .stderr(output("serve.err"))
            .spawn()
            .expect("spawn dmaprobe serve")
    }
}

impl Serve {
    /// Starts `dmaprobe serve EXTRA` on a 16 MiB disk file with the ledger
    /// on, and waits until it serves.
    pub fn start(extra: &[&str]) -> Serve {
        Serve::with(extra).start()
    }

    /// `dmaprobe serve EXTRA` to start otherwise than [`Serve::start`] does:
    /// the returned [`Start`]'s methods change its defaults.
    pub fn with<'a>(extra: &'a [&'a str]) -> Start<'a> {
        Start {
            extra,
            disk_file: None,
            launch: Launch {
                size: Some("16M"),
                ledger: true,
                log: "info",
            },
        }
    }

    /// Kills the daemon with SIGKILL (no flush, no goodbye) and starts it
    /// again on the same disk file and sockets, with `extra` options.
    pub fn kill_and_restart(&mut self, extra: &[&str]) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
        self.child = self.launch.spawn(self.dir.path(), extra);
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

    /// Waits for the daemon to exit (on its own or on a [`Serve::signal`]).
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dmaprobe serve still running after {within:?}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends the daemon `sig`, as a user stops it (SIGTERM, SIGINT).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid");
        // SAFETY: kill(2) touches no memory of ours; the daemon is our child and
        // has not been reaped, so its pid cannot have been reused.
        let sent = unsafe { libc::kill(pid, sig) };
        assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Stops the daemon with SIGTERM (it flushes and writes its ledger) and
    /// waits for it to exit; returns how it exited.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(SOON)
    }

    /// CPU time (user + system) the daemon has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/PID/stat");
        // The fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat format")
            .1
            .split_whitespace()
            .collect();
        // utime and stime are fields 14 and 15 of stat(5); fields[0] is field 3.
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100);
        Duration::from_micros(ticks * 1_000_000 / hz)
    }

    /// Fails if the daemon keeps a CPU busy while nothing is asked of it
    /// (measured over `window`): a worker spinning on a queue it cannot
    /// serve is a bug no status byte shows.
    pub fn assert_idle(&mut self, what: &str, window: Duration) {
        self.assert_alive();
        let (cpu, wall) = (self.cpu_time(), Instant::now());
        thread::sleep(window);
        let used = self.cpu_time().saturating_sub(cpu);
        let elapsed = wall.elapsed();
        assert!(
            used < elapsed / 4,
            "{what}: the daemon used {used:?} of CPU in {elapsed:?} while idle"
        );
    }

    /// Connects a frontend with `queues` queues.
    pub fn connect(&self, queues: u16) -> BlkFrontend {
        self.connect_with(FrontendConfig {
            mem_size: 8 << 20,
            num_queues: queues,
            timeout: SOON,
            ..FrontendConfig::default()
        })
    }

    /// Connects a frontend set up as `config`, retrying while the socket
    /// refuses (not bound yet, or between bind and listen).
    pub fn connect_with(&self, config: FrontendConfig) -> BlkFrontend {
        let deadline = Instant::now() + SOON;
        loop {
            // On its own thread: a daemon that accepts but never answers would
            // block the vhost-user handshake forever.
            let (socket, c) = (self.socket.clone(), config.clone());
            match within("connect", SOON, move || BlkFrontend::connect(socket, c)) {
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

    /// The disk file's length, which the daemon must not change.
    pub fn disk_len(&self) -> u64 {
        fs::metadata(&self.disk)
            .unwrap_or_else(|e| panic!("{}: {e}", self.disk.display()))
            .len()
    }

    /// What the daemon has written to stderr (its log) so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("serve.err")).unwrap_or_default()
    }

    /// The daemon's output for a failure report: at most the first and the
    /// last [`LOG_EXCERPT`] bytes of each stream.
    pub fn output(&self) -> String {
        let excerpt = |name: &str| {
            let Ok(f) = File::open(self.dir.path().join(name)) else {
                return String::new();
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let read = |offset: u64, n: u64| {
                let mut buf = vec![0; usize::try_from(n).unwrap_or(0)];
                let got = f.read_at(&mut buf, offset).unwrap_or(0);
                buf.truncate(got);
                String::from_utf8_lossy(&buf).into_owned()
            };
            if len <= 2 * LOG_EXCERPT {
                read(0, len)
            } else {
                let head = read(0, LOG_EXCERPT);
                let tail = read(len - LOG_EXCERPT, LOG_EXCERPT);
                format!(
                    "{head}\n[... {} bytes left out ...]\n{tail}",
                    len - 2 * LOG_EXCERPT
                )
            }
        };
        format!(
            "stdout:\n{}\nstderr:\n{}",
            excerpt("serve.out"),
            excerpt("serve.err")
        )
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
            eprintln!(
                "---- dmaprobe serve ({}) ----\n{}",
                self.dir.path().display(),
                self.output()
            );
        }
    }
}

/// Runs `f` on its own thread; fails if it does not return within `timeout`
/// (a vhost-user request the daemon never answers would block forever).
pub fn within<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|e| panic!("{what}: no answer within {timeout:?} ({e})"))
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
