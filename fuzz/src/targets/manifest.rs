//! The launch manifest the macro embeds as JSON: parsed as `EmbeddedKernel::to_binary` parses it
//! (`serde_json` into a [`KernelManifest`], then a [`KernelBinary`]), then put through the
//! launcher's checks (`plan_forward` / `plan_backward`) for a few problem shapes, small to the
//! largest the launcher allows. The checks must refuse or plan, never panic, and a plan they
//! accept must be launchable.

use super::{Target, Verdict, SPEC_WORDS};
use crate::mutate::InputKind;
use sbgen_runtime::launcher::plan::MAX_THREADS;
use sbgen_runtime::launcher::{
    plan_backward, plan_forward, plan_segment, plan_segment_backward, BackwardLens, ForwardLens, KernelBinary,
    LaunchPlan, SegmentBwdLens, SegmentLens, SegmentPlan, SegmentShape, Shape,
};
use sbgen_runtime::manifest::KernelManifest;
use sbgen_runtime::spec::{Layout, Pass};

pub const TARGET: Target = Target {
    name: "manifest",
    about: "the KernelManifest JSON embedded kernels carry, and the launcher's checks of it",
    run,
    input: InputKind::Json,
    dictionary: &[
        SPEC_WORDS,
        &[
            "name",
            "spec",
            "block_m",
            "block_n",
            "steps",
            "function",
            "grid",
            "kind",
            "query_blocks",
            "elements",
            "per_cta",
            "threads",
            "dynamic_smem_bytes",
        ],
    ],
};

/// (batch, heads, kv_heads, seq): one row, an odd grouped size, multi-query, the longest sequence, the
/// most heads and batches. A THD manifest takes them as a packed batch of `batch` sequences of `seq`.
const SHAPES: &[(usize, usize, usize, usize)] =
    &[(1, 1, 1, 1), (2, 6, 3, 17), (3, 8, 1, 100), (1, 1, 1, i32::MAX as usize), (65_535, 65_535, 65_535, 1)];

pub fn run(data: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(data);
    let manifest: KernelManifest = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => return Verdict::Refused(e.to_string()),
    };
    let written = serde_json::to_string(&manifest).expect("a manifest serializes");
    let back: KernelManifest = serde_json::from_str(&written)
        .unwrap_or_else(|e| panic!("a manifest that parsed does not parse back after writing ({e}): {written}"));
    assert_eq!(back, manifest, "a manifest changes when written and read back");
    let binary = KernelBinary::new(manifest.clone(), vec![("sm_90a".into(), String::new())], None);
    assert_eq!(binary.fingerprint(), KernelBinary::new(back, binary.ptx().to_vec(), None).fingerprint());

    let mut verdict = None;
    for &(batch, heads, kv_heads, seq) in SHAPES {
        let shape = Shape::new(batch, heads, seq, manifest.spec.head_dim as usize).with_kv_heads(kv_heads);
        let (e, kv, r) =
            (elements(shape, heads), elements(shape, kv_heads), batch.saturating_mul(heads).saturating_mul(seq));
        let packed = manifest.spec.layout == Layout::Thd;
        let (total_tokens, cu_seqlens) = (packed.then(|| batch.saturating_mul(seq)), packed.then_some(batch + 1));
        if manifest.spec.pass == Pass::SegmentBackward {
            let shape = SegmentShape {
                batch,
                heads,
                kv_heads,
                head_dim: shape.head_dim,
                q_len: seq,
                kv_len: seq,
                q_seq: seq,
                kv_seq: seq,
                offset: seq,
            };
            let lens = SegmentBwdLens {
                q: e,
                k: kv,
                v: kv,
                o_saved: e,
                log2_rem: r,
                d_o: e,
                d_rem: Some(r),
                v_own: (manifest.spec.remainder == sbgen_runtime::spec::Remainder::Fuse).then_some(kv),
                dq_state: e,
                l_state: r,
                s_state: r,
                dk_accum: kv,
                dv_accum: kv,
            };
            match plan_segment_backward(&manifest, manifest.spec.dtype, shape, &lens, None) {
                Ok((grid, scale_log2)) => {
                    check_segment_plan(&SegmentPlan { walk_grid: grid, finish_grid: grid, scale_log2 })
                }
                Err(err) if verdict.is_none() => verdict = Some(Verdict::Refused(err.to_string())),
                Err(_) => {}
            }
            verdict.get_or_insert(Verdict::Accepted);
            continue;
        }
        if manifest.spec.pass == Pass::Segment {
            // A segment of `seq` queries against `seq` keys just before them, in tensors of `seq` tokens.
            let shape = SegmentShape {
                batch,
                heads,
                kv_heads,
                head_dim: shape.head_dim,
                q_len: seq,
                kv_len: seq,
                q_seq: seq,
                kv_seq: seq,
                offset: seq,
            };
            let lens = SegmentLens {
                q: Some(e),
                k: Some(kv),
                v: Some(kv),
                o_state: e,
                l_state: r,
                o: Some(e),
                rem: Some(r),
                log2_rem: Some(r),
                v_own: Some(kv),
            };
            match plan_segment(&manifest, manifest.spec.dtype, shape, &lens, None) {
                Ok(plan) => check_segment_plan(&plan),
                Err(err) if verdict.is_none() => verdict = Some(Verdict::Refused(err.to_string())),
                Err(_) => {}
            }
            verdict.get_or_insert(Verdict::Accepted);
            continue;
        }
        let planned = match manifest.spec.pass {
            Pass::Segment | Pass::SegmentBackward => continue, // planned above
            // The launcher plans the forward and backward only so far.
            Pass::Decode => return Verdict::Refused("a decode manifest: the launcher has no decode plan yet".into()),
            Pass::Forward => {
                let lens = ForwardLens { q: e, k: kv, v: kv, o: e, rem: r, log2_rem: r, o_saved: Some(e), cu_seqlens };
                plan_forward(&manifest, manifest.spec.dtype, shape, total_tokens, &lens, None)
            }
            Pass::Backward => {
                let lens = BackwardLens {
                    q: e,
                    k: kv,
                    v: kv,
                    o: e,
                    o_saved: e,
                    d_o: e,
                    d_rem: Some(r),
                    log2_rem: r,
                    dq: e,
                    dk: kv,
                    dv: kv,
                    cu_seqlens,
                };
                plan_backward(&manifest, manifest.spec.dtype, shape, total_tokens, &lens, None)
            }
        };
        match planned {
            Ok(plan) => check_plan(&manifest, &plan),
            // The verdict is the smallest shape's; the largest are refused by most kernels.
            Err(err) if verdict.is_none() => verdict = Some(Verdict::Refused(err.to_string())),
            Err(_) => {}
        }
        verdict.get_or_insert(Verdict::Accepted);
    }
    verdict.unwrap_or(Verdict::Accepted)
}

/// Elements of a tensor of `heads` heads of `s`.
fn elements(s: Shape, heads: usize) -> usize {
    s.batch.saturating_mul(heads).saturating_mul(s.seq).saturating_mul(s.head_dim)
}

/// A plan the launcher accepted is one CUDA can launch: one planned step per manifest step, every
/// grid dimension 1..2^31 (x) or 1..65536 (y, z), 1..=1024 threads.
fn check_plan(manifest: &KernelManifest, plan: &LaunchPlan) {
    assert_eq!(plan.steps.len(), manifest.steps.len());
    for step in &plan.steps {
        let (x, y, z) = step.grid;
        assert!((1..1 << 31).contains(&x) && (1..65_536).contains(&y) && (1..65_536).contains(&z), "{step:?}");
        assert!((1..=MAX_THREADS).contains(&step.threads), "{step:?}");
    }
    assert!(plan.scale_log2.is_finite() && plan.scale_log2 != 0.0, "{plan:?}");
}

/// As [`check_plan`], for the segment pass's two grids.
fn check_segment_plan(plan: &SegmentPlan) {
    for (x, y, z) in [plan.walk_grid, plan.finish_grid] {
        assert!((1..1 << 31).contains(&x) && (1..65_536).contains(&y) && (1..65_536).contains(&z), "{plan:?}");
    }
    assert!(plan.scale_log2.is_finite() && plan.scale_log2 != 0.0, "{plan:?}");
}
