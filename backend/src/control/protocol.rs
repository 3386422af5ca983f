//! The daemon's side of the control protocol (the wire format is
//! [`wire::control`]): the function a request line is handed to, and the
//! checks as a status shows them.

use std::sync::Arc;

use dma::Checks;
use serde_json::{json, Value};

/// Runs one control request line and returns the answer line: what the
/// control socket and the guest's mailbox hand their lines to.
pub type ControlFn = Arc<dyn Fn(&str) -> String + Send + Sync>;

pub fn checks_json(c: Checks) -> Value {
    json!({"canary": c.canary, "snapshot": c.snapshot, "overlap": c.overlap, "ledger": c.ledger})
}
