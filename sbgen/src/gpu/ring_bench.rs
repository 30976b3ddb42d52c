//! `sbgen bench --gpus N`: one sequence over N GPUs of this host (context parallelism, the K/V ring
//! over NCCL of `sbgen_dist`; docs/math.md#context-parallelism) against one GPU, in the same run.
//!
//! For each problem and early-exit setting:
//! 1. The ring is checked on the N GPUs before it is timed: a small problem of the same head_dim,
//!    K/V grouping, layout and mask (N = [`check_seq`], odd, so segments end inside blocks), on
//!    N(0, 1) data and on long-reach data (the stick spans every segment, so the state carried
//!    between segments decides the result), forward and gradients against the float64 reference
//!    with `sbgen check`'s tolerances. A failing ring is reported and not timed.
//! 2. The single-GPU kernels are checked as `sbgen bench` checks them (N = 256).
//! 3. N(0, 1) inputs of the problem are made once per shape; the ring runs them (outputs poisoned
//!    first), then the single GPU (`--device`, GPU 0 by default) runs the single-GPU kernels on the
//!    same inputs, and every element of the ring's o, rem (and dq, dk, dv) must be within the
//!    tolerances of the single GPU's.
//! 4. Each rank times its ring passes with CUDA events (median of `reps`, after `warmup`), and the
//!    same passes' transfers alone (the K/V shifts, the copies kept for later steps and the
//!    backward's reduces, no kernels); the single GPU times the single-GPU kernels. The ring's time
//!    is its slowest rank's; speedup = one GPU's time / the ring's, efficiency = speedup / N.

use super::bench::{self, fwd_flops, stats, BenchPlan};
use super::check::{FWD_TOL, GRAD_TOL};
use super::data::{from_layout, make_inputs, normal, rel_l2, to_layout, Regime};
use super::device::{Device, GpuError};
use super::exec::{self, DeviceProblem, ForwardOutputs, GradOutputs, Saved};
use super::kernels::KernelBuilder;
use super::oracle;
use crate::ir::{Dtype, Layout, Mask, Pass, Remainder, Spec};
use rand::rngs::StdRng;
use rand::SeedableRng;
use sbgen_dist::driver::{run_ring, RankTimes, RingInputs, RingKernels, RingOutputs, RingTiming};
use sbgen_dist::{Heads, Partition, Scheme};
use sbgen_runtime::launcher::SbElement;
use sbgen_runtime::reference::{Options, Shape};
use serde::Serialize;

/// The problem `bench --gpus` times when none is given: a long context, where one GPU is slow.
pub const DEFAULT_SHAPE: (usize, usize, usize, usize) = (1, 16, 131072, 128);

/// What to time over several GPUs.
#[derive(Clone, Debug)]
pub struct RingBenchPlan {
    pub problems: Vec<Shape>,
    pub gpus: usize,
    pub scheme: Scheme,
    pub dtype: Dtype,
    pub mask: Mask,
    pub layout: Layout,
    pub early_exits: Vec<Option<u32>>,
    pub backward: bool,
    pub reps: usize,
    pub warmup: usize,
    pub seed: u64,
}

impl RingBenchPlan {
    /// The forward spec the ring and the single GPU run.
    pub fn spec(&self, head_dim: u32, pass: Pass, early_exit_bits: Option<u32>) -> Spec {
        Spec {
            head_dim,
            dtype: self.dtype,
            mask: self.mask,
            layout: self.layout,
            remainder: Remainder::Return,
            pass,
            early_exit_bits,
            deterministic: false,
        }
    }

    fn passes(&self) -> Vec<Pass> {
        if self.backward {
            vec![Pass::Forward, Pass::Backward]
        } else {
            vec![Pass::Forward]
        }
    }
}

/// The sequence length of the ring's check on `gpus` GPUs: segments of about 100 tokens (two per
/// rank under zig-zag), odd, so no segment is a whole number of 64-key blocks.
pub fn check_seq(gpus: usize) -> usize {
    2 * gpus * 100 + 37
}

/// One timed pass of one problem.
#[derive(Clone, Debug, Serialize)]
pub struct RingBenchResult {
    /// [B, H, N, D].
    pub shape: [usize; 4],
    pub kv_heads: usize,
    pub gpus: usize,
    pub scheme: &'static str,
    /// `fwd` or `fwd+bwd`.
    pub pass: &'static str,
    pub early_exit_bits: Option<u32>,
    /// Median milliseconds on the single GPU (`--device`).
    pub one_gpu_ms: Option<f64>,
    /// Each rank's median milliseconds for the ring pass(es).
    pub rank_ms: Vec<f64>,
    /// Each rank's median milliseconds for the same passes' transfers alone (shifts, kept copies,
    /// the backward's reduces; no kernels).
    pub transfers_ms: Vec<f64>,
    /// The slowest rank's median.
    pub ring_ms: Option<f64>,
    /// One GPU's time over the ring's.
    pub speedup: Option<f64>,
    /// speedup / gpus.
    pub efficiency: Option<f64>,
    /// TFLOP/s-equivalent of the ring (docs/performance.md#counting).
    pub tflops: Option<f64>,
    /// The checks passed on the way, in words.
    pub checks: Vec<String>,
    pub reps: usize,
    /// Why it was not timed (a failed check, an NCCL or device error).
    pub error: Option<String>,
}

/// Runs the plan; each result goes to `sink` as it is measured, and `progress` hears what runs.
pub fn run(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &RingBenchPlan,
    sink: &mut dyn FnMut(&RingBenchResult),
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<RingBenchResult>, GpuError> {
    let mut results = Vec::new();
    for &shape in &plan.problems {
        match plan.dtype {
            Dtype::Bf16 => one_shape::<half::bf16>(dev, builder, plan, shape, progress, &mut |r| {
                sink(&r);
                results.push(r);
            })?,
            Dtype::F16 => one_shape::<half::f16>(dev, builder, plan, shape, progress, &mut |r| {
                sink(&r);
                results.push(r);
            })?,
        }
    }
    Ok(results)
}

/// Every early-exit setting of one shape, the inputs made once (when the first setting needs them).
fn one_shape<T: SbElement + cudarc::nccl::safe::NcclType + Default>(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &RingBenchPlan,
    shape: Shape,
    progress: &mut dyn FnMut(&str),
    emit: &mut dyn FnMut(RingBenchResult),
) -> Result<(), GpuError> {
    let mut inputs = None;
    for &ee in &plan.early_exits {
        for r in one_problem::<T>(dev, builder, plan, shape, ee, &mut inputs, progress)? {
            emit(r);
        }
    }
    Ok(())
}

/// The report rows of one problem and early-exit setting: `fwd`, and `fwd+bwd` with the backward.
fn one_problem<T: SbElement + cudarc::nccl::safe::NcclType + Default>(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &RingBenchPlan,
    shape: Shape,
    ee: Option<u32>,
    inputs: &mut Option<ProblemInputs<T>>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<RingBenchResult>, GpuError> {
    let row = |pass: &'static str| RingBenchResult {
        shape: [shape.batch, shape.heads, shape.seq, shape.head_dim],
        kv_heads: shape.kv_heads,
        gpus: plan.gpus,
        scheme: scheme_name(plan.scheme),
        pass,
        early_exit_bits: ee,
        one_gpu_ms: None,
        rank_ms: Vec::new(),
        transfers_ms: Vec::new(),
        ring_ms: None,
        speedup: None,
        efficiency: None,
        tflops: None,
        checks: Vec::new(),
        reps: plan.reps,
        error: None,
    };
    let mut rows: Vec<RingBenchResult> = plan.passes().iter().map(|&p| row(pass_name(p))).collect();
    let fail = |rows: &mut Vec<RingBenchResult>, why: String| {
        rows.iter_mut().for_each(|r| r.error = Some(why.clone()));
    };
    let d = shape.head_dim as u32;
    let kernels = match ring_kernels(builder, plan, d, ee) {
        Ok(k) => k,
        Err(e) => {
            fail(&mut rows, e);
            return Ok(rows);
        }
    };

    // 1. The ring against float64 on a small problem.
    progress(&format!("checking the ring on {} GPUs against float64 (N = {})", plan.gpus, check_seq(plan.gpus)));
    let mut checks = Vec::new();
    for regime in [Regime::Random, Regime::LongReach] {
        match check_ring::<T>(plan, &kernels, shape, ee, regime) {
            Ok(line) => checks.push(line),
            Err(why) => {
                fail(&mut rows, format!("ring check failed, not timed: {why}"));
                return Ok(rows);
            }
        }
    }
    // 2. The single-GPU kernels as `sbgen bench` checks them.
    progress("checking the single-GPU kernels against float64 (N = 256)");
    let bench_plan = single_gpu_plan(plan, shape, ee);
    let verdict = bench::verify(dev, builder, &bench_plan, (d, ee, shape.group(), plan.layout))?;
    if let Err(why) = verdict.fwd.clone().and(if plan.backward { verdict.bwd.clone() } else { Ok(()) }) {
        fail(&mut rows, format!("single-GPU kernels: {why}"));
        return Ok(rows);
    }
    checks.push("single-GPU kernels vs float64 (N = 256) ok".into());

    // 3. The problem itself: the ring, then one GPU on the same inputs.
    let inputs = inputs.get_or_insert_with(|| {
        progress(&format!(
            "making N(0, 1) inputs for {},{},{},{} (H_kv {})",
            shape.batch, shape.heads, shape.seq, shape.head_dim, shape.kv_heads
        ));
        problem_inputs::<T>(shape, plan.seed)
    });
    let part = match Partition::new(shape.seq, plan.gpus, plan.scheme) {
        Ok(p) => p,
        Err(e) => {
            fail(&mut rows, e.to_string());
            return Ok(rows);
        }
    };
    progress(&format!("running and timing the ring on {} GPUs ({} reps)", plan.gpus, plan.reps));
    let ring = run_ring(
        &part,
        heads_of(shape),
        &kernels,
        &RingInputs {
            q: &inputs.q,
            k: &inputs.k,
            v: &inputs.v,
            d_o: plan.backward.then_some(inputs.d_o.as_slice()),
            d_rem: None,
        },
        RingTiming { warmup: plan.warmup, reps: plan.reps },
    );
    let ring = match ring {
        Ok(r) => r,
        Err(e) => {
            fail(&mut rows, format!("the ring: {e}"));
            return Ok(rows);
        }
    };
    progress("running and timing one GPU on the same inputs");
    let single = single_gpu::<T>(dev, builder, &bench_plan, shape, ee, inputs)?;
    let single = match single {
        Ok(s) => s,
        Err(e) => {
            fail(&mut rows, format!("one GPU: {e}"));
            return Ok(rows);
        }
    };
    match compare(&ring, &single, ee) {
        Ok(line) => checks.push(line),
        Err(why) => {
            fail(&mut rows, format!("the ring against one GPU: {why}"));
            return Ok(rows);
        }
    }

    // 4. The figures.
    let work = fwd_flops(shape.heads, shape.head_dim, &vec![shape.seq; shape.batch]);
    for (i, r) in rows.iter_mut().enumerate() {
        let (ranks, transfers, one, flops): (Vec<f64>, Vec<f64>, f64, f64) = if i == 0 {
            (
                median_each(&ring.times, |t| &t.forward),
                median_each(&ring.times, |t| &t.transfers_forward),
                single.fwd_ms,
                work,
            )
        } else {
            (
                median_each(&ring.times, |t| &t.forward_backward),
                median_each(&ring.times, |t| &t.transfers_forward_backward),
                single.fwd_bwd_ms.unwrap_or(f64::NAN),
                3.5 * work,
            )
        };
        let slowest = ranks.iter().copied().fold(f64::NAN, f64::max);
        r.one_gpu_ms = Some(one);
        r.rank_ms = ranks;
        r.transfers_ms = transfers;
        r.ring_ms = Some(slowest);
        r.speedup = Some(one / slowest);
        r.efficiency = Some(one / slowest / plan.gpus as f64);
        r.tflops = Some(flops / (slowest * 1e-3) / 1e12);
        r.checks = checks.clone();
    }
    Ok(rows)
}

fn pass_name(pass: Pass) -> &'static str {
    if pass == Pass::Backward {
        "fwd+bwd"
    } else {
        "fwd"
    }
}

pub fn scheme_name(s: Scheme) -> &'static str {
    match s {
        Scheme::ZigZag => "zigzag",
        Scheme::Contiguous => "contiguous",
    }
}

fn heads_of(s: Shape) -> Heads {
    Heads { batch: s.batch, heads: s.heads, kv_heads: s.kv_heads, head_dim: s.head_dim }
}

/// The segment kernels of the plan's spec at head_dim `d`.
fn ring_kernels(builder: &KernelBuilder, plan: &RingBenchPlan, d: u32, ee: Option<u32>) -> Result<RingKernels, String> {
    let build = |pass: Pass| {
        let kernel = builder.kernel(plan.spec(d, pass, ee), None);
        builder.build(&kernel).map_err(|e| format!("{}: {e}", kernel.name()))
    };
    Ok(RingKernels {
        forward: build(Pass::Segment)?,
        backward: if plan.backward { Some(build(Pass::SegmentBackward)?) } else { None },
    })
}

/// The plan `sbgen bench` would time this problem with on one GPU.
fn single_gpu_plan(plan: &RingBenchPlan, shape: Shape, ee: Option<u32>) -> BenchPlan {
    let mut p = BenchPlan::new(plan.seed);
    p.problems = vec![bench::Problem::dense(shape)];
    p.dtype = plan.dtype;
    p.mask = plan.mask;
    p.layout = plan.layout;
    p.early_exits = vec![ee];
    p.reps = plan.reps;
    p.warmup = plan.warmup;
    p.sets = 1;
    p.backward = plan.backward;
    p
}

/// The forward's tolerance, widened by early exit's bound (a row may stop with up to 2^-T of its
/// stick left, the ring per block of each segment, float64 never).
fn fwd_tol(ee: Option<u32>) -> f64 {
    FWD_TOL + ee.map_or(0.0, |t| 4.0 * 2f64.powi(-(t as i32)))
}

fn grad_tol(ee: Option<u32>) -> f64 {
    GRAD_TOL + ee.map_or(0.0, |t| 4.0 * 2f64.powi(-(t as i32)))
}

/// The ring on a small problem like `shape` against the float64 reference: one line on success,
/// why on failure.
fn check_ring<T: SbElement + cudarc::nccl::safe::NcclType + Default>(
    plan: &RingBenchPlan,
    kernels: &RingKernels,
    shape: Shape,
    ee: Option<u32>,
    regime: Regime,
) -> Result<String, String> {
    let kv_heads = shape.kv_heads.min(2);
    let small = Shape::new(shape.batch.min(2), kv_heads * shape.group(), check_seq(plan.gpus), shape.head_dim)
        .with_kv_heads(kv_heads);
    let x = make_inputs(small, plan.dtype, regime, plan.seed ^ 0x5eed);
    let narrow = |s: Shape, v: &[f32]| to_layout(s, plan.layout, v).into_iter().map(T::from_f32).collect::<Vec<T>>();
    let (q, k, v, d_o) =
        (narrow(small, &x.q), narrow(small.kv(), &x.k), narrow(small.kv(), &x.v), narrow(small, &x.d_o));
    let part = Partition::new(small.seq, plan.gpus, plan.scheme).map_err(|e| e.to_string())?;
    let out = run_ring(
        &part,
        heads_of(small),
        kernels,
        &RingInputs { q: &q, k: &k, v: &v, d_o: plan.backward.then_some(d_o.as_slice()), d_rem: Some(&x.d_rem) },
        RingTiming { warmup: 0, reps: 0 },
    )
    .map_err(|e| e.to_string())?;
    let options = Options { mask: plan.mask, remainder: Remainder::Return, early_exit_bits: ee, ..Options::causal() };
    let exp = oracle::expected(&x, &[options], plan.backward, crate::pool::default_threads())
        .pop()
        .ok_or("the reference returned nothing")?;
    let wide = |s: Shape, t: &[T]| from_layout(s, plan.layout, &t.iter().map(|e| e.to_f32()).collect::<Vec<_>>());
    let mut errs = vec![("o", rel_l2(&wide(small, &out.o), &exp.o), fwd_tol(ee))];
    errs.push(("rem", rel_l2(&out.rem, &exp.rem), fwd_tol(ee)));
    if let (Some((dq, dk, dv)), Some(g)) = (&out.grads, &exp.grads) {
        errs.push(("dq", rel_l2(&wide(small, dq), &g.dq), grad_tol(ee)));
        errs.push(("dk", rel_l2(&wide(small.kv(), dk), &g.dk), grad_tol(ee)));
        errs.push(("dv", rel_l2(&wide(small.kv(), dv), &g.dv), grad_tol(ee)));
    }
    let text: Vec<String> = errs.iter().map(|(n, e, _)| format!("{n} {e:.1e}")).collect();
    let line = format!(
        "ring vs float64 ({regime} data, {},{},{},{} H_kv {}): {}",
        small.batch,
        small.heads,
        small.seq,
        small.head_dim,
        small.kv_heads,
        text.join(", ")
    );
    // rel_l2 is NaN when anything is NaN or infinite: `!(e <= tol)` fails it.
    if errs.iter().all(|(_, e, tol)| *e <= *tol) {
        Ok(line)
    } else {
        Err(line)
    }
}

/// The problem's inputs in the plan's layout and element type: q, k, v, dO as windows of one
/// N(0, 1) pool at offsets that are not multiples of D (as `sbgen bench` makes them).
struct ProblemInputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    d_o: Vec<T>,
}

fn problem_inputs<T: SbElement>(shape: Shape, seed: u64) -> ProblemInputs<T> {
    let n = shape.batch * shape.heads * shape.seq * shape.head_dim;
    let n_kv = shape.batch * shape.kv_heads * shape.seq * shape.head_dim;
    let stride = 1031;
    let mut rng = StdRng::seed_from_u64(seed ^ n as u64);
    let pool: Vec<T> = normal(&mut rng, n + 3 * stride).into_iter().map(T::from_f32).collect();
    let window = |t: usize, len: usize| pool[t * stride..t * stride + len].to_vec();
    ProblemInputs { q: window(0, n), k: window(1, n_kv), v: window(2, n_kv), d_o: window(3, n) }
}

/// One GPU's outputs and median times on the problem's inputs.
struct Single<T> {
    o: Vec<T>,
    rem: Vec<f32>,
    grads: Option<(Vec<T>, Vec<T>, Vec<T>)>,
    fwd_ms: f64,
    fwd_bwd_ms: Option<f64>,
}

/// The single-GPU kernels on GPU 0: outputs first (poisoned beforehand), then timed. A kernel's
/// build or launch failure is the inner error; a lost context the outer one.
fn single_gpu<T: SbElement>(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &BenchPlan,
    shape: Shape,
    ee: Option<u32>,
    x: &ProblemInputs<T>,
) -> Result<Result<Single<T>, String>, GpuError> {
    let d = shape.head_dim as u32;
    let build = |pass: Pass| {
        let kernel = builder.kernel(plan.spec(d, pass, plan.layout, ee), None);
        builder.build(&kernel).map_err(|e| format!("{}: {e}", kernel.name()))
    };
    let fwd = match build(Pass::Forward) {
        Ok(k) => k,
        Err(e) => return Ok(Err(e)),
    };
    let bwd = if plan.backward {
        match build(Pass::Backward) {
            Ok(k) => Some(k),
            Err(e) => return Ok(Err(e)),
        }
    } else {
        None
    };
    let p = DeviceProblem::<T> {
        shape,
        layout: plan.layout,
        seq_lens: vec![shape.seq; shape.batch],
        q: dev.stream.clone_htod(&x.q)?,
        k: dev.stream.clone_htod(&x.k)?,
        v: dev.stream.clone_htod(&x.v)?,
        d_o: dev.stream.clone_htod(&x.d_o)?,
        d_rem: None,
        cu_seqlens: None,
    };
    let mut out: ForwardOutputs<T> = exec::forward(dev, &fwd, &p, None, plan.backward)?;
    let mut grads: Option<GradOutputs<T>> = match &bwd {
        Some(b) => Some(exec::backward(dev, b, &p, Saved::of(&out), None)?),
        None => None,
    };
    dev.sync(fwd.name(), std::time::Duration::from_secs(300))?;
    let o = dev.stream.clone_dtoh(&out.o)?;
    let rem = dev.stream.clone_dtoh(&out.rem)?;
    let grads_host = match &grads {
        Some(g) => Some((dev.stream.clone_dtoh(&g.dq)?, dev.stream.clone_dtoh(&g.dk)?, dev.stream.clone_dtoh(&g.dv)?)),
        None => None,
    };
    // Timed as `sbgen bench` times: the forward alone without o_saved (inference), and the forward
    // saving o_saved followed by the backward.
    let saved = out.o_saved.take();
    let fwd_ms = stats(&bench::time(dev, plan, &fwd, |_| exec::forward_into(dev, &fwd, &p, &mut out, None))?).0;
    out.o_saved = saved;
    let fwd_bwd_ms = match (&bwd, &mut grads) {
        (Some(b), Some(g)) => Some(
            stats(&bench::time(dev, plan, b, |_| {
                exec::forward_into(dev, &fwd, &p, &mut out, None)?;
                exec::backward_into(dev, b, &p, Saved::of(&out), g, None)
            })?)
            .0,
        ),
        _ => None,
    };
    Ok(Ok(Single { o, rem, grads: grads_host, fwd_ms, fwd_bwd_ms }))
}

/// The ring's outputs against one GPU's, every element: one line on success, why on failure.
fn compare<T: SbElement>(ring: &RingOutputs<T>, single: &Single<T>, ee: Option<u32>) -> Result<String, String> {
    let f = |x: &[T]| x.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
    let w = |x: &[T]| x.iter().map(|e| e.to_f32() as f64).collect::<Vec<f64>>();
    let mut errs = vec![
        ("o", rel_l2(&f(&ring.o), &w(&single.o)), fwd_tol(ee)),
        ("rem", rel_l2(&ring.rem, &single.rem.iter().map(|&v| v as f64).collect::<Vec<_>>()), fwd_tol(ee)),
    ];
    if let (Some(a), Some(b)) = (&ring.grads, &single.grads) {
        errs.push(("dq", rel_l2(&f(&a.0), &w(&b.0)), grad_tol(ee)));
        errs.push(("dk", rel_l2(&f(&a.1), &w(&b.1)), grad_tol(ee)));
        errs.push(("dv", rel_l2(&f(&a.2), &w(&b.2)), grad_tol(ee)));
    }
    let text: Vec<String> = errs.iter().map(|(n, e, _)| format!("{n} {e:.1e}")).collect();
    let line = format!("ring vs one GPU, every element: {}", text.join(", "));
    if errs.iter().all(|(_, e, tol)| *e <= *tol) {
        Ok(line)
    } else {
        Err(line)
    }
}

/// Each rank's median of the series `pick` selects.
fn median_each(times: &[RankTimes], pick: impl Fn(&RankTimes) -> &Vec<f64>) -> Vec<f64> {
    times.iter().map(|t| if pick(t).is_empty() { f64::NAN } else { stats(pick(t)).0 }).collect()
}

/// The report's header line.
pub fn header() -> String {
    format!(
        "{:<20} {:>4} {:<8} {:<6} {:>11} {:>11} {:>8} {:>6} {:>9} {:>13}  {}",
        "B,H,N,D",
        "gpus",
        "pass",
        "exit",
        "1gpu ms",
        "ring ms",
        "speedup",
        "eff",
        "TFLOP/s",
        "transfers ms",
        "ranks ms / note"
    )
}

/// One report line.
pub fn format_result(r: &RingBenchResult) -> String {
    let f = |x: Option<f64>, p: usize| x.filter(|v| v.is_finite()).map_or("-".to_string(), |v| format!("{v:.p$}"));
    let list = |x: &[f64]| x.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(",");
    let transfers = r.transfers_ms.iter().copied().fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    format!(
        "{:<20} {:>4} {:<8} {:<6} {:>11} {:>11} {:>8} {:>6} {:>9} {:>13}  {}",
        format!("{},{},{},{}:{}", r.shape[0], r.shape[1], r.shape[2], r.shape[3], r.kv_heads),
        r.gpus,
        r.pass,
        r.early_exit_bits.map_or("off".to_string(), |t| format!("T={t}")),
        f(r.one_gpu_ms, 3),
        f(r.ring_ms, 3),
        f(r.speedup, 2),
        f(r.efficiency, 2),
        f(r.tflops, 1),
        f(transfers, 3),
        r.error.clone().unwrap_or_else(|| list(&r.rank_ms))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
    #[allow(clippy::manual_is_multiple_of)]
    #[test]
    fn the_check_length_cuts_segments_inside_blocks() {
        for gpus in 1..=8 {
            let n = check_seq(gpus);
            let part = Partition::new(n, gpus, Scheme::ZigZag).unwrap();
            assert!((0..part.segments()).all(|s| part.segment(s).len() % 64 != 0), "{gpus}: {n}");
            assert!((0..part.segments()).all(|s| part.segment(s).len() > 64), "{gpus}: {n}");
        }
    }

    #[test]
    fn inputs_are_windows_of_one_pool_and_not_zero() {
        let x = problem_inputs::<half::bf16>(Shape::new(1, 2, 33, 8).with_kv_heads(1), 7);
        assert_eq!((x.q.len(), x.k.len(), x.v.len(), x.d_o.len()), (528, 264, 264, 528));
        assert_ne!(x.q[..264], x.k[..]);
        assert!(x.q.iter().filter(|v| v.to_f32() == 0.0).count() < 8);
    }
}
