//! The `sbgen` command line: argument types (clap derive), one module per subcommand, and the one
//! place where outcomes and errors become exit codes.
//!
//! Exit codes: 0 success; 1 failure (a kernel that does not compile or spills, no GPU, a failed
//! check, an I/O failure of the system); 2 bad usage (clap's own errors, spec or schedule values
//! the IR rejects, input files, caches and output paths the user must fix: missing, corrupt, of
//! another version, a folder or device where a file belongs). They are looked for before a GPU is
//! opened; a cache that goes bad while `tune` runs is still exit 2 at the end, with the run's
//! entries kept aside.
//!
//! Adding a subcommand (e.g. `check`, `run`, `bench`):
//! 1. create `cli/check.rs` with `#[derive(clap::Args)] pub struct CheckArgs { .. }` (doc comments
//!    become the help text) and `pub fn run(args: &CheckArgs, out: &mut dyn Write) -> Result<Outcome>`;
//!    return `Err(UsageError::new(..).into())` for values the user must fix, `Ok(Outcome::Failure)`
//!    for work that ran and failed, any other error for trouble along the way;
//! 2. add `mod check;` below, a variant `Check(check::CheckArgs)` to [`Command`], and its arm in
//!    [`Command::run`].

mod bench;
mod cache;
mod check;
mod emit;
pub mod plot;
mod progress;
mod run;
mod tune;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// sbgen: a compiler for stick-breaking attention CUDA kernels.
#[derive(Debug, Parser)]
#[command(name = "sbgen", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Lower one spec (forward, backward or both) to CUDA C++ and write the sources and manifest.
    Emit(emit::EmitArgs),
    /// Enumerate the search space of schedules, compile every variant, check and time them on the GPU
    /// and write the winners to the tuning cache (`--compile-only`: lower and compile, no GPU).
    Tune(tune::TuneArgs),
    /// Inspect the tuning cache (`sbgen cache show`).
    Cache(cache::CacheArgs),
    /// Check every supported kernel against the float64 reference on the GPU.
    Check(check::CheckArgs),
    /// Run one kernel on tensors from a safetensors file and write its outputs to another.
    Run(run::RunArgs),
    /// Time the forward and forward+backward kernels on the benchmark shapes (docs/performance.md#counting).
    Bench(bench::BenchArgs),
}

impl Command {
    pub fn run(&self, out: &mut dyn Write) -> Result<Outcome> {
        match self {
            Command::Emit(args) => emit::run(args, out),
            Command::Tune(args) => tune::run(args, out),
            Command::Cache(args) => cache::run(args, out),
            Command::Check(args) => check::run(args, out),
            Command::Run(args) => run::run(args, out),
            Command::Bench(args) => bench::run(args, out),
        }
    }
}

/// How a subcommand that ran to the end went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The work ran and found problems (already reported): exit 1.
    Failure,
}

/// A value the user must change (exit 2). The message names the field and what is allowed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

impl UsageError {
    pub fn new(message: impl std::fmt::Display) -> Self {
        UsageError(message.to_string())
    }
}

/// Parses the arguments, runs the subcommand and maps the result to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; usage errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = cli.command.run(&mut out);
    let _ = out.flush();
    exit_code(result)
}

/// The one mapping from results to exit codes.
fn exit_code(result: Result<Outcome>) -> ExitCode {
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failure) => ExitCode::from(1),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS, // `sbgen tune | head`: the reader left
        Err(e) => {
            let mut message = format!("error: {e}");
            // Many errors spell their cause in their own message (`cannot read `x`: {source}`): a
            // cause already shown is not repeated.
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !message.contains(&cause) {
                    message.push_str(&format!("\n  caused by: {cause}"));
                }
            }
            eprintln!("{message}");
            if is_users_to_fix(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Exit 2: a usage error, or a file the user must fix (missing, corrupt or another version of a
/// cache; a path that is a folder, a device or the input).
fn is_users_to_fix(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<UsageError>().is_some()
            || c.downcast_ref::<crate::cache::CacheError>().is_some_and(|e| e.is_users_to_fix())
            || c.downcast_ref::<crate::files::FileError>().is_some_and(|e| e.is_users_to_fix())
            || c.downcast_ref::<plot::PlotError>().is_some_and(|e| e.is_users_to_fix())
    })
}

/// The folder of prebuilt PTX: `--ptx-dir`, else `SBGEN_PTX_DIR` when set. It must be a folder;
/// the error names where the path came from (the flag or the variable).
pub(crate) fn ptx_dir(flag: Option<&Path>) -> Result<Option<PathBuf>, UsageError> {
    let (dir, origin) = match flag {
        Some(d) => (d.to_path_buf(), "`--ptx-dir`"),
        None => match std::env::var_os("SBGEN_PTX_DIR").filter(|v| !v.is_empty()) {
            Some(d) => (PathBuf::from(d), "`SBGEN_PTX_DIR`"),
            None => return Ok(None),
        },
    };
    if !dir.is_dir() {
        return Err(UsageError::new(format!("{origin} `{}` is not a folder", dir.display())));
    }
    Ok(Some(dir))
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
