//! Peak memory of a stretch of work: on a CUDA device, the high-water mark of the device's default
//! memory pool (candle allocates through cudarc's stream-ordered allocator, which draws from it);
//! on the CPU, the process's peak resident set (`VmHWM`, reset through `/proc/self/clear_refs`).

use anyhow::Result;
use candle_core::Device;

/// Starts a new measurement.
pub fn reset_peak(dev: &Device) -> Result<()> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::reset(d),
        _ => {
            // "5" resets the peak RSS; without the file (not Linux) the figure is the process's.
            let _ = std::fs::write("/proc/self/clear_refs", "5");
            Ok(())
        }
    }
}

/// Bytes at the peak since [`reset_peak`], where it can be read.
pub fn peak(dev: &Device) -> Result<Option<u64>> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::read(d, cuda::USED_HIGH).map(Some),
        _ => Ok(proc_status_bytes("VmHWM:")),
    }
}

/// Bytes in use now (what the model and optimiser hold between steps).
pub fn current(dev: &Device) -> Result<Option<u64>> {
    match dev {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::read(d, cuda::USED_CURRENT).map(Some),
        _ => Ok(proc_status_bytes("VmRSS:")),
    }
}

fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(feature = "cuda")]
mod cuda {
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::CudaDevice;

    fn pool(d: &CudaDevice) -> Result<sys::CUmemoryPool> {
        let stream = d.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out-pointer to a pool handle.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("cuDeviceGetDefaultMemPool: {r:?}");
        }
        Ok(pool)
    }

    pub fn reset(d: &CudaDevice) -> Result<()> {
        let mut zero: u64 = 0;
        // SAFETY: the attribute takes a cuuint64_t; setting the high-water mark to 0 resets it.
        let r = unsafe {
            sys::cuMemPoolSetAttribute(
                pool(d)?,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut u64 as *mut std::ffi::c_void,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("cuMemPoolSetAttribute: {r:?}");
        }
        Ok(())
    }

    pub const USED_HIGH: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    pub const USED_CURRENT: sys::CUmemPool_attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT;

    pub fn read(d: &CudaDevice, attribute: sys::CUmemPool_attribute) -> Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: both attributes are cuuint64_t.
        let r =
            unsafe { sys::cuMemPoolGetAttribute(pool(d)?, attribute, &mut value as *mut u64 as *mut std::ffi::c_void) };
        if r != sys::CUresult::CUDA_SUCCESS {
            bail!("cuMemPoolGetAttribute: {r:?}");
        }
        Ok(value)
    }
}
