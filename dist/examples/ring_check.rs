//! Context parallelism over NCCL: `--ranks` GPUs of this host, one thread and communicator each
//! (`NcclRank::run`), every rank's forward (and with `--backward` its backward) driven by the K/V
//! ring (`NcclRank::ring_forward`, `ring_backward`: each step's pairs on the compute stream while the
//! next K/V shifts on the communication stream; dK/dV summed at their owners by NCCL reduces). The
//! gathered o, rem (dq, dk, dv) are checked against the float64 walk of sampled rows (the float64
//! reference backward up to N = 8192) and against the single-GPU kernels on GPU 0, every element.
//! With `--time`, each rank times its ring forward (and backward) with CUDA events, median of
//! `--reps`, and GPU 0 times the single-GPU kernels: the slowest rank against one GPU is the speedup.
//!
//! ```text
//! cargo run --release -p sbgen-dist --features nccl --example ring_check -- --ranks 2 --seq 4097 \
//!     [the flags of segment_check] [--backward] [--time --reps 5]
//! ```
//! Needs `libnccl.so` on the library path (see `sbgen_dist::nccl`). Exit status 1 when a check
//! fails, 2 on bad usage.

mod common;

use common::*;
use cudarc::driver::{CudaContext, CudaSlice};
use cudarc::nccl::safe::NcclType;
use sbgen_dist::gpu::{device_arch, segment_kernel, BackwardInputs, RankBackward, RankForward};
use sbgen_dist::nccl::NcclRank;
use sbgen_dist::{DistError, Partition};
use sbgen_runtime::launcher::{Launcher, SbElement};
use sbgen_runtime::spec::{Dtype, Pass};
use std::sync::Arc;

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let result = match args.spec.dtype {
        Dtype::Bf16 => run::<half::bf16>(&args),
        Dtype::F16 => run::<half::f16>(&args),
    };
    match result {
        Ok(true) => println!("PASSED"),
        Ok(false) => {
            println!("FAILED");
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// What a rank hands back: its local outputs and times.
struct RankOut {
    o: Vec<f32>,
    rem: Vec<f32>,
    grads: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    fwd_ms: Option<f64>,
    bwd_ms: Option<f64>,
}

fn run<T: SbElement + NcclType>(a: &Args) -> Result<bool, Error> {
    let h = a.heads;
    let d = h.head_dim;
    let part = Partition::new(a.seq, a.ranks, a.scheme)?;
    println!(
        "{} ranks ({:?}) over NCCL, B,H,Hkv,N,D = {},{},{},{},{}, {} {} {} {} early exit {:?}",
        a.ranks,
        a.scheme,
        h.batch,
        h.heads,
        h.kv_heads,
        a.seq,
        d,
        a.spec.dtype,
        a.spec.layout,
        a.spec.mask,
        a.spec.remainder,
        a.spec.early_exit_bits
    );
    let (q, k, v) = inputs(a);
    let grads_of = a.backward.then(|| {
        let d_o: Vec<f32> = normals(q.len(), 3 * a.seed + 7).into_iter().map(|x| T::from_f32(x).to_f32()).collect();
        let d_rem: Vec<f32> = normals(h.batch * h.heads * a.seq, 3 * a.seed + 8).into_iter().map(|x| 0.3 * x).collect();
        (d_o, d_rem)
    });
    let (outer_q, inner_q) = outer_inner(a, h.heads, d);
    let (outer_kv, inner_kv) = outer_inner(a, h.kv_heads, d);
    let reps = if a.time { a.reps } else { 0 };

    let outs = NcclRank::run(a.ranks, |r| {
        let rank = r.rank();
        let fail = |e: Error| DistError::Device { rank, reason: e.to_string() };
        let dev = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
        let stream = r.compute_stream().clone();
        let launcher = Arc::new(Launcher::new(stream.clone()).map_err(|e| fail(e.into()))?);
        let arch = device_arch(&launcher)?;
        let n = part.local_len(rank);
        let up = |x: &[f32], outer: usize, inner: usize| upload::<T>(&stream, &part.scatter(rank, x, outer, inner));
        let ql = up(&q, outer_q, inner_q).map_err(fail)?;
        let kl = up(&k, outer_kv, inner_kv).map_err(fail)?;
        let vl = up(&v, outer_kv, inner_kv).map_err(fail)?;
        let poison = |len: usize| vec![T::from_bits(T::NAN_BITS); len.max(1)];
        let mut o = stream.clone_htod(&poison(outer_q * n * inner_q)).map_err(dev)?;
        let mut rem = stream.clone_htod(&vec![f32::NAN; (h.batch * h.heads * n).max(1)]).map_err(dev)?;
        let mut lrem = stream.clone_htod(&vec![f32::NAN; (h.batch * h.heads * n).max(1)]).map_err(dev)?;
        let fk = Arc::new(segment_kernel(a.spec, Pass::Segment, arch)?);
        let mut fwd = RankForward::<T>::new(launcher.clone(), fk, &part, rank, h, None)?;
        let mut forward = |o: &mut CudaSlice<T>, rem: &mut CudaSlice<f32>, lrem: &mut CudaSlice<f32>| {
            r.ring_forward(&mut fwd, (&ql, &kl, &vl), o, rem, lrem)
        };
        forward(&mut o, &mut rem, &mut lrem)?;
        let fwd_ms = if reps > 0 {
            Some(median_ms(&stream, reps, &mut || Ok(forward(&mut o, &mut rem, &mut lrem)?)).map_err(fail)?)
        } else {
            None
        };
        let take = |x: &CudaSlice<T>, len: usize| -> Result<Vec<f32>, DistError> {
            let mut v = download(&stream, x).map_err(fail)?;
            v.truncate(len);
            Ok(v)
        };
        let o_host = take(&o, outer_q * n * inner_q)?;
        let mut rem_host = stream.clone_dtoh(&rem).map_err(dev)?;
        rem_host.truncate(h.batch * h.heads * n);
        let (mut grads, mut bwd_ms) = (None, None);
        if let Some((d_o, d_rem)) = &grads_of {
            let bk = Arc::new(segment_kernel(a.spec, Pass::SegmentBackward, arch)?);
            let mut bwd = RankBackward::<T>::new(launcher.clone(), bk, &part, rank, h, None)?;
            let dol = up(d_o, outer_q, inner_q).map_err(fail)?;
            let dreml = stream.clone_htod(&part.scatter(rank, d_rem, h.batch * h.heads, 1)).map_err(dev)?;
            let (o_saved, log2_rem) = fwd.state();
            let x = BackwardInputs { q: &ql, d_o: &dol, o_saved, log2_rem, d_rem: Some(&dreml), v: &vl };
            let mut dq = stream.clone_htod(&poison(outer_q * n * inner_q)).map_err(dev)?;
            let mut dk = stream.clone_htod(&poison(outer_kv * n * inner_kv)).map_err(dev)?;
            let mut dv = stream.clone_htod(&poison(outer_kv * n * inner_kv)).map_err(dev)?;
            let mut backward = |dq: &mut CudaSlice<T>, dk: &mut CudaSlice<T>, dv: &mut CudaSlice<T>| {
                r.ring_backward(&mut bwd, (&kl, &vl), &x, dq, dk, dv)
            };
            backward(&mut dq, &mut dk, &mut dv)?;
            if reps > 0 {
                bwd_ms =
                    Some(median_ms(&stream, reps, &mut || Ok(backward(&mut dq, &mut dk, &mut dv)?)).map_err(fail)?);
            }
            grads = Some((
                take(&dq, outer_q * n * inner_q)?,
                take(&dk, outer_kv * n * inner_kv)?,
                take(&dv, outer_kv * n * inner_kv)?,
            ));
        }
        stream.synchronize().map_err(dev)?;
        Ok(RankOut { o: o_host, rem: rem_host, grads, fwd_ms, bwd_ms })
    })?;
    let outs: Vec<RankOut> = outs.into_iter().collect::<Result<_, _>>()?;

    let o = part.gather(&outs.iter().map(|r| r.o.clone()).collect::<Vec<_>>(), outer_q, inner_q);
    let rem = part.gather(&outs.iter().map(|r| r.rem.clone()).collect::<Vec<_>>(), h.batch * h.heads, 1);
    let bad = |x: &[f32]| x.iter().filter(|v| !v.is_finite()).count();
    let mut ok = bad(&o) == 0 && bad(&rem) == 0;
    println!("non-finite: o {}, rem {}", bad(&o), bad(&rem));
    ok &= check_forward_rows(a, &part, (&q, &k, &v), &o, &rem);

    let ctx = CudaContext::new(0)?;
    let launcher = Launcher::new(ctx.default_stream())?;
    let arch = device_arch(&launcher)?;
    let grads_ref = grads_of.as_ref().map(|(d_o, d_rem)| (d_o.as_slice(), d_rem.as_slice()));
    let single = single_gpu::<T>(a, &launcher, arch, (&q, &k, &v), grads_ref, reps)?;
    let tol = forward_tolerance(a);
    ok &= judge(
        "against the single-GPU forward, every element",
        &[("o", &o, &widen(&single.o)), ("rem", &rem, &widen(&single.rem))],
        tol,
    );
    if let (Some((d_o, d_rem)), Some((sq, sk, sv))) = (&grads_of, &single.grads) {
        let gather = |i: usize, outer: usize, inner: usize| {
            let locals: Vec<Vec<f32>> = outs
                .iter()
                .map(|r| {
                    let g = r.grads.as_ref().expect("every rank ran the backward");
                    [&g.0, &g.1, &g.2][i].clone()
                })
                .collect();
            part.gather(&locals, outer, inner)
        };
        let (dq, dk, dv) = (gather(0, outer_q, inner_q), gather(1, outer_kv, inner_kv), gather(2, outer_kv, inner_kv));
        println!("non-finite: dq {}, dk {}, dv {}", bad(&dq), bad(&dk), bad(&dv));
        ok &= bad(&dq) + bad(&dk) + bad(&dv) == 0;
        let gtol = grad_tolerance(a);
        if a.seq <= 8192 {
            let (rq, rk, rv) = reference_grads(a, (&q, &k, &v), d_o, d_rem);
            ok &= judge("float64 backward", &[("dq", &dq, &rq), ("dk", &dk, &rk), ("dv", &dv, &rv)], gtol);
        } else {
            println!("float64 backward: skipped above N = 8192 (the reference is O(N^2) on the host)");
        }
        ok &= judge(
            "against the single-GPU backward, every element",
            &[("dq", &dq, &widen(sq)), ("dk", &dk, &widen(sk)), ("dv", &dv, &widen(sv))],
            gtol,
        );
    }

    if a.time {
        let flops = 2.0 * (h.batch * h.heads) as f64 * (a.seq as f64).powi(2) * d as f64;
        let report = |what: &str, single: Option<f64>, per_rank: Vec<Option<f64>>, work: f64| {
            let per_rank: Vec<f64> = per_rank.into_iter().flatten().collect();
            let (Some(one), Some(worst)) = (single, per_rank.iter().copied().reduce(f64::max)) else { return };
            let list: Vec<String> = per_rank.iter().map(|t| format!("{t:.3}")).collect();
            println!(
                "{what}: 1 GPU {one:.3} ms ({:.1} TFLOP/s-eq.); ranks {} ms; {} GPUs {:.2}x one GPU ({:.1} TFLOP/s-eq.)",
                work / one / 1e9,
                list.join(", "),
                a.ranks,
                one / worst,
                work / worst / 1e9
            );
        };
        report("forward", single.fwd_ms, outs.iter().map(|r| r.fwd_ms).collect(), flops);
        if a.backward {
            report("backward", single.bwd_ms, outs.iter().map(|r| r.bwd_ms).collect(), 2.5 * flops);
            let sum = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| x + y);
            report(
                "forward + backward",
                sum(single.fwd_ms, single.bwd_ms),
                outs.iter().map(|r| sum(r.fwd_ms, r.bwd_ms)).collect(),
                3.5 * flops,
            );
        }
    }
    Ok(ok)
}
