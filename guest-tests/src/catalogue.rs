//! The kernels dmaprobe can fetch by name: Debian's cloud kernels, each
//! resolved through its meta package in the suites it comes from, so that a
//! newer build is picked up, and unpacked into the cache that
//! [`Kernel::resolve`](crate::kernel::Kernel::resolve) reads.
//!
//! Each set of suites gets an apt root of its own under the cache
//! (`apt/SUITE+SUITE/`: a sources list, lists and a download cache), pointed at the
//! mirror the machine's own apt sources use, so the machine's apt
//! configuration is read but never changed, and the same meta package in two
//! suites (`linux-image-cloud-amd64` is 5.10 in bullseye, 6.1 in bookworm) is
//! never confused. A fetch downloads the image package and, for the kernels
//! that split themselves (Debian's 7.x: `linux-binary-*`, `linux-modules-*`,
//! `linux-base-*`), its companions; unpacks them; finds the image and the
//! modules in either layout (`boot/vmlinuz-REL` and `lib/modules/REL`, or
//! `usr/lib/modules/REL/vmlinuz`); runs `depmod`; and writes `kernel.env`
//! last, so a directory without it is an unfinished fetch. A fetch whose
//! package and version are already cached does nothing.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// A kernel the catalogue can fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// What `--kernel` and `dmaprobe kernel fetch` call it.
    pub name: &'static str,
    /// The Debian suites its packages come from, newest last.
    pub suites: &'static [&'static str],
    /// The meta package that names the current image package.
    pub meta: &'static str,
    /// One line for the listing.
    pub about: &'static str,
}

/// Every kernel that can be fetched by name. `debian-6.1` and `debian-6.12`
/// are the defaults ([`DEFAULT_KERNELS`](crate::kernel::DEFAULT_KERNELS)).
pub const CATALOGUE: [Entry; 4] = [
    Entry {
        name: "debian-5.10",
        suites: &["bullseye", "bullseye-security"],
        meta: "linux-image-cloud-amd64",
        about: "Debian 11's cloud kernel: before the 6.5 pinning series",
    },
    Entry {
        name: "debian-6.1",
        suites: &["bookworm", "bookworm-updates", "bookworm-security"],
        meta: "linux-image-cloud-amd64",
        about: "Debian 12's cloud kernel: before the 6.5 pinning series (a default)",
    },
    Entry {
        name: "debian-6.12",
        suites: &["bookworm", "bookworm-updates", "bookworm-security"],
        meta: "linux-image-6.12-cloud-amd64",
        about: "Debian 12's 6.12 cloud kernel: after the series (a default)",
    },
    Entry {
        name: "debian-bpo",
        suites: &["trixie-backports"],
        meta: "linux-image-cloud-amd64",
        about: "the newest cloud kernel of Debian 13's backports",
    },
];

/// How old an apt root's lists may be before a fetch refreshes them.
const LISTS_FRESH: Duration = Duration::from_secs(6 * 3600);

/// The keyring Debian's archive is signed with (package debian-archive-keyring).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("No kernel {0:?} in the catalogue (dmaprobe kernel list shows it)")]
    Unknown(String),
    #[error(
        "The machine's apt sources name no Debian mirror (no 'main' component of a \
         Debian suite in /etc/apt/sources.list*): add one and retry"
    )]
    NoMirror,
    #[error("{what} failed: {detail}")]
    Tool { what: String, detail: String },
    #[error("{meta} in {suites} names no image package (apt-cache depends {meta})")]
    NoImagePackage { meta: String, suites: String },
    #[error("{package} has an unexpected layout: {why}")]
    Layout { package: String, why: String },
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// Finds a catalogue kernel by name.
pub fn find(name: &str) -> Result<&'static Entry, FetchError> {
    CATALOGUE
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| FetchError::Unknown(name.to_owned()))
}

/// What a cached kernel's `kernel.env` says, if it is complete.
pub fn cached_env(dir: &Path) -> Option<HashMap<String, String>> {
    let text = fs::read_to_string(dir.join("kernel.env")).ok()?;
    let env: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let image = dir.join(env.get("VMLINUZ").map_or("vmlinuz", String::as_str));
    image.is_file().then_some(env)
}

/// The mirrors the machine's apt sources use: Debian's archive, and its
/// security archive (the same host's `debian-security` where none is listed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirrors {
    pub archive: String,
    pub security: String,
}

impl Mirrors {
    /// Reads them from apt's own view of the sources (deb822 or one-line).
    pub fn from_apt() -> Result<Mirrors, FetchError> {
        let out = tool(
            Command::new("apt-get").args([
                "indextargets",
                "--no-release-info",
                "--format",
                "$(RELEASE) $(REPO_URI)",
                "Identifier: Packages",
                "Component: main",
            ]),
            "apt-get indextargets",
        )?;
        Mirrors::from_indextargets(&out).ok_or(FetchError::NoMirror)
    }

    /// From lines of `SUITE URI`.
    fn from_indextargets(text: &str) -> Option<Mirrors> {
        let mut archive = None;
        let mut security = None;
        for (suite, uri) in text.lines().filter_map(|l| l.split_once(' ')) {
            let uri = uri.trim().trim_end_matches('/').to_owned();
            if suite.ends_with("-security") {
                security.get_or_insert(uri);
            } else if !uri.ends_with("-security") {
                archive.get_or_insert(uri);
            }
        }
        let archive = archive?;
        let security = security.unwrap_or_else(|| format!("{archive}-security"));
        Some(Mirrors { archive, security })
    }

    fn uri_for(&self, suite: &str) -> &str {
        if suite.ends_with("-security") {
            &self.security
        } else {
            &self.archive
        }
    }
}

/// The packages that make up the current kernel of an entry, as its meta
/// package names them today.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `linux-image-REL`.
    pub image: String,
    pub version: String,
    /// `REL`, the kernel's release string.
    pub release: String,
    /// The image package and its companions, with their download sizes.
    pub packages: Vec<(String, u64)>,
}

impl Resolved {
    pub fn bytes(&self) -> u64 {
        self.packages.iter().map(|(_, size)| size).sum()
    }
}

/// An apt root for one catalogue kernel's suites, under `cache/apt/`.
#[derive(Debug)]
pub struct AptRoot {
    dir: PathBuf,
    entry: &'static Entry,
}

impl AptRoot {
    /// Makes (or reuses) the root and writes its sources for `mirrors`.
    pub fn new(cache: &Path, entry: &'static Entry, mirrors: &Mirrors) -> Result<Self, FetchError> {
        let dir = Self::dir(cache, entry);
        for sub in [
            "etc/parts.d",
            "etc/preferences.d",
            "lists/partial",
            "archives/partial",
        ] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(|e| FetchError::Write(d, e))?;
        }
        let sources: String = entry
            .suites
            .iter()
            .map(|s| {
                format!(
                    "deb [signed-by={KEYRING}] {} {s} main\n",
                    mirrors.uri_for(s)
                )
            })
            .collect();
        let path = dir.join("etc/sources.list");
        if fs::read_to_string(&path).ok().as_deref() != Some(sources.as_str()) {
            fs::write(&path, sources).map_err(|e| FetchError::Write(path.clone(), e))?;
            // Lists for other sources are stale.
            let _ = fs::remove_file(dir.join("lists/.updated"));
        }
        Ok(AptRoot { dir, entry })
    }

    /// Where `entry`'s root lives: kernels from the same suites share a root
    /// and its lists.
    fn dir(cache: &Path, entry: &Entry) -> PathBuf {
        cache.join("apt").join(entry.suites.join("+"))
    }

    /// The root an earlier fetch left for `entry`'s suites, if its lists
    /// are there: enough to say what the meta package names, offline.
    pub fn existing(cache: &Path, entry: &'static Entry) -> Option<Self> {
        let dir = Self::dir(cache, entry);
        dir.join("lists/.updated")
            .is_file()
            .then_some(AptRoot { dir, entry })
    }

    /// apt's options that keep it inside this root.
    fn options(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let mut o = vec![
            format!("Dir::Etc::sourcelist={}", d("etc/sources.list")),
            format!("Dir::Etc::sourceparts={}", d("etc/parts.d")),
            format!("Dir::Etc::preferences={}", d("etc/preferences")),
            format!("Dir::Etc::preferencesparts={}", d("etc/preferences.d")),
            format!("Dir::State::lists={}", d("lists")),
            format!("Dir::State::status={}", d("status")),
            format!("Dir::Cache={}", self.dir.display()),
            format!("Dir::Cache::archives={}", d("archives")),
            // Kept, so a second apt-cache call costs milliseconds, not seconds.
            format!("Dir::Cache::pkgcache={}", d("pkgcache.bin")),
            format!("Dir::Cache::srcpkgcache={}", d("srcpkgcache.bin")),
            "Acquire::Languages=none".to_owned(),
        ];
        // As root, apt downloads as _apt, who cannot write into a cache
        // under /root.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            o.push("APT::Sandbox::User=root".to_owned());
        }
        o.into_iter().flat_map(|o| ["-o".to_owned(), o]).collect()
    }

    fn apt(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(self.options());
        cmd
    }

    /// Refreshes the lists if they are older than [`LISTS_FRESH`], or always
    /// with `force`.
    pub fn update(&self, force: bool) -> Result<(), FetchError> {
        let stamp = self.dir.join("lists/.updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < LISTS_FRESH);
        if fresh && !force {
            return Ok(());
        }
        tool(
            self.apt("apt-get").args(["-qq", "update"]),
            &format!("apt-get update of {}", self.entry.suites.join(", ")),
        )?;
        fs::write(&stamp, b"").map_err(|e| FetchError::Write(stamp, e))
    }

    /// What the meta package names now.
    pub fn resolve(&self) -> Result<Resolved, FetchError> {
        let meta = self.entry.meta;
        let no_image = || FetchError::NoImagePackage {
            meta: meta.to_owned(),
            suites: self.entry.suites.join(", "),
        };
        let depends = tool(
            self.apt("apt-cache")
                .args(["depends", "--no-recommends", "--no-suggests", meta]),
            &format!("apt-cache depends {meta}"),
        )?;
        let image = depends_on(&depends, "linux-image-")
            .next()
            .ok_or_else(no_image)?;
        let release = image.trim_start_matches("linux-image-").to_owned();
        let show = |pkgs: &[String]| {
            tool(
                self.apt("apt-cache")
                    .args(["show", "--no-all-versions"])
                    .args(pkgs),
                &format!("apt-cache show {}", pkgs.join(" ")),
            )
        };
        let stanzas = parse_stanzas(&show(std::slice::from_ref(&image))?);
        let stanza = stanzas.first().ok_or_else(no_image)?;
        let version = stanza.get("Version").cloned().ok_or_else(no_image)?;
        // Debian's 7.x image package is nearly empty: the kernel, its
        // modules and its config come in companions named for the release.
        let companions: Vec<String> = ["linux-binary-", "linux-modules-", "linux-base-"]
            .iter()
            .map(|prefix| format!("{prefix}{release}"))
            .filter(|p| depends_field(stanza).any(|d| d == *p))
            .collect();
        let mut packages = vec![(image.clone(), size(stanza))];
        if !companions.is_empty() {
            for s in parse_stanzas(&show(&companions)?) {
                if let Some(name) = s.get("Package") {
                    packages.push((name.clone(), size(&s)));
                }
            }
        }
        Ok(Resolved {
            image,
            version,
            release,
            packages,
        })
    }

    /// Downloads `packages` at `version` into `into`.
    fn download(&self, resolved: &Resolved, into: &Path) -> Result<(), FetchError> {
        let wanted: Vec<String> = resolved
            .packages
            .iter()
            .map(|(p, _)| format!("{p}={}", resolved.version))
            .collect();
        tool(
            self.apt("apt-get")
                .current_dir(into)
                .args(["-qq", "download"])
                .args(&wanted),
            &format!("apt-get download {}", wanted.join(" ")),
        )
        .map(drop)
    }
}

/// The packages a stanza's `Depends` names (alternatives and versions dropped).
fn depends_field(stanza: &HashMap<String, String>) -> impl Iterator<Item = &str> {
    stanza
        .get("Depends")
        .map_or("", String::as_str)
        .split([',', '|'])
        .filter_map(|d| d.split_whitespace().next())
}

/// The `Depends:` lines of `apt-cache depends` output that start with `prefix`.
fn depends_on<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(move |p| p.starts_with(prefix))
        .map(str::to_owned)
}

fn size(stanza: &HashMap<String, String>) -> u64 {
    stanza.get("Size").and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Debian control stanzas (`Key: value`, blank-line separated; continuation
/// lines are dropped, as no field read here has them).
fn parse_stanzas(text: &str) -> Vec<HashMap<String, String>> {
    let mut all = Vec::new();
    let mut cur = HashMap::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                all.push(std::mem::take(&mut cur));
            }
        } else if let Some((k, v)) = line.split_once(':').filter(|_| !line.starts_with(' ')) {
            cur.insert(k.to_owned(), v.trim().to_owned());
        }
    }
    if !cur.is_empty() {
        all.push(cur);
    }
    all
}

/// Runs `cmd`; its stdout, or an error with its stderr.
fn tool(cmd: &mut Command, what: &str) -> Result<String, FetchError> {
    let failed = |detail: String| FetchError::Tool {
        what: what.to_owned(),
        detail,
    };
    let out = cmd.output().map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(failed(format!("{} ({last})", out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where a fetch stands, for the listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cached {
    /// Fetched: its release, package and version.
    Yes {
        release: String,
        package: String,
        version: String,
    },
    No,
}

/// The release `entry`'s meta package names in the lists an earlier fetch
/// left (no network), if any.
pub fn available(cache: &Path, entry: &'static Entry) -> Option<String> {
    AptRoot::existing(cache, entry)?
        .resolve()
        .ok()
        .map(|r| r.release)
}

/// What the cache holds of `entry`.
pub fn cached(cache: &Path, entry: &Entry) -> Cached {
    match cached_env(&cache.join("kernels").join(entry.name)) {
        Some(env) => {
            let get = |k: &str| env.get(k).cloned().unwrap_or_default();
            Cached::Yes {
                release: get("RELEASE"),
                package: get("PACKAGE"),
                version: get("VERSION"),
            }
        }
        None => Cached::No,
    }
}

/// Fetches `entry` into `cache/kernels/NAME` unless its current package is
/// there already; `say` hears of each step. Returns the release.
pub fn fetch(
    cache: &Path,
    entry: &'static Entry,
    mirrors: &Mirrors,
    say: &mut dyn FnMut(&str),
) -> Result<String, FetchError> {
    let root = AptRoot::new(cache, entry, mirrors)?;
    root.update(false)?;
    // Lists a day old may name a version the mirror no longer has: refresh
    // once and resolve again before giving up.
    let resolved = match root.resolve() {
        Ok(r) => r,
        Err(_) => {
            root.update(true)?;
            root.resolve()?
        }
    };
    let name = entry.name;
    if let Cached::Yes {
        package, version, ..
    } = cached(cache, entry)
    {
        if package == resolved.image && version == resolved.version {
            say(&format!(
                "kernel {name}: {} {} cached",
                resolved.image, resolved.version
            ));
            return Ok(resolved.release);
        }
    }
    say(&format!(
        "kernel {name}: downloading {} {} ({} MB)…",
        resolved.image,
        resolved.version,
        resolved.bytes() / 1_000_000
    ));
    let kernels = cache.join("kernels");
    fs::create_dir_all(&kernels).map_err(|e| FetchError::Write(kernels.clone(), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempdir_in(&kernels)
        .map_err(|e| FetchError::Write(kernels.clone(), e))?;
    if root.download(&resolved, tmp.path()).is_err() {
        root.update(true)?;
        root.download(&root.resolve()?, tmp.path())?;
    }
    say(&format!("kernel {name}: unpacking and running depmod"));
    let unpacked = unpack(tmp.path(), entry, &resolved)?;
    let dir = kernels.join(name);
    let old = kernels.join(format!(".{name}.old"));
    let _ = fs::remove_dir_all(&old);
    if dir.exists() {
        fs::rename(&dir, &old).map_err(|e| FetchError::Write(dir.clone(), e))?;
    }
    fs::rename(&unpacked, &dir).map_err(|e| FetchError::Write(dir.clone(), e))?;
    let _ = fs::remove_dir_all(&old);
    say(&format!(
        "kernel {name}: {} ready in {}",
        resolved.release,
        dir.display()
    ));
    Ok(resolved.release)
}

/// Unpacks the downloaded packages in `tmp` into `tmp/root` in the cache's
/// layout (`vmlinuz`, `lib/modules/REL` after depmod, `config`,
/// `kernel.env`); the root's path.
fn unpack(tmp: &Path, entry: &Entry, resolved: &Resolved) -> Result<PathBuf, FetchError> {
    let root = tmp.join("root");
    let layout = |why: String| FetchError::Layout {
        package: resolved.image.clone(),
        why,
    };
    let debs: Vec<PathBuf> = fs::read_dir(tmp)
        .map_err(|e| FetchError::Write(tmp.to_owned(), e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    if debs.len() != resolved.packages.len() {
        return Err(layout(format!(
            "{} packages downloaded, {} expected",
            debs.len(),
            resolved.packages.len()
        )));
    }
    for deb in &debs {
        tool(
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root),
            &format!("dpkg-deb -x {}", deb.display()),
        )?;
        let _ = fs::remove_file(deb);
    }
    let rel = &resolved.release;
    // depmod -b wants ROOT/lib/modules; 6.18 and later unpack into usr/.
    let modules = root.join("lib/modules").join(rel);
    let usr_modules = root.join("usr/lib/modules").join(rel);
    if !modules.is_dir() && usr_modules.is_dir() {
        let lib = root.join("lib/modules");
        fs::create_dir_all(&lib).map_err(|e| FetchError::Write(lib.clone(), e))?;
        fs::rename(&usr_modules, &modules).map_err(|e| FetchError::Write(modules.clone(), e))?;
    }
    if !modules.is_dir() {
        return Err(layout(format!("no lib/modules/{rel}")));
    }
    let rel_path = |p: PathBuf| {
        p.strip_prefix(&root)
            .map(Path::to_owned)
            .unwrap_or_default()
    };
    let image = [
        root.join(format!("boot/vmlinuz-{rel}")),
        modules.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| {
        layout(format!(
            "no boot/vmlinuz-{rel} or lib/modules/{rel}/vmlinuz"
        ))
    })?;
    let config = [
        root.join(format!("boot/config-{rel}")),
        modules.join("config"),
    ]
    .into_iter()
    .find(|p| p.is_file());
    tool(
        Command::new("depmod").arg("-b").arg(&root).arg(rel),
        &format!("depmod for {rel}"),
    )?;
    let link = root.join("vmlinuz");
    std::os::unix::fs::symlink(rel_path(image), &link).map_err(|e| FetchError::Write(link, e))?;
    let mut env = format!(
        "NAME={}\nMETA={}\nPACKAGE={}\nVERSION={}\nRELEASE={rel}\nVMLINUZ=vmlinuz\nMODULES=lib/modules/{rel}\n",
        entry.name, entry.meta, resolved.image, resolved.version
    );
    if let Some(config) = config {
        env += &format!("CONFIG={}\n", rel_path(config).display());
    }
    // Written last: its presence marks the directory complete.
    let path = root.join("kernel.env");
    fs::write(&path, env).map_err(|e| FetchError::Write(path, e))?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_from_the_machines_sources() {
        let m = Mirrors::from_indextargets(
            "bookworm http://mirror.example/debian/\n\
             bookworm-security http://mirror.example/debian-security/\n\
             bookworm-updates http://mirror.example/debian/\n",
        )
        .unwrap();
        assert_eq!(m.archive, "http://mirror.example/debian");
        assert_eq!(m.security, "http://mirror.example/debian-security");
        assert_eq!(m.uri_for("bullseye-security"), m.security);
        assert_eq!(m.uri_for("trixie-backports"), m.archive);
        let no_security = Mirrors::from_indextargets("bookworm http://m/debian/\n").unwrap();
        assert_eq!(no_security.security, "http://m/debian-security");
        assert_eq!(Mirrors::from_indextargets(""), None);
    }

    #[test]
    fn the_image_package_and_its_companions_are_read_from_apt() {
        let depends = "linux-image-cloud-amd64\n  Depends: linux-base-cloud-amd64\n  \
                       Depends: linux-image-7.3.4+deb13-cloud-amd64\n";
        assert_eq!(
            depends_on(depends, "linux-image-").collect::<Vec<_>>(),
            ["linux-image-7.3.4+deb13-cloud-amd64"]
        );
        let show = "Package: linux-image-7.3.4+deb13-cloud-amd64\nVersion: 7.3.4-1~bpo13+1\n\
                    Depends: dracut | initramfs-tools (>= 0.120), linux-binary-7.3.4+deb13-cloud-amd64 \
                    (= 7.3.4-1~bpo13+1), linux-modules-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1)\n\
                    Size: 1928\n\nPackage: other\nSize: 5\n";
        let stanzas = parse_stanzas(show);
        assert_eq!(stanzas.len(), 2);
        assert_eq!(size(&stanzas[0]), 1928);
        let deps: Vec<&str> = depends_field(&stanzas[0]).collect();
        assert!(
            deps.contains(&"linux-binary-7.3.4+deb13-cloud-amd64"),
            "{deps:?}"
        );
        assert!(deps.contains(&"initramfs-tools"), "{deps:?}");
    }

    #[test]
    fn every_default_is_in_the_catalogue_and_names_are_unique() {
        for d in crate::kernel::DEFAULT_KERNELS {
            assert!(find(d).is_ok(), "{d}");
        }
        let mut names: Vec<_> = CATALOGUE.iter().map(|e| e.name).collect();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len());
        assert!(matches!(find("debian-9"), Err(FetchError::Unknown(_))));
    }
}
