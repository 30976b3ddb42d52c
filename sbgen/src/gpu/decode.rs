//! Decoding on the GPU: test data for a KV cache, the cache on the device in each geometry
//! (contiguous BHND / BNHD, paged), the float64 decode reference per sequence, and one launch.
//! `sbgen check --pass decode` ([`super::decode_check`]), `sbgen run --pass decode` and `sbgen bench
//! --decode` build on these.

use super::data::{normal, Regime};
use super::device::{Device, GpuError};
use super::exec::lost_or;
use cudarc::driver::{CudaSlice, CudaViewMut};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sbgen_runtime::launcher::{DecodeArgs, DecodePlan, DecodeSplit, KernelBinary, KvCacheGeometry, SbElement};
use sbgen_runtime::reference::{decode, DecodeShape, Decoded, Options};
use sbgen_runtime::spec::{Dtype, Layout};
use std::fmt;

/// Where a checked or benchmarked cache lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheKind {
    /// `[B, H_kv, capacity, D]` (BHND) or `[B, capacity, H_kv, D]` (BNHD).
    Contiguous(Layout),
    /// `[num_pages, page_size, H_kv, D]` with a block table; pages shuffled.
    Paged { page_size: usize },
}

impl CacheKind {
    /// The kernel layout that reads this cache.
    pub fn layout(self) -> Layout {
        match self {
            CacheKind::Contiguous(layout) => layout,
            CacheKind::Paged { .. } => Layout::Paged,
        }
    }
}

impl fmt::Display for CacheKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheKind::Contiguous(layout) => write!(f, "{layout}"),
            CacheKind::Paged { page_size } => write!(f, "paged/{page_size}"),
        }
    }
}

/// A decode problem on the host, rounded to its dtype: q `[B, H, D]`, the caches k and v `[B, H_kv,
/// capacity, D]` (BHND). Tokens at or past a sequence's length hold NaN, so a kernel that reads
/// past the cached tokens poisons its output.
#[derive(Clone, Debug)]
pub struct DecodeInputs {
    pub shape: DecodeShape,
    pub seqlens: Vec<usize>,
    pub capacity: usize,
    pub dtype: Dtype,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Draws a decode problem of `regime` (docs/checking.md#data-regimes): as the forward's data, with
/// the query at the sequence's last position. For long-reach and sharp data each (sequence, K/V
/// head) has a unit direction u; q = c u + 0.1 n for its query heads, k = ±c u + 0.1 n.
pub fn make_decode_inputs(
    shape: DecodeShape,
    seqlens: &[usize],
    capacity: usize,
    dtype: Dtype,
    regime: Regime,
    seed: u64,
) -> DecodeInputs {
    assert!(seqlens.iter().all(|&n| n <= capacity), "every sequence fits the cache");
    let d = shape.head_dim;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut q = normal(&mut rng, shape.len());
    let cache_len = shape.batch * shape.kv_heads * capacity * d;
    let (mut k, mut v) = (vec![f32::NAN; cache_len], vec![f32::NAN; cache_len]);
    let target = regime.target_score();
    let c = target.map_or(0.0, |s| (s.abs() * (d as f64).sqrt()).sqrt() as f32);
    let sign = target.map_or(1.0, |s| s.signum() as f32);
    for (b, &len) in seqlens.iter().enumerate() {
        for hk in 0..shape.kv_heads {
            let at = (b * shape.kv_heads + hk) * capacity * d;
            let (kh, vh) = (&mut k[at..at + len * d], &mut v[at..at + len * d]);
            kh.copy_from_slice(&normal(&mut rng, len * d));
            vh.copy_from_slice(&normal(&mut rng, len * d));
            if target.is_some() {
                let mut u = normal(&mut rng, d);
                let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt();
                u.iter_mut().for_each(|x| *x /= norm);
                for row in kh.chunks_mut(d) {
                    row.iter_mut().zip(&u).for_each(|(x, u)| *x = sign * c * u + 0.1 * *x);
                }
                for h in hk * shape.group()..(hk + 1) * shape.group() {
                    let row = &mut q[(b * shape.heads + h) * d..][..d];
                    row.iter_mut().zip(&u).for_each(|(x, u)| *x = c * u + 0.1 * *x);
                }
            }
        }
    }
    for x in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
        *x = dtype.round(*x);
    }
    DecodeInputs { shape, seqlens: seqlens.to_vec(), capacity, dtype, q, k, v }
}

/// The float64 decode of every sequence (one thread per sequence, at most `threads`), each on its
/// own cached tokens only.
pub fn reference(x: &DecodeInputs, opts: &Options, threads: usize) -> Decoded {
    let s = x.shape;
    let d = s.head_dim;
    let one = DecodeShape { batch: 1, ..s };
    let per_seq: Vec<usize> = (0..s.batch).collect();
    let parts = crate::pool::map(&per_seq, threads, |&b| {
        let len = x.seqlens[b];
        let q: Vec<f64> = x.q[b * s.heads * d..(b + 1) * s.heads * d].iter().map(|&e| e as f64).collect();
        let take = |cache: &[f32]| -> Vec<f64> {
            (0..s.kv_heads)
                .flat_map(|hk| &cache[(b * s.kv_heads + hk) * x.capacity * d..][..len * d])
                .map(|&e| e as f64)
                .collect()
        };
        decode(one, opts, &q, &take(&x.k), &take(&x.v), &[len])
    });
    let mut out = Decoded { o: Vec::new(), rem: Vec::new(), log2_rem: Vec::new() };
    for p in parts {
        out.o.extend(p.o);
        out.rem.extend(p.rem);
        out.log2_rem.extend(p.log2_rem);
    }
    out
}

/// A KV cache and its tables on the device.
pub struct DeviceCache<T> {
    pub k: CudaSlice<T>,
    pub v: CudaSlice<T>,
    pub geometry: KvCacheGeometry,
    pub seqlens: CudaSlice<i32>,
    pub block_table: Option<CudaSlice<i32>>,
}

/// A BHND `[B, H_kv, capacity, D]` cache laid out as `kind` says, with its block table (paged: each
/// sequence gets `ceil(capacity / page_size)` pages, shuffled among `B * that + 2` pages, so no
/// sequence's pages are in order or adjacent; the spare pages and the unused rows hold NaN; a block
/// table entry past a sequence's last page is -1).
#[allow(clippy::too_many_arguments)]
pub fn lay_out_cache(
    cache: &[f32],
    batch: usize,
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
    seqlens: &[usize],
    kind: CacheKind,
    seed: u64,
) -> (Vec<f32>, KvCacheGeometry, Option<Vec<i32>>) {
    let d = head_dim;
    let token = |b: usize, hk: usize, n: usize| &cache[((b * kv_heads + hk) * capacity + n) * d..][..d];
    match kind {
        CacheKind::Contiguous(Layout::Bnhd) => {
            let mut out = Vec::with_capacity(cache.len());
            for b in 0..batch {
                for n in 0..capacity {
                    for hk in 0..kv_heads {
                        out.extend_from_slice(token(b, hk, n));
                    }
                }
            }
            (out, KvCacheGeometry::Contiguous { capacity }, None)
        }
        CacheKind::Contiguous(_) => (cache.to_vec(), KvCacheGeometry::Contiguous { capacity }, None),
        CacheKind::Paged { page_size } => {
            let max_pages = capacity.div_ceil(page_size);
            let num_pages = batch * max_pages + 2;
            let mut ids: Vec<i32> = (0..num_pages as i32).collect();
            ids.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x7061_6765));
            let mut out = vec![f32::NAN; num_pages * page_size * kv_heads * d];
            let mut table = vec![-1i32; batch * max_pages];
            for b in 0..batch {
                for p in 0..seqlens[b].div_ceil(page_size) {
                    let id = ids[b * max_pages + p];
                    table[b * max_pages + p] = id;
                    for r in 0..page_size {
                        let n = p * page_size + r;
                        if n >= capacity {
                            break;
                        }
                        for hk in 0..kv_heads {
                            let at = ((id as usize * page_size + r) * kv_heads + hk) * d;
                            out[at..at + d].copy_from_slice(token(b, hk, n));
                        }
                    }
                }
            }
            (out, KvCacheGeometry::Paged { num_pages, page_size, max_pages }, Some(table))
        }
    }
}

impl<T: SbElement> DeviceCache<T> {
    /// Uploads the inputs' cache in `kind`'s geometry (see [`lay_out_cache`]).
    pub fn upload(dev: &Device, x: &DecodeInputs, kind: CacheKind, seed: u64) -> Result<Self, GpuError> {
        let s = x.shape;
        let lay =
            |cache: &[f32]| lay_out_cache(cache, s.batch, s.kv_heads, x.capacity, s.head_dim, &x.seqlens, kind, seed);
        let (k, geometry, table) = lay(&x.k);
        let (v, _, _) = lay(&x.v);
        let seqlens: Vec<i32> = x.seqlens.iter().map(|&n| n as i32).collect();
        Self::from_host(dev, &k, &v, geometry, &seqlens, table.as_deref())
    }

    /// Uploads f32 caches (already in their geometry) as `T`.
    pub fn from_host(
        dev: &Device,
        k: &[f32],
        v: &[f32],
        geometry: KvCacheGeometry,
        seqlens: &[i32],
        block_table: Option<&[i32]>,
    ) -> Result<Self, GpuError> {
        let to_t = |x: &[f32]| -> Vec<T> { x.iter().map(|&e| T::from_f32(e)).collect() };
        Ok(DeviceCache {
            k: dev.stream.clone_htod(&to_t(k))?,
            v: dev.stream.clone_htod(&to_t(v))?,
            geometry,
            seqlens: dev.stream.clone_htod(seqlens)?,
            block_table: block_table.map(|t| dev.stream.clone_htod(t)).transpose()?,
        })
    }
}

/// Launches the decode of `q` against `cache` into `o` and `rem`. A launch that left the context
/// unusable is [`GpuError::ContextLost`].
#[allow(clippy::too_many_arguments)]
pub fn decode_to<T: SbElement>(
    dev: &Device,
    kernel: &KernelBinary,
    shape: DecodeShape,
    q: &CudaSlice<T>,
    cache: &DeviceCache<T>,
    o: CudaViewMut<'_, T>,
    rem: CudaViewMut<'_, f32>,
    split: DecodeSplit,
    scale: Option<f32>,
) -> Result<DecodePlan, GpuError> {
    let args = DecodeArgs {
        q: q.as_view(),
        k_cache: cache.k.as_view(),
        v_cache: cache.v.as_view(),
        cache: cache.geometry,
        seqlens_k: cache.seqlens.as_view(),
        block_table: cache.block_table.as_ref().map(|t| t.as_view()),
        o,
        rem,
    };
    dev.launcher.decode(kernel, shape, args, split, scale).map_err(|e| lost_or(e, kernel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_geometry_holds_the_same_tokens() {
        let (batch, kv_heads, capacity, d) = (2, 3, 37, 4);
        let cache: Vec<f32> = (0..batch * kv_heads * capacity * d).map(|i| i as f32).collect();
        let seqlens = [37, 5];
        let get = |b: usize, hk: usize, n: usize| &cache[((b * kv_heads + hk) * capacity + n) * d..][..d];
        let (bnhd, _, none) =
            lay_out_cache(&cache, batch, kv_heads, capacity, d, &seqlens, CacheKind::Contiguous(Layout::Bnhd), 1);
        assert!(none.is_none());
        for (b, hk, n) in [(0, 0, 0), (1, 2, 36), (0, 1, 17)] {
            assert_eq!(&bnhd[((b * capacity + n) * kv_heads + hk) * d..][..d], get(b, hk, n));
        }
        let (paged, geometry, table) =
            lay_out_cache(&cache, batch, kv_heads, capacity, d, &seqlens, CacheKind::Paged { page_size: 16 }, 7);
        let KvCacheGeometry::Paged { num_pages, page_size, max_pages } = geometry else { panic!("{geometry:?}") };
        assert_eq!((num_pages, page_size, max_pages), (2 * 3 + 2, 16, 3));
        let table = table.unwrap();
        // Sequence 1 (5 tokens) uses one page; the rest of its row is -1.
        assert_eq!(&table[4..], &[-1, -1]);
        let mut used: Vec<i32> = table.iter().copied().filter(|&i| i >= 0).collect();
        used.sort();
        used.dedup();
        assert_eq!(used.len(), 4, "distinct pages: {table:?}");
        for b in 0..batch {
            for n in 0..seqlens[b] {
                let id = table[b * max_pages + n / page_size] as usize;
                for hk in 0..kv_heads {
                    assert_eq!(&paged[((id * page_size + n % page_size) * kv_heads + hk) * d..][..d], get(b, hk, n));
                }
            }
        }
    }

    #[test]
    fn inputs_poison_the_uncached_tokens_and_the_reference_never_reads_them() {
        let shape = DecodeShape { batch: 3, heads: 4, kv_heads: 2, head_dim: 8 };
        let x = make_decode_inputs(shape, &[0, 1, 9], 12, Dtype::Bf16, Regime::Random, 3);
        let d = 8;
        let at = |b: usize, hk: usize, n: usize| x.k[((b * 2 + hk) * 12 + n) * d];
        assert!(at(0, 0, 0).is_nan() && at(1, 1, 1).is_nan() && at(2, 0, 9).is_nan());
        assert!(at(1, 1, 0).is_finite() && at(2, 1, 8).is_finite());
        let r = reference(&x, &Options::causal(), 2);
        assert!(r.o.iter().chain(&r.rem).all(|e| e.is_finite()));
        // An empty cache leaves the whole stick: o = 0, rem = 1.
        assert!(r.o[..4 * d].iter().all(|&e| e == 0.0) && r.rem[..4].iter().all(|&e| e == 1.0));
    }
}
