//! The virtio-blk configuration space, as the guest reads it.

use nvme_model::LbaSize;

use super::SECTOR_SHIFT;

/// The virtio-blk configuration space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    pub capacity_sectors: u64,
    pub lbs: LbaSize,
    pub size_max: u32,
    pub seg_max: u32,
    /// Transfer sizes and discard / write-zeroes limits.
    pub geometry: nvme_model::Geometry,
    pub num_queues: u16,
    pub writeback: bool,
}

/// Offset of the `writeback` byte, the only field the guest may write.
pub const CONFIG_WRITEBACK_OFFSET: u32 = 32;
/// The length of the configuration space up to and including the write-zeroes fields.
pub const CONFIG_LEN: usize = 60;

impl ConfigSpace {
    /// The configuration space as the guest reads it (little-endian).
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16..20: geometry, not offered.
        put(
            20,
            &u32::try_from(self.lbs.bytes()).unwrap_or(512).to_le_bytes(),
        );
        // Topology: physical block = logical block, no offset, min I/O one
        // block, the optimal transfer in blocks (0: none).
        let g = &self.geometry;
        let blocks = |bytes: u64| u32::try_from(bytes >> self.lbs.shift()).unwrap_or(u32::MAX);
        let sectors = |bytes: u64| u32::try_from(bytes >> SECTOR_SHIFT).unwrap_or(u32::MAX);
        put(24, &[0, 0]);
        put(26, &1u16.to_le_bytes());
        put(28, &g.optimal_transfer.map_or(0, blocks).to_le_bytes());
        put(32, &[u8::from(self.writeback), 0]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &sectors(g.max_discard).to_le_bytes());
        put(40, &g.max_discard_segments.to_le_bytes());
        put(44, &sectors(g.discard_granularity).to_le_bytes());
        put(48, &sectors(g.max_write_zeroes).to_le_bytes());
        put(52, &g.max_write_zeroes_segments.to_le_bytes());
        put(56, &[1, 0, 0, 0]); // write_zeroes_may_unmap
        b
    }

    /// Exactly `size` bytes from `offset`, zero-padded past the end.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let (offset, size) = (offset as usize, size as usize);
        (offset..offset.saturating_add(size))
            .map(|i| bytes.get(i).copied().unwrap_or(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio_blk::SIZE_MAX;

    #[test]
    fn config_reads_exactly_what_is_asked() {
        let c = ConfigSpace {
            capacity_sectors: 0x1_0000,
            lbs: LbaSize::B4096,
            size_max: SIZE_MAX,
            seg_max: 254,
            geometry: nvme_model::Geometry {
                optimal_transfer: Some(65536),
                discard_granularity: 1 << 20,
                ..nvme_model::Geometry::default_for(LbaSize::B4096)
            },
            num_queues: 2,
            writeback: true,
        };
        let all = c.read(0, 96);
        assert_eq!(all.len(), 96);
        assert_eq!(u64::from_le_bytes(all[0..8].try_into().unwrap()), 0x1_0000);
        assert_eq!(u32::from_le_bytes(all[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(all[34..36].try_into().unwrap()), 2);
        assert_eq!(all[32], 1);
        let u32_at = |at: usize| u32::from_le_bytes(all[at..at + 4].try_into().unwrap());
        assert_eq!(u32_at(8), SIZE_MAX);
        assert_eq!(u32_at(28), 16, "opt_io_size in blocks");
        assert_eq!(u32_at(36), 1 << 22, "max_discard_sectors");
        assert_eq!(u32_at(40), 32);
        assert_eq!(u32_at(44), 2048, "discard_sector_alignment in sectors");
        assert_eq!(u32_at(48), 1 << 22);
        assert!(all[CONFIG_LEN..].iter().all(|&b| b == 0));
        assert_eq!(c.read(20, 4), 4096u32.to_le_bytes());
        assert_eq!(c.read(u32::MAX, 4), vec![0; 4]);
        assert!(c.read(0, 0).is_empty());
    }
}
