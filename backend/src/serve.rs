//! `dmaprobe serve`: open the media, listen on the vhost-user socket, serve one
//! frontend after another with the same media and DMA engine, and stop cleanly
//! on SIGINT/SIGTERM.
//!
//! [`Daemon::start`] runs the serving loop on its own thread and returns a
//! handle that reaches the engine and the current connection's waiting
//! requests; [`run`] is the command: start, wait for a signal, flush, write the
//! ledger.
//!
//! The files the daemon makes or takes are checked before anything starts: a
//! socket path that holds anything but a stale socket is refused, the ledger
//! file is created at once, and the disk file is locked (`nvme_model::Backing`).
//! Sockets are bound mode 0600 and removed at exit only if they are still
//! the ones bound ([`crate::unix_socket`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use dma::schedule::{ParkedInfo, Release};
use dma::{Engine, RuleSpec};
use log::{error, info};
use nvme_model::{Backing, Latency, Namespace};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{BackingConfig, ServeConfig};
use crate::control::commands::handle_line;
use crate::control::protocol::ControlFn;
use crate::control::socket::ControlError;
use crate::control::state::DaemonState;
use crate::control::{self};
use crate::counters::Counters;
use crate::nvme::device::NvmeDevice;
use crate::nvme::report::NvmeView;
use crate::nvme::Controller;
use crate::pipeline::Pipeline;
use crate::unix_socket::{bind_socket, check_socket_path, SocketError, SocketFile};
use crate::vfio_user::{VfioUserOptions, VfioUserServer};
use crate::virtio_blk::device::{BlkDevice, DeviceShape};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("Cannot open the media")]
    Media(#[source] nvme_model::NamespaceError),
    #[error("Cannot open the media")]
    Backing(#[source] nvme_model::BackingError),
    #[error("Bad geometry")]
    Geometry(#[source] nvme_model::GeometryError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("Cannot create the device")]
    Device(#[source] io::Error),
    // vhost_user_backend::Error has no std::error::Error impl to chain as a source.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("Cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("Cannot flush the media on exit")]
    Flush(#[source] nvme_model::NamespaceError),
    #[error("Cannot create the --ledger file {0}")]
    LedgerOpen(PathBuf, #[source] io::Error),
    #[error("Cannot write the ledger to {0}")]
    Ledger(PathBuf, #[source] io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("NVMe over vfio-user")]
    Nvme(#[source] crate::vfio_user::VfioUserError),
}

/// The `--ledger` file: opened (created if missing, its old content kept) when
/// the daemon starts, so that a path it cannot write stops it at once; written
/// whole at exit. One it created and never wrote is removed when dropped (the
/// daemon did not start).
#[derive(Debug)]
struct LedgerFile {
    path: PathBuf,
    file: File,
    created: bool,
    kept: bool,
}

impl LedgerFile {
    fn open(path: &Path) -> Result<LedgerFile, ServeError> {
        let fail = |e| ServeError::LedgerOpen(path.to_owned(), e);
        let (file, created) = match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(file) => (file, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                OpenOptions::new().write(true).open(path).map_err(fail)?,
                false,
            ),
            Err(e) => return Err(fail(e)),
        };
        Ok(LedgerFile {
            path: path.to_owned(),
            file,
            created,
            kept: false,
        })
    }

    /// Replaces what the file holds with `ledger` as JSON lines.
    fn write(&mut self, ledger: &dma::ledger::Ledger) -> Result<(), ServeError> {
        self.kept = true;
        let mut write = || -> io::Result<()> {
            // A regular file is rewritten; a pipe or a device is written to.
            if self.file.metadata()?.is_file() {
                self.file.set_len(0)?;
                self.file.rewind()?;
            }
            let mut out = io::BufWriter::new(&self.file);
            ledger.write_json_lines(&mut out)?;
            out.flush()
        };
        write().map_err(|e| ServeError::Ledger(self.path.clone(), e))
    }
}

impl Drop for LedgerFile {
    fn drop(&mut self) {
        if self.created && !self.kept {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Opens the namespace the configuration describes.
pub fn open_namespace(config: &ServeConfig) -> Result<Namespace, ServeError> {
    let backing = match &config.backing {
        BackingConfig::Memory { size } => Backing::memory(*size),
        BackingConfig::File { path, size } => Backing::file(path, *size, config.read_only),
    }
    .map_err(ServeError::Backing)?;
    let media = &config.media;
    let mut ns = Namespace::new(backing, config.lbs, config.read_only)
        .map_err(ServeError::Media)?
        .with_deallocate(media.deallocate)
        .with_geometry(config.geometry)
        .map_err(ServeError::Geometry)?;
    if let Some(bytes) = media.write_cache {
        ns = ns.with_write_cache(bytes);
    }
    for m in &media.media_errors {
        let range = ns
            .check_range(nvme_model::Lba(m.lba), m.blocks)
            .map_err(|e| ServeError::Media(e.into()))?;
        ns.media_errors()
            .add(range.start().0, range.blocks(), m.kind);
    }
    Ok(ns)
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    shared: Arc<DaemonState>,
    failed: mpsc::Receiver<ServeError>,
    socket: PathBuf,
    /// The ledger file, opened at start and written by [`Daemon::write_ledger`].
    ledger: Option<LedgerFile>,
    /// The sockets bound, removed when the daemon is dropped if still there.
    _sockets: Vec<SocketFile>,
}

impl Daemon {
    /// Opens the media, binds the socket and starts serving on a thread of its own.
    ///
    /// What could be refused is refused first, before anything is made: a
    /// socket or control path that holds something other than a socket. Then
    /// the ledger file is created and the media opened (a disk file locked);
    /// whatever was made is removed again if a later step fails.
    pub fn start(config: &ServeConfig) -> Result<Daemon, ServeError> {
        refuse_taken_paths(config)?;
        let ledger = config
            .ledger_file
            .as_deref()
            .map(LedgerFile::open)
            .transpose()?;
        let shared = Arc::new(daemon_state(config)?);
        // The control socket first: by the time the device's socket answers,
        // ctl can reach the daemon.
        let mut sockets = Vec::new();
        if let Some(path) = &config.control {
            sockets.extend(serve_control(path, &shared, config.control_idle)?);
        }
        let (listener, socket_file) = bind_socket(&config.socket)?;
        sockets.push(socket_file);
        log_serving(config, shared.namespace());
        let failed = serve_interface(config, &shared, listener)?;
        Ok(Daemon {
            shared,
            failed,
            socket: config.socket.clone(),
            ledger,
            _sockets: sockets,
        })
    }

    pub fn state(&self) -> &Arc<DaemonState> {
        &self.shared
    }

    pub fn engine(&self) -> &Arc<Engine> {
        self.shared.engine()
    }

    pub fn namespace(&self) -> &Arc<Namespace> {
        self.shared.namespace()
    }

    pub fn counters(&self) -> &Arc<Counters> {
        self.shared.counters()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Releases held requests of the current connection; returns how many.
    pub fn release(&self, which: Release) -> usize {
        self.shared.release(which)
    }

    /// Requests of the current connection waiting for a delay or a release.
    pub fn parked(&self) -> Vec<ParkedInfo> {
        self.shared.parked()
    }

    /// A fatal error of the serving thread, if it has stopped.
    pub fn failure(&self) -> Option<ServeError> {
        match self.failed.try_recv() {
            Ok(err) => Some(err),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(ServeError::Device(io::Error::other(
                "the serving thread died",
            ))),
        }
    }

    /// Writes the ledger as JSON lines to the `--ledger` file (if one was
    /// given), replacing what it held.
    pub fn write_ledger(&mut self) -> Result<(), ServeError> {
        match &mut self.ledger {
            Some(file) => file.write(&self.shared.engine().ledger()),
            None => Ok(()),
        }
    }
}

/// Refuses a socket or control path that holds something other than a
/// socket, before anything is made.
fn refuse_taken_paths(config: &ServeConfig) -> Result<(), ServeError> {
    check_socket_path(&config.socket)?;
    if let Some(control) = &config.control {
        if let Err(SocketError::NotASocket(path)) = check_socket_path(control) {
            return Err(ControlError::NotASocket(path).into());
        }
    }
    Ok(())
}

/// What the daemon keeps across connections: the media opened (a disk file
/// locked), the engine with the configured fault rules, the latency model.
fn daemon_state(config: &ServeConfig) -> Result<DaemonState, ServeError> {
    let ns = Arc::new(open_namespace(config)?);
    let engine = Arc::new(Engine::new(config.dma.clone()));
    for rule in &config.faults {
        engine.faults().add(rule.clone());
    }
    let latency = (!config.latency.is_instant()).then(|| {
        info!("media latency: {}", config.latency);
        Arc::new(Latency::new(config.latency, config.dma.seed))
    });
    Ok(DaemonState::new(
        ns,
        engine,
        Arc::new(Counters::default()),
        latency,
    ))
}

/// Serves the control socket at `path` on its own thread; returns the
/// socket, known from now on, so that exit removes it only if it is still
/// there.
fn serve_control(
    path: &Path,
    shared: &Arc<DaemonState>,
    idle: Option<Duration>,
) -> Result<Option<SocketFile>, ServeError> {
    let state = shared.clone();
    let answer: ControlFn = Arc::new(move |line: &str| handle_line(&state, line));
    let clients = shared.control_clients().clone();
    control::socket::serve(path, answer, clients, idle).map_err(ServeError::Control)?;
    Ok(SocketFile::of(path).ok())
}

/// What is served where, and where the guest's mailbox is.
fn log_serving(config: &ServeConfig, ns: &Namespace) {
    let read_only = if ns.read_only() { ", read-only" } else { "" };
    if config.nvme {
        info!(
            "serving {} bytes ({} blocks of {}) as an NVMe controller over vfio-user on {}{read_only}",
            ns.capacity_bytes(),
            ns.blocks(),
            ns.lba_size(),
            config.socket.display(),
        );
    } else {
        info!(
            "serving {} bytes ({} blocks of {}) on {}, {} queue(s) of {}{read_only}",
            ns.capacity_bytes(),
            ns.blocks(),
            ns.lba_size(),
            config.socket.display(),
            config.queues,
            config.queue_size,
        );
    }
    if config.mailbox {
        match wire::mailbox::mailbox_offset(ns.capacity_bytes()) {
            Some(at) => info!("guest mailbox at byte {at} (the last MiB)"),
            None => log::warn!("the disk is too small for a mailbox (needs 4 MiB): none"),
        }
    }
}

/// Serves the configured interface on `listener` from a thread of its own:
/// the NVMe controller over vfio-user, or the vhost-user-blk device. The
/// receiver gets the thread's fatal error, if it stops.
fn serve_interface(
    config: &ServeConfig,
    shared: &Arc<DaemonState>,
    listener: UnixListener,
) -> Result<mpsc::Receiver<ServeError>, ServeError> {
    let (failed_tx, failed) = mpsc::channel();
    if config.nvme {
        let (server, controller) = nvme_server(config, shared, listener)?;
        thread::Builder::new()
            .name("vfio-user".into())
            .spawn(move || {
                let err = serve_nvme(server, &controller);
                let _ = failed_tx.send(err);
            })
            .map_err(ServeError::Device)?
    } else {
        let shape = DeviceShape {
            queues: config.queues,
            queue_size: config.queue_size,
            serial: config.serial.clone(),
        };
        let mailbox = config.mailbox;
        let shared = shared.clone();
        // Made from a bound listener, vhost's Listener never unlinks the path.
        let listener = Listener::from(listener);
        thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || {
                let err = serve_connections(listener, &shared, shape, mailbox);
                let _ = failed_tx.send(err);
            })
            .map_err(ServeError::Device)?
    };
    Ok(failed)
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(config: ServeConfig) -> Result<(), ServeError> {
    // Block the stop signals before any thread exists, so every thread inherits the
    // mask and this thread alone takes them, synchronously.
    let signals = StopSignals::block().map_err(ServeError::Signals)?;
    let mut daemon = Daemon::start(&config)?;
    let result = loop {
        if let Some(sig) = signals.wait(Duration::from_millis(200)) {
            info!("received {sig}: flushing the media and stopping");
            if let Some(nvme) = daemon.state().nvme() {
                log_nvme_counters(&nvme.controller);
            }
            let failed = daemon.state().fail_waiting();
            if failed > 0 {
                info!("{failed} waiting requests failed with IOERR");
            }
            break Ok(());
        }
        if let Some(err) = daemon.failure() {
            break Err(err);
        }
    };
    let flushed = daemon.namespace().flush().map_err(ServeError::Flush);
    let ledger = daemon.write_ledger();
    // Removes the sockets it bound, if they are still the ones it bound.
    drop(daemon);
    result.and(flushed).and(ledger)
}

/// The control commands the guest's mailbox answers, if it has one.
fn mailbox_control(shared: &Arc<DaemonState>, mailbox: bool) -> Option<ControlFn> {
    mailbox.then(|| {
        let state = Arc::downgrade(shared);
        let f: ControlFn = Arc::new(move |line: &str| match state.upgrade() {
            Some(s) => handle_line(&s, line),
            None => r#"{"v":1,"ok":false,"error":"the daemon is stopping"}"#.to_owned(),
        });
        f
    })
}

/// The NVMe controller over vfio-user, listening: one controller and one
/// request pipeline for the daemon's life (a client that leaves resets the
/// controller).
fn nvme_server(
    config: &ServeConfig,
    shared: &Arc<DaemonState>,
    listener: UnixListener,
) -> Result<(VfioUserServer, Arc<Controller>), ServeError> {
    // The I/O pool gets the CPUs that one queue's thread leaves: guests here
    // have a vCPU or two, and so an I/O queue or two.
    let pipeline = Arc::new(
        Pipeline::new(
            shared.namespace().clone(),
            shared.engine().clone(),
            shared.counters().clone(),
            1,
            mailbox_control(shared, config.mailbox),
            shared.latency().cloned(),
        )
        .map_err(ServeError::Device)?,
    );
    let device = NvmeDevice::new(pipeline.clone(), &config.serial, config.media.deallocate);
    let controller = device.controller().clone();
    let server =
        VfioUserServer::with_listener(listener, &config.socket, device, VfioUserOptions::default())
            .map_err(ServeError::Nvme)?;
    shared.set_current(Some(pipeline));
    shared.set_nvme(NvmeView {
        controller: controller.clone(),
        transport: server.stats(),
    });
    Ok((server, controller))
}

/// Serves one vfio-user client after another; returns only on a fatal error.
/// Each time a client leaves, says what the controller has done so far.
fn serve_nvme(mut server: VfioUserServer, controller: &Controller) -> ServeError {
    loop {
        if let Err(e) = server.serve_connection() {
            return ServeError::Nvme(e);
        }
        log_nvme_counters(controller);
    }
}

/// What the NVMe controller has done since the daemon started, in one line.
fn log_nvme_counters(controller: &Controller) {
    let c = controller.report().counters;
    info!(
        "nvme: since start: {} admin and {} NVM commands, {} doorbell register writes, \
         {} shadow doorbell updates, {} doorbell buffer configs, {} doorbell errors, {} resets",
        c.admin_commands,
        c.io_commands,
        c.mmio_doorbells,
        c.shadow_updates,
        c.dbbuf_configs,
        c.doorbell_errors,
        c.resets
    );
}

/// Serves one frontend after another; returns only on a fatal error.
fn serve_connections(
    mut listener: Listener,
    shared: &Arc<DaemonState>,
    shape: DeviceShape,
    mailbox: bool,
) -> ServeError {
    const MAX_ACCEPT_FAILURES: u32 = 50;
    let mut failures = 0;
    loop {
        let control = mailbox_control(shared, mailbox);
        let device = match BlkDevice::new(
            shared.namespace().clone(),
            shared.engine().clone(),
            shared.counters().clone(),
            shape.clone(),
            control,
            shared.latency().cloned(),
        ) {
            Ok(d) => Arc::new(d),
            Err(e) => return ServeError::Device(e),
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = match VhostUserDaemon::new("dmaprobe".into(), device.clone(), mem) {
            Ok(d) => d,
            Err(e) => return ServeError::Daemon(e),
        };
        // The device is current before the frontend can send anything, so a
        // release from the control plane never misses a request parked early.
        shared.set_current(Some(device.pipeline().clone()));
        if let Err(e) = daemon.start(&mut listener) {
            shared.set_current(None);
            device.shut_down();
            drop(daemon);
            device.close_handed_out();
            // A connection that fails before it is set up harms nothing; a listener
            // that keeps failing is broken.
            failures += 1;
            if failures >= MAX_ACCEPT_FAILURES {
                return ServeError::Daemon(e);
            }
            error!("accepting a frontend failed: {e}");
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        failures = 0;
        info!("frontend connected");
        shared.set_connected(true);
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => error!("frontend connection ended: {e}"),
        }
        shared.set_connected(false);
        shared.set_current(None);
        device.shut_down();
        drop(daemon);
        device.close_handed_out();
        // The media stays: the next frontend sees what this one wrote. A
        // frontend that goes away has not flushed, so what the write cache
        // holds stays volatile (a power cut between guests loses it);
        // without a running cache the backing is made stable.
        if !shared.namespace().write_cache_enabled() {
            if let Err(e) = shared.namespace().flush() {
                error!("flush after disconnect failed: {e}");
            }
        }
    }
}

/// Parses `--fault` rules, naming the one that is wrong.
pub fn parse_faults(lines: &[String]) -> Result<Vec<RuleSpec>, crate::config::ConfigError> {
    lines
        .iter()
        .map(|l| RuleSpec::parse(l).map_err(|e| crate::config::ConfigError::Fault(l.clone(), e)))
        .collect()
}

/// SIGINT and SIGTERM, blocked and taken synchronously.
struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    fn block() -> io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame; the signal numbers are valid.
        let ret = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        Ok(StopSignals { set })
    }

    /// Waits up to `timeout` for a stop signal; returns its name.
    fn wait(&self, timeout: Duration) -> Option<&'static str> {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::c_long::try_from(timeout.as_nanos().min(999_999_999)).unwrap_or(0),
        };
        // SAFETY: `self.set` is an initialised sigset_t, `ts` a valid timespec, and a
        // null siginfo pointer is allowed.
        let sig = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        match sig {
            libc::SIGINT => Some("SIGINT"),
            libc::SIGTERM => Some("SIGTERM"),
            _ => None,
        }
    }
}
