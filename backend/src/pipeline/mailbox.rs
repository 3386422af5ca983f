//! The guest mailbox, device side: control commands written by the guest to the
//! last MiB of the disk, answers read back from it. The wire format is
//! `wire::mailbox`; the commands are the control socket's.
//!
//! Mailbox I/O never reaches the media and never meets the fault plan: a test
//! can hold its own reads and still talk to the device.

use std::sync::Mutex;

use vm_memory::GuestMemoryBackend;
use wire::mailbox::{decode, encode, mailbox_offset, MAX_PAYLOAD};

use crate::control::protocol::ControlFn;
use crate::counters::{bump, Counters};
use wire::control::refusal;

/// A mailbox access that was not served: the guest is told its request
/// failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused;

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
    ) -> Result<(), Refused> {
        let len = dma::segment::total_len(data);
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        if offset != self.offset || dma::from_guest(mem, data, &mut buf).is_err() {
            bump(&counters.mailbox_refused);
            return Err(Refused);
        }
        let (seq, payload) =
            decode(&buf).map_err(|e| refuse(counters, format_args!("write refused: {e}")))?;
        bump(&counters.mailbox_commands);
        let request = String::from_utf8_lossy(payload);
        let mut answer = (self.control)(&request);
        log::debug!("mailbox seq={seq}: {request} -> {answer}");
        if answer.len() > MAX_PAYLOAD {
            // Cut, the frame would lie about its length; the command has run,
            // only its answer is too long to read back here.
            bump(&counters.mailbox_refused);
            answer = too_long(answer.len());
        }
        let framed = encode(seq, answer.as_bytes(), self.block);
        if let Ok(mut slot) = self.answer.lock() {
            *slot = framed;
        }
        Ok(())
    }

    /// A read of the mailbox: the last answer, zero beyond it. A read that
    /// starts before the mailbox is refused: its first bytes would be the
    /// media's, and the mailbox never reaches the media.
    pub fn read<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        offset: u64,
        data: &[dma::Segment],
        counters: &Counters,
    ) -> Result<(), Refused> {
        let Some(from) = offset.checked_sub(self.offset) else {
            return Err(refuse(
                counters,
                format_args!(
                    "read refused: it starts {} bytes before the mailbox",
                    self.offset - offset
                ),
            ));
        };
        let len = usize::try_from(dma::segment::total_len(data)).unwrap_or(0);
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        let mut out = vec![0u8; len];
        if let Ok(answer) = self.answer.lock() {
            if let Some(src) = answer.get(from.min(answer.len())..) {
                let n = src.len().min(len);
                out[..n].copy_from_slice(&src[..n]);
            }
        }
        dma::to_guest(mem, data, &out).map_err(|_| Refused)
    }
}

/// Counts a refused mailbox I/O and says why, rate-limited.
fn refuse(counters: &Counters, why: std::fmt::Arguments<'_>) -> Refused {
    bump(&counters.mailbox_refused);
    if counters.may_log() {
        log::warn!("mailbox {why}");
    }
    Refused
}

/// The answer in place of one longer than the mailbox holds.
fn too_long(len: usize) -> String {
    refusal(format!(
        "the answer ({len} bytes) is longer than the mailbox holds ({MAX_PAYLOAD} bytes): \
         ask for less (ledger: a smaller limit) or use the control socket"
    ))
    .to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
        assert_eq!(mb.write(&mem, mb.offset(), &seg, &counters), Ok(()));
        let out = [dma::Segment::new(dma::Gpa(0x2000), 1024)];
        assert_eq!(mb.read(&mem, mb.offset(), &out, &counters), Ok(()));
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
        assert_eq!(mb.write(&mem, mb.offset(), &seg, &counters), Err(Refused));
        // A valid command, but not at the mailbox's first byte.
        mem.write_slice(&encode(1, b"{}", 512), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mb.write(&mem, mb.offset() + 512, &seg, &counters),
            Err(Refused)
        );
        assert_eq!(counters.snapshot().mailbox_refused, 2);
        assert_eq!(counters.snapshot().mailbox_commands, 0);
        assert!(mb.touches(mb.offset() - 512, 1024));
        assert!(!mb.touches(mb.offset() - 512, 512));
    }

    /// An answer longer than the mailbox reads back as a whole frame that
    /// says so, not as a frame cut short under a header claiming it all.
    #[test]
    fn an_answer_too_long_for_the_mailbox_is_replaced_by_a_refusal() {
        let long: ControlFn = Arc::new(|_: &str| "x".repeat(2 << 20));
        let mb = Mailbox::new(64 << 20, 512, long).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let counters = Counters::default();
        mem.write_slice(&encode(3, br#"{"cmd":"ledger"}"#, 512), GuestAddress(0))
            .unwrap();
        let seg = [dma::Segment::new(dma::Gpa(0), 512)];
        assert_eq!(mb.write(&mem, mb.offset(), &seg, &counters), Ok(()));
        let whole = [dma::Segment::new(dma::Gpa(0x10_0000), 1 << 20)];
        assert_eq!(mb.read(&mem, mb.offset(), &whole, &counters), Ok(()));
        let mut back = vec![0u8; 1 << 20];
        mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        let (seq, payload) = decode(&back).expect("a whole frame");
        assert_eq!(seq, 3);
        let answer: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(answer["ok"], false);
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains("2097152 bytes"), "{error}");
        assert_eq!(counters.snapshot().mailbox_commands, 1);
        assert_eq!(counters.snapshot().mailbox_refused, 1);
    }

    /// A read from before the mailbox into it is refused whole: answer bytes
    /// at the wrong offset of the buffer were what it got before.
    #[test]
    fn a_read_that_crosses_into_the_mailbox_is_refused() {
        let mb = mailbox();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let counters = Counters::default();
        mem.write_slice(&encode(1, br#"{"cmd":"held"}"#, 512), GuestAddress(0x1000))
            .unwrap();
        let seg = [dma::Segment::new(dma::Gpa(0x1000), 512)];
        assert_eq!(mb.write(&mem, mb.offset(), &seg, &counters), Ok(()));
        mem.write_slice(&[0x5a; 1024], GuestAddress(0x2000))
            .unwrap();
        let out = [dma::Segment::new(dma::Gpa(0x2000), 1024)];
        assert_eq!(
            mb.read(&mem, mb.offset() - 512, &out, &counters),
            Err(Refused)
        );
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a), "guest memory untouched");
        assert_eq!(counters.snapshot().mailbox_refused, 1);
    }
}
