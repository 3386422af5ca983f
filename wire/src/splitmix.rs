//! splitmix64: small, seeded, and the same sequence for the same seed on
//! every side, so that one `--seed` repeats a run: the media's jitter and
//! torn writes, the engine's random delays, the soak's fault plan, the
//! benchmark's offsets and the data pattern.

/// The golden-ratio step between states.
pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The generator's output for state `z`: the mixing half of splitmix64, for
/// a caller that keeps its state elsewhere (an atomic counter).
pub fn mix(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The number after `x`: the first output of a generator seeded with `x`,
/// used as a hash of `x`.
pub fn splitmix64(x: u64) -> u64 {
    mix(x.wrapping_add(GAMMA))
}

/// A number in `lo..=hi` from `draw` (`lo`, drawing nothing, when `hi <= lo`):
/// one rule for every generator that keeps its state its own way.
pub fn in_range(lo: u64, hi: u64, draw: impl FnOnce() -> u64) -> u64 {
    if hi <= lo {
        return lo;
    }
    match (hi - lo).checked_add(1) {
        Some(span) => lo + draw() % span,
        None => draw(),
    }
}

/// A generator: its state is the seed at first.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number in `[0, 1)`, from the top 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Heads or tails.
    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    /// A number in `lo..=hi` (`lo` when `hi <= lo`).
    pub fn in_range(&mut self, lo: u64, hi: u64) -> u64 {
        in_range(lo, hi, || self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_splitmix64() {
        // The first outputs for seed 0 in the reference implementation.
        let mut g = SplitMix64(0);
        assert_eq!(g.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(g.next_u64(), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn in_range_stays_in_range() {
        let mut g = SplitMix64(7);
        for _ in 0..1000 {
            assert!((10..=12).contains(&g.in_range(10, 12)));
        }
        assert_eq!(g.in_range(5, 5), 5);
        assert_eq!(g.in_range(6, 5), 6);
        let _ = g.in_range(0, u64::MAX);
    }
}
