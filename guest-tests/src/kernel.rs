//! Guest kernels: Debian's, from the cache `scripts/setup` fills, or a user's own.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The kernels `dmaprobe run` boots when none is named.
pub const DEFAULT_KERNELS: [&str; 2] = ["debian-6.1", "debian-6.12"];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "Kernel {name} is not in the cache {}: run scripts/setup to fetch it",
        .cache.display()
    )]
    NotCached { name: String, cache: PathBuf },
    #[error("Kernel image {0} does not exist")]
    NoImage(PathBuf),
    #[error("Modules directory {0} has no modules.dep (give lib/modules/RELEASE after depmod)")]
    NoModulesDep(PathBuf),
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
}

/// A kernel to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// How reports name it: `debian-6.12`, or the image's path.
    pub name: String,
    pub image: PathBuf,
    /// Its `lib/modules/RELEASE` directory, if it has modules.
    pub modules: Option<PathBuf>,
    /// The release string, where known.
    pub release: Option<String>,
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

impl Kernel {
    /// Resolves `spec`: a cached Debian kernel's name (`debian-6.1`), or the path of
    /// a kernel image with `modules` as its modules directory.
    pub fn resolve(spec: &str, modules: Option<&Path>) -> Result<Kernel, KernelError> {
        if spec.starts_with("debian-") && !Path::new(spec).exists() {
            return Self::cached(spec, &cache_dir());
        }
        let image = PathBuf::from(spec);
        if !image.is_file() {
            return Err(KernelError::NoImage(image));
        }
        if let Some(dir) = modules {
            if !dir.join("modules.dep").is_file() {
                return Err(KernelError::NoModulesDep(dir.to_owned()));
            }
        }
        Ok(Kernel {
            name: spec.to_owned(),
            image,
            modules: modules.map(Path::to_owned),
            release: modules
                .and_then(|m| m.file_name())
                .map(|r| r.to_string_lossy().into_owned()),
        })
    }

    fn cached(name: &str, cache: &Path) -> Result<Kernel, KernelError> {
        let dir = cache.join("kernels").join(name);
        let env_path = dir.join("kernel.env");
        let not_cached = || KernelError::NotCached {
            name: name.to_owned(),
            cache: cache.to_owned(),
        };
        if !env_path.is_file() {
            return Err(not_cached());
        }
        let text = fs::read_to_string(&env_path).map_err(|e| KernelError::Read(env_path, e))?;
        let env: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let image = dir.join(env.get("VMLINUZ").copied().unwrap_or("vmlinuz"));
        if !image.is_file() {
            return Err(not_cached());
        }
        Ok(Kernel {
            name: name.to_owned(),
            image,
            modules: env.get("MODULES").map(|m| dir.join(m)),
            release: env.get("RELEASE").map(|r| (*r).to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_kernel_from_kernel_env() {
        let cache = tempfile::tempdir().unwrap();
        let dir = cache.path().join("kernels/debian-6.12");
        fs::create_dir_all(dir.join("boot")).unwrap();
        fs::write(dir.join("boot/vmlinuz-6.12.1"), b"k").unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz-6.12.1", dir.join("vmlinuz")).unwrap();
        fs::write(
            dir.join("kernel.env"),
            "NAME=debian-6.12\nRELEASE=6.12.1\nVMLINUZ=vmlinuz\nMODULES=lib/modules/6.12.1\n",
        )
        .unwrap();
        let k = Kernel::cached("debian-6.12", cache.path()).unwrap();
        assert_eq!(k.image, dir.join("vmlinuz"));
        assert_eq!(k.modules, Some(dir.join("lib/modules/6.12.1")));
        assert_eq!(k.release.as_deref(), Some("6.12.1"));
        let err = Kernel::cached("debian-6.1", cache.path()).unwrap_err();
        assert!(err.to_string().contains("scripts/setup"), "{err}");
    }

    #[test]
    fn user_image_must_exist() {
        assert!(matches!(
            Kernel::resolve("/nonexistent/bzImage", None),
            Err(KernelError::NoImage(_))
        ));
    }
}
