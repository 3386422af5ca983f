//! The daemon's own process as `/proc` shows it: resident memory, open file
//! descriptors and threads, for `status` (a soak samples them to see that
//! neither grows without bound).
//!
//! Each figure is read afresh on every call and is `None` when `/proc` cannot
//! tell it (not mounted, not Linux, a field missing); nothing here fails.

use std::fs;
use std::path::Path;

use serde::Serialize;

/// What `/proc/self` says of this process now.
///
/// `rss_bytes` counts the guest's memory too, as far as the daemon has
/// touched it (it is mapped shared, and every DMA touches it): up to the
/// guest's memory size. What the daemon itself allocates is `rss_anon_bytes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcessFigures {
    /// Resident set size (`VmRSS` of `/proc/self/status`), in bytes.
    pub rss_bytes: Option<u64>,
    /// Of it, anonymous memory: the heap and stacks (`RssAnon`).
    pub rss_anon_bytes: Option<u64>,
    /// Of it, shared memory: the guest's memory the daemon has touched (`RssShmem`).
    pub rss_shmem_bytes: Option<u64>,
    /// Open file descriptors: the entries of `/proc/self/fd`, less the one
    /// that reading the directory opens. In `status` this includes the
    /// asking control client's connection (two descriptors).
    pub open_fds: Option<u64>,
    /// Threads (`Threads` of `/proc/self/status`).
    pub threads: Option<u64>,
}

impl ProcessFigures {
    /// This process's figures, from `/proc/self`.
    pub fn now() -> Self {
        Self::read(Path::new("/proc/self"))
    }

    /// The figures of the process whose `/proc` directory is `proc_dir`.
    fn read(proc_dir: &Path) -> Self {
        let status = fs::read_to_string(proc_dir.join("status")).ok();
        let field = |key: &str| status.as_deref().and_then(|s| status_field(s, key));
        ProcessFigures {
            rss_bytes: field("VmRSS:").map(|kib| kib.saturating_mul(1024)),
            rss_anon_bytes: field("RssAnon:").map(|kib| kib.saturating_mul(1024)),
            rss_shmem_bytes: field("RssShmem:").map(|kib| kib.saturating_mul(1024)),
            open_fds: count_fds(&proc_dir.join("fd")),
            threads: field("Threads:"),
        }
    }
}

/// The number after `key` on its line of `/proc/PID/status` text
/// (`VmRSS:     1234 kB` gives 1234, in the unit the line names).
fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Entries of a `/proc/PID/fd` directory, less one for the descriptor that
/// listing it holds open (it is among the entries while it is read).
fn count_fds(dir: &Path) -> Option<u64> {
    let entries = fs::read_dir(dir).ok()?;
    let mut n = 0u64;
    for entry in entries {
        entry.ok()?;
        n += 1;
    }
    Some(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of a real `/proc/self/status` (Linux 6.1) around the fields read.
    const STATUS: &str = "Name:\tdmaprobe\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  214400 kB\nVmSize:\t  148864 kB\nVmHWM:\t   13420 kB\n\
        VmRSS:\t   12876 kB\nRssAnon:\t    5120 kB\nRssFile:\t    7244 kB\n\
        RssShmem:\t     512 kB\nVmSwap:\t       0 kB\n\
        Threads:\t7\nSigQ:\t0/95944\n";

    #[test]
    fn reads_rss_and_threads_from_status_text() {
        assert_eq!(status_field(STATUS, "VmRSS:"), Some(12876));
        assert_eq!(status_field(STATUS, "Threads:"), Some(7));
        // Only a line that starts with the key counts (VmRSS is not RssAnon).
        assert_eq!(status_field(STATUS, "Rss:"), None);
        assert_eq!(status_field(STATUS, "VmLck:"), None);
        assert_eq!(status_field("VmRSS:\tlots kB\n", "VmRSS:"), None);
        assert_eq!(status_field("", "Threads:"), None);
    }

    #[test]
    fn reads_a_process_directory() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("status"), STATUS).unwrap();
        let fd = dir.path().join("fd");
        fs::create_dir(&fd).unwrap();
        for n in ["0", "1", "2", "3"] {
            fs::write(fd.join(n), "").unwrap();
        }
        // Three descriptors, and the one that listed them.
        assert_eq!(
            ProcessFigures::read(dir.path()),
            ProcessFigures {
                rss_bytes: Some(12876 * 1024),
                rss_anon_bytes: Some(5120 * 1024),
                rss_shmem_bytes: Some(512 * 1024),
                open_fds: Some(3),
                threads: Some(7),
            }
        );
    }

    #[test]
    fn an_unreadable_proc_gives_nothing_and_no_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ProcessFigures::read(&dir.path().join("gone")),
            ProcessFigures::default()
        );
        let json = serde_json::to_value(ProcessFigures::default()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"rss_bytes": null, "rss_anon_bytes": null,
                "rss_shmem_bytes": null, "open_fds": null, "threads": null})
        );
    }

    #[test]
    fn this_process_has_memory_descriptors_and_threads() {
        let before = ProcessFigures::now();
        assert!(before.rss_bytes.unwrap() > 0, "{before:?}");
        assert!(before.rss_anon_bytes.unwrap() <= before.rss_bytes.unwrap());
        assert!(before.threads.unwrap() >= 1, "{before:?}");
        let open = before.open_fds.unwrap();
        assert!(open >= 3, "{before:?}");
        // A hundred more open files are about a hundred more descriptors
        // (other tests, in parallel threads, may open or close a few).
        let files: Vec<fs::File> = (0..100)
            .map(|_| fs::File::open("/proc/self/status").unwrap())
            .collect();
        let after = ProcessFigures::now().open_fds.unwrap();
        drop(files);
        assert!(after >= open + 80, "{open} -> {after}");
    }
}
