//! The daemon's configuration, checked once before anything starts.

use std::path::PathBuf;

use nvme_model::{LbaSize, LbaSizeError};

/// The most queues a vhost-user-blk device may have here (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("Size {0:?} is not a size: give bytes or a number with K, M, G or T (e.g. 64M)")]
    Size(String),
    #[error("--queues {0} is out of range: 1 to {MAX_QUEUES}")]
    Queues(u16),
    #[error("--queue-size {0} must be a power of two from 2 to 32768")]
    QueueSize(u16),
    #[error("--serial {0:?} is longer than the 20 bytes virtio-blk carries")]
    Serial(String),
    #[error(transparent)]
    LbaSize(#[from] LbaSizeError),
    #[error("{option} {size} is not a multiple of the logical block size {lbs}")]
    Unaligned {
        option: &'static str,
        size: u64,
        lbs: u64,
    },
    #[error("{option} must be larger than zero")]
    Empty { option: &'static str },
    #[error("--fault {0:?}: {1}")]
    Fault(String, #[source] dma::fault::RuleError),
    #[error("--control {0} is the --socket path: give the control socket a path of its own")]
    ControlIsSocket(PathBuf),
    #[error("--zero-page {0:?} is not an address (give hex like 0x1f2c000, or decimal)")]
    Address(String),
    #[error("Cannot read the fault file {0}: {1}")]
    FaultFile(PathBuf, String),
    #[error("--write-cache {0:?} is not a size or \"off\" (e.g. 32M)")]
    WriteCache(String),
    #[error("--deallocate {0:?}: give zeroes (deallocated blocks read as zeros) or keep (they keep their data)")]
    Deallocate(String),
    #[error("--media-error {0:?}: {1}; the form is LBA[+BLOCKS]:read|write, e.g. 2048+8:read")]
    MediaError(String, String),
    #[error(transparent)]
    Geometry(#[from] nvme_model::GeometryError),
    #[error(
        "--max-transfer {max} takes {pages} segments of 4 KiB, more than a queue of \
         {queue_size} descriptors carries: give --queue-size {need} or more, or a smaller \
         --max-transfer"
    )]
    TransferPastQueue {
        max: u64,
        pages: u64,
        queue_size: u16,
        need: u64,
    },
    #[error("--latency {0:?}")]
    Latency(String, #[source] nvme_model::LatencySpecError),
    #[error("{file}: rule {index} ({line}): {error}")]
    FaultFileRule {
        file: PathBuf,
        index: usize,
        line: String,
        #[source]
        error: dma::fault::RuleError,
    },
}

/// Where the media's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingConfig {
    /// Sparse memory of this many bytes.
    Memory { size: u64 },
    /// A raw file: created with `size` bytes if missing, else used at its size.
    File { path: PathBuf, size: Option<u64> },
}

/// Everything `dmaprobe serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub backing: BackingConfig,
    pub lbs: LbaSize,
    pub queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    pub serial: String,
    /// The DMA engine's checks, ledger size, zero page and seed.
    pub dma: dma::EngineConfig,
    /// Fault rules in force from the start.
    pub faults: Vec<dma::RuleSpec>,
    /// Where to write the ledger on exit (the file is created at start).
    pub ledger_file: Option<PathBuf>,
    /// The control socket, if any.
    pub control: Option<PathBuf>,
    /// How long a control client may sit without sending a whole request
    /// (`None`: for ever).
    pub control_idle: Option<std::time::Duration>,
    /// Make the last MiB of the disk the guest's mailbox.
    pub mailbox: bool,
    /// Present an NVMe controller over vfio-user, not a vhost-user-blk device.
    pub nvme: bool,
    /// How long the media takes to serve each command (instant: no time).
    pub latency: nvme_model::LatencySpec,
    /// The drive's behaviour around the bytes.
    pub media: MediaConfig,
    /// Transfer sizes and discard / write-zeroes limits, checked.
    pub geometry: nvme_model::Geometry,
}

/// Reads fault rules from a TOML file: an array of `[[rule]]` tables with the
/// keys of the line form (`op = "read"`, `lba = "0-7"`, `nth = 2`,
/// `action = "hold"`). Every rule is checked as the line form is; the first bad
/// one is named with its number (from 1) and its line form.
pub fn load_fault_file(path: &std::path::Path) -> Result<Vec<dma::RuleSpec>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::FaultFile(path.to_owned(), e.to_string()))?;
    parse_fault_toml(&text, path)
}

/// The rules of a fault file's `text`; errors name `path`.
pub fn parse_fault_toml(
    text: &str,
    path: &std::path::Path,
) -> Result<Vec<dma::RuleSpec>, ConfigError> {
    let fail = |why: String| ConfigError::FaultFile(path.to_owned(), why);
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| fail(e.to_string()))?;
    if let Some(key) = doc.keys().find(|k| k.as_str() != "rule") {
        return Err(fail(format!(
            "unknown top-level key {key:?} (rules are [[rule]] tables)"
        )));
    }
    let Some(rules) = doc.get("rule") else {
        return Ok(Vec::new());
    };
    let rules = rules
        .as_array()
        .ok_or_else(|| fail("`rule` must be an array of tables ([[rule]])".into()))?;
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let index = i + 1;
            let table = rule
                .as_table()
                .ok_or_else(|| fail(format!("rule {index} is not a table")))?;
            let mut pairs = Vec::new();
            for (k, v) in table {
                let v = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(n) => n.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    other => {
                        return Err(fail(format!(
                            "rule {index}: {k} = {other} is not a string or number"
                        )))
                    }
                };
                pairs.push((k.as_str(), v));
            }
            // Built from the table's keys and values, not re-parsed from a
            // joined line: `tag = "x,nth=1"` is refused, not a second key.
            // The line is only for the message.
            let line = pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            dma::RuleSpec::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str()))).map_err(
                |error| ConfigError::FaultFileRule {
                    file: path.to_owned(),
                    index,
                    line: line.clone(),
                    error,
                },
            )
        })
        .collect()
}

/// The sizes and counts `--max-transfer` and friends give, unchecked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GeometryArgs {
    pub max_transfer: Option<String>,
    pub optimal_transfer: Option<String>,
    pub discard_granularity: Option<String>,
    pub max_discard: Option<String>,
    pub max_discard_segments: Option<u32>,
    pub max_write_zeroes: Option<String>,
    pub max_write_zeroes_segments: Option<u32>,
}

/// The geometry the options ask for, over the defaults for `lbs`, checked
/// against the block size and the queue size.
pub fn geometry(
    a: &GeometryArgs,
    lbs: LbaSize,
    queue_size: u16,
) -> Result<nvme_model::Geometry, ConfigError> {
    let size = |s: &Option<String>| s.as_deref().map(parse_size).transpose();
    let base = nvme_model::Geometry::default_for(lbs);
    let g = nvme_model::Geometry {
        max_transfer: size(&a.max_transfer)?,
        optimal_transfer: size(&a.optimal_transfer)?,
        discard_granularity: size(&a.discard_granularity)?.unwrap_or(base.discard_granularity),
        max_discard: size(&a.max_discard)?.unwrap_or(base.max_discard),
        max_discard_segments: a.max_discard_segments.unwrap_or(base.max_discard_segments),
        max_write_zeroes: size(&a.max_write_zeroes)?.unwrap_or(base.max_write_zeroes),
        max_write_zeroes_segments: a
            .max_write_zeroes_segments
            .unwrap_or(base.max_write_zeroes_segments),
    };
    g.check(lbs)?;
    if let Some(max) = g.max_transfer {
        let pages = max / nvme_model::geometry::PAGE;
        // Header and status take a descriptor each.
        if pages + 2 > u64::from(queue_size) {
            return Err(ConfigError::TransferPastQueue {
                max,
                pages,
                queue_size,
                need: (pages + 2).next_power_of_two(),
            });
        }
    }
    Ok(g)
}

/// Default size of the volatile write cache.
pub const DEFAULT_WRITE_CACHE: &str = "32M";

/// What the media does besides keeping bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    /// Bytes of volatile write cache; `None`: every write is stable at once.
    pub write_cache: Option<u64>,
    pub deallocate: nvme_model::Deallocate,
    /// Bad blocks from the start: (first LBA, blocks, kind).
    pub media_errors: Vec<MediaErrorSpec>,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            write_cache: parse_write_cache(DEFAULT_WRITE_CACHE).ok().flatten(),
            deallocate: nvme_model::Deallocate::Zeroes,
            media_errors: Vec::new(),
        }
    }
}

/// Bad blocks: `blocks` from `lba`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaErrorSpec {
    pub lba: u64,
    pub blocks: u64,
    pub kind: nvme_model::MediaErrorKind,
}

/// Parses `--write-cache`: a size, or `off` (0 is off too).
pub fn parse_write_cache(text: &str) -> Result<Option<u64>, ConfigError> {
    if matches!(text.trim(), "off" | "none" | "0") {
        return Ok(None);
    }
    parse_size(text)
        .map(Some)
        .map_err(|_| ConfigError::WriteCache(text.to_owned()))
}

pub fn parse_deallocate(text: &str) -> Result<nvme_model::Deallocate, ConfigError> {
    match text.trim() {
        "zeroes" | "zeros" | "zero" => Ok(nvme_model::Deallocate::Zeroes),
        "keep" => Ok(nvme_model::Deallocate::Keep),
        _ => Err(ConfigError::Deallocate(text.to_owned())),
    }
}

/// Parses `LBA[+BLOCKS]:read|write` (LBA in decimal or 0x hex).
pub fn parse_media_error(text: &str) -> Result<MediaErrorSpec, ConfigError> {
    let fail = |why: &str| ConfigError::MediaError(text.to_owned(), why.to_owned());
    let (at, kind) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| fail("no kind given"))?;
    let kind = kind.parse().map_err(|e: String| fail(&e))?;
    let (lba, blocks) = match at.split_once('+') {
        Some((lba, n)) => (
            lba,
            parse_number(n).ok_or_else(|| fail("BLOCKS is not a number"))?,
        ),
        None => (at, 1),
    };
    let lba = parse_number(lba).ok_or_else(|| fail("LBA is not a number"))?;
    if blocks == 0 {
        return Err(fail("BLOCKS must be at least 1"));
    }
    Ok(MediaErrorSpec { lba, blocks, kind })
}

fn parse_number(text: &str) -> Option<u64> {
    let t = text.trim();
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// Parses `--latency`: a preset (instant, nvme, sata) and/or `key=value` fields.
pub fn parse_latency(text: &str) -> Result<nvme_model::LatencySpec, ConfigError> {
    nvme_model::LatencySpec::parse(text).map_err(|e| ConfigError::Latency(text.to_owned(), e))
}

/// Parses a guest-physical address: `0x` hex or decimal.
pub fn parse_gpa(text: &str) -> Result<dma::Gpa, ConfigError> {
    let t = text.trim();
    let n = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    n.map(dma::Gpa)
        .map_err(|_| ConfigError::Address(text.to_owned()))
}

pub fn check_queues(queues: u16) -> Result<u16, ConfigError> {
    if (1..=MAX_QUEUES).contains(&queues) {
        Ok(queues)
    } else {
        Err(ConfigError::Queues(queues))
    }
}

pub fn check_queue_size(size: u16) -> Result<u16, ConfigError> {
    if size >= 2 && size.is_power_of_two() {
        Ok(size)
    } else {
        Err(ConfigError::QueueSize(size))
    }
}

pub fn check_serial(serial: String) -> Result<String, ConfigError> {
    if serial.len() <= crate::virtio_blk::ID_BYTES {
        Ok(serial)
    } else {
        Err(ConfigError::Serial(serial))
    }
}

/// A media size (`option`'s) must be whole blocks, and more than none.
pub fn check_size(option: &'static str, size: u64, lbs: LbaSize) -> Result<u64, ConfigError> {
    if size == 0 {
        Err(ConfigError::Empty { option })
    } else if !lbs.is_aligned(size) {
        Err(ConfigError::Unaligned {
            option,
            size,
            lbs: lbs.bytes(),
        })
    } else {
        Ok(size)
    }
}

/// Parses a size: bytes, or a number with a binary suffix K, M, G or T
/// (optionally followed by `i` and/or `B`: 64M, 64MiB, 1G, 4096).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Size(text.to_owned());
    let t = text.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let t = t.strip_suffix('i').unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(err()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_options() {
        let lbs = LbaSize::B4096;
        let g = geometry(&GeometryArgs::default(), lbs, 256).unwrap();
        assert_eq!(g, nvme_model::Geometry::default_for(lbs));
        let args = GeometryArgs {
            max_transfer: Some("128K".into()),
            optimal_transfer: Some("64K".into()),
            discard_granularity: Some("1M".into()),
            max_discard_segments: Some(8),
            ..GeometryArgs::default()
        };
        let g = geometry(&args, lbs, 256).unwrap();
        assert_eq!(g.max_transfer, Some(128 << 10));
        assert_eq!(g.discard_granularity, 1 << 20);
        // 1 MiB is 256 pages: more than a queue of 256 carries with its header and status.
        let big = GeometryArgs {
            max_transfer: Some("1M".into()),
            ..GeometryArgs::default()
        };
        let e = geometry(&big, lbs, 256).unwrap_err().to_string();
        assert!(e.contains("--queue-size 512"), "{e}");
        assert!(geometry(&big, lbs, 512).is_ok());
        let odd = GeometryArgs {
            discard_granularity: Some("6K".into()),
            ..GeometryArgs::default()
        };
        let e = geometry(&odd, lbs, 256).unwrap_err().to_string();
        assert!(e.contains("--discard-granularity"), "{e}");
    }

    #[test]
    fn media_options() {
        assert_eq!(parse_write_cache("off"), Ok(None));
        assert_eq!(parse_write_cache("0"), Ok(None));
        assert_eq!(parse_write_cache("8M"), Ok(Some(8 << 20)));
        assert!(parse_write_cache("lots").is_err());
        assert_eq!(MediaConfig::default().write_cache, Some(32 << 20));
        assert_eq!(parse_deallocate("keep"), Ok(nvme_model::Deallocate::Keep));
        assert!(parse_deallocate("shred").is_err());
        let read = nvme_model::MediaErrorKind::Read;
        assert_eq!(
            parse_media_error("2048+8:read"),
            Ok(MediaErrorSpec {
                lba: 2048,
                blocks: 8,
                kind: read
            })
        );
        assert_eq!(parse_media_error("0x10:write").unwrap().lba, 16);
        assert_eq!(parse_media_error("7:read").unwrap().blocks, 1);
        for bad in ["7", "7:scratch", "x:read", "7+0:read", "7+y:write"] {
            let e = parse_media_error(bad).unwrap_err().to_string();
            assert!(e.contains("LBA[+BLOCKS]"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        for bad in ["", "M", "12X", "-1", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fault_files() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "[[rule]]\nop = \"read\"\naction = \"delay\"\nms = 1000\n\n\
             [[rule]]\nop = \"read\"\nlba = \"0-7\"\nnth = 2\naction = \"hold\"\n",
        )
        .unwrap();
        let rules = load_fault_file(&good).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0],
            dma::RuleSpec::parse("op=read,action=delay,ms=1000").unwrap()
        );
        assert_eq!(rules[1].lba, Some((0, 7)));

        let bad = dir.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[[rule]]\naction = \"hold\"\n[[rule]]\nop = \"read\"\naction = \"bogus\"\n",
        )
        .unwrap();
        let e = load_fault_file(&bad).unwrap_err().to_string();
        assert!(e.contains("rule 2") && e.contains("bogus"), "{e}");

        let broken = dir.path().join("broken.toml");
        std::fs::write(&broken, "[[rule]\n").unwrap();
        assert!(matches!(
            load_fault_file(&broken),
            Err(ConfigError::FaultFile(..))
        ));
        let stray = dir.path().join("stray.toml");
        std::fs::write(&stray, "rules = 1\n").unwrap();
        assert!(load_fault_file(&stray)
            .unwrap_err()
            .to_string()
            .contains("rules"));
        assert!(load_fault_file(&dir.path().join("missing.toml")).is_err());

        // A value cannot carry a second key into the rule.
        let injected = dir.path().join("injected.toml");
        std::fs::write(
            &injected,
            "[[rule]]\ntag = \"x,nth=1\"\naction = \"hold\"\n",
        )
        .unwrap();
        let e = load_fault_file(&injected).unwrap_err().to_string();
        assert!(
            e.contains("rule 1") && e.contains("tag") && e.contains("','"),
            "{e}"
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_gpa("0x1f2c000"), Ok(dma::Gpa(0x1f2c000)));
        assert_eq!(parse_gpa("4096"), Ok(dma::Gpa(4096)));
        assert!(parse_gpa("0xzz").is_err());
        assert!(parse_gpa("").is_err());
    }

    #[test]
    fn limits() {
        assert!(check_queues(0).is_err());
        assert!(check_queues(1).is_ok());
        assert!(check_queues(MAX_QUEUES + 1).is_err());
        assert!(check_queue_size(256).is_ok());
        assert!(check_queue_size(100).is_err());
        assert!(check_queue_size(1).is_err());
        assert!(check_serial("x".repeat(20)).is_ok());
        assert!(check_serial("x".repeat(21)).is_err());
        assert!(check_size("--size", 1000, LbaSize::B512).is_err());
        let empty = check_size("--mem", 0, LbaSize::B512).unwrap_err();
        assert_eq!(empty.to_string(), "--mem must be larger than zero");
        assert!(check_size("--size", 8192, LbaSize::B4096).is_ok());
    }
}
