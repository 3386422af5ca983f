//! Kernel modules for the initramfs: which files, in which order.
//!
//! A Debian-style modules directory (`lib/modules/RELEASE`) lists each module's
//! dependencies in `modules.dep` and the built-in ones in `modules.builtin`.
//! Modules are loaded dependencies first; built-ins are skipped.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Module {name} is neither in modules.dep nor built in ({dir}); is the modules directory right?")]
    Missing { name: String, dir: PathBuf },
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
}
