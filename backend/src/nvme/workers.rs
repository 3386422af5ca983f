//! The threads that serve I/O submission queues, one per queue identifier,
//! as virtio-blk has a thread per virtqueue: a doorbell write on the
//! transport's thread records the tail (or, with shadow doorbells, only
//! that there is something to look at) and wakes the queue's thread, which
//! fetches, decodes, checks and hands the commands to the handler
//! ([`Controller::serve_queue`]) while the transport takes its next
//! message. A queue's thread is started when its doorbell is first rung and
//! serves every queue that takes the identifier (a queue deleted and created
//! again, a reset); it waits on a condition variable between wake-ups and
//! ends when the controller goes. The admin queue stays on the transport's
//! thread.
//!
//! A wake-up is never lost: it sets `pending`, which the thread clears
//! before it looks at the queue, so a doorbell that comes while the thread
//! is serving has it look again.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread;

use log::warn;

use super::controller::Controller;

/// The most commands a queue's thread fetches before it hands them to the
/// handler: the first reach the handler while the host is still filling
/// the queue, and a reset waits for no more than one batch.
pub(super) const BATCH: usize = 32;

/// The I/O submission queues' threads of one controller.
pub(super) struct Workers {
    controller: Weak<Controller>,
    /// Indexed by queue identifier.
    queues: Mutex<Vec<Option<Arc<Wake>>>>,
}

/// How a queue's thread is woken.
#[derive(Default)]
struct Wake {
    state: Mutex<WakeState>,
    changed: Condvar,
}

#[derive(Default)]
struct WakeState {
    /// A doorbell came since the thread last looked.
    pending: bool,
    /// The thread is serving its queue.
    busy: bool,
    /// The controller is gone.
    stop: bool,
}

impl Wake {
    fn lock(&self) -> MutexGuard<'_, WakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Workers {
    pub(super) fn new(controller: Weak<Controller>) -> Workers {
        Workers {
            controller,
            queues: Mutex::new(Vec::new()),
        }
    }

    fn queues(&self) -> MutexGuard<'_, Vec<Option<Arc<Wake>>>> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes queue `qid`'s thread, starting it first if need be; false if
    /// it could not be started (the caller serves the queue itself).
    pub(super) fn wake(&self, qid: u16) -> bool {
        let Some(wake) = self.thread(qid) else {
            return false;
        };
        wake.lock().pending = true;
        wake.changed.notify_all();
        true
    }

    fn thread(&self, qid: u16) -> Option<Arc<Wake>> {
        let mut queues = self.queues();
        let i = usize::from(qid);
        if let Some(Some(wake)) = queues.get(i) {
            return Some(wake.clone());
        }
        let wake = Arc::new(Wake::default());
        let (controller, theirs) = (self.controller.clone(), wake.clone());
        let started = thread::Builder::new()
            .name(format!("nvme-sq{qid}"))
            .spawn(move || serve(&controller, qid, &theirs));
        if let Err(e) = started {
            warn!("nvme: q={qid} cannot have a thread of its own ({e}): served on the transport's");
            return None;
        }
        if queues.len() <= i {
            queues.resize(i + 1, None);
        }
        queues[i] = Some(wake.clone());
        Some(wake)
    }

    /// Waits until every thread has served what it was woken for.
    #[cfg(test)]
    pub(super) fn settle(&self) {
        let wakes: Vec<Arc<Wake>> = self.queues().iter().flatten().cloned().collect();
        for wake in wakes {
            let mut state = wake.lock();
            while state.pending || state.busy {
                state = wake
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }
}

/// The threads end with the controller. Not joined: the last reference to
/// the controller may be dropped on one of them.
impl Drop for Workers {
    fn drop(&mut self) {
        for wake in self.queues().iter().flatten() {
            wake.lock().stop = true;
            wake.changed.notify_all();
        }
    }
}

/// A queue's thread: waits to be woken, serves the queue, again.
fn serve(controller: &Weak<Controller>, qid: u16, wake: &Wake) {
    loop {
        {
            let mut state = wake.lock();
            while !state.pending && !state.stop {
                state = wake
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.stop {
                return;
            }
            state.pending = false;
            state.busy = true;
        }
        match controller.upgrade() {
            Some(c) => c.serve_queue(qid),
            None => return,
        }
        wake.lock().busy = false;
        wake.changed.notify_all();
    }
}
