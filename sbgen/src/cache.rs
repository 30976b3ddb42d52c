//! The tuning cache: the winners of `sbgen tune`, one entry per (arch, spec, sequence-length bucket),
//! in a human-readable JSON file that users commit beside `Cargo.lock` (default `sbgen-tune.json`).
//!
//! Each entry keeps the winning schedule, its time, TFLOP/s and speed-up over the spec's default
//! schedule, the GPU, driver and sbgen version it was measured with, a checksum of the candidate list
//! (so a changed search space is visible), every candidate's result (timed, failed, wrong, pruned or
//! not run) and the winner's launch manifest and PTX, inline.
//!
//! Loading never panics and never drops a file silently: a missing file is [`CacheError::Missing`];
//! a corrupt file or one of another [`CACHE_VERSION`] is an error that names the file and says what to
//! do. Saving is atomic (a temp file in the same folder, fsync, rename) and merges with what is on
//! disk at that moment (re-read just before writing), so two tuners writing the same file one after
//! the other lose no entries of different keys (there is no file lock: two saves racing between
//! the re-read and the rename can still lose one side's entries). An entry with the same key is
//! replaced unless the new one timed fewer candidates (a run cut short by its budget).
//!
//! Fields added after version 1 must carry `#[serde(default)]`, so older files keep loading.
//!
//! This module depends on serde and std only (no CUDA, no CLI), so the proc-macro can read caches.

use crate::ir::{Arch, Kernel, Schedule, Spec};
use sbgen_runtime::hash::Fnv64;
use sbgen_runtime::manifest::KernelManifest;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The format version this sbgen reads and writes.
pub const CACHE_VERSION: u32 = 1;

/// The cache file `sbgen tune` writes and `sbgen cache show` reads when no `--cache` is given
/// (relative to the current directory).
pub const DEFAULT_CACHE_FILE: &str = "sbgen-tune.json";

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TuningCache {
    pub version: u32,
    #[serde(default)]
    pub entries: Vec<CacheEntry>,
}

/// The winner for one (arch, spec, sequence-length bucket).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub arch: Arch,
    pub spec: Spec,
    /// Upper bound of the power-of-two bucket of sequence lengths this entry was tuned for
    /// ([`seq_bucket`]).
    pub seq_bucket: u32,
    /// The winning schedule.
    pub schedule: Schedule,
    pub kernel_name: String,
    /// Median time of the winner, milliseconds.
    pub time_ms: f64,
    #[serde(default)]
    pub tflops: f64,
    /// The default schedule's time divided by the winner's (1.0 when the default won).
    #[serde(default)]
    pub speedup_over_default: Option<f64>,
    /// The problem timed: [B, H, N, D].
    #[serde(default)]
    pub shape: Option<[usize; 4]>,
    #[serde(default)]
    pub gpu_name: String,
    /// e.g. `CUDA 13.0` as the driver reports it.
    #[serde(default)]
    pub driver_version: String,
    #[serde(default)]
    pub sbgen_version: String,
    /// When the entry was measured, UTC, RFC 3339 (`2026-11-29T02:10:00Z`).
    #[serde(default)]
    pub tuned_at: String,
    /// [`candidates_checksum`] of the candidate list the winner was chosen from.
    #[serde(default)]
    pub candidates_checksum: String,
    /// Every candidate's result, the winner included.
    #[serde(default)]
    pub candidates: Vec<CandidateResult>,
    pub manifest: KernelManifest,
    /// The winner's PTX for `arch`.
    pub ptx: String,
    /// FNV-1a 64 of the CUDA source the PTX was compiled from (16 hex digits).
    #[serde(default)]
    pub cuda_source_hash: String,
}

/// One candidate schedule and what became of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateResult {
    pub schedule: Schedule,
    pub outcome: Outcome,
}

/// What became of a candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Checked against the reference and timed: median milliseconds and TFLOP/s.
    Timed { ms: f64, tflops: f64 },
    /// Did not compile, spilled, or failed to load or launch.
    Failed { reason: String },
    /// Ran but disagreed with the float64 reference (never chosen).
    WrongResult { max_error: f64 },
    /// Left out before compiling (search-space rule or IR validation).
    Pruned { reason: String },
    /// Valid but not timed (the time budget was spent first).
    NotRun { reason: String },
}

impl Outcome {
    /// Milliseconds when timed.
    pub fn ms(&self) -> Option<f64> {
        match self {
            Outcome::Timed { ms, .. } if ms.is_finite() && *ms > 0.0 => Some(*ms),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Timed { ms, tflops } => write!(f, "{ms:.3} ms, {tflops:.1} TFLOP/s"),
            Outcome::Failed { reason } => write!(f, "failed: {reason}"),
            Outcome::WrongResult { max_error } => write!(f, "wrong result: error {max_error:.2e}"),
            Outcome::Pruned { reason } => write!(f, "pruned: {reason}"),
            Outcome::NotRun { reason } => write!(f, "not run: {reason}"),
        }
    }
}

/// Why a cache could not be read or written. Every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    #[error(
        "no tuning cache at `{}`: run `sbgen tune --gpu sm_90 --cache {}` to create one",
        .path.display(), .path.display()
    )]
    Missing { path: PathBuf },
    #[error("cannot {action} `{}`: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{}` is not a valid sbgen tuning cache ({message}); re-run `sbgen tune --gpu <arch> --cache {}` \
         after deleting or moving the file away",
        .path.display(), .path.display()
    )]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "`{}` is a version {found} tuning cache; this sbgen ({}) reads version {expected}: re-run \
         `sbgen tune --gpu <arch> --cache {}` after deleting the file, or use the sbgen that wrote it",
        .path.display(), env!("CARGO_PKG_VERSION"), .path.display()
    )]
    Version { path: PathBuf, found: u64, expected: u32 },
    /// What would be written breaks a rule [`TuningCache::parse`] enforces (a bug in the writer).
    #[error("refusing to write `{}`: the cache would not load back ({message})", .path.display())]
    Invalid { path: PathBuf, message: String },
}

impl TuningCache {
    pub fn new() -> Self {
        TuningCache { version: CACHE_VERSION, entries: Vec::new() }
    }

    /// Reads `path`. A missing file is [`CacheError::Missing`] (callers that start a fresh cache
    /// match on it); anything unreadable is an error naming the file and the fix.
    pub fn load(path: &Path) -> Result<TuningCache, CacheError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CacheError::Missing { path: path.to_path_buf() })
            }
            Err(source) => return Err(CacheError::Io { action: "read", path: path.to_path_buf(), source }),
        };
        TuningCache::parse(&text, path)
    }

    /// Reads `path`, or an empty cache when there is no file.
    pub fn load_or_new(path: &Path) -> Result<TuningCache, CacheError> {
        match TuningCache::load(path) {
            Err(CacheError::Missing { .. }) => Ok(TuningCache::new()),
            other => other,
        }
    }

    /// Parses a cache's text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<TuningCache, CacheError> {
        let corrupt = |message: String| CacheError::Corrupt { path: path.to_path_buf(), message };
        // The version first, so that a newer file is reported as such rather than as corrupt.
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        let version = match value.get("version") {
            Some(v) => v.as_u64().ok_or_else(|| corrupt(format!("`version` is {v}, not a number")))?,
            None => return Err(corrupt("no `version` field".into())),
        };
        if version != CACHE_VERSION as u64 {
            return Err(CacheError::Version { path: path.to_path_buf(), found: version, expected: CACHE_VERSION });
        }
        let cache: TuningCache = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        cache.validate().map_err(corrupt)?;
        Ok(cache)
    }

    /// The rules a loaded cache must meet beyond its JSON shape: one entry per key, power-of-two
    /// buckets, PTX present, finite positive times.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for e in &self.entries {
            let name = &e.kernel_name;
            if !seen.insert(e.key()) {
                return Err(format!(
                    "two entries for {} {} bucket {} (the second is `{name}`)",
                    e.arch,
                    e.spec.slug(),
                    e.seq_bucket
                ));
            }
            if !e.seq_bucket.is_power_of_two() {
                return Err(format!("entry `{name}`: seq_bucket {} is not a power of two", e.seq_bucket));
            }
            if e.ptx.trim().is_empty() {
                return Err(format!("entry `{name}` has no PTX"));
            }
            if !(e.time_ms.is_finite() && e.time_ms > 0.0) {
                return Err(format!("entry `{name}`: time_ms {} is not a positive number", e.time_ms));
            }
            let numbers = [Some(e.tflops), e.speedup_over_default];
            if numbers.iter().flatten().any(|x| !x.is_finite()) {
                return Err(format!("entry `{name}`: tflops or speedup_over_default is not finite"));
            }
            for c in &e.candidates {
                let finite = match c.outcome {
                    Outcome::Timed { ms, tflops } => ms.is_finite() && tflops.is_finite(),
                    Outcome::WrongResult { max_error } => max_error.is_finite(),
                    _ => true,
                };
                if !finite {
                    return Err(format!("entry `{name}`: candidate {} has a non-finite figure", c.schedule));
                }
            }
        }
        Ok(())
    }

    /// Adds `entry`, replacing an entry of the same (arch, spec, seq_bucket).
    pub fn insert(&mut self, entry: CacheEntry) {
        match self.entries.iter_mut().find(|e| e.key() == entry.key()) {
            // A run whose budget ran out before timing as many candidates (say, only the default)
            // does not overwrite a fuller tuning of the same key.
            Some(old) if entry.timed_candidates() < old.timed_candidates() => {}
            Some(old) => *old = entry,
            None => self.entries.push(entry),
        }
    }

    /// Writes the cache to `path` atomically, merged into what the file holds right now (its entries
    /// of other keys are kept; ours replace those of the same key). Returns what was written.
    pub fn save(&self, path: &Path) -> Result<TuningCache, CacheError> {
        let mut merged = TuningCache::load_or_new(path)?;
        for entry in &self.entries {
            merged.insert(entry.clone());
        }
        merged.version = CACHE_VERSION;
        merged.sort();
        // JSON has no NaN: a non-finite time would be written as null and never load again.
        merged.validate().map_err(|message| CacheError::Invalid { path: path.to_path_buf(), message })?;
        let mut text = serde_json::to_string_pretty(&merged)
            .map_err(|e| CacheError::Corrupt { path: path.to_path_buf(), message: format!("cannot serialize: {e}") })?;
        text.push('\n');
        write_atomic(path, text.as_bytes())?;
        Ok(merged)
    }

    /// The entry for `spec` on `arch` whose bucket is the nearest at or above `seq_len`'s, else the
    /// one with the largest bucket.
    pub fn lookup(&self, arch: Arch, spec: &Spec, seq_len: usize) -> Option<&CacheEntry> {
        let matching = self.entries.iter().filter(|e| e.arch == arch && e.spec == *spec);
        sbgen_runtime::bucket::pick(matching.map(|e| (e, u64::from(e.seq_bucket))), seq_len)
    }

    /// Entries in a stable order: arch, spec, bucket.
    pub fn sort(&mut self) {
        self.entries.sort_by_key(|e| e.key());
    }
}

impl CacheEntry {
    /// An entry for `kernel` in bucket `seq_bucket` carrying `ptx`, with its identity (name,
    /// manifest, source hash) from lowering it and nothing measured yet (time 1 ms, no candidates,
    /// empty provenance): the base the tests override with `..` (the tuner fills every field).
    pub fn untimed(kernel: Kernel, seq_bucket: u32, ptx: String) -> Result<CacheEntry, crate::lower::LowerError> {
        let lowered = crate::lower::lower(&kernel)?;
        Ok(CacheEntry {
            arch: kernel.arch,
            spec: kernel.spec,
            seq_bucket,
            schedule: kernel.schedule,
            kernel_name: lowered.name,
            time_ms: 1.0,
            tflops: 0.0,
            speedup_over_default: None,
            shape: None,
            gpu_name: String::new(),
            driver_version: String::new(),
            sbgen_version: String::new(),
            tuned_at: String::new(),
            candidates_checksum: String::new(),
            candidates: Vec::new(),
            manifest: lowered.manifest,
            ptx,
            cuda_source_hash: source_hash(&lowered.cuda_source),
        })
    }

    /// How many candidates were checked and timed (the measure of how fully the key was tuned).
    pub fn timed_candidates(&self) -> usize {
        self.candidates.iter().filter(|c| matches!(c.outcome, Outcome::Timed { .. })).count()
    }

    /// What identifies an entry: (arch, spec, seq_bucket).
    pub fn key(&self) -> (Arch, Spec, u32) {
        (self.arch, self.spec, self.seq_bucket)
    }
}

pub use sbgen_runtime::bucket::seq_bucket;

/// A stable checksum of a candidate list: FNV-1a 64 over each schedule's display form and whether it
/// was kept (`m64n64w4s2-shfl-mufu-mma:kept\n`), as `fnv1a64:<16 hex digits>`. A change of the search
/// tables or of the pruning rules changes it.
pub fn candidates_checksum<'a>(candidates: impl IntoIterator<Item = (&'a Schedule, bool)>) -> String {
    let mut h = Fnv64::new();
    for (schedule, kept) in candidates {
        h.write(schedule.to_string().as_bytes());
        h.write(if kept { b":kept\n" } else { b":pruned\n" });
    }
    format!("fnv1a64:{:016x}", h.finish())
}

pub use sbgen_runtime::hash::source_hash;

/// Writes `bytes` to `path` through a temp file in the same folder: write, fsync, rename, fsync the
/// folder. Readers see the old file or the new one, never a part; the temp file is removed on error.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "cache".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{n}", std::process::id()));
    let io = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| CacheError::Io { action, path: p, source }
    };
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io("replace", path))?;
        // Make the rename durable; not every filesystem lets a folder be opened, so failures are ignored.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The current time, UTC, as RFC 3339 to the second (`2026-11-29T02:10:00Z`).
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format_utc(secs)
}

/// Seconds since the epoch as RFC 3339 UTC (civil-from-days, proleptic Gregorian).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem / 60) % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dtype, Kernel, Pass};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sbgen-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn entry(head_dim: u32, pass: Pass, bucket: u32, ms: f64) -> CacheEntry {
        let spec = Spec::new(head_dim, Dtype::Bf16, pass);
        let schedule = Schedule::default_for(&spec);
        let base = CacheEntry::untimed(Kernel::new(spec, schedule, Arch::Sm90), bucket, "// ptx".into()).unwrap();
        CacheEntry {
            time_ms: ms,
            tflops: 100.0,
            speedup_over_default: Some(1.0),
            shape: Some([8, 16, bucket as usize, head_dim as usize]),
            gpu_name: "NVIDIA H200".into(),
            driver_version: "CUDA 13.0".into(),
            sbgen_version: env!("CARGO_PKG_VERSION").into(),
            tuned_at: format_utc(0),
            candidates_checksum: candidates_checksum([(&schedule, true)]),
            candidates: vec![
                CandidateResult { schedule, outcome: Outcome::Timed { ms, tflops: 100.0 } },
                CandidateResult {
                    schedule: Schedule { block_n: 128, ..schedule },
                    outcome: Outcome::Pruned { reason: "spills".into() },
                },
                CandidateResult {
                    schedule: Schedule { block_n: 32, ..schedule },
                    outcome: Outcome::WrongResult { max_error: 0.5 },
                },
            ],
            ..base
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn a_budget_cut_run_does_not_overwrite_a_fuller_tuning() {
        let mut cache = TuningCache::new();
        let mut full = entry(128, Pass::Forward, 2048, 1.5);
        full.candidates.push(CandidateResult {
            schedule: Schedule { stages: 3, ..full.schedule },
            outcome: Outcome::Timed { ms: 1.7, tflops: 90.0 },
        });
        cache.insert(full);
        let mut cut = entry(128, Pass::Forward, 2048, 1.9);
        cut.candidates[1].outcome = Outcome::NotRun { reason: "budget spent".into() };
        cache.insert(cut.clone());
        assert_eq!(cache.entries[0].time_ms, 1.5, "the fuller entry stays");
        // As fully measured as what is there: the new run wins.
        cut.candidates.push(CandidateResult {
            schedule: Schedule { stages: 4, ..cut.schedule },
            outcome: Outcome::Timed { ms: 2.0, tflops: 80.0 },
        });
        cache.insert(cut);
        assert_eq!(cache.entries[0].time_ms, 1.9);
    }

    #[test]
    fn a_cache_round_trips_through_its_file() {
        let dir = scratch("round-trip");
        let path = dir.join("sbgen-tune.json");
        let mut cache = TuningCache::new();
        cache.insert(entry(128, Pass::Forward, 2048, 1.5));
        cache.insert(entry(128, Pass::Backward, 8192, 9.0));
        cache.save(&path).unwrap();
        let back = TuningCache::load(&path).unwrap();
        let mut want = cache.clone();
        want.sort();
        assert_eq!(back, want);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"version\": 1") && text.contains("\"kind\": \"wrong_result\""), "{text}");
        assert!(text.contains("\"arch\": \"sm_90\""), "{text}");
    }

    #[test]
    fn save_merges_with_the_entries_on_disk_and_replaces_the_same_key() {
        let dir = scratch("merge");
        let path = dir.join("cache.json");
        let mut first = TuningCache::new();
        first.insert(entry(128, Pass::Forward, 2048, 1.5));
        first.insert(entry(64, Pass::Forward, 2048, 0.9));
        first.save(&path).unwrap();
        // A second tuner that never saw the first file.
        let mut second = TuningCache::new();
        second.insert(entry(128, Pass::Forward, 2048, 1.2));
        second.insert(entry(128, Pass::Backward, 2048, 5.0));
        let written = second.save(&path).unwrap();
        let back = TuningCache::load(&path).unwrap();
        assert_eq!(back, written);
        assert_eq!(back.entries.len(), 3);
        let fwd = Spec::new(128, Dtype::Bf16, Pass::Forward);
        assert_eq!(back.lookup(Arch::Sm90, &fwd, 2048).unwrap().time_ms, 1.2);
        assert!(back.lookup(Arch::Sm90, &Spec::new(64, Dtype::Bf16, Pass::Forward), 2048).is_some());
    }

    #[test]
    fn the_atomic_write_leaves_no_temp_files() {
        let dir = scratch("atomic");
        let path = dir.join("sbgen-tune.json");
        let mut cache = TuningCache::new();
        cache.insert(entry(128, Pass::Forward, 2048, 1.5));
        for _ in 0..3 {
            cache.save(&path).unwrap();
        }
        assert_eq!(leftovers(&dir), Vec::<String>::new());
        // A failed write (the target is a folder) leaves none either, and says which file.
        let blocked = dir.join("blocked.json");
        std::fs::create_dir_all(&blocked).unwrap();
        let err = write_atomic(&blocked, b"{}").unwrap_err().to_string();
        assert!(err.contains("blocked.json"), "{err}");
        assert_eq!(leftovers(&dir), Vec::<String>::new());
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_the_file_and_the_fix() {
        let dir = scratch("corrupt");
        let path = dir.join("sbgen-tune.json");
        for text in
            ["{\"version\": 1, \"entries\": [", "not json", "{\"entries\": []}", "{\"version\": 1, \"entries\": [{}]}"]
        {
            std::fs::write(&path, text).unwrap();
            let err = TuningCache::load(&path).unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }), "{text}: {err:?}");
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("sbgen tune") && message.contains("deleting"), "{message}");
            // Saving over a corrupt file refuses too, instead of dropping its content.
            assert!(matches!(TuningCache::new().save(&path), Err(CacheError::Corrupt { .. })));
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        }
    }

    #[test]
    fn a_file_breaking_the_entry_rules_is_corrupt_naming_the_entry() {
        let dir = scratch("rules");
        let path = dir.join("sbgen-tune.json");
        let good = entry(128, Pass::Forward, 2048, 1.5);
        let cases: Vec<(Vec<CacheEntry>, &str)> = vec![
            (vec![good.clone(), good.clone()], "two entries"),
            (vec![CacheEntry { seq_bucket: 3000, ..good.clone() }], "not a power of two"),
            (vec![CacheEntry { ptx: " ".into(), ..good.clone() }], "no PTX"),
            (vec![CacheEntry { time_ms: 0.0, ..good.clone() }], "time_ms"),
        ];
        for (entries, expected) in cases {
            let cache = TuningCache { version: CACHE_VERSION, entries };
            std::fs::write(&path, serde_json::to_string(&cache).unwrap()).unwrap();
            let err = TuningCache::load(&path).unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }), "{expected}: {err:?}");
            let message = err.to_string();
            assert!(message.contains(expected) && message.contains(&good.kernel_name), "{message}");
        }
    }

    #[test]
    fn a_non_finite_time_is_refused_before_writing_never_saved_as_null() {
        let dir = scratch("nan");
        let path = dir.join("sbgen-tune.json");
        let mut cache = TuningCache::new();
        let mut e = entry(64, Pass::Backward, 8192, 2.0);
        e.candidates[0].outcome = Outcome::Timed { ms: f64::NAN, tflops: f64::NAN };
        cache.insert(e);
        let err = cache.save(&path).unwrap_err();
        assert!(matches!(err, CacheError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains("non-finite"), "{err}");
        assert!(!path.exists());
        assert!(leftovers(&dir).is_empty());
    }

    #[test]
    fn another_version_is_an_error_saying_which() {
        let dir = scratch("version");
        let path = dir.join("sbgen-tune.json");
        std::fs::write(&path, "{\"version\": 2, \"entries\": [], \"future\": true}").unwrap();
        let err = TuningCache::load(&path).unwrap_err();
        assert!(matches!(err, CacheError::Version { found: 2, expected: 1, .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("version 2") && message.contains("reads version 1"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[test]
    fn a_missing_file_is_its_own_error_with_the_command_to_create_it() {
        let path = scratch("missing").join("nothing.json");
        let err = TuningCache::load(&path).unwrap_err();
        assert!(matches!(err, CacheError::Missing { .. }));
        assert!(err.to_string().contains("sbgen tune --gpu sm_90 --cache"), "{err}");
        assert_eq!(TuningCache::load_or_new(&path).unwrap(), TuningCache::new());
    }

    #[test]
    fn lookup_takes_the_nearest_bucket_at_or_above_else_the_largest() {
        let mut cache = TuningCache::new();
        for bucket in [8192, 2048] {
            cache.insert(entry(128, Pass::Forward, bucket, bucket as f64));
        }
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let at = |n| cache.lookup(Arch::Sm90, &spec, n).map(|e| e.seq_bucket);
        assert_eq!(at(1), Some(2048));
        assert_eq!(at(2048), Some(2048));
        assert_eq!(at(2049), Some(8192));
        assert_eq!(at(5000), Some(8192));
        assert_eq!(at(100_000), Some(8192));
        assert_eq!(cache.lookup(Arch::Sm80, &spec, 2048), None);
        assert_eq!(cache.lookup(Arch::Sm90, &Spec::new(64, Dtype::Bf16, Pass::Forward), 2048), None);
        // The rule is `bucket::pick`, the one the macro's embedded kernels are picked by too.
        for n in [0, 2047, 2048, 2049, 1 << 31, usize::MAX] {
            assert_eq!(at(n), sbgen_runtime::bucket::pick([(8192, 8192), (2048, 2048)], n), "seq {n}");
        }
    }

    #[test]
    fn an_old_file_without_the_optional_fields_still_loads() {
        let full = serde_json::to_value(entry(128, Pass::Forward, 2048, 1.5)).unwrap();
        let mut old = serde_json::Map::new();
        for key in ["arch", "spec", "seq_bucket", "schedule", "kernel_name", "time_ms", "manifest", "ptx"] {
            old.insert(key.into(), full[key].clone());
        }
        let text = serde_json::json!({ "version": 1, "entries": [old] }).to_string();
        let cache = TuningCache::parse(&text, Path::new("old.json")).unwrap();
        let e = &cache.entries[0];
        assert_eq!(e.time_ms, 1.5);
        assert!(e.candidates.is_empty() && e.gpu_name.is_empty() && e.speedup_over_default.is_none());
    }

    #[test]
    fn the_candidate_checksum_follows_the_list_and_the_verdicts() {
        let a = Schedule::DEFAULT;
        let b = Schedule { block_n: 32, ..a };
        let sum = candidates_checksum([(&a, true), (&b, true)]);
        assert!(sum.starts_with("fnv1a64:") && sum.len() == 8 + 16, "{sum}");
        assert_eq!(sum, candidates_checksum([(&a, true), (&b, true)]));
        assert_ne!(sum, candidates_checksum([(&a, true), (&b, false)]));
        assert_ne!(sum, candidates_checksum([(&a, true)]));
    }

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_910_400 + 3661), "2026-11-29T01:01:01Z");
    }
}
