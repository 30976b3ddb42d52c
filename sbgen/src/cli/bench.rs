//! `sbgen bench`: forward and forward+backward timings (see [`crate::gpu::bench`]).

use super::check::{parse_early_exit, EarlyExit};
use super::emit::ScheduleArgs;
use super::{Outcome, UsageError};
use crate::gpu::bench::{self, BenchPlan};
use crate::gpu::{Device, KernelBuilder};
use crate::ir::{Dtype, Layout, Mask, Pass, Remainder, Spec};
use anyhow::{Context, Result};
use clap::Args;
use sbgen_runtime::reference::Shape;
use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Args)]
#[command(after_help = "TFLOP/s counts 4*B*H*N^2*D/2 for the forward and 3.5 times that for forward+backward \
(docs/performance.md#counting), so figures compare with softmax attention on the same work. Each kernel is \
checked against the float64 reference on N = 256 first; a kernel that fails is reported and not timed (exit 1).")]
pub struct BenchArgs {
    /// Shapes as B,H,N,D (default: 8,16,2048,128 4,16,4096,128 2,16,8192,128 1,16,16384,128 4,16,4096,64).
    #[arg(long, num_args = 1.., value_parser = parse_shape)]
    pub shapes: Vec<Shape>,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Timed repetitions per configuration (the median is reported); at least 20.
    #[arg(long, default_value_t = 30)]
    pub reps: usize,
    /// Untimed launches before timing.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Input sets rotated through.
    #[arg(long, default_value_t = 3)]
    pub sets: usize,
    /// Time the forward only.
    #[arg(long)]
    pub fwd_only: bool,
    /// Early-exit settings, comma-separated: `off` or T bits (default: off,24).
    #[arg(long, value_delimiter = ',', value_parser = parse_early_exit)]
    pub early_exit: Vec<EarlyExit>,
    /// Element type.
    #[arg(long, default_value_t = Dtype::Bf16)]
    pub dtype: Dtype,
    /// Causal mask.
    #[arg(long, default_value_t = Mask::Strict)]
    pub mask: Mask,
    /// Layout.
    #[arg(long, default_value_t = Layout::Bhnd)]
    pub layout: Layout,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Folder of prebuilt PTX (from `sbgen check --emit-ptx`); default `$SBGEN_PTX_DIR`.
    #[arg(long, value_name = "DIR")]
    pub ptx_dir: Option<PathBuf>,
}

/// `B,H,N,D`.
pub fn parse_shape(s: &str) -> Result<Shape, String> {
    let parts: Vec<usize> = s
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("`shape` = `{s}` is not valid: expected B,H,N,D (four positive integers)"))?;
    match parts[..] {
        [b, h, n, d] if b > 0 && h > 0 && n > 0 && d > 0 => Ok(Shape::new(b, h, n, d)),
        _ => Err(format!("`shape` = `{s}` is not valid: expected B,H,N,D (four positive integers)")),
    }
}

/// The plan the arguments select, validated.
pub fn plan(args: &BenchArgs) -> Result<BenchPlan> {
    let mut plan = BenchPlan::new(args.seed);
    if !args.shapes.is_empty() {
        plan.shapes = args.shapes.clone();
    }
    if !args.early_exit.is_empty() {
        plan.early_exits = args.early_exit.clone();
    }
    if args.reps < 20 {
        return Err(UsageError::new(format!("`reps` = {} is not allowed: at least 20", args.reps)).into());
    }
    if args.sets == 0 {
        return Err(UsageError::new("`sets` = 0 is not allowed: at least 1").into());
    }
    plan.reps = args.reps;
    plan.warmup = args.warmup;
    plan.sets = args.sets;
    plan.backward = !args.fwd_only;
    plan.dtype = args.dtype;
    plan.mask = args.mask;
    plan.layout = args.layout;
    plan.schedule = super::check::schedule_override(&args.schedule);
    for shape in &plan.shapes {
        for &ee in &plan.early_exits {
            for pass in [Pass::Forward, Pass::Backward] {
                let spec = Spec {
                    head_dim: shape.head_dim as u32,
                    dtype: plan.dtype,
                    mask: plan.mask,
                    layout: plan.layout,
                    remainder: Remainder::Return,
                    pass,
                    early_exit_bits: ee,
                    deterministic: false,
                };
                KernelBuilder::new(crate::ir::Arch::Sm90, None)
                    .kernel(spec, plan.schedule)
                    .validate()
                    .map_err(UsageError::new)?;
            }
        }
    }
    Ok(plan)
}

pub fn run(args: &BenchArgs, out: &mut dyn Write) -> Result<Outcome> {
    let plan = plan(args)?;
    // A PTX folder that is not there is the user's to fix, before the GPU is opened.
    let ptx_dir = super::ptx_dir(args.ptx_dir.as_deref())?;
    let dev = Device::open(args.device)?;
    let builder = KernelBuilder::new(dev.arch, ptx_dir);
    writeln!(out, "device: {}", dev.describe())?;
    writeln!(
        out,
        "{} {} {}, schedule {}; median of {} reps ({} warm-up, {} rotating input sets)",
        plan.dtype,
        plan.mask,
        plan.layout,
        super::check::describe_schedule(plan.schedule),
        plan.reps,
        plan.warmup,
        plan.sets
    )?;
    writeln!(out, "{}", bench::header())?;
    out.flush()?;
    let mut write_error = None;
    let result = bench::run(&dev, &builder, &plan, &mut |r| {
        if write_error.is_none() {
            if let Err(e) = writeln!(out, "{}", bench::format_result(r)).and_then(|_| out.flush()) {
                write_error = Some(e);
            }
        }
    });
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let results = result?;
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "gpu": dev.name,
            "device": dev.describe(),
            "compute_capability": format!("{}.{}", dev.compute_capability.0, dev.compute_capability.1),
            "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "sbgen_version": env!("CARGO_PKG_VERSION"),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "dtype": plan.dtype.to_string(),
            "mask": plan.mask.to_string(),
            "layout": plan.layout.to_string(),
            "schedule": super::check::describe_schedule(plan.schedule),
            "reps": plan.reps,
            "flops": "fwd 4*B*H*N^2*D/2, fwd+bwd 3.5x that",
            "results": results,
        });
        let text = serde_json::to_string_pretty(&doc)? + "\n";
        std::fs::write(path, text).with_context(|| format!("cannot write `{}`", path.display()))?;
        writeln!(out, "wrote `{}`", path.display())?;
    }
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    Ok(if failed == 0 { Outcome::Success } else { Outcome::Failure })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shapes() {
        assert_eq!(parse_shape("4,16,4096,64").unwrap(), Shape::new(4, 16, 4096, 64));
        assert!(parse_shape("4,16,4096").unwrap_err().contains("B,H,N,D"));
        assert!(parse_shape("4,0,4096,64").is_err());
        assert!(parse_shape("a,b,c,d").is_err());
    }
}
