//! The guest mailbox, device side: control commands written by the guest to the
//! last MiB of the disk, answers read back from it. The wire format is
//! `guest_tests::mailbox`; the commands are the control socket's.
//!
//! Mailbox I/O never reaches the media and never meets the fault plan: a test
//! can hold its own reads and still talk to the device.

use std::sync::{Arc, Mutex};

use guest_tests::mailbox::{decode, encode, mailbox_offset, MAILBOX_BYTES};
use vm_memory::GuestMemoryBackend;

use crate::blk::Status;
use crate::counters::{bump, Counters};

/// Runs one control request line and returns the answer line.
pub type ControlFn = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// The mailbox of one disk.
pub struct Mailbox {
    offset: u64,
    block: usize,
    control: ControlFn,
    /// The last answer, framed; what reads of the mailbox return.
    answer: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl Mailbox {
    /// The mailbox of a disk of `disk_bytes` with blocks of `block` bytes, if the
    /// disk is big enough to spare it.
    pub fn new(disk_bytes: u64, block: usize, control: ControlFn) -> Option<Self> {
        Some(Mailbox {
            offset: mailbox_offset(disk_bytes)?,
            block,
            control,
            answer: Mutex::new(Vec::new()),
        })
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether `len` bytes at byte `offset` touch the mailbox.
    pub fn touches(&self, offset: u64, len: u64) -> bool {
        offset.saturating_add(len.max(1)) > self.offset
    }

    /// A write into the mailbox: a command if it is one, else refused.
    pub fn write<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        offset: u64,
        data: &[dma::Segment],
        counters: &Counters,
    ) -> Status {
        let len = dma::segment::total_len(data);
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        if offset != self.offset || dma::from_guest(mem, data, &mut buf).is_err() {
            bump(&counters.mailbox_refused);
            return Status::IoErr;
        }
        let (seq, payload) = match decode(&buf) {
            Ok(frame) => frame,
            Err(e) => {
                bump(&counters.mailbox_refused);
                if counters.may_log() {
                    log::warn!("mailbox write refused: {e}");
                }
                return Status::IoErr;
            }
        };
        bump(&counters.mailbox_commands);
        let request = String::from_utf8_lossy(payload);
        let answer = (self.control)(&request);
        log::debug!("mailbox seq={seq}: {request} -> {answer}");
        let mut framed = encode(seq, answer.as_bytes(), self.block);
        framed.truncate(usize::try_from(MAILBOX_BYTES).unwrap_or(usize::MAX));
        if let Ok(mut slot) = self.answer.lock() {
            *slot = framed;
        }
        Status::Ok
    }

    /// A read of the mailbox: the last answer, zero beyond it.
    pub fn read<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        offset: u64,
        data: &[dma::Segment],
    ) -> Status {
        let len = usize::try_from(dma::segment::total_len(data)).unwrap_or(0);
        let from = usize::try_from(offset.saturating_sub(self.offset)).unwrap_or(usize::MAX);
        let mut out = vec![0u8; len];
        if let Ok(answer) = self.answer.lock() {
            if let Some(src) = answer.get(from.min(answer.len())..) {
                let n = src.len().min(len);
                out[..n].copy_from_slice(&src[..n]);
            }
        }
        match dma::to_guest(mem, data, &out) {
            Ok(()) => Status::Ok,
            Err(_) => Status::IoErr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn mailbox() -> Mailbox {
        let echo: ControlFn = Arc::new(|line: &str| format!("answer to {line}"));
        Mailbox::new(64 << 20, 512, echo).unwrap()
    }

    #[test]
    fn a_command_is_answered_on_read() {
        let mb = mailbox();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let counters = Counters::default();
        let cmd = encode(9, br#"{"cmd":"held"}"#, 512);
        mem.write_slice(&cmd, GuestAddress(0x1000)).unwrap();
        let seg = [dma::Segment::new(dma::Gpa(0x1000), 512)];
        assert_eq!(mb.write(&mem, mb.offset(), &seg, &counters), Status::Ok);
        let out = [dma::Segment::new(dma::Gpa(0x2000), 1024)];
        assert_eq!(mb.read(&mem, mb.offset(), &out), Status::Ok);
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        let (seq, payload) = decode(&back).unwrap();
        assert_eq!(seq, 9);
        assert_eq!(payload, br#"answer to {"cmd":"held"}"#);
    }

    #[test]
    fn anything_else_is_refused_and_counted() {
        let mb = mailbox();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let counters = Counters::default();
        let seg = [dma::Segment::new(dma::Gpa(0x1000), 512)];
        // Plain data.
        assert_eq!(mb.write(&mem, mb.offset(), &seg, &counters), Status::IoErr);
        // A valid command, but not at the mailbox's first byte.
        mem.write_slice(&encode(1, b"{}", 512), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mb.write(&mem, mb.offset() + 512, &seg, &counters),
            Status::IoErr
        );
        assert_eq!(counters.snapshot().mailbox_refused, 2);
        assert_eq!(counters.snapshot().mailbox_commands, 0);
        assert!(mb.touches(mb.offset() - 512, 1024));
        assert!(!mb.touches(mb.offset() - 512, 512));
    }
}
