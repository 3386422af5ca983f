//! Fixtures shared by the integration tests that run the daemon in process.

#![allow(dead_code)] // each test binary uses its own part

pub mod child;
pub mod served;
pub mod vfio;

use backend::cli::{Cli, Command};
use backend::config::ServeConfig;
use clap::Parser;

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

/// A recognisable pattern: each byte depends on its position and a seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = i
                .wrapping_mul(0x9e37_79b9)
                .wrapping_add(seed.wrapping_mul(0x85eb_ca6b));
            (x ^ (x >> 13)).to_le_bytes()[0]
        })
        .collect()
}
