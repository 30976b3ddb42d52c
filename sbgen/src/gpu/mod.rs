//! Running sbgen's kernels on a GPU: the library half of `sbgen check`, `sbgen run` and `sbgen bench`.
//!
//! - [`device`]: finding a CUDA device ("no CUDA device found" when there is none) and its launcher.
//! - [`kernels`]: [`KernelBuilder`], lowering + PTX for the device's arch, from a folder of prebuilt PTX
//!   (`SBGEN_PTX_DIR`, for machines without a CUDA toolchain) or compiled with NVRTC.
//! - [`data`]: the data regimes (docs/checking.md#data-regimes), dtype rounding, layouts, poisoning
//!   and error metrics.
//! - [`oracle`]: the float64 reference run in parallel over heads.
//! - [`check`]: every supported spec against the reference; [`failure`]: why a row failed, typed;
//!   [`run`]: one kernel on safetensors tensors; [`bench`]: timings with CUDA events; [`ring_bench`]:
//!   one sequence over several GPUs (`bench --gpus`) against one GPU.
//! - [`decode`]: KV caches on the device and the decode reference; [`decode_check`]: `check --pass decode`.

pub mod bench;
pub mod check;
pub mod data;
pub mod decode;
pub mod decode_bench;
pub mod decode_check;
pub mod device;
pub mod exec;
pub mod failure;
pub mod kernels;
pub mod l2_flush;
pub mod oracle;
pub mod ring_bench;
pub mod run;
pub mod run_decode;

pub use device::{Device, GpuError};
pub use kernels::KernelBuilder;
