//! The features the controller keeps (Get and Set Features): their current
//! values, and their defaults for an [`Identity`].

use super::command::{high16, low16};
use super::identify::{self, Identity};

/// The current value of every feature the controller keeps. None is
/// saveable; all return to their defaults on reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    pub arbitration: u32,
    pub power_management: u32,
    /// Composite temperature over and under thresholds, kelvins.
    pub temperature: [u16; 2],
    pub interrupt_coalescing: u32,
    pub write_atomicity: u32,
    pub async_event_config: u32,
    /// Granted I/O queues, zero-based: submission in bits 15:0, completion in
    /// 31:16, as Number of Queues reports them.
    pub queues: u32,
    pub write_cache: bool,
}

impl Features {
    pub fn defaults(identity: &Identity) -> Features {
        let n = u32::from(identity.io_queues.max(1) - 1);
        Features {
            arbitration: 0,
            power_management: 0,
            temperature: [identify::WARNING_TEMPERATURE, 0],
            interrupt_coalescing: 0,
            write_atomicity: 0,
            async_event_config: 0,
            queues: n | n << 16,
            write_cache: identity.write_cache.unwrap_or(false),
        }
    }

    /// How many I/O submission and completion queues the host may create.
    pub fn granted(&self) -> (u16, u16) {
        (low16(self.queues) + 1, high16(self.queues) + 1)
    }
}
