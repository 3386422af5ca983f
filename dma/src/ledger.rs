//! The ledger: every request and finding, in a ring of bounded size.
//!
//! Entries are numbered from 1 in the order they were recorded; a reader keeps
//! the number after the last one it saw as its cursor. When the ring is full the
//! oldest entries are dropped and counted.

use std::collections::VecDeque;
use std::io::{self, Write};

use serde::Serialize;

use crate::finding::Finding;
use crate::request::{Op, ReqId};
use crate::segment::Segment;

/// The default number of entries kept.
pub const DEFAULT_CAPACITY: usize = 65_536;

/// The life of one request, recorded when it completes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    pub request: ReqId,
    pub op: Op,
    pub queue: u16,
    pub lba: u64,
    pub len: u64,
    pub segments: Vec<Segment>,
    /// Nanoseconds since the engine started.
    pub arrived_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dma_ns: Option<u64>,
    pub completed_ns: u64,
    /// How the request waited: `none`, `delay 1000 ms`, `hold`.
    pub wait: String,
    /// The status the guest got: `ok`, `ioerr`, `unsupp`, `abandoned`; or,
    /// for an IOERR with a known cause, the cause: `unrecovered-read-error`,
    /// `write-fault` (bad blocks), `power-cut` (a rule cut the power on it),
    /// `cut-off` (it arrived before a power cut), `failed-at-stop` (it was
    /// still waiting when the daemon was told to stop).
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// One ledger entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Entry {
    Request(RequestRecord),
    Finding(Finding),
    /// A moment the guest or the host named (e.g. "fork"), on the device's clock.
    Mark(MarkRecord),
}

/// A named moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MarkRecord {
    pub label: String,
    pub at_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// A numbered entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Numbered {
    pub seq: u64,
    #[serde(flatten)]
    pub entry: Entry,
}

#[derive(Debug)]
pub struct Ledger {
    entries: VecDeque<Numbered>,
    capacity: usize,
    next_seq: u64,
    dropped: u64,
}

impl Ledger {
    pub fn new(capacity: usize) -> Self {
        Ledger {
            entries: VecDeque::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            next_seq: 1,
            dropped: 0,
        }
    }

    pub fn push(&mut self, entry: Entry) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
            self.dropped += 1;
        }
        self.entries.push_back(Numbered {
            seq: self.next_seq,
            entry,
        });
        self.next_seq += 1;
    }

    /// Entries numbered `cursor` or later, and the cursor for the next call.
    pub fn since(&self, cursor: u64) -> (Vec<Numbered>, u64) {
        let first = self.entries.front().map_or(self.next_seq, |e| e.seq);
        let skip = usize::try_from(cursor.saturating_sub(first)).unwrap_or(usize::MAX);
        let out = self.entries.iter().skip(skip).cloned().collect();
        (out, self.next_seq)
    }

    pub fn findings(&self) -> impl Iterator<Item = &Finding> {
        self.entries.iter().filter_map(|e| match &e.entry {
            Entry::Finding(f) => Some(f),
            Entry::Request(_) | Entry::Mark(_) => None,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries dropped because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Writes every entry as one JSON object per line.
    pub fn write_json_lines(&self, out: &mut dyn Write) -> io::Result<()> {
        for e in &self.entries {
            serde_json::to_writer(&mut *out, e)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> Entry {
        Entry::Request(RequestRecord {
            request: ReqId(id),
            op: Op::Read,
            queue: 0,
            lba: id,
            len: 512,
            segments: vec![Segment::new(crate::Gpa(0x1000), 512)],
            arrived_ns: 1,
            dma_ns: Some(2),
            completed_ns: 3,
            wait: "none".into(),
            status: "ok".into(),
            tag: None,
        })
    }

    #[test]
    fn ring_drops_oldest_and_counts() {
        let mut l = Ledger::new(3);
        for i in 0..5 {
            l.push(record(i));
        }
        assert_eq!(l.len(), 3);
        assert_eq!(l.dropped(), 2);
        let (all, next) = l.since(0);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(next, 6);
        let (tail, _) = l.since(5);
        assert_eq!(tail.len(), 1);
        assert!(l.since(6).0.is_empty());
    }

    #[test]
    fn json_lines_carry_kind_and_seq() {
        let mut l = Ledger::new(10);
        l.push(record(9));
        let mut out = Vec::new();
        l.write_json_lines(&mut out).unwrap();
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["kind"], "request");
        assert_eq!(line["seq"], 1);
        assert_eq!(line["op"], "read");
        assert_eq!(line["segments"][0]["gpa"], "0x1000");
    }
}
