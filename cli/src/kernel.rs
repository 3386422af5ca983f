//! `dmaprobe kernel`: the kernels that can be named, fetched into the cache
//! ([`guest_tests::catalogue`]).

use std::path::Path;

use clap::{Args, Subcommand};
use guest_tests::catalogue::{self, Cached, Entry, FetchError, Mirrors, CATALOGUE};
use guest_tests::kernel::{cache_dir, DEFAULT_KERNELS};

#[derive(Debug, Args)]
pub struct KernelArgs {
    #[command(subcommand)]
    pub command: KernelCommand,
}

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// List the kernels that can be named with `dmaprobe run --kernel NAME`:
    /// whether each is in the cache (and its release), the Debian suites it
    /// comes from, and what it is.
    List,
    /// Fetch kernels into the cache, through their meta packages on the
    /// mirror the machine's apt sources use (apt-get download, dpkg-deb,
    /// depmod; no root needed, nothing installed). A kernel whose current
    /// package is cached already is kept.
    ///
    /// Exits 0 when every kernel asked for is cached, 1 otherwise.
    Fetch {
        /// Kernels to fetch (default: the defaults, debian-6.1 and debian-6.12).
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// Fetch every kernel of the catalogue.
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
}

/// Runs `dmaprobe kernel`.
pub fn run(args: KernelArgs) -> Result<(), FetchError> {
    let cache = cache_dir();
    match args.command {
        KernelCommand::List => {
            print!("{}", listing(&cache));
            Ok(())
        }
        KernelCommand::Fetch { names, all } => {
            let entries: Vec<&'static Entry> = if all {
                CATALOGUE.iter().collect()
            } else {
                or_defaults(&names)
                    .iter()
                    .map(|n| catalogue::find(n))
                    .collect::<Result<_, _>>()?
            };
            fetch_all(&cache, &entries, "")
        }
    }
}

/// The kernels named, or the defaults when none is.
fn or_defaults(names: &[String]) -> Vec<String> {
    if names.is_empty() {
        DEFAULT_KERNELS.iter().map(|&d| d.to_owned()).collect()
    } else {
        names.to_vec()
    }
}

/// Fetches `entries` into `cache`, each step on stderr (after `why`, if
/// one is given).
fn fetch_all(cache: &Path, entries: &[&'static Entry], why: &str) -> Result<(), FetchError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mirrors = Mirrors::from_apt()?;
    for &entry in entries {
        if !why.is_empty() {
            eprintln!("[{}] {why}", entry.name);
        }
        catalogue::fetch(cache, entry, &mirrors, &mut |line| eprintln!("{line}"))?;
    }
    Ok(())
}

/// Fetches the catalogue kernels `specs` name (`--kernel NAME[=LABEL]`; the
/// defaults when there are none) that are not cached yet, saying so on
/// stderr: `dmaprobe run --kernel debian-bpo` works on a machine where only
/// the defaults were fetched.
pub fn fetch_missing(specs: &[String]) -> Result<(), FetchError> {
    let cache = cache_dir();
    let missing: Vec<&'static Entry> = or_defaults(specs)
        .iter()
        .map(|s| s.split_once('=').map_or(s.as_str(), |(name, _)| name))
        .filter(|name| !Path::new(name).exists())
        .filter_map(|name| catalogue::find(name).ok())
        .filter(|e| catalogue::cached(&cache, e) == Cached::No)
        .collect();
    fetch_all(&cache, &missing, "not in the cache: fetching it")
}

/// The catalogue as a table: name, what the cache holds, suites, about.
pub fn listing(cache: &Path) -> String {
    let rows: Vec<[String; 4]> = CATALOGUE
        .iter()
        .map(|e| {
            let state = match (catalogue::cached(cache, e), catalogue::available(cache, e)) {
                (Cached::Yes { release, .. }, Some(newer)) if newer != release => {
                    format!("cached: {release} ({newer} to fetch)")
                }
                (Cached::Yes { release, .. }, _) => format!("cached: {release}"),
                (Cached::No, Some(release)) => format!("not fetched: {release}"),
                (Cached::No, None) => "not fetched".to_owned(),
            };
            [
                e.name.to_owned(),
                state,
                e.suites.join(" "),
                e.about.to_owned(),
            ]
        })
        .collect();
    let header = ["kernel", "cache", "suites", "about"].map(str::to_owned);
    let widths: Vec<usize> = (0..3)
        .map(|i| {
            std::iter::once(&header)
                .chain(&rows)
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        out += &format!(
            "{:w0$}  {:w1$}  {:w2$}  {}\n",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    out += &format!(
        "\nFetch with `dmaprobe kernel fetch NAME` (scripts/setup fetches the defaults) \
         into {}/kernels; any other kernel: --kernel PATH.\n",
        cache.display()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_says_what_is_cached_in_aligned_columns() {
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("kernels/debian-6.12");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.join("kernel.env"), "RELEASE=6.12.1-cloud-amd64\n").unwrap();
        let text = listing(cache.path());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("kernel "), "{text}");
        let row = |name: &str| *lines.iter().find(|l| l.starts_with(name)).unwrap();
        assert!(
            row("debian-6.12 ").contains("cached: 6.12.1-cloud-amd64"),
            "{text}"
        );
        assert!(row("debian-bpo ").contains("not fetched"), "{text}");
        let column = |l: &str| l.find("bookworm").or_else(|| l.find("trixie"));
        assert_eq!(
            column(row("debian-6.1 ")),
            column(row("debian-bpo ")),
            "{text}"
        );
    }
}
