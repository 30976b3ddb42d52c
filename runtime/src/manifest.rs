//! How a compiled kernel is launched: its entry points in order, each with a grid rule, a block size
//! and dynamic shared memory, plus the one parameter block every entry point takes.
//!
//! The lowering in `sbgen` writes a [`KernelManifest`] next to the CUDA source; the launcher, the macro
//! and the tuning cache read it. The C struct in the generated source is rendered from
//! [`PARAM_FIELDS`], and [`SbParams`] mirrors it (a test checks the offsets), so the two sides of the
//! ABI come from one table.

use crate::spec::Spec;
use serde::{Deserialize, Serialize};

/// Everything needed to launch one lowered kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelManifest {
    /// Kernel name: spec slug plus a short schedule hash, e.g. `sb_fwd_d128_bf16_strict_bhnd_ret_full_1a2b3c4d`.
    pub name: String,
    pub spec: Spec,
    /// Query rows per CTA and keys per step of the walk (what the grid and the early-exit rule use).
    pub block_m: u32,
    pub block_n: u32,
    /// Entry points, launched in this order on one stream.
    pub steps: Vec<LaunchStep>,
}

/// One kernel launch of a pass.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchStep {
    /// `extern "C"` function name in the module.
    pub function: String,
    pub grid: GridRule,
    pub threads: u32,
    pub dynamic_smem_bytes: u32,
    /// The entry point takes two tensor maps after the parameter block, K's then V's, for its TMA
    /// loads (`crate::tensor_map`). Absent (false) in manifests written before it existed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub kv_tensor_maps: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How a step's grid follows from the problem size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GridRule {
    /// `(ceil(N / block_m) * (H / H_kv), H_kv, B)`: one CTA per query block per query head, the query
    /// heads that share a K/V head next to each other in launch order (they read the same K/V tiles
    /// at about the same time, from L2). N is the longest sequence of a packed (THD) batch.
    QueryBlocks { block_m: u32 },
    /// `(ceil(elements / per_cta), 1, 1)`: an elementwise pass over the K/V-shaped tensors.
    Elements { per_cta: u32 },
    /// Decode, split-K: `(B * H_kv * ceil((H / H_kv) / tile_heads), ceil(splits / warps), 1)`:
    /// `splits` warps per (sequence, K/V head, tile of `tile_heads` query heads of its group), `warps`
    /// per CTA. The units run along x, so the CTAs holding every unit's nearest chunks are launched
    /// first (the first wave) and, with early exit, the farther ones find the stick spent.
    DecodeSplits { warps: u32, tile_heads: u32 },
}

impl GridRule {
    /// The field the rule divides by and its value (a manifest with 0 there is malformed).
    pub fn divisor(&self) -> (&'static str, u32) {
        match *self {
            GridRule::QueryBlocks { block_m } => ("block_m", block_m),
            GridRule::Elements { per_cta } => ("per_cta", per_cta),
            GridRule::DecodeSplits { warps: 0, .. } => ("warps", 0),
            GridRule::DecodeSplits { tile_heads, .. } => ("tile_heads", tile_heads),
        }
    }

    /// The grid for `dims`, or `None` when a dimension would exceed what CUDA allows (x < 2^31, y and
    /// z < 65536), `kv_heads` does not divide `heads`, or the rule's [`divisor`](GridRule::divisor)
    /// is 0.
    // `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
    #[allow(clippy::manual_is_multiple_of)]
    pub fn grid(&self, dims: &GridDims) -> Option<(u32, u32, u32)> {
        if self.divisor().1 == 0 || dims.kv_heads == 0 || dims.heads % dims.kv_heads != 0 {
            return None;
        }
        let (x, y, z) = match *self {
            GridRule::QueryBlocks { block_m } => (
                dims.seq.div_ceil(block_m as usize).checked_mul(dims.heads / dims.kv_heads)?,
                dims.kv_heads,
                dims.batch,
            ),
            GridRule::Elements { per_cta } => (dims.kv_elements.div_ceil(per_cta as usize), 1, 1),
            GridRule::DecodeSplits { warps, tile_heads } => (
                dims.batch
                    .checked_mul(dims.kv_heads)?
                    .checked_mul((dims.heads / dims.kv_heads).div_ceil(tile_heads as usize))?,
                dims.splits.div_ceil(warps as usize),
                1,
            ),
        };
        if x == 0 || x >= (1 << 31) || y == 0 || y >= 65536 || z == 0 || z >= 65536 {
            return None;
        }
        Some((x as u32, y as u32, z as u32))
    }
}

/// What a grid rule reads from the problem: `seq` is the (longest) sequence length, `kv_elements`
/// the elements of each K/V-shaped tensor, `splits` the decode's warps per (sequence, K/V head,
/// tile of query heads) (0 for the other passes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridDims {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub kv_elements: usize,
    pub splits: usize,
}

/// The fields of the parameter block, in order, with their C types. `T` is the spec's element type.
/// Pointers the pass does not use are null.
pub const PARAM_FIELDS: &[(&str, &str)] = &[
    ("q", "const T*"),
    ("k", "const T*"),
    ("v", "const T*"),
    // forward outputs; `o` is also a backward input
    ("o", "T*"),
    ("rem", "float*"),
    ("log2_rem", "float*"),
    // optional forward output, required backward input: o before the fused remainder, in f32 and the
    // spec's layout. The backward's D_i = dO_i . o_i must match its own sum of weights to f32
    // precision (a bf16 o makes dQ/dK errors grow with N: every far key's beta multiplies the error).
    ("o_saved", "float*"),
    // backward inputs (d_rem may be null: no gradient flows into rem)
    ("d_o", "const T*"),
    ("d_rem", "const float*"),
    // backward outputs and their f32 accumulators (zeroed before the main step)
    ("dq", "T*"),
    ("dk", "T*"),
    ("dv", "T*"),
    ("dk_accum", "float*"),
    ("dv_accum", "float*"),
    // THD layout: batch + 1 token offsets (device memory, trusted: a sequence whose bounds fall
    // outside 0..=total_tokens or that is longer than `seq` is skipped, never read out of bounds)
    ("cu_seqlens", "const int*"),
    // deterministic backward: one zeroed turn counter per (batch, kv head, key block)
    ("locks", "int*"),
    ("batch", "int"),
    // query heads; `kv_heads` divides it (grouped-query attention)
    ("heads", "int"),
    ("kv_heads", "int"),
    // the sequence length (THD: the longest sequence, max_seqlen)
    ("seq", "int"),
    // THD: tokens in the packed batch (0 otherwise)
    ("total_tokens", "int"),
    // softmax-style scale times log2(e): scores enter the kernel in base-2 log space
    ("scale_log2", "float"),
];

/// The decode's parameter block (its own: the forward's and backward's stays as their PTX was
/// tuned), fields in order with their C types.
pub const DECODE_PARAM_FIELDS: &[(&str, &str)] = &[
    // q and o: [B, H, D]; k and v: the cache (bhnd [B, H_kv, seq, D], bnhd [B, seq, H_kv, D], or
    // paged [num_pages, page_size, H_kv, D])
    ("q", "const T*"),
    ("k", "const T*"),
    ("v", "const T*"),
    ("o", "T*"),
    ("rem", "float*"),
    // [B]: tokens cached per sequence, the new token last (device memory; a length outside
    // 0..=seq is read as 0)
    ("seqlens_k", "const int*"),
    // paged: [B, max_pages] page ids (device memory; an id outside 0..num_pages reads as no keys)
    ("block_table", "const int*"),
    // workspace: per (sequence, query head, chunk) the chunk state o_c [D] (tile width) and L_c
    ("chunk_o", "float*"),
    ("chunk_l", "float*"),
    // per unit (sequence, K/V head, tile of query heads), zeroed before each launch: the early-exit
    // slot (0, or 2^30 - the nearest chunk that spent the stick) and the count of the unit's CTAs
    // that finished (the last one merges)
    ("exit_chunk", "int*"),
    ("unit_done", "int*"),
    ("batch", "int"),
    ("heads", "int"),
    ("kv_heads", "int"),
    // tokens a sequence's cache can hold: the contiguous cache's N, or max_pages * page_size
    ("seq", "int"),
    ("num_pages", "int"),
    ("page_size", "int"),
    ("max_pages", "int"),
    // keys per chunk (a multiple of block_n) and chunks per sequence in the workspace
    ("chunk_keys", "int"),
    ("max_chunks", "int"),
    ("scale_log2", "float"),
];

/// The decode's parameter block; mirrors [`DECODE_PARAM_FIELDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub rem: u64,
    pub seqlens_k: u64,
    pub block_table: u64,
    pub chunk_o: u64,
    pub chunk_l: u64,
    pub exit_chunk: u64,
    pub unit_done: u64,
    pub batch: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub seq: i32,
    pub num_pages: i32,
    pub page_size: i32,
    pub max_pages: i32,
    pub chunk_keys: i32,
    pub max_chunks: i32,
    pub scale_log2: f32,
}

/// The segment pass's parameter block (docs/math.md#context-parallelism), fields in order with their
/// C types. Every pointer addresses the segment's token 0; tokens of a head (BHND) or of a sequence
/// (BNHD) lie `q_seq` (q-shaped) or `kv_seq` (K/V-shaped) tokens apart, so a segment can sit inside
/// a rank's longer local tensor.
pub const SEGMENT_PARAM_FIELDS: &[(&str, &str)] = &[
    ("q", "const T*"),
    ("k", "const T*"),
    ("v", "const T*"),
    // the row state, q-shaped, f32, read and written in place by the walk: o (weights already
    // scaled by the stick the nearer segments left) and, per row (`[B, H, q_seq]`), log2 of the
    // stick left
    ("o_state", "float*"),
    ("l_state", "float*"),
    // the finishing entry point's outputs: o (q-shaped; plus rem * v_own with a fused remainder,
    // v_own being the query tokens' own values, K/V-shaped with `kv_seq` = `q_seq`), rem, log2_rem
    ("o", "T*"),
    ("rem", "float*"),
    ("log2_rem", "float*"),
    ("v_own", "const T*"),
    ("batch", "int"),
    ("heads", "int"),
    ("kv_heads", "int"),
    // rows of the query segment and keys of the key segment
    ("q_len", "int"),
    ("kv_len", "int"),
    // token spacing of the q-shaped and K/V-shaped tensors (>= q_len, kv_len)
    ("q_seq", "int"),
    ("kv_seq", "int"),
    // position of query row 0 minus position of key 0: key j is allowed for row i when j < i +
    // offset (j <= i + offset attending the current token); the diagonal has 0, a key segment
    // wholly before the queries at least kv_len
    ("offset", "int"),
    // 1: the query segment's first pair (its own keys, walked first): the walk starts from a spent-
    // nothing state (o = 0, log2 of the stick = 0) without reading the state, and writes it
    ("fresh", "int"),
    ("scale_log2", "float"),
];

/// The segment pass's parameter block; mirrors [`SEGMENT_PARAM_FIELDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SegmentParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o_state: u64,
    pub l_state: u64,
    pub o: u64,
    pub rem: u64,
    pub log2_rem: u64,
    pub v_own: u64,
    pub batch: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub q_len: i32,
    pub kv_len: i32,
    pub q_seq: i32,
    pub kv_seq: i32,
    pub offset: i32,
    pub fresh: i32,
    pub scale_log2: f32,
}

/// The segment backward's parameter block (docs/math.md#context-parallelism). The walk's pointers
/// are placed as in [`SEGMENT_PARAM_FIELDS`]; the finishing entry points read the rank's whole local
/// tensors (`seq` tokens, pointers at token 0).
pub const SEGMENT_BWD_PARAM_FIELDS: &[(&str, &str)] = &[
    ("q", "const T*"),
    ("k", "const T*"),
    ("v", "const T*"),
    // per query row, from the forward (final): o before any fused remainder in f32 (q-shaped),
    // log2 of the stick left (`[B, H, q_seq]`); the gradients flowing in: dO, dRem (may be null); and
    // the query tokens' own values (K/V-shaped, q_seq spacing) for a fused remainder's share
    ("o_saved", "const float*"),
    ("log2_rem", "const float*"),
    ("d_o", "const T*"),
    ("d_rem", "const float*"),
    ("v_own", "const T*"),
    // the row state, read and written in place: f32 dQ (q-shaped, scaled), log2 of the stick left
    // and the sum of g over the keys walked (`[B, H, q_seq]`; zero before a query segment's first
    // pair)
    ("dq_state", "float*"),
    ("l_state", "float*"),
    ("s_state", "float*"),
    // the key segment's f32 dK, dV partials (K/V-shaped, kv_seq spacing), added to
    ("dk_accum", "float*"),
    ("dv_accum", "float*"),
    // the finishing entry points' outputs (the rank's local tensors)
    ("dq", "T*"),
    ("dk", "T*"),
    ("dv", "T*"),
    ("batch", "int"),
    ("heads", "int"),
    ("kv_heads", "int"),
    ("q_len", "int"),
    ("kv_len", "int"),
    ("q_seq", "int"),
    ("kv_seq", "int"),
    ("offset", "int"),
    // 1: the query segment's first pair: the row state starts at zero (not read) and is written
    ("fresh", "int"),
    // the finishing entry points: tokens of the local tensors (`total_tokens` is always 0)
    ("seq", "int"),
    ("total_tokens", "int"),
    ("scale_log2", "float"),
];

/// The segment backward's parameter block; mirrors [`SEGMENT_BWD_PARAM_FIELDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SegmentBwdParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o_saved: u64,
    pub log2_rem: u64,
    pub d_o: u64,
    pub d_rem: u64,
    pub v_own: u64,
    pub dq_state: u64,
    pub l_state: u64,
    pub s_state: u64,
    pub dk_accum: u64,
    pub dv_accum: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub batch: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub q_len: i32,
    pub kv_len: i32,
    pub q_seq: i32,
    pub kv_seq: i32,
    pub offset: i32,
    pub fresh: i32,
    pub seq: i32,
    pub total_tokens: i32,
    pub scale_log2: f32,
}

/// The parameter block passed by value to every entry point; mirrors [`PARAM_FIELDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SbParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub rem: u64,
    pub log2_rem: u64,
    pub o_saved: u64,
    pub d_o: u64,
    pub d_rem: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub dk_accum: u64,
    pub dv_accum: u64,
    pub cu_seqlens: u64,
    pub locks: u64,
    pub batch: i32,
    pub heads: i32,
    pub kv_heads: i32,
    pub seq: i32,
    pub total_tokens: i32,
    pub scale_log2: f32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Offsets of the fields of a C struct with these field types (8-byte pointers, 4-byte ints and
    /// floats, aligned as a C compiler does), and its size.
    fn c_layout(fields: &[(&str, &str)]) -> (Vec<usize>, usize) {
        let mut offset = 0usize;
        let mut c_offsets = Vec::new();
        for (_, ty) in fields {
            let size = if ty.ends_with('*') { 8 } else { 4 };
            offset = offset.div_ceil(size) * size;
            c_offsets.push(offset);
            offset += size;
        }
        (c_offsets, offset.div_ceil(8) * 8)
    }

    #[test]
    fn decode_params_struct_matches_its_field_table() {
        let (c_offsets, size) = c_layout(DECODE_PARAM_FIELDS);
        let rust_offsets = [
            offset_of!(DecodeParams, q),
            offset_of!(DecodeParams, k),
            offset_of!(DecodeParams, v),
            offset_of!(DecodeParams, o),
            offset_of!(DecodeParams, rem),
            offset_of!(DecodeParams, seqlens_k),
            offset_of!(DecodeParams, block_table),
            offset_of!(DecodeParams, chunk_o),
            offset_of!(DecodeParams, chunk_l),
            offset_of!(DecodeParams, exit_chunk),
            offset_of!(DecodeParams, unit_done),
            offset_of!(DecodeParams, batch),
            offset_of!(DecodeParams, heads),
            offset_of!(DecodeParams, kv_heads),
            offset_of!(DecodeParams, seq),
            offset_of!(DecodeParams, num_pages),
            offset_of!(DecodeParams, page_size),
            offset_of!(DecodeParams, max_pages),
            offset_of!(DecodeParams, chunk_keys),
            offset_of!(DecodeParams, max_chunks),
            offset_of!(DecodeParams, scale_log2),
        ];
        assert_eq!(c_offsets, rust_offsets);
        assert_eq!(size_of::<DecodeParams>(), size);
    }

    #[test]
    fn segment_params_struct_matches_its_field_table() {
        let (c_offsets, size) = c_layout(SEGMENT_PARAM_FIELDS);
        let rust_offsets = [
            offset_of!(SegmentParams, q),
            offset_of!(SegmentParams, k),
            offset_of!(SegmentParams, v),
            offset_of!(SegmentParams, o_state),
            offset_of!(SegmentParams, l_state),
            offset_of!(SegmentParams, o),
            offset_of!(SegmentParams, rem),
            offset_of!(SegmentParams, log2_rem),
            offset_of!(SegmentParams, v_own),
            offset_of!(SegmentParams, batch),
            offset_of!(SegmentParams, heads),
            offset_of!(SegmentParams, kv_heads),
            offset_of!(SegmentParams, q_len),
            offset_of!(SegmentParams, kv_len),
            offset_of!(SegmentParams, q_seq),
            offset_of!(SegmentParams, kv_seq),
            offset_of!(SegmentParams, offset),
            offset_of!(SegmentParams, fresh),
            offset_of!(SegmentParams, scale_log2),
        ];
        assert_eq!(c_offsets, rust_offsets);
        assert_eq!(size_of::<SegmentParams>(), size);
    }

    #[test]
    fn segment_bwd_params_struct_matches_its_field_table() {
        let (c_offsets, size) = c_layout(SEGMENT_BWD_PARAM_FIELDS);
        let rust_offsets = [
            offset_of!(SegmentBwdParams, q),
            offset_of!(SegmentBwdParams, k),
            offset_of!(SegmentBwdParams, v),
            offset_of!(SegmentBwdParams, o_saved),
            offset_of!(SegmentBwdParams, log2_rem),
            offset_of!(SegmentBwdParams, d_o),
            offset_of!(SegmentBwdParams, d_rem),
            offset_of!(SegmentBwdParams, v_own),
            offset_of!(SegmentBwdParams, dq_state),
            offset_of!(SegmentBwdParams, l_state),
            offset_of!(SegmentBwdParams, s_state),
            offset_of!(SegmentBwdParams, dk_accum),
            offset_of!(SegmentBwdParams, dv_accum),
            offset_of!(SegmentBwdParams, dq),
            offset_of!(SegmentBwdParams, dk),
            offset_of!(SegmentBwdParams, dv),
            offset_of!(SegmentBwdParams, batch),
            offset_of!(SegmentBwdParams, heads),
            offset_of!(SegmentBwdParams, kv_heads),
            offset_of!(SegmentBwdParams, q_len),
            offset_of!(SegmentBwdParams, kv_len),
            offset_of!(SegmentBwdParams, q_seq),
            offset_of!(SegmentBwdParams, kv_seq),
            offset_of!(SegmentBwdParams, offset),
            offset_of!(SegmentBwdParams, fresh),
            offset_of!(SegmentBwdParams, seq),
            offset_of!(SegmentBwdParams, total_tokens),
            offset_of!(SegmentBwdParams, scale_log2),
        ];
        assert_eq!(c_offsets, rust_offsets);
        assert_eq!(size_of::<SegmentBwdParams>(), size);
    }

    #[test]
    fn params_struct_matches_the_field_table() {
        let (c_offsets, size) = c_layout(PARAM_FIELDS);
        let rust_offsets = [
            offset_of!(SbParams, q),
            offset_of!(SbParams, k),
            offset_of!(SbParams, v),
            offset_of!(SbParams, o),
            offset_of!(SbParams, rem),
            offset_of!(SbParams, log2_rem),
            offset_of!(SbParams, o_saved),
            offset_of!(SbParams, d_o),
            offset_of!(SbParams, d_rem),
            offset_of!(SbParams, dq),
            offset_of!(SbParams, dk),
            offset_of!(SbParams, dv),
            offset_of!(SbParams, dk_accum),
            offset_of!(SbParams, dv_accum),
            offset_of!(SbParams, cu_seqlens),
            offset_of!(SbParams, locks),
            offset_of!(SbParams, batch),
            offset_of!(SbParams, heads),
            offset_of!(SbParams, kv_heads),
            offset_of!(SbParams, seq),
            offset_of!(SbParams, total_tokens),
            offset_of!(SbParams, scale_log2),
        ];
        assert_eq!(c_offsets, rust_offsets);
        assert_eq!(size_of::<SbParams>(), size);
    }

    #[test]
    fn grid_rules() {
        let dims =
            |batch, heads, kv_heads, seq, kv_elements| GridDims { batch, heads, kv_heads, seq, kv_elements, splits: 0 };
        let q = GridRule::QueryBlocks { block_m: 64 };
        assert_eq!(q.grid(&dims(2, 3, 3, 65, 0)), Some((2, 3, 2)));
        // Grouped-query attention: the 4 query heads of a K/V head share grid.y.
        assert_eq!(q.grid(&dims(2, 8, 2, 65, 0)), Some((8, 2, 2)));
        assert_eq!(q.grid(&dims(2, 8, 3, 65, 0)), None);
        assert_eq!(q.grid(&dims(2, 8, 0, 65, 0)), None);
        assert_eq!(q.grid(&dims(1, 1, 1, 0, 0)), None);
        assert_eq!(q.grid(&dims(70000, 1, 1, 1, 0)), None);
        let e = GridRule::Elements { per_cta: 1024 };
        assert_eq!(e.grid(&dims(1, 2, 2, 17, 2 * 17 * 64)), Some((3, 1, 1)));
        assert_eq!(e.grid(&dims(1, 2, 2, 17, usize::MAX)), None);
        // A zero divisor (a malformed manifest) is no grid, not a panic.
        assert_eq!(GridRule::QueryBlocks { block_m: 0 }.grid(&dims(1, 1, 1, 1, 64)), None);
        assert_eq!(GridRule::Elements { per_cta: 0 }.grid(&dims(1, 1, 1, 1, 64)), None);
    }

    #[test]
    fn decode_grid_rules() {
        let dims = |batch, heads, kv_heads, splits| GridDims { batch, heads, kv_heads, seq: 0, kv_elements: 0, splits };
        let split = GridRule::DecodeSplits { warps: 4, tile_heads: 16 };
        // 32:8 heads: a group of 4 fits one tile; 10 splits on 4 warps per CTA take 3 CTAs.
        assert_eq!(split.grid(&dims(8, 32, 8, 10)), Some((64, 3, 1)));
        // MQA with 40 query heads: 3 tiles of 16.
        assert_eq!(split.grid(&dims(2, 40, 1, 4)), Some((6, 1, 1)));
        // More than 65535 CTAs of split per unit do not fit grid y.
        assert_eq!(split.grid(&dims(1, 1, 1, 4 * 65536)), None);
        assert_eq!(split.grid(&dims(2, 40, 1, 0)), None);
        assert_eq!(GridRule::DecodeSplits { warps: 0, tile_heads: 16 }.grid(&dims(1, 1, 1, 1)), None);
        assert_eq!(GridRule::DecodeSplits { warps: 4, tile_heads: 0 }.grid(&dims(1, 1, 1, 1)), None);
    }
}
