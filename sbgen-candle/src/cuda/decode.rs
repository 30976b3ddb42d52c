//! The decode on the GPU: one launch of sbgen's decode kernel on candle's stream, reading the
//! [`SbKvCache`]'s tensors in place. The cache's lengths (and a paged cache's block table) live on
//! the host and go up with each call: a few bytes per sequence, and no read-back.

use super::attention::dtype_error;
use super::device::stream_state;
use super::storage::{cuda_parts, output, tensor, view};
use crate::kv_cache::SbKvCache;
use crate::options::{Remainder, SbOptions};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{DType, Result, Tensor};
use sbgen_runtime::launcher::{DecodeArgs, DecodeShape, DecodeSplit, KvCacheGeometry, SbElement};
use sbgen_runtime::spec::{Layout as SbLayout, Mask, Pass, Remainder as SbRemainder, Spec};

pub fn decode(cache: &SbKvCache, q: &Tensor, opts: &SbOptions) -> Result<(Tensor, Tensor)> {
    match q.dtype() {
        DType::BF16 => decode_typed::<half::bf16>(cache, q, opts),
        DType::F16 => decode_typed::<half::f16>(cache, q, opts),
        other => Err(dtype_error("q", other)),
    }
}

fn upload<T: DeviceRepr>(s: &CudaStorage, host: &[T]) -> Result<CudaSlice<T>> {
    s.device.cuda_stream().clone_htod(host).map_err(candle_core::Error::wrap)
}

fn decode_typed<T: SbElement + CudaDType>(cache: &SbKvCache, q: &Tensor, opts: &SbOptions) -> Result<(Tensor, Tensor)> {
    let (b, h, d) = q.dims3()?;
    let q = q.contiguous()?;
    let (k_cache, v_cache) = cache.kv();
    let geometry = match cache.pages() {
        Some((page_size, max_pages)) => KvCacheGeometry::Paged { num_pages: k_cache.dims()[0], page_size, max_pages },
        None => KvCacheGeometry::Contiguous { capacity: cache.capacity() },
    };
    let spec = Spec {
        head_dim: d as u32,
        dtype: T::DTYPE,
        mask: if opts.attend_current { Mask::AttendCurrent } else { Mask::Strict },
        layout: if geometry.is_paged() { SbLayout::Paged } else { SbLayout::Bnhd },
        remainder: match opts.remainder {
            Remainder::Return => SbRemainder::Return,
            Remainder::Fuse => SbRemainder::Fuse,
        },
        pass: Pass::Decode,
        early_exit_bits: opts.early_exit_bits,
        deterministic: false,
    };
    let longest = cache.lens().iter().copied().max().unwrap_or(0);
    let lens: Vec<i32> = cache.lens().iter().map(|&l| l as i32).collect();

    let gq = q.storage_and_layout();
    let gk = k_cache.storage_and_layout();
    let gv = v_cache.storage_and_layout();
    let (sq, lq) = cuda_parts("q is not on a CUDA device", &gq)?;
    let (sk, lk) = cuda_parts("the cache is not on a CUDA device", &gk)?;
    let (sv, lv) = cuda_parts("the cache is not on a CUDA device", &gv)?;
    let dev = sq.device.clone();
    let state = stream_state(&dev)?;
    let kernel = state.kernel(spec, longest)?;
    let seqlens_k = upload(sq, &lens)?;
    let block_table = cache.block_table().map(|t| upload(sq, t)).transpose()?;
    let mut o = output::<T>(&dev, b * h * d)?;
    let mut rem = output::<f32>(&dev, b * h)?;
    let args = DecodeArgs {
        q: view::<T>("q", sq, lq)?,
        k_cache: view::<T>("k_cache", sk, lk)?,
        v_cache: view::<T>("v_cache", sv, lv)?,
        cache: geometry,
        seqlens_k: seqlens_k.slice(..),
        block_table: block_table.as_ref().map(|t| t.slice(..)),
        o: o.slice_mut(..),
        rem: rem.slice_mut(..),
    };
    let shape = DecodeShape { batch: b, heads: h, kv_heads: cache.kv_heads(), head_dim: d };
    state
        .launcher
        .decode(&kernel, shape, args, DecodeSplit::default(), opts.scale.map(|s| s as f32))
        .map_err(candle_core::Error::wrap)?;
    Ok((tensor(o, &dev, &[b, h, d]), tensor(rem, &dev, &[b, h])))
}
