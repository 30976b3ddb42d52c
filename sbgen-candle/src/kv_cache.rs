//! A KV cache for generation: keys and values appended token by token, and a decode call that
//! attends one new query per sequence against them (sbgen's decode kernels on a CUDA device, the
//! float32 walk on the CPU).
//!
//! Two geometries, as sbgen's decode kernels read them:
//! - **contiguous**: k and v `(batch, capacity, kv_heads, head_dim)`; sequence b holds its tokens
//!   `0..len(b)` in rows `0..len(b)` of its slab.
//! - **paged**: k and v `(num_pages, page_size, kv_heads, head_dim)`, pages handed out on demand
//!   from a shared pool; token t of sequence b is row `t % page_size` of page
//!   `block_table[b][t / page_size]`. Sequences of very different lengths then share memory.

use crate::error::SbCandleError;
use crate::options::SbOptions;
use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

/// Page sizes must be a multiple of this (the decode kernels gather a page in runs of 16 tokens).
pub const PAGE_ALIGN: usize = 16;

/// The pages of a paged cache: `num_pages` pages of `page_size` tokens (a multiple of
/// [`PAGE_ALIGN`]), at most `max_pages` of them per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagePool {
    pub num_pages: usize,
    pub page_size: usize,
    pub max_pages: usize,
}

#[derive(Clone, Debug)]
enum Geometry {
    Contiguous { capacity: usize },
    Paged { page_size: usize, max_pages: usize, block_table: Vec<i32>, free: Vec<usize> },
}

/// Keys and values of `batch` sequences, on one device, in one dtype.
#[derive(Debug)]
pub struct SbKvCache {
    k: Tensor,
    v: Tensor,
    lens: Vec<usize>,
    geometry: Geometry,
    kv_heads: usize,
    head_dim: usize,
}

fn cache_error(reason: String) -> candle_core::Error {
    SbCandleError::KvCache { reason }.into()
}

fn check_dims(kv_heads: usize, head_dim: usize, dtype: DType) -> Result<()> {
    if kv_heads == 0 || !(1..=256).contains(&head_dim) {
        return Err(cache_error(format!(
            "kv_heads = {kv_heads}, head_dim = {head_dim}: allowed kv_heads >= 1, head_dim 1..=256"
        )));
    }
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(cache_error(format!("dtype {dtype:?}: allowed f32 (CPU only), bf16, f16")));
    }
    Ok(())
}

impl SbKvCache {
    /// A contiguous cache of `batch` sequences of up to `capacity` tokens each.
    pub fn contiguous(
        batch: usize,
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_dims(kv_heads, head_dim, dtype)?;
        if batch == 0 || capacity == 0 {
            return Err(cache_error(format!("batch = {batch}, capacity = {capacity}: both must be at least 1")));
        }
        let k = Tensor::zeros((batch, capacity, kv_heads, head_dim), dtype, device)?;
        Ok(SbKvCache {
            v: k.zeros_like()?,
            k,
            lens: vec![0; batch],
            geometry: Geometry::Contiguous { capacity },
            kv_heads,
            head_dim,
        })
    }

    /// A paged cache: `batch` sequences sharing the pages of `pool`.
    pub fn paged(
        batch: usize,
        pool: PagePool,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let PagePool { num_pages, page_size, max_pages } = pool;
        check_dims(kv_heads, head_dim, dtype)?;
        if batch == 0 || num_pages == 0 || max_pages == 0 {
            return Err(cache_error(format!(
                "batch = {batch}, num_pages = {num_pages}, max_pages = {max_pages}: each must be at least 1"
            )));
        }
        if page_size == 0 || page_size % PAGE_ALIGN != 0 {
            return Err(cache_error(format!("page_size = {page_size}: allowed a positive multiple of {PAGE_ALIGN}")));
        }
        if num_pages > i32::MAX as usize {
            return Err(cache_error(format!("num_pages = {num_pages}: allowed at most {}", i32::MAX)));
        }
        let k = Tensor::zeros((num_pages, page_size, kv_heads, head_dim), dtype, device)?;
        Ok(SbKvCache {
            v: k.zeros_like()?,
            k,
            lens: vec![0; batch],
            // Popped from the back: pages are handed out from 0 up.
            geometry: Geometry::Paged {
                page_size,
                max_pages,
                block_table: vec![-1; batch * max_pages],
                free: (0..num_pages).rev().collect(),
            },
            kv_heads,
            head_dim,
        })
    }

    /// Tokens held per sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    pub fn batch(&self) -> usize {
        self.lens.len()
    }

    /// The most tokens one sequence can hold.
    pub fn capacity(&self) -> usize {
        match &self.geometry {
            Geometry::Contiguous { capacity } => *capacity,
            Geometry::Paged { page_size, max_pages, .. } => page_size * max_pages,
        }
    }

    pub fn is_paged(&self) -> bool {
        matches!(self.geometry, Geometry::Paged { .. })
    }

    /// The key and value storage (layouts in the module docs).
    pub fn kv(&self) -> (&Tensor, &Tensor) {
        (&self.k, &self.v)
    }

    /// Forgets every sequence's tokens (and returns a paged cache's pages to the pool).
    pub fn clear(&mut self) {
        self.lens.iter_mut().for_each(|l| *l = 0);
        if let Geometry::Paged { block_table, free, .. } = &mut self.geometry {
            block_table.iter_mut().for_each(|p| *p = -1);
            *free = (0..self.k.dims()[0]).rev().collect();
        }
    }

    /// Appends `n` tokens to every sequence: k and v `(batch, n, kv_heads, head_dim)`.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, n, hk, d) = k.dims4().map_err(|_| self.shape_error("k", k, "(batch, n, kv_heads, head_dim)"))?;
        if (b, hk, d) != (self.batch(), self.kv_heads, self.head_dim) || v.dims() != k.dims() {
            return Err(self.shape_error("k", k, "(batch, n, kv_heads, head_dim), v the same"));
        }
        self.check_room(|_| n)?;
        if n == 0 {
            return Ok(());
        }
        let same_len = self.lens.iter().all(|&l| l == self.lens[0]);
        if let (Geometry::Contiguous { .. }, true) = (&self.geometry, same_len) {
            // One copy for the whole batch.
            self.k.slice_set(&k.contiguous()?, 1, self.lens[0])?;
            self.v.slice_set(&v.contiguous()?, 1, self.lens[0])?;
            self.lens.iter_mut().for_each(|l| *l += n);
            return Ok(());
        }
        for s in 0..b {
            self.append_rows(s, &k.get(s)?, &v.get(s)?)?;
        }
        Ok(())
    }

    /// Appends `n` tokens to sequence `seq` only: k and v `(n, kv_heads, head_dim)`.
    pub fn append_to(&mut self, seq: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        if seq >= self.batch() {
            return Err(cache_error(format!("sequence {seq}: allowed 0..{}", self.batch())));
        }
        let (n, hk, d) = k.dims3().map_err(|_| self.shape_error("k", k, "(n, kv_heads, head_dim)"))?;
        if (hk, d) != (self.kv_heads, self.head_dim) || v.dims() != k.dims() {
            return Err(self.shape_error("k", k, "(n, kv_heads, head_dim), v the same"));
        }
        self.check_room(|s| if s == seq { n } else { 0 })?;
        self.append_rows(seq, k, v)
    }

    /// Refuses an append that would overflow a sequence (or the page pool), before writing anything.
    fn check_room(&self, added: impl Fn(usize) -> usize) -> Result<()> {
        let capacity = self.capacity();
        let mut pages_needed = 0;
        for (s, &len) in self.lens.iter().enumerate() {
            let new_len = len + added(s);
            if new_len > capacity {
                return Err(cache_error(format!(
                    "sequence {s} would hold {new_len} tokens: the cache holds at most {capacity} per sequence"
                )));
            }
            if let Geometry::Paged { page_size, .. } = self.geometry {
                pages_needed += new_len.div_ceil(page_size) - len.div_ceil(page_size);
            }
        }
        if let Geometry::Paged { free, .. } = &self.geometry {
            if pages_needed > free.len() {
                return Err(cache_error(format!(
                    "the append needs {pages_needed} new pages and {} are free",
                    free.len()
                )));
            }
        }
        Ok(())
    }

    /// Writes `(n, kv_heads, head_dim)` rows after sequence `s`'s last token (room checked).
    fn append_rows(&mut self, s: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let n = k.dims()[0];
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        match &mut self.geometry {
            Geometry::Contiguous { .. } => {
                let at = self.lens[s];
                self.k.get(s)?.slice_set(&k, 0, at)?;
                self.v.get(s)?.slice_set(&v, 0, at)?;
            }
            Geometry::Paged { page_size, max_pages, block_table, free } => {
                let mut t = self.lens[s];
                let mut done = 0;
                while done < n {
                    let (slot, row) = (t / *page_size, t % *page_size);
                    let entry = &mut block_table[s * *max_pages + slot];
                    if *entry < 0 {
                        let page = free.pop().ok_or_else(|| cache_error("out of pages".into()))?;
                        *entry = page as i32;
                    }
                    let run = (*page_size - row).min(n - done);
                    let page = *entry as usize;
                    self.k.get(page)?.slice_set(&k.narrow(0, done, run)?, 0, row)?;
                    self.v.get(page)?.slice_set(&v.narrow(0, done, run)?, 0, row)?;
                    t += run;
                    done += run;
                }
            }
        }
        self.lens[s] += n;
        Ok(())
    }

    /// Attends each sequence's newest token (the last one appended) to the sequence's tokens: q
    /// `(batch, heads, head_dim)` with `kv_heads` dividing `heads`. Returns o (q's shape and dtype)
    /// and rem `(batch, heads)` (f32). Append the token's key and value first.
    pub fn decode(&self, q: &Tensor, opts: &SbOptions) -> Result<(Tensor, Tensor)> {
        opts.validate()?;
        let (b, h, d) = q.dims3().map_err(|_| self.shape_error("q", q, "(batch, heads, head_dim)"))?;
        if b != self.batch() || d != self.head_dim || h % self.kv_heads != 0 {
            return Err(self.shape_error("q", q, "(batch, heads, head_dim) with kv_heads dividing heads"));
        }
        if q.dtype() != self.k.dtype() {
            return Err(SbCandleError::Dtype {
                tensor: "q",
                got: format!("{:?}", q.dtype()),
                expected: format!("the cache's dtype, {:?}", self.k.dtype()),
            }
            .into());
        }
        if !q.device().same_device(self.k.device()) {
            return Err(SbCandleError::Device {
                device: format!("{:?} and {:?}", q.device(), self.k.device()),
                reason: "q and the cache must be on one device",
            }
            .into());
        }
        if let Some(s) = self.lens.iter().position(|&l| l == 0) {
            return Err(cache_error(format!(
                "sequence {s} holds no token: append the new token's key and value first"
            )));
        }
        match q.device() {
            Device::Cpu => self.decode_cpu(q, h, opts),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => crate::cuda::decode::decode(self, q, opts),
            other => Err(SbCandleError::Device {
                device: format!("{other:?}"),
                reason: "the KV cache decodes on the CPU and, with the `cuda` feature, on CUDA devices",
            }
            .into()),
        }
    }

    fn decode_cpu(&self, q: &Tensor, heads: usize, opts: &SbOptions) -> Result<(Tensor, Tensor)> {
        let qh = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (o, rem) = with_f32(&self.k, |kh| {
            with_f32(&self.v, |vh| {
                Ok(match &self.geometry {
                    Geometry::Contiguous { capacity } => {
                        let cap = *capacity;
                        let cache = crate::cpu::DecodeCache {
                            k: kh,
                            v: vh,
                            kv_heads: self.kv_heads,
                            lens: &self.lens,
                            token_row: |b, t| b * cap + t,
                        };
                        crate::cpu::decode(opts, heads, self.head_dim, &qh, &cache)
                    }
                    Geometry::Paged { page_size, max_pages, block_table, .. } => {
                        let (ps, mp) = (*page_size, *max_pages);
                        let cache = crate::cpu::DecodeCache {
                            k: kh,
                            v: vh,
                            kv_heads: self.kv_heads,
                            lens: &self.lens,
                            token_row: |b, t| block_table[b * mp + t / ps] as usize * ps + t % ps,
                        };
                        crate::cpu::decode(opts, heads, self.head_dim, &qh, &cache)
                    }
                })
            })
        })?;
        let b = self.batch();
        let o = Tensor::from_vec(o, (b, heads, self.head_dim), q.device())?.to_dtype(q.dtype())?;
        Ok((o, Tensor::from_vec(rem, (b, heads), q.device())?))
    }

    /// The block table (paged) as i32 `[batch, max_pages]`, -1 for pages not handed out.
    pub fn block_table(&self) -> Option<&[i32]> {
        match &self.geometry {
            Geometry::Paged { block_table, .. } => Some(block_table),
            Geometry::Contiguous { .. } => None,
        }
    }

    /// `(page_size, max_pages)` of a paged cache.
    pub fn pages(&self) -> Option<(usize, usize)> {
        match &self.geometry {
            Geometry::Paged { page_size, max_pages, .. } => Some((*page_size, *max_pages)),
            Geometry::Contiguous { .. } => None,
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    fn shape_error(&self, name: &'static str, x: &Tensor, expected: &str) -> candle_core::Error {
        SbCandleError::Shape {
            tensor: name,
            got: x.dims().to_vec(),
            expected: format!(
                "{expected} (the cache has batch {}, kv_heads {}, head_dim {})",
                self.batch(),
                self.kv_heads,
                self.head_dim
            ),
        }
        .into()
    }
}

/// `f` on a CPU tensor's elements as f32: the tensor's own storage when it is contiguous f32 (an f32
/// cache is read in place at every decode step), else a converted copy.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return f(&data[start..end]);
        }
    }
    f(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}
