//! What outlives each connection, and what the control plane drives: the
//! namespace, the DMA engine, the counters, the pipeline of the connection
//! being served; and `status`'s answer, the daemon at a glance.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use dma::schedule::{ParkedInfo, Release};
use dma::Engine;
use nvme_model::{Latency, Namespace};

use super::process_figures::ProcessFigures;
use super::protocol::checks_json;
use super::socket::ClientCounters;
use crate::counters::Counters;
use crate::nvme::report::NvmeView;
use crate::pipeline::Pipeline;

/// What outlives each connection, and what the control plane drives.
#[derive(Debug)]
pub struct DaemonState {
    ns: Arc<Namespace>,
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    /// The media latency model; `None` when instant.
    latency: Option<Arc<Latency>>,
    /// The request pipeline of the connection being served, if any.
    current: Mutex<Option<Arc<Pipeline>>>,
    /// Whether a frontend is connected (`current` is set a little before).
    connected: AtomicBool,
    /// The NVMe controller and its vfio-user transport, when that is the
    /// interface served.
    nvme: OnceLock<NvmeView>,
    started: Instant,
    /// Control clients turned away or closed.
    control_clients: Arc<ClientCounters>,
}

impl DaemonState {
    /// The state of a daemon starting now over `ns`, with no connection yet.
    pub fn new(
        ns: Arc<Namespace>,
        engine: Arc<Engine>,
        counters: Arc<Counters>,
        latency: Option<Arc<Latency>>,
    ) -> Self {
        DaemonState {
            ns,
            engine,
            counters,
            latency,
            current: Mutex::new(None),
            connected: AtomicBool::new(false),
            nvme: OnceLock::new(),
            started: Instant::now(),
            control_clients: Arc::default(),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn namespace(&self) -> &Arc<Namespace> {
        &self.ns
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// The media latency model; `None` when instant.
    pub fn latency(&self) -> Option<&Arc<Latency>> {
        self.latency.as_ref()
    }

    pub fn control_clients(&self) -> &Arc<ClientCounters> {
        &self.control_clients
    }

    /// The request pipeline of the connection now served (`None`: none).
    pub fn set_current(&self, pipeline: Option<Arc<Pipeline>>) {
        if let Ok(mut current) = self.current.lock() {
            *current = pipeline;
        }
    }

    /// Whether a frontend is connected now.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// The NVMe interface served, for `status`; its transport says whether
    /// a client is connected.
    pub fn set_nvme(&self, view: NvmeView) {
        let _ = self.nvme.set(view);
    }

    /// The NVMe interface served, if that is the interface.
    pub fn nvme(&self) -> Option<&NvmeView> {
        self.nvme.get()
    }

    /// Whether a frontend (vhost-user) or client (vfio-user) is connected.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed) || self.nvme.get().is_some_and(NvmeView::connected)
    }

    /// Fails every request still waiting on the connected frontend (the
    /// daemon is stopping); returns how many.
    pub fn fail_waiting(&self) -> usize {
        self.current().map_or(0, |d| d.fail_waiting())
    }

    fn current(&self) -> Option<Arc<Pipeline>> {
        self.current.lock().ok()?.clone()
    }

    /// Releases held requests of the current connection; returns how many.
    pub fn release(&self, which: Release) -> usize {
        self.current().map_or(0, |d| d.release(which))
    }

    /// Releases the held requests `pick` chooses; returns how many.
    pub fn release_where(&self, pick: impl Fn(&ParkedInfo) -> bool) -> usize {
        self.current().map_or(0, |d| d.release_where(pick))
    }

    /// Requests of the current connection waiting for a delay or a release.
    pub fn parked(&self) -> Vec<ParkedInfo> {
        self.current().map(|d| d.parked()).unwrap_or_default()
    }

    /// The daemon at a glance.
    pub fn status(&self) -> serde_json::Value {
        let engine = &self.engine;
        let parked = self.parked();
        let ledger = engine.ledger();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "connected": self.connected(),
            "capacity_bytes": self.ns.capacity_bytes(),
            "lbs": self.ns.lba_size().bytes(),
            "counters": self.counters.snapshot(),
            "findings": engine
                .finding_counts()
                .into_iter()
                .map(|(k, n)| (k.name(), n))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "checks": checks_json(engine.checks()),
            "watches": engine.watch_figures(),
            "rules": engine.faults().rules().len(),
            "held": parked.iter().filter(|p| p.held).count(),
            "delayed": parked.iter().filter(|p| !p.held).count(),
            "zero_page": engine.zero_page(),
            "latency": self
                .latency
                .as_ref()
                .map_or_else(|| "instant".to_owned(), |l| l.spec().to_string()),
            "write_cache": self.ns.cache_status().map(|c| serde_json::json!({
                "enabled": self.ns.write_cache_enabled(),
                "capacity_bytes": c.capacity_bytes,
                "volatile_bytes": c.volatile_bytes,
                "volatile_writes": c.volatile_writes,
                "destaged_bytes": c.destaged_bytes,
            })),
            "power_cuts": self.ns.power_epoch(),
            "backing": {
                "kind": self.ns.backing_kind().name(),
                "syncs": self.ns.syncs(),
            },
            "media_errors": self.ns.media_errors().list(),
            "tag": engine.tag(),
            "ledger": {
                "entries": ledger.len(),
                "capacity": ledger.capacity(),
                "bytes": ledger.bytes(),
                "byte_budget": ledger.byte_budget(),
                "dropped": ledger.dropped(),
            },
            "control": self.control_clients.snapshot(),
            "process": ProcessFigures::now(),
            "nvme": self.nvme.get().map(NvmeView::status),
        })
    }
}
