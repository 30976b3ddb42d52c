//! The CPU path's speed: forward, and forward + backward through candle's autograd, in float32 on
//! rayon's pool (`RAYON_NUM_THREADS` picks the threads).
//!
//! ```text
//! cargo run --release -p sbgen-candle --example cpu_throughput -- 1 8 2048 64 [reps]
//! ```
//! Arguments: batch, heads, seq, head_dim (strict mask, remainder returned). GFLOP/s are counted as
//! docs/performance.md counts them: `2 * b * h * n^2 * d` for the forward, 3.5 times that for
//! forward + backward.

use candle_core::{Device, Tensor, Var};
use sbgen_candle::{stick_breaking_attention, SbOptions};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let (b, h, n, d) = match a[..] {
        [b, h, n, d, ..] => (b, h, n, d),
        _ => return Err("usage: cpu_throughput BATCH HEADS SEQ HEAD_DIM [REPS]".into()),
    };
    let reps = a.get(4).copied().unwrap_or(3).max(1);
    let dev = Device::Cpu;
    let opts = SbOptions::default();
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, h, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, h, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, h, d), &dev)?)?;
    let flops = 2.0 * (b * h) as f64 * (n * n) as f64 * d as f64;

    let best = |f: &mut dyn FnMut() -> candle_core::Result<()>| -> candle_core::Result<f64> {
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let fwd = best(&mut || {
        stick_breaking_attention(&q, &k, &v, &opts)?;
        Ok(())
    })?;
    let fwd_bwd = best(&mut || {
        let (o, rem) = stick_breaking_attention(&q, &k, &v, &opts)?;
        (o.sum_all()? + rem.sum_all()?)?.backward()?;
        Ok(())
    })?;
    let threads = rayon::current_num_threads();
    println!("shape {b},{h},{n},{d} f32, {threads} threads, best of {reps}");
    println!("forward     {:9.2} ms  {:7.2} GFLOP/s", fwd * 1e3, flops / fwd / 1e9);
    println!("fwd+bwd     {:9.2} ms  {:7.2} GFLOP/s", fwd_bwd * 1e3, 3.5 * flops / fwd_bwd / 1e9);
    Ok(())
}
