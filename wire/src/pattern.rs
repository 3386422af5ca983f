//! The data pattern: bytes that depend on a seed and their place on the
//! disk or in a file, so that the guest, the host's checks and the tests
//! can each tell misplaced data from stale data without sharing a buffer.

use crate::splitmix::splitmix64;

/// The pattern word `word` (the 8 bytes at byte `word * 8`) for `seed`. The seed is
/// mixed first, so patterns of nearby seeds are unrelated, not shifted copies.
fn pattern_word(seed: u64, word: u64) -> [u8; 8] {
    splitmix64(splitmix64(seed) ^ word).to_le_bytes()
}

/// The pattern byte at absolute byte `offset` for `seed`. Every 8-byte word of a
/// disk or file gets its own value, so misplaced data is caught, not only stale data.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    pattern_word(seed, offset >> 3)[(offset & 7) as usize]
}

/// Fills `buf` with the pattern of the bytes at `offset..offset + buf.len()`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut at = offset;
    let mut rest = buf;
    while !rest.is_empty() {
        let word = pattern_word(seed, at >> 3);
        let skip = (at & 7) as usize;
        let n = (8 - skip).min(rest.len());
        rest[..n].copy_from_slice(&word[skip..skip + n]);
        rest = &mut rest[n..];
        at += n as u64;
    }
}

/// The index of the first byte of `buf` that differs from the pattern, if any.
pub fn pattern_mismatch(seed: u64, offset: u64, buf: &[u8]) -> Option<usize> {
    let mut at = offset;
    let mut done = 0usize;
    while done < buf.len() {
        let word = pattern_word(seed, at >> 3);
        let skip = (at & 7) as usize;
        let n = (8 - skip).min(buf.len() - done);
        if buf[done..done + n] != word[skip..skip + n] {
            let i = (0..n)
                .find(|&i| buf[done + i] != word[skip + i])
                .unwrap_or(0);
            return Some(done + i);
        }
        done += n;
        at += n as u64;
    }
    None
}

/// `len` bytes of the pattern of `seed` from offset 0: a recognisable
/// buffer for a test.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    fill_pattern(seed, 0, &mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_dependent() {
        let mut a = vec![0u8; 64];
        fill_pattern(1, 512, &mut a);
        assert_eq!(pattern_mismatch(1, 512, &a), None);
        assert_eq!(pattern_mismatch(2, 512, &a), Some(0));
        // The same bytes one word later do not match.
        assert!(pattern_mismatch(1, 520, &a).is_some());
        // A pattern read from the middle matches its own offset.
        assert_eq!(pattern_mismatch(1, 520, &a[8..]), None);
        let mut b = a.clone();
        b[37] ^= 1;
        assert_eq!(pattern_mismatch(1, 512, &b), Some(37));
        // Word-wise and byte-wise agree at any alignment.
        let mut c = vec![0u8; 29];
        fill_pattern(9, 1003, &mut c);
        for (i, &byte) in c.iter().enumerate() {
            assert_eq!(byte, pattern_byte(9, 1003 + i as u64));
        }
        assert_eq!(pattern_mismatch(9, 1003, &c), None);
        c[28] ^= 0xff;
        assert_eq!(pattern_mismatch(9, 1003, &c), Some(28));
    }
}
