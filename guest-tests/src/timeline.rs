//! A timeline of one guest run, as SVG; one picture per failing test, drawn
//! from the device's ledger and the test's notes.
//!
//! - A time axis in ms, from the first event drawn.
//! - Each request a row, labelled `#ID OP lba LBA LENB (WAIT)`: a bar from
//!   its arrival to its completion, a black tick at its DMA, its findings as
//!   red diamonds.
//! - For a test that read into a page across fork (its notes
//!   `page-before-fork`, `page-after-fork`, `device-wrote-at`), a lane per
//!   page: green while the process maps it, grey once it has left it (at
//!   the guest's mark that ends in [`LEFT_PAGE`], else at its `fork` mark),
//!   and a tick at each DMA into the page, red if the process no longer
//!   mapped it. So the picture says what the evidence line says: the device
//!   wrote a page the process had left.
//! - The moments the guest named (fork, ...) as dashed lines.

use std::fmt::Write as _;

use serde_json::Value;

/// How the guest's mark ends when the process left the page it had before
/// fork (`parent wrote; process left its page`, from `held.rs` in the guest
/// binary): where the page lanes change hands.
pub const LEFT_PAGE: &str = "process left its page";

/// A request row's height.
const ROW: f64 = 18.0;
/// A page lane's height: a strip for DMA labels over the process's band.
const LANE: f64 = 36.0;
/// Where the plot starts: the labels are left of it.
const LEFT: f64 = 300.0;
const WIDTH: f64 = 900.0;
/// The whole picture's width.
const PICTURE: f64 = LEFT + WIDTH + 40.0;
/// The first row's top: below the title, the reason and the time axis.
const PLOT_TOP: f64 = 100.0;
/// Characters of monospace text that fit left of the plot.
const LABEL_CHARS: usize = 44;
/// The width of one character of the 11 px monospace text.
const CHAR: f64 = 6.7;
/// The most request rows drawn; a run with more shows the last ones.
const MAX_ROWS: usize = 60;
/// The guest's page size: a page lane holds what lands in one frame.
const PAGE: u64 = 4096;

const READ: &str = "#4a7bd0";
const WRITE: &str = "#3b9c5a";
const MARK: &str = "#d07a00";
const MAPPED: &str = "#cde8cf";
const GONE: &str = "#e4e4e4";
const RED: &str = "#d00000";

/// The SVG of a ledger (its JSON entries) and the test's `notes`, titled
/// `title` (a first line, then after the first ": " the reason).
pub fn svg(title: &str, ledger: &[Value], notes: &[(String, String)]) -> String {
    let all: Vec<&Value> = ledger.iter().filter(|e| e["kind"] == "request").collect();
    let marks: Vec<&Value> = ledger.iter().filter(|e| e["kind"] == "mark").collect();
    let findings: Vec<&Value> = ledger.iter().filter(|e| e["kind"] == "finding").collect();
    let scale = Scale::of(&all, &marks, &findings);
    let shown: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|r| ns(&r["completed_ns"]) >= scale.t0 && ns(&r["arrived_ns"]) <= scale.end())
        .collect();
    let rows = &shown[shown.len().saturating_sub(MAX_ROWS)..];
    let origin = scale.origin(rows, &marks, &findings);

    let lanes = ForkPages::from_notes(notes).map_or_else(Vec::new, |pages| pages.lanes(&marks));
    let lanes_top = PLOT_TOP + rows.len() as f64 * ROW + 8.0;
    let bottom = match lanes.len() {
        0 => PLOT_TOP + rows.len() as f64 * ROW,
        n => lanes_top + n as f64 * LANE,
    };

    let mut body = String::new();
    axis(&mut body, &scale, origin, bottom);
    for (i, r) in rows.iter().enumerate() {
        request_row(&mut body, PLOT_TOP + i as f64 * ROW, r, &findings, &scale);
    }
    for (i, lane) in lanes.iter().enumerate() {
        lane.draw(&mut body, lanes_top + i as f64 * LANE, &all, &scale);
    }
    let mut y = mark_lines(&mut body, &marks, &scale, bottom) + 10.0;
    let mut legend = vec![format!(
        "{} of {} requests drawn, {:.1} ms shown; time in ms from the first event drawn",
        rows.len(),
        all.len(),
        scale.span / 1e6
    )];
    legend.push(
        "bar: request from arrival to completion; black tick: its DMA; red diamond: finding; \
         dashed: the guest's moments"
            .to_owned(),
    );
    if !lanes.is_empty() {
        legend.push(
            "page lanes: green while the process maps the page, grey once it has left it; \
             red tick: a DMA into a page the process no longer maps"
                .to_owned(),
        );
    }
    for line in legend {
        y += 14.0;
        let _ = writeln!(
            body,
            r##"<text x="10" y="{y}" fill="#555">{}</text>"##,
            esc(&line)
        );
    }
    for f in findings.iter().filter(|f| f["info"] != true).take(3) {
        y += ROW;
        let _ = writeln!(
            body,
            r#"<text x="10" y="{y}" fill="red">{}: {}</text>"#,
            esc(str_of(&f["finding"])),
            esc(str_of(&f["detail"]))
        );
    }

    let mut out = heading(title, y + 12.0);
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

/// A ledger time in nanoseconds, as a number to draw with.
fn ns(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64
}

/// A string field, or "" if it is not one.
fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// The stretch of time drawn: from `t0`, `span` nanoseconds.
#[derive(Debug)]
struct Scale {
    t0: f64,
    span: f64,
}

impl Scale {
    /// The window: what the test made happen (requests that waited, marks,
    /// findings), not the boot's partition scan before it; all if none. With
    /// a margin of a tenth before and a quarter after (at least 1 ms), where
    /// the labels of the last moments go.
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
        let margin = |share: f64| ((hi - lo) * share).max(1e6);
        let (t0, span) = if hi >= lo {
            (lo - margin(0.1), hi - lo + margin(0.1) + margin(0.25))
        } else {
            (0.0, 1e6)
        };
        Scale { t0, span }
    }

    fn end(&self) -> f64 {
        self.t0 + self.span
    }

    fn contains(&self, t: f64) -> bool {
        (self.t0..=self.end()).contains(&t)
    }

    /// Where time `t` is drawn, kept within the plot.
    fn x(&self, t: f64) -> f64 {
        LEFT + ((t - self.t0) / self.span).clamp(0.0, 1.0) * WIDTH
    }

    /// Time zero of the axis: the first event drawn (an arrival, a mark or a
    /// finding within the window), or the window's start.
    fn origin(&self, rows: &[&Value], marks: &[&Value], findings: &[&Value]) -> f64 {
        rows.iter()
            .map(|r| ns(&r["arrived_ns"]))
            .chain(marks.iter().map(|m| ns(&m["at_ns"])))
            .chain(findings.iter().map(|f| ns(&f["at_ns"])))
            .filter(|&t| self.contains(t))
            .fold(None, |first: Option<f64>, t| {
                Some(first.map_or(t, |f| f.min(t)))
            })
            .unwrap_or(self.t0)
    }
}

/// The picture's frame, `height` high, with its title and reason.
fn heading(title: &str, height: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{PICTURE}" height="{height}" font-family="monospace" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let (head, reason) = title.split_once(": ").unwrap_or((title, ""));
    let _ = writeln!(
        out,
        r#"<text x="10" y="18" font-size="14">{}</text>"#,
        esc(head)
    );
    let per_line = (PICTURE / CHAR) as usize - 4;
    for (i, chunk) in wrap(reason, per_line).iter().take(3).enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="10" y="{}" fill="red">{}</text>"#,
            36.0 + i as f64 * 14.0,
            esc(chunk)
        );
    }
    out
}

/// The time axis over the plot, in ms from `origin`, with faint lines down
/// to `bottom`.
fn axis(out: &mut String, scale: &Scale, origin: f64, bottom: f64) {
    let axis_y = PLOT_TOP - 6.0;
    let _ = writeln!(
        out,
        r##"<line x1="{LEFT}" x2="{}" y1="{axis_y}" y2="{axis_y}" stroke="#555"/>"##,
        LEFT + WIDTH
    );
    let step = tick_step(scale.span / 1e6 / 8.0);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let last = (scale.end() - origin) / 1e6;
    for k in 0.. {
        let ms = k as f64 * step;
        if ms > last {
            break;
        }
        let x = scale.x(origin + ms * 1e6);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{axis_y}" stroke="#555"/><line x1="{x:.1}" x2="{x:.1}" y1="{axis_y}" y2="{bottom}" stroke="#ececec"/><text x="{x:.1}" y="{}" text-anchor="middle" fill="#555">{ms:.decimals$} ms</text>"##,
            axis_y - 4.0,
            axis_y - 8.0,
        );
    }
}

/// A round step for ticks at least `rough` ms apart: 1, 2 or 5 times a power of ten.
fn tick_step(rough: f64) -> f64 {
    let power = 10f64.powf(rough.max(1e-6).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&step| step >= rough)
        .unwrap_or(10.0 * power)
}

/// One request's row at height `y`: its label, its bar, its DMA tick and
/// its findings.
fn request_row(out: &mut String, y: f64, r: &Value, findings: &[&Value], scale: &Scale) {
    let (a, c) = (ns(&r["arrived_ns"]), ns(&r["completed_ns"]));
    let colour = match str_of(&r["op"]) {
        "read" => READ,
        "write" => WRITE,
        _ => "#999999",
    };
    let _ = writeln!(
        out,
        r#"<text x="10" y="{}">{}</text>"#,
        y + 12.0,
        esc(&fit(&row_label(r), LABEL_CHARS))
    );
    let _ = writeln!(
        out,
        r#"<rect x="{:.1}" y="{}" width="{:.1}" height="12" fill="{colour}" opacity="0.7"><title>{}</title></rect>"#,
        scale.x(a),
        y + 2.0,
        (scale.x(c) - scale.x(a)).max(1.5),
        esc(&r.to_string())
    );
    if let Some(d) = r["dma_ns"].as_u64().map(|d| d as f64) {
        if scale.contains(d) {
            let _ = writeln!(
                out,
                r#"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="black" stroke-width="2"/>"#,
                scale.x(d),
                y,
                y + 16.0
            );
        }
    }
    for f in findings.iter().filter(|f| f["request"] == r["request"]) {
        let fx = scale.x(ns(&f["at_ns"]));
        let _ = writeln!(
            out,
            r#"<path d="M{fx:.1},{} l5,6 l-5,6 l-5,-6 z" fill="red"><title>{}: {}</title></path>"#,
            y + 2.0,
            esc(str_of(&f["finding"])),
            esc(str_of(&f["detail"]))
        );
    }
}

/// `#ID OP lba LBA LENB`, then how it waited, its status if not `ok`, and
/// its tag.
fn row_label(r: &Value) -> String {
    let mut label = format!(
        "#{} {} lba {} {}B",
        r["request"],
        r["op"].as_str().unwrap_or("?"),
        r["lba"],
        r["len"]
    );
    match str_of(&r["wait"]) {
        "" | "none" => {}
        wait => label.push_str(&format!(" ({wait})")),
    }
    match str_of(&r["status"]) {
        "" | "ok" => {}
        status => label.push_str(&format!(" {status}")),
    }
    if let Some(tag) = r["tag"].as_str() {
        label.push_str(&format!(" {tag}"));
    }
    label
}

/// The dashed line of each mark from the first row to `bottom`, and its
/// label below, on the first line it does not overlap; returns the height
/// of the last label line.
fn mark_lines(out: &mut String, marks: &[&Value], scale: &Scale, bottom: f64) -> f64 {
    let mut placed: Vec<&Value> = marks.to_vec();
    placed.sort_by(|a, b| ns(&a["at_ns"]).total_cmp(&ns(&b["at_ns"])));
    // Where each line of labels is taken up to.
    let mut lines: Vec<f64> = Vec::new();
    for m in placed {
        let x = scale.x(ns(&m["at_ns"]));
        let label = str_of(&m["label"]);
        let width = label.chars().count() as f64 * CHAR + 8.0;
        let (start, label_x, anchor) = if x + 3.0 + width > PICTURE {
            (x - 3.0 - width, x - 3.0, "end")
        } else {
            (x, x + 3.0, "start")
        };
        let line = match lines.iter().position(|&taken| taken < start) {
            Some(i) => i,
            None => {
                lines.push(f64::MIN);
                lines.len() - 1
            }
        };
        lines[line] = start + width;
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{PLOT_TOP}" y2="{bottom}" stroke="{MARK}" stroke-dasharray="4,3"/><text x="{label_x:.1}" y="{}" text-anchor="{anchor}" fill="{MARK}">{}</text>"#,
            bottom + 14.0 + line as f64 * 12.0,
            esc(label)
        );
    }
    bottom + 14.0 + lines.len().saturating_sub(1) as f64 * 12.0
}

/// The pages of a test that read into a page across fork, from its notes:
/// the page the process mapped before the fork, the one it maps after, and
/// where the device wrote.
#[derive(Debug)]
struct ForkPages {
    before: u64,
    after: u64,
    wrote: Vec<u64>,
}

impl ForkPages {
    /// The pages, if the notes name both the process's pages.
    fn from_notes(notes: &[(String, String)]) -> Option<ForkPages> {
        let note = |key: &str| {
            notes
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        Some(ForkPages {
            before: gpa(note("page-before-fork")?)?,
            after: gpa(note("page-after-fork")?)?,
            wrote: note("device-wrote-at")
                .unwrap_or("")
                .split_whitespace()
                .filter_map(gpa)
                .collect(),
        })
    }

    /// A lane for each page: those the device wrote first, then the
    /// process's; the process left `before` for `after` at the guest's mark
    /// that ends in [`LEFT_PAGE`], else at its `fork` mark.
    fn lanes(&self, marks: &[&Value]) -> Vec<Lane> {
        let at = |is: fn(&str) -> bool| {
            marks
                .iter()
                .find(|m| is(str_of(&m["label"])))
                .map(|m| ns(&m["at_ns"]))
        };
        let (before, after) = (frame(self.before), frame(self.after));
        let moved = before != after;
        let left = if moved {
            at(|l| l.ends_with(LEFT_PAGE)).or_else(|| at(|l| l == "fork"))
        } else {
            None
        };
        let mut pages: Vec<u64> = Vec::new();
        for page in self.wrote.iter().map(|&g| frame(g)).chain([before, after]) {
            if !pages.contains(&page) {
                pages.push(page);
            }
        }
        pages
            .into_iter()
            .map(|page| {
                let wrote = self.wrote.iter().find(|&&g| frame(g) == page);
                let (is_before, is_after) = (page == before, page == after);
                let label = match (wrote, is_after) {
                    (Some(g), false) => format!("device wrote GPA {g:#x}"),
                    (Some(g), true) => format!("device wrote GPA {g:#x}; process maps it"),
                    (None, true) => format!("process maps GPA {page:#x} after the fork"),
                    (None, false) => format!("process mapped GPA {page:#x} before the fork"),
                };
                let mapped = match (moved, is_before, is_after, left) {
                    (false, true, _, _) => Mapped::Always,
                    (true, true, _, Some(t)) => Mapped::Until(t),
                    (true, _, true, Some(t)) => Mapped::From(t),
                    (true, true, _, None) | (true, _, true, None) => Mapped::Unknown,
                    _ => Mapped::Never,
                };
                Lane {
                    frame: page,
                    label,
                    mapped,
                }
            })
            .collect()
    }
}

/// An address as the guest notes it (`0x3742000`).
fn gpa(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// The first address of the page that holds `gpa`.
fn frame(gpa: u64) -> u64 {
    gpa / PAGE * PAGE
}

/// When the process mapped a page.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mapped {
    Always,
    Never,
    /// Until it left it at this time.
    Until(f64),
    /// From this time on.
    From(f64),
    /// At some time the guest did not mark.
    Unknown,
}

impl Mapped {
    /// Whether the process mapped the page at `t`, if that is known.
    fn at(self, t: f64) -> Option<bool> {
        match self {
            Mapped::Always => Some(true),
            Mapped::Never => Some(false),
            Mapped::Until(left) => Some(t < left),
            Mapped::From(came) => Some(t >= came),
            Mapped::Unknown => None,
        }
    }
}

/// One page's lane: who had it when, and the DMA into it.
#[derive(Debug)]
struct Lane {
    /// The page's first address.
    frame: u64,
    label: String,
    mapped: Mapped,
}

impl Lane {
    /// Draws the lane at height `y`: its label, the process's band (green
    /// while it maps the page, grey once it has left it), and a tick for
    /// each DMA of `requests` into the page within the window.
    fn draw(&self, out: &mut String, y: f64, requests: &[&Value], scale: &Scale) {
        for (i, line) in wrap(&self.label, LABEL_CHARS).iter().take(2).enumerate() {
            let _ = writeln!(
                out,
                r#"<text x="10" y="{}" font-weight="bold">{}</text>"#,
                y + 14.0 + i as f64 * 13.0,
                esc(line)
            );
        }
        let (band_y, band_h) = (y + 14.0, LANE - 18.0);
        let (start, end) = (LEFT, LEFT + WIDTH);
        // A band's text sits at its end, clear of the DMA that follows a move.
        let band = |out: &mut String, from: f64, to: f64, fill: &str, text: &str| {
            let _ = writeln!(
                out,
                r##"<rect x="{from:.1}" y="{band_y}" width="{:.1}" height="{band_h}" fill="{fill}" stroke="#999"/>"##,
                to - from,
            );
            if to - from > text.len() as f64 * CHAR + 8.0 {
                let _ = writeln!(
                    out,
                    r##"<text x="{:.1}" y="{}" text-anchor="end" fill="#333">{}</text>"##,
                    to - 4.0,
                    band_y + band_h - 5.0,
                    esc(text)
                );
            }
        };
        band(out, start, end, "white", "");
        match self.mapped {
            Mapped::Always => band(out, start, end, MAPPED, "the process maps it"),
            Mapped::Until(t) => {
                let left = scale.x(t);
                band(out, start, left, MAPPED, "the process maps it");
                band(out, left, end, GONE, "the process has left it");
            }
            Mapped::From(t) => band(out, scale.x(t), end, MAPPED, "the process maps it"),
            Mapped::Never | Mapped::Unknown => {}
        }
        let mut dmas: Vec<(f64, &Value)> = requests
            .iter()
            .filter(|r| self.holds(r))
            .filter_map(|r| Some((r["dma_ns"].as_u64()? as f64, *r)))
            .filter(|(t, _)| scale.contains(*t))
            .collect();
        dmas.sort_by(|a, b| a.0.total_cmp(&b.0));
        // The label strip over the band is taken up to here.
        let mut taken = f64::MIN;
        for (t, r) in dmas {
            let x = scale.x(t);
            let missed = self.mapped.at(t) == Some(false);
            let colour = if missed { RED } else { "black" };
            let text = format!("DMA #{} {} B", r["request"], r["len"]);
            let _ = writeln!(
                out,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="{colour}" stroke-width="3"><title>{}</title></line>"#,
                y + 3.0,
                y + LANE - 2.0,
                esc(&text)
            );
            if x > taken {
                let width = text.len() as f64 * CHAR;
                let (text_x, anchor) = if x + 4.0 + width > PICTURE {
                    (x - 4.0, "end")
                } else {
                    (x + 4.0, "start")
                };
                let _ = writeln!(
                    out,
                    r#"<text x="{text_x:.1}" y="{}" text-anchor="{anchor}" fill="{colour}">{}</text>"#,
                    y + 11.0,
                    esc(&text)
                );
                taken = x + 4.0 + width;
            }
        }
    }

    /// Whether any of request `r`'s segments lands in the lane's page.
    fn holds(&self, r: &Value) -> bool {
        let page = self.frame..self.frame.saturating_add(PAGE);
        r["segments"].as_array().is_some_and(|segments| {
            segments.iter().any(|s| {
                let (Some(at), Some(len)) = (gpa(str_of(&s["gpa"])), s["len"].as_u64()) else {
                    return false;
                };
                at < page.end && at.saturating_add(len) > page.start
            })
        })
    }
}

/// `s`, cut to `width` characters with "…" if longer.
fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
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

    const MS: u64 = 1_000_000;

    fn request(id: u64, op: &str, gpa: &str, len: u64, times: [u64; 3], wait: &str) -> Value {
        json!({"kind":"request","request":id,"op":op,"queue":0,"lba":2048,"len":len,
               "segments":[{"gpa":gpa,"len":len}],
               "arrived_ns":times[0],"dma_ns":times[1],"completed_ns":times[2],
               "wait":wait,"status":"ok"})
    }

    fn mark(label: &str, at_ns: u64) -> Value {
        json!({"kind":"mark","label":label,"at_ns":at_ns})
    }

    /// A read held across fork whose DMA lands after the parent left its
    /// page, as on Linux 6.1: a write before it, the fork, the parent's
    /// write that moved it, and a finding.
    fn forked_read() -> Vec<Value> {
        vec![
            request(
                1,
                "write",
                "0x5000",
                4096,
                [MS, MS + MS / 10, MS + MS / 5],
                "none",
            ),
            request(
                2,
                "read",
                "0x3742000",
                512,
                [2 * MS, 9 * MS, 9 * MS + MS / 10],
                "hold",
            ),
            mark("fork", 3 * MS),
            mark("parent wrote; process left its page", 4 * MS),
            json!({"kind":"finding","finding":"buffer-reused-during-dma","request":2,"info":false,
                   "at_ns":9 * MS,"detail":"a <detail> & more"}),
        ]
    }

    fn notes(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fork_notes() -> Vec<(String, String)> {
        notes(&[
            ("read-lba", "2048"),
            ("page-before-fork", "0x3742000"),
            ("page-after-fork", "0x376f000"),
            ("device-wrote-at", "0x3742000"),
        ])
    }

    const TITLE: &str = "dio-read-fork-cow on debian-6.1: the parent's buffer kept its old bytes";

    /// Each `<text>` element: its opening tag and its content.
    fn texts(svg: &str) -> Vec<(&str, &str)> {
        svg.split("<text ")
            .skip(1)
            .filter_map(|rest| {
                let (open, after) = rest.split_once('>')?;
                Some((open, after.split_once("</text>")?.0))
            })
            .collect()
    }

    /// The opening tag of the `<text>` whose content is `content`.
    fn text_tag<'a>(svg: &'a str, content: &str) -> &'a str {
        texts(svg)
            .into_iter()
            .find(|(_, c)| *c == content)
            .map(|(open, _)| open)
            .unwrap_or_else(|| panic!("no text {content:?} in {svg}"))
    }

    /// The value of attribute `name` in an opening tag.
    fn attr<'a>(open: &'a str, name: &str) -> &'a str {
        let from = open
            .find(&format!(" {name}=\""))
            .or_else(|| open.starts_with(&format!("{name}=\"")).then_some(0))
            .unwrap_or_else(|| panic!("no {name} in {open}"));
        let value = &open[from..].split_once('"').unwrap().1;
        value.split_once('"').unwrap().0
    }

    /// Whether `svg` is well-formed XML as far as it uses it: elements
    /// nested and closed, text and attributes without a bare `<`, `>` or `&`.
    fn well_formed(svg: &str) -> Result<(), String> {
        let entity = |s: &str| {
            s.split('&').skip(1).all(|e| {
                ["amp;", "lt;", "gt;", "quot;", "apos;"]
                    .iter()
                    .any(|n| e.starts_with(n))
            })
        };
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(at) = rest.find('<') {
            let text = &rest[..at];
            if text.contains('>') || !entity(text) {
                return Err(format!("bad text {text:?}"));
            }
            let end = rest[at..].find('>').ok_or("an unclosed tag")? + at;
            let tag = &rest[at + 1..end];
            if tag.contains('<') || !entity(tag) || !tag.matches('"').count().is_multiple_of(2) {
                return Err(format!("bad tag {tag:?}"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                match open.pop() {
                    Some(o) if o == name => {}
                    o => return Err(format!("</{name}> closes {o:?}")),
                }
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap_or(""));
            }
            rest = &rest[end + 1..];
        }
        match (open.is_empty(), rest.trim().is_empty()) {
            (true, true) => Ok(()),
            _ => Err(format!("left open: {open:?}, trailing {rest:?}")),
        }
    }

    #[test]
    fn the_axis_is_in_ms_from_the_first_event_drawn() {
        let s = svg(TITLE, &forked_read(), &[]);
        let ticks: Vec<&str> = texts(&s)
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| c.ends_with(" ms"))
            .collect();
        // 2..9.1 ms with 1 ms of margin before and 1.775 ms after: 1 to
        // 10.875 ms; the first event drawn is #1's arrival at 1 ms, time zero.
        assert_eq!(ticks, ["0 ms", "2 ms", "4 ms", "6 ms", "8 ms"]);
        assert_eq!(attr(text_tag(&s, "0 ms"), "x"), format!("{LEFT:.1}"));
        let four = attr(text_tag(&s, "4 ms"), "x").parse::<f64>().unwrap();
        assert!((four - (LEFT + 4.0 / 9.875 * WIDTH)).abs() < 0.1, "{four}");
        assert!(s.contains("9.9 ms shown"));
    }

    #[test]
    fn every_request_is_a_labelled_row_with_its_findings_and_the_marks() {
        let s = svg(TITLE, &forked_read(), &[]);
        well_formed(&s).unwrap();
        let labels: Vec<&str> = texts(&s)
            .into_iter()
            .map(|(_, c)| c)
            .filter(|c| c.starts_with('#'))
            .collect();
        assert_eq!(
            labels,
            ["#1 write lba 2048 4096B", "#2 read lba 2048 512B (hold)"]
        );
        assert_eq!(s.matches("<rect x=").count(), 2, "a bar per request");
        for m in ["fork", "parent wrote; process left its page"] {
            text_tag(&s, m);
        }
        text_tag(&s, "the parent's buffer kept its old bytes");
        assert!(s.contains("a &lt;detail&gt; &amp; more"));
        assert!(!s.contains("<detail>"));
        assert!(s.contains("2 of 2 requests drawn"));
    }

    /// The picture of a FAIL says what its evidence line says: the device
    /// wrote a page the process had left for another.
    #[test]
    fn a_forked_read_shows_the_page_the_device_wrote_and_the_page_the_process_maps() {
        let s = svg(TITLE, &forked_read(), &fork_notes());
        well_formed(&s).unwrap();
        let wrote = text_tag(&s, "device wrote GPA 0x3742000");
        let maps = text_tag(&s, "process maps GPA 0x376f000 after the fork");
        let y = |open| attr(open, "y").parse::<f64>().unwrap();
        assert!(y(wrote) < y(maps), "the device's page, then the process's");
        // The first page is the process's until it left it (the guest's
        // mark), the second from then on.
        text_tag(&s, "the process has left it");
        assert_eq!(
            texts(&s)
                .iter()
                .filter(|(_, c)| *c == "the process maps it")
                .count(),
            2
        );
        let left = format!("{:.1}", LEFT + (3.0 / 9.875) * WIDTH);
        assert!(
            s.contains(&format!(r#"<rect x="{left}""#)),
            "the grey band starts at the mark {LEFT_PAGE:?}: {s}"
        );
        // The DMA lands in the page the process had left: red, in its lane.
        let dma = text_tag(&s, "DMA #2 512 B");
        assert_eq!(attr(dma, "fill"), RED);
        assert!(y(wrote) - 14.0 < y(dma) && y(dma) < y(maps) - 14.0);
        assert!(s.contains("red tick: a DMA into a page the process no longer maps"));
    }

    /// Without the guest's mark, the process is taken to leave its page at
    /// the fork; several reads into one page share its lane, and a read into
    /// the new page lands where the process maps it.
    #[test]
    fn reads_into_one_page_share_a_lane_and_the_fork_dates_the_move_without_a_mark() {
        let ledger = vec![
            request(
                1,
                "read",
                "0x3742000",
                512,
                [2 * MS, 9 * MS, 9 * MS],
                "hold",
            ),
            request(
                2,
                "read",
                "0x3742200",
                512,
                [2 * MS, 9 * MS, 9 * MS],
                "hold",
            ),
            request(
                3,
                "read",
                "0x376fe00",
                512,
                [5 * MS, 5 * MS, 5 * MS],
                "none",
            ),
            mark("fork", 4 * MS),
        ];
        let notes = notes(&[
            ("page-before-fork", "0x3742000"),
            ("page-after-fork", "0x376f000"),
            ("device-wrote-at", "0x3742000 0x3742200"),
        ]);
        let s = svg(
            "dio-read-threads-fork: parts kept their old bytes",
            &ledger,
            &notes,
        );
        well_formed(&s).unwrap();
        text_tag(&s, "device wrote GPA 0x3742000");
        text_tag(&s, "process maps GPA 0x376f000 after the fork");
        let left = format!("{:.1}", LEFT + (3.0 / 9.75) * WIDTH);
        assert!(s.contains(&format!(r#"<rect x="{left}""#)), "{s}");
        // #1 and #2 land at once: one label for both ticks, both red.
        assert_eq!(attr(text_tag(&s, "DMA #1 512 B"), "fill"), RED);
        assert!(!texts(&s).iter().any(|(_, c)| *c == "DMA #2 512 B"));
        assert_eq!(s.matches(&format!(r#"stroke="{RED}""#)).count(), 2);
        assert_eq!(attr(text_tag(&s, "DMA #3 512 B"), "fill"), "black");
    }

    /// A page that did not move is one lane, the process's throughout.
    #[test]
    fn a_page_that_stayed_is_one_lane() {
        let notes = notes(&[
            ("page-before-fork", "0x3742000"),
            ("page-after-fork", "0x3742000"),
            ("device-wrote-at", "0x3742000"),
        ]);
        let s = svg(TITLE, &forked_read(), &notes);
        text_tag(&s, "device wrote GPA 0x3742000; process maps it");
        assert!(!s.contains("the process has left it"));
        assert_eq!(attr(text_tag(&s, "DMA #2 512 B"), "fill"), "black");
    }

    /// Notes come from the guest: an address that is not one draws no
    /// lanes, and one at the top of the address space draws its page.
    #[test]
    fn any_address_the_guest_notes_is_drawn_or_left_out() {
        let mut notes = fork_notes();
        notes[2].1 = "not present".into();
        assert!(!svg(TITLE, &forked_read(), &notes).contains("GPA 0x"));
        notes[2].1 = "0xffffffffffffffff".into();
        let s = svg(TITLE, &forked_read(), &notes);
        well_formed(&s).unwrap();
        assert!(s.contains("process maps GPA 0xfffffffffffff000"), "{s}");
    }

    #[test]
    fn a_test_without_fork_notes_has_no_page_lanes() {
        let only_one = notes(&[("device-wrote-at", "0x3742000"), ("zero-page", "0xfab1000")]);
        for notes in [Vec::new(), only_one] {
            let s = svg(TITLE, &forked_read(), &notes);
            well_formed(&s).unwrap();
            assert!(!s.contains("GPA 0x"), "{s}");
            assert!(!s.contains("DMA #"));
            assert!(!s.contains("page lanes"));
        }
    }

    #[test]
    fn an_empty_ledger_is_a_picture_of_nothing() {
        let s = svg(
            "smoke on debian-6.1: the guest never started",
            &[],
            &fork_notes(),
        );
        well_formed(&s).unwrap();
        assert!(s.contains("0 of 0 requests drawn"));
        // A millisecond, in fifths.
        text_tag(&s, "0.0 ms");
        text_tag(&s, "1.0 ms");
    }

    #[test]
    fn the_checker_refuses_what_is_not_well_formed() {
        for bad in [
            "<svg><text>a < b</text></svg>",
            "<svg><text>a & b</text></svg>",
            "<svg><text>x</svg>",
            "<svg><rect x=\"1/></svg>",
        ] {
            assert!(well_formed(bad).is_err(), "{bad}");
        }
        well_formed("<svg><text>a &amp; b</text><line/></svg>\n").unwrap();
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(1.14), 2.0);
        assert_eq!(tick_step(3.0), 5.0);
        assert_eq!(tick_step(0.3), 0.5);
        assert_eq!(tick_step(7.0), 10.0);
        assert_eq!(tick_step(10.0), 10.0);
    }
}
