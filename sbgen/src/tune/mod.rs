//! GPU tuning: the library half of `sbgen tune` (without `--compile-only`), in phases
//! (docs/architecture.md#tuning):
//!
//! 1. [`enumerate`]: the search space of each spec; pruned candidates become [`Outcome::Pruned`]. The
//!    spec's default schedule is always a candidate and always timed first, so every speed-up has
//!    its reference; the others follow nearest the default first.
//! 2. [`compile`]: PTX for the kept candidates, from a folder (`--ptx-dir` / `SBGEN_PTX_DIR`, as the
//!    GPU machine without a CUDA toolchain needs: `sbgen tune --compile-only --emit-ptx DIR` writes
//!    only non-spilling variants) or compiled here through the artifact pipeline (a failure or a
//!    spill is a named loss, [`Outcome::Failed`]); then every module is loaded.
//! 3. [`check`]: each survivor against the float64 reference on small problems; a wrong variant is
//!    [`Outcome::WrongResult`] and never chosen.
//! 4. [`time`]: the rest are timed with CUDA events at each requested sequence length.
//! 5. [`record`]: the fastest per (spec, sequence length) becomes a [`CacheEntry`] with every
//!    candidate's result.
//!
//! A wall-time budget ([`Budget`]) bounds the checking and timing: once spent, the remaining
//! candidates are [`Outcome::NotRun`] (the defaults are still timed), and the report says so.
//! The phases share a [`Session`] and depend on `plan` and `budget` only, never on this file.

pub mod budget;
pub mod check;
pub mod compile;
pub mod enumerate;
pub mod plan;
pub mod record;
pub mod time;

pub use budget::Budget;
pub use plan::{Reporter, Session, TuneError, TunePlan, DEFAULT_BUDGET_S, DEFAULT_SEQS, MAX_SEQ};
pub use record::{format_summary_row, summary_header, SummaryRow, TuneReport};

use crate::artifact::store::{PtxDir, ScratchDir};
#[cfg(doc)]
use crate::cache::CacheEntry;
use crate::cache::Outcome;
use crate::compile::Compiler;
use crate::gpu::device::{self, Device, GpuError};
use crate::gpu::kernels::KernelBuilder;
use crate::ir::{Kernel, Spec};

/// The steps a run of `plan` takes, per spec: for each candidate the search space keeps, its check
/// and its timing at each sequence length. [`run`] reports how many are done
/// ([`Reporter::reached`]); those of a candidate that fails to compile, or that the budget leaves
/// out, count as done when its spec is over.
pub fn planned_steps(plan: &TunePlan) -> Vec<usize> {
    plan.specs
        .iter()
        .map(|&spec| {
            let (cands, _) = enumerate::candidates(spec, plan.arch);
            let kept = cands.iter().filter(|c| !matches!(c.outcome, Outcome::Pruned { .. })).count();
            kept * (1 + plan.seqs.len())
        })
        .collect()
}

/// The checked-and-timed pipeline for every spec of `plan` on `dev`. Progress lines and the count
/// of [`planned_steps`] done go to `progress` (the CLI prints them on stderr).
pub fn run(dev: &Device, plan: &TunePlan, progress: &mut dyn Reporter) -> Result<TuneReport, TuneError> {
    if dev.arch != plan.arch {
        return Err(TuneError::ArchMismatch { requested: plan.arch, found: dev.arch, device: dev.describe() });
    }
    // Kernels: from the PTX folder, or compiled here into a scratch folder (removed on every path).
    let mut _scratch = None;
    let (ptx_dir, compile) = match &plan.ptx_dir {
        Some(dir) => (dir.clone(), None),
        None => match Compiler::discover() {
            Ok(c) => {
                let scratch = _scratch.insert(ScratchDir::create()?);
                (scratch.path().to_path_buf(), Some((c, PtxDir::new(scratch.path()))))
            }
            Err(e) => return Err(TuneError::NoKernels { arch: plan.arch, toolchain: e.to_string() }),
        },
    };
    let driver =
        device::driver_version().map_or("unknown".to_string(), |v| format!("CUDA {}.{}", v / 1000, (v % 1000) / 10));
    let mut s = Session {
        dev,
        plan,
        builder: KernelBuilder::new(plan.arch, Some(ptx_dir)),
        compile,
        budget: Budget::start(plan.budget),
        driver,
        progress,
        done: 0,
    };
    let mut report = TuneReport::default();
    let mut end = 0;
    for (&spec, steps) in plan.specs.iter().zip(planned_steps(plan)) {
        end += steps;
        let result = tune_spec(&mut s, spec, &mut report);
        s.reach(end);
        match result {
            Ok(()) => {}
            Err(TuneError::Gpu(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. }))) => {
                report.aborted = Some(e.to_string());
                break;
            }
            // An error of this spec alone: keep what the others measured and go on.
            Err(e) => {
                s.say(&format!("ERROR {}: {e}", spec.slug()));
                let done: Vec<String> =
                    report.entries.iter().filter(|x| x.spec == spec).map(|x| x.seq_bucket.to_string()).collect();
                let what = if done.is_empty() {
                    format!("not tuned: {}", spec.slug())
                } else {
                    format!("partly tuned: {} (written for bucket {} only)", spec.slug(), done.join(", "))
                };
                report.spec_errors.push((what, e.to_string()));
            }
        }
    }
    if report.aborted.is_none() {
        // The pair check adds warnings; its own failure must not cost the measured entries.
        match check::pair_check(&mut s, &report.entries) {
            Ok(failures) => report.pair_failures = failures,
            Err(e) => report.pair_check_error = Some(e.to_string()),
        }
    }
    Ok(report)
}

/// One spec through the phases: its candidates, their kernels, the check, then timing and
/// recording at each sequence length.
fn tune_spec(s: &mut Session<'_>, spec: Spec, report: &mut TuneReport) -> Result<(), TuneError> {
    let (mut cands, checksum) = enumerate::candidates(spec, s.plan.arch);
    enumerate::announce(s, spec, &cands);
    let kept: Vec<usize> = (0..cands.len()).filter(|&i| !matches!(cands[i].outcome, Outcome::Pruned { .. })).collect();
    let kernels: Vec<Kernel> = kept.iter().map(|&i| Kernel::new(spec, cands[i].schedule, s.plan.arch)).collect();
    let helpers = enumerate::helpers(spec, &kernels);
    compile::prepare(s, &kept, &kernels, &helpers, &mut cands);
    if check::check_candidates(s, spec, &kept, &mut cands)? {
        report.budget_spent = true;
    }
    let plan = s.plan;
    for &seq in &plan.seqs {
        let timed = time::time_candidates(s, spec, seq, &cands)?;
        if timed.not_run > 0 {
            report.budget_spent = true;
        }
        let (row, entry) = record::record(s, spec, seq, timed.shape, &checksum, timed.results)?;
        report.entries.extend(entry);
        report.summary.push(row);
        if let Some(e) = timed.fatal {
            return Err(e.into());
        }
    }
    Ok(())
}
