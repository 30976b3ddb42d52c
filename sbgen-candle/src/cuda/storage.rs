//! candle's CUDA storage as the launcher's device views, and the launcher's outputs as candle
//! tensors: the conversions the GPU ops share.

use crate::error::SbCandleError;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Layout, Result, Storage, StorageRef, Tensor};

/// The refusal of a tensor that is not on a CUDA device.
pub fn not_cuda(what: &'static str) -> candle_core::Error {
    SbCandleError::Device { device: "the CPU".into(), reason: what }.into()
}

/// A contiguous device view of one tensor's storage.
pub fn view<'a, T: CudaDType>(name: &'static str, s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| SbCandleError::Shape {
        tensor: name,
        got: l.dims().to_vec(),
        expected: "a contiguous tensor (the wrapper makes it one)".into(),
    })?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// The CUDA storage behind a `Tensor::storage_and_layout` guard.
pub fn cuda_parts<'a>(
    what: &'static str,
    guard: &'a (StorageRef<'a>, &'a Layout),
) -> Result<(&'a CudaStorage, &'a Layout)> {
    match &*guard.0 {
        Storage::Cuda(s) => Ok((s, guard.1)),
        _ => Err(not_cuda(what)),
    }
}

/// Device memory for a kernel output that the kernel writes in full (sbgen's checks poison outputs
/// to prove it), so it is not zeroed first.
pub fn output<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the launch that follows before anything reads it.
    unsafe { dev.cuda_stream().alloc::<T>(len.max(1)) }.map_err(candle_core::Error::wrap)
}

/// A launcher output as a candle tensor of `dims` (contiguous, outside the graph).
pub fn tensor<T: CudaDType>(x: CudaSlice<T>, dev: &CudaDevice, dims: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(x, dev.clone())),
        dims.to_vec(),
        BackpropOp::none(),
        false,
    )
}
