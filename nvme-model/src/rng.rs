//! splitmix64: small, seeded, and the same sequence for the same seed — for
//! the latency model's jitter and a torn power cut's tear points.

#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let x = self.0;
        let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A value in `-span..=span`.
    pub(crate) fn within(&mut self, span: i64) -> i64 {
        let width = span.unsigned_abs() * 2 + 1;
        let offset = i64::try_from(self.below(width)).unwrap_or(0);
        offset - span.abs()
    }
}
