//! Input checks and launch planning, as pure functions over (manifest, shape, slice lengths) so that
//! every refusal is testable without a GPU. The launcher calls these before touching the device.

use super::error::LaunchError;
use super::Shape;
use crate::manifest::{GridDims, KernelManifest};
use crate::spec::{Dtype, Layout, Pass};

/// Largest sequence length (and THD token count, and query head count): the kernels index rows with
/// 32-bit `int` and round up to whole blocks in it (`seq + block - 1`, block <= 256), so the largest
/// value leaves that headroom.
pub const MAX_SEQ: usize = i32::MAX as usize - 256;
/// Largest `heads` and `batch`: they are the grid's y and z dimensions.
pub const MAX_GRID_YZ: usize = 65535;
/// Most threads per block on every supported arch.
pub const MAX_THREADS: u32 = 1024;

/// Lengths, in elements, of the forward's device slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardLens {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
    pub rem: usize,
    pub log2_rem: usize,
    /// `None` when the forward does not save o in f32 (no backward will follow).
    pub o_saved: Option<usize>,
    /// THD layout: `cu_seqlens` (i32); `None` otherwise.
    pub cu_seqlens: Option<usize>,
}

/// Lengths, in elements, of the backward's device slices. `d_rem` is `None` when no gradient flows
/// into rem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardLens {
    pub q: usize,
    pub k: usize,
    pub v: usize,
    pub o: usize,
    pub o_saved: usize,
    pub d_o: usize,
    pub d_rem: Option<usize>,
    pub log2_rem: usize,
    pub dq: usize,
    pub dk: usize,
    pub dv: usize,
    /// THD layout: `cu_seqlens` (i32); `None` otherwise.
    pub cu_seqlens: Option<usize>,
}

/// One checked launch: grid, block and dynamic shared memory of a manifest step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedStep {
    pub grid: (u32, u32, u32),
    pub threads: u32,
    pub dynamic_smem_bytes: u32,
}

/// Everything the launcher needs once the inputs have passed every check.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchPlan {
    pub steps: Vec<PlannedStep>,
    /// Elements of q, o, dO and dq: `batch * heads * seq * head_dim` (THD: `total_tokens * heads *
    /// head_dim`).
    pub elements: usize,
    /// Elements of k, v, dk and dv: as `elements` with `kv_heads` heads.
    pub kv_elements: usize,
    /// Elements of rem, log2_rem and d_rem: `batch * heads * seq` (THD: `heads * total_tokens`).
    pub rows: usize,
    /// f32 elements of each backward accumulator (dk_accum, dv_accum); 0 for the forward.
    pub accum_elements: usize,
    /// i32 turn counters of the deterministic backward (zeroed with the accumulators); else 0.
    pub lock_count: usize,
    /// `scale * log2(e)`, the value the kernel takes.
    pub scale_log2: f32,
}

/// Checks a forward launch of `manifest` on tensors of element type `dtype`.
///
/// `total_tokens` is `Some` exactly for a THD (packed variable-length) kernel: then `shape.batch` is the
/// number of sequences, `shape.seq` the longest sequence (max_seqlen) and `lens.cu_seqlens` is needed.
pub fn plan_forward(
    manifest: &KernelManifest,
    dtype: Dtype,
    shape: Shape,
    total_tokens: Option<usize>,
    lens: &ForwardLens,
    scale: Option<f32>,
) -> Result<LaunchPlan, LaunchError> {
    let mut plan = plan_common(manifest, Pass::Forward, dtype, shape, total_tokens, lens.cu_seqlens, scale)?;
    let (e, kv, r) = (plan.elements, plan.kv_elements, plan.rows);
    for (tensor, needed, got) in [
        ("q", e, lens.q),
        ("k", kv, lens.k),
        ("v", kv, lens.v),
        ("o", e, lens.o),
        ("rem", r, lens.rem),
        ("log2_rem", r, lens.log2_rem),
    ] {
        check_len(tensor, needed, got)?;
    }
    if let Some(got) = lens.o_saved {
        check_len("o_saved", e, got)?;
    }
    plan.accum_elements = 0;
    Ok(plan)
}

/// Checks a backward launch of `manifest` on tensors of element type `dtype`.
/// `total_tokens` as in [`plan_forward`].
pub fn plan_backward(
    manifest: &KernelManifest,
    dtype: Dtype,
    shape: Shape,
    total_tokens: Option<usize>,
    lens: &BackwardLens,
    scale: Option<f32>,
) -> Result<LaunchPlan, LaunchError> {
    let mut plan = plan_common(manifest, Pass::Backward, dtype, shape, total_tokens, lens.cu_seqlens, scale)?;
    let (e, kv, r) = (plan.elements, plan.kv_elements, plan.rows);
    for (tensor, needed, got) in [
        ("q", e, lens.q),
        ("k", kv, lens.k),
        ("v", kv, lens.v),
        ("o", e, lens.o),
        ("o_saved", e, lens.o_saved),
        ("d_o", e, lens.d_o),
        ("log2_rem", r, lens.log2_rem),
        ("dq", e, lens.dq),
        ("dk", kv, lens.dk),
        ("dv", kv, lens.dv),
    ] {
        check_len(tensor, needed, got)?;
    }
    if let Some(got) = lens.d_rem {
        check_len("d_rem", r, got)?;
    }
    if manifest.spec.deterministic {
        // One turn counter per (sequence, K/V head, key block).
        let key_blocks = shape.seq.div_ceil(manifest.block_n.max(1) as usize);
        plan.lock_count = shape.batch * shape.kv_heads * key_blocks;
    }
    // Two f32 accumulators of `kv_elements` each and the counters, allocated as one buffer.
    let bytes = ((kv as u128) * 2 + plan.lock_count as u128) * 4;
    if bytes > isize::MAX as u128 {
        return Err(LaunchError::TooLarge { what: "backward workspace bytes", got: bytes, max: isize::MAX as u128 });
    }
    plan.accum_elements = kv;
    Ok(plan)
}

/// Byte alignment every q/k/v/o/dO/dq/dk/dv and o_saved view must start at: the kernels copy and store
/// 16 bytes per thread (cp.async, vector stores), so a view at an odd element offset would fault.
pub const TENSOR_ALIGN: u64 = 16;

/// Checks that each `(tensor, device address, element bytes)` starts on a [`TENSOR_ALIGN`] boundary.
pub fn check_alignment(tensors: &[(&'static str, u64, u64)]) -> Result<(), LaunchError> {
    for &(tensor, address, element_bytes) in tensors {
        if address % TENSOR_ALIGN != 0 {
            return Err(LaunchError::Misaligned { tensor, address, required: TENSOR_ALIGN, element_bytes });
        }
    }
    Ok(())
}

/// The tensors' element type and head_dim must be the kernel's.
pub(super) fn check_kernel_types(manifest: &KernelManifest, dtype: Dtype, head_dim: usize) -> Result<(), LaunchError> {
    let spec = &manifest.spec;
    if dtype != spec.dtype {
        return Err(LaunchError::Dtype { kernel: manifest.name.clone(), expected: spec.dtype, got: dtype });
    }
    if head_dim != spec.head_dim as usize {
        return Err(LaunchError::HeadDim {
            kernel: manifest.name.clone(),
            expected: spec.head_dim as usize,
            got: head_dim,
        });
    }
    Ok(())
}

fn check_len(tensor: &'static str, needed: usize, got: usize) -> Result<(), LaunchError> {
    if got < needed {
        return Err(LaunchError::TooShort { tensor, needed, got });
    }
    Ok(())
}

// `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
#[allow(clippy::manual_is_multiple_of)]
fn plan_common(
    manifest: &KernelManifest,
    pass: Pass,
    dtype: Dtype,
    shape: Shape,
    total_tokens: Option<usize>,
    cu_seqlens_len: Option<usize>,
    scale: Option<f32>,
) -> Result<LaunchPlan, LaunchError> {
    let kernel = &manifest.name;
    let spec = &manifest.spec;
    if spec.pass != pass {
        return Err(LaunchError::WrongPass { kernel: kernel.clone(), expected: pass, got: spec.pass });
    }
    let expected_steps = match pass {
        Pass::Forward | Pass::Decode => 1,
        Pass::Backward | Pass::Segment => 2,
        Pass::SegmentBackward => 3,
    };
    if manifest.steps.len() != expected_steps {
        return Err(LaunchError::Manifest {
            kernel: kernel.clone(),
            reason: format!("a {pass:?} kernel has {expected_steps} step(s), this one has {}", manifest.steps.len()),
        });
    }
    if let Some(step) = manifest.steps.iter().find(|s| s.threads == 0 || s.threads > MAX_THREADS) {
        return Err(LaunchError::Manifest {
            kernel: kernel.clone(),
            reason: format!("step `{}` has {} threads: allowed 1..={MAX_THREADS}", step.function, step.threads),
        });
    }
    if let Some(step) = manifest.steps.iter().find(|s| s.grid.divisor().1 == 0) {
        return Err(LaunchError::Manifest {
            kernel: kernel.clone(),
            reason: format!(
                "step `{}` has a grid rule with `{}` = 0: allowed 1 or more",
                step.function,
                step.grid.divisor().0
            ),
        });
    }
    check_kernel_types(manifest, dtype, shape.head_dim)?;
    for (dim, value) in
        [("batch", shape.batch), ("heads", shape.heads), ("kv_heads", shape.kv_heads), ("seq", shape.seq)]
    {
        if value == 0 {
            return Err(LaunchError::EmptyDim { dim });
        }
    }
    if shape.heads % shape.kv_heads != 0 {
        return Err(LaunchError::KvHeads { heads: shape.heads, kv_heads: shape.kv_heads });
    }
    let packed = spec.layout == Layout::Thd;
    match (packed, total_tokens, cu_seqlens_len) {
        (true, Some(_), Some(len)) => check_len("cu_seqlens", shape.batch + 1, len)?,
        (true, _, _) => {
            return Err(LaunchError::Varlen {
                kernel: kernel.clone(),
                reason: "it takes a packed THD batch: pass `cu_seqlens` and the total token count".into(),
            })
        }
        (false, None, None) => {}
        (false, _, _) => {
            return Err(LaunchError::Varlen {
                kernel: kernel.clone(),
                reason: format!("its layout is {}, not thd: it takes no `cu_seqlens`", spec.layout),
            })
        }
    }
    if total_tokens == Some(0) {
        // Every sequence empty: nothing to compute, and the finishing step would have no grid.
        return Err(LaunchError::EmptyDim { dim: "total_tokens" });
    }
    let tokens_limit = total_tokens.map(|t| ("total_tokens", t, MAX_SEQ));
    for (what, got, max) in [
        ("seq", shape.seq, MAX_SEQ),
        ("kv_heads", shape.kv_heads, MAX_GRID_YZ),
        ("batch", shape.batch, MAX_GRID_YZ),
        // Each query head has its own query blocks in grid x; `heads` is bounded by the element
        // count and the grid check below, and by i32 here.
        ("heads", shape.heads, MAX_SEQ),
    ]
    .into_iter()
    .chain(tokens_limit)
    {
        if got > max {
            return Err(LaunchError::TooLarge { what, got: got as u128, max: max as u128 });
        }
    }
    // Tokens of q: batch * seq, or the packed batch's total.
    let tokens = total_tokens.map_or(shape.batch as u128 * shape.seq as u128, |t| t as u128);
    let elements_wide = tokens * shape.heads as u128 * shape.head_dim as u128;
    // Each tensor's byte size must fit in isize (what Rust and the driver can address).
    let max_elements = (isize::MAX as u128) / 4;
    if elements_wide > max_elements {
        return Err(LaunchError::TooLarge {
            what: "batch * heads * seq * head_dim",
            got: elements_wide,
            max: max_elements,
        });
    }
    let elements = elements_wide as usize;
    let kv_elements = (tokens * shape.kv_heads as u128 * shape.head_dim as u128) as usize;
    let rows = (tokens * shape.heads as u128) as usize;
    let dims = GridDims {
        batch: shape.batch,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        seq: shape.seq,
        kv_elements,
        splits: 0,
    };
    let mut steps = Vec::with_capacity(manifest.steps.len());
    for step in &manifest.steps {
        let grid = step.grid.grid(&dims).ok_or(LaunchError::TooLarge {
            what: "grid x (blocks for batch * heads * seq * head_dim)",
            got: elements_wide,
            max: (1u128 << 31) - 1,
        })?;
        steps.push(PlannedStep { grid, threads: step.threads, dynamic_smem_bytes: step.dynamic_smem_bytes });
    }
    let scale = scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
    if !scale.is_finite() || scale == 0.0 {
        return Err(LaunchError::Scale { got: scale });
    }
    Ok(LaunchPlan {
        steps,
        elements,
        kv_elements,
        rows,
        accum_elements: 0,
        lock_count: 0,
        scale_log2: scale * std::f32::consts::LOG2_E,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{GridRule, LaunchStep};
    use crate::spec::Spec;

    fn manifest(pass: Pass) -> KernelManifest {
        let spec = Spec::new(64, Dtype::Bf16, pass);
        let main = LaunchStep {
            function: "sb_test".into(),
            grid: GridRule::QueryBlocks { block_m: 64 },
            threads: 128,
            dynamic_smem_bytes: 40960,
            kv_tensor_maps: false,
        };
        let steps = match pass {
            Pass::Forward | Pass::Decode => vec![main],
            Pass::Backward | Pass::Segment | Pass::SegmentBackward => {
                let finish = LaunchStep {
                    function: "sb_test_finish".into(),
                    grid: GridRule::Elements { per_cta: 2048 },
                    threads: 256,
                    dynamic_smem_bytes: 0,
                    kv_tensor_maps: false,
                };
                let mut steps = vec![main, finish.clone()];
                if pass == Pass::SegmentBackward {
                    steps.push(finish);
                }
                steps
            }
        };
        KernelManifest { name: "sb_test".into(), spec, block_m: 64, block_n: 64, steps }
    }

    fn shape(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Shape {
        Shape::new(batch, heads, seq, head_dim)
    }

    fn fwd_lens(s: Shape) -> ForwardLens {
        let e = s.batch * s.heads * s.seq * s.head_dim;
        let r = s.batch * s.heads * s.seq;
        ForwardLens { q: e, k: e, v: e, o: e, rem: r, log2_rem: r, o_saved: Some(e), cu_seqlens: None }
    }

    fn bwd_lens(s: Shape) -> BackwardLens {
        let e = s.batch * s.heads * s.seq * s.head_dim;
        let r = s.batch * s.heads * s.seq;
        BackwardLens {
            q: e,
            k: e,
            v: e,
            o: e,
            o_saved: e,
            d_o: e,
            d_rem: Some(r),
            log2_rem: r,
            dq: e,
            dk: e,
            dv: e,
            cu_seqlens: None,
        }
    }

    #[test]
    fn plans_a_valid_forward() {
        let s = shape(3, 5, 17, 64);
        let plan = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &fwd_lens(s), None).unwrap();
        assert_eq!(plan.steps, vec![PlannedStep { grid: (1, 5, 3), threads: 128, dynamic_smem_bytes: 40960 }]);
        assert_eq!(plan.elements, 3 * 5 * 17 * 64);
        assert_eq!(plan.rows, 3 * 5 * 17);
        assert_eq!(plan.accum_elements, 0);
        assert!((plan.scale_log2 - 0.125 * std::f32::consts::LOG2_E).abs() < 1e-7);
    }

    #[test]
    fn plans_a_valid_backward_with_and_without_d_rem() {
        let s = shape(1, 3, 4097, 64);
        let mut lens = bwd_lens(s);
        let plan = plan_backward(&manifest(Pass::Backward), Dtype::Bf16, s, None, &lens, Some(0.5)).unwrap();
        assert_eq!(plan.steps.len(), 2);
        assert_eq!(plan.steps[0].grid, (65, 3, 1));
        assert_eq!(plan.steps[1].grid, ((3 * 4097 * 64usize).div_ceil(2048) as u32, 1, 1));
        assert_eq!(plan.accum_elements, 3 * 4097 * 64);
        lens.d_rem = None;
        assert!(plan_backward(&manifest(Pass::Backward), Dtype::Bf16, s, None, &lens, Some(0.5)).is_ok());
    }

    #[test]
    fn refuses_a_backward_kernel_in_forward_and_the_reverse() {
        let s = shape(1, 1, 8, 64);
        let err = plan_forward(&manifest(Pass::Backward), Dtype::Bf16, s, None, &fwd_lens(s), None).unwrap_err();
        assert!(matches!(err, LaunchError::WrongPass { expected: Pass::Forward, got: Pass::Backward, .. }), "{err}");
        let err = plan_backward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &bwd_lens(s), None).unwrap_err();
        assert!(matches!(err, LaunchError::WrongPass { expected: Pass::Backward, got: Pass::Forward, .. }), "{err}");
        assert!(err.to_string().contains("needs a Backward kernel"), "{err}");
    }

    #[test]
    fn refuses_the_wrong_dtype() {
        let s = shape(1, 1, 8, 64);
        let err = plan_forward(&manifest(Pass::Forward), Dtype::F16, s, None, &fwd_lens(s), None).unwrap_err();
        assert!(matches!(err, LaunchError::Dtype { expected: Dtype::Bf16, got: Dtype::F16, .. }), "{err}");
        assert!(err.to_string().contains("built for dtype `bf16`"), "{err}");
    }

    #[test]
    fn refuses_the_wrong_head_dim() {
        let s = shape(1, 1, 8, 128);
        let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &fwd_lens(s), None).unwrap_err();
        assert!(matches!(err, LaunchError::HeadDim { expected: 64, got: 128, .. }), "{err}");
        assert!(err.to_string().contains("`head_dim` = 128"), "{err}");
    }

    #[test]
    fn refuses_empty_dimensions_naming_them() {
        for (s, dim) in [(shape(0, 1, 8, 64), "batch"), (shape(1, 0, 8, 64), "heads"), (shape(1, 1, 0, 64), "seq")] {
            let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &fwd_lens(s), None).unwrap_err();
            assert!(matches!(err, LaunchError::EmptyDim { dim: d } if d == dim), "{err}");
            let err = plan_backward(&manifest(Pass::Backward), Dtype::Bf16, s, None, &bwd_lens(s), None).unwrap_err();
            assert!(matches!(err, LaunchError::EmptyDim { dim: d } if d == dim), "{err}");
        }
    }

    #[test]
    fn refuses_seq_past_max_seq() {
        let s = shape(1, 1, MAX_SEQ + 1, 64);
        let lens = ForwardLens {
            q: usize::MAX,
            k: usize::MAX,
            v: usize::MAX,
            o: usize::MAX,
            rem: usize::MAX,
            log2_rem: usize::MAX,
            o_saved: None,
            cu_seqlens: None,
        };
        let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &lens, None).unwrap_err();
        assert!(matches!(err, LaunchError::TooLarge { what: "seq", .. }), "{err}");
        // MAX_SEQ itself is fine as far as the dimension goes (the slices are what they are).
        let s = shape(1, 1, MAX_SEQ, 64);
        let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &fwd_lens(shape(1, 1, 1, 64)), None)
            .unwrap_err();
        assert!(matches!(err, LaunchError::TooShort { tensor: "q", .. }), "{err}");
    }

    #[test]
    fn refuses_grid_dimensions_over_cuda_limits() {
        let s = shape(1, 65536, 4, 64);
        let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &fwd_lens(s), None).unwrap_err();
        assert!(matches!(err, LaunchError::TooLarge { what: "kv_heads", got: 65536, max: 65535 }), "{err}");
        let s = shape(65536, 1, 4, 64);
        let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &fwd_lens(s), None).unwrap_err();
        assert!(matches!(err, LaunchError::TooLarge { what: "batch", .. }), "{err}");
    }

    #[test]
    fn refuses_element_counts_that_overflow() {
        // 65535 * 65535 * (2^31 - 1) * 64 overflows isize (and u64 byte counts).
        let s = shape(65535, 65535, MAX_SEQ, 64);
        let big = usize::MAX;
        let lens = ForwardLens {
            q: big,
            k: big,
            v: big,
            o: big,
            rem: big,
            log2_rem: big,
            o_saved: Some(big),
            cu_seqlens: None,
        };
        let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &lens, None).unwrap_err();
        assert!(matches!(err, LaunchError::TooLarge { what: "batch * heads * seq * head_dim", .. }), "{err}");
    }

    #[test]
    fn refuses_an_elementwise_grid_over_2_pow_31_blocks() {
        // The finishing step's grid: 8 * 1024 * 2^31-ish elements / 2048 per CTA > 2^31 blocks.
        let s = shape(1024, 1024, MAX_SEQ, 64);
        let big = usize::MAX;
        let lens = BackwardLens {
            q: big,
            k: big,
            v: big,
            o: big,
            o_saved: big,
            d_o: big,
            d_rem: None,
            log2_rem: big,
            dq: big,
            dk: big,
            dv: big,
            cu_seqlens: None,
        };
        let err = plan_backward(&manifest(Pass::Backward), Dtype::Bf16, s, None, &lens, None).unwrap_err();
        assert!(matches!(err, LaunchError::TooLarge { what, .. } if what.starts_with("grid x")), "{err}");
    }

    #[test]
    fn refuses_slices_too_short_naming_the_tensor() {
        let s = shape(3, 5, 17, 64);
        let e = 3 * 5 * 17 * 64;
        let r = 3 * 5 * 17;
        let full = fwd_lens(s);
        let cases: [(&str, ForwardLens, usize); 7] = [
            ("q", ForwardLens { q: e - 1, ..full }, e),
            ("k", ForwardLens { k: 0, ..full }, e),
            ("v", ForwardLens { v: 7, ..full }, e),
            ("o", ForwardLens { o: r, ..full }, e),
            ("rem", ForwardLens { rem: r - 1, ..full }, r),
            ("log2_rem", ForwardLens { log2_rem: 1, ..full }, r),
            ("o_saved", ForwardLens { o_saved: Some(e - 1), ..full }, e),
        ];
        for (name, lens, needed) in cases {
            let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &lens, None).unwrap_err();
            match &err {
                LaunchError::TooShort { tensor, needed: n, .. } => {
                    assert_eq!((*tensor, *n), (name, needed));
                    assert!(err.to_string().contains(&format!("tensor `{name}`")), "{err}");
                }
                other => panic!("{name}: {other}"),
            }
        }
        // Longer slices are fine (a pooled buffer), and o_saved is optional in the forward.
        let long = ForwardLens { q: e + 100, o_saved: None, ..full };
        assert!(plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &long, None).is_ok());
    }

    #[test]
    fn refuses_backward_slices_too_short_naming_the_tensor() {
        let s = shape(1, 3, 33, 64);
        let full = bwd_lens(s);
        let cases: [(&str, BackwardLens); 11] = [
            ("q", BackwardLens { q: 1, ..full }),
            ("k", BackwardLens { k: 1, ..full }),
            ("v", BackwardLens { v: 1, ..full }),
            ("o", BackwardLens { o: 1, ..full }),
            ("o_saved", BackwardLens { o_saved: 1, ..full }),
            ("d_o", BackwardLens { d_o: 1, ..full }),
            ("d_rem", BackwardLens { d_rem: Some(1), ..full }),
            ("log2_rem", BackwardLens { log2_rem: 1, ..full }),
            ("dq", BackwardLens { dq: 1, ..full }),
            ("dk", BackwardLens { dk: 1, ..full }),
            ("dv", BackwardLens { dv: 1, ..full }),
        ];
        for (name, lens) in cases {
            let err = plan_backward(&manifest(Pass::Backward), Dtype::Bf16, s, None, &lens, None).unwrap_err();
            assert!(matches!(err, LaunchError::TooShort { tensor, .. } if tensor == name), "{name}: {err}");
        }
    }

    #[test]
    fn refuses_bad_scales() {
        let s = shape(1, 1, 8, 64);
        for bad in [f32::NAN, f32::INFINITY, 0.0] {
            let err =
                plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &fwd_lens(s), Some(bad)).unwrap_err();
            assert!(matches!(err, LaunchError::Scale { .. }), "{err}");
        }
    }

    #[test]
    fn refuses_malformed_manifests() {
        let s = shape(1, 1, 8, 64);
        let mut m = manifest(Pass::Backward);
        m.steps.pop();
        let err = plan_backward(&m, Dtype::Bf16, s, None, &bwd_lens(s), None).unwrap_err();
        assert!(matches!(err, LaunchError::Manifest { .. }), "{err}");
        let mut m = manifest(Pass::Forward);
        m.steps[0].threads = 2048;
        let err = plan_forward(&m, Dtype::Bf16, s, None, &fwd_lens(s), None).unwrap_err();
        assert!(err.to_string().contains("2048 threads"), "{err}");
    }

    /// Found by the fuzzer (fuzz/corpus/manifest/regress-grid-divisor-zero.json): a grid rule dividing by
    /// zero panicked in `GridRule::grid` instead of being refused as a malformed manifest.
    #[test]
    fn refuses_a_grid_rule_that_divides_by_zero() {
        let s = shape(1, 1, 8, 64);
        let mut m = manifest(Pass::Forward);
        m.steps[0].grid = GridRule::QueryBlocks { block_m: 0 };
        let err = plan_forward(&m, Dtype::Bf16, s, None, &fwd_lens(s), None).unwrap_err();
        assert!(matches!(err, LaunchError::Manifest { .. }), "{err}");
        assert!(err.to_string().contains("`block_m` = 0"), "{err}");
        let mut m = manifest(Pass::Backward);
        m.steps[1].grid = GridRule::Elements { per_cta: 0 };
        let err = plan_backward(&m, Dtype::Bf16, s, None, &bwd_lens(s), None).unwrap_err();
        assert!(err.to_string().contains("`per_cta` = 0"), "{err}");
    }

    #[test]
    fn grouped_query_attention_sizes_k_v_dk_dv_by_kv_heads() {
        let s = shape(2, 8, 100, 64).with_kv_heads(2);
        let (e, kv, r) = (2 * 8 * 100 * 64, 2 * 2 * 100 * 64, 2 * 8 * 100);
        let lens = BackwardLens { k: kv, v: kv, dk: kv, dv: kv, ..bwd_lens(s) };
        let plan = plan_backward(&manifest(Pass::Backward), Dtype::Bf16, s, None, &lens, None).unwrap();
        assert_eq!((plan.elements, plan.kv_elements, plan.rows, plan.accum_elements), (e, kv, r, kv));
        // The 4 query heads of a K/V head share grid.y; the finish step covers the K/V elements.
        assert_eq!(plan.steps[0].grid, (2 * 4, 2, 2));
        assert_eq!(plan.steps[1].grid, (kv.div_ceil(2048) as u32, 1, 1));
        let short = BackwardLens { dk: kv - 1, ..lens };
        let err = plan_backward(&manifest(Pass::Backward), Dtype::Bf16, s, None, &short, None).unwrap_err();
        assert!(matches!(err, LaunchError::TooShort { tensor: "dk", needed, .. } if needed == kv), "{err}");
        let bad = shape(1, 8, 10, 64).with_kv_heads(3);
        let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, bad, None, &fwd_lens(bad), None).unwrap_err();
        assert!(matches!(err, LaunchError::KvHeads { heads: 8, kv_heads: 3 }), "{err}");
        assert!(err.to_string().contains("`kv_heads` = 3 does not divide `heads` = 8"), "{err}");
        let zero = shape(1, 8, 10, 64).with_kv_heads(0);
        let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, zero, None, &fwd_lens(zero), None).unwrap_err();
        assert!(matches!(err, LaunchError::EmptyDim { dim: "kv_heads" }), "{err}");
    }

    #[test]
    fn packed_batches_need_cu_seqlens_and_size_by_total_tokens() {
        let mut m = manifest(Pass::Forward);
        m.spec.layout = Layout::Thd;
        // 3 sequences, the longest 1000, 1500 tokens in all, 4 heads on 2 K/V heads.
        let s = shape(3, 4, 1000, 64).with_kv_heads(2);
        let (e, kv, r) = (1500 * 4 * 64, 1500 * 2 * 64, 4 * 1500);
        let lens = ForwardLens { q: e, k: kv, v: kv, o: e, rem: r, log2_rem: r, o_saved: Some(e), cu_seqlens: Some(4) };
        let plan = plan_forward(&m, Dtype::Bf16, s, Some(1500), &lens, None).unwrap();
        assert_eq!((plan.elements, plan.kv_elements, plan.rows), (e, kv, r));
        assert_eq!(plan.steps[0].grid, (16 * 2, 2, 3));
        let err = plan_forward(&m, Dtype::Bf16, s, Some(1500), &ForwardLens { cu_seqlens: Some(3), ..lens }, None)
            .unwrap_err();
        assert!(matches!(err, LaunchError::TooShort { tensor: "cu_seqlens", needed: 4, got: 3 }), "{err}");
        let err = plan_forward(&m, Dtype::Bf16, s, None, &ForwardLens { cu_seqlens: None, ..lens }, None).unwrap_err();
        assert!(matches!(err, LaunchError::Varlen { .. }), "{err}");
        // A packed batch of empty sequences only is refused alike by both passes.
        let err = plan_forward(&m, Dtype::Bf16, s, Some(0), &lens, None).unwrap_err();
        assert!(matches!(err, LaunchError::EmptyDim { dim: "total_tokens" }), "{err}");
        // A dense kernel refuses cu_seqlens.
        let dense = manifest(Pass::Forward);
        let err = plan_forward(&dense, Dtype::Bf16, s, Some(1500), &lens, None).unwrap_err();
        assert!(err.to_string().contains("not thd"), "{err}");
    }

    #[test]
    fn the_deterministic_backward_gets_one_turn_counter_per_key_block() {
        let mut m = manifest(Pass::Backward);
        m.spec.deterministic = true;
        let s = shape(2, 8, 1000, 64).with_kv_heads(2);
        let kv = 2 * 2 * 1000 * 64;
        let lens = BackwardLens { k: kv, v: kv, dk: kv, dv: kv, ..bwd_lens(s) };
        let plan = plan_backward(&m, Dtype::Bf16, s, None, &lens, None).unwrap();
        assert_eq!(plan.lock_count, 2 * 2 * 1000usize.div_ceil(64));
        let plain = plan_backward(&manifest(Pass::Backward), Dtype::Bf16, s, None, &lens, None).unwrap();
        assert_eq!(plain.lock_count, 0);
    }

    #[test]
    fn input_refusals_are_input_errors() {
        let s = shape(1, 1, 0, 64);
        let err = plan_forward(&manifest(Pass::Forward), Dtype::Bf16, s, None, &fwd_lens(s), None).unwrap_err();
        assert!(err.is_input_error());
    }

    #[test]
    fn views_off_a_16_byte_boundary_are_refused_by_name() {
        assert!(check_alignment(&[("q", 0x7f00_0000, 2), ("o_saved", 0x7f00_1000, 4)]).is_ok());
        let err = check_alignment(&[("q", 0x7f00_0000, 2), ("k", 0x7f00_0002, 2)]).unwrap_err();
        assert!(matches!(err, LaunchError::Misaligned { tensor: "k", address: 0x7f00_0002, required: 16, .. }));
        assert!(err.to_string().contains("multiple of 8 elements"), "{err}");
        let err = check_alignment(&[("o_saved", 0x7f00_0008, 4)]).unwrap_err();
        assert!(err.to_string().contains("multiple of 4 elements"), "{err}");
    }
}
