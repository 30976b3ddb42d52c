//! Lowering and compile time on the CPU: `lower()` (templates to CUDA C++ plus manifest) for each pass
//! and head_dim at the default schedule, then NVRTC's compile of that source to PTX. The compile part
//! is skipped, with a message, when no CUDA toolchain is found (`source scripts/env.sh` installs one).

use criterion::{criterion_group, criterion_main, Criterion};
use sbgen::compile::Compiler;
use sbgen::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};
use sbgen::lower::lower;
use std::hint::black_box;
use std::time::Duration;

fn kernels() -> Vec<(String, Kernel)> {
    let mut out = Vec::new();
    for pass in [Pass::Forward, Pass::Backward] {
        for head_dim in [64, 128] {
            let spec = Spec::new(head_dim, Dtype::Bf16, pass);
            let kernel = Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm90);
            out.push((format!("{}_d{head_dim}", if pass == Pass::Forward { "fwd" } else { "bwd" }), kernel));
        }
    }
    out
}

fn bench_lower(c: &mut Criterion) {
    let mut group = c.benchmark_group("lower");
    for (label, kernel) in kernels() {
        group.bench_function(label, |b| b.iter(|| lower(black_box(&kernel)).expect("lowers")));
    }
    group.finish();
}

fn bench_nvrtc(c: &mut Criterion) {
    let compiler = match Compiler::discover() {
        Ok(c) => c,
        Err(e) => {
            println!("nvrtc: skipped, no CUDA toolchain: {}", e.to_string().lines().next().unwrap_or_default());
            return;
        }
    };
    let mut group = c.benchmark_group("nvrtc");
    // One compile takes seconds: the fewest samples criterion allows.
    group.sample_size(10).measurement_time(Duration::from_secs(30)).warm_up_time(Duration::from_secs(1));
    for (label, kernel) in kernels() {
        let lowered = lower(&kernel).expect("lowers");
        group.bench_function(label, |b| b.iter(|| compiler.to_ptx(black_box(&lowered)).expect("compiles")));
    }
    group.finish();
}

criterion_group!(benches, bench_lower, bench_nvrtc);
criterion_main!(benches);
