//! Context parallelism over NCCL: `--ranks` GPUs of this host, one thread and communicator each
//! (`NcclRank::run`), every rank's forward (and with `--backward` its backward) driven by the K/V
//! ring (`NcclRank::ring_forward`, `ring_backward`: each step's pairs on the compute stream while the
//! next K/V shifts on the communication stream; dK/dV summed at their owners by NCCL reduces). The
//! gathered o, rem (dq, dk, dv) are checked against the float64 walk of sampled rows (the float64
//! reference backward up to N = 8192, beyond with
//! `--f64-backward`) and against the single-GPU kernels on GPU 0, every element.
//! With `--time`, each rank times its ring forward (and forward + backward) and the same passes'
//! transfers alone with CUDA events, median of `--reps` (`sbgen_dist::driver`), and GPU 0 times the
//! single-GPU kernels: the slowest rank against one GPU is the speedup.
//!
//! ```text
//! cargo run --release -p sbgen-dist --features nccl --example ring_check -- --ranks 2 --seq 4097 \
//!     [the flags of segment_check] [--backward] [--time --reps 5]
//! ```
//! Needs `libnccl.so` on the library path (see `sbgen_dist::nccl`). Exit status 1 when a check
//! fails, 2 on bad usage.

mod common;

use common::*;
use cudarc::driver::{CudaContext, DeviceRepr};
use cudarc::nccl::safe::NcclType;
use sbgen_dist::driver::{run_ring, RankTimes, RingInputs, RingKernels, RingTiming};
use sbgen_dist::Partition;
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
    if let Err(e) = require_libraries(true) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
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

fn run<T: SbElement + NcclType + DeviceRepr + Default>(a: &Args) -> Result<bool, Error> {
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
        let d_o: Vec<f32> = par_map(&normals(q.len(), 3 * a.seed + 7), |_, &x| T::from_f32(x).to_f32());
        let d_rem: Vec<f32> = normals(h.batch * h.heads * a.seq, 3 * a.seed + 8).into_iter().map(|x| 0.3 * x).collect();
        (d_o, d_rem)
    });
    let reps = if a.time { a.reps } else { 0 };

    // The kernels are lowered once; each rank's launcher compiles them (NVRTC) for its GPU.
    let arch = device_arch(&Launcher::new(CudaContext::new(0)?.default_stream())?)?;
    let kernels = RingKernels {
        forward: Arc::new(segment_kernel(a.spec, Pass::Segment, arch)?),
        backward: if a.backward { Some(Arc::new(segment_kernel(a.spec, Pass::SegmentBackward, arch)?)) } else { None },
    };
    let narrow = |x: &[f32]| par_map(x, |_, &v| T::from_f32(v));
    let (qt, kt, vt) = (narrow(&q), narrow(&k), narrow(&v));
    let dot = grads_of.as_ref().map(|(d_o, _)| narrow(d_o));
    let ring_inputs = RingInputs {
        q: &qt,
        k: &kt,
        v: &vt,
        d_o: dot.as_deref(),
        d_rem: grads_of.as_ref().map(|(_, d_rem)| d_rem.as_slice()),
    };
    let out = run_ring(&part, h, &kernels, &ring_inputs, RingTiming { warmup: 1, reps })?;
    let wide = |x: &[T]| par_map(x, |_, v| v.to_f32());
    let (o, rem) = (wide(&out.o), out.rem.clone());
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
        let (dq, dk, dv) = match &out.grads {
            Some((dq, dk, dv)) => (wide(dq), wide(dk), wide(dv)),
            None => return Err("the ring ran no backward".into()),
        };
        println!("non-finite: dq {}, dk {}, dv {}", bad(&dq), bad(&dk), bad(&dv));
        ok &= bad(&dq) + bad(&dk) + bad(&dv) == 0;
        let gtol = grad_tolerance(a);
        if a.seq <= 8192 || a.f64_backward {
            let (rq, rk, rv) = reference_grads(a, (&q, &k, &v), d_o, d_rem);
            ok &= judge("float64 backward", &[("dq", &dq, &rq), ("dk", &dk, &rk), ("dv", &dv, &rv)], gtol);
        } else {
            println!("float64 backward: skipped above N = 8192 (O(N^2) on the host: `--f64-backward` runs it)");
        }
        ok &= judge(
            "against the single-GPU backward, every element",
            &[("dq", &dq, &widen(sq)), ("dk", &dk, &widen(sk)), ("dv", &dv, &widen(sv))],
            gtol,
        );
    }

    if a.time {
        let flops = 2.0 * (h.batch * h.heads) as f64 * (a.seq as f64).powi(2) * d as f64;
        let report = |what: &str, single: Option<f64>, per_rank: Vec<f64>, transfers: Vec<f64>, work: f64| {
            let (Some(one), Some(worst)) = (single, per_rank.iter().copied().reduce(f64::max)) else { return };
            let list = |x: &[f64]| x.iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>().join(", ");
            println!(
                "{what}: 1 GPU {one:.3} ms ({:.1} TFLOP/s-eq.); ranks {} ms (transfers alone {} ms); {} GPUs {:.2}x \
                 one GPU ({:.1} TFLOP/s-eq.)",
                work / one / 1e9,
                list(&per_rank),
                list(&transfers),
                a.ranks,
                one / worst,
                work / worst / 1e9
            );
        };
        let med = |f: &dyn Fn(&RankTimes) -> &Vec<f64>| out.times.iter().map(|t| median(f(t))).collect::<Vec<f64>>();
        report("forward", single.fwd_ms, med(&|t| &t.forward), med(&|t| &t.transfers_forward), flops);
        if a.backward {
            let sum = |x: Option<f64>, y: Option<f64>| x.zip(y).map(|(x, y)| x + y);
            report(
                "forward + backward",
                sum(single.fwd_ms, single.bwd_ms),
                med(&|t| &t.forward_backward),
                med(&|t| &t.transfers_forward_backward),
                3.5 * flops,
            );
        }
    }
    Ok(ok)
}

/// The median of `x` (NaN when empty).
fn median(x: &[f64]) -> f64 {
    let mut s = x.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}
