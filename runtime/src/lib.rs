//! Runtime support for sbgen's stick-breaking attention kernels.
//!
//! - [`spec`]: what a kernel computes (head_dim, dtype, mask, layout, ...), shared by the compiler,
//!   the macro and the launcher.
//! - [`manifest`]: how a compiled kernel is launched (entry points, grids, shared memory).
//! - [`reference`]: the float64 CPU reference (forward and backward), the ground truth for every test.
//! - `launcher` (feature `cuda`): loads PTX through cudarc, checks inputs and launches.

#[cfg(feature = "cuda")]
pub mod launcher;
pub mod manifest;
pub mod reference;
pub mod spec;

pub use manifest::{GridRule, KernelManifest, LaunchStep};
pub use spec::{Dtype, Layout, Mask, Pass, Remainder, Spec, SpecError};
