//! The CPU path against sbgen's float64 reference (forward and backward), against finite
//! differences of itself, packed batches against dense ones, and the API's refusals.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{host, normal, ref_options, rel_l2, to_bhnd};
use rand::rngs::StdRng;
use rand::SeedableRng;
use sbgen_candle::{stick_breaking_attention, stick_breaking_attention_varlen, Remainder, SbOptions};
use sbgen_runtime::reference::{self, Shape};

#[test]
fn forward_and_gradients_match_the_float64_reference() {
    let (b, n, h, hk, d) = (2, 77, 4, 2, 16);
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

#[test]
fn kv_cache_decode_matches_the_float64_reference() {
    let cases = [
        SbOptions::default(),
        SbOptions { attend_current: true, remainder: Remainder::Fuse, ..SbOptions::default() },
        SbOptions { early_exit_bits: Some(8), scale: Some(0.3), ..SbOptions::default() },
    ];
    for (c, opts) in cases.iter().enumerate() {
        for paged in [false, true] {
            // f32 caches are read in place, others converted; o comes back in the cache's dtype.
            common::check_kv_cache_decode(&Device::Cpu, DType::F32, paged, opts, c as u64, 1e-5);
            common::check_kv_cache_decode(&Device::Cpu, DType::BF16, paged, opts, c as u64, 1e-2);
        }
    }
}

#[test]
fn kv_cache_refuses_what_does_not_fit() {
    use sbgen_candle::{PagePool, SbKvCache};
    let dev = Device::Cpu;
    let pool = |num_pages, page_size, max_pages| PagePool { num_pages, page_size, max_pages };
    let err = |r: candle_core::Result<SbKvCache>| r.unwrap_err().to_string();
    assert!(err(SbKvCache::paged(1, pool(4, 24, 2), 1, 8, DType::F32, &dev)).contains("page_size = 24"));
    assert!(err(SbKvCache::contiguous(1, 8, 1, 300, DType::F32, &dev)).contains("head_dim = 300"));
    let mut cache = SbKvCache::paged(2, pool(3, 16, 2), 1, 8, DType::F32, &dev).unwrap();
    let q = Tensor::zeros((2, 2, 8), DType::F32, &dev).unwrap();
    let msg = cache.decode(&q, &SbOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("sequence 0 holds no token"), "{msg}");
    // 2 sequences of 20 tokens need 4 pages; the pool has 3. Nothing is written.
    let kv = Tensor::zeros((2, 20, 1, 8), DType::F32, &dev).unwrap();
    let msg = cache.append(&kv, &kv).unwrap_err().to_string();
    assert!(msg.contains("needs 4 new pages and 3 are free"), "{msg}");
    assert_eq!(cache.lens(), &[0, 0]);
    let long = Tensor::zeros((33, 1, 8), DType::F32, &dev).unwrap();
    let msg = cache.append_to(1, &long, &long).unwrap_err().to_string();
    assert!(msg.contains("at most 32 per sequence"), "{msg}");
    let wrong = Tensor::zeros((2, 1, 2, 8), DType::F32, &dev).unwrap();
    assert!(cache.append(&wrong, &wrong).unwrap_err().to_string().contains("`k` has shape [2, 1, 2, 8]"));
}
