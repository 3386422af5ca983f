//! The soak: the suite's heaviest I/O at once for a configured time, under
//! fault rules drawn from the run's seed, with the daemon's memory and open
//! descriptors sampled throughout.
//!
//! - [`fault_plan`]: the rules (and media latency) a seed gives. Every rule is
//!   one a correct kernel running the soak's workload must get through without
//!   a device finding: delays, watches, and errors only on the pinning loops'
//!   own reads, which expect them. The guest computes the same plan from the
//!   same seed, to know how long its reads may wait and whether they may fail.
//!
//! The workload itself is the guest's (`src/bin/dmaprobe-guest/soak.rs`); the
//! runner samples the daemon while it runs and judges the samples
//! (`run/sampler.rs`).

use wire::splitmix::SplitMix64;

/// How long the soak runs unless `--soak-seconds` says otherwise.
pub const DEFAULT_SECONDS: u64 = 180;

/// What the pinning loops read at a time, and so what the plan's rules for
/// them match (`size=512`): nothing else in the soak reads 512 B (ext4 reads
/// whole 4 KiB blocks, fio at least 4 KiB, the mailbox never meets a rule).
pub const PIN_READ_LEN: u64 = 512;

/// The fault rules and media latency of a soak, drawn from a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    pub seed: u64,
    /// `--fault` rules, in the order given (a request gets the first wait,
    /// watch and effect of the rules that fire on it).
    pub rules: Vec<String>,
    /// The `--latency` preset.
    pub latency: &'static str,
    /// How long the pin-window rule delays the pinning loops' reads, in ms
    /// (at least [`MIN_PIN_DELAY_MS`]): the loops fork within the first half.
    pub pin_delay_ms: (u64, u64),
    /// Whether the pinning loops' reads may fail (an `error` or `partial`
    /// rule matches them).
    pub pin_errors: bool,
}

/// The shortest delay the pin-window rule gives: long enough for the guest
/// to see the read waiting (a mailbox round trip), fork (about 50 ms under
/// TCG while the soak runs) and see it waiting still.
pub const MIN_PIN_DELAY_MS: u64 = 50;

/// The rules beyond the two every plan has, one of each at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extra {
    /// Any read, rarely, a little.
    ReadDelay,
    /// Any write (O_DIRECT, writeback, journal), rarely, a little: the write's
    /// source must not change while it waits (`--snapshot`).
    WriteDelay,
    /// Every few flushes: fsync waits.
    FlushDelay,
    /// Anything on one queue, rarely.
    QueueDelay,
    /// The pinning loops' reads fail now and then (EIO), which they expect;
    /// nothing else sees an error, so ext4 never does.
    PinError,
}

const EXTRAS: [Extra; 5] = [
    Extra::ReadDelay,
    Extra::WriteDelay,
    Extra::FlushDelay,
    Extra::QueueDelay,
    Extra::PinError,
];

/// The media latency presets a plan chooses from.
const LATENCIES: [&str; 3] = ["instant", "nvme", "sata"];

/// The soak's plan for `seed`: 3 to 6 rules, the same for the same seed.
///
/// Always: a delay of [`MIN_PIN_DELAY_MS`]..250 ms on (most of) the pinning
/// loops' reads, which opens the window in which they fork and write, and a
/// watch of those reads after completion (a kernel that let the read land in
/// a page it then freed shows as `data-vanished-after-completion`). Then one
/// to four of: rare short delays of reads, of writes, of one queue, delays of
/// flushes, errors on the pinning reads. Never a hold (nobody releases it),
/// never corrupt, torn, power-cut or the broken-device actions: a correct
/// kernel would rightly fail under those. Errors stay off ext4's metadata and
/// fio's data, which would (rightly) give up on EIO.
pub fn fault_plan(seed: u64) -> FaultPlan {
    let mut rng = SplitMix64(seed ^ 0x50a4_c0de);
    let lo = rng.in_range(MIN_PIN_DELAY_MS, 2 * MIN_PIN_DELAY_MS);
    let hi = lo + rng.in_range(50, 150);
    let select = if rng.coin() {
        format!("every={}", rng.in_range(1, 2))
    } else {
        format!("prob={}", rounded(0.5 + rng.unit() / 2.0, 100.0))
    };
    let mut rules = vec![
        format!("op=read,size={PIN_READ_LEN},{select},action=delay,ms={lo}-{hi}"),
        format!(
            "op=read,size={PIN_READ_LEN},action=watch,ms={}",
            rng.in_range(20, 200)
        ),
    ];
    let mut extras = EXTRAS.to_vec();
    // Fisher-Yates, then the first one to four.
    for i in (1..extras.len()).rev() {
        let j = rng.in_range(0, i as u64) as usize;
        extras.swap(i, j);
    }
    let take = rng.in_range(1, 4) as usize;
    let chosen = &extras[..take];
    rules.extend(chosen.iter().map(|&extra| extra_rule(extra, &mut rng)));
    let pin_errors = chosen.contains(&Extra::PinError);
    let latency = LATENCIES[rng.in_range(0, LATENCIES.len() as u64 - 1) as usize];
    FaultPlan {
        seed,
        rules,
        latency,
        pin_delay_ms: (lo, hi),
        pin_errors,
    }
}

/// The rule of one of the plan's extras, its figures drawn from `rng`.
fn extra_rule(extra: Extra, rng: &mut SplitMix64) -> String {
    fn prob(rng: &mut SplitMix64, lo: f64, hi: f64) -> f64 {
        rounded(lo + rng.unit() * (hi - lo), 1000.0)
    }
    match extra {
        Extra::ReadDelay | Extra::WriteDelay => {
            let op = if extra == Extra::ReadDelay {
                "read"
            } else {
                "write"
            };
            let p = prob(rng, 0.002, 0.02);
            let a = rng.in_range(1, 5);
            format!(
                "op={op},prob={p},action=delay,ms={a}-{}",
                a + rng.in_range(5, 25)
            )
        }
        Extra::FlushDelay => {
            let a = rng.in_range(5, 20);
            format!(
                "op=flush,every={},action=delay,ms={a}-{}",
                rng.in_range(2, 8),
                a + rng.in_range(5, 30)
            )
        }
        Extra::QueueDelay => {
            let p = prob(rng, 0.002, 0.01);
            let a = rng.in_range(1, 5);
            format!(
                "queue={},prob={p},action=delay,ms={a}-{}",
                rng.in_range(0, 1),
                a + rng.in_range(5, 15)
            )
        }
        Extra::PinError => {
            let p = prob(rng, 0.01, 0.05);
            let effect = if rng.coin() {
                "action=error,status=ioerr".to_owned()
            } else {
                format!("action=partial,bytes={}", PIN_READ_LEN / 2)
            };
            format!("op=read,size={PIN_READ_LEN},prob={p},{effect}")
        }
    }
}

/// `x` to the nearest `1 / per`, so that it prints short, as the rule
/// parser prints it back.
fn rounded(x: f64, per: f64) -> f64 {
    (x * per).round() / per
}

impl FaultPlan {
    /// The `dmaprobe serve` arguments: the seed of its probabilities, the
    /// latency preset, the rules.
    pub fn serve_args(&self) -> Vec<String> {
        let mut args = vec![
            "--seed".to_owned(),
            self.seed.to_string(),
            "--latency".to_owned(),
            self.latency.to_owned(),
        ];
        for rule in &self.rules {
            args.push("--fault".to_owned());
            args.push(rule.clone());
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_plan() {
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(fault_plan(seed), fault_plan(seed));
        }
        let distinct: std::collections::HashSet<Vec<String>> =
            (0..20).map(|s| fault_plan(s).rules).collect();
        assert!(distinct.len() >= 15, "{distinct:?}");
    }

    #[test]
    fn every_rule_parses_and_is_one_a_correct_kernel_survives() {
        use dma::fault::{Action, Effect};
        let mut pin_errors = 0;
        let mut sizes = std::collections::HashSet::new();
        for seed in 0..500 {
            let plan = fault_plan(seed);
            assert!((3..=6).contains(&plan.rules.len()), "{plan:?}");
            sizes.insert(plan.rules.len());
            assert!(nvme_model::LatencySpec::preset(plan.latency).is_some());
            let (lo, hi) = plan.pin_delay_ms;
            assert!(lo >= MIN_PIN_DELAY_MS && hi > lo, "{plan:?}");
            let mut errors = false;
            for (i, line) in plan.rules.iter().enumerate() {
                let rule = dma::RuleSpec::parse(line)
                    .unwrap_or_else(|e| panic!("seed {seed}: {line:?}: {e}"));
                // It prints back as written: what the report shows is what runs.
                assert_eq!(&rule.to_string(), line);
                let pin_read = rule.op == Some(dma::Op::Read)
                    && rule.size == Some((PIN_READ_LEN, PIN_READ_LEN));
                match rule.action {
                    // The pin window is long, other delays short: nothing
                    // waits long enough to trouble a kernel's timeouts.
                    Action::Delay { min_ms, max_ms } if i == 0 => {
                        assert!(pin_read && max_ms <= 250, "{line}");
                        assert_eq!((min_ms, max_ms), plan.pin_delay_ms);
                    }
                    Action::Delay { max_ms, .. } => assert!(max_ms <= 100, "{line}"),
                    Action::Watch { ms } => assert!(pin_read && ms <= 200, "{line}"),
                    Action::Effect(Effect::Error { unsupp: false })
                    | Action::Effect(Effect::Partial { .. }) => {
                        assert!(pin_read, "an error off the pinning reads: {line}");
                        errors = true;
                    }
                    other => panic!("seed {seed}: {line} ({other:?}) is not survivable"),
                }
                assert_eq!(rule.count, None);
                assert_eq!(rule.lba, None);
            }
            assert_eq!(errors, plan.pin_errors, "{plan:?}");
            pin_errors += usize::from(errors);
            let args = plan.serve_args();
            assert_eq!(
                args.iter().filter(|a| *a == "--fault").count(),
                plan.rules.len()
            );
            assert_eq!(args[..2], ["--seed".to_owned(), seed.to_string()]);
        }
        // Every size of plan occurs, and errors in some plans, not all.
        assert_eq!(sizes.len(), 4, "{sizes:?}");
        assert!((50..450).contains(&pin_errors), "{pin_errors}");
    }
}
