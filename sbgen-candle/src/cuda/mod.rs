//! The GPU path (feature `cuda`): sbgen's kernels launched on candle's CUDA stream.
//!
//! - [`device`]: the launcher and the kernels chosen per stream (tuning cache, else NVRTC). Public,
//!   for launching sbgen's kernels yourself on candle's stream (`examples/overhead.rs` does).
//! - `attention`: the forward and backward as candle ops, with autograd.
//! - `decode`: one new token per sequence against an [`crate::SbKvCache`].
//! - `storage`: candle's CUDA storage as device views, launcher outputs as tensors.

pub(crate) mod attention;
pub(crate) mod decode;
pub mod device;
mod storage;
