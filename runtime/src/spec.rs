//! The *spec* half of the attention IR: what the caller's model fixes. The schedule (how the kernel
//! computes it) lives in the `sbgen` crate; the spec lives here because the launcher checks inputs
//! against it at run time.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Head dimensions the kernels accept: any `head_dim` in this range. The kernels compute on tiles
/// whose width is `head_dim` rounded up to a multiple of 32 ([`Spec::tile_head_dim`]); the columns
/// past `head_dim` are zero-filled by the kernels' loads, never copied (docs/math.md#head-dims).
pub const HEAD_DIM_RANGE: std::ops::RangeInclusive<u32> = 1..=256;

/// Head dimensions that are tiles of their own (no padding); the shipped default cache tunes 64 and
/// 128 of them. Any other `head_dim` in [`HEAD_DIM_RANGE`] runs on the next tile (see [`Spec::tile_head_dim`]).
pub const NATIVE_HEAD_DIMS: &[u32] = &[32, 64, 96, 128, 256];

/// Early-exit thresholds (bits) that make sense: below 8 the error 2^-T is visible in bf16 outputs,
/// above 60 the threshold can never trigger in fp32 arithmetic.
pub const EARLY_EXIT_BITS_RANGE: std::ops::RangeInclusive<u32> = 8..=60;

/// Element type of q, k, v, o and the gradients. Statistics (rem, log2 rem) are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bf16,
    F16,
}

/// Which keys a query may attend to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Mask {
    /// Key j is allowed for query i when j < i (the paper's default).
    Strict,
    /// Key j is allowed for query i when j <= i.
    AttendCurrent,
}

/// Memory order of q, k, v, o and the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// [batch, heads, seq, head_dim], as the paper's reference.
    Bhnd,
    /// [batch, seq, heads, head_dim], as flash-attn, fla-core and candle.
    Bnhd,
    /// Packed variable-length batch: [total_tokens, heads, head_dim], sequence b being tokens
    /// `cu_seqlens[b] .. cu_seqlens[b + 1]` (flash-attn's and fla-core's varlen layout). rem and
    /// log2 rem are [heads, total_tokens].
    Thd,
    /// Decode only: a paged KV cache, k and v `[num_pages, page_size, H_kv, D]` with a
    /// `block_table` `[B, max_pages]` of page ids (vLLM's and flash-attn's `flash_attn_with_kvcache`
    /// layout); q and o are `[B, H, D]`.
    Paged,
}

/// What happens to the stick left over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Remainder {
    /// The kernel returns `o` and `rem` separately.
    Return,
    /// The kernel returns `o + rem * v_i` (the paper's models) and `rem`.
    Fuse,
}

/// Forward (o, rem), backward (dq, dk, dv), or decode (o, rem of one new token per sequence against
/// a KV cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    Forward,
    Backward,
    /// q `[B, H, D]` against cached k, v of `seqlens_k[b]` tokens per sequence, the new token's own
    /// key and value last: the forward's last row of each sequence (docs/math.md#decode).
    Decode,
    /// Context parallelism's forward step: the rows of one query segment walk the keys of one key
    /// segment (nearest first), starting from the (o, log2 rem) state the nearer segments left, kept
    /// in f32 and updated in place; a second entry point turns the final state into o, rem and
    /// log2 rem (docs/math.md#context-parallelism).
    Segment,
    /// Context parallelism's backward step: the rows of one query segment walk one key segment as
    /// the segment pass did, from the (log2 rem, sum of g) state the nearer segments left, adding dQ
    /// into an f32 state and dK, dV into the key segment's f32 partials; further entry points write
    /// dK, dV and dQ in the element type (docs/math.md#context-parallelism).
    SegmentBackward,
}

/// What the caller needs, fixed by the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct Spec {
    pub head_dim: u32,
    pub dtype: Dtype,
    pub mask: Mask,
    pub layout: Layout,
    pub remainder: Remainder,
    pub pass: Pass,
    /// `Some(T)`: stop the walk once every row of a query block has less than 2^-T of its stick left.
    #[serde(default)]
    pub early_exit_bits: Option<u32>,
    /// Backward only: dq, dk, dv bit-identical across runs (dK/dV partial sums are added in a fixed
    /// order instead of as they arrive; docs/math.md#deterministic-backward).
    #[serde(default, skip_serializing_if = "is_false")]
    pub deterministic: bool,
}

fn is_false(x: &bool) -> bool {
    !*x
}

/// A spec field outside what the kernels support.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    #[error("`head_dim` = {got} is not supported: allowed {}..={}", .range.start(), .range.end())]
    HeadDim { got: u32, range: std::ops::RangeInclusive<u32> },
    #[error("`deterministic` = true is for the backward pass only: the forward and the decode are always deterministic, the segment backward has no deterministic variant")]
    DeterministicForward,
    #[error("`layout` = `{layout}` does not go with `pass` = `{pass}`: {allowed}")]
    LayoutForPass { layout: Layout, pass: Pass, allowed: &'static str },
    #[error("`early_exit_bits` = {got} is out of range: allowed {}..={}", .range.start(), .range.end())]
    EarlyExitBits { got: u32, range: std::ops::RangeInclusive<u32> },
    #[error("`{field}` = `{got}` is not a valid value: allowed {allowed}")]
    Unknown { field: &'static str, got: String, allowed: &'static str },
}

impl Spec {
    /// The spec most callers start from: causal (strict), BHND, remainder returned, no early exit.
    pub fn new(head_dim: u32, dtype: Dtype, pass: Pass) -> Self {
        Spec {
            head_dim,
            dtype,
            mask: Mask::Strict,
            layout: Layout::Bhnd,
            remainder: Remainder::Return,
            pass,
            early_exit_bits: None,
            deterministic: false,
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if !HEAD_DIM_RANGE.contains(&self.head_dim) {
            return Err(SpecError::HeadDim { got: self.head_dim, range: HEAD_DIM_RANGE });
        }
        if self.deterministic && self.pass != Pass::Backward {
            return Err(SpecError::DeterministicForward);
        }
        match (self.pass, self.layout) {
            (Pass::Decode, Layout::Thd) => {
                return Err(SpecError::LayoutForPass {
                    layout: self.layout,
                    pass: self.pass,
                    allowed: "a decode's cache is bhnd, bnhd or paged",
                })
            }
            (Pass::Segment | Pass::SegmentBackward, Layout::Thd | Layout::Paged) => {
                return Err(SpecError::LayoutForPass {
                    layout: self.layout,
                    pass: self.pass,
                    allowed: "a segment of a sharded sequence is bhnd or bnhd",
                })
            }
            (Pass::Forward | Pass::Backward, Layout::Paged) => {
                return Err(SpecError::LayoutForPass {
                    layout: self.layout,
                    pass: self.pass,
                    allowed: "the paged layout is a decode's KV cache; use bhnd, bnhd or thd",
                })
            }
            _ => {}
        }
        if let Some(bits) = self.early_exit_bits {
            if !EARLY_EXIT_BITS_RANGE.contains(&bits) {
                return Err(SpecError::EarlyExitBits { got: bits, range: EARLY_EXIT_BITS_RANGE });
            }
        }
        Ok(())
    }

    /// Width of the tiles the kernel computes on: `head_dim` rounded up to a multiple of 32 (the
    /// MMA takes head_dim in steps of 16, the fragment loads in pairs of them).
    pub fn tile_head_dim(&self) -> u32 {
        self.head_dim.div_ceil(32) * 32
    }

    /// The spec's part of a kernel name, e.g. `fwd_d128_bf16_strict_bhnd_ret_ee24` (a deterministic
    /// backward ends in `_det`).
    pub fn slug(&self) -> String {
        let ee = match self.early_exit_bits {
            Some(t) => format!("ee{t}"),
            None => "full".to_string(),
        };
        format!(
            "{}_d{}_{}_{}_{}_{}_{}{}",
            self.pass.short(),
            self.head_dim,
            self.dtype,
            self.mask.short(),
            self.layout,
            self.remainder.short(),
            ee,
            if self.deterministic { "_det" } else { "" }
        )
    }

    /// True when key `j` is allowed for query `i`.
    pub fn allowed(&self, i: usize, j: usize) -> bool {
        match self.mask {
            Mask::Strict => j < i,
            Mask::AttendCurrent => j <= i,
        }
    }
}

impl Dtype {
    pub const ALL: [Dtype; 2] = [Dtype::Bf16, Dtype::F16];
    /// The CUDA type name the templates use.
    pub fn cuda_type(self) -> &'static str {
        match self {
            Dtype::Bf16 => "__nv_bfloat16",
            Dtype::F16 => "__half",
        }
    }
    /// Rounds an f32 to this dtype and back: what storing a value in this dtype does to it.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dtype::Bf16 => half::bf16::from_f32(x).to_f32(),
            Dtype::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
    pub fn size_bytes(self) -> usize {
        2
    }
}

impl Mask {
    fn short(self) -> &'static str {
        match self {
            Mask::Strict => "strict",
            Mask::AttendCurrent => "cur",
        }
    }
}

impl Remainder {
    fn short(self) -> &'static str {
        match self {
            Remainder::Return => "ret",
            Remainder::Fuse => "fuse",
        }
    }
}

impl Pass {
    fn short(self) -> &'static str {
        match self {
            Pass::Forward => "fwd",
            Pass::Backward => "bwd",
            Pass::Decode => "dec",
            Pass::Segment => "seg",
            Pass::SegmentBackward => "segb",
        }
    }
}

macro_rules! text_enum {
    ($ty:ident, $field:literal, $allowed:literal, { $($variant:ident => [$($text:literal),+]),+ $(,)? }) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let name = match self { $($ty::$variant => [$($text),+][0]),+ };
                f.write_str(name)
            }
        }
        impl FromStr for $ty {
            type Err = SpecError;
            fn from_str(s: &str) -> Result<Self, SpecError> {
                match s.to_ascii_lowercase().as_str() {
                    $($($text)|+ => Ok($ty::$variant),)+
                    _ => Err(SpecError::Unknown { field: $field, got: s.to_string(), allowed: $allowed }),
                }
            }
        }
    };
}

text_enum!(Dtype, "dtype", "bf16, f16", { Bf16 => ["bf16", "bfloat16"], F16 => ["f16", "fp16", "half"] });
text_enum!(Mask, "mask", "strict, attend_current", { Strict => ["strict"], AttendCurrent => ["attend_current", "current"] });
text_enum!(Layout, "layout", "bhnd, bnhd, thd, paged", { Bhnd => ["bhnd"], Bnhd => ["bnhd"], Thd => ["thd", "varlen"], Paged => ["paged"] });
text_enum!(Remainder, "remainder", "return, fuse", { Return => ["return"], Fuse => ["fuse"] });
text_enum!(Pass, "pass", "fwd, bwd, decode, segment, segment_bwd", { Forward => ["fwd", "forward"], Backward => ["bwd", "backward"], Decode => ["decode", "dec"], Segment => ["segment", "seg"], SegmentBackward => ["segment_bwd", "segb"] });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unsupported_head_dim_naming_the_field() {
        for d in [0, 257, 512] {
            let err = Spec::new(d, Dtype::Bf16, Pass::Forward).validate().unwrap_err();
            assert_eq!(err.to_string(), format!("`head_dim` = {d} is not supported: allowed 1..=256"));
        }
        for d in [1, 16, 50, 80, 100, 256] {
            assert_eq!(Spec::new(d, Dtype::Bf16, Pass::Forward).validate(), Ok(()), "head_dim {d}");
        }
    }

    #[test]
    fn tile_head_dim_rounds_up_to_a_multiple_of_32() {
        for (d, tile) in [
            (1, 32),
            (16, 32),
            (32, 32),
            (50, 64),
            (64, 64),
            (80, 96),
            (96, 96),
            (128, 128),
            (129, 160),
            (192, 192),
            (200, 224),
            (256, 256),
        ] {
            assert_eq!(Spec::new(d, Dtype::F16, Pass::Forward).tile_head_dim(), tile, "head_dim {d}");
        }
        for &d in NATIVE_HEAD_DIMS {
            assert_eq!(Spec::new(d, Dtype::F16, Pass::Forward).tile_head_dim(), d);
        }
    }

    #[test]
    fn deterministic_is_a_backward_field() {
        let mut spec = Spec::new(64, Dtype::Bf16, Pass::Forward);
        spec.deterministic = true;
        assert_eq!(spec.validate(), Err(SpecError::DeterministicForward));
        spec.pass = Pass::Backward;
        assert_eq!(spec.validate(), Ok(()));
        assert!(spec.slug().ends_with("_full_det"), "{}", spec.slug());
        // The field is left out of JSON when false, so specs written before it read the same.
        let plain = Spec::new(64, Dtype::Bf16, Pass::Backward);
        assert!(!serde_json::to_string(&plain).unwrap().contains("deterministic"));
        let back: Spec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn the_paged_layout_is_the_decode_s_and_thd_is_not() {
        let mut spec = Spec::new(128, Dtype::Bf16, Pass::Decode);
        for layout in [Layout::Bhnd, Layout::Bnhd, Layout::Paged] {
            spec.layout = layout;
            assert_eq!(spec.validate(), Ok(()), "{layout}");
        }
        assert_eq!(spec.slug(), "dec_d128_bf16_strict_paged_ret_full");
        spec.layout = Layout::Thd;
        let err = spec.validate().unwrap_err().to_string();
        assert_eq!(err, "`layout` = `thd` does not go with `pass` = `decode`: a decode's cache is bhnd, bnhd or paged");
        for pass in [Pass::Forward, Pass::Backward] {
            let spec = Spec { layout: Layout::Paged, ..Spec::new(64, Dtype::F16, pass) };
            assert!(matches!(spec.validate(), Err(SpecError::LayoutForPass { .. })), "{pass}");
        }
        let det = Spec { deterministic: true, ..Spec::new(64, Dtype::F16, Pass::Decode) };
        assert_eq!(det.validate(), Err(SpecError::DeterministicForward));
        assert_eq!("decode".parse::<Pass>(), Ok(Pass::Decode));
        assert_eq!("paged".parse::<Layout>(), Ok(Layout::Paged));
    }

    #[test]
    fn rejects_early_exit_out_of_range() {
        let mut spec = Spec::new(64, Dtype::F16, Pass::Forward);
        spec.early_exit_bits = Some(2);
        assert!(matches!(spec.validate(), Err(SpecError::EarlyExitBits { got: 2, .. })));
        spec.early_exit_bits = Some(24);
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn parses_and_prints_enums() {
        assert_eq!("bf16".parse::<Dtype>().unwrap(), Dtype::Bf16);
        assert_eq!(Dtype::F16.to_string(), "f16");
        let err = "int7".parse::<Dtype>().unwrap_err();
        assert_eq!(err.to_string(), "`dtype` = `int7` is not a valid value: allowed bf16, f16");
        assert_eq!("bwd".parse::<Pass>().unwrap(), Pass::Backward);
        assert_eq!(Mask::AttendCurrent.to_string(), "attend_current");
    }

    #[test]
    fn slug_names_every_spec_field() {
        let mut spec = Spec::new(128, Dtype::Bf16, Pass::Backward);
        spec.mask = Mask::AttendCurrent;
        spec.layout = Layout::Bnhd;
        spec.remainder = Remainder::Fuse;
        spec.early_exit_bits = Some(24);
        assert_eq!(spec.slug(), "bwd_d128_bf16_cur_bnhd_fuse_ee24");
    }
}
