//! The float64 forward and backward of [`super::forward`] and [`super::backward`], computed for
//! long sequences: blocks of query rows walk the keys together (each key read once per block, not
//! once per row) on several threads. The same formulas, in another order: a row's keys are taken
//! farthest first, with the log2 of the stick left before key j obtained as the row's total minus
//! the running sum over the keys already taken (a second pass; the first sums the row). Tested
//! against the row-by-row reference; used where that one would take hours (N = 65536).

use super::{check_len, check_shape, softplus2, Forward, Grads, Options, Shape};
use crate::spec::Remainder;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Query rows walking the keys together.
const ROWS: usize = 16;

/// At most this many threads (see [`forward_backward`]).
pub const MAX_THREADS: usize = 64;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    // Four partial sums: the compiler vectorises them (one sum is a chain of dependent adds).
    let mut s = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for t in 0..4 {
            s[t] += x[t] * y[t];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (s[0] + s[1]) + (s[2] + s[3]) + tail
}

fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// The forward and, with `d_o`, the backward of q, k, v (BHND; `d_rem` as in [`super::backward`])
/// on `threads` threads (at most [`MAX_THREADS`]; each holds a dK/dV partial of 2 N D f64). Results
/// equal the row-by-row reference's up to float64 rounding.
///
/// # Panics
/// When a slice's length does not match `shape`.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    shape: Shape,
    opts: &Options,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: Option<&[f64]>,
    d_rem: Option<&[f64]>,
    threads: usize,
) -> (Forward, Option<Grads>) {
    check_shape(&shape);
    for (name, x, want) in [("q", q, shape.len()), ("k", k, shape.kv_len()), ("v", v, shape.kv_len())] {
        check_len(name, x.len(), want);
    }
    if let Some(x) = d_o {
        check_len("d_o", x.len(), shape.len());
    }
    if let Some(x) = d_rem {
        check_len("d_rem", x.len(), shape.rows());
    }
    let (n, d) = (shape.seq, shape.head_dim);
    let mut fwd =
        Forward { o: vec![0.0; shape.len()], rem: vec![1.0; shape.rows()], log2_rem: vec![0.0; shape.rows()] };
    let mut grads =
        d_o.map(|_| Grads { dq: vec![0.0; shape.len()], dk: vec![0.0; shape.kv_len()], dv: vec![0.0; shape.kv_len()] });
    let group = shape.group();
    let blocks = n.div_ceil(ROWS);
    // Each thread keeps its own dK/dV partial (2 N D f64): cap the threads so that a large host does
    // not multiply that memory without end (64 x 134 MB at N = 65536, D = 128).
    let threads = threads.clamp(1, MAX_THREADS);
    for kv_head in 0..shape.batch * shape.kv_heads {
        let b = kv_head / shape.kv_heads;
        let heads: Vec<usize> = (0..group).map(|g| b * shape.heads + (kv_head % shape.kv_heads) * group + g).collect();
        let kv = kv_head * n * d..(kv_head + 1) * n * d;
        let (kh, vh) = (&k[kv.clone()], &v[kv.clone()]);
        // Jobs: (query head, row block), the longest walks first.
        let jobs: Vec<(usize, usize)> =
            (0..blocks).rev().flat_map(|blk| heads.iter().map(move |&bh| (bh, blk))).collect();
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<BlockOut>> = Mutex::new(Vec::new());
        let partials: Mutex<Vec<(Vec<f64>, Vec<f64>)>> = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let mut acc = d_o.map(|_| (vec![0.0; n * d], vec![0.0; n * d]));
                    let mut outs = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(bh, blk)) = jobs.get(i) else { break };
                        let rows = blk * ROWS..((blk + 1) * ROWS).min(n);
                        let x = BlockInputs { shape, opts, bh, rows, q, kh, vh, d_o, d_rem };
                        outs.push(block(&x, acc.as_mut()));
                    }
                    results.lock().unwrap_or_else(|e| e.into_inner()).extend(outs);
                    if let Some(a) = acc {
                        partials.lock().unwrap_or_else(|e| e.into_inner()).push(a);
                    }
                });
            }
        });
        for out in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
            for (t, i) in out.rows.clone().enumerate() {
                let at = (out.bh * n + i) * d;
                fwd.o[at..at + d].copy_from_slice(&out.o[t * d..(t + 1) * d]);
                fwd.rem[out.bh * n + i] = out.log2_rem[t].exp2();
                fwd.log2_rem[out.bh * n + i] = out.log2_rem[t];
                if let Some(g) = grads.as_mut() {
                    g.dq[at..at + d].copy_from_slice(&out.dq[t * d..(t + 1) * d]);
                }
            }
        }
        if let Some(g) = grads.as_mut() {
            for (pk, pv) in partials.into_inner().unwrap_or_else(|e| e.into_inner()) {
                for (x, y) in g.dk[kv.clone()].iter_mut().zip(&pk) {
                    *x += y;
                }
                for (x, y) in g.dv[kv.clone()].iter_mut().zip(&pv) {
                    *x += y;
                }
            }
        }
    }
    (fwd, grads)
}

/// One block's inputs: query head `bh` (b * heads + h), its `rows`, and the K/V head it reads.
struct BlockInputs<'a> {
    shape: Shape,
    opts: &'a Options,
    bh: usize,
    rows: std::ops::Range<usize>,
    q: &'a [f64],
    kh: &'a [f64],
    vh: &'a [f64],
    d_o: Option<&'a [f64]>,
    d_rem: Option<&'a [f64]>,
}

/// One block's rows: o (with a fused remainder), log2 rem and dq, each `rows.len()` rows of D.
struct BlockOut {
    bh: usize,
    rows: std::ops::Range<usize>,
    o: Vec<f64>,
    log2_rem: Vec<f64>,
    dq: Vec<f64>,
}

/// The forward (and backward, adding dk and dv into `acc`) of one block of rows.
fn block(x: &BlockInputs<'_>, mut acc: Option<&mut (Vec<f64>, Vec<f64>)>) -> BlockOut {
    let (n, d) = (x.shape.seq, x.shape.head_dim);
    let opts = x.opts;
    let scale = opts.scale_for(d);
    let scale_log2 = scale * std::f64::consts::LOG2_E;
    let rows: Vec<usize> = x.rows.clone().collect();
    let r = rows.len();
    let qrow = |i: usize| &x.q[(x.bh * n + i) * d..(x.bh * n + i + 1) * d];
    let keys = |i: usize| opts.allowed_keys(i, n);
    let last = rows.iter().map(|&i| keys(i)).max().unwrap_or(0);
    // Pass 1: z and softplus2(z) of every (row, key), and each row's total sum of softplus2.
    let mut z = vec![0.0f64; r * last];
    let mut sp = vec![0.0f64; r * last];
    let mut total = vec![0.0f64; r];
    for j in 0..last {
        let kj = &x.kh[j * d..(j + 1) * d];
        for (t, &i) in rows.iter().enumerate() {
            if j < keys(i) {
                let zz = scale_log2 * dot(qrow(i), kj);
                let s = softplus2(zz);
                z[t * last + j] = zz;
                sp[t * last + j] = s;
                total[t] += s;
            }
        }
    }
    // The nearest-first walk keeps key j while the stick left before it (2^-(sum of softplus2 over
    // the nearer keys)) is at least 2^-T: with keys taken farthest first, the first kept key is the
    // farthest whose nearer keys sum to at most T.
    let mut first = vec![0usize; r];
    let mut log2_rem = vec![0.0f64; r];
    for (t, &i) in rows.iter().enumerate() {
        let mut nearer = total[t]; // sum over keys > j - 1, i.e. from j on
        let mut j0 = 0;
        if let Some(bits) = opts.early_exit_bits {
            // Stops at j when the keys nearer than j (j + 1 ..) already sum to more than T.
            let mut above = 0.0f64;
            j0 = keys(i);
            for j in (0..keys(i)).rev() {
                if above > bits as f64 {
                    break;
                }
                above += sp[t * last + j];
                j0 = j;
            }
            nearer = above;
        }
        first[t] = j0;
        log2_rem[t] = -nearer;
    }
    // Pass 2, keys farthest first: A_ij = 2^(log2 beta_ij - sum of softplus2 over the nearer kept
    // keys), o, and the backward's running C (docs/math.md#backward).
    let fuse = opts.remainder == Remainder::Fuse;
    let mut o = vec![0.0f64; r * d];
    let mut dq = vec![0.0f64; if acc.is_some() { r * d } else { 0 }];
    let mut spent = vec![0.0f64; r]; // sum of softplus2 over the kept keys taken so far, this one included
    let mut c = vec![0.0f64; r];
    let rem: Vec<f64> = log2_rem.iter().map(|l| l.exp2()).collect();
    let d_rem_eff: Vec<f64> = rows
        .iter()
        .enumerate()
        .map(|(t, &i)| {
            let mut e = x.d_rem.map_or(0.0, |dr| dr[x.bh * n + i]);
            if let (true, Some(d_o)) = (fuse, x.d_o) {
                let doi = &d_o[(x.bh * n + i) * d..(x.bh * n + i + 1) * d];
                e += dot(doi, &x.vh[i * d..(i + 1) * d]);
                if let Some(a) = acc.as_mut() {
                    axpy(&mut a.1[i * d..(i + 1) * d], rem[t], doi);
                }
            }
            e
        })
        .collect();
    for j in 0..last {
        let (kj, vj) = (&x.kh[j * d..(j + 1) * d], &x.vh[j * d..(j + 1) * d]);
        for (t, &i) in rows.iter().enumerate() {
            if j < first[t] || j >= keys(i) {
                continue;
            }
            let (zz, s) = (z[t * last + j], sp[t * last + j]);
            spent[t] += s;
            // Nearer kept keys: -log2_rem (all kept) minus those taken so far.
            let nearer = -log2_rem[t] - spent[t];
            let a = (zz - s - nearer).exp2();
            let beta = (zz - s).exp2();
            axpy(&mut o[t * d..(t + 1) * d], a, vj);
            if let (Some(acc), Some(d_o)) = (acc.as_mut(), x.d_o) {
                let doi = &d_o[(x.bh * n + i) * d..(x.bh * n + i + 1) * d];
                let g = a * dot(doi, vj);
                c[t] += g;
                let dz = g - beta * (c[t] + d_rem_eff[t] * rem[t]);
                axpy(&mut dq[t * d..(t + 1) * d], scale * dz, kj);
                axpy(&mut acc.0[j * d..(j + 1) * d], scale * dz, qrow(i));
                axpy(&mut acc.1[j * d..(j + 1) * d], a, doi);
            }
        }
    }
    if fuse {
        for (t, &i) in rows.iter().enumerate() {
            axpy(&mut o[t * d..(t + 1) * d], rem[t], &x.vh[i * d..(i + 1) * d]);
        }
    }
    BlockOut { bh: x.bh, rows: x.rows.clone(), o, log2_rem, dq }
}

#[cfg(test)]
mod tests {
    use super::super::{backward, forward};
    use super::*;
    use crate::spec::Mask;

    fn data(len: usize, seed: u64, scale: f64, offset: f64) -> Vec<f64> {
        // A small deterministic generator: no dependency for a test's data.
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                offset + scale * ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
            })
            .collect()
    }

    fn max_rel(a: &[f64], b: &[f64]) -> f64 {
        let den = b.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt() / den
    }

    #[test]
    fn equals_the_row_by_row_reference() {
        for (mask, remainder, ee, kv_heads, long) in [
            (Mask::Strict, Remainder::Return, None, 2, false),
            (Mask::AttendCurrent, Remainder::Fuse, None, 1, true),
            (Mask::Strict, Remainder::Fuse, Some(3), 1, false),
            (Mask::AttendCurrent, Remainder::Return, Some(12), 2, true),
        ] {
            let shape = Shape::new(2, 4, 53, 12).with_kv_heads(kv_heads);
            let opts = Options { mask, remainder, early_exit_bits: ee, scale: None };
            // Long: scores near -4, so a stick lasts tens of keys; else spent in a few.
            let q = data(shape.len(), 1, 2.0, if long { -1.2 } else { 0.0 });
            let k = data(shape.kv_len(), 2, 2.0, if long { 1.0 } else { 0.0 });
            let v = data(shape.kv_len(), 3, 2.0, 0.0);
            let d_o = data(shape.len(), 4, 2.0, 0.0);
            let d_rem = data(shape.rows(), 5, 1.0, 0.0);
            let want_f = forward(shape, &opts, &q, &k, &v);
            let want_g = backward(shape, &opts, &q, &k, &v, &d_o, Some(&d_rem));
            for threads in [1, 3] {
                let (f, g) = forward_backward(shape, &opts, &q, &k, &v, Some(&d_o), Some(&d_rem), threads);
                let g = g.expect("gradients asked for");
                let case = format!("{mask:?} {remainder:?} {ee:?} kv {kv_heads} long {long} threads {threads}");
                assert!(max_rel(&f.o, &want_f.o) < 1e-12, "o {case}");
                assert!(max_rel(&f.log2_rem, &want_f.log2_rem) < 1e-12, "log2_rem {case}");
                assert!(max_rel(&f.rem, &want_f.rem) < 1e-12, "rem {case}");
                assert!(max_rel(&g.dq, &want_g.dq) < 1e-12, "dq {case}");
                assert!(max_rel(&g.dk, &want_g.dk) < 1e-12, "dk {case}");
                assert!(max_rel(&g.dv, &want_g.dv) < 1e-12, "dv {case}");
            }
        }
    }

    #[test]
    fn the_forward_alone_needs_no_gradients() {
        let shape = Shape::new(1, 2, 40, 8);
        let (q, k, v) =
            (data(shape.len(), 7, 2.0, 0.0), data(shape.len(), 8, 2.0, 0.0), data(shape.len(), 9, 2.0, 0.0));
        let (f, g) = forward_backward(shape, &Options::causal(), &q, &k, &v, None, None, 2);
        assert!(g.is_none());
        assert!(max_rel(&f.o, &forward(shape, &Options::causal(), &q, &k, &v).o) < 1e-12);
    }
}
