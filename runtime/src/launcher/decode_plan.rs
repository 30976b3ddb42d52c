//! Input checks and the split-K plan of a decode launch, as pure functions (tested without a GPU).
//!
//! A decode walks each sequence's cached keys in chunks counted from the nearest key block
//! (docs/math.md#decode): `splits` warps per (sequence, K/V head, tile of query heads) each take chunks
//! `w, w + splits, ...`; the workspace holds one chunk state per (sequence, query head, chunk), at most
//! `max_chunks` chunks per sequence. A sequence's chunk is `max(chunk_keys, ceil(blocks / max_chunks)
//! * block_n)` keys, so long sequences get longer chunks, never more of them.

use super::error::LaunchError;
use super::plan::{check_kernel_types, PlannedStep, MAX_GRID_YZ, MAX_SEQ, MAX_THREADS};
use crate::kv_cache::KvCacheGeometry;
use crate::manifest::{GridDims, GridRule, KernelManifest};
use crate::reference::DecodeShape;
use crate::spec::{Dtype, Layout, Pass};

/// Lengths, in elements, of the decode's device slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLens {
    pub q: usize,
    pub k_cache: usize,
    pub v_cache: usize,
    pub o: usize,
    pub rem: usize,
    pub seqlens_k: usize,
    /// Paged caches only.
    pub block_table: Option<usize>,
}

/// How the keys are split across warps. `None` lets the launcher choose from the device (see
/// [`plan_decode`]); tests and benchmarks set them to force a shape of split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeSplit {
    /// Warps per (sequence, K/V head, tile of query heads); rounded up to whole CTAs.
    pub splits: Option<usize>,
    /// Fewest keys per chunk: a multiple of the kernel's block_n.
    pub chunk_keys: Option<usize>,
    /// Most chunks per sequence (the workspace's size); default: `splits`, one chunk per warp.
    pub max_chunks: Option<usize>,
}

/// What the plan needs to know of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    pub sm_count: usize,
}

/// A checked decode launch.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodePlan {
    /// The one step: split-K over key chunks, merged by each unit's last CTA.
    pub step: PlannedStep,
    /// Warps per (sequence, K/V head, tile): the split step's grid x times its warps.
    pub splits: usize,
    pub chunk_keys: usize,
    pub max_chunks: usize,
    /// f32 elements of the chunk states' o (`B * H * max_chunks * tile_head_dim`) and L
    /// (`B * H * max_chunks`).
    pub chunk_o_elements: usize,
    pub chunk_l_elements: usize,
    /// i32 slots of the launcher's decode sync buffer: per unit (sequence, K/V head, tile of query
    /// heads) its early-exit slot and its count of finished CTAs. Zero before a launch, and each
    /// unit's merging CTA leaves them zero again (so no step pays for a memset).
    pub sync_slots: usize,
    pub scale_log2: f32,
}

impl DecodePlan {
    /// Elements of the f32 workspace: chunk o, then chunk L.
    pub fn workspace_elements(&self) -> usize {
        self.chunk_o_elements + self.chunk_l_elements
    }
}

/// Tokens per page run: a paged cache's pages hold a multiple of this many tokens.
pub const PAGE_RUN: usize = 16;

/// Fewest key blocks per chunk when the caller does not say: a chunk of 4 blocks keeps the per-chunk
/// cost (the query tile's load, the state's store and merge) small next to its keys.
pub const DEFAULT_CHUNK_BLOCKS: usize = 4;
/// Most chunks per sequence (bounds the workspace and the merge).
pub const MAX_CHUNKS: usize = 4096;

/// Checks a decode launch of `manifest` on tensors of `dtype` and plans its split.
// `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
#[allow(clippy::too_many_arguments, clippy::manual_is_multiple_of)]
pub fn plan_decode(
    manifest: &KernelManifest,
    dtype: Dtype,
    shape: DecodeShape,
    cache: KvCacheGeometry,
    lens: &DecodeLens,
    split: DecodeSplit,
    device: DeviceLimits,
    scale: Option<f32>,
) -> Result<DecodePlan, LaunchError> {
    let kernel = &manifest.name;
    let spec = &manifest.spec;
    if spec.pass != Pass::Decode {
        return Err(LaunchError::WrongPass { kernel: kernel.clone(), expected: Pass::Decode, got: spec.pass });
    }
    let malformed = |reason: String| LaunchError::Manifest { kernel: kernel.clone(), reason };
    let main = match manifest.steps.as_slice() {
        [main] => main,
        steps => return Err(malformed(format!("a decode kernel has 1 step, this one has {}", steps.len()))),
    };
    let (warps, tile_heads) = match main.grid {
        GridRule::DecodeSplits { warps, tile_heads } if warps > 0 && tile_heads > 0 => {
            (warps as usize, tile_heads as usize)
        }
        other => {
            return Err(malformed(format!("a decode kernel's step is a split over key chunks, this one is {other:?}")))
        }
    };
    if let Some(step) = manifest.steps.iter().find(|s| s.threads == 0 || s.threads > MAX_THREADS) {
        return Err(malformed(format!(
            "step `{}` has {} threads: allowed 1..={MAX_THREADS}",
            step.function, step.threads
        )));
    }
    let block_n = manifest.block_n as usize;
    if block_n == 0 {
        return Err(malformed("block_n = 0: allowed 16, 32 or 64".into()));
    }
    check_kernel_types(manifest, dtype, shape.head_dim)?;
    for (dim, value) in [("batch", shape.batch), ("heads", shape.heads), ("kv_heads", shape.kv_heads)] {
        if value == 0 {
            return Err(LaunchError::EmptyDim { dim });
        }
    }
    if shape.heads % shape.kv_heads != 0 {
        return Err(LaunchError::KvHeads { heads: shape.heads, kv_heads: shape.kv_heads });
    }
    let cache_error = |reason: String| LaunchError::KvCache { kernel: kernel.clone(), reason };
    match (spec.layout, cache) {
        (Layout::Paged, KvCacheGeometry::Paged { num_pages, page_size, max_pages }) => {
            for (dim, value) in [("num_pages", num_pages), ("page_size", page_size), ("max_pages", max_pages)] {
                if value == 0 {
                    return Err(LaunchError::EmptyDim { dim });
                }
            }
            // The kernels gather a key block that spans pages in runs of 16 tokens, each inside one page.
            if page_size % PAGE_RUN != 0 {
                return Err(cache_error(format!(
                    "`page_size` = {page_size} is not a multiple of {PAGE_RUN}: allowed multiples of {PAGE_RUN} \
                     (e.g. 16, 32, 64)"
                )));
            }
        }
        (Layout::Paged, KvCacheGeometry::Contiguous { .. }) => {
            return Err(cache_error("it reads a paged cache: pass `KvCacheGeometry::Paged` and a block table".into()))
        }
        (layout, KvCacheGeometry::Paged { .. }) => {
            return Err(cache_error(format!("it reads a contiguous {layout} cache, not a paged one")))
        }
        (_, KvCacheGeometry::Contiguous { capacity }) => {
            if capacity == 0 {
                return Err(LaunchError::EmptyDim { dim: "capacity" });
            }
        }
    }
    let capacity = cache.capacity();
    for (what, got, max) in [
        ("capacity (tokens per sequence)", capacity, MAX_SEQ),
        ("batch", shape.batch, MAX_GRID_YZ),
        ("heads", shape.heads, MAX_SEQ),
        ("num_pages", if let KvCacheGeometry::Paged { num_pages, .. } = cache { num_pages } else { 0 }, MAX_SEQ),
    ] {
        if got > max {
            return Err(LaunchError::TooLarge { what, got: got as u128, max: max as u128 });
        }
    }
    // Each tensor's byte size must fit in isize (what Rust and the driver can address).
    let max_elements = isize::MAX as usize / 4;
    let cache_tokens = match cache {
        KvCacheGeometry::Contiguous { capacity } => shape.batch as u128 * capacity as u128,
        KvCacheGeometry::Paged { num_pages, page_size, .. } => num_pages as u128 * page_size as u128,
    };
    let cache_wide = cache_tokens * shape.kv_heads as u128 * shape.head_dim as u128;
    if cache_wide > max_elements as u128 {
        return Err(LaunchError::TooLarge { what: "k/v cache elements", got: cache_wide, max: max_elements as u128 });
    }
    let cache_elements = cache_wide as usize;
    // batch <= 65535 and max_pages * page_size <= MAX_SEQ (the capacity check) keep this in range.
    let table = cache.block_table_len(shape.batch).unwrap_or(usize::MAX);
    let elements = shape.batch * shape.heads * shape.head_dim; // bounded by the limits above
    for (tensor, needed, got) in [
        ("q", elements, lens.q),
        ("k_cache", cache_elements, lens.k_cache),
        ("v_cache", cache_elements, lens.v_cache),
        ("o", elements, lens.o),
        ("rem", shape.batch * shape.heads, lens.rem),
        ("seqlens_k", shape.batch, lens.seqlens_k),
    ] {
        if got < needed {
            return Err(LaunchError::TooShort { tensor, needed, got });
        }
    }
    match (cache.is_paged(), lens.block_table) {
        (true, Some(got)) if got < table => {
            return Err(LaunchError::TooShort { tensor: "block_table", needed: table, got })
        }
        (true, None) => return Err(cache_error("a paged cache needs `block_table`".into())),
        (false, Some(_)) => return Err(cache_error("a contiguous cache takes no `block_table`".into())),
        _ => {}
    }

    // The split.
    let tiles = shape.group().div_ceil(tile_heads);
    let units = shape.batch * shape.kv_heads * tiles;
    let chunk_keys = split.chunk_keys.unwrap_or(DEFAULT_CHUNK_BLOCKS * block_n);
    if chunk_keys == 0 || chunk_keys % block_n != 0 || chunk_keys > MAX_SEQ {
        return Err(LaunchError::Split {
            what: "chunk_keys",
            got: chunk_keys,
            allowed: format!("a multiple of the kernel's block_n ({block_n}), at most {MAX_SEQ}"),
        });
    }
    // The most chunks the longest sequence can have.
    let useful_chunks = capacity.div_ceil(block_n).div_ceil(chunk_keys / block_n).max(1);
    let splits_wanted = match split.splits {
        Some(0) => return Err(LaunchError::Split { what: "splits", got: 0, allowed: "at least 1".into() }),
        Some(s) => s,
        // About one CTA per SM in all, at least one per unit (H200, 8 x 32:8 x 131072: 93% of
        // peak against 90% with two waves of resident CTAs, and early exit in 15 us against 21).
        None => {
            let ctas_per_unit = ((device.sm_count.max(1) + units / 2) / units).max(1);
            (ctas_per_unit * warps).min(useful_chunks)
        }
    };
    let ctas = splits_wanted.div_ceil(warps);
    let splits = ctas * warps;
    let max_chunks = match split.max_chunks {
        Some(m) if m == 0 || m > MAX_CHUNKS => {
            return Err(LaunchError::Split { what: "max_chunks", got: m, allowed: format!("1..={MAX_CHUNKS}") })
        }
        Some(m) => m,
        None => splits.min(useful_chunks).min(MAX_CHUNKS),
    };
    let tile = spec.tile_head_dim() as usize;
    let states = shape.batch as u128 * shape.heads as u128 * max_chunks as u128;
    let workspace = states * (tile as u128 + 1) + 2 * units as u128;
    if workspace > max_elements as u128 {
        return Err(LaunchError::TooLarge {
            what: "decode workspace elements",
            got: workspace,
            max: max_elements as u128,
        });
    }
    let dims = GridDims {
        batch: shape.batch,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        seq: capacity,
        kv_elements: 0,
        splits,
    };
    let grid = main.grid.grid(&dims).ok_or(LaunchError::TooLarge {
        what: "decode grid (sequences x K/V heads x tiles, CTAs of splits)",
        got: splits as u128 * units as u128,
        max: (1u128 << 31) - 1,
    })?;
    let step = PlannedStep { grid, threads: main.threads, dynamic_smem_bytes: main.dynamic_smem_bytes };
    let scale = scale.unwrap_or(1.0 / (shape.head_dim as f32).sqrt());
    if !scale.is_finite() || scale == 0.0 {
        return Err(LaunchError::Scale { got: scale });
    }
    Ok(DecodePlan {
        step,
        splits,
        chunk_keys,
        max_chunks,
        chunk_o_elements: states as usize * tile,
        chunk_l_elements: states as usize,
        sync_slots: 2 * units,
        scale_log2: scale * std::f32::consts::LOG2_E,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::LaunchStep;
    use crate::spec::Spec;

    const H200: DeviceLimits = DeviceLimits { sm_count: 132 };

    fn manifest(layout: Layout) -> KernelManifest {
        let mut spec = Spec::new(128, Dtype::Bf16, Pass::Decode);
        spec.layout = layout;
        let steps = vec![LaunchStep {
            function: "sb_dec".into(),
            grid: GridRule::DecodeSplits { warps: 4, tile_heads: 16 },
            threads: 128,
            dynamic_smem_bytes: 102_400,
            kv_tensor_maps: false,
        }];
        KernelManifest { name: "sb_dec".into(), spec, block_m: 16, block_n: 16, steps }
    }

    fn shape(batch: usize, heads: usize, kv_heads: usize) -> DecodeShape {
        DecodeShape { batch, heads, kv_heads, head_dim: 128 }
    }

    fn lens(s: DecodeShape, cache: KvCacheGeometry) -> DecodeLens {
        let c = cache.cache_elements(s.batch, s.kv_heads, s.head_dim).unwrap();
        DecodeLens {
            q: s.len(),
            k_cache: c,
            v_cache: c,
            o: s.len(),
            rem: s.rows(),
            seqlens_k: s.batch,
            block_table: cache.is_paged().then(|| cache.block_table_len(s.batch).unwrap()),
        }
    }

    fn plan(
        m: &KernelManifest,
        s: DecodeShape,
        cache: KvCacheGeometry,
        split: DecodeSplit,
    ) -> Result<DecodePlan, LaunchError> {
        plan_decode(m, Dtype::Bf16, s, cache, &lens(s, cache), split, H200, None)
    }

    #[test]
    fn the_default_split_fills_the_gpu_and_one_chunk_per_warp() {
        let m = manifest(Layout::Bhnd);
        // 8 sequences of 8 K/V heads (32 query heads: one tile per group) at 131072 tokens: 64 units,
        // 132 SMs: 2 CTAs of 4 warps each.
        let cache = KvCacheGeometry::Contiguous { capacity: 131072 };
        let p = plan(&m, shape(8, 32, 8), cache, DecodeSplit::default()).unwrap();
        assert_eq!((p.splits, p.max_chunks, p.chunk_keys), (8, 8, 64));
        assert_eq!(p.step.grid, (64, 2, 1));
        assert_eq!(p.chunk_o_elements, 8 * 32 * 8 * 128);
        assert_eq!((p.chunk_l_elements, p.sync_slots), (8 * 32 * 8, 2 * 64));
        // One sequence of 8 K/V heads: 132 / 8 = 16.5, 17 CTAs each.
        let p = plan(&m, shape(1, 32, 8), cache, DecodeSplit::default()).unwrap();
        assert_eq!(p.step.grid, (8, 17, 1));
        // A short cache never gets more splits than it has chunks of 64 keys.
        let p =
            plan(&m, shape(1, 32, 8), KvCacheGeometry::Contiguous { capacity: 100 }, DecodeSplit::default()).unwrap();
        assert_eq!((p.splits, p.max_chunks), (4, 2));
        // A large batch needs no split beyond one CTA per unit.
        let p = plan(&m, shape(64, 32, 8), cache, DecodeSplit::default()).unwrap();
        assert_eq!(p.splits, 4);
    }

    #[test]
    fn groups_wider_than_a_tile_take_several_tiles() {
        let m = manifest(Layout::Bhnd);
        let cache = KvCacheGeometry::Contiguous { capacity: 4096 };
        let p = plan(&m, shape(2, 40, 2), cache, DecodeSplit { splits: Some(5), ..Default::default() }).unwrap();
        // 20 query heads per K/V head: two 16-head tiles.
        assert_eq!(p.step.grid, (2 * 2 * 2, 2, 1));
        assert_eq!((p.splits, p.sync_slots), (8, 2 * 2 * 2 * 2));
    }

    #[test]
    fn a_forced_split_is_kept_and_checked() {
        let m = manifest(Layout::Paged);
        let cache = KvCacheGeometry::Paged { num_pages: 10, page_size: 32, max_pages: 4 };
        let split = DecodeSplit { splits: Some(1), chunk_keys: Some(16), max_chunks: Some(100) };
        let p = plan(&m, shape(3, 4, 4), cache, split).unwrap();
        assert_eq!((p.splits, p.chunk_keys, p.max_chunks), (4, 16, 100));
        for (split, what) in [
            (DecodeSplit { chunk_keys: Some(24), ..Default::default() }, "chunk_keys"),
            (DecodeSplit { chunk_keys: Some(0), ..Default::default() }, "chunk_keys"),
            (DecodeSplit { splits: Some(0), ..Default::default() }, "splits"),
            (DecodeSplit { max_chunks: Some(0), ..Default::default() }, "max_chunks"),
            (DecodeSplit { max_chunks: Some(MAX_CHUNKS + 1), ..Default::default() }, "max_chunks"),
        ] {
            let err = plan(&m, shape(3, 4, 4), cache, split).unwrap_err();
            assert!(matches!(err, LaunchError::Split { what: w, .. } if w == what), "{err}");
            assert!(err.to_string().contains(&format!("`{what}`")), "{err}");
        }
    }

    #[test]
    fn a_key_block_may_span_pages_of_any_multiple_of_16_tokens() {
        let mut wide = manifest(Layout::Paged);
        wide.block_n = 64;
        for page_size in [16, 32, 48, 64] {
            let paged = KvCacheGeometry::Paged { num_pages: 10, page_size, max_pages: 4 };
            assert!(plan(&wide, shape(1, 4, 4), paged, DecodeSplit::default()).is_ok(), "page_size {page_size}");
        }
        let paged = KvCacheGeometry::Paged { num_pages: 10, page_size: 8, max_pages: 4 };
        let err = plan(&wide, shape(1, 4, 4), paged, DecodeSplit::default()).unwrap_err();
        assert!(err.to_string().contains("`page_size` = 8 is not a multiple of 16"), "{err}");
    }

    #[test]
    fn refuses_caches_that_do_not_fit_the_kernel() {
        let paged = KvCacheGeometry::Paged { num_pages: 10, page_size: 24, max_pages: 4 };
        let err = plan(&manifest(Layout::Paged), shape(1, 4, 4), paged, DecodeSplit::default()).unwrap_err();
        assert!(err.to_string().contains("`page_size` = 24 is not a multiple"), "{err}");
        let contiguous = KvCacheGeometry::Contiguous { capacity: 64 };
        let err = plan(&manifest(Layout::Paged), shape(1, 4, 4), contiguous, DecodeSplit::default()).unwrap_err();
        assert!(matches!(err, LaunchError::KvCache { .. }), "{err}");
        let paged = KvCacheGeometry::Paged { num_pages: 10, page_size: 32, max_pages: 4 };
        let err = plan(&manifest(Layout::Bnhd), shape(1, 4, 4), paged, DecodeSplit::default()).unwrap_err();
        assert!(err.to_string().contains("contiguous bnhd cache"), "{err}");
        let err = plan(
            &manifest(Layout::Bhnd),
            shape(1, 4, 4),
            KvCacheGeometry::Contiguous { capacity: 0 },
            DecodeSplit::default(),
        )
        .unwrap_err();
        assert!(matches!(err, LaunchError::EmptyDim { dim: "capacity" }), "{err}");
        let no_pages = KvCacheGeometry::Paged { num_pages: 0, page_size: 32, max_pages: 4 };
        let err = plan(&manifest(Layout::Paged), shape(1, 4, 4), no_pages, DecodeSplit::default()).unwrap_err();
        assert!(matches!(err, LaunchError::EmptyDim { dim: "num_pages" }), "{err}");
    }

    #[test]
    fn refuses_short_slices_naming_the_tensor() {
        let m = manifest(Layout::Paged);
        let s = shape(2, 8, 2);
        let cache = KvCacheGeometry::Paged { num_pages: 10, page_size: 32, max_pages: 4 };
        let full = lens(s, cache);
        for (name, l) in [
            ("q", DecodeLens { q: 1, ..full }),
            ("k_cache", DecodeLens { k_cache: 1, ..full }),
            ("v_cache", DecodeLens { v_cache: 1, ..full }),
            ("o", DecodeLens { o: 1, ..full }),
            ("rem", DecodeLens { rem: 1, ..full }),
            ("seqlens_k", DecodeLens { seqlens_k: 1, ..full }),
            ("block_table", DecodeLens { block_table: Some(7), ..full }),
        ] {
            let err = plan_decode(&m, Dtype::Bf16, s, cache, &l, DecodeSplit::default(), H200, None).unwrap_err();
            assert!(matches!(err, LaunchError::TooShort { tensor, .. } if tensor == name), "{name}: {err}");
        }
        let err = plan_decode(
            &m,
            Dtype::Bf16,
            s,
            cache,
            &DecodeLens { block_table: None, ..full },
            DecodeSplit::default(),
            H200,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs `block_table`"), "{err}");
    }

    #[test]
    fn refuses_the_wrong_kernel_dtype_head_dim_and_heads() {
        let cache = KvCacheGeometry::Contiguous { capacity: 64 };
        let mut fwd = manifest(Layout::Bhnd);
        fwd.spec.pass = Pass::Forward;
        let err = plan(&fwd, shape(1, 4, 4), cache, DecodeSplit::default()).unwrap_err();
        assert!(matches!(err, LaunchError::WrongPass { expected: Pass::Decode, .. }), "{err}");
        let m = manifest(Layout::Bhnd);
        let s = shape(1, 4, 4);
        let err =
            plan_decode(&m, Dtype::F16, s, cache, &lens(s, cache), DecodeSplit::default(), H200, None).unwrap_err();
        assert!(matches!(err, LaunchError::Dtype { .. }), "{err}");
        let s64 = DecodeShape { head_dim: 64, ..s };
        let err = plan_decode(&m, Dtype::Bf16, s64, cache, &lens(s64, cache), DecodeSplit::default(), H200, None)
            .unwrap_err();
        assert!(matches!(err, LaunchError::HeadDim { expected: 128, got: 64, .. }), "{err}");
        let err = plan(&m, shape(1, 6, 4), cache, DecodeSplit::default()).unwrap_err();
        assert!(matches!(err, LaunchError::KvHeads { .. }), "{err}");
        let err = plan(&m, shape(0, 4, 4), cache, DecodeSplit::default()).unwrap_err();
        assert!(matches!(err, LaunchError::EmptyDim { dim: "batch" }), "{err}");
        let mut bad = manifest(Layout::Bhnd);
        bad.steps[0].grid = GridRule::Elements { per_cta: 4 };
        assert!(matches!(plan(&bad, s, cache, DecodeSplit::default()).unwrap_err(), LaunchError::Manifest { .. }));
        let err = plan_decode(&m, Dtype::Bf16, s, cache, &lens(s, cache), DecodeSplit::default(), H200, Some(f32::NAN))
            .unwrap_err();
        assert!(matches!(err, LaunchError::Scale { .. }), "{err}");
    }

    #[test]
    fn refuses_sizes_past_the_limits() {
        let m = manifest(Layout::Bhnd);
        let huge = KvCacheGeometry::Contiguous { capacity: MAX_SEQ + 1 };
        let err = plan(&m, shape(1, 4, 4), huge, DecodeSplit::default()).unwrap_err();
        assert!(matches!(err, LaunchError::TooLarge { what: "capacity (tokens per sequence)", .. }), "{err}");
        // 65535 sequences of 2^31 - 257 tokens of 256 K/V heads overflow any tensor.
        let big = KvCacheGeometry::Contiguous { capacity: MAX_SEQ };
        let s = shape(65535, 256, 256);
        let l = DecodeLens {
            q: usize::MAX,
            k_cache: usize::MAX,
            v_cache: usize::MAX,
            o: usize::MAX,
            rem: usize::MAX,
            seqlens_k: usize::MAX,
            block_table: None,
        };
        let err = plan_decode(&m, Dtype::Bf16, s, big, &l, DecodeSplit::default(), H200, None).unwrap_err();
        assert!(matches!(err, LaunchError::TooLarge { what: "k/v cache elements", .. }), "{err}");
    }
}
