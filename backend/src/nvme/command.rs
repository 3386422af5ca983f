//! The submission queue entry a host writes and the completion queue entry
//! the controller posts (NVMe 1.4, 4.2 and 4.6), and the opcodes this
//! controller knows.

use super::status::NvmeStatus;

/// Admin command opcodes.
pub mod admin_op {
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    /// NVMe 1.3: the host's shadow doorbell and EventIdx buffers.
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;

    /// The opcode's name in logs and status, if this controller knows it.
    pub fn name(op: u8) -> Option<&'static str> {
        Some(match op {
            DELETE_SQ => "delete-sq",
            CREATE_SQ => "create-sq",
            GET_LOG_PAGE => "get-log-page",
            DELETE_CQ => "delete-cq",
            CREATE_CQ => "create-cq",
            IDENTIFY => "identify",
            ABORT => "abort",
            SET_FEATURES => "set-features",
            GET_FEATURES => "get-features",
            ASYNC_EVENT_REQUEST => "async-event-request",
            DOORBELL_BUFFER_CONFIG => "doorbell-buffer-config",
            _ => return None,
        })
    }
}

/// NVM command set opcodes.
pub mod io_op {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;

    /// The opcode's name in logs and status, if this controller knows it.
    pub fn name(op: u8) -> Option<&'static str> {
        Some(match op {
            FLUSH => "flush",
            WRITE => "write",
            READ => "read",
            WRITE_ZEROES => "write-zeroes",
            DATASET_MANAGEMENT => "dataset-management",
            _ => return None,
        })
    }
}

/// The namespace identifier that names every namespace.
pub const NSID_ALL: u32 = 0xffff_ffff;

/// A 64-byte submission queue entry, as sixteen little-endian dwords.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sqe {
    dw: [u32; 16],
}

impl Sqe {
    pub const SIZE: usize = 64;

    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> Sqe {
        let mut dw = [0u32; 16];
        for (d, chunk) in dw.iter_mut().zip(bytes.chunks_exact(4)) {
            *d = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Sqe { dw }
    }

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        for (chunk, d) in out.chunks_exact_mut(4).zip(self.dw) {
            chunk.copy_from_slice(&d.to_le_bytes());
        }
        out
    }

    /// An entry with `opcode` and `cid` and everything else zero.
    pub fn new(opcode: u8, cid: u16) -> Sqe {
        let mut dw = [0u32; 16];
        dw[0] = u32::from(opcode) | u32::from(cid) << 16;
        Sqe { dw }
    }

    pub fn opcode(&self) -> u8 {
        self.dw[0].to_le_bytes()[0]
    }

    /// Fused operation (bits 9:8 of dword 0); this controller runs none.
    pub fn fuse(&self) -> u32 {
        (self.dw[0] >> 8) & 0x3
    }

    /// PRP or SGL for data transfer (bits 15:14); this controller takes PRPs only.
    pub fn psdt(&self) -> u32 {
        (self.dw[0] >> 14) & 0x3
    }

    pub fn cid(&self) -> u16 {
        high16(self.dw[0])
    }

    pub fn nsid(&self) -> u32 {
        self.dw[1]
    }

    pub fn prp1(&self) -> u64 {
        u64::from(self.dw[6]) | u64::from(self.dw[7]) << 32
    }

    pub fn prp2(&self) -> u64 {
        u64::from(self.dw[8]) | u64::from(self.dw[9]) << 32
    }

    /// Command dword `n`, 10 to 15.
    pub fn cdw(&self, n: usize) -> u32 {
        self.dw[n]
    }

    /// Sets the command identifier: a host driver picks it when it submits.
    pub fn with_cid(mut self, cid: u16) -> Sqe {
        self.dw[0] = (self.dw[0] & 0xffff) | u32::from(cid) << 16;
        self
    }

    pub fn with_nsid(mut self, nsid: u32) -> Sqe {
        self.dw[1] = nsid;
        self
    }

    pub fn with_prps(mut self, prp1: u64, prp2: u64) -> Sqe {
        self.dw[6] = low32(prp1);
        self.dw[7] = low32(prp1 >> 32);
        self.dw[8] = low32(prp2);
        self.dw[9] = low32(prp2 >> 32);
        self
    }

    /// Sets command dword `n` (10 to 15).
    pub fn with_cdw(mut self, n: usize, value: u32) -> Sqe {
        self.dw[n] = value;
        self
    }

    /// Sets dword 0's flags byte (FUSE, PSDT).
    pub fn with_flags(mut self, flags: u8) -> Sqe {
        self.dw[0] = (self.dw[0] & !0xff00) | u32::from(flags) << 8;
        self
    }
}

/// A completion queue entry before it is posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    /// Command specific result.
    pub dw0: u32,
    /// The submission queue's head when the entry was posted.
    pub sq_head: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: NvmeStatus,
}

impl Cqe {
    pub const SIZE: usize = 16;

    /// Dwords 0 to 2, which go to memory before dword 3.
    pub fn head_bytes(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        out[8..10].copy_from_slice(&self.sq_head.to_le_bytes());
        out[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        out
    }

    /// Dword 3: the command identifier, the phase tag, the status field.
    pub fn dw3(&self, phase: bool) -> u32 {
        u32::from(self.cid) | u32::from(phase) << 16 | u32::from(self.status.field()) << 17
    }
}

/// The low 32 bits.
pub fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or_default()
}

/// The low 16 bits.
pub fn low16(v: u32) -> u16 {
    u16::try_from(v & 0xffff).unwrap_or_default()
}

/// The high 16 bits.
pub fn high16(v: u32) -> u16 {
    low16(v >> 16)
}

/// Bits `lo..=hi` of `v`.
pub fn bits(v: u32, lo: u32, hi: u32) -> u32 {
    (v >> lo) & (u32::MAX >> (31 - (hi - lo)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_through_bytes() {
        let sqe = Sqe::new(0x02, 0xbeef)
            .with_nsid(1)
            .with_prps(0x1234_5678_9abc_d000, 0xfedc_ba98_7654_3000)
            .with_cdw(10, 7)
            .with_cdw(12, 0x4000_00ff)
            .with_flags(0x41);
        let back = Sqe::from_bytes(&sqe.to_bytes());
        assert_eq!(back, sqe);
        assert_eq!(back.opcode(), 0x02);
        assert_eq!(back.cid(), 0xbeef);
        assert_eq!(back.nsid(), 1);
        assert_eq!(back.prp1(), 0x1234_5678_9abc_d000);
        assert_eq!(back.prp2(), 0xfedc_ba98_7654_3000);
        assert_eq!(back.cdw(10), 7);
        assert_eq!(back.fuse(), 1);
        assert_eq!(back.psdt(), 1);
        let again = back.with_cid(0x1234);
        assert_eq!(
            (again.cid(), again.opcode(), again.fuse()),
            (0x1234, 0x02, 1)
        );
    }

    #[test]
    fn completion_dword3_layout() {
        let cqe = Cqe {
            dw0: 0,
            sq_head: 0,
            sqid: 0,
            cid: 0x1234,
            status: NvmeStatus::InvalidField,
        };
        assert_eq!(cqe.dw3(true), 0x1234 | 1 << 16 | (0x4002 << 17));
        assert_eq!(cqe.dw3(false) & (1 << 16), 0);
    }

    #[test]
    fn bit_ranges() {
        assert_eq!(bits(0xabcd_1234, 0, 31), 0xabcd_1234);
        assert_eq!(bits(0xabcd_1234, 16, 31), 0xabcd);
        assert_eq!(bits(0xabcd_1234, 4, 7), 0x3);
    }
}
