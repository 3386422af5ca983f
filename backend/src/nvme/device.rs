//! The NVMe interface's device: the [`Controller`] behind the vfio-user
//! transport, with its NVM commands taken through the request [`Pipeline`]
//! (the same engine, fault rules, holds, canaries, mailbox and ledger as
//! virtio-blk) and their outcomes posted back as completion queue entries.
//!
//! A command's life: SQ doorbell → the controller fetches, decodes and checks
//! it and walks its PRPs, on the queue's own thread → [`IoHandler::submit`]
//! here: the command becomes a [`Prepared`] request → [`Pipeline::submit`] →
//! its outcome, now or through a `CqeReply` later, becomes an NVMe status →
//! [`Controller::complete`].

use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use dma::Op;
use log::warn;
use nvme_model::{Deallocate, LbaRange, Namespace};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use super::controller::{Controller, BAR0_SIZE};
use super::handler::{CommandTag, IoCommand, IoHandler, IoOp};
use super::identify::Identity;
use super::status::NvmeStatus;
use crate::pipeline::work::{block_range, prepared, writable, Prepared, Work};
use crate::pipeline::{
    Core, Failure, InjectedError, Label, Outcome, Pipeline, Refusal, Reply, Submitted,
};
use crate::vfio_user::{self, PciFunction};
use crate::GuestMemory;

/// An NVMe controller whose NVM commands go through the request pipeline.
#[derive(Debug)]
pub struct NvmeDevice {
    controller: Arc<Controller>,
    pipeline: Arc<Pipeline>,
}

impl NvmeDevice {
    /// A controller over the pipeline's namespace, its I/O queues served on
    /// threads of their own; `serial` names it in Identify, `deallocate`
    /// says what deallocated blocks read as.
    pub fn new(pipeline: Arc<Pipeline>, serial: &str, deallocate: Deallocate) -> Arc<Self> {
        let identity = Identity::for_namespace(&pipeline.core().ns, serial, deallocate);
        let handler = Arc::new(ToPipeline {
            pipeline: pipeline.clone(),
            controller: OnceLock::new(),
            bufs: (0..=identity.io_queues)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            write_cache_at_reset: identity.write_cache,
        });
        let controller = Arc::new(Controller::new(identity, handler.clone()));
        controller.serve_on_threads();
        let _ = handler.controller.set(Arc::downgrade(&controller));
        Arc::new(NvmeDevice {
            controller,
            pipeline,
        })
    }

    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }
}

impl PciFunction for NvmeDevice {
    fn bar0_size(&self) -> u64 {
        BAR0_SIZE
    }

    fn bar0_read(&self, offset: u64, data: &mut [u8]) {
        self.controller.bar0_read(offset, data);
    }

    fn bar0_write(&self, offset: u64, data: &[u8]) {
        self.controller.bar0_write(offset, data);
    }

    fn attach(&self, mem: GuestMemory, irqs: Arc<dyn vfio_user::Interrupts>) {
        if let Err(e) = self.pipeline.set_memory(mem.clone()) {
            warn!("nvme: cannot hand guest memory to the pipeline: {e}");
        }
        self.controller.attach(mem, Arc::new(Vectors(irqs)));
    }

    fn reset(&self) {
        self.controller.reset();
    }
}

/// The transport's MSI-X vectors as the controller raises them.
struct Vectors(Arc<dyn vfio_user::Interrupts>);

impl super::handler::Interrupts for Vectors {
    fn signal(&self, vector: u16) {
        self.0.signal(vector);
    }
}

/// Takes the controller's NVM commands through the pipeline.
struct ToPipeline {
    pipeline: Arc<Pipeline>,
    /// Set once, right after the controller is made.
    controller: OnceLock<Weak<Controller>>,
    /// Scratch space for the data of commands served at once, one per
    /// queue: each queue's commands come from its own thread.
    bufs: Vec<Mutex<Vec<u8>>>,
    /// The volatile write cache at power-on (`None`: there is none). A reset
    /// returns the Volatile Write Cache feature to it, and the media with it.
    write_cache_at_reset: Option<bool>,
}

impl ToPipeline {
    fn controller(&self) -> Option<Arc<Controller>> {
        self.controller.get().and_then(Weak::upgrade)
    }
}

impl IoHandler for ToPipeline {
    fn submit(&self, cmd: IoCommand) {
        let Some(controller) = self.controller() else {
            return;
        };
        let core = self.pipeline.core();
        let tag = cmd.tag;
        let Some(atomic) = core.mem() else {
            controller.complete(tag, NvmeStatus::DataTransferError, 0);
            return;
        };
        let mem = atomic.memory();
        let label = label(&core.ns, &cmd);
        let prepared = match prepare(&core.ns, cmd) {
            Ok(p) => p,
            Err(refusal) => {
                core.counters.count_malformed(refusal);
                let (status, _) = nvme_status(Outcome::Failed(Failure::Refused(refusal)));
                controller.complete(tag, status, 0);
                return;
            }
        };
        let reply = || -> Box<dyn Reply> {
            Box::new(CqeReply {
                controller: Arc::downgrade(&controller),
                tag,
            })
        };
        let mut fallback = Vec::new();
        let mut buf = self
            .bufs
            .get(usize::from(tag.qid))
            .map(|b| b.lock().unwrap_or_else(PoisonError::into_inner));
        let buf = buf.as_deref_mut().unwrap_or(&mut fallback);
        match self.pipeline.submit(&mem, label, prepared, reply, buf) {
            Submitted::Now(outcome, finish) => {
                let (status, told) = nvme_status(outcome);
                controller.complete(tag, status, 0);
                self.pipeline.finish(finish, told);
            }
            Submitted::Later => {}
        }
    }

    /// The host turns the cache off (every write is then synced before it
    /// completes) or on.
    fn set_write_cache(&self, enabled: bool) -> Result<(), NvmeStatus> {
        let core = self.pipeline.core();
        core.ns.set_write_cache(enabled).map_err(|e| {
            warn!(
                "nvme: cannot switch the write cache {}: {e}",
                on_off(enabled)
            );
            NvmeStatus::InternalError
        })
    }

    fn shutdown(&self) {
        if let Err(e) = self.pipeline.core().ns.flush() {
            warn!("nvme: flush at shutdown failed: {e}");
        }
    }

    fn reset(&self) {
        self.pipeline.abandon_waiting();
        if let Some(enabled) = self.write_cache_at_reset {
            // A failure is logged; the feature reads its default all the same.
            let _ = self.set_write_cache(enabled);
        }
    }
}

fn on_off(enabled: bool) -> &'static str {
    if enabled {
        "on"
    } else {
        "off"
    }
}

/// The completion of a command that waited.
struct CqeReply {
    controller: Weak<Controller>,
    tag: CommandTag,
}

impl Reply for CqeReply {
    fn send(
        self: Box<Self>,
        _core: &Core,
        _mem: &GuestMemoryMmap<()>,
        outcome: Outcome,
    ) -> &'static str {
        let (status, told) = nvme_status(outcome);
        match self.controller.upgrade() {
            Some(c) => c.complete(self.tag, status, 0),
            None => return "no-status",
        }
        told
    }
}

/// A checked NVM command as the pipeline takes it. The controller has
/// checked the blocks against the namespace; they are checked again here,
/// where the ranges are made.
fn prepare(ns: &Namespace, cmd: IoCommand) -> Result<Prepared, Refusal> {
    let range = |start, blocks: u32| block_range(ns, start, u64::from(blocks));
    let (op, work) = match cmd.op {
        IoOp::Read => (Op::Read, Work::Read(range(cmd.slba, cmd.nlb)?)),
        IoOp::Write => {
            writable(ns)?;
            let range = range(cmd.slba, cmd.nlb)?;
            (
                Op::Write,
                Work::Write {
                    range,
                    fua: cmd.fua,
                },
            )
        }
        IoOp::Flush => (Op::Flush, Work::Flush),
        IoOp::WriteZeroes { deallocate } => {
            writable(ns)?;
            (
                Op::WriteZeroes,
                Work::Zero(vec![(range(cmd.slba, cmd.nlb)?, deallocate)]),
            )
        }
        IoOp::Deallocate(ranges) => {
            writable(ns)?;
            let ranges = ranges
                .iter()
                .map(|r| Ok((range(r.start, r.blocks)?, true)))
                .collect::<Result<Vec<(LbaRange, bool)>, Refusal>>()?;
            (Op::Discard, Work::Zero(ranges))
        }
    };
    Ok(prepared(ns, cmd.tag.qid, op, work, cmd.segments))
}

/// A command as the log names it, in 512-byte sectors as virtio-blk's are.
fn label(ns: &Namespace, cmd: &IoCommand) -> Label {
    let lbs = ns.lba_size();
    Label {
        op: cmd.op.name(),
        sector: cmd.slba.0.saturating_mul(lbs.bytes()) >> 9,
        len: u32::try_from(u64::from(cmd.nlb).saturating_mul(lbs.bytes())).unwrap_or(u32::MAX),
    }
}

/// The NVMe status for an outcome, and the ledger's word for it: the
/// pipeline's words in NVMe's.
fn nvme_status(outcome: Outcome) -> (NvmeStatus, &'static str) {
    use NvmeStatus as S;
    let Outcome::Failed(failure) = outcome else {
        return (S::Success, "ok");
    };
    match failure {
        Failure::Refused(Refusal::OutOfRange) => (S::LbaOutOfRange, "lba-out-of-range"),
        Failure::Refused(Refusal::ReadOnly) => (S::NamespaceWriteProtected, "write-protected"),
        Failure::Refused(Refusal::OutsideMemory) => (S::DataTransferError, "data-transfer-error"),
        Failure::Injected(InjectedError::Unsupported) => (S::InvalidOpcode, "invalid-opcode"),
        Failure::UnrecoveredRead => (S::UnrecoveredReadError, "unrecovered-read-error"),
        Failure::WriteFault => (S::WriteFault, "write-fault"),
        Failure::Stopped => (S::AbortRequested, "aborted"),
        // A fault rule's error is the test's: Do Not Retry, so the guest's
        // driver passes it up as virtio-blk's IOERR is, not retries it away.
        Failure::Injected(InjectedError::IoError) => (S::DataTransferError, "data-transfer-error"),
        Failure::Mailbox => (S::InvalidField, "invalid-field"),
        Failure::CutOff | Failure::Media => (S::InternalError, "internal-error"),
    }
}
