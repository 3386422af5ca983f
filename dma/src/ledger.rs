//! The ledger: every request and finding, in a ring of bounded size.
//!
//! Entries are numbered from 1 in the order they were recorded; a reader keeps
//! the number after the last one it saw as its cursor. When the ring is full the
//! oldest entries are dropped and counted.
//!
//! The ring is bounded twice: by its capacity in entries, and by
//! `capacity × `[`ENTRY_BYTES`] bytes of them ([`Numbered::footprint`]). The
//! text an entry holds is capped where it comes from (tags and labels at 256
//! bytes, refused past that; a finding's detail at 256), so an entry without
//! segments always fits in [`ENTRY_BYTES`]; a request's segments are not
//! capped (a scattered 256 MiB NVMe read has 65,537), so records of many
//! segments count what they hold, and the ring keeps fewer of them. Either way
//! the oldest go first, counted in [`Ledger::dropped`].

use std::collections::VecDeque;
use std::io::{self, Write};

use serde::Serialize;

use crate::finding::Finding;
use crate::request::{Op, ReqId};
use crate::segment::Segment;

/// The longest test tag (`begin TAG`, a fault rule's `tag=`): 256 bytes.
///
/// A guest sets tags through its mailbox, and the tag in force is copied into
/// every request's ticket, record and finding, so a longer one is refused
/// ([`TextTooLong`]) rather than cut: a cut tag would match no rule written for
/// it. 256 bytes is a test name with room to spare.
pub const MAX_TAG_BYTES: usize = 256;

/// The longest mark label (`mark LABEL`): 256 bytes, as for tags and for the
/// same reason; a longer one is refused.
pub const MAX_LABEL_BYTES: usize = 256;

/// The longest finding detail kept: 256 bytes. Details are the engine's own
/// sentences (numbers, addresses, names; about 150 bytes at most), never guest
/// text; a longer one is cut at a character boundary, so an entry's size in
/// the ledger stays bounded whatever a later change writes there.
pub const MAX_DETAIL_BYTES: usize = 256;

/// A tag or label past its cap: the field, its length and the cap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {len} bytes, longer than the limit of {max}")]
pub struct TextTooLong {
    /// `tag` or `label`.
    pub field: &'static str,
    pub len: usize,
    pub max: usize,
}

impl TextTooLong {
    /// `Err` if `text` is longer than `max` bytes.
    pub fn check(field: &'static str, text: &str, max: usize) -> Result<(), TextTooLong> {
        if text.len() > max {
            return Err(TextTooLong {
                field,
                len: text.len(),
                max,
            });
        }
        Ok(())
    }
}

/// The default number of entries kept.
pub const DEFAULT_CAPACITY: usize = 65_536;

/// The bytes budgeted per entry: a ledger of capacity N holds at most
/// N × 1 KiB of entries (64 MiB at [`DEFAULT_CAPACITY`]), so `--ledger-capacity`
/// raises the byte budget with the count, and no second option is needed.
///
/// The worst case of an entry without segments, from the caps on its text: a
/// mark with a 256-byte label and a 256-byte tag, or a finding with a
/// 256-byte detail, a 256-byte tag and its class, is `size_of::<Numbered>()`
/// (under 200 bytes) plus at most 530 bytes of text: under 750 bytes (tested).
/// A request record adds 16 bytes per segment, so one with a full tag and up
/// to 16 segments fits too; one with more takes the room of more entries.
/// Past the budget the oldest entries are dropped, but never the newest, so
/// the most a ledger holds is its budget plus one entry (a request's segments
/// are bounded by the interface: a virtio chain's `seg_max`, an NVMe transfer's
/// pages).
pub const ENTRY_BYTES: usize = 1024;

/// The life of one request, recorded when it completes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    pub request: ReqId,
    pub op: Op,
    pub queue: u16,
    pub lba: u64,
    pub len: u64,
    pub segments: Vec<Segment>,
    /// The guest memory the DMA moved the data to or from instead of
    /// `segments`, when the device moved it astray (the wrong-page mutant):
    /// the ledger says what the device touched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<Vec<Segment>>,
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

impl Numbered {
    /// The bytes the entry takes in the ledger: itself and what it owns.
    pub fn footprint(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
        let owned = match &self.entry {
            Entry::Request(r) => {
                (r.segments.capacity() + r.moved_to.as_ref().map_or(0, Vec::capacity))
                    * std::mem::size_of::<Segment>()
                    + r.wait.capacity()
                    + r.status.capacity()
                    + text(&r.tag)
            }
            Entry::Finding(f) => f.detail.capacity() + text(&f.class) + text(&f.tag),
            Entry::Mark(m) => m.label.capacity() + text(&m.tag),
        };
        std::mem::size_of::<Numbered>() + owned
    }
}

/// One page of entries ([`Ledger::page`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub entries: Vec<Numbered>,
    /// The cursor for the next page: the first entry left out, or the next to
    /// be recorded.
    pub next: u64,
    /// Whether entries were left out.
    pub more: bool,
}

#[derive(Debug)]
pub struct Ledger {
    entries: VecDeque<Numbered>,
    capacity: usize,
    /// The most bytes of entries kept (but the newest is always kept).
    byte_budget: usize,
    /// The bytes of the entries kept ([`Numbered::footprint`]).
    bytes: usize,
    next_seq: u64,
    dropped: u64,
}

impl Ledger {
    /// A ledger of at most `capacity` entries (at least 1) and
    /// `capacity × `[`ENTRY_BYTES`] bytes of them.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Ledger {
            entries: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
            byte_budget: capacity.saturating_mul(ENTRY_BYTES),
            bytes: 0,
            next_seq: 1,
            dropped: 0,
        }
    }

    pub fn push(&mut self, entry: Entry) {
        let e = Numbered {
            seq: self.next_seq,
            entry,
        };
        self.bytes += e.footprint();
        self.entries.push_back(e);
        self.next_seq += 1;
        while self.entries.len() > 1
            && (self.entries.len() > self.capacity || self.bytes > self.byte_budget)
        {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.footprint();
                self.dropped += 1;
            }
        }
    }

    /// The kept entries numbered `cursor` or later.
    fn tail(&self, cursor: u64) -> std::collections::vec_deque::Iter<'_, Numbered> {
        let first = self.entries.front().map_or(self.next_seq, |e| e.seq);
        let skip = usize::try_from(cursor.saturating_sub(first)).unwrap_or(usize::MAX);
        self.entries.range(skip.min(self.entries.len())..)
    }

    /// Entries numbered `cursor` or later, and the cursor for the next call.
    pub fn since(&self, cursor: u64) -> (Vec<Numbered>, u64) {
        (self.tail(cursor).cloned().collect(), self.next_seq)
    }

    /// At most `limit` entries numbered `cursor` or later: only those are
    /// copied, so a reader holds the lock (that every completion needs) for
    /// the page, not for the whole tail.
    pub fn page(&self, cursor: u64, limit: usize) -> Page {
        let mut tail = self.tail(cursor);
        let entries = tail.by_ref().take(limit).cloned().collect();
        let (next, more) = tail
            .next()
            .map_or((self.next_seq, false), |e| (e.seq, true));
        Page {
            entries,
            next,
            more,
        }
    }

    /// The findings numbered `cursor` or later (only they are copied), and the
    /// cursor for the next call.
    pub fn findings_since(&self, cursor: u64) -> (Vec<Numbered>, u64) {
        let found = self
            .tail(cursor)
            .filter(|e| matches!(e.entry, Entry::Finding(_)))
            .cloned()
            .collect();
        (found, self.next_seq)
    }

    /// The number the next entry will get: a cursor past everything recorded.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The bytes of the entries kept ([`Numbered::footprint`]).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The most bytes of entries kept: capacity × [`ENTRY_BYTES`] (the newest
    /// entry is kept even past it).
    pub fn byte_budget(&self) -> usize {
        self.byte_budget
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

    /// Entries dropped because the ring was full (of entries or of bytes).
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
            moved_to: None,
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

    /// The heap and inline bytes an entry holds, counted from outside.
    fn held_bytes(e: &Numbered) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        std::mem::size_of::<Numbered>()
            + match &e.entry {
                Entry::Request(r) => {
                    (r.segments.len() + r.moved_to.as_ref().map_or(0, Vec::len))
                        * std::mem::size_of::<Segment>()
                        + r.wait.len()
                        + r.status.len()
                        + text(&r.tag)
                }
                Entry::Finding(f) => f.detail.len() + text(&f.class) + text(&f.tag),
                Entry::Mark(m) => m.label.len() + text(&m.tag),
            }
    }

    /// A request of many segments (as an NVMe PRP list of scattered pages
    /// gives one) costs bytes in proportion: the ring keeps fewer of them,
    /// never more than its byte budget, and counts what it dropped.
    #[test]
    fn ring_is_bounded_in_bytes_whatever_the_entries_hold() {
        let capacity = 256;
        let mut l = Ledger::new(capacity);
        let big = |id: u64| {
            let Entry::Request(mut r) = record(id) else {
                unreachable!()
            };
            r.segments = (0..4096u64)
                .map(|i| Segment::new(crate::Gpa(i * 0x2000), 4096))
                .collect();
            Entry::Request(r)
        };
        for i in 0..capacity as u64 {
            l.push(big(i));
        }
        let (kept, _) = l.since(0);
        let bytes: usize = kept.iter().map(held_bytes).sum();
        let budget = capacity * ENTRY_BYTES;
        assert_eq!(l.byte_budget(), budget);
        assert!(l.bytes() <= budget, "{} B counted", l.bytes());
        assert_eq!(
            l.bytes(),
            kept.iter().map(Numbered::footprint).sum::<usize>()
        );
        assert!(
            bytes <= budget,
            "{} entries of 4096 segments hold {bytes} B, past the budget of {budget} B",
            kept.len()
        );
        assert!(!kept.is_empty(), "the newest entry is kept");
        assert_eq!(
            l.dropped(),
            capacity as u64 - kept.len() as u64,
            "what was dropped is counted"
        );
        // Small entries still fill the ring to its count.
        for i in 0..capacity as u64 {
            l.push(record(i));
        }
        assert_eq!(l.len(), capacity);
    }

    /// The per-entry worst case [`ENTRY_BYTES`] states: an entry with every
    /// text at its cap, and a request with a full tag and 16 segments, fit.
    #[test]
    fn an_entry_at_every_cap_fits_its_share_of_the_budget() {
        let tag = Some("t".repeat(MAX_TAG_BYTES));
        let mark = Entry::Mark(MarkRecord {
            label: "l".repeat(MAX_LABEL_BYTES),
            at_ns: u64::MAX,
            tag: tag.clone(),
        });
        let finding = Entry::Finding(Finding {
            finding: crate::FindingKind::BufferReusedDuringDma,
            info: false,
            request: ReqId(u64::MAX),
            op: Op::Read,
            queue: u16::MAX,
            lba: u64::MAX,
            gpa: crate::Gpa(u64::MAX),
            len: u64::MAX,
            class: Some("other-canary".into()),
            bytes: u64::MAX,
            other_request: Some(ReqId(u64::MAX)),
            at_ns: u64::MAX,
            tag: tag.clone(),
            detail: "d".repeat(MAX_DETAIL_BYTES),
        });
        let Entry::Request(mut r) = record(1) else {
            unreachable!()
        };
        r.segments = vec![Segment::new(crate::Gpa(0), 512); 16];
        r.wait = crate::Wait::Delay(std::time::Duration::from_millis(600_000)).to_string();
        r.status = "unrecovered-read-error".into();
        r.tag = tag;
        for entry in [mark, finding, Entry::Request(r)] {
            let n = Numbered { seq: 1, entry };
            assert!(n.footprint() <= ENTRY_BYTES, "{} B: {n:?}", n.footprint());
            // Text-only entries stay under the 750 bytes the doc states.
            if !matches!(n.entry, Entry::Request(_)) {
                assert!(n.footprint() < 750, "{} B", n.footprint());
            }
        }
    }

    /// A page copies at most `limit` entries and says where the next starts.
    #[test]
    fn a_page_takes_at_most_limit_entries_from_the_cursor() {
        let mut l = Ledger::new(10);
        for i in 0..14 {
            l.push(record(i));
        }
        // Kept: 5..=14.
        let seqs = |p: &Page| p.entries.iter().map(|e| e.seq).collect::<Vec<_>>();
        let p = l.page(0, 3);
        assert_eq!((seqs(&p), p.next, p.more), (vec![5, 6, 7], 8, true));
        let p = l.page(12, 3);
        assert_eq!((seqs(&p), p.next, p.more), (vec![12, 13, 14], 15, false));
        let p = l.page(13, 1000);
        assert_eq!((seqs(&p), p.next, p.more), (vec![13, 14], 15, false));
        let p = l.page(u64::MAX, 3);
        assert_eq!((seqs(&p), p.next, p.more), (vec![], 15, false));
        let p = l.page(6, 0);
        assert_eq!((seqs(&p), p.next, p.more), (vec![], 6, true));
        assert_eq!(l.next_seq(), 15);
        assert!(l.findings_since(0).0.is_empty());
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
