//! The scheduler: requests that wait (a delay or a hold) are parked here and run
//! when due, on one thread that sleeps until the earliest deadline — no thread
//! is busy while requests wait, however many there are.
//!
//! The scheduler does not know what a job does; the interface gives it a
//! function that runs one (moves the data, completes the request) and may hand
//! back a follow-up job to park (a post-completion watch). A queue that
//! stops takes its parked jobs back with [`Scheduler::drain_queue`], which also
//! waits for a job of the scheduler's that is running at that moment.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use serde::Serialize;

use crate::fault::Wait;
use crate::request::{Op, ReqId};

/// Which held jobs to release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    One(ReqId),
    All,
    Queue(u16),
}

/// What a parked job is, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParkedInfo {
    pub request: ReqId,
    pub queue: u16,
    pub op: Op,
    pub lba: u64,
    pub len: u64,
    /// Held until released (else delayed until a deadline).
    pub held: bool,
    /// The test tag it arrived under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The guest memory it moves data to or from.
    pub segments: Vec<crate::segment::Segment>,
    /// A post-completion watch, not a request waiting.
    #[serde(skip)]
    pub watch: bool,
    /// Milliseconds it has been parked, when listed.
    pub waited_ms: u64,
    #[serde(skip)]
    pub since: Option<Instant>,
}

struct Slot<J> {
    info: ParkedInfo,
    job: J,
}

struct State<J> {
    slots: HashMap<u64, Slot<J>>,
    /// (deadline, slot key) of every job that is not held.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    next_key: u64,
    stop: bool,
}

struct Shared<J> {
    state: Mutex<State<J>>,
    wake: Condvar,
    /// Held while a job runs, so that a draining queue can wait for it.
    running: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A job to park: what it is, how it waits, and the job itself.
pub type FollowUp<J> = (ParkedInfo, Wait, J);

/// Parks jobs and runs them when due.
pub struct Scheduler<J: Send + 'static> {
    shared: Arc<Shared<J>>,
    thread: Option<JoinHandle<()>>,
}

impl<J: Send + 'static> std::fmt::Debug for Scheduler<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

impl<J: Send + 'static> Scheduler<J> {
    /// Starts the scheduler's thread; `run` runs each job when it is due.
    pub fn new(
        name: &str,
        run: impl Fn(J) -> Option<FollowUp<J>> + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                slots: HashMap::new(),
                due: BinaryHeap::new(),
                next_key: 0,
                stop: false,
            }),
            wake: Condvar::new(),
            running: Mutex::new(()),
        });
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                fine_timer_slack();
                Self::run_loop(&s, run)
            })?;
        Ok(Scheduler {
            shared,
            thread: Some(thread),
        })
    }

    fn run_loop(s: &Shared<J>, run: impl Fn(J) -> Option<FollowUp<J>>) {
        loop {
            // Sleep until something is due.
            {
                let mut st = lock(&s.state);
                loop {
                    if st.stop {
                        return;
                    }
                    let now = Instant::now();
                    match st.due.peek() {
                        Some(Reverse((at, _))) if *at <= now => break,
                        Some(Reverse((at, _))) => {
                            let wait = *at - now;
                            st = s
                                .wake
                                .wait_timeout(st, wait)
                                .map_or_else(|e| e.into_inner().0, |r| r.0);
                        }
                        None => st = s.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
                    }
                }
            }
            // Run what is due, with `running` held so a draining queue waits for it.
            let _running = lock(&s.running);
            let jobs = {
                let mut st = lock(&s.state);
                let now = Instant::now();
                let mut jobs = Vec::new();
                while let Some(Reverse((at, key))) = st.due.peek().copied() {
                    if at > now {
                        break;
                    }
                    st.due.pop();
                    if let Some(slot) = st.slots.remove(&key) {
                        jobs.push(slot.job);
                    }
                }
                jobs
            };
            for job in jobs {
                if let Some((info, wait, next)) = run(job) {
                    Self::park_in(s, info, wait, next);
                }
            }
        }
    }

    /// Parks a job: due after its delay, held until released, or due now.
    pub fn park(&self, info: ParkedInfo, wait: Wait, job: J) {
        Self::park_in(&self.shared, info, wait, job);
    }

    fn park_in(shared: &Shared<J>, mut info: ParkedInfo, wait: Wait, job: J) {
        let now = Instant::now();
        info.since = Some(now);
        info.held = wait == Wait::Hold;
        let mut st = lock(&shared.state);
        let key = st.next_key;
        st.next_key += 1;
        match wait {
            Wait::Hold => {}
            Wait::None => st.due.push(Reverse((now, key))),
            Wait::Delay(d) => st.due.push(Reverse((now + d, key))),
        }
        st.slots.insert(key, Slot { info, job });
        drop(st);
        shared.wake.notify_one();
    }

    /// Makes held jobs due now; returns how many.
    pub fn release(&self, which: Release) -> usize {
        self.release_where(|info| match which {
            Release::All => true,
            Release::One(id) => info.request == id,
            Release::Queue(q) => info.queue == q,
        })
    }

    /// Makes the held jobs that `pick` chooses due now; returns how many.
    pub fn release_where(&self, pick: impl Fn(&ParkedInfo) -> bool) -> usize {
        let now = Instant::now();
        let mut st = lock(&self.shared.state);
        let keys: Vec<u64> = st
            .slots
            .iter()
            .filter(|(_, s)| s.info.held && pick(&s.info))
            .map(|(&k, _)| k)
            .collect();
        for &k in &keys {
            if let Some(s) = st.slots.get_mut(&k) {
                s.info.held = false;
            }
            st.due.push(Reverse((now, k)));
        }
        drop(st);
        self.shared.wake.notify_one();
        keys.len()
    }

    /// Every parked job, oldest first.
    pub fn parked(&self) -> Vec<ParkedInfo> {
        let st = lock(&self.shared.state);
        let mut v: Vec<ParkedInfo> = st
            .slots
            .values()
            .map(|s| {
                let mut i = s.info.clone();
                i.waited_ms = i.since.map_or(0, |t| {
                    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
                });
                i
            })
            .collect();
        v.sort_by_key(|i| i.request);
        v
    }

    /// Takes back every job parked for `queue`, after any job that is running
    /// finishes. The caller runs or fails them.
    pub fn drain_queue(&self, queue: u16) -> Vec<J> {
        self.drain(|info| info.queue == queue)
    }

    /// Takes back every job parked, after any job that is running finishes;
    /// the scheduler goes on (a device reset, not a shutdown).
    pub fn drain_all(&self) -> Vec<J> {
        self.drain(|_| true)
    }

    fn drain(&self, pick: impl Fn(&ParkedInfo) -> bool) -> Vec<J> {
        let _running = lock(&self.shared.running);
        let mut st = lock(&self.shared.state);
        let keys: Vec<u64> = st
            .slots
            .iter()
            .filter(|(_, s)| pick(&s.info))
            .map(|(&k, _)| k)
            .collect();
        let mut jobs: Vec<(ReqId, J)> = keys
            .into_iter()
            .filter_map(|k| st.slots.remove(&k))
            .map(|s| (s.info.request, s.job))
            .collect();
        jobs.sort_by_key(|(id, _)| *id);
        jobs.into_iter().map(|(_, j)| j).collect()
    }

    /// Stops the thread and hands back every job still parked.
    pub fn shutdown(&mut self) -> Vec<J> {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut st = lock(&self.shared.state);
        st.due.clear();
        st.slots.drain().map(|(_, s)| s.job).collect()
    }
}

impl<J: Send + 'static> Drop for Scheduler<J> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            drop(self.shutdown());
        }
    }
}

/// Deadlines of a few tens of microseconds (a media latency model's) must not
/// be rounded up by the kernel's default 50 µs timer slack: the scheduler's
/// thread asks for 1 µs. A refusal only costs precision.
fn fine_timer_slack() {
    const SLACK_NS: libc::c_ulong = 1_000;
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, SLACK_NS, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn info(id: u64, queue: u16) -> ParkedInfo {
        ParkedInfo {
            request: ReqId(id),
            queue,
            op: Op::Read,
            lba: 0,
            len: 512,
            held: false,
            tag: None,
            segments: Vec::new(),
            watch: false,
            waited_ms: 0,
            since: None,
        }
    }

    fn scheduler() -> (Scheduler<u64>, mpsc::Receiver<(u64, Instant)>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let s = Scheduler::new("test", move |j| {
            let _ = lock(&tx).send((j, Instant::now()));
            // Job 10 comes back once as 11, 50 ms later.
            (j == 10).then(|| (info(11, 0), Wait::Delay(Duration::from_millis(50)), 11))
        })
        .unwrap();
        (s, rx)
    }

    #[test]
    fn delays_run_in_deadline_order_no_earlier() {
        let (s, rx) = scheduler();
        let start = Instant::now();
        s.park(info(1, 0), Wait::Delay(Duration::from_millis(120)), 1);
        s.park(info(2, 0), Wait::Delay(Duration::from_millis(40)), 2);
        s.park(info(3, 0), Wait::None, 3);
        let got: Vec<(u64, Instant)> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![3, 2, 1]);
        assert!(got[1].1 - start >= Duration::from_millis(40));
        assert!(got[2].1 - start >= Duration::from_millis(120));
    }

    #[test]
    fn a_job_can_park_a_follow_up() {
        let (s, rx) = scheduler();
        s.park(info(10, 0), Wait::None, 10);
        let (a, at) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let (b, bt) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((a, b), (10, 11));
        assert!(bt - at >= Duration::from_millis(50));
    }

    #[test]
    fn holds_wait_for_release() {
        let (s, rx) = scheduler();
        s.park(info(1, 0), Wait::Hold, 1);
        s.park(info(2, 1), Wait::Hold, 2);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        let parked = s.parked();
        assert_eq!(parked.len(), 2);
        assert!(parked.iter().all(|p| p.held));
        assert_eq!(s.release(Release::One(ReqId(2))), 1);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().0, 2);
        assert_eq!(s.release(Release::One(ReqId(2))), 0);
        assert_eq!(s.release(Release::All), 1);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().0, 1);
        assert!(s.parked().is_empty());
    }

    #[test]
    fn a_stopping_queue_takes_its_jobs_back() {
        let (mut s, rx) = scheduler();
        s.park(info(1, 0), Wait::Hold, 1);
        s.park(info(2, 1), Wait::Delay(Duration::from_secs(60)), 2);
        s.park(info(3, 0), Wait::Delay(Duration::from_secs(60)), 3);
        assert_eq!(s.drain_queue(0), vec![1, 3]);
        assert_eq!(s.shutdown(), vec![2]);
        assert!(rx.try_recv().is_err());
    }
}
