//! The `dmaprobe` command line: arguments and their conversion to configurations.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use nvme_model::LbaSize;

use backend::config::{self, BackingConfig, ConfigError, ServeConfig};

/// dmaprobe: a vhost-user-blk disk that controls when DMA happens, for testing
/// how Linux kernels handle the lifetime of pages under I/O.
#[derive(Debug, Parser)]
#[command(name = "dmaprobe", version, about, long_about = None)]
pub struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the device until SIGINT or SIGTERM: vhost-user-blk, or NVMe over vfio-user (--nvme).
    ///
    /// Attach it to QEMU with shared guest memory:
    ///   -object memory-backend-memfd,id=mem,size=512M,share=on
    ///   -machine q35,memory-backend=mem
    ///   -chardev socket,id=c,path=SOCKET
    ///   -device vhost-user-blk-pci,chardev=c,num-queues=N
    /// or, with --nvme (QEMU 10.1 or later):
    ///   -device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"SOCKET"}}'
    ///
    /// When the frontend disconnects, dmaprobe listens again and serves the next
    /// one with the same data.
    ///
    /// Exits 0 when stopped by a signal, 1 when it cannot start or serve (the
    /// message says why).
    #[command(verbatim_doc_comment)]
    Serve(Box<ServeArgs>),
    /// Boot guest kernels under QEMU with dmaprobe attached, run the guest test
    /// suite, and print the verdicts (tests × kernels).
    ///
    /// Exits 0 when every test passed or was skipped, 1 when any failed or
    /// errored, 2 when the run itself could not be set up.
    Run(Box<RunArgs>),
    /// Reports of runs made elsewhere: `merge` joins the JSON of a run's
    /// shards (`dmaprobe run --shard I/N --json`, from the jobs of a CI
    /// matrix) into the whole run's table, JSON and JUnit.
    ///
    /// Exits 0 when every test passed or was skipped, 1 when any failed or
    /// errored, 2 when the reports cannot be merged.
    Report(crate::report::ReportArgs),
    /// Drive a running `dmaprobe serve` over its control socket: list and
    /// release held requests, add and remove fault rules, read findings and
    /// the ledger.
    ///
    /// Exits 0 when the daemon did what was asked, 1 when it refused or
    /// could not be reached.
    Ctl(crate::ctl::CtlArgs),
    /// Load any vhost-user-blk backend (dmaprobe, qemu-storage-daemon, ...),
    /// or with --nvme the NVMe controller of `dmaprobe serve --nvme` over
    /// vfio-user, with requests from one thread per queue, and print IOPS,
    /// MB/s and latency percentiles per queue and in total.
    ///
    /// Exits 0 when the load ran, 1 when it could not (the message says why).
    Bench(crate::bench::BenchArgs),
    /// List the guest kernels that can be named, and fetch them into the
    /// cache.
    ///
    /// Exits 0 when listed or fetched, 1 when a fetch failed.
    Kernel(crate::kernel::KernelArgs),
    /// Print the kernel options the guest suite needs, as a config fragment
    /// for the kernel's scripts/kconfig/merge_config.sh (`CONFIG_X=y` lines,
    /// each under a comment saying what it is for and which tests need it),
    /// or check a kernel's config against them with --check.
    ///
    /// Exits 0 when the fragment was printed or the config has every option,
    /// 1 when the config lacks one (or has it as a module where it must be
    /// built in), 2 when the config cannot be read.
    Kconfig(crate::kconfig::KconfigArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A kernel to boot: debian-6.1, debian-6.12 or a path, [:MODULES] [=LABEL];
    /// repeat for a matrix (default: both Debian kernels). The forms:
    ///
    ///   debian-6.1, debian-6.12
    ///       Debian's cloud kernels, fetched by scripts/setup into the cache.
    ///   IMAGE
    ///       A bzImage or vmlinuz. Its modules are looked for beside it:
    ///       lib/modules/RELEASE or usr/lib/modules/RELEASE in its directory
    ///       or the one above; an arch/x86/boot/bzImage is its build tree's.
    ///   BUILD_TREE
    ///       A directory with arch/x86/boot/bzImage (make [O=DIR] bzImage
    ///       modules). Its modules are the ones modules.order lists, indexed
    ///       by a private depmod in the run's own directory (the tree is only
    ///       read), else an installed DIR/lib/modules/RELEASE.
    ///   DEBIAN_ROOT
    ///       An unpacked kernel package: vmlinuz or boot/vmlinuz-RELEASE,
    ///       modules in lib/modules/RELEASE or usr/lib/modules/RELEASE.
    ///   PATH:MODULES
    ///       Any of the three with its modules: lib/modules/RELEASE, a root
    ///       holding one (make modules_install INSTALL_MOD_PATH=...), or a
    ///       build tree.
    ///   KERNEL=LABEL
    ///       Any of the above, named LABEL in the reports and the kept files.
    ///
    /// RELEASE is the one the image names in its boot header. A kernel given
    /// by path is named by its release unless labelled; two of one name get
    /// -2, -3, ... A path that exists as a whole is a path, : and = included.
    /// A kernel with everything built in needs no modules; one whose config
    /// (.config, boot/config-RELEASE) makes virtio_blk a module must have
    /// them.
    #[arg(long = "kernel", value_name = "KERNEL", verbatim_doc_comment)]
    pub kernels: Vec<String>,
    /// The modules of the one --kernel given by path without modules of its
    /// own (as --kernel PATH:DIR): lib/modules/RELEASE, an INSTALL_MOD_PATH, or
    /// a build tree. With several such kernels, pair each: --kernel PATH:DIR.
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,
    /// Tests to run, comma-separated (default: all; see --list).
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub tests: Vec<String>,
    /// List the tests and exit.
    #[arg(long)]
    pub list: bool,
    /// List the kernels that can be named (what is cached, what can be
    /// fetched), as `dmaprobe kernel list` does, and exit.
    #[arg(long)]
    pub list_kernels: bool,
    /// Write every result with its evidence as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Save an SVG timeline of every failed test in DIR, as KERNEL-TEST.svg
    /// (KERNEL: the kernel's name as one file name): each request from
    /// arrival to completion with its DMA, findings, guest moments.
    #[arg(long, value_name = "DIR")]
    pub timelines: Option<PathBuf>,
    /// Write the results as JUnit XML (a test suite per kernel).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Run against a deliberately broken device, to check that the suite notices:
    /// complete-before-dma or wrong-page.
    #[arg(long, value_name = "NAME", value_parser = ["complete-before-dma", "wrong-page"])]
    pub mutant: Option<String>,
    /// The backend that serves the guest's disk: dmaprobe, or QEMU's own
    /// qemu-storage-daemon on the same disk file and queues (to tell a kernel's
    /// fault from dmaprobe's; tests that need dmaprobe's features are refused).
    #[arg(long, value_name = "NAME", default_value = "dmaprobe",
          value_parser = ["dmaprobe", "qemu-storage-daemon"])]
    pub daemon: String,
    /// Keep each run's console, guest events and daemon log under
    /// DIR/KERNEL/TEST/ (KERNEL: the kernel's name as one file name; an
    /// NVMe pass's is KERNEL-nvme). What cannot be kept is said on stderr.
    #[arg(long, value_name = "DIR")]
    pub keep_logs: Option<PathBuf>,
    /// Virtqueues of the device (and of QEMU's vhost-user-blk-pci).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub queues: u16,
    /// Seed of the data patterns the guest writes, and of the soak's fault plan.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Multiply every guest timeout by this (for slow machines).
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub timeout_scale: f64,
    /// How long the soak test's workload runs, in seconds (its timeout
    /// grows by as much).
    #[arg(long, value_name = "N", default_value_t = guest_tests::soak::DEFAULT_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub soak_seconds: u64,
    /// The guest binary (default: dmaprobe-guest beside this executable).
    #[arg(long, value_name = "PATH")]
    pub guest_bin: Option<PathBuf>,
    /// How the guest reaches the disk: virtio-blk (vhost-user), nvme (the
    /// guest's nvme driver, dmaprobe's NVMe controller over vfio-user), or
    /// both, one pass each.
    #[arg(long, value_name = "NAME", default_value = "virtio-blk",
          value_parser = ["virtio-blk", "nvme", "both"])]
    pub transport: String,
    /// The QEMU to run.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// The QEMU with vfio-user-pci (10.1 or later) for --transport nvme
    /// (default: the one scripts/setup unpacks into the cache).
    #[arg(long, value_name = "PATH")]
    pub qemu_nvme: Option<PathBuf>,
    /// How QEMU runs the guests: kvm, tcg, or auto: KVM when a short probe
    /// boot shows that guests run under it here (with -cpu host, else QEMU's
    /// default model), TCG otherwise; stderr says which and why.
    #[arg(long, value_name = "NAME", default_value = "auto",
          value_parser = ["auto", "kvm", "tcg"])]
    pub accel: String,
    /// How many tests run at once, each with its own daemon, disk and QEMU
    /// (default: as many as the cores and the memory allow, printed at
    /// start). Tests that measure time (fio-randread, latency-*, soak) run
    /// alone. The reports are the same whatever N; only the times differ.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,
    /// Run only shard I of N of the run's cases (kernel x transport x test,
    /// dealt round-robin), for a CI job matrix: --shard 1/N ... N/N run every
    /// case once between them; `dmaprobe report merge` joins their --json.
    #[arg(long, value_name = "I/N", default_value = "1/1")]
    pub shard: guest_tests::run::Shard,
    /// Also accept the harness's self-tests (tests that fail on purpose).
    #[arg(long, hide = true)]
    pub allow_selftests: bool,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("media").required(true).args(["mem", "disk"]))]
pub struct ServeArgs {
    /// The socket to listen on: vhost-user, or vfio-user with --nvme. Mode
    /// 0600; a stale socket there is replaced, anything else is refused.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Present an NVMe controller over vfio-user instead of a vhost-user-blk
    /// device: the guest's own nvme driver drives it (QEMU 10.1 or later,
    /// `-device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":PATH}}'`;
    /// scripts/setup provides one).
    #[arg(long)]
    pub nvme: bool,
    /// Keep the media in sparse memory of this size (e.g. 64M, 1G).
    #[arg(long, value_name = "SIZE", conflicts_with = "size")]
    pub mem: Option<String>,
    /// Keep the media in a raw file: created with --size if missing, used at its
    /// own size if present (never resized). Locked while served: a second
    /// daemon on the same file is refused (--read-only ones may share it).
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// The size of a --disk file to create (e.g. 1G).
    #[arg(long, value_name = "SIZE", requires = "disk")]
    pub size: Option<String>,
    /// The logical block size the guest sees: 512 or 4096.
    #[arg(long, value_name = "BYTES", default_value_t = 512)]
    pub lbs: u64,
    /// Number of virtqueues, each served by its own thread.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub queues: u16,
    /// Descriptors per virtqueue (a power of two).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,
    /// Refuse writes, discards and write-zeroes (VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub read_only: bool,
    /// The serial number GET_ID returns (at most 20 bytes).
    #[arg(long, value_name = "STR", default_value = "dmaprobe")]
    pub serial: String,
    /// A fault rule, comma-separated key=value (repeatable), e.g.
    /// 'op=read,action=delay,ms=1000' or 'op=read,lba=0-7,nth=2,action=hold'.
    /// Match keys: op, lba, queue, size, tag, nth|every|prob, count. Actions:
    /// delay (ms=N|MIN-MAX), hold, watch (ms), error (status=ioerr|unsupp),
    /// partial (bytes), torn (bytes, status=ok|ioerr), corrupt (bits),
    /// complete-before-dma (ms), wrong-page.
    #[arg(long = "fault", value_name = "RULE")]
    pub faults: Vec<String>,
    /// Fault rules from a TOML file: `[[rule]]` tables with the same keys
    /// (op = "read", lba = "0-7", nth = 2, action = "hold"). A bad rule stops
    /// the daemon before it starts.
    #[arg(long = "faults", value_name = "FILE")]
    pub fault_file: Option<PathBuf>,
    /// Stamp canaries into read destinations at arrival and check them at DMA time.
    #[arg(long)]
    pub canary: bool,
    /// Hash write sources at arrival and compare them at DMA time.
    #[arg(long)]
    pub snapshot: bool,
    /// Report requests in flight on the same guest page (one writing memory).
    #[arg(long)]
    pub overlap: bool,
    /// The guest-physical address of the guest's zero page (hex or decimal).
    #[arg(long, value_name = "GPA")]
    pub zero_page: Option<String>,
    /// Record every request in the ledger and write it here, as JSON lines, on
    /// exit. The file is created at start: a path that cannot be written stops
    /// the daemon before it serves.
    #[arg(long, value_name = "FILE")]
    pub ledger: Option<PathBuf>,
    /// Entries the ledger keeps (the oldest are dropped and counted).
    #[arg(long, value_name = "N", default_value_t = dma::ledger::DEFAULT_CAPACITY)]
    pub ledger_capacity: usize,
    /// Watches (fault rules' `action=watch`) pending at once; a read past this
    /// or `--max-watched` is served unwatched and counted.
    #[arg(long, value_name = "N", default_value_t = dma::WatchLimits::default().watches)]
    pub max_watches: usize,
    /// Guest memory the pending watches may cover in all (default 1G).
    #[arg(long, value_name = "SIZE")]
    pub max_watched: Option<String>,
    /// Seed of the generator behind random delays and probabilities.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// The control socket for `dmaprobe ctl` (mode 0600). Default: the vhost-user
    /// socket's path with `.ctl` added.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Serve no control socket.
    #[arg(long, conflicts_with = "control")]
    pub no_control: bool,
    /// Close a control client that sends no whole request line for this many
    /// seconds (0: never), so idle clients cannot hold all 32 places.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub control_idle_timeout: u64,
    /// Make the last MiB of the disk a mailbox through which programs in the
    /// guest send control commands (no storage there: give a file system the
    /// rest of the disk).
    #[arg(long)]
    pub mailbox: bool,
    /// How long the media takes per command: a preset (instant, nvme, sata),
    /// then key=value fields that override it: read, write, flush, discard
    /// (base times: 80us, 1.5ms), bw, read-bw, write-bw (bytes/s, decimal:
    /// 3G, 500M), depth (commands served at once), jitter (±P%, seeded by
    /// --seed). E.g. 'nvme', 'sata,depth=1',
    /// 'read=80us,write=20us,bw=3G,depth=64,jitter=10%'.
    #[arg(long, value_name = "PRESET|SPEC", default_value = "instant")]
    pub latency: String,
    /// The drive's volatile write cache: writes the guest sent in write-back
    /// mode are lost on a power cut (`dmaprobe ctl power-cut`) until a flush
    /// makes them stable; a full cache makes its oldest writes stable. `off`:
    /// every write is stable at once.
    #[arg(long, value_name = "SIZE|off", default_value = config::DEFAULT_WRITE_CACHE)]
    pub write_cache: String,
    /// What deallocated (discarded) blocks read back as: zeroes, or keep
    /// (their old data).
    #[arg(long, value_name = "zeroes|keep", default_value = "zeroes")]
    pub deallocate: String,
    /// Bad blocks from the start (repeatable): LBA[+BLOCKS]:read fails reads
    /// until the blocks are rewritten, LBA[+BLOCKS]:write fails writes until
    /// cleared with `dmaprobe ctl media-error clear`.
    #[arg(long = "media-error", value_name = "LBA[+N]:KIND")]
    pub media_errors: Vec<String>,
    /// The largest read or write the guest may send (the drive's MDTS): the
    /// guest is told segments of 4 KiB and as many as make it. Default: as
    /// much as a queue carries.
    #[arg(long, value_name = "SIZE", help_heading = "Geometry")]
    pub max_transfer: Option<String>,
    /// The transfer size the drive prefers (virtio-blk opt_io_size).
    #[arg(long, value_name = "SIZE", help_heading = "Geometry")]
    pub optimal_transfer: Option<String>,
    /// Discards deallocate whole aligned units of this size only (default:
    /// one block).
    #[arg(long, value_name = "SIZE", help_heading = "Geometry")]
    pub discard_granularity: Option<String>,
    /// The most one discard range may cover (default 2G).
    #[arg(long, value_name = "SIZE", help_heading = "Geometry")]
    pub max_discard: Option<String>,
    /// The most ranges in one discard (default 32, at most 256).
    #[arg(long, value_name = "N", help_heading = "Geometry")]
    pub max_discard_segments: Option<u32>,
    /// The most one write-zeroes range may cover (default 2G).
    #[arg(long, value_name = "SIZE", help_heading = "Geometry")]
    pub max_write_zeroes: Option<String>,
    /// The most ranges in one write-zeroes (default 32, at most 256).
    #[arg(long, value_name = "N", help_heading = "Geometry")]
    pub max_write_zeroes_segments: Option<u32>,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = ConfigError;

    /// Each option checked, in the order the errors are reported.
    fn try_from(a: ServeArgs) -> Result<Self, Self::Error> {
        let lbs = LbaSize::try_from(a.lbs)?;
        let backing = backing(&a, lbs)?;
        let control = control_socket(&a)?;
        let queues = config::check_queues(a.queues)?;
        let queue_size = config::check_queue_size(a.queue_size)?;
        let serial = config::check_serial(a.serial.clone())?;
        let dma = engine_config(&a)?;
        let faults = fault_rules(&a)?;
        let latency = config::parse_latency(&a.latency)?;
        let geometry = geometry(&a, lbs)?;
        let media = media(&a)?;
        Ok(ServeConfig {
            socket: a.socket,
            backing,
            lbs,
            queues,
            queue_size,
            read_only: a.read_only,
            serial,
            dma,
            faults,
            ledger_file: a.ledger,
            control,
            control_idle: (a.control_idle_timeout > 0)
                .then(|| std::time::Duration::from_secs(a.control_idle_timeout)),
            mailbox: a.mailbox,
            nvme: a.nvme,
            latency,
            geometry,
            media,
        })
    }
}

/// The media's backing: memory of `--mem`, or the `--disk` file (of
/// `--size`, if given).
fn backing(a: &ServeArgs, lbs: LbaSize) -> Result<BackingConfig, ConfigError> {
    Ok(match (&a.mem, &a.disk) {
        (Some(mem), _) => BackingConfig::Memory {
            size: config::check_size("--mem", config::parse_size(mem)?, lbs)?,
        },
        (None, Some(path)) => BackingConfig::File {
            path: path.clone(),
            size: a
                .size
                .as_ref()
                .map(|s| config::check_size("--size", config::parse_size(s)?, lbs))
                .transpose()?,
        },
        // clap's "media" group requires one of them.
        (None, None) => return Err(ConfigError::Empty { option: "--mem" }),
    })
}

/// The control socket: `--control`, beside the vhost-user socket by
/// default, none with `--no-control`; never the vhost-user socket itself.
fn control_socket(a: &ServeArgs) -> Result<Option<PathBuf>, ConfigError> {
    let control = if a.no_control {
        None
    } else {
        Some(
            a.control
                .clone()
                .unwrap_or_else(|| backend::control::socket::default_path(&a.socket)),
        )
    };
    // Each would replace the other as a stale socket.
    if let Some(path) = control.as_ref().filter(|&c| *c == a.socket) {
        return Err(ConfigError::ControlIsSocket(path.clone()));
    }
    Ok(control)
}

/// The DMA engine's checks, ledger, zero page, seed and watch limits.
fn engine_config(a: &ServeArgs) -> Result<dma::EngineConfig, ConfigError> {
    Ok(dma::EngineConfig {
        checks: dma::Checks {
            canary: a.canary,
            snapshot: a.snapshot,
            overlap: a.overlap,
            ledger: a.ledger.is_some(),
        },
        ledger_capacity: a.ledger_capacity,
        zero_page: a.zero_page.as_deref().map(config::parse_gpa).transpose()?,
        seed: a.seed,
        watch_limits: dma::WatchLimits {
            watches: a.max_watches,
            bytes: match &a.max_watched {
                Some(size) => config::parse_size(size)?,
                None => dma::WatchLimits::default().bytes,
            },
        },
    })
}

/// The fault rules of `--fault-file`, then those of each `--fault`.
fn fault_rules(a: &ServeArgs) -> Result<Vec<dma::RuleSpec>, ConfigError> {
    let mut rules = match &a.fault_file {
        Some(file) => config::load_fault_file(file)?,
        None => Vec::new(),
    };
    rules.extend(backend::serve::parse_faults(&a.faults)?);
    Ok(rules)
}

/// Transfer sizes and discard / write-zeroes limits.
fn geometry(a: &ServeArgs, lbs: LbaSize) -> Result<nvme_model::Geometry, ConfigError> {
    config::geometry(
        &config::GeometryArgs {
            max_transfer: a.max_transfer.clone(),
            optimal_transfer: a.optimal_transfer.clone(),
            discard_granularity: a.discard_granularity.clone(),
            max_discard: a.max_discard.clone(),
            max_discard_segments: a.max_discard_segments,
            max_write_zeroes: a.max_write_zeroes.clone(),
            max_write_zeroes_segments: a.max_write_zeroes_segments,
        },
        lbs,
        a.queue_size,
    )
}

/// The write cache, what deallocated blocks read as, and the bad blocks.
fn media(a: &ServeArgs) -> Result<config::MediaConfig, ConfigError> {
    Ok(config::MediaConfig {
        write_cache: config::parse_write_cache(&a.write_cache)?,
        deallocate: config::parse_deallocate(&a.deallocate)?,
        media_errors: a
            .media_errors
            .iter()
            .map(|m| config::parse_media_error(m))
            .collect::<Result<_, _>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("dmaprobe").chain(args.iter().copied()))
    }

    fn serve_config(args: &[&str]) -> Result<ServeConfig, ConfigError> {
        match parse(args).unwrap().command {
            Command::Serve(a) => ServeConfig::try_from(*a),
            other => panic!("not a serve command: {other:?}"),
        }
    }

    #[test]
    fn defaults_a_user_expects() {
        let c = serve_config(&["serve", "--socket", "/tmp/s", "--mem", "64M"]).unwrap();
        assert_eq!(c.lbs, LbaSize::B512);
        assert_eq!(c.queues, 1);
        assert_eq!(c.queue_size, 256);
        assert!(!c.read_only);
        assert_eq!(c.backing, BackingConfig::Memory { size: 64 << 20 });
    }

    #[test]
    fn media_is_required_and_exclusive() {
        assert!(parse(&["serve", "--socket", "s"]).is_err());
        assert!(parse(&["serve", "--socket", "s", "--mem", "1M", "--disk", "f"]).is_err());
        assert!(parse(&["serve", "--socket", "s", "--mem", "1M", "--size", "1M"]).is_err());
        let c = serve_config(&["serve", "--socket", "s", "--disk", "f", "--size", "1G"]).unwrap();
        assert_eq!(
            c.backing,
            BackingConfig::File {
                path: "f".into(),
                size: Some(1 << 30)
            }
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let base = ["serve", "--socket", "s", "--mem", "64M"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            serve_config(&v)
        };
        assert!(with(&["--lbs", "1024"]).is_err());
        assert!(with(&["--queues", "0"]).is_err());
        assert!(with(&["--queue-size", "300"]).is_err());
        assert!(with(&["--serial", "012345678901234567890"]).is_err());
        assert!(serve_config(&["serve", "--socket", "s", "--mem", "1000"]).is_err());
        assert!(with(&["--lbs", "4096"]).is_ok());
        let e = with(&["--fault", "op=read,action=delay,ms=x"]).unwrap_err();
        assert!(e.to_string().contains("column"), "{e}");
        assert!(with(&["--zero-page", "nope"]).is_err());
        assert!(matches!(
            with(&["--control", "s"]),
            Err(ConfigError::ControlIsSocket(_))
        ));
    }

    #[test]
    fn dma_options() {
        let c = serve_config(&[
            "serve",
            "--socket",
            "s",
            "--mem",
            "64M",
            "--fault",
            "op=read,action=delay,ms=1000",
            "--canary",
            "--snapshot",
            "--ledger",
            "l.jsonl",
            "--zero-page",
            "0x1000",
        ])
        .unwrap();
        assert_eq!(c.faults.len(), 1);
        assert!(c.dma.checks.canary && c.dma.checks.snapshot && c.dma.checks.ledger);
        assert!(!c.dma.checks.overlap);
        assert_eq!(c.dma.zero_page, Some(dma::Gpa(0x1000)));
        let plain = serve_config(&["serve", "--socket", "s", "--mem", "64M"]).unwrap();
        assert_eq!(plain.dma.checks, dma::Checks::default());
    }

    #[test]
    fn soak_seconds() {
        let run = |extra: &[&str]| {
            let mut v = vec!["run"];
            v.extend_from_slice(extra);
            parse(&v).map(|c| match c.command {
                Command::Run(a) => a.soak_seconds,
                _ => panic!("not a run command"),
            })
        };
        assert_eq!(run(&[]).unwrap(), guest_tests::soak::DEFAULT_SECONDS);
        assert_eq!(
            run(&["--tests", "soak", "--soak-seconds", "60"]).unwrap(),
            60
        );
        assert!(run(&["--soak-seconds", "0"]).is_err());
        assert!(run(&["--soak-seconds", "3m"]).is_err());
    }

    #[test]
    fn kernels_are_repeated_and_keep_their_forms() {
        let c = parse(&[
            "run",
            "--kernel",
            "debian-6.12",
            "--kernel",
            "/k/build:/k/mods=my fix",
            "--modules",
            "/m",
        ])
        .unwrap();
        let Command::Run(a) = c.command else {
            panic!("not a run command")
        };
        assert_eq!(a.kernels, ["debian-6.12", "/k/build:/k/mods=my fix"]);
        assert_eq!(a.modules.as_deref(), Some(std::path::Path::new("/m")));
        // --help explains every form.
        let help = Cli::try_parse_from(["dmaprobe", "run", "--help"])
            .unwrap_err()
            .to_string();
        for form in ["BUILD_TREE", "DEBIAN_ROOT", "PATH:MODULES", "KERNEL=LABEL"] {
            assert!(help.contains(form), "{form}: {help}");
        }
    }

    #[test]
    fn latency() {
        let base = ["serve", "--socket", "s", "--mem", "64M"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            serve_config(&v)
        };
        assert!(with(&[]).unwrap().latency.is_instant());
        assert_eq!(
            with(&["--latency", "nvme"]).unwrap().latency,
            nvme_model::LatencySpec::NVME
        );
        let c = with(&["--latency", "sata,depth=1,read=1ms"]).unwrap();
        assert_eq!(c.latency.read, std::time::Duration::from_millis(1));
        assert_eq!(c.latency.write, nvme_model::LatencySpec::SATA.write);
        // A bad spec is refused with the field and the forms it takes.
        let e = with(&["--latency", "nvme,jitter=10"]).unwrap_err();
        assert!(matches!(e, ConfigError::Latency(..)), "{e:?}");
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(cause.contains("jitter") && cause.contains('%'), "{cause}");
        assert!(with(&["--latency", "ssd"]).is_err());
    }
}
