//! Stick-breaking attention (Tan et al., ICLR 2025) as a candle op, with autograd.
//!
//! Each query gives each earlier key a share `beta = sigmoid(q . k * scale)` of what is left of a unit
//! stick, nearest key first; `o` is the keys' values weighted by their shares and `rem` what is left
//! of the stick. No positional embedding is needed.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use sbgen_candle::{stick_breaking_attention, SbOptions};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // candle's layout: (batch, seq, heads, head_dim); 8 query heads on 2 K/V heads (GQA).
//! let q = Tensor::randn(0f32, 1.0, (2, 16, 8, 32), &dev)?;
//! let k = Tensor::randn(0f32, 1.0, (2, 16, 2, 32), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (2, 16, 2, 32), &dev)?;
//! let (o, rem) = stick_breaking_attention(&q, &k, &v, &SbOptions::default())?;
//! assert_eq!((o.dims(), rem.dims()), (&[2, 16, 8, 32][..], &[2, 16, 8][..]));
//! assert_eq!(rem.dtype(), DType::F32);
//! # Ok(())
//! # }
//! ```
//!
//! **What runs where.** On a CUDA device (feature `cuda`), sbgen's kernels run on candle's stream:
//! q, k and v in bf16 or f16, o in the same dtype, with no copy or transpose (candle's layout is
//! the kernels' BNHD; a packed batch is THD). The kernels come from the tuning cache built into
//! `sbgen` (or the file `sbgen tune` wrote, named by env `SBGEN_CACHE` when the first call runs) as
//! PTX, else NVRTC compiles the default schedule at first use: nothing is compiled when your crate
//! builds. Early exit takes 8..=60 bits there. On the CPU the same function computes in float32
//! (f32, bf16 and f16 in, the same dtype out), blocked as the kernels are (a task per 32 query
//! rows of one K/V head's query heads, keys a block of 64 at a time) on rayon's pool, so the same
//! model code trains and generates without a GPU (`examples/cpu_throughput.rs` times it). `rem` is always f32. Gradients flow
//! to q, k and v from both o and rem through candle's backprop on both paths.
//!
//! **Generation.** [`SbKvCache`] (contiguous or paged) holds each layer's keys and values;
//! [`SbKvCache::decode`] attends one new token per sequence (sbgen's decode kernels on the GPU).

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
mod kv_cache;
mod op;
mod options;

pub use error::SbCandleError;
pub use kv_cache::{PagePool, SbKvCache, PAGE_ALIGN};
pub use options::{Remainder, SbOptions, EARLY_EXIT_BITS};

use candle_core::{DType, Device, Result, Tensor, D};
use cpu::Geometry;

/// Stick-breaking attention over a dense batch. `q`: `(batch, seq, heads, head_dim)`; `k`, `v`:
/// `(batch, seq, kv_heads, head_dim)` with `kv_heads` dividing `heads` (query head h reads K/V head
/// `h / (heads / kv_heads)`). Returns `o` (q's shape and dtype) and `rem` (`(batch, seq, heads)`,
/// f32). Query i attends keys `0..i` (`0..=i` with `attend_current`).
pub fn stick_breaking_attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &SbOptions) -> Result<(Tensor, Tensor)> {
    let (b, n, h, d) = dims4("q", q, "(batch, seq, heads, head_dim)")?;
    let (bk, nk, _, dk) = dims4("k", k, "(batch, seq, kv_heads, head_dim)")?;
    if (bk, nk, dk) != (b, n, d) {
        return Err(SbCandleError::Shape {
            tensor: "k",
            got: k.dims().to_vec(),
            expected: format!("(batch, seq, kv_heads, head_dim) with batch {b}, seq {n} and head_dim {d} as q"),
        }
        .into());
    }
    same_as_k(v, k)?;
    let batch = Batch::Dense { batch: b, seq: n };
    // The 4-D tensors go in as they are: a reshape would add a node, and candle's backprop a
    // zero-fill and an add per node and input.
    let (o, rem) = attend(q.clone(), k.clone(), v.clone(), batch, opts)?;
    let rem = match rem {
        Rem::Rows(rem) => rem.reshape((b, n, h))?,
        // The kernels' [batch, heads, seq], seen as (batch, seq, heads) without a copy.
        Rem::HeadsFirst(rem) => rem.transpose(1, 2)?,
    };
    Ok((o, rem))
}

/// Stick-breaking attention over a packed batch: `q` `(total_tokens, heads, head_dim)`, `k` and `v`
/// `(total_tokens, kv_heads, head_dim)`, sequence s holding tokens `cu_seqlens[s]..cu_seqlens[s + 1]`
/// (`cu_seqlens`: u32 or i64 `(batch + 1)`, from 0 to `total_tokens`, non-decreasing; on any device).
/// Each sequence attends within itself only. Returns `o` like `q` and `rem` `(total_tokens, heads)`.
pub fn stick_breaking_attention_varlen(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &Tensor,
    opts: &SbOptions,
) -> Result<(Tensor, Tensor)> {
    let (t, _, d) = q.dims3().map_err(|_| shape_error("q", q, "(total_tokens, heads, head_dim)"))?;
    let (tk, _, dk) = k.dims3().map_err(|_| shape_error("k", k, "(total_tokens, kv_heads, head_dim)"))?;
    if (tk, dk) != (t, d) {
        return Err(shape_error(
            "k",
            k,
            &format!("(total_tokens, kv_heads, head_dim) with {t} tokens and head_dim {d} as q"),
        ));
    }
    same_as_k(v, k)?;
    let sequences = read_cu_seqlens(cu_seqlens, t)?;
    let (o, rem) = attend(q.clone(), k.clone(), v.clone(), Batch::Packed(sequences), opts)?;
    let rem = match rem {
        Rem::Rows(rem) => rem,
        // The kernels' [heads, tokens].
        Rem::HeadsFirst(rem) => rem.t()?,
    };
    Ok((o, rem))
}

/// How the tokens of the packed `[T, H, D]` tensors form sequences.
enum Batch {
    /// `batch` sequences of `seq` tokens.
    Dense { batch: usize, seq: usize },
    /// `(first token, length)` of each sequence.
    Packed(Vec<(usize, usize)>),
}

impl Batch {
    fn sequences(self) -> Vec<(usize, usize)> {
        match self {
            Batch::Dense { batch, seq } => (0..batch).map(|s| (s * seq, seq)).collect(),
            Batch::Packed(s) => s,
        }
    }
}

/// rem as a path returns it: `[T, H]` rows (CPU), or heads before tokens (the GPU kernels'
/// `[batch, heads, seq]` and `[heads, T]`).
enum Rem {
    Rows(Tensor),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    HeadsFirst(Tensor),
}

fn same_as_k(v: &Tensor, k: &Tensor) -> Result<()> {
    if v.dims() != k.dims() {
        return Err(shape_error("v", v, &format!("the shape of k, {:?}", k.dims())));
    }
    Ok(())
}

/// Checks the heads, dtypes, device and options, then runs the op on q `[.., H, D]` and k, v
/// `[.., H_kv, D]` (`(batch, seq)` or packed tokens before the heads). o comes back in q's shape.
fn attend(q: Tensor, k: Tensor, v: Tensor, batch: Batch, opts: &SbOptions) -> Result<(Tensor, Rem)> {
    opts.validate()?;
    let (h, d) = (q.dim(D::Minus2)?, q.dim(D::Minus1)?);
    let hk = k.dim(D::Minus2)?;
    if h == 0 || d == 0 || hk == 0 || h % hk != 0 {
        return Err(SbCandleError::Shape {
            tensor: "k",
            got: k.dims().to_vec(),
            expected: format!("kv_heads >= 1 dividing q's heads ({h}), heads and head_dim >= 1"),
        }
        .into());
    }
    let dtype = q.dtype();
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) || x.dtype() != dtype {
            return Err(SbCandleError::Dtype {
                tensor: name,
                got: format!("{:?}", x.dtype()),
                expected: format!("f32, bf16 or f16, the same for q, k and v (q is {dtype:?})"),
            }
            .into());
        }
        if !x.device().same_device(q.device()) {
            return Err(SbCandleError::Device {
                device: format!("{:?} and {:?}", q.device(), x.device()),
                reason: "q, k and v must be on one device",
            }
            .into());
        }
    }
    match q.device() {
        Device::Cpu => {
            let t = q.elem_count() / (h * d);
            let f32_packed = |x: &Tensor, heads: usize| x.to_dtype(DType::F32)?.reshape((t, heads, d))?.contiguous();
            let geometry = Geometry { heads: h, kv_heads: hk, head_dim: d, sequences: batch.sequences() };
            let op = op::StickBreaking { geometry, opts: *opts };
            let packed = f32_packed(&q, h)?.apply_op3(&f32_packed(&k, hk)?, &f32_packed(&v, hk)?, op)?;
            let o = packed.narrow(2, 0, d)?.to_dtype(dtype)?.reshape(q.shape())?;
            let rem = packed.narrow(2, d, 1)?.squeeze(2)?;
            Ok((o, Rem::Rows(rem)))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda_attend(q, k, v, batch, opts),
        other => Err(SbCandleError::Device {
            device: format!("{other:?}"),
            reason: if cfg!(feature = "cuda") {
                "sbgen-candle computes on the CPU and on CUDA devices"
            } else {
                "this build of sbgen-candle computes on the CPU only (enable the `cuda` feature for CUDA devices)"
            },
        }
        .into()),
    }
}

/// The GPU path: one forward launch on candle's stream, o and rem as two graph nodes (see
/// [`cuda::attention`]).
#[cfg(feature = "cuda")]
fn cuda_attend(q: Tensor, k: Tensor, v: Tensor, batch: Batch, opts: &SbOptions) -> Result<(Tensor, Rem)> {
    use cuda::attention::{DeviceVarlen, Problem, SbCudaAttention, SbCudaRemainder, Shared};
    let (h, d) = (q.dim(D::Minus2)?, q.dim(D::Minus1)?);
    let hk = k.dim(D::Minus2)?;
    let t = q.elem_count() / (h * d);
    if !matches!(q.dtype(), DType::BF16 | DType::F16) {
        return Err(cuda::attention::dtype_error("q", q.dtype()));
    }
    let Device::Cuda(dev) = q.device() else { unreachable!("cuda_attend is called for CUDA tensors") };
    let (shape, varlen) = match batch {
        Batch::Dense { batch, seq } => {
            (sbgen_runtime::reference::Shape { batch, heads: h, kv_heads: hk, seq, head_dim: d }, None)
        }
        Batch::Packed(sequences) => {
            let longest = sequences.iter().map(|s| s.1).max().unwrap_or(0);
            let mut cu = Vec::with_capacity(sequences.len() + 1);
            cu.push(0i32);
            for &(start, len) in &sequences {
                cu.push(i32::try_from(start + len).map_err(|_| SbCandleError::CuSeqlens {
                    reason: format!("holds {} tokens: the GPU kernels take at most {}", start + len, i32::MAX),
                })?);
            }
            let cu_seqlens = dev.cuda_stream().clone_htod(&cu).map_err(candle_core::Error::wrap)?;
            let shape = sbgen_runtime::reference::Shape {
                batch: sequences.len(),
                heads: h,
                kv_heads: hk,
                seq: longest,
                head_dim: d,
            };
            (shape, Some(DeviceVarlen { cu_seqlens, total_tokens: t }))
        }
    };
    if shape.batch * shape.seq == 0 {
        // Nothing to attend: no launch (the kernels refuse empty dimensions).
        let o = q.zeros_like()?;
        let rem = Tensor::ones((t, h), DType::F32, q.device())?;
        return Ok((o, Rem::Rows(rem)));
    }
    let train = q.track_op() || k.track_op() || v.track_op();
    let shared = Shared::new(Problem { shape, opts: *opts, varlen, train });
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let o = q.apply_op3(&k, &v, SbCudaAttention(shared.clone()))?;
    let rem = o.apply_op1(SbCudaRemainder(shared))?;
    Ok((o, Rem::HeadsFirst(rem)))
}

fn dims4(name: &'static str, x: &Tensor, expected: &str) -> Result<(usize, usize, usize, usize)> {
    x.dims4().map_err(|_| shape_error(name, x, expected))
}

fn shape_error(name: &'static str, x: &Tensor, expected: &str) -> candle_core::Error {
    SbCandleError::Shape { tensor: name, got: x.dims().to_vec(), expected: expected.to_string() }.into()
}

/// `(first token, length)` of each sequence of a `cu_seqlens` tensor over `tokens` tokens.
fn read_cu_seqlens(cu: &Tensor, tokens: usize) -> Result<Vec<(usize, usize)>> {
    let bounds: Vec<i64> = match cu.dtype() {
        DType::U32 => cu.flatten_all()?.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => cu.flatten_all()?.to_vec1::<i64>()?,
        other => {
            return Err(SbCandleError::Dtype {
                tensor: "cu_seqlens",
                got: format!("{other:?}"),
                expected: "u32 or i64".into(),
            }
            .into())
        }
    };
    let bad = |reason: String| -> candle_core::Error { SbCandleError::CuSeqlens { reason }.into() };
    if cu.rank() != 1 || bounds.len() < 2 {
        return Err(bad(format!("has shape {:?}: allowed (batch + 1) with batch >= 1", cu.dims())));
    }
    if bounds[0] != 0 || *bounds.last().unwrap_or(&0) != tokens as i64 {
        return Err(bad(format!(
            "runs from {} to {}: allowed from 0 to total_tokens = {tokens}",
            bounds[0],
            bounds[bounds.len() - 1]
        )));
    }
    let mut out = Vec::with_capacity(bounds.len() - 1);
    for (s, w) in bounds.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(bad(format!("decreases at entry {}: {} after {}", s + 1, w[1], w[0])));
        }
        out.push((w[0] as usize, (w[1] - w[0]) as usize));
    }
    Ok(out)
}
