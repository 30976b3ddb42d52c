//! The tensor maps of the TMA loads (sm_90a; docs/performance.md#tma): what the driver's
//! `cuTensorMapEncodeTiled` is told about K and V, so that one copy lands a key block in the wgmma
//! forward's shared-memory tile with its keys already permuted.
//!
//! The tile stores key `k` of a block of `block_n` keys at row `position_of_key(k)`: with
//! `KPT = block_n / 4` (keys per thread and row, one contiguous run), `k = r0 + 2 r1 + KPT a`
//! (r0 < 2, r1 < KPT / 2, a < 4) sits at row `r0 + 2 a + 8 r1`. A box's rows land in shared memory
//! in the order of its dimensions, so the map views each row-major K/V tensor as rank 5:
//!
//! | dim | meaning                     | size        | stride (bytes) | box       |
//! |-----|-----------------------------|-------------|----------------|-----------|
//! | 0   | column inside a row         | `row_elems` | (element)      | 64        |
//! | 1   | r0                          | 2           | `row`          | 2         |
//! | 2   | a                           | 4           | `KPT * row`    | 4         |
//! | 3   | r1                          | `KPT / 2`   | `2 * row`      | `KPT / 2` |
//! | 4   | the block's first row       | rows        | `row`          | 1         |
//!
//! Dimensions 1-4 overlap in memory (the driver accepts that, measured on the H200); only dimension
//! 4 is bounds-checked usefully, so the kernel copies by TMA only blocks that end inside their
//! sequence, and loads a block that runs past its end with `cp.async` (zero-filled), as before.
//! A box is 64 columns (128 bytes, the 128-byte swizzle's width); a wider head takes one copy per
//! 64-column panel.

use super::error::LaunchError;
use crate::spec::{Layout, Spec};

/// Columns per box: one 128-byte swizzled panel of 2-byte elements.
pub const BOX_COLUMNS: u32 = 64;

/// The geometry of one K or V tensor map, in `cuTensorMapEncodeTiled`'s terms (innermost first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvTileMap {
    pub dims: [u64; 5],
    /// Strides of dimensions 1-4 in bytes (dimension 0 is contiguous).
    pub strides: [u64; 4],
    pub box_dims: [u32; 5],
}

/// The map of a K or V tensor of `kv_elements` elements for `spec`'s layout and `block_n`-key blocks.
/// Rows are tokens of one K/V head (BHND) or of all of them (BNHD, THD).
// `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
#[allow(clippy::manual_is_multiple_of)]
pub fn kv_tile_map(
    kernel: &str,
    spec: &Spec,
    kv_heads: usize,
    kv_elements: usize,
    block_n: u32,
) -> Result<KvTileMap, LaunchError> {
    let refuse = |reason: String| Err(LaunchError::TensorMap { kernel: kernel.to_string(), reason });
    let head_dim = spec.head_dim as usize;
    let row_elems = match spec.layout {
        Layout::Bhnd => head_dim,
        Layout::Bnhd | Layout::Thd => kv_heads * head_dim,
        Layout::Paged => return refuse("TMA loads are not built for the paged KV cache".into()),
    };
    let elem = spec.dtype.size_bytes() as u64;
    if head_dim % BOX_COLUMNS as usize != 0 || block_n % 8 != 0 || block_n == 0 || elem != 2 {
        return refuse(format!(
            "TMA loads need head_dim a multiple of {BOX_COLUMNS} (got {head_dim}), block_n a multiple of 8 \
             (got {block_n}) and 2-byte elements"
        ));
    }
    let rows = kv_elements / row_elems.max(1);
    // Coordinates are signed 32-bit: the last row must be addressable.
    if rows == 0 || rows > i32::MAX as usize {
        return refuse(format!("K and V hold {rows} rows; TMA loads address 1 to {} rows", i32::MAX));
    }
    let row = row_elems as u64 * elem;
    let kpt = block_n / 4;
    Ok(KvTileMap {
        dims: [row_elems as u64, 2, 4, kpt as u64 / 2, rows as u64],
        strides: [row, kpt as u64 * row, 2 * row, row],
        box_dims: [BOX_COLUMNS, 2, 4, kpt / 2, 1],
    })
}

/// A tensor map as the kernel takes it (`CUtensorMap`: 128 opaque bytes).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(128))]
pub struct TensorMap {
    opaque: [u64; 16],
}

// SAFETY: 128 plain bytes, passed by value as the kernel's `SbTensorMap` parameter (same size;
// the driver places it at the kernel's parameter alignment).
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

/// Encodes `map` over the tensor at device address `address` (2-byte elements of `spec.dtype`).
pub fn encode(
    kernel: &str,
    tensor: &'static str,
    spec: &Spec,
    map: &KvTileMap,
    address: u64,
) -> Result<TensorMap, LaunchError> {
    use cudarc::driver::sys;
    let data_type = match spec.dtype {
        crate::spec::Dtype::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        crate::spec::Dtype::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let element_strides = [1u32; 5];
    let mut out = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array has the rank's length (5, and 4 strides), `out` is a valid, aligned
    // CUtensorMap, and the driver only reads `address` when a kernel copies through the map.
    let result = unsafe {
        sys::cuTensorMapEncodeTiled(
            out.as_mut_ptr(),
            data_type,
            5,
            address as *mut std::ffi::c_void,
            map.dims.as_ptr(),
            map.strides.as_ptr(),
            map.box_dims.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if result != sys::CUresult::CUDA_SUCCESS {
        return Err(LaunchError::TensorMap {
            kernel: kernel.to_string(),
            reason: format!("the driver refused the tensor map of `{tensor}` ({result:?}): {map:?}"),
        });
    }
    // SAFETY: the driver wrote the whole map.
    let encoded = unsafe { out.assume_init() };
    Ok(TensorMap { opaque: encoded.opaque })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Dtype, Pass};

    fn spec(head_dim: u32, layout: Layout) -> Spec {
        Spec { layout, ..Spec::new(head_dim, Dtype::Bf16, Pass::Forward) }
    }

    #[test]
    fn the_box_permutes_a_block_as_position_of_key_does() {
        let m = kv_tile_map("k", &spec(128, Layout::Bhnd), 2, 2 * 1000 * 128, 64).unwrap();
        let row = 256;
        assert_eq!(m.dims, [128, 2, 4, 8, 2000]);
        assert_eq!(m.strides, [row, 16 * row, 2 * row, row]);
        assert_eq!(m.box_dims, [64, 2, 4, 8, 1]);
        // Box element (r0, a, r1) lands at shared row r0 + 2 a + 8 r1 and reads key r0 + 2 r1 + 16 a:
        // that is position_of_key's inverse, for all 64 keys.
        let kpt = 16;
        let mut seen = [false; 64];
        for r1 in 0..kpt / 2 {
            for a in 0..4 {
                for r0 in 0..2 {
                    let key = r0 + 2 * r1 + kpt * a;
                    let (run, r) = (key / kpt, key % kpt);
                    assert_eq!(r0 + 2 * a + 8 * r1, 8 * (r >> 1) + 2 * run + (r & 1));
                    seen[key] = true;
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
        // Every box is block_n rows of 128 bytes.
        assert_eq!(m.box_dims.iter().skip(1).product::<u32>(), 64);
    }

    #[test]
    fn packed_layouts_take_every_kv_head_in_a_row() {
        let m = kv_tile_map("k", &spec(64, Layout::Thd), 4, 300 * 4 * 64, 32).unwrap();
        assert_eq!(m.dims, [256, 2, 4, 4, 300]);
        assert_eq!(m.strides[0], 512);
        let b = kv_tile_map("k", &spec(64, Layout::Bnhd), 4, 300 * 4 * 64, 32).unwrap();
        assert_eq!(b, m);
    }

    #[test]
    fn tiles_it_cannot_copy_are_refused_with_the_reason() {
        let e = kv_tile_map("sb_x", &spec(96, Layout::Bhnd), 1, 96 * 10, 64).unwrap_err().to_string();
        assert!(e.contains("sb_x") && e.contains("head_dim a multiple of 64 (got 96)"), "{e}");
        let e = kv_tile_map("sb_x", &spec(64, Layout::Bhnd), 1, 0, 64).unwrap_err().to_string();
        assert!(e.contains("0 rows"), "{e}");
    }
}
