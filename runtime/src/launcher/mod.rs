//! The GPU launcher (feature `cuda`): loads sbgen kernels through cudarc and launches them after
//! checking every input.
//!
//! - [`error`]: [`LaunchError`], one variant per refusal, each naming the argument and what is allowed.
//! - [`plan`]: the input checks as pure functions over (manifest, shape, slice lengths), so they are
//!   tested without a GPU.
//! - [`binary`]: [`KernelBinary`] (manifest + PTX per arch + optional CUDA source) and the rule that
//!   picks the PTX for a device.
//! - [`embedded`]: kernels embedded by `#[stick_breaking_attention]` and how one is picked per
//!   device and sequence length.
//! - [`nvrtc`]: [`nvrtc::compile_ptx`], CUDA source to PTX with the one NVRTC option list (sbgen's
//!   compilations and the module store's fallback both use it).
//! - [`modules`]: [`ModuleStore`], which loads each module once per context and caches its functions.
//! - [`launch`]: [`Launcher::forward`] and [`Launcher::backward`].
//! - [`decode_plan`]: the decode's input checks and split-K plan; [`decode`]: [`Launcher::decode`].
//! - [`tensor_map`]: the TMA loads' tensor maps of K and V (sm_90a).
//! - [`segment`]: context parallelism's segment walk and its finishing step; [`segment_bwd`]: its
//!   backward.
//!
//! This crate does not pick cudarc's CUDA version or linking mode: the final binary does, e.g.
//! `cudarc = { version = "0.19", features = ["cuda-13000", "dynamic-loading"] }`.

pub mod binary;
pub mod decode;
pub mod decode_plan;
pub mod element;
pub mod embedded;
pub mod error;
pub mod launch;
pub mod modules;
pub mod nvrtc;
pub mod plan;
pub mod segment;
pub mod segment_bwd;
pub mod tensor_map;

pub use crate::kv_cache::KvCacheGeometry;
pub use crate::reference::DecodeShape;
pub use crate::reference::Shape;
pub use binary::{pick_ptx, KernelBinary, Target};
pub use decode::DecodeArgs;
pub use decode_plan::{
    plan_decode, DecodeLens, DecodePlan, DecodeSplit, DeviceLimits, MAX_CHUNKS as MAX_DECODE_CHUNKS, PAGE_RUN,
};
pub use element::SbElement;
pub use embedded::{pick_embedded, EmbeddedKernel, EmbeddedSet};
pub use error::LaunchError;
pub use launch::{BackwardArgs, ForwardArgs, Launcher, Varlen};
pub use modules::{CodeOrigin, LoadedKernel, ModuleStore};
pub use nvrtc::{NvrtcError, NvrtcOptions};
pub use plan::{plan_backward, plan_forward, BackwardLens, ForwardLens, LaunchPlan, PlannedStep};
pub use segment::{plan_segment, SegmentFinishArgs, SegmentLens, SegmentPlan, SegmentShape, SegmentWalkArgs};
pub use segment_bwd::{
    plan_segment_backward, plan_segment_backward_finish, LocalShape, SegmentBwdFinishArgs, SegmentBwdFinishLens,
    SegmentBwdLens, SegmentBwdWalkArgs,
};
