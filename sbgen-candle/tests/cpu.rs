//! The CPU path against sbgen's float64 reference (forward and backward), against finite
//! differences of itself, packed batches against dense ones, and the API's refusals.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sbgen_candle::{stick_breaking_attention, stick_breaking_attention_varlen, Remainder, SbOptions};
use sbgen_runtime::reference::{self, Shape};
use sbgen_runtime::{Mask, Remainder as RefRemainder};

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    // Box-Muller: rand 0.8 without rand_distr.
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `[B, N, H, D]` (candle) to `[B, H, N, D]` (the reference), as f64.
fn to_bhnd(x: &[f32], b: usize, n: usize, h: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for t in 0..n {
            for hi in 0..h {
                for di in 0..d {
                    out[((bi * h + hi) * n + t) * d + di] = x[((bi * n + t) * h + hi) * d + di] as f64;
                }
            }
        }
    }
    out
}

fn ref_options(opts: &SbOptions) -> reference::Options {
    reference::Options {
        mask: if opts.attend_current { Mask::AttendCurrent } else { Mask::Strict },
        remainder: match opts.remainder {
            Remainder::Return => RefRemainder::Return,
            Remainder::Fuse => RefRemainder::Fuse,
        },
        early_exit_bits: opts.early_exit_bits,
        scale: opts.scale,
    }
}

#[test]
fn forward_and_gradients_match_the_float64_reference() {
    let (b, n, h, hk, d) = (2, 37, 4, 2, 16);
    let cases = [
        SbOptions::default(),
        SbOptions { attend_current: true, remainder: Remainder::Fuse, ..SbOptions::default() },
        SbOptions { scale: Some(0.7), ..SbOptions::default() },
        SbOptions { early_exit_bits: Some(6), remainder: Remainder::Fuse, ..SbOptions::default() },
    ];
    for (c, opts) in cases.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(c as u64);
        let dev = Device::Cpu;
        let (qh, kh, vh) =
            (normal(&mut rng, b * n * h * d), normal(&mut rng, b * n * hk * d), normal(&mut rng, b * n * hk * d));
        let (w, u) = (normal(&mut rng, b * n * h * d), normal(&mut rng, b * n * h));
        let q = Var::from_vec(qh.clone(), (b, n, h, d), &dev).unwrap();
        let k = Var::from_vec(kh.clone(), (b, n, hk, d), &dev).unwrap();
        let v = Var::from_vec(vh.clone(), (b, n, hk, d), &dev).unwrap();
        let (o, rem) = stick_breaking_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), opts).unwrap();
        let wt = Tensor::from_vec(w.clone(), (b, n, h, d), &dev).unwrap();
        let ut = Tensor::from_vec(u.clone(), (b, n, h), &dev).unwrap();
        let loss = ((&o * &wt).unwrap().sum_all().unwrap() + (&rem * &ut).unwrap().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();

        let shape = Shape::new(b, h, n, d).with_kv_heads(hk);
        let ro = ref_options(opts);
        let (qr, kr, vr) = (to_bhnd(&qh, b, n, h, d), to_bhnd(&kh, b, n, hk, d), to_bhnd(&vh, b, n, hk, d));
        let want = reference::forward(shape, &ro, &qr, &kr, &vr);
        let got_o = to_bhnd(&host(&o), b, n, h, d).iter().map(|&x| x as f32).collect::<Vec<_>>();
        let got_rem = to_bhnd(&host(&rem), b, n, h, 1).iter().map(|&x| x as f32).collect::<Vec<_>>();
        assert!(rel_l2(&got_o, &want.o) < 1e-5, "case {c}: o {:e}", rel_l2(&got_o, &want.o));
        assert!(rel_l2(&got_rem, &want.rem) < 1e-5, "case {c}: rem {:e}", rel_l2(&got_rem, &want.rem));

        let d_rem = to_bhnd(&u, b, n, h, 1);
        let ref_grads = reference::backward(shape, &ro, &qr, &kr, &vr, &to_bhnd(&w, b, n, h, d), Some(&d_rem));
        for (name, var, want, heads) in
            [("dq", &q, &ref_grads.dq, h), ("dk", &k, &ref_grads.dk, hk), ("dv", &v, &ref_grads.dv, hk)]
        {
            let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("case {c}: no {name}"));
            let got = to_bhnd(&host(got), b, n, heads, d).iter().map(|&x| x as f32).collect::<Vec<_>>();
            let err = rel_l2(&got, want);
            assert!(err < 1e-4, "case {c}: {name} relative L2 error {err:e}");
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let (b, n, h, hk, d) = (1, 9, 2, 1, 8);
    let opts = SbOptions { remainder: Remainder::Fuse, attend_current: true, ..SbOptions::default() };
    let mut rng = StdRng::seed_from_u64(7);
    let dev = Device::Cpu;
    let inputs = [normal(&mut rng, b * n * h * d), normal(&mut rng, b * n * hk * d), normal(&mut rng, b * n * hk * d)];
    let (w, u) = (normal(&mut rng, b * n * h * d), normal(&mut rng, b * n * h));
    let wt = Tensor::from_vec(w, (b, n, h, d), &dev).unwrap();
    let ut = Tensor::from_vec(u, (b, n, h), &dev).unwrap();
    let shapes = [(b, n, h, d), (b, n, hk, d), (b, n, hk, d)];
    let loss = |x: &[Vec<f32>; 3]| -> Tensor {
        let t: Vec<Tensor> = x.iter().zip(shapes).map(|(x, s)| Tensor::from_vec(x.clone(), s, &dev).unwrap()).collect();
        let (o, rem) = stick_breaking_attention(&t[0], &t[1], &t[2], &opts).unwrap();
        ((&o * &wt).unwrap().sum_all().unwrap() + (&rem * &ut).unwrap().sum_all().unwrap()).unwrap()
    };
    let vars: Vec<Var> = inputs.iter().zip(shapes).map(|(x, s)| Var::from_vec(x.clone(), s, &dev).unwrap()).collect();
    let (o, rem) =
        stick_breaking_attention(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), &opts).unwrap();
    let l = ((&o * &wt).unwrap().sum_all().unwrap() + (&rem * &ut).unwrap().sum_all().unwrap()).unwrap();
    let grads = l.backward().unwrap();
    let step = 1e-2f32;
    for (which, var) in vars.iter().enumerate() {
        let analytic = host(grads.get(var.as_tensor()).unwrap());
        for idx in (0..inputs[which].len()).step_by(5) {
            let mut plus = inputs.clone();
            plus[which][idx] += step;
            let mut minus = inputs.clone();
            minus[which][idx] -= step;
            let lp = loss(&plus).to_scalar::<f32>().unwrap() as f64;
            let lm = loss(&minus).to_scalar::<f32>().unwrap() as f64;
            let numeric = (lp - lm) / (2.0 * step as f64);
            let a = analytic[idx] as f64;
            assert!(
                (numeric - a).abs() <= 2e-2 * a.abs().max(0.1),
                "input {which} element {idx}: finite difference {numeric:.5}, autograd {a:.5}"
            );
        }
    }
}

#[test]
fn a_packed_batch_is_its_sequences_attended_one_by_one() {
    let (h, hk, d) = (4, 4, 8);
    let lens = [5usize, 0, 11, 1];
    let total: usize = lens.iter().sum();
    let mut rng = StdRng::seed_from_u64(3);
    let dev = Device::Cpu;
    let q = Tensor::from_vec(normal(&mut rng, total * h * d), (total, h, d), &dev).unwrap();
    let k = Tensor::from_vec(normal(&mut rng, total * hk * d), (total, hk, d), &dev).unwrap();
    let v = Tensor::from_vec(normal(&mut rng, total * hk * d), (total, hk, d), &dev).unwrap();
    let mut cu = vec![0u32];
    for l in lens {
        cu.push(cu.last().unwrap() + l as u32);
    }
    let cu = Tensor::new(cu.as_slice(), &dev).unwrap();
    let opts = SbOptions { remainder: Remainder::Fuse, ..SbOptions::default() };
    let (o, rem) = stick_breaking_attention_varlen(&q, &k, &v, &cu, &opts).unwrap();
    let mut start = 0;
    for len in lens {
        if len > 0 {
            let one = |x: &Tensor| x.narrow(0, start, len).unwrap().unsqueeze(0).unwrap();
            let (o1, rem1) = stick_breaking_attention(&one(&q), &one(&k), &one(&v), &opts).unwrap();
            assert_eq!(host(&o1), host(&o.narrow(0, start, len).unwrap()), "sequence at {start}");
            assert_eq!(host(&rem1), host(&rem.narrow(0, start, len).unwrap()), "sequence at {start}");
        }
        start += len;
    }
}

#[test]
fn half_precision_inputs_give_their_dtype_back() {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (1, 12, 2, 16), &dev).unwrap();
    let (o32, rem32) = stick_breaking_attention(&q, &q, &q, &SbOptions::default()).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let qh = q.to_dtype(dtype).unwrap();
        let (o, rem) = stick_breaking_attention(&qh, &qh, &qh, &SbOptions::default()).unwrap();
        assert_eq!((o.dtype(), rem.dtype()), (dtype, DType::F32));
        let want: Vec<f64> = host(&o32).iter().map(|&x| x as f64).collect();
        assert!(rel_l2(&host(&o), &want) < 1e-2, "{dtype:?}");
        let want: Vec<f64> = host(&rem32).iter().map(|&x| x as f64).collect();
        assert!(rel_l2(&host(&rem), &want) < 1e-2, "{dtype:?}");
    }
}

#[test]
fn bad_inputs_are_refused_naming_what_is_wrong() {
    let dev = Device::Cpu;
    let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &dev).unwrap();
    let q = t(&[2, 8, 4, 16]);
    let kv = t(&[2, 8, 2, 16]);
    let err = |r: candle_core::Result<(Tensor, Tensor)>| r.map(|_| ()).expect_err("refused").to_string();
    let d = SbOptions::default();
    let e = err(stick_breaking_attention(&t(&[8, 4, 16]), &kv, &kv, &d));
    assert!(e.contains("`q` has shape [8, 4, 16]") && e.contains("(batch, seq, heads, head_dim)"), "{e}");
    let e = err(stick_breaking_attention(&q, &t(&[2, 8, 3, 16]), &t(&[2, 8, 3, 16]), &d));
    assert!(e.contains("kv_heads >= 1 dividing q's heads (4)"), "{e}");
    let e = err(stick_breaking_attention(&q, &t(&[2, 9, 2, 16]), &kv, &d));
    assert!(e.contains("`k` has shape [2, 9, 2, 16]") && e.contains("seq 8"), "{e}");
    let e = err(stick_breaking_attention(&q, &kv, &t(&[2, 8, 2, 8]), &d));
    assert!(e.contains("`v` has shape [2, 8, 2, 8]"), "{e}");
    let e = err(stick_breaking_attention(&q, &kv.to_dtype(DType::BF16).unwrap(), &kv, &d));
    assert!(e.contains("`k` is BF16") && e.contains("the same for q, k and v"), "{e}");
    let e = err(stick_breaking_attention(&q.to_dtype(DType::F64).unwrap(), &kv, &kv, &d));
    assert!(e.contains("`q` is F64"), "{e}");
    for bits in [0, 127] {
        let e = err(stick_breaking_attention(&q, &kv, &kv, &SbOptions { early_exit_bits: Some(bits), ..d }));
        assert!(e.contains(&format!("`early_exit_bits` = {bits} is not allowed: 1..=126")), "{e}");
    }
    let e = err(stick_breaking_attention(&q, &kv, &kv, &SbOptions { scale: Some(f64::NAN), ..d }));
    assert!(e.contains("`scale` = NaN"), "{e}");

    let (qp, kvp) = (t(&[10, 4, 16]), t(&[10, 2, 16]));
    let cu = |x: &[u32]| Tensor::new(x, &dev).unwrap();
    let e = err(stick_breaking_attention_varlen(&qp, &kvp, &kvp, &cu(&[0, 4, 9]), &d));
    assert!(e.contains("runs from 0 to 9: allowed from 0 to total_tokens = 10"), "{e}");
    let e = err(stick_breaking_attention_varlen(&qp, &kvp, &kvp, &cu(&[0, 6, 4, 10]), &d));
    assert!(e.contains("decreases at entry 2"), "{e}");
    let e = err(stick_breaking_attention_varlen(&qp, &kvp, &kvp, &cu(&[0]), &d));
    assert!(e.contains("allowed (batch + 1) with batch >= 1"), "{e}");
    let e = err(stick_breaking_attention_varlen(&qp, &kvp, &kvp, &Tensor::new(&[0f32, 10.0], &dev).unwrap(), &d));
    assert!(e.contains("`cu_seqlens` is F32") && e.contains("u32 or i64"), "{e}");
    // candle keeps the message of the crate's error (its type is erased).
    match stick_breaking_attention(&q, &kv, &t(&[1]), &d) {
        Err(e) => assert!(e.to_string().contains("`v` has shape [1]: the shape of k, [2, 8, 2, 16]"), "{e}"),
        Ok(_) => panic!("a v of the wrong shape was accepted"),
    }
}
