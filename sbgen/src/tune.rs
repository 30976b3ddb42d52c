//! GPU tuning: the library half of `sbgen tune` (without `--compile-only`).
//!
//! For each spec: enumerate the search space ([`crate::search_space::variants`]); pruned candidates
//! become [`Outcome::Pruned`]. The spec's default schedule ([`Schedule::default_for`]) is always a
//! candidate and always timed first, so every speed-up has its reference. The kept candidates get
//! PTX, either from a folder (`--ptx-dir` / `SBGEN_PTX_DIR`, as the GPU machine without a CUDA
//! toolchain needs: `sbgen tune --compile-only --emit-ptx DIR` writes only non-spilling variants) or
//! compiled here in parallel ([`compile_to_dir`]: NVRTC + ptxas; a failure or a spill is a named
//! loss, [`Outcome::Failed`]). Each survivor is checked against the float64 reference on small
//! problems ([`gpu::check`] restricted to the candidate, N in [`CHECK_SEQS`], all data regimes); a
//! wrong variant is [`Outcome::WrongResult`] and never chosen. The rest are timed with CUDA events
//! ([`gpu::bench::time`]: warm-up, rotating input sets, median) at each requested sequence length on
//! a problem of about [`TOKENS`] tokens ([`problem_shape`]). The fastest per (spec, sequence length)
//! becomes a [`CacheEntry`] with every candidate's result.
//!
//! The forward is timed as for inference (o_saved not written), as `sbgen bench` does; the backward
//! alone (its launch sequence, including the zeroing of its f32 workspace) on what the spec's default
//! forward saved. TFLOP/s: 4 B H N^2 D / 2 for the forward and 2.5 times that for the backward
//! (DESIGN §7 counts forward + backward as 3.5 times the forward).
//!
//! A wall-time budget ([`Budget`]) bounds the checking and timing: once spent, the remaining
//! candidates are [`Outcome::NotRun`] (the defaults are still timed), and the report says so.

use crate::cache::{self, candidates_checksum, seq_bucket, CacheEntry, CandidateResult, Outcome};
use crate::compile::Compiler;
use crate::gpu::bench::{self, fwd_flops, BenchPlan};
use crate::gpu::check::{self, CheckPlan};
use crate::gpu::data::Regime;
use crate::gpu::device::{self, Device, GpuError};
use crate::gpu::exec::{self, ForwardOutputs, GradOutputs};
use crate::gpu::kernels::{ptx_file_name, KernelBuilder};
use crate::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};
use crate::lower::lower;
use crate::search_space::variants;
use sbgen_runtime::launcher::{KernelBinary, SbElement};
use sbgen_runtime::reference::Shape;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tokens (B * H * N) of each timed problem: 2^18, e.g. 8 x 16 x 2048 or 2 x 16 x 8192.
pub const TOKENS: usize = 1 << 18;
/// Heads of the timed problems (fewer only when N > TOKENS / 16).
pub const HEADS: usize = 16;
/// Sequence lengths of the correctness check of each candidate (one partial block, several blocks).
pub const CHECK_SEQS: &[usize] = &[17, 256];
/// Sequence lengths tuned when none are given.
pub const DEFAULT_SEQS: &[usize] = &[2048, 8192];
/// The longest sequence `--seq` accepts: there the timed problem (1 x 2 x 131072) is already 8x the
/// work of the N = 16384 one, and every candidate is timed 20 times.
pub const MAX_SEQ: usize = 1 << 17;
/// Wall-time budget of a run when none is given, in seconds: the default specs (head_dim 64 and
/// 128, bf16 and f16, forward and backward) took 118 s in all on the H200 (2026-11-29; one
/// (head_dim, dtype) pair 33-49 s), so they are all tuned in full with room to spare.
pub const DEFAULT_BUDGET_S: f64 = 180.0;

/// What to tune.
#[derive(Clone, Debug)]
pub struct TunePlan {
    pub arch: Arch,
    pub specs: Vec<Spec>,
    /// Sequence lengths to time; each becomes a cache bucket ([`seq_bucket`]).
    pub seqs: Vec<usize>,
    /// Wall-time bound on checking and timing (`None`: unbounded).
    pub budget: Option<Duration>,
    /// Parallel compilations (when compiling here).
    pub jobs: usize,
    /// Timed repetitions (median), warm-up launches, input sets rotated through.
    pub reps: usize,
    pub warmup: usize,
    pub sets: usize,
    pub seed: u64,
    /// Folder of prebuilt PTX; `None`: compile with the local toolchain.
    pub ptx_dir: Option<PathBuf>,
}

impl TunePlan {
    pub fn new(arch: Arch, specs: Vec<Spec>) -> Self {
        TunePlan {
            arch,
            specs,
            seqs: DEFAULT_SEQS.to_vec(),
            budget: Some(Duration::from_secs_f64(DEFAULT_BUDGET_S)),
            jobs: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            reps: 20,
            warmup: 3,
            sets: 3,
            seed: 0x5b5b_0001,
            ptx_dir: None,
        }
    }
}

/// Why tuning stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TuneError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("`--gpu {requested}` does not match the device: {device} runs {found} kernels (use `--gpu {found}`)")]
    ArchMismatch { requested: Arch, found: Arch, device: String },
    #[error(
        "no CUDA toolchain to compile the variants ({toolchain}) and no PTX folder: build one where the \
         toolchain is with `sbgen tune --gpu {arch} --compile-only --emit-ptx DIR` and pass `--ptx-dir DIR` \
         (or set SBGEN_PTX_DIR)"
    )]
    NoKernels { arch: Arch, toolchain: String },
    /// A kernel the run needs (not a candidate) could not be built.
    #[error("{what}: {message}")]
    Kernel { what: &'static str, message: String },
    #[error("cannot create the scratch folder `{}`: {source}", .path.display())]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<cudarc::driver::DriverError> for TuneError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        TuneError::Gpu(GpuError::Driver(e))
    }
}

/// A wall-time budget. `spent_after` is the whole rule, so it can be tested without a clock.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    pub limit: Option<Duration>,
    start: Instant,
}

impl Budget {
    pub fn start(limit: Option<Duration>) -> Self {
        Budget { limit, start: Instant::now() }
    }
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
    /// Whether the budget is spent once `elapsed` has passed.
    pub fn spent_after(&self, elapsed: Duration) -> bool {
        self.limit.is_some_and(|limit| elapsed >= limit)
    }
    pub fn spent(&self) -> bool {
        self.spent_after(self.elapsed())
    }
    /// `12 s of 90 s` (or `12 s, no budget`), for progress lines.
    pub fn progress_after(&self, elapsed: Duration) -> String {
        match self.limit {
            Some(limit) => format!("{:.0} s of {:.0} s", elapsed.as_secs_f64(), limit.as_secs_f64()),
            None => format!("{:.0} s, no budget", elapsed.as_secs_f64()),
        }
    }
}

/// The outcomes of `order` (the default first), measuring each with `measure` until `spent()` says
/// the budget is gone: the first candidate (the default) is always measured, later ones become
/// [`Outcome::NotRun`]. Candidates that already have an outcome (pruned, failed, wrong) keep it.
pub fn measure_within_budget(
    order: &[CandidateResult],
    spent: &mut dyn FnMut() -> bool,
    measure: &mut dyn FnMut(&Schedule) -> Outcome,
) -> (Vec<CandidateResult>, usize) {
    let mut not_run = 0;
    let results = order
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if !matches!(c.outcome, Outcome::NotRun { .. }) {
                return c.clone();
            }
            let outcome = if i > 0 && spent() {
                not_run += 1;
                Outcome::NotRun { reason: "time budget spent (--budget-s)".into() }
            } else {
                measure(&c.schedule)
            };
            CandidateResult { schedule: c.schedule, outcome }
        })
        .collect();
    (results, not_run)
}

/// The index of the fastest timed candidate (the first of equals), if any was timed.
pub fn choose_winner(candidates: &[CandidateResult]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.outcome.ms().map(|ms| (i, ms)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// The timed problem for sequence length `seq`: H = 16 heads and B = TOKENS / (16 N) (at least 1;
/// fewer heads when N > TOKENS / 16), so B H N ~ `tokens`.
pub fn problem_shape(seq: usize, head_dim: u32, tokens: usize) -> Shape {
    let seq = seq.max(1);
    let rows = (tokens / seq).max(1);
    let heads = rows.clamp(1, HEADS);
    let batch = (rows / heads).max(1);
    Shape::new(batch, heads, seq, head_dim as usize)
}

/// The work a pass does, as DESIGN §7 counts it.
pub fn pass_flops(pass: Pass, shape: Shape) -> f64 {
    match pass {
        Pass::Forward => fwd_flops(shape),
        Pass::Backward => 2.5 * fwd_flops(shape),
    }
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

/// The summary table's header.
pub fn summary_header() -> String {
    format!(
        "{:<36} {:>6} {:<26} {:>9} {:>8} {:>10} {:>8}  {}",
        "spec", "N", "winner", "ms", "TFLOP/s", "default ms", "speedup", "timed/wrong/failed/not run"
    )
}

/// One line of the summary table.
pub fn format_summary_row(r: &SummaryRow) -> String {
    let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    format!(
        "{:<36} {:>6} {:<26} {:>9} {:>8} {:>10} {:>8}  {}/{}/{}/{}",
        r.spec.slug(),
        r.seq,
        r.winner.map_or("(none)".to_string(), |s| s.to_string()),
        f(r.ms, 3),
        f(r.tflops, 1),
        f(r.default_ms, 3),
        r.speedup().map_or("-".to_string(), |s| format!("{s:.2}x")),
        r.timed,
        r.wrong,
        r.failed,
        r.not_run
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
    /// Backward winners that fail their check on the same bucket's forward winner ([`winner_pairs`]).
    pub pair_failures: Vec<String>,
    /// Specs that stopped on an error of their own (out of memory, a winner that would not build):
    /// `("not tuned: <spec>" or "partly tuned: <spec> (...)", error)`. The other specs' entries,
    /// and this spec's buckets measured before the error, are in `entries`.
    pub spec_errors: Vec<(String, String)>,
    /// The forward/backward pair check ([`winner_pairs`]) could not run; the entries are complete.
    pub pair_check_error: Option<String>,
}

/// Called from the compiling threads with each kernel's index and result.
pub type CompileProgress<'a> = dyn Fn(usize, &Kernel, &Result<(), String>) + Sync + 'a;

/// Compiles `kernels` on `jobs` threads and writes the PTX of each one that compiles without
/// spilling into `dir` (named by [`ptx_file_name`], so a [`KernelBuilder`] on `dir` finds them).
/// Returns, in order, `Ok(())` or the reason a kernel is a loss (compile error, spill).
pub fn compile_to_dir(
    kernels: &[Kernel],
    compiler: &Compiler,
    jobs: usize,
    dir: &Path,
    progress: &CompileProgress<'_>,
) -> Vec<Result<(), String>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<(), String>>>> = Mutex::new(vec![None; kernels.len()]);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, kernels.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(kernel) = kernels.get(i) else { break };
                let result = compile_one(kernel, compiler, dir);
                progress(i, kernel, &result);
                results.lock().unwrap()[i] = Some(result);
            });
        }
    });
    results.into_inner().unwrap().into_iter().map(|r| r.unwrap_or_else(|| Err("not compiled".into()))).collect()
}

fn compile_one(kernel: &Kernel, compiler: &Compiler, dir: &Path) -> Result<(), String> {
    let lowered = lower(kernel).map_err(|e| e.to_string())?;
    let compiled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compiler.compile(&lowered)))
        .map_err(|_| "the compiler panicked".to_string())?
        .map_err(|e| check::short(&e.to_string()))?;
    if compiled.spills() {
        return Err(format!("spills {} bytes (ptxas: {})", compiled.spill_bytes(), compiled.main()));
    }
    write_ptx(dir, &ptx_file_name(&lowered), &compiled.ptx)
}

/// Writes one PTX file through a temp file in the same folder.
pub fn write_ptx(dir: &Path, file: &str, ptx: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    crate::files::write_atomic(&dir.join(file), ptx.as_bytes()).map_err(|e| e.to_string())
}

/// Every candidate of `spec` in timing order: the default schedule first, then the search space's
/// in table order; pruned ones carry their reason, the rest [`Outcome::NotRun`] (to be measured).
/// Also returns the candidate list's checksum.
pub fn candidates(spec: Spec, arch: Arch) -> (Vec<CandidateResult>, String) {
    let all: Vec<(Kernel, Result<(), crate::search_space::Pruned>)> = variants(spec, arch).collect();
    let checksum = candidates_checksum(all.iter().map(|(k, v)| (&k.schedule, v.is_ok())));
    let default = Schedule::default_for(&spec);
    let pending = || Outcome::NotRun { reason: "not measured yet".into() };
    let mut out = vec![CandidateResult { schedule: default, outcome: pending() }];
    for (kernel, verdict) in all {
        if kernel.schedule == default {
            continue;
        }
        let outcome = match verdict {
            Ok(()) => pending(),
            Err(reason) => Outcome::Pruned { reason: reason.to_string() },
        };
        out.push(CandidateResult { schedule: kernel.schedule, outcome });
    }
    (out, checksum)
}

/// The checked-and-timed pipeline for every spec of `plan` on `dev`. Progress lines go to
/// `progress` (the CLI prints them on stderr).
pub fn run(dev: &Device, plan: &TunePlan, progress: &mut dyn FnMut(&str)) -> Result<TuneReport, TuneError> {
    if dev.arch != plan.arch {
        return Err(TuneError::ArchMismatch { requested: plan.arch, found: dev.arch, device: dev.describe() });
    }
    // Kernels: from the PTX folder, or compiled here into a scratch folder (removed on every path).
    let mut _scratch = None;
    let (ptx_dir, compiler) = match &plan.ptx_dir {
        Some(dir) => (dir.clone(), None),
        None => match Compiler::discover() {
            Ok(c) => {
                let dir = ScratchDir::create()?;
                let path = dir.path.clone();
                _scratch = Some(dir);
                (path, Some(c))
            }
            Err(e) => return Err(TuneError::NoKernels { arch: plan.arch, toolchain: e.to_string() }),
        },
    };
    let builder = KernelBuilder::new(plan.arch, Some(ptx_dir));
    let budget = Budget::start(plan.budget);
    let driver =
        device::driver_version().map_or("unknown".to_string(), |v| format!("CUDA {}.{}", v / 1000, (v % 1000) / 10));
    let mut report = TuneReport::default();
    for &spec in &plan.specs {
        match tune_spec(dev, plan, &builder, compiler.as_ref(), spec, &budget, &driver, progress, &mut report) {
            Ok(()) => {}
            Err(TuneError::Gpu(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. }))) => {
                report.aborted = Some(e.to_string());
                break;
            }
            // An error of this spec alone: keep what the others measured and go on.
            Err(e) => {
                progress(&format!("ERROR {}: {e}", spec.slug()));
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
        if let Err(e) = pair_check(dev, plan, &builder, progress, &mut report) {
            report.pair_check_error = Some(e.to_string());
        }
    }
    Ok(report)
}

/// A scratch folder under the temp dir that this process created itself (`create_dir` fails on an
/// existing path, so no other user's folder or link is reused), removed when dropped.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn create() -> Result<Self, TuneError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let mut attempt = 0;
        loop {
            let path = std::env::temp_dir().join(format!("sbgen-tune-{}-{nanos:x}-{attempt}", std::process::id()));
            // `create_dir` (not `_all`) fails when the path exists: the folder is ours alone.
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(ScratchDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 15 => attempt += 1,
                Err(source) => return Err(TuneError::Scratch { path, source }),
            }
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// In training the tuned backward reads what the tuned forward saved, and each was checked with
/// its own schedule's forward: where the two winners of a bucket differ, the backward winner is
/// checked again on the forward winner's saved outputs. A failure is reported in
/// [`TuneReport::pair_failures`] (the entries are still written: the pair is the cache user's choice).
fn pair_check(
    dev: &Device,
    plan: &TunePlan,
    builder: &KernelBuilder,
    progress: &mut dyn FnMut(&str),
    report: &mut TuneReport,
) -> Result<(), TuneError> {
    let pairs = winner_pairs(&report.entries);
    for (fwd, bwd, bucket) in pairs {
        let mut cp = CheckPlan::quick(plan.seed ^ 0x9a1);
        cp.head_dims = vec![bwd.spec.head_dim];
        cp.dtypes = vec![bwd.spec.dtype];
        cp.passes = vec![Pass::Backward];
        cp.masks = vec![bwd.spec.mask];
        cp.layouts = vec![bwd.spec.layout];
        cp.remainders = vec![bwd.spec.remainder];
        cp.early_exits = vec![bwd.spec.early_exit_bits];
        cp.regimes = Regime::ALL.to_vec();
        cp.seqs = CHECK_SEQS.to_vec();
        cp.schedule = Some(bwd.schedule);
        cp.forward_schedule = Some(fwd.schedule);
        let rows = check::run(dev, builder, &cp, &mut |_| {})?;
        let what =
            format!("{} (bucket {bucket}): backward {} on forward {}", bwd.spec.slug(), bwd.schedule, fwd.schedule);
        match check_verdict(&rows) {
            None => progress(&format!("pair ok {what}")),
            Some(outcome) => {
                progress(&format!("PAIR FAILS {what}: {outcome}"));
                report.pair_failures.push(format!("{what}: {outcome}"));
            }
        }
    }
    Ok(())
}

/// The (forward, backward, bucket) winners of the same spec (but the pass), arch and bucket whose
/// schedules differ.
pub fn winner_pairs(entries: &[CacheEntry]) -> Vec<(&CacheEntry, &CacheEntry, u32)> {
    let mut out = Vec::new();
    for bwd in entries.iter().filter(|e| e.spec.pass == Pass::Backward) {
        let fwd_spec = Spec { pass: Pass::Forward, ..bwd.spec };
        let fwd = entries.iter().find(|e| e.spec == fwd_spec && e.arch == bwd.arch && e.seq_bucket == bwd.seq_bucket);
        if let Some(fwd) = fwd.filter(|f| f.schedule != bwd.schedule) {
            out.push((fwd, bwd, bwd.seq_bucket));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn tune_spec(
    dev: &Device,
    plan: &TunePlan,
    builder: &KernelBuilder,
    compiler: Option<&Compiler>,
    spec: Spec,
    budget: &Budget,
    driver: &str,
    progress: &mut dyn FnMut(&str),
    report: &mut TuneReport,
) -> Result<(), TuneError> {
    let (mut cands, checksum) = candidates(spec, plan.arch);
    let default = Schedule::default_for(&spec);
    let kept: Vec<usize> = (0..cands.len()).filter(|&i| !matches!(cands[i].outcome, Outcome::Pruned { .. })).collect();
    progress(&format!(
        "== {} on {}: {} candidates, {} pruned",
        spec.slug(),
        plan.arch.compile_target(),
        cands.len(),
        cands.len() - kept.len()
    ));
    // Pruned candidates: one line per distinct reason (every one is in the cache with its reason).
    let mut reasons: Vec<(&str, usize)> = Vec::new();
    for c in &cands {
        if let Outcome::Pruned { reason } = &c.outcome {
            match reasons.iter_mut().find(|(r, _)| r == reason) {
                Some((_, n)) => *n += 1,
                None => reasons.push((reason, 1)),
            }
        }
    }
    for (reason, n) in reasons {
        progress(&format!("pruned x{n:<3} {reason}"));
    }

    // 1. Kernels: compile here (failures and spills are losses) or take the PTX folder's.
    let kernels: Vec<Kernel> = kept.iter().map(|&i| Kernel::new(spec, cands[i].schedule, plan.arch)).collect();
    // The backward's check and timing run a forward too: the same schedule's (check) and the default's.
    let mut helpers: Vec<Kernel> = Vec::new();
    if spec.pass == Pass::Backward {
        let fwd = Spec { pass: Pass::Forward, ..spec };
        helpers.push(builder.kernel(fwd, None));
        helpers.extend(kernels.iter().map(|k| Kernel { spec: fwd, ..*k }));
        helpers.sort_by_key(|k| k.schedule);
        helpers.dedup();
    }
    if let Some(compiler) = compiler {
        let dir = builder.ptx_dir().expect("the builder has the scratch folder").to_path_buf();
        let total = kernels.len();
        let report_line = Mutex::new(Vec::<String>::new());
        let results = compile_to_dir(&kernels, compiler, plan.jobs, &dir, &|i, k, r| {
            let status = match r {
                Ok(()) => "compiled".to_string(),
                Err(e) => format!("FAIL {e}"),
            };
            report_line.lock().unwrap().push(format!("[{:>2}/{total}] {:<26} {status}", i + 1, k.schedule.to_string()));
        });
        for line in report_line.into_inner().unwrap() {
            progress(&line);
        }
        for (&i, r) in kept.iter().zip(results) {
            if let Err(reason) = r {
                cands[i].outcome = Outcome::Failed { reason };
            }
        }
        // Helpers that are not candidates themselves (their failures show in the check).
        // Those compiled already (the forward spec's candidates, when both passes are tuned) are skipped.
        let compiled = |k: &Kernel| lower(k).is_ok_and(|l| dir.join(ptx_file_name(&l)).is_file());
        let extra: Vec<Kernel> = helpers.iter().filter(|k| !kernels.contains(k) && !compiled(k)).copied().collect();
        compile_to_dir(&extra, compiler, plan.jobs, &dir, &|_, _, _| {});
    }

    // 2. Load every module in parallel (the driver's JIT dominates otherwise); a load failure is a loss.
    let to_load: Vec<(usize, Kernel)> = kept
        .iter()
        .zip(&kernels)
        .filter(|(&i, _)| matches!(cands[i].outcome, Outcome::NotRun { .. }))
        .map(|(&i, k)| (i, *k))
        .collect();
    let loads = preload(dev, builder, &to_load, &helpers, plan.jobs.max(8));
    for (i, r) in loads {
        if let Err(reason) = r {
            progress(&format!("FAIL   {:<26} {reason}", cands[i].schedule.to_string()));
            cands[i].outcome = Outcome::Failed { reason };
        }
    }

    // 3. Check each survivor against the float64 reference.
    let checkable: Vec<usize> =
        kept.iter().copied().filter(|&i| matches!(cands[i].outcome, Outcome::NotRun { .. })).collect();
    for (n, &i) in checkable.iter().enumerate() {
        let schedule = cands[i].schedule;
        if n > 0 && budget.spent() {
            report.budget_spent = true;
            cands[i].outcome = Outcome::NotRun { reason: "time budget spent (--budget-s) before its check".into() };
            continue;
        }
        let verdict = check_candidate(dev, builder, plan, spec, schedule)?;
        if let Some(outcome) = verdict {
            progress(&format!("WRONG  {:<26} {outcome}", schedule.to_string()));
            cands[i].outcome = outcome;
        } else {
            progress(&format!("ok     {:<26} matches the float64 reference", schedule.to_string()));
        }
    }

    // 4. Time the survivors at each sequence length, the default first.
    let sets_seed = plan.seed;
    for &seq in &plan.seqs {
        let shape = problem_shape(seq, spec.head_dim, TOKENS);
        let bench_plan = BenchPlan {
            reps: plan.reps,
            warmup: plan.warmup,
            sets: plan.sets,
            seed: sets_seed,
            layout: spec.layout,
            dtype: spec.dtype,
            ..BenchPlan::new(sets_seed)
        };
        let mut timer = Timer::new(dev, builder, &bench_plan, spec, shape)?;
        let mut fatal: Option<GpuError> = None;
        // Progress counts the candidates to time (those still `NotRun`), not the pruned ones.
        let total = cands.iter().filter(|c| matches!(c.outcome, Outcome::NotRun { .. })).count();
        let mut timed = 0;
        let (results, not_run) = measure_within_budget(&cands, &mut || budget.spent(), &mut |schedule| {
            if fatal.is_some() {
                return Outcome::NotRun { reason: "the CUDA context was lost".into() };
            }
            let outcome = match timer.time(schedule) {
                Ok(o) => o,
                Err(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. })) => {
                    let o = Outcome::Failed { reason: e.to_string() };
                    fatal = Some(e);
                    o
                }
                Err(e) => Outcome::Failed { reason: check::short(&e.to_string()) },
            };
            timed += 1;
            progress(&format!(
                "[{timed:>2}/{total}] {} N={seq:<6} {:<26} {outcome}  ({})",
                spec.slug(),
                schedule.to_string(),
                budget.progress_after(budget.elapsed())
            ));
            outcome
        });
        if not_run > 0 {
            report.budget_spent = true;
        }
        let row = SummaryRow::from_candidates(spec, seq, &default, &results);
        if let Some(w) = choose_winner(&results) {
            let schedule = results[w].schedule;
            let binary = builder
                .build(&Kernel::new(spec, schedule, plan.arch))
                .map_err(|e| TuneError::Kernel { what: "the winner", message: e.to_string() })?;
            report.entries.push(CacheEntry {
                arch: plan.arch,
                spec,
                seq_bucket: seq_bucket(seq),
                schedule,
                kernel_name: binary.name().to_string(),
                time_ms: row.ms.unwrap_or(0.0),
                tflops: row.tflops.unwrap_or(0.0),
                speedup_over_default: row.speedup(),
                shape: Some([shape.batch, shape.heads, shape.seq, shape.head_dim]),
                gpu_name: dev.name.clone(),
                driver_version: driver.to_string(),
                sbgen_version: env!("CARGO_PKG_VERSION").to_string(),
                tuned_at: cache::now_utc(),
                candidates_checksum: checksum.clone(),
                candidates: results.clone(),
                manifest: binary.manifest().clone(),
                ptx: binary.ptx().first().map(|(_, p)| p.clone()).unwrap_or_default(),
                cuda_source_hash: binary.cuda_source().map(cache::source_hash).unwrap_or_default(),
            });
        }
        report.summary.push(row);
        if let Some(e) = fatal {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Builds and loads the candidates' modules (and the helpers') on `threads` threads. Returns each
/// candidate index with its result.
fn preload(
    dev: &Device,
    builder: &KernelBuilder,
    kernels: &[(usize, Kernel)],
    helpers: &[Kernel],
    threads: usize,
) -> Vec<(usize, Result<(), String>)> {
    let all: Vec<(Option<usize>, Kernel)> =
        kernels.iter().map(|&(i, k)| (Some(i), k)).chain(helpers.iter().map(|&k| (None, k))).collect();
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, all.len().max(1)) {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(i, kernel)) = all.get(n) else {
                    break;
                };
                let r = builder
                    .build(&kernel)
                    .map_err(|e| check::short(&e.to_string()))
                    .and_then(|b| dev.launcher.load(&b).map(|_| ()).map_err(|e| check::short(&e.to_string())));
                if let Some(i) = i {
                    out.lock().unwrap().push((i, r));
                }
            });
        }
    });
    let mut v = out.into_inner().unwrap();
    v.sort_by_key(|(i, _)| *i);
    v
}

/// `None` when `schedule` passes [`check`] for `spec` (all data regimes, N in [`CHECK_SEQS`]);
/// otherwise the outcome that records why: [`Outcome::WrongResult`] with the largest error, or
/// [`Outcome::Failed`] when it did not run.
fn check_candidate(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &TunePlan,
    spec: Spec,
    schedule: Schedule,
) -> Result<Option<Outcome>, GpuError> {
    let mut cp = CheckPlan::quick(plan.seed);
    cp.head_dims = vec![spec.head_dim];
    cp.dtypes = vec![spec.dtype];
    cp.passes = vec![spec.pass];
    cp.masks = vec![spec.mask];
    cp.layouts = vec![spec.layout];
    cp.remainders = vec![spec.remainder];
    cp.early_exits = vec![spec.early_exit_bits];
    cp.regimes = Regime::ALL.to_vec();
    cp.seqs = CHECK_SEQS.to_vec();
    cp.schedule = Some(schedule);
    let rows = check::run(dev, builder, &cp, &mut |_| {})?;
    Ok(check_verdict(&rows))
}

/// The outcome of a candidate's check rows: `None` when all passed.
pub fn check_verdict(rows: &[check::Row]) -> Option<Outcome> {
    let failing: Vec<&check::Row> = rows.iter().filter(|r| !r.passed()).collect();
    if failing.is_empty() {
        return None;
    }
    let errors: Vec<f64> = failing
        .iter()
        .flat_map(|r| [r.err_o, r.err_rem, r.err_dq, r.err_dk, r.err_dv])
        .flatten()
        .filter(|e| e.is_finite())
        .collect();
    let did_not_run =
        failing.iter().all(|r| r.failures.iter().all(|f| f.starts_with("build") || f.starts_with("not run")));
    if did_not_run {
        let why = failing.iter().flat_map(|r| r.failures.iter()).next().cloned().unwrap_or_default();
        return Some(Outcome::Failed { reason: check::short(&why) });
    }
    // NaN outputs and writes out of bounds have no finite error: the largest finite value stands in
    // (JSON has no NaN).
    let max_error = errors.into_iter().fold(None, |m: Option<f64>, e| Some(m.map_or(e, |m| m.max(e))));
    Some(Outcome::WrongResult {
        max_error: max_error.filter(|_| failing.iter().all(|r| only_tolerance(r))).unwrap_or(f64::MAX),
    })
}

/// True when every failure of `row` is a tolerance failure (`o 6.0e-3 > 5e-3`), not NaN or out of bounds.
fn only_tolerance(row: &check::Row) -> bool {
    row.failures.iter().all(|f| f.contains(" > ") && !f.contains("NaN"))
}

/// Input sets and outputs of one (spec, shape), and the timing of one schedule on them.
struct Timer<'a> {
    dev: &'a Device,
    builder: &'a KernelBuilder,
    plan: &'a BenchPlan,
    spec: Spec,
    shape: Shape,
    state: State,
}

enum State {
    Bf16(Buffers<half::bf16>),
    F16(Buffers<half::f16>),
}

struct Buffers<T> {
    sets: Vec<exec::DeviceProblem<T>>,
    /// Forward outputs per set (with o_saved for the backward: its saved inputs).
    outs: Vec<ForwardOutputs<T>>,
    grads: Option<GradOutputs<T>>,
}

impl<'a> Timer<'a> {
    fn new(
        dev: &'a Device,
        builder: &'a KernelBuilder,
        plan: &'a BenchPlan,
        spec: Spec,
        shape: Shape,
    ) -> Result<Self, TuneError> {
        let state = match spec.dtype {
            Dtype::Bf16 => State::Bf16(Buffers::new(dev, builder, plan, spec, shape)?),
            Dtype::F16 => State::F16(Buffers::new(dev, builder, plan, spec, shape)?),
        };
        Ok(Timer { dev, builder, plan, spec, shape, state })
    }

    fn time(&mut self, schedule: &Schedule) -> Result<Outcome, GpuError> {
        let kernel = Kernel::new(self.spec, *schedule, self.builder.arch());
        let binary = match self.builder.build(&kernel) {
            Ok(b) => b,
            Err(e) => return Ok(Outcome::Failed { reason: check::short(&e.to_string()) }),
        };
        let ms = match &mut self.state {
            State::Bf16(b) => b.time(self.dev, self.plan, self.spec.pass, &binary)?,
            State::F16(b) => b.time(self.dev, self.plan, self.spec.pass, &binary)?,
        };
        let (median, _, _) = bench::stats(&ms);
        // A time that is not a positive number (a broken event pair) would make the cache unwritable.
        if !(median.is_finite() && median > 0.0) {
            return Ok(Outcome::Failed { reason: format!("the CUDA events gave a time of {median} ms") });
        }
        let tflops = pass_flops(self.spec.pass, self.shape) / (median * 1e-3) / 1e12;
        Ok(Outcome::Timed { ms: median, tflops })
    }
}

impl<T: SbElement> Buffers<T> {
    fn new(
        dev: &Device,
        builder: &KernelBuilder,
        plan: &BenchPlan,
        spec: Spec,
        shape: Shape,
    ) -> Result<Self, TuneError> {
        let sets = bench::upload_sets::<T>(dev, plan, shape)?;
        let backward = spec.pass == Pass::Backward;
        let mut outs = Vec::with_capacity(sets.len());
        for _ in 0..sets.len() {
            outs.push(ForwardOutputs {
                o: dev.stream.alloc_zeros::<T>(shape.len())?,
                rem: dev.stream.alloc_zeros::<f32>(shape.rows())?,
                log2_rem: dev.stream.alloc_zeros::<f32>(shape.rows())?,
                o_saved: if backward { Some(dev.stream.alloc_zeros::<f32>(shape.len())?) } else { None },
            });
        }
        let grads = if backward {
            // The backward's inputs: what the spec's default forward saves, once per set.
            let fwd = builder.build(&builder.kernel(Spec { pass: Pass::Forward, ..spec }, None)).map_err(|e| {
                TuneError::Kernel { what: "the default forward (for timing the backward)", message: e.to_string() }
            })?;
            for (set, out) in sets.iter().zip(outs.iter_mut()) {
                exec::forward_into(dev, &fwd, set, out, None)?;
            }
            dev.sync(fwd.name(), Duration::from_secs(120))?;
            Some(GradOutputs {
                dq: dev.stream.alloc_zeros::<T>(shape.len())?,
                dk: dev.stream.alloc_zeros::<T>(shape.len())?,
                dv: dev.stream.alloc_zeros::<T>(shape.len())?,
            })
        } else {
            None
        };
        Ok(Buffers { sets, outs, grads })
    }

    fn time(
        &mut self,
        dev: &Device,
        plan: &BenchPlan,
        pass: Pass,
        binary: &Arc<KernelBinary>,
    ) -> Result<Vec<f64>, GpuError> {
        let Buffers { sets, outs, grads } = self;
        match (pass, grads) {
            (Pass::Backward, Some(g)) => bench::time(dev, plan, binary, |i| {
                exec::backward_into(dev, binary, &sets[i], exec::Saved::of(&outs[i]), g, None)
            }),
            _ => bench::time(dev, plan, binary, |i| exec::forward_into(dev, binary, &sets[i], &mut outs[i], None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Dtype;
    use sbgen_runtime::reference::Shape;

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
        assert_eq!(choose_winner(&list[..2]), Some(0));
        assert_eq!(choose_winner(&list[1..2]), None);
        // A zero or non-finite time is never a winner.
        assert_eq!(choose_winner(&[timed(s(64, 2), 0.0), timed(s(32, 2), f64::NAN)]), None);
    }

    #[test]
    fn the_budget_stops_new_timings_but_keeps_the_default_and_what_was_measured() {
        let pending = |schedule| CandidateResult { schedule, outcome: Outcome::NotRun { reason: "pending".into() } };
        let order = vec![
            pending(s(64, 3)),
            CandidateResult { schedule: s(128, 3), outcome: Outcome::Pruned { reason: "smem".into() } },
            pending(s(32, 2)),
            pending(s(64, 2)),
            pending(s(32, 3)),
        ];
        // A fake clock: each measurement takes 10 s; the budget is 15 s.
        let budget = Budget::start(Some(Duration::from_secs(15)));
        let elapsed = std::cell::Cell::new(Duration::ZERO);
        let mut measured = Vec::new();
        let (results, not_run) = measure_within_budget(&order, &mut || budget.spent_after(elapsed.get()), &mut |sch| {
            elapsed.set(elapsed.get() + Duration::from_secs(10));
            measured.push(*sch);
            Outcome::Timed { ms: sch.block_n as f64, tflops: 1.0 }
        });
        assert_eq!(measured, vec![s(64, 3), s(32, 2)]);
        assert_eq!(not_run, 2);
        assert!(matches!(results[1].outcome, Outcome::Pruned { .. }));
        assert!(matches!(&results[3].outcome, Outcome::NotRun { reason } if reason.contains("--budget-s")));
        assert_eq!(choose_winner(&results), Some(2));

        // Already spent: the default is still timed, nothing else.
        let mut n = 0;
        let (_, not_run) = measure_within_budget(&order, &mut || true, &mut |_| {
            n += 1;
            Outcome::Timed { ms: 1.0, tflops: 1.0 }
        });
        assert_eq!((n, not_run), (1, 3));
        // No limit: never spent.
        let unlimited = Budget::start(None);
        assert!(!unlimited.spent_after(Duration::from_secs(1_000_000)));
        assert!(Budget::start(Some(Duration::from_secs(1))).spent_after(Duration::from_secs(1)));
    }

    #[test]
    fn scratch_folders_are_distinct_and_removed_on_drop() {
        let (a, b) = (ScratchDir::create().unwrap(), ScratchDir::create().unwrap());
        assert_ne!(a.path, b.path);
        assert!(a.path.is_dir() && b.path.is_dir());
        std::fs::write(a.path.join("x.ptx"), "x").unwrap();
        let path = a.path.clone();
        drop(a);
        assert!(!path.exists(), "a scratch folder outlived its run");
    }

    #[test]
    fn progress_shows_the_time_spent_against_the_budget() {
        let b = Budget::start(Some(Duration::from_secs(90)));
        assert_eq!(b.progress_after(Duration::from_millis(12_400)), "12 s of 90 s");
        assert_eq!(Budget::start(None).progress_after(Duration::from_secs(3)), "3 s, no budget");
    }

    #[test]
    fn problems_hold_about_2_18_tokens_with_16_heads() {
        assert_eq!(problem_shape(2048, 128, TOKENS), Shape::new(8, 16, 2048, 128));
        assert_eq!(problem_shape(8192, 64, TOKENS), Shape::new(2, 16, 8192, 64));
        assert_eq!(problem_shape(16384, 128, TOKENS), Shape::new(1, 16, 16384, 128));
        assert_eq!(problem_shape(65536, 128, TOKENS), Shape::new(1, 4, 65536, 128));
        assert_eq!(problem_shape(1 << 20, 128, TOKENS), Shape::new(1, 1, 1 << 20, 128));
        assert_eq!(problem_shape(1000, 128, TOKENS), Shape::new(16, 16, 1000, 128));
        let s = problem_shape(3000, 128, TOKENS);
        assert!(s.batch * s.heads * s.seq <= TOKENS && s.batch * s.heads * s.seq > TOKENS / 2, "{s:?}");
    }

    #[test]
    fn the_backward_counts_two_and_a_half_forwards() {
        let shape = Shape::new(8, 16, 2048, 128);
        assert_eq!(pass_flops(Pass::Backward, shape), 2.5 * pass_flops(Pass::Forward, shape));
    }

    #[test]
    fn candidates_start_with_the_default_and_carry_the_pruning_reasons() {
        for pass in [Pass::Forward, Pass::Backward] {
            let spec = Spec::new(128, Dtype::Bf16, pass);
            let (list, checksum) = candidates(spec, Arch::Sm90);
            assert_eq!(list[0].schedule, Schedule::default_for(&spec));
            assert_eq!(list.iter().filter(|c| c.schedule == list[0].schedule).count(), 1);
            assert!(list.iter().any(|c| matches!(&c.outcome, Outcome::Pruned { reason } if !reason.is_empty())));
            let pending = list.iter().filter(|c| matches!(c.outcome, Outcome::NotRun { .. })).count();
            let kept = variants(spec, Arch::Sm90).filter(|(_, v)| v.is_ok()).count();
            assert_eq!(pending, kept, "the default is one of the kept candidates");
            assert!(checksum.starts_with("fnv1a64:"));
            assert_eq!(checksum, candidates(spec, Arch::Sm90).1);
        }
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
    }

    /// The compile-here path with the real NVRTC and ptxas (skipped without the toolchain): the PTX
    /// lands under the name a `KernelBuilder` on the folder looks for, a kernel that does not lower
    /// is a named loss, and no temp file is left behind.
    #[test]
    fn compile_to_dir_writes_ptx_a_builder_finds_and_names_the_losses() {
        let compiler = match Compiler::discover() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let dir = std::env::temp_dir().join(format!("sbgen-tune-compile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = Spec::new(64, Dtype::Bf16, Pass::Forward);
        let good = Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm80);
        let bad = Kernel::new(spec, Schedule { block_n: 48, ..Schedule::DEFAULT }, Arch::Sm80);
        let seen = Mutex::new(Vec::new());
        let results =
            compile_to_dir(&[good, bad], &compiler, 2, &dir, &|i, _, r| seen.lock().unwrap().push((i, r.is_ok())));
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(results[1].as_ref().unwrap_err().contains("`block_n`"), "{:?}", results[1]);
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, vec![(0, true), (1, false)]);
        let file = dir.join(ptx_file_name(&lower(&good).unwrap()));
        assert!(std::fs::read_to_string(&file).unwrap().contains(".entry"), "{}", file.display());
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let builder = KernelBuilder::new(Arch::Sm80, Some(dir.clone()));
        let binary = builder.build(&good).unwrap();
        assert_eq!(binary.ptx()[0].1, std::fs::read_to_string(&file).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
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
    fn check_rows_become_wrong_results_with_a_finite_error() {
        use crate::gpu::data::Regime;
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let row = |failures: Vec<&str>, err_o: Option<f64>| check::Row {
            spec,
            regime: Regime::Random,
            shape: Shape::new(3, 5, 17, 128),
            err_o,
            err_rem: Some(1e-4),
            err_dq: None,
            err_dk: None,
            err_dv: None,
            failures: failures.into_iter().map(String::from).collect(),
        };
        assert_eq!(check_verdict(&[row(vec![], Some(1e-3))]), None);
        assert_eq!(
            check_verdict(&[row(vec![], Some(1e-3)), row(vec!["o 6.00e-3 > 5e-3"], Some(6e-3))]),
            Some(Outcome::WrongResult { max_error: 6e-3 })
        );
        assert_eq!(
            check_verdict(&[row(vec!["3 of 10 o elements NaN/inf (unwritten?)"], Some(f64::NAN))]),
            Some(Outcome::WrongResult { max_error: f64::MAX })
        );
        assert!(matches!(
            check_verdict(&[row(vec!["build: no PTX for `x`"], None)]),
            Some(Outcome::Failed { reason }) if reason.contains("no PTX")
        ));
        // What the cache stores is valid JSON (no NaN).
        let text = serde_json::to_string(&check_verdict(&[row(vec!["wrote 3 elements outside `o`"], None)])).unwrap();
        assert!(!text.contains("null"), "{text}");
    }
}
