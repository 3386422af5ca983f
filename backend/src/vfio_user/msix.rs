//! The MSI-X vectors as eventfds: the function's [`Interrupts`], with the
//! mask and pending bits SET_IRQS and the PBA see.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{debug, warn};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_MSIX_IRQ_INDEX,
};

use super::function::Interrupts;
use super::request_error::RequestError;
use super::stats::VfioUserStats;
use crate::counters::{bump, RateLimit};

#[derive(Debug, Default)]
struct Vector {
    eventfd: Option<File>,
    masked: bool,
    pending: bool,
}

/// The MSI-X vectors as eventfds; the function's [`Interrupts`].
#[derive(Debug)]
pub struct Msix {
    vectors: Box<[Mutex<Vector>]>,
    stats: Arc<VfioUserStats>,
    limiter: RateLimit,
}

impl Interrupts for Msix {
    fn signal(&self, vector: u16) {
        let Some(v) = self.vectors.get(usize::from(vector)) else {
            bump(&self.stats.irqs_dropped);
            if self.limiter.allow() {
                warn!(
                    "vfio-user: interrupt on vector {vector}, past the table's {}",
                    self.vectors.len()
                );
            }
            return;
        };
        let mut v = lock(v);
        if v.eventfd.is_none() {
            bump(&self.stats.irqs_dropped);
            debug!("vfio-user: vector {vector} has no eventfd: interrupt dropped");
        } else if v.masked {
            v.pending = true;
            bump(&self.stats.irqs_masked);
        } else {
            self.fire(vector, &v);
        }
    }
}

impl Msix {
    pub(super) fn new(vectors: u16, stats: Arc<VfioUserStats>) -> Msix {
        Msix {
            vectors: (0..vectors).map(|_| Mutex::default()).collect(),
            stats,
            limiter: RateLimit::default(),
        }
    }

    fn fire(&self, vector: u16, v: &Vector) {
        let Some(fd) = &v.eventfd else { return };
        match (&*fd).write(&1u64.to_ne_bytes()) {
            // A full counter is an interrupt already pending.
            Ok(_) => bump(&self.stats.irqs_delivered),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => bump(&self.stats.irqs_delivered),
            Err(e) => {
                bump(&self.stats.irqs_failed);
                if self.limiter.allow() {
                    warn!("vfio-user: signalling vector {vector} failed: {e}");
                }
            }
        }
    }

    fn range(
        &self,
        index: u32,
        start: u32,
        count: u32,
    ) -> Result<std::ops::Range<usize>, RequestError> {
        let end = start.checked_add(count);
        match end {
            Some(end) if end as usize <= self.vectors.len() => Ok(start as usize..end as usize),
            _ => Err(RequestError::IrqRange {
                index,
                start,
                count,
                available: self.vectors.len() as u32,
            }),
        }
    }

    pub(super) fn set_irqs(
        &self,
        action: u32,
        data: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), RequestError> {
        let index = VFIO_PCI_MSIX_IRQ_INDEX;
        match (action, data) {
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) if count == 0 => {
                self.clear();
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) => {
                for v in self.range(index, start, count)? {
                    self.signal(v as u16);
                }
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD) => {
                let range = self.range(index, start, count)?;
                if fds.is_empty() {
                    // QEMU sends a run of -1 fds (unset vectors) as no fds.
                    for v in &self.vectors[range] {
                        lock(v).eventfd = None;
                    }
                } else if fds.len() == range.len() {
                    for fd in &fds {
                        set_nonblocking(fd).map_err(RequestError::Eventfd)?;
                    }
                    for (i, fd) in range.zip(fds) {
                        let mut v = lock(&self.vectors[i]);
                        v.eventfd = Some(fd);
                        bump(&self.stats.eventfds_set);
                        if v.pending && !v.masked {
                            v.pending = false;
                            self.fire(i as u16, &v);
                        }
                    }
                } else {
                    return Err(RequestError::IrqFds {
                        index,
                        count,
                        fds: fds.len(),
                    });
                }
            }
            (VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_DATA_NONE) => {
                for v in &self.vectors[self.range(index, start, count)?] {
                    lock(v).masked = true;
                }
            }
            (VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE) => {
                for i in self.range(index, start, count)? {
                    let mut v = lock(&self.vectors[i]);
                    v.masked = false;
                    if std::mem::take(&mut v.pending) {
                        self.fire(i as u16, &v);
                    }
                }
            }
            _ => {
                return Err(RequestError::IrqFlags {
                    index,
                    flags: action | data,
                })
            }
        }
        Ok(())
    }

    /// PBA bits `8 * byte .. 8 * byte + 8`.
    pub(super) fn pending_byte(&self, byte: usize) -> u8 {
        (0..8)
            .filter(|bit| {
                self.vectors
                    .get(byte * 8 + bit)
                    .is_some_and(|v| lock(v).pending)
            })
            .fold(0, |acc, bit| acc | (1 << bit))
    }

    /// Unmasked, nothing pending; the eventfds stay (a device reset).
    pub(super) fn reset(&self) {
        for v in self.vectors.iter() {
            let mut v = lock(v);
            v.masked = false;
            v.pending = false;
        }
    }

    /// No eventfds either (interrupts disabled, or the client left).
    pub(super) fn clear(&self) {
        for v in self.vectors.iter() {
            *lock(v) = Vector::default();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An eventfd from the client must never block the function's thread.
fn set_nonblocking(fd: &File) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eventfd() -> File {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; the descriptor it returns is new
        // and becomes the File's alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: as above.
        unsafe { File::from_raw_fd(fd) }
    }

    fn read_eventfd(f: &File) -> Option<u64> {
        use std::io::Read;
        let mut b = [0; 8];
        (&*f)
            .read_exact(&mut b)
            .ok()
            .map(|()| u64::from_ne_bytes(b))
    }

    #[test]
    fn masked_vector_holds_its_interrupt_as_pending_until_unmasked() {
        let stats = Arc::new(VfioUserStats::default());
        let msix = Msix::new(4, stats.clone());
        let efd = eventfd();
        let file = efd.try_clone().unwrap();
        let none = VFIO_IRQ_SET_DATA_NONE;
        msix.set_irqs(
            VFIO_IRQ_SET_ACTION_TRIGGER,
            VFIO_IRQ_SET_DATA_EVENTFD,
            2,
            1,
            vec![file],
        )
        .unwrap();
        msix.set_irqs(VFIO_IRQ_SET_ACTION_MASK, none, 2, 1, vec![])
            .unwrap();
        msix.signal(2);
        assert_eq!(msix.pending_byte(0), 0b100);
        assert_eq!(read_eventfd(&efd), None, "a masked vector must not fire");
        msix.set_irqs(VFIO_IRQ_SET_ACTION_UNMASK, none, 2, 1, vec![])
            .unwrap();
        assert_eq!(read_eventfd(&efd), Some(1));
        assert_eq!(msix.pending_byte(0), 0);
        msix.signal(0); // no eventfd
        msix.signal(9); // no such vector
        let s = stats.snapshot();
        assert_eq!((s.irqs_masked, s.irqs_delivered, s.irqs_dropped), (1, 1, 2));
    }

    #[test]
    fn irq_ranges_are_checked_without_overflow() {
        let msix = Msix::new(4, Arc::default());
        let trig = VFIO_IRQ_SET_ACTION_TRIGGER;
        assert!(msix
            .set_irqs(trig, VFIO_IRQ_SET_DATA_NONE, u32::MAX, 2, vec![])
            .is_err());
        assert!(msix
            .set_irqs(trig, VFIO_IRQ_SET_DATA_NONE, 3, 2, vec![])
            .is_err());
        assert!(msix
            .set_irqs(trig, VFIO_IRQ_SET_DATA_NONE, 0, 4, vec![])
            .is_ok());
    }
}
