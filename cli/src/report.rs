//! `dmaprobe report`: reports of runs made elsewhere; `merge` joins the JSON
//! of a run's shards ([`guest_tests::report::merge`]) and reports the whole
//! run as `dmaprobe run` does.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use guest_tests::report::{self, MergeError};

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(subcommand)]
    pub command: ReportCommand,
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Join the JSON reports of a run split in shards (`dmaprobe run --shard
    /// I/N --json FILE`, one per job of a CI matrix) into the report of the
    /// whole run: print its table as `dmaprobe run` does, and write its JSON
    /// and JUnit.
    ///
    /// The files must be shards 1/N ... N/N of one run (the same --kernel,
    /// --transport and --tests), each once, together holding a result for
    /// every case of it; a missing shard is named, to run again.
    ///
    /// Exits 0 when every test passed or was skipped, 1 when any failed or
    /// errored, 2 when the reports cannot be merged.
    Merge(MergeArgs),
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shards' reports, in any order.
    #[arg(value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// Write the whole run's results with their evidence as JSON, as one
    /// unsharded `dmaprobe run --json` would.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the whole run's results as JUnit XML (a test suite per kernel).
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Runs `dmaprobe report`; `Ok(true)` when nothing failed or errored.
pub fn run(args: ReportArgs) -> Result<bool, ReportError> {
    match args.command {
        ReportCommand::Merge(args) => merge(args),
    }
}

/// Merges the shards' reports, prints the table and writes the reports asked
/// for.
fn merge(args: MergeArgs) -> Result<bool, ReportError> {
    let reports: Vec<(PathBuf, String)> = args
        .files
        .into_iter()
        .map(|file| match std::fs::read_to_string(&file) {
            Ok(text) => Ok((file, text)),
            Err(e) => Err(ReportError::Read(file, e)),
        })
        .collect::<Result<_, _>>()?;
    let (results, matrix) = report::merge(&reports)?;
    println!("{}", report::table(&results));
    if let Some(path) = args.json {
        std::fs::write(&path, report::json(&results, &matrix))
            .map_err(|e| ReportError::Write(path, e))?;
    }
    if let Some(path) = args.junit {
        std::fs::write(&path, report::junit(&results)).map_err(|e| ReportError::Write(path, e))?;
    }
    Ok(report::all_good(&results))
}
