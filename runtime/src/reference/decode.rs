//! The float64 decode reference: one new query token per sequence against a KV cache, and the
//! merge of key chunks that split-K decoding (and context parallelism) rests on.
//!
//! Sequence b's cache holds `seqlens[b]` tokens, the new token's own key and value last (they are
//! appended before attending). Its query is therefore row `i = seqlens[b] - 1` of a forward over
//! those tokens, and decode gives exactly that row: with the strict mask it attends keys `0..i`,
//! with `attend_current` keys `0..=i`; a fused remainder adds `rem * v_i`, the new token's value.
//! An empty sequence (`seqlens[b] = 0`) has no keys: o = 0, rem = 1.
//!
//! **Chunks** (docs/math.md#merging-key-chunks): a run of keys walked on its own with a fresh stick
//! leaves a [`ChunkState`] `(o_c, L_c)`; chunks taken nearest first combine by
//! `(o, L) (+) (o_c, L_c) = (o + 2^L o_c, L + L_c)` ([`ChunkState::then`]). The tests check that
//! any cut of a row into chunks merges back to the row's walk, in any bracketing but only in order.

use super::{check_len, walk_keys, weighted_values, Options, Shape};
use crate::spec::Remainder;

/// Sizes of a decode step: q and o are [batch, heads, head_dim]; each sequence's cache has
/// `kv_heads` heads (dividing `heads`: query head h reads K/V head h / (heads / kv_heads)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DecodeShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl DecodeShape {
    /// Query heads per K/V head.
    pub fn group(&self) -> usize {
        self.heads.checked_div(self.kv_heads).unwrap_or(0)
    }

    /// Elements of q and o: B * H * D.
    pub fn len(&self) -> usize {
        self.batch * self.heads * self.head_dim
    }

    /// True when any dimension is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements of rem: B * H.
    pub fn rows(&self) -> usize {
        self.batch * self.heads
    }
}

/// Decode outputs: o [B, H, D] (with rem * v_i when the remainder is fused), rem and log2 rem [B, H].
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    pub o: Vec<f64>,
    pub rem: Vec<f64>,
    pub log2_rem: Vec<f64>,
}

/// The float64 decode. `k` and `v` are the caches as [B, H_kv, n_max, D] (BHND) with
/// `seqlens[b] <= n_max` valid tokens per sequence; a paged or BNHD cache is gathered into this form
/// by the caller, so the reference never shares the kernels' addressing.
///
/// # Panics
/// When a slice's length does not match the shape, a length exceeds `n_max`, or `kv_heads` does not
/// divide `heads`.
pub fn decode(shape: DecodeShape, opts: &Options, q: &[f64], k: &[f64], v: &[f64], seqlens: &[usize]) -> Decoded {
    let (b_count, h_count, d) = (shape.batch, shape.heads, shape.head_dim);
    assert!(
        shape.kv_heads > 0 && h_count % shape.kv_heads == 0,
        "decode reference: kv_heads = {} must divide heads = {h_count}",
        shape.kv_heads
    );
    check_len("q", q.len(), shape.len());
    check_len("seqlens", seqlens.len(), b_count);
    let per_token = b_count * shape.kv_heads * d;
    let n_max = k.len().checked_div(per_token).unwrap_or(0);
    check_len("k", k.len(), n_max * per_token);
    check_len("v", v.len(), n_max * per_token);
    let scale_log2 = opts.scale_for(d) * std::f64::consts::LOG2_E;
    let mut out =
        Decoded { o: vec![0.0; shape.len()], rem: vec![1.0; shape.rows()], log2_rem: vec![0.0; shape.rows()] };
    for (b, &len) in seqlens.iter().enumerate() {
        assert!(len <= n_max, "decode reference: seqlens[{b}] = {len} exceeds the cache's {n_max} tokens");
        if len == 0 {
            continue;
        }
        let i = len - 1;
        let row_shape = Shape::new(1, 1, len, d);
        for h in 0..h_count {
            let kv = (b * shape.kv_heads + h / shape.group()) * n_max * d;
            let (kh, vh) = (&k[kv..kv + len * d], &v[kv..kv + len * d]);
            let qi = &q[(b * h_count + h) * d..(b * h_count + h + 1) * d];
            let row = super::walk_row(opts, &row_shape, scale_log2, i, qi, kh);
            let oi = &mut out.o[(b * h_count + h) * d..(b * h_count + h + 1) * d];
            oi.copy_from_slice(&weighted_values(&row, vh, d));
            let r = row.log2_rem.exp2();
            if opts.remainder == Remainder::Fuse {
                for (x, vi) in oi.iter_mut().zip(&vh[i * d..]) {
                    *x += r * vi;
                }
            }
            out.rem[b * h_count + h] = r;
            out.log2_rem[b * h_count + h] = row.log2_rem;
        }
    }
    out
}

/// What a chunk of keys leaves for one query: `o` (its keys' weighted values, the stick starting
/// whole at the chunk's nearest key) and `log2_rem` = L, the sum of log2(1 - beta) over its keys.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkState {
    pub o: Vec<f64>,
    pub log2_rem: f64,
}

impl ChunkState {
    /// No keys: o = 0, L = 0 (the merge's identity).
    pub fn empty(head_dim: usize) -> Self {
        ChunkState { o: vec![0.0; head_dim], log2_rem: 0.0 }
    }

    /// `self` followed by `farther`, the chunk just beyond it (farther from the query):
    /// `(o + 2^L o_c, L + L_c)`. Associative, not commutative.
    pub fn then(&self, farther: &ChunkState) -> ChunkState {
        let scale = self.log2_rem.exp2();
        ChunkState {
            o: self.o.iter().zip(&farther.o).map(|(a, b)| a + scale * b).collect(),
            log2_rem: self.log2_rem + farther.log2_rem,
        }
    }
}

/// The state of keys `keys` (all allowed; the nearest is `keys.end - 1`) for query `qi`, walked with
/// a fresh stick and no early exit. `k` and `v` are one head's [N, D] keys and values.
pub fn chunk_state(opts: &Options, qi: &[f64], k: &[f64], v: &[f64], keys: std::ops::Range<usize>) -> ChunkState {
    let d = qi.len();
    let scale_log2 = opts.scale_for(d) * std::f64::consts::LOG2_E;
    let walk = walk_keys(None, scale_log2, qi, k, keys);
    ChunkState { o: weighted_values(&walk, v, d), log2_rem: walk.log2_rem }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{inputs, max_abs_diff};
    use super::super::{forward, Forward};
    use super::*;
    use crate::spec::Mask;

    fn opts(mask: Mask, remainder: Remainder, early_exit_bits: Option<u32>) -> Options {
        Options { mask, remainder, early_exit_bits, scale: None }
    }

    /// Sequence b's tokens as a forward problem of one sequence: its K/V heads' first `len` tokens.
    #[allow(clippy::too_many_arguments)]
    fn forward_of(
        shape: DecodeShape,
        opts: &Options,
        q_rows: &[f64],
        k: &[f64],
        v: &[f64],
        b: usize,
        len: usize,
        n_max: usize,
    ) -> Forward {
        let d = shape.head_dim;
        let fwd_shape = Shape::new(1, shape.heads, len, d).with_kv_heads(shape.kv_heads);
        let take = |x: &[f64]| -> Vec<f64> {
            (0..shape.kv_heads)
                .flat_map(|hk| {
                    let at = (b * shape.kv_heads + hk) * n_max * d;
                    x[at..at + len * d].to_vec()
                })
                .collect()
        };
        forward(fwd_shape, opts, q_rows, &take(k), &take(v))
    }

    #[test]
    fn decode_is_the_last_row_of_the_forward_over_the_cache() {
        let shape = DecodeShape { batch: 4, heads: 6, kv_heads: 2, head_dim: 8 };
        let n_max = 40;
        let seqlens = [0, 1, 17, 40];
        let d = shape.head_dim;
        let cache = Shape::new(shape.batch, shape.kv_heads, n_max, d);
        let (_, k, v) = inputs(11, cache);
        // Each sequence's forward problem has the decode query at its last row and random rows
        // elsewhere (they must not matter).
        let rows = Shape::new(shape.batch, shape.heads, n_max, d);
        let (q_all, _, _) = inputs(12, rows);
        for mask in [Mask::Strict, Mask::AttendCurrent] {
            for remainder in [Remainder::Return, Remainder::Fuse] {
                for ee in [None, Some(8)] {
                    let o = opts(mask, remainder, ee);
                    let mut q = vec![0.0; shape.len()];
                    for (b, &len) in seqlens.iter().enumerate() {
                        for h in 0..shape.heads {
                            let src = ((b * shape.heads + h) * n_max + len.max(1) - 1) * d;
                            q[(b * shape.heads + h) * d..][..d].copy_from_slice(&q_all[src..src + d]);
                        }
                    }
                    let got = decode(shape, &o, &q, &k, &v, &seqlens);
                    for (b, &len) in seqlens.iter().enumerate() {
                        for h in 0..shape.heads {
                            let row = b * shape.heads + h;
                            if len == 0 {
                                assert_eq!((got.rem[row], got.log2_rem[row]), (1.0, 0.0));
                                assert!(got.o[row * d..][..d].iter().all(|&x| x == 0.0));
                                continue;
                            }
                            let q_rows: Vec<f64> = (0..shape.heads)
                                .flat_map(|hh| q_all[(b * shape.heads + hh) * n_max * d..][..len * d].to_vec())
                                .collect();
                            let want = forward_of(shape, &o, &q_rows, &k, &v, b, len, n_max);
                            let at = h * len + len - 1;
                            let ctx = format!("{mask:?} {remainder:?} ee {ee:?} b {b} h {h}");
                            assert!(max_abs_diff(&got.o[row * d..][..d], &want.o[at * d..][..d]) < 1e-12, "{ctx}");
                            assert!((got.rem[row] - want.rem[at]).abs() < 1e-12, "{ctx}");
                            assert!((got.log2_rem[row] - want.log2_rem[at]).abs() < 1e-12, "{ctx}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_or_keyless_sequence_keeps_the_whole_stick() {
        let shape = DecodeShape { batch: 2, heads: 1, kv_heads: 1, head_dim: 4 };
        let k = vec![0.5; 2 * 3 * 4];
        let v: Vec<f64> = (0..24).map(|x| x as f64).collect();
        let q = vec![1.0; 8];
        // Sequence 1 holds one token: strict sees no key; a fused remainder returns its own value.
        let got = decode(shape, &opts(Mask::Strict, Remainder::Fuse, None), &q, &k, &v, &[0, 1]);
        assert_eq!(got.rem, vec![1.0, 1.0]);
        assert_eq!(&got.o[..4], &[0.0; 4]);
        assert_eq!(&got.o[4..], &v[12..16]);
    }

    /// Chunks of keys walked on their own, merged nearest first, give the row's walk; any
    /// bracketing of the merge gives the same, and the reversed order does not.
    #[test]
    fn chunks_merge_nearest_first_to_the_whole_row() {
        let (n, d) = (50, 8);
        let (q, k, v) = inputs(21, Shape::new(1, 1, n, d));
        let o = opts(Mask::AttendCurrent, Remainder::Return, None);
        let qi = &q[(n - 1) * d..];
        let whole = chunk_state(&o, qi, &k, &v, 0..n);
        let fwd = forward(Shape::new(1, 1, n, d), &o, &q, &k, &v);
        assert!(max_abs_diff(&whole.o, &fwd.o[(n - 1) * d..]) < 1e-12);
        assert!((whole.log2_rem - fwd.log2_rem[n - 1]).abs() < 1e-12);
        for cuts in [vec![0, 50], vec![0, 1, 50], vec![0, 17, 33, 49, 50], vec![0, 10, 20, 30, 40, 50]] {
            // Nearest chunk first: the last range comes first.
            let chunks: Vec<ChunkState> =
                cuts.windows(2).rev().map(|w| chunk_state(&o, qi, &k, &v, w[0]..w[1])).collect();
            let left = chunks.iter().fold(ChunkState::empty(d), |acc, c| acc.then(c));
            let right = chunks.iter().rev().fold(ChunkState::empty(d), |acc, c| c.then(&acc));
            for merged in [&left, &right] {
                assert!(max_abs_diff(&merged.o, &whole.o) < 1e-12, "cuts {cuts:?}");
                assert!((merged.log2_rem - whole.log2_rem).abs() < 1e-12, "cuts {cuts:?}");
            }
            if chunks.len() > 1 {
                let reversed = chunks.iter().rev().fold(ChunkState::empty(d), |acc, c| acc.then(c));
                assert!(max_abs_diff(&reversed.o, &whole.o) > 1e-6, "cuts {cuts:?}: the order must matter");
            }
        }
    }
}
