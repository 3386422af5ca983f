//! Virtio feature bits (as `u64` masks) the driver knows by name.

use virtio_bindings::virtio_blk as blk;
use virtio_bindings::virtio_config as config;
use virtio_bindings::virtio_ring as ring;

/// VIRTIO_BLK_F_SIZE_MAX.
pub const BLK_SIZE_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SIZE_MAX;
/// VIRTIO_BLK_F_SEG_MAX.
pub const BLK_SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
/// VIRTIO_BLK_F_GEOMETRY.
pub const BLK_GEOMETRY: u64 = 1 << blk::VIRTIO_BLK_F_GEOMETRY;
/// VIRTIO_BLK_F_RO.
pub const BLK_RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
/// VIRTIO_BLK_F_BLK_SIZE.
pub const BLK_BLK_SIZE: u64 = 1 << blk::VIRTIO_BLK_F_BLK_SIZE;
/// VIRTIO_BLK_F_FLUSH.
pub const BLK_FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;
/// VIRTIO_BLK_F_TOPOLOGY.
pub const BLK_TOPOLOGY: u64 = 1 << blk::VIRTIO_BLK_F_TOPOLOGY;
/// VIRTIO_BLK_F_CONFIG_WCE.
pub const BLK_CONFIG_WCE: u64 = 1 << blk::VIRTIO_BLK_F_CONFIG_WCE;
/// VIRTIO_BLK_F_MQ.
pub const BLK_MQ: u64 = 1 << blk::VIRTIO_BLK_F_MQ;
/// VIRTIO_BLK_F_DISCARD.
pub const BLK_DISCARD: u64 = 1 << blk::VIRTIO_BLK_F_DISCARD;
/// VIRTIO_BLK_F_WRITE_ZEROES.
pub const BLK_WRITE_ZEROES: u64 = 1 << blk::VIRTIO_BLK_F_WRITE_ZEROES;
/// VIRTIO_BLK_F_SECURE_ERASE.
pub const BLK_SECURE_ERASE: u64 = 1 << blk::VIRTIO_BLK_F_SECURE_ERASE;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const RING_INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
/// VIRTIO_RING_F_EVENT_IDX.
pub const RING_EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
/// VHOST_USER_F_PROTOCOL_FEATURES (bit 30).
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
/// VIRTIO_F_VERSION_1.
pub const VERSION_1: u64 = 1 << config::VIRTIO_F_VERSION_1;

/// What [`FrontendConfig::default`](super::session::FrontendConfig::default) asks for besides VERSION_1,
/// PROTOCOL_FEATURES and EVENT_IDX: the blk features the helpers understand,
/// and indirect descriptors (for hand-built chains).
pub const DEFAULT: u64 = BLK_SIZE_MAX
    | BLK_SEG_MAX
    | BLK_GEOMETRY
    | BLK_RO
    | BLK_BLK_SIZE
    | BLK_FLUSH
    | BLK_TOPOLOGY
    | BLK_CONFIG_WCE
    | BLK_MQ
    | BLK_DISCARD
    | BLK_WRITE_ZEROES
    | RING_INDIRECT_DESC;
