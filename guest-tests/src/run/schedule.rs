//! Running a run's cases several at once (`--jobs`), each on a thread of its
//! own, while what they say reaches the caller's thread in the order said.

use std::sync::mpsc;

/// What one job needs of the host's memory at most: the guest's 512 MiB,
/// QEMU's own, the daemon's, and the test's disk in the temporary directory.
const MEMORY_PER_JOB: u64 = 1 << 30;

/// How many jobs this machine runs at once by default, and why: one per
/// core, as far as the memory available gives each [`MEMORY_PER_JOB`].
pub fn default_jobs() -> (usize, String) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_available(&m));
    match available {
        Some(bytes) => {
            let by_memory = (bytes / MEMORY_PER_JOB) as usize;
            let jobs = cores.min(by_memory).max(1);
            let why = format!(
                "{cores} core(s), {:.1} GiB of memory available at 1 GiB a job",
                bytes as f64 / (1u64 << 30) as f64
            );
            (jobs, why)
        }
        None => (cores, format!("{cores} core(s)")),
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What a case's thread tells the caller's.
enum Message<T> {
    Said(String),
    Done(usize, T),
}

/// Where a case's thread says what it does; the caller hears it.
pub(super) struct Voice<'a, T>(&'a mpsc::Sender<Message<T>>);

impl<T> Voice<'_, T> {
    pub(super) fn say(&self, line: &str) {
        // The caller hears until every case is done; a send fails only
        // once it has stopped listening, and then nobody is left to tell.
        let _ = self.0.send(Message::Said(line.to_owned()));
    }
}

/// Runs `work(i)` for `i` in `0..count`, in that order, at most `jobs` at
/// once; a case for which `alone(i)` holds runs with no other beside it.
/// No case starts once `stop()` holds; those started are waited for.
/// Everything a case says reaches `hear` on this thread. The results, by
/// case; `None` for a case never started.
pub(super) fn run_cases<T: Send>(
    count: usize,
    jobs: usize,
    alone: &(dyn Fn(usize) -> bool + Sync),
    stop: &dyn Fn() -> bool,
    work: &(dyn Fn(usize, &Voice<T>) -> T + Sync),
    hear: &mut dyn FnMut(&str),
) -> Vec<Option<T>> {
    let mut results: Vec<Option<T>> = (0..count).map(|_| None).collect();
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let (mut next, mut running, mut alone_running) = (0, 0, false);
        loop {
            while next < count && running < jobs.max(1) && !alone_running && !stop() {
                if alone(next) {
                    if running > 0 {
                        break;
                    }
                    alone_running = true;
                }
                let (i, tx) = (next, tx.clone());
                scope.spawn(move || {
                    let result = work(i, &Voice(&tx));
                    let _ = tx.send(Message::Done(i, result));
                });
                running += 1;
                next += 1;
            }
            if running == 0 {
                break;
            }
            // Every running case's thread holds a sender: this ends only
            // with a message.
            match rx.recv() {
                Ok(Message::Said(line)) => hear(&line),
                Ok(Message::Done(i, result)) => {
                    results[i] = Some(result);
                    running -= 1;
                    alone_running &= !alone(i);
                }
                Err(_) => break,
            }
        }
    });
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// Runs `count` cases at `jobs`, each sleeping a little; the results,
    /// what was heard, and the most cases that ran at once beside an alone
    /// one and overall.
    fn run(count: usize, jobs: usize, alone: &[usize]) -> (Vec<Option<usize>>, Vec<String>, usize) {
        let now = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let crowded_alone = Mutex::new(Vec::new());
        let work = |i: usize, voice: &Voice<usize>| {
            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(n, Ordering::SeqCst);
            voice.say(&format!("{i} started"));
            std::thread::sleep(Duration::from_millis(20));
            if alone.contains(&i) && now.load(Ordering::SeqCst) != 1 {
                crowded_alone.lock().unwrap().push(i);
            }
            voice.say(&format!("{i} ended"));
            now.fetch_sub(1, Ordering::SeqCst);
            i * 10
        };
        let mut heard = Vec::new();
        let results = run_cases(
            count,
            jobs,
            &|i| alone.contains(&i),
            &|| false,
            &work,
            &mut |l| heard.push(l.to_owned()),
        );
        assert!(crowded_alone.into_inner().unwrap().is_empty());
        (results, heard, most.into_inner())
    }

    #[test]
    fn every_case_runs_once_with_its_result_in_its_place() {
        for jobs in [1, 2, 5] {
            let (results, heard, most) = run(7, jobs, &[]);
            let want: Vec<Option<usize>> = (0..7).map(|i| Some(i * 10)).collect();
            assert_eq!(results, want);
            assert_eq!(heard.len(), 14);
            assert!(most <= jobs, "{most} ran at once at --jobs {jobs}");
        }
    }

    #[test]
    fn one_job_runs_the_cases_in_order_one_after_another() {
        let (_, heard, most) = run(3, 1, &[]);
        assert_eq!(most, 1);
        let order = [
            "0 started",
            "0 ended",
            "1 started",
            "1 ended",
            "2 started",
            "2 ended",
        ];
        assert_eq!(heard, order);
    }

    #[test]
    fn a_case_that_measures_time_runs_alone() {
        let (results, _, most) = run(6, 3, &[2, 3]);
        assert!(results.iter().all(Option::is_some));
        assert!(most >= 2, "the others still ran together");
    }

    #[test]
    fn memory_available_is_read_in_bytes() {
        let meminfo = "MemTotal:       24000000 kB\nMemAvailable:    3145728 kB\n";
        assert_eq!(mem_available(meminfo), Some(3 << 30));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn no_case_starts_after_a_stop() {
        let started = AtomicUsize::new(0);
        let work = |_: usize, _: &Voice<()>| {
            started.fetch_add(1, Ordering::SeqCst);
        };
        let stop = || started.load(Ordering::SeqCst) >= 2;
        let results = run_cases(5, 1, &|_| false, &stop, &work, &mut |_| {});
        assert_eq!(results.iter().filter(|r| r.is_some()).count(), 2);
    }
}
