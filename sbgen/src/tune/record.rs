//! What a run keeps: the winner of each (spec, sequence length) as a [`CacheEntry`] holding the
//! result of every candidate the search kept, the summary table, and the [`TuneReport`] the CLI
//! prints.

use super::plan::{Session, TuneError};
use crate::cache::{self, seq_bucket, CacheEntry, CandidateResult, Outcome};
use crate::ir::{Kernel, Loads, MmaFamily, Schedule, Spec};
use sbgen_runtime::reference::Shape;

/// The index of the fastest timed candidate (the first of equals), if any was timed.
pub fn choose_winner(candidates: &[CandidateResult]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.outcome.ms().map(|ms| (i, ms)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// The summary row of one (spec, sequence length) timed on `shape`, and the cache entry of its
/// winner when one was timed. Fails only when the winner's kernel cannot be built again.
pub fn record(
    s: &Session<'_>,
    spec: Spec,
    seq: usize,
    shape: Shape,
    checksum: &str,
    results: Vec<CandidateResult>,
) -> Result<(SummaryRow, Option<CacheEntry>), TuneError> {
    let row = SummaryRow::from_candidates(spec, seq, &Schedule::default_on(&spec, s.plan.arch), &results);
    let Some(w) = choose_winner(&results) else {
        return Ok((row, None));
    };
    let schedule = results[w].schedule;
    let binary = s
        .builder
        .build(&Kernel::new(spec, schedule, s.plan.arch))
        .map_err(|e| TuneError::Kernel { what: "the winner", message: e.to_string() })?;
    let entry = CacheEntry {
        arch: s.plan.arch,
        spec,
        seq_bucket: seq_bucket(seq),
        schedule,
        kernel_name: binary.name().to_string(),
        time_ms: row.ms.unwrap_or(0.0),
        tflops: row.tflops.unwrap_or(0.0),
        speedup_over_default: row.speedup(),
        shape: Some([shape.batch, shape.heads, shape.seq, shape.head_dim]),
        gpu_name: s.dev.name.clone(),
        driver_version: s.driver.clone(),
        sbgen_version: env!("CARGO_PKG_VERSION").to_string(),
        tuned_at: cache::now_utc(),
        candidates_checksum: checksum.to_string(),
        candidates: stored_candidates(results),
        manifest: binary.manifest().clone(),
        ptx: binary.ptx().first().map(|(_, p)| p.clone()).unwrap_or_default(),
        cuda_source_hash: binary.cuda_source().map(cache::source_hash).unwrap_or_default(),
        recompiled_at: String::new(),
    };
    Ok((row, Some(entry)))
}

/// The candidates a cache entry keeps: all but the pruned ones. Those follow from the search space
/// the entry's checksum names (`tune --compile-only` lists them with their reasons), and their
/// reasons were 45% of the shipped cache.
fn stored_candidates(results: Vec<CandidateResult>) -> Vec<CandidateResult> {
    results.into_iter().filter(|c| !matches!(c.outcome, Outcome::Pruned { .. })).collect()
}

/// One line of the summary: the winner of one (spec, sequence length).
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    pub spec: Spec,
    pub seq: usize,
    pub winner: Option<Schedule>,
    pub ms: Option<f64>,
    pub tflops: Option<f64>,
    pub default_ms: Option<f64>,
    /// The `wgmma` family against `mma.sync`: the best time of each, or why no `wgmma` candidate was
    /// timed (the first such candidate's outcome).
    pub families: FamilyComparison,
    /// Candidates timed, wrong, failed, not run.
    pub timed: usize,
    pub wrong: usize,
    pub failed: usize,
    pub not_run: usize,
}

impl SummaryRow {
    /// Builds the row from one (spec, seq)'s candidates, `default` being the spec's default schedule.
    pub fn from_candidates(spec: Spec, seq: usize, default: &Schedule, candidates: &[CandidateResult]) -> Self {
        let winner = choose_winner(candidates).map(|i| &candidates[i]);
        let count = |f: fn(&Outcome) -> bool| candidates.iter().filter(|c| f(&c.outcome)).count();
        SummaryRow {
            spec,
            seq,
            winner: winner.map(|c| c.schedule),
            ms: winner.and_then(|c| c.outcome.ms()),
            tflops: winner.and_then(|c| match c.outcome {
                Outcome::Timed { tflops, .. } => Some(tflops),
                _ => None,
            }),
            default_ms: candidates.iter().find(|c| c.schedule == *default).and_then(|c| c.outcome.ms()),
            families: FamilyComparison::from_candidates(&spec, candidates),
            timed: count(|o| matches!(o, Outcome::Timed { .. })),
            wrong: count(|o| matches!(o, Outcome::WrongResult { .. })),
            failed: count(|o| matches!(o, Outcome::Failed { .. })),
            not_run: count(|o| matches!(o, Outcome::NotRun { .. })),
        }
    }

    /// Default time over the winner's.
    pub fn speedup(&self) -> Option<f64> {
        match (self.default_ms, self.ms) {
            (Some(d), Some(w)) if w > 0.0 => Some(d / w),
            _ => None,
        }
    }
}

/// How the fastest `wgmma` candidate of one (spec, sequence length) compares with the fastest
/// `mma.sync` one, so that the summary says where wgmma wins and, where it was not timed, why; and
/// how the winner compares with the `mma.sync` default ([`Schedule::default_for`], what sbgen ran
/// before it had wgmma and what sm_80 runs where its shared memory allows).
#[derive(Clone, Debug, PartialEq)]
pub struct FamilyComparison {
    pub mma_sync_ms: Option<f64>,
    pub wgmma_ms: Option<f64>,
    /// The `mma.sync` default's time, when it was timed.
    pub mma_sync_default_ms: Option<f64>,
    /// Why no wgmma candidate was timed: the first wgmma candidate's outcome (pruned, failed,
    /// wrong, not run), or that the search space had none.
    pub wgmma_absent: Option<String>,
    /// The fastest wgmma candidate loading K and V by `cp.async`, the fastest by TMA, and the
    /// fastest with a producer warpgroup (warp specialisation, with or without ping-pong)
    /// ([`Loads`]), so that the summary says which loads won.
    pub wgmma_cp_async_ms: Option<f64>,
    pub tma_ms: Option<f64>,
    pub producer_ms: Option<f64>,
}

impl FamilyComparison {
    pub fn from_candidates(spec: &Spec, candidates: &[CandidateResult]) -> Self {
        let mma_sync_default = Schedule::default_for(spec);
        let mma_sync_default_ms =
            candidates.iter().find(|c| c.schedule == mma_sync_default).and_then(|c| c.outcome.ms());
        let best = |family: MmaFamily| {
            candidates.iter().filter(|c| c.schedule.mma == family).filter_map(|c| c.outcome.ms()).min_by(f64::total_cmp)
        };
        let wgmma_ms = best(MmaFamily::Wgmma);
        let wgmma_absent = wgmma_ms.is_none().then(|| {
            candidates
                .iter()
                .find(|c| c.schedule.mma == MmaFamily::Wgmma)
                .map_or("no wgmma candidate in the search space".to_string(), |c| c.outcome.to_string())
        });
        let best_wgmma_loading = |loads: Loads| {
            candidates
                .iter()
                .filter(|c| c.schedule.mma == MmaFamily::Wgmma && c.schedule.loads == loads)
                .filter_map(|c| c.outcome.ms())
                .min_by(f64::total_cmp)
        };
        FamilyComparison {
            mma_sync_ms: best(MmaFamily::MmaSync),
            wgmma_ms,
            mma_sync_default_ms,
            wgmma_absent,
            wgmma_cp_async_ms: best_wgmma_loading(Loads::CpAsync),
            tma_ms: best_wgmma_loading(Loads::Tma),
            producer_ms: best_wgmma_loading(Loads::Producer),
        }
    }

    /// The summary's cell: the best mma.sync time over the best wgmma time ("1.40x": wgmma is
    /// faster), then the mma.sync default's time over the faster of the two ("1.40x, 1.75x"; "-"
    /// where the default was not timed), or why wgmma was not timed; where wgmma candidates with
    /// both loads were timed, the best `cp.async` one's time over the best TMA one's ("; TMA
    /// 1.03x": TMA is faster), and the same for a producer warpgroup ("; producer 1.10x").
    pub fn cell(&self) -> String {
        let mut cell = self.families_cell();
        if let Some(c) = self.wgmma_cp_async_ms {
            for (name, other) in [("TMA", self.tma_ms), ("producer", self.producer_ms)] {
                if let Some(t) = other {
                    cell.push_str(&format!("; {name} {:.2}x", c / t));
                }
            }
        }
        cell
    }

    fn families_cell(&self) -> String {
        match (self.mma_sync_ms, self.wgmma_ms, &self.wgmma_absent) {
            (Some(m), Some(w), _) => {
                let over_default =
                    self.mma_sync_default_ms.map_or("-".to_string(), |d| format!("{:.2}x", d / m.min(w)));
                format!("{:.2}x, {over_default}", m / w)
            }
            (None, Some(_), _) => "wgmma only".to_string(),
            (_, None, Some(why)) => format!("none: {why}"),
            (_, None, None) => "-".to_string(),
        }
    }
}

/// The summary table's header.
pub fn summary_header() -> String {
    format!(
        "{:<36} {:>6} {:<26} {:>9} {:>8} {:>10} {:>8}  {:<26}  {}",
        "spec",
        "N",
        "winner",
        "ms",
        "TFLOP/s",
        "default ms",
        "speedup",
        "timed/wrong/failed/not run",
        "wgmma: best mma.sync / best wgmma, mma.sync default / winner (or why none); TMA, producer: best cp.async / best of those"
    )
}

/// One line of the summary table.
pub fn format_summary_row(r: &SummaryRow) -> String {
    let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    format!(
        "{:<36} {:>6} {:<26} {:>9} {:>8} {:>10} {:>8}  {:<26}  {}",
        r.spec.slug(),
        r.seq,
        r.winner.map_or("(none)".to_string(), |s| s.to_string()),
        f(r.ms, 3),
        f(r.tflops, 1),
        f(r.default_ms, 3),
        r.speedup().map_or("-".to_string(), |s| format!("{s:.2}x")),
        format!("{}/{}/{}/{}", r.timed, r.wrong, r.failed, r.not_run),
        r.families.cell()
    )
}

/// What a run produced.
#[derive(Clone, Debug, Default)]
pub struct TuneReport {
    /// One entry per (spec, sequence length) with a winner.
    pub entries: Vec<CacheEntry>,
    pub summary: Vec<SummaryRow>,
    /// The budget ran out before every candidate was timed.
    pub budget_spent: bool,
    /// Set when the run stopped early (lost CUDA context, hung kernel): what was measured before
    /// is in `entries`.
    pub aborted: Option<String>,
    /// Backward winners that fail their check on the same bucket's forward winner ([`super::check::winner_pairs`]).
    pub pair_failures: Vec<String>,
    /// Specs that stopped on an error of their own (out of memory, a winner that would not build):
    /// `("not tuned: <spec>" or "partly tuned: <spec> (...)", error)`. The other specs' entries,
    /// and this spec's buckets measured before the error, are in `entries`.
    pub spec_errors: Vec<(String, String)>,
    /// The forward/backward pair check ([`super::check::winner_pairs`]) could not run; the entries are complete.
    pub pair_check_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dtype, Pass};

    fn timed(schedule: Schedule, ms: f64) -> CandidateResult {
        CandidateResult { schedule, outcome: Outcome::Timed { ms, tflops: 1.0 / ms } }
    }

    fn s(block_n: u32, stages: u32) -> Schedule {
        Schedule { block_n, stages, ..Schedule::DEFAULT }
    }

    #[test]
    fn the_winner_is_the_fastest_timed_candidate_never_a_wrong_one() {
        let list = vec![
            timed(s(64, 2), 2.0),
            CandidateResult { schedule: s(32, 2), outcome: Outcome::WrongResult { max_error: 0.3 } },
            timed(s(32, 3), 1.5),
            CandidateResult { schedule: s(128, 2), outcome: Outcome::Failed { reason: "spills".into() } },
            CandidateResult { schedule: s(128, 3), outcome: Outcome::Pruned { reason: "smem".into() } },
            CandidateResult { schedule: s(64, 3), outcome: Outcome::NotRun { reason: "budget".into() } },
            timed(s(32, 4), 1.5),
        ];
        assert_eq!(choose_winner(&list), Some(2), "the first of equals");
        let stored = stored_candidates(list.clone());
        assert_eq!(stored.len(), list.len() - 1, "only the pruned one is left out");
        assert!(stored.iter().all(|c| !matches!(c.outcome, Outcome::Pruned { .. })));
        assert_eq!(stored[choose_winner(&stored).unwrap()], list[2], "the winner is stored");
        assert_eq!(choose_winner(&list[..2]), Some(0));
        assert_eq!(choose_winner(&list[1..2]), None);
        // A zero or non-finite time is never a winner.
        assert_eq!(choose_winner(&[timed(s(64, 2), 0.0), timed(s(32, 2), f64::NAN)]), None);
    }

    #[test]
    fn the_summary_shows_the_winner_and_the_speedup_over_the_default() {
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let default = Schedule::default_for(&spec);
        let other = Schedule { block_n: 32, ..default };
        let list = vec![
            timed(default, 2.0),
            timed(other, 1.6),
            CandidateResult { schedule: s(32, 2), outcome: Outcome::WrongResult { max_error: 0.3 } },
            CandidateResult { schedule: s(64, 2), outcome: Outcome::NotRun { reason: "budget".into() } },
        ];
        let row = SummaryRow::from_candidates(spec, 2048, &default, &list);
        assert_eq!(row.winner, Some(other));
        assert_eq!(row.speedup(), Some(1.25));
        let line = format_summary_row(&row);
        assert!(line.starts_with("fwd_d128_bf16_strict_bhnd_ret_full"), "{line}");
        for part in ["2048", &other.to_string(), "1.600", "2.000", "1.25x", "2/1/0/1"] {
            assert!(line.contains(part), "{part} in {line}");
        }
        assert_eq!(summary_header().split_whitespace().next(), Some("spec"));
        // Nothing timed: no winner, no speed-up, a readable line.
        let none = SummaryRow::from_candidates(spec, 8192, &default, &list[2..]);
        assert_eq!((none.winner, none.speedup()), (None, None));
        assert!(format_summary_row(&none).contains("(none)"));
        assert!(format_summary_row(&none).contains("none: no wgmma candidate in the search space"));
    }

    #[test]
    fn the_summary_compares_the_best_of_each_mma_family_or_says_why_wgmma_was_not_timed() {
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let wg = |block_n, stages| Schedule { mma: MmaFamily::Wgmma, ..s(block_n, stages) };
        let list = vec![
            timed(s(64, 2), 2.2),
            timed(s(32, 2), 2.4),
            timed(wg(64, 2), 1.6),
            CandidateResult { schedule: wg(32, 2), outcome: Outcome::WrongResult { max_error: 0.3 } },
            timed(wg(32, 3), 1.76),
        ];
        let row = SummaryRow::from_candidates(spec, 8192, &Schedule::WGMMA_FORWARD, &list);
        assert_eq!((row.families.mma_sync_ms, row.families.wgmma_ms), (Some(2.2), Some(1.6)));
        // The mma.sync default (64 x 64 x 3 at head_dim 128) was not among them.
        assert_eq!(row.families.mma_sync_default_ms, None);
        assert!(format_summary_row(&row).ends_with("1.38x, -"), "{}", format_summary_row(&row));
        // With the mma.sync default timed, its time over the winner's follows.
        let mut with_default = list.clone();
        with_default.push(timed(Schedule::default_for(&spec), 2.8));
        let row = SummaryRow::from_candidates(spec, 8192, &Schedule::WGMMA_FORWARD, &with_default);
        assert_eq!(row.families.mma_sync_default_ms, Some(2.8));
        assert!(format_summary_row(&row).ends_with("1.38x, 1.75x"), "{}", format_summary_row(&row));
        // No wgmma timed: the first wgmma candidate's outcome says why.
        let pruned =
            CandidateResult { schedule: wg(64, 2), outcome: Outcome::Pruned { reason: "wgmma needs sm_90a".into() } };
        let row = SummaryRow::from_candidates(spec, 8192, &Schedule::DEFAULT, &[timed(s(64, 2), 2.2), pruned]);
        assert_eq!(row.families.cell(), "none: pruned: wgmma needs sm_90a");
        let row = SummaryRow::from_candidates(spec, 8192, &Schedule::DEFAULT, &list[2..3]);
        assert_eq!(row.families.cell(), "wgmma only");
        // wgmma with both loads timed: the best cp.async one over the best TMA one.
        let mut with_tma = list.clone();
        with_tma.push(timed(Schedule { loads: Loads::Tma, ..wg(64, 2) }, 1.65));
        with_tma.push(timed(Schedule { loads: Loads::Tma, ..wg(32, 3) }, 2.0));
        let row = SummaryRow::from_candidates(spec, 8192, &Schedule::WGMMA_FORWARD, &with_tma);
        assert_eq!((row.families.wgmma_cp_async_ms, row.families.tma_ms), (Some(1.6), Some(1.65)));
        assert!(format_summary_row(&row).ends_with("1.38x, -; TMA 0.97x"), "{}", format_summary_row(&row));
        // And with a producer warpgroup: its best over the same cp.async one.
        with_tma.push(timed(Schedule { loads: Loads::Producer, block_m: 128, warps: 8, ..wg(64, 3) }, 1.28));
        let row = SummaryRow::from_candidates(spec, 8192, &Schedule::WGMMA_FORWARD, &with_tma);
        assert_eq!(row.families.producer_ms, Some(1.28));
        assert!(format_summary_row(&row).ends_with("; TMA 0.97x; producer 1.25x"), "{}", format_summary_row(&row));
    }
}
