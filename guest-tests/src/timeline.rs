//! A timeline of one guest run, as SVG: each request a bar from its arrival to
//! its completion with a tick at its DMA, findings as red diamonds on their
//! request's row, and the moments the guest named (fork, ...) as dashed lines.
//! Built from the device's ledger; one picture per failing test.

use std::fmt::Write as _;

use serde_json::Value;

const ROW: f64 = 18.0;
const LEFT: f64 = 230.0;
const WIDTH: f64 = 900.0;
const TOP: f64 = 80.0;
/// The most request rows drawn; a run with more shows the last ones.
const MAX_ROWS: usize = 60;

/// The SVG of a ledger (its JSON entries), titled `title` (a first line, then
/// after the first ": " the reason).
pub fn svg(title: &str, ledger: &[Value]) -> String {
    let all: Vec<&Value> = ledger.iter().filter(|e| e["kind"] == "request").collect();
    let marks: Vec<&Value> = ledger.iter().filter(|e| e["kind"] == "mark").collect();
    let findings: Vec<&Value> = ledger.iter().filter(|e| e["kind"] == "finding").collect();
    let scale = Scale::of(&all, &marks, &findings);
    let shown: Vec<&Value> = all
        .into_iter()
        .filter(|r| {
            ns(&r["completed_ns"]) >= scale.t0 && ns(&r["arrived_ns"]) <= scale.t0 + scale.span
        })
        .collect();
    let requests = &shown[shown.len().saturating_sub(MAX_ROWS)..];

    let mut out = String::new();
    heading(&mut out, title, requests.len(), scale.span);
    for (i, r) in requests.iter().enumerate() {
        request_row(&mut out, TOP + i as f64 * ROW, r, &findings, &scale);
    }
    let bottom = TOP + requests.len() as f64 * ROW;
    for (i, m) in marks.iter().enumerate() {
        let mx = scale.x(ns(&m["at_ns"]));
        let label_y = bottom + 14.0 + (i % 2) as f64 * 12.0;
        let _ = writeln!(
            out,
            r##"<line x1="{mx:.1}" x2="{mx:.1}" y1="{TOP}" y2="{bottom}" stroke="#d07a00" stroke-dasharray="4,3"/><text x="{:.1}" y="{}" fill="#d07a00">{}</text>"##,
            mx + 3.0,
            label_y,
            esc(m["label"].as_str().unwrap_or(""))
        );
    }
    let mut y = bottom + 62.0;
    for f in findings.iter().filter(|f| f["info"] != true).take(3) {
        let _ = writeln!(
            out,
            r#"<text x="10" y="{y}" fill="red">{}: {}</text>"#,
            esc(f["finding"].as_str().unwrap_or("")),
            esc(f["detail"].as_str().unwrap_or(""))
        );
        y += ROW;
    }
    out.push_str("</svg>\n");
    out
}

/// A ledger time in nanoseconds, as a number to draw with.
fn ns(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64
}

/// The stretch of time drawn: from `t0`, `span` nanoseconds.
#[derive(Debug)]
struct Scale {
    t0: f64,
    span: f64,
}

impl Scale {
    /// The window: what the test made happen (requests that waited, marks,
    /// findings), not the boot's partition scan before it; all if none.
    fn of(requests: &[&Value], marks: &[&Value], findings: &[&Value]) -> Scale {
        let waited = requests.iter().filter(|r| r["wait"] != "none");
        let focus: Vec<f64> = waited
            .flat_map(|r| [ns(&r["arrived_ns"]), ns(&r["completed_ns"])])
            .chain(marks.iter().map(|m| ns(&m["at_ns"])))
            .chain(findings.iter().map(|f| ns(&f["at_ns"])))
            .collect();
        let every: Vec<f64> = requests
            .iter()
            .flat_map(|r| [ns(&r["arrived_ns"]), ns(&r["completed_ns"])])
            .collect();
        let times = if focus.is_empty() { &every } else { &focus };
        let (lo, hi) = times
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        let pad = ((hi - lo) * 0.1).max(1e6);
        let (t0, span) = if hi >= lo {
            (lo - pad, hi - lo + 2.0 * pad)
        } else {
            (0.0, 1.0)
        };
        Scale { t0, span }
    }

    /// Where time `t` is drawn.
    fn x(&self, t: f64) -> f64 {
        LEFT + (t - self.t0) / self.span * WIDTH
    }
}

/// The picture's frame, its title and reason, and the legend below the
/// `rows` of requests.
fn heading(out: &mut String, title: &str, rows: usize, span: f64) {
    let height = TOP + (rows.max(1) as f64 + 7.0) * ROW;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="monospace" font-size="11">"#,
        LEFT + WIDTH + 40.0
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let (head, reason) = title.split_once(": ").unwrap_or((title, ""));
    let _ = writeln!(
        out,
        r#"<text x="10" y="18" font-size="14">{}</text>"#,
        esc(head)
    );
    for (i, chunk) in wrap(reason, 150).iter().take(3).enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="10" y="{}" fill="red">{}</text>"#,
            34.0 + i as f64 * 14.0,
            esc(chunk)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="10" y="{}" fill="#555">{:.1} ms shown; bar: arrival to completion; black tick: DMA; red: finding; dashed: guest moments</text>"##,
        TOP + rows as f64 * ROW + 44.0,
        span / 1e6
    );
}

/// One request's row at height `y`: its label, its bar, its DMA tick and
/// its findings.
fn request_row(out: &mut String, y: f64, r: &Value, findings: &[&Value], scale: &Scale) {
    let (a, c) = (ns(&r["arrived_ns"]), ns(&r["completed_ns"]));
    let colour = match r["op"].as_str().unwrap_or("") {
        "read" => "#4a7bd0",
        "write" => "#3b9c5a",
        _ => "#999999",
    };
    let waited = r["wait"].as_str().unwrap_or("none");
    let _ = writeln!(
        out,
        r#"<text x="10" y="{}">#{} {} lba {} {}B{}</text>"#,
        y + 12.0,
        r["request"],
        esc(r["op"].as_str().unwrap_or("?")),
        r["lba"],
        r["len"],
        if waited == "none" {
            String::new()
        } else {
            format!(" ({})", esc(waited))
        }
    );
    let _ = writeln!(
        out,
        r#"<rect x="{:.1}" y="{}" width="{:.1}" height="12" fill="{colour}" opacity="0.7"><title>{}</title></rect>"#,
        scale.x(a),
        y + 2.0,
        (scale.x(c) - scale.x(a)).max(1.5),
        esc(&r.to_string())
    );
    if let Some(d) = r["dma_ns"].as_u64() {
        let _ = writeln!(
            out,
            r#"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="black" stroke-width="2"/>"#,
            scale.x(d as f64),
            y,
            y + 16.0
        );
    }
    for f in findings.iter().filter(|f| f["request"] == r["request"]) {
        let fx = scale.x(ns(&f["at_ns"]));
        let _ = writeln!(
            out,
            r#"<path d="M{fx:.1},{} l5,6 l-5,6 l-5,-6 z" fill="red"><title>{}: {}</title></path>"#,
            y + 2.0,
            esc(f["finding"].as_str().unwrap_or("")),
            esc(f["detail"].as_str().unwrap_or(""))
        );
    }
}

/// `s` in lines of at most `width` characters, broken at spaces.
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in s.split(' ') {
        let last = lines.last_mut().map_or(0, |l| l.len());
        if last > 0 && last + 1 + word.len() > width {
            lines.push(String::new());
        }
        if let Some(l) = lines.last_mut() {
            if !l.is_empty() {
                l.push(' ');
            }
            l.push_str(word);
        }
    }
    lines
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_findings_and_marks_are_drawn() {
        let ledger = vec![
            json!({"kind":"request","request":1,"op":"write","lba":2048,"len":4096,
                   "arrived_ns":1_000_000,"dma_ns":1_100_000,"completed_ns":1_200_000,"wait":"none"}),
            json!({"kind":"mark","label":"fork","at_ns":3_000_000}),
            json!({"kind":"request","request":2,"op":"read","lba":2048,"len":512,
                   "arrived_ns":2_000_000,"dma_ns":9_000_000,"completed_ns":9_100_000,"wait":"hold"}),
            json!({"kind":"finding","finding":"buffer-reused-during-dma","request":2,"info":false,
                   "at_ns":9_000_000,"detail":"a <detail> & more"}),
        ];
        let s = svg(
            "dio-read-fork-cow on debian-6.1: the parent lost its data",
            &ledger,
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<rect x=").count(), 2);
        assert!(s.contains("#2 read lba 2048 512B (hold)"));
        assert!(s.contains(">fork</text>"));
        assert!(s.contains("the parent lost its data"));
        assert!(s.contains("fill=\"red\""));
        assert!(s.contains("a &lt;detail&gt; &amp; more"));
        assert!(!s.contains("<detail>"));
    }
}
