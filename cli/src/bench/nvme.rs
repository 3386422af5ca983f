//! The load on an NVMe controller behind a vfio-user socket, as a guest's
//! nvme driver would put it there: guest memory from a memfd mapped to the
//! server at IOVA 0, the admin queues, then an I/O queue pair per bench
//! queue (queue q + 1 on MSI-X vector q + 1) and a data buffer per request
//! in flight, each with its PRP list built once when it spans more than two
//! pages. With shadow doorbells (the default, when the controller offers
//! them, as Linux takes them), the doorbells are slots in guest memory and
//! a register is written only when the controller's EventIdx asks. Each
//! thread drives its pair as an [`IoQueue`]; all of them write their
//! doorbell registers through the one vfio-user connection (the
//! `vfio_user` server serves one client at a time, so there is no second
//! connection to be had), and sleep on their vector's eventfd.

use std::path::Path;
use std::time::Duration;

use backend::nvme_driver::command::{self, io_op};
use backend::nvme_driver::reg::CAP;
use backend::nvme_driver::vfio_user::probe;
use backend::nvme_driver::{
    AdminQueues, Completion, ControllerData, Driver, Error, Gpa, HostRam, IoQueue, IoQueuePair,
    NamespaceData, Prp, ShadowBuffers, Sqe, VfioUser, CC_LINUX, PAGE,
};
use log::info;
use nvme_model::Lba;

use super::load::{self, Done, Io, LoadQueue, Op};
use super::{BenchConfig, BenchError, DeviceError, Doorbells, Measured, STALL};

/// Entries of each admin queue (Linux's NVME_AQ_DEPTH).
const ADMIN_ENTRIES: u16 = 32;
/// The namespace the load goes to.
const NSID: u32 = 1;
/// How long the socket has to answer the probe, and to take the
/// connection after it.
const ANSWER: Duration = Duration::from_secs(5);
/// The entries a PRP list page holds, one of them the pointer to the next.
const LIST_ENTRIES: u64 = PAGE / 8 - 1;

/// Connects to the controller at `socket`, sets it up for `config` and runs
/// `config`'s load on it.
pub fn measure(socket: &Path, config: &BenchConfig) -> Result<Measured, BenchError> {
    let setup = |source: Error| BenchError::Setup {
        socket: socket.to_path_buf(),
        source: source.into(),
    };
    probe(socket, ANSWER).map_err(|e| match e {
        Error::NotVfioUser { why, .. } => BenchError::NotNvme {
            socket: socket.to_path_buf(),
            why,
        },
        e => setup(e),
    })?;
    let plan = Plan::new(config)?;
    let ram = HostRam::new(plan.size).map_err(setup)?;
    let vectors = config.queues + 1;
    let vfio = VfioUser::connect(socket, ANSWER, ram, &[plan.size], vectors).map_err(setup)?;
    let mut driver = Driver::new(vfio);
    driver.set_timeout(STALL);
    let ns = bring_up(&mut driver, &plan, config).map_err(|e| match e {
        Setup::Driver(e) => setup(e),
        Setup::Refused(e) => e,
    })?;
    let capacity = ns.capacity_bytes();
    let range = config.range(capacity)?;
    let pairs = plan
        .pairs
        .iter()
        .map(|pair| driver.take_io_queue(pair.qid))
        .collect::<Result<Vec<_>, Error>>()
        .map_err(setup)?;
    let len = usize::try_from(config.bs).map_err(|_| BenchError::BlockSize(config.bs))?;
    let mut queues = Vec::with_capacity(pairs.len());
    for ((index, queue), buffers) in (0..).zip(pairs).zip(&plan.buffers) {
        let prps = buffers
            .iter()
            .enumerate()
            .map(|(i, &(data, list))| {
                let prp = Prp::contiguous(driver.memory(), data, len, list)?;
                prp.write(
                    driver.memory(),
                    &load::buffer_data(config.seed, index, i, len),
                )?;
                Ok(prp)
            })
            .collect::<Result<Vec<_>, Error>>()
            .map_err(setup)?;
        queues.push(NvmeQueue {
            index,
            queue,
            transport: driver.transport(),
            prps,
            block_bytes: ns.block_bytes,
            blocks: u32::try_from(config.bs / ns.block_bytes).unwrap_or(u32::MAX),
            completions: Vec::new(),
        });
    }
    Ok(Measured::load(queues, config, range, capacity))
}

/// Where everything lies in guest memory: the admin queues, a page for
/// identify data, the two pages of shadow doorbells, each I/O queue pair,
/// and each buffer with the PRP list pages it needs.
#[derive(Debug)]
struct Plan {
    admin: AdminQueues,
    identify: Gpa,
    shadow: ShadowBuffers,
    pairs: Vec<IoQueuePair>,
    /// Per queue, per buffer: the data, and its PRP list's first page.
    buffers: Vec<Vec<(Gpa, Option<Gpa>)>>,
    /// Bytes of guest memory.
    size: u64,
}

impl Plan {
    fn new(config: &BenchConfig) -> Result<Plan, BenchError> {
        let too_much = || BenchError::TooMuchMemory {
            bytes: config.buffer_bytes(),
        };
        let mut next = 0u64;
        let mut take = |bytes: u64| -> Result<Gpa, BenchError> {
            let at = next;
            next = bytes
                .div_ceil(PAGE)
                .checked_mul(PAGE)
                .and_then(|b| next.checked_add(b))
                .ok_or_else(too_much)?;
            Ok(Gpa(at))
        };
        let sqe = Sqe::SIZE as u64;
        let cqe = Completion::SIZE as u64;
        let admin = AdminQueues {
            sq: take(u64::from(ADMIN_ENTRIES) * sqe)?,
            cq: take(u64::from(ADMIN_ENTRIES) * cqe)?,
            entries: ADMIN_ENTRIES,
        };
        let identify = take(PAGE)?;
        let shadow = ShadowBuffers {
            doorbells: take(PAGE)?,
            event_idx: take(PAGE)?,
        };
        let entries = u64::from(config.queue_size);
        let pairs = (1..=config.queues)
            .map(|qid| {
                Ok(IoQueuePair {
                    qid,
                    sq: take(entries * sqe)?,
                    cq: take(entries * cqe)?,
                    entries: config.queue_size,
                    vector: Some(qid),
                })
            })
            .collect::<Result<Vec<_>, BenchError>>()?;
        // A buffer starts on a page: PRP1 takes the first page, PRP2 the
        // second, or past two a list of all but the first.
        let pages = config.bs.div_ceil(PAGE);
        let list_pages = if pages > 2 {
            (pages - 1).div_ceil(LIST_ENTRIES)
        } else {
            0
        };
        let buffers = (0..config.queues)
            .map(|_| {
                (0..config.iodepth)
                    .map(|_| {
                        let data = take(config.bs)?;
                        let list = (list_pages > 0)
                            .then(|| take(list_pages * PAGE))
                            .transpose()?;
                        Ok((data, list))
                    })
                    .collect::<Result<Vec<_>, BenchError>>()
            })
            .collect::<Result<Vec<_>, BenchError>>()?;
        Ok(Plan {
            admin,
            identify,
            shadow,
            pairs,
            buffers,
            size: next,
        })
    }
}

/// Why bringing the controller up stopped: the driver failed, or the
/// controller cannot run the configuration.
enum Setup {
    Driver(Error),
    Refused(BenchError),
}

impl From<Error> for Setup {
    fn from(e: Error) -> Setup {
        Setup::Driver(e)
    }
}

/// What Linux does at probe, checking the configuration against what the
/// controller says: enable it (CAP.MQES against --queue-size), identify it
/// (MDTS against --bs) and namespace 1 (its block size and write
/// protection), ask for --queues I/O queue pairs, hand over the shadow
/// doorbells if the controller offers them and --doorbells wants them, and
/// create the pairs.
fn bring_up(
    driver: &mut Driver<VfioUser>,
    plan: &Plan,
    config: &BenchConfig,
) -> Result<NamespaceData, Setup> {
    let refuse = |e| Err(Setup::Refused(e));
    driver.enable(plan.admin, CC_LINUX)?;
    let cap = driver.read64(CAP)?;
    let max_entries = u32::try_from(cap & 0xffff).unwrap_or(u32::MAX) + 1;
    if u32::from(config.queue_size) > max_entries {
        return refuse(BenchError::QueueTooLarge {
            size: config.queue_size,
            max: max_entries,
        });
    }
    let min_page = PAGE << (cap >> 48 & 0xf);
    let ctrl = ControllerData::parse(&driver.identify(0x01, 0, plan.identify)?)?;
    if let Some(max) = ctrl.max_transfer(min_page).filter(|&max| config.bs > max) {
        return refuse(BenchError::TransferTooLarge { bs: config.bs, max });
    }
    let ns = NamespaceData::parse(&driver.identify(0x00, NSID, plan.identify)?)?;
    if !config.bs.is_multiple_of(ns.block_bytes) {
        return refuse(BenchError::LbaMismatch {
            bs: config.bs,
            lba: ns.block_bytes,
        });
    }
    if ns.read_only && config.writes() {
        return refuse(BenchError::ReadOnly(config.rw));
    }
    let (sqs, cqs) = driver.request_queues(config.queues, config.queues)?;
    let granted = sqs.min(cqs);
    if granted < u32::from(config.queues) {
        return refuse(BenchError::TooFewQueues {
            asked: config.queues,
            granted,
        });
    }
    match (config.doorbells, ctrl.doorbell_buffer) {
        (Doorbells::Shadow, true) => {
            driver.shadow_doorbells(plan.shadow)?;
            info!("bench: nvme: shadow doorbells (Doorbell Buffer Config)");
        }
        (Doorbells::Shadow, false) => info!(
            "bench: nvme: the controller does not offer Doorbell Buffer Config: \
             every doorbell is a register write"
        ),
        (Doorbells::Registers, _) => info!("bench: nvme: every doorbell is a register write"),
    }
    for &pair in &plan.pairs {
        driver.create_io_pair(pair)?;
    }
    Ok(ns)
}

/// An I/O queue pair and its buffers; a request's slot is its buffer, and
/// its command identifier too.
struct NvmeQueue<'a> {
    index: u16,
    queue: IoQueue,
    transport: &'a VfioUser,
    prps: Vec<Prp>,
    block_bytes: u64,
    /// Blocks per request.
    blocks: u32,
    /// What the last wait reaped.
    completions: Vec<Completion>,
}

impl LoadQueue for NvmeQueue<'_> {
    fn index(&self) -> u16 {
        self.index
    }

    fn slots(&self) -> usize {
        self.prps.len()
    }

    fn submit(&mut self, io: Io) -> Result<usize, DeviceError> {
        let prp = self
            .prps
            .get(io.buffer)
            .ok_or(Error::InvalidConfig("no such buffer"))?;
        let cid = u16::try_from(io.buffer).map_err(|_| Error::InvalidConfig("no such buffer"))?;
        let opcode = match io.op {
            Op::Read => io_op::READ,
            Op::Write => io_op::WRITE,
        };
        let lba = Lba(io.offset / self.block_bytes);
        let sqe = command::rw(opcode, NSID, lba, self.blocks, prp).with_cid(cid);
        self.queue.place(self.transport, &sqe)?;
        Ok(io.buffer)
    }

    fn kick(&mut self) -> Result<(), DeviceError> {
        self.queue.ring(self.transport)?;
        Ok(())
    }

    fn wait(&mut self, out: &mut Vec<Done>, within: Duration) -> Result<(), DeviceError> {
        self.completions.clear();
        self.queue
            .wait(self.transport, &mut self.completions, within)?;
        let qid = self.queue.qid();
        out.extend(self.completions.iter().map(|c| Done {
            // A completion for another queue's command matches nothing here.
            slot: if c.sqid == qid {
                usize::from(c.cid)
            } else {
                usize::MAX
            },
            status: if c.is_success() {
                Ok(())
            } else {
                Err(status_text(c))
            },
        }));
        Ok(())
    }
}

/// A completion's status in words where the controller's codes are known.
fn status_text(c: &Completion) -> String {
    let (sct, sc) = c.code();
    match c.status() {
        Some(status) => format!("{status} (SCT {sct:#x} SC {sc:#x})"),
        None => format!("SCT {sct:#x} SC {sc:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_gives_lists_only_past_two_pages_and_overlaps_nothing() {
        for (bs, list_pages) in [
            (4096, 0),
            (8192, 0),
            (12288, 1),
            (128 << 10, 1),
            (4 << 20, 3),
        ] {
            let config = BenchConfig {
                bs,
                iodepth: 4,
                queues: 2,
                ..BenchConfig::default()
            };
            let plan = Plan::new(&config).unwrap();
            let mut spans: Vec<(u64, u64)> = vec![
                (plan.admin.sq.0, 32 * 64),
                (plan.admin.cq.0, 32 * 16),
                (plan.identify.0, PAGE),
                (plan.shadow.doorbells.0, PAGE),
                (plan.shadow.event_idx.0, PAGE),
            ];
            for p in &plan.pairs {
                spans.push((p.sq.0, 256 * 64));
                spans.push((p.cq.0, 256 * 16));
            }
            for &(data, list) in plan.buffers.iter().flatten() {
                spans.push((data.0, bs));
                assert_eq!(data.0 % PAGE, 0);
                assert_eq!(list.is_some(), list_pages > 0, "bs {bs}");
                if let Some(l) = list {
                    spans.push((l.0, list_pages * PAGE));
                }
            }
            spans.sort_unstable();
            for w in spans.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "bs {bs}: {w:?} overlap");
            }
            let end = spans.last().map(|&(a, n)| a + n).unwrap();
            assert_eq!(plan.size, end.div_ceil(PAGE) * PAGE);
            assert_eq!(
                plan.pairs.iter().map(|p| p.vector).collect::<Vec<_>>(),
                [Some(1), Some(2)]
            );
        }
    }
}
