//! The GPU a command runs on: its context, one stream, a launcher, and what it is.

use crate::ir::Arch;
use cudarc::driver::{CudaContext, CudaStream, DriverError};
use sbgen_runtime::launcher::{LaunchError, Launcher};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What can go wrong while running kernels on the device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// No driver library, no device, or a device we have no kernels for.
    #[error("no CUDA device found: {0}")]
    NoDevice(String),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    /// A problem the harness cannot put on the device (e.g. sequences of different lengths in a
    /// dense layout).
    #[error("{0}")]
    Input(String),
    /// A kernel did not finish in time; the process should exit (the context is unusable).
    #[error("kernel `{kernel}` did not finish within {seconds} s (hung?)")]
    Hung { kernel: String, seconds: u64 },
    /// A kernel failed in a way that leaves the CUDA context unusable (illegal address, ...).
    #[error("kernel `{kernel}` broke the CUDA context: {source} (no later kernel can run in this process)")]
    ContextLost {
        kernel: String,
        #[source]
        source: DriverError,
    },
}

/// An opened device.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub launcher: Launcher,
    pub name: String,
    pub compute_capability: (u32, u32),
    /// The arch whose kernels run best here.
    pub arch: Arch,
}

impl Device {
    /// Opens device `ordinal`, or says plainly why there is none.
    pub fn open(ordinal: usize) -> Result<Device, GpuError> {
        // SAFETY: only probes whether the driver library can be loaded (cudarc panics on first use
        // of a missing library otherwise).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDevice("the CUDA driver library (libcuda.so) is not installed".into()));
        }
        let count = CudaContext::device_count().map_err(|e| GpuError::NoDevice(format!("cuInit failed: {e}")))?;
        if count <= 0 {
            return Err(GpuError::NoDevice("the driver reports 0 devices".into()));
        }
        if ordinal >= count as usize {
            return Err(GpuError::NoDevice(format!("device {ordinal} requested, {count} present")));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let cc = (major as u32, minor as u32);
        let arch = Arch::for_device(cc.0, cc.1).ok_or_else(|| {
            GpuError::NoDevice(format!("compute capability {}.{} is not supported (sm_80 or newer needed)", cc.0, cc.1))
        })?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        // SAFETY: sbgen's tools do all their work on the one stream below, in order, so cudarc's
        // cross-stream event tracking is not needed; without it no event is recorded or waited on
        // per tensor use (host time per launch, and waits a CUDA graph capture would refuse).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let launcher = Launcher::new(stream.clone())?;
        Ok(Device { ctx, stream, launcher, name, compute_capability: cc, arch })
    }

    /// A one-line description: name, compute capability, arch, driver version.
    pub fn describe(&self) -> String {
        let driver = driver_version().map(|v| format!(", driver CUDA {}.{}", v / 1000, (v % 1000) / 10));
        format!(
            "{} (compute capability {}.{}, kernels for {}{})",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.arch.compile_target(),
            driver.unwrap_or_default()
        )
    }

    /// Waits for the stream, at most `timeout`. Errors that leave the context unusable become
    /// [`GpuError::ContextLost`] naming `kernel`.
    pub fn sync(&self, kernel: &str, timeout: Duration) -> Result<(), GpuError> {
        let event = self.ctx.new_event(None)?;
        event.record(&self.stream).map_err(|e| classify(kernel, e))?;
        let start = Instant::now();
        let mut nap = Duration::from_micros(50);
        loop {
            match event.try_is_complete() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return Err(classify(kernel, e)),
            }
            if start.elapsed() > timeout {
                return Err(GpuError::Hung { kernel: kernel.to_string(), seconds: timeout.as_secs() });
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(20));
        }
        self.stream.synchronize().map_err(|e| classify(kernel, e))
    }
}

/// Maps a driver error after a launch: sticky errors mean the context is gone.
pub fn classify(kernel: &str, e: DriverError) -> GpuError {
    use cudarc::driver::sys::CUresult::*;
    match e.0 {
        CUDA_ERROR_ILLEGAL_ADDRESS
        | CUDA_ERROR_LAUNCH_FAILED
        | CUDA_ERROR_MISALIGNED_ADDRESS
        | CUDA_ERROR_ILLEGAL_INSTRUCTION
        | CUDA_ERROR_HARDWARE_STACK_ERROR
        | CUDA_ERROR_INVALID_PC
        | CUDA_ERROR_ASSERT
        | CUDA_ERROR_LAUNCH_TIMEOUT => GpuError::ContextLost { kernel: kernel.to_string(), source: e },
        _ => GpuError::Driver(e),
    }
}

/// True when a launch error means the context is unusable.
pub fn is_context_lost(e: &LaunchError) -> Option<DriverError> {
    match e {
        LaunchError::Kernel { source, .. } | LaunchError::Driver(source) => match classify("", *source) {
            GpuError::ContextLost { source, .. } => Some(source),
            _ => None,
        },
        _ => None,
    }
}

/// The driver's CUDA version as `cuDriverGetVersion` reports it (13000 = CUDA 13.0), once a device is open.
pub fn driver_version() -> Option<i32> {
    let mut v = 0i32;
    // SAFETY: cuDriverGetVersion writes one int; the library is loaded (Device::open checked).
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(v)
}
