//! `sbgen tune`: enumerate the default search space for each requested spec, prune, lower and
//! compile every variant in parallel, and report registers, shared memory and spills. Timing on the
//! GPU comes later; `--compile-only` is the part that runs anywhere.

use super::{Outcome, UsageError};
use crate::compile::{CompileError, Compiled, Compiler};
use crate::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};
use crate::lower::{lower, Lowered};
use crate::search_space::{variants, Pruned};
use anyhow::{anyhow, Result};
use clap::Args;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

/// Lines of a compiler log printed under a failed variant.
const LOG_LINES: usize = 40;

#[derive(Debug, Args)]
pub struct TuneArgs {
    /// Target GPU architecture: sm_80 or sm_90 (compiled as sm_90a).
    #[arg(long)]
    pub gpu: Arch,
    /// Lower and compile every variant, without a GPU and without timing.
    #[arg(long)]
    pub compile_only: bool,
    /// Head dimensions, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [64u32, 128])]
    pub head_dim: Vec<u32>,
    /// Element types, comma-separated (bf16, f16).
    #[arg(long, value_delimiter = ',', default_values_t = [Dtype::Bf16, Dtype::F16])]
    pub dtype: Vec<Dtype>,
    /// Passes, comma-separated (fwd, bwd).
    #[arg(long, value_delimiter = ',', default_values_t = [Pass::Forward, Pass::Backward])]
    pub pass: Vec<Pass>,
    /// Parallel compilations (default: the number of cores).
    #[arg(short = 'j', long, value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    /// List every pruned candidate (default: one line per distinct reason).
    #[arg(long)]
    pub show_pruned: bool,
}

pub fn run(args: &TuneArgs, out: &mut dyn Write) -> Result<Outcome> {
    let specs = specs(args)?;
    if !args.compile_only {
        let device = find_device().map_err(|why| {
            anyhow!("no CUDA device found: {why}\n(`sbgen tune --gpu {} --compile-only` lowers and compiles every variant without one)", args.gpu)
        })?;
        return Err(anyhow!(
            "GPU tuning is not implemented yet (found {device}); `--compile-only` lowers and compiles every variant"
        ));
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
    let jobs = match args.jobs {
        Some(j) => j as usize,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let start = Instant::now();
    execute(&items, &compiler, jobs, out, &mut tally)?;
    writeln!(
        out,
        "pruned {} candidates; {:.1} s with {jobs} parallel jobs",
        tally.pruned,
        start.elapsed().as_secs_f64()
    )?;
    writeln!(out, "compiled {} variants: {} failed, {} spilling", tally.compiled, tally.failed, tally.spilling)?;
    Ok(if tally.failed == 0 && tally.spilling == 0 { Outcome::Success } else { Outcome::Failure })
}

/// The specs to tune: every combination of the lists, each validated before any work.
fn specs(args: &TuneArgs) -> Result<Vec<Spec>> {
    let mut specs = Vec::new();
    for &pass in &args.pass {
        for &head_dim in &args.head_dim {
            for &dtype in &args.dtype {
                let spec = Spec::new(head_dim, dtype, pass);
                spec.validate().map_err(UsageError::new)?;
                if !specs.contains(&spec) {
                    specs.push(spec);
                }
            }
        }
    }
    Ok(specs)
}

/// A device description, or why there is none. Never panics: the driver library is looked for
/// before cudarc touches it.
fn find_device() -> Result<String, String> {
    // SAFETY: only loads the library to see whether it exists, as cudarc itself does.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) is not installed".into());
    }
    let count = cudarc::driver::CudaContext::device_count().map_err(|e| format!("the driver reports {e:?}"))?;
    if count < 1 {
        return Err("the driver reports no devices".into());
    }
    let ctx = cudarc::driver::CudaContext::new(0).map_err(|e| format!("device 0: {e:?}"))?;
    let name = ctx.name().unwrap_or_else(|_| "device 0".into());
    Ok(format!("{name}, {count} device(s)"))
}

#[derive(Default)]
struct Tally {
    pruned: usize,
    compiled: usize,
    failed: usize,
    spilling: usize,
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
    let mut groups: Vec<(String, Vec<Schedule>)> = Vec::new();
    for (kernel, verdict) in &all {
        let Err(reason) = verdict else { continue };
        tally.pruned += 1;
        let reason = reason.to_string();
        if args.show_pruned {
            text.push_str(&format!("pruned {:<48} {:<26} {reason}\n", kernel.name(), kernel.schedule.to_string()));
        } else {
            match groups.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, list)) => list.push(kernel.schedule),
                None => groups.push((reason, vec![kernel.schedule])),
            }
        }
    }
    for (reason, schedules) in groups {
        let mut shown: Vec<String> = schedules.iter().take(3).map(|s| s.to_string()).collect();
        if schedules.len() > 3 {
            shown.push("...".into());
        }
        text.push_str(&format!("pruned x{:<3} {reason} [{}]\n", schedules.len(), shown.join(", ")));
    }
    items.push(Item::Text(text.trim_end().to_string()));
    for (kernel, verdict) in all {
        if verdict.is_err() {
            continue;
        }
        match lower(&kernel) {
            Ok(lowered) => items.push(Item::Compile(Box::new(lowered))),
            Err(e) => {
                tally.compiled += 1;
                tally.failed += 1;
                items.push(Item::Text(failure_line(&kernel.name(), &kernel.schedule, &e.to_string())));
            }
        }
    }
}

/// Compiles the variants on `jobs` threads and prints every item in order as soon as it and all
/// before it are done.
fn execute(items: &[Item], compiler: &Compiler, jobs: usize, out: &mut dyn Write, tally: &mut Tally) -> Result<()> {
    let work: Vec<usize> = (0..items.len()).filter(|&i| matches!(items[i], Item::Compile(_))).collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, Result<Compiled, String>)>();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(work.len()) {
            let tx = tx.clone();
            let (next, stop, work) = (&next, &stop, &work);
            scope.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= work.len() || stop.load(Ordering::Relaxed) {
                    break;
                }
                let Item::Compile(lowered) = &items[work[k]] else { continue };
                let result = catch_unwind(AssertUnwindSafe(|| compiler.compile(lowered)))
                    .unwrap_or_else(|panic| Err(panicked(&lowered.name, panic)))
                    .map_err(|e: CompileError| e.to_string());
                if tx.send((work[k], result)).is_err() {
                    break;
                }
            });
        }
        drop(tx);

        let mut lines: Vec<Option<String>> =
            items.iter().map(|item| if let Item::Text(t) = item { Some(t.clone()) } else { None }).collect();
        let mut printed = 0;
        let mut print_ready = |lines: &mut Vec<Option<String>>, out: &mut dyn Write| -> std::io::Result<()> {
            while printed < lines.len() {
                let Some(line) = lines[printed].take() else { break };
                writeln!(out, "{line}")?;
                printed += 1;
            }
            out.flush()
        };
        let result = (|| -> Result<()> {
            print_ready(&mut lines, out)?;
            for (i, result) in rx.iter() {
                let Item::Compile(lowered) = &items[i] else { continue };
                tally.compiled += 1;
                lines[i] = Some(match result {
                    Ok(compiled) => {
                        if compiled.spills() {
                            tally.spilling += 1;
                        }
                        variant_line(lowered, &compiled)
                    }
                    Err(message) => {
                        tally.failed += 1;
                        failure_line(&lowered.name, &lowered.kernel.schedule, &message)
                    }
                });
                print_ready(&mut lines, out)?;
            }
            Ok(())
        })();
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        result
    })
}

/// A panic inside a compilation, as a failed variant instead of a crash.
fn panicked(kernel: &str, payload: Box<dyn std::any::Any + Send>) -> CompileError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    CompileError::Panicked { kernel: kernel.to_string(), message }
}

/// `ok     <name> <schedule> regs 168/32 smem  49152 B  spill 0 B  stack 0 B`
fn variant_line(lowered: &Lowered, c: &Compiled) -> String {
    let status = if c.spills() { "SPILL" } else { "ok" };
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
