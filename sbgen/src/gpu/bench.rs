//! `sbgen bench`: forward and forward+backward times of the benchmark shapes, with CUDA events.
//!
//! For each shape and early-exit setting: the kernels are first checked against the float64
//! reference on a small problem (N = 256, all three data regimes; see [`super::check`]) so a wrong
//! kernel is never timed; then `sets` input sets of N(0, 1) data are uploaded (never zeros), a few
//! warm-up launches run, and each of `reps` repetitions is timed with its own pair of CUDA events,
//! rotating through the input sets. The figure is the median; min and max are kept too.
//! TFLOP/s counts 4 B H N^2 D / 2 for the forward and 3.5 times that for forward+backward, whatever
//! the kernel actually computes (early exit skips work, so its figure is "equivalent"); the shapes
//! and the convention are in (docs/performance.md#counting).
//! The forward alone runs as for inference (o_saved not written); forward+backward is one forward
//! that saves o in f32 and one backward launch sequence (including the zeroing of the backward's f32
//! workspace).

use super::check::{self, CheckPlan};
use super::data::normal;
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
use std::sync::Arc;
use std::time::Duration;

/// The benchmark shapes of docs/performance.md#counting: (B, H, N, D).
pub const DEFAULT_SHAPES: &[(usize, usize, usize, usize)] =
    &[(8, 16, 2048, 128), (4, 16, 4096, 128), (2, 16, 8192, 128), (1, 16, 16384, 128), (4, 16, 4096, 64)];

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub shapes: Vec<Shape>,
    pub dtype: Dtype,
    pub mask: Mask,
    pub layout: Layout,
    pub early_exits: Vec<Option<u32>>,
    /// `None`: each spec's default schedule ([`Schedule::default_for`]).
    pub schedule: Option<Schedule>,
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
            shapes: DEFAULT_SHAPES.iter().map(|&(b, h, n, d)| Shape::new(b, h, n, d)).collect(),
            dtype: Dtype::Bf16,
            mask: Mask::Strict,
            layout: Layout::Bhnd,
            early_exits: vec![None, Some(24)],
            schedule: None,
            reps: 30,
            warmup: 5,
            sets: 3,
            seed,
            backward: true,
        }
    }

    fn spec(&self, head_dim: u32, pass: Pass, early_exit_bits: Option<u32>) -> Spec {
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
}

/// One timed configuration.
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// [B, H, N, D].
    pub shape: [usize; 4],
    /// `fwd` or `fwd+bwd`.
    pub pass: &'static str,
    pub early_exit_bits: Option<u32>,
    pub kernels: Vec<String>,
    pub ms_median: Option<f64>,
    pub ms_min: Option<f64>,
    pub ms_max: Option<f64>,
    /// TFLOP/s-equivalent at the median time (docs/performance.md#counting).
    pub tflops: Option<f64>,
    pub reps: usize,
    /// Why it was not timed (a kernel that failed its check, a build or launch error).
    pub error: Option<String>,
}

/// The forward's work as docs/performance.md#counting counts it: 4 B H N^2 D / 2.
pub fn fwd_flops(s: Shape) -> f64 {
    4.0 * s.batch as f64 * s.heads as f64 * (s.seq as f64).powi(2) * s.head_dim as f64 / 2.0
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
    let mut results = Vec::new();
    // Verify each kernel once per head dimension (the kernels do not depend on the shape).
    let mut verified: Vec<(u32, Option<u32>, Verdict)> = Vec::new();
    for shape in &plan.shapes {
        let d = shape.head_dim as u32;
        for &ee in &plan.early_exits {
            if !verified.iter().any(|(vd, ve, _)| *vd == d && *ve == ee) {
                let outcome = verify(dev, builder, plan, d, ee)?;
                verified.push((d, ee, outcome));
            }
            let ok = verified.iter().find(|(vd, ve, _)| *vd == d && *ve == ee).map(|(_, _, r)| r.clone()).unwrap();
            let rs = match plan.dtype {
                Dtype::Bf16 => time_shape::<half::bf16>(dev, builder, plan, *shape, ee, ok)?,
                Dtype::F16 => time_shape::<half::f16>(dev, builder, plan, *shape, ee, ok)?,
            };
            for r in rs {
                sink(&r);
                results.push(r);
            }
        }
    }
    Ok(results)
}

/// The outcome of checking the forward and the backward kernel before timing them.
#[derive(Clone, Debug)]
struct Verdict {
    fwd: Result<(), String>,
    bwd: Result<(), String>,
}

/// Checks the forward and backward kernels of (head_dim, early exit) on N = 256.
fn verify(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &BenchPlan,
    head_dim: u32,
    ee: Option<u32>,
) -> Result<Verdict, GpuError> {
    let mut check = CheckPlan::full(plan.seed);
    check.head_dims = vec![head_dim];
    check.dtypes = vec![plan.dtype];
    check.passes = if plan.backward { vec![Pass::Forward, Pass::Backward] } else { vec![Pass::Forward] };
    check.masks = vec![plan.mask];
    check.layouts = vec![plan.layout];
    check.remainders = vec![Remainder::Return];
    check.early_exits = vec![ee];
    check.seqs = vec![256];
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

fn time_shape<T: SbElement>(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &BenchPlan,
    shape: Shape,
    ee: Option<u32>,
    verdict: Verdict,
) -> Result<Vec<BenchResult>, GpuError> {
    let d = shape.head_dim as u32;
    let fwd_kernel = builder.kernel(plan.spec(d, Pass::Forward, ee), plan.schedule);
    let bwd_kernel = builder.kernel(plan.spec(d, Pass::Backward, ee), plan.schedule);
    let mut out = vec![blank(shape, "fwd", ee, vec![fwd_kernel.name()])];
    if plan.backward {
        out.push(blank(shape, "fwd+bwd", ee, vec![fwd_kernel.name(), bwd_kernel.name()]));
    }
    // The forward must pass its check and build for either row; the backward for the second.
    let fwd = match verdict.fwd.and_then(|()| builder.build(&fwd_kernel).map_err(|e| check::short(&e.to_string()))) {
        Ok(f) => f,
        Err(e) => {
            out.iter_mut().for_each(|r| r.error = Some(e.clone()));
            return Ok(out);
        }
    };
    let bwd = if plan.backward {
        match verdict.bwd.and_then(|()| builder.build(&bwd_kernel).map_err(|e| check::short(&e.to_string()))) {
            Ok(b) => Some(b),
            Err(e) => {
                out[1].error = Some(e);
                None
            }
        }
    } else {
        None
    };
    let sets = upload_sets::<T>(dev, plan, shape)?;
    let mut outs: Vec<ForwardOutputs<T>> = Vec::new();
    for _ in 0..plan.sets {
        outs.push(ForwardOutputs {
            o: dev.stream.alloc_zeros::<T>(shape.len())?,
            rem: dev.stream.alloc_zeros::<f32>(shape.rows())?,
            log2_rem: dev.stream.alloc_zeros::<f32>(shape.rows())?,
            // Inference: the forward alone does not save o in f32.
            o_saved: None,
        });
    }
    let flops = fwd_flops(shape);
    match time(dev, plan, &fwd, |i| exec::forward_into(dev, &fwd, &sets[i], &mut outs[i], None)) {
        Ok(ms) => fill(&mut out[0], &ms, flops),
        Err(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. })) => return Err(e),
        Err(e) => out[0].error = Some(e.to_string()),
    }
    if let Some(bwd) = bwd {
        let mut grads = GradOutputs {
            dq: dev.stream.alloc_zeros::<T>(shape.len())?,
            dk: dev.stream.alloc_zeros::<T>(shape.len())?,
            dv: dev.stream.alloc_zeros::<T>(shape.len())?,
        };
        // Training: the forward saves o in f32 for the backward.
        for o in outs.iter_mut() {
            o.o_saved = Some(dev.stream.alloc_zeros::<f32>(shape.len())?);
        }
        let both = |i: usize| -> Result<(), GpuError> {
            let o = &mut outs[i];
            exec::forward_into(dev, &fwd, &sets[i], o, None)?;
            exec::backward_into(dev, &bwd, &sets[i], exec::Saved::of(o), &mut grads, None)
        };
        match time(dev, plan, &bwd, both) {
            Ok(ms) => fill(&mut out[1], &ms, 3.5 * flops),
            Err(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. })) => return Err(e),
            Err(e) => out[1].error = Some(e.to_string()),
        }
    }
    Ok(out)
}

fn blank(shape: Shape, pass: &'static str, ee: Option<u32>, kernels: Vec<String>) -> BenchResult {
    BenchResult {
        shape: [shape.batch, shape.heads, shape.seq, shape.head_dim],
        pass,
        early_exit_bits: ee,
        kernels,
        ms_median: None,
        ms_min: None,
        ms_max: None,
        tflops: None,
        reps: 0,
        error: None,
    }
}

fn fill(r: &mut BenchResult, ms: &[f64], flops: f64) {
    let (median, min, max) = stats(ms);
    r.ms_median = Some(median);
    r.ms_min = Some(min);
    r.ms_max = Some(max);
    r.tflops = Some(flops / (median * 1e-3) / 1e12);
    r.reps = ms.len();
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

/// `plan.sets` input sets of N(0, 1) data (q, k, v, dO), taken as windows of one random pool at
/// offsets that are not multiples of D, so no two tensors repeat each other row for row.
pub fn upload_sets<T: SbElement>(
    dev: &Device,
    plan: &BenchPlan,
    shape: Shape,
) -> Result<Vec<DeviceProblem<T>>, GpuError> {
    let n = shape.len();
    let stride = 1031; // prime, not a multiple of any head dimension
    let tensors = 4 * plan.sets;
    let mut rng = StdRng::seed_from_u64(plan.seed ^ n as u64);
    let pool: Vec<T> = normal(&mut rng, n + stride * tensors).into_iter().map(T::from_f32).collect();
    let mut windows = (0..tensors).map(|t| &pool[t * stride..t * stride + n]);
    let mut next = || dev.stream.clone_htod(windows.next().expect("4 tensors per set"));
    let mut sets = Vec::with_capacity(plan.sets);
    for _ in 0..plan.sets {
        sets.push(DeviceProblem {
            shape,
            layout: plan.layout,
            q: next()?,
            k: next()?,
            v: next()?,
            d_o: next()?,
            d_rem: None,
        });
    }
    Ok(sets)
}

/// The report's header line.
pub fn header() -> String {
    format!(
        "{:<18} {:<8} {:<6} {:>10} {:>10} {:>10} {:>9}  {}",
        "B,H,N,D", "pass", "exit", "ms(med)", "ms(min)", "ms(max)", "TFLOP/s", "note"
    )
}

/// One report line.
pub fn format_result(r: &BenchResult) -> String {
    let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    format!(
        "{:<18} {:<8} {:<6} {:>10} {:>10} {:>10} {:>9}  {}",
        format!("{},{},{},{}", r.shape[0], r.shape[1], r.shape[2], r.shape[3]),
        r.pass,
        r.early_exit_bits.map_or("off".to_string(), |t| format!("T={t}")),
        f(r.ms_median, 3),
        f(r.ms_min, 3),
        f(r.ms_max, 3),
        f(r.tflops, 1),
        r.error.as_deref().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flops_follow_design_section_7() {
        // 8,16,2048,128 forward at 0.908 ms is 151 TFLOP/s in the table.
        let f = fwd_flops(Shape::new(8, 16, 2048, 128));
        assert!((f / 0.908e-3 / 1e12 - 151.0).abs() < 1.0, "{}", f / 0.908e-3 / 1e12);
        let f = fwd_flops(Shape::new(1, 16, 16384, 128));
        assert!((3.5 * f / 35.46e-3 / 1e12 - 109.0).abs() < 1.0);
    }

    #[test]
    fn stats_take_the_median() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }

    #[test]
    fn the_default_plan_times_the_design_shapes_with_and_without_early_exit() {
        let plan = BenchPlan::new(0);
        assert_eq!(plan.shapes.len(), 5);
        assert_eq!(plan.early_exits, vec![None, Some(24)]);
        assert!(plan.reps >= 20);
        assert_eq!(plan.dtype, Dtype::Bf16);
        assert_eq!(plan.mask, Mask::Strict);
    }
}
