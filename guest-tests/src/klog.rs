//! The kernel log: what in it counts against a test.

/// Kernel log lines that mean the kernel found something wrong.
pub const ERROR_PATTERNS: [&str; 7] = [
    "BUG:",
    "WARNING:",
    "Bad page state",
    "pagealloc: memory corruption",
    "Oops",
    "Kernel panic",
    "general protection fault",
];

/// The lines of `console` that match an error pattern.
pub fn errors(console: &[String]) -> Vec<String> {
    console
        .iter()
        .filter(|l| ERROR_PATTERNS.iter().any(|p| l.contains(p)))
        .map(|l| l.trim_end().to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_errors_only() {
        let console: Vec<String> = [
            "[    0.1] Linux version 6.12",
            "[    2.0] BUG: Bad page state in process dmaprobe-guest  pfn:1234",
            "[    2.1] WARNING: CPU: 0 PID: 1 at mm/gup.c:123",
            "[    2.2] virtio_blk virtio0: [vda] 524288 512-byte logical blocks",
        ]
        .map(String::from)
        .to_vec();
        let e = errors(&console);
        assert_eq!(e.len(), 2);
        assert!(e[0].contains("Bad page state"));
    }
}
