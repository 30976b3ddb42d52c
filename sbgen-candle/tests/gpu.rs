//! The GPU path (feature `cuda`) against sbgen's float64 reference: forward, gradients through
//! candle's backprop (from o and from rem), packed batches, and the KV cache's decode, contiguous
//! and paged. Skips, saying so, where no CUDA device can be opened.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{host, normal, ref_options, rel_l2, to_bhnd};
use rand::rngs::StdRng;
use rand::SeedableRng;
use sbgen_candle::{stick_breaking_attention, stick_breaking_attention_varlen, Remainder, SbOptions};
use sbgen_runtime::reference::{self, Shape};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device ({e})");
            None
        }
    }
}

/// bf16 inputs: the kernels read bf16 and accumulate in f32, so errors of a few 1e-3 are expected.
const TOL: f64 = 2e-2;

#[test]
fn forward_and_gradients_match_the_float64_reference() {
    let Some(dev) = gpu() else { return };
    // (batch, seq, heads, kv_heads, head_dim, dtype, options)
    let cases = [
        (2, 200, 4, 2, 64, DType::BF16, SbOptions::default()),
        (
            1,
            129,
            8,
            8,
            128,
            DType::F16,
            SbOptions { attend_current: true, remainder: Remainder::Fuse, ..SbOptions::default() },
        ),
        (3, 77, 6, 3, 40, DType::BF16, SbOptions { scale: Some(0.2), ..SbOptions::default() }),
        (
            2,
            300,
            4,
            1,
            128,
            DType::BF16,
            SbOptions { early_exit_bits: Some(12), remainder: Remainder::Fuse, ..SbOptions::default() },
        ),
    ];
    for (c, &(b, n, h, hk, d, dtype, opts)) in cases.iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(100 + c as u64);
        let var = |x: Vec<f32>, s: (usize, usize, usize, usize)| {
            Var::from_tensor(&Tensor::from_vec(x, s, &dev).unwrap().to_dtype(dtype).unwrap()).unwrap()
        };
        let q = var(normal(&mut rng, b * n * h * d), (b, n, h, d));
        let k = var(normal(&mut rng, b * n * hk * d), (b, n, hk, d));
        let v = var(normal(&mut rng, b * n * hk * d), (b, n, hk, d));
        let (w, u) = (normal(&mut rng, b * n * h * d), normal(&mut rng, b * n * h));
        let (o, rem) = stick_breaking_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &opts).unwrap();
        assert_eq!(
            (o.dims(), o.dtype(), rem.dims(), rem.dtype()),
            (&[b, n, h, d][..], dtype, &[b, n, h][..], DType::F32)
        );
        let wt = Tensor::from_vec(w.clone(), (b, n, h, d), &dev).unwrap();
        let ut = Tensor::from_vec(u.clone(), (b, n, h), &dev).unwrap();
        let o32 = o.to_dtype(DType::F32).unwrap();
        let loss = ((&o32 * &wt).unwrap().sum_all().unwrap() + (&rem * &ut).unwrap().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();

        let shape = Shape::new(b, h, n, d).with_kv_heads(hk);
        let ro = ref_options(&opts);
        let (qh, kh, vh) = (host(q.as_tensor()), host(k.as_tensor()), host(v.as_tensor()));
        let (qr, kr, vr) = (to_bhnd(&qh, b, n, h, d), to_bhnd(&kh, b, n, hk, d), to_bhnd(&vh, b, n, hk, d));
        let want = reference::forward(shape, &ro, &qr, &kr, &vr);
        let got_o: Vec<f32> = to_bhnd(&host(&o), b, n, h, d).iter().map(|&x| x as f32).collect();
        let got_rem: Vec<f32> = to_bhnd(&host(&rem), b, n, h, 1).iter().map(|&x| x as f32).collect();
        assert!(got_o.iter().chain(&got_rem).all(|x| x.is_finite()), "case {c}: non-finite output");
        let (eo, er) = (rel_l2(&got_o, &want.o), rel_l2(&got_rem, &want.rem));
        eprintln!("case {c}: o {eo:.2e} rem {er:.2e}");
        assert!(eo < TOL && er < TOL, "case {c}: o {eo:e}, rem {er:e}");

        let d_rem = to_bhnd(&u, b, n, h, 1);
        let ref_grads = reference::backward(shape, &ro, &qr, &kr, &vr, &to_bhnd(&w, b, n, h, d), Some(&d_rem));
        for (name, var, want, heads) in
            [("dq", &q, &ref_grads.dq, h), ("dk", &k, &ref_grads.dk, hk), ("dv", &v, &ref_grads.dv, hk)]
        {
            let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("case {c}: no {name}"));
            assert_eq!(got.dtype(), dtype);
            let got: Vec<f32> = to_bhnd(&host(got), b, n, heads, d).iter().map(|&x| x as f32).collect();
            assert!(got.iter().all(|x| x.is_finite()), "case {c}: non-finite {name}");
            let err = rel_l2(&got, want);
            eprintln!("case {c}: {name} {err:.2e}");
            assert!(err < TOL, "case {c}: {name} relative L2 error {err:e}");
        }
    }
}

#[test]
fn packed_batch_matches_its_sequences_and_the_reference() {
    let Some(dev) = gpu() else { return };
    let (h, hk, d) = (4, 2, 64);
    let lens = [1usize, 130, 0, 67];
    let t: usize = lens.iter().sum();
    let mut rng = StdRng::seed_from_u64(9);
    let to_dev = |x: Vec<f32>, s: (usize, usize, usize)| {
        Var::from_tensor(&Tensor::from_vec(x, s, &dev).unwrap().to_dtype(DType::BF16).unwrap()).unwrap()
    };
    let q = to_dev(normal(&mut rng, t * h * d), (t, h, d));
    let k = to_dev(normal(&mut rng, t * hk * d), (t, hk, d));
    let v = to_dev(normal(&mut rng, t * hk * d), (t, hk, d));
    let mut cu = vec![0i64];
    lens.iter().for_each(|l| cu.push(cu.last().unwrap() + *l as i64));
    let cu = Tensor::new(cu.as_slice(), &dev).unwrap();
    let opts = SbOptions { remainder: Remainder::Fuse, ..SbOptions::default() };
    let (o, rem) = stick_breaking_attention_varlen(q.as_tensor(), k.as_tensor(), v.as_tensor(), &cu, &opts).unwrap();
    assert_eq!((o.dims(), rem.dims()), (&[t, h, d][..], &[t, h][..]));
    let loss = (o.to_dtype(DType::F32).unwrap().sum_all().unwrap() + rem.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let (qh, kh, vh, oh, remh) = (host(q.as_tensor()), host(k.as_tensor()), host(v.as_tensor()), host(&o), host(&rem));
    let (dqh, dkh) = (host(grads.get(q.as_tensor()).unwrap()), host(grads.get(k.as_tensor()).unwrap()));
    let ro = ref_options(&opts);
    let mut start = 0;
    for (s, &n) in lens.iter().enumerate() {
        if n > 0 {
            let shape = Shape::new(1, h, n, d).with_kv_heads(hk);
            let part = |x: &[f32], heads: usize| to_bhnd(&x[start * heads * d..][..n * heads * d], 1, n, heads, d);
            let (qr, kr, vr) = (part(&qh, h), part(&kh, hk), part(&vh, hk));
            let want = reference::forward(shape, &ro, &qr, &kr, &vr);
            let got: Vec<f32> = part(&oh, h).iter().map(|&x| x as f32).collect();
            let got_rem: Vec<f32> =
                to_bhnd(&remh[start * h..][..n * h], 1, n, h, 1).iter().map(|&x| x as f32).collect();
            let (eo, er) = (rel_l2(&got, &want.o), rel_l2(&got_rem, &want.rem));
            let ones = vec![1.0f64; n * h];
            let g = reference::backward(shape, &ro, &qr, &kr, &vr, &vec![1.0; n * h * d], Some(&ones));
            let edq = rel_l2(&part(&dqh, h).iter().map(|&x| x as f32).collect::<Vec<_>>(), &g.dq);
            let edk = rel_l2(&part(&dkh, hk).iter().map(|&x| x as f32).collect::<Vec<_>>(), &g.dk);
            eprintln!("sequence {s} ({n} tokens): o {eo:.2e} rem {er:.2e} dq {edq:.2e} dk {edk:.2e}");
            assert!(eo < TOL && er < TOL && edq < TOL && edk < TOL, "sequence {s}");
        }
        start += n;
    }
}

#[test]
fn kv_cache_decode_matches_the_float64_reference() {
    let Some(dev) = gpu() else { return };
    let cases = [
        SbOptions::default(),
        SbOptions { attend_current: true, remainder: Remainder::Fuse, ..SbOptions::default() },
        SbOptions { early_exit_bits: Some(8), scale: Some(0.3), ..SbOptions::default() },
    ];
    for (c, opts) in cases.iter().enumerate() {
        for dtype in [DType::BF16, DType::F16] {
            for paged in [false, true] {
                let err = common::check_kv_cache_decode(&dev, dtype, paged, opts, 50 + c as u64, TOL);
                // Relative L2 error, or with early exit the largest error as a fraction of its bound.
                eprintln!("decode case {c} {dtype:?} paged {paged}: {err:.2e}");
            }
        }
    }
}

#[test]
fn gpu_refusals_name_the_problem() {
    let Some(dev) = gpu() else { return };
    let x = Tensor::zeros((1, 8, 2, 32), DType::F32, &dev).unwrap();
    let msg = stick_breaking_attention(&x, &x, &x, &SbOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("bf16 or f16 on a CUDA device"), "{msg}");
    let x = x.to_dtype(DType::BF16).unwrap();
    let opts = SbOptions { early_exit_bits: Some(3), ..SbOptions::default() };
    let msg = stick_breaking_attention(&x, &x, &x, &opts).unwrap_err().to_string();
    assert!(msg.contains("early_exit_bits"), "{msg}");
    let cpu = Tensor::zeros((1, 8, 2, 32), DType::BF16, &Device::Cpu).unwrap();
    let msg = stick_breaking_attention(&x, &cpu, &x, &SbOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("one device"), "{msg}");
}
