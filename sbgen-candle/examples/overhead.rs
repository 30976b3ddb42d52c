//! What the candle op costs over sbgen's raw launcher on the same stream, kernel and data:
//! inference forward, and forward + backward (candle: `o.backward()` through its autograd; raw: the
//! forward saving its f32 inputs, then the backward with dO = 1).
//!
//! ```text
//! cargo run --release -p sbgen-candle --features cuda --example overhead -- 2 16 8192 128 [reps]
//! ```
//! Arguments: batch, heads, seq, head_dim (bf16, strict mask, remainder returned, BNHD).

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{DType, Device, Tensor, Var};
use sbgen_candle::cuda::device::{set_memory_pool_release_threshold, stream_state};
use sbgen_candle::{stick_breaking_attention, SbOptions};
use sbgen_runtime::launcher::{BackwardArgs, ForwardArgs};
use sbgen_runtime::reference::Shape;
use sbgen_runtime::spec::{Dtype, Layout, Mask, Pass, Remainder, Spec};
use std::time::Instant;

/// The raw path's outputs, allocated once.
struct Buffers {
    o: CudaSlice<half::bf16>,
    rem: CudaSlice<f32>,
    log2_rem: CudaSlice<f32>,
    o_saved: CudaSlice<f32>,
    dq: CudaSlice<half::bf16>,
    dk: CudaSlice<half::bf16>,
    dv: CudaSlice<half::bf16>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let (b, h, n, d) = match a[..] {
        [b, h, n, d, ..] => (b, h, n, d),
        _ => return Err("usage: overhead BATCH HEADS SEQ HEAD_DIM [REPS]".into()),
    };
    let reps = a.get(4).copied().unwrap_or(20);
    let dev = Device::new_cuda(0)?;
    let Device::Cuda(cuda) = &dev else { unreachable!() };
    let stream = cuda.cuda_stream();
    let state = stream_state(cuda)?;
    let opts = SbOptions::default();
    let spec = |pass| Spec {
        head_dim: d as u32,
        dtype: Dtype::Bf16,
        mask: Mask::Strict,
        layout: Layout::Bnhd,
        remainder: Remainder::Return,
        pass,
        early_exit_bits: None,
        deterministic: false,
    };
    let (fwd, bwd) = (state.kernel(spec(Pass::Forward), n)?, state.kernel(spec(Pass::Backward), n)?);
    let shape = Shape::new(b, h, n, d);
    let q = Tensor::randn(0f32, 1.0, (b, n, h, d), &dev)?.to_dtype(DType::BF16)?;
    let k = Tensor::randn(0f32, 1.0, (b, n, h, d), &dev)?.to_dtype(DType::BF16)?;
    let v = Tensor::randn(0f32, 1.0, (b, n, h, d), &dev)?.to_dtype(DType::BF16)?;
    let flops = 4.0 * (b * h) as f64 * (n * n) as f64 * d as f64 / 2.0;

    let time =
        |f: &mut dyn FnMut() -> Result<(), Box<dyn std::error::Error>>| -> Result<f64, Box<dyn std::error::Error>> {
            for _ in 0..3 {
                f()?;
            }
            dev.synchronize()?;
            let mut best = Vec::with_capacity(reps);
            for _ in 0..reps {
                let t = Instant::now();
                f()?;
                dev.synchronize()?;
                best.push(t.elapsed().as_secs_f64() * 1e3);
            }
            best.sort_by(|x, y| x.total_cmp(y));
            Ok(best[reps / 2])
        };

    // Raw launcher: outputs allocated once, as a caller managing its own buffers would.
    let (qs, ks, vs) = (q.flatten_all()?, k.flatten_all()?, v.flatten_all()?);
    let view = |t: &Tensor| -> Result<Vec<half::bf16>, candle_core::Error> { t.to_vec1::<half::bf16>() };
    let (qh, kh, vh) = (view(&qs)?, view(&ks)?, view(&vs)?);
    let (qd, kd, vd) = (stream.clone_htod(&qh)?, stream.clone_htod(&kh)?, stream.clone_htod(&vh)?);
    let mut bufs = Buffers {
        o: stream.alloc_zeros::<half::bf16>(qh.len())?,
        rem: stream.alloc_zeros::<f32>(b * h * n)?,
        log2_rem: stream.alloc_zeros::<f32>(b * h * n)?,
        o_saved: stream.alloc_zeros::<f32>(qh.len())?,
        dq: stream.alloc_zeros::<half::bf16>(qh.len())?,
        dk: stream.alloc_zeros::<half::bf16>(kh.len())?,
        dv: stream.alloc_zeros::<half::bf16>(vh.len())?,
    };
    let d_o = stream.clone_htod(&vec![half::bf16::ONE; qh.len()])?;
    let raw_forward = |x: &mut Buffers, save: bool| -> Result<(), Box<dyn std::error::Error>> {
        let args = ForwardArgs {
            q: qd.slice(..),
            k: kd.slice(..),
            v: vd.slice(..),
            o: x.o.slice_mut(..),
            rem: x.rem.slice_mut(..),
            log2_rem: x.log2_rem.slice_mut(..),
            o_saved: if save { Some(x.o_saved.slice_mut(..)) } else { None },
            varlen: None,
        };
        state.launcher.forward(&fwd, shape, args, None)?;
        Ok(())
    };
    let raw_fwd = time(&mut || raw_forward(&mut bufs, false))?;
    let raw_train = time(&mut || {
        raw_forward(&mut bufs, true)?;
        let x = &mut bufs;
        let args = BackwardArgs {
            q: qd.slice(..),
            k: kd.slice(..),
            v: vd.slice(..),
            o: x.o.slice(..),
            o_saved: x.o_saved.slice(..),
            d_o: d_o.slice(..),
            d_rem: None,
            log2_rem: x.log2_rem.slice(..),
            dq: x.dq.slice_mut(..),
            dk: x.dk.slice_mut(..),
            dv: x.dv.slice_mut(..),
            varlen: None,
        };
        state.launcher.backward(&bwd, shape, args, None)?;
        Ok(())
    })?;

    let (qv, kv, vv) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&v)?);
    let candle = |keep_pool: bool| -> Result<(f64, f64), Box<dyn std::error::Error>> {
        set_memory_pool_release_threshold(cuda, if keep_pool { u64::MAX } else { 0 })?;
        let fwd = time(&mut || {
            let _ = stick_breaking_attention(&q, &k, &v, &opts)?;
            Ok(())
        })?;
        let train = time(&mut || {
            let (o, _rem) = stick_breaking_attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), &opts)?;
            let grads = o.backward()?;
            assert!(grads.get(qv.as_tensor()).is_some());
            Ok(())
        })?;
        Ok((fwd, train))
    };
    let (candle_fwd, candle_train) = candle(false)?;
    let (kept_fwd, kept_train) = candle(true)?;
    set_memory_pool_release_threshold(cuda, 0)?;
    println!("sbgen-candle overhead at batch {b}, heads {h}, seq {n}, head_dim {d} (bf16, BNHD, median of {reps}):");
    println!("  kernels: {} / {}", fwd.name(), bwd.name());
    println!("  (candle allocates from the device's default memory pool; by default the pool returns free memory");
    println!("   to the driver at every synchronisation, so each step maps its buffers again: \"pool kept\" sets the");
    println!("   pool's release threshold to the maximum, as a caching allocator does)");
    for (what, raw, candle, kept, f) in [
        ("forward", raw_fwd, candle_fwd, kept_fwd, flops),
        ("fwd+bwd", raw_train, candle_train, kept_train, 3.5 * flops),
    ] {
        println!(
            "  {what:8} raw launcher {raw:8.3} ms ({:6.1} TFLOP/s)  candle op {candle:8.3} ms ({:+.2}%)  candle op, pool kept {kept:8.3} ms ({:6.1} TFLOP/s, {:+.2}%)",
            f / raw / 1e9,
            (candle / raw - 1.0) * 100.0,
            f / kept / 1e9,
            (kept / raw - 1.0) * 100.0
        );
    }
    Ok(())
}
