//! Large reads and long zero-fills served off their queue's thread.
//!
//! A queue's thread parses, prepares and serves its requests one after the
//! other. For a large read the serving is a copy bound by one core's memory
//! bandwidth, so one queue could not use the other cores (a thread-pool
//! backend such as qemu-storage-daemon can). The queue's thread hands such a
//! read to this pool when a pool thread is free ([`IoPool::submit`]), and
//! serves it itself when none is, so the two share the copying. A long
//! zero-fill (gigabytes of zeros written where no hole can be punched) would
//! stall the queue's thread for its whole length, so it is always handed
//! over, to wait for a thread if none is free ([`IoPool::queue`]). A pool
//! thread moves the data and completes the request — out of order, which
//! virtio and NVMe allow. A queue that stops waits for its work in the pool
//! first ([`IoPool::wait_idle`]), so nothing completes on a stopped ring.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

/// Work for a pool thread.
pub type Task = Box<dyn FnOnce() + Send>;

/// A way to hand a queue's task over: [`IoPool::submit`] (if a thread is
/// free) or [`IoPool::queue`]; a task handed back is the caller's to run.
pub type Handover = fn(&IoPool, u16, Task) -> Result<(), Task>;

/// Requests in the pool, per queue.
#[derive(Debug, Default)]
struct Inflight {
    counts: Mutex<Vec<usize>>,
    idle: Condvar,
    /// Tasks sent and not finished, all queues together.
    busy: AtomicUsize,
}

impl Inflight {
    fn add(&self, q: u16, n: isize) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let q = usize::from(q);
        if counts.len() <= q {
            counts.resize(q + 1, 0);
        }
        counts[q] = counts[q].saturating_add_signed(n);
        if counts[q] == 0 {
            self.idle.notify_all();
        }
    }
}

#[derive(Debug)]
pub struct IoPool {
    tx: Option<Sender<(u16, Task)>>,
    threads: Vec<JoinHandle<()>>,
    inflight: Arc<Inflight>,
}

impl IoPool {
    /// A pool of `threads` threads.
    pub fn new(threads: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(u16, Task)>();
        let rx = Arc::new(Mutex::new(rx));
        let inflight = Arc::new(Inflight::default());
        let threads = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                let inflight = inflight.clone();
                thread::Builder::new()
                    .name(format!("io-pool-{i}"))
                    .spawn(move || serve(&rx, &inflight))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(IoPool {
            tx: Some(tx),
            threads,
            inflight,
        })
    }

    /// Runs `task` for queue `q` on a pool thread if one is free; otherwise
    /// (or if the pool is gone) hands it back for the caller to run.
    pub fn submit(&self, q: u16, task: Task) -> Result<(), Task> {
        let threads = self.threads.len();
        let free = self
            .inflight
            .busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < threads).then_some(n + 1)
            });
        if free.is_err() {
            return Err(task);
        }
        self.send(q, task)
    }

    /// Runs `task` for queue `q` on a pool thread, after the work sent
    /// before it if every thread is busy; hands it back only if the pool is
    /// gone. Queued work counts as busy, so [`IoPool::submit`] hands reads
    /// back rather than queue them behind it.
    pub fn queue(&self, q: u16, task: Task) -> Result<(), Task> {
        self.inflight.busy.fetch_add(1, Ordering::AcqRel);
        self.send(q, task)
    }

    /// Sends a task counted busy already.
    fn send(&self, q: u16, task: Task) -> Result<(), Task> {
        let Some(tx) = &self.tx else {
            self.inflight.busy.fetch_sub(1, Ordering::AcqRel);
            return Err(task);
        };
        self.inflight.add(q, 1);
        tx.send((q, task)).map_err(|mpsc::SendError((q, task))| {
            self.inflight.busy.fetch_sub(1, Ordering::AcqRel);
            self.inflight.add(q, -1);
            task
        })
    }

    /// Returns when queue `q` has nothing left in the pool.
    pub fn wait_idle(&self, q: u16) {
        let mut counts = self
            .inflight
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while counts.get(usize::from(q)).is_some_and(|&n| n > 0) {
            counts = self
                .inflight
                .idle
                .wait(counts)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Waits until no queue has work in the pool.
    pub fn wait_all_idle(&self) {
        let mut counts = self
            .inflight
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while counts.iter().any(|&n| n > 0) {
            counts = self
                .inflight
                .idle
                .wait(counts)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

fn serve(rx: &Mutex<Receiver<(u16, Task)>>, inflight: &Inflight) {
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((q, task)) = next else {
            return;
        };
        task();
        inflight.busy.fetch_sub(1, Ordering::AcqRel);
        inflight.add(q, -1);
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        // Closing the channel ends each thread after the tasks already sent.
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_busy_pool_hands_work_back_and_a_queue_waits_for_its_own() {
        let pool = IoPool::new(2).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let task = |done: &Arc<AtomicUsize>| -> Task {
            let done = done.clone();
            Box::new(move || {
                thread::sleep(Duration::from_millis(50));
                done.fetch_add(1, Ordering::SeqCst);
            })
        };
        assert!(pool.submit(0, task(&done)).is_ok());
        assert!(pool.submit(1, task(&done)).is_ok());
        // Both threads are busy: the third comes back to be run by the caller.
        let back = pool.submit(0, task(&done)).expect_err("no thread is free");
        back();
        pool.wait_idle(0);
        assert!(done.load(Ordering::SeqCst) >= 2, "queue 0's tasks ran");
        drop(pool);
        assert_eq!(
            done.load(Ordering::SeqCst),
            3,
            "dropping runs what was sent"
        );
        let pool = IoPool::new(1).unwrap();
        assert!(pool.submit(0, task(&done)).is_ok());
        pool.wait_idle(0);
        assert!(pool.submit(0, task(&done)).is_ok(), "free again once done");
    }

    #[test]
    fn queued_work_waits_for_a_thread_and_a_queue_waits_for_it() {
        let pool = IoPool::new(1).unwrap();
        let (go, gate) = mpsc::channel::<()>();
        let done = Arc::new(AtomicUsize::new(0));
        let blocked: Task = Box::new(move || {
            let _ = gate.recv();
        });
        assert!(pool.queue(0, blocked).is_ok());
        // The one thread is busy: queued work waits for it, a read does not.
        let d = done.clone();
        let queued: Task = Box::new(move || {
            d.fetch_add(1, Ordering::SeqCst);
        });
        assert!(pool.queue(1, queued).is_ok(), "queued behind the first");
        let back = pool.submit(1, Box::new(|| {}));
        assert!(back.is_err(), "no thread is free for a read");
        assert_eq!(done.load(Ordering::SeqCst), 0);
        go.send(()).unwrap();
        pool.wait_idle(1);
        assert_eq!(
            done.load(Ordering::SeqCst),
            1,
            "queue 1 waited for its work"
        );
        pool.wait_all_idle();
        assert!(pool.submit(0, Box::new(|| {})).is_ok(), "free again");
    }

    #[test]
    fn waiting_on_a_queue_never_used_returns() {
        let pool = IoPool::new(1).unwrap();
        pool.wait_idle(7);
    }
}
