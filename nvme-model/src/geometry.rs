//! The shape of a namespace as an interface exports it: transfer sizes and the
//! limits of deallocate and write-zeroes. Checked once, before anything runs,
//! so an interface can take every value as valid.

use crate::units::LbaSize;

/// Limits of the command set, in bytes unless named otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// The largest data transfer of one read or write (NVMe MDTS); `None`: no
    /// limit beyond what the transport carries.
    pub max_transfer: Option<u64>,
    /// The transfer size the drive prefers (NVMe NOWS; virtio-blk
    /// `opt_io_size`); `None`: not reported.
    pub optimal_transfer: Option<u64>,
    /// Deallocation works on aligned units of this size (NVMe NPDG; virtio-blk
    /// `discard_sector_alignment`); parts of units are left alone.
    pub discard_granularity: u64,
    /// The most bytes one deallocate range may cover.
    pub max_discard: u64,
    /// The most ranges in one deallocate command.
    pub max_discard_segments: u32,
    /// The most bytes one write-zeroes range may cover.
    pub max_write_zeroes: u64,
    /// The most ranges in one write-zeroes command.
    pub max_write_zeroes_segments: u32,
}

/// The most bytes a deallocate or write-zeroes range may name: just under
/// 4 GiB, whole pages (a range's length is handled as a u32 of bytes).
pub const MAX_RANGE_BYTES: u64 = u32::MAX as u64 & !(PAGE - 1);
/// The most ranges one deallocate or write-zeroes command may carry (NVMe
/// dataset management takes 256).
pub const MAX_RANGES: u32 = 256;

impl Geometry {
    /// What a namespace of `lbs` blocks has unless told otherwise.
    pub fn default_for(lbs: LbaSize) -> Self {
        Geometry {
            max_transfer: None,
            optimal_transfer: None,
            discard_granularity: lbs.bytes(),
            max_discard: 2 << 30,
            max_discard_segments: 32,
            max_write_zeroes: 2 << 30,
            max_write_zeroes_segments: 32,
        }
    }

    /// Checks every value against the block size and the others.
    pub fn check(&self, lbs: LbaSize) -> Result<(), GeometryError> {
        let block = lbs.bytes();
        let whole = |what: &'static str, bytes: u64| {
            if bytes == 0 || !bytes.is_multiple_of(block) {
                Err(GeometryError::NotBlocks { what, bytes, block })
            } else {
                Ok(())
            }
        };
        if let Some(max) = self.max_transfer {
            if max < PAGE || !max.is_multiple_of(PAGE) || !max.is_multiple_of(block) {
                return Err(GeometryError::MaxTransfer(max));
            }
        }
        if let Some(opt) = self.optimal_transfer {
            whole("--optimal-transfer", opt)?;
            if let Some(max) = self.max_transfer.filter(|&m| opt > m) {
                return Err(GeometryError::OptimalAboveMax { opt, max });
            }
            if opt >> lbs.shift() > u64::from(u32::MAX) {
                return Err(GeometryError::TooLarge("--optimal-transfer", opt));
            }
        }
        whole("--discard-granularity", self.discard_granularity)?;
        if (self.discard_granularity >> 9) > u64::from(u32::MAX) {
            return Err(GeometryError::TooLarge(
                "--discard-granularity",
                self.discard_granularity,
            ));
        }
        for (what, bytes) in [
            ("--max-discard", self.max_discard),
            ("--max-write-zeroes", self.max_write_zeroes),
        ] {
            whole(what, bytes)?;
            if bytes > MAX_RANGE_BYTES {
                return Err(GeometryError::TooLarge(what, bytes));
            }
        }
        for (what, n) in [
            ("--max-discard-segments", self.max_discard_segments),
            (
                "--max-write-zeroes-segments",
                self.max_write_zeroes_segments,
            ),
        ] {
            if n == 0 || n > MAX_RANGES {
                return Err(GeometryError::Ranges(what, n));
            }
        }
        Ok(())
    }
}

/// The page the transfer limits are counted in: a guest's buffers come in
/// pages, and a transport splits a transfer into them.
pub const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    #[error("{what} {bytes} is not a whole number of {block}-byte blocks (and at least one)")]
    NotBlocks {
        what: &'static str,
        bytes: u64,
        block: u64,
    },
    #[error(
        "--max-transfer {0} must be a multiple of 4096 (the page a transfer is split into) \
         and of the block size"
    )]
    MaxTransfer(u64),
    #[error("--optimal-transfer {opt} is larger than --max-transfer {max}")]
    OptimalAboveMax { opt: u64, max: u64 },
    #[error("{0} {1} is larger than the transport can express")]
    TooLarge(&'static str, u64),
    #[error("{0} {1} is out of range: 1 to {MAX_RANGES}")]
    Ranges(&'static str, u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        for lbs in [LbaSize::B512, LbaSize::B4096] {
            assert_eq!(Geometry::default_for(lbs).check(lbs), Ok(()));
        }
    }

    #[test]
    fn bad_values_are_named() {
        let lbs = LbaSize::B4096;
        let base = Geometry::default_for(lbs);
        let bad = [
            Geometry {
                max_transfer: Some(6144),
                ..base
            },
            Geometry {
                max_transfer: Some(0),
                ..base
            },
            Geometry {
                optimal_transfer: Some(512),
                ..base
            },
            Geometry {
                max_transfer: Some(65536),
                optimal_transfer: Some(131072),
                ..base
            },
            Geometry {
                discard_granularity: 0,
                ..base
            },
            Geometry {
                max_discard: MAX_RANGE_BYTES + 4096,
                ..base
            },
            Geometry {
                max_write_zeroes_segments: 0,
                ..base
            },
            Geometry {
                max_discard_segments: 257,
                ..base
            },
        ];
        let named = [
            "--max-transfer",
            "--max-transfer",
            "--optimal-transfer",
            "--optimal-transfer",
            "--discard-granularity",
            "--max-discard",
            "--max-write-zeroes-segments",
            "--max-discard-segments",
        ];
        for (g, name) in bad.iter().zip(named) {
            let e = g.check(lbs).unwrap_err().to_string();
            assert!(e.contains(name), "{g:?}: {e}");
        }
        // 512-byte blocks take a 512-byte granularity; 4096-byte blocks do not.
        let g = Geometry {
            discard_granularity: 512,
            ..base
        };
        assert!(g.check(LbaSize::B4096).is_err());
        assert_eq!(g.check(LbaSize::B512), Ok(()));
    }
}
