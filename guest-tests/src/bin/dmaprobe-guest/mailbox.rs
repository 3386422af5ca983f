//! The guest's end of the device mailbox: control commands written to the
//! last MiB of the disk, answers read back (see `wire::mailbox`).
//!
//! Mailbox I/O is O_DIRECT on its own descriptor and never held or delayed by
//! the device, so a test can hold its own reads and still talk to the device.

use std::cell::Cell;
use std::fs;

use serde_json::Value;
use wire::mailbox::{decode, encode, mailbox_offset, HEADER_LEN};

use crate::io::{AlignedBuf, Cache, Fd, PAGE};
use crate::{OrStop, Stop};

/// Bytes read for an answer first; a longer answer is read again whole.
const FIRST_READ: usize = 64 << 10;

pub struct Mailbox {
    fd: Fd,
    offset: u64,
    seq: Cell<u32>,
}

impl Mailbox {
    /// The mailbox of `disk` (`/dev/vda`), found from the disk's size.
    pub fn open(disk: &str) -> Result<Mailbox, Stop> {
        let name = disk.trim_start_matches("/dev/");
        let sectors: u64 = fs::read_to_string(format!("/sys/block/{name}/size"))
            .or_error()?
            .trim()
            .parse()
            .map_err(|_| Stop::Error(format!("/sys/block/{name}/size is not a number")))?;
        let offset = mailbox_offset(sectors * 512)
            .ok_or_else(|| Stop::Error(format!("{disk} is too small for a mailbox")))?;
        Ok(Mailbox {
            fd: Fd::open(disk, Cache::Direct).or_error()?,
            offset,
            seq: Cell::new(0),
        })
    }

    /// The mailbox's byte offset on the disk: the disk's data ends there.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Sends a command (a JSON object without `v`) and returns its `result`;
    /// an error answer is the harness's trouble.
    pub fn call(&self, mut request: Value) -> Result<Value, Stop> {
        request["v"] = Value::from(1);
        let seq = self.seq.get() + 1;
        self.seq.set(seq);
        let framed = encode(seq, request.to_string().as_bytes(), PAGE);
        let mut out = AlignedBuf::new(framed.len(), 0).or_error()?;
        out.as_mut_slice().copy_from_slice(&framed);
        self.fd
            .write_all_at(out.as_slice(), self.offset)
            .map_err(|e| {
                Stop::Error(format!(
                    "mailbox write refused ({e}): was dmaprobe started with --mailbox?"
                ))
            })?;
        let answer = self.read_answer(FIRST_READ)?;
        let (got_seq, payload) = match decode(&answer) {
            Ok((s, p)) => (s, p.to_vec()),
            Err(wire::mailbox::FrameError::Length(n)) => {
                let whole = self.read_answer(HEADER_LEN + n as usize)?;
                let (s, p) =
                    decode(&whole).map_err(|e| Stop::Error(format!("mailbox answer: {e}")))?;
                (s, p.to_vec())
            }
            Err(e) => return Err(Stop::Error(format!("mailbox answer: {e}"))),
        };
        if got_seq != seq {
            return Err(Stop::Error(format!(
                "mailbox answered command {got_seq}, not {seq}"
            )));
        }
        let v: Value = serde_json::from_slice(&payload)
            .map_err(|e| Stop::Error(format!("mailbox answer is not JSON: {e}")))?;
        if v["ok"] == Value::Bool(true) {
            Ok(v["result"].clone())
        } else {
            Err(Stop::Error(format!(
                "the device refused {request}: {}",
                v["error"].as_str().unwrap_or("no reason")
            )))
        }
    }

    /// Names this moment in the device's ledger, for the timeline; a failure
    /// only costs the mark.
    pub fn mark(&self, label: &str) {
        let _ = self.call(serde_json::json!({"cmd": "mark", "label": label}));
    }

    fn read_answer(&self, len: usize) -> Result<Vec<u8>, Stop> {
        let len = len.div_ceil(PAGE) * PAGE;
        let mut buf = AlignedBuf::new(len, 0).or_error()?;
        self.fd
            .read_exact_at(buf.as_mut_slice(), self.offset)
            .or_error()?;
        Ok(buf.as_slice().to_vec())
    }
}
