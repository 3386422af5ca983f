//! What every side of dmaprobe agrees on byte for byte, whichever process it
//! runs in: the daemon, its command line, the runner on the host and the
//! program in the guest.
//!
//! - [`control`]: the control protocol's requests and answers (JSON lines)
//!   and the one client that sends them.
//! - [`mailbox`]: the frame of the guest's mailbox, the same requests
//!   carried through the disk.
//! - [`pattern`]: the data written and checked, a function of a seed and
//!   the byte's place.
//! - [`splitmix`]: the seeded sequence behind every `--seed`.

pub mod control;
pub mod mailbox;
pub mod pattern;
pub mod splitmix;
