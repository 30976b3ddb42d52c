//! What a tuning run is asked to do ([`TunePlan`]), why it can stop ([`TuneError`]), and the
//! [`Session`] every phase works in.

use super::budget::Budget;
use crate::artifact::store::{PtxDir, StoreError};
use crate::compile::Compiler;
use crate::gpu::device::{Device, GpuError};
use crate::gpu::kernels::KernelBuilder;
use crate::ir::{Arch, Pass, Spec};
use std::path::PathBuf;
use std::time::Duration;

/// Sequence lengths tuned when none are given.
pub const DEFAULT_SEQS: &[usize] = &[2048, 8192];
/// The longest sequence `--seq` accepts: there the timed problem (1 x 2 x 131072) is already 8x the
/// work of the N = 16384 one, and every candidate is timed 20 times.
pub const MAX_SEQ: usize = 1 << 17;
/// Wall-time budget of a run when none is given, in seconds: the default specs (head_dim 64 and
/// 128, bf16 and f16, forward and backward) took 118 s in all on the H200 (2026-11-29; one
/// (head_dim, dtype) pair 33-49 s), so they are all tuned in full with room to spare.
pub const DEFAULT_BUDGET_S: f64 = 180.0;

/// The forward spec that a backward `spec` runs on: the same spec but the pass, and not
/// deterministic (a backward-only field; the forward always is).
pub fn forward_of(spec: Spec) -> Spec {
    Spec { pass: Pass::Forward, deterministic: false, ..spec }
}

/// What to tune.
#[derive(Clone, Debug)]
pub struct TunePlan {
    pub arch: Arch,
    pub specs: Vec<Spec>,
    /// Sequence lengths to time; each becomes a cache bucket ([`crate::cache::seq_bucket`]).
    pub seqs: Vec<usize>,
    /// Wall-time bound on checking and timing (`None`: unbounded).
    pub budget: Option<Duration>,
    /// Parallel compilations (when compiling here).
    pub jobs: usize,
    /// Timed repetitions (median), warm-up launches, input sets rotated through.
    pub reps: usize,
    pub warmup: usize,
    pub sets: usize,
    pub seed: u64,
    /// Folder of prebuilt PTX; `None`: compile with the local toolchain.
    pub ptx_dir: Option<PathBuf>,
}

impl TunePlan {
    pub fn new(arch: Arch, specs: Vec<Spec>) -> Self {
        TunePlan {
            arch,
            specs,
            seqs: DEFAULT_SEQS.to_vec(),
            budget: Some(Duration::from_secs_f64(DEFAULT_BUDGET_S)),
            jobs: crate::pool::default_threads(),
            reps: 20,
            warmup: 3,
            sets: 3,
            seed: 0x5b5b_0001,
            ptx_dir: None,
        }
    }
}

/// Why tuning stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TuneError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("`--gpu {requested}` does not match the device: {device} runs {found} kernels (use `--gpu {found}`)")]
    ArchMismatch { requested: Arch, found: Arch, device: String },
    #[error(
        "no CUDA toolchain to compile the variants ({toolchain}) and no PTX folder: build one where the \
         toolchain is with `sbgen tune --gpu {arch} --compile-only --emit-ptx DIR` and pass `--ptx-dir DIR` \
         (or set SBGEN_PTX_DIR)"
    )]
    NoKernels { arch: Arch, toolchain: String },
    /// A kernel the run needs (not a candidate) could not be built.
    #[error("{what}: {message}")]
    Kernel { what: &'static str, message: String },
    /// The scratch folder the variants are compiled into could not be created.
    #[error(transparent)]
    Scratch(#[from] StoreError),
}

impl From<cudarc::driver::DriverError> for TuneError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        TuneError::Gpu(GpuError::Driver(e))
    }
}

/// Where a run reports as it goes (the CLI: on stderr, under a progress bar on a terminal). A
/// closure taking each line is one.
pub trait Reporter {
    /// A line of the run's log.
    fn say(&mut self, line: &str);
    /// `done` of the run's planned steps ([`super::planned_steps`]) are done; never decreases.
    fn reached(&mut self, _done: usize) {}
}

impl<F: FnMut(&str)> Reporter for F {
    fn say(&mut self, line: &str) {
        self(line)
    }
}

/// What every phase of one run shares: the device, the plan, where kernels come from, the budget
/// and the progress sink (the CLI prints its lines on stderr).
pub struct Session<'a> {
    pub dev: &'a Device,
    pub plan: &'a TunePlan,
    /// Finds each kernel's PTX in the folder below (prebuilt, or compiled into it by this run).
    pub builder: KernelBuilder,
    /// The local compiler and the scratch folder it writes to; `None` with a prebuilt PTX folder.
    pub compile: Option<(Compiler, PtxDir)>,
    pub budget: Budget,
    /// The driver's CUDA version, recorded in each cache entry.
    pub driver: String,
    pub progress: &'a mut dyn Reporter,
    /// Planned steps done so far (a check, or a timing at one sequence length, of one candidate).
    pub done: usize,
}

impl Session<'_> {
    pub fn say(&mut self, line: &str) {
        self.progress.say(line);
    }

    /// One more planned step is done.
    pub fn step(&mut self) {
        self.done += 1;
        self.progress.reached(self.done);
    }

    /// The steps up to `done` are over (done, or skipped: a candidate that failed to compile is
    /// neither checked nor timed).
    pub fn reach(&mut self, done: usize) {
        if done > self.done {
            self.done = done;
            self.progress.reached(done);
        }
    }
}
