//! The guest mailbox's wire format, shared by the device and the guest.
//!
//! With `dmaprobe serve --mailbox`, the last [`MAILBOX_BYTES`] of the disk are
//! not storage but a mailbox: the guest learns where it is from the disk's
//! size. A write at the mailbox's first byte that starts with a valid
//! header (below) carries a control command (the same JSON as the control socket);
//! the device runs it and keeps the answer, which any read of the mailbox
//! returns from its first byte, in the same framing. Anything else written to
//! the mailbox fails with IOERR and is counted; nothing written there reaches
//! the media. Give a file system the disk minus the mailbox.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "DMAPRBX1"
//!      8     4  version (1), little-endian
//!     12     4  payload length in bytes
//!     16     4  FNV-1a 32 of the payload
//!     20     4  sequence number (the answer carries the command's)
//!     24     8  reserved, zero
//!     32     -  payload: one JSON object (UTF-8)
//! ```
//! A command is written as whole blocks (pad with zeros); the payload must fit
//! in [`MAX_PAYLOAD`].

/// The mailbox's size: the last MiB of the disk.
pub const MAILBOX_BYTES: u64 = 1 << 20;
pub const MAGIC: [u8; 8] = *b"DMAPRBX1";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
/// The largest payload: a command or an answer fits in the mailbox.
pub const MAX_PAYLOAD: usize = MAILBOX_BYTES as usize - HEADER_LEN;

/// Where the mailbox starts on a disk of `disk_bytes`, if the disk is big
/// enough to spare it (at least four times its size).
pub fn mailbox_offset(disk_bytes: u64) -> Option<u64> {
    (disk_bytes >= 4 * MAILBOX_BYTES).then(|| disk_bytes - MAILBOX_BYTES)
}

/// FNV-1a, 32 bits: enough to tell a command from stray data.
pub fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Frames `payload` with sequence number `seq`, padded to a multiple of `block`.
pub fn encode(seq: u32, payload: &[u8], block: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + block);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&fnv1a32(payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(payload);
    let block = block.max(1);
    let padded = out.len().div_ceil(block) * block;
    out.resize(padded, 0);
    out
}

/// Why bytes are not a framed message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("too short for a mailbox header")]
    Short,
    #[error("no mailbox magic")]
    Magic,
    #[error("mailbox version {0} is not supported (this side speaks {VERSION})")]
    Version(u32),
    #[error("payload length {0} does not fit")]
    Length(u32),
    #[error("payload checksum mismatch")]
    Checksum,
}

/// A framed message: its sequence number and payload.
pub fn decode(bytes: &[u8]) -> Result<(u32, &[u8]), FrameError> {
    let h = bytes.get(..HEADER_LEN).ok_or(FrameError::Short)?;
    if h[..8] != MAGIC {
        return Err(FrameError::Magic);
    }
    let word = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let version = word(8);
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let len = word(12);
    let payload = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_PAYLOAD)
        .and_then(|n| bytes.get(HEADER_LEN..HEADER_LEN + n))
        .ok_or(FrameError::Length(len))?;
    if fnv1a32(payload) != word(16) {
        return Err(FrameError::Checksum);
    }
    Ok((word(20), payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_pad() {
        let f = encode(7, br#"{"cmd":"held"}"#, 512);
        assert_eq!(f.len(), 512);
        assert_eq!(decode(&f), Ok((7, &br#"{"cmd":"held"}"#[..])));
    }

    #[test]
    fn anything_else_is_refused() {
        let good = encode(1, b"{}", 512);
        assert_eq!(decode(&good[..10]), Err(FrameError::Short));
        assert_eq!(decode(&[0u8; 512]), Err(FrameError::Magic));
        let mut v = good.clone();
        v[8] = 2;
        assert_eq!(decode(&v), Err(FrameError::Version(2)));
        let mut c = good.clone();
        c[HEADER_LEN] ^= 1;
        assert_eq!(decode(&c), Err(FrameError::Checksum));
        let mut l = good.clone();
        l[12..16].copy_from_slice(&600u32.to_le_bytes());
        assert_eq!(decode(&l), Err(FrameError::Length(600)));
    }

    #[test]
    fn mailbox_sits_at_the_end() {
        assert_eq!(mailbox_offset(64 << 20), Some((64 << 20) - MAILBOX_BYTES));
        assert_eq!(mailbox_offset(2 << 20), None);
    }
}
