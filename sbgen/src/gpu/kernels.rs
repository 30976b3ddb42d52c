//! Kernels for the device: lowering plus PTX, taken from a folder of prebuilt PTX when one is given
//! (the GPU machine has no CUDA toolchain: PTX is compiled where the toolchain is and carried over),
//! otherwise compiled with NVRTC through [`crate::compile`].
//!
//! PTX files are named and found by [`crate::artifact::name`] only.

use crate::artifact::name::{ptx_file_name, read_ptx};
use crate::compile::{CompileError, Compiler};
use crate::files::FileError;
use crate::ir::{Arch, Kernel, Schedule, Spec};
use crate::lower::{lower, LowerError};
use sbgen_runtime::launcher::KernelBinary;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Why a kernel could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("no PTX for `{kernel}` in `{dir}` (expected `{file}`) and no CUDA toolchain to compile it: {toolchain}")]
    NoPtx { kernel: String, dir: String, file: String, toolchain: String },
    /// A PTX file in the folder that exists but cannot be read.
    #[error(transparent)]
    File(#[from] FileError),
}

/// Builds (and caches) kernels for one arch.
pub struct KernelBuilder {
    arch: Arch,
    ptx_dir: Option<PathBuf>,
    compiler: OnceLock<Result<Compiler, String>>,
    cache: Mutex<HashMap<Kernel, Arc<KernelBinary>>>,
}

impl KernelBuilder {
    pub fn new(arch: Arch, ptx_dir: Option<PathBuf>) -> Self {
        KernelBuilder { arch, ptx_dir, compiler: OnceLock::new(), cache: Mutex::new(HashMap::new()) }
    }

    /// `ptx_dir`, else `SBGEN_PTX_DIR` when set.
    pub fn from_env(arch: Arch, ptx_dir: Option<PathBuf>) -> Self {
        let dir = ptx_dir.or_else(|| std::env::var_os("SBGEN_PTX_DIR").filter(|v| !v.is_empty()).map(PathBuf::from));
        KernelBuilder::new(arch, dir)
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn ptx_dir(&self) -> Option<&Path> {
        self.ptx_dir.as_deref()
    }

    /// The kernel for `spec` on this builder's arch, with `schedule` or, when `None`, the spec's
    /// default on this arch ([`Schedule::default_on`]).
    pub fn kernel(&self, spec: Spec, schedule: Option<Schedule>) -> Kernel {
        Kernel::new(spec, schedule.unwrap_or_else(|| Schedule::default_on(&spec, self.arch)), self.arch)
    }

    /// Lowers and compiles (or finds the PTX of) `kernel`.
    pub fn build(&self, kernel: &Kernel) -> Result<Arc<KernelBinary>, BuildError> {
        if let Some(b) = self.cache.lock().unwrap().get(kernel) {
            return Ok(b.clone());
        }
        let lowered = lower(kernel)?;
        let target = kernel.arch.compile_target();
        let from_dir = match &self.ptx_dir {
            Some(dir) => read_ptx(dir, &lowered)?,
            None => None,
        };
        let ptx = match from_dir {
            Some((_, ptx)) => ptx,
            None => match self.compiler() {
                Ok(c) => c.to_ptx(&lowered)?,
                Err(toolchain) => {
                    return Err(BuildError::NoPtx {
                        kernel: lowered.name.clone(),
                        dir: self.ptx_dir.as_ref().map_or("(no PTX folder given)".into(), |d| d.display().to_string()),
                        file: ptx_file_name(&lowered),
                        toolchain: toolchain.clone(),
                    })
                }
            },
        };
        let binary =
            Arc::new(KernelBinary::new(lowered.manifest, vec![(target.to_string(), ptx)], Some(lowered.cuda_source)));
        self.cache.lock().unwrap().insert(*kernel, binary.clone());
        Ok(binary)
    }

    fn compiler(&self) -> Result<&Compiler, &String> {
        self.compiler.get_or_init(|| Compiler::discover().map_err(|e| e.to_string())).as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dtype, Pass};

    #[test]
    fn a_missing_ptx_without_toolchain_names_the_file() {
        // A folder with no PTX; whether a toolchain exists here decides the outcome, so only the
        // error's wording is checked when it fails.
        let kernel = Kernel::new(Spec::new(64, Dtype::Bf16, Pass::Forward), Schedule::DEFAULT, Arch::Sm90);
        let builder = KernelBuilder::new(Arch::Sm90, Some(std::env::temp_dir().join("sbgen-no-ptx-here")));
        if let Err(BuildError::NoPtx { file, .. }) = builder.build(&kernel) {
            assert!(file.ends_with(".sm_90a.ptx"));
        }
    }
}
