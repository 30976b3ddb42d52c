//! `sbgen run`: one kernel on tensors from a safetensors file (see [`crate::gpu::run`]).

use super::emit::{PassChoice, ScheduleArgs, SpecArgs};
use super::{Outcome, UsageError};
use crate::files;
use crate::gpu::run::{self, RunError, RunPass, RunRequest};
use crate::gpu::run_decode::{self, DecodeRequest};
use crate::gpu::{Device, KernelBuilder};
use crate::ir::{Arch, Kernel, Schedule};
use anyhow::Result;
use clap::Args;
use sbgen_runtime::launcher::KvCacheGeometry;
use std::io::Write;
use std::path::PathBuf;

const TENSORS_HELP: &str = "\
Input tensors (safetensors, names exact; B batch, H heads, H_kv K/V heads, N sequence, D head dimension,
T tokens of a packed batch):
              --layout bhnd      --layout bnhd      --layout thd (--varlen)
  q           [B, H, N, D]       [B, N, H, D]       [T, H, D]          BF16 or F16
  k, v        [B, H_kv, N, D]    [B, N, H_kv, D]    [T, H_kv, D]       q's dtype
  do          as q               as q               as q               q's dtype; for --pass bwd and both
  drem        [B, H, N]          [B, H, N]          [H, T]             F32 (BF16, F16, F64 converted);
                                                                       optional: absent means no
                                                                       gradient flows into rem
  cu_seqlens  (refused)          (refused)          [B + 1]            I32: sequence b is tokens
                                                                       cu_seqlens[b]..cu_seqlens[b+1]
H_kv must divide H (grouped-query attention; H_kv = 1 is multi-query). cu_seqlens must start at 0, never
decrease and end at T (an error names the first bad index); empty sequences are allowed, but a batch of
only empty sequences is refused. N of a packed batch is its longest sequence.
Output tensors:
  o           q's dtype and shape (o + rem * v with --remainder fuse)
  rem         F32 [B, H, N] (thd: [H, T]), the stick left over
  log2_rem    F32, rem's shape
  dq          q's dtype and shape       } with --pass bwd or both (the forward runs first to give
  dk, dv      k's dtype and shape       } o and log2_rem); --deterministic makes them bit-identical
The dtype comes from q, D from q's last dimension (any of 1..=256). Scale defaults to 1/sqrt(D).
Exit status: 0 done; 1 no CUDA device, a kernel failure or NaN/infinite outputs; 2 a missing, misshapen
or repeated tensor, a bad cu_seqlens, an input that is not a regular file, an output that is the input,
a folder or in a missing or unwritable folder, or a bad option (all found before the GPU is opened).";

#[derive(Debug, Args)]
#[command(after_long_help = TENSORS_HELP)]
pub struct RunArgs {
    /// Input safetensors file with q, k, v (and do, drem for the backward; cu_seqlens for thd).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Output safetensors file (o, rem, log2_rem; dq, dk, dv for the backward). Checked before the
    /// GPU is opened: not the input, in an existing writable folder; written atomically.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Which passes to run.
    #[arg(long, value_enum, default_value_t = PassChoice::Fwd)]
    pub pass: PassChoice,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Score scale (default 1/sqrt(D)); may be negative (`--scale -0.5`).
    #[arg(long, allow_negative_numbers = true)]
    pub scale: Option<f32>,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Folder of prebuilt PTX (from `sbgen check --emit-ptx`); default `$SBGEN_PTX_DIR`. It must exist.
    #[arg(long, value_name = "DIR")]
    pub ptx_dir: Option<PathBuf>,
}

pub fn run(args: &RunArgs, out: &mut dyn Write) -> Result<Outcome> {
    // Everything the user must fix is reported before a GPU is opened: flags, the output path (so
    // a run is not spent on a path that cannot be written, or on replacing the input), the input
    // file and the kernels.
    if let Some(s) = args.scale {
        if !s.is_finite() || s == 0.0 {
            return Err(UsageError::new(format!("`scale` = {s} is not allowed: it must be finite and non-zero")).into());
        }
    }
    if args.pass == PassChoice::Decode {
        return run_decode(args, out);
    }
    let ptx_dir = super::ptx_dir(args.ptx_dir.as_deref())?;
    files::check_output(&args.output, &[&args.input]).map_err(|e| UsageError::new(format!("`--output`: {e}")))?;
    let req = request(args);
    let loaded = run::load(&req).map_err(usage)?;
    let sizes = loaded.sizes();
    let kernel = |pass, arch| {
        let spec = loaded.spec(&req, pass);
        Kernel::new(spec, req.schedule.unwrap_or_else(|| Schedule::default_on(&spec, arch)), arch)
    };
    // The device's arch is known only once it is open; before that, a kernel that no supported arch
    // can run is refused (checking one arch's limits alone would refuse schedules another runs, or
    // let through ones the device cannot), and after it, the device's own limits decide, still
    // before any kernel runs.
    for &pass in req.passes() {
        let refused: Vec<_> = Arch::ALL.iter().filter_map(|&arch| kernel(pass, arch).validate().err()).collect();
        if refused.len() == Arch::ALL.len() {
            // The last arch has the largest limits, so its reason is the one that matters.
            if let Some(e) = refused.last() {
                return Err(UsageError::new(e).into());
            }
        }
    }
    let dev = Device::open(args.device)?;
    for &pass in req.passes() {
        kernel(pass, dev.arch)
            .validate()
            .map_err(|e| UsageError::new(format!("{e} (on {}, which runs {} kernels)", dev.describe(), dev.arch)))?;
    }
    let builder = KernelBuilder::new(dev.arch, ptx_dir);
    let report = run::run(&dev, &builder, &req, loaded).map_err(usage)?;
    print_report(&report, &sizes, &dev, args, out)
}

/// `run --pass decode`: checks the flags, the output path and the input file before the GPU, then
/// runs the decode kernel of the spec on the file's cache.
fn run_decode(args: &RunArgs, out: &mut dyn Write) -> Result<Outcome> {
    if let Some(s) = args.scale {
        if !s.is_finite() || s == 0.0 {
            return Err(UsageError::new(format!("`scale` = {s} is not allowed: it must be finite and non-zero")).into());
        }
    }
    if args.spec.deterministic {
        return Err(UsageError::new("`--deterministic` is the backward's: a decode is always deterministic").into());
    }
    let ptx_dir = super::ptx_dir(args.ptx_dir.as_deref())?;
    files::check_output(&args.output, &[&args.input]).map_err(|e| UsageError::new(format!("`--output`: {e}")))?;
    let req = DecodeRequest {
        input: args.input.clone(),
        output: args.output.clone(),
        mask: args.spec.mask,
        layout: args.spec.layout(),
        remainder: args.spec.remainder,
        early_exit_bits: args.spec.early_exit_bits,
        schedule: super::check::schedule_override(&args.schedule),
        scale: args.scale,
    };
    let loaded = run_decode::load(&req).map_err(usage)?;
    let spec = req.spec(loaded.shape.head_dim as u32, loaded.dtype);
    let kernel = |arch| Kernel::new(spec, req.schedule.unwrap_or_else(|| Schedule::default_on(&spec, arch)), arch);
    let refused: Vec<_> = Arch::ALL.iter().filter_map(|&arch| kernel(arch).validate().err()).collect();
    if let (true, Some(e)) = (refused.len() == Arch::ALL.len(), refused.last()) {
        return Err(UsageError::new(e).into());
    }
    let dev = Device::open(args.device)?;
    let chosen = kernel(dev.arch);
    chosen
        .validate()
        .map_err(|e| UsageError::new(format!("{e} (on {}, which runs {} kernels)", dev.describe(), dev.arch)))?;
    if let KvCacheGeometry::Paged { page_size, .. } = loaded.geometry {
        use sbgen_runtime::launcher::PAGE_RUN;
        if page_size % PAGE_RUN != 0 {
            return Err(UsageError::new(format!(
                "`page_size` = {page_size} (k_cache's dimension 1) is not a multiple of {PAGE_RUN}: allowed \
                 multiples of {PAGE_RUN} (e.g. 16, 32, 64)"
            ))
            .into());
        }
    }
    let sizes = loaded.sizes();
    let builder = KernelBuilder::new(dev.arch, ptx_dir);
    let report = run_decode::run(&dev, &builder, &req, loaded).map_err(usage)?;
    print_report(&report, &sizes, &dev, args, out)
}

/// What a run wrote; exit 1 when an output holds NaN or infinite elements.
fn print_report(
    report: &run::RunReport,
    sizes: &str,
    dev: &Device,
    args: &RunArgs,
    out: &mut dyn Write,
) -> Result<Outcome> {
    writeln!(out, "ran {} on {} ({} [{sizes}])", report.kernels.join(" + "), dev.describe(), report.dtype)?;
    for (name, dims) in &report.written {
        writeln!(out, "  wrote {name} {dims:?}")?;
    }
    writeln!(out, "output: `{}`", args.output.display())?;
    if !report.non_finite.is_empty() {
        for (name, n) in &report.non_finite {
            writeln!(out, "warning: `{name}` has {n} NaN or infinite elements")?;
        }
        return Ok(Outcome::Failure);
    }
    Ok(Outcome::Success)
}

/// The request `args` describe; its specs follow `SpecArgs::spec` (checked by a test below).
fn request(args: &RunArgs) -> RunRequest {
    RunRequest {
        input: args.input.clone(),
        output: args.output.clone(),
        pass: match args.pass {
            PassChoice::Fwd => RunPass::Forward,
            PassChoice::Bwd => RunPass::Backward,
            PassChoice::Both => RunPass::Both,
            PassChoice::Decode => unreachable!("`run` sends the decode to `run_decode` before building a request"),
        },
        mask: args.spec.mask,
        layout: args.spec.layout(),
        remainder: args.spec.remainder,
        early_exit_bits: args.spec.early_exit_bits,
        deterministic: args.spec.deterministic,
        schedule: super::check::schedule_override(&args.schedule),
        scale: args.scale,
    }
}

/// Input errors become usage errors (exit 2); the rest stay as they are (exit 1).
fn usage(e: RunError) -> anyhow::Error {
    match e {
        RunError::Input(m) => UsageError::new(m).into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dtype, Layout, Pass};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(extra: &[&str]) -> RunArgs {
        let base = ["sbgen-run", "-i", "in.safetensors", "-o", "out.safetensors"];
        Cli::parse_from(base.iter().chain(extra)).run
    }

    #[test]
    fn the_request_builds_the_specs_spec_args_would() {
        for extra in [
            &[][..],
            &["--varlen", "--deterministic"][..],
            &["--layout", "bnhd", "--deterministic", "--mask", "attend_current", "--early-exit-bits", "20"][..],
        ] {
            let a = args(extra);
            let req = request(&a);
            for pass in [Pass::Forward, Pass::Backward] {
                assert_eq!(req.spec(96, Dtype::F16, pass), a.spec.spec(96, Dtype::F16, pass), "{extra:?}");
            }
        }
        let req = request(&args(&["--varlen", "--deterministic"]));
        assert_eq!(req.layout, Layout::Thd);
        assert!(req.spec(64, Dtype::Bf16, Pass::Backward).deterministic);
        assert!(!req.spec(64, Dtype::Bf16, Pass::Forward).deterministic);
    }
}
