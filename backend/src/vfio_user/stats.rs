//! What the transport did and refused, counted across connections.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the transport did and refused since it started, for every connection.
#[derive(Debug, Default)]
pub struct VfioUserStats {
    /// A client is connected now: it has sent a request the transport
    /// answers (the crate answers the handshake itself) and not left.
    pub connected: AtomicBool,
    /// Connections that ended (the client closed, vanished, or was dropped).
    pub connections: AtomicU64,
    /// Connections dropped because the vfio_user crate panicked on a message.
    pub broken_connections: AtomicU64,
    /// Requests answered with an error by this module.
    pub refused: AtomicU64,
    pub dma_maps: AtomicU64,
    pub dma_unmaps: AtomicU64,
    /// DMA windows accepted but unreachable: no fd (the client would need
    /// DMA_READ/WRITE) or read-only.
    pub dma_unreachable: AtomicU64,
    /// DMA windows mapped from a file that cannot be sealed against
    /// shrinking: the frontend is trusted not to truncate it.
    pub dma_unsealed: AtomicU64,
    /// Vectors given an eventfd by SET_IRQS.
    pub eventfds_set: AtomicU64,
    pub irqs_delivered: AtomicU64,
    /// Interrupts dropped: the vector has no eventfd (or does not exist).
    pub irqs_dropped: AtomicU64,
    /// Interrupts held as pending on a masked vector.
    pub irqs_masked: AtomicU64,
    /// Eventfd writes that failed (not an eventfd, closed).
    pub irqs_failed: AtomicU64,
    pub resets: AtomicU64,
}

/// [`VfioUserStats`] at one moment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VfioUserStatsSnapshot {
    pub connected: bool,
    pub connections: u64,
    pub broken_connections: u64,
    pub refused: u64,
    pub dma_maps: u64,
    pub dma_unmaps: u64,
    pub dma_unreachable: u64,
    pub dma_unsealed: u64,
    pub eventfds_set: u64,
    pub irqs_delivered: u64,
    pub irqs_dropped: u64,
    pub irqs_masked: u64,
    pub irqs_failed: u64,
    pub resets: u64,
}

impl VfioUserStats {
    pub fn snapshot(&self) -> VfioUserStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        VfioUserStatsSnapshot {
            connected: self.connected.load(Ordering::Relaxed),
            connections: get(&self.connections),
            broken_connections: get(&self.broken_connections),
            refused: get(&self.refused),
            dma_maps: get(&self.dma_maps),
            dma_unmaps: get(&self.dma_unmaps),
            dma_unreachable: get(&self.dma_unreachable),
            dma_unsealed: get(&self.dma_unsealed),
            eventfds_set: get(&self.eventfds_set),
            irqs_delivered: get(&self.irqs_delivered),
            irqs_dropped: get(&self.irqs_dropped),
            irqs_masked: get(&self.irqs_masked),
            irqs_failed: get(&self.irqs_failed),
            resets: get(&self.resets),
        }
    }
}
