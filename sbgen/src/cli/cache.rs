//! `sbgen cache show`: what a tuning cache holds, one line per (arch, spec, sequence bucket).
//! `sbgen cache refresh`: keeps a cache valid across template changes that do not change the code
//! (a comment, a branch other kernels take): an entry whose CUDA source changed but whose PTX,
//! compiled again here, is byte-identical to the PTX it holds is the same program, so its timings
//! stand and only its source hash is updated; every other changed entry is reported stale.

use super::Outcome;
use crate::artifact;
use crate::cache::{source_hash, CacheEntry, TuningCache, DEFAULT_CACHE_FILE};
use crate::compile::Compiler;
use crate::ir::Kernel;
use crate::lower::lower;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub action: CacheAction,
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// List the entries: arch, spec, sequence bucket, winning schedule, time, TFLOP/s, speed-up over
    /// the default schedule, GPU and date.
    Show(ShowArgs),
    /// Re-check every entry against this sbgen (needs the CUDA toolchain, not a GPU): an entry whose
    /// CUDA source changed is compiled again, and kept (its source hash updated) when the PTX is
    /// byte-identical to the PTX it holds; otherwise it is listed as stale, to re-tune. Exit 1 when
    /// any entry is stale.
    Refresh(RefreshArgs),
}

#[derive(Debug, Args)]
pub struct RefreshArgs {
    /// The cache file to check and update in place.
    #[arg(long, default_value = DEFAULT_CACHE_FILE)]
    pub cache: PathBuf,
    /// Report only; do not write the file.
    #[arg(long)]
    pub dry_run: bool,
    /// Compiler threads (default: all cores).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The cache file (default: `sbgen-tune.json` in the current directory, where `sbgen tune`
    /// writes it).
    #[arg(long, default_value = DEFAULT_CACHE_FILE)]
    pub cache: PathBuf,
    /// Also list every candidate of each entry with its outcome.
    #[arg(long)]
    pub candidates: bool,
}

pub fn run(args: &CacheArgs, out: &mut dyn Write) -> Result<Outcome> {
    match &args.action {
        CacheAction::Show(show) => {
            // A missing, corrupt or other-version file is an error naming the file and the fix (exit 2);
            // loading validates every entry, so what is printed below was checked.
            let cache = TuningCache::load(&show.cache)?;
            writeln!(out, "{}: version {}, {} entries", show.cache.display(), cache.version, cache.entries.len())?;
            if cache.entries.is_empty() {
                return Ok(Outcome::Success);
            }
            writeln!(out, "{}", header())?;
            for entry in &cache.entries {
                writeln!(out, "{}", format_entry(entry))?;
                if show.candidates {
                    for c in &entry.candidates {
                        writeln!(out, "    {:<26} {}", c.schedule.to_string(), printable(&c.outcome.to_string()))?;
                    }
                }
            }
            Ok(Outcome::Success)
        }
        CacheAction::Refresh(refresh_args) => refresh(refresh_args, out),
    }
}

/// What [`refresh`] found for one entry.
enum Freshness {
    /// Its CUDA source is the one this sbgen renders.
    Current,
    /// The source changed, the PTX compiled from it did not: the hash to store.
    SamePtx(String),
    /// Anything else, with the reason.
    Stale(String),
}

fn refresh(args: &RefreshArgs, out: &mut dyn Write) -> Result<Outcome> {
    let mut cache = TuningCache::load(&args.cache)?;
    let compiler = Compiler::discover()?;
    let threads = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let mut verdicts: Vec<Option<Freshness>> = Vec::with_capacity(cache.entries.len());
    let mut to_compile = Vec::new();
    for (i, e) in cache.entries.iter().enumerate() {
        match lower(&Kernel::new(e.spec, e.schedule, e.arch)) {
            Err(err) => verdicts.push(Some(Freshness::Stale(format!("its schedule no longer lowers: {err}")))),
            Ok(l) if l.name != e.kernel_name => {
                verdicts.push(Some(Freshness::Stale(format!("its kernel name is now `{}`", l.name))))
            }
            Ok(l) if l.manifest != e.manifest => {
                verdicts.push(Some(Freshness::Stale("its launch manifest differs".into())))
            }
            Ok(l) if source_hash(&l.cuda_source) == e.cuda_source_hash => verdicts.push(Some(Freshness::Current)),
            Ok(l) => {
                verdicts.push(None);
                to_compile.push((i, l));
            }
        }
    }
    let lowered: Vec<_> = to_compile.iter().map(|(_, l)| l.clone()).collect();
    for ((i, l), artifact) in to_compile.iter().zip(artifact::build_all(&lowered, &compiler, threads)) {
        let stored = &cache.entries[*i].ptx;
        verdicts[*i] = Some(match &artifact.compiled {
            Some(c) if c.ptx == *stored => Freshness::SamePtx(source_hash(&l.cuda_source)),
            Some(_) => Freshness::Stale("its CUDA source changed and so did the PTX: re-tune it".into()),
            None => Freshness::Stale(format!("it no longer compiles: {}", artifact.verdict)),
        });
    }
    let (mut current, mut rehashed, mut stale) = (0, 0, 0);
    for (e, verdict) in cache.entries.iter_mut().zip(verdicts) {
        let what = format!("{} {} bucket {}", e.arch, e.spec.slug(), e.seq_bucket);
        match verdict {
            Some(Freshness::Current) | None => current += 1,
            Some(Freshness::SamePtx(hash)) => {
                writeln!(out, "same PTX  {what}: source hash {} -> {hash}", e.cuda_source_hash)?;
                e.cuda_source_hash = hash;
                rehashed += 1;
            }
            Some(Freshness::Stale(why)) => {
                writeln!(out, "STALE     {what}: {why}")?;
                stale += 1;
            }
        }
    }
    if rehashed > 0 && !args.dry_run {
        cache.save(&args.cache)?;
    }
    writeln!(
        out,
        "refresh: {} entries: {current} current, {rehashed} with the same PTX from a changed source{}, {stale} stale",
        cache.entries.len(),
        if rehashed > 0 && args.dry_run { " (not written: --dry-run)" } else { "" }
    )?;
    Ok(if stale == 0 { Outcome::Success } else { Outcome::Failure })
}

fn header() -> String {
    format!(
        "{:<6} {:<36} {:>7} {:<26} {:>9} {:>8} {:>8}  {:<20} {}",
        "arch", "spec", "bucket", "schedule", "ms", "TFLOP/s", "speedup", "GPU", "tuned at"
    )
}

/// `s` with control characters and other invisible ones escaped (`\u{1b}`), so that text from a cache
/// file (a GPU name, a date, a failure reason) cannot move the cursor or recolour the terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            // Shown as they are: `escape_debug` would add a backslash.
            '"' | '\'' | '\\' => c.to_string(),
            c => c.escape_debug().to_string(),
        })
        .collect()
}

fn format_entry(e: &CacheEntry) -> String {
    let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { printable(s) };
    format!(
        "{:<6} {:<36} {:>7} {:<26} {:>9.3} {:>8.1} {:>8}  {:<20} {}",
        e.arch.to_string(),
        e.spec.slug(),
        e.seq_bucket,
        e.schedule.to_string(),
        e.time_ms,
        e.tflops,
        e.speedup_over_default.map_or("-".to_string(), |s| format!("{s:.2}x")),
        or_dash(&e.gpu_name),
        or_dash(&e.tuned_at)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};

    #[test]
    fn an_entry_line_shows_the_key_the_winner_and_the_measurements() {
        let spec = Spec::new(128, Dtype::Bf16, Pass::Backward);
        let schedule = Schedule::default_for(&spec);
        let entry = CacheEntry {
            time_ms: 12.3456,
            tflops: 111.11,
            speedup_over_default: Some(1.0),
            gpu_name: "NVIDIA H200".into(),
            tuned_at: "2026-11-29T02:00:00Z".into(),
            ..CacheEntry::untimed(Kernel::new(spec, schedule, Arch::Sm90), 8192, String::new()).unwrap()
        };
        let line = format_entry(&entry);
        for part in [
            "sm_90",
            "bwd_d128_bf16_strict_bhnd_ret_full",
            "8192",
            &schedule.to_string(),
            "12.346",
            "111.1",
            "1.00x",
            "NVIDIA H200",
            "2026-11-29",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
        assert_eq!(header().split_whitespace().count(), 10);
        let hostile = CacheEntry { gpu_name: "H200\u{1b}[2J\u{202e}".into(), tuned_at: "\r\n2026".into(), ..entry };
        let line = format_entry(&hostile);
        assert!(line.contains("H200\\u{1b}[2J\\u{202e}") && line.contains("\\r\\n2026"), "{line}");
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
    }
}
