//! Where a kernel given by path keeps its image, modules and configuration,
//! in each form a developer has it:
//!
//! - an image file (a bzImage, Debian's `vmlinuz-RELEASE`): its modules are
//!   looked for beside it, as `lib/modules/RELEASE` or `usr/lib/modules/RELEASE`
//!   in its directory or the one above (`ROOT/vmlinuz`, `ROOT/boot/vmlinuz-REL`,
//!   the host's own `/boot`), or in the directory it is in (Debian's 7.x
//!   packages put `vmlinuz` inside the modules directory); an image at
//!   `arch/x86/boot/bzImage` is its build tree's;
//! - a build tree (`make O=DIR bzImage modules`): `arch/x86/boot/bzImage`,
//!   the modules `modules.order` lists, not installed, else an installed
//!   `lib/modules/RELEASE` in the tree (`INSTALL_MOD_PATH=DIR`), and `.config`;
//! - an unpacked Debian root: `vmlinuz` or `boot/vmlinuz-RELEASE`, modules in
//!   `lib/modules/RELEASE` or `usr/lib/modules/RELEASE`, `boot/config-RELEASE`.
//!
//! The release is the one the image names in its boot header; it picks the
//! modules directory wherever several could be.

use std::fs;
use std::path::{Path, PathBuf};

use super::{bzimage, KernelError, Modules};

/// A build tree's image, relative to it.
const BUILD_IMAGE: &str = "arch/x86/boot/bzImage";
/// Where a root (or an `INSTALL_MOD_PATH`) holds the modules of each release.
const MODULE_ROOTS: [&str; 2] = ["lib/modules", "usr/lib/modules"];

/// What a kernel given by path is made of.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Found {
    pub(super) image: PathBuf,
    pub(super) release: Option<String>,
    pub(super) modules: Option<Modules>,
    /// Its build configuration, where one is beside it: it tells whether the
    /// kernel needs modules to reach its disk.
    pub(super) config: Option<PathBuf>,
}

/// The kernel at `path`, with `modules` (the user's) instead of those found.
pub(super) fn find(path: &Path, modules: Option<&Path>) -> Result<Found, KernelError> {
    let mut found = if path.is_file() {
        image_file(path)?
    } else if path.is_dir() && is_build_tree(path) {
        build_tree(path)?
    } else if path.is_dir() {
        debian_root(path)?
    } else {
        return Err(KernelError::NotFound(path.to_owned()));
    };
    if let Some(dir) = modules {
        found.modules = Some(given_modules(dir, found.release.as_deref())?);
    }
    Ok(found)
}

/// The release `image` names, if any.
fn image_release(image: &Path) -> Result<Option<String>, KernelError> {
    bzimage::release(image).map_err(|e| KernelError::Read(image.to_owned(), e))
}

/// An image file, its modules and configuration beside it.
fn image_file(image: &Path) -> Result<Found, KernelError> {
    if image.ends_with(BUILD_IMAGE) {
        if let Some(tree) = image.ancestors().nth(4) {
            let tree = if tree.as_os_str().is_empty() {
                Path::new(".")
            } else {
                tree
            };
            return Ok(Found {
                image: image.to_owned(),
                ..build_tree(tree)?
            });
        }
    }
    let release = image_release(image)?;
    let mut found = Found {
        image: image.to_owned(),
        release: release.clone(),
        modules: None,
        config: None,
    };
    let Some(release) = release else {
        return Ok(found);
    };
    let dir = parent(image);
    // Debian 7.x: the image inside lib/modules/RELEASE.
    if dir.file_name().and_then(|n| n.to_str()) == Some(release.as_str()) && is_modules_dir(dir) {
        found.modules = Some(Modules::of(dir));
        found.config = existing(dir.join("config"));
        return Ok(found);
    }
    let roots = [Some(dir), dir.parent()];
    for root in roots.into_iter().flatten() {
        if found.modules.is_none() {
            found.modules = installed(root, &release);
        }
        if found.config.is_none() {
            found.config = existing(root.join(format!("config-{release}")))
                .or_else(|| existing(root.join(format!("boot/config-{release}"))));
        }
    }
    Ok(found)
}

/// Whether `dir` is a kernel build tree, or a source tree that was never built
/// (then the user is told to build it).
fn is_build_tree(dir: &Path) -> bool {
    dir.join(BUILD_IMAGE).is_file()
        || dir.join("vmlinux").is_file()
        || dir.join("arch/x86/boot").is_dir()
        || (dir.join(".config").is_file() && dir.join("Makefile").is_file())
}

/// A build tree: its bzImage, its own modules (else installed ones in it),
/// its `.config`.
fn build_tree(tree: &Path) -> Result<Found, KernelError> {
    let image = tree.join(BUILD_IMAGE);
    if !image.is_file() {
        return Err(KernelError::NoBzImage(tree.to_owned()));
    }
    let release = match image_release(&image)? {
        Some(r) => Some(r),
        None => fs::read_to_string(tree.join("include/config/kernel.release"))
            .ok()
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty()),
    };
    let built = fs::metadata(tree.join("modules.order")).is_ok_and(|m| m.len() > 0);
    let modules = if built {
        Some(Modules::Unindexed(tree.to_owned()))
    } else {
        release.as_deref().and_then(|r| installed(tree, r))
    };
    Ok(Found {
        image,
        release,
        modules,
        config: existing(tree.join(".config")),
    })
}

/// An unpacked Debian root: its one kernel, the modules and configuration of
/// that release.
fn debian_root(root: &Path) -> Result<Found, KernelError> {
    let image = root_image(root)?;
    let release = match image_release(&image)? {
        Some(r) => Some(r),
        None => release_in_name(&image),
    };
    // Debian 7.x's modules directory holds its vmlinuz.
    let modules = match release.as_deref().and_then(|r| installed(root, r)) {
        None if is_modules_dir(root) => Some(Modules::of(root)),
        found => found,
    };
    let config = release
        .as_deref()
        .and_then(|r| existing(root.join(format!("boot/config-{r}"))))
        .or_else(|| match &modules {
            Some(m) => existing(m.dir().join("config")),
            None => None,
        });
    Ok(Found {
        image,
        release,
        modules,
        config,
    })
}

/// A Debian root's image: `vmlinuz`, else its one `boot/vmlinuz-RELEASE`,
/// else its one `(usr/)lib/modules/RELEASE/vmlinuz`.
fn root_image(root: &Path) -> Result<PathBuf, KernelError> {
    if root.join("vmlinuz").is_file() {
        return Ok(root.join("vmlinuz"));
    }
    let mut images: Vec<PathBuf> = entries(&root.join("boot"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .filter(|p| p.is_file())
        .collect();
    if images.is_empty() {
        images = MODULE_ROOTS
            .iter()
            .flat_map(|m| entries(&root.join(m)))
            .map(|d| d.join("vmlinuz"))
            .filter(|p| p.is_file())
            .collect();
    }
    match images.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(KernelError::NotAKernel(root.to_owned())),
        several => Err(KernelError::SeveralImages {
            root: root.to_owned(),
            images: several
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// `vmlinuz-6.1.0-57-cloud-amd64` (or a link to it) → `6.1.0-57-cloud-amd64`;
/// `lib/modules/7.3.4/vmlinuz` → `7.3.4`.
fn release_in_name(image: &Path) -> Option<String> {
    let target = fs::read_link(image)
        .map(|t| parent(image).join(t))
        .unwrap_or_else(|_| image.to_owned());
    let name = target.file_name()?.to_string_lossy().into_owned();
    if let Some(release) = name.strip_prefix("vmlinuz-") {
        return Some(release.to_owned());
    }
    let dir = parent(&target);
    if !is_modules_dir(dir) {
        return None;
    }
    dir.file_name()?.to_str().map(str::to_owned)
}

/// The modules the user gave: a `lib/modules/RELEASE` directory (after
/// depmod, or not), a root holding one (`INSTALL_MOD_PATH`), or a build tree.
fn given_modules(dir: &Path, release: Option<&str>) -> Result<Modules, KernelError> {
    if !dir.is_dir() {
        return Err(KernelError::NoModules(dir.to_owned()));
    }
    if dir.join("modules.dep").is_file() {
        // lib/modules/RELEASE is named for its release: it must be the image's.
        let named = dir
            .parent()
            .is_some_and(|p| p.file_name().is_some_and(|n| n == "modules"));
        let theirs = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        if let (true, Some(theirs), Some(release)) = (named, theirs, release) {
            if theirs != release {
                return Err(KernelError::ModulesRelease {
                    dir: dir.to_owned(),
                    theirs,
                    release: release.to_owned(),
                });
            }
        }
        return Ok(Modules::Indexed(dir.to_owned()));
    }
    let releases: Vec<PathBuf> = MODULE_ROOTS
        .iter()
        .flat_map(|m| entries(&dir.join(m)))
        .filter(|d| d.is_dir())
        .collect();
    if !releases.is_empty() {
        let mine = |d: &&PathBuf| {
            release.is_none_or(|r| d.file_name().and_then(|n| n.to_str()) == Some(r))
        };
        return match releases.iter().filter(mine).collect::<Vec<_>>().as_slice() {
            [one] => Ok(Modules::of(one)),
            _ => Err(KernelError::ModulesRelease {
                dir: dir.to_owned(),
                theirs: releases
                    .iter()
                    .filter_map(|d| d.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", "),
                release: release.unwrap_or("unknown").to_owned(),
            }),
        };
    }
    if is_modules_dir(dir) {
        return Ok(Modules::Unindexed(dir.to_owned()));
    }
    Err(KernelError::NoModules(dir.to_owned()))
}

/// The installed modules of `release` under `root`, if there are.
fn installed(root: &Path, release: &str) -> Option<Modules> {
    MODULE_ROOTS
        .iter()
        .map(|m| root.join(m).join(release))
        .find(|d| d.is_dir())
        .map(|d| Modules::of(&d))
}

/// Whether `dir` holds modules of one kernel: their lists, or the `kernel/`
/// directory of an installed release.
fn is_modules_dir(dir: &Path) -> bool {
    ["modules.dep", "modules.order", "modules.builtin"]
        .iter()
        .any(|f| dir.join(f).is_file())
        || dir.join("kernel").is_dir()
}

/// The directory `path` is in (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn existing(path: PathBuf) -> Option<PathBuf> {
    path.is_file().then_some(path)
}

/// The entries of a directory, sorted; none if it cannot be read.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    all.sort();
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::bzimage::fake_image;

    /// Files under a temporary directory: `path` → contents; an image's
    /// contents are given as `bzImage:RELEASE`.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, contents) in files {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            let bytes = match contents.strip_prefix("bzImage:") {
                Some(release) => fake_image(release),
                None => contents.as_bytes().to_vec(),
            };
            fs::write(p, bytes).unwrap();
        }
        dir
    }

    #[test]
    fn an_image_file_finds_its_modules_beside_it() {
        let root = tree(&[
            ("boot/vmlinuz-6.1.0-57", "bzImage:6.1.0-57"),
            ("boot/config-6.1.0-57", "CONFIG_VIRTIO_BLK=m\n"),
            ("lib/modules/6.1.0-57/modules.dep", ""),
            ("lib/modules/5.10.0/modules.dep", ""),
        ]);
        let r = root.path();
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-57", r.join("vmlinuz")).unwrap();
        let mods = Modules::Indexed(r.join("lib/modules/6.1.0-57"));
        for image in [r.join("vmlinuz"), r.join("boot/vmlinuz-6.1.0-57")] {
            let f = find(&image, None).unwrap();
            assert_eq!(f.image, image);
            assert_eq!(f.release.as_deref(), Some("6.1.0-57"));
            assert_eq!(f.modules.as_ref(), Some(&mods), "{}", image.display());
            assert_eq!(f.config, Some(r.join("boot/config-6.1.0-57")));
        }
    }

    #[test]
    fn an_image_alone_has_no_modules() {
        let dir = tree(&[("bzImage", "bzImage:6.13.0"), ("vmlinux.elf", "\x7fELF")]);
        let f = find(&dir.path().join("bzImage"), None).unwrap();
        assert_eq!(f.release.as_deref(), Some("6.13.0"));
        assert_eq!((f.modules, f.config), (None, None));
        // An image that names no release is still an image.
        let f = find(&dir.path().join("vmlinux.elf"), None).unwrap();
        assert_eq!((f.release, f.modules), (None, None));
    }

    #[test]
    fn a_debian_7_image_sits_in_its_modules_directory() {
        let root = tree(&[
            ("usr/lib/modules/7.3.4/vmlinuz", "bzImage:7.3.4"),
            ("usr/lib/modules/7.3.4/modules.builtin", ""),
            ("usr/lib/modules/7.3.4/config", "CONFIG_VIRTIO_BLK=m\n"),
        ]);
        let dir = root.path().join("usr/lib/modules/7.3.4");
        let f = find(&dir.join("vmlinuz"), None).unwrap();
        assert_eq!(f.modules, Some(Modules::Unindexed(dir.clone())));
        assert_eq!(f.config, Some(dir.join("config")));
        // And the root, or the modules directory itself, finds the same.
        for given in [root.path(), dir.as_path()] {
            let f = find(given, None).unwrap();
            assert_eq!(f.image, dir.join("vmlinuz"));
            assert_eq!(f.release.as_deref(), Some("7.3.4"));
            assert_eq!(f.modules, Some(Modules::Unindexed(dir.clone())));
            assert_eq!(f.config, Some(dir.join("config")));
        }
    }

    #[test]
    fn a_build_tree_gives_its_own_modules() {
        let t = tree(&[
            (BUILD_IMAGE, "bzImage:6.13.0-rc1"),
            ("modules.order", "drivers/block/virtio_blk.o\n"),
            ("modules.builtin", "kernel/fs/ext4/ext4.ko\n"),
            ("drivers/block/virtio_blk.ko", "ko"),
            (".config", "CONFIG_VIRTIO_BLK=m\n"),
            ("Makefile", ""),
        ]);
        let f = find(t.path(), None).unwrap();
        assert_eq!(f.image, t.path().join(BUILD_IMAGE));
        assert_eq!(f.release.as_deref(), Some("6.13.0-rc1"));
        assert_eq!(f.modules, Some(Modules::Unindexed(t.path().to_owned())));
        assert_eq!(f.config, Some(t.path().join(".config")));
        // The image given by its path in the tree is the tree's.
        let image = t.path().join(BUILD_IMAGE);
        let f = find(&image, None).unwrap();
        assert_eq!(f.image, image);
        assert_eq!(f.modules, Some(Modules::Unindexed(t.path().to_owned())));
    }

    #[test]
    fn a_build_tree_without_its_own_modules_uses_installed_ones_or_none() {
        let t = tree(&[
            (BUILD_IMAGE, "bzImage:6.13.0"),
            ("modules.order", ""),
            ("lib/modules/6.13.0/modules.dep", ""),
        ]);
        let f = find(t.path(), None).unwrap();
        assert_eq!(
            f.modules,
            Some(Modules::Indexed(t.path().join("lib/modules/6.13.0")))
        );
        let t = tree(&[(BUILD_IMAGE, "bzImage:6.13.0"), (".config", "")]);
        assert_eq!(find(t.path(), None).unwrap().modules, None);
    }

    #[test]
    fn a_build_tree_without_a_bzimage_is_told_to_build_one() {
        let t = tree(&[(".config", ""), ("Makefile", ""), ("vmlinux", "")]);
        let e = find(t.path(), None).unwrap_err();
        assert!(matches!(e, KernelError::NoBzImage(_)), "{e:?}");
        assert!(e.to_string().contains("make bzImage"), "{e}");
        // The release from include/config/kernel.release when the image names none.
        let t = tree(&[
            (BUILD_IMAGE, "not a bzImage"),
            ("include/config/kernel.release", "6.14.0-rc2+\n"),
        ]);
        let f = find(t.path(), None).unwrap();
        assert_eq!(f.release.as_deref(), Some("6.14.0-rc2+"));
    }

    #[test]
    fn a_debian_root() {
        let root = tree(&[
            ("boot/vmlinuz-6.12.1", "bzImage:6.12.1"),
            ("boot/config-6.12.1", ""),
            ("usr/lib/modules/6.12.1/modules.dep", ""),
        ]);
        let f = find(root.path(), None).unwrap();
        assert_eq!(f.image, root.path().join("boot/vmlinuz-6.12.1"));
        assert_eq!(f.release.as_deref(), Some("6.12.1"));
        assert_eq!(
            f.modules,
            Some(Modules::Indexed(root.path().join("usr/lib/modules/6.12.1")))
        );
        assert_eq!(f.config, Some(root.path().join("boot/config-6.12.1")));
        // The release from the file name when the image names none.
        let root = tree(&[("boot/vmlinuz-5.10.0-46-amd64", "plain")]);
        let f = find(root.path(), None).unwrap();
        assert_eq!(f.release.as_deref(), Some("5.10.0-46-amd64"));
    }

    #[test]
    fn a_root_must_name_one_kernel() {
        let root = tree(&[("boot/vmlinuz-1.0", "x"), ("boot/vmlinuz-2.0", "y")]);
        let e = find(root.path(), None).unwrap_err();
        assert!(matches!(e, KernelError::SeveralImages { .. }), "{e:?}");
        assert!(e.to_string().contains("vmlinuz-2.0"), "{e}");
        let empty = tree(&[("etc/hostname", "x")]);
        let e = find(empty.path(), None).unwrap_err();
        assert!(matches!(e, KernelError::NotAKernel(_)), "{e:?}");
        let e = find(&empty.path().join("nope"), None).unwrap_err();
        assert!(matches!(e, KernelError::NotFound(_)), "{e:?}");
    }

    #[test]
    fn the_users_modules_in_each_form() {
        let k = tree(&[("bzImage", "bzImage:6.13.0")]);
        let image = k.path().join("bzImage");
        let m = tree(&[
            ("inst/lib/modules/6.13.0/modules.dep", ""),
            ("inst/lib/modules/6.12.0/modules.dep", ""),
            ("other/lib/modules/6.12.0/modules.dep", ""),
            ("build/modules.order", "a.o\n"),
            ("plain/nothing", ""),
        ]);
        let m = m.path();
        let with = |dir: &str| find(&image, Some(&m.join(dir)));
        let installed = m.join("inst/lib/modules/6.13.0");
        assert_eq!(
            with("inst/lib/modules/6.13.0").unwrap().modules,
            Some(Modules::Indexed(installed.clone()))
        );
        assert_eq!(
            with("inst").unwrap().modules,
            Some(Modules::Indexed(installed))
        );
        assert_eq!(
            with("build").unwrap().modules,
            Some(Modules::Unindexed(m.join("build")))
        );
        for (dir, cause) in [
            ("inst/lib/modules/6.12.0", "6.12.0"),
            ("other", "6.12.0"),
            ("plain", "modules.dep"),
            ("missing", "modules.dep"),
        ] {
            let e = with(dir).unwrap_err().to_string();
            assert!(e.contains(cause), "{dir}: {e}");
        }
    }
}
