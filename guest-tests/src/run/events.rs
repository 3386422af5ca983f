//! Reading what the guest and the daemon wrote: the guest's events as QEMU
//! appends them ([`EventTail`]), and whole files of events or JSON lines
//! (the ledger) once the run is over.

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::protocol::Event;

/// The events a guest has written so far, read as QEMU appends them.
#[derive(Debug)]
pub(super) struct EventTail {
    path: PathBuf,
    offset: u64,
    /// The start of a line not yet complete.
    partial: Vec<u8>,
}

impl EventTail {
    pub(super) fn new(path: &Path) -> Self {
        EventTail {
            path: path.to_owned(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The events of the lines completed since the last call.
    pub(super) fn poll(&mut self) -> Vec<Event> {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return Vec::new();
        };
        let mut fresh = Vec::new();
        if f.seek(SeekFrom::Start(self.offset)).is_err() || f.read_to_end(&mut fresh).is_err() {
            return Vec::new();
        }
        self.offset += fresh.len() as u64;
        self.partial.extend_from_slice(&fresh);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let lines: Vec<u8> = self.partial.drain(..=end).collect();
        String::from_utf8_lossy(&lines)
            .lines()
            .filter_map(Event::from_line)
            .collect()
    }
}

/// Every line of a file that is JSON (a ledger), parsed.
pub(super) fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every event in a file (the guest's serial port: other lines are skipped).
pub(super) fn read_events(path: &Path) -> Vec<Event> {
    let Ok(f) = fs::File::open(path) else {
        return Vec::new();
    };
    BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| Event::from_line(&l))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::HostAction;

    #[test]
    fn the_event_tail_yields_each_complete_line_once() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut tail = EventTail::new(&path);
        assert!(tail.poll().is_empty(), "no file yet");
        let host = Event::Host {
            test: "daemon-restart".into(),
            action: HostAction::RestartDaemon,
        };
        let line = host.to_line();
        let (first, rest) = line.split_at(10);
        let mut f = fs::File::create(&path).unwrap();
        write!(f, "console noise\n{first}").unwrap();
        assert!(tail.poll().is_empty(), "half a line is not an event");
        write!(f, "{rest}").unwrap();
        assert_eq!(tail.poll(), vec![host.clone()]);
        assert!(tail.poll().is_empty(), "each event comes once");
        write!(f, "{line}{}", Event::Done.to_line()).unwrap();
        assert_eq!(tail.poll(), vec![host, Event::Done]);
    }
}
