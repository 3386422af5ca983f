//! The daemon's side of the control plane: the commands that drive it, the
//! UNIX socket that serves them, and the daemon state they act on. The
//! JSON-lines protocol that carries them is [`wire::control`], shared with
//! every client.
//!
//! One request per line, one response per line:
//!
//! ```text
//! → {"v":1,"cmd":"held"}
//! ← {"v":1,"ok":true,"result":[{"request":7,"queue":0,"op":"read",...}]}
//! → {"v":1,"cmd":"release","id":7}
//! ← {"v":1,"ok":true,"result":{"released":1}}
//! → {"v":1,"cmd":"nonsense"}
//! ← {"v":1,"ok":false,"error":"unknown command ..."}
//! ```
//!
//! `v` may be left out; a version other than [`PROTOCOL_VERSION`](wire::control::PROTOCOL_VERSION)
//! is refused.
//! The same commands reach the daemon from inside the guest through the
//! mailbox (see `mailbox`).
//!
//! - [`protocol`]: [`ControlFn`](protocol::ControlFn), what a request line is
//!   handed to, from the socket or the mailbox.
//! - [`commands`]: what each command does to the daemon
//!   ([`handle_line`](commands::handle_line), [`carry_out`](commands::carry_out)).
//! - [`socket`]: the control socket, each client on a thread of its own.
//! - [`state`]: [`DaemonState`](state::DaemonState), what outlives each
//!   connection and what the commands act on, and `status`'s answer.
//! - [`process_figures`]: the daemon's own memory, descriptors and threads
//!   from `/proc`, for `status`.
//!
//! A line flows: the socket (or the guest's mailbox, through a
//! [`ControlFn`](protocol::ControlFn)) → [`commands::handle_line`] →
//! [`wire::control::parse_request`] → [`commands::carry_out`] on the
//! [`DaemonState`](state::DaemonState) → one answer line.

pub mod commands;
pub mod process_figures;
pub mod protocol;
pub mod socket;
pub mod state;
