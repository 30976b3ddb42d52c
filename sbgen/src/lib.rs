//! sbgen: a compiler for stick-breaking attention kernels.
//!
//! The pipeline: [`ir`] (a validated `Kernel { spec, schedule, arch }`) -> [`lower`] (tera templates
//! to CUDA C++ plus a launch manifest) -> compilation and tuning.

pub mod cache;
pub mod cli;
pub mod compile;
pub mod gpu;
pub mod interp;
pub mod ir;
pub mod lower;
pub mod search_space;
pub mod tune;
