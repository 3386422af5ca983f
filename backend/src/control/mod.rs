//! The control plane: the commands that drive a running daemon, the JSON-lines
//! protocol that carries them, the UNIX socket that serves it, and the daemon
//! state they act on.
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
//! `v` may be left out; a version other than [`PROTOCOL_VERSION`](protocol::PROTOCOL_VERSION)
//! is refused.
//! The same commands reach the daemon from inside the guest through the
//! mailbox (see `mailbox`).
//!
//! - [`protocol`]: the wire format: [`Command`](protocol::Command), request
//!   lines parsed ([`parse_request`](protocol::parse_request)), answers framed.
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
//! [`protocol::parse_request`] → [`commands::carry_out`] on the
//! [`DaemonState`](state::DaemonState) → one answer line.

pub mod commands;
pub mod process_figures;
pub mod protocol;
pub mod socket;
pub mod state;
