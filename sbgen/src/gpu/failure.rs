//! Why a row of `sbgen check` failed, as values: [`Failure`]'s `Display` is the text the report
//! prints, and the tuner matches on the variants (did the kernel run at all, how large is the
//! error) instead of reading the text back. [`Row`] is one line of the report.

use super::data::Regime;
use super::device::GpuError;
use super::kernels::BuildError;
use crate::ir::Spec;
use sbgen_runtime::reference::Shape;
use std::fmt;

/// One reason a row failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Failure {
    /// The kernel could not be built (lowering, NVRTC, ptxas, a missing PTX file).
    Build(BuildError),
    /// The backward was not run because the forward whose outputs it reads failed.
    ForwardFailed,
    /// A launch or a copy failed (the context is still usable).
    Launch(GpuError),
    /// A relative error over its tolerance (NaN counts as over).
    Tolerance { what: &'static str, err: f64, tol: f64 },
    /// Guard elements around an output were overwritten.
    OutOfBounds { output: &'static str, elements: usize },
    /// Outputs left NaN or infinite (poisoned, never written).
    NonFinite { what: &'static str, count: usize, len: usize },
    /// Early exit moved the forward's o or rem further than its bound from the full run.
    EarlyExitBound { bits: u32, o: usize, rem: usize },
    /// On long-reach data early exit never triggers, yet the forward differs from the full run.
    EarlyExitChanged { elements: usize, worst: f32 },
    /// Early exit moved a gradient further than `tol` (relative L2) from the full run.
    EarlyExitGradient { bits: u32, what: &'static str, moved: f64, tol: f64 },
    /// A deterministic backward gave different bits on a second run of the same inputs.
    NotDeterministic { elements: usize },
}

impl Failure {
    /// True when the kernel never produced outputs to compare (so it is a failed candidate, not a
    /// wrong one).
    pub fn did_not_run(&self) -> bool {
        matches!(self, Failure::Build(_) | Failure::ForwardFailed)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Build(e) => write!(f, "build: {e}"),
            Failure::ForwardFailed => write!(f, "not run: the forward it reads failed"),
            Failure::Launch(e) => write!(f, "{e}"),
            Failure::Tolerance { what, err, tol } => write!(f, "{what} {err:.2e} > {tol:.0e}"),
            Failure::OutOfBounds { output, elements } => {
                write!(f, "wrote {elements} elements outside `{output}` (guard zones overwritten)")
            }
            Failure::NonFinite { what, count, len } => {
                write!(f, "{count} of {len} {what} elements NaN/inf (unwritten?)")
            }
            Failure::EarlyExitBound { bits, o, rem } => {
                write!(f, "early exit exceeds its bound 2^-{bits} against the full run: {o} o and {rem} rem elements")
            }
            Failure::EarlyExitChanged { elements, worst } => write!(
                f,
                "early exit changed the forward on long-reach data ({elements} elements differ from the full run, \
                 by up to {worst:.1e})"
            ),
            Failure::EarlyExitGradient { bits, what, moved, tol } => write!(
                f,
                "early exit (2^-{bits}) moved {what} by {moved:.2e} (relative) from the full run, over {tol:.0e}"
            ),
            Failure::NotDeterministic { elements } => {
                write!(f, "not deterministic: {elements} dq/dk/dv elements differ between two runs on the same inputs")
            }
        }
    }
}

/// One line of the report.
#[derive(Debug)]
pub struct Row {
    pub spec: Spec,
    pub regime: Regime,
    pub shape: Shape,
    pub err_o: Option<f64>,
    pub err_rem: Option<f64>,
    pub err_dq: Option<f64>,
    pub err_dk: Option<f64>,
    pub err_dv: Option<f64>,
    /// Empty when the row passed.
    pub failures: Vec<Failure>,
    /// What the spec and shape do not say (a decode's cache and split), printed after the status.
    pub detail: String,
}

impl Row {
    pub fn new(spec: Spec, regime: Regime, shape: Shape) -> Self {
        Row {
            spec,
            regime,
            shape,
            err_o: None,
            err_rem: None,
            err_dq: None,
            err_dk: None,
            err_dv: None,
            failures: Vec::new(),
            detail: String::new(),
        }
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Fails the row when `err` is over `tol` or NaN.
    pub fn error(&mut self, what: &'static str, err: f64, tol: f64) {
        if err.is_nan() || err > tol {
            self.failures.push(Failure::Tolerance { what, err, tol });
        }
    }

    pub fn outside(&mut self, outside: &[(&'static str, usize)]) {
        for &(output, elements) in outside {
            self.failures.push(Failure::OutOfBounds { output, elements });
        }
    }

    /// Fails the row when any element of `x` is NaN or infinite.
    pub fn nan(&mut self, what: &'static str, x: &[f32]) {
        let count = super::data::non_finite(x);
        if count > 0 {
            self.failures.push(Failure::NonFinite { what, count, len: x.len() });
        }
    }
}

/// The report's header line.
pub fn header() -> String {
    format!(
        "{:<40} {:<10} {:>7} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
        "spec", "regime", "H:H_kv", "N", "err_o", "err_rem", "err_dq", "err_dk", "err_dv", "status"
    )
}

/// One report line.
pub fn format_row(row: &Row) -> String {
    let f = |e: Option<f64>| e.map_or("-".to_string(), |v| format!("{v:.2e}"));
    let status = if row.passed() {
        "ok".to_string()
    } else {
        format!("FAIL: {}", row.failures.iter().map(short).collect::<Vec<_>>().join("; "))
    };
    let status = if row.detail.is_empty() { status } else { format!("{status}  [{}]", row.detail) };
    format!(
        "{:<40} {:<10} {:>7} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}  {}",
        row.spec.slug(),
        row.regime.to_string(),
        format!("{}:{}", row.shape.heads, row.shape.kv_heads),
        row.shape.seq,
        f(row.err_o),
        f(row.err_rem),
        f(row.err_dq),
        f(row.err_dk),
        f(row.err_dv),
        status
    )
}

/// The first line of a failure, at most 160 characters (compiler logs can be long; the CLI prints
/// them in full once, after the table).
pub fn short(failure: &(impl fmt::Display + ?Sized)) -> String {
    let failure = failure.to_string();
    let line = failure.lines().next().unwrap_or("");
    let mut out: String = line.chars().take(160).collect();
    if out.len() < line.len() || failure.lines().nth(1).is_some() {
        out.push_str(" ...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::CompileError;
    use crate::gpu::check::EE_BWD_TOL;
    use crate::ir::{Dtype, Pass};
    use sbgen_runtime::launcher::nvrtc::NvrtcError;

    /// Each variant prints exactly the text the report printed when failures were strings (the
    /// `format!` calls of the old `gpu/check.rs`), so `sbgen check` output is unchanged.
    #[test]
    fn each_failure_prints_the_text_of_the_string_it_replaced() {
        let nvrtc = || {
            CompileError::Nvrtc(NvrtcError::Compile {
                kernel: "k".into(),
                target: "sm_90a".into(),
                log: "error: x\nline 2".into(),
                options: vec!["-std=c++17".into()],
            })
        };
        let build_text = format!("build: {}", BuildError::Compile(nvrtc()));
        let launch = GpuError::NoDevice("no driver".into());
        let launch_text = launch.to_string();
        let (what, err, tol) = ("o", 6.0e-3, 5e-3);
        let (output, n) = ("dq", 7usize);
        let (count, len) = (3usize, 10usize);
        let (bits, over_o, over_rem) = (24u32, 2usize, 1usize);
        let (differ, worst) = (5usize, 1.5e-3f32);
        let (name, d) = ("dk", 2.5e-3f64);
        let cases: Vec<(Failure, String)> = vec![
            (Failure::Build(BuildError::Compile(nvrtc())), build_text),
            (Failure::ForwardFailed, "not run: the forward it reads failed".to_string()),
            (Failure::Launch(launch), launch_text),
            (Failure::Tolerance { what, err, tol }, format!("{what} {err:.2e} > {tol:.0e}")),
            (Failure::Tolerance { what, err: f64::NAN, tol }, format!("{what} {:.2e} > {tol:.0e}", f64::NAN)),
            (
                Failure::OutOfBounds { output, elements: n },
                format!("wrote {n} elements outside `{output}` (guard zones overwritten)"),
            ),
            (
                Failure::NonFinite { what: "rem", count, len },
                format!("{count} of {len} {} elements NaN/inf (unwritten?)", "rem"),
            ),
            (
                Failure::EarlyExitBound { bits, o: over_o, rem: over_rem },
                format!(
                    "early exit exceeds its bound 2^-{bits} against the full run: {over_o} o and {over_rem} rem elements"
                ),
            ),
            (
                Failure::EarlyExitChanged { elements: differ, worst },
                format!(
                    "early exit changed the forward on long-reach data ({differ} elements differ from the full run, \
                     by up to {worst:.1e})"
                ),
            ),
            (
                Failure::EarlyExitGradient { bits, what: name, moved: d, tol: EE_BWD_TOL },
                format!(
                    "early exit (2^-{bits}) moved {name} by {d:.2e} (relative) from the full run, over {EE_BWD_TOL:.0e}"
                ),
            ),
        ];
        for (failure, old) in &cases {
            assert_eq!(failure.to_string(), *old);
        }
        // And the literal texts, so a change of the old format strings above cannot hide a change.
        assert_eq!(cases[3].0.to_string(), "o 6.00e-3 > 5e-3");
        assert_eq!(cases[4].0.to_string(), "o NaN > 5e-3");
        assert_eq!(cases[5].0.to_string(), "wrote 7 elements outside `dq` (guard zones overwritten)");
        assert_eq!(cases[8].0.to_string().rsplit("by up to ").next(), Some("1.5e-3)"));
        assert_eq!(
            cases[9].0.to_string(),
            "early exit (2^-24) moved dk by 2.50e-3 (relative) from the full run, over 1e-3"
        );
        assert!(cases[0].0.to_string().starts_with("build: `k`: NVRTC failed for sm_90a:\nerror: x"));
    }

    #[test]
    fn long_failures_are_shortened_in_the_table() {
        assert_eq!(short("o 6.00e-3 > 5e-3"), "o 6.00e-3 > 5e-3");
        assert_eq!(short("build: NVRTC failed\nline 2"), "build: NVRTC failed ...");
        assert_eq!(short(&"x".repeat(200)).len(), 164);
    }

    #[test]
    fn rows_fail_on_nan_and_on_tolerance() {
        let mut row = Row::new(Spec::new(64, Dtype::Bf16, Pass::Forward), Regime::Random, Shape::new(1, 1, 2, 64));
        row.error("o", 1e-3, 5e-3);
        assert!(row.passed());
        row.error("o", f64::NAN, 5e-3);
        assert!(!row.passed());
        let mut row = Row::new(Spec::new(64, Dtype::Bf16, Pass::Forward), Regime::Random, Shape::new(1, 1, 2, 64));
        row.nan("o", &[1.0, f32::NAN]);
        assert!(format_row(&row).contains("FAIL: 1 of 2 o elements NaN"), "{}", format_row(&row));
        assert!(
            Failure::ForwardFailed.did_not_run() && !Failure::Tolerance { what: "o", err: 1.0, tol: 0.1 }.did_not_run()
        );
    }
}
