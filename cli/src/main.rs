use std::error::Error;
use std::process::ExitCode;

use backend::config::ServeConfig;
use clap::Parser;
use dmaprobe::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp_millis()
        .init();
    // Each subcommand's exit status on an error: 2 where 1 already means a
    // verdict (a test failed, an option is missing), else 1.
    let (name, status, result): (&str, u8, Result<ExitCode, Box<dyn Error>>) = match cli.command {
        Command::Serve(args) => (
            "serve",
            1,
            ServeConfig::try_from(*args)
                .map_err(Into::into)
                .and_then(|config| backend::serve::run(config).map_err(Into::into))
                .map(|()| ExitCode::SUCCESS),
        ),
        Command::Ctl(args) => ("ctl", 1, done(dmaprobe::ctl::run(args))),
        Command::Bench(args) => ("bench", 1, done(dmaprobe::bench::run(args))),
        Command::Kernel(args) => ("kernel", 1, done(dmaprobe::kernel::run(args))),
        // 0: printed, or nothing missing; 1: an option missing; 2: unreadable.
        Command::Kconfig(args) => ("kconfig", 2, verdict(dmaprobe::kconfig::run(args))),
        // 0: all passed, 1: something failed, 2: the run could not be set up.
        Command::Run(args) => ("run", 2, verdict(dmaprobe::run::run_suite(*args))),
        // 0: all passed, 1: something failed, 2: the reports cannot be merged.
        Command::Report(args) => ("report", 2, verdict(dmaprobe::report::run(args))),
    };
    result.unwrap_or_else(|e| {
        eprintln!("dmaprobe {name}: error: {}", error_chain(e.as_ref()));
        ExitCode::from(status)
    })
}

/// A subcommand that succeeds or fails.
fn done<E: Error + 'static>(result: Result<(), E>) -> Result<ExitCode, Box<dyn Error>> {
    result.map(|()| ExitCode::SUCCESS).map_err(Into::into)
}

/// A subcommand whose success is a verdict: 0 when good, 1 when not.
fn verdict<E: Error + 'static>(result: Result<bool, E>) -> Result<ExitCode, Box<dyn Error>> {
    match result {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => Ok(ExitCode::from(1)),
        Err(e) => Err(e.into()),
    }
}

/// An error and its causes on one line, each reason once: a cause whose
/// words the message already holds (an error that prints its source too) is
/// not said again.
fn error_chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}
