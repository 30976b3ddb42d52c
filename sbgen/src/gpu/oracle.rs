//! The float64 reference ([`sbgen_runtime::reference`]) run over many heads and many option sets at
//! once. Each (sequence, query head) of the inputs' canonical order is contiguous and independent, so
//! each (options, head) pair is one job for [`crate::pool`]; every row and every head is computed in
//! full.

use super::data::{widen, HeadRef, Inputs, Sequences};
use crate::pool;
use sbgen_runtime::reference::{self, Grads, Options, Shape};

/// The reference's outputs for one option set, BHND.
#[derive(Clone, Debug)]
pub struct Expected {
    pub o: Vec<f64>,
    pub rem: Vec<f64>,
    pub log2_rem: Vec<f64>,
    /// Present when the backward was asked for (with `d_rem` = the inputs' d_rem).
    pub grads: Option<Grads>,
}

/// The reference forward (and backward when `backward`) of `inputs` for each option set, in the
/// inputs' canonical order. Each (sequence, query head) is a job on its K/V head; dk and dv sum
/// the jobs of a group.
pub fn expected(inputs: &Inputs, options: &[Options], backward: bool, threads: usize) -> Vec<Expected> {
    let shape = inputs.shape;
    let d = shape.head_dim;
    let heads = inputs.heads();
    let jobs: Vec<(&Options, &HeadRef)> = options.iter().flat_map(|o| heads.iter().map(move |h| (o, h))).collect();
    let results = pool::map(&jobs, threads, |&(opts, r)| {
        let one = Shape::new(1, 1, r.len, d);
        let (q_block, kv_block) = (r.q..r.q + r.len * d, r.kv..r.kv + r.len * d);
        let q = widen(&inputs.q[q_block.clone()]);
        let k = widen(&inputs.k[kv_block.clone()]);
        let v = widen(&inputs.v[kv_block]);
        let fwd = reference::forward(one, opts, &q, &k, &v);
        let grads = backward.then(|| {
            let d_o = widen(&inputs.d_o[q_block]);
            let d_rem = widen(&inputs.d_rem[r.rows..r.rows + r.len]);
            reference::backward(one, opts, &q, &k, &v, &d_o, Some(&d_rem))
        });
        (fwd, grads)
    });
    let mut results = results.into_iter();
    options
        .iter()
        .map(|_| {
            let mut e = Expected {
                o: Vec::with_capacity(inputs.q_len()),
                rem: Vec::with_capacity(inputs.rows()),
                log2_rem: Vec::with_capacity(inputs.rows()),
                grads: backward.then(|| Grads {
                    dq: Vec::with_capacity(inputs.q_len()),
                    dk: vec![0.0; inputs.kv_len()],
                    dv: vec![0.0; inputs.kv_len()],
                }),
            };
            for r in &heads {
                let (fwd, grads) = results.next().expect("one result per job");
                e.o.extend(fwd.o);
                e.rem.extend(fwd.rem);
                e.log2_rem.extend(fwd.log2_rem);
                if let (Some(all), Some(g)) = (e.grads.as_mut(), grads) {
                    all.dq.extend(g.dq);
                    // The query heads of a group add into their K/V head, in head order.
                    for (x, y) in all.dk[r.kv..r.kv + r.len * d].iter_mut().zip(&g.dk) {
                        *x += y;
                    }
                    for (x, y) in all.dv[r.kv..r.kv + r.len * d].iter_mut().zip(&g.dv) {
                        *x += y;
                    }
                }
            }
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::data::{make_inputs, Regime};
    use sbgen_runtime::spec::{Dtype, Mask, Remainder};

    #[test]
    fn per_head_jobs_match_the_whole_tensor_reference() {
        let shape = Shape::new(2, 3, 9, 64);
        let inputs = make_inputs(shape, Dtype::Bf16, Regime::Random, 3);
        let opts =
            [Options::causal(), Options { mask: Mask::AttendCurrent, remainder: Remainder::Fuse, ..Options::causal() }];
        let got = expected(&inputs, &opts, true, 4);
        for (o, e) in opts.iter().zip(&got) {
            let (q, k, v) = (widen(&inputs.q), widen(&inputs.k), widen(&inputs.v));
            let whole = reference::forward(shape, o, &q, &k, &v);
            assert_eq!(whole.o, e.o);
            assert_eq!(whole.log2_rem, e.log2_rem);
            let g = reference::backward(shape, o, &q, &k, &v, &widen(&inputs.d_o), Some(&widen(&inputs.d_rem)));
            assert_eq!(&g, e.grads.as_ref().unwrap());
        }
    }

    #[test]
    fn grouped_packed_jobs_match_the_reference_per_sequence() {
        use crate::gpu::data::make_packed_inputs;
        let shape = Shape::new(1, 4, 1, 16).with_kv_heads(2);
        let lens = [3, 0, 1, 6];
        let inputs = make_packed_inputs(shape, &lens, Dtype::F16, Regime::Random, 5);
        let opts = [Options::causal()];
        let got = &expected(&inputs, &opts, true, 3)[0];
        let g = got.grads.as_ref().unwrap();
        let (mut q_at, mut kv_at, mut row_at) = (0, 0, 0);
        for &len in &lens {
            // Each sequence alone, as a batch of one with 4 query heads on 2 K/V heads.
            let one = Shape::new(1, 4, len, 16).with_kv_heads(2);
            let (nq, nkv) = (one.len(), one.kv_len());
            let w = |x: &[f32], at: usize, n: usize| widen(&x[at..at + n]);
            let (q, k, v) = (w(&inputs.q, q_at, nq), w(&inputs.k, kv_at, nkv), w(&inputs.v, kv_at, nkv));
            let f = reference::forward(one, &opts[0], &q, &k, &v);
            assert_eq!(f.o, got.o[q_at..q_at + nq]);
            assert_eq!(f.rem, got.rem[row_at..row_at + one.rows()]);
            let d_rem = w(&inputs.d_rem, row_at, one.rows());
            let b = reference::backward(one, &opts[0], &q, &k, &v, &w(&inputs.d_o, q_at, nq), Some(&d_rem));
            assert_eq!(b.dq, g.dq[q_at..q_at + nq]);
            for (x, y) in b.dk.iter().zip(&g.dk[kv_at..kv_at + nkv]).chain(b.dv.iter().zip(&g.dv[kv_at..kv_at + nkv])) {
                assert!((x - y).abs() <= 1e-12 * x.abs().max(1.0), "{x} vs {y}");
            }
            (q_at, kv_at, row_at) = (q_at + nq, kv_at + nkv, row_at + one.rows());
        }
    }
}
