//! What each control command does to the daemon: a request line answered
//! ([`handle_line`]), a parsed command carried out on the [`DaemonState`]
//! ([`carry_out`]).

use dma::schedule::Release;
use dma::{Checks, Engine, RuleSpec};
use serde_json::{json, Value};

use wire::control::{answer, parse_request, Command, MediaErrorAction};

use super::protocol::checks_json;
use super::state::DaemonState;

/// Ledger entries returned by one `ledger` command unless `limit` says otherwise.
const DEFAULT_LEDGER_LIMIT: usize = 1000;
/// The most of a client's own text (a rule, a match) an error quotes back: an
/// answer stays short however long the request was.
const MAX_QUOTED: usize = 80;

/// Answers one request line with one response line (no newline).
pub fn handle_line(state: &DaemonState, line: &str) -> String {
    answer(parse_request(line).and_then(|cmd| carry_out(state, cmd))).to_string()
}

/// Carries out a command.
pub fn carry_out(state: &DaemonState, cmd: Command) -> Result<Value, String> {
    let engine = state.engine();
    Ok(match cmd {
        Command::Status => state.status(),
        Command::Held => json!(state.parked()),
        Command::Release {
            id,
            all,
            queue,
            matching,
        } => json!({ "released": release(state, id, all, queue, matching)? }),
        Command::Rules => rules(engine),
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
            engine.set_zero_page(zero_page(gpa)?);
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
        Command::Ledger { since, limit } => ledger(engine, since, limit)?,
        Command::Reset => {
            state.counters().reset();
            engine.reset_finding_counts();
            json!({ "reset": true })
        }
        Command::PowerCut { torn, seed } => power_cut(state, torn, seed)?,
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

/// Releases the held requests exactly one of `id`, `all`, `queue` and
/// `matching` names; returns how many.
fn release(
    state: &DaemonState,
    id: Option<u64>,
    all: bool,
    queue: Option<u16>,
    matching: Option<String>,
) -> Result<usize, String> {
    Ok(match (id, all, queue, matching) {
        (Some(id), false, None, None) => state.release(Release::One(dma::ReqId(id))),
        (None, true, None, None) => state.release(Release::All),
        (None, false, Some(q), None) => state.release(Release::Queue(q)),
        (None, false, None, Some(m)) => {
            let spec =
                RuleSpec::parse_match(&m).map_err(|e| format!("match {}: {e}", quoted(&m)))?;
            state.release_where(|p| {
                spec.matches_fields(p.op, p.lba, p.queue, p.len, p.tag.as_deref())
            })
        }
        _ => return Err("release takes exactly one of id, all, queue, match".into()),
    })
}

/// The fault rules in force, with their counters.
fn rules(engine: &Engine) -> Value {
    json!(engine
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
        .collect::<Vec<_>>())
}

/// The zero page's address as the request gives it: a number, a string in
/// hex or decimal, or none (forget it).
fn zero_page(gpa: Option<Value>) -> Result<Option<dma::Gpa>, String> {
    Ok(match gpa {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(dma::Gpa(
            n.as_u64().ok_or("gpa must be a positive integer")?,
        )),
        Some(Value::String(s)) => Some(crate::config::parse_gpa(&s).map_err(|e| e.to_string())?),
        Some(other) => return Err(format!("gpa {other} is not an address")),
    })
}

/// A page of the ledger from `since`, at most `limit` entries.
fn ledger(engine: &Engine, since: Option<u64>, limit: Option<usize>) -> Result<Value, String> {
    let limit = limit.unwrap_or(DEFAULT_LEDGER_LIMIT);
    if limit == 0 {
        return Err("limit must be at least 1".into());
    }
    // Only the page is copied under the ledger's lock (which every completion
    // takes); the JSON is built after it is released.
    let (page, dropped) = {
        let ledger = engine.ledger();
        (ledger.page(since.unwrap_or(0), limit), ledger.dropped())
    };
    Ok(json!({ "entries": page.entries, "next": page.next, "more": page.more, "dropped": dropped }))
}

/// Cuts the power; with `torn`, volatile writes keep a leading part drawn
/// from `seed` (default: the number of cuts so far).
fn power_cut(state: &DaemonState, torn: bool, seed: Option<u64>) -> Result<Value, String> {
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
    let _ = state.engine().mark("power-cut");
    Ok(
        json!({ "lost_blocks": cut.lost_blocks, "kept_blocks": cut.kept_blocks,
            "writes": cut.writes, "power_cuts": ns.power_epoch(), "seed": seed }),
    )
}

fn media_error(
    ns: &nvme_model::Namespace,
    action: MediaErrorAction,
    lba: Option<u64>,
    blocks: Option<u64>,
    kind: Option<wire::control::MediaErrorKind>,
) -> Result<Value, String> {
    let kind = kind.map(|k| match k {
        wire::control::MediaErrorKind::Read => nvme_model::MediaErrorKind::Read,
        wire::control::MediaErrorKind::Write => nvme_model::MediaErrorKind::Write,
    });
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
