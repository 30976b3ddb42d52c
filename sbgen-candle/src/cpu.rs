//! The float32 CPU path: the forward and backward of stick-breaking attention over packed tokens,
//! one task per (sequence, K/V head) on rayon's pool (docs/math.md of the repository has the
//! derivation; `sbgen_runtime::reference` is the float64 version the tests compare against).
//!
//! Layout: q and o `[T, H, D]`, k and v `[T, H_kv, D]`, rem `[T, H]`, T tokens packed sequence after
//! sequence (a dense `[B, N, H, D]` batch is B sequences of N). Query head h reads K/V head
//! `h / (H / H_kv)`. Row i of a sequence walks its allowed keys nearest first with a stick of 1:
//! key j takes `A_ij = beta_ij * prod_{j < l < i} (1 - beta_il)`, `beta = sigmoid(s q_i . k_j)`,
//! and `rem_i` is what is left.

use crate::options::{Remainder, SbOptions};
use rayon::prelude::*;

/// Heads, head_dim and the sequences of a packed batch (`(first token, length)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub sequences: Vec<(usize, usize)>,
}

impl Geometry {
    pub fn tokens(&self) -> usize {
        self.sequences.last().map_or(0, |&(start, len)| start + len)
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The independent pieces of work, (sequence, K/V head): each owns its query heads' rows and its
    /// K/V rows.
    fn tasks(&self) -> Vec<(usize, usize)> {
        let kv_heads = self.kv_heads;
        (0..self.sequences.len()).flat_map(|s| (0..kv_heads).map(move |hk| (s, hk))).collect()
    }
}

/// The walk's constants.
#[derive(Clone, Copy, Debug)]
struct Walk {
    scale_log2: f32,
    attend_current: bool,
    fuse: bool,
    /// log2 of the stick below which a row stops.
    threshold: f32,
}

impl Walk {
    fn new(opts: &SbOptions, head_dim: usize) -> Walk {
        Walk {
            scale_log2: (opts.scale_for(head_dim) * std::f64::consts::LOG2_E) as f32,
            attend_current: opts.attend_current,
            fuse: opts.remainder == Remainder::Fuse,
            threshold: opts.early_exit_bits.map_or(f32::NEG_INFINITY, |t| -(t as f32)),
        }
    }

    /// Keys row i (of its sequence) may attend to: `0..allowed`.
    fn allowed(&self, i: usize) -> usize {
        if self.attend_current {
            i + 1
        } else {
            i
        }
    }
}

/// log2(1 + 2^x) without overflow.
fn softplus2(x: f32) -> f32 {
    if x > 0.0 {
        x + (-x).exp2().ln_1p() * std::f32::consts::LOG2_E
    } else {
        x.exp2().ln_1p() * std::f32::consts::LOG2_E
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The rows of one head of one sequence in a packed `[T, heads, D]` tensor.
#[derive(Clone, Copy)]
struct HeadRows<'a> {
    x: &'a [f32],
    start: usize,
    heads: usize,
    head: usize,
    d: usize,
}

impl<'a> HeadRows<'a> {
    fn row(&self, i: usize) -> &'a [f32] {
        &self.x[((self.start + i) * self.heads + self.head) * self.d..][..self.d]
    }
}

/// One row's walk over `keys`: for the keys it kept, nearest first, `(j, A_ij, beta_ij)`; returns
/// log2 rem.
fn walk_row(w: &Walk, qi: &[f32], keys: HeadRows<'_>, i: usize, kept: &mut Vec<(usize, f32, f32)>) -> f32 {
    kept.clear();
    let mut acc = 0.0f32;
    for j in (0..w.allowed(i)).rev() {
        if acc < w.threshold {
            break;
        }
        let x = w.scale_log2 * dot(qi, keys.row(j));
        let sp = softplus2(x);
        kept.push((j, (x - sp + acc).exp2(), (x - sp).exp2()));
        acc -= sp;
    }
    acc
}

/// `o` `[T, H, D]` and `rem` `[T, H]`.
pub fn forward(g: &Geometry, opts: &SbOptions, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (h_q, h_kv, d) = (g.heads, g.kv_heads, g.head_dim);
    let w = Walk::new(opts, d);
    let parts: Vec<(usize, usize, Vec<f32>, Vec<f32>)> = g
        .tasks()
        .par_iter()
        .map(|&(s, hk)| {
            let (start, len) = g.sequences[s];
            let group = g.group();
            let mut o = vec![0.0f32; len * group * d];
            let mut rem = vec![1.0f32; len * group];
            let mut kept = Vec::new();
            let keys = HeadRows { x: k, start, heads: h_kv, head: hk, d };
            let values = HeadRows { x: v, ..keys };
            for hh in 0..group {
                let queries = HeadRows { x: q, start, heads: h_q, head: hk * group + hh, d };
                for i in 0..len {
                    let log2_rem = walk_row(&w, queries.row(i), keys, i, &mut kept);
                    let oi = &mut o[(i * group + hh) * d..][..d];
                    for &(j, a, _) in &kept {
                        oi.iter_mut().zip(values.row(j)).for_each(|(x, y)| *x += a * y);
                    }
                    let r = log2_rem.exp2();
                    if w.fuse {
                        oi.iter_mut().zip(values.row(i)).for_each(|(x, y)| *x += r * y);
                    }
                    rem[i * group + hh] = r;
                }
            }
            (s, hk, o, rem)
        })
        .collect();
    let mut o = vec![0.0f32; g.tokens() * h_q * d];
    let mut rem = vec![1.0f32; g.tokens() * h_q];
    for (s, hk, po, prem) in parts {
        let (start, len) = g.sequences[s];
        let group = g.group();
        for i in 0..len {
            for hh in 0..group {
                let row = (start + i) * h_q + hk * group + hh;
                o[row * d..][..d].copy_from_slice(&po[(i * group + hh) * d..][..d]);
                rem[row] = prem[i * group + hh];
            }
        }
    }
    (o, rem)
}

/// Gradients of `L = sum(d_o * o) + sum(d_rem * rem)`: `(dq, dk, dv)` in the layouts of q, k, v.
/// Per row, over the keys the forward kept: `g_j = A_j (dO . v_j)`, `C_j = sum of g over j and the
/// keys farther than j`, `dz_j = g_j - beta_j (C_j + dRem rem)`; `dq = s dz K`, `dk += s dz q`,
/// `dv += A dO` (with a fused remainder `dRem + dO . v_i` replaces dRem and `rem dO` joins dv_i).
pub fn backward(
    g: &Geometry,
    opts: &SbOptions,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    d_rem: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (h_q, h_kv, d) = (g.heads, g.kv_heads, g.head_dim);
    let w = Walk::new(opts, d);
    let scale = opts.scale_for(d) as f32;
    type Part = (usize, usize, Vec<f32>, Vec<f32>, Vec<f32>);
    let parts: Vec<Part> = g
        .tasks()
        .par_iter()
        .map(|&(s, hk)| {
            let (start, len) = g.sequences[s];
            let group = g.group();
            let mut dq = vec![0.0f32; len * group * d];
            let mut dk = vec![0.0f32; len * d];
            let mut dv = vec![0.0f32; len * d];
            let mut kept = Vec::new();
            let mut grads = Vec::new();
            let keys = HeadRows { x: k, start, heads: h_kv, head: hk, d };
            let values = HeadRows { x: v, ..keys };
            for hh in 0..group {
                let queries = HeadRows { x: q, start, heads: h_q, head: hk * group + hh, d };
                let d_out = HeadRows { x: d_o, ..queries };
                for i in 0..len {
                    let (qi, doi) = (queries.row(i), d_out.row(i));
                    let rem = walk_row(&w, qi, keys, i, &mut kept).exp2();
                    let mut d_rem_i = d_rem[(start + i) * h_q + queries.head];
                    if w.fuse {
                        d_rem_i += dot(doi, values.row(i));
                        dv[i * d..][..d].iter_mut().zip(doi).for_each(|(x, y)| *x += rem * y);
                    }
                    // g_j, then C_j as a running sum from the farthest kept key.
                    grads.clear();
                    grads.extend(kept.iter().map(|&(j, a, _)| a * dot(doi, values.row(j))));
                    let mut farther = 0.0f32;
                    let dqi = &mut dq[(i * group + hh) * d..][..d];
                    for (&(j, a, beta), &gj) in kept.iter().zip(&grads).rev() {
                        farther += gj;
                        let dz = scale * (gj - beta * (farther + d_rem_i * rem));
                        dqi.iter_mut().zip(keys.row(j)).for_each(|(x, y)| *x += dz * y);
                        dk[j * d..][..d].iter_mut().zip(qi).for_each(|(x, y)| *x += dz * y);
                        dv[j * d..][..d].iter_mut().zip(doi).for_each(|(x, y)| *x += a * y);
                    }
                }
            }
            (s, hk, dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0.0f32; g.tokens() * h_q * d];
    let mut dk = vec![0.0f32; g.tokens() * h_kv * d];
    let mut dv = vec![0.0f32; g.tokens() * h_kv * d];
    for (s, hk, pq, pk, pv) in parts {
        let (start, len) = g.sequences[s];
        let group = g.group();
        for i in 0..len {
            for hh in 0..group {
                let row = (start + i) * h_q + hk * group + hh;
                dq[row * d..][..d].copy_from_slice(&pq[(i * group + hh) * d..][..d]);
            }
            let kv_row = (start + i) * h_kv + hk;
            dk[kv_row * d..][..d].copy_from_slice(&pk[i * d..][..d]);
            dv[kv_row * d..][..d].copy_from_slice(&pv[i * d..][..d]);
        }
    }
    (dq, dk, dv)
}

/// Where a decode finds its keys and values: `kv_heads` heads of `head_dim` per token row, and the
/// row of token t of sequence b (`token_row(b, t)`, from the cache's geometry).
pub struct DecodeCache<'a, F: Fn(usize, usize) -> usize + Sync> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub kv_heads: usize,
    pub lens: &'a [usize],
    pub token_row: F,
}

/// One new token per sequence: q `[B, H, D]` is token `lens[b] - 1` of sequence b (already in the
/// cache). Returns o `[B, H, D]` and rem `[B, H]`. A sequence of no tokens gets o = 0, rem = 1.
pub fn decode<F: Fn(usize, usize) -> usize + Sync>(
    opts: &SbOptions,
    heads: usize,
    head_dim: usize,
    q: &[f32],
    cache: &DecodeCache<'_, F>,
) -> (Vec<f32>, Vec<f32>) {
    let d = head_dim;
    let w = Walk::new(opts, d);
    let group = heads / cache.kv_heads;
    let rows: Vec<(Vec<f32>, f32)> = (0..cache.lens.len() * heads)
        .into_par_iter()
        .map(|row| {
            let (b, h) = (row / heads, row % heads);
            let hk = h / group;
            let mut o = vec![0.0f32; d];
            let len = cache.lens[b];
            if len == 0 {
                return (o, 1.0);
            }
            let at = |x, t| head_row(x, (cache.token_row)(b, t) * cache.kv_heads + hk, d);
            let qi = &q[row * d..][..d];
            let i = len - 1;
            let mut acc = 0.0f32;
            for j in (0..w.allowed(i)).rev() {
                if acc < w.threshold {
                    break;
                }
                let x = w.scale_log2 * dot(qi, at(cache.k, j));
                let sp = softplus2(x);
                let a = (x - sp + acc).exp2();
                o.iter_mut().zip(at(cache.v, j)).for_each(|(x, y)| *x += a * y);
                acc -= sp;
            }
            let r = acc.exp2();
            if w.fuse {
                o.iter_mut().zip(at(cache.v, i)).for_each(|(x, y)| *x += r * y);
            }
            (o, r)
        })
        .collect();
    let mut o = Vec::with_capacity(rows.len() * d);
    let mut rem = Vec::with_capacity(rows.len());
    for (oi, r) in rows {
        o.extend_from_slice(&oi);
        rem.push(r);
    }
    (o, rem)
}

/// Row `r` of `d` elements.
fn head_row(x: &[f32], r: usize, d: usize) -> &[f32] {
    &x[r * d..][..d]
}
