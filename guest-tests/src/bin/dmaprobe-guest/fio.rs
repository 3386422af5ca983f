//! `fio-randread`: fio's 4 KiB random read at queue depth 32 on the raw disk,
//! for the record rather than for a verdict on the kernel. Run against dmaprobe
//! and against qemu-storage-daemon (`dmaprobe run --daemon`) under the same
//! guest, it compares the two devices; `scripts/bench --guest` does that.
//!
//! The host packs Debian's fio, with the libraries `ldd` names, into the
//! initramfs only when a selected test needs it. The test runs
//! `fio --direct=1 --ioengine=libaio --rw=randread --bs=4k --iodepth=32` on
//! `/dev/vda` for [`RUNTIME`] after a [`RAMP`] that is not counted, reads
//! fio's JSON ([`parse`]), and reports IOPS, bandwidth and latency as notes.
//! It passes when fio read to the end without an I/O error; the figures are
//! not judged (under TCG they measure the emulator as much as the device).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use crate::{one_line, Ctx, Stop};

/// Where the host puts fio in the initramfs.
pub const FIO: &str = "/bin/fio";

/// How long fio measures.
const RUNTIME: Duration = Duration::from_secs(10);

/// How long fio runs first without measuring.
const RAMP: Duration = Duration::from_secs(1);

/// Why fio's output could not be read.
#[derive(Debug, Error)]
pub enum FioError {
    #[error("No JSON object in fio's output")]
    NoJson,
    #[error("fio's output is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("fio's output lacks {0}")]
    Missing(&'static str),
}

/// What fio's one job measured of its reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadStats {
    /// `fio-3.33`.
    pub version: String,
    /// The job's error (an errno; 0 when every I/O succeeded).
    pub error: i64,
    pub iops: f64,
    pub bw_kib_s: u64,
    /// Reads completed in the measured time.
    pub total_ios: u64,
    pub runtime_ms: u64,
    /// Completion latency (submission to completion seen), 50th percentile.
    pub clat_p50_ns: u64,
    pub clat_p99_ns: u64,
    pub clat_p999_ns: u64,
    /// Mean of the whole latency (submission plus completion).
    pub lat_mean_ns: f64,
}

/// The arguments of the fio run on `disk`.
fn fio_args(disk: &str) -> Vec<String> {
    [
        "--name=randread".to_owned(),
        format!("--filename={disk}"),
        "--direct=1".to_owned(),
        "--ioengine=libaio".to_owned(),
        "--rw=randread".to_owned(),
        "--bs=4k".to_owned(),
        "--iodepth=32".to_owned(),
        format!("--runtime={}s", RUNTIME.as_secs()),
        format!("--ramp_time={}s", RAMP.as_secs()),
        "--time_based".to_owned(),
        "--output-format=json".to_owned(),
    ]
    .into()
}

pub fn randread(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    if !Path::new(FIO).is_file() {
        return Err(Stop::Error(format!(
            "{FIO} is not in the initramfs (the host packs it for tests that need it)"
        )));
    }
    let out = Command::new(FIO)
        .args(fio_args(disk))
        .output()
        .map_err(|e| Stop::Error(format!("cannot run {FIO}: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let stats = parse(&String::from_utf8_lossy(&out.stdout)).map_err(|e| {
        Stop::Error(format!(
            "{} (fio {}; stderr: {})",
            one_line(&e),
            out.status,
            if stderr.is_empty() { "empty" } else { stderr }
        ))
    })?;

    ctx.note(
        "fio",
        format!(
            "{}: {disk} libaio 4k randread QD32, {} s after {} s ramp",
            stats.version,
            RUNTIME.as_secs(),
            RAMP.as_secs()
        ),
    );
    ctx.note("iops", format!("{:.0}", stats.iops));
    ctx.note("bw-kib-s", stats.bw_kib_s.to_string());
    ctx.note("reads", stats.total_ios.to_string());
    ctx.note("clat-p50-us", micros(stats.clat_p50_ns as f64));
    ctx.note("clat-p99-us", micros(stats.clat_p99_ns as f64));
    ctx.note("clat-p99.9-us", micros(stats.clat_p999_ns as f64));
    ctx.note("lat-mean-us", micros(stats.lat_mean_ns));
    ctx.check(
        "fio read to the end without I/O errors",
        out.status.success() && stats.error == 0 && stats.total_ios > 0,
        format!(
            "fio {}, job error {}, {} reads in {} ms{}",
            out.status,
            stats.error,
            stats.total_ios,
            stats.runtime_ms,
            if stderr.is_empty() {
                String::new()
            } else {
                format!("; stderr: {stderr}")
            }
        ),
    );
    Ok(())
}

fn micros(ns: f64) -> String {
    format!("{:.1}", ns / 1000.0)
}

/// The JSON object in fio's `--output-format=json` output. Anything fio
/// printed before it, or after it, is skipped.
pub fn json(output: &str) -> Result<Value, FioError> {
    let start = if output.starts_with('{') {
        0
    } else {
        output.find("\n{").ok_or(FioError::NoJson)? + 1
    };
    serde_json::Deserializer::from_str(&output[start..])
        .into_iter()
        .next()
        .ok_or(FioError::NoJson)?
        .map_err(FioError::Json)
}

/// Reads fio's `--output-format=json` output (one job). Anything fio printed
/// before the JSON object, or after it, is skipped.
pub fn parse(output: &str) -> Result<ReadStats, FioError> {
    let json = json(output)?;
    let at = |pointer: &'static str| json.pointer(pointer).ok_or(FioError::Missing(pointer));
    let uint = |pointer: &'static str| at(pointer)?.as_u64().ok_or(FioError::Missing(pointer));
    let float = |pointer: &'static str| at(pointer)?.as_f64().ok_or(FioError::Missing(pointer));
    Ok(ReadStats {
        version: at("/fio version")?
            .as_str()
            .ok_or(FioError::Missing("/fio version"))?
            .to_owned(),
        error: at("/jobs/0/error")?
            .as_i64()
            .ok_or(FioError::Missing("/jobs/0/error"))?,
        iops: float("/jobs/0/read/iops")?,
        bw_kib_s: uint("/jobs/0/read/bw")?,
        total_ios: uint("/jobs/0/read/total_ios")?,
        runtime_ms: uint("/jobs/0/read/runtime")?,
        clat_p50_ns: uint("/jobs/0/read/clat_ns/percentile/50.000000")?,
        clat_p99_ns: uint("/jobs/0/read/clat_ns/percentile/99.000000")?,
        clat_p999_ns: uint("/jobs/0/read/clat_ns/percentile/99.900000")?,
        lat_mean_ns: float("/jobs/0/read/lat_ns/mean")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of fio 3.33 (Debian bookworm) with this test's options, run
    /// on the host for 2 s against a 64 MiB file instead of `/dev/vda`.
    const FIXTURE: &str = include_str!("../../../testdata/fio-randread.json");

    fn expected() -> ReadStats {
        ReadStats {
            version: "fio-3.33".into(),
            error: 0,
            iops: 72_271.364_318,
            bw_kib_s: 289_147,
            total_ios: 144_615,
            runtime_ms: 2001,
            clat_p50_ns: 234_496,
            clat_p99_ns: 4_227_072,
            clat_p999_ns: 31_850_496,
            lat_mean_ns: 447_163.133_581,
        }
    }

    #[test]
    fn reads_real_fio_json() {
        assert_eq!(parse(FIXTURE).unwrap(), expected());
    }

    #[test]
    fn the_fixture_was_made_with_this_tests_options() {
        let json: Value = serde_json::from_str(FIXTURE).unwrap();
        let options = &json["jobs"][0]["job options"];
        let mut compared = 0;
        for arg in fio_args(crate::disk_path()) {
            // fio lists neither flags nor its output format among the options;
            // the fixture read a file, for a shorter time.
            let Some((key, value)) = arg.trim_start_matches("--").split_once('=') else {
                continue;
            };
            if ["filename", "runtime", "output-format"].contains(&key) {
                continue;
            }
            assert_eq!(options[key], value, "{key}: {options}");
            compared += 1;
        }
        assert_eq!(compared, 7);
    }

    #[test]
    fn skips_what_fio_prints_around_the_json() {
        let noisy = format!("fio: some notice\nmore\n{FIXTURE}\ntrailing words\n");
        assert_eq!(parse(&noisy).unwrap(), expected());
    }

    #[test]
    fn says_what_is_wrong_with_bad_output() {
        assert!(matches!(parse(""), Err(FioError::NoJson)));
        assert!(matches!(
            parse("fio: pid=0, err=2/file:filesetup.c\n"),
            Err(FioError::NoJson)
        ));
        assert!(matches!(parse("{\"jobs\": ["), Err(FioError::Json(_))));
        let no_read = FIXTURE.replace("\"read\" :", "\"reed\" :");
        assert!(matches!(
            parse(&no_read),
            Err(FioError::Missing("/jobs/0/read/iops"))
        ));
        let one_job_failed = FIXTURE.replacen("\"error\" : 0", "\"error\" : 5", 1);
        assert_eq!(parse(&one_job_failed).unwrap().error, 5);
    }
}
