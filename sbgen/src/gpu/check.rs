//! `sbgen check`: every selected spec, compiled for the device, against the float64 reference on
//! fresh random inputs.
//!
//! For each (head_dim, dtype, regime, N) one set of inputs is drawn (seeded from the run's seed) and
//! rounded to the dtype; the reference runs once per (mask, remainder) over every head in parallel,
//! in full (every row of every head). Then, for each layout and (mask, remainder), the forward and
//! backward kernels with and without early exit run on that data with poisoned outputs:
//!
//! - forward (saving o_saved): relative L2 error of o, rem and o_saved (o before the fused
//!   remainder) <= 5e-3 ([`FWD_TOL`]); no NaN in o, rem, log2_rem or o_saved;
//! - backward (on the forward kernel's own o, o_saved and log2_rem, as in training — the backward's
//!   sums only cancel exactly against the kernels' o_saved —, with dO and dRem ~ N(0, 1)): dq, dk,
//!   dv <= 1e-2 ([`GRAD_TOL`]); no NaN. Checking the backward therefore runs the forward too.
//!   With a fused remainder dq and dk are measured against max(||fused||, ||unfused||) of the
//!   reference (the unfused reference of the same mask runs for it): at N = 1 with attend_current
//!   o = v, the dO . v part of the gradient cancels exactly and only the dRem part is left, so the
//!   plain relative error would divide the kernel's rounding of the cancelled part by that
//!   remainder (measured 1.0-1.6e-2 in bf16). For N >= 17 the floor moves the error by <= 2%;
//! - early exit (T bits), against the run without it on the same data: |Δo| <= 2^-T max|v| (twice
//!   that with a fused remainder) + one ulp of the dtype, |Δrem| <= 2^-T, elementwise; on long-reach
//!   data, where the stick never falls below 2^-T, the forward's o, rem and log2_rem must be
//!   bit-identical, and the backward's gradients within [`EE_BWD_TOL`] (fp32 atomics may reorder sums).
//!
//! Every output lies between two poisoned guard zones ([`exec::GUARD`] elements each side); a write
//! outside the tensor fails the row too.
//!
//! - deterministic backward (`--deterministic on`): the backward runs twice on the same inputs and
//!   dq, dk, dv must be bit-identical (besides the tolerances above).
//!
//! Shapes ([`shape_for`]): B = 3, H = 5 up to N = 1024; B = 1, H = 3 above (the reference is
//! O(B H N^2 D)); grouped-query attention ([`KvHeads`]) takes H = 2 x group on 2 K/V heads (B = 2),
//! or above N = 1024 H = group on one; MQA H = 4 (3 above N = 1024) on one K/V head. A packed batch
//! (`--varlen`, THD layout only) is the given lengths in one batch; every dense group also runs the
//! THD layout as a packed batch of B equal sequences when THD is selected.

use super::data::{
    from_layout_seqs, make_inputs, make_packed_inputs, rows_from_layout, rows_to_layout, to_layout_seqs,
};
use super::data::{rel_l2, rel_l2_f32, rel_l2_floored, ulp, Inputs, Regime, Sequences};
use super::device::{Device, GpuError};
use super::exec::{self, guarded, guarded_f32, DeviceProblem, Guarded};
use super::failure::{Failure, Row};
// `short` is also the tuner's and `sbgen bench`'s way to shorten an error.
pub use super::failure::short;
use super::kernels::KernelBuilder;
use super::oracle::{self, Expected};
use crate::ir::{Dtype, Kernel, Layout, Mask, Pass, Remainder, Schedule, Spec};
use cudarc::driver::DeviceRepr;
use sbgen_runtime::launcher::SbElement;
use sbgen_runtime::reference::{Grads, Options, Shape};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Forward tolerance: relative L2 against float64 (docs/checking.md#tolerances).
pub const FWD_TOL: f64 = 5e-3;
/// Gradient tolerance.
pub const GRAD_TOL: f64 = 1e-2;
/// Backward with early exit against without, on the same data (relative L2).
pub const EE_BWD_TOL: f64 = 1e-3;
/// Sequence lengths of the full check and of `--quick`.
pub const FULL_SEQS: &[usize] = &[1, 17, 64, 1000, 4097];
pub const QUICK_SEQS: &[usize] = &[17, 1000];
/// The packed batch of the full check: empty and one-token sequences next to long ones.
pub const FULL_VARLEN: &[usize] = &[0, 1, 17, 1000, 4097];

/// How many K/V heads a checked problem has, relative to its query heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KvHeads {
    /// `group` query heads per K/V head (1: multi-head attention).
    Group(usize),
    /// One K/V head shared by all query heads (multi-query attention).
    Mqa,
}

impl fmt::Display for KvHeads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvHeads::Group(g) => write!(f, "{g}"),
            KvHeads::Mqa => f.write_str("mqa"),
        }
    }
}

impl FromStr for KvHeads {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "mqa" => Ok(KvHeads::Mqa),
            t => match t.parse::<usize>() {
                Ok(g) if (1..=64).contains(&g) => Ok(KvHeads::Group(g)),
                _ => Err(format!("`kv_groups` = `{s}` is not valid: allowed a group size 1..=64 or mqa")),
            },
        }
    }
}

/// What to check.
#[derive(Clone, Debug)]
pub struct CheckPlan {
    pub head_dims: Vec<u32>,
    pub dtypes: Vec<Dtype>,
    pub passes: Vec<Pass>,
    pub masks: Vec<Mask>,
    pub layouts: Vec<Layout>,
    pub remainders: Vec<Remainder>,
    /// `None` = early exit off; `Some(T)`.
    pub early_exits: Vec<Option<u32>>,
    pub regimes: Vec<Regime>,
    pub seqs: Vec<usize>,
    /// Query heads per K/V head of the dense groups.
    pub kv_heads: Vec<KvHeads>,
    /// Lengths of the packed batch checked in the THD layout (empty: none besides the dense groups
    /// packed as equal sequences).
    pub varlen: Vec<usize>,
    /// Backward variants: `false` the default, `true` the deterministic one.
    pub deterministic: Vec<bool>,
    /// `None`: each spec's default schedule on the device's arch ([`Schedule::default_on`]).
    pub schedule: Option<Schedule>,
    /// The forward kernels' schedule when it is not `schedule`: a backward is then checked on the
    /// saved outputs of another forward (as a tuned forward and a tuned backward pair in training).
    pub forward_schedule: Option<Schedule>,
    pub seed: u64,
    /// Threads for the reference.
    pub threads: usize,
    /// Longest wait for one kernel.
    pub timeout: Duration,
}

impl CheckPlan {
    /// Every supported spec, every regime, N in {1, 17, 64, 1000, 4097}.
    pub fn full(seed: u64) -> Self {
        CheckPlan {
            head_dims: vec![64, 128],
            dtypes: Dtype::ALL.to_vec(),
            passes: vec![Pass::Forward, Pass::Backward],
            masks: vec![Mask::Strict, Mask::AttendCurrent],
            layouts: vec![Layout::Bhnd, Layout::Bnhd],
            remainders: vec![Remainder::Return, Remainder::Fuse],
            early_exits: vec![None, Some(24)],
            regimes: Regime::ALL.to_vec(),
            seqs: FULL_SEQS.to_vec(),
            kv_heads: vec![KvHeads::Group(1)],
            varlen: Vec::new(),
            deterministic: vec![false],
            schedule: None,
            forward_schedule: None,
            seed,
            threads: crate::pool::default_threads(),
            timeout: Duration::from_secs(60),
        }
    }

    /// Every spec and regime, N in {17, 1000} only.
    pub fn quick(seed: u64) -> Self {
        CheckPlan { seqs: QUICK_SEQS.to_vec(), ..CheckPlan::full(seed) }
    }

    /// Every spec in the plan, in the order they run.
    pub fn specs(&self) -> Vec<Spec> {
        let mut out = Vec::new();
        for &head_dim in &self.head_dims {
            for &dtype in &self.dtypes {
                for &mask in &self.masks {
                    for &remainder in &self.remainders {
                        for &layout in &self.layouts {
                            for &pass in &self.passes {
                                for deterministic in self.deterministic_for(pass) {
                                    for &early_exit_bits in &self.early_exits {
                                        out.push(Spec {
                                            head_dim,
                                            dtype,
                                            mask,
                                            layout,
                                            remainder,
                                            pass,
                                            early_exit_bits,
                                            deterministic,
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The rows [`run`] reports (one per kernel run): per (head_dim, dtype, regime, K/V heads)
    /// group, each sequence length in every layout, and the packed batch of `varlen` in THD; in
    /// each, per mask and remainder, a forward per early-exit setting (run also when only the
    /// backward is asked for: the backward reads its outputs) and a backward per early-exit and
    /// deterministic setting.
    pub fn rows(&self) -> usize {
        let backward = if self.passes.contains(&Pass::Backward) { self.deterministic.len() } else { 0 };
        let per_layout = self.masks.len() * self.remainders.len() * self.early_exits.len() * (1 + backward);
        let packed = self.layouts.contains(&Layout::Thd) && !self.varlen.is_empty();
        let per_group = self.seqs.len() * self.layouts.len() * per_layout + usize::from(packed) * per_layout;
        self.head_dims.len() * self.dtypes.len() * self.regimes.len() * self.kv_heads.len() * per_group
    }

    /// The deterministic settings a pass runs with (the forward has none).
    pub fn deterministic_for(&self, pass: Pass) -> Vec<bool> {
        match pass {
            Pass::Forward | Pass::Decode | Pass::Segment | Pass::SegmentBackward => vec![false],
            Pass::Backward => self.deterministic.clone(),
        }
    }

    /// Every kernel the plan runs on `builder`'s arch.
    pub fn kernels(&self, builder: &KernelBuilder) -> Vec<Kernel> {
        self.specs().into_iter().map(|s| builder.kernel(s, self.schedule_for(&s))).collect()
    }

    /// The schedule `spec`'s kernel runs with (`None`: the spec's default).
    pub fn schedule_for(&self, spec: &Spec) -> Option<Schedule> {
        match spec.pass {
            Pass::Forward | Pass::Segment => self.forward_schedule.or(self.schedule),
            Pass::Backward | Pass::Decode | Pass::SegmentBackward => self.schedule,
        }
    }
}

/// The problem shape for sequence length `seq` and K/V heads `kv` (see the module doc).
pub fn shape_for(seq: usize, head_dim: u32, kv: KvHeads) -> Shape {
    let d = head_dim as usize;
    let long = seq > 1024;
    match kv {
        KvHeads::Group(1) if long => Shape::new(1, 3, seq, d),
        KvHeads::Group(1) => Shape::new(3, 5, seq, d),
        KvHeads::Group(g) if long => Shape::new(1, g, seq, d).with_kv_heads(1),
        KvHeads::Group(g) => Shape::new(2, 2 * g, seq, d).with_kv_heads(2),
        KvHeads::Mqa if long => Shape::new(1, 3, seq, d).with_kv_heads(1),
        KvHeads::Mqa => Shape::new(2, 4, seq, d).with_kv_heads(1),
    }
}

/// Runs the plan, handing each row to `sink` as it is finished. Returns every row. Stops early
/// (with an error) only when the CUDA context is lost or a kernel hangs.
pub fn run(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &CheckPlan,
    sink: &mut dyn FnMut(&Row),
) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    let packed = plan.layouts.contains(&Layout::Thd);
    for &head_dim in &plan.head_dims {
        for &dtype in &plan.dtypes {
            for &regime in &plan.regimes {
                for &kv in &plan.kv_heads {
                    // Dense groups, each also run as a packed batch of equal sequences under THD.
                    for &seq in &plan.seqs {
                        let shape = shape_for(seq, head_dim, kv);
                        let seed = group_seed(plan.seed, head_dim, dtype, regime, seq) ^ kv_salt(kv);
                        let inputs = make_inputs(shape, dtype, regime, seed);
                        let layouts = plan.layouts.clone();
                        let mut group =
                            Group { dev, builder, plan, regime, inputs: &inputs, layouts, rows: &mut rows, sink };
                        group.run_dtype()?;
                    }
                    // The packed batch of mixed lengths: THD only.
                    if packed && !plan.varlen.is_empty() {
                        let longest = plan.varlen.iter().copied().max().unwrap_or(0);
                        let shape = shape_for(longest.min(1024), head_dim, kv);
                        let seed = group_seed(plan.seed, head_dim, dtype, regime, usize::MAX) ^ kv_salt(kv);
                        let inputs = make_packed_inputs(shape, &plan.varlen, dtype, regime, seed);
                        let layouts = vec![Layout::Thd];
                        let mut group =
                            Group { dev, builder, plan, regime, inputs: &inputs, layouts, rows: &mut rows, sink };
                        group.run_dtype()?;
                    }
                }
            }
        }
    }
    Ok(rows)
}

/// Builds every kernel of the plan and loads the modules on all threads at once (the driver's
/// JIT of PTX dominates otherwise). Failures are left for the rows to report.
pub fn preload(dev: &Device, builder: &KernelBuilder, plan: &CheckPlan) {
    crate::pool::map(&plan.kernels(builder), plan.threads, |kernel| {
        if let Ok(binary) = builder.build(kernel) {
            let _ = dev.launcher.load(&binary);
        }
    });
}

/// Mixed into a group's seed so that each K/V head count draws its own data.
fn kv_salt(kv: KvHeads) -> u64 {
    match kv {
        KvHeads::Group(1) => 0,
        KvHeads::Group(g) => (g as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        KvHeads::Mqa => 0x51af_d7ed_558c_cd29,
    }
}

/// The seed of one (head_dim, dtype, regime, N) group: a mix of the run's seed and the group.
pub fn group_seed(seed: u64, head_dim: u32, dtype: Dtype, regime: Regime, seq: usize) -> u64 {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for x in [head_dim as u64, dtype as u64, regime as u64, seq as u64] {
        h = (h ^ x).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 31;
    }
    h
}

struct Group<'a> {
    dev: &'a Device,
    builder: &'a KernelBuilder,
    plan: &'a CheckPlan,
    regime: Regime,
    inputs: &'a Inputs,
    /// The layouts this group runs (a packed batch of mixed lengths runs THD only).
    layouts: Vec<Layout>,
    rows: &'a mut Vec<Row>,
    sink: &'a mut dyn FnMut(&Row),
}

/// Forward outputs of one run, BHND f32.
struct FwdResult {
    o: Vec<f32>,
    rem: Vec<f32>,
    log2_rem: Vec<f32>,
    o_saved: Vec<f32>,
    /// Outputs written outside their bounds: (name, elements of the guard zones overwritten).
    outside: Vec<(&'static str, usize)>,
}

/// Which tensor family an output belongs to: q-shaped (H heads), K/V-shaped (H_kv heads) or rows.
#[derive(Clone, Copy)]
enum Family {
    Query,
    KeyValue,
}

/// A guarded output in the problem's layout, as f32 in canonical order; overwritten guard elements
/// are added to `outside`.
fn read_tensor<T: SbElement, E: DeviceRepr + Copy>(
    dev: &Device,
    g: &Guarded<E>,
    to_f32: fn(E) -> f32,
    p: &DeviceProblem<T>,
    family: Family,
    name: &'static str,
    outside: &mut Vec<(&'static str, usize)>,
) -> Result<Vec<f32>, GpuError> {
    let (x, bad) = g.read(dev)?;
    if bad > 0 {
        outside.push((name, bad));
    }
    let f: Vec<f32> = x.into_iter().map(to_f32).collect();
    let heads = match family {
        Family::Query => p.shape.heads,
        Family::KeyValue => p.shape.kv_heads,
    };
    Ok(from_layout_seqs(&p.seq_lens, heads, p.shape.head_dim, p.layout, &f))
}

/// A guarded f32 rows output (rem, log2 rem) in canonical order.
fn read_rows<T>(
    dev: &Device,
    g: &Guarded<f32>,
    p: &DeviceProblem<T>,
    name: &'static str,
    outside: &mut Vec<(&'static str, usize)>,
) -> Result<Vec<f32>, GpuError> {
    let (x, bad) = g.read(dev)?;
    if bad > 0 {
        outside.push((name, bad));
    }
    Ok(rows_from_layout(&p.seq_lens, p.shape.heads, p.layout, &x))
}

/// The reference's o before the fused remainder (what o_saved holds): o - rem_i v_i when fused
/// (v_i of the query head's K/V head).
fn unfused_o(exp: &Expected, inputs: &Inputs, remainder: Remainder) -> Vec<f64> {
    let mut o = exp.o.clone();
    if remainder == Remainder::Fuse {
        let d = inputs.shape.head_dim;
        for r in inputs.heads() {
            for i in 0..r.len {
                let rem = exp.rem[r.rows + i];
                for t in 0..d {
                    o[r.q + i * d + t] -= rem * inputs.v[r.kv + i * d + t] as f64;
                }
            }
        }
    }
    o
}

struct BwdResult {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    outside: Vec<(&'static str, usize)>,
}

impl Group<'_> {
    fn run_dtype(&mut self) -> Result<(), GpuError> {
        match self.inputs.dtype {
            Dtype::Bf16 => self.run::<half::bf16>(),
            Dtype::F16 => self.run::<half::f16>(),
        }
    }

    fn run<T: SbElement>(&mut self) -> Result<(), GpuError> {
        let plan = self.plan;
        let shape = self.inputs.shape;
        let configs: Vec<(Mask, Remainder)> =
            plan.masks.iter().flat_map(|&m| plan.remainders.iter().map(move |&r| (m, r))).collect();
        let backward = plan.passes.contains(&Pass::Backward);
        // A fused backward's error is measured against at least the unfused gradient of the same
        // mask (see `backward_family`), so that reference runs too when the plan lacks it.
        let mut all_configs = configs.clone();
        if backward {
            for &(mask, remainder) in &configs {
                if remainder == Remainder::Fuse && !all_configs.contains(&(mask, Remainder::Return)) {
                    all_configs.push((mask, Remainder::Return));
                }
            }
        }
        let options: Vec<Options> =
            all_configs.iter().map(|&(mask, remainder)| Options { mask, remainder, ..Options::causal() }).collect();
        let expected = oracle::expected(self.inputs, &options, backward, plan.threads);
        let expected_for = |mask: Mask, remainder: Remainder| {
            all_configs.iter().position(|&c| c == (mask, remainder)).map(|i| &expected[i])
        };
        for layout in self.layouts.clone() {
            let problem = DeviceProblem::<T>::upload(self.dev, self.inputs, layout, true)?;
            for (&(mask, remainder), exp) in configs.iter().zip(&expected) {
                let base = Spec {
                    head_dim: shape.head_dim as u32,
                    dtype: self.inputs.dtype,
                    mask,
                    layout,
                    remainder,
                    pass: Pass::Forward,
                    early_exit_bits: None,
                    deterministic: false,
                };
                // The backward reads what the forward saved (o_saved must be the kernels' own: the
                // backward's g sums to dO . o_saved only with A rounded as the forward rounded it),
                // so checking the backward runs the forward too.
                let forward = self.forward_family(&problem, base, exp)?;
                if backward {
                    let floor = match remainder {
                        Remainder::Fuse => expected_for(mask, Remainder::Return).and_then(|e| e.grads.as_ref()),
                        Remainder::Return => None,
                    };
                    for deterministic in plan.deterministic_for(Pass::Backward) {
                        let spec = Spec { pass: Pass::Backward, deterministic, ..base };
                        self.backward_family(&problem, spec, exp, floor, &forward)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn emit(&mut self, row: Row) {
        (self.sink)(&row);
        self.rows.push(row);
    }

    /// Builds and runs one kernel; build and launch failures become row failures, a lost context
    /// an error.
    fn attempt<R>(&self, row: &mut Row, f: impl FnOnce() -> Result<R, GpuError>) -> Result<Option<R>, GpuError> {
        match f() {
            Ok(r) => Ok(Some(r)),
            Err(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. })) => Err(e),
            Err(e) => {
                row.failures.push(Failure::Launch(e));
                Ok(None)
            }
        }
    }

    fn forward_family<T: SbElement>(
        &mut self,
        p: &DeviceProblem<T>,
        base: Spec,
        exp: &Expected,
    ) -> Result<Vec<(Option<u32>, FwdResult)>, GpuError> {
        // Every run's outputs, by early-exit setting: the backward of a setting reads its forward's.
        let mut runs: Vec<(Option<u32>, FwdResult)> = Vec::new();
        for &ee in &self.plan.early_exits {
            let spec = Spec { early_exit_bits: ee, ..base };
            let mut row = Row::new(spec, self.regime, p.shape);
            let got = match self.build(&mut row, spec) {
                Some(binary) => self.attempt(&mut row, || {
                    let dev = self.dev;
                    let mut o = guarded::<T>(dev, p.q_len())?;
                    let mut rem = guarded_f32(dev, p.rows())?;
                    let mut log2_rem = guarded_f32(dev, p.rows())?;
                    let mut o_saved = guarded_f32(dev, p.q_len())?;
                    let out = exec::FwdViews {
                        o: o.view_mut(),
                        rem: rem.view_mut(),
                        log2_rem: log2_rem.view_mut(),
                        o_saved: Some(o_saved.view_mut()),
                    };
                    exec::forward_to(dev, &binary, p, out, None)?;
                    dev.sync(binary.name(), self.plan.timeout)?;
                    let mut outside = Vec::new();
                    let o = read_tensor(dev, &o, T::to_f32, p, Family::Query, "o", &mut outside)?;
                    let o_saved = read_tensor(dev, &o_saved, |x| x, p, Family::Query, "o_saved", &mut outside)?;
                    let rem = read_rows(dev, &rem, p, "rem", &mut outside)?;
                    let log2_rem = read_rows(dev, &log2_rem, p, "log2_rem", &mut outside)?;
                    Ok(FwdResult { o, rem, log2_rem, o_saved, outside })
                })?,
                None => None,
            };
            if let Some(got) = got {
                row.outside(&got.outside);
                row.nan("o", &got.o);
                row.nan("rem", &got.rem);
                row.nan("log2_rem", &got.log2_rem);
                row.nan("o_saved", &got.o_saved);
                row.error("o_saved", rel_l2(&got.o_saved, &unfused_o(exp, self.inputs, spec.remainder)), FWD_TOL);
                let err_o = rel_l2(&got.o, &exp.o);
                let err_rem = rel_l2(&got.rem, &exp.rem);
                row.err_o = Some(err_o);
                row.err_rem = Some(err_rem);
                row.error("o", err_o, FWD_TOL);
                row.error("rem", err_rem, FWD_TOL);
                if let (Some(bits), Some((_, full))) = (ee, runs.iter().find(|(e, _)| e.is_none())) {
                    self.early_exit_forward(&mut row, bits, &got, full);
                }
                runs.push((ee, got));
            }
            self.emit(row);
        }
        Ok(runs)
    }

    fn early_exit_forward(&self, row: &mut Row, bits: u32, got: &FwdResult, full: &FwdResult) {
        let d = self.inputs.shape.head_dim;
        let bound = 2f32.powi(-(bits as i32));
        let fuse = if row.spec.remainder == Remainder::Fuse { 2.0 } else { 1.0 };
        let mut over_o = 0usize;
        for r in self.inputs.heads() {
            let (oe, of) = (&got.o[r.q..r.q + r.len * d], &full.o[r.q..r.q + r.len * d]);
            let vmax = self.inputs.v[r.kv..r.kv + r.len * d].iter().fold(0f32, |m, x| m.max(x.abs()));
            over_o += oe
                .iter()
                .zip(of)
                .filter(|(a, b)| (*a - *b).abs() > fuse * bound * vmax + ulp(self.inputs.dtype, **b))
                .count();
        }
        let over_rem =
            got.rem.iter().zip(&full.rem).filter(|(a, b)| (*a - *b).abs() > bound * 1.01 + 1e-7 * b.abs()).count();
        if over_o + over_rem > 0 {
            row.failures.push(Failure::EarlyExitBound { bits, o: over_o, rem: over_rem });
        }
        if self.regime == Regime::LongReach {
            let pairs = [
                (&got.o, &full.o),
                (&got.rem, &full.rem),
                (&got.log2_rem, &full.log2_rem),
                (&got.o_saved, &full.o_saved),
            ];
            let differ: usize = pairs
                .iter()
                .map(|(a, b)| a.iter().zip(b.iter()).filter(|(x, y)| x.to_bits() != y.to_bits()).count())
                .sum();
            if differ > 0 {
                let worst = pairs
                    .iter()
                    .flat_map(|(a, b)| a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()))
                    .fold(0f32, f32::max);
                row.failures.push(Failure::EarlyExitChanged { elements: differ, worst });
            }
        }
    }

    fn backward_family<T: SbElement>(
        &mut self,
        p: &DeviceProblem<T>,
        base: Spec,
        exp: &Expected,
        floor: Option<&Grads>,
        forward: &[(Option<u32>, FwdResult)],
    ) -> Result<(), GpuError> {
        let grads = exp.grads.as_ref().expect("the reference ran the backward");
        // The fused gradient of q and k holds a difference of the stick given to the keys and the
        // stick left to v_i; with one allowed key per row (N = 1, attend_current: o = v) the dO . v
        // parts cancel exactly, only the dRem part is left, and the kernel's bf16 rounding of A
        // leaves ~2^-9 of the cancelled part. The error is therefore relative to the larger of the
        // fused and the unfused gradient (the size of the cancelling terms).
        let grad_error = |got: &[f32], want: &[f64], pick: fn(&Grads) -> &Vec<f64>| match floor {
            Some(f) => rel_l2_floored(got, want, pick(f)),
            None => rel_l2(got, want),
        };
        let shape = p.shape;
        let mut full: Option<BwdResult> = None;
        for &ee in &self.plan.early_exits {
            let spec = Spec { early_exit_bits: ee, ..base };
            let mut row = Row::new(spec, self.regime, shape);
            // The backward reads its forward kernel's own saved outputs (o, o_saved, log2_rem), as in
            // training; they were checked against the reference in the forward's row.
            let Some((_, fwd)) = forward.iter().find(|(e, _)| *e == ee) else {
                row.failures.push(Failure::ForwardFailed);
                self.emit(row);
                continue;
            };
            let (lens, d, layout) = (&p.seq_lens, shape.head_dim, p.layout);
            let in_layout = |x: &[f32]| to_layout_seqs(lens, shape.heads, d, layout, x);
            let o_host: Vec<T> = in_layout(&fwd.o).into_iter().map(T::from_f32).collect();
            let o = self.dev.stream.clone_htod(&o_host)?;
            let o_saved = exec::upload_f32(self.dev, &in_layout(&fwd.o_saved))?;
            let log2_rem = exec::upload_f32(self.dev, &rows_to_layout(lens, shape.heads, layout, &fwd.log2_rem))?;
            let saved = exec::Saved { o: &o, o_saved: &o_saved, log2_rem: &log2_rem };
            // A deterministic backward runs twice: the second run must repeat the first bit for bit.
            let runs = if spec.deterministic { 2 } else { 1 };
            let got = match self.build(&mut row, spec) {
                Some(binary) => self.attempt(&mut row, || {
                    let dev = self.dev;
                    let mut results: Vec<BwdResult> = Vec::with_capacity(runs);
                    for _ in 0..runs {
                        let mut dq = guarded::<T>(dev, p.q_len())?;
                        let mut dk = guarded::<T>(dev, p.kv_len())?;
                        let mut dv = guarded::<T>(dev, p.kv_len())?;
                        let out = exec::GradViews { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() };
                        exec::backward_to(dev, &binary, p, saved, out, None)?;
                        dev.sync(binary.name(), self.plan.timeout)?;
                        let mut outside = Vec::new();
                        let dq = read_tensor(dev, &dq, T::to_f32, p, Family::Query, "dq", &mut outside)?;
                        let dk = read_tensor(dev, &dk, T::to_f32, p, Family::KeyValue, "dk", &mut outside)?;
                        let dv = read_tensor(dev, &dv, T::to_f32, p, Family::KeyValue, "dv", &mut outside)?;
                        results.push(BwdResult { dq, dk, dv, outside });
                    }
                    Ok(results)
                })?,
                None => None,
            };
            if let Some(mut results) = got {
                let got = results.remove(0);
                if let Some(again) = results.first() {
                    let differ =
                        |a: &[f32], b: &[f32]| a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
                    let elements = differ(&got.dq, &again.dq) + differ(&got.dk, &again.dk) + differ(&got.dv, &again.dv);
                    if elements > 0 {
                        row.failures.push(Failure::NotDeterministic { elements });
                    }
                }
                row.outside(&got.outside);
                row.err_dq = Some(grad_error(&got.dq, &grads.dq, |g| &g.dq));
                row.err_dk = Some(grad_error(&got.dk, &grads.dk, |g| &g.dk));
                row.err_dv = Some(rel_l2(&got.dv, &grads.dv));
                for (name, x, err) in
                    [("dq", &got.dq, row.err_dq), ("dk", &got.dk, row.err_dk), ("dv", &got.dv, row.err_dv)]
                {
                    row.nan(name, x);
                    row.error(name, err.unwrap_or(f64::NAN), GRAD_TOL);
                }
                match (ee, &full) {
                    (None, _) => full = Some(got),
                    (Some(bits), Some(f)) => {
                        for (name, a, b) in [("dq", &got.dq, &f.dq), ("dk", &got.dk, &f.dk), ("dv", &got.dv, &f.dv)] {
                            let d = rel_l2_f32(a, b);
                            if d.is_nan() || d > EE_BWD_TOL {
                                row.failures.push(Failure::EarlyExitGradient {
                                    bits,
                                    what: name,
                                    moved: d,
                                    tol: EE_BWD_TOL,
                                });
                            }
                        }
                    }
                    (Some(_), None) => {}
                }
            }
            self.emit(row);
        }
        Ok(())
    }

    fn build(&self, row: &mut Row, spec: Spec) -> Option<std::sync::Arc<sbgen_runtime::launcher::KernelBinary>> {
        let kernel = self.builder.kernel(spec, self.plan.schedule_for(&spec));
        match self.builder.build(&kernel) {
            Ok(b) => Some(b),
            Err(e) => {
                row.failures.push(Failure::Build(e));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_plan_covers_every_supported_spec() {
        let plan = CheckPlan::full(1);
        let specs = plan.specs();
        assert_eq!(specs.len(), 2 * 2 * 2 * 2 * 2 * 2 * 2);
        assert!(specs.iter().all(|s| s.validate().is_ok()));
        let mut unique = specs.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), specs.len());
        assert_eq!(plan.seqs, vec![1, 17, 64, 1000, 4097]);
    }

    #[test]
    fn the_forward_can_run_another_schedule_than_the_backward() {
        let mut plan = CheckPlan::quick(1);
        let (fwd, bwd) = (Spec::new(64, Dtype::Bf16, Pass::Forward), Spec::new(64, Dtype::Bf16, Pass::Backward));
        assert_eq!((plan.schedule_for(&fwd), plan.schedule_for(&bwd)), (None, None));
        let (a, b) = (Schedule::DEFAULT, Schedule { block_n: 32, ..Schedule::DEFAULT });
        plan.schedule = Some(a);
        assert_eq!((plan.schedule_for(&fwd), plan.schedule_for(&bwd)), (Some(a), Some(a)));
        plan.forward_schedule = Some(b);
        assert_eq!((plan.schedule_for(&fwd), plan.schedule_for(&bwd)), (Some(b), Some(a)));
    }

    #[test]
    fn shapes_are_odd_and_small_for_long_sequences() {
        let mha = KvHeads::Group(1);
        assert_eq!(shape_for(17, 64, mha), Shape::new(3, 5, 17, 64));
        assert_eq!(shape_for(4097, 128, mha), Shape::new(1, 3, 4097, 128));
        assert_eq!(shape_for(17, 64, KvHeads::Group(8)), Shape::new(2, 16, 17, 64).with_kv_heads(2));
        assert_eq!(shape_for(4097, 64, KvHeads::Group(2)), Shape::new(1, 2, 4097, 64).with_kv_heads(1));
        assert_eq!(shape_for(17, 96, KvHeads::Mqa), Shape::new(2, 4, 17, 96).with_kv_heads(1));
        for kv in [mha, KvHeads::Group(2), KvHeads::Group(8), KvHeads::Mqa] {
            for seq in [1, 17, 4097] {
                let s = shape_for(seq, 64, kv);
                assert_eq!(s.heads % s.kv_heads, 0, "{kv} {seq}");
            }
        }
    }

    #[test]
    fn kv_heads_parse_and_print() {
        assert_eq!("mqa".parse::<KvHeads>(), Ok(KvHeads::Mqa));
        assert_eq!("8".parse::<KvHeads>(), Ok(KvHeads::Group(8)));
        assert!("0".parse::<KvHeads>().unwrap_err().contains("`kv_groups` = `0`"));
        assert_eq!(KvHeads::Group(2).to_string(), "2");
    }

    #[test]
    fn deterministic_applies_to_the_backward_only() {
        let mut plan = CheckPlan::quick(1);
        plan.head_dims = vec![64];
        plan.dtypes = vec![Dtype::Bf16];
        plan.deterministic = vec![false, true];
        let specs = plan.specs();
        assert!(specs.iter().all(|s| !s.deterministic || s.pass == Pass::Backward));
        let det = specs.iter().filter(|s| s.deterministic).count();
        assert_eq!(det, specs.iter().filter(|s| s.pass == Pass::Forward).count());
        assert!(specs.iter().all(|s| s.validate().is_ok()));
    }

    #[test]
    fn group_seeds_differ() {
        let a = group_seed(1, 64, Dtype::Bf16, Regime::Random, 17);
        assert_ne!(a, group_seed(1, 64, Dtype::Bf16, Regime::Random, 1000));
        assert_ne!(a, group_seed(1, 64, Dtype::F16, Regime::Random, 17));
        assert_ne!(a, group_seed(2, 64, Dtype::Bf16, Regime::Random, 17));
    }
}
