//! A vfio-user client's files for the transport's tests (tests/vfio_user.rs),
//! from the host driver's (`backend::nvme_driver::vfio_user`), which the
//! NVMe interface's tests (tests/nvme.rs) use whole: here a failure to make
//! one fails the test.

use std::fs::File;

use backend::nvme_driver::vfio_user::{self, QEMU_SEALS};

/// A memfd of `size` bytes as QEMU's memory-backend-memfd makes it.
pub fn memfd(size: u64) -> File {
    memfd_with(size, Some(QEMU_SEALS))
}

/// A memfd of `size` bytes with `seals` added after sizing it; with None, one
/// created without MFD_ALLOW_SEALING (memory-backend-memfd with seal=off).
pub fn memfd_with(size: u64, seals: Option<libc::c_int>) -> File {
    vfio_user::memfd(size, seals).expect("a memfd")
}

/// A new non-blocking eventfd.
pub fn eventfd() -> File {
    vfio_user::eventfd().expect("an eventfd")
}

/// The eventfd's count (which reading resets), or None if it was not signalled.
pub fn take_count(efd: &File) -> Option<u64> {
    vfio_user::take_count(efd).expect("read the eventfd")
}
