//! `dmaprobe ctl`: drive a running daemon over its control socket.
//!
//! Each subcommand sends one request and prints the answer: for a person by
//! default, as the raw JSON result with `--json`. An error answer, or no
//! answer, exits non-zero.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use wire::control::ClientError;

/// How long to wait for the daemon's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The daemon's control socket (default: $DMAPROBE_CONTROL, or the
    /// vhost-user socket given with --socket plus `.ctl`).
    #[arg(long, value_name = "PATH", env = "DMAPROBE_CONTROL")]
    pub control: Option<PathBuf>,
    /// The daemon's vhost-user socket, to find the control socket beside it.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the raw JSON result.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Counters, checks, rules and waiting requests in brief.
    Status,
    /// List the requests waiting for a delay or a release.
    Held,
    /// Release held requests.
    Release {
        /// The request id (from `held`).
        id: Option<u64>,
        /// Every held request.
        #[arg(long, conflicts_with_all = ["id", "queue", "matching"])]
        all: bool,
        /// Every held request of this queue.
        #[arg(long, conflicts_with_all = ["id", "matching"])]
        queue: Option<u16>,
        /// Held requests matching these keys, e.g. 'op=read,lba=0-7'.
        #[arg(long = "match", value_name = "KEYS", conflicts_with = "id")]
        matching: Option<String>,
    },
    /// List the fault rules with their counters.
    Rules,
    /// Add a fault rule, e.g. 'op=read,nth=1,action=hold'.
    AddRule { rule: String },
    /// Remove a fault rule by id.
    RemoveRule { id: u64 },
    /// Register the guest's zero page address; without one, forget it.
    ZeroPage { gpa: Option<String> },
    /// Tag requests arriving from now on with a test name.
    Begin { tag: String },
    /// Stop tagging requests.
    End,
    /// Record a named moment in the ledger (shown on timelines).
    Mark { label: String },
    /// Findings recorded since a ledger cursor.
    Findings {
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
    /// Ledger entries (requests and findings) since a cursor, as JSON lines.
    Ledger {
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Set the counters and finding counts back to zero.
    Reset,
    /// Switch checks on or off (each `on` or `off`); print them.
    Checks {
        #[arg(long, value_name = "on|off", value_parser = on_off)]
        canary: Option<bool>,
        #[arg(long, value_name = "on|off", value_parser = on_off)]
        snapshot: Option<bool>,
        #[arg(long, value_name = "on|off", value_parser = on_off)]
        overlap: Option<bool>,
        #[arg(long, value_name = "on|off", value_parser = on_off)]
        ledger: Option<bool>,
    },
    /// Cut the power: writes the guest has not flushed are lost; the media
    /// comes back with what was stable. Requests in flight fail.
    PowerCut {
        /// Each volatile write keeps a random leading part of its blocks, as
        /// on a drive that lost power while writing its cache back.
        #[arg(long)]
        torn: bool,
        /// The seed of the tear points (default: the number of cuts so far).
        #[arg(long, requires = "torn")]
        seed: Option<u64>,
    },
    /// Bad blocks: add, clear or list them.
    MediaError {
        #[command(subcommand)]
        action: MediaErrorCmd,
    },
    /// Send one raw JSON request line.
    Raw { request: String },
}

#[derive(Debug, Subcommand)]
pub enum MediaErrorCmd {
    /// Make blocks bad: `read` fails reads until the blocks are rewritten,
    /// `write` fails writes until cleared.
    Add {
        /// The first bad block (logical block address).
        lba: u64,
        #[arg(value_parser = ["read", "write"])]
        kind: String,
        /// How many blocks from LBA.
        #[arg(long, default_value_t = 1)]
        blocks: u64,
    },
    /// Make bad blocks good again: all, or those from LBA.
    Clear {
        lba: Option<u64>,
        #[arg(long, requires = "lba")]
        blocks: Option<u64>,
        /// Only errors of this kind.
        #[arg(long, value_parser = ["read", "write"])]
        kind: Option<String>,
    },
    /// List the bad blocks.
    List,
}

fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        other => Err(format!("{other:?} is not on or off")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("No control socket given: use --control PATH, --socket PATH or DMAPROBE_CONTROL")]
    NoSocket,
    #[error(transparent)]
    Request(#[from] ClientError),
}

/// Runs one ctl command; prints its answer.
pub fn run(args: CtlArgs) -> Result<(), CtlError> {
    let path = args
        .control
        .or_else(|| {
            args.socket
                .as_deref()
                .map(backend::control::socket::default_path)
        })
        .ok_or(CtlError::NoSocket)?;
    let line = request_for(&args.command);
    let result = wire::control::request(&path, &line, ANSWER_TIMEOUT)?;
    if args.json {
        println!("{result}");
    } else {
        print!("{}", human(&args.command, &result));
    }
    Ok(())
}

/// The request line for a command.
fn request_for(cmd: &CtlCommand) -> String {
    let v = match cmd {
        CtlCommand::Status => json!({"cmd": "status"}),
        CtlCommand::Held => json!({"cmd": "held"}),
        CtlCommand::Release {
            id,
            all,
            queue,
            matching,
        } => {
            let mut r = json!({"cmd": "release"});
            if let Some(id) = id {
                r["id"] = json!(id);
            }
            if *all {
                r["all"] = json!(true);
            }
            if let Some(q) = queue {
                r["queue"] = json!(q);
            }
            if let Some(m) = matching {
                r["match"] = json!(m);
            }
            r
        }
        CtlCommand::Rules => json!({"cmd": "rules"}),
        CtlCommand::AddRule { rule } => json!({"cmd": "add-rule", "rule": rule}),
        CtlCommand::RemoveRule { id } => json!({"cmd": "remove-rule", "id": id}),
        CtlCommand::ZeroPage { gpa } => json!({"cmd": "zero-page", "gpa": gpa}),
        CtlCommand::Begin { tag } => json!({"cmd": "begin", "tag": tag}),
        CtlCommand::End => json!({"cmd": "end"}),
        CtlCommand::Mark { label } => json!({"cmd": "mark", "label": label}),
        CtlCommand::Findings { since } => json!({"cmd": "findings", "since": since}),
        CtlCommand::Ledger { since, limit } => {
            json!({"cmd": "ledger", "since": since, "limit": limit})
        }
        CtlCommand::Reset => json!({"cmd": "reset"}),
        CtlCommand::Checks {
            canary,
            snapshot,
            overlap,
            ledger,
        } => json!({"cmd": "checks", "canary": canary, "snapshot": snapshot,
                    "overlap": overlap, "ledger": ledger}),
        CtlCommand::PowerCut { torn, seed } => {
            json!({"cmd": "power-cut", "torn": torn, "seed": seed})
        }
        CtlCommand::MediaError { action } => match action {
            MediaErrorCmd::Add { lba, kind, blocks } => json!({"cmd": "media-error",
                "action": "add", "lba": lba, "blocks": blocks, "kind": kind}),
            MediaErrorCmd::Clear { lba, blocks, kind } => json!({"cmd": "media-error",
                "action": "clear", "lba": lba, "blocks": blocks, "kind": kind}),
            MediaErrorCmd::List => json!({"cmd": "media-error", "action": "list"}),
        },
        CtlCommand::Raw { request } => return request.clone(),
    };
    let mut v = v;
    v["v"] = json!(wire::control::PROTOCOL_VERSION);
    v.to_string()
}

/// The answer as a person reads it.
fn human(cmd: &CtlCommand, r: &Value) -> String {
    let lines = match cmd {
        CtlCommand::Status => status_lines(r),
        CtlCommand::Held => held_lines(r),
        CtlCommand::Rules => rule_lines(r),
        CtlCommand::Findings { .. } => finding_lines(r),
        CtlCommand::Ledger { .. } => ledger_lines(r),
        CtlCommand::Release { .. } => vec![format!("released {}", r["released"])],
        CtlCommand::AddRule { .. } => vec![format!("rule {} added", r["id"])],
        CtlCommand::RemoveRule { .. } => vec![format!("rule {} removed", r["removed"])],
        CtlCommand::PowerCut { .. } => vec![format!(
            "power cut #{}: {} blocks lost, {} kept, of {} volatile writes",
            r["power_cuts"], r["lost_blocks"], r["kept_blocks"], r["writes"]
        )],
        CtlCommand::MediaError { .. } => bad_block_lines(r),
        _ => vec![r.to_string()],
    };
    lines.into_iter().map(|line| line + "\n").collect()
}

/// `status`: the daemon at a glance, the optional lines only when the
/// daemon reports what they show.
fn status_lines(r: &Value) -> Vec<String> {
    let c = &r["counters"];
    [
        Some(daemon_line(r)),
        Some(counters_line(c)),
        Some(waiting_line(r)),
        write_cache_line(r),
        backing_line(r),
        bad_blocks_line(r, c),
        latency_line(r, c),
        Some(checks_line(r)),
        r["process"].as_object().map(process_line),
        findings_line(r),
    ]
    .into_iter()
    .flatten()
    .chain(nvme_lines(&r["nvme"]))
    .collect()
}

/// The NVMe controller, when it is the interface served: the client and the
/// controller's state, its queues, doorbells, commands and statuses.
fn nvme_lines(n: &Value) -> Vec<String> {
    let Some(ctrl) = n["controller"].as_object() else {
        return Vec::new();
    };
    let c = &ctrl["counters"];
    let state = if let Some(fault) = ctrl["fatal"].as_str() {
        format!("FATAL (CSTS.CFS): {fault}")
    } else if ctrl["enabled"] == json!(true) {
        format!(
            "enabled, {}",
            if ctrl["ready"] == json!(true) {
                "ready"
            } else {
                "not ready"
            }
        )
    } else {
        "disabled".into()
    };
    let shutdown = match ctrl["shutdown"].as_str() {
        Some("none") | None => String::new(),
        Some(s) => format!(", shutdown {s}"),
    };
    let mut lines = vec![format!(
        "nvme: {}   controller {state}{shutdown}   I/O queues served on {}",
        if n["client_connected"] == json!(true) {
            "vfio-user client connected"
        } else {
            "no vfio-user client"
        },
        if ctrl["queue_threads"] == json!(true) {
            "a thread each"
        } else {
            "the transport's thread"
        }
    )];
    let queues = queue_list(&ctrl["submission_queues"], &ctrl["completion_queues"]);
    if !queues.is_empty() {
        lines.push(format!("nvme queues: {}", queues.join("   ")));
    }
    let shadow = match ctrl["shadow_doorbells"].as_object() {
        Some(b) => format!(
            "shadow buffers at {} (EventIdx {})",
            b["doorbells"].as_str().unwrap_or("?"),
            b["event_idx"].as_str().unwrap_or("?")
        ),
        None => "no shadow buffers".into(),
    };
    lines.push(format!(
        "nvme doorbells: {} register writes, {} shadow updates, {} buffer configs, {} errors   {shadow}",
        c["mmio_doorbells"], c["shadow_updates"], c["dbbuf_configs"], c["doorbell_errors"]
    ));
    lines.push(format!(
        "nvme commands: admin {} ({})   io {} ({})",
        c["admin_commands"],
        named_counts(&c["admin_opcodes"]),
        c["io_commands"],
        named_counts(&c["io_opcodes"])
    ));
    lines.push(format!("nvme statuses: {}", named_counts(&c["statuses"])));
    lines.push(format!(
        "nvme events: resets {}, fatal {}, stalls {}, stale completions {}, ignored writes {}",
        c["resets"], c["fatal"], c["sq_stalls"], c["stale_completions"], c["ignored_writes"]
    ));
    lines
}

/// Each submission queue with its depth and size, and its completion queue.
fn queue_list(sqs: &Value, cqs: &Value) -> Vec<String> {
    let cqs = cqs.as_array().cloned().unwrap_or_default();
    sqs.as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|sq| {
            let cq = cqs.iter().find(|cq| cq["qid"] == sq["cq"]);
            let cq = cq.map_or_else(String::new, |cq| {
                let vector = cq["vector"]
                    .as_u64()
                    .map_or_else(|| "polled".into(), |v| format!("vector {v}"));
                format!(
                    " -> cq{} ({} posted, {vector}{})",
                    cq["qid"],
                    cq["posted"],
                    if cq["awaited"] == json!(true) {
                        ", full"
                    } else {
                        ""
                    }
                )
            });
            format!(
                "sq{} {} in flight of {}{}{}",
                sq["qid"],
                sq["in_flight"],
                sq["entries"],
                if sq["deleting"] == json!(true) {
                    " (deleting)"
                } else {
                    ""
                },
                cq
            )
        })
        .collect()
}

/// `{"read": 3, "write": 1}` as "read 3, write 1", or "none".
fn named_counts(v: &Value) -> String {
    let counts: Vec<String> = v
        .as_object()
        .map(|m| m.iter().map(|(k, n)| format!("{k} {n}")).collect())
        .unwrap_or_default();
    if counts.is_empty() {
        "none".into()
    } else {
        counts.join(", ")
    }
}

/// Version, uptime and whether a frontend (or vfio-user client) is
/// connected.
fn daemon_line(r: &Value) -> String {
    format!(
        "dmaprobe {}  up {:.0} s  {}",
        r["version"].as_str().unwrap_or("?"),
        r["uptime_s"].as_f64().unwrap_or(0.0),
        if r["connected"] == json!(true) {
            "frontend connected"
        } else {
            "no frontend"
        }
    )
}

/// What the device served and refused.
fn counters_line(c: &Value) -> String {
    format!(
        "requests {}  ok {}  ioerr {}  unsupp {}  no-status {}  injected {}  media errors {}",
        c["requests"],
        c["completed_ok"],
        c["ioerr"],
        c["unsupp"],
        c["no_status"],
        c["injected"],
        c["media_errors"]
    )
}

/// The requests waiting, the rules, the test tag and the zero page.
fn waiting_line(r: &Value) -> String {
    format!(
        "waiting: {} held, {} delayed   rules: {}   tag: {}   zero page: {}",
        r["held"], r["delayed"], r["rules"], r["tag"], r["zero_page"]
    )
}

/// The volatile write cache and the power cuts, with a cache.
fn write_cache_line(r: &Value) -> Option<String> {
    let cache = r["write_cache"].as_object()?;
    let kib = |k: &str| cache[k].as_u64().unwrap_or(0) >> 10;
    Some(format!(
        "write cache: {}, {} of {} KiB volatile ({} writes), {} KiB destaged   power cuts: {}",
        if cache["enabled"] == json!(true) {
            "on"
        } else {
            "off (writethrough)"
        },
        kib("volatile_bytes"),
        kib("capacity_bytes"),
        cache["volatile_writes"],
        kib("destaged_bytes"),
        r["power_cuts"]
    ))
}

/// What backs the media, and how often a file backing was synced.
fn backing_line(r: &Value) -> Option<String> {
    let backing = r["backing"].as_object()?;
    Some(match backing["kind"].as_str() {
        Some("file") => format!("backing: file, synced {} times", backing["syncs"]),
        kind => format!("backing: {}", kind.unwrap_or("?")),
    })
}

/// Bad blocks and what they and power cuts failed, when there is any.
fn bad_blocks_line(r: &Value, c: &Value) -> Option<String> {
    let bad = r["media_errors"].as_array().map_or(0, Vec::len);
    (bad > 0 || c["unrecovered_reads"] != json!(0) || c["write_faults"] != json!(0)).then(|| {
        format!(
            "bad block ranges: {bad}   unrecovered reads: {}   write faults: {}   cut off by power: {}",
            c["unrecovered_reads"], c["write_faults"], c["cut_off"]
        )
    })
}

/// The media latency model, unless instant.
fn latency_line(r: &Value, c: &Value) -> Option<String> {
    let latency = r["latency"].as_str().filter(|l| *l != "instant")?;
    Some(format!(
        "media latency: {latency}   delayed by it: {}",
        c["latency_delayed"]
    ))
}

/// The checks on, and the ledger's fill.
fn checks_line(r: &Value) -> String {
    let on: Vec<&str> = ["canary", "snapshot", "overlap", "ledger"]
        .into_iter()
        .filter(|k| r["checks"][*k] == json!(true))
        .collect();
    format!(
        "checks: {}   ledger: {} entries, {} dropped",
        if on.is_empty() {
            "none".into()
        } else {
            on.join(", ")
        },
        r["ledger"]["entries"],
        r["ledger"]["dropped"]
    )
}

/// The findings seen, by kind.
fn findings_line(r: &Value) -> Option<String> {
    let f = r["findings"].as_object()?;
    let seen: Vec<String> = f
        .iter()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    Some(format!(
        "findings: {}",
        if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        }
    ))
}

/// `held`: one line per waiting request.
fn held_lines(r: &Value) -> Vec<String> {
    let items = r.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return vec!["nothing is waiting".into()];
    }
    items
        .iter()
        .map(|p| {
            format!(
                "{:>6}  q{:<3} {:<12} lba {:<10} {:>8} B  {} {} ms",
                p["request"].to_string(),
                p["queue"].to_string(),
                p["op"].as_str().unwrap_or("?"),
                p["lba"].to_string(),
                p["len"].to_string(),
                if p["held"] == json!(true) {
                    "held"
                } else {
                    "delayed"
                },
                p["waited_ms"]
            )
        })
        .collect()
}

/// `rules`: one line per rule with its counters.
fn rule_lines(r: &Value) -> Vec<String> {
    let items = r.as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return vec!["no rules".into()];
    }
    items
        .iter()
        .map(|rule| {
            format!(
                "{:>4}  matched {:<6} fired {:<6}{} {}",
                rule["id"].to_string(),
                rule["matched"].to_string(),
                rule["fired"].to_string(),
                if rule["expired"] == json!(true) {
                    " expired"
                } else {
                    ""
                },
                rule["rule"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// `findings`: one line per finding, then the cursor to go on from.
fn finding_lines(r: &Value) -> Vec<String> {
    let items = r["findings"].as_array().cloned().unwrap_or_default();
    let mut lines: Vec<String> = items
        .iter()
        .map(|f| {
            format!(
                "#{} {} req {} {} lba {} gpa {}: {}",
                f["seq"],
                f["finding"].as_str().unwrap_or("?"),
                f["request"],
                f["op"].as_str().unwrap_or("?"),
                f["lba"],
                f["gpa"].as_str().unwrap_or("?"),
                f["detail"].as_str().unwrap_or("")
            )
        })
        .collect();
    if lines.is_empty() {
        lines.push("no findings".into());
    }
    lines.push(format!("next cursor: {}", r["next"]));
    lines
}

/// `ledger`: the entries as JSON lines, then the cursor to go on from.
fn ledger_lines(r: &Value) -> Vec<String> {
    let mut lines: Vec<String> = r["entries"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(Value::to_string)
        .collect();
    lines.push(format!(
        "next cursor: {}{}",
        r["next"],
        if r["more"] == json!(true) {
            " (more)"
        } else {
            ""
        }
    ));
    lines
}

/// `media-error`: what was cleared, then the bad blocks left.
fn bad_block_lines(r: &Value) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(n) = r["cleared_blocks"].as_u64() {
        lines.push(format!("{n} blocks cleared"));
    }
    let bad = r["media_errors"].as_array().cloned().unwrap_or_default();
    if bad.is_empty() {
        lines.push("no bad blocks".into());
    }
    lines.extend(bad.iter().map(|b| {
        format!(
            "LBA {}+{}: {} errors",
            b["start"],
            b["blocks"],
            b["kind"].as_str().unwrap_or("?")
        )
    }));
    lines
}

/// The daemon's own figures from `status`, a `?` for any /proc could not tell.
fn process_line(p: &serde_json::Map<String, Value>) -> String {
    let figure = |key: &str| p.get(key).and_then(Value::as_u64);
    let or_unknown = |n: Option<String>| n.unwrap_or_else(|| "?".into());
    let mib = |key: &str| figure(key).map(|b| format!("{:.1}", b as f64 / f64::from(1 << 20)));
    format!(
        "process: rss {} MiB ({} MiB anonymous, {} MiB of guest memory)   open fds {}   threads {}",
        or_unknown(mib("rss_bytes")),
        or_unknown(mib("rss_anon_bytes")),
        or_unknown(mib("rss_shmem_bytes")),
        or_unknown(figure("open_fds").map(|n| n.to_string())),
        or_unknown(figure("threads").map(|n| n.to_string())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_shows_the_daemons_own_figures() {
        let status = json!({
            "counters": {}, "checks": {}, "ledger": {},
            "process": {"rss_bytes": 12_582_912, "rss_anon_bytes": 4_194_304,
                "rss_shmem_bytes": 6_291_456, "open_fds": 23, "threads": 9},
        });
        let out = human(&CtlCommand::Status, &status);
        assert!(
            out.contains(
                "process: rss 12.0 MiB (4.0 MiB anonymous, 6.0 MiB of guest memory)   \
                 open fds 23   threads 9\n"
            ),
            "{out}"
        );
        let unknown = json!({"counters": {}, "checks": {}, "ledger": {},
            "process": {"rss_bytes": null, "open_fds": null, "threads": null}});
        let out = human(&CtlCommand::Status, &unknown);
        assert!(
            out.contains(
                "process: rss ? MiB (? MiB anonymous, ? MiB of guest memory)   open fds ?"
            ),
            "{out}"
        );
        // A daemon too old to say leaves the line out.
        let old = json!({"counters": {}, "checks": {}, "ledger": {}});
        assert!(!human(&CtlCommand::Status, &old).contains("process:"));
    }

    #[test]
    fn status_shows_the_nvme_controller_its_queues_and_counters() {
        let status = json!({
            "counters": {}, "checks": {}, "ledger": {},
            "nvme": {
                "client_connected": true,
                "controller": {
                    "enabled": true, "ready": true, "fatal": null, "shutdown": "none",
                    "queue_threads": true,
                    "shadow_doorbells": {"doorbells": "0x7f000", "event_idx": "0x7e000"},
                    "submission_queues": [
                        {"qid": 0, "entries": 32, "cq": 0, "in_flight": 1, "deleting": false},
                        {"qid": 1, "entries": 1024, "cq": 1, "in_flight": 3, "deleting": false}
                    ],
                    "completion_queues": [
                        {"qid": 0, "entries": 32, "posted": 0, "vector": 0, "awaited": false},
                        {"qid": 1, "entries": 1024, "posted": 2, "vector": 1, "awaited": false}
                    ],
                    "counters": {
                        "admin_commands": 14, "io_commands": 100, "failed": 0, "fatal": 0,
                        "stale_completions": 0, "ignored_writes": 0, "doorbell_errors": 0,
                        "sq_stalls": 0, "resets": 1, "mmio_doorbells": 70,
                        "shadow_updates": 150, "dbbuf_configs": 1,
                        "admin_opcodes": {"identify": 6, "doorbell-buffer-config": 1},
                        "io_opcodes": {"read": 60, "write": 40},
                        "statuses": {"success": 113}
                    }
                }
            }
        });
        let out = human(&CtlCommand::Status, &status);
        for want in [
            "nvme: vfio-user client connected   controller enabled, ready   \
             I/O queues served on a thread each\n",
            "nvme queues: sq0 1 in flight of 32 -> cq0 (0 posted, vector 0)   \
             sq1 3 in flight of 1024 -> cq1 (2 posted, vector 1)\n",
            "nvme doorbells: 70 register writes, 150 shadow updates, 1 buffer configs, \
             0 errors   shadow buffers at 0x7f000 (EventIdx 0x7e000)\n",
            "nvme commands: admin 14 (doorbell-buffer-config 1, identify 6)   \
             io 100 (read 60, write 40)\n",
            "nvme statuses: success 113\n",
            "nvme events: resets 1, fatal 0, stalls 0",
        ] {
            assert!(out.contains(want), "{want}\nin\n{out}");
        }
        let mut fatal = status.clone();
        fatal["nvme"]["client_connected"] = json!(false);
        fatal["nvme"]["controller"]["fatal"] = json!("Doorbell of queue 9, which does not exist");
        let out = human(&CtlCommand::Status, &fatal);
        assert!(
            out.contains(
                "nvme: no vfio-user client   controller FATAL (CSTS.CFS): \
                 Doorbell of queue 9, which does not exist"
            ),
            "{out}"
        );
        // virtio-blk: no NVMe lines.
        let blk = json!({"counters": {}, "checks": {}, "ledger": {}, "nvme": null});
        assert!(!human(&CtlCommand::Status, &blk).contains("nvme"));
    }

    #[test]
    fn status_says_how_often_the_backing_file_was_synced() {
        let status =
            |backing| json!({"counters": {}, "checks": {}, "ledger": {}, "backing": backing});
        let out = human(
            &CtlCommand::Status,
            &status(json!({"kind": "file", "syncs": 3})),
        );
        assert!(out.contains("backing: file, synced 3 times\n"), "{out}");
        let out = human(
            &CtlCommand::Status,
            &status(json!({"kind": "memory", "syncs": 0})),
        );
        assert!(out.contains("backing: memory\n"), "{out}");
    }
}
