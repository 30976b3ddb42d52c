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
//! **What runs where.** This version computes on the CPU in float32 (any of f32, bf16 and f16 in,
//! the same dtype out; `rem` is always f32), one task per (sequence, K/V head) on rayon's pool, so the
//! same model code trains and generates without a GPU. Gradients flow to q, k and v from both o and
//! rem through candle's backprop. Tensors on a CUDA device are refused with a typed error: the GPU
//! path (sbgen's kernels on candle's stream) is not in this version.

mod cpu;
mod error;
mod op;
mod options;

pub use error::SbCandleError;
pub use options::{Remainder, SbOptions, EARLY_EXIT_BITS};

use candle_core::{DType, Device, Result, Tensor};
use cpu::Geometry;

/// Stick-breaking attention over a dense batch. `q`: `(batch, seq, heads, head_dim)`; `k`, `v`:
/// `(batch, seq, kv_heads, head_dim)` with `kv_heads` dividing `heads` (query head h reads K/V head
/// `h / (heads / kv_heads)`). Returns `o` (q's shape and dtype) and `rem` (`(batch, seq, heads)`,
/// f32). Query i attends keys `0..i` (`0..=i` with `attend_current`).
pub fn stick_breaking_attention(q: &Tensor, k: &Tensor, v: &Tensor, opts: &SbOptions) -> Result<(Tensor, Tensor)> {
    let (b, n, h, d) = dims4("q", q, "(batch, seq, heads, head_dim)")?;
    let (bk, nk, hk, dk) = dims4("k", k, "(batch, seq, kv_heads, head_dim)")?;
    if (bk, nk, dk) != (b, n, d) {
        return Err(SbCandleError::Shape {
            tensor: "k",
            got: k.dims().to_vec(),
            expected: format!("(batch, seq, kv_heads, head_dim) with batch {b}, seq {n} and head_dim {d} as q"),
        }
        .into());
    }
    same_as_k(v, k)?;
    let sequences = (0..b).map(|s| (s * n, n)).collect();
    let kv = (b * n, hk, d);
    let (o, rem) = attend(q.reshape((b * n, h, d))?, k.reshape(kv)?, v.reshape(kv)?, sequences, opts)?;
    Ok((o.reshape((b, n, h, d))?, rem.reshape((b, n, h))?))
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
    attend(q.clone(), k.clone(), v.clone(), sequences, opts)
}

fn same_as_k(v: &Tensor, k: &Tensor) -> Result<()> {
    if v.dims() != k.dims() {
        return Err(shape_error("v", v, &format!("the shape of k, {:?}", k.dims())));
    }
    Ok(())
}

/// Checks the heads, dtypes, device and options, then runs the op on packed `[T, H, D]` q and
/// `[T, H_kv, D]` k and v.
fn attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sequences: Vec<(usize, usize)>,
    opts: &SbOptions,
) -> Result<(Tensor, Tensor)> {
    opts.validate()?;
    let (_, h, d) = q.dims3()?;
    let (_, hk, _) = k.dims3()?;
    if d == 0 || hk == 0 || h % hk != 0 {
        return Err(SbCandleError::Shape {
            tensor: "k",
            got: k.dims().to_vec(),
            expected: format!("kv_heads >= 1 dividing q's heads ({h}), head_dim >= 1"),
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
        if !matches!(x.device(), Device::Cpu) {
            return Err(SbCandleError::Device {
                device: format!("{:?}", x.device()),
                reason: "this version of sbgen-candle computes on the CPU only: move q, k and v there",
            }
            .into());
        }
    }
    let f32_contiguous = |x: &Tensor| x.to_dtype(DType::F32)?.contiguous();
    let op = op::StickBreaking { geometry: Geometry { heads: h, kv_heads: hk, head_dim: d, sequences }, opts: *opts };
    let packed = f32_contiguous(&q)?.apply_op3(&f32_contiguous(&k)?, &f32_contiguous(&v)?, op)?;
    let o = packed.narrow(2, 0, d)?.to_dtype(dtype)?;
    let rem = packed.narrow(2, d, 1)?.squeeze(2)?;
    Ok((o, rem))
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
