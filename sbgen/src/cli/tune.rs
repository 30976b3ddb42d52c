//! `sbgen tune`: enumerate the default search space for each requested spec and prune it; then
//!
//! - with `--compile-only` (no GPU): lower and compile every variant in parallel and report
//!   registers, shared memory and spills per variant, then the counts per head_dim (`--emit-ptx DIR`
//!   also writes the PTX of every variant that compiles without spilling, for a GPU machine without
//!   a CUDA toolchain);
//! - otherwise: check every variant against the float64 reference on the GPU, time the survivors
//!   with CUDA events and write the winners to the tuning cache ([`crate::tune`]).

use super::emit::SpecArgs;
use super::progress::{self, Progress};
use super::{Outcome, UsageError};
use crate::artifact::{self, store::PtxDir, Artifact, Verdict};
use crate::cache::{seq_bucket, TuningCache, DEFAULT_CACHE_FILE};
use crate::compile::{Compiled, Compiler};
use crate::files;
use crate::gpu::{Device, GpuError};
use crate::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};
use crate::lower::{lower, Lowered};
use crate::search_space::{variants, Pruned};
use crate::tune::{self as tuner, enumerate::pruned_groups, format_summary_row, summary_header, TunePlan};
use anyhow::{anyhow, Result};
use clap::Args;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Lines of a compiler log printed under a failed variant.
const LOG_LINES: usize = 40;

#[derive(Debug, Args)]
#[command(
    after_help = "Any head_dim 1..=256 can be tuned: a padded one (80) searches the space of its tile (head_dim \
rounded up to a multiple of 32, here 96), and the cache keys on the head_dim itself. GQA and MQA need no tuning of \
their own: the K/V head count is a run-time value, not part of the spec, and the kernels are the same for any \
grouping, so a tuned spec serves every H/H_kv. `--varlen` (= `--layout thd`) tunes the packed layout, timed on B \
sequences of N tokens each (the bucket's length); `--deterministic` tunes the deterministic backward (the forward \
of the same flags is the plain one)."
)]
pub struct TuneArgs {
    /// Target GPU architecture: sm_80 or sm_90 (compiled as sm_90a).
    #[arg(long)]
    pub gpu: Arch,
    /// Lower and compile every variant, without a GPU and without timing.
    #[arg(long)]
    pub compile_only: bool,
    /// Head dimensions, comma-separated: any 1..=256 (32, 64, 96, 128 and 256 are tiles of their own;
    /// others are padded to the next multiple of 32).
    #[arg(long, value_delimiter = ',', default_values_t = [64u32, 128])]
    pub head_dim: Vec<u32>,
    /// Element types, comma-separated (bf16, f16).
    #[arg(long, value_delimiter = ',', default_values_t = [Dtype::Bf16, Dtype::F16])]
    pub dtype: Vec<Dtype>,
    /// Passes, comma-separated (fwd, bwd, decode). A decode is timed on 8 sequences of each `--seq`
    /// cached tokens, 32 query heads on 8 K/V heads, in the `--layout`'s cache (bhnd, bnhd, or paged
    /// with 16-token pages); tune it apart from the forward and backward, whose layouts differ.
    #[arg(long, value_delimiter = ',', default_values_t = [Pass::Forward, Pass::Backward],
          value_parser = parse_tunable_pass)]
    pub pass: Vec<Pass>,
    /// Mask, layout (`--varlen` = thd), remainder, early exit and `--deterministic` (backward) of
    /// every spec tuned (the cache keys on them).
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Parallel compilations, 1 to 256 (default: `SBGEN_THREADS`, else the number of cores).
    #[arg(short = 'j', long, value_parser = clap::value_parser!(u32).range(1..=MAX_JOBS as i64))]
    pub jobs: Option<u32>,
    /// List every pruned candidate (default: one line per distinct reason).
    #[arg(long)]
    pub show_pruned: bool,
    /// With `--compile-only`: write the PTX of every variant that compiles without spilling into DIR
    /// (named as `sbgen check --emit-ptx` names them), for `--ptx-dir` on a GPU machine.
    #[arg(long, value_name = "DIR", requires = "compile_only")]
    pub emit_ptx: Option<PathBuf>,
    /// Sequence lengths to time, comma-separated (1 to 131072); each is a cache bucket (the next power
    /// of two). Every problem has about 2^18 tokens (B * H * N; H = 16, fewer above N = 16384).
    #[arg(long, value_delimiter = ',', default_values_t = tuner::DEFAULT_SEQS.to_vec(), conflicts_with = "compile_only",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=tuner::MAX_SEQ as u64))]
    pub seq: Vec<usize>,
    /// Wall-time budget in seconds for all specs together, counted from the start (compiling and
    /// loading count against it, but are not cut short): once spent, the remaining candidates are
    /// not checked or timed (each spec's default still is) and the report says so. Candidates are
    /// taken nearest the default first. 0 = no limit.
    #[arg(long, default_value_t = tuner::DEFAULT_BUDGET_S, allow_negative_numbers = true, conflicts_with = "compile_only")]
    pub budget_s: f64,
    /// The tuning cache to write (merged with what it holds). Its folder must exist and be writable
    /// (checked before tuning).
    #[arg(long, default_value = DEFAULT_CACHE_FILE, conflicts_with = "compile_only")]
    pub cache: PathBuf,
    /// Folder of prebuilt PTX (from `--compile-only --emit-ptx`); default `SBGEN_PTX_DIR`, else the
    /// variants are compiled here with the CUDA toolchain.
    #[arg(long, value_name = "DIR", conflicts_with = "compile_only")]
    pub ptx_dir: Option<PathBuf>,
    /// Timed repetitions per candidate and sequence length (the median is kept).
    #[arg(long, default_value_t = 20, conflicts_with = "compile_only",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(3..=1000))]
    pub reps: usize,
}

pub fn run(args: &TuneArgs, out: &mut dyn Write) -> Result<Outcome> {
    let specs = specs(args)?;
    if !args.compile_only {
        // The cache's path is checked before any tuning, not found unwritable at the end.
        files::check_output(&args.cache, &[]).map_err(|e| UsageError::new(format!("`--cache`: {e}")))?;
        return gpu_tune(args, specs, out);
    }
    let compiler = Compiler::discover()?;
    let tc = compiler.toolchain();
    let nvrtc = match compiler.nvrtc_version() {
        Some((major, minor)) => format!("NVRTC {major}.{minor}"),
        None => "NVRTC".to_string(),
    };
    writeln!(out, "toolchain: {nvrtc}, ptxas `{}` (found by {})", tc.ptxas.display(), tc.found_by)?;

    let mut items = Vec::new();
    let mut tally = Tally::default();
    for spec in &specs {
        plan_spec(*spec, args, &mut items, &mut tally);
    }
    let jobs = jobs(args);
    let start = Instant::now();
    let emit = match &args.emit_ptx {
        Some(dir) => Some(PtxDir::create(dir).map_err(|e| UsageError::new(format!("`--emit-ptx`: {e}")))?),
        None => None,
    };
    let compiles = items.iter().filter(|i| matches!(i, Item::Compile(_))).count();
    let progress = progress::start(compiles as u64, "variants compiled");
    execute(&items, &compiler, jobs, emit.as_ref(), &*progress, out, &mut tally)?;
    progress.finish();
    for line in tally.head_dim_lines() {
        writeln!(out, "{line}")?;
    }
    writeln!(
        out,
        "pruned {} candidates; {:.1} s with {} parallel jobs",
        tally.pruned,
        start.elapsed().as_secs_f64(),
        crate::pool::threads_for(jobs, compiles)
    )?;
    writeln!(out, "compiled {} variants: {} failed, {} spilling", tally.compiled, tally.failed, tally.spilling)?;
    if let Some(dir) = &args.emit_ptx {
        writeln!(out, "wrote the PTX of {} variants to `{}`", tally.emitted, dir.display())?;
    }
    Ok(if tally.failed == 0 && tally.spilling == 0 { Outcome::Success } else { Outcome::Failure })
}

fn jobs(args: &TuneArgs) -> usize {
    match args.jobs {
        Some(j) => j as usize,
        None => crate::pool::default_threads(),
    }
}

/// The run's entries when the cache cannot take them (it was corrupted or replaced by something
/// else during the run, or the disk failed): written beside it as `<cache>.unsaved-<pid>.json`, a
/// cache file of their own, so minutes of GPU time are not lost. The error names that file.
fn keep_unsaved(cache: &TuningCache, path: &std::path::Path, error: crate::cache::CacheError) -> anyhow::Error {
    let mut name = path.file_name().map_or_else(|| "sbgen-tune.json".into(), |n| n.to_os_string());
    name.push(format!(".unsaved-{}.json", std::process::id()));
    let aside = path.with_file_name(name);
    let kept = serde_json::to_vec_pretty(cache)
        .map_err(|e| e.to_string())
        .and_then(|text| files::write_atomic(&aside, &text).map_err(|e| e.to_string()));
    match kept {
        Ok(()) => anyhow::Error::new(error).context(format!(
            "the {} entries this run measured are in `{}` (a cache of their own: move it into place, or \
             `sbgen cache show --cache` it)",
            cache.entries.len(),
            aside.display()
        )),
        Err(why) => anyhow::Error::new(error).context(format!("the entries this run measured are lost too: {why}")),
    }
}

/// The most parallel compilations `-j` accepts (the pool's own limit).
const MAX_JOBS: usize = crate::pool::MAX_THREADS;

/// The largest `--budget-s` accepted: a week.
const MAX_BUDGET_S: f64 = 7.0 * 24.0 * 3600.0;

/// The budget flag as a duration (`None` = no limit); a negative, non-finite or huge value is a usage
/// error.
fn budget(budget_s: f64) -> Result<Option<Duration>, UsageError> {
    if !(0.0..=MAX_BUDGET_S).contains(&budget_s) {
        return Err(UsageError::new(format!(
            "`--budget-s` = {budget_s} is not allowed: a number of seconds from 0 to {MAX_BUDGET_S} (0 = no limit)"
        )));
    }
    Ok((budget_s > 0.0).then(|| Duration::from_secs_f64(budget_s)))
}

/// The tuning plan the flags describe (validated before any GPU work).
fn tune_plan(args: &TuneArgs, specs: Vec<Spec>) -> Result<TunePlan, UsageError> {
    let mut plan = TunePlan::new(args.gpu, specs);
    plan.budget = budget(args.budget_s)?;
    // One sequence length per cache bucket: two in one bucket would overwrite each other's entry.
    let mut seqs = args.seq.clone();
    seqs.sort_unstable();
    seqs.dedup_by_key(|n| seq_bucket(*n));
    if seqs.is_empty() {
        return Err(UsageError::new("`--seq` needs at least one sequence length"));
    }
    plan.seqs = seqs;
    plan.jobs = jobs(args);
    plan.reps = args.reps;
    plan.ptx_dir = super::ptx_dir(args.ptx_dir.as_deref())?;
    Ok(plan)
}

/// The tuner's log and step count, on the progress bar or lines.
struct Report<'a>(&'a dyn Progress);

impl tuner::Reporter for Report<'_> {
    fn say(&mut self, line: &str) {
        self.0.println(line);
    }

    fn reached(&mut self, done: usize) {
        self.0.set_position(done as u64);
    }
}

/// Checks and times every variant on the GPU and writes the winners to the cache.
fn gpu_tune(args: &TuneArgs, specs: Vec<Spec>, out: &mut dyn Write) -> Result<Outcome> {
    let plan = tune_plan(args, specs)?;
    // A corrupt or other-version cache is reported before any GPU time is spent on it.
    TuningCache::load_or_new(&args.cache)?;
    let dev = Device::open(0).map_err(|e| match e {
        GpuError::NoDevice(why) => anyhow!(
            "no CUDA device found: {why}\n(`sbgen tune --gpu {} --compile-only` lowers and compiles every variant \
             without one)",
            args.gpu
        ),
        other => other.into(),
    })?;
    if dev.arch != args.gpu {
        return Err(UsageError::new(format!(
            "`--gpu {}` does not match the device found: {} runs {} kernels (use `--gpu {}`)",
            args.gpu,
            dev.describe(),
            dev.arch,
            dev.arch
        ))
        .into());
    }
    writeln!(out, "device: {}", dev.describe())?;
    match &plan.ptx_dir {
        Some(dir) => writeln!(out, "kernels: PTX from `{}`", dir.display())?,
        None => writeln!(out, "kernels: compiled here with {} parallel jobs", plan.jobs)?,
    }
    writeln!(
        out,
        "budget: {}; cache: `{}`",
        plan.budget.map_or("no limit".to_string(), |b| format!("{:.0} s", b.as_secs_f64())),
        args.cache.display()
    )?;
    out.flush()?;
    let start = Instant::now();
    // Progress goes to stderr (a closed stderr does not end a tuning run): the log lines, under a
    // bar of the planned checks and timings on a terminal.
    let steps: usize = tuner::planned_steps(&plan).iter().sum();
    let progress = progress::start(steps as u64, "checks and timings");
    let report = tuner::run(&dev, &plan, &mut Report(&*progress))?;
    progress.finish();
    writeln!(out, "\n{}", summary_header())?;
    for row in &report.summary {
        writeln!(out, "{}", format_summary_row(row))?;
    }
    let not_run: usize = report.summary.iter().map(|r| r.not_run).sum();
    if report.budget_spent {
        writeln!(
            out,
            "the time budget ({} s, --budget-s) ran out: {not_run} candidate timings were not run (recorded as \
             `not_run` in the cache); the winners are the best of what was measured",
            args.budget_s
        )?;
    }
    for failure in &report.pair_failures {
        writeln!(out, "WARNING: the tuned backward fails on the tuned forward's saved outputs: {failure}")?;
    }
    if !report.entries.is_empty() {
        let mut cache = TuningCache::new();
        for entry in &report.entries {
            cache.insert(entry.clone());
        }
        let saved = match cache.save(&args.cache) {
            Ok(saved) => saved,
            Err(e) => return Err(keep_unsaved(&cache, &args.cache, e)),
        };
        for (what, reason) in &saved.kept {
            writeln!(out, "kept the cache's entry for {what}: {reason}")?;
        }
        writeln!(
            out,
            "wrote {} entries to `{}` ({} in all); `sbgen cache show --cache {}` lists them",
            saved.written,
            args.cache.display(),
            saved.cache.entries.len(),
            args.cache.display()
        )?;
    }
    writeln!(out, "{:.1} s", start.elapsed().as_secs_f64())?;
    for (what, error) in &report.spec_errors {
        writeln!(out, "{what}: {error}")?;
    }
    if let Some(why) = &report.pair_check_error {
        writeln!(out, "the forward/backward pair check could not run (the entries are written): {why}")?;
    }
    if let Some(why) = &report.aborted {
        writeln!(out, "stopped early: {why}")?;
        return Ok(Outcome::Failure);
    }
    let all_won = report.summary.iter().all(|r| r.winner.is_some());
    let clean = report.spec_errors.is_empty() && report.pair_check_error.is_none();
    Ok(if all_won && clean { Outcome::Success } else { Outcome::Failure })
}

/// The specs to tune: every combination of the lists, each validated before any work.
fn specs(args: &TuneArgs) -> Result<Vec<Spec>> {
    if args.spec.deterministic && !args.pass.contains(&Pass::Backward) {
        return Err(UsageError::new(
            "`--deterministic` applies to the backward only (the forward always is): add bwd to `--pass`",
        )
        .into());
    }
    let mut specs = Vec::new();
    for &pass in &args.pass {
        for &head_dim in &args.head_dim {
            for &dtype in &args.dtype {
                let spec = args.spec.spec(head_dim, dtype, pass);
                spec.validate().map_err(UsageError::new)?;
                if !specs.contains(&spec) {
                    specs.push(spec);
                }
            }
        }
    }
    Ok(specs)
}

#[derive(Default)]
struct Tally {
    pruned: usize,
    compiled: usize,
    failed: usize,
    spilling: usize,
    emitted: usize,
    /// The compiled variants of each head_dim, for the per-head_dim lines.
    by_head_dim: BTreeMap<u32, DimTally>,
}

/// How the variants of one head_dim compiled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DimTally {
    compiled: usize,
    failed: usize,
    spilling: usize,
    /// The most bytes one variant spilled.
    worst_spill: u32,
}

/// What became of one compiled variant.
#[derive(Clone, Copy, Debug)]
enum Built {
    Ok,
    Failed,
    Spill(u32),
}

impl Tally {
    fn count(&mut self, head_dim: u32, built: Built) {
        let d = self.by_head_dim.entry(head_dim).or_default();
        self.compiled += 1;
        d.compiled += 1;
        match built {
            Built::Ok => {}
            Built::Failed => {
                self.failed += 1;
                d.failed += 1;
            }
            Built::Spill(bytes) => {
                self.spilling += 1;
                d.spilling += 1;
                d.worst_spill = d.worst_spill.max(bytes);
            }
        }
    }

    /// `head_dim 80 (tile 96): 14 compiled, 0 failed, 2 spilling (up to 240 B)`, one line per head_dim.
    fn head_dim_lines(&self) -> Vec<String> {
        self.by_head_dim
            .iter()
            .map(|(&head_dim, d)| {
                let tile = Spec::new(head_dim, Dtype::Bf16, Pass::Forward).tile_head_dim();
                let worst = if d.spilling > 0 { format!(" (up to {} B)", d.worst_spill) } else { String::new() };
                format!(
                    "head_dim {head_dim} (tile {tile}): {} compiled, {} failed, {} spilling{worst}",
                    d.compiled, d.failed, d.spilling
                )
            })
            .collect()
    }
}

/// What the output shows, in order: text known up front, or a variant to compile.
enum Item {
    Text(String),
    Compile(Box<Lowered>),
}

/// Adds one spec's header, its pruned candidates and its variants to `items`.
fn plan_spec(spec: Spec, args: &TuneArgs, items: &mut Vec<Item>, tally: &mut Tally) {
    let all: Vec<(Kernel, Result<(), Pruned>)> = variants(spec, args.gpu).collect();
    let kept = all.iter().filter(|(_, v)| v.is_ok()).count();
    let mut text =
        format!("== {} on {}: {kept} of {} candidates to compile\n", spec.slug(), args.gpu.compile_target(), all.len());
    // Pruned candidates: one line each, or one line per distinct reason.
    let pruned: Vec<(&Kernel, String)> =
        all.iter().filter_map(|(kernel, verdict)| verdict.as_ref().err().map(|r| (kernel, r.to_string()))).collect();
    tally.pruned += pruned.len();
    if args.show_pruned {
        for (kernel, reason) in &pruned {
            text.push_str(&format!("pruned {:<48} {:<26} {reason}\n", kernel.name(), kernel.schedule.to_string()));
        }
    } else {
        for (reason, schedules) in pruned_groups(pruned.iter().map(|(k, r)| (k.schedule, r.as_str()))) {
            let mut shown: Vec<String> = schedules.iter().take(3).map(|s| s.to_string()).collect();
            if schedules.len() > 3 {
                shown.push("...".into());
            }
            text.push_str(&format!("pruned x{:<3} {reason} [{}]\n", schedules.len(), shown.join(", ")));
        }
    }
    items.push(Item::Text(text.trim_end().to_string()));
    for (kernel, verdict) in all {
        if verdict.is_err() {
            continue;
        }
        match lower(&kernel) {
            Ok(lowered) => items.push(Item::Compile(Box::new(lowered))),
            Err(e) => {
                tally.count(spec.head_dim, Built::Failed);
                items.push(Item::Text(failure_line(&kernel.name(), &kernel.schedule, &e.to_string())));
            }
        }
    }
}

/// An item once its work is done.
enum Done<'a> {
    Text(&'a str),
    Built(Box<Artifact>),
}

/// Compiles the variants on `jobs` threads ([`artifact::build`] on [`crate::pool::stream`]) and
/// prints every item in order as soon as it and all before it are done; with `emit`, stores the
/// PTX of every variant judged [`Verdict::Ok`]. `progress` counts the compilations as they end.
fn execute(
    items: &[Item],
    compiler: &Compiler,
    jobs: usize,
    emit: Option<&PtxDir>,
    progress: &dyn Progress,
    out: &mut dyn Write,
    tally: &mut Tally,
) -> Result<()> {
    crate::pool::stream(
        items,
        jobs,
        |item| match item {
            Item::Text(text) => Done::Text(text),
            Item::Compile(lowered) => {
                let built = artifact::build(lowered, compiler);
                progress.inc(1);
                Done::Built(Box::new(built))
            }
        },
        |_, done| -> Result<()> {
            let line = match done {
                Done::Text(text) => text.to_string(),
                Done::Built(artifact) => artifact_line(&artifact, emit, tally)?,
            };
            progress::write_line(progress, out, &line)?;
            Ok(())
        },
    )
}

/// The line of one compiled variant, counted in `tally`; its PTX stored in `emit` when it is ok.
fn artifact_line(artifact: &Artifact, emit: Option<&PtxDir>, tally: &mut Tally) -> Result<String> {
    let (lowered, verdict) = (&artifact.lowered, &artifact.verdict);
    let head_dim = lowered.kernel.spec.head_dim;
    // No compiler output: the verdict is the error.
    let Some(compiled) = &artifact.compiled else {
        tally.count(head_dim, Built::Failed);
        return Ok(failure_line(&lowered.name, &lowered.kernel.schedule, &verdict.to_string()));
    };
    let mut line = variant_line(lowered, compiled, verdict);
    match (verdict, emit) {
        (Verdict::Ok, Some(dir)) => {
            dir.write(artifact).map_err(|e| anyhow!("--emit-ptx: {e}"))?;
            tally.emitted += 1;
        }
        (Verdict::Spill { .. }, Some(_)) => line.push_str("  (no PTX written: spills)"),
        _ => {}
    }
    tally.count(
        head_dim,
        match verdict {
            Verdict::Ok => Built::Ok,
            Verdict::Spill { bytes } => Built::Spill(*bytes),
            Verdict::Error(_) => Built::Failed,
        },
    );
    Ok(line)
}

/// `ok     <name> <schedule> regs 168/32 smem  49152 B  spill 0 B  stack 0 B`
fn variant_line(lowered: &Lowered, c: &Compiled, verdict: &Verdict) -> String {
    let status = if verdict.is_ok() { "ok" } else { "SPILL" };
    let regs = c.functions.iter().map(|f| f.registers.to_string()).collect::<Vec<_>>().join("/");
    let smem = lowered.manifest.steps[0].dynamic_smem_bytes + c.main().static_smem_bytes;
    let stack = c.functions.iter().map(|f| f.stack_frame_bytes).max().unwrap_or(0);
    format!(
        "{status:<6} {:<48} {:<26} regs {regs:<7} smem {smem:>6} B  spill {} B  stack {stack} B",
        lowered.name,
        lowered.kernel.schedule.to_string(),
        c.spill_bytes()
    )
}

/// `FAIL   <name> <schedule> <first line of the error>` and up to [`LOG_LINES`] more, indented.
fn failure_line(name: &str, schedule: &Schedule, message: &str) -> String {
    let mut lines = message.lines();
    let mut text = format!("FAIL   {name:<48} {:<26} {}", schedule.to_string(), lines.next().unwrap_or(""));
    let rest: Vec<&str> = lines.collect();
    for line in rest.iter().take(LOG_LINES) {
        text.push_str("\n       ");
        text.push_str(line);
    }
    if rest.len() > LOG_LINES {
        text.push_str(&format!("\n       ... ({} more lines)", rest.len() - LOG_LINES));
    }
    text
}

/// A pass `tune` can time: the segment passes are context parallelism's (sbgen-dist launches them)
/// and run the forward's and backward's schedules, so they are tuned as those.
fn parse_tunable_pass(s: &str) -> Result<Pass, String> {
    match s.parse::<Pass>().map_err(|e| e.to_string())? {
        Pass::Segment | Pass::SegmentBackward => Err(format!(
            "`pass` = `{s}` is not tuned on its own: it runs the forward's or backward's schedules; allowed fwd, bwd, decode"
        )),
        pass => Ok(pass),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::ir::{Layout, Mask, Remainder};
    use clap::Parser;

    /// A cache that cannot take the run's entries at the end (here: it became a corrupt file during
    /// the run) leaves them in a file of their own, named in the error, which loads as a cache.
    #[test]
    fn entries_a_cache_refuses_at_the_end_are_kept_aside() {
        let dir = std::env::temp_dir().join(format!("sbgen-tune-unsaved-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sbgen-tune.json");
        std::fs::write(&path, "{ corrupted while tuning").unwrap();
        let spec = Spec::new(64, Dtype::Bf16, Pass::Forward);
        let entry = crate::cache::CacheEntry::untimed(
            Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm90),
            2048,
            "// ptx".into(),
        )
        .unwrap();
        let mut cache = TuningCache::new();
        cache.insert(entry);
        let error = cache.save(&path).unwrap_err();
        let message = format!("{:#}", keep_unsaved(&cache, &path, error));
        let aside = dir.join(format!("sbgen-tune.json.unsaved-{}.json", std::process::id()));
        assert!(message.contains(&aside.display().to_string()) && message.contains("not a valid"), "{message}");
        assert_eq!(TuningCache::load(&aside).unwrap().entries, cache.entries);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ corrupted while tuning");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn parse(args: &[&str]) -> Result<TuneArgs, clap::Error> {
        let mut all = vec!["sbgen", "tune"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|cli| match cli.command {
            Command::Tune(t) => t,
            other => panic!("not tune: {other:?}"),
        })
    }

    #[test]
    fn the_defaults_tune_two_sequence_lengths_within_the_budget_into_sbgen_tune_json() {
        let args = parse(&["--gpu", "sm_90", "--head-dim", "128", "--dtype", "bf16"]).unwrap();
        let plan = tune_plan(&args, specs(&args).unwrap()).unwrap();
        assert_eq!(plan.seqs, vec![2048, 8192]);
        assert_eq!(plan.budget, Some(Duration::from_secs(180)));
        assert_eq!(plan.specs.len(), 2, "fwd and bwd");
        assert_eq!(args.cache, PathBuf::from("sbgen-tune.json"));
        assert_eq!(plan.reps, 20);
    }

    #[test]
    fn the_spec_flags_reach_every_tuned_spec() {
        let args = parse(&[
            "--gpu",
            "sm_90",
            "--head-dim",
            "64",
            "--dtype",
            "f16",
            "--layout",
            "bnhd",
            "--mask",
            "attend_current",
            "--remainder",
            "fuse",
            "--early-exit-bits",
            "24",
        ])
        .unwrap();
        let tuned = specs(&args).unwrap();
        assert_eq!(tuned.len(), 2);
        for s in tuned {
            assert_eq!(
                (s.layout, s.mask, s.remainder, s.early_exit_bits),
                (Layout::Bnhd, Mask::AttendCurrent, Remainder::Fuse, Some(24))
            );
        }
        let defaults = specs_of(&["--gpu", "sm_90"]);
        assert!(defaults.iter().all(|s| (s.layout, s.mask, s.remainder, s.early_exit_bits)
            == (Layout::Bhnd, Mask::Strict, Remainder::Return, None)));
        let bad = parse(&["--gpu", "sm_90", "--early-exit-bits", "99"]).unwrap();
        assert!(specs(&bad).unwrap_err().to_string().contains("early_exit_bits"));
    }

    #[test]
    fn any_head_dim_varlen_and_deterministic_reach_the_tuned_specs() {
        let args = parse(&["--gpu", "sm_90", "--head-dim", "80,256", "--dtype", "bf16", "--varlen", "--deterministic"])
            .unwrap();
        let tuned = specs(&args).unwrap();
        assert_eq!(tuned.len(), 4);
        for s in &tuned {
            assert_eq!(s.layout, Layout::Thd);
            // The forward of the same flags is the plain one: `deterministic` is a backward field.
            assert_eq!(s.deterministic, s.pass == Pass::Backward, "{}", s.slug());
            assert_eq!(s.validate(), Ok(()));
        }
        assert_eq!(tuned.iter().map(|s| s.head_dim).collect::<Vec<_>>(), vec![80, 256, 80, 256]);
        let thd = specs_of(&["--gpu", "sm_80", "--layout", "thd", "--pass", "fwd"]);
        assert!(thd.iter().all(|s| s.layout == Layout::Thd && !s.deterministic));
    }

    #[test]
    fn deterministic_without_a_backward_to_tune_is_refused() {
        let args = parse(&["--gpu", "sm_90", "--pass", "fwd", "--deterministic"]).unwrap();
        let err = specs(&args).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some(), "exit 2");
        assert!(err.to_string().contains("`--deterministic`") && err.to_string().contains("bwd"), "{err}");
        assert!(parse(&["--gpu", "sm_90", "--varlen", "--layout", "bnhd"]).is_err());
    }

    #[test]
    fn compile_only_reports_each_head_dims_variants_and_its_worst_spill() {
        let mut t = Tally::default();
        t.count(80, Built::Ok);
        t.count(80, Built::Spill(40));
        t.count(80, Built::Spill(240));
        t.count(256, Built::Failed);
        t.count(32, Built::Ok);
        assert_eq!((t.compiled, t.failed, t.spilling), (5, 1, 2));
        assert_eq!(
            t.head_dim_lines(),
            vec![
                "head_dim 32 (tile 32): 1 compiled, 0 failed, 0 spilling",
                "head_dim 80 (tile 96): 3 compiled, 0 failed, 2 spilling (up to 240 B)",
                "head_dim 256 (tile 256): 1 compiled, 1 failed, 0 spilling",
            ]
        );
    }

    fn specs_of(argv: &[&str]) -> Vec<Spec> {
        specs(&parse(argv).unwrap()).unwrap()
    }

    #[test]
    fn flags_are_validated_before_any_gpu_work() {
        let args = parse(&["--gpu", "sm_80", "--seq", "1000,4096", "--budget-s", "0", "--reps", "5"]).unwrap();
        let plan = tune_plan(&args, specs(&args).unwrap()).unwrap();
        assert_eq!((plan.seqs, plan.budget, plan.reps, plan.arch), (vec![1000, 4096], None, 5, Arch::Sm80));
        for bad in [
            &["--gpu", "sm_90", "--seq", "0"][..],
            &["--gpu", "sm_90", "--seq", "abc"][..],
            &["--gpu", "sm_90", "--reps", "1"][..],
            &["--gpu", "sm_90", "--reps", "1001"][..],
            &["--gpu", "sm_90", "--seq", "131073"][..],
            &["--gpu", "sm_70"][..],
            &["--gpu", "sm_90", "--emit-ptx", "dir"][..],
            &["--gpu", "sm_90", "-j", "100000"][..],
            // Flags `--compile-only` would ignore.
            &["--gpu", "sm_90", "--compile-only", "--cache", "c.json"][..],
            &["--gpu", "sm_90", "--compile-only", "--ptx-dir", "/nonexistent"][..],
            &["--gpu", "sm_90", "--compile-only", "--budget-s", "nan"][..],
            &["--gpu", "sm_90", "--compile-only", "--budget-s", "-1"][..],
            &["--gpu", "sm_90", "--compile-only", "--seq", "2048"][..],
            &["--gpu", "sm_90", "--compile-only", "--reps", "5"][..],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(budget(-1.0).unwrap_err().to_string().contains("`--budget-s`"));
        // A negative budget reaches the check that names it, not clap's "unexpected argument".
        let args = parse(&["--gpu", "sm_90", "--budget-s", "-1"]).unwrap();
        assert!(tune_plan(&args, specs(&args).unwrap()).unwrap_err().to_string().contains("`--budget-s` = -1"));
        assert!(budget(f64::NAN).is_err());
        assert_eq!(budget(1.5).unwrap(), Some(Duration::from_millis(1500)));
        assert!(budget(1e20).unwrap_err().to_string().contains("from 0 to"), "no panic on a huge budget");
        // One length per cache bucket, in order.
        let args = parse(&["--gpu", "sm_90", "--seq", "4000,3000,2048,2048"]).unwrap();
        assert_eq!(tune_plan(&args, specs(&args).unwrap()).unwrap().seqs, vec![2048, 3000]);
        let args = parse(&["--gpu", "sm_90", "--ptx-dir", "/nonexistent/sbgen-ptx"]).unwrap();
        let err = tune_plan(&args, specs(&args).unwrap()).unwrap_err().to_string();
        assert!(err.contains("`--ptx-dir`") && err.contains("/nonexistent/sbgen-ptx"), "{err}");
        assert!(parse(&["--gpu", "sm_90", "--compile-only", "--emit-ptx", "dir"]).is_ok());
    }
}
