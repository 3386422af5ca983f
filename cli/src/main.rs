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
    let result: Result<ExitCode, Box<dyn std::error::Error>> = match cli.command {
        Command::Serve(args) => ServeConfig::try_from(*args)
            .map_err(Into::into)
            .and_then(|config| backend::serve::run(config).map_err(Into::into))
            .map(|()| ExitCode::SUCCESS),
        Command::Ctl(args) => match dmaprobe::ctl::run(args) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("dmaprobe ctl: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        },
        Command::Bench(args) => match dmaprobe::bench::run(args) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("dmaprobe bench: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        },
        Command::Kernel(args) => match dmaprobe::kernel::run(args) {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) => {
                eprintln!("dmaprobe kernel: error: {}", error_chain(&e));
                return ExitCode::FAILURE;
            }
        },
        // 0: printed, or nothing missing; 1: an option missing; 2: unreadable.
        Command::Kconfig(args) => match dmaprobe::kconfig::run(args) {
            Ok(true) => Ok(ExitCode::SUCCESS),
            Ok(false) => Ok(ExitCode::from(1)),
            Err(e) => {
                eprintln!("dmaprobe kconfig: error: {}", error_chain(&e));
                return ExitCode::from(2);
            }
        },
        // 0: all passed, 1: something failed, 2: the run could not be set up.
        Command::Run(args) => match dmaprobe::run::run_suite(*args) {
            Ok(true) => Ok(ExitCode::SUCCESS),
            Ok(false) => Ok(ExitCode::from(1)),
            Err(e) => {
                log::error!("{}", error_chain(&e));
                return ExitCode::from(2);
            }
        },
        // 0: all passed, 1: something failed, 2: the reports cannot be merged.
        Command::Report(args) => match dmaprobe::report::run(args) {
            Ok(true) => Ok(ExitCode::SUCCESS),
            Ok(false) => Ok(ExitCode::from(1)),
            Err(e) => {
                eprintln!("dmaprobe report: error: {}", error_chain(&e));
                return ExitCode::from(2);
            }
        },
    };
    result.unwrap_or_else(|e| {
        log::error!("{}", error_chain(e.as_ref()));
        ExitCode::FAILURE
    })
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
