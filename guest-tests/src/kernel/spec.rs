//! What one `--kernel` says: a cached kernel's name or a path, the path's
//! modules, and a label.
//!
//! `debian-6.12`, `PATH`, `PATH:MODULES`, each optionally followed by
//! `=LABEL`. A spec that names an existing file or directory as a whole is
//! that path, so a path may hold `:` or `=`; otherwise the label is what
//! follows the last `=`, and the modules what follows the first `:`.

use std::path::{Path, PathBuf};

use super::KernelError;

/// One `--kernel`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    pub source: Source,
    /// How the reports name it, if the user said.
    pub label: Option<String>,
}

/// Where a kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A Debian kernel in the cache, by name (`debian-6.12`).
    Cached(String),
    /// A kernel image, build tree or unpacked Debian root, and the modules
    /// the user paired with it.
    Path {
        path: PathBuf,
        modules: Option<PathBuf>,
    },
}

impl KernelSpec {
    pub fn parse(spec: &str) -> Result<KernelSpec, KernelError> {
        let bad = |why: &'static str| KernelError::Spec {
            spec: spec.to_owned(),
            why,
        };
        if spec.is_empty() {
            return Err(bad("it is empty"));
        }
        if Path::new(spec).exists() {
            return Ok(KernelSpec::path(spec, None, None));
        }
        let (kernel, label) = match spec.rsplit_once('=') {
            Some((kernel, label)) => (kernel, Some(label)),
            None => (spec, None),
        };
        if kernel.is_empty() {
            return Err(bad("it names no kernel before the ="));
        }
        let label = match label {
            Some(l) if l.trim().is_empty() => return Err(bad("the label after = is empty")),
            Some(l) if l.chars().any(char::is_control) => {
                return Err(bad("the label holds control characters"))
            }
            l => l.map(str::to_owned),
        };
        if kernel.starts_with("debian-") && !kernel.contains(':') && !Path::new(kernel).exists() {
            return Ok(KernelSpec {
                source: Source::Cached(kernel.to_owned()),
                label,
            });
        }
        match kernel.split_once(':') {
            Some(_) if Path::new(kernel).exists() => Ok(KernelSpec::path(kernel, None, label)),
            Some(("", _)) => Err(bad("it names no kernel before the :")),
            Some((_, "")) => Err(bad("it names no modules after the :")),
            Some((path, modules)) => Ok(KernelSpec::path(path, Some(modules), label)),
            None => Ok(KernelSpec::path(kernel, None, label)),
        }
    }

    fn path(path: &str, modules: Option<&str>, label: Option<String>) -> KernelSpec {
        KernelSpec {
            source: Source::Path {
                path: PathBuf::from(path),
                modules: modules.map(PathBuf::from),
            },
            label,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str, m: Option<&str>, label: Option<&str>) -> KernelSpec {
        KernelSpec::path(p, m, label.map(str::to_owned))
    }

    #[test]
    fn the_forms() {
        let parse = |s| KernelSpec::parse(s).unwrap();
        assert_eq!(
            parse("debian-6.12"),
            KernelSpec {
                source: Source::Cached("debian-6.12".into()),
                label: None
            }
        );
        assert_eq!(
            parse("debian-6.1=old"),
            KernelSpec {
                source: Source::Cached("debian-6.1".into()),
                label: Some("old".into())
            }
        );
        assert_eq!(parse("/k/bzImage"), path("/k/bzImage", None, None));
        assert_eq!(
            parse("/k/bzImage:/m/lib/modules/6.13.0"),
            path("/k/bzImage", Some("/m/lib/modules/6.13.0"), None)
        );
        assert_eq!(parse("build=mine"), path("build", None, Some("mine")));
        assert_eq!(
            parse("/k/bzImage:/m=6.13 with my fix"),
            path("/k/bzImage", Some("/m"), Some("6.13 with my fix"))
        );
        // Only the first : splits (the modules may hold one), the last = labels.
        assert_eq!(parse("/k:/m:n=a=b"), path("/k", Some("/m:n=a"), Some("b")));
    }

    #[test]
    fn an_existing_path_is_a_path_whatever_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["odd:name", "odd=name", "debian-6.12"] {
            let p = dir.path().join(name);
            std::fs::write(&p, b"k").unwrap();
            let s = p.to_str().unwrap();
            assert_eq!(KernelSpec::parse(s).unwrap(), path(s, None, None));
        }
        // And before its own label or modules.
        let s = format!("{}=L", dir.path().join("odd:name").display());
        assert_eq!(
            KernelSpec::parse(&s).unwrap(),
            path(&s[..s.len() - 2], None, Some("L"))
        );
    }

    #[test]
    fn malformed_specs_say_what_is_wrong() {
        for (spec, why) in [
            ("", "empty"),
            ("=x", "no kernel"),
            ("k=", "label"),
            ("k= ", "label"),
            (":m", "no kernel"),
            ("k:", "no modules"),
            ("k=a\tb", "control"),
        ] {
            let e = KernelSpec::parse(spec).unwrap_err().to_string();
            assert!(e.contains(why), "{spec:?}: {e}");
        }
    }
}
