//! A daemon serving in this process (`backend::serve::Daemon`) on a socket in
//! its own temp dir, configured from `dmaprobe serve` arguments and driven by
//! the frontend driver: the fixture of the tests that look inside the daemon
//! (bench, dma, faults, latency).

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use backend::config::ServeConfig;
use backend::serve::Daemon;
use backend::vhost_user_driver::{BlkFrontend, FrontendConfig};
use dma::ledger::{Entry, RequestRecord};
use dma::schedule::ParkedInfo;
use dma::{Finding, RuleSpec};
use tempfile::TempDir;

use super::child::SOON;
use super::serve_config;

/// The disk file's size in [`Served::on_disk`].
pub const DISK: u64 = 16 << 20;

/// A daemon serving in this process, on `DIR/blk.sock`; stopped on drop.
pub struct Served {
    pub daemon: Daemon,
    pub dir: TempDir,
}

impl Served {
    /// Starts a daemon as `dmaprobe serve --socket DIR/blk.sock --mem 16M
    /// ARGS` would.
    pub fn start(args: &[&str]) -> Served {
        let argv: Vec<&str> = ["--mem", "16M"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        Served::start_exactly(&argv)
    }

    /// Starts `dmaprobe serve --socket DIR/blk.sock --disk DIR/disk.img
    /// --size 16M --ledger DIR/ledger.jsonl --no-control ARGS`.
    pub fn on_disk(args: &[&str]) -> Served {
        let dir = tempfile::tempdir().expect("temp dir");
        let (disk, ledger) = (dir.path().join("disk.img"), dir.path().join("ledger.jsonl"));
        let size = DISK.to_string();
        let mut argv = vec![
            "--disk",
            disk.to_str().expect("utf-8 temp path"),
            "--size",
            &size,
            "--ledger",
            ledger.to_str().expect("utf-8 temp path"),
            "--no-control",
        ];
        argv.extend_from_slice(args);
        let config = config_in(&dir, &argv);
        assert!(config.dma.checks.ledger, "--ledger turns recording on");
        let daemon = Daemon::start(&config).expect("the daemon starts");
        Served { daemon, dir }
    }

    /// Starts a daemon as `dmaprobe serve --socket DIR/blk.sock ARGS` would.
    pub fn start_exactly(args: &[&str]) -> Served {
        let dir = tempfile::tempdir().expect("temp dir");
        let daemon = Daemon::start(&config_in(&dir, args)).expect("the daemon starts");
        Served { daemon, dir }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("blk.sock")
    }

    /// The disk file of [`Served::on_disk`].
    pub fn disk(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }

    /// Connects a frontend with `num_queues` queues.
    pub fn connect(&self, num_queues: u16) -> BlkFrontend {
        BlkFrontend::connect(
            self.socket(),
            FrontendConfig {
                mem_size: 8 << 20,
                num_queues,
                timeout: SOON,
                ..FrontendConfig::default()
            },
        )
        .expect("the frontend connects")
    }

    /// Adds a rule in the line form; returns its id.
    pub fn rule(&self, line: &str) -> u64 {
        let spec = RuleSpec::parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        self.daemon.engine().faults().add(spec)
    }

    /// Waits until exactly `n` requests are parked and returns them, oldest first.
    pub fn wait_parked(&self, n: usize) -> Vec<ParkedInfo> {
        let deadline = Instant::now() + SOON;
        loop {
            let parked = self.daemon.parked();
            if parked.len() == n {
                return parked;
            }
            assert!(
                parked.len() < n && Instant::now() < deadline,
                "expected {n} parked request(s), found {parked:?}"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// The ledger cursor after the last entry.
    pub fn cursor(&self) -> u64 {
        self.daemon.engine().ledger().since(u64::MAX).1
    }

    /// Request records of the ledger from `cursor` on.
    pub fn records_since(&self, cursor: u64) -> Vec<RequestRecord> {
        let (entries, _) = self.daemon.engine().ledger().since(cursor);
        entries
            .into_iter()
            .filter_map(|e| match e.entry {
                Entry::Request(r) => Some(r),
                Entry::Finding(_) | Entry::Mark(_) => None,
            })
            .collect()
    }

    /// Every request record of the ledger.
    pub fn records(&self) -> Vec<RequestRecord> {
        self.records_since(0)
    }

    pub fn findings(&self) -> Vec<Finding> {
        self.daemon.engine().ledger().findings().cloned().collect()
    }

    pub fn assert_alive(&self) {
        if let Some(e) = self.daemon.failure() {
            panic!("the daemon stopped: {e}");
        }
    }
}

/// The `ServeConfig` that `dmaprobe serve --socket DIR/blk.sock ARGS` gives.
fn config_in(dir: &TempDir, args: &[&str]) -> ServeConfig {
    let socket = dir.path().join("blk.sock");
    let argv: Vec<&str> = ["--socket", socket.to_str().expect("utf-8 temp path")]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    serve_config(&argv)
}
