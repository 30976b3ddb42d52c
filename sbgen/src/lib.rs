//! sbgen: a compiler for stick-breaking attention kernels.
//!
//! The pipeline: [`ir`] (a validated `Kernel { spec, schedule, arch }`) -> [`lower`] (tera templates
//! to CUDA C++ plus a launch manifest) -> compilation and tuning.
//!
//! Feature `cli` (default): [`compile`] (NVRTC), [`gpu`] and [`cli`], which need cudarc, clap and
//! safetensors. With `default-features = false` (as `sbgen-macros` builds it) the library is the IR,
//! lowering, search space, interpreter and tuning cache only.

pub mod artifact;
pub mod cache;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod compile;
#[cfg(feature = "cli")]
pub mod gpu;
pub mod interp;
pub mod ir;
pub mod lower;
pub mod search_space;
#[cfg(feature = "cli")]
pub mod tune;

/// The built-in tuning cache (`sbgen/default-cache.json`), used by `#[stick_breaking_attention]`
/// when the user's crate has none: tuned on an H200 (sm_90) for head_dim 64 and 128, bf16 and f16,
/// forward and backward, strict mask, no early exit, in two variants: BHND with the remainder
/// returned, and BNHD with the remainder fused; buckets 2048 and 8192. Other specs and arches fall
/// back to their default schedule, embedded as CUDA source and NVRTC-compiled at first use.
pub const DEFAULT_CACHE: &str = include_str!("../default-cache.json");
