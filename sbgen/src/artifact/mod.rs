//! The artifact pipeline, lower -> compile -> [`Verdict`] -> named PTX, shared by `sbgen tune`,
//! `tune --compile-only` and `check --emit-ptx` (docs/architecture.md#artifact-pipeline).
//! [`name`] is the one rule for PTX file names, used by the store, `KernelBuilder` and the macro.
//!
//! [`build`] compiles one lowered kernel (NVRTC, then `ptxas -v`) and judges it; it writes nothing.
//! [`Verdict`] is the one place that decides that a spilling kernel is not shipped, and
//! [`store::PtxDir`] writes only kernels judged [`Verdict::Ok`], so every path that produces PTX
//! agrees. This module depends on the compiler and the IR only, never on `gpu/` or `tune/`.

// Naming builds without CUDA: sbgen-macros finds PTX files through it.
pub mod name;
#[cfg(feature = "cli")]
pub mod store;

#[cfg(feature = "cli")]
use crate::compile::{CompileError, Compiled, Compiler};
#[cfg(feature = "cli")]
use crate::lower::Lowered;

/// What became of one compilation.
#[cfg(feature = "cli")]
#[derive(Debug)]
pub enum Verdict {
    /// Compiled without spilling: the PTX may be stored and run.
    Ok,
    /// Compiled, but ptxas reports register spills (stores + loads, every launch step): a loss,
    /// never stored (docs/architecture.md#artifact-pipeline).
    Spill { bytes: u32 },
    /// Did not compile (or the compiler panicked).
    Error(CompileError),
}

#[cfg(feature = "cli")]
impl Verdict {
    /// The spill rule: any spilled byte in any launch step makes the kernel a loss.
    pub fn of(compiled: &Compiled) -> Verdict {
        match compiled.spill_bytes() {
            0 => Verdict::Ok,
            bytes => Verdict::Spill { bytes },
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Verdict::Ok)
    }
}

/// The full text (a compile error keeps its whole log; callers shorten it where they need to).
#[cfg(feature = "cli")]
impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Ok => write!(f, "compiles without spilling"),
            Verdict::Spill { bytes } => write!(f, "spills {bytes} bytes"),
            Verdict::Error(e) => write!(f, "{e}"),
        }
    }
}

/// One lowered kernel and what compiling it gave.
#[cfg(feature = "cli")]
#[derive(Debug)]
pub struct Artifact {
    pub lowered: Lowered,
    /// `None` exactly when the verdict is [`Verdict::Error`].
    pub compiled: Option<Compiled>,
    pub verdict: Verdict,
}

/// Compiles and judges `lowered`; a panic inside the compiler becomes [`CompileError::Panicked`]
/// (one bad variant must not end a run over hundreds).
#[cfg(feature = "cli")]
pub fn build(lowered: &Lowered, compiler: &Compiler) -> Artifact {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compiler.compile(lowered)))
        .unwrap_or_else(|payload| Err(panicked(&lowered.name, payload)));
    let (compiled, verdict) = match result {
        Ok(compiled) => {
            let verdict = Verdict::of(&compiled);
            (Some(compiled), verdict)
        }
        Err(e) => (None, Verdict::Error(e)),
    };
    Artifact { lowered: lowered.clone(), compiled, verdict }
}

/// [`build`] for every kernel on `threads` threads ([`crate::pool::map`]); results in input order.
#[cfg(feature = "cli")]
pub fn build_all(lowered: &[Lowered], compiler: &Compiler, threads: usize) -> Vec<Artifact> {
    crate::pool::map(lowered, threads, |l| build(l, compiler))
}

/// A panic's payload as a compile error of `kernel`.
#[cfg(feature = "cli")]
fn panicked(kernel: &str, payload: Box<dyn std::any::Any + Send>) -> CompileError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    CompileError::Panicked { kernel: kernel.to_string(), message }
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;
    use crate::compile::parse_ptxas_report;

    /// A `Compiled` whose resources come from a ptxas report.
    fn compiled_from_report(report: &str) -> Compiled {
        Compiled {
            name: "k".into(),
            target: "sm_90a",
            ptx: ".entry k".into(),
            cubin: Vec::new(),
            functions: parse_ptxas_report(report),
            ptxas_log: report.into(),
        }
    }

    fn report(spill_stores: u32, spill_loads: u32) -> String {
        format!(
            "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n\
             ptxas info    : Function properties for k\n    \
             0 bytes stack frame, {spill_stores} bytes spill stores, {spill_loads} bytes spill loads\n\
             ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem"
        )
    }

    #[test]
    fn any_spilled_byte_is_a_spill_verdict() {
        assert!(Verdict::of(&compiled_from_report(&report(0, 0))).is_ok());
        assert!(matches!(Verdict::of(&compiled_from_report(&report(12, 0))), Verdict::Spill { bytes: 12 }));
        let spill = Verdict::of(&compiled_from_report(&report(8, 16)));
        assert!(matches!(spill, Verdict::Spill { bytes: 24 }));
        assert_eq!(spill.to_string(), "spills 24 bytes");
    }

    #[test]
    fn a_panic_payload_becomes_a_compile_error_naming_the_kernel() {
        let e = panicked("sb_fwd_x", Box::new("index out of bounds"));
        assert_eq!(e.to_string(), "`sb_fwd_x`: the compiler panicked: index out of bounds");
        let e = panicked("k", Box::new(String::from("owned")));
        assert!(e.to_string().ends_with("owned"));
        assert!(panicked("k", Box::new(3u8)).to_string().ends_with("unknown panic"));
    }
}
