//! `sbgen check --pass decode`: every selected decode spec against the float64 decode reference.
//!
//! For each (head_dim, dtype, regime, K/V grouping) one batch of sequences of the selected lengths
//! (default 1, 17, 1000, 65537) is drawn into a cache whose uncached tokens hold NaN (a kernel
//! reading past a sequence poisons its output); the reference runs once per (mask, remainder), each
//! sequence on its own tokens. Then for each cache (BHND, BNHD, paged with each page size: pages
//! shuffled, spare pages NaN), each (mask, remainder), each split (the launcher's default, and
//! `fine`: one CTA of warps looping over chunks of one key block, so the merge and the loop run even
//! on short sequences and the 65537-token sequence needs longer chunks than its minimum to fit the
//! workspace) and each early-exit setting the kernel runs with poisoned outputs between guard zones:
//!
//! - o and rem: relative L2 error <= 5e-3 ([`super::check::FWD_TOL`]), no NaN, nothing written
//!   outside;
//! - early exit (T bits) against the run without it (same split): |Δo| <= 2^-T max|v| (twice that
//!   fused) + one ulp, |Δrem| <= 2^-T; on long-reach data where every row keeps more than 2^-T of
//!   its stick (no exit can trigger) bit-identical.

use super::check::{KvHeads, FWD_TOL};
use super::data::{rel_l2, ulp, Regime};
use super::decode::{decode_to, make_decode_inputs, reference, CacheKind, DecodeInputs, DeviceCache};
use super::device::{Device, GpuError};
use super::exec::{guarded, guarded_f32};
use super::failure::{Failure, Row};
use super::kernels::KernelBuilder;
use crate::ir::{Dtype, Kernel, Layout, Mask, Pass, Remainder, Schedule, Spec};
use sbgen_runtime::launcher::{DecodeSplit, SbElement, MAX_DECODE_CHUNKS};
use sbgen_runtime::reference::{DecodeShape, Decoded, Options, Shape};
use std::fmt;
use std::time::Duration;

/// Sequence lengths of one checked batch: the 1, 17, 1000 and 65537 (`--quick`: without
/// 65537).
pub const FULL_SEQLENS: &[usize] = &[1, 17, 1000, 65537];
pub const QUICK_SEQLENS: &[usize] = &[1, 17, 1000];
/// Page sizes of the paged cache.
pub const PAGE_SIZES: &[usize] = &[16, 32, 64];

/// How the keys are split in a checked run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitChoice {
    /// The launcher's choice for the device.
    Default,
    /// One CTA per (sequence, K/V head, tile), chunks of one key block, up to the workspace's most.
    Fine,
}

impl SplitChoice {
    pub fn split(self, block_n: usize) -> DecodeSplit {
        match self {
            SplitChoice::Default => DecodeSplit::default(),
            SplitChoice::Fine => {
                DecodeSplit { splits: Some(1), chunk_keys: Some(block_n), max_chunks: Some(MAX_DECODE_CHUNKS) }
            }
        }
    }
}

impl fmt::Display for SplitChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SplitChoice::Default => "default",
            SplitChoice::Fine => "fine",
        })
    }
}

/// What to check.
#[derive(Clone, Debug)]
pub struct DecodeCheckPlan {
    pub head_dims: Vec<u32>,
    pub dtypes: Vec<Dtype>,
    pub masks: Vec<Mask>,
    pub caches: Vec<CacheKind>,
    pub remainders: Vec<Remainder>,
    pub early_exits: Vec<Option<u32>>,
    pub regimes: Vec<Regime>,
    /// The lengths of the one batch of each group.
    pub seqlens: Vec<usize>,
    pub kv_heads: Vec<KvHeads>,
    pub splits: Vec<SplitChoice>,
    pub schedule: Option<Schedule>,
    pub seed: u64,
    pub threads: usize,
    pub timeout: Duration,
}

impl DecodeCheckPlan {
    pub fn full(seed: u64) -> Self {
        let mut caches = vec![CacheKind::Contiguous(Layout::Bhnd), CacheKind::Contiguous(Layout::Bnhd)];
        caches.extend(PAGE_SIZES.iter().map(|&page_size| CacheKind::Paged { page_size }));
        DecodeCheckPlan {
            head_dims: vec![64, 128],
            dtypes: Dtype::ALL.to_vec(),
            masks: vec![Mask::Strict, Mask::AttendCurrent],
            caches,
            remainders: vec![Remainder::Return, Remainder::Fuse],
            early_exits: vec![None, Some(24)],
            regimes: Regime::ALL.to_vec(),
            seqlens: FULL_SEQLENS.to_vec(),
            kv_heads: vec![KvHeads::Group(1), KvHeads::Group(4)],
            splits: vec![SplitChoice::Default, SplitChoice::Fine],
            schedule: None,
            seed,
            threads: crate::pool::default_threads(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn quick(seed: u64) -> Self {
        DecodeCheckPlan { seqlens: QUICK_SEQLENS.to_vec(), ..DecodeCheckPlan::full(seed) }
    }

    /// The kernel layouts the caches need, each once.
    fn layouts(&self) -> Vec<Layout> {
        let mut out: Vec<Layout> = Vec::new();
        for c in &self.caches {
            if !out.contains(&c.layout()) {
                out.push(c.layout());
            }
        }
        out
    }

    /// Every spec in the plan.
    pub fn specs(&self) -> Vec<Spec> {
        let mut out = Vec::new();
        for &head_dim in &self.head_dims {
            for &dtype in &self.dtypes {
                for &mask in &self.masks {
                    for &remainder in &self.remainders {
                        for layout in self.layouts() {
                            for &early_exit_bits in &self.early_exits {
                                out.push(Spec {
                                    head_dim,
                                    dtype,
                                    mask,
                                    layout,
                                    remainder,
                                    pass: Pass::Decode,
                                    early_exit_bits,
                                    deterministic: false,
                                });
                            }
                        }
                    }
                }
            }
        }
        out
    }

    pub fn kernels(&self, builder: &KernelBuilder) -> Vec<Kernel> {
        self.specs().into_iter().map(|s| builder.kernel(s, self.schedule)).collect()
    }

    /// The rows [`run`] reports (one per kernel run): per (head_dim, dtype, regime, K/V heads),
    /// each cache, mask, remainder, split and early-exit setting.
    pub fn rows(&self) -> usize {
        [
            self.head_dims.len(),
            self.dtypes.len(),
            self.regimes.len(),
            self.kv_heads.len(),
            self.caches.len(),
            self.masks.len(),
            self.remainders.len(),
            self.splits.len(),
            self.early_exits.len(),
        ]
        .iter()
        .product()
    }
}

/// Query and K/V heads of a checked batch: 4 query heads per K/V head group of 1 on 4 K/V heads,
/// else `2 * group` on 2 (MQA: 4 on 1).
pub fn decode_shape(head_dim: u32, batch: usize, kv: KvHeads) -> DecodeShape {
    let (heads, kv_heads) = match kv {
        KvHeads::Group(1) => (4, 4),
        KvHeads::Group(g) => (2 * g, 2),
        KvHeads::Mqa => (4, 1),
    };
    DecodeShape { batch, heads, kv_heads, head_dim: head_dim as usize }
}

/// Runs the plan, handing each row to `sink`. Stops early only when the context is lost or a
/// kernel hangs.
pub fn run(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &DecodeCheckPlan,
    sink: &mut dyn FnMut(&Row),
) -> Result<Vec<Row>, GpuError> {
    let mut rows = Vec::new();
    let capacity = plan.seqlens.iter().copied().max().unwrap_or(0).max(1);
    for &head_dim in &plan.head_dims {
        for &dtype in &plan.dtypes {
            for &regime in &plan.regimes {
                for &kv in &plan.kv_heads {
                    let shape = decode_shape(head_dim, plan.seqlens.len(), kv);
                    let seed = super::check::group_seed(plan.seed, head_dim, dtype, regime, capacity)
                        ^ (shape.heads as u64 * 0x9e37_79b9 + shape.kv_heads as u64);
                    let inputs = make_decode_inputs(shape, &plan.seqlens, capacity, dtype, regime, seed);
                    let mut group = Group { dev, builder, plan, regime, inputs: &inputs, seed, rows: &mut rows, sink };
                    match dtype {
                        Dtype::Bf16 => group.run::<half::bf16>()?,
                        Dtype::F16 => group.run::<half::f16>()?,
                    }
                }
            }
        }
    }
    Ok(rows)
}

struct Group<'a> {
    dev: &'a Device,
    builder: &'a KernelBuilder,
    plan: &'a DecodeCheckPlan,
    regime: Regime,
    inputs: &'a DecodeInputs,
    seed: u64,
    rows: &'a mut Vec<Row>,
    sink: &'a mut dyn FnMut(&Row),
}

/// One run's outputs.
struct Got {
    o: Vec<f32>,
    rem: Vec<f32>,
}

impl Group<'_> {
    fn run<T: SbElement>(&mut self) -> Result<(), GpuError> {
        let plan = self.plan;
        let x = self.inputs;
        let s = x.shape;
        let q = self.dev.stream.clone_htod(&x.q.iter().map(|&e| T::from_f32(e)).collect::<Vec<T>>())?;
        let mut expected = Vec::new();
        for &mask in &plan.masks {
            for &remainder in &plan.remainders {
                let opts = Options { mask, remainder, ..Options::causal() };
                expected.push(((mask, remainder), reference(x, &opts, plan.threads)));
            }
        }
        let row_shape = Shape::new(s.batch, s.heads, x.capacity, s.head_dim).with_kv_heads(s.kv_heads);
        for &cache_kind in &plan.caches {
            let cache = DeviceCache::<T>::upload(self.dev, x, cache_kind, self.seed)?;
            for ((mask, remainder), exp) in &expected {
                for &split in &plan.splits {
                    let mut full: Option<Got> = None;
                    for &ee in &plan.early_exits {
                        let spec = Spec {
                            head_dim: s.head_dim as u32,
                            dtype: x.dtype,
                            mask: *mask,
                            layout: cache_kind.layout(),
                            remainder: *remainder,
                            pass: Pass::Decode,
                            early_exit_bits: ee,
                            deterministic: false,
                        };
                        let mut row = Row::new(spec, self.regime, row_shape);
                        row.detail = format!("cache {cache_kind}, split {split}");
                        if let Some(got) = self.one::<T>(&mut row, spec, &q, &cache, split)? {
                            row.nan("o", &got.o);
                            row.nan("rem", &got.rem);
                            let (err_o, err_rem) = (rel_l2(&got.o, &exp.o), rel_l2(&got.rem, &exp.rem));
                            row.err_o = Some(err_o);
                            row.err_rem = Some(err_rem);
                            row.error("o", err_o, FWD_TOL);
                            row.error("rem", err_rem, FWD_TOL);
                            match (ee, &full) {
                                (None, _) => full = Some(got),
                                (Some(bits), Some(full)) => self.early_exit(&mut row, bits, &got, full, exp),
                                (Some(_), None) => {}
                            }
                        }
                        (self.sink)(&row);
                        self.rows.push(row);
                    }
                }
            }
        }
        Ok(())
    }

    /// Builds and runs one kernel into poisoned, guarded outputs. Build and launch failures become
    /// row failures; a lost context or a hang is an error.
    fn one<T: SbElement>(
        &self,
        row: &mut Row,
        spec: Spec,
        q: &cudarc::driver::CudaSlice<T>,
        cache: &DeviceCache<T>,
        split: SplitChoice,
    ) -> Result<Option<Got>, GpuError> {
        let kernel = self.builder.kernel(spec, self.plan.schedule);
        let binary = match self.builder.build(&kernel) {
            Ok(b) => b,
            Err(e) => {
                row.failures.push(Failure::Build(e));
                return Ok(None);
            }
        };
        let dev = self.dev;
        let s = self.inputs.shape;
        let result = (|| {
            let mut o = guarded::<T>(dev, s.len())?;
            let mut rem = guarded_f32(dev, s.rows())?;
            let split = split.split(binary.manifest().block_n as usize);
            decode_to(dev, &binary, s, q, cache, o.view_mut(), rem.view_mut(), split, None)?;
            dev.sync(binary.name(), self.plan.timeout)?;
            let (o, o_out) = o.read(dev)?;
            let (rem, rem_out) = rem.read(dev)?;
            let outside: Vec<(&'static str, usize)> =
                [("o", o_out), ("rem", rem_out)].into_iter().filter(|&(_, n)| n > 0).collect();
            Ok::<_, GpuError>((Got { o: o.into_iter().map(T::to_f32).collect(), rem }, outside))
        })();
        match result {
            Ok((got, outside)) => {
                row.outside(&outside);
                Ok(Some(got))
            }
            Err(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. })) => Err(e),
            Err(e) => {
                row.failures.push(Failure::Launch(e));
                Ok(None)
            }
        }
    }

    fn early_exit(&self, row: &mut Row, bits: u32, got: &Got, full: &Got, exp: &Decoded) {
        let x = self.inputs;
        let s = x.shape;
        let d = s.head_dim;
        let bound = 2f32.powi(-(bits as i32));
        let fuse = if row.spec.remainder == Remainder::Fuse { 2.0 } else { 1.0 };
        let mut over_o = 0;
        for b in 0..s.batch {
            let len = x.seqlens[b];
            for h in 0..s.heads {
                let kv = (b * s.kv_heads + h / s.group()) * x.capacity * d;
                let vmax = x.v[kv..kv + len * d].iter().fold(0f32, |m, e| m.max(e.abs()));
                let at = (b * s.heads + h) * d;
                over_o += got.o[at..at + d]
                    .iter()
                    .zip(&full.o[at..at + d])
                    .filter(|(a, f)| (*a - *f).abs() > fuse * bound * vmax + ulp(x.dtype, **f))
                    .count();
            }
        }
        let over_rem =
            got.rem.iter().zip(&full.rem).filter(|(a, f)| (*a - *f).abs() > bound * 1.01 + 1e-7 * f.abs()).count();
        if over_o + over_rem > 0 {
            row.failures.push(Failure::EarlyExitBound { bits, o: over_o, rem: over_rem });
        }
        // Long-reach data whose every row keeps more than 2^-T of its stick: no exit can trigger.
        if self.regime == Regime::LongReach && exp.rem.iter().all(|&r| r > bound as f64) {
            let pairs = [(&got.o, &full.o), (&got.rem, &full.rem)];
            let differ: usize = pairs
                .iter()
                .map(|(a, b)| a.iter().zip(b.iter()).filter(|(p, q)| p.to_bits() != q.to_bits()).count())
                .sum();
            if differ > 0 {
                let worst = pairs
                    .iter()
                    .flat_map(|(a, b)| a.iter().zip(b.iter()).map(|(p, q)| (p - q).abs()))
                    .fold(0f32, f32::max);
                row.failures.push(Failure::EarlyExitChanged { elements: differ, worst });
            }
        }
    }
}
