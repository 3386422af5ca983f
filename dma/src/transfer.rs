//! Copies between guest memory and byte buffers.

use vm_memory::{Bytes, GuestMemoryBackend};

use crate::segment::{total_len, Segment};

/// How much of a transfer happened before it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialTransfer {
    pub done: u64,
    pub expected: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("Buffer of {buf} bytes for segments of {segments} bytes")]
    LengthMismatch { buf: usize, segments: u64 },
    #[error("Guest memory access at {gpa} failed after {} of {} bytes", .partial.done, .partial.expected)]
    Memory {
        gpa: crate::Gpa,
        partial: PartialTransfer,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

impl TransferError {
    /// The bytes moved before the failure, if any moved.
    pub fn partial(&self) -> Option<PartialTransfer> {
        match self {
            TransferError::Memory { partial, .. } => Some(*partial),
            TransferError::LengthMismatch { .. } => None,
        }
    }
}

/// Copies `data` into guest memory across `segments` (device-to-memory: a read).
pub fn to_guest<M: GuestMemoryBackend>(
    mem: &M,
    segments: &[Segment],
    data: &[u8],
) -> Result<(), TransferError> {
    walk(segments, data.len(), |seg, at| {
        mem.write_slice(&data[at..at + seg.len_usize()], seg.gpa.into())
    })
}

/// Copies guest memory across `segments` into `buf` (memory-to-device: a write).
pub fn from_guest<M: GuestMemoryBackend>(
    mem: &M,
    segments: &[Segment],
    buf: &mut [u8],
) -> Result<(), TransferError> {
    walk(segments, buf.len(), |seg, at| {
        mem.read_slice(&mut buf[at..at + seg.len_usize()], seg.gpa.into())
    })
}

fn walk(
    segments: &[Segment],
    buf_len: usize,
    mut copy: impl FnMut(&Segment, usize) -> Result<(), vm_memory::GuestMemoryError>,
) -> Result<(), TransferError> {
    let expected = total_len(segments);
    if u64::try_from(buf_len).ok() != Some(expected) {
        return Err(TransferError::LengthMismatch {
            buf: buf_len,
            segments: expected,
        });
    }
    let mut at = 0usize;
    for seg in segments {
        copy(seg, at).map_err(|source| TransferError::Memory {
            gpa: seg.gpa,
            partial: PartialTransfer {
                done: at as u64,
                expected,
            },
            source,
        })?;
        at += seg.len_usize();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Gpa;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap()
    }

    #[test]
    fn scatter_and_gather_round_trip() {
        let mem = mem();
        let segs = [
            Segment::new(Gpa(0x1000), 100),
            Segment::new(Gpa(0x3000), 412),
        ];
        let data: Vec<u8> = (0..512u32)
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        to_guest(&mem, &segs, &data).unwrap();
        let mut back = vec![0u8; 512];
        from_guest(&mem, &segs, &mut back).unwrap();
        assert_eq!(back, data);
        let mut first = [0u8; 100];
        mem.read_slice(&mut first, GuestAddress(0x1000)).unwrap();
        assert_eq!(first[..], data[..100]);
    }

    #[test]
    fn out_of_memory_segment_is_a_partial_transfer() {
        let mem = mem();
        let segs = [
            Segment::new(Gpa(0x1000), 512),
            Segment::new(Gpa(0x10_0000), 512),
        ];
        let err = to_guest(&mem, &segs, &[1u8; 1024]).unwrap_err();
        assert_eq!(
            err.partial(),
            Some(PartialTransfer {
                done: 512,
                expected: 1024
            })
        );
    }

    #[test]
    fn length_mismatch_is_refused() {
        let mem = mem();
        let segs = [Segment::new(Gpa(0), 512)];
        assert!(matches!(
            to_guest(&mem, &segs, &[0u8; 511]),
            Err(TransferError::LengthMismatch { .. })
        ));
    }
}
