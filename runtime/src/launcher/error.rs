//! Why a launch was refused or failed. Every refusal happens before anything is launched and names
//! the argument at fault and what was allowed.

use super::nvrtc::NvrtcError;
use crate::spec::{Dtype, Pass};
use cudarc::driver::DriverError;

/// An error from the launcher. Input refusals come first (nothing was launched); the CUDA variants
/// carry the kernel name as context.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// A forward kernel given to `backward`, or the other way round.
    #[error("kernel `{kernel}` is a {got:?} kernel; this call needs a {expected:?} kernel")]
    WrongPass { kernel: String, expected: Pass, got: Pass },

    /// The tensors' element type is not the one the kernel was built for.
    #[error("kernel `{kernel}` was built for dtype `{expected}`; the tensors are `{got}`")]
    Dtype { kernel: String, expected: Dtype, got: Dtype },

    /// `shape.head_dim` differs from the kernel's.
    #[error("`head_dim` = {got} does not match kernel `{kernel}`: allowed {expected}")]
    HeadDim { kernel: String, expected: usize, got: usize },

    /// A dimension of the shape is zero.
    #[error("`{dim}` = 0: every dimension must be at least 1")]
    EmptyDim { dim: &'static str },

    /// `kv_heads` does not divide `heads`.
    #[error("`kv_heads` = {kv_heads} does not divide `heads` = {heads}: each K/V head serves the same number of query heads")]
    KvHeads { heads: usize, kv_heads: usize },

    /// `cu_seqlens` given to a kernel of a dense layout, or missing for a THD kernel.
    #[error("kernel `{kernel}`: {reason}")]
    Varlen { kernel: String, reason: String },

    /// A dimension, an element count or a grid is larger than the kernels can index.
    #[error("`{what}` = {got} is too large: allowed at most {max}")]
    TooLarge { what: &'static str, got: u128, max: u128 },

    /// A device slice holds fewer elements than the shape needs.
    #[error("tensor `{tensor}` is too short for the shape: needs {needed} elements, got {got}")]
    TooShort { tensor: &'static str, needed: usize, got: usize },

    /// A device slice belongs to another CUDA context than the launcher's stream.
    #[error("tensor `{tensor}` lives on another CUDA context (device {got}) than the launcher's (device {expected})")]
    WrongContext { tensor: &'static str, expected: usize, got: usize },

    /// A tensor view does not start on the alignment the kernels' vector loads and stores need.
    #[error(
        "tensor `{tensor}` starts at device address {address:#x}, not a multiple of {required} bytes: the \
         kernels move {required} bytes at a time; pass a view whose element offset is a multiple of {} elements",
        .required / (*.element_bytes).max(1)
    )]
    Misaligned { tensor: &'static str, address: u64, required: u64, element_bytes: u64 },

    /// The TMA loads' tensor map of K or V cannot be made for these tensors (docs/performance.md#tma).
    #[error("kernel `{kernel}`: {reason}")]
    TensorMap { kernel: String, reason: String },

    /// A KV cache that does not match the decode kernel (its layout, page size or block table).
    #[error("kernel `{kernel}`: {reason}")]
    KvCache { kernel: String, reason: String },

    /// A decode split asked for that the kernel cannot run.
    #[error("decode split: `{what}` = {got} is not allowed: {allowed}")]
    Split { what: &'static str, got: usize, allowed: String },

    /// A segment launch's geometry or arguments are inconsistent.
    #[error("segment: `{what}` = {got} is not allowed: {allowed}")]
    Segment { what: &'static str, got: usize, allowed: String },

    /// `scale` is NaN, infinite or zero.
    #[error("`scale` = {got} is not allowed: it must be finite and non-zero")]
    Scale { got: f32 },

    /// The manifest does not describe a kernel this launcher knows how to run.
    #[error("kernel `{kernel}` has a malformed manifest: {reason}")]
    Manifest { kernel: String, reason: String },

    /// The device has no PTX for its architecture and the binary carries no CUDA source to compile.
    #[error(
        "kernel `{kernel}` has no PTX for this device ({device_arch}) and no CUDA source to compile: \
         PTX is available for [{available}]; re-tune or rebuild with `{device_arch}` in the target list"
    )]
    NoKernelForArch { kernel: String, device_arch: String, available: String },

    /// NVRTC failed to compile the fallback CUDA source (or could not be loaded).
    #[error(transparent)]
    Nvrtc(#[from] NvrtcError),

    /// A launch step asks for more dynamic shared memory or threads than the device allows.
    #[error("kernel `{kernel}` step `{function}` needs {needed} {what}, over the device limit of {limit}")]
    DeviceLimit { kernel: String, function: String, what: &'static str, needed: u64, limit: u64 },

    /// The f32 workspace of the backward or the decode could not be allocated.
    #[error("kernel `{kernel}`: could not allocate the {bytes}-byte workspace: {source}")]
    Workspace {
        kernel: String,
        bytes: usize,
        #[source]
        source: DriverError,
    },

    /// A CUDA driver call for a given kernel failed.
    #[error("kernel `{kernel}`: {op} failed: {source}")]
    Kernel {
        kernel: String,
        op: &'static str,
        #[source]
        source: DriverError,
    },

    /// A CUDA driver call outside any one kernel failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
}

impl LaunchError {
    /// True for refusals of the caller's input (nothing was launched, nothing on the device is wrong).
    pub fn is_input_error(&self) -> bool {
        matches!(
            self,
            LaunchError::WrongPass { .. }
                | LaunchError::Dtype { .. }
                | LaunchError::HeadDim { .. }
                | LaunchError::EmptyDim { .. }
                | LaunchError::KvHeads { .. }
                | LaunchError::Varlen { .. }
                | LaunchError::TooLarge { .. }
                | LaunchError::TooShort { .. }
                | LaunchError::WrongContext { .. }
                | LaunchError::Misaligned { .. }
                | LaunchError::Scale { .. }
                | LaunchError::KvCache { .. }
                | LaunchError::Split { .. }
        )
    }
}

/// Adds the kernel name to a driver error.
pub(crate) trait KernelContext<T> {
    fn kernel_ctx(self, kernel: &str, op: &'static str) -> Result<T, LaunchError>;
}

impl<T> KernelContext<T> for Result<T, DriverError> {
    fn kernel_ctx(self, kernel: &str, op: &'static str) -> Result<T, LaunchError> {
        self.map_err(|source| LaunchError::Kernel { kernel: kernel.to_string(), op, source })
    }
}
