//! The listener: one [`PciFunction`] served to one vfio-user client after
//! another, with the regions and IRQs the `vfio_user` crate's [`Server`]
//! announces, and a connection that breaks (even by a panic in the crate)
//! ending with the function reset.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR4_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{IrqInfo, Server, ServerRegion};

use super::config_space::{bar_size, MsixLayout, PciIds, CONFIG_SIZE};
use super::function::PciFunction;
use super::stats::VfioUserStats;
use super::transport::Transport;
use crate::counters::bump;
use crate::unix_socket::{bind_socket, SocketError, SocketFile};

/// How the transport presents the function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfioUserOptions {
    pub ids: PciIds,
    /// MSI-X table size, 1–2048. Linux's nvme driver wants one per I/O queue it
    /// makes (one per CPU) plus the admin queue's, and shares them otherwise.
    pub msix_vectors: u16,
}

impl Default for VfioUserOptions {
    fn default() -> Self {
        VfioUserOptions {
            ids: PciIds::DMAPROBE,
            msix_vectors: 64,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    #[error("MSI-X vectors must be 1 to {MAX_VECTORS}, not {0}")]
    Vectors(u16),
    #[error("The function's BAR0 size {0:#x} is zero or too large")]
    Bar0Size(u64),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("Cannot accept a vfio-user connection")]
    Accept(#[source] io::Error),
}

/// Serves one [`PciFunction`] on a vfio-user socket, one client at a time.
pub struct VfioUserServer {
    server: Server,
    transport: Transport,
    socket: PathBuf,
    /// The socket [`VfioUserServer::new`] bound, removed with the server.
    _socket_file: Option<SocketFile>,
}

impl std::fmt::Debug for VfioUserServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserServer")
            .field("socket", &self.socket)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl VfioUserServer {
    /// Listens on `socket` (mode 0600; a stale socket there is replaced,
    /// anything else refused) and attaches the function to the (still empty)
    /// guest memory and the MSI-X vectors. The socket goes with the server.
    pub fn new(
        socket: &Path,
        function: Arc<dyn PciFunction>,
        options: VfioUserOptions,
    ) -> Result<VfioUserServer, VfioUserError> {
        check_options(function.as_ref(), &options)?;
        let (listener, file) = bind_socket(socket)?;
        Self::serve_on(listener, socket, Some(file), function, options)
    }

    /// Serves on `listener`, bound at `socket` by the caller, who removes it.
    pub fn with_listener(
        listener: UnixListener,
        socket: &Path,
        function: Arc<dyn PciFunction>,
        options: VfioUserOptions,
    ) -> Result<VfioUserServer, VfioUserError> {
        Self::serve_on(listener, socket, None, function, options)
    }

    fn serve_on(
        listener: UnixListener,
        socket: &Path,
        socket_file: Option<SocketFile>,
        function: Arc<dyn PciFunction>,
        options: VfioUserOptions,
    ) -> Result<VfioUserServer, VfioUserError> {
        let (bar0_size, function_bar0) = check_options(function.as_ref(), &options)?;
        let layout = MsixLayout::new(options.msix_vectors);
        let regions = regions(bar0_size, &layout);
        let irqs = irq_infos(options.msix_vectors);
        // From a descriptor, the crate's server never unlinks the path.
        let server = Server::from_owned_fd(OwnedFd::from(listener), true, irqs, regions);
        let transport = Transport::attach(function, function_bar0, bar0_size, layout, options.ids);
        info!(
            "vfio-user: listening on {} (BAR0 {bar0_size:#x}, {} MSI-X vectors)",
            socket.display(),
            options.msix_vectors
        );
        Ok(VfioUserServer {
            server,
            transport,
            socket: socket.to_owned(),
            _socket_file: socket_file,
        })
    }

    /// Serves clients until accepting one fails.
    pub fn serve(&mut self) -> Result<(), VfioUserError> {
        loop {
            self.serve_connection()?;
        }
    }

    /// Accepts one client and serves it until it leaves; then resets the
    /// function, unmaps its memory and forgets its eventfds. A connection that
    /// breaks (a stream error, a message the crate panics on) ends the same way:
    /// only a failing accept is an error.
    pub fn serve_connection(&mut self) -> Result<(), VfioUserError> {
        let transport = &mut self.transport;
        let server = &self.server;
        // The crate unwraps on some malformed VERSION messages; the panic unwinds
        // out of run(), dropping the stream, and nothing of ours is mid-update.
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| server.run(transport)));
        match outcome {
            Ok(Ok(())) => info!("vfio-user: client disconnected"),
            Ok(Err(vfio_user::Error::SocketAccept(e))) => return Err(VfioUserError::Accept(e)),
            Ok(Err(e)) => warn!("vfio-user: connection ended: {e}"),
            Err(_) => {
                bump(&self.transport.stats().broken_connections);
                warn!("vfio-user: the vfio_user crate panicked on a client's message; connection dropped");
            }
        }
        self.transport.disconnect();
        Ok(())
    }

    pub fn stats(&self) -> Arc<VfioUserStats> {
        self.transport.stats().clone()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// The vector count checked, and BAR0's size as mapped and as the function gave it.
fn check_options(
    function: &dyn PciFunction,
    options: &VfioUserOptions,
) -> Result<(u64, u64), VfioUserError> {
    if !(1..=MAX_VECTORS).contains(&options.msix_vectors) {
        return Err(VfioUserError::Vectors(options.msix_vectors));
    }
    let function_bar0 = function.bar0_size();
    let bar0_size = bar_size(function_bar0).ok_or(VfioUserError::Bar0Size(function_bar0))?;
    Ok((bar0_size, function_bar0))
}

const MAX_VECTORS: u16 = 2048;

/// The regions the client is told of: BAR0 (the function's), BAR4 (MSI-X)
/// and config space, readable and writable; every other index empty.
fn regions(bar0_size: u64, layout: &MsixLayout) -> Vec<ServerRegion> {
    let region_size = |index| match index {
        VFIO_PCI_BAR0_REGION_INDEX => bar0_size,
        VFIO_PCI_BAR4_REGION_INDEX => layout.bar_size,
        VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE as u64,
        _ => 0,
    };
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = region_size(index);
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags: if size == 0 {
                        0
                    } else {
                        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
                    },
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// The IRQ infos, one per index in order (the crate looks them up by
/// position): MSI-X with `msix_vectors` vectors, the error and request
/// IRQs with one, no INTx and no MSI.
fn irq_infos(msix_vectors: u16) -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| {
            let (flags, count) = match index {
                // No INTx (interrupt pin 0) and no MSI capability.
                VFIO_PCI_INTX_IRQ_INDEX | VFIO_PCI_MSI_IRQ_INDEX => (0, 0),
                VFIO_PCI_MSIX_IRQ_INDEX => (VFIO_IRQ_INFO_EVENTFD, u32::from(msix_vectors)),
                // Accepted and never fired; offering them spares QEMU's
                // "Could not enable error recovery" warning.
                _ => (VFIO_IRQ_INFO_EVENTFD, 1),
            };
            IrqInfo {
                index,
                flags,
                count,
            }
        })
        .collect()
}
