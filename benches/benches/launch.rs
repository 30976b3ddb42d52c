//! The launch path of `#[stick_breaking_attention]` on a GPU: `SbAttn::forward` and
//! `forward + backward` (input checks, kernel pick, module-store lookup, launches) on preallocated
//! buffers, timed with `iter_custom` so that each measurement ends with a device sync. The first
//! call (module load, NVRTC compile when no tuned PTX is embedded) happens before timing.
//! Without a GPU it prints a skip message and returns.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;
use sbgen_macros::stick_breaking_attention;
use sbgen_runtime::launcher::{BackwardArgs, ForwardArgs, LaunchError, Launcher, Shape};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[stick_breaking_attention(head_dim = 128, dtype = "bf16")]
struct SbAttn;

struct Buffers {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    d_o: CudaSlice<bf16>,
    dq: CudaSlice<bf16>,
    dk: CudaSlice<bf16>,
    dv: CudaSlice<bf16>,
    rem: CudaSlice<f32>,
    log2_rem: CudaSlice<f32>,
    o_saved: CudaSlice<f32>,
}

impl Buffers {
    fn new(stream: &Arc<CudaStream>, shape: Shape) -> Result<Buffers, Box<dyn std::error::Error>> {
        let (n, rows) = (shape.len(), shape.rows());
        let data: Vec<bf16> = (0..n).map(|i| bf16::from_f32(((i * 7919) % 2003) as f32 / 2003.0 - 0.5)).collect();
        Ok(Buffers {
            q: stream.clone_htod(&data)?,
            k: stream.clone_htod(&data)?,
            v: stream.clone_htod(&data)?,
            d_o: stream.clone_htod(&data)?,
            o: stream.alloc_zeros(n)?,
            dq: stream.alloc_zeros(n)?,
            dk: stream.alloc_zeros(n)?,
            dv: stream.alloc_zeros(n)?,
            rem: stream.alloc_zeros(rows)?,
            log2_rem: stream.alloc_zeros(rows)?,
            o_saved: stream.alloc_zeros(n)?,
        })
    }

    fn forward(&mut self, launcher: &Launcher, shape: Shape) -> Result<(), LaunchError> {
        let args = ForwardArgs {
            q: self.q.as_view(),
            k: self.k.as_view(),
            v: self.v.as_view(),
            o: self.o.as_view_mut(),
            rem: self.rem.as_view_mut(),
            log2_rem: self.log2_rem.as_view_mut(),
            o_saved: Some(self.o_saved.as_view_mut()),
            varlen: None,
        };
        SbAttn::forward(launcher, shape, args, None)
    }

    fn backward(&mut self, launcher: &Launcher, shape: Shape) -> Result<(), LaunchError> {
        let args = BackwardArgs {
            q: self.q.as_view(),
            k: self.k.as_view(),
            v: self.v.as_view(),
            o: self.o.as_view(),
            o_saved: self.o_saved.as_view(),
            d_o: self.d_o.as_view(),
            d_rem: None,
            log2_rem: self.log2_rem.as_view(),
            dq: self.dq.as_view_mut(),
            dk: self.dk.as_view_mut(),
            dv: self.dv.as_view_mut(),
            varlen: None,
        };
        SbAttn::backward(launcher, shape, args, None)
    }
}

fn open() -> Result<Arc<CudaStream>, String> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) is not installed".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => return Err("the driver reports 0 devices".into()),
        Err(e) => return Err(format!("cuInit failed: {e}")),
    }
    CudaContext::new(0).and_then(|ctx| ctx.new_stream()).map_err(|e| e.to_string())
}

fn bench_launch(c: &mut Criterion) {
    let stream = match open() {
        Ok(s) => s,
        Err(why) => {
            println!("launch: skipped, no CUDA device ({why})");
            return;
        }
    };
    let launcher = Launcher::new(stream.clone()).expect("launcher");
    let mut group = c.benchmark_group("launch");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for (batch, heads, seq) in [(1, 16, 1024), (4, 16, 4096)] {
        let shape = Shape::new(batch, heads, seq, 128);
        let mut bufs = Buffers::new(&stream, shape).expect("buffers");
        // Load (and, without tuned PTX, NVRTC-compile) both kernels before timing.
        bufs.forward(&launcher, shape).expect("forward");
        bufs.backward(&launcher, shape).expect("backward");
        stream.synchronize().expect("sync");
        let id = format!("b{batch}h{heads}n{seq}");
        group.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    bufs.forward(&launcher, shape).expect("forward");
                }
                stream.synchronize().expect("sync");
                start.elapsed()
            })
        });
        group.bench_function(BenchmarkId::new("forward+backward", &id), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    bufs.forward(&launcher, shape).expect("forward");
                    bufs.backward(&launcher, shape).expect("backward");
                }
                stream.synchronize().expect("sync");
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_launch);
criterion_main!(benches);
