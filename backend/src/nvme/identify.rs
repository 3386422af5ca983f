//! What the controller says about itself and its namespace: [`Identity`], and
//! the identify data structures and log pages built from it (NVMe 1.4,
//! 5.15 and 5.14.1).

use nvme_model::geometry::PAGE;
use nvme_model::{Deallocate, Geometry, LbaSize, Namespace};

use super::prp;

/// The namespace's identifier: the controller has one namespace.
pub const NSID: u32 = 1;
/// The size of every identify data structure.
pub const IDENTIFY_LEN: usize = 4096;
/// NVMe 1.4.0.
pub const VERSION: u32 = 0x0001_0400;
/// Model number.
pub const MODEL: &str = "dmaprobe";
/// The most I/O queues the doorbells of [`BAR0_SIZE`](super::controller::BAR0_SIZE) can address.
pub const MAX_IO_QUEUES: u16 = 1535;
/// The most entries of an I/O queue (CAP.MQES + 1).
pub const MAX_QUEUE_ENTRIES: u16 = 4096;
/// Composite temperature reported, in kelvins (40 °C).
pub const TEMPERATURE: u16 = 313;
/// Warning and critical composite temperature thresholds, in kelvins.
pub const WARNING_TEMPERATURE: u16 = 343;
pub const CRITICAL_TEMPERATURE: u16 = 358;
/// Abort and asynchronous event request limits, zero-based as reported.
pub const ABORT_LIMIT: u8 = 3;
pub const ASYNC_EVENT_LIMIT: u8 = 3;

/// Everything the controller reports about itself and its one namespace.
/// Built from the namespace the handler serves ([`Identity::for_namespace`]);
/// the fields are public so a transport or test can adjust them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Serial number, at most 20 ASCII bytes (longer is cut). NGUID and EUI64
    /// are derived from it: two controllers in one guest need different ones.
    pub serial: String,
    /// PCI vendor ID, reported as VID and SSVID: the transport's config space
    /// should show the same.
    pub vendor_id: u16,
    pub lbs: LbaSize,
    /// Capacity in logical blocks.
    pub blocks: u64,
    /// The namespace is write protected (NSATTR).
    pub read_only: bool,
    /// Transfer and deallocation limits.
    pub geometry: Geometry,
    /// `None`: no volatile write cache; `Some(enabled)`: one, on or off at
    /// reset.
    pub write_cache: Option<bool>,
    /// What deallocated blocks read back as (DLFEAT).
    pub deallocate: Deallocate,
    /// Dataset management (deallocate) is supported (ONCS bit 2).
    pub dsm: bool,
    /// Write zeroes is supported (ONCS bit 3).
    pub write_zeroes: bool,
    /// The most I/O submission and completion queues (each), at most
    /// [`MAX_IO_QUEUES`].
    pub io_queues: u16,
    /// The most entries of an I/O queue, 2 to [`MAX_QUEUE_ENTRIES`].
    pub queue_entries: u16,
    /// The MSI-X vectors the transport offers (its table size): a completion
    /// queue's vector must be below it. Linux gives I/O queue n vector n, so
    /// `io_queues` below `vectors` lets every queue interrupt.
    pub vectors: u16,
    /// Doorbell Buffer Config is offered (OACS bit 8): the host may shadow
    /// its I/O queues' doorbells. Only with at most
    /// [`MAX_SHADOWED_QID`](super::shadow::MAX_SHADOWED_QID) I/O queues,
    /// whose slots fit a page.
    pub doorbell_buffer: bool,
}

impl Identity {
    /// The identity of a controller serving `ns`. `deallocate` is how the
    /// namespace was built (it does not say).
    pub fn for_namespace(ns: &Namespace, serial: &str, deallocate: Deallocate) -> Identity {
        Identity {
            serial: serial.to_owned(),
            vendor_id: 0,
            lbs: ns.lba_size(),
            blocks: ns.blocks(),
            read_only: ns.read_only(),
            geometry: *ns.geometry(),
            write_cache: ns.cache_status().map(|_| ns.write_cache_enabled()),
            deallocate,
            dsm: true,
            write_zeroes: true,
            io_queues: 63,
            queue_entries: 1024,
            vectors: 64,
            doorbell_buffer: true,
        }
    }

    /// The same identity with every count in its range.
    pub(super) fn clamped(mut self) -> Identity {
        self.io_queues = self.io_queues.min(MAX_IO_QUEUES);
        self.queue_entries = self.queue_entries.clamp(2, MAX_QUEUE_ENTRIES);
        self.vectors = self.vectors.max(1);
        self.doorbell_buffer &= self.io_queues <= super::shadow::MAX_SHADOWED_QID;
        self
    }

    /// MDTS: the largest transfer as a power of two of 4 KiB pages; 0 for no
    /// limit.
    pub fn mdts(&self) -> u8 {
        match self.geometry.max_transfer {
            Some(max) => log2_floor((max / PAGE).max(1)).max(1),
            None => 0,
        }
    }

    /// The most bytes one command may move: what MDTS says, or with no MDTS
    /// what the largest read names (and never more than the PRP walker takes).
    pub fn max_transfer(&self) -> u64 {
        let limit = match self.mdts() {
            0 => (1u64 << 16) << self.lbs.shift(),
            mdts => PAGE << mdts,
        };
        limit.min(prp::MAX_TRANSFER)
    }

    /// The Identify Controller data structure (CNS 01h).
    pub fn controller(&self) -> Vec<u8> {
        let mut d = vec![0u8; IDENTIFY_LEN];
        put(&mut d, 0, &self.vendor_id.to_le_bytes()); // VID
        put(&mut d, 2, &self.vendor_id.to_le_bytes()); // SSVID
        put_str(&mut d, 4, 20, &self.serial); // SN
        put_str(&mut d, 24, 40, MODEL); // MN
        put_str(&mut d, 64, 8, firmware()); // FR
        d[72] = 6; // RAB: 64 commands
        d[77] = self.mdts();
        put(&mut d, 78, &1u16.to_le_bytes()); // CNTLID
        put(&mut d, 80, &VERSION.to_le_bytes()); // VER
        d[111] = 1; // CNTRLTYPE: I/O controller
        let oacs = u16::from(self.doorbell_buffer) << 8;
        put(&mut d, 256, &oacs.to_le_bytes()); // OACS
        d[258] = ABORT_LIMIT; // ACL
        d[259] = ASYNC_EVENT_LIMIT; // AERL
        d[260] = 0x03; // FRMW: one slot, slot 1 read-only
        d[261] = 0x04; // LPA: extended data for Get Log Page
        d[262] = 0; // ELPE: one error log entry
        d[263] = 0; // NPSS: power state 0 only
        put(&mut d, 266, &WARNING_TEMPERATURE.to_le_bytes()); // WCTEMP
        put(&mut d, 268, &CRITICAL_TEMPERATURE.to_le_bytes()); // CCTEMP
        let capacity = u128::from(self.blocks) << self.lbs.shift();
        put(&mut d, 280, &capacity.to_le_bytes()); // TNVMCAP
        d[512] = 0x66; // SQES: 64 bytes
        d[513] = 0x44; // CQES: 16 bytes
        put(&mut d, 516, &NSID.to_le_bytes()); // NN
        let oncs = u16::from(self.dsm) << 2 | u16::from(self.write_zeroes) << 3;
        put(&mut d, 520, &oncs.to_le_bytes()); // ONCS
                                               // VWC: present, and Flush takes NSID FFFFFFFFh (bits 2:1 = 11b).
        d[525] = if self.write_cache.is_some() { 0x07 } else { 0 };
        put_str(&mut d, 768, 256, &self.subnqn()); // SUBNQN
                                                   // Power state 0: 25 W, operational, no entry or exit latency.
        put(&mut d, 2048, &2500u16.to_le_bytes());
        d
    }

    /// The I/O command set specific Identify Controller data structure for
    /// the NVM command set (CNS 06h, CSI 00h): the deallocate and write
    /// zeroes limits from the geometry. Linux asks for it from NVMe 1.2 on.
    /// What it says is what the NVM commands are held to: the fields come
    /// from [`Identity::wzsl`], [`Identity::dmrl`] and [`Identity::dmrsl`],
    /// the enforced limits from the same.
    pub fn nvm_controller(&self) -> Vec<u8> {
        let mut d = vec![0u8; IDENTIFY_LEN];
        if self.write_zeroes {
            d[1] = self.wzsl();
        }
        if self.dsm {
            d[3] = self.dmrl();
            put(&mut d, 4, &self.dmrsl().to_le_bytes());
        }
        d
    }

    /// WZSL: the largest Write Zeroes as 2^n pages of 4 KiB (CAP.MPSMIN),
    /// the geometry's limit rounded down; n is at least 1, as 0 would say
    /// there is no limit.
    pub fn wzsl(&self) -> u8 {
        log2_floor((self.geometry.max_write_zeroes / PAGE).max(2))
    }

    /// The most blocks one Write Zeroes may name: what WZSL says, which is
    /// less than the geometry's limit when that is not a power of two.
    pub fn max_write_zeroes_blocks(&self) -> u64 {
        (PAGE << self.wzsl()) >> self.lbs.shift()
    }

    /// DMRL: the most ranges of one Dataset Management command; 0 when that
    /// is 256, the most a command can carry.
    pub fn dmrl(&self) -> u8 {
        u8::try_from(self.geometry.max_discard_segments).unwrap_or(0)
    }

    /// The most ranges of one Dataset Management command: what DMRL says.
    pub fn max_dsm_ranges(&self) -> usize {
        match self.dmrl() {
            0 => 256,
            n => usize::from(n),
        }
    }

    /// DMRSL: the most blocks of one Dataset Management range; 0 (no limit)
    /// only if the geometry's limit does not fit.
    pub fn dmrsl(&self) -> u32 {
        u32::try_from(self.geometry.max_discard >> self.lbs.shift()).unwrap_or(0)
    }

    /// The most blocks of one Dataset Management range: what DMRSL says.
    pub fn max_dsm_range_blocks(&self) -> u32 {
        match self.dmrsl() {
            0 => u32::MAX,
            n => n,
        }
    }

    /// The Identify Namespace data structure (CNS 00h).
    pub fn namespace(&self) -> Vec<u8> {
        let mut d = vec![0u8; IDENTIFY_LEN];
        let blocks = self.blocks.to_le_bytes();
        put(&mut d, 0, &blocks); // NSZE
        put(&mut d, 8, &blocks); // NCAP
        put(&mut d, 16, &blocks); // NUSE
        let g = &self.geometry;
        let in_blocks = |bytes: u64| {
            u16::try_from((bytes >> self.lbs.shift()).saturating_sub(1)).unwrap_or(u16::MAX)
        };
        let optimal = g.optimal_transfer.is_some() || g.discard_granularity > self.lbs.bytes();
        d[24] = u8::from(optimal) << 4; // NSFEAT: OPTPERF
        d[25] = 0; // NLBAF: one format
        d[26] = 0; // FLBAS: format 0
        d[33] = self.dlfeat();
        let capacity = u128::from(self.blocks) << self.lbs.shift();
        put(&mut d, 48, &capacity.to_le_bytes()); // NVMCAP
        if optimal {
            // NPWG, NPWA: one block; NPDG, NPDA: the deallocation unit.
            let unit = in_blocks(g.discard_granularity).to_le_bytes();
            put(&mut d, 68, &unit);
            put(&mut d, 70, &unit);
            let nows = g.optimal_transfer.map_or(0, in_blocks);
            put(&mut d, 72, &nows.to_le_bytes());
        }
        d[99] = u8::from(self.read_only); // NSATTR: write protected
        put(&mut d, 104, &self.nguid()); // NGUID
        put(&mut d, 120, &self.eui64()); // EUI64
                                         // LBAF0: no metadata, LBADS, best relative performance.
        let lbads = u8::try_from(self.lbs.shift()).unwrap_or(9);
        put(&mut d, 128, &[0, 0, lbads, 0]);
        d
    }

    /// DLFEAT: deallocated blocks read as zeros (001b) or not reported, and
    /// write zeroes takes DEAC (bit 3).
    fn dlfeat(&self) -> u8 {
        let zeroes = match self.deallocate {
            Deallocate::Zeroes => 0x01,
            Deallocate::Keep => 0,
        };
        zeroes | u8::from(self.write_zeroes) << 3
    }

    /// The Namespace Identification Descriptor list (CNS 03h): EUI64 and NGUID.
    pub fn descriptors(&self) -> Vec<u8> {
        let mut d = vec![0u8; IDENTIFY_LEN];
        put(&mut d, 0, &[1, 8, 0, 0]);
        put(&mut d, 4, &self.eui64());
        put(&mut d, 12, &[2, 16, 0, 0]);
        put(&mut d, 16, &self.nguid());
        d
    }

    /// The Active Namespace ID list (CNS 02h): namespaces above `after`.
    pub fn active_namespaces(&self, after: u32) -> Vec<u8> {
        let mut d = vec![0u8; IDENTIFY_LEN];
        if after < NSID {
            put(&mut d, 0, &NSID.to_le_bytes());
        }
        d
    }

    /// The NVM subsystem NQN.
    pub fn subnqn(&self) -> String {
        format!("nqn.2025-01.dev.dmaprobe:nvme:{}", printable(&self.serial))
    }

    /// An IEEE extended unique identifier derived from the serial.
    pub fn eui64(&self) -> [u8; 8] {
        nonzero(fnv1a(0xcbf2_9ce4_8422_2325, &self.serial)).to_be_bytes()
    }

    /// A namespace globally unique identifier derived from the serial.
    pub fn nguid(&self) -> [u8; 16] {
        let hi = nonzero(fnv1a(0x6c62_272e_07bb_0142, &self.serial));
        let lo = fnv1a(0x8422_2325_cbf2_9ce4, &self.serial);
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&hi.to_be_bytes());
        out[8..].copy_from_slice(&lo.to_be_bytes());
        out
    }

    /// The firmware slot information log page (LID 03h).
    pub fn firmware_log(&self) -> Vec<u8> {
        let mut d = vec![0u8; 512];
        d[0] = 1; // AFI: slot 1 active
        put_str(&mut d, 8, 8, firmware()); // FRS1
        d
    }
}

/// What the SMART / health log reports beyond constants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub blocks_read: u64,
    pub blocks_written: u64,
    pub read_commands: u64,
    pub write_commands: u64,
    pub power_on_hours: u64,
}

/// The SMART / Health Information log page (LID 02h).
pub fn smart_log(health: Health, lbs: LbaSize) -> Vec<u8> {
    let mut d = vec![0u8; 512];
    d[0] = 0; // critical warning: none
    put(&mut d, 1, &TEMPERATURE.to_le_bytes());
    d[3] = 100; // available spare, %
    d[4] = 10; // available spare threshold, %
    d[5] = 0; // percentage used
              // Data units are thousands of 512-byte units, rounded up.
    let units = |blocks: u64| u128::from(blocks << lbs.shift()).div_ceil(512 * 1000);
    put(&mut d, 32, &units(health.blocks_read).to_le_bytes());
    put(&mut d, 48, &units(health.blocks_written).to_le_bytes());
    put(&mut d, 64, &u128::from(health.read_commands).to_le_bytes());
    put(&mut d, 80, &u128::from(health.write_commands).to_le_bytes());
    put(&mut d, 112, &1u128.to_le_bytes()); // power cycles
    put(
        &mut d,
        128,
        &u128::from(health.power_on_hours).to_le_bytes(),
    );
    d
}

/// The Error Information log page (LID 01h): one entry, never used.
pub fn error_log() -> Vec<u8> {
    vec![0u8; 64]
}

fn firmware() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn put(d: &mut [u8], at: usize, bytes: &[u8]) {
    d[at..at + bytes.len()].copy_from_slice(bytes);
}

/// An ASCII field of `len` bytes, space-padded; other characters become '?'.
fn put_str(d: &mut [u8], at: usize, len: usize, s: &str) {
    let field = &mut d[at..at + len];
    field.fill(b' ');
    for (out, c) in field.iter_mut().zip(printable(s).bytes()) {
        *out = c;
    }
}

fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

fn log2_floor(n: u64) -> u8 {
    u8::try_from(63 - n.max(1).leading_zeros()).unwrap_or(0)
}

fn fnv1a(seed: u64, s: &str) -> u64 {
    s.bytes().fold(seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn nonzero(v: u64) -> u64 {
    v.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::test_utils::identity;

    fn u16_at(d: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([d[at], d[at + 1]])
    }

    fn u32_at(d: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(d[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn mdts_is_a_power_of_two_of_pages_rounded_down() {
        let mut id = identity(LbaSize::B512);
        assert_eq!(id.mdts(), 0);
        assert_eq!(id.max_transfer(), 32 << 20);
        id.geometry.max_transfer = Some(128 << 10);
        assert_eq!((id.mdts(), id.max_transfer()), (5, 128 << 10));
        id.geometry.max_transfer = Some(192 << 10);
        assert_eq!((id.mdts(), id.max_transfer()), (5, 128 << 10));
        id.geometry.max_transfer = Some(4096);
        assert_eq!((id.mdts(), id.max_transfer()), (1, 8192));
        id.lbs = LbaSize::B4096;
        id.geometry.max_transfer = None;
        assert_eq!(id.max_transfer(), prp::MAX_TRANSFER);
    }

    #[test]
    fn identify_controller_fields() {
        let id = identity(LbaSize::B4096);
        let d = id.controller();
        assert_eq!(&d[4..24], b"dmaprobe-test       ");
        assert_eq!(&d[24..32], b"dmaprobe");
        assert!(d[32..64].iter().all(|&c| c == b' '));
        assert_eq!(u32_at(&d, 80), 0x10400);
        assert_eq!((d[512], d[513]), (0x66, 0x44));
        assert_eq!(u32_at(&d, 516), 1, "NN");
        assert_eq!(u16_at(&d, 520), 0x0c, "ONCS: DSM and write zeroes");
        assert_eq!(d[525], 0x07, "VWC");
        assert!(String::from_utf8_lossy(&d[768..1024]).starts_with("nqn.2025-01.dev.dmaprobe:"));
        let no_cache = Identity {
            write_cache: None,
            dsm: false,
            ..id
        };
        let d = no_cache.controller();
        assert_eq!(d[525], 0);
        assert_eq!(u16_at(&d, 520), 0x08);
    }

    #[test]
    fn identify_namespace_fields() {
        let mut id = identity(LbaSize::B4096);
        let d = id.namespace();
        assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), 16384);
        assert_eq!(d[24], 0, "no optimal I/O fields without geometry");
        assert_eq!(d[33], 0x09, "DLFEAT: read zeroes, DEAC");
        assert_eq!(d[130], 12, "LBADS");
        assert_eq!(&d[104..120], &id.nguid());
        assert_eq!(&d[120..128], &id.eui64());
        id.geometry.optimal_transfer = Some(128 << 10);
        id.geometry.discard_granularity = 1 << 20;
        id.deallocate = Deallocate::Keep;
        id.read_only = true;
        let d = id.namespace();
        assert_eq!(d[24], 0x10, "NSFEAT OPTPERF");
        assert_eq!(u16_at(&d, 64), 0, "NPWG");
        assert_eq!(u16_at(&d, 68), 255, "NPDG: 1 MiB of 4 KiB blocks");
        assert_eq!(u16_at(&d, 72), 31, "NOWS: 128 KiB");
        assert_eq!(d[33], 0x08, "DLFEAT: DEAC only");
        assert_eq!(d[99], 1, "NSATTR write protected");
    }

    #[test]
    fn nvm_controller_limits() {
        let mut id = identity(LbaSize::B512);
        id.geometry.max_discard_segments = 8;
        id.geometry.max_discard = 1 << 20;
        id.geometry.max_write_zeroes = 1 << 20;
        let d = id.nvm_controller();
        assert_eq!(d[1], 8, "WZSL: 256 pages");
        assert_eq!(d[3], 8, "DMRL");
        assert_eq!(u32_at(&d, 4), 2048, "DMRSL in blocks");
        id.geometry.max_discard_segments = 256;
        assert_eq!(id.nvm_controller()[3], 0, "256 ranges: no limit");
        assert_eq!(id.max_dsm_ranges(), 256);
        // Not powers of two: WZSL rounds down and the limit with it.
        id.geometry.max_write_zeroes = 24 << 10;
        id.geometry.max_discard = 12 << 10;
        let d = id.nvm_controller();
        assert_eq!(d[1], 2, "WZSL: 4 pages of the 6");
        assert_eq!(
            id.max_write_zeroes_blocks(),
            32,
            "16 KiB of 512-byte blocks"
        );
        assert_eq!(u32_at(&d, 4), 24, "DMRSL");
        assert_eq!(id.max_dsm_range_blocks(), 24);
        // Below two pages WZSL still says two (0 would be no limit).
        id.geometry.max_write_zeroes = 4096;
        assert_eq!((id.wzsl(), id.max_write_zeroes_blocks()), (1, 16));
    }

    #[test]
    fn ids_are_stable_distinct_and_described() {
        let a = identity(LbaSize::B512);
        let b = Identity {
            serial: "other".into(),
            ..a.clone()
        };
        assert_eq!(a.nguid(), a.clone().nguid());
        assert_ne!(a.nguid(), b.nguid());
        assert_ne!(a.eui64(), b.eui64());
        assert_ne!(a.nguid(), [0; 16]);
        let d = a.descriptors();
        assert_eq!(&d[0..4], &[1, 8, 0, 0]);
        assert_eq!(&d[4..12], &a.eui64());
        assert_eq!(&d[12..16], &[2, 16, 0, 0]);
        assert_eq!(&d[16..32], &a.nguid());
        assert_eq!(d[33], 0, "the list ends with a zero length");
    }

    #[test]
    fn active_list_and_logs() {
        let id = identity(LbaSize::B512);
        assert_eq!(u32_at(&id.active_namespaces(0), 0), 1);
        assert_eq!(u32_at(&id.active_namespaces(1), 0), 0);
        let smart = smart_log(
            Health {
                blocks_read: 1000,
                blocks_written: 1001,
                read_commands: 3,
                write_commands: 4,
                power_on_hours: 2,
            },
            LbaSize::B512,
        );
        assert_eq!(u16_at(&smart, 1), TEMPERATURE);
        assert_eq!(smart[32], 1);
        assert_eq!(smart[48], 2, "rounded up");
        assert_eq!((smart[64], smart[80], smart[128]), (3, 4, 2));
        assert_eq!(id.firmware_log()[0], 1);
    }

    #[test]
    fn serials_are_cut_and_made_printable() {
        let mut id = identity(LbaSize::B512);
        id.serial = "ünïcode serial that is far too long".into();
        let d = id.controller();
        assert!(d[4..24].iter().all(|c| c.is_ascii_graphic() || *c == b' '));
    }
}
