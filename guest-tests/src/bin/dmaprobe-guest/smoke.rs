//! `smoke`: the raw disk has the size the host gave it, and data written to it
//! comes back, with O_DIRECT and through the page cache.
//!
//! Steps, each reported as a check:
//! 1. `geometry`: the disk's `/sys/block/NAME` size and logical block size match the
//!    parameters (when given). The queue limits that shape DMA are notes.
//! 2. O_DIRECT round trips at three places (the start of the disk, the middle at
//!    one block past a MiB boundary, the last blocks), of 512 B (when the block
//!    size is 512), 4 KiB, 64 KiB and 1 MiB, from two buffer placements:
//!    - `aligned`: the buffer starts on a page boundary;
//!    - `shifted`: with 512 B blocks the buffer starts 512 B past a page
//!      boundary, so any transfer of 4 KiB or more splits mid-page. With 4 KiB
//!      blocks the buffer cannot start mid-page (it must stay block-aligned), so
//!      it starts on a page and is one page longer than its `aligned` twin:
//!      even the 4 KiB case then spans two pages.
//!
//!    Each case writes its own pattern, reads it back into a second buffer at
//!    the same placement pre-filled with 0xee, and compares. The cases' ranges do
//!    not overlap, so every `wrote` event stays true until the host checks it.
//! 3. `buffered`: 256 KiB written through the page cache, fsync'd, then read
//!    back with O_DIRECT (past the cache) and compared.
//! 4. `flush`: fsync on the O_DIRECT descriptor succeeds.

use std::fmt;
use std::fs;

use wire::pattern::fill_pattern;

use crate::io::{check_pattern, AlignedBuf, Cache, Fd, PAGE, UNTOUCHED};
use crate::{Ctx, OrStop, Stop};

/// The disk's directory in sysfs (`/sys/block/vda`, `/sys/block/nvme0n1`).
fn sys() -> String {
    format!(
        "/sys/block/{}",
        crate::disk_path().trim_start_matches("/dev/")
    )
}

const MIB: u64 = 1 << 20;

/// Transfer sizes, with their labels.
const SIZES: &[(usize, &str)] = &[
    (512, "512"),
    (4096, "4k"),
    (64 << 10, "64k"),
    (1 << 20, "1m"),
];

/// Queue limits worth knowing when reading a DMA failure; reported as notes.
const QUEUE_NOTES: &[&str] = &[
    "dma_alignment",
    "max_segments",
    "max_segment_size",
    "max_hw_sectors_kb",
    "virt_boundary_mask",
    "physical_block_size",
];

/// The buffered write's length.
const BUFFERED_LEN: usize = 256 << 10;

pub fn run(ctx: &Ctx) -> Result<(), Stop> {
    let disk = ctx.disk()?;
    let (size, lbs) = geometry(ctx)?;
    let plan = Plan::new(ctx, size, lbs)?;
    let direct = Fd::open(disk, Cache::Direct).or_error()?;
    for case in &plan.cases {
        ctx.record(&case.name, direct_round_trip(ctx, &direct, case))?;
    }
    ctx.record(
        "buffered",
        buffered_round_trip(ctx, disk, &direct, &plan.buffered),
    )?;
    let flushed = direct.sync().or_fail();
    ctx.record(
        "flush",
        flushed.map(|()| format!("fsync on the O_DIRECT fd of {disk}")),
    )?;
    Ok(())
}

/// Checks the disk's size and logical block size against the parameters and
/// returns them as the guest sees them.
fn geometry(ctx: &Ctx) -> Result<(u64, usize), Stop> {
    let sectors = read_sys("size")?;
    let lbs = read_sys("queue/logical_block_size")?;
    let size = sectors
        .checked_mul(512)
        .ok_or_else(|| Stop::Error(format!("{}/size of {sectors} sectors overflows", sys())))?;
    let lbs_usize = usize::try_from(lbs)
        .ok()
        .filter(|&l| l.is_power_of_two() && (512..=PAGE).contains(&l))
        .ok_or_else(|| Stop::Error(format!("unexpected logical block size {lbs}")))?;

    let params = ctx.params();
    let mut wrong = Vec::new();
    if let Some(want) = params.disk_size.filter(|&want| want != size) {
        wrong.push(format!("size {size} B, want {want} B"));
    }
    if let Some(want) = params.lbs.filter(|&want| want != lbs) {
        wrong.push(format!("logical block size {lbs} B, want {want} B"));
    }
    let detail = if wrong.is_empty() {
        format!("size {size} B, logical block size {lbs} B")
    } else {
        format!("{}: {}", sys(), wrong.join("; "))
    };
    ctx.check("geometry", wrong.is_empty(), detail);

    for attr in QUEUE_NOTES {
        if let Ok(value) = fs::read_to_string(format!("{}/queue/{attr}", sys())) {
            ctx.note(&format!("queue/{attr}"), value.trim());
        }
    }
    Ok((size, lbs_usize))
}

fn read_sys(attr: &str) -> Result<u64, Stop> {
    let path = format!("{}/{attr}", sys());
    let text = fs::read_to_string(&path).map_err(|e| Stop::Error(format!("{path}: {e}")))?;
    text.trim()
        .parse()
        .map_err(|_| Stop::Error(format!("{path} holds {text:?}, not a number")))
}

#[derive(Clone, Copy, Debug)]
enum Region {
    Start,
    Middle,
    End,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Region::Start => "start",
            Region::Middle => "middle",
            Region::End => "end",
        })
    }
}

/// One range of the disk, its pattern, and where its buffers start in a page.
#[derive(Debug)]
struct Case {
    name: String,
    offset: u64,
    len: usize,
    shift: usize,
    seed: u64,
}

/// Where every step writes; no two ranges overlap.
#[derive(Debug)]
struct Plan {
    cases: Vec<Case>,
    buffered: Case,
}

impl Plan {
    fn new(ctx: &Ctx, disk_size: u64, lbs: usize) -> Result<Plan, Stop> {
        let lbs64 = lbs as u64;
        let mut cases = Vec::new();
        for region in [Region::Start, Region::Middle, Region::End] {
            // Start packs forward from byte 0; Middle forward from one block past
            // the MiB boundary nearest the middle (so page-unaligned with 512 B
            // blocks); End backward from the last byte.
            let mut cursor = match region {
                Region::Start => 0,
                Region::Middle => (disk_size / 2 / MIB) * MIB + lbs64,
                Region::End => disk_size,
            };
            for &(size, label) in SIZES.iter().filter(|&&(size, _)| size >= lbs) {
                for shifted in [false, true] {
                    let (shift, len, placement) = match (shifted, lbs < PAGE) {
                        (false, _) => (0, size, "aligned"),
                        (true, true) => (lbs, size, "shifted"),
                        (true, false) => (0, size + PAGE, "shifted"),
                    };
                    let offset = match region {
                        Region::Start | Region::Middle => cursor,
                        Region::End => cursor.checked_sub(len as u64).ok_or_else(too_small)?,
                    };
                    cursor = match region {
                        Region::Start | Region::Middle => offset + len as u64,
                        Region::End => offset,
                    };
                    let k = cases.len() as u64 + 1;
                    cases.push(Case {
                        name: format!("O_DIRECT {label} {region} {placement}"),
                        offset,
                        len,
                        shift,
                        seed: ctx.seed(k),
                    });
                }
            }
        }
        let buffered = Case {
            name: "buffered".to_owned(),
            offset: (disk_size / 4 / MIB) * MIB,
            len: BUFFERED_LEN,
            shift: 0,
            seed: ctx.seed(cases.len() as u64 + 1),
        };
        let plan = Plan { cases, buffered };
        plan.check_disjoint(disk_size)?;
        Ok(plan)
    }

    /// Every range lies on the disk and no two overlap (else a `wrote` would lie).
    fn check_disjoint(&self, disk_size: u64) -> Result<(), Stop> {
        let mut ranges: Vec<(u64, u64)> = self
            .cases
            .iter()
            .chain([&self.buffered])
            .map(|c| (c.offset, c.offset + c.len as u64))
            .collect();
        ranges.sort_unstable();
        let disjoint = ranges.windows(2).all(|w| w[0].1 <= w[1].0);
        let inside = ranges.last().is_some_and(|r| r.1 <= disk_size);
        if disjoint && inside {
            Ok(())
        } else {
            Err(too_small())
        }
    }
}

fn too_small() -> Stop {
    Stop::Error("disk too small for smoke's layout (want at least 16 MiB)".to_owned())
}

/// Writes a case's pattern with O_DIRECT and reads it back.
fn direct_round_trip(ctx: &Ctx, fd: &Fd, case: &Case) -> Result<String, Stop> {
    let mut buf = AlignedBuf::new(case.len, case.shift).or_error()?;
    fill_pattern(case.seed, case.offset, buf.as_mut_slice());
    fd.write_all_at(buf.as_slice(), case.offset).or_fail()?;
    ctx.wrote(case.offset, case.len, case.seed);
    read_back(fd, case)?;
    Ok(format!(
        "wrote and read back {} B at byte {}, buffers at page+{}",
        case.len, case.offset, case.shift
    ))
}

/// Writes a case's pattern through the page cache, fsyncs, and reads it back
/// with O_DIRECT on `direct`.
fn buffered_round_trip(ctx: &Ctx, disk: &str, direct: &Fd, case: &Case) -> Result<String, Stop> {
    let fd = Fd::open(disk, Cache::Buffered).or_error()?;
    let mut data = vec![0; case.len];
    fill_pattern(case.seed, case.offset, &mut data);
    fd.write_all_at(&data, case.offset).or_fail()?;
    fd.sync().or_fail()?;
    ctx.wrote(case.offset, case.len, case.seed);
    read_back(direct, case)?;
    Ok(format!(
        "wrote {} B at byte {} through the page cache, fsync, O_DIRECT read back",
        case.len, case.offset
    ))
}

/// Reads a case's range with O_DIRECT into a fresh buffer at the case's page
/// offset, pre-filled with [`UNTOUCHED`], and compares it with the pattern.
fn read_back(direct: &Fd, case: &Case) -> Result<(), Stop> {
    let mut buf = AlignedBuf::new(case.len, case.shift).or_error()?;
    buf.as_mut_slice().fill(UNTOUCHED);
    direct
        .read_exact_at(buf.as_mut_slice(), case.offset)
        .or_fail()?;
    check_pattern(case.seed, case.offset, buf.as_slice()).map_err(|m| {
        Stop::Fail(format!(
            "O_DIRECT read of {} B at byte {} (buffer at page+{}): {m}",
            case.len,
            case.offset,
            buf.shift()
        ))
    })
}
