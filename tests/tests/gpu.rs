//! GPU tests: forward and backward kernels against the float64 reference (odd N, odd B and H,
//! poisoned outputs) and the launcher's refusals on a real device.
//!
//! Every test starts with a device probe: with no driver or no GPU (CI) it prints "skipping: no
//! CUDA device" and returns, unless `SBGEN_REQUIRE_GPU=1` (set by `scripts/gpu-session.sh`), when
//! a missing device fails the test. Kernels come from `$SBGEN_PTX_DIR` (PTX built by `sbgen check
//! --emit-ptx`) or are compiled with NVRTC when a CUDA toolchain is present.

use cudarc::driver::{CudaSlice, DevicePtr};
use sbgen::gpu::check::{self, CheckPlan, FWD_TOL, GRAD_TOL};
use sbgen::gpu::data::{
    from_layout_seqs, make_inputs, make_packed_inputs, non_finite, rel_l2, rows_from_layout, widen,
};
use sbgen::gpu::data::{Regime, Sequences};
use sbgen::gpu::exec::{self, DeviceProblem};
use sbgen::gpu::{Device, GpuError, KernelBuilder};
use sbgen::ir::{Dtype, Layout, Mask, Pass, Remainder, Spec};
use sbgen_runtime::launcher::{BackwardArgs, ForwardArgs, KernelBinary, LaunchError, SbElement, Varlen};
use sbgen_runtime::reference::{self, Options, Shape};
use std::sync::Arc;
use std::time::Duration;

/// The device, or `None` (after saying so) when there is none.
fn device() -> Option<Device> {
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(GpuError::NoDevice(why)) => {
            if std::env::var("SBGEN_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("no CUDA device ({why}) and SBGEN_REQUIRE_GPU=1");
            }
            eprintln!("skipping: no CUDA device ({why})");
            None
        }
        Err(e) => panic!("opening the CUDA device failed: {e}"),
    }
}

fn kernel(dev: &Device, spec: Spec) -> Arc<KernelBinary> {
    let builder = KernelBuilder::from_env(dev.arch, None);
    builder.build(&builder.kernel(spec, None)).unwrap_or_else(|e| panic!("{}: {e}", spec.slug()))
}

fn spec(head_dim: u32, dtype: Dtype, pass: Pass) -> Spec {
    Spec::new(head_dim, dtype, pass)
}

const TIMEOUT: Duration = Duration::from_secs(60);

/// The public launcher API end to end, as a user would call it: forward then backward, outputs
/// poisoned, compared with the float64 reference.
fn forward_and_backward<T: SbElement>(dev: &Device, base: Spec, shape: Shape, with_d_rem: bool) {
    let inputs = make_inputs(shape, base.dtype, Regime::Random, 0x5eed ^ shape.seq as u64);
    let fwd = kernel(dev, Spec { pass: Pass::Forward, ..base });
    let bwd = kernel(dev, Spec { pass: Pass::Backward, ..base });
    let p = DeviceProblem::<T>::upload(dev, &inputs, base.layout, with_d_rem).unwrap();
    let mut o = exec::poisoned::<T>(dev, shape.len()).unwrap();
    let mut rem = exec::poisoned_f32(dev, shape.rows()).unwrap();
    let mut log2_rem = exec::poisoned_f32(dev, shape.rows()).unwrap();
    let mut o_saved = exec::poisoned_f32(dev, shape.len()).unwrap();
    let args = ForwardArgs {
        q: p.q.as_view(),
        k: p.k.as_view(),
        v: p.v.as_view(),
        o: o.as_view_mut(),
        rem: rem.as_view_mut(),
        log2_rem: log2_rem.as_view_mut(),
        o_saved: Some(o_saved.as_view_mut()),
        varlen: None,
    };
    dev.launcher.forward(&fwd, shape, args, None).unwrap();
    let (mut dq, mut dk, mut dv) = (
        exec::poisoned::<T>(dev, shape.len()).unwrap(),
        exec::poisoned::<T>(dev, shape.len()).unwrap(),
        exec::poisoned::<T>(dev, shape.len()).unwrap(),
    );
    let args = BackwardArgs {
        q: p.q.as_view(),
        k: p.k.as_view(),
        v: p.v.as_view(),
        o: o.as_view(),
        o_saved: o_saved.as_view(),
        d_o: p.d_o.as_view(),
        d_rem: p.d_rem.as_ref().map(|d| d.as_view()),
        log2_rem: log2_rem.as_view(),
        dq: dq.as_view_mut(),
        dk: dk.as_view_mut(),
        dv: dv.as_view_mut(),
        varlen: None,
    };
    dev.launcher.backward(&bwd, shape, args, None).unwrap();
    dev.sync(bwd.name(), TIMEOUT).unwrap();

    let opts = Options::from(&base);
    let (q, k, v) = (widen(&inputs.q), widen(&inputs.k), widen(&inputs.v));
    let want = reference::forward(shape, &opts, &q, &k, &v);
    let d_rem = widen(&inputs.d_rem);
    let grads =
        reference::backward(shape, &opts, &q, &k, &v, &widen(&inputs.d_o), with_d_rem.then_some(d_rem.as_slice()));
    let what = format!("{} N={} d_rem={with_d_rem}", base.slug(), shape.seq);
    let got_o = exec::download(dev, shape, base.layout, &o).unwrap();
    let got_rem = exec::download_f32(dev, &rem).unwrap();
    let got_log2_rem = exec::download_f32(dev, &log2_rem).unwrap();
    let got_o_saved = exec::download_f32_in(dev, shape, base.layout, &o_saved).unwrap();
    for (name, x) in [("o", &got_o), ("rem", &got_rem), ("log2_rem", &got_log2_rem), ("o_saved", &got_o_saved)] {
        assert_eq!(non_finite(x), 0, "{what}: {name} has unwritten (NaN) elements");
    }
    let e = rel_l2(&got_o, &want.o);
    assert!(e <= FWD_TOL, "{what}: o error {e:.2e}");
    let e = rel_l2(&got_rem, &want.rem);
    assert!(e <= FWD_TOL, "{what}: rem error {e:.2e}");
    // o_saved is o before the fused remainder.
    let d = shape.head_dim;
    let unfused: Vec<f64> = match base.remainder {
        Remainder::Return => want.o.clone(),
        Remainder::Fuse => want.o.iter().zip(&v).enumerate().map(|(i, (o, v))| o - want.rem[i / d] * v).collect(),
    };
    let e = rel_l2(&got_o_saved, &unfused);
    assert!(e <= FWD_TOL, "{what}: o_saved error {e:.2e}");
    for (name, x, r) in [("dq", &dq, &grads.dq), ("dk", &dk, &grads.dk), ("dv", &dv, &grads.dv)] {
        let got = exec::download(dev, shape, base.layout, x).unwrap();
        assert_eq!(non_finite(&got), 0, "{what}: {name} has unwritten (NaN) elements");
        // The backward read the kernel's o, o_saved and log2_rem (not the reference's).
        let e = rel_l2(&got, r);
        assert!(e <= GRAD_TOL, "{what}: {name} error {e:.2e}");
    }
}

#[test]
fn bf16_d64_forward_and_backward_match_the_reference_on_odd_shapes() {
    let Some(dev) = device() else { return };
    for seq in [1, 17, 129] {
        forward_and_backward::<half::bf16>(&dev, spec(64, Dtype::Bf16, Pass::Forward), Shape::new(3, 5, seq, 64), true);
    }
}

#[test]
fn f16_d128_bnhd_fused_attend_current_without_d_rem() {
    let Some(dev) = device() else { return };
    let base = Spec {
        mask: Mask::AttendCurrent,
        layout: Layout::Bnhd,
        remainder: Remainder::Fuse,
        ..spec(128, Dtype::F16, Pass::Forward)
    };
    for seq in [17, 300] {
        forward_and_backward::<half::f16>(&dev, base, Shape::new(3, 5, seq, 128), false);
    }
}

#[test]
fn early_exit_kernels_match_the_reference() {
    let Some(dev) = device() else { return };
    let base = Spec { early_exit_bits: Some(24), ..spec(128, Dtype::Bf16, Pass::Forward) };
    forward_and_backward::<half::bf16>(&dev, base, Shape::new(1, 3, 1000, 128), true);
}

/// A packed batch (THD) with grouped-query attention through the public launcher API, as a user calls
/// it: `cu_seqlens` on the device, k and v with fewer heads, the deterministic backward run twice.
#[test]
fn packed_grouped_batch_through_the_launcher_matches_the_reference_and_repeats_bit_for_bit() {
    let Some(dev) = device() else { return };
    let lens = [0, 1, 17, 300, 64];
    let shape = Shape::new(1, 6, 1, 80).with_kv_heads(2); // head_dim 80: a padded tile of 96
    let inputs = make_packed_inputs(shape, &lens, Dtype::Bf16, Regime::Random, 0xbadc0de);
    let shape = inputs.shape; // batch 5, seq 300 (max_seqlen)
    let base = Spec { layout: Layout::Thd, remainder: Remainder::Fuse, ..spec(80, Dtype::Bf16, Pass::Forward) };
    let fwd = kernel(&dev, base);
    let bwd = kernel(&dev, Spec { pass: Pass::Backward, deterministic: true, ..base });
    let p = DeviceProblem::<half::bf16>::upload(&dev, &inputs, Layout::Thd, true).unwrap();
    let cu = p.cu_seqlens.as_ref().expect("THD uploads cu_seqlens").as_view();
    let varlen = Varlen { cu_seqlens: &cu, total_tokens: inputs.tokens() };
    let mut o = exec::poisoned::<half::bf16>(&dev, p.q_len()).unwrap();
    let mut rem = exec::poisoned_f32(&dev, p.rows()).unwrap();
    let mut log2_rem = exec::poisoned_f32(&dev, p.rows()).unwrap();
    let mut o_saved = exec::poisoned_f32(&dev, p.q_len()).unwrap();
    let args = ForwardArgs {
        q: p.q.as_view(),
        k: p.k.as_view(),
        v: p.v.as_view(),
        o: o.as_view_mut(),
        rem: rem.as_view_mut(),
        log2_rem: log2_rem.as_view_mut(),
        o_saved: Some(o_saved.as_view_mut()),
        varlen: Some(varlen),
    };
    dev.launcher.forward(&fwd, shape, args, None).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let dq = exec::poisoned::<half::bf16>(&dev, p.q_len()).unwrap();
        let (dk, dv) =
            (exec::poisoned::<half::bf16>(&dev, p.kv_len()).unwrap(), exec::poisoned(&dev, p.kv_len()).unwrap());
        let (mut dq, mut dk, mut dv): (CudaSlice<half::bf16>, CudaSlice<half::bf16>, CudaSlice<half::bf16>) =
            (dq, dk, dv);
        let args = BackwardArgs {
            q: p.q.as_view(),
            k: p.k.as_view(),
            v: p.v.as_view(),
            o: o.as_view(),
            o_saved: o_saved.as_view(),
            d_o: p.d_o.as_view(),
            d_rem: p.d_rem.as_ref().map(|d| d.as_view()),
            log2_rem: log2_rem.as_view(),
            dq: dq.as_view_mut(),
            dk: dk.as_view_mut(),
            dv: dv.as_view_mut(),
            varlen: Some(varlen),
        };
        dev.launcher.backward(&bwd, shape, args, None).unwrap();
        dev.sync(bwd.name(), TIMEOUT).unwrap();
        runs.push([dq, dk, dv].map(|x| dev.stream.clone_dtoh(&x).unwrap()));
    }
    let bits = |x: &[half::bf16]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (name, (a, b)) in ["dq", "dk", "dv"].iter().zip(runs[0].iter().zip(&runs[1])) {
        assert_eq!(bits(a), bits(b), "{name}: the deterministic backward differs between two runs");
    }
    // Against the float64 reference, one sequence at a time (sbgen's oracle in canonical order).
    let opts = Options::from(&base);
    let want = &sbgen::gpu::oracle::expected(&inputs, &[opts], true, 4)[0];
    let (lens, d) = (&inputs.seq_lens, shape.head_dim);
    let canon = |x: &[half::bf16], heads| {
        from_layout_seqs(lens, heads, d, Layout::Thd, &x.iter().map(|v| v.to_f32()).collect::<Vec<_>>())
    };
    let got_o = canon(&dev.stream.clone_dtoh(&o).unwrap(), shape.heads);
    let got_rem = rows_from_layout(lens, shape.heads, Layout::Thd, &exec::download_f32(&dev, &rem).unwrap());
    assert_eq!(non_finite(&got_o) + non_finite(&got_rem), 0, "unwritten o or rem elements");
    assert!(rel_l2(&got_o, &want.o) <= FWD_TOL, "o error {:.2e}", rel_l2(&got_o, &want.o));
    assert!(rel_l2(&got_rem, &want.rem) <= FWD_TOL, "rem error {:.2e}", rel_l2(&got_rem, &want.rem));
    let g = want.grads.as_ref().unwrap();
    for (name, x, heads, r) in [
        ("dq", &runs[0][0], shape.heads, &g.dq),
        ("dk", &runs[0][1], shape.kv_heads, &g.dk),
        ("dv", &runs[0][2], shape.kv_heads, &g.dv),
    ] {
        let got = canon(x, heads);
        assert_eq!(non_finite(&got), 0, "{name} has unwritten elements");
        let e = rel_l2(&got, r);
        assert!(e <= GRAD_TOL, "{name} error {e:.2e}");
    }
    // A dense kernel refuses cu_seqlens before launching.
    let dense = kernel(&dev, Spec { layout: Layout::Bnhd, ..base });
    let mut o2 = exec::poisoned::<half::bf16>(&dev, p.q_len()).unwrap();
    let (mut r2, mut l2) = (exec::poisoned_f32(&dev, p.rows()).unwrap(), exec::poisoned_f32(&dev, p.rows()).unwrap());
    let args = ForwardArgs {
        q: p.q.as_view(),
        k: p.k.as_view(),
        v: p.v.as_view(),
        o: o2.as_view_mut(),
        rem: r2.as_view_mut(),
        log2_rem: l2.as_view_mut(),
        o_saved: None,
        varlen: Some(varlen),
    };
    let err = dev.launcher.forward(&dense, shape, args, None).unwrap_err();
    assert!(matches!(err, LaunchError::Varlen { .. }), "{err}");
}

/// A device `cu_seqlens` is trusted (the launcher does not read it back), so a bad one must not make
/// the kernels touch memory outside their tensors: a sequence whose offsets decrease, run past the
/// token count, are negative, or span more than max_seqlen is skipped
/// (docs/architecture.md#sequence-views). What the skipped tokens' outputs hold is not meaningful;
/// only the poisoned guard zones around every output are checked, and every launch must finish
/// without a CUDA error.
#[test]
fn a_bad_device_cu_seqlens_never_writes_outside_the_tensors() {
    let Some(dev) = device() else { return };
    // 40 tokens, 4 query heads on 2 K/V heads, head_dim 64; the launches take max_seqlen = 16.
    let inputs =
        make_packed_inputs(Shape::new(1, 4, 1, 64).with_kv_heads(2), &[10, 14, 16], Dtype::Bf16, Regime::Random, 7);
    let shape = Shape { batch: 3, seq: 16, ..inputs.shape };
    let base = Spec { layout: Layout::Thd, remainder: Remainder::Fuse, ..spec(64, Dtype::Bf16, Pass::Forward) };
    let fwd = kernel(&dev, base);
    let bwd = kernel(&dev, Spec { pass: Pass::Backward, deterministic: true, ..base });
    let p = DeviceProblem::<half::bf16>::upload(&dev, &inputs, Layout::Thd, true).unwrap();
    // Decreasing; past the token count; negative; longer than max_seqlen (39 > 16); one valid sequence.
    let bad: [[i32; 4]; 5] = [[0, 30, 10, 40], [0, 10, 50, 40], [-5, 10, 20, 40], [0, 39, 40, 40], [0, 10, 10, 40]];
    for cu in bad {
        let cu_dev = dev.stream.clone_htod(&cu).unwrap();
        let cu_view = cu_dev.as_view();
        let varlen = Varlen { cu_seqlens: &cu_view, total_tokens: inputs.tokens() };
        let mut o = exec::guarded::<half::bf16>(&dev, p.q_len()).unwrap();
        let mut rem = exec::guarded_f32(&dev, p.rows()).unwrap();
        let mut log2_rem = exec::guarded_f32(&dev, p.rows()).unwrap();
        let mut o_saved = exec::guarded_f32(&dev, p.q_len()).unwrap();
        let args = ForwardArgs {
            q: p.q.as_view(),
            k: p.k.as_view(),
            v: p.v.as_view(),
            o: o.view_mut(),
            rem: rem.view_mut(),
            log2_rem: log2_rem.view_mut(),
            o_saved: Some(o_saved.view_mut()),
            varlen: Some(varlen),
        };
        dev.launcher.forward(&fwd, shape, args, None).unwrap();
        dev.sync(fwd.name(), TIMEOUT).unwrap_or_else(|e| panic!("cu_seqlens {cu:?}: forward: {e}"));
        let mut dq = exec::guarded::<half::bf16>(&dev, p.q_len()).unwrap();
        let mut dk = exec::guarded::<half::bf16>(&dev, p.kv_len()).unwrap();
        let mut dv = exec::guarded::<half::bf16>(&dev, p.kv_len()).unwrap();
        let args = BackwardArgs {
            q: p.q.as_view(),
            k: p.k.as_view(),
            v: p.v.as_view(),
            o: o.view(),
            o_saved: o_saved.view(),
            d_o: p.d_o.as_view(),
            d_rem: p.d_rem.as_ref().map(|d| d.as_view()),
            log2_rem: log2_rem.view(),
            dq: dq.view_mut(),
            dk: dk.view_mut(),
            dv: dv.view_mut(),
            varlen: Some(varlen),
        };
        dev.launcher.backward(&bwd, shape, args, None).unwrap();
        dev.sync(bwd.name(), TIMEOUT).unwrap_or_else(|e| panic!("cu_seqlens {cu:?}: backward: {e}"));
        let outside = [
            ("o", o.read(&dev).unwrap().1),
            ("dq", dq.read(&dev).unwrap().1),
            ("dk", dk.read(&dev).unwrap().1),
            ("dv", dv.read(&dev).unwrap().1),
            ("rem", rem.read(&dev).unwrap().1),
            ("log2_rem", log2_rem.read(&dev).unwrap().1),
            ("o_saved", o_saved.read(&dev).unwrap().1),
        ];
        for (name, n) in outside {
            assert_eq!(n, 0, "cu_seqlens {cu:?}: {n} elements written outside `{name}`");
        }
    }
}

#[test]
fn check_plan_on_a_small_matrix_passes() {
    let Some(dev) = device() else { return };
    let mut plan = CheckPlan::quick(0x1234);
    plan.head_dims = vec![64];
    plan.dtypes = vec![Dtype::Bf16];
    plan.seqs = vec![1, 65];
    let builder = KernelBuilder::from_env(dev.arch, None);
    let rows = check::run(&dev, &builder, &plan, &mut |_| {}).unwrap();
    let failed: Vec<String> = rows.iter().filter(|r| !r.passed()).map(sbgen::gpu::failure::format_row).collect();
    assert!(failed.is_empty(), "{} failing rows:\n{}", failed.len(), failed.join("\n"));
    assert_eq!(rows.len(), plan.specs().len() * plan.regimes.len() * plan.seqs.len());
}

/// A forward on bf16 tensors of `shape` with `q` shortened to `q_len`; returns the error and
/// whether `o` is still all poison (nothing was launched).
fn forward_with(dev: &Device, kernel: &KernelBinary, shape: Shape, q_len: usize) -> (LaunchError, bool) {
    let len = shape.batch.max(1) * shape.heads.max(1) * shape.seq.max(1) * shape.head_dim.max(1);
    let q = exec::poisoned::<half::bf16>(dev, q_len.max(1)).unwrap();
    let kv = exec::poisoned::<half::bf16>(dev, len).unwrap();
    let mut o = exec::poisoned::<half::bf16>(dev, len).unwrap();
    let rows = (len / shape.head_dim.max(1)).max(1);
    let mut rem = exec::poisoned_f32(dev, rows).unwrap();
    let mut log2_rem = exec::poisoned_f32(dev, rows).unwrap();
    let args = ForwardArgs {
        q: q.slice(0..q_len),
        k: kv.as_view(),
        v: kv.as_view(),
        o: o.as_view_mut(),
        rem: rem.as_view_mut(),
        log2_rem: log2_rem.as_view_mut(),
        o_saved: None,
        varlen: None,
    };
    let err = dev.launcher.forward(kernel, shape, args, None).expect_err("the launcher must refuse");
    dev.stream.synchronize().unwrap();
    let o_host = dev.stream.clone_dtoh(&o).unwrap();
    (err, o_host.iter().all(|x| x.to_bits() == exec::POISON_16))
}

#[test]
fn launcher_refuses_bad_inputs_before_launching() {
    let Some(dev) = device() else { return };
    let fwd = kernel(&dev, spec(64, Dtype::Bf16, Pass::Forward));
    let shape = Shape::new(3, 5, 17, 64);

    let (err, untouched) = forward_with(&dev, &fwd, shape, shape.len() - 1);
    assert!(matches!(err, LaunchError::TooShort { tensor: "q", .. }), "{err}");
    assert!(untouched, "o was written although the launch was refused");

    let (err, untouched) = forward_with(&dev, &fwd, Shape::new(3, 5, 0, 64), 1);
    assert!(matches!(err, LaunchError::EmptyDim { dim: "seq" }), "{err}");
    assert!(untouched);

    let (err, _) = forward_with(&dev, &fwd, Shape::new(3, 5, 17, 128), shape.len() * 2);
    assert!(matches!(err, LaunchError::HeadDim { expected: 64, got: 128, .. }), "{err}");

    let bwd = kernel(&dev, spec(64, Dtype::Bf16, Pass::Backward));
    let (err, untouched) = forward_with(&dev, &bwd, shape, shape.len());
    assert!(matches!(err, LaunchError::WrongPass { expected: Pass::Forward, got: Pass::Backward, .. }), "{err}");
    assert!(untouched);

    // f16 tensors into a bf16 kernel.
    let x = exec::poisoned::<half::f16>(&dev, shape.len()).unwrap();
    let mut o = exec::poisoned::<half::f16>(&dev, shape.len()).unwrap();
    let mut rem = exec::poisoned_f32(&dev, shape.rows()).unwrap();
    let mut log2_rem = exec::poisoned_f32(&dev, shape.rows()).unwrap();
    let args = ForwardArgs {
        q: x.as_view(),
        k: x.as_view(),
        v: x.as_view(),
        o: o.as_view_mut(),
        rem: rem.as_view_mut(),
        log2_rem: log2_rem.as_view_mut(),
        o_saved: None,
        varlen: None,
    };
    let err = dev.launcher.forward(&fwd, shape, args, None).unwrap_err();
    assert!(matches!(err, LaunchError::Dtype { expected: Dtype::Bf16, got: Dtype::F16, .. }), "{err}");

    // A sub-slice one element in: long enough, but not 16-byte aligned (the kernels load 16 bytes
    // at a time); o must stay untouched.
    let big = exec::poisoned::<half::bf16>(&dev, shape.len() + 8).unwrap();
    let mut o = exec::poisoned::<half::bf16>(&dev, shape.len()).unwrap();
    let args = ForwardArgs {
        q: big.slice(1..shape.len() + 1),
        k: big.slice(0..shape.len()),
        v: big.slice(0..shape.len()),
        o: o.as_view_mut(),
        rem: rem.as_view_mut(),
        log2_rem: log2_rem.as_view_mut(),
        o_saved: None,
        varlen: None,
    };
    let err = dev.launcher.forward(&fwd, shape, args, None).unwrap_err();
    assert!(matches!(err, LaunchError::Misaligned { tensor: "q", required: 16, .. }), "{err}");
    dev.stream.synchronize().unwrap();
    let o_host = dev.stream.clone_dtoh(&o).unwrap();
    assert!(o_host.iter().all(|x| x.to_bits() == exec::POISON_16), "o was written although the launch was refused");
    // Eight elements in (16 bytes) is aligned and runs.
    let args = ForwardArgs {
        q: big.slice(8..shape.len() + 8),
        k: big.slice(0..shape.len()),
        v: big.slice(0..shape.len()),
        o: o.as_view_mut(),
        rem: rem.as_view_mut(),
        log2_rem: log2_rem.as_view_mut(),
        o_saved: None,
        varlen: None,
    };
    dev.launcher.forward(&fwd, shape, args, None).unwrap();
    dev.stream.synchronize().unwrap();
}

#[test]
fn launcher_names_the_arch_when_no_ptx_fits_and_there_is_no_source() {
    let Some(dev) = device() else { return };
    let real = kernel(&dev, spec(64, Dtype::Bf16, Pass::Forward));
    let mut manifest = real.manifest().clone();
    manifest.name.push_str("_no_ptx_test");
    let binary = KernelBinary::new(manifest, vec![("sm_120a".to_string(), String::new())], None);
    let err = dev.launcher.load(&binary).unwrap_err();
    let device_arch = sbgen_runtime::launcher::Target::for_device(dev.compute_capability);
    assert!(matches!(&err, LaunchError::NoKernelForArch { device_arch: a, .. } if *a == device_arch), "{err}");
    assert!(err.to_string().contains("sm_120a"), "{err}");
}

#[test]
fn module_store_loads_each_kernel_once() {
    let Some(dev) = device() else { return };
    let fwd = kernel(&dev, spec(64, Dtype::Bf16, Pass::Forward));
    let a = dev.launcher.load(&fwd).unwrap();
    let b = dev.launcher.load(&fwd).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "the second load made a new module");
    let shape = Shape::new(1, 3, 33, 64);
    let inputs = make_inputs(shape, Dtype::Bf16, Regime::Random, 1);
    let p = DeviceProblem::<half::bf16>::upload(&dev, &inputs, Layout::Bhnd, false).unwrap();
    for _ in 0..2 {
        exec::forward(&dev, &fwd, &p, None, false).unwrap();
    }
    dev.sync(fwd.name(), TIMEOUT).unwrap();
    assert!(Arc::ptr_eq(&a, &dev.launcher.load(&fwd).unwrap()), "a launch reloaded the module");
    // A second launcher on the same context shares the store.
    let other = sbgen_runtime::launcher::Launcher::new(dev.ctx.new_stream().unwrap()).unwrap();
    assert!(Arc::ptr_eq(other.store(), dev.launcher.store()));
    assert!(Arc::ptr_eq(&a, &other.load(&fwd).unwrap()));
    // The same name with other code (another sbgen's templates, say) is another module.
    let (target, ptx) = fwd.ptx()[0].clone();
    let edited = KernelBinary::new(
        fwd.manifest().clone(),
        vec![(target, format!("{ptx}\n// edited\n"))],
        fwd.cuda_source().map(str::to_string),
    );
    assert_eq!(edited.name(), fwd.name());
    let c = dev.launcher.load(&edited).unwrap();
    assert!(!Arc::ptr_eq(&a, &c), "a kernel of the same name but other code reused the module");
    assert!(Arc::ptr_eq(&c, &dev.launcher.load(&edited).unwrap()));
}

#[test]
fn backward_workspace_allocation_failure_is_a_typed_error() {
    let Some(dev) = device() else { return };
    let bwd = kernel(&dev, spec(128, Dtype::Bf16, Pass::Backward));
    // A problem whose f32 workspace (8 bytes per element) is larger than the device's memory, while
    // its tensors are views of one f32 allocation of 4 bytes per element (the launch is refused
    // before any kernel runs on them).
    let (free, total) = dev.ctx.mem_get_info().unwrap();
    let shape = Shape::new(1, 40, 1 << 22, 128);
    let elems = shape.len();
    if elems * 8 <= total || elems * 4 + shape.rows() * 4 + (1 << 30) >= free {
        eprintln!("skipping: the device's memory ({total} bytes, {free} free) does not suit this test");
        return;
    }
    let base = dev.stream.alloc_zeros::<f32>(elems).unwrap();
    let log2_rem = dev.stream.alloc_zeros::<f32>(shape.rows()).unwrap();
    let (ptr, _guard) = base.device_ptr(&dev.stream);
    // SAFETY: the aliases lie within `base`'s allocation (bf16 ones cover its first half); they are
    // leaked (never freed) below, and no kernel runs on them.
    let alias = || unsafe { dev.stream.upgrade_device_ptr::<half::bf16>(ptr, elems) };
    let (q, mut dq, mut dk, mut dv) = (alias(), alias(), alias(), alias());
    let o_saved = unsafe { dev.stream.upgrade_device_ptr::<f32>(ptr, elems) };
    let args = BackwardArgs {
        q: q.as_view(),
        k: q.as_view(),
        v: q.as_view(),
        o: q.as_view(),
        o_saved: o_saved.as_view(),
        d_o: q.as_view(),
        d_rem: None,
        log2_rem: log2_rem.as_view(),
        dq: dq.as_view_mut(),
        dk: dk.as_view_mut(),
        dv: dv.as_view_mut(),
        varlen: None,
    };
    let err = dev.launcher.backward(&bwd, shape, args, None).unwrap_err();
    for alias in [q, dq, dk, dv] {
        let _: u64 = CudaSlice::leak(alias);
    }
    let _: u64 = CudaSlice::leak(o_saved);
    assert!(matches!(err, LaunchError::Workspace { bytes, .. } if bytes == elems * 8), "{err}");
}

#[test]
fn decode_check_plan_on_a_small_matrix_passes() {
    use sbgen::gpu::decode::CacheKind;
    use sbgen::gpu::decode_check::{self, DecodeCheckPlan};
    let Some(dev) = device() else { return };
    let mut plan = DecodeCheckPlan::quick(0x5eed);
    plan.head_dims = vec![64];
    plan.dtypes = vec![Dtype::Bf16];
    plan.seqlens = vec![0, 1, 17, 300];
    plan.caches = vec![CacheKind::Contiguous(Layout::Bhnd), CacheKind::Paged { page_size: 32 }];
    let builder = KernelBuilder::from_env(dev.arch, None);
    let rows = decode_check::run(&dev, &builder, &plan, &mut |_| {}).unwrap();
    let failed: Vec<String> = rows.iter().filter(|r| !r.passed()).map(sbgen::gpu::failure::format_row).collect();
    assert!(failed.is_empty(), "{} failing rows:\n{}", failed.len(), failed.join("\n"));
    let per_group = plan.caches.len() * plan.masks.len() * plan.remainders.len() * plan.splits.len();
    let groups = plan.regimes.len() * plan.kv_heads.len();
    assert_eq!(rows.len(), groups * per_group * plan.early_exits.len());
}

/// Device tables the host never checked: lengths outside 0..=capacity read as empty sequences (o = 0,
/// rem = 1), page ids outside the pool as pages of no keys; nothing is read or written out of bounds
/// and every launch finishes.
#[test]
fn decode_with_bad_device_tables_stays_in_bounds() {
    use sbgen::gpu::decode::{decode_to, make_decode_inputs, CacheKind, DeviceCache};
    use sbgen_runtime::launcher::{DecodeShape, DecodeSplit, KvCacheGeometry};
    let Some(dev) = device() else { return };
    let shape = DecodeShape { batch: 4, heads: 4, kv_heads: 2, head_dim: 64 };
    let x = make_decode_inputs(shape, &[5, 40, 64, 17], 64, Dtype::Bf16, Regime::Random, 9);
    let base = Spec { layout: Layout::Paged, remainder: Remainder::Fuse, ..spec(64, Dtype::Bf16, Pass::Decode) };
    let q = dev.stream.clone_htod(&x.q.iter().map(|&e| half::bf16::from_f32(e)).collect::<Vec<_>>()).unwrap();
    let mut cache = DeviceCache::<half::bf16>::upload(&dev, &x, CacheKind::Paged { page_size: 16 }, 3).unwrap();
    let KvCacheGeometry::Paged { num_pages, max_pages, .. } = cache.geometry else { panic!("paged") };
    let mut table: Vec<i32> = dev.stream.clone_dtoh(cache.block_table.as_ref().unwrap()).unwrap();
    table[max_pages] = -7; // sequence 1's first page
    table[2 * max_pages + 3] = num_pages as i32 + 3; // sequence 2's last page
    cache.block_table = Some(dev.stream.clone_htod(&table).unwrap());
    cache.seqlens = dev.stream.clone_htod(&[5, 40, 64, 10_000]).unwrap(); // 10000 > the 64 a sequence holds
    for ee in [None, Some(24)] {
        let kernel = kernel(&dev, Spec { early_exit_bits: ee, ..base });
        for split in
            [DecodeSplit::default(), DecodeSplit { splits: Some(1), chunk_keys: Some(16), max_chunks: Some(8) }]
        {
            let mut o = exec::guarded::<half::bf16>(&dev, shape.len()).unwrap();
            let mut rem = exec::guarded_f32(&dev, shape.rows()).unwrap();
            decode_to(&dev, &kernel, shape, &q, &cache, o.view_mut(), rem.view_mut(), split, None).unwrap();
            dev.sync(kernel.name(), TIMEOUT).unwrap_or_else(|e| panic!("{}: {e}", kernel.name()));
            let ((o, o_out), (rem, rem_out)) = (o.read(&dev).unwrap(), rem.read(&dev).unwrap());
            assert_eq!((o_out, rem_out), (0, 0), "{}: wrote outside o or rem", kernel.name());
            let o: Vec<f32> = o.into_iter().map(f32::from).collect();
            assert_eq!(non_finite(&o) + non_finite(&rem), 0, "{}: unwritten or non-finite outputs", kernel.name());
            // Sequence 3's length is out of range: an empty sequence.
            let d = shape.head_dim;
            assert!(o[3 * shape.heads * d..].iter().all(|&e| e == 0.0), "{}", kernel.name());
            assert!(rem[3 * shape.heads..].iter().all(|&e| e == 1.0), "{}", kernel.name());
        }
    }
}

#[test]
fn the_decode_launcher_refuses_bad_caches_before_launching() {
    use sbgen::gpu::decode::{decode_to, make_decode_inputs, CacheKind, DeviceCache};
    use sbgen_runtime::launcher::{DecodeShape, DecodeSplit, KvCacheGeometry};
    let Some(dev) = device() else { return };
    let shape = DecodeShape { batch: 2, heads: 4, kv_heads: 2, head_dim: 64 };
    let x = make_decode_inputs(shape, &[5, 40], 48, Dtype::Bf16, Regime::Random, 2);
    let paged = kernel(&dev, Spec { layout: Layout::Paged, ..spec(64, Dtype::Bf16, Pass::Decode) });
    let q = dev.stream.clone_htod(&x.q.iter().map(|&e| half::bf16::from_f32(e)).collect::<Vec<_>>()).unwrap();
    let mut cache = DeviceCache::<half::bf16>::upload(&dev, &x, CacheKind::Paged { page_size: 16 }, 1).unwrap();
    let run = |cache: &DeviceCache<half::bf16>, split: DecodeSplit| -> (LaunchError, bool) {
        let mut o = exec::guarded::<half::bf16>(&dev, shape.len()).unwrap();
        let mut rem = exec::guarded_f32(&dev, shape.rows()).unwrap();
        let err = match decode_to(&dev, &paged, shape, &q, cache, o.view_mut(), rem.view_mut(), split, None) {
            Err(GpuError::Launch(e)) => e,
            other => panic!("expected a launch refusal, got {:?}", other.map(|p| p.splits)),
        };
        dev.sync(paged.name(), TIMEOUT).unwrap();
        let untouched = o.read(&dev).unwrap().0.iter().all(|e| e.to_bits() == exec::POISON_16);
        (err, untouched)
    };
    let KvCacheGeometry::Paged { num_pages, max_pages, .. } = cache.geometry else { panic!("paged") };
    // A page size the kernel's 16-key blocks do not divide.
    cache.geometry = KvCacheGeometry::Paged { num_pages, page_size: 24, max_pages };
    let (err, untouched) = run(&cache, DecodeSplit::default());
    assert!(err.to_string().contains("`page_size` = 24") && untouched, "{err}");
    // More pages than the cache holds.
    cache.geometry = KvCacheGeometry::Paged { num_pages: num_pages + 1, page_size: 16, max_pages };
    let (err, untouched) = run(&cache, DecodeSplit::default());
    assert!(matches!(err, LaunchError::TooShort { tensor: "k_cache", .. }) && untouched, "{err}");
    // A chunk that is not whole key blocks.
    cache.geometry = KvCacheGeometry::Paged { num_pages, page_size: 16, max_pages };
    let (err, untouched) = run(&cache, DecodeSplit { chunk_keys: Some(20), ..Default::default() });
    assert!(matches!(err, LaunchError::Split { what: "chunk_keys", .. }) && untouched, "{err}");
    assert!(err.is_input_error());
}
