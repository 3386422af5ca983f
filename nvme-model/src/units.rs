//! Units the media speaks in. Conversions go through methods, never `as` casts.

use std::fmt;

/// A logical block address: an index of a logical block in a namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lba(pub u64);

/// A byte offset into a namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteOffset(pub u64);

/// The logical block size of a namespace: 512 or 4096 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LbaSize {
    #[default]
    B512,
    B4096,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Logical block size {0} is not supported (use 512 or 4096)")]
pub struct LbaSizeError(pub u64);

impl LbaSize {
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            LbaSize::B512 => 512,
            LbaSize::B4096 => 4096,
        }
    }

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            LbaSize::B512 => 9,
            LbaSize::B4096 => 12,
        }
    }

    /// The byte offset where `lba` starts, or `None` past `u64::MAX`.
    pub fn offset_of(self, lba: Lba) -> Option<ByteOffset> {
        lba.0.checked_mul(self.bytes()).map(ByteOffset)
    }

    /// The LBA at `offset`, if `offset` is block-aligned.
    pub fn lba_at(self, offset: ByteOffset) -> Option<Lba> {
        self.is_aligned(offset.0)
            .then(|| Lba(offset.0 >> self.shift()))
    }

    /// The number of whole blocks in `bytes`, if `bytes` is a multiple of the block size.
    pub fn blocks_in(self, bytes: u64) -> Option<u64> {
        self.is_aligned(bytes).then(|| bytes >> self.shift())
    }

    /// Whether `bytes` is a multiple of the block size.
    pub fn is_aligned(self, bytes: u64) -> bool {
        bytes & (self.bytes() - 1) == 0
    }
}

impl TryFrom<u64> for LbaSize {
    type Error = LbaSizeError;

    fn try_from(bytes: u64) -> Result<Self, Self::Error> {
        match bytes {
            512 => Ok(LbaSize::B512),
            4096 => Ok(LbaSize::B4096),
            other => Err(LbaSizeError(other)),
        }
    }
}

impl fmt::Display for LbaSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

impl fmt::Display for Lba {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip() {
        for lbs in [LbaSize::B512, LbaSize::B4096] {
            let off = lbs.offset_of(Lba(7)).unwrap();
            assert_eq!(off.0, 7 * lbs.bytes());
            assert_eq!(lbs.lba_at(off), Some(Lba(7)));
            assert_eq!(lbs.lba_at(ByteOffset(off.0 + 1)), None);
            assert_eq!(lbs.blocks_in(3 * lbs.bytes()), Some(3));
            assert_eq!(lbs.blocks_in(3 * lbs.bytes() - 1), None);
        }
    }

    #[test]
    fn offset_of_overflow_is_none() {
        assert_eq!(LbaSize::B512.offset_of(Lba(u64::MAX)), None);
        assert_eq!(LbaSize::B4096.offset_of(Lba(u64::MAX >> 11)), None);
    }

    #[test]
    fn only_512_and_4096() {
        assert_eq!(LbaSize::try_from(512), Ok(LbaSize::B512));
        assert_eq!(LbaSize::try_from(4096), Ok(LbaSize::B4096));
        assert_eq!(LbaSize::try_from(1024), Err(LbaSizeError(1024)));
        assert_eq!(LbaSize::try_from(0), Err(LbaSizeError(0)));
    }
}
