//! A CPU interpreter of the blocked schedule: what the GPU kernels compute, in f32, tile by tile,
//! so that a mistake in the tiling logic (block bounds, the mask on the diagonal, the in-block
//! cumsum, the running `acc`, the early-exit vote) shows up on a machine without a GPU.
//!
//! # The kernel semantics (what `templates/sb_fwd.cu.tera` and `sb_bwd.cu.tera` implement)
//!
//! Inputs q, k, v are f32 values already rounded to the spec's dtype, in BHND order (the
//! interpreter ignores `spec.layout`: convert with [`sbgen_runtime::reference::bnhd_to_bhnd`]).
//! q, o, dq are [B, H, N, D]; k, v, dk, dv are [B, H_kv, N, D] with `H_kv = shape.kv_heads`
//! dividing H (grouped-query attention): query head h reads K/V head h / (H / H_kv), and dk, dv sum
//! over the query heads of a group, as in the reference. A packed variable-length batch (the THD
//! layout) is a list of batch-1 problems, one per sequence: the kernels' CTAs of one sequence only
//! see that sequence (docs/architecture.md#sequence-views), so it needs nothing here.
//! D is the head_dim of the tensors: any value works (the kernels' zero-padded tile columns add
//! nothing, docs/math.md#head-dims). `scale_log2 = scale * log2(e)` in f32, scale defaulting to
//! 1 / sqrt(D).
//! `softplus2(x) = x` when x > 15, else `log2(1 + 2^x)`, in f32.
//!
//! **Forward.** One CTA per (b, query head h, query block): rows `[q0, q0 + block_m) ∩ [0, N)`.
//!
//! - It needs `kmax = min(N, q0 + block_m - 1 + (attend_current ? 1 : 0))` keys and walks the key
//!   blocks `ceil(kmax / block_n) - 1` down to 0; block `b` holds keys `[b*block_n, (b+1)*block_n)`.
//!   `acc_i = 0` for every row at the start.
//! - Per key block, per row i (all arithmetic f32, dot products accumulated in f32):
//!   `X_ij = scale_log2 * (q_i . k_j)`; `L_ij = -softplus2(X_ij)`, or 0 where j is not allowed
//!   (j >= N is never allowed); `S_ij` = reverse inclusive cumsum of L over the block (the sum of
//!   `L_ik` for k >= j inside it); `P_ij = 2^(X_ij + S_ij + acc_i)` where allowed, else 0;
//!   `o_i += dtype(P_ij) * v_j` (P is rounded to the dtype first: the tensor cores take it in
//!   bf16/f16); then `acc_i += sum_j L_ij`.
//! - Early exit (`early_exit_bits = Some(T)`): after finishing a key block, if the maximum of
//!   `acc_i` over the CTA's rows with i < N is below -T, the CTA stops its walk.
//! - With the linear stick (`Walk::linear`, `softplus = linear`; docs/math.md#the-stick-in-linear-space):
//!   per warp (16 rows of the CTA) and key block, a vote: when no score `X_ij` of the warp's rows
//!   and the block's keys (below N) exceeds `120 / KPT`, `KPT = block_n / 4`, each row splits the
//!   block into four runs of KPT keys; inside a run, `r = 1 / (1 + 2^X)`, `beta = 2^X r`,
//!   `W_j = beta_j * (product of r over the run's allowed keys right of j)`, formed as `2^X_j` times
//!   the product of `1 + 2^X` over the allowed keys left of j, times the reciprocal of that product
//!   over the whole run (one reciprocal per run); the runs
//!   are joined in log space (`P_ij = W_ij * 2^(sum of log2 of the products of the runs right of
//!   j's run) * 2^acc_i`) and `acc_i` adds the four runs' log2 products. Otherwise the warp walks
//!   the block as above. The backward takes the same P and beta.
//! - At the end: `rem_i = 2^acc_i`, `log2_rem_i = acc_i` (both f32); `o_saved_i` = o_i in f32
//!   (before any fused remainder, kept for the backward); `o_i += rem_i * v_i` with a fused
//!   remainder, and o is rounded to the dtype.
//!
//! **Backward.** The same CTAs and the same walk, given the forward's `o_saved` and `log2_rem`
//! (f32), dO (in the dtype) and optionally dRem (f32):
//!
//! - Per row, before the walk: `rem_i = 2^log2_rem_i`; `D_i = dO_i . o_saved_i`; `dRem_eff_i =
//!   dRem_i` (0 without dRem), plus `dO_i . v_i` with a fused remainder (which also adds
//!   `rem_i dO_i` to `dv_i`). `G_i = 0`, `acc_i = 0`.
//! - Per key block, right to left, per row: X, L, S, P recomputed exactly as the forward (so P is
//!   A), `beta_ij = 2^(X_ij + L_ij)`; `dP_ij = dO_i . v_j`; `g_ij = dtype(P_ij) dP_ij` (A rounded
//!   as the forward rounded it before P V, so that the g of a row sum to D_i);
//!   `C_ij = D_i - G_i - sum_{k > j in the block} g_ik`; `dz_ij = g_ij - beta_ij (C_ij + dRem_eff_i
//!   rem_i)` where allowed, else 0, with beta taken as 0 where `P_ij < 2^-24 beta_ij` (less than 2^-24
//!   of the stick left right of j: C there is only f32 residue of `D_i - G_i`); `dq_i += dtype(dz_ij) k_j`, `dk_j += dtype(dz_ij) q_i`,
//!   `dv_j += dtype(P_ij) dO_i` (P and dz go to the tensor cores in the dtype; dk and dv are f32
//!   accumulators of the K/V head, shared by all CTAs of its group's query heads); `G_i += sum_j g_ij`; `acc_i += sum_j L_ij`; the same
//!   early-exit vote as the forward (acc is recomputed bit for bit, so both passes stop at the same
//!   block).
//! - At the end: `dq *= scale`, `dk *= scale` (f32), and dq, dk, dv are rounded to the dtype.
//!
//! Why `o_saved` and the rounded A in g: C_ik = D_i - (g right of k) must fall to ~0 for the keys
//! beyond the stick's reach, and it only does when D_i is the sum of the very g the walk subtracts.
//! With D_i taken from the dtype-rounded o instead (the first design), the leftover
//! dO_i . (o_rounded_i - o_i) reaches every far key through dz_ik = -beta_ik (leftover), and the
//! dq, dk errors grow with N (4.8e-2 relative at N = 257, 0.17 at N = 1024 on N(0, 1) bf16 data;
//! ~100 on sharp scores); the test `d_from_the_rounded_o_loses_the_gradients` keeps that variant
//! measured. The f32 residue of the same subtraction still leaks on sharp scores, far more weakly
//! (see `matches_the_reference_on_sharp_data`).
//!
//! The float64 reference ([`sbgen_runtime::reference`]) is the ground truth this is checked
//! against; early exit there is decided per row, here per CTA, and both stay within the same bound
//! of the exact result (docs/math.md#early-exit).

use crate::ir::{Dtype, Kernel, Mask, Remainder};
use sbgen_runtime::reference::Shape;

/// 2^-24: where less than this share of a row's stick is left right of a key, the backward drops
/// the key's beta term (the kernels do the same; see `sb_bwd.cu.tera`).
const STICK_END: f32 = 5.960_464_5e-8;

/// The parts of a kernel that decide what the blocked walk computes. Built from a [`Kernel`] with
/// [`Walk::of`], or by hand (the walk needs no tiles and no head_dim: tests use small heads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// Query rows per CTA.
    pub block_m: usize,
    /// Keys per step of the walk.
    pub block_n: usize,
    pub dtype: Dtype,
    pub mask: Mask,
    pub remainder: Remainder,
    pub early_exit_bits: Option<u32>,
    /// The stick in linear space (`softplus = linear`, docs/math.md#the-stick-in-linear-space):
    /// inside each of a row's four runs of `block_n / 4` keys, products of `1 - beta = 1 / (1 +
    /// 2^X)` instead of sums of their log2, the runs joined in log space; a warp (16 rows of the
    /// CTA) whose block holds a score above `120 / (block_n / 4)` walks that block in log space.
    pub linear: bool,
}

/// Forward outputs, BHND, with the query heads (`shape.heads`).
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardOut {
    /// [B, H, N, D] in the dtype (as f32), with rem_i v_i added when the remainder is fused.
    pub o: Vec<f32>,
    /// [B, H, N]: 2^log2_rem.
    pub rem: Vec<f32>,
    /// [B, H, N]: the final acc, log2 of the stick left over (a backward input).
    pub log2_rem: Vec<f32>,
    /// [B, H, N, D]: o in f32 before rounding and before any fused remainder (a backward input).
    pub o_saved: Vec<f32>,
}

/// Backward outputs, BHND, in the dtype (as f32): dq [B, H, N, D], dk and dv [B, H_kv, N, D] (each
/// the sum over the K/V head's group of query heads).
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// How much of the walk ran: what early exit saves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// CTAs launched (B * H * ceil(N / block_m), H the query heads).
    pub ctas: u64,
    /// Key blocks the CTAs processed.
    pub key_blocks_processed: u64,
    /// Key blocks the CTAs would process without early exit.
    pub key_blocks_needed: u64,
    /// With the linear stick: the (warp, key block) pairs that took it, and those whose vote sent
    /// them through the log-space walk (a score above the bound); both 0 without it.
    pub linear_warp_blocks: u64,
    pub log_space_warp_blocks: u64,
}

/// Deliberate mistakes and superseded designs, for the tests that show the comparison with the
/// reference catches them. Always all-false outside those tests.
#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    /// Forward and backward: S_ij sums L_ik over k > j only.
    exclusive_cumsum: bool,
    /// Backward: C_ij subtracts g_ik over k >= j.
    inclusive_c: bool,
    /// Early exit: vote with the minimum of acc instead of the maximum.
    min_vote: bool,
    /// Backward, the first design: D_i = dO_i . o_i from the dtype-rounded o (less rem_i dO_i . v_i
    /// when fused) and g = P dP with P unrounded.
    d_from_rounded_o: bool,
}

/// The interpreter's forward for `kernel`, BHND.
///
/// # Panics
/// When `shape.head_dim` differs from the kernel's or a slice's length does not match `shape`.
pub fn forward(kernel: &Kernel, shape: Shape, q: &[f32], k: &[f32], v: &[f32], scale: Option<f32>) -> ForwardOut {
    check_head_dim(kernel, shape);
    Walk::of(kernel).forward(shape, q, k, v, scale).0
}

/// The interpreter's backward for `kernel`, BHND. `o_saved` and `log2_rem` are the forward's;
/// `d_rem = None` means no gradient flows into rem.
///
/// # Panics
/// When `shape.head_dim` differs from the kernel's or a slice's length does not match `shape`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    kernel: &Kernel,
    shape: Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o_saved: &[f32],
    log2_rem: &[f32],
    d_o: &[f32],
    d_rem: Option<&[f32]>,
    scale: Option<f32>,
) -> Grads {
    check_head_dim(kernel, shape);
    Walk::of(kernel).backward(shape, q, k, v, o_saved, log2_rem, d_o, d_rem, scale).0
}

fn check_head_dim(kernel: &Kernel, shape: Shape) {
    assert_eq!(
        shape.head_dim, kernel.spec.head_dim as usize,
        "interpreter: shape.head_dim = {} but the kernel is for head_dim = {}",
        shape.head_dim, kernel.spec.head_dim
    );
}

fn check_len(name: &str, got: usize, want: usize) {
    assert_eq!(got, want, "interpreter: `{name}` has {got} elements, the shape needs {want}");
}

// `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
#[allow(clippy::manual_is_multiple_of)]
fn check_kv_heads(shape: Shape) {
    assert!(
        shape.kv_heads > 0 && shape.heads % shape.kv_heads == 0,
        "interpreter: kv_heads = {} must divide heads = {}",
        shape.kv_heads,
        shape.heads
    );
}

/// The element range of the K/V head that query head `bh` (= b * heads + h) reads: K/V head
/// b * kv_heads + h / group.
fn kv_head(shape: Shape, bh: usize) -> std::ops::Range<usize> {
    let kv = (bh / shape.heads) * shape.kv_heads + (bh % shape.heads) / shape.group();
    let size = shape.seq * shape.head_dim;
    kv * size..(kv + 1) * size
}

/// log2(1 + 2^x) in f32, x itself when x > 15.
fn softplus2(x: f32) -> f32 {
    if x > 15.0 {
        x
    } else {
        (1.0 + x.exp2()).log2()
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Per-row scratch for one key block: X, L, S for each key; with the linear stick, each key's
/// weight relative to the stick left before the block, its beta, and the block's sum of log2(1 -
/// beta).
struct BlockScratch {
    x: Vec<f32>,
    l: Vec<f32>,
    s: Vec<f32>,
    w: Vec<f32>,
    beta: Vec<f32>,
    linear_sum: f32,
}

impl BlockScratch {
    fn new(bn: usize) -> BlockScratch {
        BlockScratch {
            x: vec![0.0; bn],
            l: vec![0.0; bn],
            s: vec![0.0; bn],
            w: vec![0.0; bn],
            beta: vec![0.0; bn],
            linear_sum: 0.0,
        }
    }
}

/// Rows of a CTA per warp, which share the linear stick's vote: 16 in every walk kernel.
const ROWS_PER_WARP: usize = 16;

impl Walk {
    /// The walk a kernel performs.
    pub fn of(kernel: &Kernel) -> Walk {
        Walk {
            block_m: kernel.schedule.block_m as usize,
            block_n: kernel.schedule.block_n as usize,
            dtype: kernel.spec.dtype,
            mask: kernel.spec.mask,
            remainder: kernel.spec.remainder,
            early_exit_bits: kernel.spec.early_exit_bits,
            linear: kernel.schedule.softplus == crate::ir::Softplus::Linear,
        }
    }

    /// Keys `0..n` allowed for row `i` (before the limit j < N).
    fn row_keys(&self, i: usize) -> usize {
        match self.mask {
            Mask::Strict => i,
            Mask::AttendCurrent => i + 1,
        }
    }

    /// Number of key blocks the CTA starting at row `q0` walks without early exit.
    fn key_blocks(&self, seq: usize, q0: usize) -> usize {
        let kmax = seq.min(self.row_keys(q0 + self.block_m - 1));
        kmax.div_ceil(self.block_n)
    }

    fn exits(&self, acc: &[f32], faults: Faults) -> bool {
        let Some(t) = self.early_exit_bits else {
            return false;
        };
        let vote = if faults.min_vote {
            acc.iter().copied().fold(f32::INFINITY, f32::min)
        } else {
            acc.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        };
        vote < -(t as f32)
    }

    /// For row `i` and the key block starting at `k0`: fills X, L, S for the allowed keys
    /// `k0..k0 + len` and returns `len` (the keys after it in the block are not allowed: L = 0,
    /// P = 0). `qi` is the row's query, `kh` the head's keys.
    #[allow(clippy::too_many_arguments)]
    fn scores(
        &self,
        seq: usize,
        d: usize,
        scale_log2: f32,
        i: usize,
        k0: usize,
        qi: &[f32],
        kh: &[f32],
        sc: &mut BlockScratch,
        faults: Faults,
    ) -> usize {
        let end = self.row_keys(i).min(seq).min(k0 + self.block_n);
        let len = end.saturating_sub(k0);
        let mut s = 0.0f32;
        for t in (0..len).rev() {
            let j = k0 + t;
            let x = scale_log2 * dot(qi, &kh[j * d..(j + 1) * d]);
            let l = -softplus2(x);
            sc.x[t] = x;
            sc.l[t] = l;
            if faults.exclusive_cumsum {
                sc.s[t] = s;
                s += l;
            } else {
                s += l;
                sc.s[t] = s;
            }
        }
        len
    }

    /// The linear stick's votes of the CTA's warps (16 rows each) for the key block at `k0` (true:
    /// the linear stick), all false without it. A warp votes for it when no score of its rows and
    /// the block's keys (allowed or not, below N) exceeds `120 / KPT`, `KPT = block_n / 4`. Counts
    /// the warp-blocks of each path in `stats`.
    #[allow(clippy::too_many_arguments)]
    fn linear_votes(
        &self,
        seq: usize,
        d: usize,
        scale_log2: f32,
        rows: std::ops::Range<usize>,
        k0: usize,
        qh: &[f32],
        kh: &[f32],
        stats: &mut Stats,
    ) -> Vec<bool> {
        let bound = 120.0 / (self.block_n / 4) as f32;
        let keys = k0..(k0 + self.block_n).min(seq);
        let within = |i: usize| {
            let qi = &qh[i * d..(i + 1) * d];
            keys.clone().all(|j| scale_log2 * dot(qi, &kh[j * d..(j + 1) * d]) <= bound)
        };
        let warps = rows.len().div_ceil(ROWS_PER_WARP);
        (0..warps)
            .map(|w| {
                if !self.linear {
                    return false;
                }
                let start = rows.start + w * ROWS_PER_WARP;
                let ok = (start..(start + ROWS_PER_WARP).min(rows.end)).all(within);
                stats.linear_warp_blocks += u64::from(ok);
                stats.log_space_warp_blocks += u64::from(!ok);
                ok
            })
            .collect()
    }

    /// The linear stick over the block `scores` just filled (X of its `len` allowed keys): fills
    /// `w` and `beta` for keys `0..len` and `linear_sum`. Each of the four runs of KPT keys takes
    /// products of 1 + 2^X = 1 / (1 - beta), farthest key first, and one reciprocal of the whole
    /// run's; the runs are joined in log space, nearest run first.
    fn linear_weights(&self, sc: &mut BlockScratch, len: usize) {
        let kpt = self.block_n / 4;
        let mut right = 0.0f32; // log2 of the stick spent by the runs right of this one
        for run in (0..4).rev() {
            let keys = run * kpt..((run + 1) * kpt).min(len);
            // The kernel's order: w_t = 2^X_t (product of 1 + 2^X left of t) / (the run's product)
            // is beta_t times the product of (1 - beta) right of t.
            let mut left = 1.0f32; // product of 1 + 2^X over the run's keys left of t
            for t in keys.clone() {
                let e = sc.x[t].exp2();
                sc.beta[t] = e * (1.0 / (1.0 + e));
                sc.w[t] = e * left;
                left = left.mul_add(e, left); // left * (1 + e) in one rounding, as the kernel's fma
            }
            let inv = 1.0 / left; // the run's product of (1 - beta); 1 when no key is allowed
            let stick = right.exp2();
            for t in keys {
                sc.w[t] = (sc.w[t] * inv) * stick;
            }
            right -= left.log2();
        }
        sc.linear_sum = right;
    }

    /// The row sum of L over the block `scores` just filled (0 when no key is allowed).
    fn row_sum(sc: &BlockScratch, len: usize, faults: Faults) -> f32 {
        match (len, faults.exclusive_cumsum) {
            (0, _) => 0.0,
            (_, false) => sc.s[0],
            (_, true) => sc.s[0] + sc.l[0],
        }
    }

    /// The forward over every CTA, with the counts of key blocks.
    ///
    /// # Panics
    /// When a slice's length does not match `shape`.
    pub fn forward(&self, shape: Shape, q: &[f32], k: &[f32], v: &[f32], scale: Option<f32>) -> (ForwardOut, Stats) {
        self.forward_faulty(shape, q, k, v, scale, Faults::default())
    }

    fn forward_faulty(
        &self,
        shape: Shape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        scale: Option<f32>,
        faults: Faults,
    ) -> (ForwardOut, Stats) {
        check_kv_heads(shape);
        for (name, x, want) in [("q", q, shape.len()), ("k", k, shape.kv_len()), ("v", v, shape.kv_len())] {
            check_len(name, x.len(), want);
        }
        let (n, d, bm, bn) = (shape.seq, shape.head_dim, self.block_m, self.block_n);
        let scale_log2 = scale.unwrap_or(1.0 / (d as f32).sqrt()) * std::f32::consts::LOG2_E;
        let mut o = vec![0.0f32; shape.len()];
        let mut rem = vec![1.0f32; shape.rows()];
        let mut log2_rem = vec![0.0f32; shape.rows()];
        let mut stats = Stats::default();
        let mut sc = BlockScratch::new(bn);
        for bh in 0..shape.batch * shape.heads {
            let base = bh * n * d;
            let kv = kv_head(shape, bh);
            let (qh, kh, vh) = (&q[base..base + n * d], &k[kv.clone()], &v[kv]);
            let oh = &mut o[base..base + n * d];
            for q0 in (0..n).step_by(bm) {
                let rows = q0..(q0 + bm).min(n);
                let blocks = self.key_blocks(n, q0);
                stats.ctas += 1;
                stats.key_blocks_needed += blocks as u64;
                let mut acc = vec![0.0f32; rows.len()];
                for b in (0..blocks).rev() {
                    let k0 = b * bn;
                    let linear = self.linear_votes(n, d, scale_log2, rows.clone(), k0, qh, kh, &mut stats);
                    for (r, i) in rows.clone().enumerate() {
                        let qi = &qh[i * d..(i + 1) * d];
                        let len = self.scores(n, d, scale_log2, i, k0, qi, kh, &mut sc, faults);
                        let lin = linear[r / ROWS_PER_WARP];
                        if lin {
                            self.linear_weights(&mut sc, len);
                        }
                        let oi = &mut oh[i * d..(i + 1) * d];
                        for t in 0..len {
                            let j = k0 + t;
                            let p = if lin { sc.w[t] * acc[r].exp2() } else { (sc.x[t] + sc.s[t] + acc[r]).exp2() };
                            axpy(oi, self.dtype.round(p), &vh[j * d..(j + 1) * d]);
                        }
                        acc[r] += if lin { sc.linear_sum } else { Self::row_sum(&sc, len, faults) };
                    }
                    stats.key_blocks_processed += 1;
                    if self.exits(&acc, faults) {
                        break;
                    }
                }
                for (r, i) in rows.enumerate() {
                    rem[bh * n + i] = acc[r].exp2();
                    log2_rem[bh * n + i] = acc[r];
                }
            }
        }
        let o_saved = o.clone();
        for (row, oi) in o.chunks_mut(d.max(1)).enumerate() {
            if self.remainder == Remainder::Fuse {
                // Row i of query head bh adds rem_i v_i of its K/V head.
                let i = row % n;
                let vh = &v[kv_head(shape, row / n)];
                axpy(oi, rem[row], &vh[i * d..(i + 1) * d]);
            }
            for x in oi {
                *x = self.dtype.round(*x);
            }
        }
        (ForwardOut { o, rem, log2_rem, o_saved }, stats)
    }

    /// The backward over every CTA, with the counts of key blocks (equal to the forward's).
    ///
    /// # Panics
    /// When a slice's length does not match `shape`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        shape: Shape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o_saved: &[f32],
        log2_rem: &[f32],
        d_o: &[f32],
        d_rem: Option<&[f32]>,
        scale: Option<f32>,
    ) -> (Grads, Stats) {
        self.backward_faulty(shape, [q, k, v, o_saved, d_o], log2_rem, d_rem, scale, Faults::default())
    }

    fn backward_faulty(
        &self,
        shape: Shape,
        [q, k, v, o_saved, d_o]: [&[f32]; 5],
        log2_rem: &[f32],
        d_rem: Option<&[f32]>,
        scale: Option<f32>,
        faults: Faults,
    ) -> (Grads, Stats) {
        check_kv_heads(shape);
        let (len, kv_len) = (shape.len(), shape.kv_len());
        for (name, x, want) in
            [("q", q, len), ("k", k, kv_len), ("v", v, kv_len), ("o_saved", o_saved, len), ("d_o", d_o, len)]
        {
            check_len(name, x.len(), want);
        }
        check_len("log2_rem", log2_rem.len(), shape.rows());
        if let Some(dr) = d_rem {
            check_len("d_rem", dr.len(), shape.rows());
        }
        let (n, d, bm, bn) = (shape.seq, shape.head_dim, self.block_m, self.block_n);
        let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let fuse = self.remainder == Remainder::Fuse;
        let mut dq = vec![0.0f32; shape.len()];
        let mut dk = vec![0.0f32; shape.kv_len()];
        let mut dv = vec![0.0f32; shape.kv_len()];
        let mut stats = Stats::default();
        let mut sc = BlockScratch::new(bn);
        for bh in 0..shape.batch * shape.heads {
            let base = bh * n * d;
            let head = base..base + n * d;
            let kv = kv_head(shape, bh);
            let (qh, kh, vh) = (&q[head.clone()], &k[kv.clone()], &v[kv.clone()]);
            let (oh, doh) = (&o_saved[head.clone()], &d_o[head.clone()]);
            // dk, dv of the K/V head: the group's query heads add into the same accumulators.
            let (dqh, dkh, dvh) = (&mut dq[head.clone()], &mut dk[kv.clone()], &mut dv[kv]);
            for q0 in (0..n).step_by(bm) {
                let rows = q0..(q0 + bm).min(n);
                let blocks = self.key_blocks(n, q0);
                stats.ctas += 1;
                stats.key_blocks_needed += blocks as u64;
                // Per-row terms: rem, D and dRem_eff * rem.
                let mut rem = Vec::with_capacity(rows.len());
                let mut big_d = Vec::with_capacity(rows.len());
                let mut coef = Vec::with_capacity(rows.len());
                for i in rows.clone() {
                    let ri = log2_rem[bh * n + i].exp2();
                    let doi = &doh[i * d..(i + 1) * d];
                    let vi = &vh[i * d..(i + 1) * d];
                    let mut di = if faults.d_from_rounded_o {
                        let fused = if fuse { ri } else { 0.0 };
                        let o: Vec<f32> = (0..d).map(|t| self.dtype.round(oh[i * d + t] + fused * vi[t])).collect();
                        dot(doi, &o)
                    } else {
                        dot(doi, &oh[i * d..(i + 1) * d])
                    };
                    let mut dr = d_rem.map_or(0.0, |dr| dr[bh * n + i]);
                    if fuse {
                        let dov = dot(doi, vi);
                        dr += dov;
                        if faults.d_from_rounded_o {
                            di -= ri * dov;
                        }
                        axpy(&mut dvh[i * d..(i + 1) * d], ri, doi);
                    }
                    rem.push(ri);
                    big_d.push(di);
                    coef.push(dr * ri);
                }
                let mut g_sum = vec![0.0f32; rows.len()];
                let mut acc = vec![0.0f32; rows.len()];
                for b in (0..blocks).rev() {
                    let k0 = b * bn;
                    let linear = self.linear_votes(n, d, scale_log2, rows.clone(), k0, qh, kh, &mut stats);
                    for (r, i) in rows.clone().enumerate() {
                        let qi = &qh[i * d..(i + 1) * d];
                        let doi = &doh[i * d..(i + 1) * d];
                        let len = self.scores(n, d, scale_log2, i, k0, qi, kh, &mut sc, faults);
                        let lin = linear[r / ROWS_PER_WARP];
                        if lin {
                            self.linear_weights(&mut sc, len);
                        }
                        let mut right = 0.0f32; // sum of g_ik over k > j inside the block
                        for t in (0..len).rev() {
                            let j = k0 + t;
                            let vj = &vh[j * d..(j + 1) * d];
                            let p = if lin { sc.w[t] * acc[r].exp2() } else { (sc.x[t] + sc.s[t] + acc[r]).exp2() };
                            let p_mma = self.dtype.round(p);
                            let beta = if lin { sc.beta[t] } else { (sc.x[t] + sc.l[t]).exp2() };
                            // The kernels' rule: past the end of the stick (A < 2^-24 beta) the
                            // beta term is dropped, since C there is only f32 residue.
                            let beta = if p < beta * STICK_END { 0.0 } else { beta };
                            let g = if faults.d_from_rounded_o { p } else { p_mma } * dot(doi, vj);
                            let c = if faults.inclusive_c {
                                big_d[r] - g_sum[r] - (right + g)
                            } else {
                                big_d[r] - g_sum[r] - right
                            };
                            right += g;
                            let dz = self.dtype.round(g - beta * (c + coef[r]));
                            axpy(&mut dqh[i * d..(i + 1) * d], dz, &kh[j * d..(j + 1) * d]);
                            axpy(&mut dkh[j * d..(j + 1) * d], dz, qi);
                            axpy(&mut dvh[j * d..(j + 1) * d], p_mma, doi);
                        }
                        g_sum[r] += right;
                        acc[r] += if lin { sc.linear_sum } else { Self::row_sum(&sc, len, faults) };
                    }
                    stats.key_blocks_processed += 1;
                    if self.exits(&acc, faults) {
                        break;
                    }
                }
            }
        }
        for x in &mut dq {
            *x = self.dtype.round(*x * scale);
        }
        for x in &mut dk {
            *x = self.dtype.round(*x * scale);
        }
        for x in &mut dv {
            *x = self.dtype.round(*x);
        }
        (Grads { dq, dk, dv }, stats)
    }
}

#[cfg(test)]
mod tests;
