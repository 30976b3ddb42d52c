//! The float64 reference ([`sbgen_runtime::reference`]) run over many heads and many option sets at
//! once. Heads of a BHND tensor are contiguous and independent, so each (options, head) pair is one
//! job for [`crate::pool`]; every row and every head is computed in full.

use super::data::{widen, Inputs};
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

/// The reference forward (and backward when `backward`) of `inputs` for each option set.
pub fn expected(inputs: &Inputs, options: &[Options], backward: bool, threads: usize) -> Vec<Expected> {
    let shape = inputs.shape;
    let heads = shape.batch * shape.heads;
    let head_len = shape.seq * shape.head_dim;
    let one = Shape::new(1, 1, shape.seq, shape.head_dim);
    let jobs: Vec<(&Options, usize)> = options.iter().flat_map(|o| (0..heads).map(move |h| (o, h))).collect();
    let results = pool::map(&jobs, threads, |&(opts, h)| {
        let range = h * head_len..(h + 1) * head_len;
        let rows = h * shape.seq..(h + 1) * shape.seq;
        let q = widen(&inputs.q[range.clone()]);
        let k = widen(&inputs.k[range.clone()]);
        let v = widen(&inputs.v[range.clone()]);
        let fwd = reference::forward(one, opts, &q, &k, &v);
        let grads = backward.then(|| {
            let d_o = widen(&inputs.d_o[range.clone()]);
            let d_rem = widen(&inputs.d_rem[rows.clone()]);
            reference::backward(one, opts, &q, &k, &v, &d_o, Some(&d_rem))
        });
        (fwd, grads)
    });
    let mut results = results.into_iter();
    options
        .iter()
        .map(|_| {
            let mut e = Expected {
                o: Vec::with_capacity(shape.len()),
                rem: Vec::with_capacity(shape.rows()),
                log2_rem: Vec::with_capacity(shape.rows()),
                grads: backward.then(|| Grads { dq: Vec::new(), dk: Vec::new(), dv: Vec::new() }),
            };
            for _ in 0..heads {
                let (fwd, grads) = results.next().expect("one result per job");
                e.o.extend(fwd.o);
                e.rem.extend(fwd.rem);
                e.log2_rem.extend(fwd.log2_rem);
                if let (Some(all), Some(g)) = (e.grads.as_mut(), grads) {
                    all.dq.extend(g.dq);
                    all.dk.extend(g.dk);
                    all.dv.extend(g.dv);
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
}
