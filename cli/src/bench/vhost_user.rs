//! The load on a vhost-user-blk backend: one [`BlkFrontend`] with a queue
//! per worker, guest memory of its own, and each request a chain of header,
//! data buffer and status byte.

use std::path::Path;
use std::time::Duration;

use backend::vhost_user_driver::{
    self, BlkFrontend, BlkRequest, Buffer, Completion, FrontendConfig, Queue, RequestType, Sector,
    Segment, StatusByte,
};

use super::load::{self, Done, Io, LoadQueue, Op};
use super::{BenchConfig, BenchError, DeviceError, Measured, STALL};

/// Guest memory per queue for its rings and scratch space, generously.
const RING_BYTES: u64 = 2 << 20;

/// Connects to the backend at `socket` and runs `config`'s load on it.
pub fn measure(socket: &Path, config: &BenchConfig) -> Result<Measured, BenchError> {
    let setup = |source: vhost_user_driver::Error| BenchError::Setup {
        socket: socket.to_path_buf(),
        source: source.into(),
    };
    let mut fe = connect(socket, config)?;
    let capacity = fe.get_config().map_err(setup)?.capacity_bytes();
    let range = config.range(capacity)?;
    let buffers = buffers(&fe, config).map_err(setup)?;
    let len = u32::try_from(config.bs).map_err(|_| BenchError::BlockSize(config.bs))?;
    let queues: Vec<VhostQueue<'_>> = fe
        .queues_mut()
        .iter_mut()
        .zip(&buffers)
        .map(|(queue, bufs)| VhostQueue {
            queue,
            bufs,
            len,
            completions: Vec::new(),
        })
        .collect();
    Ok(Measured::load(queues, config, range, capacity))
}

/// A session with as many queues, of the size and with the guest memory,
/// as `config` needs; a read-only device is refused for a workload that
/// writes.
fn connect(socket: &Path, config: &BenchConfig) -> Result<BlkFrontend, BenchError> {
    let setup = |source: vhost_user_driver::Error| BenchError::Setup {
        socket: socket.to_path_buf(),
        source: source.into(),
    };
    let mem_size = usize::try_from(config.buffer_bytes() + mem_overhead(config)).map_err(|_| {
        BenchError::TooMuchMemory {
            bytes: config.buffer_bytes(),
        }
    })?;
    let fe = BlkFrontend::connect(
        socket,
        FrontendConfig {
            mem_size,
            num_queues: config.queues,
            queue_size: config.queue_size,
            timeout: STALL,
            ..FrontendConfig::default()
        },
    )
    .map_err(setup)?;
    if config.writes() && fe.negotiated().has(vhost_user_driver::features::BLK_RO) {
        return Err(BenchError::ReadOnly(config.rw));
    }
    Ok(fe)
}

/// Guest memory beyond the data buffers: the rings and some slack.
fn mem_overhead(config: &BenchConfig) -> u64 {
    u64::from(config.queues) * RING_BYTES + (1 << 20)
}

/// `iodepth` data buffers of one block for each queue, in the session's
/// guest memory, holding [`load::buffer_data`].
fn buffers(
    fe: &BlkFrontend,
    config: &BenchConfig,
) -> Result<Vec<Vec<Buffer>>, vhost_user_driver::Error> {
    let buffer_len = usize::try_from(config.bs)
        .map_err(|_| vhost_user_driver::Error::InvalidConfig("block size too large"))?;
    (0..config.queues)
        .map(|q| {
            (0..usize::from(config.iodepth))
                .map(|i| {
                    let b = fe.ram().alloc_aligned(buffer_len, 4096)?;
                    b.write_at(0, &load::buffer_data(config.seed, q, i, buffer_len))?;
                    Ok(b)
                })
                .collect()
        })
        .collect()
}

/// A virtqueue and its buffers; a request's slot is its chain's head.
struct VhostQueue<'a> {
    queue: &'a mut Queue,
    bufs: &'a [Buffer],
    len: u32,
    /// What the last wait took off the used ring.
    completions: Vec<Completion>,
}

impl LoadQueue for VhostQueue<'_> {
    fn index(&self) -> u16 {
        self.queue.index()
    }

    fn slots(&self) -> usize {
        usize::from(self.queue.size())
    }

    fn submit(&mut self, io: Io) -> Result<usize, DeviceError> {
        let kind = match io.op {
            Op::Read => RequestType::In,
            Op::Write => RequestType::Out,
        };
        let buffer = self
            .bufs
            .get(io.buffer)
            .ok_or(vhost_user_driver::Error::InvalidConfig("no such buffer"))?;
        let data = [Segment {
            gpa: buffer.gpa(),
            len: self.len,
        }];
        let id = self.queue.submit(&BlkRequest {
            kind,
            sector: Sector(io.offset / Sector::SIZE),
            data: &data,
        })?;
        Ok(id.index())
    }

    fn kick(&mut self) -> Result<(), DeviceError> {
        self.queue.kick()?;
        Ok(())
    }

    fn wait(&mut self, out: &mut Vec<Done>, within: Duration) -> Result<(), DeviceError> {
        self.completions.clear();
        self.queue.wait(&mut self.completions, within)?;
        out.extend(self.completions.iter().map(|c| {
            let status = c.status().unwrap_or(StatusByte::UNWRITTEN);
            Done {
                // A used entry that names no chain in flight: past every slot.
                slot: c.chain().map_or(usize::MAX, |id| id.index()),
                status: if status.is_ok() {
                    Ok(())
                } else {
                    Err(status.to_string())
                },
            }
        }));
        Ok(())
    }
}
