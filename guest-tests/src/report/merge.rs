//! The reports of a run's shards (`dmaprobe run --shard I/N --json`, one per
//! job of a CI matrix) joined into the report of the whole run, once they are
//! shown to be the shards of one run, each once, with one result for every
//! case of it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::Matrix;
use crate::run::{Case, Shard, TestResult};

/// Why reports cannot be merged; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("No reports to merge")]
    NoReports,
    #[error("Cannot read {0} as a report of `dmaprobe run --json`")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error(
        "{file}'s matrix (shard {shard}, {cases} cases{}) is not one `dmaprobe run --json` writes",
        repeated.as_ref().map_or(String::new(), |c| format!(", {} twice", name(c)))
    )]
    BadMatrix {
        file: PathBuf,
        shard: Shard,
        cases: usize,
        /// A case its matrix lists twice.
        repeated: Option<Case>,
    },
    #[error(
        "{file} and {first} are shards of different runs ({difference}): merge the \
         shards of one run (the same --kernel, --transport and --tests, and the same \
         N in --shard I/N)"
    )]
    OtherRun {
        first: PathBuf,
        file: PathBuf,
        /// The first way the second's matrix differs from the first's.
        difference: String,
    },
    #[error("{first} and {second} are both shard {shard}: give each shard's report once")]
    SameShard {
        first: PathBuf,
        second: PathBuf,
        shard: Shard,
    },
    #[error(
        "{file} has a result for {}, which its matrix does not list: run shard {shard} again",
        name(case)
    )]
    NotInMatrix {
        file: PathBuf,
        shard: Shard,
        case: Case,
    },
    #[error(
        "Two results for {}, in {first} and in {second} (it is shard {shard}'s): merge \
         each shard's report once, as `dmaprobe run --shard I/N --json` wrote it",
        name(case)
    )]
    TwoResults {
        case: Case,
        first: PathBuf,
        second: PathBuf,
        /// The shard that runs the case.
        shard: Shard,
    },
    #[error("{}", missing(.0))]
    Missing(Vec<Gap>),
}

/// The cases of one shard that have no result, and the report of that shard
/// if one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub shard: Shard,
    pub report: Option<PathBuf>,
    pub cases: Vec<Case>,
}

/// What merge reads of a report ([`super::json`] writes it).
#[derive(Deserialize)]
struct Report {
    matrix: Matrix,
    results: Vec<TestResult>,
}

/// The reports (each file's name, for errors, and its JSON) of a run's shards
/// joined: every result in the matrix's order, and the matrix as the whole
/// run's (shard 1/1), so that [`json`](super::json) of them is what one
/// unsharded run writes.
pub fn merge(reports: &[(PathBuf, String)]) -> Result<(Vec<TestResult>, Matrix), MergeError> {
    let reports: Vec<(&Path, Report)> = reports
        .iter()
        .map(|(file, text)| match serde_json::from_str(text) {
            Ok(report) => Ok((file.as_path(), report)),
            Err(e) => Err(MergeError::Parse(file.clone(), e)),
        })
        .collect::<Result<_, _>>()?;
    let (first, run) = reports.first().ok_or(MergeError::NoReports)?;
    let shards = shards(first, &run.matrix, &reports)?;
    let cases = &run.matrix.cases;
    let count = run.matrix.shard.count;
    let numbers: HashMap<&Case, usize> = cases.iter().enumerate().map(|(c, k)| (k, c)).collect();
    let mut found: Vec<Option<(&Path, &TestResult)>> = vec![None; cases.len()];
    for (file, report) in &reports {
        for result in &report.results {
            let case = Case {
                kernel: result.kernel.clone(),
                test: result.test.clone(),
            };
            let Some(&c) = numbers.get(&case) else {
                return Err(MergeError::NotInMatrix {
                    file: file.to_path_buf(),
                    shard: report.matrix.shard,
                    case,
                });
            };
            if let Some((earlier, _)) = found[c] {
                return Err(MergeError::TwoResults {
                    case,
                    first: earlier.to_path_buf(),
                    second: file.to_path_buf(),
                    shard: shard_of(c, count),
                });
            }
            found[c] = Some((file, result));
        }
    }
    let mut gaps: BTreeMap<u32, Gap> = BTreeMap::new();
    for (c, _) in found.iter().enumerate().filter(|(_, f)| f.is_none()) {
        let shard = shard_of(c, count);
        gaps.entry(shard.index)
            .or_insert_with(|| Gap {
                shard,
                report: shards.get(&shard.index).map(|f| f.to_path_buf()),
                cases: Vec::new(),
            })
            .cases
            .push(cases[c].clone());
    }
    if !gaps.is_empty() {
        return Err(MergeError::Missing(gaps.into_values().collect()));
    }
    let results = found
        .into_iter()
        .flatten()
        .map(|(_, r)| r.clone())
        .collect();
    let matrix = Matrix {
        shard: Shard::ALL,
        cases: cases.clone(),
    };
    Ok((results, matrix))
}

/// Each report's file by its shard index, once each report is shown to be a
/// shard of the run `first`'s `matrix` describes.
fn shards<'a>(
    first: &Path,
    matrix: &Matrix,
    reports: &[(&'a Path, Report)],
) -> Result<HashMap<u32, &'a Path>, MergeError> {
    let mut shards: HashMap<u32, &Path> = HashMap::new();
    for &(file, ref report) in reports {
        let theirs = &report.matrix;
        let mut seen = HashSet::new();
        let repeated = theirs.cases.iter().find(|&c| !seen.insert(c));
        let shard = theirs.shard;
        if shard.index == 0 || shard.index > shard.count || repeated.is_some() {
            return Err(MergeError::BadMatrix {
                file: file.to_path_buf(),
                shard,
                cases: theirs.cases.len(),
                repeated: repeated.cloned(),
            });
        }
        if let Some(difference) = difference(matrix, theirs) {
            return Err(MergeError::OtherRun {
                first: first.to_path_buf(),
                file: file.to_path_buf(),
                difference,
            });
        }
        if let Some(earlier) = shards.insert(shard.index, file) {
            return Err(MergeError::SameShard {
                first: earlier.to_path_buf(),
                second: file.to_path_buf(),
                shard,
            });
        }
    }
    Ok(shards)
}

/// How `theirs` is not a shard of the run `first` is of, if it is not: the
/// number of shards, the number of cases, or the first case that differs.
fn difference(first: &Matrix, theirs: &Matrix) -> Option<String> {
    if theirs.shard.count != first.shard.count {
        return Some(format!(
            "{} shards against {}",
            theirs.shard.count, first.shard.count
        ));
    }
    if theirs.cases.len() != first.cases.len() {
        return Some(format!(
            "{} cases against {}",
            theirs.cases.len(),
            first.cases.len()
        ));
    }
    let c = (theirs.cases.iter().zip(&first.cases)).position(|(a, b)| a != b)?;
    Some(format!(
        "case {} is {} against {}",
        c + 1,
        name(&theirs.cases[c]),
        name(&first.cases[c])
    ))
}

/// The shard of `count` that runs case number `case` (0-based).
fn shard_of(case: usize, count: u32) -> Shard {
    // The remainder is below count, a u32.
    let index = (case % count as usize) as u32 + 1;
    Shard { index, count }
}

/// A case as the reports say it: `ext4 on debian-6.12 nvme`.
fn name(case: &Case) -> String {
    format!("{} on {}", case.test, case.kernel)
}

/// The cases named, the first few of many.
fn names(cases: &[Case]) -> String {
    const SHOWN: usize = 4;
    let mut s: Vec<String> = cases.iter().take(SHOWN).map(name).collect();
    if cases.len() > SHOWN {
        s.push(format!("and {} more", cases.len() - SHOWN));
    }
    s.join(", ")
}

/// The message of [`MergeError::Missing`]: each gap, then the shards to run
/// again.
fn missing(gaps: &[Gap]) -> String {
    let said: Vec<String> = gaps
        .iter()
        .map(|g| match &g.report {
            None => format!(
                "no report of shard {} ({} case{}: {})",
                g.shard,
                g.cases.len(),
                if g.cases.len() == 1 { "" } else { "s" },
                names(&g.cases)
            ),
            Some(file) => format!(
                "no result for {} in {} (shard {})",
                names(&g.cases),
                file.display(),
                g.shard
            ),
        })
        .collect();
    let shards: Vec<String> = gaps.iter().map(|g| g.shard.to_string()).collect();
    let again = match shards.as_slice() {
        [one] => format!("run the missing shard {one} again"),
        [rest @ .., last] => format!(
            "run the missing shards {} and {last} again",
            rest.join(", ")
        ),
        [] => String::new(),
    };
    let said = said.join("; ");
    let mut chars = said.chars();
    let said: String = chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default();
    format!("{said}: {again}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Verdict;
    use crate::report::json;
    use crate::test_utils::result;

    /// Five cases, two kernel columns: the order a run of smoke, ext4 and
    /// xfs on debian-6.1 and smoke, ext4 on debian-6.12 reports in.
    fn five() -> Vec<Case> {
        [
            ("debian-6.1", "smoke"),
            ("debian-6.1", "ext4"),
            ("debian-6.1", "xfs"),
            ("debian-6.12", "smoke"),
            ("debian-6.12", "ext4"),
        ]
        .map(|(kernel, test)| Case {
            kernel: kernel.into(),
            test: test.into(),
        })
        .to_vec()
    }

    /// Shard `index`/`count` of `cases`, as its run writes it: a PASS for
    /// each case it takes.
    fn shard(file: &str, index: u32, count: u32, cases: &[Case]) -> (PathBuf, String) {
        let shard = Shard { index, count };
        let results: Vec<TestResult> = (cases.iter().enumerate())
            .filter(|&(c, _)| shard.takes(c))
            .map(|(_, k)| result(&k.test, &k.kernel, Verdict::Pass, ""))
            .collect();
        let matrix = Matrix {
            shard,
            cases: cases.to_vec(),
        };
        (file.into(), json(&results, &matrix))
    }

    /// A shard report with these results instead of its own.
    fn with_results(report: (PathBuf, String), results: &[TestResult]) -> (PathBuf, String) {
        let mut j: serde_json::Value = serde_json::from_str(&report.1).unwrap();
        j["results"] = serde_json::to_value(results).unwrap();
        (report.0, j.to_string())
    }

    fn error(reports: &[(PathBuf, String)]) -> (MergeError, String) {
        let e = merge(reports).unwrap_err();
        let message = e.to_string();
        (e, message)
    }

    #[test]
    fn two_shards_merge_into_the_runs_order_as_one_whole_run() {
        let cases = five();
        // Given in either order, the shards make the whole run's report.
        let reports = [shard("b.json", 2, 2, &cases), shard("a.json", 1, 2, &cases)];
        let (results, matrix) = merge(&reports).unwrap();
        assert_eq!(matrix.shard, Shard::ALL);
        assert_eq!(matrix.cases, cases);
        let order: Vec<(&str, &str)> = results
            .iter()
            .map(|r| (r.kernel.as_str(), r.test.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("debian-6.1", "smoke"),
                ("debian-6.1", "ext4"),
                ("debian-6.1", "xfs"),
                ("debian-6.12", "smoke"),
                ("debian-6.12", "ext4"),
            ]
        );
        let whole = shard("whole.json", 1, 1, &cases).1;
        assert_eq!(json(&results, &matrix), whole);
    }

    #[test]
    fn a_missing_shard_is_named_with_its_cases() {
        let cases = five();
        let reports = [
            shard("s1.json", 1, 3, &cases),
            shard("s2.json", 2, 3, &cases),
        ];
        let (e, message) = error(&reports);
        let MergeError::Missing(gaps) = e else {
            panic!("{message}")
        };
        // Cases 2 and 5 (0-based) are shard 3/3's.
        assert_eq!(
            gaps,
            [Gap {
                shard: Shard { index: 3, count: 3 },
                report: None,
                cases: vec![cases[2].clone()],
            }]
        );
        assert_eq!(
            message,
            "No report of shard 3/3 (1 case: xfs on debian-6.1): run the missing shard 3/3 again"
        );
    }

    #[test]
    fn a_missing_result_names_the_case_and_its_shards_report() {
        let cases = five();
        let partial = with_results(
            shard("s1.json", 1, 2, &cases),
            &[result("smoke", "debian-6.1", Verdict::Pass, "")],
        );
        let reports = [partial, shard("s2.json", 2, 2, &cases)];
        let (_, message) = error(&reports);
        assert_eq!(
            message,
            "No result for xfs on debian-6.1, ext4 on debian-6.12 in s1.json (shard 1/2): \
             run the missing shard 1/2 again"
        );
        // Gaps in several shards are said shard by shard.
        let (_, message) = error(&[shard("s1.json", 1, 4, &cases)]);
        assert!(
            message.starts_with(
                "No report of shard 2/4 (1 case: ext4 on debian-6.1); no report of shard 3/4"
            ),
            "{message}"
        );
        assert!(
            message.ends_with("run the missing shards 2/4, 3/4 and 4/4 again"),
            "{message}"
        );
    }

    #[test]
    fn a_case_reported_twice_names_both_files() {
        let cases = five();
        let extra = with_results(
            shard("s2.json", 2, 2, &cases),
            &[
                result("ext4", "debian-6.1", Verdict::Pass, ""),
                result("smoke", "debian-6.12", Verdict::Pass, ""),
                result("smoke", "debian-6.1", Verdict::Pass, ""),
            ],
        );
        let (e, message) = error(&[shard("s1.json", 1, 2, &cases), extra]);
        assert!(matches!(e, MergeError::TwoResults { .. }), "{message}");
        assert_eq!(
            message,
            "Two results for smoke on debian-6.1, in s1.json and in s2.json (it is shard \
             1/2's): merge each shard's report once, as `dmaprobe run --shard I/N --json` \
             wrote it"
        );
    }

    #[test]
    fn a_shard_given_twice_names_both_files() {
        let cases = five();
        let reports = [
            shard("s1.json", 1, 2, &cases),
            shard("s2.json", 2, 2, &cases),
            shard("copy/s2.json", 2, 2, &cases),
        ];
        let (e, message) = error(&reports);
        assert!(matches!(e, MergeError::SameShard { .. }), "{message}");
        assert_eq!(
            message,
            "s2.json and copy/s2.json are both shard 2/2: give each shard's report once"
        );
    }

    #[test]
    fn shards_of_different_runs_are_refused() {
        let cases = five();
        let other = |file: &str, index: u32, count: u32, cases: &[Case]| {
            error(&[
                shard("a.json", 1, 2, &five()),
                shard(file, index, count, cases),
            ])
        };
        let (e, message) = other("b.json", 2, 3, &cases);
        assert!(matches!(e, MergeError::OtherRun { .. }), "{message}");
        assert!(
            message.starts_with(
                "b.json and a.json are shards of different runs (3 shards against 2): "
            ),
            "{message}"
        );
        let (_, message) = other("b.json", 2, 2, &cases[..4]);
        assert!(message.contains("(4 cases against 5)"), "{message}");
        let mut swapped = cases.clone();
        swapped.swap(1, 2);
        let (_, message) = other("b.json", 2, 2, &swapped);
        assert!(
            message.contains("(case 2 is xfs on debian-6.1 against ext4 on debian-6.1)"),
            "{message}"
        );
        // A result outside the matrix its own report gives.
        let stray = with_results(
            shard("s2.json", 2, 2, &cases),
            &[result("smoke", "debian-6.1 nvme", Verdict::Pass, "")],
        );
        let (e, message) = error(&[stray]);
        assert!(matches!(e, MergeError::NotInMatrix { .. }), "{message}");
        assert_eq!(
            message,
            "s2.json has a result for smoke on debian-6.1 nvme, which its matrix does not \
             list: run shard 2/2 again"
        );
    }

    #[test]
    fn a_file_that_is_no_report_is_named_with_the_cause() {
        let cases = five();
        let reports = [
            shard("s1.json", 1, 2, &cases),
            ("s2.json".into(), "{\"results\": [".into()),
        ];
        let (e, message) = error(&reports);
        assert!(matches!(e, MergeError::Parse(..)), "{message}");
        assert_eq!(
            message,
            "Cannot read s2.json as a report of `dmaprobe run --json`"
        );
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(cause.contains("EOF"), "{cause}");
        // A report from before reports carried their matrix.
        let old = ("old.json".into(), "{\"results\": []}".into());
        let (e, _) = error(&[old]);
        let cause = std::error::Error::source(&e).unwrap().to_string();
        assert!(cause.contains("missing field `matrix`"), "{cause}");
        // A shard that cannot be.
        let zero = shard("z.json", 1, 1, &cases)
            .1
            .replace("\"index\": 1", "\"index\": 0");
        let (e, message) = error(&[("z.json".into(), zero)]);
        assert!(matches!(e, MergeError::BadMatrix { .. }), "{message}");
        assert_eq!(
            message,
            "z.json's matrix (shard 0/1, 5 cases) is not one `dmaprobe run --json` writes"
        );
        let twice = [cases[0].clone(), cases[0].clone()];
        let (_, message) = error(&[shard("t.json", 1, 1, &twice)]);
        assert_eq!(
            message,
            "t.json's matrix (shard 1/1, 2 cases, smoke on debian-6.1 twice) is not one \
             `dmaprobe run --json` writes"
        );
        assert!(matches!(merge(&[]), Err(MergeError::NoReports)));
    }
}
