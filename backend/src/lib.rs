//! dmaprobe's backend: the front-ends the guest sees, and the command line.
//!
//! - `frontend`: a vhost-user-blk *frontend* (the side QEMU plays), used by the
//!   protocol tests and `dmaprobe bench` to drive any vhost-user-blk backend.

pub mod blk;
pub mod cli;
pub mod config;
pub mod control;
pub mod counters;
pub mod ctl;
pub mod device;
pub mod execute;
pub mod frontend;
pub mod mailbox;
pub mod request;
pub mod runner;
pub mod serve;
