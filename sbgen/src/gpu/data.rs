//! Test data: the three regimes of docs/checking.md#data-regimes, rounding to the kernel's dtype, layouts, poisoned
//! outputs and the error metrics the checks use.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sbgen_runtime::reference::{bhnd_to_bnhd, bnhd_to_bhnd, Shape};
use sbgen_runtime::spec::{Dtype, Layout};
use std::fmt;
use std::str::FromStr;

/// How q and k are drawn, which decides how far the stick reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Regime {
    /// q, k, v ~ N(0, 1): the stick is spent within tens of keys.
    Random,
    /// Scores near -8 (beta ~ 3e-4): the stick survives thousands of keys; early exit must not
    /// trigger wrongly.
    LongReach,
    /// Scores near +8: the nearest key takes almost all of the stick.
    Sharp,
}

impl Regime {
    pub const ALL: [Regime; 3] = [Regime::Random, Regime::LongReach, Regime::Sharp];

    /// The score every (q_i, k_j) pair is drawn near, if the regime fixes one.
    pub fn target_score(self) -> Option<f64> {
        match self {
            Regime::Random => None,
            Regime::LongReach => Some(-8.0),
            Regime::Sharp => Some(8.0),
        }
    }
}

impl fmt::Display for Regime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Regime::Random => "random",
            Regime::LongReach => "long_reach",
            Regime::Sharp => "sharp",
        })
    }
}

impl FromStr for Regime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "random" => Ok(Regime::Random),
            "long_reach" | "long" => Ok(Regime::LongReach),
            "sharp" => Ok(Regime::Sharp),
            _ => Err(format!("`regime` = `{s}` is not a valid value: allowed random, long_reach, sharp")),
        }
    }
}

/// Inputs of one problem, already rounded to the kernel's dtype (so the f64 reference sees exactly
/// what the kernel reads). `d_rem` is f32.
///
/// The problem is `seq_lens.len()` sequences of `seq_lens[b]` tokens (a dense batch has `shape.seq`
/// tokens in each of `shape.batch`; a packed THD batch any lengths, with `shape.batch` sequences and
/// `shape.seq` the longest). Tensors are in *canonical order*: the sequences one after another, each
/// in BHND order — q, o, dO and dq `[H, len, D]`, k, v, dk and dv `[H_kv, len, D]`, rem and dRem
/// `[H, len]`. For a dense batch that is plain BHND.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub shape: Shape,
    pub seq_lens: Vec<usize>,
    pub dtype: Dtype,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub d_o: Vec<f32>,
    pub d_rem: Vec<f32>,
}

/// The sizes of a problem of sequences (an [`Inputs`] or its copy on the device): `seq_lens[b]`
/// tokens in sequence b, `shape`'s heads, K/V heads and head_dim.
pub trait Sequences {
    fn shape(&self) -> Shape;
    fn seq_lens(&self) -> &[usize];

    /// Tokens in all sequences.
    fn tokens(&self) -> usize {
        self.seq_lens().iter().sum()
    }
    /// Elements of q (and o, dO, dq).
    fn q_len(&self) -> usize {
        self.tokens() * self.shape().heads * self.shape().head_dim
    }
    /// Elements of k (and v, dk, dv).
    fn kv_len(&self) -> usize {
        self.tokens() * self.shape().kv_heads * self.shape().head_dim
    }
    /// Elements of rem (and log2 rem, dRem).
    fn rows(&self) -> usize {
        self.tokens() * self.shape().heads
    }
}

impl Sequences for Inputs {
    fn shape(&self) -> Shape {
        self.shape
    }
    fn seq_lens(&self) -> &[usize] {
        &self.seq_lens
    }
}

impl Inputs {
    /// Every (sequence, query head) of the problem, in canonical order.
    pub fn heads(&self) -> Vec<HeadRef> {
        let s = self.shape;
        let (d, group) = (s.head_dim, s.group());
        let mut out = Vec::new();
        let mut first = 0;
        for (seq, &len) in self.seq_lens.iter().enumerate() {
            for h in 0..s.heads {
                let kv_head = h / group;
                out.push(HeadRef {
                    seq,
                    len,
                    q: (first * s.heads + h * len) * d,
                    kv: (first * s.kv_heads + kv_head * len) * d,
                    rows: first * s.heads + h * len,
                });
            }
            first += len;
        }
        out
    }
}

/// Where one query head of one sequence lives in canonical order (element offsets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadRef {
    pub seq: usize,
    pub len: usize,
    /// Offset of its q (o, dO, dq) block of `len * D` elements.
    pub q: usize,
    /// Offset of the K/V head it reads (`len * D` elements).
    pub kv: usize,
    /// Offset of its `len` rem rows.
    pub rows: usize,
}

/// Standard normal samples (Box-Muller: `rand` without `rand_distr`).
pub fn normal(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let u: f64 = 1.0 - rng.gen::<f64>();
            let w: f64 = rng.gen();
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * w).cos()) as f32
        })
        .collect()
}

/// Draws the inputs of `regime` for a dense batch of `shape`.
pub fn make_inputs(shape: Shape, dtype: Dtype, regime: Regime, seed: u64) -> Inputs {
    make_packed_inputs(shape, &vec![shape.seq; shape.batch], dtype, regime, seed)
}

/// Draws the inputs of `regime` for sequences of `seq_lens` tokens with `shape`'s heads, K/V heads
/// and head_dim (`shape.batch` and `shape.seq` are set from `seq_lens`). For long reach and sharp
/// data each (sequence, K/V head) gets a random unit direction u; q_i = c u + 0.1 n_i for the query
/// heads of its group and k_j = ±c u + 0.1 n_j with c = sqrt(|score| / scale), so every score
/// s q_i.k_j is within about 0.1 of the target (scale = 1/sqrt(D)). v, dO, dRem ~ N(0, 1).
pub fn make_packed_inputs(shape: Shape, seq_lens: &[usize], dtype: Dtype, regime: Regime, seed: u64) -> Inputs {
    let shape = Shape { batch: seq_lens.len(), seq: seq_lens.iter().copied().max().unwrap_or(0), ..shape };
    let mut x = Inputs {
        shape,
        seq_lens: seq_lens.to_vec(),
        dtype,
        q: Vec::new(),
        k: Vec::new(),
        v: Vec::new(),
        d_o: Vec::new(),
        d_rem: Vec::new(),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    x.q = normal(&mut rng, x.q_len());
    x.k = normal(&mut rng, x.kv_len());
    x.v = normal(&mut rng, x.kv_len());
    x.d_o = normal(&mut rng, x.q_len());
    x.d_rem = normal(&mut rng, x.rows());
    if let Some(score) = regime.target_score() {
        let d = shape.head_dim;
        let scale = 1.0 / (d as f64).sqrt();
        let c = (score.abs() / scale).sqrt() as f32;
        let sign = score.signum() as f32;
        let heads = x.heads();
        // One direction per (sequence, K/V head), drawn in canonical order of the K/V heads.
        let group = shape.group();
        for chunk in heads.chunks(group) {
            let r0 = chunk[0];
            let mut u = normal(&mut rng, d);
            let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt();
            u.iter_mut().for_each(|x| *x /= norm);
            for kr in x.k[r0.kv..r0.kv + r0.len * d].chunks_mut(d) {
                for t in 0..d {
                    kr[t] = sign * c * u[t] + 0.1 * kr[t];
                }
            }
            for r in chunk {
                for qr in x.q[r.q..r.q + r.len * d].chunks_mut(d) {
                    for t in 0..d {
                        qr[t] = c * u[t] + 0.1 * qr[t];
                    }
                }
            }
        }
    }
    let round = |v: &mut Vec<f32>| v.iter_mut().for_each(|e| *e = dtype.round(*e));
    for t in [&mut x.q, &mut x.k, &mut x.v, &mut x.d_o] {
        round(t);
    }
    x
}

/// A dense BHND tensor of `shape` (q-shaped: use `shape.kv()` for k, v) in `layout` order.
pub fn to_layout<T: Copy>(shape: Shape, layout: Layout, bhnd: &[T]) -> Vec<T> {
    to_layout_seqs(&vec![shape.seq; shape.batch], shape.heads, shape.head_dim, layout, bhnd)
}

/// A dense tensor in `layout` order back in BHND order.
pub fn from_layout<T: Copy>(shape: Shape, layout: Layout, x: &[T]) -> Vec<T> {
    from_layout_seqs(&vec![shape.seq; shape.batch], shape.heads, shape.head_dim, layout, x)
}

/// A tensor of `heads` heads in canonical order (see [`Inputs`]) in `layout` order: BHND is
/// canonical for a dense batch; BNHD and THD are each sequence's `[len, heads, D]`, one after another.
pub fn to_layout_seqs<T: Copy>(lens: &[usize], heads: usize, d: usize, layout: Layout, canon: &[T]) -> Vec<T> {
    per_sequence(lens, heads, d, layout, canon, bhnd_to_bnhd)
}

/// The inverse of [`to_layout_seqs`].
pub fn from_layout_seqs<T: Copy>(lens: &[usize], heads: usize, d: usize, layout: Layout, x: &[T]) -> Vec<T> {
    per_sequence(lens, heads, d, layout, x, bnhd_to_bhnd)
}

fn per_sequence<T: Copy>(
    lens: &[usize],
    heads: usize,
    d: usize,
    layout: Layout,
    x: &[T],
    convert: fn(Shape, &[T]) -> Vec<T>,
) -> Vec<T> {
    if layout == Layout::Bhnd {
        return x.to_vec();
    }
    let mut out = Vec::with_capacity(x.len());
    let mut first = 0;
    for &len in lens {
        let n = len * heads * d;
        out.extend(convert(Shape::new(1, heads, len, d), &x[first..first + n]));
        first += n;
    }
    out
}

/// Rows (rem, log2 rem, dRem) of `heads` heads in canonical order, in `layout` order: THD keeps
/// them `[heads, total_tokens]`, the dense layouts `[batch, heads, seq]` (canonical).
pub fn rows_to_layout<T: Copy>(lens: &[usize], heads: usize, layout: Layout, canon: &[T]) -> Vec<T> {
    permute_rows(lens, heads, layout, canon, true)
}

/// The inverse of [`rows_to_layout`].
pub fn rows_from_layout<T: Copy>(lens: &[usize], heads: usize, layout: Layout, x: &[T]) -> Vec<T> {
    permute_rows(lens, heads, layout, x, false)
}

/// Moves each (sequence, head) run of rows between its canonical place (`first * heads + h * len`)
/// and its THD place (`h * total + first`), in the direction `to_thd` says.
fn permute_rows<T: Copy>(lens: &[usize], heads: usize, layout: Layout, x: &[T], to_thd: bool) -> Vec<T> {
    if layout != Layout::Thd {
        return x.to_vec();
    }
    let total: usize = lens.iter().sum();
    let mut out = x.to_vec();
    let mut first = 0;
    for &len in lens {
        for h in 0..heads {
            let (canon, thd) = (first * heads + h * len, h * total + first);
            let (from, to) = if to_thd { (canon, thd) } else { (thd, canon) };
            out[to..to + len].copy_from_slice(&x[from..from + len]);
        }
        first += len;
    }
    out
}

/// Relative L2 error ||got - want|| / ||want|| (the absolute norm when want is all zeros).
/// NaN when `got` holds a NaN or an infinity.
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::NAN;
        }
        let d = g as f64 - w;
        num += d * d;
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Relative L2 error with the denominator floored at `||floor||`: ||got - want|| / max(||want||, ||floor||).
/// For a reference that is a cancellation of terms the size of `floor` (see `check`'s fused
/// gradients), where the plain relative error would divide rounding noise by near zero.
pub fn rel_l2_floored(got: &[f32], want: &[f64], floor: &[f64]) -> f64 {
    let err = rel_l2(got, want);
    let want_norm = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    let floor_norm = floor.iter().map(|w| w * w).sum::<f64>().sqrt();
    if err.is_nan() || floor_norm <= want_norm {
        return err;
    }
    // rel_l2 divided by ||want|| (or by 1 when want is all zeros); rescale to ||floor||.
    let abs = if want_norm == 0.0 { err } else { err * want_norm };
    abs / floor_norm
}

/// Relative L2 distance between two kernel outputs.
pub fn rel_l2_f32(got: &[f32], want: &[f32]) -> f64 {
    let want: Vec<f64> = want.iter().map(|&x| x as f64).collect();
    rel_l2(got, &want)
}

/// Number of elements that are NaN or infinite (a poisoned element the kernel never wrote is NaN).
pub fn non_finite(x: &[f32]) -> usize {
    x.iter().filter(|v| !v.is_finite()).count()
}

/// The spacing of `dtype` values near `x` (one unit in the last place).
pub fn ulp(dtype: Dtype, x: f32) -> f32 {
    let mantissa_bits = match dtype {
        Dtype::Bf16 => 7,
        Dtype::F16 => 10,
    };
    let x = x.abs().max(f32::MIN_POSITIVE);
    let exp = x.log2().floor() as i32;
    2f32.powi(exp - mantissa_bits)
}

/// f32 values to f64.
pub fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reach_and_sharp_scores_are_near_their_targets() {
        for (regime, target) in [(Regime::LongReach, -8.0), (Regime::Sharp, 8.0)] {
            let shape = Shape::new(1, 2, 16, 64);
            let x = make_inputs(shape, Dtype::Bf16, regime, 7);
            let d = 64;
            let s = 1.0 / 8.0;
            for h in 0..2 {
                for i in 0..16 {
                    for j in 0..16 {
                        let qi = &x.q[(h * 16 + i) * d..(h * 16 + i + 1) * d];
                        let kj = &x.k[(h * 16 + j) * d..(h * 16 + j + 1) * d];
                        let z: f32 = s * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>();
                        assert!((z - target).abs() < 1.0, "{regime}: score {z}");
                    }
                }
            }
        }
    }

    #[test]
    fn inputs_are_rounded_to_the_dtype() {
        let x = make_inputs(Shape::new(1, 1, 8, 64), Dtype::Bf16, Regime::Random, 1);
        assert!(x.q.iter().all(|&v| half::bf16::from_f32(v).to_f32() == v));
        let x = make_inputs(Shape::new(1, 1, 8, 64), Dtype::F16, Regime::Random, 1);
        assert!(x.v.iter().all(|&v| half::f16::from_f32(v).to_f32() == v));
    }

    #[test]
    fn rel_l2_flags_nan_and_handles_zero_references() {
        assert!(rel_l2(&[1.0, f32::NAN], &[1.0, 1.0]).is_nan());
        assert_eq!(rel_l2(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
        assert!((rel_l2(&[3.0, 0.0], &[0.0, 0.0]) - 3.0).abs() < 1e-12);
        assert!((rel_l2(&[1.1], &[1.0]) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn floored_rel_l2_only_raises_a_smaller_denominator() {
        // A reference of ~0 (a cancellation) measured against the size of the cancelling terms.
        assert!((rel_l2_floored(&[0.01, 0.0], &[0.0, 0.0], &[1.0, 0.0]) - 0.01).abs() < 1e-9);
        assert!((rel_l2_floored(&[0.01], &[1e-12], &[2.0]) - 0.005).abs() < 1e-9);
        // A floor smaller than the reference changes nothing; NaN stays NaN.
        assert!((rel_l2_floored(&[1.1], &[1.0], &[0.5]) - 0.1).abs() < 1e-6);
        assert!(rel_l2_floored(&[f32::NAN], &[1.0], &[5.0]).is_nan());
    }

    #[test]
    fn layouts_round_trip() {
        let shape = Shape::new(2, 3, 5, 4);
        let x: Vec<u32> = (0..shape.len() as u32).collect();
        assert_eq!(from_layout(shape, Layout::Bnhd, &to_layout(shape, Layout::Bnhd, &x)), x);
        let lens = [0, 1, 5, 2];
        let n = 8 * 3 * 4;
        let x: Vec<u32> = (0..n as u32).collect();
        for layout in [Layout::Bhnd, Layout::Bnhd, Layout::Thd] {
            assert_eq!(from_layout_seqs(&lens, 3, 4, layout, &to_layout_seqs(&lens, 3, 4, layout, &x)), x);
            let rows: Vec<u32> = (0..24).collect();
            assert_eq!(rows_from_layout(&lens, 3, layout, &rows_to_layout(&lens, 3, layout, &rows)), rows);
        }
    }

    #[test]
    fn packed_layouts_put_each_token_where_the_kernels_read_it() {
        // Sequences of 2 and 3 tokens, 2 heads, D = 1: canonical value 100 * seq + 10 * head + token.
        let lens = [2, 3];
        let canon: Vec<u32> = vec![0, 1, 10, 11, 100, 101, 102, 110, 111, 112];
        // THD [T, H, D]: token-major, heads inside.
        assert_eq!(to_layout_seqs(&lens, 2, 1, Layout::Thd, &canon), vec![0, 10, 1, 11, 100, 110, 101, 111, 102, 112]);
        // rem [H, T]: head-major over all tokens.
        assert_eq!(rows_to_layout(&lens, 2, Layout::Thd, &canon), vec![0, 1, 100, 101, 102, 10, 11, 110, 111, 112]);
    }

    #[test]
    fn grouped_packed_inputs_share_directions_within_a_group() {
        let shape = Shape::new(1, 4, 1, 32).with_kv_heads(2);
        let x = make_packed_inputs(shape, &[3, 0, 5], Dtype::Bf16, Regime::Sharp, 9);
        assert_eq!((x.shape.batch, x.shape.seq, x.q.len(), x.k.len()), (3, 5, 8 * 4 * 32, 8 * 2 * 32));
        for r in x.heads() {
            let k0 = &x.k[r.kv..r.kv + r.len * 32];
            for (i, qi) in x.q[r.q..r.q + r.len * 32].chunks(32).enumerate() {
                for kj in k0.chunks(32) {
                    let z: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() / 32f32.sqrt();
                    assert!((z - 8.0).abs() < 1.0, "seq {} token {i}: score {z}", r.seq);
                }
            }
        }
    }

    #[test]
    fn ulp_of_one() {
        assert_eq!(ulp(Dtype::Bf16, 1.0), 2f32.powi(-7));
        assert_eq!(ulp(Dtype::F16, 1.5), 2f32.powi(-10));
    }

    #[test]
    fn regimes_parse() {
        assert_eq!("long-reach".parse::<Regime>().unwrap(), Regime::LongReach);
        assert!("flat".parse::<Regime>().unwrap_err().contains("`regime`"));
    }
}
