//! A test run's files: kept where the user asked, the end of a log for a
//! message, one boot's events appended to the first's.
//!
//! Kept files go under the directory the user gave, each kernel's in one
//! path component of its name ([`path_component`]), whatever the name holds.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The longest path component a name becomes, in characters.
const MOST_COMPONENT: usize = 100;

/// `name` as one path component: letters, digits and `.+-_~,@=` kept, a space
/// made `-`, anything else (`/` first) `_`; never empty, `.`, `..` or hidden,
/// never longer than 100 characters.
pub fn path_component(name: &str) -> String {
    let mut component: String = name
        .chars()
        .take(MOST_COMPONENT)
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() => c,
            '.' | '+' | '-' | '_' | '~' | ',' | '@' | '=' => c,
            ' ' => '-',
            _ => '_',
        })
        .collect();
    if component.is_empty() || component.starts_with('.') {
        component.insert(0, '_');
    }
    component
}

/// Copies a test run's logs (console, events, daemon log, ledgers, timeline,
/// soak samples) from its work directory `from` to `keep/KERNEL/TEST`, KERNEL
/// being its report column as a path component. A log the run did not write
/// is no error; one that cannot be copied is.
pub(super) fn keep_logs(from: &Path, keep: &Path, column: &str, test: &str) -> Result<(), String> {
    let to = keep.join(path_component(column)).join(path_component(test));
    fs::create_dir_all(&to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
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
    let mut failed = Vec::new();
    for name in logs.into_iter().map(str::to_owned).chain(ledgers) {
        match fs::copy(from.join(&name), to.join(&name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound || from.join(&name).exists() => {
                failed.push(format!("cannot copy {name} to {}: {e}", to.display()));
            }
            _ => {}
        }
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(failed.join("; ")),
    }
}

/// Copies a test's timeline `svg` to `dir/KERNEL-TEST.svg`, KERNEL being its
/// report column as a path component; where it went.
pub(super) fn keep_timeline(
    svg: &Path,
    dir: &Path,
    column: &str,
    test: &str,
) -> Result<PathBuf, String> {
    let dest = dir.join(format!(
        "{}-{}.svg",
        path_component(column),
        path_component(test)
    ));
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    fs::copy(svg, &dest).map_err(|e| format!("cannot copy it to {}: {e}", dest.display()))?;
    Ok(dest)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_one_path_component() {
        assert_eq!(path_component("debian-6.12"), "debian-6.12");
        assert_eq!(path_component("debian-6.12 nvme"), "debian-6.12-nvme");
        assert_eq!(
            path_component("6.12.117+deb12-cloud-amd64"),
            "6.12.117+deb12-cloud-amd64"
        );
        assert_eq!(
            path_component("/root/linux/arch/x86/boot/bzImage"),
            "_root_linux_arch_x86_boot_bzImage"
        );
        for (name, component) in [
            ("", "_"),
            (".", "_."),
            ("..", "_.."),
            (".hidden", "_.hidden"),
        ] {
            assert_eq!(path_component(name), component);
        }
        assert_eq!(path_component("a\u{e9}\nb\\c"), "a__b_c");
        assert_eq!(path_component(&"x".repeat(300)).len(), MOST_COMPONENT);
    }

    #[test]
    fn kept_files_stay_under_the_directory_given() {
        let work = tempfile::tempdir().unwrap();
        fs::write(work.path().join("console.log"), "boot").unwrap();
        fs::write(work.path().join("ledger.0.jsonl"), "{}").unwrap();
        fs::write(work.path().join("timeline.svg"), "<svg/>").unwrap();
        let keep = tempfile::tempdir().unwrap();
        for column in ["/abs/path/bzImage", "../../escape", "..", "6.13.0 nvme"] {
            keep_logs(work.path(), keep.path(), column, "smoke").unwrap();
            let svg = keep_timeline(
                &work.path().join("timeline.svg"),
                keep.path(),
                column,
                "smoke",
            );
            let svg = svg.unwrap();
            assert_eq!(svg.parent(), Some(keep.path()), "{column}");
        }
        let mut kept: Vec<String> = Vec::new();
        let mut stack = vec![keep.path().to_owned()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(dir).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(keep.path()).unwrap().to_owned();
                    kept.push(rel.display().to_string());
                }
            }
        }
        kept.sort();
        assert_eq!(
            kept,
            [
                "6.13.0-nvme-smoke.svg",
                "6.13.0-nvme/smoke/console.log",
                "6.13.0-nvme/smoke/ledger.0.jsonl",
                "6.13.0-nvme/smoke/timeline.svg",
                "_..-smoke.svg",
                "_../smoke/console.log",
                "_../smoke/ledger.0.jsonl",
                "_../smoke/timeline.svg",
                "_.._.._escape-smoke.svg",
                "_.._.._escape/smoke/console.log",
                "_.._.._escape/smoke/ledger.0.jsonl",
                "_.._.._escape/smoke/timeline.svg",
                "_abs_path_bzImage-smoke.svg",
                "_abs_path_bzImage/smoke/console.log",
                "_abs_path_bzImage/smoke/ledger.0.jsonl",
                "_abs_path_bzImage/smoke/timeline.svg",
            ]
        );
    }

    #[test]
    fn what_cannot_be_kept_is_said() {
        let work = tempfile::tempdir().unwrap();
        fs::write(work.path().join("console.log"), "boot").unwrap();
        let keep = tempfile::tempdir().unwrap();
        // A file where the directory should be.
        let blocked = keep.path().join("blocked");
        fs::write(&blocked, "").unwrap();
        let e = keep_logs(work.path(), &blocked, "k", "smoke").unwrap_err();
        assert!(e.contains("cannot create"), "{e}");
        let e = keep_timeline(&work.path().join("console.log"), &blocked, "k", "t").unwrap_err();
        assert!(e.contains("cannot create"), "{e}");
        let e = keep_timeline(&work.path().join("none.svg"), keep.path(), "k", "t").unwrap_err();
        assert!(e.contains("cannot copy"), "{e}");
    }
}
