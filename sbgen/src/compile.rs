//! Compilation: a [`Lowered`] kernel to PTX with NVRTC (the runtime's [`nvrtc::compile_ptx`], the
//! one option list the launcher's fallback compiles with too), then to a cubin with
//! `ptxas -v`, whose report gives each entry point's registers, shared memory, stack frame and spills.
//!
//! Why ptxas and not NVRTC straight to a cubin: the PTX is what sbgen embeds and ships (the driver
//! JIT-compiles it for the device), so compiling exactly that PTX with ptxas checks the artifact users
//! get, and ptxas's `-v` report is the stable, documented text that [`parse_ptxas_report`] reads.
//!
//! The toolchain (CUDA headers, `ptxas`, `libnvrtc`) is found by [`Toolchain::discover`]:
//! `SBGEN_CUDA_HOME`, `CUDA_HOME`, `CUDA_PATH`, then the pip layout (`<dir>/nvidia/cu13`) in sbgen's
//! cache folder (`$SBGEN_CACHE_DIR` or `~/.cache/sbgen`, sub-folder `cuda-13.0`) and in Python's
//! site-packages, then `/usr/local/cuda`. `scripts/env.sh` installs the pinned wheels and sets the
//! variables.

use crate::lower::Lowered;
use sbgen_runtime::launcher::nvrtc::{self, NvrtcError, NvrtcOptions};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// The pip wheels that provide NVRTC, ptxas and the headers without a full CUDA install (pinned:
/// CUDA 13.0 emits PTX ISA 9.0, which the H200 machine's driver loads).
pub const PINNED_WHEELS: &str = "nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
     nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85";

/// The NVRTC library file of the pinned CUDA major version.
const NVRTC_LIB: &str = "libnvrtc.so.13";
/// The library NVRTC itself opens at run time.
const NVRTC_BUILTINS_LIB: &str = "libnvrtc-builtins.so.13.0";

/// Environment variables that may name a CUDA root (a folder with `include/` and `bin/`), in order.
const HOME_VARS: &[&str] = &["SBGEN_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"];

/// Where a kernel's compilation failed, or why it could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    #[error(
        "CUDA toolchain not found (looked in: {searched}).\n\
         Install the pinned compilers with `source scripts/env.sh` in the sbgen repository (or `python3 -m \
         pip install --target ~/.cache/sbgen/cuda-13.0 {PINNED_WHEELS}`), or set `SBGEN_CUDA_HOME` to a folder with \
         `include/cuda_bf16.h` and `bin/ptxas`"
    )]
    ToolchainNotFound { searched: String },
    #[error(
        "NVRTC (`{NVRTC_LIB}`) could not be loaded: add `{lib_dir}` to `LD_LIBRARY_PATH` \
         (`source scripts/env.sh` in the sbgen repository sets it)"
    )]
    NvrtcUnavailable { lib_dir: String },
    #[error(transparent)]
    Nvrtc(#[from] NvrtcError),
    #[error("`{kernel}`: ptxas failed for {target} ({status}):\n{log}")]
    Ptxas { kernel: String, target: &'static str, status: String, log: String },
    #[error("`{kernel}`: the ptxas report has no entry `{function}` (entries: {found}):\n{log}")]
    MissingEntry { kernel: String, function: String, found: String, log: String },
    #[error("`{kernel}`: the compiler panicked: {message}")]
    Panicked { kernel: String, message: String },
    #[error("`{kernel}`: {action} `{}`: {source}", .path.display())]
    Io {
        kernel: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CompileError {
    /// True when the error is about the machine (no toolchain), not about the kernel.
    pub fn is_toolchain(&self) -> bool {
        matches!(
            self,
            CompileError::ToolchainNotFound { .. }
                | CompileError::NvrtcUnavailable { .. }
                | CompileError::Nvrtc(NvrtcError::Unavailable { .. })
        )
    }
}

/// The CUDA compilers and headers sbgen uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Toolchain {
    /// Folder with `cuda_bf16.h` and `cuda_fp16.h`.
    pub include_dir: PathBuf,
    /// The `ptxas` executable.
    pub ptxas: PathBuf,
    /// Folder expected to hold `libnvrtc.so.13` (on `LD_LIBRARY_PATH`, or loaded from here).
    pub lib_dir: PathBuf,
    /// Where it was found, e.g. `SBGEN_CUDA_HOME` or `pip layout in ~/.cache/sbgen/cuda-13.0`.
    pub found_by: String,
}

impl Toolchain {
    /// Finds the toolchain (see the module docs for the order). The first root that has both the
    /// headers and `ptxas` wins.
    pub fn discover() -> Result<Toolchain, CompileError> {
        let mut searched = Vec::new();
        for (root, found_by) in candidate_roots() {
            searched.push(format!("{} ({found_by})", root.display()));
            if let Some(tc) = Toolchain::at(&root, &found_by) {
                return Ok(tc);
            }
        }
        Err(CompileError::ToolchainNotFound { searched: searched.join(", ") })
    }

    /// The toolchain rooted at `root` (a CUDA root, or a pip target folder holding `nvidia/cu13`),
    /// if its headers and ptxas are there.
    pub fn at(root: &Path, found_by: &str) -> Option<Toolchain> {
        for home in [root.to_path_buf(), root.join("nvidia").join("cu13")] {
            let include_dir = home.join("include");
            let ptxas = home.join("bin").join("ptxas");
            if include_dir.join("cuda_bf16.h").is_file() && ptxas.is_file() {
                let lib_dir =
                    if home.join("lib64").join(NVRTC_LIB).is_file() { home.join("lib64") } else { home.join("lib") };
                return Some(Toolchain { include_dir, ptxas, lib_dir, found_by: found_by.to_string() });
            }
        }
        None
    }

    /// Makes sure cudarc can load NVRTC. cudarc looks the library up by name (`LD_LIBRARY_PATH`,
    /// the linker cache); when that fails, the toolchain's own copies of NVRTC and its builtins are
    /// loaded by full path, after which lookups by name find them (the dynamic linker matches
    /// loaded libraries by soname). So `LD_LIBRARY_PATH` is optional once the toolchain is found.
    pub fn ensure_nvrtc(&self) -> Result<(), CompileError> {
        // SAFETY: loading NVRTC runs no initialisers with preconditions; cudarc does the same.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Ok(());
        }
        // NVRTC opens its builtins library by name too, so that one is loaded first.
        let builtins = self.lib_dir.join(NVRTC_BUILTINS_LIB);
        let path = self.lib_dir.join(NVRTC_LIB);
        if builtins.is_file() && path.is_file() && dl::load_global(&builtins) && dl::load_global(&path) {
            // SAFETY: as above.
            if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Ok(());
            }
        }
        Err(CompileError::NvrtcUnavailable { lib_dir: self.lib_dir.display().to_string() })
    }

    /// What NVRTC needs from this toolchain: its headers. The rest of the option list is
    /// [`nvrtc::options`], the same for the launcher's fallback.
    pub fn nvrtc_options(&self) -> NvrtcOptions {
        NvrtcOptions { include_paths: vec![self.include_dir.display().to_string()], extra: Vec::new() }
    }
}

fn candidate_roots() -> Vec<(PathBuf, String)> {
    let mut roots = Vec::new();
    for var in HOME_VARS {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            roots.push((PathBuf::from(v), format!("${var}")));
        }
    }
    let cache = match std::env::var_os("SBGEN_CACHE_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("sbgen")),
    };
    if let Some(cache) = cache {
        roots.push((cache.join("cuda-13.0"), "sbgen's cache".to_string()));
    }
    for dir in python_site_packages() {
        roots.push((dir, "Python site-packages".to_string()));
    }
    roots.push((PathBuf::from("/usr/local/cuda"), "default install".to_string()));
    roots
}

/// Python's site-packages folders (where `pip install nvidia-cuda-nvrtc ...` puts the wheels), or
/// none when there is no `python3`.
fn python_site_packages() -> Vec<PathBuf> {
    let script = "import site, sys\nfor p in site.getsitepackages() + [site.getusersitepackages()]: print(p)";
    let Ok(out) = Command::new("python3").args(["-c", script]).output() else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(PathBuf::from).collect()
}

/// Resources of one entry point, from the ptxas report.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FunctionResources {
    pub name: String,
    pub registers: u32,
    /// Static shared memory; the dynamic part is in the launch manifest.
    pub static_smem_bytes: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub barriers: u32,
}

impl FunctionResources {
    pub fn spill_bytes(&self) -> u32 {
        self.spill_store_bytes + self.spill_load_bytes
    }
}

/// Parses the text `ptxas -v` prints (on stderr), e.g.
///
/// ```text
/// ptxas info    : Compiling entry function 'sb_fwd_...' for 'sm_90a'
/// ptxas info    : Function properties for sb_fwd_...
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 168 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]
/// ```
///
/// into one record per entry function, in the order ptxas reports them. Lines it does not know are
/// skipped; fields a line lacks stay 0.
pub fn parse_ptxas_report(text: &str) -> Vec<FunctionResources> {
    let mut out: Vec<FunctionResources> = Vec::new();
    // The entry whose "Used ..." line comes next, and the function whose properties line comes next.
    let mut entry: Option<usize> = None;
    let mut props: Option<String> = None;
    for raw in text.lines() {
        let line = raw.trim();
        let body =
            line.strip_prefix("ptxas info").map(|r| r.trim_start().trim_start_matches(':').trim()).unwrap_or(line);
        if let Some(rest) = body.strip_prefix("Compiling entry function") {
            let name = quoted(rest).unwrap_or_else(|| rest.trim().to_string());
            entry = Some(index_of(&mut out, &name));
            props = None;
        } else if let Some(rest) = body.strip_prefix("Function properties for") {
            props = Some(rest.trim().trim_matches('\'').to_string());
        } else if body.contains("bytes stack frame") {
            // Only the properties of an entry function are kept (device functions are inlined).
            let target = props.take().and_then(|p| out.iter().position(|f| f.name == p));
            if let Some(i) = target {
                let f = &mut out[i];
                for (value, unit) in numbers_with_units(body) {
                    match unit.as_str() {
                        "bytes stack frame" => f.stack_frame_bytes = value,
                        "bytes spill stores" => f.spill_store_bytes = value,
                        "bytes spill loads" => f.spill_load_bytes = value,
                        _ => {}
                    }
                }
            }
        } else if body.starts_with("Used ") {
            if let Some(i) = entry.take() {
                let f = &mut out[i];
                for (value, unit) in numbers_with_units(body.trim_start_matches("Used ")) {
                    match unit.as_str() {
                        "registers" => f.registers = value,
                        "barriers" => f.barriers = value,
                        "bytes smem" => f.static_smem_bytes = value,
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

fn index_of(out: &mut Vec<FunctionResources>, name: &str) -> usize {
    match out.iter().position(|f| f.name == name) {
        Some(i) => i,
        None => {
            out.push(FunctionResources { name: name.to_string(), ..Default::default() });
            out.len() - 1
        }
    }
}

/// The text between the first pair of single quotes.
fn quoted(s: &str) -> Option<String> {
    let start = s.find('\'')? + 1;
    let len = s[start..].find('\'')?;
    Some(s[start..start + len].to_string())
}

/// `"168 registers, used 1 barriers, 16 bytes smem"` -> `[(168, "registers"), (1, "barriers"),
/// (16, "bytes smem")]`: each comma-separated item's first number and the words after it.
fn numbers_with_units(s: &str) -> Vec<(u32, String)> {
    s.split(',')
        .filter_map(|item| {
            let mut words = item.split_whitespace().skip_while(|w| w.parse::<u32>().is_err());
            let value = words.next()?.parse::<u32>().ok()?;
            let unit = words.collect::<Vec<_>>().join(" ");
            Some((value, unit))
        })
        .collect()
}

/// A compiled kernel: PTX (what gets embedded), the cubin ptxas made from it, and its resources.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub name: String,
    /// `sm_80` or `sm_90a`.
    pub target: &'static str,
    pub ptx: String,
    pub cubin: Vec<u8>,
    /// One record per launch step of the manifest, in launch order.
    pub functions: Vec<FunctionResources>,
    /// The full ptxas report.
    pub ptxas_log: String,
}

impl Compiled {
    /// The main entry point (the first launch step).
    pub fn main(&self) -> &FunctionResources {
        &self.functions[0]
    }
    pub fn spill_bytes(&self) -> u32 {
        self.functions.iter().map(FunctionResources::spill_bytes).sum()
    }
}

/// Compiles lowered kernels with one toolchain. Cheap to share between threads.
#[derive(Clone, Debug)]
pub struct Compiler {
    toolchain: Toolchain,
}

impl Compiler {
    /// Finds the toolchain and makes sure NVRTC loads.
    pub fn discover() -> Result<Compiler, CompileError> {
        Compiler::new(Toolchain::discover()?)
    }

    pub fn new(toolchain: Toolchain) -> Result<Compiler, CompileError> {
        toolchain.ensure_nvrtc()?;
        Ok(Compiler { toolchain })
    }

    pub fn toolchain(&self) -> &Toolchain {
        &self.toolchain
    }

    /// NVRTC's (major, minor) version.
    pub fn nvrtc_version(&self) -> Option<(i32, i32)> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: NVRTC is loaded (checked in `new`) and writes two ints through valid pointers.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
    }

    /// CUDA C++ to PTX with NVRTC.
    pub fn to_ptx(&self, lowered: &Lowered) -> Result<String, CompileError> {
        let target = lowered.kernel.arch.compile_target();
        Ok(nvrtc::compile_ptx(&lowered.name, &lowered.cuda_source, target, &self.toolchain.nvrtc_options())?)
    }

    /// PTX to a cubin with `ptxas -v`, reporting the resources of every launch step's function.
    pub fn assemble(
        &self,
        lowered: &Lowered,
        ptx: &str,
    ) -> Result<(Vec<u8>, Vec<FunctionResources>, String), CompileError> {
        let target = lowered.kernel.arch.compile_target();
        let kernel = &lowered.name;
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CompileError::Io { kernel: kernel.clone(), action, path, source }
        };
        let tmp = TempFiles::new(kernel);
        std::fs::write(&tmp.ptx, ptx).map_err(io("cannot write", &tmp.ptx))?;
        let out = Command::new(&self.toolchain.ptxas)
            .arg(format!("-arch={target}"))
            .arg("-v")
            .arg(&tmp.ptx)
            .arg("-o")
            .arg(&tmp.cubin)
            .output()
            .map_err(io("cannot run", &self.toolchain.ptxas))?;
        let log = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            return Err(CompileError::Ptxas { kernel: kernel.clone(), target, status: out.status.to_string(), log });
        }
        let cubin = std::fs::read(&tmp.cubin).map_err(io("cannot read", &tmp.cubin))?;
        let report = parse_ptxas_report(&log);
        let mut functions = Vec::new();
        for step in &lowered.manifest.steps {
            match report.iter().find(|f| f.name == step.function) {
                Some(f) => functions.push(f.clone()),
                None => {
                    let found = report.iter().map(|f| format!("`{}`", f.name)).collect::<Vec<_>>().join(", ");
                    return Err(CompileError::MissingEntry {
                        kernel: kernel.clone(),
                        function: step.function.clone(),
                        found: if found.is_empty() { "none".into() } else { found },
                        log,
                    });
                }
            }
        }
        Ok((cubin, functions, log))
    }

    /// NVRTC then ptxas.
    pub fn compile(&self, lowered: &Lowered) -> Result<Compiled, CompileError> {
        let ptx = self.to_ptx(lowered)?;
        let (cubin, functions, ptxas_log) = self.assemble(lowered, &ptx)?;
        Ok(Compiled {
            name: lowered.name.clone(),
            target: lowered.kernel.arch.compile_target(),
            ptx,
            cubin,
            functions,
            ptxas_log,
        })
    }
}

/// A `.ptx` and a `.cubin` path in the temp folder, unique per process and call, removed on drop.
struct TempFiles {
    ptx: PathBuf,
    cubin: PathBuf,
}

impl TempFiles {
    fn new(kernel: &str) -> TempFiles {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let stem = format!("sbgen-{}-{n}-{kernel}", std::process::id());
        let dir = std::env::temp_dir();
        TempFiles { ptx: dir.join(format!("{stem}.ptx")), cubin: dir.join(format!("{stem}.cubin")) }
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ptx);
        let _ = std::fs::remove_file(&self.cubin);
    }
}

impl fmt::Display for FunctionResources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} regs, {} B smem, {} B stack, {} B spill stores, {} B spill loads",
            self.registers,
            self.static_smem_bytes,
            self.stack_frame_bytes,
            self.spill_store_bytes,
            self.spill_load_bytes
        )
    }
}

/// Loading a shared library by path with the C `dlopen`, kept loaded for the life of the process.
mod dl {
    use std::ffi::{c_char, c_int, c_void, CString};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    const RTLD_NOW: c_int = 2;
    const RTLD_GLOBAL: c_int = 0x100;

    extern "C" {
        fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    }

    /// Loads `path` with `RTLD_GLOBAL` and never unloads it. Returns whether it loaded.
    pub fn load_global(path: &Path) -> bool {
        let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call; the handle is
        // deliberately leaked, so the library stays mapped while cudarc uses it.
        let handle = unsafe { dlopen(c_path.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
        !handle.is_null()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from `ptxas -arch=sm_80 -v` (CUDA 13.0.88) on a two-kernel module, one spilling.
    const SPILLING_SM80: &str = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spilly' for 'sm_80'
ptxas info    : Function properties for spilly
    2592 bytes stack frame, 1700 bytes spill stores, 2300 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 2592 bytes cumulative stack size, 4096 bytes smem, 372 bytes cmem[0]
ptxas info    : Compile time = 137.631 ms
ptxas info    : Compiling entry function 'small' for 'sm_80'
ptxas info    : Function properties for small
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 368 bytes cmem[0]
ptxas info    : Compile time = 1.431 ms
";

    /// Captured from `ptxas -arch=sm_90a -v` with `-maxrregcount` (an extra "Overriding" line) and
    /// older-style lines without barriers, plus a device function's properties to be ignored.
    const SM90_WITH_NOISE: &str = "\
ptxas info    : Overriding maximum register limit 256 for 'k1' with  64 of maxrregcount option
ptxas info    : 0 bytes gmem
ptxas info    : Function properties for helper
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'k1' for 'sm_90a'
ptxas info    : Function properties for k1
    800 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 248 registers, 800 bytes cumulative stack size, 49152 bytes smem, 400 bytes cmem[0]
ptxas warning : Registers are spilled to local memory in function 'k2', 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function 'k2' for 'sm_90a'
ptxas info    : Function properties for k2
    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 16 barriers, 1 bytes smem
";

    #[test]
    fn parses_a_spilling_report() {
        let report = parse_ptxas_report(SPILLING_SM80);
        assert_eq!(
            report,
            vec![
                FunctionResources {
                    name: "spilly".into(),
                    registers: 64,
                    static_smem_bytes: 4096,
                    stack_frame_bytes: 2592,
                    spill_store_bytes: 1700,
                    spill_load_bytes: 2300,
                    barriers: 1,
                },
                FunctionResources { name: "small".into(), registers: 10, ..Default::default() },
            ]
        );
        assert_eq!(report[0].spill_bytes(), 4000);
    }

    #[test]
    fn ignores_device_functions_and_unknown_lines() {
        let report = parse_ptxas_report(SM90_WITH_NOISE);
        assert_eq!(report.len(), 2, "{report:?}");
        assert_eq!(report[0].name, "k1");
        assert_eq!((report[0].registers, report[0].static_smem_bytes, report[0].stack_frame_bytes), (248, 49152, 800));
        assert_eq!(report[0].spill_bytes(), 0);
        assert_eq!(report[1].name, "k2");
        assert_eq!((report[1].registers, report[1].barriers, report[1].spill_bytes()), (255, 16, 16));
    }

    #[test]
    fn empty_or_garbage_text_gives_no_entries() {
        assert!(parse_ptxas_report("").is_empty());
        assert!(parse_ptxas_report("ptxas fatal   : Ptx assembly aborted due to errors\n").is_empty());
    }

    /// The launcher's fallback compiles a kernel of `arch` on a device of that compute capability
    /// for the same target, with the same option list, as sbgen does.
    #[test]
    fn the_launchers_fallback_compiles_with_sbgens_options() {
        let tc = Toolchain {
            include_dir: PathBuf::from("/cuda/include"),
            ptxas: PathBuf::from("/cuda/bin/ptxas"),
            lib_dir: PathBuf::from("/cuda/lib"),
            found_by: "test".into(),
        };
        let fallback = NvrtcOptions { include_paths: vec!["/cuda/include".into()], ..NvrtcOptions::from_env() };
        assert_eq!(tc.nvrtc_options(), fallback);
        for arch in crate::ir::Arch::ALL {
            let device_target = sbgen_runtime::launcher::Target::for_device(arch.compute_capability());
            assert_eq!(device_target, arch.compile_target());
        }
        assert_eq!(
            nvrtc::options(crate::ir::Arch::Sm90.compile_target(), &tc.nvrtc_options()),
            ["--gpu-architecture=compute_90a", "-std=c++17", "-default-device", "--include-path=/cuda/include"]
        );
    }

    /// Where the toolchain is (`source scripts/env.sh`): a real lowered kernel through the
    /// fallback's NVRTC call and options gives byte for byte the PTX sbgen ships.
    #[test]
    fn the_fallback_gives_the_ptx_sbgen_compiles() {
        let compiler = match (std::env::var_os("SBGEN_CUDA_HOME"), Compiler::discover()) {
            (Some(_), Ok(c)) => c,
            (_, Err(e)) => return eprintln!("skipped: {e}"),
            (None, _) => return eprintln!("skipped: SBGEN_CUDA_HOME is not set (source scripts/env.sh)"),
        };
        for arch in crate::ir::Arch::ALL {
            let spec = crate::ir::Spec::new(64, crate::ir::Dtype::Bf16, crate::ir::Pass::Forward);
            let kernel = crate::ir::Kernel::new(spec, crate::ir::Schedule::default_on(&spec, arch), arch);
            let lowered = crate::lower::lower(&kernel).unwrap();
            let sbgen = compiler.to_ptx(&lowered).unwrap_or_else(|e| panic!("{e}"));
            let target = sbgen_runtime::launcher::Target::for_device(arch.compute_capability());
            let fallback = nvrtc::compile_ptx(&lowered.name, &lowered.cuda_source, &target, &NvrtcOptions::from_env())
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(fallback == sbgen, "{arch}: the fallback's PTX differs from sbgen's");
        }
    }

    /// A handwritten kernel through the real NVRTC and ptxas (skipped without the toolchain), so
    /// this module is tested apart from the templates.
    #[test]
    fn compiles_a_small_kernel_and_reports_its_resources() {
        let compiler = match Compiler::discover() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let kernel = crate::ir::Kernel::new(
            crate::ir::Spec::new(64, crate::ir::Dtype::Bf16, crate::ir::Pass::Forward),
            crate::ir::Schedule::DEFAULT,
            crate::ir::Arch::Sm80,
        );
        let mut lowered = crate::lower::lower(&kernel).expect("the default kernel lowers");
        lowered.name = "sbgen_selftest".into();
        lowered.manifest.steps.truncate(1);
        lowered.manifest.steps[0].function = "sbgen_selftest".into();
        lowered.cuda_source = r#"
            #include <cuda_bf16.h>
            float twice(float x) { return 2.f * x; }  // __device__ by -default-device
            extern "C" __global__ void sbgen_selftest(__nv_bfloat16* out, const __nv_bfloat16* in) {
                __shared__ float tile[256];
                tile[threadIdx.x] = twice(__bfloat162float(in[threadIdx.x]));
                __syncthreads();
                out[threadIdx.x] = __float2bfloat16(tile[255 - threadIdx.x]);
            }"#
        .into();
        for arch in crate::ir::Arch::ALL {
            lowered.kernel.arch = arch;
            let c = compiler.compile(&lowered).unwrap_or_else(|e| panic!("{e}"));
            assert!(c.ptx.contains(".entry sbgen_selftest"), "{}", c.ptx);
            assert!(!c.cubin.is_empty());
            assert_eq!(c.target, arch.compile_target());
            assert_eq!(c.main().static_smem_bytes, 1024, "{}", c.ptxas_log);
            assert!(c.main().registers > 0 && c.spill_bytes() == 0, "{}", c.ptxas_log);
        }

        lowered.cuda_source = "extern \"C\" __global__ void sbgen_selftest() { undeclared(); }".into();
        let err = compiler.compile(&lowered).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CompileError::Nvrtc(NvrtcError::Compile { .. })), "{text}");
        assert!(text.contains("`sbgen_selftest`") && text.contains("undeclared"), "{text}");

        lowered.cuda_source = "extern \"C\" __global__ void other() {}".into();
        let err = compiler.compile(&lowered).unwrap_err();
        assert!(matches!(err, CompileError::MissingEntry { .. }), "{err}");
        assert!(err.to_string().contains("`other`"), "{err}");
    }

    /// Context parallelism's segment walks, forward and backward, at their default schedules (the
    /// forward's and the backward's) compile without
    /// spills for both arches, both layouts, with and without the fused remainder and early exit, at
    /// the register edges (tiles 64, 128 and 256; 80 padded to 96). Skipped without the toolchain.
    #[test]
    fn segment_kernels_compile_without_spills() {
        use crate::ir::{Arch, Dtype, Kernel, Layout, Pass, Remainder, Schedule, Spec};
        let compiler = match Compiler::discover() {
            Ok(c) => c,
            Err(e) => return eprintln!("skipped: {e}"),
        };
        let variants = [
            (64, Dtype::Bf16, Layout::Bhnd, Remainder::Return, None),
            (128, Dtype::Bf16, Layout::Bnhd, Remainder::Fuse, Some(24)),
            (128, Dtype::F16, Layout::Bhnd, Remainder::Return, Some(24)),
            (256, Dtype::Bf16, Layout::Bnhd, Remainder::Return, None),
            (80, Dtype::F16, Layout::Bhnd, Remainder::Fuse, Some(16)),
        ];
        for (arch, pass) in Arch::ALL.into_iter().flat_map(|a| [Pass::Segment, Pass::SegmentBackward].map(|p| (a, p))) {
            for (head_dim, dtype, layout, remainder, early_exit_bits) in variants {
                let spec = Spec { layout, remainder, early_exit_bits, ..Spec::new(head_dim, dtype, pass) };
                let kernel = Kernel::new(spec, Schedule::default_on(&spec, arch), arch);
                let lowered = crate::lower::lower(&kernel).unwrap();
                let c = compiler.compile(&lowered).unwrap_or_else(|e| panic!("{}: {e}", lowered.name));
                assert_eq!(c.functions.len(), if pass == Pass::Segment { 2 } else { 3 }, "{}", c.ptxas_log);
                assert_eq!(c.spill_bytes(), 0, "{} on {arch} spills:\n{}", lowered.name, c.ptxas_log);
                eprintln!("{arch} {}: {} registers", lowered.name, c.main().registers);
            }
        }
    }

    #[test]
    fn toolchain_at_a_folder_without_headers_is_none() {
        assert!(Toolchain::at(Path::new("/nonexistent/sbgen"), "test").is_none());
    }
}
