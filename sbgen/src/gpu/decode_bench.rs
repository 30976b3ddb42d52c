//! `sbgen bench --decode`: decode timings and the bandwidth they reach (docs/performance.md#decode).
//!
//! Each problem is B sequences of N cached tokens, H query heads on H_kv K/V heads. The cache is
//! filled on the device by tiling R random rows (R = 65537, prime, so no two heads or sequences of a
//! problem repeat each other's keys row for row); the host keeps those rows, so it can rebuild any
//! sequence's tokens. Before timing, each kernel's output for the first and last sequence is checked
//! against the float64 decode reference on the rebuilt tokens (relative L2 <= 5e-3): a kernel that
//! fails is reported, not timed. The repetitions are captured into one CUDA graph, each decode step
//! between two event-record nodes, and the L2 is emptied between them (outside the timed part, read
//! or write flush: [`super::l2_flush`]), so no repetition finds the previous one's keys in L2.
//!
//! Bandwidth counts the K and V bytes of the whole context (`B * H_kv * N * D * 2 * element bytes`)
//! over the median time, also with early exit, where far fewer bytes are read: there it is the
//! context's effective rate, and `x full` the time without exit over the time with it.

use super::check::FWD_TOL;
use super::data::{normal, rel_l2};
use super::decode::{decode_to, CacheKind, DeviceCache};
use super::device::{Device, GpuError};
use super::kernels::KernelBuilder;
use super::l2_flush::{FlushMode, L2Flush};
use crate::ir::{Dtype, Mask, Pass, Remainder, Schedule, Spec};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sbgen_runtime::launcher::{DecodeSplit, KernelBinary, KvCacheGeometry, SbElement};
use sbgen_runtime::reference::{decode, DecodeShape, Options};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// The H200's HBM3e peak (4.8 TB/s), what the bandwidth column is a fraction of.
pub const H200_PEAK_GBPS: f64 = 4800.0;
/// Random rows the cache is tiled from.
const BASE_ROWS: usize = 65537;

/// One decode problem: B sequences of N cached tokens each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DecodeProblem {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl DecodeProblem {
    pub fn shape(&self) -> DecodeShape {
        DecodeShape { batch: self.batch, heads: self.heads, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }

    /// K and V bytes of the whole context.
    pub fn kv_bytes(&self, dtype: Dtype) -> f64 {
        (self.batch * self.kv_heads * self.seq * self.head_dim * 2 * dtype.size_bytes()) as f64
    }
}

/// What to time.
#[derive(Clone, Debug)]
pub struct DecodeBenchPlan {
    pub problems: Vec<DecodeProblem>,
    pub caches: Vec<CacheKind>,
    pub early_exits: Vec<Option<u32>>,
    pub dtype: Dtype,
    pub mask: Mask,
    pub schedule: Option<Schedule>,
    pub split: DecodeSplit,
    pub flush: FlushMode,
    pub reps: usize,
    pub warmup: usize,
    pub seed: u64,
    pub threads: usize,
}

impl DecodeBenchPlan {
    /// The grid: B in {8, 32, 64} x N in {8192, 32768, 131072}, 32:8 heads, D = 128.
    pub fn default_problems() -> Vec<DecodeProblem> {
        let mut out = Vec::new();
        for batch in [8, 32, 64] {
            for seq in [8192, 32768, 131072] {
                out.push(DecodeProblem { batch, heads: 32, kv_heads: 8, seq, head_dim: 128 });
            }
        }
        out
    }

    pub fn spec(&self, problem: &DecodeProblem, cache: CacheKind, early_exit_bits: Option<u32>) -> Spec {
        Spec {
            head_dim: problem.head_dim as u32,
            dtype: self.dtype,
            mask: self.mask,
            layout: cache.layout(),
            remainder: Remainder::Return,
            pass: Pass::Decode,
            early_exit_bits,
            deterministic: false,
        }
    }
}

/// One timed configuration.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeBenchResult {
    pub problem: DecodeProblem,
    pub cache: String,
    pub early_exit_bits: Option<u32>,
    pub kernel: String,
    /// The split the launcher chose: warps per (sequence, K/V head, tile), fewest keys per chunk,
    /// most chunks per sequence.
    pub splits: Option<usize>,
    pub chunk_keys: Option<usize>,
    pub max_chunks: Option<usize>,
    /// How the L2 was emptied between steps.
    pub flush: FlushMode,
    /// Relative L2 error of o against float64 on the first and last sequence.
    pub err_o: Option<f64>,
    pub ms_median: Option<f64>,
    pub ms_min: Option<f64>,
    pub ms_max: Option<f64>,
    /// Context K/V bytes over the median time.
    pub gbps: Option<f64>,
    /// `gbps` over [`H200_PEAK_GBPS`].
    pub peak_fraction: Option<f64>,
    /// With early exit: the same configuration's median without exit over this one's.
    pub speedup_over_full: Option<f64>,
    pub reps: usize,
    pub error: Option<String>,
}

/// A cache on the device filled from `base` (R rows of `width` elements, tiled over the physical
/// rows), and how to find a logical token in `base`.
pub(crate) struct TiledCache<T> {
    pub(crate) cache: DeviceCache<T>,
    base_k: Vec<f32>,
    base_v: Vec<f32>,
    width: usize,
    block_table: Option<Vec<i32>>,
}

impl<T> TiledCache<T> {
    /// The base row holding token n of K/V head hk of sequence b, and the column it starts at.
    fn locate(&self, p: &DecodeProblem, kind: CacheKind, b: usize, hk: usize, n: usize) -> (usize, usize) {
        let d = p.head_dim;
        let (row, col) = match (kind, self.cache.geometry) {
            (CacheKind::Contiguous(crate::ir::Layout::Bhnd), _) => (((b * p.kv_heads + hk) * p.seq + n), 0),
            (_, KvCacheGeometry::Paged { page_size, max_pages, .. }) => {
                let table = self.block_table.as_ref().expect("a paged cache has a table");
                let page = table[b * max_pages + n / page_size] as usize;
                (page * page_size + n % page_size, hk * d)
            }
            _ => (b * p.seq + n, hk * d),
        };
        ((row % BASE_ROWS) * self.width + col, d)
    }

    /// Sequence b's K and V, `[H_kv, N, D]` in f64, rebuilt from the base rows.
    fn sequence(&self, p: &DecodeProblem, kind: CacheKind, b: usize) -> (Vec<f64>, Vec<f64>) {
        let mut k = Vec::with_capacity(p.kv_heads * p.seq * p.head_dim);
        let mut v = Vec::with_capacity(k.capacity());
        for hk in 0..p.kv_heads {
            for n in 0..p.seq {
                let (at, d) = self.locate(p, kind, b, hk, n);
                k.extend(self.base_k[at..at + d].iter().map(|&x| x as f64));
                v.extend(self.base_v[at..at + d].iter().map(|&x| x as f64));
            }
        }
        (k, v)
    }
}

/// A cache for problem `p` in `kind`'s geometry, tiled on the device from random rows of each row
/// width (drawn once into `bases`).
pub(crate) fn tiled_cache<T: SbElement>(
    dev: &Device,
    p: &DecodeProblem,
    kind: CacheKind,
    dtype: Dtype,
    seed: u64,
    bases: &mut HashMap<usize, (Vec<f32>, Vec<f32>)>,
) -> Result<TiledCache<T>, GpuError> {
    let d = p.head_dim;
    let (width, geometry, block_table) = match kind {
        CacheKind::Contiguous(crate::ir::Layout::Bhnd) => (d, KvCacheGeometry::Contiguous { capacity: p.seq }, None),
        CacheKind::Contiguous(_) => (p.kv_heads * d, KvCacheGeometry::Contiguous { capacity: p.seq }, None),
        CacheKind::Paged { page_size } => {
            let max_pages = p.seq.div_ceil(page_size);
            let num_pages = p.batch * max_pages;
            let mut ids: Vec<i32> = (0..num_pages as i32).collect();
            ids.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x7061_6765));
            (p.kv_heads * d, KvCacheGeometry::Paged { num_pages, page_size, max_pages }, Some(ids))
        }
    };
    let total = geometry
        .cache_elements(p.batch, p.kv_heads, d)
        .ok_or_else(|| GpuError::Input(format!("the cache of {p:?} is too large")))?;
    let (base_k, base_v) = bases.entry(width).or_insert_with(|| {
        let mut rng = StdRng::seed_from_u64(seed ^ width as u64);
        let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|e| dtype.round(e)).collect() };
        let k = round(normal(&mut rng, BASE_ROWS * width));
        (k, round(normal(&mut rng, BASE_ROWS * width)))
    });
    let (base_k, base_v) = (base_k.clone(), base_v.clone());
    let fill = |base: &[f32]| -> Result<CudaSlice<T>, GpuError> {
        let host: Vec<T> = base.iter().map(|&x| T::from_f32(x)).collect();
        let tile = dev.stream.clone_htod(&host)?;
        // SAFETY: every element is written by the copies below before any kernel reads it.
        let mut out = unsafe { dev.stream.alloc::<T>(total) }?;
        let mut at = 0;
        while at < total {
            let n = (total - at).min(tile.len());
            dev.stream.memcpy_dtod(&tile.slice(0..n), &mut out.slice_mut(at..at + n))?;
            at += n;
        }
        Ok(out)
    };
    let seqlens = vec![p.seq as i32; p.batch];
    let cache = DeviceCache {
        k: fill(&base_k)?,
        v: fill(&base_v)?,
        geometry,
        seqlens: dev.stream.clone_htod(&seqlens)?,
        block_table: block_table.as_ref().map(|t| dev.stream.clone_htod(t)).transpose()?,
    };
    Ok(TiledCache { cache, base_k, base_v, width, block_table })
}

/// Runs the plan; each result goes to `sink` as it is measured.
pub fn run(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &DecodeBenchPlan,
    sink: &mut dyn FnMut(&DecodeBenchResult),
) -> Result<Vec<DecodeBenchResult>, GpuError> {
    match plan.dtype {
        Dtype::Bf16 => run_typed::<half::bf16>(dev, builder, plan, sink),
        Dtype::F16 => run_typed::<half::f16>(dev, builder, plan, sink),
    }
}

fn run_typed<T: SbElement>(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &DecodeBenchPlan,
    sink: &mut dyn FnMut(&DecodeBenchResult),
) -> Result<Vec<DecodeBenchResult>, GpuError> {
    let mut results = Vec::new();
    let mut flush = L2Flush::new(dev, plan.flush)?;
    // The random rows of each row width (drawn once: drawing 2 x 67M normals per problem would
    // dominate the run).
    let mut bases = HashMap::new();
    for (i, p) in plan.problems.iter().enumerate() {
        let s = p.shape();
        let seed = plan.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let q_host = normal(&mut StdRng::seed_from_u64(seed ^ 1), s.len());
        let q_host: Vec<f32> = q_host.into_iter().map(|x| plan.dtype.round(x)).collect();
        let q = dev.stream.clone_htod(&q_host.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>())?;
        for &kind in &plan.caches {
            let tiled = tiled_cache::<T>(dev, p, kind, plan.dtype, plan.seed, &mut bases)?;
            // The reference of the first and last sequence (independent of early exit: its effect is
            // under 2^-T, far below the tolerance).
            let checked: Vec<usize> = if p.batch > 1 { vec![0, p.batch - 1] } else { vec![0] };
            let opts = Options { mask: plan.mask, ..Options::causal() };
            let one = DecodeShape { batch: 1, ..s };
            let want: Vec<Vec<f64>> = crate::pool::map(&checked, plan.threads.min(checked.len()), |&b| {
                let (k, v) = tiled.sequence(p, kind, b);
                let q: Vec<f64> =
                    q_host[b * s.heads * s.head_dim..][..s.heads * s.head_dim].iter().map(|&x| x as f64).collect();
                decode(one, &opts, &q, &k, &v, &[p.seq]).o
            });
            let mut full_ms: Option<f64> = None;
            for &ee in &plan.early_exits {
                let spec = plan.spec(p, kind, ee);
                let mut r = DecodeBenchResult {
                    problem: *p,
                    cache: kind.to_string(),
                    early_exit_bits: ee,
                    kernel: String::new(),
                    splits: None,
                    chunk_keys: None,
                    max_chunks: None,
                    flush: plan.flush,
                    err_o: None,
                    ms_median: None,
                    ms_min: None,
                    ms_max: None,
                    gbps: None,
                    peak_fraction: None,
                    speedup_over_full: None,
                    reps: plan.reps,
                    error: None,
                };
                match time_one(dev, builder, plan, spec, s, &q, &tiled.cache, &checked, &want, &mut flush) {
                    Ok((name, split, err, ms)) => {
                        r.kernel = name;
                        r.splits = Some(split.splits);
                        r.chunk_keys = Some(split.chunk_keys);
                        r.max_chunks = Some(split.max_chunks);
                        r.err_o = Some(err);
                        match ms {
                            Some(ms) => {
                                let (med, min, max) = super::bench::stats(&ms);
                                r.ms_median = Some(med);
                                r.ms_min = Some(min);
                                r.ms_max = Some(max);
                                r.gbps = Some(p.kv_bytes(plan.dtype) / med / 1e6);
                                r.peak_fraction = r.gbps.map(|g| g / H200_PEAK_GBPS);
                                match ee {
                                    None => full_ms = Some(med),
                                    Some(_) => r.speedup_over_full = full_ms.map(|f| f / med),
                                }
                            }
                            None => r.error = Some(format!("o {err:.2e} > {FWD_TOL:.0e} against float64: not timed")),
                        }
                    }
                    Err(e @ (GpuError::ContextLost { .. } | GpuError::Hung { .. })) => return Err(e),
                    Err(e) => r.error = Some(super::check::short(&e)),
                }
                sink(&r);
                results.push(r);
            }
        }
    }
    Ok(results)
}

/// Checks one kernel on the first and last sequence, then times it (`None` when the check failed).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn time_one<T: SbElement>(
    dev: &Device,
    builder: &KernelBuilder,
    plan: &DecodeBenchPlan,
    spec: Spec,
    s: DecodeShape,
    q: &CudaSlice<T>,
    cache: &DeviceCache<T>,
    checked: &[usize],
    want: &[Vec<f64>],
    flush: &mut L2Flush,
) -> Result<(String, sbgen_runtime::launcher::DecodePlan, f64, Option<Vec<f64>>), GpuError> {
    let kernel = builder.build(&builder.kernel(spec, plan.schedule)).map_err(|e| GpuError::Input(e.to_string()))?;
    let mut o = super::exec::poisoned::<T>(dev, s.len())?;
    let mut rem = super::exec::poisoned_f32(dev, s.rows())?;
    let split = decode_to(dev, &kernel, s, q, cache, o.as_view_mut(), rem.as_view_mut(), plan.split, None)?;
    dev.sync(kernel.name(), Duration::from_secs(60))?;
    let o_host: Vec<f32> = dev.stream.clone_dtoh(&o)?.into_iter().map(T::to_f32).collect();
    let per = s.heads * s.head_dim;
    let got: Vec<f32> = checked.iter().flat_map(|&b| o_host[b * per..(b + 1) * per].iter().copied()).collect();
    let want: Vec<f64> = want.iter().flatten().copied().collect();
    let err = rel_l2(&got, &want);
    if err.is_nan() || err > FWD_TOL {
        return Ok((kernel.name().to_string(), split, err, None));
    }
    let ms = time_steps(dev, &kernel, s, q, cache, plan.split, plan.reps, plan.warmup, flush)?;
    Ok((kernel.name().to_string(), split, err, Some(ms)))
}

/// Times `reps` decode steps of `kernel` as one CUDA graph (as a serving loop launches a decode
/// step), each between two event-record nodes, with an L2 flush (`flush`) between them
/// outside the timed part: timed launch by launch from the host, a 15 us step would measure the
/// host's launch path instead. Milliseconds per step.
#[allow(clippy::too_many_arguments)]
pub(crate) fn time_steps<T: SbElement>(
    dev: &Device,
    kernel: &KernelBinary,
    s: DecodeShape,
    q: &CudaSlice<T>,
    cache: &DeviceCache<T>,
    split: DecodeSplit,
    reps: usize,
    warmup: usize,
    flush: &mut L2Flush,
) -> Result<Vec<f64>, GpuError> {
    let mut o = super::exec::poisoned::<T>(dev, s.len())?;
    let mut rem = super::exec::poisoned_f32(dev, s.rows())?;
    let event = || dev.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    let mut pairs = Vec::with_capacity(reps);
    for _ in 0..reps {
        pairs.push((event()?, event()?));
    }
    let record = |e: &cudarc::driver::CudaEvent| -> Result<(), GpuError> {
        // SAFETY: both handles are live; an external event-record node is what a captured event
        // needs to be timed (a plain record inside a capture only orders the capture's work).
        unsafe {
            cudarc::driver::sys::cuEventRecordWithFlags(
                e.cu_event(),
                dev.stream.cu_stream(),
                cudarc::driver::sys::CUevent_record_flags::CU_EVENT_RECORD_EXTERNAL as u32,
            )
        }
        .result()?;
        Ok(())
    };
    // The workspace is sized by a launch outside the capture (none may allocate inside it).
    decode_to(dev, kernel, s, q, cache, o.as_view_mut(), rem.as_view_mut(), split, None)?;
    dev.sync(kernel.name(), Duration::from_secs(60))?;
    dev.stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let captured = (|| -> Result<(), GpuError> {
        for (start, end) in &pairs {
            flush.enqueue(dev)?;
            record(start)?;
            decode_to(dev, kernel, s, q, cache, o.as_view_mut(), rem.as_view_mut(), split, None)?;
            record(end)?;
        }
        Ok(())
    })();
    // End the capture whatever happened, so the stream is usable again.
    let graph = dev.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
    captured?;
    let graph = graph?.ok_or_else(|| GpuError::Input("the decode's capture made an empty graph".into()))?;
    for _ in 0..warmup.clamp(1, 2) {
        graph.launch()?;
    }
    dev.sync(kernel.name(), Duration::from_secs(300))?;
    graph.launch()?;
    dev.sync(kernel.name(), Duration::from_secs(300))?;
    let mut ms = Vec::with_capacity(pairs.len());
    for (start, end) in &pairs {
        ms.push(start.elapsed_ms(end)? as f64);
    }
    Ok(ms)
}

/// The report's header line.
pub fn header() -> String {
    format!(
        "{:<22} {:<9} {:<6} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7} {:>9} {:>16}  {}",
        "B,H,Hkv,N,D",
        "cache",
        "exit",
        "ms(med)",
        "ms(min)",
        "ms(max)",
        "GB/s",
        "%peak",
        "x full",
        "err_o",
        "split",
        "note"
    )
}

/// One report line.
pub fn format_result(r: &DecodeBenchResult) -> String {
    let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
    let p = r.problem;
    let split = match (r.splits, r.chunk_keys, r.max_chunks) {
        (Some(s), Some(c), Some(m)) => format!("{s}w/{c}k/{m}c"),
        _ => "-".to_string(),
    };
    format!(
        "{:<22} {:<9} {:<6} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7} {:>9} {:>16}  {}",
        format!("{},{},{},{},{}", p.batch, p.heads, p.kv_heads, p.seq, p.head_dim),
        r.cache,
        r.early_exit_bits.map_or("off".to_string(), |t| format!("T={t}")),
        f(r.ms_median, 4),
        f(r.ms_min, 4),
        f(r.ms_max, 4),
        f(r.gbps, 0),
        f(r.peak_fraction.map(|x| x * 100.0), 1),
        f(r.speedup_over_full, 1),
        r.err_o.map_or("-".to_string(), |e| format!("{e:.2e}")),
        split,
        r.error.as_deref().unwrap_or(""),
    )
}
