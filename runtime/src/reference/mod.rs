//! The float64 CPU reference: stick-breaking attention forward and backward, O(N^2) per head.
//!
//! This is the ground truth every kernel, the interpreter of the blocked schedule and the tuner's
//! correctness check are measured against. It follows the definitions literally
//! (docs/math.md#definitions), in log space base 2:
//!
//! ```text
//! x_ij         = s * log2(e) * q_i . k_j
//! softplus2(x) = log2(1 + 2^x)            (x itself when x > 15, as the kernels do)
//! log2 A_ij    = x_ij - softplus2(x_ij) - sum_{allowed k > j} softplus2(x_ik)
//! o_i          = sum_j A_ij v_j            (+ rem_i v_i with a fused remainder)
//! log2 rem_i   = - sum_{allowed k} softplus2(x_ik),   rem_i = 2^(log2 rem_i)
//! ```
//!
//! Each row walks its allowed keys from the nearest (largest j) to the farthest, keeping
//! `acc` = log2 of the stick still left. Rows with no allowed key give o = 0, rem = 1, log2 rem = 0.
//!
//! **Early exit** (`early_exit_bits = Some(T)`) is applied per row here: once a row's running
//! `acc` falls below -T, its remaining (farther) keys get weight 0 and rem keeps the value reached.
//! The kernels decide per query block instead (a coarser rule); both stay within this bound of the
//! exact result (docs/math.md#early-exit): |Δrem_i| <= 2^-T and, with the remainder returned,
//! |Δo_i| <= 2^-T max_j |v_j| elementwise (with a fused remainder the bound is 2^-T max_j |v_i - v_j|,
//! at most twice that).
//! The backward differentiates the truncated function (the same per-row rule).
//!
//! All tensors are flat slices in BHND order: q, o, dq are [B, H, N, D], k, v, dk, dv are
//! [B, H_kv, N, D] (grouped-query attention: query head h reads K/V head h / (H / H_kv), and dk, dv
//! sum over the query heads of a group); rem and log2 rem are [B, H, N]. A packed variable-length
//! batch is checked one sequence at a time (each is a batch of one). [`bnhd_to_bhnd`] and [`bhnd_to_bnhd`] convert from and to the
//! flash-attn layout.

use crate::spec::{Mask, Remainder, Spec};

pub mod blocked;
mod decode;
pub use decode::{chunk_state, decode, ChunkState, DecodeShape, Decoded};

/// Sizes of a problem: q is logically [batch, heads, seq, head_dim], k and v
/// [batch, kv_heads, seq, head_dim] with `kv_heads` dividing `heads` (equal: multi-head attention;
/// 1: multi-query attention).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl Shape {
    /// A multi-head shape (`kv_heads = heads`).
    pub fn new(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Self {
        Shape { batch, heads, kv_heads: heads, seq, head_dim }
    }

    /// The same shape with `kv_heads` K/V heads.
    pub fn with_kv_heads(self, kv_heads: usize) -> Self {
        Shape { kv_heads, ..self }
    }

    /// Query heads per K/V head (`heads / kv_heads`; 0 when `kv_heads` is 0).
    pub fn group(&self) -> usize {
        self.heads.checked_div(self.kv_heads).unwrap_or(0)
    }

    /// The shape of k, v, dk and dv seen as a multi-head problem (`heads = kv_heads`), for layout
    /// conversions.
    pub fn kv(&self) -> Shape {
        Shape { heads: self.kv_heads, ..*self }
    }

    /// Elements of q, o, dq and dO: B * H * N * D.
    pub fn len(&self) -> usize {
        self.batch * self.heads * self.seq * self.head_dim
    }

    /// Elements of k, v, dk and dv: B * H_kv * N * D.
    pub fn kv_len(&self) -> usize {
        self.batch * self.kv_heads * self.seq * self.head_dim
    }

    /// True when any dimension is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements of rem and log2 rem: B * H * N.
    pub fn rows(&self) -> usize {
        self.batch * self.heads * self.seq
    }
}

/// What the reference computes, beyond the inputs: the spec fields that change the result, and the
/// scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    pub mask: Mask,
    pub remainder: Remainder,
    /// `Some(T)`: a row stops once less than 2^-T of its stick is left (see the module doc).
    pub early_exit_bits: Option<u32>,
    /// Score scale s; `None` means 1 / sqrt(head_dim).
    pub scale: Option<f64>,
}

impl Options {
    /// Strict causal mask, remainder returned, no early exit, default scale.
    pub fn causal() -> Self {
        Options { mask: Mask::Strict, remainder: Remainder::Return, early_exit_bits: None, scale: None }
    }

    /// The scale for a head dimension: `scale` or 1 / sqrt(head_dim).
    pub fn scale_for(&self, head_dim: usize) -> f64 {
        self.scale.unwrap_or_else(|| 1.0 / (head_dim as f64).sqrt())
    }

    /// True when key `j` is allowed for query `i`.
    pub fn allowed(&self, i: usize, j: usize) -> bool {
        match self.mask {
            Mask::Strict => j < i,
            Mask::AttendCurrent => j <= i,
        }
    }

    /// Number of keys row `i` may attend to (keys `0..n`), given `seq` keys in all.
    fn allowed_keys(&self, i: usize, seq: usize) -> usize {
        let n = match self.mask {
            Mask::Strict => i,
            Mask::AttendCurrent => i + 1,
        };
        n.min(seq)
    }
}

impl Default for Options {
    fn default() -> Self {
        Options::causal()
    }
}

impl From<&Spec> for Options {
    fn from(spec: &Spec) -> Self {
        Options { mask: spec.mask, remainder: spec.remainder, early_exit_bits: spec.early_exit_bits, scale: None }
    }
}

/// Forward outputs, BHND.
#[derive(Clone, Debug, PartialEq)]
pub struct Forward {
    /// [B, H, N, D]; includes rem_i * v_i when the remainder is fused.
    pub o: Vec<f64>,
    /// [B, H, N]: the stick left over, 2^(log2_rem).
    pub rem: Vec<f64>,
    /// [B, H, N]: log2 of the stick left over (what the kernels save for the backward).
    pub log2_rem: Vec<f64>,
}

/// Backward outputs, BHND: dq [B, H, N, D], dk and dv [B, H_kv, N, D].
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// log2(1 + 2^x), taking x itself when x > 15 (the rule the kernels use, docs/math.md#forward-blocked).
pub fn softplus2(x: f64) -> f64 {
    if x > 15.0 {
        x
    } else {
        // ln_1p keeps full precision for very negative x, where 1 + 2^x rounds to 1.
        x.exp2().ln_1p() * std::f64::consts::LOG2_E
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One row's walk: the keys it kept (`first..first + weights.len()`), their weights A and betas,
/// and the final log2 remainder.
struct RowWalk {
    first: usize,
    /// A_ij for j = first.. (ascending j).
    weights: Vec<f64>,
    /// beta_ij for the same keys.
    betas: Vec<f64>,
    log2_rem: f64,
}

/// Walks row `i` of one head from its nearest allowed key to the farthest (or to the early exit).
/// `qi` is the row's query, `k` the head's keys [N, D].
fn walk_row(opts: &Options, shape: &Shape, scale_log2: f64, i: usize, qi: &[f64], k: &[f64]) -> RowWalk {
    let threshold = opts.early_exit_bits.map(|t| -(t as f64));
    walk_keys(threshold, scale_log2, qi, k, 0..opts.allowed_keys(i, shape.seq))
}

/// Walks keys `keys` (all allowed) from the nearest (`keys.end - 1`) to the farthest with a fresh
/// stick, stopping once log2 of the stick left falls below `threshold` (early exit).
fn walk_keys(threshold: Option<f64>, scale_log2: f64, qi: &[f64], k: &[f64], keys: std::ops::Range<usize>) -> RowWalk {
    let d = qi.len();
    let mut weights = Vec::with_capacity(keys.len());
    let mut betas = Vec::with_capacity(keys.len());
    let mut acc = 0.0f64;
    let mut first = keys.end;
    for j in keys.rev() {
        if let Some(th) = threshold {
            if acc < th {
                break;
            }
        }
        let x = scale_log2 * dot(qi, &k[j * d..(j + 1) * d]);
        let sp = softplus2(x);
        weights.push((x - sp + acc).exp2());
        betas.push((x - sp).exp2());
        acc -= sp;
        first = j;
    }
    weights.reverse();
    betas.reverse();
    RowWalk { first, weights, betas, log2_rem: acc }
}

/// sum_j A_ij v_j over the keys a walk kept; `v` is the head's values [N, D].
fn weighted_values(row: &RowWalk, v: &[f64], d: usize) -> Vec<f64> {
    let mut o = vec![0.0; d];
    for (t, a) in row.weights.iter().enumerate() {
        let j = row.first + t;
        for (x, vj) in o.iter_mut().zip(&v[j * d..(j + 1) * d]) {
            *x += a * vj;
        }
    }
    o
}

fn check_len(name: &str, got: usize, want: usize) {
    assert_eq!(got, want, "reference: `{name}` has {got} elements, the shape needs {want}");
}

// `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
#[allow(clippy::manual_is_multiple_of)]
fn check_shape(shape: &Shape) {
    assert!(
        shape.kv_heads > 0 && shape.heads % shape.kv_heads == 0,
        "reference: kv_heads = {} must divide heads = {}",
        shape.kv_heads,
        shape.heads
    );
}

/// Elements of the K/V head that query head `bh` (= b * heads + h) reads.
fn kv_head_range(shape: &Shape, bh: usize) -> std::ops::Range<usize> {
    let (b, h) = (bh / shape.heads, bh % shape.heads);
    let kv = b * shape.kv_heads + h / shape.group();
    let size = shape.seq * shape.head_dim;
    kv * size..(kv + 1) * size
}

/// The float64 forward: o, rem and log2 rem for q, k, v in BHND.
///
/// # Panics
/// When a slice's length does not match `shape`.
pub fn forward(shape: Shape, opts: &Options, q: &[f64], k: &[f64], v: &[f64]) -> Forward {
    check_shape(&shape);
    for (name, x, want) in [("q", q, shape.len()), ("k", k, shape.kv_len()), ("v", v, shape.kv_len())] {
        check_len(name, x.len(), want);
    }
    let (n, d) = (shape.seq, shape.head_dim);
    let scale_log2 = opts.scale_for(d) * std::f64::consts::LOG2_E;
    let mut o = vec![0.0; shape.len()];
    let mut rem = vec![1.0; shape.rows()];
    let mut log2_rem = vec![0.0; shape.rows()];
    for bh in 0..shape.batch * shape.heads {
        let head = bh * n * d..(bh + 1) * n * d;
        let kv_head = kv_head_range(&shape, bh);
        let (qh, kh, vh) = (&q[head.clone()], &k[kv_head.clone()], &v[kv_head]);
        for i in 0..n {
            let row = walk_row(opts, &shape, scale_log2, i, &qh[i * d..(i + 1) * d], kh);
            let oi = &mut o[bh * n * d + i * d..bh * n * d + (i + 1) * d];
            oi.copy_from_slice(&weighted_values(&row, vh, d));
            let r = row.log2_rem.exp2();
            if opts.remainder == Remainder::Fuse {
                for (x, vi) in oi.iter_mut().zip(&vh[i * d..(i + 1) * d]) {
                    *x += r * vi;
                }
            }
            rem[bh * n + i] = r;
            log2_rem[bh * n + i] = row.log2_rem;
        }
    }
    Forward { o, rem, log2_rem }
}

/// The float64 backward: gradients of L = sum(d_o * o) + sum(d_rem * rem) with respect to q, k, v
/// (docs/math.md#backward). `d_rem = None` means no gradient flows into rem.
///
/// Per row i, over the keys the forward kept:
/// g_ij = A_ij (dO_i . v_j); C_ik = sum_{j <= k} g_ij; dz_ik = g_ik - beta_ik (C_ik + dRem_i rem_i);
/// dQ = s dZ K; dK = s dZ^T Q; dV = A^T dO. With a fused remainder dRem_i + dO_i . v_i takes the
/// place of dRem_i and rem_i dO_i is added to dV_i.
///
/// # Panics
/// When a slice's length does not match `shape`.
pub fn backward(
    shape: Shape,
    opts: &Options,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
    d_rem: Option<&[f64]>,
) -> Grads {
    check_shape(&shape);
    for (name, x, want) in
        [("q", q, shape.len()), ("k", k, shape.kv_len()), ("v", v, shape.kv_len()), ("d_o", d_o, shape.len())]
    {
        check_len(name, x.len(), want);
    }
    if let Some(dr) = d_rem {
        check_len("d_rem", dr.len(), shape.rows());
    }
    let (n, d) = (shape.seq, shape.head_dim);
    let scale = opts.scale_for(d);
    let scale_log2 = scale * std::f64::consts::LOG2_E;
    let fuse = opts.remainder == Remainder::Fuse;
    let mut dq = vec![0.0; shape.len()];
    let mut dk = vec![0.0; shape.kv_len()];
    let mut dv = vec![0.0; shape.kv_len()];
    for bh in 0..shape.batch * shape.heads {
        let base = bh * n * d;
        let head = base..base + n * d;
        let kv_head = kv_head_range(&shape, bh);
        let kv_base = kv_head.start;
        let (qh, doh) = (&q[head.clone()], &d_o[head.clone()]);
        let (kh, vh) = (&k[kv_head.clone()], &v[kv_head]);
        for i in 0..n {
            let qi = &qh[i * d..(i + 1) * d];
            let doi = &doh[i * d..(i + 1) * d];
            let row = walk_row(opts, &shape, scale_log2, i, qi, kh);
            let rem = row.log2_rem.exp2();
            let mut d_rem_eff = d_rem.map_or(0.0, |dr| dr[bh * n + i]);
            if fuse {
                d_rem_eff += dot(doi, &vh[i * d..(i + 1) * d]);
                for (x, y) in dv[kv_base + i * d..kv_base + (i + 1) * d].iter_mut().zip(doi) {
                    *x += rem * y;
                }
            }
            // C from the left (farthest key) towards the diagonal, inclusive.
            let mut c = 0.0;
            for (t, (&a, &beta)) in row.weights.iter().zip(&row.betas).enumerate() {
                let j = row.first + t;
                let vj = &vh[j * d..(j + 1) * d];
                let g = a * dot(doi, vj);
                c += g;
                let dz = g - beta * (c + d_rem_eff * rem);
                let kj = &kh[j * d..(j + 1) * d];
                for (x, y) in dq[base + i * d..base + (i + 1) * d].iter_mut().zip(kj) {
                    *x += scale * dz * y;
                }
                for (x, y) in dk[kv_base + j * d..kv_base + (j + 1) * d].iter_mut().zip(qi) {
                    *x += scale * dz * y;
                }
                for (x, y) in dv[kv_base + j * d..kv_base + (j + 1) * d].iter_mut().zip(doi) {
                    *x += a * y;
                }
            }
        }
    }
    Grads { dq, dk, dv }
}

/// Index of element (b, h, n, d) in a BHND tensor of `shape`.
fn bhnd_index(shape: &Shape, b: usize, h: usize, n: usize, d: usize) -> usize {
    ((b * shape.heads + h) * shape.seq + n) * shape.head_dim + d
}

/// Index of element (b, h, n, d) in a BNHD tensor of `shape`.
fn bnhd_index(shape: &Shape, b: usize, h: usize, n: usize, d: usize) -> usize {
    ((b * shape.seq + n) * shape.heads + h) * shape.head_dim + d
}

fn permute<T: Copy>(
    shape: &Shape,
    x: &[T],
    src: fn(&Shape, usize, usize, usize, usize) -> usize,
    dst: fn(&Shape, usize, usize, usize, usize) -> usize,
) -> Vec<T> {
    check_len("x", x.len(), shape.len());
    let mut out = x.to_vec();
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            for n in 0..shape.seq {
                let s = src(shape, b, h, n, 0);
                let t = dst(shape, b, h, n, 0);
                out[t..t + shape.head_dim].copy_from_slice(&x[s..s + shape.head_dim]);
            }
        }
    }
    out
}

/// Reorders a [B, N, H, D] tensor (flash-attn, candle) into [B, H, N, D].
pub fn bnhd_to_bhnd<T: Copy>(shape: Shape, x: &[T]) -> Vec<T> {
    permute(&shape, x, bnhd_index, bhnd_index)
}

/// Reorders a [B, H, N, D] tensor into [B, N, H, D] (flash-attn, candle).
pub fn bhnd_to_bnhd<T: Copy>(shape: Shape, x: &[T]) -> Vec<T> {
    permute(&shape, x, bhnd_index, bnhd_index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const MASKS: [Mask; 2] = [Mask::Strict, Mask::AttendCurrent];
    const REMAINDERS: [Remainder; 2] = [Remainder::Return, Remainder::Fuse];

    fn opts(mask: Mask, remainder: Remainder) -> Options {
        Options { mask, remainder, ..Options::causal() }
    }

    /// Standard normal samples (Box-Muller; `rand` without `rand_distr`).
    fn normal(rng: &mut StdRng, len: usize) -> Vec<f64> {
        (0..len)
            .map(|_| {
                let u: f64 = 1.0 - rng.gen::<f64>();
                let w: f64 = rng.gen();
                (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * w).cos()
            })
            .collect()
    }

    pub(super) fn inputs(seed: u64, shape: Shape) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut rng = StdRng::seed_from_u64(seed);
        (normal(&mut rng, shape.len()), normal(&mut rng, shape.len()), normal(&mut rng, shape.len()))
    }

    /// q, k with every score z_ij = s q_i . k_j close to `score` (small noise), v ~ N(0, 1).
    fn scored_inputs(seed: u64, shape: Shape, score: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = shape.head_dim;
        let s = 1.0 / (d as f64).sqrt();
        let a = (score.abs() / s).sqrt();
        let mut q = normal(&mut rng, shape.len());
        let mut k = normal(&mut rng, shape.len());
        for (qr, kr) in q.chunks_mut(d).zip(k.chunks_mut(d)) {
            for x in qr.iter_mut().chain(kr.iter_mut()) {
                *x *= 0.1;
            }
            qr[0] += a;
            kr[0] += a * score.signum();
        }
        let v = normal(&mut rng, shape.len());
        (q, k, v)
    }

    pub(super) fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// The definition straight from docs/math.md#definitions, in plain (non-log) arithmetic:
    /// A_ij = beta_ij prod_{allowed k, j < k} (1 - beta_ik), rem_i = prod_{allowed k} (1 - beta_ik).
    fn naive_forward(
        shape: Shape,
        opts: &Options,
        q: &[f64],
        k: &[f64],
        v: &[f64],
    ) -> (Vec<f64>, Vec<f64>, Vec<Vec<f64>>) {
        let (n, d) = (shape.seq, shape.head_dim);
        let s = opts.scale_for(d);
        let mut o = vec![0.0; shape.len()];
        let mut rem = vec![0.0; shape.rows()];
        let mut weights = Vec::new();
        for bh in 0..shape.batch * shape.heads {
            let at = |x: &[f64], r: usize| x[(bh * n + r) * d..(bh * n + r + 1) * d].to_vec();
            let beta = |i: usize, j: usize| {
                let z = s * dot(&at(q, i), &at(k, j));
                1.0 / (1.0 + (-z).exp())
            };
            for i in 0..n {
                let mut row = vec![0.0; n];
                for (j, a) in row.iter_mut().enumerate() {
                    if !opts.allowed(i, j) {
                        continue;
                    }
                    *a = beta(i, j);
                    for kk in j + 1..n {
                        if opts.allowed(i, kk) {
                            *a *= 1.0 - beta(i, kk);
                        }
                    }
                    for (t, vj) in at(v, j).iter().enumerate() {
                        o[(bh * n + i) * d + t] += *a * vj;
                    }
                }
                let r = (0..n).filter(|&j| opts.allowed(i, j)).map(|j| 1.0 - beta(i, j)).product::<f64>();
                if opts.remainder == Remainder::Fuse {
                    for (t, vi) in at(v, i).iter().enumerate() {
                        o[(bh * n + i) * d + t] += r * vi;
                    }
                }
                rem[bh * n + i] = r;
                weights.push(row);
            }
        }
        (o, rem, weights)
    }

    #[test]
    fn forward_matches_the_product_definition() {
        let shape = Shape::new(2, 2, 9, 4);
        for (case, (mask, remainder)) in MASKS.iter().flat_map(|&m| REMAINDERS.map(|r| (m, r))).enumerate() {
            let opts = opts(mask, remainder);
            let (q, k, v) = inputs(10 + case as u64, shape);
            let got = forward(shape, &opts, &q, &k, &v);
            let (o, rem, weights) = naive_forward(shape, &opts, &q, &k, &v);
            let err_o = max_abs_diff(&got.o, &o);
            let err_rem = max_abs_diff(&got.rem, &rem);
            assert!(err_o < 1e-13, "{mask:?} {remainder:?}: max |o - naive| = {err_o:e}");
            assert!(err_rem < 1e-14, "{mask:?} {remainder:?}: max |rem - naive| = {err_rem:e}");
            for (r, row) in weights.iter().enumerate() {
                let sum: f64 = row.iter().sum();
                assert!((got.rem[r] - (1.0 - sum)).abs() < 1e-14, "rem != 1 - sum_j A_ij at row {r}");
                assert!((got.log2_rem[r].exp2() - got.rem[r]).abs() == 0.0);
            }
            // The data must exercise the weights: some rows far from uniform, some stick spent.
            assert!(rem.iter().any(|&r| r < 0.2) && rem.iter().any(|&r| r > 0.5));
        }
    }

    #[test]
    fn forward_matches_the_product_definition_on_sharp_and_long_reach_scores() {
        let shape = Shape::new(1, 1, 24, 4);
        for score in [-8.0, 8.0] {
            for mask in MASKS {
                let opts = opts(mask, Remainder::Fuse);
                let (q, k, v) = scored_inputs(3, shape, score);
                let got = forward(shape, &opts, &q, &k, &v);
                let (o, rem, _) = naive_forward(shape, &opts, &q, &k, &v);
                let err_o = max_abs_diff(&got.o, &o);
                let err_rem = max_abs_diff(&got.rem, &rem);
                assert!(err_o < 1e-13 && err_rem < 1e-14, "score {score}: {err_o:e} {err_rem:e}");
            }
        }
    }

    /// L = sum(d_o * o) + sum(d_rem * rem).
    fn loss(shape: Shape, opts: &Options, q: &[f64], k: &[f64], v: &[f64], d_o: &[f64], d_rem: Option<&[f64]>) -> f64 {
        let f = forward(shape, opts, q, k, v);
        dot(&f.o, d_o) + d_rem.map_or(0.0, |dr| dot(&f.rem, dr))
    }

    /// Central finite differences of `loss` with respect to every element of q, k and v.
    fn finite_differences(
        shape: Shape,
        opts: &Options,
        qkv: [&[f64]; 3],
        d_o: &[f64],
        d_rem: Option<&[f64]>,
    ) -> [Vec<f64>; 3] {
        let h = 1e-6;
        let mut out: [Vec<f64>; 3] = Default::default();
        for which in 0..3 {
            let mut args: [Vec<f64>; 3] = qkv.map(|x| x.to_vec());
            let mut grads = vec![0.0; args[which].len()];
            for (e, g) in grads.iter_mut().enumerate() {
                let x0 = args[which][e];
                args[which][e] = x0 + h;
                let lp = loss(shape, opts, &args[0], &args[1], &args[2], d_o, d_rem);
                args[which][e] = x0 - h;
                let lm = loss(shape, opts, &args[0], &args[1], &args[2], d_o, d_rem);
                args[which][e] = x0;
                *g = (lp - lm) / (2.0 * h);
            }
            out[which] = grads;
        }
        out
    }

    fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
        let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        (num / den).sqrt()
    }

    fn check_backward_against_finite_differences(opts: &Options, seed: u64, with_d_rem: bool) {
        check_backward_against_finite_differences_at(Shape::new(1, 2, 7, 4), opts, seed, with_d_rem);
    }

    fn check_backward_against_finite_differences_at(shape: Shape, opts: &Options, seed: u64, with_d_rem: bool) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (q, k, v) =
            (normal(&mut rng, shape.len()), normal(&mut rng, shape.kv_len()), normal(&mut rng, shape.kv_len()));
        let mut rng = StdRng::seed_from_u64(seed + 1000);
        let d_o = normal(&mut rng, shape.len());
        let d_rem_vec = normal(&mut rng, shape.rows());
        let d_rem = with_d_rem.then_some(&d_rem_vec[..]);
        let got = backward(shape, opts, &q, &k, &v, &d_o, d_rem);
        let fd = finite_differences(shape, opts, [&q, &k, &v], &d_o, d_rem);
        for (name, g, want) in [("dq", &got.dq, &fd[0]), ("dk", &got.dk, &fd[1]), ("dv", &got.dv, &fd[2])] {
            let err = rel_l2(g, want);
            assert!(err < 1e-6, "{opts:?} d_rem {with_d_rem}: {name} relative error {err:e}");
        }
    }

    /// k or v [B, H_kv, N, D] with each K/V head repeated for the query heads of its group.
    fn repeat_kv(shape: Shape, x: &[f64]) -> Vec<f64> {
        let head = shape.seq * shape.head_dim;
        (0..shape.batch * shape.heads)
            .flat_map(|bh| {
                let kv = (bh / shape.heads) * shape.kv_heads + (bh % shape.heads) / shape.group();
                x[kv * head..(kv + 1) * head].to_vec()
            })
            .collect()
    }

    /// The sum over each group's query heads of a [B, H, N, D] gradient: [B, H_kv, N, D].
    fn sum_groups(shape: Shape, x: &[f64]) -> Vec<f64> {
        let head = shape.seq * shape.head_dim;
        let mut out = vec![0.0; shape.kv_len()];
        for bh in 0..shape.batch * shape.heads {
            let kv = (bh / shape.heads) * shape.kv_heads + (bh % shape.heads) / shape.group();
            for (o, y) in out[kv * head..(kv + 1) * head].iter_mut().zip(&x[bh * head..(bh + 1) * head]) {
                *o += y;
            }
        }
        out
    }

    #[test]
    fn grouped_query_attention_is_multi_head_attention_on_repeated_kv() {
        let mut seed = 900;
        for (heads, kv_heads) in [(4, 2), (4, 1), (6, 3), (3, 3)] {
            let shape = Shape::new(2, heads, 6, 5).with_kv_heads(kv_heads);
            let mha = Shape::new(2, heads, 6, 5);
            for mask in MASKS {
                for remainder in REMAINDERS {
                    seed += 1;
                    let opts = opts(mask, remainder);
                    let mut rng = StdRng::seed_from_u64(seed);
                    let q = normal(&mut rng, shape.len());
                    let (k, v) = (normal(&mut rng, shape.kv_len()), normal(&mut rng, shape.kv_len()));
                    let (d_o, d_rem) = (normal(&mut rng, shape.len()), normal(&mut rng, shape.rows()));
                    let (kr, vr) = (repeat_kv(shape, &k), repeat_kv(shape, &v));
                    let got = forward(shape, &opts, &q, &k, &v);
                    let want = forward(mha, &opts, &q, &kr, &vr);
                    assert_eq!(got, want, "{heads}:{kv_heads} {opts:?}");
                    let g = backward(shape, &opts, &q, &k, &v, &d_o, Some(&d_rem));
                    let w = backward(mha, &opts, &q, &kr, &vr, &d_o, Some(&d_rem));
                    assert_eq!(g.dq, w.dq);
                    assert!(max_abs_diff(&g.dk, &sum_groups(shape, &w.dk)) < 1e-12, "{heads}:{kv_heads} dk");
                    assert!(max_abs_diff(&g.dv, &sum_groups(shape, &w.dv)) < 1e-12, "{heads}:{kv_heads} dv");
                }
            }
        }
    }

    #[test]
    fn grouped_backward_matches_finite_differences() {
        let shape = Shape::new(1, 4, 5, 3).with_kv_heads(2);
        check_backward_against_finite_differences_at(shape, &opts(Mask::Strict, Remainder::Fuse), 77, true);
        check_backward_against_finite_differences_at(shape.with_kv_heads(1), &Options::causal(), 78, false);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut seed = 100;
        for mask in MASKS {
            for remainder in REMAINDERS {
                for with_d_rem in [false, true] {
                    seed += 1;
                    check_backward_against_finite_differences(&opts(mask, remainder), seed, with_d_rem);
                }
            }
        }
    }

    #[test]
    fn backward_with_early_exit_matches_finite_differences_of_the_truncated_function() {
        // T = 2 truncates most rows of N(0, 1) data within a few keys. The truncation point is a
        // step function of the inputs; the seed is checked to keep every row's stopping acc away
        // from the threshold, so the finite differences see one smooth piece.
        let shape = Shape::new(1, 2, 7, 4);
        for (mask, remainder, seed) in [(Mask::Strict, Remainder::Return, 7), (Mask::AttendCurrent, Remainder::Fuse, 8)]
        {
            let opts = Options { early_exit_bits: Some(2), ..opts(mask, remainder) };
            let (q, k, v) = inputs(seed, shape);
            let exact = forward(shape, &Options { early_exit_bits: None, ..opts }, &q, &k, &v);
            let truncated = forward(shape, &opts, &q, &k, &v);
            assert!(truncated.log2_rem.iter().zip(&exact.log2_rem).filter(|(a, b)| a != b).count() >= 3);
            let margin = min_distance_of_running_acc_to(shape, &opts, &q, &k, -2.0);
            assert!(margin > 1e-3, "seed {seed}: a row's running acc is {margin:e} from the threshold");
            check_backward_against_finite_differences(&opts, seed, true);
        }
    }

    /// The smallest |acc - threshold| over every row's running acc (after each allowed key).
    fn min_distance_of_running_acc_to(shape: Shape, opts: &Options, q: &[f64], k: &[f64], threshold: f64) -> f64 {
        let (n, d) = (shape.seq, shape.head_dim);
        let scale_log2 = opts.scale_for(d) * std::f64::consts::LOG2_E;
        let mut min = f64::INFINITY;
        for bh in 0..shape.batch * shape.heads {
            let row = |x: &[f64], r: usize| x[(bh * n + r) * d..(bh * n + r + 1) * d].to_vec();
            for i in 0..n {
                let mut acc = 0.0;
                for j in (0..n).rev().filter(|&j| opts.allowed(i, j)) {
                    acc -= softplus2(scale_log2 * dot(&row(q, i), &row(k, j)));
                    min = min.min((acc - threshold).abs());
                }
            }
        }
        min
    }

    #[test]
    fn early_exit_stays_within_the_bound() {
        let shape = Shape::new(1, 2, 64, 8);
        for t in [4, 8, 12] {
            for mask in MASKS {
                for remainder in REMAINDERS {
                    let exact_opts = opts(mask, remainder);
                    let ee_opts = Options { early_exit_bits: Some(t), ..exact_opts };
                    let (q, k, v) = inputs(t as u64, shape);
                    let exact = forward(shape, &exact_opts, &q, &k, &v);
                    let ee = forward(shape, &ee_opts, &q, &k, &v);
                    let bound = (-(t as f64)).exp2();
                    let vmax = v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    let o_bound = match remainder {
                        Remainder::Return => bound * vmax,
                        Remainder::Fuse => 2.0 * bound * vmax,
                    };
                    let err_o = max_abs_diff(&ee.o, &exact.o);
                    let err_rem = max_abs_diff(&ee.rem, &exact.rem);
                    assert!(err_o <= o_bound, "T = {t}: max |Δo| = {err_o:e} > {o_bound:e}");
                    assert!(err_rem <= bound, "T = {t}: max |Δrem| = {err_rem:e} > {bound:e}");
                    // Rows that stopped early: rem is the value reached, below 2^-T.
                    let stopped =
                        (0..shape.rows()).filter(|&r| ee.log2_rem[r] != exact.log2_rem[r]).collect::<Vec<_>>();
                    assert!(stopped.len() > shape.rows() / 2, "T = {t}: only {} rows stopped early", stopped.len());
                    for r in stopped {
                        assert!(ee.log2_rem[r] < -(t as f64) && ee.log2_rem[r] > exact.log2_rem[r]);
                    }
                    // The gradients of the truncated function stay close to the exact ones too.
                    let d_o = normal(&mut StdRng::seed_from_u64(5), shape.len());
                    let g_exact = backward(shape, &exact_opts, &q, &k, &v, &d_o, None);
                    let g_ee = backward(shape, &ee_opts, &q, &k, &v, &d_o, None);
                    assert!(rel_l2(&g_ee.dv, &g_exact.dv) < 16.0 * bound);
                }
            }
        }
    }

    #[test]
    fn early_exit_changes_nothing_while_the_stick_lasts() {
        // Scores near -8: beta ~ 3e-4, each key spends ~5e-4 bits, so 64 keys never reach 2^-24.
        let shape = Shape::new(1, 2, 64, 8);
        let (q, k, v) = scored_inputs(21, shape, -8.0);
        for mask in MASKS {
            for remainder in REMAINDERS {
                let exact_opts = opts(mask, remainder);
                let ee_opts = Options { early_exit_bits: Some(24), ..exact_opts };
                let exact = forward(shape, &exact_opts, &q, &k, &v);
                assert!(exact.rem.iter().all(|&r| r > 0.9), "the data is not long-reach");
                assert_eq!(forward(shape, &ee_opts, &q, &k, &v), exact);
                let d_o = normal(&mut StdRng::seed_from_u64(6), shape.len());
                let d_rem = normal(&mut StdRng::seed_from_u64(7), shape.rows());
                assert_eq!(
                    backward(shape, &ee_opts, &q, &k, &v, &d_o, Some(&d_rem)),
                    backward(shape, &exact_opts, &q, &k, &v, &d_o, Some(&d_rem))
                );
            }
        }
    }

    #[test]
    fn single_token_and_rows_without_keys() {
        let shape = Shape::new(1, 1, 1, 4);
        let (q, k, v) = inputs(1, shape);
        for remainder in REMAINDERS {
            // Strict: row 0 has no key; o = 0 (plus the whole stick times v_0 when fused), rem = 1.
            let f = forward(shape, &opts(Mask::Strict, remainder), &q, &k, &v);
            let want_o = match remainder {
                Remainder::Return => vec![0.0; 4],
                Remainder::Fuse => v.clone(),
            };
            assert_eq!(f, Forward { o: want_o, rem: vec![1.0], log2_rem: vec![0.0] });
            let d_o = [1.0, -2.0, 0.5, 3.0];
            let g = backward(shape, &opts(Mask::Strict, remainder), &q, &k, &v, &d_o, Some(&[4.0]));
            assert_eq!(g.dq, vec![0.0; 4]);
            assert_eq!(g.dk, vec![0.0; 4]);
            let want_dv = match remainder {
                Remainder::Return => vec![0.0; 4],
                Remainder::Fuse => d_o.to_vec(),
            };
            assert_eq!(g.dv, want_dv);
        }
        // Attend-current: row 0 attends to itself only: o = beta v_0, rem = 1 - beta.
        let f = forward(shape, &opts(Mask::AttendCurrent, Remainder::Return), &q, &k, &v);
        let beta = 1.0 / (1.0 + (-0.5 * dot(&q, &k)).exp());
        assert!((f.rem[0] - (1.0 - beta)).abs() < 1e-15);
        assert!(max_abs_diff(&f.o, &v.iter().map(|x| beta * x).collect::<Vec<_>>()) < 1e-15);
        // Row 0 of a longer sequence under Strict: o = 0, rem = 1.
        let shape = Shape::new(2, 3, 5, 4);
        let (q, k, v) = inputs(2, shape);
        let f = forward(shape, &Options::causal(), &q, &k, &v);
        for bh in 0..6 {
            assert_eq!(f.rem[bh * 5], 1.0);
            assert_eq!(f.log2_rem[bh * 5], 0.0);
            assert!(f.o[bh * 20..bh * 20 + 4].iter().all(|&x| x == 0.0));
            assert!(f.rem[bh * 5 + 1] < 1.0);
        }
    }

    #[test]
    fn softplus2_is_log2_of_one_plus_exp2() {
        for (x, tol) in [(-20.0, 1e-9), (-3.5, 1e-14), (0.0, 1e-15), (1.0, 1e-15), (14.9, 1e-15)] {
            let want = (1.0 + f64::exp2(x)).log2();
            assert!((softplus2(x) - want).abs() <= tol * want, "x = {x}");
        }
        assert_eq!(softplus2(15.5), 15.5);
        assert!((softplus2(-60.0) - f64::exp2(-60.0) * std::f64::consts::LOG2_E).abs() < 1e-30);
    }

    #[test]
    fn layout_conversions_are_inverse_and_move_heads() {
        let shape = Shape::new(2, 3, 4, 5);
        let x: Vec<usize> = (0..shape.len()).collect();
        let bnhd = bhnd_to_bnhd(shape, &x);
        assert_eq!(bnhd_to_bhnd(shape, &bnhd), x);
        // Element (b=1, h=0, n=2, d=3) sits at ((1*3 + 0)*4 + 2)*5 + 3 in BHND and at
        // ((1*4 + 2)*3 + 0)*5 + 3 in BNHD.
        assert_eq!(bnhd[93], 73);
        assert_eq!(bnhd[0..5], x[0..5]);
        assert_ne!(bnhd, x);
    }

    #[test]
    fn options_follow_the_spec() {
        let mut spec = Spec::new(64, crate::spec::Dtype::Bf16, crate::spec::Pass::Forward);
        spec.mask = Mask::AttendCurrent;
        spec.remainder = Remainder::Fuse;
        spec.early_exit_bits = Some(24);
        let o = Options::from(&spec);
        assert_eq!(
            (o.mask, o.remainder, o.early_exit_bits, o.scale),
            (Mask::AttendCurrent, Remainder::Fuse, Some(24), None)
        );
        assert_eq!(o.scale_for(64), 0.125);
        assert_eq!(Options::default(), Options::causal());
    }
}
