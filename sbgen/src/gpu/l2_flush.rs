//! Emptying the L2 between timed decode steps (docs/performance.md#decode).
//!
//! A decode step reads far more than the L2 holds only at long contexts; at 8 x 8192 tokens the K/V
//! cache is 268 MB against the H200's 50 MB of L2, so what the L2 holds when a step starts shows in
//! its time. Two ways to empty it, both outside the timed part:
//!
//! - [`FlushMode::Write`] zeroes a 256 MiB scratch buffer, as `triton.testing.do_bench` (and so the
//!   baselines) does. The L2 is then full of *dirty* lines: the step's first 50 MB of reads each
//!   evict one, and the write-back of the scratch (about 11 us of HBM time on the H200) lands inside
//!   the timed step.
//! - [`FlushMode::Read`] reads a 256 MiB scratch buffer with a small sweep kernel: the L2 then holds
//!   only clean lines of the scratch, none of the step's keys, and nothing to write back, so the step
//!   is timed with the memory to itself (what Nsight Compute's cache control gives a kernel).

use super::device::{Device, GpuError};
use cudarc::driver::{CudaFunction, CudaSlice, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use std::fmt;
use std::str::FromStr;

/// Scratch bytes, five times the H200's L2.
pub const FLUSH_BYTES: usize = 256 << 20;

/// How the L2 is emptied between timed steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushMode {
    /// Read a scratch buffer: L2 left clean.
    #[default]
    Read,
    /// Write a scratch buffer (as `do_bench`): L2 left dirty.
    Write,
}

impl fmt::Display for FlushMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FlushMode::Read => "read",
            FlushMode::Write => "write",
        })
    }
}

impl FromStr for FlushMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(FlushMode::Read),
            "write" => Ok(FlushMode::Write),
            other => Err(format!("--flush must be read or write, not {other:?}")),
        }
    }
}

/// The read sweep: every thread XORs 16-byte words of the buffer, grid-strided; the sum is stored
/// only if it equals a constant no sum of zeros can equal, so the loads stay (and nothing is written).
const SWEEP_PTX: &str = r#"
.version 7.0
.target sm_80
.address_size 64
.visible .entry sbgen_l2_read_sweep(.param .u64 buf, .param .u64 words, .param .u64 sink)
{
    .reg .pred %p<3>;
    .reg .b32 %r<12>;
    .reg .b64 %rd<12>;
    ld.param.u64 %rd1, [buf];
    ld.param.u64 %rd2, [words];
    ld.param.u64 %rd3, [sink];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd3, %rd3;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %nctaid.x;
    mul.wide.u32 %rd4, %r1, %r2;
    cvt.u64.u32 %rd5, %r3;
    add.u64 %rd4, %rd4, %rd5;
    mul.wide.u32 %rd6, %r4, %r2;
    mov.u32 %r5, 0;
    setp.ge.u64 %p1, %rd4, %rd2;
    @%p1 bra DONE;
LOOP:
    shl.b64 %rd7, %rd4, 4;
    add.u64 %rd8, %rd1, %rd7;
    ld.global.cg.v4.u32 {%r6, %r7, %r8, %r9}, [%rd8];
    xor.b32 %r5, %r5, %r6;
    xor.b32 %r5, %r5, %r7;
    xor.b32 %r5, %r5, %r8;
    xor.b32 %r5, %r5, %r9;
    add.u64 %rd4, %rd4, %rd6;
    setp.lt.u64 %p1, %rd4, %rd2;
    @%p1 bra LOOP;
DONE:
    setp.eq.u32 %p2, %r5, 1;
    @!%p2 bra END;
    st.global.u32 [%rd3], %r5;
END:
    ret;
}
"#;

/// A scratch buffer and the way to empty the L2 with it.
pub struct L2Flush {
    mode: FlushMode,
    scratch: CudaSlice<u8>,
    sink: CudaSlice<u32>,
    sweep: CudaFunction,
    sm_count: u32,
}

impl L2Flush {
    pub fn new(dev: &Device, mode: FlushMode) -> Result<L2Flush, GpuError> {
        let scratch = dev.stream.alloc_zeros::<u8>(FLUSH_BYTES)?;
        let sink = dev.stream.alloc_zeros::<u32>(1)?;
        let module = dev.ctx.load_module(Ptx::from_src(SWEEP_PTX))?;
        let sweep = module.load_function("sbgen_l2_read_sweep")?;
        use cudarc::driver::sys::CUdevice_attribute as A;
        let sm_count = dev.ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as u32;
        Ok(L2Flush { mode, scratch, sink, sweep, sm_count })
    }

    pub fn mode(&self) -> FlushMode {
        self.mode
    }

    /// Enqueues the flush on the device's stream (capturable into a graph).
    pub fn enqueue(&mut self, dev: &Device) -> Result<(), GpuError> {
        match self.mode {
            FlushMode::Write => dev.stream.memset_zeros(&mut self.scratch)?,
            FlushMode::Read => {
                let words = (FLUSH_BYTES / 16) as u64;
                // Eight CTAs of 512 threads per SM keep enough loads in flight to sweep at full rate.
                let cfg =
                    LaunchConfig { grid_dim: (self.sm_count * 8, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
                let mut launch = dev.stream.launch_builder(&self.sweep);
                launch.arg(&self.scratch).arg(&words).arg(&mut self.sink);
                // SAFETY: the arguments match the entry's (pointer, u64, pointer); the sweep reads
                // `words` 16-byte words of `scratch`, its whole length, and writes at most `sink[0]`.
                unsafe { launch.launch(cfg) }?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flush_mode_parses_its_two_names_and_refuses_others() {
        assert_eq!("read".parse::<FlushMode>(), Ok(FlushMode::Read));
        assert_eq!("write".parse::<FlushMode>(), Ok(FlushMode::Write));
        assert_eq!(FlushMode::default(), FlushMode::Read);
        for mode in [FlushMode::Read, FlushMode::Write] {
            assert_eq!(mode.to_string().parse::<FlushMode>(), Ok(mode));
        }
        let err = "clean".parse::<FlushMode>().unwrap_err();
        assert!(err.contains("read or write") && err.contains("clean"), "{err}");
    }
}
