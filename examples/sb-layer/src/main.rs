//! A small stick-breaking attention layer: q, k, v and output projections on the CPU, attention on
//! the GPU through `#[stick_breaking_attention]`. Runs the forward and backward on random data, then
//! one decode step over the same keys as a KV cache, and compares the attention's outputs, gradients
//! and the decode's output with the float64 reference of `sbgen_runtime`.
//!
//! Exit status: 0 when every relative error is within tolerance; 1 when one is not, or when a
//! kernel fails; without a GPU it says so and exits 0 (1 when `SBGEN_REQUIRE_GPU=1`, as on the GPU
//! machine). `cargo run -p sb-layer --release`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sbgen_macros::stick_breaking_attention;
use sbgen_runtime::cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use sbgen_runtime::half::bf16;
use sbgen_runtime::kv_cache::check_kv_tables;
use sbgen_runtime::launcher::{BackwardArgs, DecodeArgs, DecodeShape, ForwardArgs, KvCacheGeometry, Launcher, Shape};
use sbgen_runtime::reference;
use std::process::ExitCode;
use std::sync::Arc;

/// The attention kernels: tuned ones from `sbgen-tune.json` beside this Cargo.toml when present,
/// else the spec's default schedule (NVRTC-compiled at first use).
#[stick_breaking_attention(head_dim = 64, dtype = "bf16", mask = "strict", layout = "bhnd", remainder = "return")]
pub struct SbAttn;

/// Relative L2 error of the forward's outputs (docs/checking.md#tolerances).
const FWD_TOL: f64 = 5e-3;
/// Relative L2 error of the gradients.
const GRAD_TOL: f64 = 1e-2;
/// Absolute error of the decode's rem (in [0, 1]).
const REM_ABS_TOL: f64 = 1e-6;

/// `x @ W` per head, written BHND: x is [B, N, C], W is [C, H * D] (row-major), the result
/// [B, H, N, D].
struct Layer {
    channels: usize,
    heads: usize,
    head_dim: usize,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
}

impl Layer {
    fn random(rng: &mut StdRng, channels: usize, heads: usize, head_dim: usize) -> Layer {
        let hd = heads * head_dim;
        let mut w = |rows: usize, cols: usize| -> Vec<f32> {
            let s = 1.0 / (rows as f32).sqrt();
            (0..rows * cols).map(|_| rng.gen_range(-s..s) * 1.7).collect()
        };
        Layer {
            channels,
            heads,
            head_dim,
            wq: w(channels, hd),
            wk: w(channels, hd),
            wv: w(channels, hd),
            wo: w(hd, channels),
        }
    }

    /// x [B, N, C] @ w [C, H*D] -> [B, H, N, D].
    fn project(&self, x: &[f32], batch: usize, seq: usize, w: &[f32]) -> Vec<f32> {
        let (c, h, d) = (self.channels, self.heads, self.head_dim);
        let mut out = vec![0.0f32; batch * h * seq * d];
        for b in 0..batch {
            for n in 0..seq {
                let row = &x[(b * seq + n) * c..][..c];
                for head in 0..h {
                    for j in 0..d {
                        let col = head * d + j;
                        let acc: f32 = row.iter().enumerate().map(|(i, &xi)| xi * w[i * h * d + col]).sum();
                        out[((b * h + head) * seq + n) * d + j] = acc;
                    }
                }
            }
        }
        out
    }

    /// Heads merged back: o [B, H, N, D] -> [B, N, H*D] @ wo -> [B, N, C].
    fn output(&self, o: &[f32], batch: usize, seq: usize) -> Vec<f32> {
        let (c, h, d) = (self.channels, self.heads, self.head_dim);
        let mut y = vec![0.0f32; batch * seq * c];
        for b in 0..batch {
            for n in 0..seq {
                for head in 0..h {
                    let oh = &o[((b * h + head) * seq + n) * d..][..d];
                    for (j, &ov) in oh.iter().enumerate() {
                        let wrow = &self.wo[(head * d + j) * c..][..c];
                        for (yc, &wv) in y[(b * seq + n) * c..][..c].iter_mut().zip(wrow) {
                            *yc += ov * wv;
                        }
                    }
                }
            }
        }
        y
    }
}

fn main() -> ExitCode {
    let require_gpu = std::env::var("SBGEN_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let (batch, seq, channels, heads) = (2, 256, 128, 4);
    let head_dim = SbAttn::FORWARD_SPEC.head_dim as usize;
    let mut rng = StdRng::seed_from_u64(7);
    let layer = Layer::random(&mut rng, channels, heads, head_dim);
    let x: Vec<f32> = (0..batch * seq * channels).map(|_| rng.gen_range(-1.0..1.0)).collect();
    // The attention's inputs, rounded to bf16 as the kernels see them.
    let round = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
    let q = round(layer.project(&x, batch, seq, &layer.wq));
    let k = round(layer.project(&x, batch, seq, &layer.wk));
    let v = round(layer.project(&x, batch, seq, &layer.wv));
    let d_o = round((0..q.len()).map(|_| rng.gen_range(-1.0..1.0)).collect());
    let shape = Shape::new(batch, heads, seq, head_dim);

    for (pass, set) in [
        ("forward", SbAttn::forward_kernels()),
        ("backward", SbAttn::backward_kernels()),
        ("decode", SbAttn::decode_kernels()),
    ] {
        let binaries = match set.binaries() {
            Ok(binaries) => binaries,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        };
        for k in binaries {
            let targets: Vec<&str> = k.ptx().iter().map(|(t, _)| t.as_str()).collect();
            let source = if k.cuda_source().is_some() { "CUDA source (NVRTC at first use)" } else { "" };
            println!("embedded {pass} kernel {}: PTX {targets:?} {source}", k.name());
        }
    }

    let stream = match open_gpu() {
        Ok(s) => s,
        Err(why) => {
            println!("sb-layer: no CUDA device ({why}); nothing run");
            return if require_gpu { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
    };
    match run(&layer, stream, shape, &q, &k, &v, &d_o) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sb-layer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open_gpu() -> Result<Arc<CudaStream>, String> {
    // SAFETY: only probes whether the driver library can be loaded (cudarc panics on first use of
    // a missing library otherwise).
    if !unsafe { sbgen_runtime::cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) is not installed".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => return Err("the driver reports 0 devices".into()),
        Err(e) => return Err(format!("cuInit failed: {e}")),
    }
    let ctx = CudaContext::new(0).map_err(|e| e.to_string())?;
    ctx.new_stream().map_err(|e| e.to_string())
}

type BoxError = Box<dyn std::error::Error>;

#[allow(clippy::too_many_arguments)]
fn run(
    layer: &Layer,
    stream: Arc<CudaStream>,
    shape: Shape,
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    d_o: &[bf16],
) -> Result<bool, BoxError> {
    let launcher = Launcher::new(stream.clone())?;
    let kernel = SbAttn::forward_kernel(&launcher, shape.seq)?;
    println!("device compute capability {:?}; forward kernel {}", launcher.store().compute_capability(), kernel.name());

    let (n, rows) = (shape.len(), shape.rows());
    let q_d = stream.clone_htod(q)?;
    let k_d = stream.clone_htod(k)?;
    let v_d = stream.clone_htod(v)?;
    let d_o_d = stream.clone_htod(d_o)?;
    let mut o: CudaSlice<bf16> = stream.alloc_zeros(n)?;
    let mut rem: CudaSlice<f32> = stream.alloc_zeros(rows)?;
    let mut log2_rem: CudaSlice<f32> = stream.alloc_zeros(rows)?;
    let mut o_saved: CudaSlice<f32> = stream.alloc_zeros(n)?;
    let fwd = ForwardArgs {
        q: q_d.as_view(),
        k: k_d.as_view(),
        v: v_d.as_view(),
        o: o.as_view_mut(),
        rem: rem.as_view_mut(),
        log2_rem: log2_rem.as_view_mut(),
        o_saved: Some(o_saved.as_view_mut()),
        varlen: None,
    };
    SbAttn::forward(&launcher, shape, fwd, None)?;

    let mut dq: CudaSlice<bf16> = stream.alloc_zeros(n)?;
    let mut dk: CudaSlice<bf16> = stream.alloc_zeros(n)?;
    let mut dv: CudaSlice<bf16> = stream.alloc_zeros(n)?;
    let bwd = BackwardArgs {
        q: q_d.as_view(),
        k: k_d.as_view(),
        v: v_d.as_view(),
        o: o.as_view(),
        o_saved: o_saved.as_view(),
        d_o: d_o_d.as_view(),
        d_rem: None,
        log2_rem: log2_rem.as_view(),
        dq: dq.as_view_mut(),
        dk: dk.as_view_mut(),
        dv: dv.as_view_mut(),
        varlen: None,
    };
    SbAttn::backward(&launcher, shape, bwd, None)?;

    // One decode step over the same keys and values as a KV cache (each sequence's last token is
    // the new one): its o and rem must be the forward's last row (docs/math.md#decode).
    let d = shape.head_dim;
    let last_rows = |x: &[bf16], count: usize| -> Vec<bf16> {
        (0..count).flat_map(|bh| x[(bh * shape.seq + shape.seq - 1) * d..][..d].iter().copied()).collect()
    };
    let q_new = stream.clone_htod(&last_rows(q, shape.batch * shape.heads))?;
    let cache = KvCacheGeometry::Contiguous { capacity: shape.seq };
    let seqlens = vec![shape.seq as i32; shape.batch];
    check_kv_tables(cache, shape.batch, &seqlens, None)?;
    let seqlens_d = stream.clone_htod(&seqlens)?;
    let mut o_dec: CudaSlice<bf16> = stream.alloc_zeros(shape.batch * shape.heads * d)?;
    let mut rem_dec: CudaSlice<f32> = stream.alloc_zeros(shape.batch * shape.heads)?;
    let dec = DecodeArgs {
        q: q_new.as_view(),
        k_cache: k_d.as_view(),
        v_cache: v_d.as_view(),
        cache,
        seqlens_k: seqlens_d.as_view(),
        block_table: None,
        o: o_dec.as_view_mut(),
        rem: rem_dec.as_view_mut(),
    };
    let decode_shape =
        DecodeShape { batch: shape.batch, heads: shape.heads, kv_heads: shape.kv_heads, head_dim: shape.head_dim };
    SbAttn::decode(&launcher, decode_shape, dec, None)?;
    stream.synchronize()?;

    let host = |x: &CudaSlice<bf16>| -> Result<Vec<f32>, BoxError> {
        Ok(stream.clone_dtoh(x)?.into_iter().map(f32::from).collect())
    };
    let (o_h, dq_h, dk_h, dv_h) = (host(&o)?, host(&dq)?, host(&dk)?, host(&dv)?);
    let rem_h = stream.clone_dtoh(&rem)?;
    let (o_dec_h, rem_dec_h) = (host(&o_dec)?, stream.clone_dtoh(&rem_dec)?);

    // The float64 reference on the same bf16 inputs.
    let wide = |x: &[bf16]| x.iter().map(|&e| f64::from(e)).collect::<Vec<_>>();
    let spec = SbAttn::FORWARD_SPEC;
    let opts = reference::Options {
        mask: spec.mask,
        remainder: spec.remainder,
        early_exit_bits: spec.early_exit_bits,
        scale: None,
    };
    let (q64, k64, v64) = (wide(q), wide(k), wide(v));
    let want = reference::forward(shape, &opts, &q64, &k64, &v64);
    let grads = reference::backward(shape, &opts, &q64, &k64, &v64, &wide(d_o), None);
    let rows_bh = shape.batch * shape.heads;
    let o_last: Vec<f64> =
        (0..rows_bh).flat_map(|bh| want.o[(bh * shape.seq + shape.seq - 1) * d..][..d].iter().copied()).collect();
    let rem_last: Vec<f64> = (0..rows_bh).map(|bh| want.rem[bh * shape.seq + shape.seq - 1]).collect();

    let mut ok = true;
    for (name, got, want, tol) in [
        ("o", &o_h, &want.o, FWD_TOL),
        ("rem", &rem_h, &want.rem, FWD_TOL),
        ("dq", &dq_h, &grads.dq, GRAD_TOL),
        ("dk", &dk_h, &grads.dk, GRAD_TOL),
        ("dv", &dv_h, &grads.dv, GRAD_TOL),
        ("decode o", &o_dec_h, &o_last, FWD_TOL),
    ] {
        let err = rel_l2(got, want);
        let pass = err <= tol;
        ok &= pass;
        println!("{name:>10}: relative L2 error {err:.3e} (tolerance {tol:.0e}) {}", if pass { "ok" } else { "FAIL" });
    }
    // The last row's rem is the whole stick's product over 255 keys (about 2^-280 here): f32 holds 0
    // there, so it is compared absolutely.
    let rem_err = rem_dec_h.iter().zip(&rem_last).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
    let rem_ok = rem_err <= REM_ABS_TOL;
    ok &= rem_ok;
    println!(
        "decode rem: max absolute error {rem_err:.3e} (tolerance {REM_ABS_TOL:.0e}) {}",
        if rem_ok { "ok" } else { "FAIL" }
    );
    let y = layer.output(&o_h, shape.batch, shape.seq);
    let norm = (y.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>() / y.len() as f64).sqrt();
    println!("layer output [B, N, C] = [{}, {}, {}], rms {norm:.4}", shape.batch, shape.seq, layer.channels);
    println!("{}", if ok { "sb-layer: ok" } else { "sb-layer: FAILED" });
    Ok(ok)
}

/// ||got - want|| / ||want||; NaN when `got` has a non-finite value.
fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::NAN;
        }
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
