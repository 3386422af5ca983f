//! The status byte of a virtio-blk request, as the driver reads it back.

use std::fmt;

use crate::virtio_blk::Status;

/// Status byte written before submission, so "the device never wrote a status"
/// is visible.
pub(crate) const STATUS_UNWRITTEN: u8 = 0xff;

/// The status byte a device wrote, whatever it is: one of the statuses
/// virtio-blk defines ([`Status`]), [`StatusByte::UNWRITTEN`] when the device
/// wrote none, or any other byte a broken device writes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusByte(pub u8);

impl StatusByte {
    /// `VIRTIO_BLK_S_OK`.
    pub const OK: StatusByte = StatusByte(Status::Ok as u8);
    /// `VIRTIO_BLK_S_IOERR`.
    pub const IOERR: StatusByte = StatusByte(Status::IoErr as u8);
    /// `VIRTIO_BLK_S_UNSUPP`.
    pub const UNSUPP: StatusByte = StatusByte(Status::Unsupp as u8);
    /// What the frontend writes before submitting: the device wrote no status.
    pub const UNWRITTEN: StatusByte = StatusByte(STATUS_UNWRITTEN);

    /// Whether the status is OK.
    pub fn is_ok(self) -> bool {
        self == Self::OK
    }
}

impl fmt::Debug for StatusByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::OK => write!(f, "OK"),
            Self::IOERR => write!(f, "IOERR"),
            Self::UNSUPP => write!(f, "UNSUPP"),
            Self::UNWRITTEN => write!(f, "UNWRITTEN"),
            StatusByte(other) => write!(f, "StatusByte({other})"),
        }
    }
}

impl fmt::Display for StatusByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
