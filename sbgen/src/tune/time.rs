//! Timing the checked candidates of one spec at one sequence length with CUDA events
//! ([`crate::gpu::bench::time`]: warm-up, rotating input sets, median) on a problem of about [`TOKENS`]
//! tokens ([`problem_shape`]), the default first, within the budget.
//!
//! The forward is timed as for inference (o_saved not written), as `sbgen bench` does; the backward
//! alone (its launch sequence, including the zeroing of its f32 workspace) on what the spec's default
//! forward saved. TFLOP/s: 4 B H N^2 D / 2 for the forward and 2.5 times that for the backward
//! (docs/performance.md#counting).
//!
//! A decode spec is timed as `sbgen bench --decode` times it (one CUDA graph of steps, L2 flushed
//! between them) on [`DECODE_BATCH`] sequences of the bucket's length, 32 query heads on 8 K/V heads,
//! with the launcher's default split; its TFLOP/s counts 4 B H N D.
//!
//! A THD spec is timed on the same shape, as a packed batch of B sequences of N tokens each (the
//! bucket's length): a bucket is keyed on the longest sequence, and equal lengths make its time
//! comparable with the dense layouts' (docs/performance.md#counting). Every problem is multi-head
//! (H_kv = H): the K/V head count is a run-time value, not part of the spec, and the kernel is the
//! same for any grouping.

use super::plan::{forward_of, Session, TuneError};
use crate::cache::{CandidateResult, Outcome};
use crate::gpu::bench::{self, fwd_flops, BenchPlan};
use crate::gpu::check::short;
use crate::gpu::device::{Device, GpuError};
use crate::gpu::exec::{self, ForwardOutputs, GradOutputs};
use crate::gpu::kernels::KernelBuilder;
use crate::ir::{Dtype, Kernel, Pass, Schedule, Spec};
use sbgen_runtime::launcher::{KernelBinary, SbElement};
use sbgen_runtime::reference::Shape;
use std::sync::Arc;
use std::time::Duration;

/// Tokens (B * H * N) of each timed problem: 2^18, e.g. 8 x 16 x 2048 or 2 x 16 x 8192.
pub const TOKENS: usize = 1 << 18;
/// Heads of the timed problems (fewer only when N > TOKENS / 16).
pub const HEADS: usize = 16;

/// The timed problem for sequence length `seq`: H = 16 heads and B = TOKENS / (16 N) (at least 1;
/// fewer heads when N > TOKENS / 16), so B H N ~ `tokens`.
pub fn problem_shape(seq: usize, head_dim: u32, tokens: usize) -> Shape {
    let seq = seq.max(1);
    let rows = (tokens / seq).max(1);
    let heads = rows.clamp(1, HEADS);
    let batch = (rows / heads).max(1);
    Shape::new(batch, heads, seq, head_dim as usize)
}

/// The work a pass does on B sequences of N tokens, counted as docs/performance.md#counting says.
pub fn pass_flops(pass: Pass, shape: Shape) -> f64 {
    let fwd = fwd_flops(shape.heads, shape.head_dim, &seq_lens(shape));
    match pass {
        // A segment pass over a whole causal sequence is the forward's work.
        Pass::Forward | Pass::Segment => fwd,
        Pass::Backward | Pass::SegmentBackward => 2.5 * fwd,
        // One query row per sequence and head: q . k and A v over N keys.
        Pass::Decode => 4.0 * (shape.batch * shape.heads * shape.seq * shape.head_dim) as f64,
    }
}

/// The sequences of a timed problem: B of N tokens (packed one after another for THD).
fn seq_lens(shape: Shape) -> Vec<usize> {
    vec![shape.seq; shape.batch]
}

/// The outcomes of `order` (the default first), measuring each with `measure` until `spent()` says
/// the budget is gone: candidates are measured until one is timed whatever the budget (the default,
/// unless it failed or spilled), then later ones become [`Outcome::NotRun`] once it is spent, so a
/// spec always gets a winner. Candidates that already have an outcome (pruned, failed, wrong) keep it.
pub fn measure_within_budget(
    order: &[CandidateResult],
    spent: &mut dyn FnMut() -> bool,
    measure: &mut dyn FnMut(&Schedule) -> Outcome,
) -> (Vec<CandidateResult>, usize) {
    let mut not_run = 0;
    let mut timed_one = false;
    let results = order
        .iter()
        .map(|c| {
            if !matches!(c.outcome, Outcome::NotRun { .. }) {
                return c.clone();
            }
            let outcome = if timed_one && spent() {
                not_run += 1;
                Outcome::NotRun { reason: "time budget spent (--budget-s)".into() }
            } else {
                measure(&c.schedule)
            };
            timed_one |= matches!(outcome, Outcome::Timed { .. });
            CandidateResult { schedule: c.schedule, outcome }
        })
        .collect();
    (results, not_run)
}

/// The candidates of one (spec, sequence length) after timing.
pub struct Timed {
    pub shape: Shape,
    pub results: Vec<CandidateResult>,
    /// Candidates the budget left untimed.
    pub not_run: usize,
    /// A lost context or a hung kernel: the run must stop once this bucket is recorded.
    pub fatal: Option<GpuError>,
}

/// Times every candidate of `cands` still to be measured at sequence length `seq`.
pub fn time_candidates(
    s: &mut Session<'_>,
    spec: Spec,
    seq: usize,
    cands: &[CandidateResult],
) -> Result<Timed, TuneError> {
    let shape = match spec.pass {
        // The decode's problem: DECODE_BATCH sequences of `seq` cached tokens on 32 query heads.
        Pass::Decode => Shape::new(DECODE_BATCH, 32, seq, spec.head_dim as usize).with_kv_heads(8),
        Pass::Forward | Pass::Backward | Pass::Segment | Pass::SegmentBackward => {
            problem_shape(seq, spec.head_dim, TOKENS)
        }
    };
    let plan = s.plan;
    let bench_plan = BenchPlan {
        reps: plan.reps,
        warmup: plan.warmup,
        sets: plan.sets,
        seed: plan.seed,
        layout: spec.layout,
        dtype: spec.dtype,
        ..BenchPlan::new(plan.seed)
    };
    let mut timer = Timer::new(s.dev, &s.builder, &bench_plan, spec, shape)?;
    let mut fatal: Option<GpuError> = None;
    // Progress counts the candidates to time (those still `NotRun`), not the pruned ones.
    let total = cands.iter().filter(|c| matches!(c.outcome, Outcome::NotRun { .. })).count();
    let mut timed = 0;
    let budget = s.budget;
    let progress = &mut *s.progress;
    let mut done = s.done;
    let (results, not_run) = measure_within_budget(cands, &mut || budget.spent(), &mut |schedule| {
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
            Err(e) => Outcome::Failed { reason: short(&e) },
        };
        timed += 1;
        progress.say(&format!(
            "[{timed:>2}/{total}] {} N={seq:<6} {:<26} {outcome}  ({})",
            spec.slug(),
            schedule.to_string(),
            budget.progress()
        ));
        done += 1;
        progress.reached(done);
        outcome
    });
    s.done = done;
    Ok(Timed { shape, results, not_run, fatal })
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
    DecodeBf16(DecodeBuffers<half::bf16>),
    DecodeF16(DecodeBuffers<half::f16>),
}

/// A decode's timed problem: [`DECODE_BATCH`] sequences of the bucket's length in a cache of the
/// spec's geometry (paged: 16-token pages), 32 query heads on 8 K/V heads, and the L2 flush buffer.
struct DecodeBuffers<T> {
    shape: sbgen_runtime::reference::DecodeShape,
    q: cudarc::driver::CudaSlice<T>,
    cache: crate::gpu::decode::DeviceCache<T>,
    flush: crate::gpu::l2_flush::L2Flush,
}

/// Sequences of a decode's timed problem (the smallest batch: the split matters most there).
pub const DECODE_BATCH: usize = 8;

impl<T: SbElement> DecodeBuffers<T> {
    fn new(dev: &Device, spec: Spec, seq: usize, seed: u64) -> Result<Self, GpuError> {
        use crate::gpu::decode::CacheKind;
        use crate::gpu::decode_bench::{tiled_cache, DecodeProblem};
        let problem =
            DecodeProblem { batch: DECODE_BATCH, heads: 32, kv_heads: 8, seq, head_dim: spec.head_dim as usize };
        let kind = match spec.layout {
            crate::ir::Layout::Paged => CacheKind::Paged { page_size: 16 },
            layout => CacheKind::Contiguous(layout),
        };
        let shape = problem.shape();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let q: Vec<T> = crate::gpu::data::normal(&mut rng, shape.len()).into_iter().map(T::from_f32).collect();
        let tiled = tiled_cache::<T>(dev, &problem, kind, spec.dtype, seed, &mut Default::default())?;
        Ok(DecodeBuffers {
            shape,
            q: dev.stream.clone_htod(&q)?,
            cache: tiled.cache,
            flush: crate::gpu::l2_flush::L2Flush::new(dev, Default::default())?,
        })
    }

    fn time(&mut self, dev: &Device, plan: &BenchPlan, binary: &KernelBinary) -> Result<Vec<f64>, GpuError> {
        let split = sbgen_runtime::launcher::DecodeSplit::default();
        crate::gpu::decode_bench::time_steps(
            dev,
            binary,
            self.shape,
            &self.q,
            &self.cache,
            split,
            plan.reps,
            plan.warmup,
            &mut self.flush,
        )
    }
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
        let state = match (spec.pass, spec.dtype) {
            (Pass::Decode, Dtype::Bf16) => State::DecodeBf16(DecodeBuffers::new(dev, spec, shape.seq, plan.seed)?),
            (Pass::Decode, Dtype::F16) => State::DecodeF16(DecodeBuffers::new(dev, spec, shape.seq, plan.seed)?),
            (_, Dtype::Bf16) => State::Bf16(Buffers::new(dev, builder, plan, spec, shape)?),
            (_, Dtype::F16) => State::F16(Buffers::new(dev, builder, plan, spec, shape)?),
        };
        Ok(Timer { dev, builder, plan, spec, shape, state })
    }

    fn time(&mut self, schedule: &Schedule) -> Result<Outcome, GpuError> {
        let kernel = Kernel::new(self.spec, *schedule, self.builder.arch());
        let binary = match self.builder.build(&kernel) {
            Ok(b) => b,
            Err(e) => return Ok(Outcome::Failed { reason: short(&e) }),
        };
        let ms = match &mut self.state {
            State::Bf16(b) => b.time(self.dev, self.plan, self.spec.pass, &binary)?,
            State::F16(b) => b.time(self.dev, self.plan, self.spec.pass, &binary)?,
            State::DecodeBf16(b) => b.time(self.dev, self.plan, &binary)?,
            State::DecodeF16(b) => b.time(self.dev, self.plan, &binary)?,
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
        let sets = bench::upload_sets::<T>(dev, plan, shape, &seq_lens(shape))?;
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
            let fwd = builder.build(&builder.kernel(forward_of(spec), None)).map_err(|e| TuneError::Kernel {
                what: "the default forward (for timing the backward)",
                message: e.to_string(),
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
    use crate::tune::budget::Budget;

    fn s(block_n: u32, stages: u32) -> Schedule {
        Schedule { block_n, stages, ..Schedule::DEFAULT }
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
        assert!(matches!(results[2].outcome, Outcome::Timed { ms, .. } if ms == 32.0));

        // Already spent: the default is still timed, nothing else.
        let mut n = 0;
        let (_, not_run) = measure_within_budget(&order, &mut || true, &mut |_| {
            n += 1;
            Outcome::Timed { ms: 1.0, tflops: 1.0 }
        });
        assert_eq!((n, not_run), (1, 3));

        // Already spent and the default fails (a launch error): the next one is measured, so the
        // spec still gets a winner; then nothing else.
        let mut measured = Vec::new();
        let (results, not_run) = measure_within_budget(&order, &mut || true, &mut |sch| {
            measured.push(*sch);
            if *sch == s(64, 3) {
                Outcome::Failed { reason: "launch failed".into() }
            } else {
                Outcome::Timed { ms: 1.0, tflops: 1.0 }
            }
        });
        assert_eq!(measured, vec![s(64, 3), s(32, 2)]);
        assert_eq!(not_run, 2);
        assert!(matches!(results[2].outcome, Outcome::Timed { .. }));
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
}
