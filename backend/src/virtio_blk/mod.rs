//! The virtio-blk interface: what the guest's virtio-blk driver talks to,
//! served as a vhost-user-blk device to QEMU (the vhost-user frontend).
//!
//! - this file: what virtio-blk defines that the rest of the folder speaks:
//!   features, request types, statuses, the sizes of a request's parts.
//! - [`config_space`]: [`ConfigSpace`](config_space::ConfigSpace), the
//!   configuration space the guest reads.
//! - [`request`]: a descriptor chain parsed into a [`Request`](request::Request),
//!   or rejected as [`Malformed`](request::Malformed).
//! - [`prepare`]: a parsed request checked against the namespace and made the
//!   pipeline's [`Prepared`](crate::pipeline::work::Prepared) work.
//! - [`device`]: the vhost-user device ([`BlkDevice`](device::BlkDevice)):
//!   one thread per queue pops chains and takes them through parse, prepare
//!   and the [`Pipeline`](crate::pipeline::Pipeline); the status byte, the
//!   used ring entry and the notification tell the guest how each ended.
//!
//! A chain flows: kick → [`device`] pops it → [`request::parse`] →
//! [`prepare::prepare`] → [`Pipeline::submit`](crate::pipeline::Pipeline::submit)
//! → status byte, used ring, notification.

pub mod config_space;
pub mod device;
pub mod prepare;
pub mod request;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The length of a request header: type, reserved, sector.
pub const HEADER_LEN: u32 = 16;
/// The length of a GET_ID answer.
pub const ID_BYTES: usize = 20;
/// The length of one discard / write-zeroes segment.
pub const DWZ_SEGMENT_LEN: u32 = 16;
/// virtio-blk addresses data in 512-byte sectors, whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;

/// The largest data segment the guest may send (config `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// The vhost-user feature bit that enables protocol feature negotiation.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = bit(30);

/// The features this device offers.
pub fn device_features(read_only: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_SIZE_MAX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_TOPOLOGY)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
        | bit(VIRTIO_BLK_F_MQ)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        | VHOST_USER_F_PROTOCOL_FEATURES;
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    }
    f
}

/// The status byte a request completes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
}

impl Status {
    /// Its name, as the ledger records what the guest was told.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::IoErr => "ioerr",
            Status::Unsupp => "unsupp",
        }
    }
}

/// A request's operation, from the header's type field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// Any other type code: the device answers UNSUPP.
    Unsupported(u32),
}

impl RequestType {
    pub fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }

    /// The header's type field: the inverse of [`RequestType::from_raw`].
    pub fn code(self) -> u32 {
        match self {
            RequestType::In => VIRTIO_BLK_T_IN,
            RequestType::Out => VIRTIO_BLK_T_OUT,
            RequestType::Flush => VIRTIO_BLK_T_FLUSH,
            RequestType::GetId => VIRTIO_BLK_T_GET_ID,
            RequestType::Discard => VIRTIO_BLK_T_DISCARD,
            RequestType::WriteZeroes => VIRTIO_BLK_T_WRITE_ZEROES,
            RequestType::Unsupported(code) => code,
        }
    }

    /// A short name for logs: `op=`.
    pub fn name(self) -> &'static str {
        match self {
            RequestType::In => "read",
            RequestType::Out => "write",
            RequestType::Flush => "flush",
            RequestType::GetId => "get-id",
            RequestType::Discard => "discard",
            RequestType::WriteZeroes => "write-zeroes",
            RequestType::Unsupported(_) => "unsupported",
        }
    }

    /// Whether the device writes data into guest memory for this request.
    pub fn device_writes_data(self) -> bool {
        matches!(self, RequestType::In | RequestType::GetId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_match_the_spec() {
        assert_eq!(u32::from(Status::Ok as u8), VIRTIO_BLK_S_OK);
        assert_eq!(u32::from(Status::IoErr as u8), VIRTIO_BLK_S_IOERR);
        assert_eq!(u32::from(Status::Unsupp as u8), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn read_only_is_offered_only_when_asked() {
        assert_eq!(device_features(false) & bit(VIRTIO_BLK_F_RO), 0);
        assert_ne!(device_features(true) & bit(VIRTIO_BLK_F_RO), 0);
    }
}
