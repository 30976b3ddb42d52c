//! `#[stick_breaking_attention(...)]`: embeds sbgen's tuned stick-breaking attention kernels in the
//! user's crate, with a typed launcher.
//!
//! ```ignore
//! #[sbgen_macros::stick_breaking_attention(head_dim = 128, dtype = "bf16")]
//! pub struct SbAttn;
//!
//! SbAttn::forward(&launcher, shape, ForwardArgs { .. }, None)?;
//! SbAttn::backward(&launcher, shape, BackwardArgs { .. }, None)?;
//! ```
//!
//! Keys (all `key = literal`):
//!
//! | key | type | default | |
//! |---|---|---|---|
//! | `head_dim` | integer | required | 1..=256; the kernels compute on tiles of head_dim rounded up to a multiple of 32 (32, 64, 96, 128, 256 need no padding) |
//! | `dtype` | string | `"bf16"` | `"bf16"`, `"f16"`: the element type is `half::bf16` / `half::f16` |
//! | `mask` | string | `"strict"` | `"strict"` (j < i), `"attend_current"` (j <= i) |
//! | `layout` | string | `"bhnd"` | `"bhnd"`, `"bnhd"`, `"thd"` (alias `"varlen"`: a packed variable-length batch) |
//! | `remainder` | string | `"return"` | `"return"`, `"fuse"` |
//! | `early_exit_bits` | integer | none | 8..=60 |
//! | `deterministic` | bool | `false` | `true`: the backward's dq, dk, dv are bit-identical across runs (the forward always is) |
//! | `cache` | string | see below | tuning cache, relative to `CARGO_MANIFEST_DIR` |
//! | `seq` | integer | none | embed only the bucket holding this sequence length |
//!
//! Grouped-query attention needs no key: `shape.kv_heads` (fewer K/V heads than query heads, dividing
//! them) is a launch argument, and the same kernels run it. With `layout = "thd"`, `forward` and
//! `backward` take the packed batch's `cu_seqlens: &CudaView<i32>` and `total_tokens: usize` after
//! `args`; with a dense layout, `args.varlen` must be `None`.
//!
//! The tuning cache is, in order: the `cache` key; the file named by env `SBGEN_CACHE` (relative to
//! `CARGO_MANIFEST_DIR` unless absolute); `<CARGO_MANIFEST_DIR>/sbgen-tune.json`; the built-in
//! default ([`sbgen::DEFAULT_CACHE`]). A file named by the key or the env variable must exist. The file
//! read is a build input (re-tuning rebuilds the crate), and so is `SBGEN_CACHE`.
//!
//! Without `seq`, every bucket of the cache for the spec is embedded (forward and backward, every
//! tuned arch) and the launcher picks at run time by the device and by N: the smallest bucket that
//! holds N, else the largest. With `seq = N`, only the entry `TuningCache::lookup` picks for N per arch
//! is embedded. For an arch with no entry, the spec's default schedule is embedded as CUDA source
//! and NVRTC-compiled at first use.
//!
//! Layout: [`attr`] parses the arguments into [`attr::Options`] that remember their spans, [`valid`]
//! checks them into the forward and backward specs, [`kernels`] finds the cache and picks or lowers the kernels, [`expand`]
//! writes the code. Every error is reported at once, at its token, and the user's item is still
//! emitted so the IDE keeps working.

mod attr;
mod expand;
mod kernels;
mod valid;

use proc_macro::TokenStream;

/// See the [crate documentation](crate).
#[proc_macro_attribute]
pub fn stick_breaking_attention(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::stick_breaking_attention(args.into(), item.into()).into()
}
