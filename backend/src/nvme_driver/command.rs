//! The commands a host sends and the completions it reads back.
//!
//! Commands are the controller's own [`Sqe`], whose builders set any field
//! to any value: the functions here build the commands a Linux host sends
//! (Identify, Features, queue creation, the NVM commands), and a test that
//! wants a malformed one starts from them, or from [`Sqe::new`], and sets
//! what it likes. The command identifier is the driver's to pick when it
//! submits ([`Driver::issue`](super::Driver::issue)) unless the caller
//! places the entry itself.

use dma::Gpa;
use nvme_model::Lba;

use super::prp::Prp;
use crate::nvme::command::{high16, low16, low32};
use crate::nvme::shadow::ShadowBuffers;
use crate::nvme::NvmeStatus;

pub use crate::nvme::admin::fid;
pub use crate::nvme::command::{admin_op, io_op, Sqe, NSID_ALL};

/// CC as Linux writes it: I/O submission entries of 64 bytes (IOSQES 6),
/// completion entries of 16 (IOCQES 4), 4 KiB pages, the NVM command set,
/// round robin. EN is the driver's to set.
pub const CC_LINUX: u32 = 6 << 16 | 4 << 20;
/// Force Unit Access: dword 12 bit 30 of a read or write.
pub const FUA: u32 = 1 << 30;
/// Attribute - Deallocate: dword 11 bit 2 of dataset management.
pub const AD: u32 = 1 << 2;

/// Identify with CNS `cns` for namespace `nsid`, its 4 KiB of data to
/// `data` (PRP1 only: a page-aligned buffer holds it whole).
pub fn identify(cns: u32, nsid: u32, data: Gpa) -> Sqe {
    Sqe::new(admin_op::IDENTIFY, 0)
        .with_nsid(nsid)
        .with_prps(data.0, 0)
        .with_cdw(10, cns)
}

/// Get Features of feature `fid` (dword 10: the select field too).
pub fn get_features(fid: u32) -> Sqe {
    Sqe::new(admin_op::GET_FEATURES, 0).with_cdw(10, fid)
}

/// Set Features of feature `fid` to `value` (dword 11).
pub fn set_features(fid: u32, value: u32) -> Sqe {
    Sqe::new(admin_op::SET_FEATURES, 0)
        .with_cdw(10, fid)
        .with_cdw(11, value)
}

/// Doorbell Buffer Config: the Shadow Doorbell buffer in PRP1, the
/// EventIdx buffer in PRP2, a page each.
pub fn doorbell_buffer_config(buffers: ShadowBuffers) -> Sqe {
    Sqe::new(admin_op::DOORBELL_BUFFER_CONFIG, 0)
        .with_prps(buffers.doorbells.0, buffers.event_idx.0)
}

/// Set Features, Number of Queues: `sqs` submission and `cqs` completion
/// queues asked for (counted from 1; the field is zero-based).
pub fn number_of_queues(sqs: u16, cqs: u16) -> Sqe {
    let field = |n: u16| u32::from(n.wrapping_sub(1));
    set_features(fid::NUMBER_OF_QUEUES, field(sqs) | field(cqs) << 16)
}

/// Create I/O Completion Queue `qid` of `entries` at `base`, physically
/// contiguous, interrupting on `vector` or polled with None.
pub fn create_cq(qid: u16, entries: u16, base: Gpa, vector: Option<u16>) -> Sqe {
    let flags = match vector {
        Some(v) => u32::from(v) << 16 | 0b11,
        None => 0b01,
    };
    Sqe::new(admin_op::CREATE_CQ, 0)
        .with_prps(base.0, 0)
        .with_cdw(10, queue_size(qid, entries))
        .with_cdw(11, flags)
}

/// Create I/O Submission Queue `qid` of `entries` at `base`, physically
/// contiguous, completing to `cqid`.
pub fn create_sq(qid: u16, entries: u16, base: Gpa, cqid: u16) -> Sqe {
    Sqe::new(admin_op::CREATE_SQ, 0)
        .with_prps(base.0, 0)
        .with_cdw(10, queue_size(qid, entries))
        .with_cdw(11, u32::from(cqid) << 16 | 0b1)
}

/// Dword 10 of queue creation: the zero-based size, the identifier.
fn queue_size(qid: u16, entries: u16) -> u32 {
    u32::from(entries.wrapping_sub(1)) << 16 | u32::from(qid)
}

/// A read or write (`opcode`) of `blocks` from `lba` of namespace `nsid`,
/// the data where `prp` says. The block count goes in as the zero-based NLB:
/// 0, or more than 65536, spills into the flags of dword 12, as a malformed
/// command may want.
pub fn rw(opcode: u8, nsid: u32, lba: Lba, blocks: u32, prp: &Prp) -> Sqe {
    Sqe::new(opcode, 0)
        .with_nsid(nsid)
        .with_prps(prp.prp1, prp.prp2)
        .with_cdw(10, low32(lba.0))
        .with_cdw(11, low32(lba.0 >> 32))
        .with_cdw(12, blocks.wrapping_sub(1))
}

/// Flush of namespace `nsid` ([`NSID_ALL`]: every one).
pub fn flush(nsid: u32) -> Sqe {
    Sqe::new(io_op::FLUSH, 0).with_nsid(nsid)
}

/// Write Zeroes of `blocks` from `lba` (zero-based NLB, as [`rw`]).
pub fn write_zeroes(nsid: u32, lba: Lba, blocks: u32) -> Sqe {
    Sqe::new(io_op::WRITE_ZEROES, 0)
        .with_nsid(nsid)
        .with_cdw(10, low32(lba.0))
        .with_cdw(11, low32(lba.0 >> 32))
        .with_cdw(12, blocks.wrapping_sub(1))
}

/// Dataset Management of `ranges` ranges (counted from 1) listed at `list`,
/// with `attributes` in dword 11 ([`AD`] to deallocate).
pub fn dataset_management(nsid: u32, ranges: u32, list: Gpa, attributes: u32) -> Sqe {
    Sqe::new(io_op::DATASET_MANAGEMENT, 0)
        .with_nsid(nsid)
        .with_prps(list.0, 0)
        .with_cdw(10, ranges.wrapping_sub(1))
        .with_cdw(11, attributes)
}

/// One 16-byte dataset management range: no context attributes, `blocks`
/// from `lba`.
pub fn dsm_range(lba: Lba, blocks: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[4..8].copy_from_slice(&blocks.to_le_bytes());
    r[8..16].copy_from_slice(&lba.0.to_le_bytes());
    r
}

/// A completion queue entry as the host reads it (NVMe 1.4, 4.6): any bits
/// a controller may post, decoded only when asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command specific result.
    pub dw0: u32,
    pub sq_head: u16,
    pub sqid: u16,
    pub cid: u16,
    pub phase: bool,
    /// The 15-bit status field: SC in 7:0, SCT in 10:8, CRD, M, DNR in 14.
    pub field: u16,
}

/// Do Not Retry in the status field.
const DNR: u16 = 1 << 14;

impl Completion {
    pub const SIZE: usize = 16;

    pub fn parse(b: &[u8; Self::SIZE]) -> Completion {
        let dw = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (dw2, dw3) = (dw(8), dw(12));
        Completion {
            dw0: dw(0),
            sq_head: low16(dw2),
            sqid: high16(dw2),
            cid: low16(dw3),
            phase: dw3 >> 16 & 1 == 1,
            field: high16(dw3) >> 1,
        }
    }

    /// The status, if it is one this crate's controller knows.
    pub fn status(&self) -> Option<NvmeStatus> {
        NvmeStatus::from_field(self.field)
    }

    /// The status code type and status code.
    pub fn code(&self) -> (u8, u8) {
        let [sc, sct] = self.field.to_le_bytes();
        (sct & 0x7, sc)
    }

    pub fn is_success(&self) -> bool {
        self.code() == (0, 0)
    }

    /// Do Not Retry: the same command would fail the same way again.
    pub fn dnr(&self) -> bool {
        self.field & DNR != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::command::Cqe;

    #[test]
    fn a_posted_completion_reads_back() {
        let posted = Cqe {
            dw0: 0xdead_beef,
            sq_head: 7,
            sqid: 3,
            cid: 0xabcd,
            status: NvmeStatus::UnrecoveredReadError,
        };
        let mut b = [0u8; 16];
        b[..12].copy_from_slice(&posted.head_bytes());
        b[12..].copy_from_slice(&posted.dw3(true).to_le_bytes());
        let c = Completion::parse(&b);
        assert_eq!(
            (c.dw0, c.sq_head, c.sqid, c.cid, c.phase),
            (0xdead_beef, 7, 3, 0xabcd, true)
        );
        assert_eq!(c.status(), Some(NvmeStatus::UnrecoveredReadError));
        assert_eq!(c.code(), (2, 0x81));
        assert!(c.dnr() && !c.is_success());
    }

    #[test]
    fn queue_creation_fields() {
        let cq = create_cq(3, 64, Gpa(0x5000), Some(2));
        assert_eq!(
            (cq.cdw(10), cq.cdw(11), cq.prp1()),
            (63 << 16 | 3, 2 << 16 | 3, 0x5000)
        );
        assert_eq!(create_cq(3, 64, Gpa(0x5000), None).cdw(11), 1);
        let sq = create_sq(3, 64, Gpa(0x6000), 1);
        assert_eq!((sq.cdw(10), sq.cdw(11)), (63 << 16 | 3, 1 << 16 | 1));
        assert_eq!(number_of_queues(4, 2).cdw(11), 1 << 16 | 3);
    }
}
