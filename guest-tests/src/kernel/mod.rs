//! Guest kernels: Debian's, from the cache `dmaprobe kernel fetch` fills, or a user's
//! own, given by path in the forms a developer has it.
//!
//! - [`spec`]: what one `--kernel` says: `debian-6.12`, or
//!   `PATH[:MODULES]`, each with an optional `=LABEL`.
//! - `layout`: where a path keeps its image, modules and configuration: an
//!   image file, a build tree, an unpacked Debian root.
//! - [`bzimage`]: the release an x86 image names in its boot header.
//!
//! [`resolve_all`] turns the `--kernel`s (and `--modules`) into [`Kernel`]s,
//! each named by its label, its cache name or its release. Modules without a
//! `modules.dep` (a build tree's) stay [`Modules::Unindexed`]: the run indexes
//! them in its own directory ([`crate::modules::index_privately`]).

pub mod bzimage;
mod layout;
pub mod spec;

use std::fs;
use std::path::{Path, PathBuf};

use crate::initramfs::VIRTIO_BLK_MODULES;
use spec::{KernelSpec, Source};

/// The kernels `dmaprobe run` boots when none is named.
pub const DEFAULT_KERNELS: [&str; 2] = ["debian-6.1", "debian-6.12"];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "Kernel {name} is not in the cache {}: fetch it with `dmaprobe kernel fetch {name}`",
        .cache.display()
    )]
    NotCached { name: String, cache: PathBuf },
    #[error("No kernel {0} in the catalogue: `dmaprobe kernel list` shows the names")]
    NotInCatalogue(String),
    #[error("--kernel {spec:?}: {why} (forms: debian-6.12, PATH, PATH:MODULES, each =LABEL)")]
    Spec { spec: String, why: &'static str },
    #[error(
        "Kernel {0} does not exist: give a name (`dmaprobe kernel list`), or the \
         path of an image, a build tree or an unpacked Debian root"
    )]
    NotFound(PathBuf),
    #[error(
        "Build tree {0} has no arch/x86/boot/bzImage: run make bzImage there (with O= \
         for a tree built out of the source), or give the image's path"
    )]
    NoBzImage(PathBuf),
    #[error(
        "{0} is neither a kernel image, a build tree (arch/x86/boot/bzImage) nor an \
         unpacked Debian root (vmlinuz or boot/vmlinuz-RELEASE): give the image's path"
    )]
    NotAKernel(PathBuf),
    #[error("Debian root {root} holds several kernels ({images}): give the path of one")]
    SeveralImages { root: PathBuf, images: String },
    #[error(
        "{0} holds no kernel modules (no modules.dep, modules.order or \
         lib/modules/RELEASE): give lib/modules/RELEASE, the INSTALL_MOD_PATH of \
         make modules_install, or the build tree"
    )]
    NoModules(PathBuf),
    #[error(
        "Modules {dir} are for {theirs}, the image is {release}: give the modules \
         built with this image"
    )]
    ModulesRelease {
        dir: PathBuf,
        theirs: String,
        release: String,
    },
    #[error(
        "Kernel {kernel} builds {needed} as modules ({config} says so), and none were \
         found beside it: give them with --kernel {kernel}:DIR (DIR: \
         lib/modules/RELEASE, an INSTALL_MOD_PATH or the build tree)"
    )]
    NeedsModules {
        kernel: PathBuf,
        needed: String,
        config: PathBuf,
    },
    #[error(
        "--modules is for a --kernel given by path without modules of its own, and \
         there is none: drop --modules, or pair it, --kernel PATH:DIR"
    )]
    ModulesForNone,
    #[error(
        "--modules gives one modules directory, but {0} kernels given by path have \
         none of their own: pair each with its modules, --kernel PATH:DIR"
    )]
    ModulesAmbiguous(usize),
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
}

/// A kernel to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// How reports name it: the user's label, `debian-6.12`, or the release
    /// (never a path).
    pub name: String,
    pub image: PathBuf,
    /// Its modules, if it has any.
    pub modules: Option<Modules>,
    /// The release string, where known.
    pub release: Option<String>,
}

/// Where a kernel's modules are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Modules {
    /// A `lib/modules/RELEASE` directory with its `modules.dep`.
    Indexed(PathBuf),
    /// Modules without a `modules.dep`: a build tree's (listed in its
    /// `modules.order`), or an unpacked package's never depmod'ed. Only read;
    /// the run indexes them in a directory of its own.
    Unindexed(PathBuf),
}

impl Modules {
    /// The modules in `dir`, indexed or not.
    fn of(dir: &Path) -> Modules {
        if dir.join("modules.dep").is_file() {
            Modules::Indexed(dir.to_owned())
        } else {
            Modules::Unindexed(dir.to_owned())
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            Modules::Indexed(dir) | Modules::Unindexed(dir) => dir,
        }
    }
}

/// Where dmaprobe keeps downloaded kernels: `$DMAPROBE_CACHE`, else
/// `$XDG_CACHE_HOME/dmaprobe`, else `~/.cache/dmaprobe` (as scripts/setup does).
pub fn cache_dir() -> PathBuf {
    let env = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("DMAPROBE_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("dmaprobe")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/dmaprobe")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/dmaprobe"))
}

/// The kernels `--kernel` names (the default matrix without one), resolved;
/// `modules` (`--modules`) goes to the one kernel given by path without
/// modules of its own.
pub fn resolve_all(specs: &[String], modules: Option<&Path>) -> Result<Vec<Kernel>, KernelError> {
    let given: Vec<&str> = if specs.is_empty() {
        DEFAULT_KERNELS.to_vec()
    } else {
        specs.iter().map(String::as_str).collect()
    };
    let mut specs: Vec<KernelSpec> = given
        .into_iter()
        .map(KernelSpec::parse)
        .collect::<Result<_, _>>()?;
    if let Some(dir) = modules {
        let mut lacking: Vec<&mut Option<PathBuf>> = specs
            .iter_mut()
            .filter_map(|s| match &mut s.source {
                Source::Path { modules, .. } if modules.is_none() => Some(modules),
                _ => None,
            })
            .collect();
        match lacking.as_mut_slice() {
            [one] => **one = Some(dir.to_owned()),
            [] => return Err(KernelError::ModulesForNone),
            several => return Err(KernelError::ModulesAmbiguous(several.len())),
        }
    }
    specs.into_iter().map(Kernel::from_spec).collect()
}

impl Kernel {
    /// Resolves one `--kernel` spec, with `modules` as its modules if it is
    /// given by path without its own.
    pub fn resolve(spec: &str, modules: Option<&Path>) -> Result<Kernel, KernelError> {
        let mut spec = KernelSpec::parse(spec)?;
        if let Source::Path {
            modules: m @ None, ..
        } = &mut spec.source
        {
            *m = modules.map(Path::to_owned);
        }
        Kernel::from_spec(spec)
    }

    fn from_spec(spec: KernelSpec) -> Result<Kernel, KernelError> {
        let mut kernel = match &spec.source {
            Source::Cached(name) => Kernel::cached(name, &cache_dir())?,
            Source::Path { path, modules } => Kernel::by_path(path, modules.as_deref())?,
        };
        if let Some(label) = spec.label {
            kernel.name = label;
        }
        Ok(kernel)
    }

    /// A kernel given by path, named by its release (else its image's file
    /// name); one that needs modules must have them.
    fn by_path(path: &Path, modules: Option<&Path>) -> Result<Kernel, KernelError> {
        let found = layout::find(path, modules)?;
        if let (None, Some(config)) = (&found.modules, &found.config) {
            let needed = modules_needed(config)?;
            if !needed.is_empty() {
                return Err(KernelError::NeedsModules {
                    kernel: path.to_owned(),
                    needed: needed.join(", "),
                    config: config.clone(),
                });
            }
        }
        let name = match (&found.release, found.image.file_name()) {
            (Some(release), _) => release.clone(),
            (None, Some(file)) => file.to_string_lossy().into_owned(),
            (None, None) => "kernel".to_owned(),
        };
        Ok(Kernel {
            name,
            image: found.image,
            modules: found.modules,
            release: found.release,
        })
    }

    fn cached(name: &str, cache: &Path) -> Result<Kernel, KernelError> {
        if crate::catalogue::find(name).is_err() {
            return Err(KernelError::NotInCatalogue(name.to_owned()));
        }
        let dir = cache.join("kernels").join(name);
        let env = crate::catalogue::cached_env(&dir).ok_or_else(|| KernelError::NotCached {
            name: name.to_owned(),
            cache: cache.to_owned(),
        })?;
        Ok(Kernel {
            name: name.to_owned(),
            image: dir.join(env.get("VMLINUZ").map_or("vmlinuz", String::as_str)),
            modules: env.get("MODULES").map(|m| Modules::of(&dir.join(m))),
            release: env.get("RELEASE").cloned(),
        })
    }
}

/// The modules a guest over virtio-blk needs (virtio_pci, virtio_blk) that
/// the kernel configuration `config` builds as modules
/// (`CONFIG_VIRTIO_BLK=m`).
fn modules_needed(config: &Path) -> Result<Vec<&'static str>, KernelError> {
    let text = fs::read_to_string(config).map_err(|e| KernelError::Read(config.to_owned(), e))?;
    Ok(VIRTIO_BLK_MODULES
        .into_iter()
        .filter(|m| {
            let line = format!("CONFIG_{}=m", m.to_uppercase());
            text.lines().any(|l| l.trim() == line)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bzimage::fake_image;

    #[test]
    fn cached_kernel_from_kernel_env() {
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("kernels/debian-6.12");
        fs::create_dir_all(dir.join("boot")).unwrap();
        fs::create_dir_all(dir.join("lib/modules/6.12.1")).unwrap();
        fs::write(dir.join("lib/modules/6.12.1/modules.dep"), b"").unwrap();
        fs::write(dir.join("boot/vmlinuz-6.12.1"), b"k").unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz-6.12.1", dir.join("vmlinuz")).unwrap();
        fs::write(
            dir.join("kernel.env"),
            "NAME=debian-6.12\nRELEASE=6.12.1\nVMLINUZ=vmlinuz\nMODULES=lib/modules/6.12.1\n",
        )
        .unwrap();
        let k = Kernel::cached("debian-6.12", cache.path()).unwrap();
        assert_eq!(k.name, "debian-6.12");
        assert_eq!(k.image, dir.join("vmlinuz"));
        assert_eq!(
            k.modules,
            Some(Modules::Indexed(dir.join("lib/modules/6.12.1")))
        );
        assert_eq!(k.release.as_deref(), Some("6.12.1"));
        let err = Kernel::cached("debian-6.1", cache.path()).unwrap_err();
        assert!(
            err.to_string().contains("dmaprobe kernel fetch debian-6.1"),
            "{err}"
        );
        let err = Kernel::cached("debian-9", cache.path()).unwrap_err();
        assert!(err.to_string().contains("dmaprobe kernel list"), "{err}");
    }

    #[test]
    fn user_image_must_exist() {
        let e = Kernel::resolve("/nonexistent/bzImage", None).unwrap_err();
        assert!(matches!(e, KernelError::NotFound(_)), "{e:?}");
        assert!(e.to_string().contains("build tree"), "{e}");
    }

    /// A directory of kernels: `a/bzImage` (6.13.0-rc1), `b/bzImage`
    /// (6.14.0), and `mods/lib/modules/6.13.0-rc1` after depmod.
    fn kernels() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (k, release) in [("a", "6.13.0-rc1"), ("b", "6.14.0")] {
            fs::create_dir_all(dir.path().join(k)).unwrap();
            fs::write(dir.path().join(k).join("bzImage"), fake_image(release)).unwrap();
        }
        let mods = dir.path().join("mods/lib/modules/6.13.0-rc1");
        fs::create_dir_all(&mods).unwrap();
        fs::write(mods.join("modules.dep"), b"").unwrap();
        dir
    }

    fn specs(dir: &Path, specs: &[&str]) -> Vec<String> {
        specs
            .iter()
            .map(|s| s.replace("DIR", &dir.display().to_string()))
            .collect()
    }

    #[test]
    fn a_kernel_by_path_is_named_by_its_release_or_its_label() {
        let k = kernels();
        let all = resolve_all(
            &specs(
                k.path(),
                &["DIR/a/bzImage", "DIR/b/bzImage=mine", "DIR/a/bzImage"],
            ),
            None,
        )
        .unwrap();
        let names: Vec<&str> = all.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["6.13.0-rc1", "mine", "6.13.0-rc1"]);
        assert_eq!(all[1].release.as_deref(), Some("6.14.0"));
        assert_eq!(all[1].image, k.path().join("b/bzImage"));
        // An image that names no release is named by its file name, never its path.
        fs::write(k.path().join("a/vmlinux.bin"), b"not a bzImage").unwrap();
        let plain = Kernel::resolve(&format!("{}/a/vmlinux.bin", k.path().display()), None);
        assert_eq!(plain.unwrap().name, "vmlinux.bin");
    }

    #[test]
    fn modules_pair_with_their_kernel() {
        let k = kernels();
        let mods = Modules::Indexed(k.path().join("mods/lib/modules/6.13.0-rc1"));
        // The old form: one kernel by path, --modules.
        let old = resolve_all(
            &specs(k.path(), &["DIR/a/bzImage"]),
            Some(&k.path().join("mods/lib/modules/6.13.0-rc1")),
        )
        .unwrap();
        assert_eq!(old[0].modules.as_ref(), Some(&mods));
        // IMAGE:MODULES, an INSTALL_MOD_PATH picked by the release; --modules
        // goes to the one kernel without modules of its own.
        let all = resolve_all(
            &specs(k.path(), &["DIR/a/bzImage:DIR/mods=x", "DIR/b/bzImage"]),
            Some(&k.path().join("mods")),
        );
        let e = all.unwrap_err().to_string();
        assert!(e.contains("6.14.0") && e.contains("6.13.0-rc1"), "{e}");
        let all = resolve_all(&specs(k.path(), &["DIR/a/bzImage:DIR/mods=x"]), None).unwrap();
        assert_eq!(all[0].modules.as_ref(), Some(&mods));
        assert_eq!(all[0].name, "x");
    }

    #[test]
    fn one_modules_directory_for_several_kernels_is_refused() {
        let k = kernels();
        let mods = k.path().join("mods");
        let e = resolve_all(
            &specs(k.path(), &["DIR/a/bzImage", "DIR/b/bzImage"]),
            Some(&mods),
        )
        .unwrap_err();
        assert!(matches!(e, KernelError::ModulesAmbiguous(2)), "{e:?}");
        assert!(e.to_string().contains("PATH:DIR"), "{e}");
        let e = resolve_all(&specs(k.path(), &["DIR/a/bzImage:DIR/mods"]), Some(&mods));
        assert!(matches!(e, Err(KernelError::ModulesForNone)), "{e:?}");
    }

    #[test]
    fn a_kernel_that_needs_modules_must_have_them() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("build");
        fs::create_dir_all(tree.join("arch/x86/boot")).unwrap();
        fs::write(tree.join("arch/x86/boot/bzImage"), fake_image("6.15.0")).unwrap();
        fs::write(
            tree.join(".config"),
            "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\n",
        )
        .unwrap();
        let e = Kernel::resolve(tree.to_str().unwrap(), None).unwrap_err();
        assert!(matches!(e, KernelError::NeedsModules { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("virtio_blk") && !text.contains("virtio_pci"),
            "{text}"
        );
        assert!(text.contains(":DIR"), "{text}");
        // Everything built in: no modules, and none needed.
        fs::write(
            tree.join(".config"),
            "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=y\n",
        )
        .unwrap();
        let k = Kernel::resolve(tree.to_str().unwrap(), None).unwrap();
        assert_eq!((k.name.as_str(), k.modules), ("6.15.0", None));
        // A tree that built its modules gives them.
        fs::write(tree.join(".config"), "CONFIG_VIRTIO_BLK=m\n").unwrap();
        fs::write(tree.join("modules.order"), "drivers/block/virtio_blk.o\n").unwrap();
        let k = Kernel::resolve(tree.to_str().unwrap(), None).unwrap();
        assert_eq!(k.modules, Some(Modules::Unindexed(tree.clone())));
    }
}
