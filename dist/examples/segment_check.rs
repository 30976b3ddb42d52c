//! Context parallelism's forward on one GPU: every rank's segment pairs run as segment-pass kernels
//! (sbgen-dist's `gpu::RankForward`), each rank reading the other ranks' K/V from the same device, and
//! the gathered o and rem are checked against
//!   - a float64 walk of each sampled row (the definition: nearest key first, beta = sigmoid(s q.k)),
//!     on rows spread over the sequence and around every segment boundary, and
//!   - the single-GPU forward kernel on the whole sequence (every element).
//!
//! With `--backward` the same for dq, dk and dv: every rank's segment backward launches, the
//! dK/dV partials summed at their owners (on the host here; the ring's reduce-scatter on GPUs), each
//! rank's finishing launches; checked against the float64 reference backward (up to N = 8192;
//! beyond with `--f64-backward`) and the single-GPU backward kernel.
//!
//! With `--time` it also times each rank's launches and the single-GPU forward (CUDA events, median
//! of `--reps`): the slowest rank against the single GPU bounds what P GPUs can gain when the K/V
//! shifts hide behind the compute.
//!
//! ```text
//! cargo run --release -p sbgen-dist --features cuda --example segment_check -- \
//!     --seq 4097 --ranks 2 --scheme zigzag --batch 1 --heads 4 --kv-heads 2 --head-dim 128 \
//!     --dtype bf16 --layout bhnd --mask strict --remainder return --early-exit off --data long \
//!     --rows 256 --seed 1 [--backward] [--time --reps 5]
//! ```
//! Exit status 1 when a check fails, 2 on bad usage.

mod common;

use common::*;
use cudarc::driver::{CudaContext, CudaSlice};
use sbgen_dist::gpu::{BackwardInputs, RankBackward, RankForward};
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
    if let Err(e) = require_libraries(false) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    let result = match args.spec.dtype {
        Dtype::Bf16 => run::<half::bf16>(&args),
        Dtype::F16 => run::<half::f16>(&args),
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

fn run<T: SbElement>(a: &Args) -> Result<bool, Error> {
    let h = a.heads;
    let part = Partition::new(a.seq, a.ranks, a.scheme)?;
    let ctx = CudaContext::new(0)?;
    let stream = ctx.default_stream();
    let launcher = Arc::new(Launcher::new(stream.clone())?);
    let arch = device_arch(&launcher)?;
    let kernel = Arc::new(segment_kernel(a.spec, Pass::Segment, arch)?);
    println!(
        "{} ranks ({:?}) on one GPU, B,H,Hkv,N,D = {},{},{},{},{}, {} {} {} {} early exit {:?}, data {}",
        a.ranks,
        a.scheme,
        h.batch,
        h.heads,
        h.kv_heads,
        a.seq,
        h.head_dim,
        a.spec.dtype,
        a.spec.layout,
        a.spec.mask,
        a.spec.remainder,
        a.spec.early_exit_bits,
        if a.long { "long (beta ~ 1e-3)" } else { "normal" }
    );
    let (q, k, v) = inputs(a);
    let t0 = std::time::Instant::now();

    // Every rank's local tensors on the one GPU.
    let mut local = Vec::new();
    for r in 0..a.ranks {
        let ql = upload::<T>(&stream, &scatter(a, &part, r, &q, h.heads))?;
        let kl = upload::<T>(&stream, &scatter(a, &part, r, &k, h.kv_heads))?;
        let vl = upload::<T>(&stream, &scatter(a, &part, r, &v, h.kv_heads))?;
        local.push((ql, kl, vl));
    }
    let mut ranks = Vec::new();
    let mut outs = Vec::new();
    for r in 0..a.ranks {
        let mut rf = RankForward::<T>::new(launcher.clone(), kernel.clone(), &part, r, h, None)?;
        let (ne, _, nr) = rf.local_elements();
        // Poisoned outputs: an element the finishing step never writes stays NaN.
        let mut o = stream.clone_htod(&vec![T::from_bits(T::NAN_BITS); ne.max(1)])?;
        let mut rem = stream.clone_htod(&vec![f32::NAN; nr.max(1)])?;
        let mut lrem = stream.clone_htod(&vec![f32::NAN; nr.max(1)])?;
        forward_rank(&mut rf, a.ranks, &local, r)?;
        rf.finish(&local[r].2, &mut o, &mut rem, &mut lrem)?;
        outs.push((o, rem, lrem));
        ranks.push(rf);
    }
    stream.synchronize()?;
    let launched: usize = ranks.iter().map(|r| r.launched).sum();
    println!("segment launches: {launched} ({:.1} s with uploads)", t0.elapsed().as_secs_f64());

    // Gathered outputs, full-sequence layout.
    let (outer, inner) = outer_inner(a, h.heads, h.head_dim);
    let mut o_locals = Vec::new();
    let mut rem_locals = Vec::new();
    for (r, (o, rem, _)) in outs.iter().enumerate() {
        let n = part.local_len(r);
        let mut ov = download(&stream, o)?;
        ov.truncate(outer * n * inner);
        let mut rv = stream.clone_dtoh(rem)?;
        rv.truncate(h.batch * h.heads * n);
        o_locals.push(ov);
        rem_locals.push(rv);
    }
    let o = part.gather(&o_locals, outer, inner);
    let rem = part.gather(&rem_locals, h.batch * h.heads, 1);
    let nan_o = o.iter().filter(|x| !x.is_finite()).count();
    let nan_rem = rem.iter().filter(|x| !x.is_finite()).count();
    let mut ok = nan_o == 0 && nan_rem == 0;
    println!("non-finite: o {nan_o} of {}, rem {nan_rem} of {}", o.len(), rem.len());

    ok &= check_forward_rows(a, &part, (&q, &k, &v), &o, &rem);
    let tol = forward_tolerance(a);
    let d = h.head_dim;

    // The single-GPU forward on the whole sequence (timed with `--time`).
    let single = single_gpu::<T>(a, &launcher, arch, (&q, &k, &v), None, if a.time { a.reps } else { 0 })?;
    ok &= judge(
        "against the single-GPU forward, every element",
        &[("o", &o, &widen(&single.o)), ("rem", &rem, &widen(&single.rem))],
        tol,
    );

    if let Some(t_single) = single.fwd_ms {
        let flops = 2.0 * (h.batch * h.heads) as f64 * (a.seq as f64).powi(2) * d as f64;
        println!("single GPU forward: {t_single:.3} ms ({:.1} TFLOP/s-equivalent)", flops / t_single / 1e9);
        let mut worst: f64 = 0.0;
        let mut total = 0.0;
        for r in 0..a.ranks {
            let (o, rem, lrem) = &mut outs[r];
            let rf = &mut ranks[r];
            let t = median_ms(&stream, a.reps, &mut || {
                rf.reset()?;
                forward_rank(rf, a.ranks, &local, r)?;
                rf.finish(&local[r].2, o, rem, lrem)?;
                Ok(())
            })?;
            println!("rank {r}: {t:.3} ms for its {} pairs, state zeroing and finish", rf.launched);
            worst = worst.max(t);
            total += t;
        }
        println!(
            "slowest rank {worst:.3} ms, all ranks {total:.3} ms: {} GPUs would run at most {:.2}x one GPU \
             (the compute alone; overhead of the pieces {:+.1}%)",
            a.ranks,
            t_single / worst,
            (total / t_single - 1.0) * 100.0
        );
    }
    if a.backward {
        ok &= backward::<T>(a, &part, &launcher, arch, &local, &ranks, (&q, &k, &v))?;
    }
    println!("{}", if ok { "PASSED" } else { "FAILED" });
    Ok(ok)
}

/// The backward over every rank on the one GPU, checked; timed with `--time`.
#[allow(clippy::type_complexity)]
fn backward<T: SbElement>(
    a: &Args,
    part: &Partition,
    launcher: &Arc<Launcher>,
    arch: sbgen::ir::Arch,
    local: &[(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)],
    fwd: &[RankForward<T>],
    (q, k, v): (&[f32], &[f32], &[f32]),
) -> Result<bool, Error> {
    let h = a.heads;
    let d = h.head_dim;
    let stream = launcher.stream().clone();
    let kernel = Arc::new(segment_kernel(a.spec, Pass::SegmentBackward, arch)?);
    let d_o = par_map(&normals(q.len(), 3 * a.seed + 7), |_, &x| T::from_f32(x).to_f32());
    let d_rem: Vec<f32> = normals(h.batch * h.heads * a.seq, 3 * a.seed + 8).into_iter().map(|x| 0.3 * x).collect();
    let t0 = std::time::Instant::now();
    let (outer_q, inner_q) = outer_inner(a, h.heads, d);
    let (outer_kv, inner_kv) = outer_inner(a, h.kv_heads, d);
    let mut d_o_local = Vec::new();
    let mut d_rem_local = Vec::new();
    let mut ranks = Vec::new();
    for r in 0..a.ranks {
        d_o_local.push(upload::<T>(&stream, &part.scatter(r, &d_o, outer_q, inner_q))?);
        d_rem_local.push(stream.clone_htod(&part.scatter(r, &d_rem, h.batch * h.heads, 1))?);
        ranks.push(RankBackward::<T>::new(launcher.clone(), kernel.clone(), part, r, h, None)?);
    }
    let inputs = |r: usize| {
        let (o_saved, log2_rem) = fwd[r].state();
        BackwardInputs {
            q: &local[r].0,
            d_o: &d_o_local[r],
            o_saved,
            log2_rem,
            d_rem: Some(&d_rem_local[r]),
            v: &local[r].2,
        }
    };
    let kv = |owner: usize| local.get(owner).map(|(_, k, v)| (k.slice(..), v.slice(..)));
    for (r, rb) in ranks.iter_mut().enumerate() {
        for step in 0..a.ranks {
            rb.step(step, &inputs(r), &kv)?;
        }
    }
    // The reduce-scatter, on the host: each owner's dK/dV partials summed over the ranks.
    let mut sums = Vec::new();
    for owner in 0..a.ranks {
        let n = h.batch * h.kv_heads * part.local_len(owner) * d;
        let (mut dk, mut dv) = (vec![0f32; n], vec![0f32; n]);
        for rb in &ranks {
            if let Some((pk, pv)) = rb.partial(owner) {
                if pk.len() >= n && n > 0 {
                    for (x, y) in dk.iter_mut().zip(stream.clone_dtoh(pk)?) {
                        *x += y;
                    }
                    for (x, y) in dv.iter_mut().zip(stream.clone_dtoh(pv)?) {
                        *x += y;
                    }
                }
            }
        }
        sums.push((stream.clone_htod(&dk)?, stream.clone_htod(&dv)?));
    }
    let (mut dq_l, mut dk_l, mut dv_l) = (Vec::new(), Vec::new(), Vec::new());
    for (r, rb) in ranks.iter().enumerate() {
        let n = part.local_len(r);
        let poison = |len: usize| vec![T::from_bits(T::NAN_BITS); len.max(1)];
        let mut dq = stream.clone_htod(&poison(outer_q * n * inner_q))?;
        let mut dk = stream.clone_htod(&poison(outer_kv * n * inner_kv))?;
        let mut dv = stream.clone_htod(&poison(outer_kv * n * inner_kv))?;
        rb.finish(&sums[r].0, &sums[r].1, &inputs(r), &mut dq, &mut dk, &mut dv)?;
        let take = |x: &CudaSlice<T>, len: usize| -> Result<Vec<f32>, Error> {
            let mut h = download(&stream, x)?;
            h.truncate(len);
            Ok(h)
        };
        dq_l.push(take(&dq, outer_q * n * inner_q)?);
        dk_l.push(take(&dk, outer_kv * n * inner_kv)?);
        dv_l.push(take(&dv, outer_kv * n * inner_kv)?);
    }
    let launched: usize = ranks.iter().map(|r| r.launched).sum();
    let dq = part.gather(&dq_l, outer_q, inner_q);
    let dk = part.gather(&dk_l, outer_kv, inner_kv);
    let dv = part.gather(&dv_l, outer_kv, inner_kv);
    println!("backward: segment launches {launched} ({:.1} s with the host's reduction)", t0.elapsed().as_secs_f64());
    let bad = |x: &[f32]| x.iter().filter(|v| !v.is_finite()).count();
    let (nq, nk, nv) = (bad(&dq), bad(&dk), bad(&dv));
    println!("non-finite: dq {nq}, dk {nk}, dv {nv}");
    let mut ok = nq + nk + nv == 0;
    let tol = grad_tolerance(a);
    if a.seq <= 8192 || a.f64_backward {
        let (rq, rk, rv) = reference_grads(a, (q, k, v), &d_o, &d_rem);
        ok &= judge("float64 backward", &[("dq", &dq, &rq), ("dk", &dk, &rk), ("dv", &dv, &rv)], tol);
    } else {
        println!("float64 backward: skipped above N = 8192 (O(N^2) on the host: `--f64-backward` runs it)");
    }

    // The single-GPU backward on the whole sequence (timed with `--time`).
    let single = single_gpu::<T>(a, launcher, arch, (q, k, v), Some((&d_o, &d_rem)), if a.time { a.reps } else { 0 })?;
    let (sq, sk, sv) = single.grads.as_ref().expect("asked for the gradients");
    ok &= judge(
        "against the single-GPU backward, every element",
        &[("dq", &dq, &widen(sq)), ("dk", &dk, &widen(sk)), ("dv", &dv, &widen(sv))],
        tol,
    );

    if let Some(t_single) = single.bwd_ms {
        let flops = 2.5 * 2.0 * (h.batch * h.heads) as f64 * (a.seq as f64).powi(2) * d as f64;
        println!("single GPU backward: {t_single:.3} ms ({:.1} TFLOP/s-equivalent)", flops / t_single / 1e9);
        let (mut worst, mut total) = (0f64, 0.0);
        for (r, rb) in ranks.iter_mut().enumerate() {
            let t = median_ms(&stream, a.reps, &mut || {
                rb.reset()?;
                for step in 0..a.ranks {
                    rb.step(step, &inputs(r), &kv)?;
                }
                Ok(())
            })?;
            println!("rank {r}: {t:.3} ms for its {} pairs and state zeroing (backward walk)", rb.launched);
            worst = worst.max(t);
            total += t;
        }
        println!(
            "backward: slowest rank {worst:.3} ms, all ranks {total:.3} ms: {} GPUs would run at most {:.2}x one GPU \
             (the compute alone, before the reduce-scatter; overhead of the pieces {:+.1}%)",
            a.ranks,
            t_single / worst,
            (total / t_single - 1.0) * 100.0
        );
    }
    Ok(ok)
}

/// Runs rank `r`'s steps with every rank's K/V at hand (one GPU).
fn forward_rank<T: SbElement>(
    rf: &mut RankForward<T>,
    ranks: usize,
    local: &[(CudaSlice<T>, CudaSlice<T>, CudaSlice<T>)],
    r: usize,
) -> Result<(), Error> {
    for step in 0..ranks {
        rf.step(step, &local[r].0, &|owner| local.get(owner).map(|(_, k, v)| (k.slice(..), v.slice(..))))?;
    }
    Ok(())
}
