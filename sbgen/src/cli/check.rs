//! `sbgen check`: every supported spec against the float64 reference on the GPU (see
//! [`crate::gpu::check`] for what is checked), or `--emit-ptx DIR` to compile the selection's
//! kernels to PTX on a machine without a GPU (for a GPU machine without a CUDA toolchain).

use super::emit::{PassChoice, ScheduleArgs};
use super::progress;
use super::{Outcome, UsageError};
use crate::artifact::{self, store::PtxDir, Verdict};
use crate::compile::Compiler;
use crate::gpu::check::{self, CheckPlan};
use crate::gpu::data::Regime;
use crate::gpu::decode::CacheKind;
use crate::gpu::decode_check::{self, DecodeCheckPlan, SplitChoice};
use crate::gpu::failure;
use crate::gpu::{Device, KernelBuilder};
use crate::ir::{Arch, Dtype, Layout, Mask, Pass, Remainder, Schedule};
use crate::lower::lower;
use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Args)]
#[command(after_help = "Tolerances: relative L2 error against float64 on the same dtype-rounded inputs, \
forward o and rem <= 5e-3, dq/dk/dv <= 1e-2; outputs are poisoned with NaN before each run, so an \
unwritten element fails. Exit status: 0 all passed, 1 a failure or no CUDA device, 2 bad usage.")]
pub struct CheckArgs {
    /// A subset: N in {17, 1000} instead of {1, 17, 64, 1000, 4097}.
    #[arg(long)]
    pub quick: bool,
    /// Head dimensions, comma-separated, any of 1..=256 (default: 64,128).
    #[arg(long, value_delimiter = ',')]
    pub head_dim: Vec<u32>,
    /// Element types, comma-separated (default: bf16,f16).
    #[arg(long, value_delimiter = ',')]
    pub dtype: Vec<Dtype>,
    /// Which passes to check.
    #[arg(long, value_enum, default_value_t = PassChoice::Both)]
    pub pass: PassChoice,
    /// Masks, comma-separated (default: strict,attend_current).
    #[arg(long, value_delimiter = ',')]
    pub mask: Vec<Mask>,
    /// Layouts, comma-separated: bhnd, bnhd, thd (default: bhnd,bnhd). THD runs every dense group as
    /// a packed batch of equal sequences, and the `--varlen` batch. Decode: the caches, bhnd, bnhd,
    /// paged (default: all three).
    #[arg(long, value_delimiter = ',')]
    pub layout: Vec<Layout>,
    /// Remainder handling, comma-separated (default: return,fuse).
    #[arg(long, value_delimiter = ',')]
    pub remainder: Vec<Remainder>,
    /// Early-exit settings, comma-separated: `off` or T bits (default: off,24).
    #[arg(long, value_delimiter = ',', value_parser = parse_early_exit)]
    pub early_exit: Vec<EarlyExit>,
    /// Data regimes, comma-separated: random, long_reach, sharp (default: all three).
    #[arg(long, value_delimiter = ',')]
    pub regime: Vec<Regime>,
    /// Sequence lengths, comma-separated (overrides --quick). Decode: the cached lengths of the one
    /// batch each group runs (default 1,17,1000,65537; --quick without 65537).
    #[arg(long, value_delimiter = ',')]
    pub seq: Vec<usize>,
    /// Query heads per K/V head, comma-separated: group sizes and/or `mqa` (default: 1, multi-head;
    /// decode: 1,4).
    #[arg(long, value_delimiter = ',')]
    pub kv_groups: Vec<check::KvHeads>,
    /// Lengths of a packed batch checked in the THD layout, comma-separated (e.g. 0,1,17,1000,4097;
    /// adds thd to the layouts when they are not given).
    #[arg(long, value_delimiter = ',')]
    pub varlen: Vec<usize>,
    /// Backward variants, comma-separated: off (the default backward), on (deterministic: also run
    /// twice and compared bit for bit) (default: off).
    #[arg(long, value_delimiter = ',', value_parser = parse_on_off)]
    pub deterministic: Vec<bool>,
    /// Decode, paged cache: page sizes, comma-separated (default: 16,32,64).
    #[arg(long, value_delimiter = ',')]
    pub page_size: Vec<usize>,
    /// Decode: how the keys are split, comma-separated: default (the launcher's choice for the GPU),
    /// fine (one CTA per head group looping over one-block chunks) (default: both).
    #[arg(long, value_delimiter = ',', value_parser = parse_split)]
    pub split: Vec<SplitChoice>,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Seed of the random inputs (default: from the clock; printed so a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Folder of prebuilt PTX (from `--emit-ptx`); default `$SBGEN_PTX_DIR`. Kernels not found
    /// there are compiled with NVRTC.
    #[arg(long, value_name = "DIR")]
    pub ptx_dir: Option<PathBuf>,
    /// Compile every kernel of the selection to PTX into DIR and exit (no GPU needed). A kernel that
    /// spills registers is reported as SPILL and not written (as `sbgen tune` refuses it).
    #[arg(long, value_name = "DIR")]
    pub emit_ptx: Option<PathBuf>,
    /// Target for --emit-ptx: sm_80 or sm_90 (sm_90a). On a GPU the device decides.
    #[arg(long, default_value = "sm_90")]
    pub arch: Arch,
    /// Threads for the float64 reference (default: `$SBGEN_THREADS` or all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print only failing rows (and the summary).
    #[arg(long)]
    pub failures_only: bool,
}

/// An early-exit setting: `None` is off.
pub type EarlyExit = Option<u32>;

/// `off` (or `none`) or a number of bits.
pub fn parse_early_exit(s: &str) -> Result<EarlyExit, String> {
    match s.to_ascii_lowercase().as_str() {
        "off" | "none" | "full" => Ok(None),
        t => t
            .parse::<u32>()
            .map(Some)
            .map_err(|_| format!("`early_exit` = `{s}` is not valid: allowed off or T bits (e.g. 24)")),
    }
}

/// `default` or `fine`.
pub fn parse_split(s: &str) -> Result<SplitChoice, String> {
    match s.to_ascii_lowercase().as_str() {
        "default" => Ok(SplitChoice::Default),
        "fine" => Ok(SplitChoice::Fine),
        _ => Err(format!("`split` = `{s}` is not valid: allowed default, fine")),
    }
}

/// `on`/`off` (or true/false, yes/no).
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("`deterministic` = `{s}` is not valid: allowed on, off")),
    }
}

pub fn passes(choice: PassChoice) -> Vec<Pass> {
    match choice {
        PassChoice::Fwd => vec![Pass::Forward],
        PassChoice::Bwd => vec![Pass::Backward],
        PassChoice::Both => vec![Pass::Forward, Pass::Backward],
        PassChoice::Decode => vec![Pass::Decode],
    }
}

/// The schedule the flags ask for, or `None` (each spec's default) when no flag is given.
pub fn schedule_override(args: &ScheduleArgs) -> Option<Schedule> {
    let any = args.block_m.is_some()
        || args.block_n.is_some()
        || args.warps.is_some()
        || args.stages.is_some()
        || args.softplus.is_some()
        || args.cumsum.is_some()
        || args.mma.is_some()
        || args.loads.is_some()
        || args.pingpong;
    any.then(|| args.schedule())
}

/// How a report names the schedule.
pub fn describe_schedule(schedule: Option<Schedule>) -> String {
    match schedule {
        Some(s) => s.to_string(),
        None => "per-spec defaults (Schedule::default_on)".to_string(),
    }
}

/// The plan the arguments select, validated (every spec and the schedule) before any work.
pub fn plan(args: &CheckArgs, seed: u64) -> Result<CheckPlan> {
    let mut plan = if args.quick { CheckPlan::quick(seed) } else { CheckPlan::full(seed) };
    fn take<T: Clone>(from: &[T], into: &mut Vec<T>) {
        if !from.is_empty() {
            *into = from.to_vec();
        }
    }
    take(&args.head_dim, &mut plan.head_dims);
    take(&args.dtype, &mut plan.dtypes);
    take(&args.mask, &mut plan.masks);
    take(&args.layout, &mut plan.layouts);
    take(&args.remainder, &mut plan.remainders);
    take(&args.early_exit, &mut plan.early_exits);
    take(&args.regime, &mut plan.regimes);
    take(&args.seq, &mut plan.seqs);
    take(&args.kv_groups, &mut plan.kv_heads);
    take(&args.varlen, &mut plan.varlen);
    take(&args.deterministic, &mut plan.deterministic);
    if !args.varlen.is_empty() {
        if args.layout.is_empty() {
            plan.layouts.push(Layout::Thd);
        } else if !args.layout.contains(&Layout::Thd) {
            return Err(UsageError::new(
                "`--varlen` runs in the THD layout: add `thd` to `--layout` (or leave `--layout` out)",
            )
            .into());
        }
    }
    if !plan.varlen.is_empty() && plan.varlen.iter().all(|&n| n == 0) {
        return Err(UsageError::new("`varlen` lengths are all 0: at least one sequence must have a token").into());
    }
    plan.passes = passes(args.pass);
    plan.schedule = schedule_override(&args.schedule);
    if let Some(t) = args.threads {
        plan.threads = t.max(1);
    }
    if let Some(&bad) = plan.seqs.iter().find(|&&n| n == 0) {
        return Err(UsageError::new(format!("`seq` = {bad} is not allowed: at least 1")).into());
    }
    for spec in plan.specs() {
        KernelBuilder::new(args.arch, None).kernel(spec, plan.schedule).validate().map_err(UsageError::new)?;
    }
    Ok(plan)
}

/// The decode plan the arguments select, validated before any work.
// `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
#[allow(clippy::manual_is_multiple_of)]
pub fn decode_plan(args: &CheckArgs, seed: u64) -> Result<DecodeCheckPlan> {
    let mut plan = if args.quick { DecodeCheckPlan::quick(seed) } else { DecodeCheckPlan::full(seed) };
    let refuse = |flag: &str, why: &str| -> anyhow::Error { UsageError::new(format!("`{flag}` {why}")).into() };
    if !args.varlen.is_empty() {
        return Err(refuse("--varlen", "is the THD layout's: a decode's lengths are `--seq`"));
    }
    if !args.deterministic.is_empty() {
        return Err(refuse("--deterministic", "is the backward's: a decode is always deterministic"));
    }
    fn take<T: Clone>(from: &[T], into: &mut Vec<T>) {
        if !from.is_empty() {
            *into = from.to_vec();
        }
    }
    take(&args.head_dim, &mut plan.head_dims);
    take(&args.dtype, &mut plan.dtypes);
    take(&args.mask, &mut plan.masks);
    take(&args.remainder, &mut plan.remainders);
    take(&args.early_exit, &mut plan.early_exits);
    take(&args.regime, &mut plan.regimes);
    take(&args.seq, &mut plan.seqlens);
    take(&args.kv_groups, &mut plan.kv_heads);
    take(&args.split, &mut plan.splits);
    let page_sizes = if args.page_size.is_empty() { decode_check::PAGE_SIZES.to_vec() } else { args.page_size.clone() };
    if let Some(&bad) = page_sizes.iter().find(|&&p| p == 0 || p % 16 != 0 || p > 4096) {
        return Err(
            UsageError::new(format!("`page_size` = {bad} is not allowed: a multiple of 16, at most 4096")).into()
        );
    }
    if !args.layout.is_empty() {
        let mut caches = Vec::new();
        for &layout in &args.layout {
            match layout {
                Layout::Bhnd | Layout::Bnhd => caches.push(CacheKind::Contiguous(layout)),
                Layout::Paged => caches.extend(page_sizes.iter().map(|&page_size| CacheKind::Paged { page_size })),
                Layout::Thd => return Err(refuse("--layout thd", "is not a KV cache: allowed bhnd, bnhd, paged")),
            }
        }
        plan.caches = caches;
    } else {
        plan.caches.retain(|c| !matches!(c, CacheKind::Paged { .. }));
        plan.caches.extend(page_sizes.iter().map(|&page_size| CacheKind::Paged { page_size }));
    }
    if plan.seqlens.iter().any(|&n| n > i32::MAX as usize / 2) {
        return Err(UsageError::new("`seq`: a cached length is at most 2^30").into());
    }
    if plan.seqlens.iter().all(|&n| n == 0) {
        return Err(UsageError::new("`seq` lengths are all 0: at least one sequence must have a token").into());
    }
    plan.schedule = schedule_override(&args.schedule);
    if let Some(t) = args.threads {
        plan.threads = t.max(1);
    }
    for spec in plan.specs() {
        KernelBuilder::new(args.arch, None).kernel(spec, plan.schedule).validate().map_err(UsageError::new)?;
    }
    Ok(plan)
}

pub fn run(args: &CheckArgs, out: &mut dyn Write) -> Result<Outcome> {
    let seed =
        args.seed.unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
    if args.pass == PassChoice::Decode {
        return run_decode(args, seed, out);
    }
    if !args.page_size.is_empty() || !args.split.is_empty() {
        return Err(UsageError::new("`--page-size` and `--split` are the decode's: add `--pass decode`").into());
    }
    let plan = plan(args, seed)?;
    if let Some(dir) = &args.emit_ptx {
        return emit_ptx(&plan.kernels(&KernelBuilder::new(args.arch, None)), plan.threads, args, dir, out);
    }
    // A PTX folder that is not there is the user's to fix, before the GPU is opened.
    let ptx_dir = super::ptx_dir(args.ptx_dir.as_deref())?;
    let dev = Device::open(args.device)?;
    let builder = KernelBuilder::new(dev.arch, ptx_dir);
    writeln!(out, "device: {}", dev.describe())?;
    writeln!(
        out,
        "seed: {seed} (repeat with --seed {seed}); schedule {}; PTX from {}; reference threads {}",
        describe_schedule(plan.schedule),
        builder.ptx_dir().map_or("NVRTC".to_string(), |d| format!("`{}` (else NVRTC)", d.display())),
        plan.threads
    )?;
    if plan.passes.contains(&Pass::Backward) && plan.remainders.contains(&Remainder::Fuse) {
        writeln!(
            out,
            "dq/dk: floored: with a fused remainder, relative to max(||fused||, ||unfused||) of the reference \
             gradient (the plain relative error is undefined where they cancel: N = 1, attend_current)"
        )?;
    }
    writeln!(
        out,
        "query heads per K/V head: {}; packed (THD) batch: {}; deterministic backward: {}",
        plan.kv_heads.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(","),
        if plan.varlen.is_empty() || !plan.layouts.contains(&Layout::Thd) {
            "none".to_string()
        } else {
            format!("lengths {:?}", plan.varlen)
        },
        plan.deterministic.iter().map(|&d| if d { "on" } else { "off" }).collect::<Vec<_>>().join(",")
    )?;
    report_rows(args, seed, plan.rows(), out, |sink| check::run(&dev, &builder, &plan, sink))
}

/// `check --pass decode`: the decode plan on the GPU, or its kernels' PTX with `--emit-ptx`.
fn run_decode(args: &CheckArgs, seed: u64, out: &mut dyn Write) -> Result<Outcome> {
    let plan = decode_plan(args, seed)?;
    if let Some(dir) = &args.emit_ptx {
        return emit_ptx(&plan.kernels(&KernelBuilder::new(args.arch, None)), plan.threads, args, dir, out);
    }
    let ptx_dir = super::ptx_dir(args.ptx_dir.as_deref())?;
    let dev = Device::open(args.device)?;
    let builder = KernelBuilder::new(dev.arch, ptx_dir);
    writeln!(out, "device: {}", dev.describe())?;
    writeln!(
        out,
        "seed: {seed} (repeat with --seed {seed}); schedule {}; PTX from {}; reference threads {}",
        describe_schedule(plan.schedule),
        builder.ptx_dir().map_or("NVRTC".to_string(), |d| format!("`{}` (else NVRTC)", d.display())),
        plan.threads
    )?;
    writeln!(
        out,
        "decode: one batch of cached lengths {:?} per group (N = the cache's capacity); caches {}; splits {}; \
         query heads per K/V head {}",
        plan.seqlens,
        plan.caches.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
        plan.splits.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
        plan.kv_heads.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(","),
    )?;
    report_rows(args, seed, plan.rows(), out, |sink| decode_check::run(&dev, &builder, &plan, sink))
}

/// Runs a check, printing its table as the rows come (all, or the failing ones with
/// `--failures-only`), then the failure details and the summary line. The progress of the `total`
/// rows planned is on stderr.
fn report_rows(
    args: &CheckArgs,
    seed: u64,
    total: usize,
    out: &mut dyn Write,
    run: impl FnOnce(&mut dyn FnMut(&failure::Row)) -> Result<Vec<failure::Row>, crate::gpu::GpuError>,
) -> Result<Outcome> {
    writeln!(out, "{}", failure::header())?;
    out.flush()?;
    let start = Instant::now();
    let progress = progress::start(total as u64, "kernel runs");
    let mut write_error = None;
    let result = run(&mut |row| {
        progress.inc(1);
        if (!args.failures_only || !row.passed()) && write_error.is_none() {
            if let Err(e) = progress::write_line(&*progress, out, &failure::format_row(row)) {
                write_error = Some(e);
            }
        }
    });
    progress.finish();
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let rows = result?;
    let failed = rows.iter().filter(|r| !r.passed()).count();
    details(&rows, out)?;
    writeln!(
        out,
        "check: {} passed, {failed} failed ({} kernel runs in {:.1} s, seed {seed})",
        rows.len() - failed,
        rows.len(),
        start.elapsed().as_secs_f64()
    )?;
    Ok(if failed == 0 && !rows.is_empty() { Outcome::Success } else { Outcome::Failure })
}

/// The full text of failures the table shortened (compiler and driver messages), each once.
fn details(rows: &[failure::Row], out: &mut dyn Write) -> Result<()> {
    const MAX_SHOWN: usize = 10;
    const MAX_LINES: usize = 40;
    let mut seen: Vec<String> = Vec::new();
    for f in rows.iter().flat_map(|r| r.failures.iter()) {
        let text = f.to_string();
        if failure::short(&text) != text && !seen.contains(&text) {
            seen.push(text);
        }
    }
    if seen.is_empty() {
        return Ok(());
    }
    writeln!(out, "--- failure details ({} distinct, first {} shown)", seen.len(), seen.len().min(MAX_SHOWN))?;
    for f in seen.iter().take(MAX_SHOWN) {
        for line in f.lines().take(MAX_LINES) {
            writeln!(out, "  {line}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// Compiles every kernel of the plan for `args.arch` in parallel ([`artifact::build`] on
/// [`crate::pool::map`], counted on the progress bar or lines) and
/// stores the PTX of each one that compiles without spilling into `dir`; a spilling kernel is
/// reported as SPILL and not written, as `sbgen tune` refuses it.
fn emit_ptx(
    kernels: &[crate::ir::Kernel],
    threads: usize,
    args: &CheckArgs,
    dir: &std::path::Path,
    out: &mut dyn Write,
) -> Result<Outcome> {
    // A folder that cannot hold the PTX is the user's to fix, before minutes of compiling.
    let store = PtxDir::create(dir).map_err(|e| UsageError::new(format!("`--emit-ptx`: {e}")))?;
    let compiler = Compiler::discover()?;
    let start = Instant::now();
    let mut lowered = Vec::with_capacity(kernels.len());
    let mut problems = Vec::new();
    for kernel in kernels {
        match lower(kernel) {
            Ok(l) => lowered.push(l),
            Err(e) => problems.push(format!("FAIL {}: {e}", kernel.name())),
        }
    }
    let mut written = 0;
    let progress = progress::start(lowered.len() as u64, "kernels compiled");
    let built = crate::pool::map(&lowered, threads, |l| {
        let artifact = artifact::build(l, &compiler);
        progress.inc(1);
        artifact
    });
    progress.finish();
    for artifact in built {
        let name = &artifact.lowered.name;
        match &artifact.verdict {
            Verdict::Ok => match store.write(&artifact) {
                Ok(_) => written += 1,
                Err(e) => problems.push(format!("FAIL {name}: {e}")),
            },
            Verdict::Spill { bytes } => {
                problems.push(format!("SPILL {name}: spills {bytes} bytes (ptxas), no PTX written"))
            }
            Verdict::Error(e) => problems.push(format!("FAIL {name}: {e}")),
        }
    }
    for line in &problems {
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "emit-ptx: {written} of {} kernels compiled for {} into `{}` in {:.1} s",
        kernels.len(),
        args.arch.compile_target(),
        dir.display(),
        start.elapsed().as_secs_f64()
    )?;
    Ok(if problems.is_empty() { Outcome::Success } else { Outcome::Failure })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: CheckArgs,
    }

    fn parse(argv: &[&str]) -> CheckArgs {
        Wrap::try_parse_from(std::iter::once("check").chain(argv.iter().copied())).unwrap().args
    }

    #[test]
    fn defaults_select_the_full_matrix() {
        let p = plan(&parse(&[]), 1).unwrap();
        assert_eq!(p.specs().len(), 128);
        assert_eq!(p.seqs, check::FULL_SEQS);
        assert_eq!(p.early_exits, vec![None, Some(24)]);
    }

    #[test]
    fn filters_narrow_the_matrix() {
        let p = plan(
            &parse(&[
                "--quick",
                "--head-dim",
                "64",
                "--dtype",
                "bf16",
                "--pass",
                "fwd",
                "--early-exit",
                "off",
                "--regime",
                "sharp",
            ]),
            1,
        )
        .unwrap();
        assert_eq!(p.specs().len(), 2 * 2 * 2);
        assert_eq!(p.seqs, check::QUICK_SEQS);
        assert_eq!(p.regimes, vec![Regime::Sharp]);
        let p = plan(&parse(&["--seq", "5,9", "--early-exit", "24"]), 1).unwrap();
        assert_eq!(p.seqs, vec![5, 9]);
        assert_eq!(p.early_exits, vec![Some(24)]);
        let p = plan(&parse(&["--varlen", "0,1,17", "--kv-groups", "2,mqa", "--deterministic", "off,on"]), 1).unwrap();
        assert_eq!(p.layouts, vec![Layout::Bhnd, Layout::Bnhd, Layout::Thd]);
        assert_eq!(p.kv_heads, vec![check::KvHeads::Group(2), check::KvHeads::Mqa]);
        assert_eq!(p.deterministic, vec![false, true]);
    }

    #[test]
    fn bad_values_are_usage_errors_naming_the_field() {
        let e = plan(&parse(&["--head-dim", "300"]), 1).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some());
        assert!(e.to_string().contains("`head_dim` = 300"), "{e}");
        assert!(plan(&parse(&["--head-dim", "96,50,256"]), 1).is_ok());
        let e = plan(&parse(&["--varlen", "0,1", "--layout", "bhnd"]), 1).unwrap_err();
        assert!(e.to_string().contains("add `thd` to `--layout`"), "{e}");
        let e = plan(&parse(&["--varlen", "0,0"]), 1).unwrap_err();
        assert!(e.to_string().contains("`varlen` lengths are all 0"), "{e}");
        assert!(parse_on_off("maybe").unwrap_err().contains("`deterministic`"));
        let e = plan(&parse(&["--early-exit", "2"]), 1).unwrap_err();
        assert!(e.to_string().contains("early_exit_bits"), "{e}");
        let e = plan(&parse(&["--seq", "0"]), 1).unwrap_err();
        assert!(e.to_string().contains("`seq` = 0"), "{e}");
        assert!(parse_early_exit("soon").unwrap_err().contains("`early_exit`"));
    }

    /// The head_dim 128 forward with 64 x 128 tiles spills on sm_90a (the search space excludes it
    /// for that): `--emit-ptx` reports it as SPILL and writes no PTX for it, as the
    /// tuner refuses it. Skipped without the CUDA toolchain.
    #[test]
    fn emit_ptx_reports_a_spilling_kernel_and_writes_nothing_for_it() {
        if let Err(e) = crate::compile::Compiler::discover() {
            eprintln!("skipped: {e}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("sbgen-check-emit-spill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let dir_arg = dir.to_str().unwrap();
        let args = parse(&[
            "--emit-ptx",
            dir_arg,
            "--arch",
            "sm_90",
            "--head-dim",
            "128",
            "--dtype",
            "bf16",
            "--pass",
            "fwd",
            "--mask",
            "strict",
            "--layout",
            "bhnd",
            "--remainder",
            "return",
            "--early-exit",
            "off",
            // 128-key blocks on 4 warps: 64-72 bytes of spills under ptxas 13.0 (the search space
            // excludes them; docs/performance.md#known-spills).
            "--block-n",
            "128",
            "--stages",
            "2",
        ]);
        let mut out = Vec::new();
        let outcome = run(&args, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let written = std::fs::read_dir(&dir).map_or(0, |d| d.count());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(text.contains("SPILL") && text.contains("spills"), "{text}");
        assert_eq!(written, 0, "the spilling kernel's PTX was written: {text}");
        assert_eq!(outcome, Outcome::Failure, "{text}");
    }
}
