//! The control protocol on the wire: one JSON request per line, one JSON
//! answer per line, `v` the protocol's version (may be left out; another
//! version is refused). The daemon parses requests into [`Command`]s and
//! frames its [`answer`]s; a client sends a line with [`request`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

/// The version of the control protocol.
pub const PROTOCOL_VERSION: u32 = 1;

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
        kind: Option<MediaErrorKind>,
    },
    /// Switch checks on or off; those not given stay as they are.
    Checks {
        canary: Option<bool>,
        snapshot: Option<bool>,
        overlap: Option<bool>,
        ledger: Option<bool>,
    },
}

/// What a `media-error` request does with bad blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MediaErrorAction {
    Add,
    Clear,
    List,
}

/// What goes wrong on a bad block, as a request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MediaErrorKind {
    Read,
    Write,
}

#[derive(Debug, Deserialize)]
struct Envelope {
    v: Option<u32>,
    #[serde(flatten)]
    command: Command,
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

/// The answer to a request: its result, or the error that refused it.
pub fn answer(result: Result<Value, String>) -> Value {
    match result {
        Ok(result) => json!({"v": PROTOCOL_VERSION, "ok": true, "result": result}),
        Err(error) => refusal(error),
    }
}

/// A refusal: the request was not carried out, for the reason `error` gives.
pub fn refusal(error: impl Into<Value>) -> Value {
    json!({"v": PROTOCOL_VERSION, "ok": false, "error": error.into()})
}

/// Why a request got no answer, or a refusal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot reach the daemon at {0} (is `dmaprobe serve` running?)")]
    Connect(PathBuf, #[source] io::Error),
    #[error("The daemon did not answer")]
    NoAnswer(#[source] io::Error),
    #[error("The daemon's answer is not JSON: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Refused(String),
}

/// Sends one request line to the control socket at `path` and waits up to
/// `timeout` for the answer line: the `result` of an answer that is `ok`,
/// or the refusal's reason.
pub fn request(path: &Path, line: &str, timeout: Duration) -> Result<Value, ClientError> {
    let stream = UnixStream::connect(path).map_err(|e| ClientError::Connect(path.to_owned(), e))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(ClientError::NoAnswer)?;
    let mut writer = &stream;
    writeln!(writer, "{}", line.trim()).map_err(ClientError::NoAnswer)?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(ClientError::NoAnswer)?;
    let answer: Value = serde_json::from_str(&answer)
        .map_err(|_| ClientError::BadAnswer(answer.trim().to_owned()))?;
    if answer["ok"] == json!(true) {
        Ok(answer["result"].clone())
    } else {
        Err(ClientError::Refused(
            answer["error"].as_str().unwrap_or("refused").to_owned(),
        ))
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
}
