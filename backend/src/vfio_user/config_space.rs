//! The PCI function as config space shows it: IDs, class code, BAR0 and
//! BAR4 (MSI-X table and PBA) and the MSI-X capability, with what a write
//! may change, so BAR sizing and read-only fields behave as on a device.

/// The IDs the function presents in config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    pub revision: u8,
}

impl PciIds {
    /// dmaprobe's own IDs. dmaprobe owns no PCI-SIG vendor ID, and any assigned
    /// one (Intel's, Red Hat's 1b36 that QEMU's nvme uses) would claim another
    /// company's hardware, and could pull in the quirks Linux keys on it. Vendor
    /// 0x0000 is assigned to nobody: it is not in the PCI ID Repository, Linux
    /// only treats the whole dword 0 (vendor and device both 0) as an empty slot,
    /// and its nvme driver binds by class code, so a vendor-0 function with a
    /// non-zero device ID probes as a plain NVMe controller. The device ID
    /// belongs to the vendor's space, so 0x0001 claims nothing either.
    /// Override with [`VfioUserOptions::ids`](super::VfioUserOptions::ids) (e.g. to compare with QEMU's
    /// 1b36:0010).
    pub const DMAPROBE: PciIds = PciIds {
        vendor: 0x0000,
        device: 0x0001,
        subsystem_vendor: 0x0000,
        subsystem: 0x0001,
        revision: 0,
    };
}

/// A page: the smallest memory BAR, and the MSI-X PBA's alignment in BAR4.
pub(super) const PAGE_SIZE: u64 = 4096;
pub(super) const MAX_BAR_SIZE: u64 = 1 << 40;

/// A memory BAR's size for `size` bytes: a power of two, at least a page.
pub(super) fn bar_size(size: u64) -> Option<u64> {
    (size > 0 && size <= MAX_BAR_SIZE).then(|| size.max(PAGE_SIZE).next_power_of_two())
}

pub(super) const CONFIG_SIZE: usize = 256;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const CLASS_PROG_IF: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
const LATENCY_TIMER: usize = 0x0d;
pub(super) const BAR0: usize = 0x10;
const BAR4: usize = 0x20;
const SUBSYSTEM_VENDOR: usize = 0x2c;
pub(super) const CAPABILITIES: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
pub(super) const MSIX_CAP: usize = 0x40;

const STATUS_CAP_LIST: u16 = 1 << 4;
/// Memory space, bus master, parity error response, SERR#, INTx disable.
const COMMAND_WRITABLE: u16 = (1 << 1) | (1 << 2) | (1 << 6) | (1 << 8) | (1 << 10);
/// Memory BAR, 64-bit, not prefetchable.
pub(super) const BAR_MEM64: u32 = 0b100;
const CAP_ID_MSIX: u8 = 0x11;
/// MSI-X Enable and Function Mask, the writable bits of Message Control.
const MSIX_CONTROL_WRITABLE: u16 = 0xc000;
/// Mass storage, Non-Volatile Memory controller, NVM Express.
const CLASS_NVME: [u8; 3] = [0x02, 0x08, 0x01];

/// Where MSI-X lives in BAR4: the table at 0, the PBA on the next page.
#[derive(Clone, Copy, Debug)]
pub(super) struct MsixLayout {
    pub(super) vectors: u16,
    pub(super) table_len: u64,
    pub(super) pba_offset: u64,
    pub(super) pba_len: u64,
    pub(super) bar_size: u64,
}

impl MsixLayout {
    pub(super) fn new(vectors: u16) -> MsixLayout {
        let table_len = u64::from(vectors) * 16;
        let pba_offset = table_len.next_multiple_of(PAGE_SIZE);
        let pba_len = u64::from(vectors).div_ceil(64) * 8;
        MsixLayout {
            vectors,
            table_len,
            pba_offset,
            pba_len,
            bar_size: (pba_offset + pba_len).next_power_of_two(),
        }
    }

    /// Every entry masked (Vector Control bit 0), as after a reset.
    pub(super) fn power_on_table(&self) -> Vec<u8> {
        let mut table = vec![0u8; self.table_len as usize];
        for entry in table.chunks_exact_mut(16) {
            entry[12] = 1;
        }
        table
    }
}

/// A type 0 header with the MSI-X capability; what a write may change is in a
/// mask, so BAR sizing and read-only fields behave as on a device.
#[derive(Clone)]
pub(super) struct ConfigSpace {
    pub(super) bytes: [u8; CONFIG_SIZE],
    pub(super) writable: [u8; CONFIG_SIZE],
    pub(super) power_on: [u8; CONFIG_SIZE],
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("header", &&self.bytes[..0x40])
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    pub(super) fn new(ids: PciIds, bar0_size: u64, msix: &MsixLayout) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            power_on: [0; CONFIG_SIZE],
        };
        c.put(0x00, &ids.vendor.to_le_bytes());
        c.put(0x02, &ids.device.to_le_bytes());
        c.put(STATUS, &STATUS_CAP_LIST.to_le_bytes());
        c.put(0x08, &[ids.revision]);
        c.put(CLASS_PROG_IF, &CLASS_NVME);
        c.put(BAR0, &BAR_MEM64.to_le_bytes());
        c.put(BAR4, &BAR_MEM64.to_le_bytes());
        c.put(SUBSYSTEM_VENDOR, &ids.subsystem_vendor.to_le_bytes());
        c.put(SUBSYSTEM_VENDOR + 2, &ids.subsystem.to_le_bytes());
        c.put(CAPABILITIES, &[MSIX_CAP as u8]);
        // Interrupt pin 0: no INTx. The MSI-X capability is the last one.
        c.put(MSIX_CAP, &[CAP_ID_MSIX, 0]);
        c.put(MSIX_CAP + 2, &(msix.vectors - 1).to_le_bytes());
        let bir4 = |offset: u64| (offset as u32 | 4).to_le_bytes();
        c.put(MSIX_CAP + 4, &bir4(0));
        c.put(MSIX_CAP + 8, &bir4(msix.pba_offset));

        c.allow(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        c.allow(CACHE_LINE_SIZE, &[0xff, 0xff]); // and the latency timer
        c.allow(BAR0, &(!(bar0_size - 1) & !0xf).to_le_bytes());
        c.allow(BAR4, &(!(msix.bar_size - 1) & !0xf).to_le_bytes());
        c.allow(INTERRUPT_LINE, &[0xff]);
        c.allow(MSIX_CAP + 2, &MSIX_CONTROL_WRITABLE.to_le_bytes());
        debug_assert_eq!(LATENCY_TIMER, CACHE_LINE_SIZE + 1);
        c.power_on = c.bytes;
        c
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.bytes[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn allow(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// `offset..offset + data.len()` must be inside the space (checked by the caller).
    pub(super) fn read(&self, offset: usize, data: &mut [u8]) {
        data.copy_from_slice(&self.bytes[offset..offset + data.len()]);
    }

    pub(super) fn write(&mut self, offset: usize, data: &[u8]) {
        let bytes = &mut self.bytes[offset..offset + data.len()];
        let masks = &self.writable[offset..offset + data.len()];
        for ((b, &m), &new) in bytes.iter_mut().zip(masks).zip(data) {
            *b = (*b & !m) | (new & m);
        }
    }

    pub(super) fn reset(&mut self) {
        self.bytes = self.power_on;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConfigSpace {
        ConfigSpace::new(PciIds::DMAPROBE, 0x4000, &MsixLayout::new(64))
    }

    fn read32(c: &ConfigSpace, offset: usize) -> u32 {
        let mut b = [0; 4];
        c.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_keeps_the_type_bits() {
        let mut c = config();
        c.write(BAR0, &u32::MAX.to_le_bytes());
        c.write(BAR0 + 4, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&c, BAR0), !(0x4000u32 - 1) | BAR_MEM64);
        assert_eq!(read32(&c, BAR0 + 4), u32::MAX);
        c.write(BAR0, &0xfebf_1234u32.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xfebf_0000 | BAR_MEM64);
        c.reset();
        assert_eq!(read32(&c, BAR0), BAR_MEM64);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = config();
        let before = c.bytes;
        c.write(0, &[0xff; 4]); // IDs
        c.write(0x08, &[0xff; 4]); // revision, class
        c.write(CAPABILITIES, &[0xff]);
        c.write(MSIX_CAP, &[0xff; 12]);
        let mut after = c.bytes;
        // Only Message Control's top bits moved.
        assert_eq!(after[MSIX_CAP + 3], before[MSIX_CAP + 3] | 0xc0);
        after[MSIX_CAP + 3] = before[MSIX_CAP + 3];
        assert_eq!(after, before);
    }

    #[test]
    fn msix_layout_keeps_table_and_pba_apart_inside_the_bar() {
        for n in [1, 63, 64, 65, 256, 2048] {
            let l = MsixLayout::new(n);
            assert!(l.table_len <= l.pba_offset, "{n}");
            assert!(l.pba_offset + l.pba_len <= l.bar_size, "{n}");
            assert!(
                l.bar_size.is_power_of_two() && l.bar_size >= PAGE_SIZE,
                "{n}"
            );
            assert_eq!(l.pba_offset % 8, 0);
        }
    }

    #[test]
    fn bar_size_rounds_up_to_a_power_of_two_page() {
        assert_eq!(bar_size(0), None);
        assert_eq!(bar_size(1), Some(4096));
        assert_eq!(bar_size(0x1008), Some(0x2000));
        assert_eq!(bar_size(MAX_BAR_SIZE + 1), None);
        assert_eq!(bar_size(u64::MAX), None);
    }
}
