//! The control plane: the commands that drive a running daemon, the JSON-lines
//! protocol that carries them, and the UNIX socket that serves it.
//!
//! One request per line, one response per line:
//!
//! ```text
//! → {"v":1,"cmd":"held"}
//! ← {"v":1,"ok":true,"result":[{"request":7,"queue":0,"op":"read",...}]}
//! → {"v":1,"cmd":"release","id":7}
//! ← {"v":1,"ok":true,"result":{"released":1}}
//! → {"v":1,"cmd":"nonsense"}
//! ← {"v":1,"ok":false,"error":"unknown command ..."}
//! ```
//!
//! `v` may be left out; a version other than [`PROTOCOL_VERSION`] is refused.
//! The same commands reach the daemon from inside the guest through the
//! mailbox (see `mailbox`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dma::{Checks, RuleSpec};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::serve::DaemonState;

/// The version of the control protocol.
pub const PROTOCOL_VERSION: u32 = 1;
/// The longest request line accepted.
const MAX_LINE: usize = 1 << 20;
/// Clients served at once; more are told so and closed.
const MAX_CLIENTS: usize = 32;
/// Ledger entries returned by one `ledger` command unless `limit` says otherwise.
const DEFAULT_LEDGER_LIMIT: usize = 1000;
/// The most of a client's own text (a rule, a match) an error quotes back: an
/// answer stays short however long the request was.
const MAX_QUOTED: usize = 80;

/// A command, as it arrives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Counters, checks, rules and held requests in brief.
    Status,
    /// The requests waiting for a delay or a release.
    Held,
    /// Release held requests: one (`id`), all (`all`), a queue's, or those matching.
    Release {
        id: Option<u64>,
        #[serde(default)]
        all: bool,
        queue: Option<u16>,
        /// Match keys in the rule line form, e.g. `op=read,lba=0-7`.
        #[serde(rename = "match")]
        matching: Option<String>,
    },
    /// The fault rules in force, with their counters.
    Rules,
    AddRule {
        rule: String,
    },
    RemoveRule {
        id: u64,
    },
    /// Register the guest's zero page (hex or decimal), or clear it (no gpa).
    ZeroPage {
        gpa: Option<Value>,
    },
    /// Requests arriving from now on carry this test tag.
    Begin {
        tag: String,
    },
    End,
    /// Record a named moment (e.g. "fork") in the ledger, for timelines.
    Mark {
        label: String,
    },
    /// Findings recorded since a ledger cursor (default: all kept).
    Findings {
        since: Option<u64>,
    },
    /// Ledger entries since a cursor.
    Ledger {
        since: Option<u64>,
        limit: Option<usize>,
    },
    /// Counters and finding counts back to zero.
    Reset,
    /// Cut the power: what the write cache held is lost (with `torn`, each
    /// volatile write keeps a random leading part, drawn from `seed`).
    PowerCut {
        #[serde(default)]
        torn: bool,
        seed: Option<u64>,
    },
    /// Bad blocks: `add` (`lba`, `blocks`, `kind` read|write), `clear` (all,
    /// or those of `lba`/`blocks`, of `kind` if given) or `list`.
    MediaError {
        action: MediaErrorAction,
        lba: Option<u64>,
        blocks: Option<u64>,
        kind: Option<nvme_model::MediaErrorKind>,
    },
    /// Switch checks on or off; those not given stay as they are.
    Checks {
        canary: Option<bool>,
        snapshot: Option<bool>,
        overlap: Option<bool>,
        ledger: Option<bool>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MediaErrorAction {
    Add,
    Clear,
    List,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    v: Option<u32>,
    #[serde(flatten)]
    command: Command,
}

/// Answers one request line with one response line (no newline).
pub fn handle_line(state: &DaemonState, line: &str) -> String {
    let response = match parse_request(line) {
        Ok(cmd) => match execute(state, cmd) {
            Ok(result) => json!({"v": PROTOCOL_VERSION, "ok": true, "result": result}),
            Err(error) => json!({"v": PROTOCOL_VERSION, "ok": false, "error": error}),
        },
        Err(error) => json!({"v": PROTOCOL_VERSION, "ok": false, "error": error}),
    };
    response.to_string()
}

/// Parses a request line; the error says what is wrong with it.
pub fn parse_request(line: &str) -> Result<Command, String> {
    let value: Value = serde_json::from_str(line.trim()).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(v) = value.get("v") {
        if v.as_u64() != Some(u64::from(PROTOCOL_VERSION)) {
            return Err(format!(
                "protocol version {v} is not supported (this daemon speaks {PROTOCOL_VERSION})"
            ));
        }
    }
    let cmd = value.get("cmd").and_then(Value::as_str).map(str::to_owned);
    let envelope: Envelope = serde_json::from_value(value).map_err(|e| match cmd {
        None => "no \"cmd\" given".to_owned(),
        Some(c) => format!("bad {c:?} request: {e}"),
    })?;
    let _ = envelope.v;
    Ok(envelope.command)
}

/// Carries out a command.
pub fn execute(state: &DaemonState, cmd: Command) -> Result<Value, String> {
    let engine = state.engine();
    Ok(match cmd {
        Command::Status => state.status(),
        Command::Held => json!(state.parked()),
        Command::Release {
            id,
            all,
            queue,
            matching,
        } => {
            let released = match (id, all, queue, matching) {
                (Some(id), false, None, None) => {
                    state.release(dma::schedule::Release::One(dma::ReqId(id)))
                }
                (None, true, None, None) => state.release(dma::schedule::Release::All),
                (None, false, Some(q), None) => state.release(dma::schedule::Release::Queue(q)),
                (None, false, None, Some(m)) => {
                    let spec = RuleSpec::parse_match(&m)
                        .map_err(|e| format!("match {}: {e}", quoted(&m)))?;
                    state.release_where(|p| {
                        spec.matches_fields(p.op, p.lba, p.queue, p.len, p.tag.as_deref())
                    })
                }
                _ => return Err("release takes exactly one of id, all, queue, match".into()),
            };
            json!({ "released": released })
        }
        Command::Rules => json!(engine
            .faults()
            .rules()
            .iter()
            .map(|r| json!({
                "id": r.id,
                "rule": r.spec.to_string(),
                "matched": r.matched(),
                "fired": r.fired(),
                "expired": r.expired(),
            }))
            .collect::<Vec<_>>()),
        Command::AddRule { rule } => {
            let spec =
                RuleSpec::parse(&rule).map_err(|e| format!("rule {}: {e}", quoted(&rule)))?;
            json!({ "id": engine.faults().add(spec) })
        }
        Command::RemoveRule { id } => {
            if !engine.faults().remove(id) {
                return Err(format!("no rule {id}"));
            }
            json!({ "removed": id })
        }
        Command::ZeroPage { gpa } => {
            let gpa = match gpa {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => Some(dma::Gpa(
                    n.as_u64().ok_or("gpa must be a positive integer")?,
                )),
                Some(Value::String(s)) => {
                    Some(crate::config::parse_gpa(&s).map_err(|e| e.to_string())?)
                }
                Some(other) => return Err(format!("gpa {other} is not an address")),
            };
            engine.set_zero_page(gpa);
            json!({ "zero_page": engine.zero_page() })
        }
        // A tag or label past its cap (256 bytes) is refused with its length:
        // the guest sends these, and each would be copied into every record.
        Command::Begin { tag } => {
            engine
                .set_tag(Some(tag.clone()))
                .map_err(|e| e.to_string())?;
            json!({ "tag": tag, "cursor": engine.ledger().next_seq() })
        }
        Command::End => {
            let tag = engine.tag();
            engine.set_tag(None).map_err(|e| e.to_string())?;
            json!({ "ended": tag, "cursor": engine.ledger().next_seq() })
        }
        Command::Mark { label } => {
            json!({ "at_ns": engine.mark(&label).map_err(|e| e.to_string())? })
        }
        // Only what is answered is copied under the ledger's lock (which every
        // completion takes); the JSON is built after it is released.
        Command::Findings { since } => {
            let (findings, next) = engine.ledger().findings_since(since.unwrap_or(0));
            json!({ "findings": findings, "next": next })
        }
        Command::Ledger { since, limit } => {
            let limit = limit.unwrap_or(DEFAULT_LEDGER_LIMIT);
            if limit == 0 {
                return Err("limit must be at least 1".into());
            }
            let (page, dropped) = {
                let ledger = engine.ledger();
                (ledger.page(since.unwrap_or(0), limit), ledger.dropped())
            };
            json!({ "entries": page.entries, "next": page.next, "more": page.more, "dropped": dropped })
        }
        Command::Reset => {
            state.counters().reset();
            engine.reset_finding_counts();
            json!({ "reset": true })
        }
        Command::PowerCut { torn, seed } => {
            let ns = state.namespace();
            let seed = torn.then(|| seed.unwrap_or_else(|| ns.power_epoch()));
            let cut = ns
                .power_cut(seed)
                .map_err(|e| format!("power cut failed: {e}"))?;
            log::info!(
                "power cut: {} blocks lost, {} kept, of {} volatile writes",
                cut.lost_blocks,
                cut.kept_blocks,
                cut.writes
            );
            // A fixed label, well under the cap.
            let _ = engine.mark("power-cut");
            json!({ "lost_blocks": cut.lost_blocks, "kept_blocks": cut.kept_blocks,
                    "writes": cut.writes, "power_cuts": ns.power_epoch(), "seed": seed })
        }
        Command::MediaError {
            action,
            lba,
            blocks,
            kind,
        } => media_error(state.namespace(), action, lba, blocks, kind)?,
        Command::Checks {
            canary,
            snapshot,
            overlap,
            ledger,
        } => {
            let c = engine.checks();
            let c = Checks {
                canary: canary.unwrap_or(c.canary),
                snapshot: snapshot.unwrap_or(c.snapshot),
                overlap: overlap.unwrap_or(c.overlap),
                ledger: ledger.unwrap_or(c.ledger),
            };
            engine.set_checks(c);
            checks_json(c)
        }
    })
}

fn media_error(
    ns: &nvme_model::Namespace,
    action: MediaErrorAction,
    lba: Option<u64>,
    blocks: Option<u64>,
    kind: Option<nvme_model::MediaErrorKind>,
) -> Result<Value, String> {
    let bad = ns.media_errors();
    let range = match lba {
        Some(lba) => {
            let blocks = blocks.unwrap_or(1);
            let r = ns
                .check_range(nvme_model::Lba(lba), blocks)
                .map_err(|e| e.to_string())?;
            Some((r.start().0, r.blocks()))
        }
        None if blocks.is_some() => return Err("blocks needs lba".into()),
        None => None,
    };
    match action {
        MediaErrorAction::Add => {
            let (start, blocks) = range.ok_or("add needs lba (and blocks, default 1)")?;
            let kind = kind.ok_or("add needs kind: read or write")?;
            bad.add(start, blocks, kind);
        }
        MediaErrorAction::Clear => {
            let cleared = bad.clear(range, kind);
            return Ok(json!({ "cleared_blocks": cleared, "media_errors": bad.list() }));
        }
        MediaErrorAction::List => {}
    }
    Ok(json!({ "media_errors": bad.list() }))
}

/// `text` quoted for an error message, cut after [`MAX_QUOTED`] characters
/// with its length said.
fn quoted(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}... ({} bytes)", &text[..end], text.len()),
    }
}

pub fn checks_json(c: Checks) -> Value {
    json!({"canary": c.canary, "snapshot": c.snapshot, "overlap": c.overlap, "ledger": c.ledger})
}

/// The default control socket: beside the vhost-user socket, `.ctl` added.
pub fn default_path(vhost_socket: &Path) -> PathBuf {
    let mut name = vhost_socket.as_os_str().to_owned();
    name.push(".ctl");
    PathBuf::from(name)
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("Cannot listen on the control socket {0}")]
    Listen(PathBuf, #[source] io::Error),
    #[error("{0} exists and is not a socket: give --control another path")]
    NotASocket(PathBuf),
}

/// Control clients the socket turned away or closed (`control` in `status`).
#[derive(Debug, Default)]
pub struct ClientCounters {
    /// Told "too many control clients" and closed.
    refused_busy: AtomicU64,
    /// Closed after the idle timeout without a whole request line.
    closed_idle: AtomicU64,
}

impl ClientCounters {
    pub fn snapshot(&self) -> Value {
        json!({
            "max_clients": MAX_CLIENTS,
            "refused_busy": self.refused_busy.load(Ordering::Relaxed),
            "closed_idle": self.closed_idle.load(Ordering::Relaxed),
        })
    }
}

/// Serves the control socket on its own thread, each client on a thread of its
/// own, until the process ends. A client that sends no whole request line for
/// `idle` is closed, so that clients that connect and wait cannot hold every
/// place.
pub fn serve(
    path: &Path,
    state: Arc<DaemonState>,
    idle: Option<Duration>,
) -> Result<(), ControlError> {
    let listen_err = |e| ControlError::Listen(path.to_owned(), e);
    // Replace a stale socket, never anything else.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(listen_err)?,
        Ok(_) => return Err(ControlError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    // Bind with a umask that leaves the socket to its owner from the start.
    // SAFETY: umask only swaps the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    log::info!("control socket on {}", path.display());
    let clients = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    clients.fetch_sub(1, Ordering::SeqCst);
                    state
                        .control_clients()
                        .refused_busy
                        .fetch_add(1, Ordering::Relaxed);
                    let busy = json!({"v": PROTOCOL_VERSION, "ok": false, "error": "too many control clients"});
                    let _ = writeln!(stream, "{busy}");
                    continue;
                }
                let (state, clients) = (state.clone(), clients.clone());
                let spawned = thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        serve_client(stream, &state, idle);
                        clients.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    log::warn!("cannot start a thread for a control client");
                }
            }
        })
        .map_err(listen_err)?;
    Ok(())
}

/// Answers a client's lines until it goes away, or sends no whole line for
/// `idle`. A client that vanishes mid-request harms nothing: the answer has
/// nowhere to go, and that is all.
fn serve_client(stream: UnixStream, state: &DaemonState, idle: Option<Duration>) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    // A client that does not read its answers is as idle as one that does
    // not write.
    if out.set_write_timeout(idle).is_err() {
        return;
    }
    let mut reader = BufReader::new(Deadline {
        stream,
        idle,
        until: None,
    });
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.get_mut().start();
        match (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    state
                        .control_clients()
                        .closed_idle
                        .fetch_add(1, Ordering::Relaxed);
                    log::debug!("control client closed: idle for {idle:?}");
                }
                return;
            }
            Ok(_) => {}
        }
        let response = if line.len() > MAX_LINE {
            // Skip the rest of the overlong line a buffer at a time, then say so.
            if !line.ends_with(b"\n") && !skip_line(&mut reader) {
                return;
            }
            json!({"v": PROTOCOL_VERSION, "ok": false, "error": format!("request longer than {MAX_LINE} bytes")}).to_string()
        } else {
            match std::str::from_utf8(&line) {
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => handle_line(state, text),
                Err(_) => {
                    json!({"v": PROTOCOL_VERSION, "ok": false, "error": "request is not UTF-8"})
                        .to_string()
                }
            }
        };
        if writeln!(out, "{response}").is_err() {
            return;
        }
    }
}

/// A client's stream with a deadline for each request line: every read waits
/// at most until it, however the client trickles its bytes.
struct Deadline {
    stream: UnixStream,
    idle: Option<Duration>,
    until: Option<Instant>,
}

impl Deadline {
    /// A new line starts: it has `idle` from now.
    fn start(&mut self) {
        self.until = self.idle.and_then(|idle| Instant::now().checked_add(idle));
    }
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf).map_err(|e| match e.kind() {
            // What a read timeout gives on Linux.
            io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut.into(),
            _ => e,
        })
    }
}

/// Consumes input up to and including the next newline without keeping it;
/// false if the client went away first.
fn skip_line(reader: &mut impl BufRead) -> bool {
    loop {
        let (found, n) = match reader.fill_buf() {
            Ok([]) | Err(_) => return false,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
        };
        reader.consume(n);
        if found {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_say_why() {
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"status"}"#),
            Ok(Command::Status)
        );
        assert_eq!(parse_request(r#"{"cmd":"held"}"#), Ok(Command::Held));
        assert_eq!(
            parse_request(r#"{"cmd":"release","id":4}"#),
            Ok(Command::Release {
                id: Some(4),
                all: false,
                queue: None,
                matching: None
            })
        );
        assert_eq!(
            parse_request(r#"{"cmd":"add-rule","rule":"op=read,action=hold"}"#),
            Ok(Command::AddRule {
                rule: "op=read,action=hold".into()
            })
        );
        assert!(parse_request("{").unwrap_err().contains("not JSON"));
        assert!(parse_request(r#"{"v":2,"cmd":"status"}"#)
            .unwrap_err()
            .contains("version"));
        assert!(parse_request(r#"{"cmd":"fly"}"#)
            .unwrap_err()
            .contains("fly"));
        assert!(parse_request(r#"{"x":1}"#).unwrap_err().contains("cmd"));
        assert!(parse_request(r#"{"cmd":"release","id":"x"}"#).is_err());
    }

    #[test]
    fn default_path_is_beside_the_socket() {
        assert_eq!(
            default_path(Path::new("/run/dmaprobe.sock")),
            PathBuf::from("/run/dmaprobe.sock.ctl")
        );
    }
}
