//! NVRTC, the one way CUDA source becomes PTX: `sbgen` compiles every kernel it tunes or ships through
//! [`compile_ptx`], and so does the module store's fallback for a device no embedded PTX fits. One
//! option list ([`options`]) for both, so a kernel the tuner accepted compiles the same way on a
//! user's machine (docs/architecture.md#runtime).

use cudarc::nvrtc::CompileOptions;

/// What NVRTC is given besides the target: where the CUDA headers are, plus any extra options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NvrtcOptions {
    /// Folders with the CUDA headers (`cuda_bf16.h`, ...), passed as `--include-path`.
    pub include_paths: Vec<String>,
    /// More options, passed after the fixed ones as they are (e.g. `-lineinfo`). Empty for sbgen's
    /// own compilations and by default.
    pub extra: Vec<String>,
}

impl NvrtcOptions {
    /// Include paths from `SBGEN_CUDA_INCLUDE` (`:`-separated), then `include/` under
    /// `SBGEN_CUDA_HOME` (what `scripts/env.sh` sets), `CUDA_HOME`, `CUDA_PATH` and `/usr/local/cuda`,
    /// those that exist.
    pub fn from_env() -> Self {
        let mut include_paths = Vec::new();
        if let Ok(list) = std::env::var("SBGEN_CUDA_INCLUDE") {
            include_paths.extend(list.split(':').filter(|s| !s.is_empty()).map(str::to_string));
        }
        for var in ["SBGEN_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"] {
            if let Ok(root) = std::env::var(var) {
                include_paths.push(format!("{root}/include"));
            }
        }
        include_paths.push("/usr/local/cuda/include".to_string());
        include_paths.retain(|p| std::path::Path::new(p).is_dir());
        include_paths.dedup();
        NvrtcOptions { include_paths, extra: Vec::new() }
    }
}

/// Why NVRTC gave no PTX.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NvrtcError {
    /// The source did not compile; `log` is NVRTC's, `options` what it was given.
    #[error("`{kernel}`: NVRTC failed for {target}:\n{log}\n(options: {})", .options.join(" "))]
    Compile { kernel: String, target: String, log: String, options: Vec<String> },

    /// libnvrtc could not be loaded (cudarc's dynamic loading panics on the first call without it).
    #[error(
        "`{kernel}`: NVRTC could not be loaded on this machine to compile for {target}: install NVRTC (CUDA 13) \
         or ship PTX for this arch"
    )]
    Unavailable { kernel: String, target: String },

    /// Any other NVRTC failure (creating the program, reading the PTX back), or a kernel name or
    /// source NVRTC cannot take.
    #[error("`{kernel}`: NVRTC failed for {target}: {message}")]
    Other { kernel: String, target: String, message: String },
}

/// `sm_90a` -> `compute_90a`: NVRTC emits PTX for a virtual architecture, which ptxas (or the
/// driver's JIT) compiles for the real one. Other strings pass through.
pub fn virtual_arch(target: &str) -> String {
    match target.strip_prefix("sm_") {
        Some(rest) => format!("compute_{rest}"),
        None => target.to_string(),
    }
}

/// The NVRTC options for `target` (`sm_80`, `sm_90a`): PTX for the matching virtual architecture,
/// C++17, functions `__device__` by default, the include paths, then `extra`.
pub fn options(target: &str, nvrtc: &NvrtcOptions) -> Vec<String> {
    let mut out = vec![
        format!("--gpu-architecture={}", virtual_arch(target)),
        "-std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    out.extend(nvrtc.include_paths.iter().map(|p| format!("--include-path={p}")));
    out.extend(nvrtc.extra.iter().cloned());
    out
}

/// Compiles the CUDA source of kernel `name` to PTX for `target` with [`options`].
pub fn compile_ptx(name: &str, source: &str, target: &str, nvrtc: &NvrtcOptions) -> Result<String, NvrtcError> {
    let other = |message: String| NvrtcError::Other { kernel: name.to_string(), target: target.to_string(), message };
    // cudarc panics on a NUL byte; refused here so that a panic below means only a missing libnvrtc.
    if source.contains('\0') || name.contains('\0') {
        return Err(other("the kernel name or source contains a NUL byte".to_string()));
    }
    let opts =
        CompileOptions { options: options(target, nvrtc), name: Some(format!("{name}.cu")), ..Default::default() };
    let compiled =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cudarc::nvrtc::compile_ptx_with_opts(source, opts)));
    match compiled {
        Ok(Ok(ptx)) => Ok(ptx.to_src()),
        Ok(Err(cudarc::nvrtc::CompileError::CompileError { log, options, .. })) => Err(NvrtcError::Compile {
            kernel: name.to_string(),
            target: target.to_string(),
            log: log.to_string_lossy().trim_end().to_string(),
            options,
        }),
        Ok(Err(e)) => Err(other(format!("{e:?}"))),
        Err(_) => Err(NvrtcError::Unavailable { kernel: name.to_string(), target: target.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvrtc_targets_the_virtual_arch() {
        assert_eq!(virtual_arch("sm_90a"), "compute_90a");
        assert_eq!(virtual_arch("sm_80"), "compute_80");
        assert_eq!(virtual_arch("compute_86"), "compute_86");
    }

    #[test]
    fn the_one_option_list() {
        let nvrtc = NvrtcOptions { include_paths: vec!["/cuda/include".into()], extra: Vec::new() };
        assert_eq!(
            options("sm_90a", &nvrtc),
            ["--gpu-architecture=compute_90a", "-std=c++17", "-default-device", "--include-path=/cuda/include"]
        );
        let extra = NvrtcOptions { extra: vec!["-lineinfo".into()], ..nvrtc };
        assert_eq!(options("sm_80", &extra).first().map(String::as_str), Some("--gpu-architecture=compute_80"));
        assert_eq!(options("sm_80", &extra).last().map(String::as_str), Some("-lineinfo"));
    }

    #[test]
    fn from_env_adds_nothing_but_include_paths() {
        let nvrtc = NvrtcOptions::from_env();
        assert!(nvrtc.extra.is_empty(), "{nvrtc:?}");
        assert!(nvrtc.include_paths.iter().all(|p| std::path::Path::new(p).is_dir()), "{nvrtc:?}");
    }

    #[test]
    fn a_nul_byte_is_an_error_not_a_missing_nvrtc() {
        let err =
            compile_ptx("k", "extern \"C\" __global__ void k() {}\0", "sm_90a", &NvrtcOptions::default()).unwrap_err();
        assert!(matches!(err, NvrtcError::Other { .. }), "{err}");
        assert!(err.to_string().contains("NUL"), "{err}");
    }
}
