//! The namespace against a reference model of what a drive promises: any
//! sequence of writes, discards, write-zeroes, flushes and power cuts leaves
//! the media equal to what was made stable, block for block.
//!
//! Two properties:
//! - with a cache that never fills, the media after a clean power cut is
//!   exactly the stable image (what the last flush saw);
//! - with a small cache (destaging) and torn cuts, each block after a cut
//!   holds one of the contents it had since the last flush — never anything
//!   else, never data of another block.

use nvme_model::{Backing, Deallocate, Geometry, Lba, LbaSize, Namespace};
use proptest::prelude::*;

const BS: usize = 512;
const BLOCKS: u64 = 64;

#[derive(Clone, Debug)]
enum Cmd {
    /// Blocks from `lba`, filled with `byte` (each block also stamped with its
    /// number, so a block's data written elsewhere would show).
    Write {
        lba: u64,
        blocks: u64,
        byte: u8,
    },
    Discard {
        lba: u64,
        blocks: u64,
    },
    WriteZeroes {
        lba: u64,
        blocks: u64,
    },
    Flush,
    PowerCut {
        torn: Option<u64>,
    },
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let range = (0..BLOCKS).prop_flat_map(|lba| (Just(lba), 1..=(BLOCKS - lba).min(24)));
    prop_oneof![
        6 => (range.clone(), 1u8..=255).prop_map(|((lba, blocks), byte)| Cmd::Write { lba, blocks, byte }),
        1 => range.clone().prop_map(|(lba, blocks)| Cmd::Discard { lba, blocks }),
        1 => range.prop_map(|(lba, blocks)| Cmd::WriteZeroes { lba, blocks }),
        2 => Just(Cmd::Flush),
        1 => proptest::option::of(any::<u64>()).prop_map(|torn| Cmd::PowerCut { torn }),
    ]
}

fn block_data(lba: u64, byte: u8) -> Vec<u8> {
    let mut b = vec![byte; BS];
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b
}

/// Discards deallocate whole aligned units of this many blocks.
const GRANULE: u64 = 4;

fn namespace(cache_bytes: u64) -> Namespace {
    Namespace::new(
        Backing::memory(BLOCKS * BS as u64).unwrap(),
        LbaSize::B512,
        false,
    )
    .unwrap()
    .with_write_cache(cache_bytes)
    .with_deallocate(Deallocate::Zeroes)
    .with_geometry(Geometry {
        discard_granularity: GRANULE * BS as u64,
        ..Geometry::default_for(LbaSize::B512)
    })
    .unwrap()
}

fn media(ns: &Namespace) -> Vec<Vec<u8>> {
    let mut all = vec![0u8; BLOCKS as usize * BS];
    ns.read(ns.check_range(Lba(0), BLOCKS).unwrap(), &mut all)
        .unwrap();
    all.chunks(BS).map(<[u8]>::to_vec).collect()
}

/// Runs `cmds`; calls `check` after every power cut with the media and, per
/// block, every content it had since the last flush (the stable one first).
fn run(ns: &Namespace, cmds: &[Cmd], mut check: impl FnMut(&[Vec<u8>], &[Vec<Vec<u8>>])) {
    let zero = vec![0u8; BS];
    let mut versions: Vec<Vec<Vec<u8>>> = vec![vec![zero.clone()]; BLOCKS as usize];
    let mut current: Vec<Vec<u8>> = vec![zero.clone(); BLOCKS as usize];
    fn set(versions: &mut [Vec<Vec<u8>>], current: &mut [Vec<u8>], lba: u64, data: Vec<u8>) {
        current[lba as usize] = data.clone();
        versions[lba as usize].push(data);
    }
    for c in cmds {
        match *c {
            Cmd::Write { lba, blocks, byte } => {
                let data: Vec<u8> = (lba..lba + blocks)
                    .flat_map(|b| block_data(b, byte))
                    .collect();
                ns.write(ns.check_range(Lba(lba), blocks).unwrap(), &data)
                    .unwrap();
                for b in lba..lba + blocks {
                    set(&mut versions, &mut current, b, block_data(b, byte));
                }
            }
            Cmd::Discard { lba, blocks } => {
                ns.deallocate(ns.check_range(Lba(lba), blocks).unwrap())
                    .unwrap();
                let from = lba.div_ceil(GRANULE) * GRANULE;
                let to = (lba + blocks) / GRANULE * GRANULE;
                for b in from..to.max(from) {
                    set(&mut versions, &mut current, b, zero.clone());
                }
            }
            Cmd::WriteZeroes { lba, blocks } => {
                ns.write_zeroes(ns.check_range(Lba(lba), blocks).unwrap())
                    .unwrap();
                for b in lba..lba + blocks {
                    set(&mut versions, &mut current, b, zero.clone());
                }
            }
            Cmd::Flush => {
                ns.flush().unwrap();
                for (v, now) in versions.iter_mut().zip(&current) {
                    *v = vec![now.clone()];
                }
            }
            Cmd::PowerCut { torn } => {
                ns.power_cut(torn).unwrap();
                let after = media(ns);
                check(&after, &versions);
                for (b, v) in versions.iter_mut().enumerate() {
                    *v = vec![after[b].clone()];
                }
                current.clone_from(&after);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_clean_cut_leaves_exactly_what_was_stable(cmds in prop::collection::vec(cmd(), 1..60)) {
        // Twice the disk: the cache never fills, so nothing is made stable but
        // by a flush; torn cuts are made clean here.
        let cmds: Vec<Cmd> = cmds
            .into_iter()
            .map(|c| match c {
                Cmd::PowerCut { .. } => Cmd::PowerCut { torn: None },
                other => other,
            })
            .collect();
        let ns = namespace(2 * BLOCKS * BS as u64);
        let mut failure = None;
        run(&ns, &cmds, |after, versions| {
            for (b, v) in versions.iter().enumerate() {
                if after[b] != v[0] && failure.is_none() {
                    failure = Some(format!("block {b} is not its stable contents"));
                }
            }
        });
        prop_assert!(failure.is_none(), "{:?}", failure);
    }

    #[test]
    fn any_cut_leaves_each_block_as_it_was_at_some_point(cmds in prop::collection::vec(cmd(), 1..80)) {
        // A cache of 4 KiB (8 blocks): writes destage all the time.
        let ns = namespace(4096);
        let mut failure = None;
        run(&ns, &cmds, |after, versions| {
            for (b, v) in versions.iter().enumerate() {
                if !v.contains(&after[b]) && failure.is_none() {
                    failure = Some(format!("block {b} holds data it never had since the last flush"));
                }
            }
        });
        prop_assert!(failure.is_none(), "{:?}", failure);
    }
}

proptest! {
    #[test]
    fn the_bounds_check_admits_exactly_the_ranges_inside(
        size_blocks in 1u64..4096,
        start in prop_oneof![0u64..5000, Just(u64::MAX), (u64::MAX - 5000)..=u64::MAX],
        blocks in prop_oneof![0u64..5000, Just(u64::MAX), (u64::MAX - 5000)..=u64::MAX],
        big in any::<bool>(),
    ) {
        let lbs = if big { LbaSize::B4096 } else { LbaSize::B512 };
        let ns = Namespace::new(
            Backing::memory(size_blocks * lbs.bytes()).unwrap(),
            lbs,
            false,
        )
        .unwrap();
        let inside = start.checked_add(blocks).is_some_and(|end| end <= size_blocks);
        match ns.check_range(Lba(start), blocks) {
            Ok(r) => {
                prop_assert!(inside);
                prop_assert_eq!(r.offset().0, start * lbs.bytes());
                prop_assert_eq!(r.len(), blocks * lbs.bytes());
                prop_assert!(r.offset().0 + r.len() <= ns.capacity_bytes());
            }
            Err(_) => prop_assert!(!inside),
        }
    }
}
