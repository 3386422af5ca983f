//! A test run's files: kept where the user asked, the end of a log for a
//! message, one boot's events appended to the first's.

use std::fs;
use std::path::Path;

/// Copies a test run's logs (console, events, daemon log, ledgers, timeline,
/// soak samples) from its work directory `from` to `to`.
pub(super) fn keep_logs(from: &Path, to: &Path) {
    if fs::create_dir_all(to).is_err() {
        return;
    }
    let ledgers = fs::read_dir(from)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ledger.") && n.ends_with(".jsonl"));
    let logs = [
        "console.log",
        "events.jsonl",
        "daemon.log",
        "timeline.svg",
        "samples.jsonl",
    ];
    for name in logs.into_iter().map(str::to_owned).chain(ledgers) {
        let _ = fs::copy(from.join(&name), to.join(&name));
    }
}

/// The last `n` lines of a file, on one line.
pub(super) fn tail(path: &Path, n: usize) -> String {
    last_lines(&fs::read_to_string(path).unwrap_or_default(), n)
}

/// The last `n` lines of `text` that are not blank, on one line.
pub(super) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Appends the file `from` to `to`.
pub(super) fn append_file(from: &Path, to: &Path) -> Result<(), String> {
    let mut src =
        fs::File::open(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(to)
        .and_then(|mut dst| std::io::copy(&mut src, &mut dst))
        .map(drop)
        .map_err(|e| format!("cannot append to {}: {e}", to.display()))
}
