//! dmaprobe's command line, on top of the device ([`backend`]) and the guest
//! suite ([`guest_tests`]):
//!
//! - [`args`]: the subcommands and their options (clap), and the checked
//!   [`ServeConfig`](backend::config::ServeConfig) `dmaprobe serve`'s give.
//! - `dmaprobe serve`: [`backend::serve::run`].
//! - [`ctl`]: `dmaprobe ctl`, a control-socket client for a person.
//! - [`bench`](mod@bench): `dmaprobe bench`, a load generator acting as the
//!   vhost-user frontend (QEMU's side), through
//!   [`backend::vhost_user_driver`], or with `--nvme` as a vfio-user client
//!   and NVMe host driver (a guest's side), through
//!   [`backend::nvme_driver`].
//! - [`kernel`]: `dmaprobe kernel`, the catalogue of kernels fetched by
//!   name.
//! - [`kconfig`]: `dmaprobe kconfig`, the kernel options the suite needs,
//!   or a kernel's config checked against them.
//! - [`run`]: `dmaprobe run`, the guest suite through [`guest_tests::run`].
//! - [`report`]: `dmaprobe report merge`, the JSON reports of a run's shards
//!   joined ([`guest_tests::report::merge`]).

pub mod args;
pub mod bench;
pub mod ctl;
pub mod kconfig;
pub mod kernel;
pub mod report;
pub mod run;
