//! Helpers shared by the CPU and GPU tests.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use sbgen_candle::{Remainder, SbOptions};
use sbgen_runtime::reference;
use sbgen_runtime::{Mask, Remainder as RefRemainder};

pub fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    // Box-Muller: rand 0.8 without rand_distr.
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-300)).sqrt()
}

pub fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// `[B, N, H, D]` (candle) to `[B, H, N, D]` (the reference), as f64.
pub fn to_bhnd(x: &[f32], b: usize, n: usize, h: usize, d: usize) -> Vec<f64> {
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

pub fn ref_options(opts: &SbOptions) -> reference::Options {
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

/// Fills an [`sbgen_candle::SbKvCache`] with ragged sequences (prompts of different lengths, then
/// token-by-token steps, some sequences crossing page boundaries) and checks every decode step's o
/// and rem against `reference::decode` on the same tokens: relative L2 error below `tol`; with early
/// exit, against the reference without it, within what early exit may drop (docs/checking.md: keys
/// worth less than 2^-T of the stick, so `|delta o| <= 2^-T max|v|`, twice that fused, and
/// `|delta rem| <= 2^-T`) plus `tol` of the largest output. Returns the largest error seen.
pub fn check_kv_cache_decode(
    dev: &candle_core::Device,
    dtype: DType,
    paged: bool,
    opts: &SbOptions,
    seed: u64,
    tol: f64,
) -> f64 {
    use rand::SeedableRng;
    use sbgen_candle::{PagePool, SbKvCache};
    use sbgen_runtime::reference::DecodeShape;
    let (b, h, hk, d) = (3, 4, 2, 40);
    let prompts = [17usize, 33, 1];
    let steps = 4;
    let capacity = 48;
    let mut cache = if paged {
        SbKvCache::paged(b, PagePool { num_pages: 12, page_size: 16, max_pages: capacity / 16 }, hk, d, dtype, dev)
            .unwrap()
    } else {
        SbKvCache::contiguous(b, capacity, hk, d, dtype, dev).unwrap()
    };
    let mut rng = StdRng::seed_from_u64(seed);
    // Each sequence's tokens as stored (rounded to the cache's dtype), [n, hk, d] rows.
    let mut ks: Vec<Vec<f32>> = vec![Vec::new(); b];
    let mut vs: Vec<Vec<f32>> = vec![Vec::new(); b];
    let rounded = |x: Vec<f32>, shape: &[usize]| -> (Tensor, Vec<f32>) {
        let t = Tensor::from_vec(x, shape, dev).unwrap().to_dtype(dtype).unwrap();
        let back = host(&t);
        (t, back)
    };
    for (s, &n) in prompts.iter().enumerate() {
        let (kt, kh) = rounded(normal(&mut rng, n * hk * d), &[n, hk, d]);
        let (vt, vh) = rounded(normal(&mut rng, n * hk * d), &[n, hk, d]);
        cache.append_to(s, &kt, &vt).unwrap();
        ks[s].extend(kh);
        vs[s].extend(vh);
    }
    let mut worst = 0.0f64;
    for step in 0..steps {
        let (kt, kh) = rounded(normal(&mut rng, b * hk * d), &[b, 1, hk, d]);
        let (vt, vh) = rounded(normal(&mut rng, b * hk * d), &[b, 1, hk, d]);
        cache.append(&kt, &vt).unwrap();
        for s in 0..b {
            ks[s].extend_from_slice(&kh[s * hk * d..][..hk * d]);
            vs[s].extend_from_slice(&vh[s * hk * d..][..hk * d]);
        }
        let (qt, qh) = rounded(normal(&mut rng, b * h * d), &[b, h, d]);
        let (o, rem) = cache.decode(&qt, opts).unwrap();
        assert_eq!((o.dims(), rem.dims(), rem.dtype()), (&[b, h, d][..], &[b, h][..], DType::F32));
        let lens: Vec<usize> = (0..b).map(|s| ks[s].len() / (hk * d)).collect();
        assert_eq!(cache.lens(), &lens[..]);
        let n_max = *lens.iter().max().unwrap();
        let gather = |x: &[Vec<f32>]| {
            let mut out = vec![0.0f64; b * hk * n_max * d];
            for s in 0..b {
                for t in 0..lens[s] {
                    for kv in 0..hk {
                        for e in 0..d {
                            out[((s * hk + kv) * n_max + t) * d + e] = x[s][(t * hk + kv) * d + e] as f64;
                        }
                    }
                }
            }
            out
        };
        let qd: Vec<f64> = qh.iter().map(|&x| x as f64).collect();
        let full = SbOptions { early_exit_bits: None, ..*opts };
        let want = reference::decode(
            DecodeShape { batch: b, heads: h, kv_heads: hk, head_dim: d },
            &ref_options(&full),
            &qd,
            &gather(&ks),
            &gather(&vs),
            &lens,
        );
        let (go, grem) = (host(&o), host(&rem));
        assert!(go.iter().chain(&grem).all(|x| x.is_finite()), "step {step}: a non-finite output");
        match opts.early_exit_bits {
            None => {
                let err = rel_l2(&go, &want.o).max(rel_l2(&grem, &want.rem));
                assert!(err < tol, "step {step}: relative L2 error {err:e}");
                worst = worst.max(err);
            }
            Some(t) => {
                let dropped = 2f64.powi(-(t as i32));
                let v_max = vs.iter().flatten().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
                let fused = if opts.remainder == Remainder::Fuse { 2.0 } else { 1.0 };
                let o_max = want.o.iter().fold(0.0f64, |m, &x| m.max(x.abs()));
                let o_bound = dropped * v_max * fused + tol * o_max;
                let o_err = go.iter().zip(&want.o).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
                let rem_err = grem.iter().zip(&want.rem).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
                assert!(o_err <= o_bound, "step {step}: |delta o| = {o_err:e} above {o_bound:e}");
                assert!(rem_err <= dropped + tol, "step {step}: |delta rem| = {rem_err:e} above {:e}", dropped + tol);
                worst = worst.max(o_err / o_bound).max(rem_err / (dropped + tol));
            }
        }
    }
    worst
}
