//! NVM commands (NVMe 1.4, 6): Read, Write, Flush, Write Zeroes and Dataset
//! Management, decoded and checked into [`IoCommand`]s for the handler.
//!
//! Every LBA range goes through [`Controller::check_range`]; every data
//! buffer through the PRP walk. What fails a check completes here, with its
//! status, and never reaches the handler.

use std::sync::atomic::{AtomicU64, Ordering};

use nvme_model::Lba;

use super::command::{bits, io_op, Sqe, NSID_ALL};
use super::controller::{Controller, Disposition, MappedMemory};
use super::handler::{BlockRange, CommandTag, IoCommand, IoOp};
use super::identify::NSID;
use super::prp::{self, PAGE};
use super::status::NvmeStatus;

/// Force Unit Access: bit 30 of dword 12 of Read, Write and Write Zeroes.
const FUA: u32 = 1 << 30;
/// Deallocate: bit 25 of dword 12 of Write Zeroes.
const DEAC: u32 = 1 << 25;
/// Attribute - Deallocate: bit 2 of dword 11 of Dataset Management.
const AD: u32 = 1 << 2;
/// A dataset management range: context attributes, length, starting LBA.
const RANGE_LEN: usize = 16;

/// A command that fails before it reaches the handler: its status, and the
/// advertised limit it went past if that is why.
#[derive(Debug, PartialEq, Eq)]
struct Refused {
    status: NvmeStatus,
    limit: Option<PastLimit>,
}

impl From<NvmeStatus> for Refused {
    fn from(status: NvmeStatus) -> Self {
        Refused {
            status,
            limit: None,
        }
    }
}

/// A limit of Identify CNS 06h a command went past. Each fails with Invalid
/// Field in Command: a field of the command (NLB, NR, a range's length) is
/// past what the controller said it takes; for WZSL it is also the status
/// the NVM Command Set specification names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
enum PastLimit {
    #[error("{blocks} blocks, past WZSL's {limit}")]
    WriteZeroes { blocks: u32, limit: u64 },
    #[error("{ranges} ranges, past DMRL's {limit}")]
    Ranges { ranges: usize, limit: usize },
    #[error("a range of {blocks} blocks, past DMRSL's {limit}")]
    RangeBlocks { blocks: u32, limit: u32 },
}

impl From<PastLimit> for Refused {
    fn from(limit: PastLimit) -> Self {
        Refused {
            status: NvmeStatus::InvalidField,
            limit: Some(limit),
        }
    }
}

impl Controller {
    pub(super) fn io(&self, mem: &MappedMemory, sqe: &Sqe, tag: CommandTag) -> Disposition {
        match self.decode(mem, sqe, tag) {
            Ok(Some(cmd)) => {
                self.count(&cmd);
                Disposition::Io(cmd)
            }
            Ok(None) => NvmeStatus::Success.into(),
            Err(Refused { status, limit }) => {
                let (q, cid, op) = (tag.qid, tag.cid, sqe.opcode());
                let (lba, nlb) = (slba(sqe).0, nlb(sqe));
                match limit {
                    Some(limit) => self.guest_error(format_args!(
                        "q={q} cid={cid} op={op:#04x}: {status}: {limit}"
                    )),
                    None => self.guest_error(format_args!(
                        "q={q} cid={cid} op={op:#04x} lba={lba} nlb={nlb}: {status}"
                    )),
                }
                status.into()
            }
        }
    }

    /// The command for the handler, or `None` for a command with nothing to
    /// do (dataset management without the deallocate attribute, or only
    /// empty ranges).
    fn decode(
        &self,
        mem: &MappedMemory,
        sqe: &Sqe,
        tag: CommandTag,
    ) -> Result<Option<IoCommand>, Refused> {
        if sqe.fuse() != 0 || sqe.psdt() != 0 {
            return Err(NvmeStatus::InvalidField.into());
        }
        let id = &self.identity;
        let mut cmd = IoCommand {
            tag,
            op: IoOp::Flush,
            slba: Lba(0),
            nlb: 0,
            segments: Vec::new(),
            fua: sqe.cdw(12) & FUA != 0,
        };
        match sqe.opcode() {
            op @ (io_op::READ | io_op::WRITE) => {
                namespace(sqe, false)?;
                let write = op == io_op::WRITE;
                if write {
                    self.writable()?;
                }
                let (slba, nlb) = (slba(sqe), nlb(sqe));
                let len = u64::from(nlb) << id.lbs.shift();
                if len > self.max_transfer {
                    return Err(NvmeStatus::InvalidField.into());
                }
                self.check_range(slba, u64::from(nlb))?;
                cmd.segments = prp::segments(mem, sqe.prp1(), sqe.prp2(), len, self.max_transfer)
                    .map_err(prp::PrpError::status)?;
                cmd.op = if write { IoOp::Write } else { IoOp::Read };
                cmd.slba = slba;
                cmd.nlb = nlb;
            }
            io_op::FLUSH => {
                namespace(sqe, true)?;
                cmd.fua = false;
            }
            io_op::WRITE_ZEROES if id.write_zeroes => {
                namespace(sqe, false)?;
                self.writable()?;
                let (slba, nlb) = (slba(sqe), nlb(sqe));
                let limit = id.max_write_zeroes_blocks();
                if u64::from(nlb) > limit {
                    return Err(PastLimit::WriteZeroes { blocks: nlb, limit }.into());
                }
                self.check_range(slba, u64::from(nlb))?;
                cmd.op = IoOp::WriteZeroes {
                    deallocate: sqe.cdw(12) & DEAC != 0,
                };
                cmd.slba = slba;
                cmd.nlb = nlb;
            }
            io_op::DATASET_MANAGEMENT if id.dsm => {
                namespace(sqe, false)?;
                let (ranges, limit) = (range_count(sqe), id.max_dsm_ranges());
                if ranges > limit {
                    return Err(PastLimit::Ranges { ranges, limit }.into());
                }
                if sqe.cdw(11) & AD == 0 {
                    // Only hints (integral dataset for read / write): nothing to do.
                    return Ok(None);
                }
                self.writable()?;
                let ranges = self.ranges(mem, sqe)?;
                let Some(first) = ranges.first() else {
                    return Ok(None);
                };
                cmd.slba = first.start;
                cmd.fua = false;
                cmd.op = IoOp::Deallocate(ranges);
            }
            _ => return Err(NvmeStatus::InvalidOpcode.into()),
        }
        Ok(Some(cmd))
    }

    /// The one bounds check of every LBA range: `blocks` from `start` must
    /// lie inside the namespace.
    pub fn check_range(&self, start: Lba, blocks: u64) -> Result<(), NvmeStatus> {
        match start.0.checked_add(blocks) {
            Some(end) if end <= self.identity.blocks => Ok(()),
            _ => Err(NvmeStatus::LbaOutOfRange),
        }
    }

    fn writable(&self) -> Result<(), NvmeStatus> {
        if self.identity.read_only {
            Err(NvmeStatus::NamespaceWriteProtected)
        } else {
            Ok(())
        }
    }

    /// Reads and checks a dataset management command's ranges (through PRP1
    /// / PRP2); empty ranges are dropped.
    fn ranges(&self, mem: &MappedMemory, sqe: &Sqe) -> Result<Vec<BlockRange>, Refused> {
        let count = range_count(sqe);
        let limit = self.identity.max_dsm_range_blocks();
        let mut buf = vec![0u8; count * RANGE_LEN];
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        let segments =
            prp::segments(mem, sqe.prp1(), sqe.prp2(), len, PAGE).map_err(prp::PrpError::status)?;
        dma::from_guest(mem, &segments, &mut buf).map_err(|_| NvmeStatus::DataTransferError)?;
        let mut ranges = Vec::with_capacity(count);
        for range in buf.chunks_exact(RANGE_LEN) {
            let blocks = u32::from_le_bytes([range[4], range[5], range[6], range[7]]);
            let mut start = [0u8; 8];
            start.copy_from_slice(&range[8..16]);
            let start = Lba(u64::from_le_bytes(start));
            if blocks == 0 {
                continue;
            }
            if blocks > limit {
                return Err(PastLimit::RangeBlocks { blocks, limit }.into());
            }
            self.check_range(start, u64::from(blocks))?;
            ranges.push(BlockRange { start, blocks });
        }
        Ok(ranges)
    }

    /// What the SMART / health log counts.
    fn count(&self, cmd: &IoCommand) {
        let add = |c: &AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
        add(&self.counters.io_commands, 1);
        match cmd.op {
            IoOp::Read => {
                add(&self.counters.read_commands, 1);
                add(&self.counters.blocks_read, u64::from(cmd.nlb));
            }
            IoOp::Write => {
                add(&self.counters.write_commands, 1);
                add(&self.counters.blocks_written, u64::from(cmd.nlb));
            }
            _ => {}
        }
    }
}

/// The namespace a command names must be ours; `all` lets the broadcast
/// identifier through too (Flush).
fn namespace(sqe: &Sqe, all: bool) -> Result<(), NvmeStatus> {
    match sqe.nsid() {
        NSID => Ok(()),
        NSID_ALL if all => Ok(()),
        _ => Err(NvmeStatus::InvalidNamespace),
    }
}

/// Starting LBA: dwords 10 and 11.
fn slba(sqe: &Sqe) -> Lba {
    Lba(u64::from(sqe.cdw(10)) | u64::from(sqe.cdw(11)) << 32)
}

/// Number of ranges of dataset management as a count, 1 to 256: dword 10
/// bits 7:0 hold it zero-based.
fn range_count(sqe: &Sqe) -> usize {
    usize::from(sqe.cdw(10).to_le_bytes()[0]) + 1
}

/// Number of logical blocks as a count: dword 12 bits 15:0 hold it zero-based.
fn nlb(sqe: &Sqe) -> u32 {
    bits(sqe.cdw(12), 0, 15) + 1
}

#[cfg(test)]
mod tests {
    use dma::{Gpa, Segment};
    use nvme_model::LbaSize;

    use super::*;
    use crate::nvme::command::admin_op;
    use crate::nvme::test_utils::*;

    const BLOCKS_512: u64 = (64 << 20) / 512;

    fn rw(op: u8, lba: u64, blocks: u32) -> Sqe {
        Sqe::new(op, 1)
            .with_nsid(NSID)
            .with_prps(DATA, DATA + PAGE)
            .with_cdw(10, lba as u32)
            .with_cdw(11, (lba >> 32) as u32)
            .with_cdw(12, blocks - 1)
    }

    fn dsm(ranges: u32, attributes: u32) -> Sqe {
        Sqe::new(io_op::DATASET_MANAGEMENT, 3)
            .with_nsid(NSID)
            .with_prps(DATA, 0)
            .with_cdw(10, ranges - 1)
            .with_cdw(11, attributes)
    }

    fn range(blocks: u32, lba: u64) -> [u8; 16] {
        let mut r = [0u8; 16];
        r[4..8].copy_from_slice(&blocks.to_le_bytes());
        r[8..16].copy_from_slice(&lba.to_le_bytes());
        r
    }

    /// Runs `sqe` on queue 1: its status, and what reached the handler.
    fn run(host: &mut Host, sqe: Sqe) -> (NvmeStatus, Vec<IoCommand>) {
        let c = host.io(1, sqe);
        let status = c.status().expect("a status the controller knows");
        (status, host.handler.take())
    }

    #[test]
    fn bounds_are_checked_once_with_overflow() {
        let host = Host::new(identity(LbaSize::B512));
        let ctrl = &host.ctrl;
        assert_eq!(ctrl.check_range(Lba(0), BLOCKS_512), Ok(()));
        assert_eq!(ctrl.check_range(Lba(BLOCKS_512), 0), Ok(()));
        assert_eq!(
            ctrl.check_range(Lba(BLOCKS_512 - 1), 2),
            Err(NvmeStatus::LbaOutOfRange)
        );
        assert_eq!(
            ctrl.check_range(Lba(u64::MAX), 1),
            Err(NvmeStatus::LbaOutOfRange)
        );
        assert_eq!(
            ctrl.check_range(Lba(1), u64::MAX),
            Err(NvmeStatus::LbaOutOfRange)
        );
        assert_eq!(
            ctrl.check_range(Lba(u64::MAX), 0),
            Err(NvmeStatus::LbaOutOfRange)
        );
    }

    #[test]
    fn reads_and_writes_reach_the_handler_checked() {
        let mut host = Host::probed(identity(LbaSize::B512), 1, 16);
        let (status, cmds) = run(&mut host, rw(io_op::READ, BLOCKS_512 - 16, 16));
        assert_eq!(status, NvmeStatus::Success);
        assert_eq!(cmds[0].op, IoOp::Read);
        assert_eq!(cmds[0].slba, Lba(BLOCKS_512 - 16));
        assert_eq!(cmds[0].segments, vec![Segment::new(Gpa(DATA), 8192)]);
        assert!(!cmds[0].fua);
        let cases = [
            (
                rw(io_op::READ, BLOCKS_512 - 15, 16),
                NvmeStatus::LbaOutOfRange,
            ),
            (rw(io_op::WRITE, u64::MAX, 1), NvmeStatus::LbaOutOfRange),
            (
                rw(io_op::READ, 0, 1).with_nsid(0),
                NvmeStatus::InvalidNamespace,
            ),
            (
                rw(io_op::READ, 0, 1).with_nsid(2),
                NvmeStatus::InvalidNamespace,
            ),
            (
                rw(io_op::WRITE, 0, 1).with_nsid(NSID_ALL),
                NvmeStatus::InvalidNamespace,
            ),
            (
                rw(io_op::READ, 0, 9).with_prps(DATA, DATA + 8),
                NvmeStatus::PrpOffsetInvalid,
            ),
            (
                rw(io_op::READ, 0, 1).with_prps(DATA + 2, 0),
                NvmeStatus::PrpOffsetInvalid,
            ),
            (
                rw(io_op::READ, 0, 1).with_prps(1 << 40, 0),
                NvmeStatus::DataTransferError,
            ),
            (
                rw(io_op::WRITE, 0, 1).with_flags(1),
                NvmeStatus::InvalidField,
            ),
            (
                rw(io_op::WRITE, 0, 1).with_flags(0x80),
                NvmeStatus::InvalidField,
            ),
            (rw(0x05, 0, 1), NvmeStatus::InvalidOpcode),
            (rw(0x04, 0, 1), NvmeStatus::InvalidOpcode),
            (rw(0x7f, 0, 1), NvmeStatus::InvalidOpcode),
        ];
        for (sqe, want) in cases {
            let (status, cmds) = run(&mut host, sqe);
            assert_eq!(status, want, "{sqe:?}");
            assert!(cmds.is_empty(), "{sqe:?}");
        }
    }

    #[test]
    fn transfers_are_held_to_mdts() {
        let mut id = identity(LbaSize::B512);
        id.geometry.max_transfer = Some(128 << 10);
        let mut host = Host::probed(id, 1, 16);
        // 256 blocks of 512: exactly 128 KiB, through a list of 31 pages.
        let pages: Vec<u64> = (1..32).map(|i| DATA + i * 2 * PAGE).collect();
        host.write_list(DATA + 0x20_0000, &pages);
        let sqe = rw(io_op::WRITE, 0, 256).with_prps(DATA, DATA + 0x20_0000);
        let (status, cmds) = run(&mut host, sqe);
        assert_eq!(status, NvmeStatus::Success);
        assert_eq!(cmds[0].segments.len(), 32);
        assert_eq!(dma::segment::total_len(&cmds[0].segments), 128 << 10);
        let (status, cmds) = run(&mut host, rw(io_op::WRITE, 0, 257));
        assert_eq!((status, cmds.len()), (NvmeStatus::InvalidField, 0));
    }

    #[test]
    fn flush_takes_the_broadcast_namespace() {
        let mut host = Host::probed(identity(LbaSize::B4096), 1, 16);
        let flush = Sqe::new(io_op::FLUSH, 1)
            .with_nsid(NSID_ALL)
            .with_cdw(12, FUA);
        let (status, cmds) = run(&mut host, flush);
        assert_eq!(status, NvmeStatus::Success);
        assert_eq!(
            (cmds[0].op.clone(), cmds[0].nlb, cmds[0].fua),
            (IoOp::Flush, 0, false)
        );
        assert!(cmds[0].segments.is_empty());
        let (status, _) = run(&mut host, flush.with_nsid(2));
        assert_eq!(status, NvmeStatus::InvalidNamespace);
    }

    #[test]
    fn write_zeroes_carries_deac_and_fua() {
        let mut host = Host::probed(identity(LbaSize::B512), 1, 16);
        let wz = Sqe::new(io_op::WRITE_ZEROES, 1)
            .with_nsid(NSID)
            .with_cdw(10, 100)
            .with_cdw(12, 0xffff | DEAC | FUA);
        let (status, cmds) = run(&mut host, wz);
        assert_eq!(status, NvmeStatus::Success);
        let cmd = &cmds[0];
        assert_eq!(cmd.op, IoOp::WriteZeroes { deallocate: true });
        assert_eq!((cmd.slba, cmd.nlb, cmd.fua), (Lba(100), 65536, true));
        // No MDTS for write zeroes; the range still counts.
        let (status, _) = run(&mut host, wz.with_cdw(10, 131_072 - 65535));
        assert_eq!(status, NvmeStatus::LbaOutOfRange);

        let mut id = identity(LbaSize::B512);
        id.write_zeroes = false;
        let mut host = Host::probed(id, 1, 16);
        assert_eq!(run(&mut host, wz).0, NvmeStatus::InvalidOpcode);
    }

    #[test]
    fn dataset_management_reads_its_ranges() {
        let mut id = identity(LbaSize::B512);
        id.geometry.max_discard_segments = 256;
        let mut host = Host::probed(id, 1, 16);
        let mut list = Vec::new();
        list.extend(range(8, 100));
        list.extend(range(0, 5)); // empty: dropped
        list.extend(range(16, BLOCKS_512 - 16));
        host.write_mem(DATA, &list);
        let (status, cmds) = run(&mut host, dsm(3, AD));
        assert_eq!(status, NvmeStatus::Success);
        assert_eq!(cmds[0].slba, Lba(100));
        assert_eq!(
            cmds[0].op,
            IoOp::Deallocate(vec![
                BlockRange {
                    start: Lba(100),
                    blocks: 8
                },
                BlockRange {
                    start: Lba(BLOCKS_512 - 16),
                    blocks: 16
                },
            ])
        );
        // Hints only: nothing to do.
        assert_eq!(run(&mut host, dsm(3, 0b11)), (NvmeStatus::Success, vec![]));
        // Only empty ranges: nothing to do.
        host.write_mem(DATA, &range(0, 1));
        assert_eq!(run(&mut host, dsm(1, AD)), (NvmeStatus::Success, vec![]));
        // One range past the end fails the whole command.
        host.write_mem(DATA + 16, &range(17, BLOCKS_512 - 16));
        assert_eq!(run(&mut host, dsm(2, AD)).0, NvmeStatus::LbaOutOfRange);
        host.write_mem(DATA + 16, &range(1, u64::MAX));
        assert_eq!(run(&mut host, dsm(2, AD)).0, NvmeStatus::LbaOutOfRange);
        // The list's PRPs are checked like any data.
        assert_eq!(
            run(&mut host, dsm(2, AD).with_prps(1 << 40, 0)).0,
            NvmeStatus::DataTransferError
        );
        // 256 ranges across two pages (PRP1 at an offset, then PRP2).
        let all: Vec<u8> = (0..256u64).flat_map(|i| range(1, i * 2)).collect();
        host.write_mem(DATA + 0x800, &all[..0x800]);
        host.write_mem(DATA + 0x3000, &all[0x800..]);
        let (status, cmds) = run(
            &mut host,
            dsm(256, AD).with_prps(DATA + 0x800, DATA + 0x3000),
        );
        assert_eq!(status, NvmeStatus::Success);
        let IoOp::Deallocate(ranges) = &cmds[0].op else {
            panic!("{:?}", cmds[0].op)
        };
        assert_eq!(ranges.len(), 256);
        assert_eq!(
            ranges[255],
            BlockRange {
                start: Lba(510),
                blocks: 1
            }
        );

        let mut id = identity(LbaSize::B512);
        id.dsm = false;
        let mut host = Host::probed(id, 1, 16);
        assert_eq!(run(&mut host, dsm(1, AD)).0, NvmeStatus::InvalidOpcode);
    }

    /// WZSL, DMRL and DMRSL as the host reads them: Identify CNS 06h.
    fn nvm_limits(host: &mut Host) -> (u8, u8, u32) {
        let c = host.admin(
            Sqe::new(admin_op::IDENTIFY, 0)
                .with_prps(ADMIN_BUF, 0)
                .with_cdw(10, 6),
        );
        assert_eq!(c.status(), Some(NvmeStatus::Success));
        let d = host.read_mem(ADMIN_BUF, 8);
        (d[1], d[3], u32::from_le_bytes([d[4], d[5], d[6], d[7]]))
    }

    /// Each limit of Identify CNS 06h holds at the limit and fails one past
    /// it, with limits that are not powers of two (WZSL rounds down).
    #[test]
    fn the_advertised_limits_are_enforced_at_the_limit_and_one_past() {
        for lbs in [LbaSize::B512, LbaSize::B4096] {
            let mut id = identity(lbs);
            id.geometry.max_write_zeroes = 24 << 10;
            id.geometry.max_discard_segments = 5;
            id.geometry.max_discard = 12 << 10;
            let mut host = Host::probed(id, 1, 16);
            let (wzsl, dmrl, dmrsl) = nvm_limits(&mut host);
            let block = lbs.bytes();
            assert_eq!((wzsl, dmrl), (2, 5), "24 KiB: 2^2 pages");
            assert_eq!(u64::from(dmrsl), (12 << 10) / block);

            // WZSL: 2^n pages of 4 KiB (CAP.MPSMIN).
            let most = u32::try_from((PAGE << wzsl) / block).unwrap();
            let wz = |blocks: u32| {
                Sqe::new(io_op::WRITE_ZEROES, 1)
                    .with_nsid(NSID)
                    .with_cdw(12, blocks - 1)
            };
            let (status, cmds) = run(&mut host, wz(most));
            assert_eq!(
                (status, cmds[0].nlb),
                (NvmeStatus::Success, most),
                "{lbs:?}"
            );
            assert_eq!(
                run(&mut host, wz(most + 1)),
                (NvmeStatus::InvalidField, vec![]),
                "{lbs:?}"
            );

            // DMRL: ranges per command, with or without the deallocate attribute.
            let list: Vec<u8> = (0..6).flat_map(|i| range(1, i)).collect();
            host.write_mem(DATA, &list);
            let dmrl = u32::from(dmrl);
            let (status, cmds) = run(&mut host, dsm(dmrl, AD));
            assert_eq!(status, NvmeStatus::Success, "{lbs:?}");
            assert!(matches!(&cmds[0].op, IoOp::Deallocate(r) if r.len() == 5));
            for attributes in [AD, 0b11] {
                assert_eq!(
                    run(&mut host, dsm(dmrl + 1, attributes)),
                    (NvmeStatus::InvalidField, vec![]),
                    "{lbs:?}"
                );
            }

            // DMRSL: blocks per range, the last of several ranges too.
            host.write_mem(DATA + 16, &range(dmrsl, 100));
            let (status, cmds) = run(&mut host, dsm(2, AD));
            assert_eq!(status, NvmeStatus::Success, "{lbs:?}");
            assert!(matches!(&cmds[0].op, IoOp::Deallocate(r) if r[1].blocks == dmrsl));
            host.write_mem(DATA + 16, &range(dmrsl + 1, 100));
            assert_eq!(
                run(&mut host, dsm(2, AD)),
                (NvmeStatus::InvalidField, vec![]),
                "{lbs:?}"
            );
        }
    }

    #[test]
    fn a_write_protected_namespace_refuses_changes() {
        let mut id = identity(LbaSize::B4096);
        id.read_only = true;
        let mut host = Host::probed(id, 1, 16);
        assert_eq!(run(&mut host, rw(io_op::READ, 0, 1)).0, NvmeStatus::Success);
        let wz = Sqe::new(io_op::WRITE_ZEROES, 1).with_nsid(NSID);
        host.write_mem(DATA, &range(1, 0));
        for sqe in [rw(io_op::WRITE, 0, 1), wz, dsm(1, AD)] {
            let (status, cmds) = run(&mut host, sqe);
            assert_eq!(
                (status, cmds.len()),
                (NvmeStatus::NamespaceWriteProtected, 0)
            );
        }
        // Flush is harmless.
        let flush = Sqe::new(io_op::FLUSH, 1).with_nsid(NSID);
        assert_eq!(run(&mut host, flush).0, NvmeStatus::Success);
    }
}
