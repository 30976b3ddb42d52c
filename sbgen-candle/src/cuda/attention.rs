//! The forward and backward on the GPU, as two candle ops that share what the forward saved.
//!
//! [`SbCudaAttention`] (q, k, v -> o) launches sbgen's forward on candle's stream; o stays in the
//! input dtype and candle's `(batch, seq, heads, head_dim)` layout (the kernels' BNHD, or THD for a
//! packed batch), so nothing is transposed or copied. The forward also writes rem, log2 rem and,
//! when a gradient may be taken, o before the fused remainder in f32: the backward's inputs.
//! [`SbCudaRemainder`] (o -> rem) hands rem to candle as a second graph node.
//!
//! How rem's gradient reaches the backward: candle runs `bwd` of every node in reverse topological
//! order, so rem's node (a consumer of o) runs before o's. Its `bwd` parks dRem in the shared state
//! and gives o a zero gradient (candle needs one for every node on the path); o's `bwd` then takes
//! dRem and runs sbgen's backward once, for both outputs.

use super::device::{stream_state, StreamState};
use super::storage::{cuda_parts, not_cuda, output, tensor, view};
use crate::error::SbCandleError;
use crate::options::{Remainder, SbOptions};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use sbgen_runtime::launcher::{BackwardArgs, ForwardArgs, SbElement, Varlen};
use sbgen_runtime::reference::Shape as SbShape;
use sbgen_runtime::spec::{Dtype, Layout as SbLayout, Mask, Pass, Remainder as SbRemainder, Spec};
use std::sync::{Arc, Mutex};

/// A packed batch on the device: `cu_seqlens` as i32 and the token count.
pub struct DeviceVarlen {
    pub cu_seqlens: CudaSlice<i32>,
    pub total_tokens: usize,
}

/// One call's problem: the sbgen shape (for THD, `batch` sequences of at most `seq` tokens) and
/// options.
pub struct Problem {
    pub shape: SbShape,
    pub opts: SbOptions,
    pub varlen: Option<DeviceVarlen>,
    /// Whether the forward saves the backward's f32 inputs (some input tracks a gradient).
    pub train: bool,
}

impl Problem {
    fn spec(&self, dtype: Dtype, pass: Pass) -> Spec {
        Spec {
            head_dim: self.shape.head_dim as u32,
            dtype,
            mask: if self.opts.attend_current { Mask::AttendCurrent } else { Mask::Strict },
            layout: if self.varlen.is_some() { SbLayout::Thd } else { SbLayout::Bnhd },
            remainder: match self.opts.remainder {
                Remainder::Return => SbRemainder::Return,
                Remainder::Fuse => SbRemainder::Fuse,
            },
            pass,
            early_exit_bits: self.opts.early_exit_bits,
            deterministic: false,
        }
    }

    /// Query rows: tokens times heads (the length of rem).
    fn rows(&self) -> usize {
        self.tokens() * self.shape.heads
    }

    fn tokens(&self) -> usize {
        match &self.varlen {
            Some(v) => v.total_tokens,
            None => self.shape.batch * self.shape.seq,
        }
    }

    /// rem's shape in the kernels' layout: `[batch, heads, seq]`, or `[heads, tokens]` packed.
    fn rem_shape(&self) -> Shape {
        match &self.varlen {
            Some(v) => Shape::from((self.shape.heads, v.total_tokens)),
            None => Shape::from((self.shape.batch, self.shape.heads, self.shape.seq)),
        }
    }

    fn cu_seqlens(&self) -> Option<CudaView<'_, i32>> {
        self.varlen.as_ref().map(|v| v.cu_seqlens.as_view())
    }

    fn varlen<'a>(&self, cu_seqlens: &'a Option<CudaView<'a, i32>>) -> Option<Varlen<'a>> {
        let total_tokens = self.tokens();
        cu_seqlens.as_ref().map(|cu_seqlens| Varlen { cu_seqlens, total_tokens })
    }

    fn scale(&self) -> Option<f32> {
        self.opts.scale.map(|s| s as f32)
    }
}

/// What the forward leaves for the backward.
#[derive(Default)]
struct Saved {
    rem: Option<CudaSlice<f32>>,
    log2_rem: Option<CudaSlice<f32>>,
    o_saved: Option<CudaSlice<f32>>,
}

/// State shared by the two ops of one call.
pub struct Shared {
    problem: Problem,
    saved: Mutex<Saved>,
    /// dRem, parked by rem's `bwd` for o's.
    d_rem: Mutex<Option<Tensor>>,
}

impl Shared {
    pub fn new(problem: Problem) -> Arc<Shared> {
        Arc::new(Shared { problem, saved: Mutex::default(), d_rem: Mutex::default() })
    }

    fn saved(&self) -> std::sync::MutexGuard<'_, Saved> {
        self.saved.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct SbCudaAttention(pub Arc<Shared>);
pub struct SbCudaRemainder(pub Arc<Shared>);

fn launch_error(e: sbgen_runtime::launcher::LaunchError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl CustomOp3 for SbCudaAttention {
    fn name(&self) -> &'static str {
        "sbgen-stick-breaking-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(not_cuda("the GPU op was given CPU tensors"))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::BF16 => self.forward::<half::bf16>(q, lq, k, lk, v, lv),
            DType::F16 => self.forward::<half::f16>(q, lq, k, lk, v, lv),
            other => Err(dtype_error("q", other)),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = match q.dtype() {
            DType::BF16 => self.backward::<half::bf16>(q, k, v, o, d_o)?,
            DType::F16 => self.backward::<half::f16>(q, k, v, o, d_o)?,
            other => return Err(dtype_error("q", other)),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

pub fn dtype_error(tensor: &'static str, got: DType) -> candle_core::Error {
    SbCandleError::Dtype {
        tensor,
        got: format!("{got:?}"),
        expected: "bf16 or f16 on a CUDA device (cast with `to_dtype`)".into(),
    }
    .into()
}

impl SbCudaAttention {
    fn forward<T: SbElement + CudaDType + ValidAsZeroBits>(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let p = &self.0.problem;
        let dev = q.device().clone();
        let state = stream_state(&dev)?;
        let kernel = state.kernel(p.spec(T::DTYPE, Pass::Forward), p.shape.seq)?;
        let (q, k, v) = (view::<T>("q", q, lq)?, view::<T>("k", k, lk)?, view::<T>("v", v, lv)?);
        let mut o = output::<T>(&dev, q.len())?;
        let mut rem = output::<f32>(&dev, p.rows())?;
        let mut log2_rem = output::<f32>(&dev, p.rows())?;
        let mut o_saved = if p.train { Some(output::<f32>(&dev, q.len())?) } else { None };
        let cu_seqlens = p.cu_seqlens();
        let args = ForwardArgs {
            q,
            k,
            v,
            o: o.slice_mut(..),
            rem: rem.slice_mut(..),
            log2_rem: log2_rem.slice_mut(..),
            o_saved: o_saved.as_mut().map(|x| x.slice_mut(..)),
            varlen: p.varlen(&cu_seqlens),
        };
        state.launcher.forward(&kernel, p.shape, args, p.scale()).map_err(launch_error)?;
        *self.0.saved() = Saved { rem: Some(rem), log2_rem: Some(log2_rem), o_saved };
        let shape = Shape::from(lq.dims());
        Ok((CudaStorage::wrap_cuda_slice(o, dev), shape))
    }

    fn backward<T: SbElement + CudaDType + ValidAsZeroBits>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let p = &self.0.problem;
        let d_rem = self.0.d_rem.lock().unwrap_or_else(|x| x.into_inner()).take();
        let d_rem = d_rem.map(|t| t.contiguous()).transpose()?;
        let d_o = d_o.contiguous()?;
        let saved = self.0.saved();
        let (Some(log2_rem), Some(o_saved)) = (&saved.log2_rem, &saved.o_saved) else {
            return Err(SbCandleError::Kernel {
                reason: "the forward ran without saving the backward's inputs (no input tracked a gradient)".into(),
            }
            .into());
        };
        let guards = [q, k, v, o, &d_o].map(|t| t.storage_and_layout());
        let d_rem_guard = d_rem.as_ref().map(|t| t.storage_and_layout());
        let cuda = |i: usize| cuda_parts("the backward was given CPU tensors", &guards[i]);
        let (sq, lq) = cuda(0)?;
        let dev = sq.device().clone();
        let state: Arc<StreamState> = stream_state(&dev)?;
        let kernel = state.kernel(p.spec(T::DTYPE, Pass::Backward), p.shape.seq)?;
        let (sk, lk) = cuda(1)?;
        let (sv, lv) = cuda(2)?;
        let (so, lo) = cuda(3)?;
        let (sdo, ldo) = cuda(4)?;
        let d_rem_view = match &d_rem_guard {
            Some(guard) => {
                let (s, l) = cuda_parts("the backward was given CPU tensors", guard)?;
                Some(view::<f32>("d_rem", s, l)?)
            }
            None => None,
        };
        let (nq, nk) = (lq.shape().elem_count(), lk.shape().elem_count());
        let mut dq = output::<T>(&dev, nq)?;
        let mut dk = output::<T>(&dev, nk)?;
        let mut dv = output::<T>(&dev, nk)?;
        let cu_seqlens = p.cu_seqlens();
        let args = BackwardArgs {
            q: view::<T>("q", sq, lq)?,
            k: view::<T>("k", sk, lk)?,
            v: view::<T>("v", sv, lv)?,
            o: view::<T>("o", so, lo)?,
            o_saved: o_saved.slice(..),
            d_o: view::<T>("d_o", sdo, ldo)?,
            d_rem: d_rem_view,
            log2_rem: log2_rem.slice(..),
            dq: dq.slice_mut(..),
            dk: dk.slice_mut(..),
            dv: dv.slice_mut(..),
            varlen: p.varlen(&cu_seqlens),
        };
        state.launcher.backward(&kernel, p.shape, args, p.scale()).map_err(launch_error)?;
        Ok((tensor(dq, &dev, q.dims()), tensor(dk, &dev, k.dims()), tensor(dv, &dev, v.dims())))
    }
}

impl CustomOp1 for SbCudaRemainder {
    fn name(&self) -> &'static str {
        "sbgen-stick-breaking-remainder"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(not_cuda("the GPU op was given CPU tensors"))
    }

    fn cuda_fwd(&self, o: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        // The backward needs log2 rem, not rem: rem moves out.
        let rem =
            self.0.saved().rem.take().ok_or_else(|| SbCandleError::Kernel {
                reason: "rem was read before the forward ran, or twice".into(),
            })?;
        Ok((CudaStorage::wrap_cuda_slice(rem, o.device().clone()), self.0.problem.rem_shape()))
    }

    fn bwd(&self, o: &Tensor, _rem: &Tensor, d_rem: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut parked = self.0.d_rem.lock().unwrap_or_else(|p| p.into_inner());
        *parked = Some(match parked.take() {
            Some(prev) => (prev + d_rem)?,
            None => d_rem.clone(),
        });
        Ok(Some(o.zeros_like()?))
    }
}
