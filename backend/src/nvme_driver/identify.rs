//! What a host needs of the identify data it reads back: the controller's
//! largest transfer, namespace count and whether it offers shadow
//! doorbells, and a namespace's size, block size and write protection
//! (NVMe 1.4, figures 247 and 249).

use super::error::Error;

/// Of Identify Controller (CNS 01h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerData {
    /// MDTS: the largest transfer as a power of two of CAP.MPSMIN pages; 0
    /// for no limit.
    pub mdts: u8,
    /// NN: the highest namespace identifier.
    pub namespaces: u32,
    /// OACS bit 8: Doorbell Buffer Config is offered.
    pub doorbell_buffer: bool,
}

impl ControllerData {
    pub fn parse(d: &[u8]) -> Result<ControllerData, Error> {
        Ok(ControllerData {
            mdts: *d.get(77).ok_or(Error::ShortIdentify { len: d.len() })?,
            namespaces: le32(d, 516)?,
            doorbell_buffer: d.get(257).ok_or(Error::ShortIdentify { len: d.len() })? & 1 == 1,
        })
    }

    /// The most bytes one command may move, with pages of `page` bytes
    /// (CAP.MPSMIN's); None: no limit.
    pub fn max_transfer(&self, page: u64) -> Option<u64> {
        match self.mdts {
            0 => None,
            n => Some(page.checked_shl(u32::from(n)).unwrap_or(u64::MAX)),
        }
    }
}

/// Of Identify Namespace (CNS 00h), in the LBA format in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceData {
    /// NSZE, in blocks.
    pub blocks: u64,
    /// Bytes per block: 2^LBADS of the format FLBAS picks.
    pub block_bytes: u64,
    /// NSATTR bit 0: write protected.
    pub read_only: bool,
}

impl NamespaceData {
    /// The data, or [`Error::BadLbaFormat`] for a block size outside 512
    /// bytes to 2 GiB (an LBADS below 9 is not in use, NVMe 1.4 figure 245).
    pub fn parse(d: &[u8]) -> Result<NamespaceData, Error> {
        let short = || Error::ShortIdentify { len: d.len() };
        let flbas = *d.get(26).ok_or_else(short)?;
        let format = 128 + 4 * usize::from(flbas & 0xf);
        let lbads = *d.get(format + 2).ok_or_else(short)?;
        if !(9..=31).contains(&lbads) {
            return Err(Error::BadLbaFormat { lbads });
        }
        Ok(NamespaceData {
            blocks: u64::from_le_bytes(
                d.get(..8).ok_or_else(short)?.try_into().unwrap_or_default(),
            ),
            block_bytes: 1 << lbads,
            read_only: d.get(99).ok_or_else(short)? & 1 == 1,
        })
    }

    /// The namespace's size in bytes (at most `u64::MAX`).
    pub fn capacity_bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block_bytes)
    }
}

fn le32(d: &[u8], at: usize) -> Result<u32, Error> {
    d.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(Error::ShortIdentify { len: d.len() })
}

#[cfg(test)]
mod tests {
    use nvme_model::{Deallocate, Geometry, LbaSize};

    use super::*;
    use crate::nvme::Identity;

    fn identity(lbs: LbaSize, max_transfer: Option<u64>, read_only: bool) -> Identity {
        let mut geometry = Geometry::default_for(lbs);
        geometry.max_transfer = max_transfer;
        Identity {
            serial: "identify".into(),
            vendor_id: 0,
            lbs,
            blocks: (64 << 20) >> lbs.shift(),
            read_only,
            geometry,
            write_cache: None,
            deallocate: Deallocate::Zeroes,
            dsm: true,
            write_zeroes: true,
            io_queues: 1,
            queue_entries: 64,
            vectors: 2,
            doorbell_buffer: false,
        }
    }

    #[test]
    fn what_the_controller_writes_reads_back() {
        let mut id = identity(LbaSize::B4096, Some(128 << 10), true);
        let c = ControllerData::parse(&id.controller()).unwrap();
        assert_eq!((c.mdts, c.namespaces, c.doorbell_buffer), (5, 1, false));
        id.doorbell_buffer = true;
        assert!(
            ControllerData::parse(&id.controller())
                .unwrap()
                .doorbell_buffer
        );
        assert_eq!(c.max_transfer(4096), Some(128 << 10));
        let ns = NamespaceData::parse(&id.namespace()).unwrap();
        assert_eq!(
            ns,
            NamespaceData {
                blocks: 16384,
                block_bytes: 4096,
                read_only: true
            }
        );
        assert_eq!(ns.capacity_bytes(), 64 << 20);

        let id = identity(LbaSize::B512, None, false);
        let c = ControllerData::parse(&id.controller()).unwrap();
        assert_eq!(c.max_transfer(4096), None);
        let ns = NamespaceData::parse(&id.namespace()).unwrap();
        assert_eq!((ns.block_bytes, ns.read_only), (512, false));
    }

    #[test]
    fn short_or_odd_data_is_an_error() {
        assert!(matches!(
            ControllerData::parse(&[0; 100]),
            Err(Error::ShortIdentify { len: 100 })
        ));
        let mut d = vec![0u8; 4096];
        d[26] = 1; // format 1, LBADS 0: not in use
        assert!(matches!(
            NamespaceData::parse(&d),
            Err(Error::BadLbaFormat { lbads: 0 })
        ));
        d[128 + 4 + 2] = 40;
        assert!(matches!(
            NamespaceData::parse(&d),
            Err(Error::BadLbaFormat { lbads: 40 })
        ));
    }
}
