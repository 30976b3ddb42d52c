//! The segment pass (context parallelism, docs/math.md#context-parallelism): [`Launcher::segment_walk`]
//! runs the rows of one query segment over the keys of one key segment from the f32 row state the
//! nearer key segments left, [`Launcher::segment_finish`] turns the final state into o, rem and
//! log2_rem. [`plan_segment`] checks the inputs as a pure function.

use super::binary::KernelBinary;
use super::element::SbElement;
use super::error::{KernelContext, LaunchError};
use super::launch::{same_context, Launcher};
use super::modules::LoadedKernel;
use super::plan::{check_alignment, check_kernel_types, MAX_GRID_YZ, MAX_SEQ};
use crate::manifest::{GridRule, KernelManifest, SegmentParams};
use crate::spec::{Dtype, Layout, Pass, Remainder};
use cudarc::driver::{
    CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, LaunchConfig, PushKernelArg,
};

// SAFETY: `SegmentParams` is `#[repr(C)]`, `Copy`, holds only integers and floats, and mirrors the C
// struct rendered from `SEGMENT_PARAM_FIELDS` (a test in `manifest` checks the offsets).
unsafe impl DeviceRepr for SegmentParams {}

/// One (query segment, key segment) pair. Every tensor view starts at its segment's token 0; in
/// the spec's layout (BHND or BNHD) consecutive heads (BHND) or sequences (BNHD) are `q_seq`
/// (q-shaped: q, o, the state) or `kv_seq` (K/V-shaped) tokens apart, so a segment can be part of
/// a rank's longer local tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rows of the query segment and keys of the key segment.
    pub q_len: usize,
    pub kv_len: usize,
    /// Token spacing of the q-shaped and K/V-shaped tensors (at least `q_len`, `kv_len`).
    pub q_seq: usize,
    pub kv_seq: usize,
    /// Position of query row 0 minus the position of key 0: key j is visible to row i when
    /// `j < i + offset` (`<=` attending the current token). 0 on the diagonal; a key segment that
    /// lies wholly before the queries has `offset >= kv_len`.
    pub offset: usize,
}

/// Lengths, in elements, of the walk's and the finishing step's device views (`None`: not passed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentLens {
    pub q: Option<usize>,
    pub k: Option<usize>,
    pub v: Option<usize>,
    pub o_state: usize,
    pub l_state: usize,
    pub o: Option<usize>,
    pub rem: Option<usize>,
    pub log2_rem: Option<usize>,
    pub v_own: Option<usize>,
}

/// A checked segment launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SegmentPlan {
    /// The walk's grid (query blocks x group, kv heads, batch) and the finishing step's.
    pub walk_grid: (u32, u32, u32),
    pub finish_grid: (u32, u32, u32),
    pub scale_log2: f32,
}

/// Elements a q-shaped (`heads`, `seq` spacing, `len` tokens) tensor view must hold.
fn span(layout: Layout, batch: usize, heads: usize, head_dim: usize, seq: usize, len: usize) -> u128 {
    let (b, h, d, seq, len) = (batch as u128, heads as u128, head_dim as u128, seq as u128, len as u128);
    match layout {
        Layout::Bnhd => ((b - 1) * seq + len) * h * d,
        _ => ((b * h - 1) * seq + len) * d,
    }
}

/// What every segment launch checks, and the walk's grid.
pub(super) struct PairPlan {
    /// Elements a view must hold: q-shaped, K/V-shaped, K/V-shaped with the query segment's
    /// spacing (the query tokens' own values), and per-row (`[batch, heads, q_seq]`).
    pub q: u128,
    pub kv: u128,
    pub own: u128,
    pub rows: u128,
    pub walk_grid: (u32, u32, u32),
    pub scale_log2: f32,
}

/// The checks shared by the segment passes: the kernel (`pass`, `steps` launch steps, the walk's
/// grid rule, dtype and head_dim), the shape (every count non-zero and within the kernels' 32-bit
/// indexing, `q_seq >= q_len`, `kv_seq >= kv_len`) and the scale.
// `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
#[allow(clippy::manual_is_multiple_of)]
pub(super) fn check_pair(
    manifest: &KernelManifest,
    pass: Pass,
    steps: usize,
    dtype: Dtype,
    shape: SegmentShape,
    scale: Option<f32>,
) -> Result<PairPlan, LaunchError> {
    let kernel = &manifest.name;
    let spec = &manifest.spec;
    if spec.pass != pass {
        return Err(LaunchError::WrongPass { kernel: kernel.clone(), expected: pass, got: spec.pass });
    }
    if manifest.steps.len() != steps {
        return Err(LaunchError::Manifest {
            kernel: kernel.clone(),
            reason: format!("a {pass:?} kernel has {steps} steps, this one has {}", manifest.steps.len()),
        });
    }
    let block_m = match manifest.steps[0].grid {
        GridRule::QueryBlocks { block_m } if block_m > 0 => block_m as usize,
        _ => return Err(LaunchError::Manifest { kernel: kernel.clone(), reason: "the walk's grid rule".into() }),
    };
    check_kernel_types(manifest, dtype, shape.head_dim)?;
    for (dim, value) in [
        ("batch", shape.batch),
        ("heads", shape.heads),
        ("kv_heads", shape.kv_heads),
        ("q_len", shape.q_len),
        ("kv_len", shape.kv_len),
    ] {
        if value == 0 {
            return Err(LaunchError::EmptyDim { dim });
        }
    }
    if shape.heads % shape.kv_heads != 0 {
        return Err(LaunchError::KvHeads { heads: shape.heads, kv_heads: shape.kv_heads });
    }
    for (what, got, least) in [("q_seq", shape.q_seq, shape.q_len), ("kv_seq", shape.kv_seq, shape.kv_len)] {
        if got < least {
            return Err(LaunchError::Segment { what, got, allowed: format!("at least the segment's length, {least}") });
        }
    }
    for (what, got, max) in [
        ("q_seq", shape.q_seq, MAX_SEQ),
        ("kv_seq", shape.kv_seq, MAX_SEQ),
        ("offset", shape.offset, MAX_SEQ - shape.q_seq.min(MAX_SEQ)),
        ("heads", shape.heads, MAX_SEQ),
        ("kv_heads", shape.kv_heads, MAX_GRID_YZ),
        ("batch", shape.batch, MAX_GRID_YZ),
    ] {
        if got > max {
            return Err(LaunchError::TooLarge { what, got: got as u128, max: max as u128 });
        }
    }
    let (b, d) = (shape.batch, shape.head_dim);
    let plan_q = span(spec.layout, b, shape.heads, d, shape.q_seq, shape.q_len);
    let plan_kv = span(spec.layout, b, shape.kv_heads, d, shape.kv_seq, shape.kv_len);
    let max_elements = (isize::MAX as u128) / 4;
    for (what, got) in [("q-shaped elements", plan_q), ("K/V-shaped elements", plan_kv)] {
        if got > max_elements {
            return Err(LaunchError::TooLarge { what, got, max: max_elements });
        }
    }
    let blocks = shape.q_len.div_ceil(block_m) as u128 * (shape.heads / shape.kv_heads) as u128;
    check_grid_x("grid x (query blocks x group)", blocks)?;
    let scale = scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !scale.is_finite() || scale == 0.0 {
        return Err(LaunchError::Scale { got: scale });
    }
    Ok(PairPlan {
        q: plan_q,
        kv: plan_kv,
        own: span(spec.layout, b, shape.kv_heads, d, shape.q_seq, shape.q_len),
        rows: span(Layout::Bhnd, b, shape.heads, 1, shape.q_seq, shape.q_len),
        walk_grid: (blocks as u32, shape.kv_heads as u32, b as u32),
        scale_log2: scale * std::f32::consts::LOG2_E,
    })
}

pub(super) fn check_grid_x(what: &'static str, blocks: u128) -> Result<(), LaunchError> {
    if blocks >= 1 << 31 {
        return Err(LaunchError::TooLarge { what, got: blocks, max: (1u128 << 31) - 1 });
    }
    Ok(())
}

/// Refuses a passed view shorter than `needed` elements.
pub(super) fn need(tensor: &'static str, needed: u128, got: Option<usize>) -> Result<(), LaunchError> {
    match got {
        Some(got) if (got as u128) < needed => Err(LaunchError::TooShort { tensor, needed: needed as usize, got }),
        _ => Ok(()),
    }
}

/// The grid of an elementwise step of `manifest` (step `step`, `GridRule::Elements`) over
/// `elements`.
pub(super) fn elements_grid(
    manifest: &KernelManifest,
    step: usize,
    elements: u128,
    what: &'static str,
) -> Result<(u32, u32, u32), LaunchError> {
    let per_cta = match manifest.steps.get(step).map(|s| s.grid) {
        Some(GridRule::Elements { per_cta }) if per_cta > 0 => per_cta as u128,
        _ => {
            return Err(LaunchError::Manifest {
                kernel: manifest.name.clone(),
                reason: format!("step {step}'s grid rule: elementwise expected"),
            })
        }
    };
    let blocks = elements.div_ceil(per_cta);
    check_grid_x(what, blocks)?;
    Ok((blocks.max(1) as u32, 1, 1))
}

/// Checks a segment launch of `manifest` on tensors of element type `dtype`: the kernel, the shape
/// (`q_seq >= q_len`, `kv_seq >= kv_len`, every count within the kernels' 32-bit indexing) and each
/// view's length. The finishing step needs `o`, `rem`, `log2_rem` and, with a fused remainder, `v_own`
/// (K/V-shaped, `q_seq` spacing, `q_len` tokens).
pub fn plan_segment(
    manifest: &KernelManifest,
    dtype: Dtype,
    shape: SegmentShape,
    lens: &SegmentLens,
    scale: Option<f32>,
) -> Result<SegmentPlan, LaunchError> {
    let p = check_pair(manifest, Pass::Segment, 2, dtype, shape, scale)?;
    need("q", p.q, lens.q)?;
    need("k", p.kv, lens.k)?;
    need("v", p.kv, lens.v)?;
    need("o_state", p.q, Some(lens.o_state))?;
    need("l_state", p.rows, Some(lens.l_state))?;
    need("o", p.q, lens.o)?;
    need("rem", p.rows, lens.rem)?;
    need("log2_rem", p.rows, lens.log2_rem)?;
    need("v_own", p.own, lens.v_own)?;
    let elements = (shape.batch * shape.heads) as u128 * shape.q_len as u128 * shape.head_dim as u128;
    let finish_grid = elements_grid(manifest, 1, elements, "grid x (elements of o / threads)")?;
    Ok(SegmentPlan { walk_grid: p.walk_grid, finish_grid, scale_log2: p.scale_log2 })
}

/// The walk's tensors: q of the query segment, k and v of the key segment, and the row state (f32,
/// q-shaped `o_state` and `[batch, heads, q_seq]` `l_state`), read and written in place.
pub struct SegmentWalkArgs<'a, T> {
    pub q: CudaView<'a, T>,
    pub k: CudaView<'a, T>,
    pub v: CudaView<'a, T>,
    pub o_state: CudaViewMut<'a, f32>,
    pub l_state: CudaViewMut<'a, f32>,
    /// The query segment's first key segment: the walk starts from the state of no key walked
    /// (o = 0, log2 of the stick = 0) without reading `o_state` and `l_state`, and writes every row
    /// of them, so they need no zeroing. Otherwise the walk continues from the state there.
    pub fresh: bool,
}

/// The finishing step's tensors: the final state in, o (the spec's element type), rem and log2_rem
/// out; `v_own` (the query tokens' own values, K/V-shaped with `q_seq` spacing) exactly when the spec
/// fuses the remainder.
pub struct SegmentFinishArgs<'a, T> {
    pub o_state: CudaView<'a, f32>,
    pub l_state: CudaView<'a, f32>,
    pub v_own: Option<CudaView<'a, T>>,
    pub o: CudaViewMut<'a, T>,
    pub rem: CudaViewMut<'a, f32>,
    pub log2_rem: CudaViewMut<'a, f32>,
}

impl Launcher {
    /// Walks the key segment for every row of the query segment, updating the state in place.
    /// Asynchronous on the launcher's stream.
    pub fn segment_walk<T: SbElement>(
        &self,
        kernel: &KernelBinary,
        shape: SegmentShape,
        mut args: SegmentWalkArgs<'_, T>,
        scale: Option<f32>,
    ) -> Result<SegmentPlan, LaunchError> {
        let lens = SegmentLens {
            q: Some(args.q.len()),
            k: Some(args.k.len()),
            v: Some(args.v.len()),
            o_state: args.o_state.len(),
            l_state: args.l_state.len(),
            ..SegmentLens::default()
        };
        let plan = plan_segment(kernel.manifest(), T::DTYPE, shape, &lens, scale)?;
        let ctx = self.stream().context();
        same_context(ctx, "q", args.q.stream())?;
        same_context(ctx, "k", args.k.stream())?;
        same_context(ctx, "v", args.v.stream())?;
        same_context(ctx, "o_state", args.o_state.stream())?;
        same_context(ctx, "l_state", args.l_state.stream())?;
        let loaded = self.load(kernel)?;
        let s = &**self.stream();
        let (q, _q) = args.q.device_ptr(s);
        let (k, _k) = args.k.device_ptr(s);
        let (v, _v) = args.v.device_ptr(s);
        let (o_state, _o_state) = args.o_state.device_ptr_mut(s);
        let (l_state, _l_state) = args.l_state.device_ptr_mut(s);
        let e = T::DTYPE.size_bytes() as u64;
        check_alignment(&[("q", q, e), ("k", k, e), ("v", v, e), ("o_state", o_state, 4)])?;
        let fresh = i32::from(args.fresh);
        let params = SegmentParams { q, k, v, o_state, l_state, fresh, ..params(shape, &plan) };
        let step = &kernel.manifest().steps[0];
        launch(self, &loaded, 0, plan.walk_grid, step.threads, step.dynamic_smem_bytes, &params)?;
        Ok(plan)
    }

    /// Writes o, rem and log2_rem from the state left by the query segment's last key segment.
    /// Asynchronous on the launcher's stream.
    pub fn segment_finish<T: SbElement>(
        &self,
        kernel: &KernelBinary,
        shape: SegmentShape,
        mut args: SegmentFinishArgs<'_, T>,
    ) -> Result<SegmentPlan, LaunchError> {
        let fuse = kernel.manifest().spec.remainder == Remainder::Fuse;
        if fuse != args.v_own.is_some() {
            return Err(LaunchError::Segment {
                what: "v_own",
                got: usize::from(args.v_own.is_some()),
                allowed: format!(
                    "passed exactly when the kernel fuses the remainder (kernel `{}` {})",
                    kernel.manifest().name,
                    if fuse { "fuses it" } else { "returns it" }
                ),
            });
        }
        let lens = SegmentLens {
            o_state: args.o_state.len(),
            l_state: args.l_state.len(),
            o: Some(args.o.len()),
            rem: Some(args.rem.len()),
            log2_rem: Some(args.log2_rem.len()),
            v_own: args.v_own.as_ref().map(|v| v.len()),
            ..SegmentLens::default()
        };
        let plan = plan_segment(kernel.manifest(), T::DTYPE, shape, &lens, None)?;
        let ctx = self.stream().context();
        same_context(ctx, "o_state", args.o_state.stream())?;
        same_context(ctx, "l_state", args.l_state.stream())?;
        if let Some(v) = &args.v_own {
            same_context(ctx, "v_own", v.stream())?;
        }
        same_context(ctx, "o", args.o.stream())?;
        same_context(ctx, "rem", args.rem.stream())?;
        same_context(ctx, "log2_rem", args.log2_rem.stream())?;
        let loaded = self.load(kernel)?;
        let s = &**self.stream();
        let (o_state, _o_state) = args.o_state.device_ptr(s);
        let (l_state, _l_state) = args.l_state.device_ptr(s);
        let own_ptr = args.v_own.as_ref().map(|v| v.device_ptr(s));
        let v_own = own_ptr.as_ref().map_or(0, |(p, _)| *p);
        let (o, _o) = args.o.device_ptr_mut(s);
        let (rem, _rem) = args.rem.device_ptr_mut(s);
        let (log2_rem, _log2_rem) = args.log2_rem.device_ptr_mut(s);
        let params = SegmentParams { o_state, l_state, v_own, o, rem, log2_rem, ..params(shape, &plan) };
        let step = &kernel.manifest().steps[1];
        launch(self, &loaded, 1, plan.finish_grid, step.threads, step.dynamic_smem_bytes, &params)?;
        Ok(plan)
    }
}

/// The parameter block's integers, pointers null.
fn params(shape: SegmentShape, plan: &SegmentPlan) -> SegmentParams {
    // `plan_segment` bounded every count by i32::MAX (offset + q_seq included), so the casts are exact.
    SegmentParams {
        batch: shape.batch as i32,
        heads: shape.heads as i32,
        kv_heads: shape.kv_heads as i32,
        q_len: shape.q_len as i32,
        kv_len: shape.kv_len as i32,
        q_seq: shape.q_seq as i32,
        kv_seq: shape.kv_seq as i32,
        offset: shape.offset as i32,
        scale_log2: plan.scale_log2,
        ..SegmentParams::default()
    }
}

/// Launches entry point `step` of a segment module with its parameter block `params` by value.
pub(super) fn launch<P: DeviceRepr>(
    launcher: &Launcher,
    loaded: &LoadedKernel,
    step: usize,
    grid: (u32, u32, u32),
    threads: u32,
    smem: u32,
    params: &P,
) -> Result<(), LaunchError> {
    let function = loaded.functions.get(step).ok_or_else(|| LaunchError::Manifest {
        kernel: loaded.name.clone(),
        reason: format!("the module has no entry point {step}"),
    })?;
    let cfg = LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: smem };
    let mut launch = launcher.stream().launch_builder(function);
    launch.arg(params);
    // SAFETY: every entry point of a segment module takes one parameter block by value, and callers
    // pass the pass's own (`SegmentParams` or `SegmentBwdParams`, each rendered from its field
    // table). The planners checked every passed view's length against the shape and the grid against
    // CUDA's limits; the module store checked threads and shared memory against the device. The
    // caller's pointer guards outlive this call.
    unsafe { launch.launch(cfg) }.kernel_ctx(&loaded.name, "launching")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::LaunchStep;
    use crate::spec::Spec;

    fn manifest(layout: Layout) -> KernelManifest {
        let spec = Spec { layout, ..Spec::new(64, Dtype::Bf16, Pass::Segment) };
        let step = |function: &str, grid| LaunchStep {
            function: function.into(),
            grid,
            threads: 256,
            dynamic_smem_bytes: 0,
            kv_tensor_maps: false,
        };
        KernelManifest {
            name: "sb_seg".into(),
            spec,
            block_m: 64,
            block_n: 64,
            steps: vec![
                step("sb_seg", GridRule::QueryBlocks { block_m: 64 }),
                step("sb_seg_finish", GridRule::Elements { per_cta: 256 }),
            ],
        }
    }

    fn shape() -> SegmentShape {
        SegmentShape {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            q_len: 100,
            kv_len: 70,
            q_seq: 300,
            kv_seq: 80,
            offset: 150,
        }
    }

    fn lens(layout: Layout) -> SegmentLens {
        let s = shape();
        let q = span(layout, 2, 4, 64, s.q_seq, s.q_len) as usize;
        let kv = span(layout, 2, 2, 64, s.kv_seq, s.kv_len) as usize;
        SegmentLens {
            q: Some(q),
            k: Some(kv),
            v: Some(kv),
            o_state: q,
            l_state: 7 * 300 + 100,
            ..SegmentLens::default()
        }
    }

    #[test]
    fn spans_reach_the_last_element_of_the_last_head_or_sequence() {
        // BHND: head (b=1, h=3) starts at (1*4+3)*300 tokens, its 100 rows end 100 tokens later.
        assert_eq!(span(Layout::Bhnd, 2, 4, 64, 300, 100), (7 * 300 + 100) * 64);
        // BNHD: sequence 1 starts at token 300; its row 99 holds all 4 heads.
        assert_eq!(span(Layout::Bnhd, 2, 4, 64, 300, 100), (300 + 100) * 4 * 64);
    }

    #[test]
    fn a_good_launch_is_planned_with_both_grids() {
        for layout in [Layout::Bhnd, Layout::Bnhd] {
            let plan = plan_segment(&manifest(layout), Dtype::Bf16, shape(), &lens(layout), None).unwrap();
            // 2 query blocks x group 2, 2 K/V heads, batch 2.
            assert_eq!(plan.walk_grid, (4, 2, 2));
            assert_eq!(plan.finish_grid, ((2 * 4 * 100 * 64usize).div_ceil(256) as u32, 1, 1));
        }
    }

    #[test]
    fn each_bad_input_is_named() {
        let m = manifest(Layout::Bhnd);
        let l = lens(Layout::Bhnd);
        let err =
            |shape: SegmentShape, lens: &SegmentLens| plan_segment(&m, Dtype::Bf16, shape, lens, None).unwrap_err();
        assert!(matches!(err(SegmentShape { q_seq: 99, ..shape() }, &l), LaunchError::Segment { what: "q_seq", .. }));
        assert!(matches!(err(SegmentShape { kv_seq: 69, ..shape() }, &l), LaunchError::Segment { what: "kv_seq", .. }));
        assert!(matches!(err(SegmentShape { kv_len: 0, ..shape() }, &l), LaunchError::EmptyDim { dim: "kv_len" }));
        assert!(matches!(err(SegmentShape { kv_heads: 3, ..shape() }, &l), LaunchError::KvHeads { .. }));
        assert!(matches!(
            err(SegmentShape { offset: i32::MAX as usize, ..shape() }, &l),
            LaunchError::TooLarge { what: "offset", .. }
        ));
        let short_k = SegmentLens { k: Some(l.k.unwrap() - 1), ..l };
        assert!(matches!(err(shape(), &short_k), LaunchError::TooShort { tensor: "k", .. }));
        let short_state = SegmentLens { l_state: 7 * 300 + 99, ..l };
        assert!(matches!(err(shape(), &short_state), LaunchError::TooShort { tensor: "l_state", .. }));
        let fwd = KernelManifest { spec: Spec::new(64, Dtype::Bf16, Pass::Forward), ..m.clone() };
        assert!(matches!(
            plan_segment(&fwd, Dtype::Bf16, shape(), &l, None),
            Err(LaunchError::WrongPass { expected: Pass::Segment, .. })
        ));
        assert!(matches!(plan_segment(&m, Dtype::F16, shape(), &l, None), Err(LaunchError::Dtype { .. })));
    }
}
