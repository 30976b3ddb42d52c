//! A small decoder-only transformer with stick-breaking attention and no positional embedding (as
//! the paper's models: the stick's nearest-first order carries position), and two stand-ins for
//! its attention to compare against: candle's softmax attention, and stick-breaking written with
//! plain candle ops (scores, log-sigmoid, cumulative sum), which materialises the N x N matrices.
//!
//! The weights and the residual stream are f32; attention computes in `attn_dtype` (bf16 on the
//! GPU, f32 on the CPU) on `(batch, seq, heads, head_dim)` tensors.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{linear_no_bias, Embedding, Linear, VarBuilder};
use sbgen_candle::{stick_breaking_attention, Remainder, SbKvCache, SbOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attention {
    /// sbgen-candle's op (sbgen's kernels on the GPU).
    Sbgen,
    /// Softmax attention from candle ops (causal mask, `softmax`): the usual candle baseline.
    Softmax,
    /// Stick-breaking attention from candle ops, materialising the N x N matrices.
    NaiveSb,
}

impl std::fmt::Display for Attention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Attention::Sbgen => "sbgen",
            Attention::Softmax => "softmax",
            Attention::NaiveSb => "naive-sb",
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    pub layers: usize,
    pub attention: Attention,
    pub attn_dtype: DType,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads
    }
}

/// The options every stick-breaking layer uses: the remainder is fused into o (the token keeps what
/// no earlier token took, as its own value).
pub fn sb_options() -> SbOptions {
    SbOptions { remainder: Remainder::Fuse, ..SbOptions::default() }
}

struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn new(size: usize, vb: VarBuilder) -> Result<Self> {
        Ok(RmsNorm { weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The differentiable form (candle-nn's fused rms-norm has no backward).
        candle_nn::ops::rms_norm_slow(x, &self.weight, 1e-5)
    }
}

struct Block {
    norm1: RmsNorm,
    qkv: Linear,
    proj: Linear,
    norm2: RmsNorm,
    up: Linear,
    down: Linear,
}

pub struct Model {
    cfg: Config,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
}

impl Model {
    pub fn new(cfg: Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.d_model;
        let embed = candle_nn::embedding(cfg.vocab, c, vb.pp("embed"))?;
        let blocks = (0..cfg.layers)
            .map(|l| {
                let vb = vb.pp(format!("block{l}"));
                Ok(Block {
                    norm1: RmsNorm::new(c, vb.pp("norm1"))?,
                    qkv: linear_no_bias(c, 3 * c, vb.pp("qkv"))?,
                    proj: linear_no_bias(c, c, vb.pp("proj"))?,
                    norm2: RmsNorm::new(c, vb.pp("norm2"))?,
                    up: linear_no_bias(c, 4 * c, vb.pp("up"))?,
                    down: linear_no_bias(4 * c, c, vb.pp("down"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            cfg,
            embed,
            blocks,
            norm: RmsNorm::new(c, vb.pp("norm"))?,
            head: linear_no_bias(c, cfg.vocab, vb.pp("head"))?,
        })
    }

    pub fn config(&self) -> Config {
        self.cfg
    }

    pub fn attention(&self) -> Attention {
        self.cfg.attention
    }

    /// Logits `(batch, seq, vocab)` for tokens `(batch, seq)`. With `caches`, each layer's keys and
    /// values are also appended to its cache (the prefill before generation).
    pub fn forward(&self, tokens: &Tensor, mut caches: Option<&mut [SbKvCache]>) -> Result<Tensor> {
        let mut x = self.embed.forward(tokens)?;
        for (l, block) in self.blocks.iter().enumerate() {
            let (q, k, v) = self.qkv(block, &x)?;
            if let Some(c) = caches.as_deref_mut() {
                c[l].append(&k, &v)?;
            }
            let o = self.attend(&q, &k, &v)?;
            x = self.finish_block(block, &x, &o)?;
        }
        self.head.forward(&self.norm.forward(&x)?)
    }

    /// Logits `(batch, vocab)` for one new token per sequence `(batch,)`, attending through each
    /// layer's KV cache (sbgen's decode kernels on the GPU).
    pub fn step(&self, tokens: &Tensor, caches: &mut [SbKvCache]) -> Result<Tensor> {
        let mut x = self.embed.forward(&tokens.unsqueeze(1)?)?;
        for (block, cache) in self.blocks.iter().zip(caches.iter_mut()) {
            let (q, k, v) = self.qkv(block, &x)?;
            cache.append(&k, &v)?;
            let (o, _rem) = cache.decode(&q.squeeze(1)?, &sb_options())?;
            x = self.finish_block(block, &x, &o.unsqueeze(1)?)?;
        }
        self.head.forward(&self.norm.forward(&x)?)?.squeeze(1)
    }

    /// q, k, v `(batch, seq, heads, head_dim)` in the attention dtype.
    fn qkv(&self, block: &Block, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, n, _) = x.dims3()?;
        let (h, d) = (self.cfg.heads, self.cfg.head_dim());
        let qkv = block.qkv.forward(&block.norm1.forward(x)?)?.reshape((b, n, 3, h, d))?;
        let part = |i: usize| qkv.i((.., .., i))?.to_dtype(self.cfg.attn_dtype)?.contiguous();
        Ok((part(0)?, part(1)?, part(2)?))
    }

    fn finish_block(&self, block: &Block, x: &Tensor, o: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let o = o.to_dtype(DType::F32)?.reshape((b, n, c))?;
        let x = (x + block.proj.forward(&o)?)?;
        let h = block.up.forward(&block.norm2.forward(&x)?)?.gelu()?;
        &x + block.down.forward(&h)?
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        match self.cfg.attention {
            Attention::Sbgen => Ok(stick_breaking_attention(q, k, v, &sb_options())?.0),
            Attention::Softmax => softmax_attention(q, k, v),
            Attention::NaiveSb => naive_stick_breaking(q, k, v),
        }
    }
}

/// `(n, n)` f32: 1 where key j may be seen by query i (`j < i`, or `j <= i` with `diagonal`).
fn causal_ones(n: usize, diagonal: bool, dev: &Device) -> Result<Tensor> {
    let ones: Vec<f32> =
        (0..n * n).map(|e| if e % n < e / n || (diagonal && e % n == e / n) { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(ones, (n, n), dev)
}

/// `(batch, heads, n, n)` scaled scores in f32, with q, k, v moved to `(batch, heads, n, d)`.
fn scores(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let d = q.dim(D::Minus1)?;
    let (q, k, v) =
        (q.transpose(1, 2)?.contiguous()?, k.transpose(1, 2)?.contiguous()?, v.transpose(1, 2)?.contiguous()?);
    let s = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?.to_dtype(DType::F32)?;
    Ok((s, v))
}

/// Causal softmax attention (each token sees itself and earlier ones).
fn softmax_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let n = q.dim(1)?;
    let (s, v) = scores(q, k, v)?;
    let allowed = causal_ones(n, true, s.device())?;
    // -inf where not allowed: (allowed - 1) * big.
    let bias = ((allowed - 1.0)? * 1e30)?;
    let p = candle_nn::ops::softmax(&s.broadcast_add(&bias)?, D::Minus1)?;
    p.to_dtype(v.dtype())?.matmul(&v)?.transpose(1, 2)?.contiguous()
}

/// log(1 + e^x), stable for large |x|.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Stick-breaking attention from candle ops, the same function as [`sb_options`] asks of sbgen:
/// `log A_ij = log beta_ij + sum_{j<l<i} log(1 - beta_il)` for `j < i`, the sum taken as a row
/// total minus an inclusive cumulative sum, and the remainder fused as `rem_i * v_i`.
fn naive_stick_breaking(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let n = q.dim(1)?;
    let (s, v) = scores(q, k, v)?;
    let allowed = causal_ones(n, false, s.device())?;
    let sp = softplus(&s)?;
    let log1m = sp.neg()?.broadcast_mul(&allowed)?;
    let inclusive = log1m.cumsum(D::Minus1)?;
    let total = log1m.sum_keepdim(D::Minus1)?;
    let log_a = ((s - &sp)? + total.broadcast_sub(&inclusive)?)?;
    let a = log_a.exp()?.broadcast_mul(&allowed)?;
    let rem = (a.sum_keepdim(D::Minus1)?.neg()? + 1.0)?;
    let o =
        (a.to_dtype(v.dtype())?.matmul(&v)?.to_dtype(DType::F32)? + v.to_dtype(DType::F32)?.broadcast_mul(&rem)?)?;
    o.to_dtype(v.dtype())?.transpose(1, 2)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive stick-breaking written with candle ops computes what sbgen-candle's op does.
    #[test]
    fn naive_stick_breaking_matches_the_op() {
        let dev = Device::Cpu;
        let (b, n, h, d) = (2, 23, 3, 8);
        let q = Tensor::randn(0f32, 1.0, (b, n, h, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, n, h, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, n, h, d), &dev).unwrap();
        let want = stick_breaking_attention(&q, &k, &v, &sb_options()).unwrap().0;
        let got = naive_stick_breaking(&q, &k, &v).unwrap();
        let err = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err < 1e-4, "max abs difference {err}");
    }
}
