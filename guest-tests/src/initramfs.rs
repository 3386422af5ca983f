//! The initramfs each guest boots: busybox, the guest binary and the host
//! programs the tests run (fio), each with its shared libraries, the kernel's
//! own modules, and an `/init` that runs the tests.

use std::collections::BTreeSet;
use std::fs;
use std::io::BufWriter;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::CpioWriter;

/// The modules a guest over virtio-blk loads (with their dependencies)
/// unless built in. Over NVMe there are none: the nvme driver must be built
/// in (`kconfig` checks it).
pub const VIRTIO_BLK_MODULES: [&str; 2] = ["virtio_pci", "virtio_blk"];

/// Where busybox-static installs its binary on Debian.
pub const BUSYBOX: &str = "/bin/busybox";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /etc/dmaprobe-modules); do
  insmod "/lib/dmaprobe-modules/$m" || echo "dmaprobe-init: insmod $m failed"
done
/bin/dmaprobe-guest
poweroff -f
"#;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("Cannot run {0}")]
    Tool(&'static str, #[source] std::io::Error),
    #[error("Decompressing {0} failed: {1}")]
    Decompress(PathBuf, String),
    #[error("{0} not found: run scripts/setup (busybox-static)")]
    NoBusybox(PathBuf),
    #[error("Program {0} has no file name")]
    ProgramName(PathBuf),
}

/// What goes into one initramfs.
#[derive(Debug)]
pub struct Contents<'a> {
    pub guest_bin: &'a Path,
    pub busybox: &'a Path,
    /// Host programs the tests run, each packed as `/bin/NAME`.
    pub programs: &'a [PathBuf],
    /// Module files in load order.
    pub modules: &'a [PathBuf],
}

/// Writes the initramfs (an uncompressed cpio archive) to `out`.
pub fn build(c: &Contents<'_>, out: &Path) -> Result<(), InitramfsError> {
    if !c.busybox.is_file() {
        return Err(InitramfsError::NoBusybox(c.busybox.to_owned()));
    }
    let file = fs::File::create(out).map_err(|e| InitramfsError::Write(out.to_owned(), e))?;
    let werr = |e| InitramfsError::Write(out.to_owned(), e);
    let mut w = CpioWriter::new(BufWriter::new(file));
    for d in [
        "/bin", "/dev", "/proc", "/sys", "/tmp", "/mnt", "/etc", "/lib", "/lib64",
    ] {
        w.dir(d).map_err(werr)?;
    }
    w.dir("/lib/dmaprobe-modules").map_err(werr)?;
    w.file("/init", 0o755, INIT.as_bytes()).map_err(werr)?;
    w.file("/bin/busybox", 0o755, &read(c.busybox)?)
        .map_err(werr)?;
    w.file("/bin/dmaprobe-guest", 0o755, &read(c.guest_bin)?)
        .map_err(werr)?;
    for p in c.programs {
        let name = p
            .file_name()
            .ok_or_else(|| InitramfsError::ProgramName(p.clone()))?;
        let target = format!("/bin/{}", name.to_string_lossy());
        w.file(&target, 0o755, &read(p)?).map_err(werr)?;
    }

    // Every library once, whichever binaries need it, after its directories
    // (a parent before its children: the set is ordered).
    let mut libs = BTreeSet::new();
    for bin in std::iter::once(c.guest_bin).chain(c.programs.iter().map(PathBuf::as_path)) {
        libs.extend(shared_libraries(bin)?);
    }
    let dirs: BTreeSet<String> = libs
        .iter()
        .flat_map(|lib| lib.ancestors().skip(1))
        .map(|d| d.to_string_lossy().into_owned())
        .filter(|d| d.len() > 1 && !["/lib", "/lib64"].contains(&d.as_str()))
        .collect();
    for d in &dirs {
        w.dir(d).map_err(werr)?;
    }
    for lib in &libs {
        w.file(&lib.to_string_lossy(), 0o755, &read(lib)?)
            .map_err(werr)?;
    }

    let mut order = String::new();
    for m in c.modules {
        let name = decompressed_name(m);
        w.file(
            &format!("/lib/dmaprobe-modules/{name}"),
            0o644,
            &module_bytes(m)?,
        )
        .map_err(werr)?;
        order.push_str(&name);
        order.push('\n');
    }
    w.file("/etc/dmaprobe-modules", 0o644, order.as_bytes())
        .map_err(werr)?;
    w.finish().map_err(werr)?;
    Ok(())
}

/// The executable `name` in the directories of `PATH`, as a shell would find it.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn read(p: &Path) -> Result<Vec<u8>, InitramfsError> {
    fs::read(p).map_err(|e| InitramfsError::Read(p.to_owned(), e))
}

/// The shared libraries a binary needs (with the loader), as `ldd` lists them;
/// none for a static binary.
pub fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, InitramfsError> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| InitramfsError::Tool("ldd", e))?;
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            }?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `virtio_blk.ko.xz` → `virtio_blk.ko`.
fn decompressed_name(m: &Path) -> String {
    let base = m
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(stem) = base.strip_suffix(ext) {
            return stem.to_owned();
        }
    }
    base
}

/// A module's bytes, decompressed on the host (busybox insmod loads plain ELF).
fn module_bytes(m: &Path) -> Result<Vec<u8>, InitramfsError> {
    let tool = match m.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return read(m),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(m)
        .output()
        .map_err(|e| InitramfsError::Tool(tool, e))?;
    if !out.status.success() {
        return Err(InitramfsError::Decompress(
            m.to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn programs_are_found_on_path() {
        let sh = find_on_path("sh").expect("sh on PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(find_on_path("no-such-program-dmaprobe"), None);
    }

    #[test]
    fn module_names() {
        assert_eq!(
            decompressed_name(Path::new("/m/virtio_blk.ko.xz")),
            "virtio_blk.ko"
        );
        assert_eq!(decompressed_name(Path::new("/m/xfs.ko")), "xfs.ko");
    }
}
