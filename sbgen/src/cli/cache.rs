//! `sbgen cache show`: what a tuning cache holds, one line per (arch, spec, sequence bucket).
//! `sbgen cache refresh`: keeps a cache valid across template changes that do not change the code
//! (a comment, a branch other kernels take): an entry whose CUDA source changed but whose PTX,
//! compiled again here, is byte-identical to the PTX it holds is the same program, so its timings
//! stand and only its source hash is updated; every other changed entry is reported stale. With
//! `--recompile`, an entry whose PTX changed (its name and launch manifest did not) takes the new
//! PTX when it compiles without spills, and `recompiled_at` records that its times are the earlier
//! PTX's: the winners stand until the next `sbgen tune` re-times them.

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
    /// byte-identical to the PTX it holds; otherwise it is listed as stale, to re-tune
    /// (`--recompile`: to store the new PTX untimed). Exit 1 when any entry is stale.
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
    /// Store the new PTX of an entry whose PTX changed (same kernel name and launch manifest, no
    /// spills), marked `recompiled_at`: its times, TFLOP/s and candidates stay those measured with
    /// the earlier PTX, so the winner is kept but not re-timed. For a template change that cannot be
    /// re-tuned at once; `sbgen tune` replaces the entry.
    #[arg(long)]
    pub recompile: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The cache file (default: `sbgen-tune.json` in the current directory, where `sbgen tune`
    /// writes it).
    #[arg(long, default_value = DEFAULT_CACHE_FILE)]
    pub cache: PathBuf,
    /// Also list each entry's candidates (those the search kept) with their outcomes.
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
    /// `--recompile`: the source and the PTX changed; the hash and PTX to store, untimed.
    Recompiled(String, String),
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
            Some(c) if args.recompile && matches!(artifact.verdict, artifact::Verdict::Ok) => {
                Freshness::Recompiled(source_hash(&l.cuda_source), c.ptx.clone())
            }
            Some(_) if args.recompile => Freshness::Stale(format!("its new PTX is not stored: {}", artifact.verdict)),
            Some(_) => Freshness::Stale(
                "its CUDA source changed and so did the PTX: re-tune it (or `--recompile` to keep the winner untimed)"
                    .into(),
            ),
            None => Freshness::Stale(format!("it no longer compiles: {}", artifact.verdict)),
        });
    }
    let (mut current, mut rehashed, mut recompiled, mut stale) = (0, 0, 0, 0);
    let now = crate::cache::now_utc();
    for (e, verdict) in cache.entries.iter_mut().zip(verdicts) {
        let what = format!("{} {} bucket {}", e.arch, e.spec.slug(), e.seq_bucket);
        match verdict {
            Some(Freshness::Current) | None => current += 1,
            Some(Freshness::SamePtx(hash)) => {
                writeln!(out, "same PTX  {what}: source hash {} -> {hash}", e.cuda_source_hash)?;
                e.cuda_source_hash = hash;
                rehashed += 1;
            }
            Some(Freshness::Recompiled(hash, ptx)) => {
                let timed = if e.tuned_at.is_empty() { "an earlier PTX" } else { &e.tuned_at };
                writeln!(out, "recompiled {what}: new PTX, untimed (its times are from {})", printable(timed))?;
                (e.cuda_source_hash, e.ptx, e.recompiled_at) = (hash, ptx, now.clone());
                recompiled += 1;
            }
            Some(Freshness::Stale(why)) => {
                writeln!(out, "STALE     {what}: {why}")?;
                stale += 1;
            }
        }
    }
    let changed = rehashed + recompiled > 0;
    if changed && !args.dry_run {
        cache.save(&args.cache)?;
    }
    writeln!(
        out,
        "refresh: {} entries: {current} current, {rehashed} with the same PTX from a changed source, {recompiled} \
         recompiled untimed{}, {stale} stale",
        cache.entries.len(),
        if changed && args.dry_run { " (not written: --dry-run)" } else { "" }
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
        if e.recompiled_at.is_empty() {
            or_dash(&e.tuned_at)
        } else {
            format!("{} (PTX recompiled {}, untimed)", or_dash(&e.tuned_at), printable(&e.recompiled_at))
        }
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
        let recompiled = CacheEntry { recompiled_at: "2026-12-02T10:00:00Z".into(), ..hostile };
        assert!(format_entry(&recompiled).contains("(PTX recompiled 2026-12-02T10:00:00Z, untimed)"));
    }

    /// An entry whose source and PTX changed is stale; `--recompile` stores the new PTX (its times
    /// kept, `recompiled_at` set), `--dry-run` writes nothing, and the entry is then current.
    /// Through the real NVRTC and ptxas (skipped without the toolchain).
    #[test]
    fn recompile_stores_the_new_ptx_untimed() {
        if let Err(e) = Compiler::discover() {
            eprintln!("skipped: {e}");
            return;
        }
        let dir = crate::files::tests::scratch("cache-recompile");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cache.json");
        let spec = Spec::new(64, Dtype::Bf16, Pass::Forward);
        let kernel = Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm90);
        let old = CacheEntry {
            time_ms: 0.5,
            tuned_at: "2026-11-29T02:00:00Z".into(),
            cuda_source_hash: "0123456789abcdef".into(),
            ..CacheEntry::untimed(kernel, 2048, "// the PTX of an earlier template".into()).unwrap()
        };
        let mut cache = TuningCache::new();
        cache.insert(old.clone());
        cache.save(&path).unwrap();
        let refresh_with = |recompile: bool, dry_run: bool| {
            let args = RefreshArgs { cache: path.clone(), dry_run, jobs: Some(1), recompile };
            let mut out = Vec::new();
            let outcome = refresh(&args, &mut out).unwrap();
            (outcome, String::from_utf8(out).unwrap(), TuningCache::load(&path).unwrap().entries[0].clone())
        };
        let (outcome, text, entry) = refresh_with(false, false);
        assert!(
            matches!(outcome, Outcome::Failure) && text.contains("STALE") && text.contains("--recompile"),
            "{text}"
        );
        assert_eq!(entry, old);
        let (outcome, text, entry) = refresh_with(true, true);
        assert!(matches!(outcome, Outcome::Success) && text.contains("1 recompiled untimed (not written"), "{text}");
        assert_eq!(entry, old);
        let (outcome, text, entry) = refresh_with(true, false);
        assert!(matches!(outcome, Outcome::Success) && text.contains("recompiled sm_90"), "{text}");
        assert!(entry.ptx.contains(".entry") && !entry.recompiled_at.is_empty(), "{}", entry.recompiled_at);
        assert_eq!((entry.time_ms, entry.tuned_at.as_str()), (0.5, "2026-11-29T02:00:00Z"));
        assert!(entry.check_lowering().is_ok());
        let (outcome, text, _) = refresh_with(true, false);
        assert!(matches!(outcome, Outcome::Success) && text.contains("1 current"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
