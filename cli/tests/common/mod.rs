//! Fixtures shared by the integration tests: the daemon in process
//! ([`served`]) or as a child ([`child`]), a vfio-user client's memfds and
//! eventfds ([`vfio`]), and the data pattern.

#![allow(dead_code, unused_imports)] // each test binary uses its own part

pub mod child;
pub mod served;
pub mod vfio;

use backend::config::ServeConfig;
use clap::Parser;
use dmaprobe::args::{Cli, Command};
pub use wire::pattern::pattern;

/// The `ServeConfig` that `dmaprobe serve ARGS` gives.
pub fn serve_config(args: &[&str]) -> ServeConfig {
    let argv = ["dmaprobe", "serve"]
        .into_iter()
        .chain(args.iter().copied());
    match Cli::try_parse_from(argv)
        .expect("the arguments parse")
        .command
    {
        Command::Serve(a) => ServeConfig::try_from(*a).expect("a valid configuration"),
        other => panic!("not a serve command: {other:?}"),
    }
}
