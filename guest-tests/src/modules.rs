//! Kernel modules for the initramfs: which files, in which order.
//!
//! A Debian-style modules directory (`lib/modules/RELEASE`) lists each module's
//! dependencies in `modules.dep` and the built-in ones in `modules.builtin`.
//! Modules are loaded dependencies first; built-ins are skipped.
//!
//! Modules without a `modules.dep` (a build tree's, listed in its
//! `modules.order`) are indexed by [`index_privately`]: links to them in a
//! directory of the run's own, and `depmod -b` there. The user's tree is only
//! read.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("Module {name} is neither in modules.dep nor built in ({dir}); is the modules directory right?")]
    Missing { name: String, dir: PathBuf },
    #[error("{dir}/modules.order lists {module}, which is not built: run make modules")]
    NotBuilt { dir: PathBuf, module: String },
    #[error("{0} holds no modules (*.ko)")]
    NoneFound(PathBuf),
    #[error("Cannot run depmod (kmod): run scripts/setup")]
    NoDepmod(#[source] std::io::Error),
    #[error("depmod failed on the modules of {dir}: {stderr}")]
    Depmod { dir: PathBuf, stderr: String },
}

/// The file names a module may have, compressed or not.
const MODULE_SUFFIXES: [&str; 4] = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"];

/// Indexes the modules in `dir` (a build tree, or a `lib/modules/RELEASE`
/// never depmod'ed) under `scratch`: each module linked at its place in
/// `scratch/lib/modules/RELEASE`, the kernel's `modules.builtin` copied
/// beside them, and `depmod -b scratch RELEASE`. Returns that directory.
pub fn index_privately(dir: &Path, release: &str, scratch: &Path) -> Result<PathBuf, ModulesError> {
    let source = fs::canonicalize(dir).map_err(|e| ModulesError::Read(dir.to_owned(), e))?;
    let files = listed(&source)?;
    let out = scratch.join("lib/modules").join(release);
    let werr = |p: &Path| {
        let p = p.to_owned();
        move |e| ModulesError::Write(p, e)
    };
    fs::create_dir_all(&out).map_err(werr(&out))?;
    let mut order = String::new();
    for file in &files {
        let link = out.join(file);
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(werr(parent))?;
        }
        std::os::unix::fs::symlink(source.join(file), &link).map_err(werr(&link))?;
        order.push_str(&file.to_string_lossy());
        order.push('\n');
    }
    fs::write(out.join("modules.order"), order).map_err(werr(&out))?;
    for name in ["modules.builtin", "modules.builtin.modinfo"] {
        let from = source.join(name);
        if from.is_file() {
            fs::copy(&from, out.join(name)).map_err(|e| ModulesError::Read(from.clone(), e))?;
        }
    }
    let ran = Command::new("depmod")
        .arg("-b")
        .arg(scratch)
        .arg(release)
        .output()
        .map_err(ModulesError::NoDepmod)?;
    if !ran.status.success() {
        return Err(ModulesError::Depmod {
            dir: dir.to_owned(),
            stderr: String::from_utf8_lossy(&ran.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// The modules in `dir`, relative to it: those its `modules.order` lists
/// (`drivers/block/virtio_blk.o` in a build tree, `kernel/....ko` when
/// installed, each found compressed or not), else every module file under it.
fn listed(dir: &Path) -> Result<Vec<PathBuf>, ModulesError> {
    let order_file = dir.join("modules.order");
    let files = if order_file.is_file() {
        let order =
            fs::read_to_string(&order_file).map_err(|e| ModulesError::Read(order_file, e))?;
        order
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|line| {
                let stem = line
                    .strip_suffix(".o")
                    .or_else(|| line.strip_suffix(".ko"))
                    .unwrap_or(line);
                MODULE_SUFFIXES
                    .iter()
                    .map(|s| PathBuf::from(format!("{stem}{s}")))
                    .find(|f| dir.join(f).is_file())
                    .ok_or_else(|| ModulesError::NotBuilt {
                        dir: dir.to_owned(),
                        module: line.to_owned(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        let mut found = Vec::new();
        walk(dir, Path::new(""), &mut found);
        found.sort();
        found
    };
    if files.is_empty() {
        return Err(ModulesError::NoneFound(dir.to_owned()));
    }
    Ok(files)
}

/// Every module file under `root/rel`, relative to `root`; links to
/// directories (`build`, `source`) are not followed.
fn walk(root: &Path, rel: &Path, found: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(root.join(rel)).into_iter().flatten().flatten() {
        let path = rel.join(entry.file_name());
        let name = entry.file_name().to_string_lossy().into_owned();
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk(root, &path, found),
            Ok(t) if t.is_file() && MODULE_SUFFIXES.iter().any(|s| name.ends_with(s)) => {
                found.push(path);
            }
            _ => {}
        }
    }
}

/// The module name of a path or name: `kernel/drivers/block/virtio_blk.ko.xz` → `virtio_blk`.
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// The dependency table of one modules directory.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// name → (path relative to dir, dependency names)
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    pub fn load(dir: &Path) -> Result<Self, ModulesError> {
        let read = |name: &str| {
            let p = dir.join(name);
            fs::read_to_string(&p).map_err(|e| ModulesError::Read(p, e))
        };
        let dep = read("modules.dep")?;
        // modules.builtin is optional: a kernel built with few modules may lack it.
        let builtin = read("modules.builtin").unwrap_or_default();
        Ok(Self::parse(dir, &dep, &builtin))
    }

    pub fn parse(dir: &Path, dep: &str, builtin: &str) -> Self {
        let deps = dep
            .lines()
            .filter_map(|line| {
                let (module, rest) = line.split_once(':')?;
                let needs = rest.split_whitespace().map(module_name).collect();
                Some((module_name(module), (module.trim().to_owned(), needs)))
            })
            .collect();
        let builtin = builtin.lines().map(module_name).collect();
        ModuleIndex {
            dir: dir.to_owned(),
            deps,
            builtin,
        }
    }

    /// The files to load for `wanted`, each after its dependencies, each once.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<PathBuf>, ModulesError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in wanted {
            self.visit(&module_name(name), &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), ModulesError> {
        if !seen.insert(name.to_owned()) || self.builtin.contains(name) {
            return Ok(());
        }
        let Some((path, needs)) = self.deps.get(name) else {
            return Err(ModulesError::Missing {
                name: name.to_owned(),
                dir: self.dir.clone(),
            });
        };
        for dep in needs {
            self.visit(dep, seen, order)?;
        }
        order.push(self.dir.join(path));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";

    #[test]
    fn dependencies_come_first_and_once() {
        let idx = ModuleIndex::parse(Path::new("/m"), DEP, "kernel/fs/ext4/ext4.ko\n");
        let order = idx
            .load_order(&["virtio_pci", "virtio_blk", "ext4"])
            .unwrap();
        let names: Vec<String> = order
            .iter()
            .map(|p| module_name(&p.to_string_lossy()))
            .collect();
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(pos("virtio_ring") < pos("virtio"));
        assert!(pos("virtio") < pos("virtio_pci"));
        assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
        assert_eq!(names.last().map(String::as_str), Some("virtio_blk"));
        assert!(order[0].starts_with("/m"));
    }

    #[test]
    fn built_in_modules_are_skipped_and_unknown_ones_refused() {
        let idx = ModuleIndex::parse(
            Path::new("/m"),
            "kernel/drivers/block/virtio_blk.ko.xz:\n",
            "kernel/drivers/virtio/virtio_pci.ko\n",
        );
        let order = idx.load_order(&["virtio_pci", "virtio_blk"]).unwrap();
        assert_eq!(
            order,
            vec![PathBuf::from("/m/kernel/drivers/block/virtio_blk.ko.xz")]
        );
        assert!(matches!(
            idx.load_order(&["nope"]),
            Err(ModulesError::Missing { .. })
        ));
    }

    #[test]
    fn names() {
        assert_eq!(
            module_name("kernel/drivers/block/virtio_blk.ko.xz"),
            "virtio_blk"
        );
        assert_eq!(module_name("virtio-pci"), "virtio_pci");
        assert_eq!(module_name("xfs.ko"), "xfs");
    }

    /// A build tree in a temporary directory: `files` (path, contents).
    fn build_tree(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, contents) in files {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, contents).unwrap();
        }
        dir
    }

    #[test]
    fn a_build_trees_modules_are_indexed_apart_from_it() {
        let tree = build_tree(&[
            (
                "modules.order",
                b"drivers/block/virtio_blk.o\nfs/xfs/xfs.o\n",
            ),
            ("modules.builtin", b"kernel/drivers/virtio/virtio_pci.ko\n"),
            ("drivers/block/virtio_blk.ko", b"blk"),
            ("fs/xfs/xfs.ko", b"xfs"),
            // Not in modules.order: a leftover of an older build.
            ("drivers/old/stale.ko", b"old"),
        ]);
        let before = fs::read_dir(tree.path()).unwrap().count();
        let scratch = tempfile::tempdir().unwrap();
        let dir = index_privately(tree.path(), "6.13.0-rc1", scratch.path()).unwrap();
        assert_eq!(dir, scratch.path().join("lib/modules/6.13.0-rc1"));
        // The tree is untouched; the index lives in the scratch directory.
        assert_eq!(fs::read_dir(tree.path()).unwrap().count(), before);
        assert!(!tree.path().join("modules.dep").exists());
        let idx = ModuleIndex::load(&dir).unwrap();
        let order = idx
            .load_order(&["virtio_pci", "virtio_blk", "xfs"])
            .unwrap();
        assert_eq!(
            order,
            [
                dir.join("drivers/block/virtio_blk.ko"),
                dir.join("fs/xfs/xfs.ko")
            ]
        );
        // Each is the tree's own file.
        assert_eq!(fs::read(&order[0]).unwrap(), b"blk");
        assert!(matches!(
            idx.load_order(&["stale"]),
            Err(ModulesError::Missing { .. })
        ));
    }

    #[test]
    fn a_module_listed_but_not_built_is_named() {
        let tree = build_tree(&[("modules.order", b"drivers/block/virtio_blk.o\n")]);
        let scratch = tempfile::tempdir().unwrap();
        let e = index_privately(tree.path(), "6.13.0", scratch.path()).unwrap_err();
        assert!(matches!(e, ModulesError::NotBuilt { .. }), "{e:?}");
        assert!(e.to_string().contains("make modules"), "{e}");
    }

    #[test]
    fn an_installed_directory_without_modules_dep_is_walked() {
        let tree = build_tree(&[
            ("kernel/drivers/block/virtio_blk.ko.xz", b"xz"),
            ("kernel/fs/xfs/xfs.ko", b"ko"),
            ("modules.builtin", b""),
        ]);
        let scratch = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(scratch.path(), tree.path().join("build")).unwrap();
        assert_eq!(
            listed(tree.path()).unwrap(),
            [
                PathBuf::from("kernel/drivers/block/virtio_blk.ko.xz"),
                PathBuf::from("kernel/fs/xfs/xfs.ko")
            ]
        );
        let empty = build_tree(&[("modules.builtin", b"")]);
        assert!(matches!(
            listed(empty.path()),
            Err(ModulesError::NoneFound(_))
        ));
    }

    #[test]
    fn real_modules_keep_their_dependencies_when_indexed_privately() {
        // Debian 6.1's virtio modules laid out as a build tree, when the
        // cache has them: depmod finds virtio_blk's dependencies.
        let kernels = crate::kernel::cache_dir().join("kernels/debian-6.1/lib/modules");
        let Some(installed) = fs::read_dir(&kernels).ok().and_then(|mut d| d.next()) else {
            return;
        };
        let installed = installed.unwrap().path();
        let tree = tempfile::tempdir().unwrap();
        let mut order = String::new();
        for m in ["virtio/virtio_ring", "virtio/virtio", "block/virtio_blk"] {
            let to = tree.path().join(format!("drivers/{m}.ko"));
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(installed.join(format!("kernel/drivers/{m}.ko")), to).unwrap();
            order.push_str(&format!("drivers/{m}.o\n"));
        }
        fs::write(tree.path().join("modules.order"), order).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let release = installed.file_name().unwrap().to_str().unwrap();
        let dir = index_privately(tree.path(), release, scratch.path()).unwrap();
        let order = ModuleIndex::load(&dir)
            .unwrap()
            .load_order(&["virtio_blk"])
            .unwrap();
        let names: Vec<String> = order
            .iter()
            .map(|p| module_name(&p.to_string_lossy()))
            .collect();
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_blk"]);
    }
}
