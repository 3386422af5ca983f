//! virtio-blk on top of a [`Queue`]: request headers, well-formed request
//! chains, the status byte, config space, and blocking helpers.
//!
//! A request is `[header: 16 bytes, device-readable] [data descriptors]
//! [status: 1 byte, device-writable]`. The header and status live in the
//! queue's per-chain scratch area (indexed by head slot), so submitting needs no
//! allocation in guest memory; data buffers are the caller's.

use vm_memory::GuestAddress;

use super::error::Error;
use super::memory::Buffer;
use super::ring::{link, ChainId, ChainKind, Completion, Descriptor, Queue};
use super::status::{StatusByte, STATUS_UNWRITTEN};
use crate::virtio_blk::{RequestType, HEADER_LEN, ID_BYTES};

/// virtio-blk request types (`VIRTIO_BLK_T_*`) as raw header codes, for
/// chains built by hand; [`RequestType`] names the ones the device serves.
pub mod request_type {
    pub use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD as DISCARD, VIRTIO_BLK_T_FLUSH as FLUSH,
        VIRTIO_BLK_T_GET_ID as GET_ID, VIRTIO_BLK_T_IN as IN, VIRTIO_BLK_T_OUT as OUT,
        VIRTIO_BLK_T_SECURE_ERASE as SECURE_ERASE, VIRTIO_BLK_T_WRITE_ZEROES as WRITE_ZEROES,
    };
}

/// A 512-byte sector: virtio-blk's unit for `sector` and `capacity`, whatever
/// the logical block size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sector(pub u64);

impl Sector {
    /// Bytes per sector.
    pub const SIZE: u64 = 512;

    /// Byte offset of the sector, if it fits in a u64.
    pub fn byte_offset(self) -> Option<u64> {
        self.0.checked_mul(Self::SIZE)
    }
}

/// One data buffer of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub gpa: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

impl Segment {
    /// The whole of `buf` (fails if it is 4 GiB or more).
    pub fn of(buf: &Buffer) -> Result<Self, Error> {
        let len = u32::try_from(buf.len()).map_err(|_| Error::TooLarge { len: buf.len() })?;
        Ok(Segment {
            gpa: buf.gpa(),
            len,
        })
    }
}

/// A well-formed virtio-blk request.
#[derive(Clone, Copy, Debug)]
pub struct BlkRequest<'a> {
    /// The operation.
    pub kind: RequestType,
    /// The header `sector` field.
    pub sector: Sector,
    /// Data descriptors, in order.
    pub data: &'a [Segment],
}

/// One range of a discard or write-zeroes request
/// (`struct virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardRange {
    /// First sector.
    pub sector: Sector,
    /// Number of sectors.
    pub num_sectors: u32,
    /// `DiscardRange::UNMAP` or 0.
    pub flags: u32,
}

impl DiscardRange {
    /// Flag: write-zeroes may deallocate.
    pub const UNMAP: u32 = 1;
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// The 16-byte little-endian encoding.
    pub fn encode(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.sector.0.to_le_bytes());
        raw[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        raw[12..16].copy_from_slice(&self.flags.to_le_bytes());
        raw
    }
}

/// The 16-byte request header: type, reserved, sector, little-endian.
pub fn encode_header(kind: u32, sector: Sector) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.0.to_le_bytes());
    raw
}

/// The virtio-blk configuration space (`struct virtio_blk_config`), parsed.
/// Fields are meaningful only if the matching feature was negotiated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Most segments per request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Geometry cylinders (VIRTIO_BLK_F_GEOMETRY).
    pub cylinders: u16,
    /// Geometry heads.
    pub heads: u8,
    /// Geometry sectors per track.
    pub sectors: u8,
    /// Logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// log2(physical block / logical block) (VIRTIO_BLK_F_TOPOLOGY).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks.
    pub min_io_size: u16,
    /// Optimal I/O size in blocks.
    pub opt_io_size: u32,
    /// Write-back cache on (VIRTIO_BLK_F_CONFIG_WCE).
    pub writeback: u8,
    /// Number of queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// VIRTIO_BLK_F_DISCARD limits.
    pub max_discard_sectors: u32,
    /// Most ranges per discard.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// VIRTIO_BLK_F_WRITE_ZEROES limits.
    pub max_write_zeroes_sectors: u32,
    /// Most ranges per write-zeroes.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may unmap.
    pub write_zeroes_may_unmap: u8,
    /// VIRTIO_BLK_F_SECURE_ERASE limits.
    pub max_secure_erase_sectors: u32,
    /// Most ranges per secure erase.
    pub max_secure_erase_seg: u32,
    /// Secure erase alignment in sectors.
    pub secure_erase_sector_alignment: u32,
    /// The bytes as the device sent them.
    pub raw: Vec<u8>,
}

impl BlkConfig {
    /// Bytes of the config space up to and including the secure-erase fields.
    pub const SIZE: usize = 72;

    /// Parses config bytes; fields beyond the end of `raw` are 0.
    pub fn parse(raw: &[u8]) -> Self {
        let bytes = |off: usize, n: usize| -> u64 {
            let mut v = [0u8; 8];
            if let Some(src) = raw.get(off..off + n) {
                v[..n].copy_from_slice(src);
            }
            u64::from_le_bytes(v)
        };
        let u8_at = |off| u8::try_from(bytes(off, 1)).unwrap_or(0);
        let u16_at = |off| u16::try_from(bytes(off, 2)).unwrap_or(0);
        let u32_at = |off| u32::try_from(bytes(off, 4)).unwrap_or(0);
        BlkConfig {
            capacity: bytes(0, 8),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            cylinders: u16_at(16),
            heads: u8_at(18),
            sectors: u8_at(19),
            blk_size: u32_at(20),
            physical_block_exp: u8_at(24),
            alignment_offset: u8_at(25),
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: u8_at(32),
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: u8_at(56),
            max_secure_erase_sectors: u32_at(60),
            max_secure_erase_seg: u32_at(64),
            secure_erase_sector_alignment: u32_at(68),
            raw: raw.to_vec(),
        }
    }

    /// Capacity in bytes (saturating).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(Sector::SIZE)
    }
}

/// Asynchronous submission, for load generators and tests with many requests
/// in flight.
impl Queue {
    /// Places a well-formed request in the avail ring: header and status in the
    /// chain's scratch area (status preset to [`StatusByte::UNWRITTEN`]), `data` in
    /// between. Not visible to the device until [`Queue::kick`].
    pub fn submit(&mut self, req: &BlkRequest<'_>) -> Result<ChainId, Error> {
        let slots = self.reserve(req.data.len() + 2)?;
        match self.place_request(&slots, req) {
            Ok(()) => self.enqueue(slots, ChainKind::Blk),
            Err(e) => {
                self.unreserve(slots);
                Err(e)
            }
        }
    }

    fn place_request(&self, slots: &[u16], req: &BlkRequest<'_>) -> Result<(), Error> {
        let scratch = self.scratch(slots[0]);
        let status = GuestAddress(scratch.0 + u64::from(HEADER_LEN));
        self.ram()
            .write(scratch, &encode_header(req.kind.code(), req.sector))?;
        self.ram().write(status, &[STATUS_UNWRITTEN])?;
        let mut descs = Vec::with_capacity(req.data.len() + 2);
        descs.push(Descriptor::readable(scratch, HEADER_LEN));
        descs.extend(req.data.iter().map(|seg| {
            if req.kind.device_writes_data() {
                Descriptor::writable(seg.gpa, seg.len)
            } else {
                Descriptor::readable(seg.gpa, seg.len)
            }
        }));
        descs.push(Descriptor::writable(status, 1));
        link(&mut descs);
        self.write_chain(slots, &descs)
    }

    /// Submits, kicks, and waits for this request (up to the queue's timeout).
    /// On timeout the buffers are leaked, since the device may still write them.
    fn run(
        &mut self,
        req: &BlkRequest<'_>,
        bufs: Vec<Buffer>,
    ) -> Result<(StatusByte, Vec<Buffer>), Error> {
        let id = self.submit(req)?;
        self.kick()?;
        match self.wait_for(id, self.timeout) {
            Ok(completion) => Ok((status_of(&completion), bufs)),
            Err(e) => {
                bufs.into_iter().for_each(|b| {
                    b.leak();
                });
                Err(e)
            }
        }
    }

    /// Reads `len` bytes at `sector` into a fresh buffer; returns the status
    /// and the buffer's contents (whatever the status).
    pub fn read(&mut self, sector: Sector, len: usize) -> Result<(StatusByte, Vec<u8>), Error> {
        let buf = self.ram().alloc(len)?;
        let seg = [Segment::of(&buf)?];
        let req = BlkRequest {
            kind: RequestType::In,
            sector,
            data: &seg,
        };
        let (status, bufs) = self.run(&req, vec![buf])?;
        Ok((status, bufs[0].read()?))
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, sector: Sector, data: &[u8]) -> Result<StatusByte, Error> {
        let buf = self.ram().alloc(data.len())?;
        buf.write_at(0, data)?;
        let seg = [Segment::of(&buf)?];
        let req = BlkRequest {
            kind: RequestType::Out,
            sector,
            data: &seg,
        };
        Ok(self.run(&req, vec![buf])?.0)
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<StatusByte, Error> {
        let req = BlkRequest {
            kind: RequestType::Flush,
            sector: Sector(0),
            data: &[],
        };
        Ok(self.run(&req, Vec::new())?.0)
    }

    /// Asks for the device id: 20 bytes, NUL-padded (see [`id_string`]).
    pub fn get_id(&mut self) -> Result<(StatusByte, Vec<u8>), Error> {
        let buf = self.ram().alloc(ID_BYTES)?;
        buf.fill(0)?;
        let seg = [Segment::of(&buf)?];
        let req = BlkRequest {
            kind: RequestType::GetId,
            sector: Sector(0),
            data: &seg,
        };
        let (status, bufs) = self.run(&req, vec![buf])?;
        Ok((status, bufs[0].read()?))
    }

    /// Discards `ranges`.
    pub fn discard(&mut self, ranges: &[DiscardRange]) -> Result<StatusByte, Error> {
        self.ranges_request(RequestType::Discard, ranges)
    }

    /// Writes zeroes over `ranges` (set [`DiscardRange::UNMAP`] to allow
    /// deallocation).
    pub fn write_zeroes(&mut self, ranges: &[DiscardRange]) -> Result<StatusByte, Error> {
        self.ranges_request(RequestType::WriteZeroes, ranges)
    }

    fn ranges_request(
        &mut self,
        kind: RequestType,
        ranges: &[DiscardRange],
    ) -> Result<StatusByte, Error> {
        let bytes: Vec<u8> = ranges.iter().flat_map(|r| r.encode()).collect();
        let buf = self.ram().alloc(bytes.len())?;
        buf.write_at(0, &bytes)?;
        let seg = [Segment::of(&buf)?];
        // The header sector is unused (0) for everything but reads and writes.
        let req = BlkRequest {
            kind,
            sector: Sector(0),
            data: &seg,
        };
        Ok(self.run(&req, vec![buf])?.0)
    }
}

fn status_of(completion: &Completion) -> StatusByte {
    completion.status().unwrap_or(StatusByte::UNWRITTEN)
}

/// The id string of a GET_ID reply, up to the first NUL.
pub fn id_string(raw: &[u8]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_ranges_are_little_endian() {
        let h = encode_header(request_type::OUT, Sector(0x0102_0304_0506_0708));
        assert_eq!(h[0..4], [1, 0, 0, 0]);
        assert_eq!(h[4..8], [0; 4]);
        assert_eq!(h[8..16], [8, 7, 6, 5, 4, 3, 2, 1]);
        let r = DiscardRange {
            sector: Sector(2),
            num_sectors: 3,
            flags: DiscardRange::UNMAP,
        };
        assert_eq!(r.encode(), [2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn config_parses_fields_at_spec_offsets_and_tolerates_short_input() {
        let mut raw = vec![0u8; 96];
        raw[0..8].copy_from_slice(&131072u64.to_le_bytes());
        raw[12..16].copy_from_slice(&126u32.to_le_bytes());
        raw[20..24].copy_from_slice(&512u32.to_le_bytes());
        raw[34..36].copy_from_slice(&4u16.to_le_bytes());
        raw[52..56].copy_from_slice(&1u32.to_le_bytes());
        raw[56] = 1;
        let c = BlkConfig::parse(&raw);
        assert_eq!(c.capacity, 131072);
        assert_eq!(c.capacity_bytes(), 64 << 20);
        assert_eq!((c.seg_max, c.blk_size, c.num_queues), (126, 512, 4));
        assert_eq!((c.max_write_zeroes_seg, c.write_zeroes_may_unmap), (1, 1));
        let short = BlkConfig::parse(&raw[..10]);
        assert_eq!((short.capacity, short.seg_max), (131072, 0));
    }

    #[test]
    fn id_string_stops_at_nul() {
        assert_eq!(id_string(b"abc\0\0\0"), "abc");
        assert_eq!(id_string(b"12345678901234567890"), "12345678901234567890");
    }

    #[test]
    fn request_types_pick_direction() {
        assert!(RequestType::In.device_writes_data());
        assert!(RequestType::GetId.device_writes_data());
        assert!(!RequestType::Out.device_writes_data());
        assert!(!RequestType::Discard.device_writes_data());
        assert!(!RequestType::Unsupported(99).device_writes_data());
        assert_eq!(RequestType::WriteZeroes.code(), 13);
        assert_eq!(RequestType::Unsupported(99).code(), 99);
    }
}
