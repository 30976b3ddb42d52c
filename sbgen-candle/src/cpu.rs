//! The float32 CPU path: the forward and backward of stick-breaking attention over packed tokens
//! (docs/math.md of the repository has the derivation; `sbgen_runtime::reference` is the float64
//! version the tests compare against).
//!
//! Layout: q and o `[T, H, D]`, k and v `[T, H_kv, D]`, rem `[T, H]`, T tokens packed sequence after
//! sequence (a dense `[B, N, H, D]` batch is B sequences of N). Query head h reads K/V head
//! `h / (H / H_kv)`. Row i of a sequence walks its allowed keys nearest first with a stick of 1:
//! key j takes `A_ij = beta_ij * prod_{j < l < i} (1 - beta_il)`, `beta = sigmoid(s q_i . k_j)`,
//! and `rem_i` is what is left.
//!
//! Blocked as the GPU kernels are: a task is a block of `QUERY_BLOCK` query rows of one sequence,
//! for every query head that reads one K/V head, so that a long sequence is spread over rayon's
//! threads. It walks the keys a block of `KEY_BLOCK` at a time, nearest block first, and every row of
//! the task takes its keys from the block while its K and V rows are in cache. A row's own walk is
//! exactly the per-row walk above (the same order, the same early-exit test before each key).

use crate::options::{Remainder, SbOptions};
use rayon::prelude::*;
use std::ops::Range;

/// Query rows per task: small enough to spread one sequence over the threads, large enough that a
/// key block is reused across many rows.
const QUERY_BLOCK: usize = 32;

/// Keys per block: with D = 128, a block's K and V rows are 64 KiB, about an L2's share per core.
const KEY_BLOCK: usize = 64;

/// Heads, head_dim and the sequences of a packed batch (`(first token, length)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub sequences: Vec<(usize, usize)>,
}

/// One task: query rows `rows` (indices within sequence `seq`) of the query heads that read K/V
/// head `kv_head`.
#[derive(Clone, Debug)]
struct Tile {
    seq: usize,
    kv_head: usize,
    rows: Range<usize>,
}

impl Geometry {
    pub fn tokens(&self) -> usize {
        self.sequences.last().map_or(0, |&(start, len)| start + len)
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// The (sequence, K/V head) pairs: each owns its query heads' rows and its K/V rows.
    fn heads_of_sequences(&self) -> Vec<(usize, usize)> {
        let kv_heads = self.kv_heads;
        (0..self.sequences.len()).flat_map(|s| (0..kv_heads).map(move |hk| (s, hk))).collect()
    }

    /// The query blocks of sequence `seq`.
    fn row_blocks(&self, seq: usize) -> impl Iterator<Item = Range<usize>> {
        let len = self.sequences[seq].1;
        (0..len).step_by(QUERY_BLOCK).map(move |r| r..(r + QUERY_BLOCK).min(len))
    }

    fn tiles(&self) -> Vec<Tile> {
        self.heads_of_sequences()
            .into_iter()
            .flat_map(|(seq, kv_head)| self.row_blocks(seq).map(move |rows| Tile { seq, kv_head, rows }))
            .collect()
    }
}

/// The key blocks of keys `0..end`, nearest (highest) first.
fn key_blocks_nearest_first(end: usize) -> impl Iterator<Item = Range<usize>> {
    (0..end.div_ceil(KEY_BLOCK)).rev().map(move |b| b * KEY_BLOCK..((b + 1) * KEY_BLOCK).min(end))
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

/// log2(1 + 2^x) without overflow, as `max(x, 0) + log2(1 + e)` with `e = 2^-|x|`. libm's log2 is
/// a third of the cost of its `ln_1p`; where 1 + e would round e away (e < 1e-4) the series
/// `e (1 - e/2) / ln 2` takes its place.
fn softplus2(x: f32) -> f32 {
    let e = exp2_or_zero(-x.abs());
    let tail = if e < 1e-4 { e * (1.0 - 0.5 * e) * std::f32::consts::LOG2_E } else { (1.0 + e).log2() };
    x.max(0.0) + tail
}

/// `2^x`, flushed to zero below float32's normal range: libm's exp2 takes a slow path (errno)
/// for results that underflow, and a stick that small adds nothing a float32 sum can hold.
fn exp2_or_zero(x: f32) -> f32 {
    if x < -126.0 {
        0.0
    } else {
        x.exp2()
    }
}

/// A dot product in eight independent partial sums, which the compiler turns into SIMD lanes (one
/// running sum is a serial chain it may not reorder).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut lanes = [0.0f32; 8];
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `y += a x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
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

/// The rows of a tile, for one of its query heads and every row: `slot = head_in_group * rows + r`.
struct TileRows<'a> {
    tile: &'a Tile,
    group: usize,
    walk: Walk,
}

impl TileRows<'_> {
    fn slots(&self) -> usize {
        self.group * self.tile.rows.len()
    }

    /// `(slot, head in group, row in sequence)` of every row of the tile.
    fn each(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let n = self.tile.rows.len();
        (0..self.group).flat_map(move |hh| self.tile.rows.clone().enumerate().map(move |(r, i)| (hh * n + r, hh, i)))
    }

    /// Keys the tile's last row may reach: `0..end`.
    fn key_end(&self) -> usize {
        self.walk.allowed(self.tile.rows.end - 1)
    }
}

/// The near-first walk of every row of a tile over the tile's key blocks. `take(slot, i, j, x, sp,
/// acc)` sees each key row i keeps (`x` = log2-scaled score, `sp` = softplus2(x), `acc` = log2 of
/// the stick before key j); returns each slot's log2 rem.
fn walk_tile<'a>(
    t: &TileRows<'_>,
    queries: &dyn Fn(usize) -> HeadRows<'a>,
    keys: HeadRows<'a>,
    mut take: impl FnMut(usize, usize, usize, f32, f32, f32),
) -> Vec<f32> {
    let w = t.walk;
    let mut acc = vec![0.0f32; t.slots()];
    let mut live = vec![true; t.slots()];
    for block in key_blocks_nearest_first(t.key_end()) {
        let mut any_live = false;
        for (slot, hh, i) in t.each() {
            if !live[slot] {
                continue;
            }
            any_live = true;
            let qi = queries(hh).row(i);
            let mut a = acc[slot];
            for j in (block.start..block.end.min(w.allowed(i))).rev() {
                if a < w.threshold {
                    live[slot] = false;
                    break;
                }
                let x = w.scale_log2 * dot(qi, keys.row(j));
                let sp = softplus2(x);
                take(slot, i, j, x, sp, a);
                a -= sp;
            }
            acc[slot] = a;
        }
        if !any_live {
            break;
        }
    }
    acc
}

/// `o` `[T, H, D]` and `rem` `[T, H]`.
pub fn forward(g: &Geometry, opts: &SbOptions, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (h_q, h_kv, d) = (g.heads, g.kv_heads, g.head_dim);
    let walk = Walk::new(opts, d);
    let group = g.group();
    let tiles = g.tiles();
    let parts: Vec<(Vec<f32>, Vec<f32>)> = tiles
        .par_iter()
        .map(|tile| {
            let start = g.sequences[tile.seq].0;
            let keys = HeadRows { x: k, start, heads: h_kv, head: tile.kv_head, d };
            let values = HeadRows { x: v, ..keys };
            let queries = |hh: usize| HeadRows { x: q, start, heads: h_q, head: tile.kv_head * group + hh, d };
            let t = TileRows { tile, group, walk };
            let mut o = vec![0.0f32; t.slots() * d];
            let log2_rem = walk_tile(&t, &queries, keys, |slot, _, j, x, sp, acc| {
                let a = exp2_or_zero(x - sp + acc);
                if a > 0.0 {
                    axpy(&mut o[slot * d..][..d], a, values.row(j));
                }
            });
            let rem: Vec<f32> = log2_rem.iter().map(|l| l.exp2()).collect();
            if walk.fuse {
                for (slot, _, i) in t.each() {
                    axpy(&mut o[slot * d..][..d], rem[slot], values.row(i));
                }
            }
            (o, rem)
        })
        .collect();
    let mut o = vec![0.0f32; g.tokens() * h_q * d];
    let mut rem = vec![1.0f32; g.tokens() * h_q];
    for (tile, (po, prem)) in tiles.iter().zip(parts) {
        let start = g.sequences[tile.seq].0;
        for (slot, hh, i) in (TileRows { tile, group, walk }).each() {
            let row = (start + i) * h_q + tile.kv_head * group + hh;
            o[row * d..][..d].copy_from_slice(&po[slot * d..][..d]);
            rem[row] = prem[slot];
        }
    }
    (o, rem)
}

/// A key a row kept in the forward walk, with what the backward needs of it.
#[derive(Clone, Copy)]
struct Kept {
    j: usize,
    a: f32,
    beta: f32,
    /// `A_ij (dO_i . v_j)`.
    g: f32,
}

/// The backward's results for one (sequence, K/V head): dq per query block, dk and dv `[len, D]`.
struct HeadGrads {
    dq: Vec<(Range<usize>, Vec<f32>)>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl HeadGrads {
    fn merge(mut self, other: HeadGrads) -> HeadGrads {
        if self.dk.is_empty() {
            return HeadGrads { dq: [self.dq, other.dq].concat(), ..other };
        }
        if !other.dk.is_empty() {
            self.dk.iter_mut().zip(&other.dk).for_each(|(x, y)| *x += y);
            self.dv.iter_mut().zip(&other.dv).for_each(|(x, y)| *x += y);
        }
        self.dq.extend(other.dq);
        self
    }
}

/// Gradients of `L = sum(d_o * o) + sum(d_rem * rem)`: `(dq, dk, dv)` in the layouts of q, k, v.
/// Per row, over the keys the forward kept: `g_j = A_j (dO . v_j)`, `C_j = sum of g over j and the
/// keys farther than j`, `dz_j = g_j - beta_j (C_j + dRem rem)`; `dq = s dz K`, `dk += s dz q`,
/// `dv += A dO` (with a fused remainder `dRem + dO . v_i` replaces dRem and `rem dO` joins dv_i).
///
/// A query block's walk is redone near-first to find its kept keys; then the keys are taken far-first,
/// a key block at a time, which is the order `C_j` accumulates in. The query blocks of one
/// (sequence, K/V head) add into dk and dv; each rayon worker adds into its own pair, summed at the
/// end.
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
    let walk = Walk::new(opts, d);
    let scale = opts.scale_for(d) as f32;
    let group = g.group();
    let pairs = g.heads_of_sequences();
    let threads = rayon::current_num_threads();
    let parts: Vec<HeadGrads> = pairs
        .par_iter()
        .map(|&(seq, kv_head)| {
            let (start, len) = g.sequences[seq];
            let blocks: Vec<Range<usize>> = g.row_blocks(seq).collect();
            // Split a pair's blocks over workers only when the pairs alone cannot fill the threads:
            // each split costs a dk/dv pair of buffers.
            let min_len = (blocks.len() * pairs.len() / (2 * threads)).max(1);
            let keys = HeadRows { x: k, start, heads: h_kv, head: kv_head, d };
            let values = HeadRows { x: v, ..keys };
            let queries = |hh: usize| HeadRows { x: q, start, heads: h_q, head: kv_head * group + hh, d };
            let d_out = |hh: usize| HeadRows { x: d_o, ..queries(hh) };
            blocks
                .into_par_iter()
                .with_min_len(min_len)
                .fold(
                    || HeadGrads { dq: Vec::new(), dk: vec![0.0; len * d], dv: vec![0.0; len * d] },
                    |mut acc, rows| {
                        let tile = Tile { seq, kv_head, rows };
                        let t = TileRows { tile: &tile, group, walk };
                        let mut kept: Vec<Vec<Kept>> = vec![Vec::new(); t.slots()];
                        let hh_of = |slot: usize| slot / tile.rows.len();
                        let log2_rem = walk_tile(&t, &queries, keys, |slot, i, j, x, sp, a| {
                            let p = exp2_or_zero(x - sp + a);
                            let beta = exp2_or_zero(x - sp);
                            let g = if p > 0.0 { p * dot(d_out(hh_of(slot)).row(i), values.row(j)) } else { 0.0 };
                            kept[slot].push(Kept { j, a: p, beta, g });
                        });
                        // Per slot: the gradient of rem (with dO . v_i for a fused remainder), rem,
                        // and the running sum of g from the farthest key.
                        let mut d_rem_rem = vec![0.0f32; t.slots()];
                        let mut farther = vec![0.0f32; t.slots()];
                        let mut dq = vec![0.0f32; t.slots() * d];
                        for (slot, hh, i) in t.each() {
                            let rem = log2_rem[slot].exp2();
                            let doi = d_out(hh).row(i);
                            let mut dr = d_rem[(start + i) * h_q + kv_head * group + hh];
                            if walk.fuse {
                                dr += dot(doi, values.row(i));
                                axpy(&mut acc.dv[i * d..][..d], rem, doi);
                            }
                            d_rem_rem[slot] = dr * rem;
                        }
                        for block in (0..t.key_end().div_ceil(KEY_BLOCK)).map(|b| b * KEY_BLOCK) {
                            for (slot, hh, i) in t.each() {
                                let (qi, doi) = (queries(hh).row(i), d_out(hh).row(i));
                                // Kept keys are stored near-first; take this block's far-first.
                                while let Some(&Kept { j, a, beta, g }) = kept[slot].last() {
                                    if j >= block + KEY_BLOCK {
                                        break;
                                    }
                                    kept[slot].pop();
                                    farther[slot] += g;
                                    let dz = scale * (g - beta * (farther[slot] + d_rem_rem[slot]));
                                    axpy(&mut dq[slot * d..][..d], dz, keys.row(j));
                                    axpy(&mut acc.dk[j * d..][..d], dz, qi);
                                    if a > 0.0 {
                                        axpy(&mut acc.dv[j * d..][..d], a, doi);
                                    }
                                }
                            }
                        }
                        acc.dq.push((tile.rows, dq));
                        acc
                    },
                )
                .reduce(|| HeadGrads { dq: Vec::new(), dk: Vec::new(), dv: Vec::new() }, HeadGrads::merge)
        })
        .collect();
    let mut dq = vec![0.0f32; g.tokens() * h_q * d];
    let mut dk = vec![0.0f32; g.tokens() * h_kv * d];
    let mut dv = vec![0.0f32; g.tokens() * h_kv * d];
    for (&(seq, kv_head), part) in pairs.iter().zip(parts) {
        let (start, len) = g.sequences[seq];
        for (rows, block_dq) in part.dq {
            let tile = Tile { seq, kv_head, rows };
            for (slot, hh, i) in (TileRows { tile: &tile, group, walk }).each() {
                let row = (start + i) * h_q + kv_head * group + hh;
                dq[row * d..][..d].copy_from_slice(&block_dq[slot * d..][..d]);
            }
        }
        if part.dk.is_empty() {
            continue; // a sequence of no tokens
        }
        for i in 0..len {
            let kv_row = (start + i) * h_kv + kv_head;
            dk[kv_row * d..][..d].copy_from_slice(&part.dk[i * d..][..d]);
            dv[kv_row * d..][..d].copy_from_slice(&part.dv[i * d..][..d]);
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
                let a = exp2_or_zero(x - sp + acc);
                if a > 0.0 {
                    axpy(&mut o, a, at(cache.v, j));
                }
                acc -= sp;
            }
            let r = acc.exp2();
            if w.fuse {
                axpy(&mut o, r, at(cache.v, i));
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
