//! `sbgen bench`: forward and forward+backward times of the benchmark problems, with CUDA events.
//!
//! For each problem and early-exit setting: the kernels are first checked against the float64
//! reference on a small problem (N = 256, all three data regimes, the problem's K/V head grouping,
//! and for THD a packed batch of [`CHECK_VARLEN`] too; see [`super::check`]) so a wrong kernel is
//! never timed; then `sets` input sets of N(0, 1) data are uploaded (never zeros), a few warm-up
//! launches run, and each of `reps` repetitions is timed with its own pair of CUDA events, rotating
//! through the input sets. The figure is the median; min and max are kept too.
//!
//! TFLOP/s counts 4 H n^2 D / 2 per sequence of n tokens (4 B H N^2 D / 2 for a dense batch) for the
//! forward and 3.5 times that for forward+backward, whatever the kernel actually computes (early
//! exit skips work, so its figure is "equivalent"; docs/performance.md#counting). The forward alone
//! runs as for inference (o_saved not written); forward+backward is one forward that saves o in f32
//! and one backward launch sequence (including the zeroing of the backward's f32 workspace).
//!
//! A packed batch (THD) is timed as one launch ([`Mode::Packed`]); with `separate`, also as its
//! sequences one at a time, the times summed ([`Mode::Separate`], the same THD kernels on B = 1),
//! and as one dense BNHD batch with every sequence padded to the longest ([`Mode::Padded`]). All
//! three are credited with the packed batch's work, so their TFLOP/s compare as their times do.

use super::check::{self, CheckPlan, KvHeads};
use super::data::{normal, Sequences};
use super::device::{Device, GpuError};
use super::exec::{self, DeviceProblem, ForwardOutputs, GradOutputs};
use super::kernels::KernelBuilder;
use crate::ir::{Dtype, Layout, Mask, Pass, Remainder, Schedule, Spec};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;
use rand::rngs::StdRng;
use rand::SeedableRng;
use sbgen_runtime::launcher::{KernelBinary, SbElement};
use sbgen_runtime::reference::Shape;
use serde::Serialize;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The benchmark shapes of docs/performance.md#counting: (B, H, N, D).
pub const DEFAULT_SHAPES: &[(usize, usize, usize, usize)] =
    &[(8, 16, 2048, 128), (4, 16, 4096, 128), (2, 16, 8192, 128), (1, 16, 16384, 128), (4, 16, 4096, 64)];

/// The packed batch a THD kernel is also checked on before it is timed (here and by the tuner): an
/// empty and a one-token sequence beside longer ones, so sequence boundaries fall inside blocks.
pub const CHECK_VARLEN: &[usize] = &[0, 1, 17, 256];

/// One batch to time: its shape (for a packed batch, B = the number of sequences and N = the
/// longest) and the length of each sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub shape: Shape,
    pub seq_lens: Vec<usize>,
}

impl Problem {
    /// B sequences of N tokens.
    pub fn dense(shape: Shape) -> Self {
        Problem { shape, seq_lens: vec![shape.seq; shape.batch] }
    }

    /// Sequences of `seq_lens` tokens with `heads` query heads, `kv_heads` K/V heads and `head_dim`.
    pub fn packed(heads: usize, kv_heads: usize, head_dim: usize, seq_lens: Vec<usize>) -> Self {
        let longest = seq_lens.iter().copied().max().unwrap_or(0);
        Problem { shape: Shape::new(seq_lens.len(), heads, longest, head_dim).with_kv_heads(kv_heads), seq_lens }
    }

    /// The forward's work as docs/performance.md#counting counts it.
    pub fn fwd_flops(&self) -> f64 {
        fwd_flops(self.shape.heads, self.shape.head_dim, &self.seq_lens)
    }
}

/// `count:min..max:total` of sequence lengths (no spaces: one report column).
pub fn lens_summary(lens: &[usize]) -> String {
    let (min, max) = (lens.iter().min().unwrap_or(&0), lens.iter().max().unwrap_or(&0));
    format!("{}:{min}..{max}:{}", lens.len(), lens.iter().sum::<usize>())
}

/// How a timed batch is laid out and launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// B sequences of N tokens in a dense layout (BHND or BNHD), one launch.
    Dense,
    /// The sequences packed in the THD layout, one launch.
    Packed,
    /// Each sequence of the packed batch launched on its own (THD, B = 1), the times summed.
    Separate,
    /// Every sequence padded to the longest: one dense BNHD batch of B = the number of sequences.
    Padded,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Dense => "dense",
            Mode::Packed => "packed",
            Mode::Separate => "separate",
            Mode::Padded => "padded",
        })
    }
}

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    /// Dense batches, or packed batches when `layout` is THD.
    pub problems: Vec<Problem>,
    pub dtype: Dtype,
    pub mask: Mask,
    pub layout: Layout,
    pub early_exits: Vec<Option<u32>>,
    /// `None`: each spec's default schedule on the device's arch ([`Schedule::default_on`]).
    pub schedule: Option<Schedule>,
    /// The backward kernels are the deterministic ones.
    pub deterministic: bool,
    /// THD only: also time [`Mode::Separate`] and [`Mode::Padded`].
    pub separate: bool,
    /// Timed repetitions (the median is reported); at least 20.
    pub reps: usize,
    pub warmup: usize,
    /// Input sets rotated through.
    pub sets: usize,
    pub seed: u64,
    /// Also time forward+backward.
    pub backward: bool,
}

impl BenchPlan {
    pub fn new(seed: u64) -> Self {
        BenchPlan {
            problems: DEFAULT_SHAPES.iter().map(|&(b, h, n, d)| Problem::dense(Shape::new(b, h, n, d))).collect(),
            dtype: Dtype::Bf16,
            mask: Mask::Strict,
            layout: Layout::Bhnd,
            early_exits: vec![None, Some(24)],
            schedule: None,
            deterministic: false,
            separate: false,
            reps: 30,
            warmup: 5,
            sets: 3,
            seed,
            backward: true,
        }
    }

    /// The spec of `pass` in `layout`.
    pub fn spec(&self, head_dim: u32, pass: Pass, layout: Layout, early_exit_bits: Option<u32>) -> Spec {
        Spec {
            head_dim,
            dtype: self.dtype,
            mask: self.mask,
            layout,
            remainder: Remainder::Return,
            pass,
            early_exit_bits,
            deterministic: self.deterministic && pass == Pass::Backward,
        }
    }

    /// The layouts whose kernels the plan runs: its own, and BNHD for [`Mode::Padded`].
    pub fn layouts(&self) -> Vec<Layout> {
        if self.separate && self.layout == Layout::Thd {
            vec![Layout::Thd, Layout::Bnhd]
        } else {
            vec![self.layout]
        }
    }

    /// The passes whose kernels the plan runs.
    pub fn passes(&self) -> Vec<Pass> {
        if self.backward {
            vec![Pass::Forward, Pass::Backward]
        } else {
            vec![Pass::Forward]
        }
    }

    /// The mode of a batch timed in the plan's own layout.
    fn main_mode(&self) -> Mode {
        if self.layout == Layout::Thd {
            Mode::Packed
        } else {
            Mode::Dense
        }
    }
}

/// One timed configuration.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// [B, H, N, D] (for a packed batch: B sequences, the longest N).
    pub shape: [usize; 4],
    /// K/V heads (H for multi-head attention, fewer for GQA, 1 for MQA).
    pub kv_heads: usize,
    pub mode: Mode,
    /// The sequences' lengths (packed, separate and padded modes).
    pub seq_lens: Option<Vec<usize>>,
    /// `fwd` or `fwd+bwd`.
    pub pass: &'static str,
    pub early_exit_bits: Option<u32>,
    pub kernels: Vec<String>,
    pub ms_median: Option<f64>,
    pub ms_min: Option<f64>,
    pub ms_max: Option<f64>,
    /// TFLOP/s-equivalent at the median time (docs/performance.md#counting).
    pub tflops: Option<f64>,
    /// Separate and padded modes: the packed batch's median time over this one (the targets are
    /// <= 1.1 against separate and < 1 against padded).
    pub packed_ratio: Option<f64>,
    pub reps: usize,
    /// Why it was not timed (a kernel that failed its check, a build or launch error).
    pub error: Option<String>,
}

/// The forward's work as docs/performance.md#counting counts it: 4 H n^2 D / 2 for each sequence of
/// n tokens (4 B H N^2 D / 2 for B sequences of N).
pub fn fwd_flops(heads: usize, head_dim: usize, seq_lens: &[usize]) -> f64 {
    let squares: f64 = seq_lens.iter().map(|&n| (n as f64).powi(2)).sum();
    4.0 * heads as f64 * squares * head_dim as f64 / 2.0
}

/// Median, min and max of `v` (not empty).
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    (median, s[0], s[n - 1])
}

/// Runs the plan; each result goes to `sink` as it is measured.
pub fn run(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &BenchPlan,
    sink: &mut dyn FnMut(&BenchResult),
) -> Result<Vec<BenchResult>, GpuError> {
    let mut bench = Bench { dev, builder, verified: Vec::new() };
    let mut results = Vec::new();
    let mut emit = |r: BenchResult| {
        sink(&r);
        results.push(r);
    };
    for problem in &plan.problems {
        for &ee in &plan.early_exits {
            let flops = problem.fwd_flops();
            let packed = bench.time(plan, problem, ee)?;
            for row in &packed {
                emit(row.result(plan.main_mode(), problem, ee, flops, None));
            }
            if !(plan.separate && plan.layout == Layout::Thd) {
                continue;
            }
            let packed_ms: Vec<Option<f64>> = packed.iter().map(|r| r.median()).collect();
            for (row, packed_ms) in bench.separate(plan, problem, ee)?.iter().zip(&packed_ms) {
                emit(row.result(Mode::Separate, problem, ee, flops, *packed_ms));
            }
            // Padded: the dense batch of the longest sequence, in BNHD (the THD layout's memory order).
            let padded_plan = BenchPlan { layout: Layout::Bnhd, separate: false, ..plan.clone() };
            let padded = Problem::dense(problem.shape);
            for (row, packed_ms) in bench.time(&padded_plan, &padded, ee)?.iter().zip(&packed_ms) {
                emit(row.result(Mode::Padded, problem, ee, flops, *packed_ms));
            }
        }
    }
    Ok(results)
}

/// The times of one pass of one batch: `fwd` or `fwd+bwd`, its kernels, and the milliseconds of
/// each repetition or why there are none.
#[derive(Clone, Debug)]
struct Row {
    pass: &'static str,
    kernels: Vec<String>,
    times: Result<Times, String>,
}

/// Median, min and max milliseconds of a row, and the repetitions behind them.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Times {
    median: f64,
    min: f64,
    max: f64,
    reps: usize,
}

impl Times {
    fn of(ms: &[f64]) -> Self {
        let (median, min, max) = stats(ms);
        Times { median, min, max, reps: ms.len() }
    }
}

impl Row {
    fn median(&self) -> Option<f64> {
        self.times.as_ref().ok().map(|t| t.median)
    }

    /// The report's result, crediting the forward with `fwd_flops` (3.5 times that with the backward).
    fn result(
        &self,
        mode: Mode,
        problem: &Problem,
        ee: Option<u32>,
        fwd_flops: f64,
        packed_ms: Option<f64>,
    ) -> BenchResult {
        let s = problem.shape;
        let flops = if self.pass == "fwd" { fwd_flops } else { 3.5 * fwd_flops };
        let times = self.times.as_ref().ok();
        BenchResult {
            shape: [s.batch, s.heads, s.seq, s.head_dim],
            kv_heads: s.kv_heads,
            mode,
            seq_lens: (mode != Mode::Dense).then(|| problem.seq_lens.clone()),
            pass: self.pass,
            early_exit_bits: ee,
            kernels: self.kernels.clone(),
            ms_median: times.map(|t| t.median),
            ms_min: times.map(|t| t.min),
            ms_max: times.map(|t| t.max),
            tflops: times.map(|t| flops / (t.median * 1e-3) / 1e12),
            packed_ratio: packed_ms.zip(times).map(|(packed, t)| packed / t.median),
            reps: times.map_or(0, |t| t.reps),
            error: self.times.as_ref().err().cloned(),
        }
    }
}

/// The summed times of the same pass over several batches, each taken `count` times: the median,
/// min and max of the sum are the sums of theirs. The first error is the sum's.
fn summed(parts: &[(usize, &Row)]) -> Result<Times, String> {
    let mut sum = Times { median: 0.0, min: 0.0, max: 0.0, reps: usize::MAX };
    for &(count, row) in parts {
        let t = row.times.as_ref().map_err(|e| format!("{} (a sequence of its own): {e}", row.kernels.join(", ")))?;
        let c = count as f64;
        sum = Times {
            median: sum.median + c * t.median,
            min: sum.min + c * t.min,
            max: sum.max + c * t.max,
            reps: sum.reps.min(t.reps),
        };
    }
    if sum.reps == usize::MAX {
        sum.reps = 0;
    }
    Ok(sum)
}

/// The distinct non-zero lengths of `lens` with how often each occurs, in increasing order (an
/// empty sequence has no work of its own to launch).
fn length_counts(lens: &[usize]) -> Vec<(usize, usize)> {
    let mut sorted: Vec<usize> = lens.iter().copied().filter(|&n| n > 0).collect();
    sorted.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::new();
    for n in sorted {
        match out.last_mut() {
            Some((last, count)) if *last == n => *count += 1,
            _ => out.push((n, 1)),
        }
    }
    out
}

/// The outcome of checking the forward and the backward kernel before timing them.
#[derive(Clone, Debug)]
pub(crate) struct Verdict {
    pub(crate) fwd: Result<(), String>,
    pub(crate) bwd: Result<(), String>,
}

/// What a check is run for: the kernels depend on (head_dim, early exit, layout) only; the K/V
/// grouping is checked as the problem has it.
pub(crate) type VerifyKey = (u32, Option<u32>, usize, Layout);

/// The device, the kernels and the verdicts found so far (each key is checked once).
struct Bench<'a> {
    dev: &'a Device,
    builder: &'a KernelBuilder,
    verified: Vec<(VerifyKey, Verdict)>,
}

impl Bench<'_> {
    /// The kernels of `plan` for `problem` checked (once per key), then timed in `plan.layout`.
    fn time(&mut self, plan: &BenchPlan, problem: &Problem, ee: Option<u32>) -> Result<Vec<Row>, GpuError> {
        let key = (problem.shape.head_dim as u32, ee, problem.shape.group(), plan.layout);
        let verdict = match self.verified.iter().find(|(k, _)| *k == key) {
            Some((_, v)) => v.clone(),
            None => {
                let v = verify(self.dev, self.builder, plan, key)?;
                self.verified.push((key, v.clone()));
                v
            }
        };
        match plan.dtype {
            Dtype::Bf16 => time_batch::<half::bf16>(self.dev, self.builder, plan, problem, ee, verdict),
            Dtype::F16 => time_batch::<half::f16>(self.dev, self.builder, plan, problem, ee, verdict),
        }
    }

    /// Each sequence of the packed `problem` as a batch of its own (THD, B = 1); one row per pass
    /// with the times summed over the sequences.
    fn separate(&mut self, plan: &BenchPlan, problem: &Problem, ee: Option<u32>) -> Result<Vec<Row>, GpuError> {
        let s = problem.shape;
        let mut parts: Vec<(usize, Vec<Row>)> = Vec::new();
        for (len, count) in length_counts(&problem.seq_lens) {
            let one = Problem::packed(s.heads, s.kv_heads, s.head_dim, vec![len]);
            parts.push((count, self.time(plan, &one, ee)?));
        }
        let Some((_, first)) = parts.first() else {
            return Ok(Vec::new());
        };
        Ok((0..first.len())
            .map(|i| {
                let rows: Vec<(usize, &Row)> = parts.iter().map(|(count, rows)| (*count, &rows[i])).collect();
                Row { pass: first[i].pass, kernels: first[i].kernels.clone(), times: summed(&rows) }
            })
            .collect())
    }
}

/// Checks the forward and backward kernels of `key` on N = 256 (and the packed batch
/// [`CHECK_VARLEN`] for THD).
pub(crate) fn verify(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &BenchPlan,
    key: VerifyKey,
) -> Result<Verdict, GpuError> {
    let (head_dim, ee, group, layout) = key;
    let mut check = CheckPlan::full(plan.seed);
    check.head_dims = vec![head_dim];
    check.dtypes = vec![plan.dtype];
    check.passes = plan.passes();
    check.masks = vec![plan.mask];
    check.layouts = vec![layout];
    check.remainders = vec![Remainder::Return];
    check.early_exits = vec![ee];
    check.seqs = vec![256];
    check.kv_heads = vec![KvHeads::Group(group.max(1))];
    check.varlen = if layout == Layout::Thd { CHECK_VARLEN.to_vec() } else { Vec::new() };
    check.deterministic = vec![plan.deterministic];
    check.schedule = plan.schedule;
    let rows = check::run(dev, builder, &check, &mut |_| {})?;
    let verdict = |pass: Pass| {
        let failures: Vec<String> = rows
            .iter()
            .filter(|r| r.spec.pass == pass && !r.passed())
            .map(|r| {
                let why: Vec<String> = r.failures.iter().map(check::short).collect();
                format!("{} on {} data: {}", r.spec.slug(), r.regime, why.join("; "))
            })
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(format!("failed its check, not timed: {}", failures.join(" | ")))
        }
    };
    Ok(Verdict { fwd: verdict(Pass::Forward), bwd: verdict(Pass::Backward) })
}

/// Times the forward (and forward+backward) of `problem` in `plan.layout`.
fn time_batch<T: SbElement>(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &BenchPlan,
    problem: &Problem,
    ee: Option<u32>,
    verdict: Verdict,
) -> Result<Vec<Row>, GpuError> {
    let shape = problem.shape;
    let d = shape.head_dim as u32;
    let fwd_kernel = builder.kernel(plan.spec(d, Pass::Forward, plan.layout, ee), plan.schedule);
    let bwd_kernel = builder.kernel(plan.spec(d, Pass::Backward, plan.layout, ee), plan.schedule);
    let row = |pass, kernels| Row { pass, kernels, times: Err("not timed".to_string()) };
    let mut out = vec![row("fwd", vec![fwd_kernel.name()])];
    if plan.backward {
        out.push(row("fwd+bwd", vec![fwd_kernel.name(), bwd_kernel.name()]));
    }
    // The forward must pass its check and build for either row; the backward for the second.
    let fwd = match verdict.fwd.and_then(|()| builder.build(&fwd_kernel).map_err(|e| check::short(&e.to_string()))) {
        Ok(f) => f,
        Err(e) => {
            out.iter_mut().for_each(|r| r.times = Err(e.clone()));
            return Ok(out);
        }
    };
    let bwd = if plan.backward {
        match verdict.bwd.and_then(|()| builder.build(&bwd_kernel).map_err(|e| check::short(&e.to_string()))) {
            Ok(b) => Some(b),
            Err(e) => {
                out[1].times = Err(e);
                None
            }
        }
    } else {
        None
    };
    let sets = upload_sets::<T>(dev, plan, shape, &problem.seq_lens)?;
    let (q_len, kv_len, rows) = (sets[0].q_len(), sets[0].kv_len(), sets[0].rows());
    let mut outs: Vec<ForwardOutputs<T>> = Vec::new();
    for _ in 0..plan.sets {
        outs.push(ForwardOutputs {
            o: dev.stream.alloc_zeros::<T>(q_len)?,
            rem: dev.stream.alloc_zeros::<f32>(rows)?,
            log2_rem: dev.stream.alloc_zeros::<f32>(rows)?,
            // Inference: the forward alone does not save o in f32.
            o_saved: None,
        });
    }
    match time(dev, plan, &fwd, |i| exec::forward_into(dev, &fwd, &sets[i], &mut outs[i], None)) {
        Ok(ms) => out[0].times = Ok(Times::of(&ms)),
        Err(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. })) => return Err(e),
        Err(e) => out[0].times = Err(e.to_string()),
    }
    if let Some(bwd) = bwd {
        let mut grads = GradOutputs {
            dq: dev.stream.alloc_zeros::<T>(q_len)?,
            dk: dev.stream.alloc_zeros::<T>(kv_len)?,
            dv: dev.stream.alloc_zeros::<T>(kv_len)?,
        };
        // Training: the forward saves o in f32 for the backward.
        for o in outs.iter_mut() {
            o.o_saved = Some(dev.stream.alloc_zeros::<f32>(q_len)?);
        }
        let both = |i: usize| -> Result<(), GpuError> {
            let o = &mut outs[i];
            exec::forward_into(dev, &fwd, &sets[i], o, None)?;
            exec::backward_into(dev, &bwd, &sets[i], exec::Saved::of(o), &mut grads, None)
        };
        match time(dev, plan, &bwd, both) {
            Ok(ms) => out[1].times = Ok(Times::of(&ms)),
            Err(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. })) => return Err(e),
            Err(e) => out[1].times = Err(e.to_string()),
        }
    }
    Ok(out)
}

/// Times `launch(set)` over the plan's repetitions; milliseconds per repetition.
pub fn time(
    dev: &Device,
    plan: &BenchPlan,
    kernel: &Arc<KernelBinary>,
    mut launch: impl FnMut(usize) -> Result<(), GpuError>,
) -> Result<Vec<f64>, GpuError> {
    for i in 0..plan.warmup {
        launch(i % plan.sets)?;
    }
    dev.sync(kernel.name(), Duration::from_secs(120))?;
    let event = || dev.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    let mut pairs: Vec<(CudaEvent, CudaEvent)> = Vec::with_capacity(plan.reps);
    for r in 0..plan.reps {
        let (start, end) = (event()?, event()?);
        start.record(&dev.stream)?;
        launch(r % plan.sets)?;
        end.record(&dev.stream)?;
        pairs.push((start, end));
    }
    dev.sync(kernel.name(), Duration::from_secs(300))?;
    let mut ms = Vec::with_capacity(pairs.len());
    for (start, end) in &pairs {
        ms.push(start.elapsed_ms(end)? as f64);
    }
    Ok(ms)
}

/// `plan.sets` input sets of N(0, 1) data (q, k, v, dO) in `plan.layout` for sequences of
/// `seq_lens` tokens (`shape.batch` of them, the longest `shape.seq`; a dense batch has `shape.batch`
/// times `shape.seq`), k and v with `shape.kv_heads` heads, taken as windows of one random pool at
/// offsets that are not multiples of D, so no two tensors repeat each other row for row.
pub fn upload_sets<T: SbElement>(
    dev: &Device,
    plan: &BenchPlan,
    shape: Shape,
    seq_lens: &[usize],
) -> Result<Vec<DeviceProblem<T>>, GpuError> {
    let tokens: usize = seq_lens.iter().sum();
    let (n, n_kv) = (tokens * shape.heads * shape.head_dim, tokens * shape.kv_heads * shape.head_dim);
    let stride = 1031; // prime, not a multiple of any head dimension
    let tensors = 4 * plan.sets;
    let mut rng = StdRng::seed_from_u64(plan.seed ^ n as u64);
    let pool: Vec<T> = normal(&mut rng, n + stride * tensors).into_iter().map(T::from_f32).collect();
    let mut windows = (0..tensors).map(|t| &pool[t * stride..t * stride + n]);
    let mut next = |len: usize| dev.stream.clone_htod(&windows.next().expect("4 tensors per set")[..len]);
    let mut sets = Vec::with_capacity(plan.sets);
    for _ in 0..plan.sets {
        sets.push(DeviceProblem {
            shape,
            layout: plan.layout,
            seq_lens: seq_lens.to_vec(),
            q: next(n)?,
            k: next(n_kv)?,
            v: next(n_kv)?,
            d_o: next(n)?,
            d_rem: None,
            cu_seqlens: exec::upload_cu_seqlens(dev, plan.layout, seq_lens)?,
        });
    }
    Ok(sets)
}

/// The report's columns, in order (the free-text note last, so a line splits on whitespace into
/// the first ten columns and the note).
const COLUMNS: [&str; 12] = [
    "B,H,N,D",
    "pass",
    "exit",
    "ms(med)",
    "ms(min)",
    "ms(max)",
    "TFLOP/s",
    "H:Hkv",
    "mode",
    "lens(n:min..max:T)",
    "packed/x",
    "note",
];

/// The report's header line.
pub fn header() -> String {
    let c = COLUMNS;
    format!(
        "{:<18} {:<8} {:<6} {:>10} {:>10} {:>10} {:>9} {:<7} {:<8} {:<24} {:>8}  {}",
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11]
    )
}

/// One report line: the columns of [`header`]; `-` where a column has no value.
pub fn format_result(r: &BenchResult) -> String {
    let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    let lens = r.seq_lens.as_deref().map_or("-".to_string(), lens_summary);
    format!(
        "{:<18} {:<8} {:<6} {:>10} {:>10} {:>10} {:>9} {:<7} {:<8} {:<24} {:>8}  {}",
        format!("{},{},{},{}", r.shape[0], r.shape[1], r.shape[2], r.shape[3]),
        r.pass,
        r.early_exit_bits.map_or("off".to_string(), |t| format!("T={t}")),
        f(r.ms_median, 3),
        f(r.ms_min, 3),
        f(r.ms_max, 3),
        f(r.tflops, 1),
        format!("{}:{}", r.shape[1], r.kv_heads),
        r.mode.to_string(),
        lens,
        f(r.packed_ratio, 3),
        r.error.as_deref().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_follow_the_counting_convention() {
        // 8,16,2048,128 forward at 0.908 ms is 151 TFLOP/s in the table.
        let f = Problem::dense(Shape::new(8, 16, 2048, 128)).fwd_flops();
        assert!((f / 0.908e-3 / 1e12 - 151.0).abs() < 1.0, "{}", f / 0.908e-3 / 1e12);
        let f = Problem::dense(Shape::new(1, 16, 16384, 128)).fwd_flops();
        assert!((3.5 * f / 35.46e-3 / 1e12 - 109.0).abs() < 1.0);
    }

    #[test]
    fn a_packed_batch_counts_the_work_of_each_sequence() {
        let lens = vec![1000, 0, 3000, 17];
        let one = |n: usize| fwd_flops(16, 96, &[n]);
        assert_eq!(fwd_flops(16, 96, &lens), one(1000) + one(3000) + one(17));
        assert_eq!(one(1000), 4.0 * 16.0 * 1e6 * 96.0 / 2.0);
        // Equal lengths count as the dense batch; K/V heads do not change the work.
        let dense = Problem::dense(Shape::new(4, 16, 2048, 128));
        assert_eq!(dense.fwd_flops(), Problem::packed(16, 2, 128, vec![2048; 4]).fwd_flops());
        assert!(Problem::packed(16, 16, 128, vec![1024, 3072]).fwd_flops() < dense.fwd_flops());
    }

    #[test]
    fn a_packed_problem_has_one_row_per_sequence_and_the_longest_n() {
        let p = Problem::packed(32, 8, 80, vec![512, 0, 4096, 700]);
        assert_eq!(p.shape, Shape::new(4, 32, 4096, 80).with_kv_heads(8));
        assert_eq!(lens_summary(&p.seq_lens), "4:0..4096:5308");
        assert_eq!(Problem::dense(Shape::new(2, 4, 64, 32)).seq_lens, vec![64, 64]);
    }

    #[test]
    fn stats_take_the_median() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }

    #[test]
    fn the_default_plan_times_the_design_shapes_with_and_without_early_exit() {
        let plan = BenchPlan::new(0);
        assert_eq!(plan.problems.len(), 5);
        assert!(plan.problems.iter().all(|p| p.shape.kv_heads == p.shape.heads && p.seq_lens.len() == p.shape.batch));
        assert_eq!(plan.early_exits, vec![None, Some(24)]);
        assert!(plan.reps >= 20);
        assert_eq!((plan.dtype, plan.mask, plan.layout), (Dtype::Bf16, Mask::Strict, Layout::Bhnd));
        assert_eq!((plan.deterministic, plan.separate), (false, false));
        assert_eq!(plan.layouts(), vec![Layout::Bhnd]);
    }

    #[test]
    fn deterministic_applies_to_the_backward_spec_only() {
        let plan = BenchPlan { deterministic: true, ..BenchPlan::new(0) };
        assert!(plan.spec(96, Pass::Backward, Layout::Thd, None).deterministic);
        let fwd = plan.spec(96, Pass::Forward, Layout::Thd, None);
        assert!(!fwd.deterministic);
        assert_eq!(fwd.validate(), Ok(()));
    }

    #[test]
    fn separate_mode_also_runs_the_padded_batch_in_bnhd() {
        let plan = BenchPlan { layout: Layout::Thd, separate: true, ..BenchPlan::new(0) };
        assert_eq!(plan.layouts(), vec![Layout::Thd, Layout::Bnhd]);
        assert_eq!(plan.main_mode(), Mode::Packed);
    }

    #[test]
    fn separate_times_are_summed_per_distinct_length() {
        assert_eq!(length_counts(&[512, 0, 4096, 512, 17]), vec![(17, 1), (512, 2), (4096, 1)]);
        assert!(length_counts(&[0, 0]).is_empty());
        let row = |median: f64| Row {
            pass: "fwd",
            kernels: vec!["k".into()],
            times: Ok(Times { median, min: median - 1.0, max: median + 1.0, reps: 30 }),
        };
        let (a, b) = (row(2.0), row(10.0));
        let sum = summed(&[(2, &a), (1, &b)]).unwrap();
        assert_eq!(sum, Times { median: 14.0, min: 11.0, max: 17.0, reps: 30 });
        let failed = Row { times: Err("launch failed".into()), ..a.clone() };
        let err = summed(&[(2, &a), (1, &failed)]).unwrap_err();
        assert!(err.contains("launch failed") && err.contains("of its own"), "{err}");
    }

    #[test]
    fn report_lines_split_into_the_header_columns_with_the_note_last() {
        let problem = Problem::packed(16, 4, 128, vec![512, 1024, 4096]);
        let row = Row {
            pass: "fwd+bwd",
            kernels: vec!["f".into(), "b".into()],
            times: Ok(Times { median: 2.0, min: 1.9, max: 2.5, reps: 30 }),
        };
        let r = row.result(Mode::Separate, &problem, Some(24), problem.fwd_flops(), Some(1.8));
        assert_eq!(r.packed_ratio, Some(0.9));
        assert_eq!(r.tflops, Some(3.5 * problem.fwd_flops() / 2e-3 / 1e12));
        let line = format_result(&r);
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[..6], ["3,16,4096,128", "fwd+bwd", "T=24", "2.000", "1.900", "2.500"]);
        assert_eq!(cols[6].parse::<f64>().ok(), r.tflops.map(|t| (t * 10.0).round() / 10.0));
        assert_eq!(cols[7..], ["16:4", "separate", "3:512..4096:5632", "0.900"]);
        assert_eq!(header().split_whitespace().collect::<Vec<_>>(), COLUMNS);
        // A dense row without a time: dashes, then the error as the note.
        let dense = Problem::dense(Shape::new(2, 8, 256, 64));
        let failed = Row { times: Err("failed its check, not timed: x".into()), ..row };
        let line = format_result(&failed.result(Mode::Dense, &dense, None, dense.fwd_flops(), None));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[..11], ["2,8,256,64", "fwd+bwd", "off", "-", "-", "-", "-", "8:8", "dense", "-", "-"]);
        assert_eq!(cols[11..].join(" "), "failed its check, not timed: x");
    }
}
