//! The segment backward (context parallelism, docs/math.md#context-parallelism):
//! [`Launcher::segment_backward_walk`] runs the rows of one query segment over one key segment from
//! the f32 row state (log2 of the stick, sum of g) the nearer key segments left, adding dQ into its
//! f32 state and dK, dV into the key segment's f32 partials; [`Launcher::segment_backward_finish`]
//! writes a rank's dK, dV (from its reduced partials) and dQ in the element type.

use super::binary::KernelBinary;
use super::element::SbElement;
use super::error::LaunchError;
use super::launch::{same_context, Launcher};
use super::plan::check_alignment;
use super::segment::{check_pair, elements_grid, launch, need, SegmentShape};
use crate::manifest::{KernelManifest, SegmentBwdParams};
use crate::spec::{Dtype, Pass, Remainder};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice};

// SAFETY: `SegmentBwdParams` is `#[repr(C)]`, `Copy`, holds only integers and floats, and mirrors the
// C struct rendered from `SEGMENT_BWD_PARAM_FIELDS` (a test in `manifest` checks the offsets).
unsafe impl DeviceRepr for SegmentBwdParams {}

/// Lengths, in elements, of the backward walk's views (placed as [`SegmentShape`] says).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentBwdLens {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o_saved: usize,
    pub log2_rem: usize,
    pub d_o: usize,
    pub d_rem: Option<usize>,
    pub v_own: Option<usize>,
    pub dq_state: usize,
    pub l_state: usize,
    pub s_state: usize,
    pub dk_accum: usize,
    pub dv_accum: usize,
}

/// A launch grid (x, y, z).
pub type Grid = (u32, u32, u32);

/// Lengths, in elements, of a rank's finishing views (its whole local tensors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentBwdFinishLens {
    pub dk_accum: usize,
    pub dv_accum: usize,
    pub log2_rem: usize,
    pub d_o: usize,
    pub dq_state: usize,
    pub dk: usize,
    pub dv: usize,
    pub dq: usize,
}

/// Checks a segment backward walk: as [`super::plan_segment`] for the kernel and shape; `v_own` is
/// needed exactly when the kernel fuses the remainder. Returns the walk's grid and `scale * log2(e)`.
pub fn plan_segment_backward(
    manifest: &KernelManifest,
    dtype: Dtype,
    shape: SegmentShape,
    lens: &SegmentBwdLens,
    scale: Option<f32>,
) -> Result<(Grid, f32), LaunchError> {
    let p = check_pair(manifest, Pass::SegmentBackward, 3, dtype, shape, scale)?;
    check_own_values(manifest, lens.v_own.is_some())?;
    for (tensor, needed, got) in [
        ("q", p.q, lens.q),
        ("k", p.kv, lens.k),
        ("v", p.kv, lens.v),
        ("o_saved", p.q, lens.o_saved),
        ("log2_rem", p.rows, lens.log2_rem),
        ("d_o", p.q, lens.d_o),
        ("dq_state", p.q, lens.dq_state),
        ("l_state", p.rows, lens.l_state),
        ("s_state", p.rows, lens.s_state),
        ("dk_accum", p.kv, lens.dk_accum),
        ("dv_accum", p.kv, lens.dv_accum),
    ] {
        need(tensor, needed, Some(got))?;
    }
    need("d_rem", p.rows, lens.d_rem)?;
    need("v_own", p.own, lens.v_own)?;
    Ok((p.walk_grid, p.scale_log2))
}

/// `v_own` (the query tokens' own values) goes with a fused remainder and only with it.
fn check_own_values(manifest: &KernelManifest, passed: bool) -> Result<(), LaunchError> {
    let fuse = manifest.spec.remainder == Remainder::Fuse;
    if fuse != passed {
        return Err(LaunchError::Segment {
            what: "v_own",
            got: usize::from(passed),
            allowed: format!(
                "passed exactly when the kernel fuses the remainder (kernel `{}` {})",
                manifest.name,
                if fuse { "fuses it" } else { "returns it" }
            ),
        });
    }
    Ok(())
}

/// A rank's local tensors: `seq` tokens (the rank's segments one after another).
fn local_shape(batch: usize, heads: usize, kv_heads: usize, head_dim: usize, seq: usize) -> SegmentShape {
    SegmentShape { batch, heads, kv_heads, head_dim, q_len: seq, kv_len: seq, q_seq: seq, kv_seq: seq, offset: 0 }
}

/// The backward walk's tensors (see [`SegmentShape`] for where each view starts). `o_saved` and
/// `log2_rem` are the forward's final f32 o (before any fused remainder) and log2 of the stick left;
/// `d_rem` may be `None` (no gradient flows into rem); `v_own` is passed exactly with a fused
/// remainder. The state (`dq_state` q-shaped, `l_state` and `s_state` per row) is read and written
/// in place, except for the query segment's first pair (`fresh`), which starts from zero without
/// reading it and writes every row; `dk_accum` and `dv_accum` are the key segment's f32 partials,
/// added to.
pub struct SegmentBwdWalkArgs<'a, T> {
    pub q: CudaView<'a, T>,
    pub k: CudaView<'a, T>,
    pub v: CudaView<'a, T>,
    pub o_saved: CudaView<'a, f32>,
    pub log2_rem: CudaView<'a, f32>,
    pub d_o: CudaView<'a, T>,
    pub d_rem: Option<CudaView<'a, f32>>,
    pub v_own: Option<CudaView<'a, T>>,
    pub dq_state: CudaViewMut<'a, f32>,
    pub l_state: CudaViewMut<'a, f32>,
    pub s_state: CudaViewMut<'a, f32>,
    pub dk_accum: CudaViewMut<'a, f32>,
    pub dv_accum: CudaViewMut<'a, f32>,
    /// The query segment's first pair (see above).
    pub fresh: bool,
}

/// A rank's finishing step over its whole local tensors (`seq` tokens): `dk_accum` and `dv_accum`
/// hold the sums over every rank for its own K/V (after the ring's reduce-scatter); `log2_rem` and
/// `d_o` are its rows' (a fused remainder adds `rem dO` of the group's query heads to dV).
pub struct SegmentBwdFinishArgs<'a, T> {
    pub dk_accum: CudaView<'a, f32>,
    pub dv_accum: CudaView<'a, f32>,
    pub log2_rem: CudaView<'a, f32>,
    pub d_o: CudaView<'a, T>,
    pub dq_state: CudaView<'a, f32>,
    pub dk: CudaViewMut<'a, T>,
    pub dv: CudaViewMut<'a, T>,
    pub dq: CudaViewMut<'a, T>,
}

/// A rank's local geometry for [`Launcher::segment_backward_finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens of the rank's local tensors.
    pub seq: usize,
}

/// Checks a rank's finishing step: the grids of the dK/dV and the dQ steps and `scale * log2(e)`
/// (`scale` must be the walk's: dK is scaled here).
pub fn plan_segment_backward_finish(
    manifest: &KernelManifest,
    dtype: Dtype,
    local: LocalShape,
    lens: &SegmentBwdFinishLens,
    scale: Option<f32>,
) -> Result<(Grid, Grid, f32), LaunchError> {
    let shape = local_shape(local.batch, local.heads, local.kv_heads, local.head_dim, local.seq);
    let p = check_pair(manifest, Pass::SegmentBackward, 3, dtype, shape, scale)?;
    for (tensor, needed, got) in [
        ("dk_accum", p.kv, lens.dk_accum),
        ("dv_accum", p.kv, lens.dv_accum),
        ("log2_rem", p.rows, lens.log2_rem),
        ("d_o", p.q, lens.d_o),
        ("dq_state", p.q, lens.dq_state),
        ("dk", p.kv, lens.dk),
        ("dv", p.kv, lens.dv),
        ("dq", p.q, lens.dq),
    ] {
        need(tensor, needed, Some(got))?;
    }
    let finish = elements_grid(manifest, 1, p.kv, "grid x (elements of dK / threads)")?;
    let dq = elements_grid(manifest, 2, p.q, "grid x (elements of dQ / threads)")?;
    Ok((finish, dq, p.scale_log2))
}

impl Launcher {
    /// One key segment of the backward for the rows of one query segment. Asynchronous on the
    /// launcher's stream.
    pub fn segment_backward_walk<T: SbElement>(
        &self,
        kernel: &KernelBinary,
        shape: SegmentShape,
        mut a: SegmentBwdWalkArgs<'_, T>,
        scale: Option<f32>,
    ) -> Result<(), LaunchError> {
        let lens = SegmentBwdLens {
            q: a.q.len(),
            k: a.k.len(),
            v: a.v.len(),
            o_saved: a.o_saved.len(),
            log2_rem: a.log2_rem.len(),
            d_o: a.d_o.len(),
            d_rem: a.d_rem.as_ref().map(|x| x.len()),
            v_own: a.v_own.as_ref().map(|x| x.len()),
            dq_state: a.dq_state.len(),
            l_state: a.l_state.len(),
            s_state: a.s_state.len(),
            dk_accum: a.dk_accum.len(),
            dv_accum: a.dv_accum.len(),
        };
        let (grid, scale_log2) = plan_segment_backward(kernel.manifest(), T::DTYPE, shape, &lens, scale)?;
        let ctx = self.stream().context();
        for (tensor, stream) in [
            ("q", a.q.stream()),
            ("k", a.k.stream()),
            ("v", a.v.stream()),
            ("o_saved", a.o_saved.stream()),
            ("log2_rem", a.log2_rem.stream()),
            ("d_o", a.d_o.stream()),
            ("dq_state", a.dq_state.stream()),
            ("l_state", a.l_state.stream()),
            ("s_state", a.s_state.stream()),
            ("dk_accum", a.dk_accum.stream()),
            ("dv_accum", a.dv_accum.stream()),
        ] {
            same_context(ctx, tensor, stream)?;
        }
        if let Some(x) = &a.d_rem {
            same_context(ctx, "d_rem", x.stream())?;
        }
        if let Some(x) = &a.v_own {
            same_context(ctx, "v_own", x.stream())?;
        }
        let loaded = self.load(kernel)?;
        let s = &**self.stream();
        let (q, _q) = a.q.device_ptr(s);
        let (k, _k) = a.k.device_ptr(s);
        let (v, _v) = a.v.device_ptr(s);
        let (o_saved, _o_saved) = a.o_saved.device_ptr(s);
        let (log2_rem, _log2_rem) = a.log2_rem.device_ptr(s);
        let (d_o, _d_o) = a.d_o.device_ptr(s);
        let d_rem_ptr = a.d_rem.as_ref().map(|x| x.device_ptr(s));
        let v_own_ptr = a.v_own.as_ref().map(|x| x.device_ptr(s));
        let (dq_state, _dq_state) = a.dq_state.device_ptr_mut(s);
        let (l_state, _l_state) = a.l_state.device_ptr_mut(s);
        let (s_state, _s_state) = a.s_state.device_ptr_mut(s);
        let (dk_accum, _dk_accum) = a.dk_accum.device_ptr_mut(s);
        let (dv_accum, _dv_accum) = a.dv_accum.device_ptr_mut(s);
        let v_own = v_own_ptr.as_ref().map_or(0, |(p, _)| *p);
        let e = T::DTYPE.size_bytes() as u64;
        check_alignment(&[
            ("q", q, e),
            ("k", k, e),
            ("v", v, e),
            ("d_o", d_o, e),
            ("v_own", v_own, e),
            ("o_saved", o_saved, 4),
            ("dq_state", dq_state, 4),
            // dK and dV are added two f32 at a time (8-byte vector reductions on sm_90).
            ("dk_accum", dk_accum, 4),
            ("dv_accum", dv_accum, 4),
        ])?;
        let params = SegmentBwdParams {
            q,
            k,
            v,
            o_saved,
            log2_rem,
            d_o,
            d_rem: d_rem_ptr.as_ref().map_or(0, |(p, _)| *p),
            v_own,
            dq_state,
            l_state,
            s_state,
            dk_accum,
            dv_accum,
            fresh: i32::from(a.fresh),
            ..pair_params(shape, scale_log2)
        };
        let step = &kernel.manifest().steps[0];
        launch(self, &loaded, 0, grid, step.threads, step.dynamic_smem_bytes, &params)
    }

    /// Writes a rank's dK, dV and dQ in the element type; `scale` is the walks' (dK is scaled here).
    /// Asynchronous on the launcher's stream.
    pub fn segment_backward_finish<T: SbElement>(
        &self,
        kernel: &KernelBinary,
        local: LocalShape,
        mut a: SegmentBwdFinishArgs<'_, T>,
        scale: Option<f32>,
    ) -> Result<(), LaunchError> {
        let lens = SegmentBwdFinishLens {
            dk_accum: a.dk_accum.len(),
            dv_accum: a.dv_accum.len(),
            log2_rem: a.log2_rem.len(),
            d_o: a.d_o.len(),
            dq_state: a.dq_state.len(),
            dk: a.dk.len(),
            dv: a.dv.len(),
            dq: a.dq.len(),
        };
        let (finish_grid, dq_grid, scale_log2) =
            plan_segment_backward_finish(kernel.manifest(), T::DTYPE, local, &lens, scale)?;
        let ctx = self.stream().context();
        for (tensor, stream) in [
            ("dk_accum", a.dk_accum.stream()),
            ("dv_accum", a.dv_accum.stream()),
            ("log2_rem", a.log2_rem.stream()),
            ("d_o", a.d_o.stream()),
            ("dq_state", a.dq_state.stream()),
            ("dk", a.dk.stream()),
            ("dv", a.dv.stream()),
            ("dq", a.dq.stream()),
        ] {
            same_context(ctx, tensor, stream)?;
        }
        let loaded = self.load(kernel)?;
        let s = &**self.stream();
        let (dk_accum, _dk_accum) = a.dk_accum.device_ptr(s);
        let (dv_accum, _dv_accum) = a.dv_accum.device_ptr(s);
        let (log2_rem, _log2_rem) = a.log2_rem.device_ptr(s);
        let (d_o, _d_o) = a.d_o.device_ptr(s);
        let (dq_state, _dq_state) = a.dq_state.device_ptr(s);
        let (dk, _dk) = a.dk.device_ptr_mut(s);
        let (dv, _dv) = a.dv.device_ptr_mut(s);
        let (dq, _dq) = a.dq.device_ptr_mut(s);
        let e = T::DTYPE.size_bytes() as u64;
        // The dK/dV step stores 16 bytes per tensor and reads 8-byte pairs of the partials.
        check_alignment(&[("dk", dk, e), ("dv", dv, e), ("dk_accum", dk_accum, 4), ("dv_accum", dv_accum, 4)])?;
        let shape = local_shape(local.batch, local.heads, local.kv_heads, local.head_dim, local.seq);
        let params = SegmentBwdParams {
            dk_accum,
            dv_accum,
            log2_rem,
            d_o,
            dq_state,
            dk,
            dv,
            dq,
            ..pair_params(shape, scale_log2)
        };
        let m = kernel.manifest();
        launch(self, &loaded, 1, finish_grid, m.steps[1].threads, m.steps[1].dynamic_smem_bytes, &params)?;
        launch(self, &loaded, 2, dq_grid, m.steps[2].threads, m.steps[2].dynamic_smem_bytes, &params)
    }
}

/// The parameter block's integers, pointers null; `seq` is the query side's spacing (the finishing
/// steps' local length).
fn pair_params(shape: SegmentShape, scale_log2: f32) -> SegmentBwdParams {
    // `check_pair` bounded every count by i32::MAX (offset + q_seq included), so the casts are exact.
    SegmentBwdParams {
        batch: shape.batch as i32,
        heads: shape.heads as i32,
        kv_heads: shape.kv_heads as i32,
        q_len: shape.q_len as i32,
        kv_len: shape.kv_len as i32,
        q_seq: shape.q_seq as i32,
        kv_seq: shape.kv_seq as i32,
        offset: shape.offset as i32,
        seq: shape.q_seq as i32,
        total_tokens: 0,
        scale_log2,
        ..SegmentBwdParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{GridRule, LaunchStep};
    use crate::spec::{Layout, Spec};

    fn manifest(remainder: Remainder) -> KernelManifest {
        let spec = Spec { remainder, ..Spec::new(64, Dtype::Bf16, Pass::SegmentBackward) };
        let step = |f: &str, grid| LaunchStep {
            function: f.into(),
            grid,
            threads: 256,
            dynamic_smem_bytes: 0,
            kv_tensor_maps: false,
        };
        KernelManifest {
            name: "sb_segb".into(),
            spec,
            block_m: 64,
            block_n: 64,
            steps: vec![
                step("sb_segb", GridRule::QueryBlocks { block_m: 64 }),
                step("sb_segb_finish", GridRule::Elements { per_cta: 2048 }),
                step("sb_segb_dq", GridRule::Elements { per_cta: 256 }),
            ],
        }
    }

    fn shape() -> SegmentShape {
        SegmentShape {
            batch: 1,
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

    fn lens() -> SegmentBwdLens {
        let (q, kv, rows) = ((3 * 300 + 100) * 64, (80 + 70) * 64, 3 * 300 + 100);
        SegmentBwdLens {
            q,
            k: kv,
            v: kv,
            o_saved: q,
            log2_rem: rows,
            d_o: q,
            d_rem: Some(rows),
            v_own: None,
            dq_state: q,
            l_state: rows,
            s_state: rows,
            dk_accum: kv,
            dv_accum: kv,
        }
    }

    #[test]
    fn a_good_walk_is_planned_and_short_views_are_named() {
        let m = manifest(Remainder::Return);
        let (grid, _) = plan_segment_backward(&m, Dtype::Bf16, shape(), &lens(), None).unwrap();
        assert_eq!(grid, (4, 2, 1));
        for (tensor, l) in [
            ("s_state", SegmentBwdLens { s_state: lens().s_state - 1, ..lens() }),
            ("dv_accum", SegmentBwdLens { dv_accum: lens().dv_accum - 1, ..lens() }),
            ("d_rem", SegmentBwdLens { d_rem: Some(lens().l_state - 1), ..lens() }),
        ] {
            let err = plan_segment_backward(&m, Dtype::Bf16, shape(), &l, None).unwrap_err();
            assert!(matches!(err, LaunchError::TooShort { tensor: t, .. } if t == tensor), "{err}");
        }
    }

    #[test]
    fn own_values_go_with_a_fused_remainder_only() {
        let with = SegmentBwdLens { v_own: Some((80 + 100) * 2 * 64), ..lens() };
        let err = plan_segment_backward(&manifest(Remainder::Return), Dtype::Bf16, shape(), &with, None).unwrap_err();
        assert!(matches!(err, LaunchError::Segment { what: "v_own", .. }), "{err}");
        let err = plan_segment_backward(&manifest(Remainder::Fuse), Dtype::Bf16, shape(), &lens(), None).unwrap_err();
        assert!(matches!(err, LaunchError::Segment { what: "v_own", .. }), "{err}");
        let m = KernelManifest {
            spec: Spec { layout: Layout::Bnhd, ..manifest(Remainder::Fuse).spec },
            ..manifest(Remainder::Fuse)
        };
        // BNHD: the own values span (q_seq * (B - 1) + q_len) tokens of kv_heads heads.
        let own = SegmentBwdLens { v_own: Some(100 * 2 * 64), ..lens() };
        let bnhd_lens = SegmentBwdLens {
            q: 100 * 4 * 64,
            o_saved: 100 * 4 * 64,
            d_o: 100 * 4 * 64,
            dq_state: 100 * 4 * 64,
            k: 70 * 2 * 64,
            v: 70 * 2 * 64,
            dk_accum: 70 * 2 * 64,
            dv_accum: 70 * 2 * 64,
            ..own
        };
        assert!(plan_segment_backward(&m, Dtype::Bf16, shape(), &bnhd_lens, None).is_ok());
    }

    #[test]
    fn the_finish_plans_both_elementwise_grids() {
        let m = manifest(Remainder::Return);
        let local = LocalShape { batch: 1, heads: 4, kv_heads: 2, head_dim: 64, seq: 1000 };
        let (q, kv, rows) = (4 * 1000 * 64, 2 * 1000 * 64, 4 * 1000);
        let lens = SegmentBwdFinishLens {
            dk_accum: kv,
            dv_accum: kv,
            log2_rem: rows,
            d_o: q,
            dq_state: q,
            dk: kv,
            dv: kv,
            dq: q,
        };
        let (finish, dq, _) = plan_segment_backward_finish(&m, Dtype::Bf16, local, &lens, None).unwrap();
        assert_eq!(finish, ((kv as u32).div_ceil(2048), 1, 1));
        assert_eq!(dq, ((q as u32).div_ceil(256), 1, 1));
        // The walk's scale reaches the finishing step (dK is scaled there).
        let (_, _, scaled) = plan_segment_backward_finish(&m, Dtype::Bf16, local, &lens, Some(0.5)).unwrap();
        assert_eq!(scaled, 0.5 * std::f32::consts::LOG2_E);
        let short = SegmentBwdFinishLens { dq: q - 1, ..lens };
        assert!(matches!(
            plan_segment_backward_finish(&m, Dtype::Bf16, local, &short, None),
            Err(LaunchError::TooShort { tensor: "dq", .. })
        ));
    }
}
