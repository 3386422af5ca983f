//! A small seeded generator, so that a run with random delays can be repeated.

use std::sync::atomic::{AtomicU64, Ordering};

use wire::splitmix::{mix, GAMMA};

/// splitmix64 ([`wire::splitmix`]) over an atomic counter: lock-free and reproducible for a given
/// seed and order of calls.
#[derive(Debug)]
pub struct SeededRng {
    state: AtomicU64,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng {
            state: AtomicU64::new(seed),
        }
    }

    pub fn next_u64(&self) -> u64 {
        let z = self
            .state
            .fetch_add(GAMMA, Ordering::Relaxed)
            .wrapping_add(GAMMA);
        mix(z)
    }

    /// A value in `lo..=hi`.
    pub fn in_range(&self, lo: u64, hi: u64) -> u64 {
        wire::splitmix::in_range(lo, hi, || self.next_u64())
    }

    /// True with probability `p` (0.0..=1.0).
    pub fn chance(&self, p: f64) -> bool {
        // 53 random bits as a fraction in [0, 1).
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let a = SeededRng::new(7);
        let b = SeededRng::new(7);
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs[0], SeededRng::new(8).next_u64());
    }

    #[test]
    fn ranges_and_chances() {
        let r = SeededRng::new(1);
        for _ in 0..1000 {
            let v = r.in_range(10, 20);
            assert!((10..=20).contains(&v));
        }
        assert_eq!(r.in_range(5, 5), 5);
        let hits = (0..10_000).filter(|_| r.chance(0.25)).count();
        assert!((2000..3000).contains(&hits), "{hits}");
        assert!(!(0..100).any(|_| r.chance(0.0)));
        assert!((0..100).all(|_| r.chance(1.0)));
    }
}
