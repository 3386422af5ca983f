//! A test's disk image: made with the test's file system before the run,
//! and checked after it with the host's own tools (the data the guest says
//! it wrote, then the file system's checker).

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};

use super::logs::last_lines;
use super::result::CheckRecord;
use crate::protocol::Event;
use crate::suite::{Fs, TestSpec};
use wire::pattern::pattern_mismatch;

/// Creates the disk image of `test`, formatted as the test says.
pub(super) fn make_disk(test: &TestSpec, disk: &Path) -> Result<(), String> {
    let f = fs::File::create(disk).map_err(|e| format!("cannot create {}: {e}", disk.display()))?;
    f.set_len(test.disk.size)
        .map_err(|e| format!("cannot size {}: {e}", disk.display()))?;
    // With a mailbox, the file system leaves the disk's last MiB to it.
    let fs_bytes = if test.serve_args.contains(&"--mailbox") {
        test.disk.size - wire::mailbox::MAILBOX_BYTES
    } else {
        test.disk.size
    };
    match test.disk.format {
        None => Ok(()),
        Some(Fs::Ext4) => run_tool(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096"])
                .arg(disk)
                .arg(format!("{}k", fs_bytes / 1024)),
            "mkfs.ext4",
        )
        .map(drop),
        Some(Fs::Xfs) => run_tool(
            Command::new("mkfs.xfs")
                .args(["-q", "-f", "-b", "size=4096"])
                .arg("-d")
                .arg(format!("size={fs_bytes}"))
                .arg(disk),
            "mkfs.xfs",
        )
        .map(drop),
        // 4 KiB clusters: a page of a file is one cluster, one extent.
        Some(Fs::Vfat) => run_tool(
            Command::new("mkfs.vfat")
                .args(["-S", "512", "-s", "8"])
                .arg(disk)
                .arg((fs_bytes / 1024).to_string()),
            "mkfs.vfat",
        )
        .map(drop),
        Some(Fs::Udf) => run_tool(
            Command::new("mkudffs")
                .args(["--blocksize=4096", "--media-type=hd"])
                .arg(disk)
                .arg((fs_bytes / 4096).to_string()),
            "mkudffs",
        )
        .map(drop),
    }
}

/// Runs a host tool to completion; its output, or why it failed.
fn run_tool(cmd: &mut Command, name: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {name}: {e} (run scripts/setup)"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{name} failed ({}): {}", out.status, text.trim()))
    }
}

/// What the host checks after the guest has gone: the raw ranges and files the
/// guest says it wrote (its `events`), and the file system.
pub(super) fn host_checks(test: &TestSpec, disk: &Path, events: &[Event]) -> Vec<CheckRecord> {
    let mut checks: Vec<CheckRecord> = events
        .iter()
        .filter_map(|e| match e {
            Event::Wrote {
                offset, len, seed, ..
            } => Some(check_range(disk, *offset, *len, *seed)),
            Event::File {
                path, len, seed, ..
            } => Some(check_file(disk, test.disk.format, path, *len, *seed)),
            _ => None,
        })
        .collect();
    checks.extend(check_fs(disk, test.disk.format));
    checks
}

/// The file system's own checker, run without repairing; none without a
/// file system.
fn check_fs(disk: &Path, format: Option<Fs>) -> Option<CheckRecord> {
    let (name, tool, args) = match format {
        Some(Fs::Ext4) => ("host: e2fsck -fn is clean", "e2fsck", &["-f", "-n"][..]),
        Some(Fs::Xfs) => ("host: xfs_repair -n is clean", "xfs_repair", &["-n"][..]),
        Some(Fs::Vfat) => ("host: fsck.vfat -n is clean", "fsck.vfat", &["-n"][..]),
        Some(Fs::Udf) => return Some(check_udf(disk)),
        None => return None,
    };
    let out = run_tool(Command::new(tool).args(args).arg(disk), tool);
    Some(CheckRecord {
        name: name.into(),
        ok: out.is_ok(),
        detail: match out {
            Ok(_) => "clean".into(),
            Err(e) => last_lines(&e, 6),
        },
    })
}

/// UDF has no fsck in Debian's udftools: `udfinfo` reads the volume's
/// descriptors, and a volume unmounted cleanly has its integrity closed.
fn check_udf(disk: &Path) -> CheckRecord {
    let name = "host: udfinfo reads the volume, integrity closed".to_owned();
    match run_tool(Command::new("udfinfo").arg(disk), "udfinfo") {
        Err(e) => CheckRecord {
            name,
            ok: false,
            detail: last_lines(&e, 6),
        },
        Ok(out) => {
            let field = |key: &str| {
                out.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                    .unwrap_or("?")
                    .to_owned()
            };
            let integrity = field("integrity");
            CheckRecord {
                name,
                ok: integrity == "closed",
                detail: format!(
                    "integrity={integrity}, numfiles={}, usedblocks={}",
                    field("numfiles"),
                    field("usedblocks")
                ),
            }
        }
    }
}

/// The `len` bytes at `offset` of the disk hold the pattern of `seed`.
fn check_range(disk: &Path, offset: u64, len: u64, seed: u64) -> CheckRecord {
    let name = format!("host: backing holds the {len} B written at byte {offset}");
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = fs::File::open(disk)?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        f.read_exact(&mut buf)?;
        Ok(buf)
    };
    pattern_check(name, read(), offset, seed)
}

/// Reads the file `path` (from the file system's root) out of the disk image
/// with the host's own tools, debugfs for ext4 and mtools for FAT, and checks
/// it holds the pattern.
fn check_file(disk: &Path, format: Option<Fs>, path: &str, len: u64, seed: u64) -> CheckRecord {
    let name = format!("host: {path} holds its {len} B");
    let out = disk.with_extension("dump");
    let extract = match format {
        Some(Fs::Vfat) => run_tool(
            Command::new("mcopy")
                .args(["-n", "-o", "-i"])
                .arg(disk)
                .arg(format!("::{path}"))
                .arg(&out),
            "mcopy",
        ),
        Some(Fs::Ext4) => run_tool(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("dump -p {path} {}", out.display()))
                .arg(disk),
            "debugfs",
        ),
        other => Err(format!(
            "the host cannot read files on {other:?}: no checker for it"
        )),
    };
    let dumped = extract
        .map_err(std::io::Error::other)
        .and_then(|_| fs::read(&out));
    let _ = fs::remove_file(&out);
    match dumped {
        Ok(data) if data.len() as u64 != len => CheckRecord {
            name,
            ok: false,
            detail: format!("the file has {} B, the guest wrote {len} B", data.len()),
        },
        other => pattern_check(name, other, 0, seed),
    }
}

/// `data`, read from byte `offset`, holds the pattern of `seed`.
fn pattern_check(
    name: String,
    data: std::io::Result<Vec<u8>>,
    offset: u64,
    seed: u64,
) -> CheckRecord {
    match data {
        Err(e) => CheckRecord {
            name,
            ok: false,
            detail: format!("cannot read it: {e}"),
        },
        Ok(data) => match pattern_mismatch(seed, offset, &data) {
            None => CheckRecord {
                name,
                ok: true,
                detail: "matches".into(),
            },
            Some(i) => CheckRecord {
                name,
                ok: false,
                detail: format!(
                    "first mismatch at +{i} (byte {}): got {:#04x}, want {:#04x}",
                    offset + i as u64,
                    data[i],
                    wire::pattern::pattern_byte(seed, offset + i as u64)
                ),
            },
        },
    }
}
