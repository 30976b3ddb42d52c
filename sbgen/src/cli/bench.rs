//! `sbgen bench`: forward and forward+backward timings (see [`crate::gpu::bench`]).

use super::check::{parse_early_exit, EarlyExit};
use super::emit::ScheduleArgs;
use super::plot;
use super::{Outcome, UsageError};
use crate::files;
use crate::gpu::bench::{self, BenchPlan, Problem};
use crate::gpu::decode::CacheKind;
use crate::gpu::decode_bench::{self, DecodeBenchPlan, DecodeProblem};
use crate::gpu::l2_flush::FlushMode;
use crate::gpu::ring_bench::{self, RingBenchPlan};
use crate::gpu::{Device, KernelBuilder};
use crate::ir::{Arch, Dtype, Layout, Mask, Pass};
use anyhow::{Context, Result};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sbgen_dist::Scheme;
use sbgen_runtime::launcher::DecodeSplit;
use sbgen_runtime::reference::Shape;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Args)]
#[command(
    group(clap::ArgGroup::new("varlen").args(["varlen_lens", "varlen_random"])),
    after_help = "TFLOP/s counts 4*H*n^2*D/2 per sequence of n tokens (4*B*H*N^2*D/2 for a dense batch) for the \
forward and 3.5 times that for forward+backward (docs/performance.md#counting), so figures compare with softmax \
attention on the same work. Each kernel is checked against the float64 reference on N = 256 first (with the \
problem's K/V grouping, and for a packed batch on mixed lengths too); a kernel that fails is reported and not timed \
(exit 1).

Report columns: B,H,N,D (a packed batch: B sequences, N the longest), pass, exit, ms(med), ms(min), ms(max), \
TFLOP/s, H:Hkv (query and K/V heads), mode (dense, packed, separate, padded), lens(n:min..max:T) (count, \
shortest, longest, total tokens; - when dense), packed/x (the packed time over this row's; - unless separate or \
padded), note (an error, last: the line splits on whitespace into the eleven columns and the note)."
)]
pub struct BenchArgs {
    /// Time the decode (one new token per sequence against a KV cache) instead: problems as
    /// B,H,H_kv,N,D (B sequences of N cached tokens; default: B in 8,32,64 x N in 8192,32768,131072,
    /// 32,8 heads, D = 128). Reports GB/s of the context's K and V and the fraction of the H200's
    /// 4.8 TB/s (docs/performance.md#decode).
    #[arg(long, num_args = 0.., value_name = "B,H,H_KV,N,D", value_parser = parse_decode_shape,
          conflicts_with_all = ["shapes", "varlen", "kv_heads", "separate", "deterministic", "layout"])]
    pub decode: Option<Vec<DecodeProblem>>,
    /// With `--decode`: the caches, comma-separated: bhnd, bnhd, paged (default: bhnd,paged).
    #[arg(long, value_delimiter = ',', requires = "decode")]
    pub kv_cache: Vec<Layout>,
    /// With `--decode` and a paged cache: tokens per page (a multiple of 16).
    #[arg(long, default_value_t = 16, requires = "decode")]
    pub page_size: usize,
    /// With `--decode`: force the split-K shape instead of the launcher's choice: warps per
    /// (sequence, K/V head, tile of query heads) (rounded up to whole CTAs).
    #[arg(long, requires = "decode")]
    pub splits: Option<usize>,
    /// With `--decode`: fewest keys per chunk (a multiple of the kernel's block_n).
    #[arg(long, requires = "decode")]
    pub chunk_keys: Option<usize>,
    /// With `--decode`: most chunks per sequence (the workspace's size).
    #[arg(long, requires = "decode")]
    pub max_chunks: Option<usize>,
    /// With `--decode`: how the L2 is emptied between timed steps: `read` (a read sweep of 256 MiB,
    /// the L2 left clean) or `write` (256 MiB zeroed, as `triton.testing.do_bench` and the baselines
    /// do: the step then also pays for writing the dirty lines back) (docs/performance.md#decode).
    #[arg(long, default_value = "read", requires = "decode")]
    pub flush: FlushMode,
    /// Dense shapes as B,H,N,D, any head_dim 1..=256 (default: 8,16,2048,128 4,16,4096,128 2,16,8192,128
    /// 1,16,16384,128 4,16,4096,64).
    #[arg(long, num_args = 1.., value_parser = parse_shape, conflicts_with = "varlen")]
    pub shapes: Vec<Shape>,
    /// K/V heads of every problem (GQA; 1 is MQA); must divide each problem's H. Default: H (multi-head).
    #[arg(long, value_name = "N")]
    pub kv_heads: Option<usize>,
    /// Time one packed batch (THD layout) of sequences of these lengths, comma-separated; B is their count.
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    pub varlen_lens: Vec<usize>,
    /// Time one packed batch (THD layout) of COUNT lengths drawn uniformly from MIN..=MAX with `--seed`.
    #[arg(long, value_name = "COUNT:MIN..MAX", value_parser = parse_varlen_random)]
    pub varlen_random: Option<VarlenRandom>,
    /// Query heads of the packed batch (with `--varlen-lens` or `--varlen-random`).
    #[arg(long, default_value_t = 16, requires = "varlen")]
    pub heads: usize,
    /// head_dim of the packed batch, any 1..=256 (with `--varlen-lens` or `--varlen-random`).
    #[arg(long, default_value_t = 128, requires = "varlen")]
    pub head_dim: usize,
    /// With a packed batch: also time each of its sequences as a batch of its own (B = 1, the times
    /// summed) and the batch padded to its longest sequence (dense BNHD, B = the count).
    #[arg(long, requires = "varlen")]
    pub separate: bool,
    /// Time the deterministic backward (bit-identical dq, dk, dv across runs).
    #[arg(long, conflicts_with = "fwd_only")]
    pub deterministic: bool,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also draw the results as an SVG line plot in FILE: TFLOP/s against N (log2), one line per
    /// pass, early-exit setting, mode and varying shape field (against head_dim when N is one
    /// value); with `--decode`, GB/s against the cached length.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// With `--plot`: plot the document `bench --json` wrote to FILE instead of running anything (no
    /// GPU); `--early-exit` picks the rows to plot (`off` leaves out the effective TFLOP/s of early exit).
    #[arg(long, value_name = "FILE", requires = "plot",
          conflicts_with_all = ["decode", "shapes", "varlen", "kv_heads", "separate", "deterministic", "json",
                                "fwd_only", "layout", "ptx_dir"])]
    pub from_json: Option<PathBuf>,
    /// With `--plot`: the JSON the GPU bundle's baselines.py wrote (FlashAttention, cuDNN, the Triton
    /// stick-breaking kernel), drawn beside as dashed lines.
    #[arg(long, value_name = "FILE", requires = "plot")]
    pub baselines: Option<PathBuf>,
    /// Timed repetitions per configuration (the median is reported); at least 20.
    #[arg(long, default_value_t = 30)]
    pub reps: usize,
    /// Untimed launches before timing.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Input sets rotated through (not with `--gpus`: the ring and the single GPU time one set).
    #[arg(long, default_value_t = 3, conflicts_with = "gpus")]
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
    /// Layout: bhnd, bnhd, or thd (the shapes as packed batches of equal sequences). Default: bhnd,
    /// and thd with `--varlen-lens` or `--varlen-random` (which take no other).
    #[arg(long)]
    pub layout: Option<Layout>,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Seed of the random inputs (and of `--varlen-random`'s lengths).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Time context parallelism instead: each problem's one sequence split over GPUs 0..N of this
    /// host (the K/V ring over NCCL, docs/math.md#context-parallelism), against one GPU (`--device`)
    /// in the same run; default problem 1,16,131072,128 (about 10 GB of host memory). The ring is checked against float64 on a
    /// small problem and against the single GPU on the timed one before its times count. Reports the
    /// slowest rank's time, the speedup, the parallel efficiency, the transfers' time alone and each
    /// rank's time. Needs libnccl.so on the library path.
    #[arg(long, value_name = "N",
          conflicts_with_all = ["decode", "varlen", "separate", "deterministic", "plot", "from_json"])]
    pub gpus: Option<usize>,
    /// With `--gpus`: how the tokens are dealt out: zigzag (2N segments, GPU r holds r and 2N-1-r, so
    /// each has the same causal work) or contiguous (N segments in order).
    #[arg(long, default_value = "zigzag", value_parser = parse_scheme)]
    pub scheme: Scheme,
    /// CUDA device ordinal (with `--gpus`: the single GPU the ring is compared with).
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Folder of prebuilt PTX (from `sbgen check --emit-ptx`); default `$SBGEN_PTX_DIR`.
    #[arg(long, value_name = "DIR")]
    pub ptx_dir: Option<PathBuf>,
}

/// `zigzag` or `contiguous`.
pub fn parse_scheme(s: &str) -> Result<Scheme, String> {
    match s {
        "zigzag" | "zig-zag" => Ok(Scheme::ZigZag),
        "contiguous" => Ok(Scheme::Contiguous),
        _ => Err(format!("`{s}` is not a scheme: allowed zigzag, contiguous")),
    }
}

/// `B,H,H_kv,N,D` of a decode problem.
pub fn parse_decode_shape(s: &str) -> Result<DecodeProblem, String> {
    let bad =
        || format!("`--decode` = `{s}` is not valid: expected B,H,H_kv,N,D (five positive integers, H_kv dividing H)");
    let parts: Vec<usize> =
        s.split(',').map(|p| p.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|_| bad())?;
    match parts[..] {
        [batch, heads, kv_heads, seq, head_dim]
            if batch > 0 && heads > 0 && kv_heads > 0 && seq > 0 && head_dim > 0 && heads % kv_heads == 0 =>
        {
            Ok(DecodeProblem { batch, heads, kv_heads, seq, head_dim })
        }
        _ => Err(bad()),
    }
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

/// `--varlen-random COUNT:MIN..MAX`: COUNT sequence lengths drawn uniformly from MIN..=MAX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VarlenRandom {
    pub count: usize,
    pub min: usize,
    pub max: usize,
}

/// The most sequences a packed batch may have (`--varlen-random`'s COUNT).
pub const MAX_SEQUENCES: usize = 1 << 16;

/// `COUNT:MIN..MAX` with 1 <= COUNT <= [`MAX_SEQUENCES`], MIN <= MAX and MAX >= 1.
pub fn parse_varlen_random(s: &str) -> Result<VarlenRandom, String> {
    let bad = || {
        format!(
            "`--varlen-random` = `{s}` is not valid: expected COUNT:MIN..MAX (e.g. 8:128..4096) with COUNT in \
             1..={MAX_SEQUENCES}, MIN <= MAX and MAX >= 1"
        )
    };
    let (count, range) = s.split_once(':').ok_or_else(bad)?;
    let (min, max) = range.split_once("..").ok_or_else(bad)?;
    let num = |t: &str| t.trim().parse::<usize>().map_err(|_| bad());
    let r = VarlenRandom { count: num(count)?, min: num(min)?, max: num(max)? };
    if !(1..=MAX_SEQUENCES).contains(&r.count) || r.min > r.max || r.max == 0 {
        return Err(bad());
    }
    Ok(r)
}

impl VarlenRandom {
    /// The lengths, drawn from `seed`.
    pub fn lens(&self, seed: u64) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7a91_0c3e_55d2_4b17);
        (0..self.count).map(|_| rng.gen_range(self.min..=self.max)).collect()
    }
}

/// The packed batch's lengths the flags ask for, if any, checked: at least one token, at most
/// [`MAX_SEQUENCES`] sequences, and a total that `cu_seqlens` (i32) can hold.
fn varlen_lens(args: &BenchArgs) -> Result<Option<Vec<usize>>, UsageError> {
    let (flag, lens) = match (&args.varlen_random, args.varlen_lens.is_empty()) {
        (Some(r), _) => ("--varlen-random", r.lens(args.seed)),
        (None, false) => ("--varlen-lens", args.varlen_lens.clone()),
        (None, true) => return Ok(None),
    };
    if lens.len() > MAX_SEQUENCES {
        return Err(UsageError::new(format!(
            "`{flag}` gives {} sequences: at most {MAX_SEQUENCES} are allowed",
            lens.len()
        )));
    }
    if lens.iter().all(|&n| n == 0) {
        return Err(UsageError::new(format!("`{flag}` gives no token: at least one sequence must be longer than 0")));
    }
    if sbgen_runtime::varlen::cu_seqlens_of(&lens).is_none() {
        return Err(UsageError::new(format!(
            "`{flag}` gives {} tokens in all: at most {} fit in `cu_seqlens` (i32)",
            lens.iter().sum::<usize>(),
            i32::MAX
        )));
    }
    Ok(Some(lens))
}

/// The problems to time: the packed batch, or the dense shapes; each with `--kv-heads` K/V heads,
/// which must divide its H.
fn problems(args: &BenchArgs, lens: Option<Vec<usize>>, defaults: &[Problem]) -> Result<Vec<Problem>, UsageError> {
    let mut problems = match lens {
        Some(lens) => {
            if args.heads == 0 {
                return Err(UsageError::new("`--heads` = 0 is not allowed: at least 1"));
            }
            vec![Problem::packed(args.heads, args.heads, args.head_dim, lens)]
        }
        None if args.shapes.is_empty() => defaults.to_vec(),
        None => args.shapes.iter().map(|&s| Problem::dense(s)).collect(),
    };
    if let Some(kv) = args.kv_heads {
        for p in &mut problems {
            let h = p.shape.heads;
            if kv == 0 || kv > h || h % kv != 0 {
                return Err(UsageError::new(format!(
                    "`--kv-heads` = {kv} does not divide the {h} query heads of {}: allowed a divisor of {h} \
                     (1 is MQA, {h} multi-head attention)",
                    describe(p)
                )));
            }
            p.shape.kv_heads = kv;
        }
    }
    Ok(problems)
}

/// `shape 8,16,2048,128` or `the packed batch` for error messages.
fn describe(p: &Problem) -> String {
    let s = p.shape;
    if p.seq_lens.iter().all(|&n| n == s.seq) && p.seq_lens.len() == s.batch {
        format!("shape {},{},{},{}", s.batch, s.heads, s.seq, s.head_dim)
    } else {
        "the packed batch".to_string()
    }
}

/// The plan the arguments select, validated (before any GPU work).
pub fn plan(args: &BenchArgs) -> Result<BenchPlan> {
    let lens = varlen_lens(args)?;
    let layout = match (args.layout, lens.is_some()) {
        (Some(l), true) if l != Layout::Thd => {
            return Err(UsageError::new(format!(
                "`--layout {l}` cannot hold a packed batch of sequences of different lengths: \
                 `--varlen-lens` and `--varlen-random` time the thd layout (leave `--layout` out)"
            ))
            .into())
        }
        (_, true) => Layout::Thd,
        (l, false) => l.unwrap_or(Layout::Bhnd),
    };
    let mut plan = BenchPlan::new(args.seed);
    plan.problems = problems(args, lens, &BenchPlan::new(args.seed).problems)?;
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
    plan.layout = layout;
    plan.deterministic = args.deterministic;
    plan.separate = args.separate;
    plan.schedule = super::check::schedule_override(&args.schedule);
    // Every kernel the plan runs must validate: head_dim in range, the schedule's shared memory.
    for problem in &plan.problems {
        for &ee in &plan.early_exits {
            for layout in plan.layouts() {
                for pass in plan.passes() {
                    let spec = plan.spec(problem.shape.head_dim as u32, pass, layout, ee);
                    KernelBuilder::new(Arch::Sm90, None)
                        .kernel(spec, plan.schedule)
                        .validate()
                        .map_err(UsageError::new)?;
                }
            }
        }
    }
    Ok(plan)
}

/// The decode plan the arguments select, validated before any GPU work.
// `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
#[allow(clippy::manual_is_multiple_of)]
pub fn decode_plan(args: &BenchArgs, problems: &[DecodeProblem]) -> Result<DecodeBenchPlan> {
    if args.reps < 20 {
        return Err(UsageError::new(format!("`reps` = {} is not allowed: at least 20", args.reps)).into());
    }
    if args.page_size == 0 || args.page_size % 16 != 0 {
        return Err(
            UsageError::new(format!("`page_size` = {} is not allowed: a multiple of 16", args.page_size)).into()
        );
    }
    let mut caches = Vec::new();
    let layouts = if args.kv_cache.is_empty() { vec![Layout::Bhnd, Layout::Paged] } else { args.kv_cache.clone() };
    for layout in layouts {
        caches.push(match layout {
            Layout::Bhnd | Layout::Bnhd => CacheKind::Contiguous(layout),
            Layout::Paged => CacheKind::Paged { page_size: args.page_size },
            Layout::Thd => {
                return Err(UsageError::new("`--kv-cache thd` is not a KV cache: allowed bhnd, bnhd, paged").into())
            }
        });
    }
    let plan = DecodeBenchPlan {
        problems: if problems.is_empty() { DecodeBenchPlan::default_problems() } else { problems.to_vec() },
        caches,
        early_exits: if args.early_exit.is_empty() { vec![None, Some(24)] } else { args.early_exit.clone() },
        dtype: args.dtype,
        mask: args.mask,
        schedule: super::check::schedule_override(&args.schedule),
        split: DecodeSplit { splits: args.splits, chunk_keys: args.chunk_keys, max_chunks: args.max_chunks },
        flush: args.flush,
        reps: args.reps,
        warmup: args.warmup,
        seed: args.seed,
        threads: crate::pool::default_threads(),
    };
    for p in &plan.problems {
        for &cache in &plan.caches {
            for &ee in &plan.early_exits {
                KernelBuilder::new(Arch::Sm90, None)
                    .kernel(plan.spec(p, cache, ee), plan.schedule)
                    .validate()
                    .map_err(UsageError::new)?;
            }
        }
    }
    Ok(plan)
}

/// `bench --decode`.
fn run_decode(
    args: &BenchArgs,
    problems: &[DecodeProblem],
    baselines: Option<&Value>,
    out: &mut dyn Write,
) -> Result<Outcome> {
    let plan = decode_plan(args, problems)?;
    let ptx_dir = super::ptx_dir(args.ptx_dir.as_deref())?;
    let dev = Device::open(args.device)?;
    let builder = KernelBuilder::new(dev.arch, ptx_dir);
    writeln!(out, "device: {}", dev.describe())?;
    writeln!(
        out,
        "decode {} {}, schedule {}; median of {} reps ({} warm-up), L2 flushed between reps ({} flush); GB/s = the \
         context's K+V bytes / median time, %peak of {} GB/s",
        plan.dtype,
        plan.mask,
        super::check::describe_schedule(plan.schedule),
        plan.reps,
        plan.warmup,
        plan.flush,
        decode_bench::H200_PEAK_GBPS
    )?;
    writeln!(out, "{}", decode_bench::header())?;
    out.flush()?;
    let mut write_error = None;
    let result = decode_bench::run(&dev, &builder, &plan, &mut |r| {
        if write_error.is_none() {
            if let Err(e) = writeln!(out, "{}", decode_bench::format_result(r)).and_then(|_| out.flush()) {
                write_error = Some(e);
            }
        }
    });
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let results = result?;
    if args.json.is_some() || args.plot.is_some() {
        let doc = stamped(serde_json::json!({
            "gpu": dev.name,
            "device": dev.describe(),
            "dtype": plan.dtype.to_string(),
            "mask": plan.mask.to_string(),
            "reps": plan.reps,
            "bytes": "B * H_kv * N * D * 2 (K and V) * element bytes per decode step, over the median time",
            "results": results,
        }));
        write_outputs(args, &doc, baselines, out)?;
    }
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    Ok(if failed == 0 { Outcome::Success } else { Outcome::Failure })
}

pub fn run(args: &BenchArgs, out: &mut dyn Write) -> Result<Outcome> {
    if args.scheme != Scheme::ZigZag && args.gpus.is_none() {
        return Err(UsageError::new("`--scheme` applies to `--gpus` only").into());
    }
    let baselines = plot_inputs(args)?;
    if let (Some(from), Some(path)) = (&args.from_json, &args.plot) {
        let doc = read_json(from, "--from-json")?;
        write_plot(args, path, &doc, baselines.as_ref(), out)?;
        return Ok(Outcome::Success);
    }
    if let Some(problems) = &args.decode {
        return run_decode(args, problems, baselines.as_ref(), out);
    }
    if let Some(gpus) = args.gpus {
        return run_gpus(args, gpus, out);
    }
    let plan = plan(args)?;
    // A PTX folder that is not there is the user's to fix, before the GPU is opened.
    let ptx_dir = super::ptx_dir(args.ptx_dir.as_deref())?;
    let dev = Device::open(args.device)?;
    let builder = KernelBuilder::new(dev.arch, ptx_dir);
    writeln!(out, "device: {}", dev.describe())?;
    writeln!(
        out,
        "{} {} {}{}, schedule {}; median of {} reps ({} warm-up, {} rotating input sets)",
        plan.dtype,
        plan.mask,
        plan.layout,
        if plan.deterministic { ", deterministic backward" } else { "" },
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
    if args.json.is_some() || args.plot.is_some() {
        let doc = stamped(serde_json::json!({
            "gpu": dev.name,
            "device": dev.describe(),
            "compute_capability": format!("{}.{}", dev.compute_capability.0, dev.compute_capability.1),
            "dtype": plan.dtype.to_string(),
            "mask": plan.mask.to_string(),
            "layout": plan.layout.to_string(),
            "deterministic": plan.deterministic,
            "schedule": super::check::describe_schedule(plan.schedule),
            "reps": plan.reps,
            "flops": "fwd 4*H*n^2*D/2 summed over the sequences (4*B*H*N^2*D/2 dense), fwd+bwd 3.5x that; \
                      separate and padded rows are credited with the packed batch's work",
            "results": results,
        }));
        write_outputs(args, &doc, baselines.as_ref(), out)?;
    }
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    Ok(if failed == 0 { Outcome::Success } else { Outcome::Failure })
}

/// The plan of `bench --gpus`, validated before any GPU work.
pub fn ring_plan(args: &BenchArgs, gpus: usize) -> Result<RingBenchPlan> {
    if gpus == 0 {
        return Err(UsageError::new("`gpus` = 0 is not allowed: at least 1 (GPUs 0..N of this host)").into());
    }
    let layout = match args.layout.unwrap_or(Layout::Bhnd) {
        l @ (Layout::Bhnd | Layout::Bnhd) => l,
        l => return Err(UsageError::new(format!("`--layout {l}` with `--gpus`: allowed bhnd, bnhd")).into()),
    };
    if super::check::schedule_override(&args.schedule).is_some() {
        return Err(UsageError::new(
            "schedule flags with `--gpus`: the ring and the single GPU run each pass's default schedule",
        )
        .into());
    }
    if args.reps < 20 {
        return Err(UsageError::new(format!("`reps` = {} is not allowed: at least 20", args.reps)).into());
    }
    let (b, h, n, d) = ring_bench::DEFAULT_SHAPE;
    let problems = problems(args, None, &[Problem::dense(Shape::new(b, h, n, d))])?;
    let plan = RingBenchPlan {
        problems: problems.iter().map(|p| p.shape).collect(),
        gpus,
        scheme: args.scheme,
        dtype: args.dtype,
        mask: args.mask,
        layout,
        early_exits: if args.early_exit.is_empty() { vec![None, Some(24)] } else { args.early_exit.clone() },
        backward: !args.fwd_only,
        reps: args.reps,
        warmup: args.warmup,
        seed: args.seed,
    };
    for &shape in &plan.problems {
        let name = format!("{},{},{},{}", shape.batch, shape.heads, shape.seq, shape.head_dim);
        if shape.head_dim % 8 != 0 {
            return Err(UsageError::new(format!(
                "`head_dim` = {} ({name}) with `--gpus`: allowed a multiple of 8 (a GPU's segments start on \
                 16-byte rows)",
                shape.head_dim
            ))
            .into());
        }
        if shape.seq < 2 * gpus {
            return Err(UsageError::new(format!(
                "`N` = {} ({name}) with `--gpus {gpus}`: allowed at least {} (a token per segment)",
                shape.seq,
                2 * gpus
            ))
            .into());
        }
        for &ee in &plan.early_exits {
            let mut passes = vec![Pass::Forward, Pass::Segment];
            if plan.backward {
                passes.extend([Pass::Backward, Pass::SegmentBackward]);
            }
            for pass in passes {
                KernelBuilder::new(Arch::Sm90, None)
                    .kernel(plan.spec(shape.head_dim as u32, pass, ee), None)
                    .validate()
                    .map_err(UsageError::new)?;
            }
        }
    }
    Ok(plan)
}

/// `bench --gpus N`.
fn run_gpus(args: &BenchArgs, gpus: usize, out: &mut dyn Write) -> Result<Outcome> {
    let plan = ring_plan(args, gpus)?;
    let ptx_dir = super::ptx_dir(args.ptx_dir.as_deref())?;
    let dev = Device::open(args.device)?;
    let count = cudarc::driver::CudaContext::device_count()?;
    if gpus > count.max(0) as usize {
        return Err(
            UsageError::new(format!("`gpus` = {gpus} is not allowed: 1..={count}, the GPUs of this host")).into()
        );
    }
    // SAFETY: only tries to load the library (cudarc panics at the first NCCL call without it).
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        anyhow::bail!(
            "`--gpus` needs NCCL: libnccl.so cannot be loaded (put a folder holding libnccl.so, a link to \
             libnccl.so.2 will do, on LD_LIBRARY_PATH)"
        );
    }
    let builder = KernelBuilder::new(dev.arch, ptx_dir);
    writeln!(out, "device: {} (one GPU); ring over GPUs 0..{}", dev.describe(), gpus)?;
    writeln!(
        out,
        "{} {} {}, {} GPUs ({}), default schedules; median of {} reps ({} warm-up) per rank; ring ms = the \
         slowest rank's, transfers ms = the same passes' NCCL transfers alone (slowest rank)",
        plan.dtype,
        plan.mask,
        plan.layout,
        gpus,
        ring_bench::scheme_name(plan.scheme),
        plan.reps,
        plan.warmup
    )?;
    writeln!(out, "{}", ring_bench::header())?;
    out.flush()?;
    let mut write_error = None;
    let result = ring_bench::run(
        &dev,
        &builder,
        &plan,
        &mut |r| {
            let mut text = ring_bench::format_result(r);
            if r.pass == "fwd" {
                for c in &r.checks {
                    text.push_str(&format!("\n    check: {c}"));
                }
            }
            if write_error.is_none() {
                if let Err(e) = writeln!(out, "{text}").and_then(|_| out.flush()) {
                    write_error = Some(e);
                }
            }
        },
        &mut |what| eprintln!("... {what}"),
    );
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let results = result?;
    if args.json.is_some() {
        let doc = stamped(serde_json::json!({
            "gpu": dev.name,
            "device": dev.describe(),
            "gpus": gpus,
            "scheme": ring_bench::scheme_name(plan.scheme),
            "dtype": plan.dtype.to_string(),
            "mask": plan.mask.to_string(),
            "layout": plan.layout.to_string(),
            "reps": plan.reps,
            "flops": "fwd 4*B*H*N^2*D/2, fwd+bwd 3.5x that, over the slowest rank's median time",
            "results": results,
        }));
        write_outputs(args, &doc, None, out)?;
    }
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    Ok(if failed == 0 { Outcome::Success } else { Outcome::Failure })
}

/// `doc` with when, by which sbgen and with which command it was measured.
fn stamped(mut doc: Value) -> Value {
    if let Some(fields) = doc.as_object_mut() {
        fields
            .insert("unix_time".into(), SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()).into());
        fields.insert("sbgen_version".into(), env!("CARGO_PKG_VERSION").into());
        fields.insert("command".into(), std::env::args().collect::<Vec<_>>().join(" ").into());
    }
    doc
}

/// Checks the `--plot` file's path and reads the `--baselines` document, before any GPU time is
/// spent: both are the user's to fix (exit 2).
fn plot_inputs(args: &BenchArgs) -> Result<Option<Value>> {
    let Some(path) = &args.plot else { return Ok(None) };
    let inputs: Vec<&Path> =
        [&args.from_json, &args.baselines, &args.json].into_iter().flatten().map(PathBuf::as_path).collect();
    files::check_output(path, &inputs).map_err(|e| UsageError::new(format!("`--plot`: {e}")))?;
    args.baselines.as_deref().map(|b| read_json(b, "--baselines")).transpose()
}

/// A JSON document for `--plot`; a file that is missing, unreadable for the user or not JSON is a
/// usage error naming `flag`.
fn read_json(path: &Path, flag: &str) -> Result<Value> {
    use std::io::ErrorKind;
    if path.is_dir() {
        return Err(UsageError::new(format!("`{flag}` `{}` is a folder: give a file", path.display())).into());
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::InvalidData) => {
            return Err(UsageError::new(format!("`{flag}`: cannot read `{}`: {e}", path.display())).into())
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot read `{}`", path.display()))),
    };
    serde_json::from_str(&text)
        .map_err(|e| UsageError::new(format!("`{flag}`: `{}` is not JSON: {e}", path.display())).into())
}

/// `--json` and `--plot` of a finished run.
fn write_outputs(args: &BenchArgs, doc: &Value, baselines: Option<&Value>, out: &mut dyn Write) -> Result<()> {
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(doc)? + "\n";
        std::fs::write(path, text).with_context(|| format!("cannot write `{}`", path.display()))?;
        writeln!(out, "wrote `{}`", path.display())?;
    }
    if let Some(path) = &args.plot {
        match write_plot(args, path, doc, baselines, out) {
            // Every row failed (or none of `--early-exit`): the run's own failure is the news.
            Err(e) if e.downcast_ref::<plot::PlotError>().is_some_and(|p| matches!(p, plot::PlotError::Empty(_))) => {
                writeln!(out, "`{}` not written: {e:#}", path.display())?
            }
            result => result?,
        }
    }
    Ok(())
}

/// Draws `doc` (with the baselines) into the SVG file `path`; `--early-exit` picks the rows.
fn write_plot(
    args: &BenchArgs,
    path: &Path,
    doc: &Value,
    baselines: Option<&Value>,
    out: &mut dyn Write,
) -> Result<()> {
    let figure = plot::figure(doc, baselines, &args.early_exit).map_err(|e| {
        let what = match (&args.from_json, &args.baselines) {
            (Some(f), Some(b)) => format!("`{}` with the baselines `{}`", f.display(), b.display()),
            (Some(f), None) => format!("`{}`", f.display()),
            (None, Some(b)) => format!("the results with the baselines `{}`", b.display()),
            (None, None) => "the results".to_string(),
        };
        anyhow::Error::new(e).context(format!("cannot plot {what}"))
    })?;
    let svg = plot::render_svg(&figure)?;
    files::write_atomic(path, svg.as_bytes())?;
    writeln!(out, "wrote `{}` ({} series)", path.display(), figure.series.len())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use crate::gpu::bench::Mode;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut all = vec!["sbgen", "bench"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|cli| match cli.command {
            Command::Bench(b) => b,
            other => panic!("not bench: {other:?}"),
        })
    }

    fn plan_of(args: &[&str]) -> Result<BenchPlan> {
        plan(&parse(args).unwrap())
    }

    #[test]
    fn parses_shapes() {
        assert_eq!(parse_shape("4,16,4096,64").unwrap(), Shape::new(4, 16, 4096, 64));
        assert!(parse_shape("4,16,4096").unwrap_err().contains("B,H,N,D"));
        assert!(parse_shape("4,0,4096,64").is_err());
        assert!(parse_shape("a,b,c,d").is_err());
    }

    #[test]
    fn the_default_plan_is_the_dense_benchmark_shapes() {
        let plan = plan_of(&[]).unwrap();
        assert_eq!(plan.problems, BenchPlan::new(0).problems);
        assert_eq!((plan.layout, plan.deterministic, plan.separate), (Layout::Bhnd, false, false));
    }

    #[test]
    fn any_head_dim_in_range_is_timed_and_others_are_refused_by_name() {
        let plan = plan_of(&["--shapes", "2,16,4096,96", "1,8,1024,80", "--layout", "bnhd"]).unwrap();
        assert_eq!(plan.problems.iter().map(|p| p.shape.head_dim).collect::<Vec<_>>(), vec![96, 80]);
        let err = plan_of(&["--shapes", "2,16,4096,300"]).unwrap_err().to_string();
        assert!(err.contains("`head_dim` = 300") && err.contains("1..=256"), "{err}");
        let err = plan_of(&["--varlen-lens", "100,200", "--head-dim", "257"]).unwrap_err().to_string();
        assert!(err.contains("`head_dim` = 257"), "{err}");
    }

    #[test]
    fn kv_heads_set_gqa_and_must_divide_every_shapes_heads() {
        let plan = plan_of(&["--shapes", "2,16,4096,128", "1,32,8192,64", "--kv-heads", "4"]).unwrap();
        assert!(plan.problems.iter().all(|p| p.shape.kv_heads == 4));
        assert_eq!(plan.problems[1].shape.group(), 8);
        for bad in ["3", "0", "32"] {
            let err = plan_of(&["--shapes", "2,16,4096,128", "--kv-heads", bad]).unwrap_err().to_string();
            assert!(err.contains(&format!("`--kv-heads` = {bad}")) && err.contains("2,16,4096,128"), "{err}");
        }
        let mqa = plan_of(&["--varlen-lens", "5,7", "--heads", "8", "--kv-heads", "1"]).unwrap();
        assert_eq!((mqa.problems[0].shape.heads, mqa.problems[0].shape.kv_heads), (8, 1));
    }

    #[test]
    fn varlen_lens_time_one_packed_batch_in_thd() {
        let plan = plan_of(&["--varlen-lens", "512,0,4096,1000", "--heads", "8", "--head-dim", "64"]).unwrap();
        assert_eq!(plan.layout, Layout::Thd);
        assert_eq!(plan.problems, vec![Problem::packed(8, 8, 64, vec![512, 0, 4096, 1000])]);
        assert_eq!(plan.problems[0].shape, Shape::new(4, 8, 4096, 64));
        assert_eq!(plan_of(&["--varlen-lens", "5,7", "--layout", "thd"]).unwrap().layout, Layout::Thd);
        let err = plan_of(&["--varlen-lens", "5,7", "--layout", "bnhd"]).unwrap_err().to_string();
        assert!(err.contains("`--layout bnhd`") && err.contains("thd"), "{err}");
        let err = plan_of(&["--varlen-lens", "0,0"]).unwrap_err().to_string();
        assert!(err.contains("`--varlen-lens`") && err.contains("no token"), "{err}");
        let err = plan_of(&["--varlen-lens", "2000000000,2000000000"]).unwrap_err().to_string();
        assert!(err.contains("i32"), "{err}");
    }

    #[test]
    fn varlen_random_draws_count_lengths_in_range_from_the_seed() {
        let r = parse_varlen_random("8:128..4096").unwrap();
        assert_eq!(r, VarlenRandom { count: 8, min: 128, max: 4096 });
        let lens = r.lens(3);
        assert_eq!(lens.len(), 8);
        assert!(lens.iter().all(|n| (128..=4096).contains(n)), "{lens:?}");
        assert_eq!(lens, r.lens(3), "the same seed draws the same lengths");
        assert_ne!(lens, r.lens(4));
        assert_eq!(parse_varlen_random("3:5..5").unwrap().lens(0), vec![5, 5, 5]);
        for bad in ["8", "8:128", "0:1..2", "8:10..5", "8:0..0", "x:1..2", "8:1..y", "70000:1..2"] {
            let err = parse_varlen_random(bad).unwrap_err();
            assert!(err.contains("`--varlen-random`") && err.contains("COUNT:MIN..MAX"), "{bad}: {err}");
        }
        let plan = plan_of(&["--varlen-random", "6:1..300", "--seed", "9"]).unwrap();
        assert_eq!(plan.problems[0].seq_lens, VarlenRandom { count: 6, min: 1, max: 300 }.lens(9));
    }

    #[test]
    fn separate_and_deterministic_flags_reach_the_plan() {
        let plan = plan_of(&["--varlen-lens", "100,300", "--separate", "--deterministic"]).unwrap();
        assert!(plan.separate && plan.deterministic);
        assert_eq!(plan.layouts(), vec![Layout::Thd, Layout::Bnhd]);
        assert!(plan.spec(128, crate::ir::Pass::Backward, Layout::Thd, None).deterministic);
    }

    #[test]
    fn flags_that_cannot_go_together_are_refused_by_the_parser() {
        for bad in [
            &["--separate"][..],
            &["--heads", "8"][..],
            &["--head-dim", "64"][..],
            &["--varlen-lens", "5", "--varlen-random", "2:1..3"][..],
            &["--varlen-lens", "5", "--shapes", "1,2,3,64"][..],
            &["--deterministic", "--fwd-only"][..],
            &["--varlen-random", "2:9..3"][..],
            &["--kv-heads", "x"][..],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn report_modes_follow_the_layout() {
        let dense = plan_of(&["--shapes", "1,2,64,32"]).unwrap();
        let thd = plan_of(&["--shapes", "1,2,64,32", "--layout", "thd"]).unwrap();
        assert_eq!(thd.problems, dense.problems, "--layout thd times the shapes as packed equal sequences");
        assert_eq!(Mode::Packed.to_string(), "packed");
    }
}
