//! Each candidate against the float64 reference before it may be timed ([`crate::gpu::check`] restricted
//! to the candidate: every data regime, N in [`CHECK_SEQS`]), and the forward/backward winners of
//! a bucket checked as the pair they form in training. Typed check failures map to outcomes in
//! one `match` ([`check_verdict`]).

use super::plan::{forward_of, Session};
use crate::cache::{CacheEntry, CandidateResult, Outcome};
use crate::gpu::bench::CHECK_VARLEN;
use crate::gpu::check::{self, short, CheckPlan};
use crate::gpu::data::Regime;
use crate::gpu::decode::CacheKind;
use crate::gpu::decode_check::{self, DecodeCheckPlan};
use crate::gpu::device::GpuError;
use crate::gpu::failure::{Failure, Row};
use crate::ir::{Layout, Pass, Schedule, Spec};

/// Sequence lengths of the correctness check of each candidate (one partial block, several blocks).
pub const CHECK_SEQS: &[usize] = &[17, 256];
/// The check of `spec` alone (all data regimes, N in [`CHECK_SEQS`], and for a THD spec the packed
/// batch [`CHECK_VARLEN`] too: the one `sbgen bench` checks) with `schedule`.
fn candidate_plan(spec: Spec, schedule: Schedule, seed: u64) -> CheckPlan {
    let mut cp = CheckPlan::quick(seed);
    cp.head_dims = vec![spec.head_dim];
    cp.dtypes = vec![spec.dtype];
    cp.passes = vec![spec.pass];
    cp.masks = vec![spec.mask];
    cp.layouts = vec![spec.layout];
    cp.remainders = vec![spec.remainder];
    cp.early_exits = vec![spec.early_exit_bits];
    cp.deterministic = vec![spec.deterministic];
    cp.varlen = if spec.layout == Layout::Thd { CHECK_VARLEN.to_vec() } else { Vec::new() };
    cp.regimes = Regime::ALL.to_vec();
    cp.seqs = CHECK_SEQS.to_vec();
    cp.schedule = Some(schedule);
    cp
}

/// The check of a decode candidate: lengths 1, 17 and 300 (no key, a partial block, several chunks)
/// in the spec's cache (paged: 16-token pages), a GQA group of 4, every regime, both splits.
fn decode_candidate_plan(spec: Spec, schedule: Schedule, seed: u64) -> DecodeCheckPlan {
    let mut cp = DecodeCheckPlan::quick(seed);
    cp.head_dims = vec![spec.head_dim];
    cp.dtypes = vec![spec.dtype];
    cp.masks = vec![spec.mask];
    cp.caches = vec![match spec.layout {
        Layout::Paged => CacheKind::Paged { page_size: 16 },
        layout => CacheKind::Contiguous(layout),
    }];
    cp.remainders = vec![spec.remainder];
    cp.early_exits = vec![spec.early_exit_bits];
    cp.seqlens = vec![1, 17, 300];
    cp.kv_heads = vec![check::KvHeads::Group(4)];
    cp.schedule = Some(schedule);
    cp
}

/// Checks every kept candidate (`kept` indexes `cands`) still to be measured, in order; a wrong
/// one gets its outcome. Once the budget is spent, candidates are checked only until one passes
/// (the default, unless it failed to build or is wrong), the rest become [`Outcome::NotRun`].
/// Returns whether the budget cut the checks short.
pub fn check_candidates(
    s: &mut Session<'_>,
    spec: Spec,
    kept: &[usize],
    cands: &mut [CandidateResult],
) -> Result<bool, GpuError> {
    let checkable: Vec<usize> =
        kept.iter().copied().filter(|&i| matches!(cands[i].outcome, Outcome::NotRun { .. })).collect();
    let mut budget_spent = false;
    let mut passed_one = false;
    for &i in &checkable {
        let schedule = cands[i].schedule;
        if passed_one && s.budget.spent() {
            budget_spent = true;
            cands[i].outcome = Outcome::NotRun { reason: "time budget spent (--budget-s) before its check".into() };
            s.step();
            continue;
        }
        let rows = match spec.pass {
            Pass::Decode => {
                decode_check::run(s.dev, &s.builder, &decode_candidate_plan(spec, schedule, s.plan.seed), &mut |_| {})?
            }
            Pass::Forward | Pass::Backward => {
                check::run(s.dev, &s.builder, &candidate_plan(spec, schedule, s.plan.seed), &mut |_| {})?
            }
            Pass::Segment | Pass::SegmentBackward => {
                return Err(GpuError::Input(
                    "the segment passes are not tuned on their own: they run the forward's and backward's schedules"
                        .into(),
                ))
            }
        };
        match check_verdict(&rows) {
            Some(outcome) => {
                s.say(&format!("WRONG  {:<26} {outcome}", schedule.to_string()));
                cands[i].outcome = outcome;
            }
            None => {
                passed_one = true;
                s.say(&format!("ok     {:<26} matches the float64 reference", schedule.to_string()))
            }
        }
        s.step();
    }
    Ok(budget_spent)
}

/// The outcome of a candidate's check rows: `None` when all passed; [`Outcome::Failed`] when the
/// kernel never ran; else [`Outcome::WrongResult`] with the largest error over its tolerance, or
/// `f64::MAX` when any failure has no finite error (NaN, writes out of bounds, a failed launch,
/// early exit off its bound): JSON has no NaN.
pub fn check_verdict(rows: &[Row]) -> Option<Outcome> {
    let failures: Vec<&Failure> = rows.iter().flat_map(|r| &r.failures).collect();
    let first = failures.first()?;
    if failures.iter().all(|f| f.did_not_run()) {
        return Some(Outcome::Failed { reason: short(first) });
    }
    let max_error = failures.iter().fold(0f64, |max, f| match f {
        Failure::Tolerance { err, .. } if err.is_finite() => max.max(*err),
        _ => f64::MAX,
    });
    Some(Outcome::WrongResult { max_error })
}

/// In training the tuned backward reads what the tuned forward saved, and each was checked with
/// its own schedule's forward: where the two winners of a bucket differ, the backward winner is
/// checked again on the forward winner's saved outputs. Returns the pairs that fail (the entries
/// are still written: the pair is the cache user's choice).
pub fn pair_check(s: &mut Session<'_>, entries: &[CacheEntry]) -> Result<Vec<String>, GpuError> {
    let mut failures = Vec::new();
    for (fwd, bwd, bucket) in winner_pairs(entries) {
        let mut cp = candidate_plan(bwd.spec, bwd.schedule, s.plan.seed ^ 0x9a1);
        cp.forward_schedule = Some(fwd.schedule);
        let rows = check::run(s.dev, &s.builder, &cp, &mut |_| {})?;
        let what =
            format!("{} (bucket {bucket}): backward {} on forward {}", bwd.spec.slug(), bwd.schedule, fwd.schedule);
        match check_verdict(&rows) {
            None => s.say(&format!("pair ok {what}")),
            Some(outcome) => {
                s.say(&format!("PAIR FAILS {what}: {outcome}"));
                failures.push(format!("{what}: {outcome}"));
            }
        }
    }
    Ok(failures)
}

/// The (forward, backward, bucket) winners of the same spec (but the pass), arch and bucket whose
/// schedules differ.
pub fn winner_pairs(entries: &[CacheEntry]) -> Vec<(&CacheEntry, &CacheEntry, u32)> {
    let mut out = Vec::new();
    for bwd in entries.iter().filter(|e| e.spec.pass == Pass::Backward) {
        let fwd_spec = forward_of(bwd.spec);
        let fwd = entries.iter().find(|e| e.spec == fwd_spec && e.arch == bwd.arch && e.seq_bucket == bwd.seq_bucket);
        if let Some(fwd) = fwd.filter(|f| f.schedule != bwd.schedule) {
            out.push((fwd, bwd, bwd.seq_bucket));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::kernels::BuildError;
    use crate::ir::{Arch, Dtype, Kernel};
    use sbgen_runtime::reference::Shape;

    fn s(block_n: u32, stages: u32) -> Schedule {
        Schedule { block_n, stages, ..Schedule::DEFAULT }
    }

    #[test]
    fn pairs_are_the_forward_and_backward_winners_of_a_bucket_that_differ() {
        let entry = |pass: Pass, bucket: u32, schedule: Schedule| {
            let kernel = Kernel::new(Spec::new(128, Dtype::Bf16, pass), schedule, Arch::Sm90);
            CacheEntry::untimed(kernel, bucket, String::new()).unwrap()
        };
        let (a, b) = (s(32, 2), s(32, 3));
        let entries = vec![
            entry(Pass::Forward, 2048, a),
            entry(Pass::Backward, 2048, b),
            entry(Pass::Forward, 8192, b),
            entry(Pass::Backward, 8192, b),
            entry(Pass::Backward, 16384, a),
        ];
        let pairs = winner_pairs(&entries);
        assert_eq!(pairs.len(), 1);
        assert_eq!((pairs[0].0.schedule, pairs[0].1.schedule, pairs[0].2), (a, b, 2048));
    }

    #[test]
    fn the_candidate_check_covers_one_spec_every_regime_and_both_lengths() {
        let spec = Spec::new(64, Dtype::F16, Pass::Backward);
        let cp = candidate_plan(spec, s(32, 3), 7);
        assert_eq!(cp.specs(), vec![spec]);
        assert_eq!((cp.regimes.as_slice(), cp.seqs.as_slice()), (Regime::ALL.as_slice(), CHECK_SEQS));
        assert_eq!((cp.schedule_for(&spec), cp.seed), (Some(s(32, 3)), 7));
        assert!(cp.varlen.is_empty(), "a dense spec has no packed batch");
    }

    /// The check runs the very kernel that is timed: a deterministic backward is checked as one,
    /// a THD spec on a packed batch of mixed lengths too, and a padded head_dim as itself.
    #[test]
    fn the_candidate_check_runs_the_spec_itself_deterministic_thd_and_padded() {
        let spec = Spec { deterministic: true, layout: Layout::Thd, ..Spec::new(80, Dtype::Bf16, Pass::Backward) };
        let cp = candidate_plan(spec, s(32, 2), 1);
        assert_eq!(cp.specs(), vec![spec]);
        assert_eq!(cp.varlen, CHECK_VARLEN);
        let fwd = Spec { layout: Layout::Thd, ..Spec::new(256, Dtype::F16, Pass::Forward) };
        assert_eq!(candidate_plan(fwd, s(32, 2), 1).specs(), vec![fwd]);
    }

    #[test]
    fn a_deterministic_backward_pairs_with_the_plain_forward_of_its_bucket() {
        let fwd = Spec::new(96, Dtype::Bf16, Pass::Forward);
        let bwd = Spec { deterministic: true, ..Spec::new(96, Dtype::Bf16, Pass::Backward) };
        let entry = |spec: Spec, schedule: Schedule| {
            CacheEntry::untimed(Kernel::new(spec, schedule, Arch::Sm90), 2048, String::new()).unwrap()
        };
        let entries = vec![entry(fwd, s(32, 3)), entry(bwd, s(32, 2))];
        let pairs = winner_pairs(&entries);
        assert_eq!(pairs.len(), 1);
        assert_eq!((pairs[0].0.spec, pairs[0].1.spec), (fwd, bwd));
    }

    #[test]
    fn check_rows_become_wrong_results_with_a_finite_error() {
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let row = |failures: Vec<Failure>, err_o: Option<f64>| Row {
            err_o,
            err_rem: Some(1e-4),
            failures,
            ..Row::new(spec, Regime::Random, Shape::new(3, 5, 17, 128))
        };
        let tolerance = |what, err| Failure::Tolerance { what, err, tol: 5e-3 };
        assert_eq!(check_verdict(&[row(vec![], Some(1e-3))]), None);
        assert_eq!(
            check_verdict(&[row(vec![], Some(1e-3)), row(vec![tolerance("o", 6e-3)], Some(6e-3))]),
            Some(Outcome::WrongResult { max_error: 6e-3 })
        );
        // The largest error over its tolerance, whichever output it is (o_saved has no column).
        assert_eq!(
            check_verdict(&[row(vec![tolerance("o", 6e-3)], Some(6e-3)), row(vec![tolerance("o_saved", 9e-3)], None)]),
            Some(Outcome::WrongResult { max_error: 9e-3 })
        );
        assert_eq!(
            check_verdict(&[row(vec![Failure::NonFinite { what: "o", count: 3, len: 10 }], Some(f64::NAN))]),
            Some(Outcome::WrongResult { max_error: f64::MAX })
        );
        assert_eq!(
            check_verdict(&[row(vec![tolerance("o", f64::NAN)], Some(f64::NAN))]),
            Some(Outcome::WrongResult { max_error: f64::MAX })
        );
        let no_ptx =
            || BuildError::NoPtx { kernel: "x".into(), dir: "d".into(), file: "f".into(), toolchain: "t".into() };
        assert!(matches!(
            check_verdict(&[row(vec![Failure::Build(no_ptx())], None), row(vec![Failure::ForwardFailed], None)]),
            Some(Outcome::Failed { reason }) if reason.starts_with("build: no PTX for `x`")
        ));
        // A kernel that did not build next to one that ran wrong: wrong, with no finite error.
        assert_eq!(
            check_verdict(&[row(vec![Failure::Build(no_ptx())], None), row(vec![tolerance("o", 6e-3)], Some(6e-3))]),
            Some(Outcome::WrongResult { max_error: f64::MAX })
        );
        // What the cache stores is valid JSON (no NaN).
        let outside = Failure::OutOfBounds { output: "o", elements: 3 };
        let text = serde_json::to_string(&check_verdict(&[row(vec![outside], None)])).unwrap();
        assert!(!text.contains("null"), "{text}");
    }
}
