//! The tuning cache: the winners of `sbgen tune`, one entry per (arch, spec, sequence-length bucket),
//! in a human-readable JSON file that users commit beside `Cargo.lock` (default `sbgen-tune.json`).
//!
//! Each entry keeps the winning schedule, its time, TFLOP/s and speed-up over the spec's default
//! schedule, the GPU, driver and sbgen version it was measured with, a checksum of the candidate list
//! (so a changed search space is visible), the result of every candidate the search kept (timed,
//! failed, wrong or not run; the pruned ones follow from the search space and are not stored) and the
//! winner's launch manifest and PTX, inline.
//!
//! Loading never panics and never drops a file silently: a missing file is [`CacheError::Missing`];
//! a corrupt file (not UTF-8, a key twice, an entry breaking [`TuningCache::validate`]) or one of
//! another [`CACHE_VERSION`] is an error that names the file and says what to do. Saving holds an
//! advisory lock on `<cache>.lock` while it re-reads the file, merges and replaces it atomically
//! ([`crate::files`]), so concurrent tuners writing one file lose no entries. An entry with the same
//! key is replaced unless it is a fuller tuning of the same kernels (see [`TuningCache::insert`]);
//! [`SaveReport`] says which entries were kept and why.
//!
//! Fields added after version 1 must carry `#[serde(default)]`, so older files keep loading.
//!
//! This module depends on serde and std only (no CUDA, no CLI), so the proc-macro can read caches.

use crate::files::{self, FileError};
use crate::ir::{Arch, Kernel, Schedule, Spec};
use sbgen_runtime::hash::Fnv64;
use sbgen_runtime::manifest::KernelManifest;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The format version this sbgen reads and writes.
pub const CACHE_VERSION: u32 = 1;

/// The cache file `sbgen tune` writes and `sbgen cache show` reads when no `--cache` is given
/// (relative to the current directory).
pub const DEFAULT_CACHE_FILE: &str = "sbgen-tune.json";

/// The largest cache file read (a real one is a few MiB: PTX of a few dozen kernels).
pub const MAX_CACHE_BYTES: u64 = 256 << 20;

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
    /// The result of every candidate the search kept, the winner included. Pruned candidates are
    /// not stored (files written by earlier builds may hold them): they follow from the search space
    /// that `candidates_checksum` names, and `sbgen tune --compile-only` lists their reasons.
    #[serde(default)]
    pub candidates: Vec<CandidateResult>,
    pub manifest: KernelManifest,
    /// The winner's PTX for `arch`.
    pub ptx: String,
    /// FNV-1a 64 of the CUDA source the PTX was compiled from (16 hex digits).
    #[serde(default)]
    pub cuda_source_hash: String,
    /// When the PTX was compiled again from a changed CUDA source of the same schedule without
    /// timing it (`sbgen cache refresh --recompile`), UTC, RFC 3339: `time_ms`, `tflops` and the
    /// candidates are then those measured at `tuned_at` with the earlier PTX. Empty when the PTX is
    /// the one that was timed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recompiled_at: String,
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
    /// Reading, locking or replacing the file failed, or it is not a regular file.
    #[error(transparent)]
    File(#[from] FileError),
}

impl CacheError {
    /// Whether the user must fix the file or the path (a missing, corrupt, other-version or
    /// non-regular file): the CLI reports these as usage errors (exit 2). An I/O failure of the
    /// system, or a cache this sbgen was about to write wrongly, is not.
    pub fn is_users_to_fix(&self) -> bool {
        match self {
            CacheError::Missing { .. } | CacheError::Corrupt { .. } | CacheError::Version { .. } => true,
            CacheError::File(e) => e.is_users_to_fix(),
            CacheError::Invalid { .. } => false,
        }
    }
}

/// What [`TuningCache::insert`] did with an entry.
#[derive(Clone, Debug, PartialEq)]
pub enum Merge {
    Added,
    Replaced,
    /// The entry already there stays, for `reason`.
    Kept {
        reason: String,
    },
}

/// What [`TuningCache::save`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SaveReport {
    /// Entries of ours written (added or replacing an older one).
    pub written: usize,
    /// Entries of ours not written because the file's entry of the same key stays: (arch, spec slug
    /// and bucket, reason).
    pub kept: Vec<(String, String)>,
    /// The whole cache as written.
    pub cache: TuningCache,
}

impl TuningCache {
    pub fn new() -> Self {
        TuningCache { version: CACHE_VERSION, entries: Vec::new() }
    }

    /// Reads `path`. A missing file is [`CacheError::Missing`] (callers that start a fresh cache
    /// match on it); anything unreadable is an error naming the file and the fix. A folder, device or
    /// pipe is refused before it is opened, and a file over [`MAX_CACHE_BYTES`] before it is read.
    pub fn load(path: &Path) -> Result<TuningCache, CacheError> {
        let io = |source| CacheError::File(FileError::Io { action: "read", path: path.to_path_buf(), source });
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CacheError::Missing { path: path.to_path_buf() })
            }
            Err(e) => return Err(io(e)),
        };
        if !meta.is_file() {
            return Err(FileError::NotRegular { path: path.to_path_buf() }.into());
        }
        let too_large = |len: u64| CacheError::Corrupt {
            path: path.to_path_buf(),
            message: format!("{len} bytes or more: a tuning cache is at most {MAX_CACHE_BYTES} bytes"),
        };
        if meta.len() > MAX_CACHE_BYTES {
            return Err(too_large(meta.len()));
        }
        let mut bytes = Vec::new();
        // The file may have grown since `metadata`: read one byte past the limit at most.
        std::fs::File::open(path).and_then(|f| f.take(MAX_CACHE_BYTES + 1).read_to_end(&mut bytes)).map_err(io)?;
        if bytes.len() as u64 > MAX_CACHE_BYTES {
            return Err(too_large(bytes.len() as u64));
        }
        TuningCache::parse_bytes(&bytes, path)
    }

    /// Reads `path`, or an empty cache when there is no file.
    pub fn load_or_new(path: &Path) -> Result<TuningCache, CacheError> {
        match TuningCache::load(path) {
            Err(CacheError::Missing { .. }) => Ok(TuningCache::new()),
            other => other,
        }
    }

    /// Parses a cache file's bytes: UTF-8 text without a byte-order mark, then [`TuningCache::parse`].
    pub fn parse_bytes(bytes: &[u8], path: &Path) -> Result<TuningCache, CacheError> {
        let corrupt = |message: String| CacheError::Corrupt { path: path.to_path_buf(), message };
        if bytes.starts_with(b"\xEF\xBB\xBF") {
            return Err(corrupt(
                "it starts with a UTF-8 byte-order mark (BOM), which JSON does not allow; an editor \
                                saving \"UTF-8 with BOM\" adds it"
                    .into(),
            ));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| corrupt(format!("not UTF-8 text: invalid bytes at offset {}", e.valid_up_to())))?;
        TuningCache::parse(text, path)
    }

    /// Parses a cache's text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<TuningCache, CacheError> {
        let corrupt = |message: String| CacheError::Corrupt { path: path.to_path_buf(), message };
        // serde_json keeps the last of two equal keys: refuse such a file rather than half read it.
        crate::json::check_no_duplicate_keys(text.as_bytes()).map_err(|e| corrupt(e.to_string()))?;
        // The version first, so that a newer file is reported as such rather than as corrupt. Only
        // `version` is kept (serde skips the rest without building it): a whole `Value` of a
        // crafted 256 MiB file would take gigabytes.
        #[derive(Deserialize)]
        struct VersionOnly {
            version: Option<serde_json::Value>,
        }
        let probe: VersionOnly = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        let version = match probe.version {
            Some(v) => v.as_u64().ok_or_else(|| corrupt(format!("`version` is {v}, not a whole number")))?,
            None => return Err(corrupt("no `version` field".into())),
        };
        if version != CACHE_VERSION as u64 {
            return Err(CacheError::Version { path: path.to_path_buf(), found: version, expected: CACHE_VERSION });
        }
        let cache: TuningCache = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        cache.validate().map_err(corrupt)?;
        Ok(cache)
    }

    /// The rules a loaded cache must meet beyond its JSON shape: one entry per key, power-of-two
    /// buckets, a valid kernel (spec, schedule, arch) whose name and manifest are the ones it lowers
    /// to, PTX present, finite positive times and non-negative figures.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for e in &self.entries {
            let name = e.kernel_name.escape_debug();
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
            let kernel = Kernel::new(e.spec, e.schedule, e.arch);
            kernel.validate().map_err(|err| format!("entry `{name}`: {err}"))?;
            // `Kernel::name` is the name `lower` gives the kernel.
            let expected = kernel.name();
            if e.kernel_name != expected || e.manifest.name != expected {
                return Err(format!(
                    "entry `{name}`: its spec and schedule lower to `{expected}`, but kernel_name is `{name}` and the \
                     manifest names `{}`",
                    e.manifest.name.escape_debug()
                ));
            }
            if e.ptx.trim().is_empty() {
                return Err(format!("entry `{name}` has no PTX"));
            }
            if !positive(e.time_ms) {
                return Err(format!("entry `{name}`: time_ms {} is not a positive number", e.time_ms));
            }
            if !non_negative(e.tflops) || e.speedup_over_default.is_some_and(|s| !positive(s)) {
                return Err(format!(
                    "entry `{name}`: tflops ({}) or speedup_over_default ({:?}) is negative or not finite",
                    e.tflops, e.speedup_over_default
                ));
            }
            if let Some(shape) = e.shape {
                if shape.contains(&0) || shape[3] != e.spec.head_dim as usize {
                    return Err(format!(
                        "entry `{name}`: shape {shape:?} is not [B, H, N, D] with D = {} and no zero",
                        e.spec.head_dim
                    ));
                }
            }
            for c in &e.candidates {
                let valid = match c.outcome {
                    Outcome::Timed { ms, tflops } => positive(ms) && non_negative(tflops),
                    Outcome::WrongResult { max_error } => non_negative(max_error),
                    _ => true,
                };
                if !valid {
                    return Err(format!(
                        "entry `{name}`: candidate {} has a negative or non-finite figure",
                        c.schedule
                    ));
                }
            }
        }
        Ok(())
    }

    /// Adds `entry`, replacing an entry of the same (arch, spec, seq_bucket) unless that one is a
    /// fuller tuning of the same kernels: built from the same CUDA source, chosen from the same
    /// candidate list by the same sbgen, with more candidates timed (the new run's budget ran out
    /// sooner). A stale entry (any of the three differs) or one recompiled untimed is always replaced.
    pub fn insert(&mut self, entry: CacheEntry) -> Merge {
        let Some(old) = self.entries.iter_mut().find(|e| e.key() == entry.key()) else {
            self.entries.push(entry);
            return Merge::Added;
        };
        // An entry whose PTX was recompiled untimed holds times of another PTX: never kept over a
        // measurement.
        let same_build = old.cuda_source_hash == entry.cuda_source_hash
            && old.candidates_checksum == entry.candidates_checksum
            && old.sbgen_version == entry.sbgen_version
            && old.recompiled_at.is_empty();
        let (before, now) = (old.timed_candidates(), entry.timed_candidates());
        if same_build && now < before {
            return Merge::Kept {
                reason: format!(
                    "the entry there timed {before} candidates of the same list, this run {now}; a run that times as \
                     many replaces it"
                ),
            };
        }
        *old = entry;
        Merge::Replaced
    }

    /// Writes the cache to `path` atomically, merged into what the file holds right now (its entries
    /// of other keys are kept; ours replace those of the same key as [`TuningCache::insert`] says),
    /// under an advisory lock on `<path>.lock` so that concurrent saves lose nothing. Returns what
    /// was written and which of our entries were not, with the reason.
    pub fn save(&self, path: &Path) -> Result<SaveReport, CacheError> {
        let _lock = files::lock(path)?;
        let mut merged = TuningCache::load_or_new(path)?;
        let mut written = 0;
        let mut kept = Vec::new();
        for entry in &self.entries {
            let what = format!("{} {} bucket {}", entry.arch, entry.spec.slug(), entry.seq_bucket);
            match merged.insert(entry.clone()) {
                Merge::Added | Merge::Replaced => written += 1,
                Merge::Kept { reason } => kept.push((what, reason)),
            }
        }
        merged.version = CACHE_VERSION;
        merged.sort();
        // JSON has no NaN: a non-finite time would be written as null and never load again.
        merged.validate().map_err(|message| CacheError::Invalid { path: path.to_path_buf(), message })?;
        let mut text = serde_json::to_string_pretty(&merged)
            .map_err(|e| CacheError::Invalid { path: path.to_path_buf(), message: format!("cannot serialize: {e}") })?;
        text.push('\n');
        files::write_atomic(path, text.as_bytes())?;
        Ok(SaveReport { written, kept, cache: merged })
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
            recompiled_at: String::new(),
        })
    }

    /// Whether this sbgen lowers the entry's (spec, schedule, arch) to the same kernel: an entry from
    /// another sbgen version (other templates, another parameter block) or an edited manifest would
    /// launch with the wrong arguments or grid, so it must not be used. `Err` says what differs.
    pub fn check_lowering(&self) -> Result<(), String> {
        let lowered = crate::lower::lower(&Kernel::new(self.spec, self.schedule, self.arch))
            .map_err(|err| format!("cache entry `{}`: its schedule no longer lowers: {err}", self.kernel_name))?;
        let mismatch = if lowered.name != self.kernel_name {
            Some(format!("its kernel name is now `{}`", lowered.name))
        } else if lowered.manifest != self.manifest {
            Some("its launch manifest differs".to_string())
        } else if !self.cuda_source_hash.is_empty() && source_hash(&lowered.cuda_source) != self.cuda_source_hash {
            Some("the CUDA source of its schedule changed since it was tuned".to_string())
        } else {
            None
        };
        match mismatch {
            None => Ok(()),
            Some(what) => Err(format!(
                "cache entry `{}` ({} bucket {}, tuned by sbgen {}) does not match this sbgen ({}): {what}; \
                 re-run `sbgen tune` for it",
                self.kernel_name,
                self.arch,
                self.seq_bucket,
                if self.sbgen_version.is_empty() { "?" } else { &self.sbgen_version },
                env!("CARGO_PKG_VERSION"),
            )),
        }
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

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
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
    use crate::files::tests::{leftovers, scratch};
    use crate::ir::{Dtype, Kernel, Pass};

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

    #[test]
    fn a_budget_cut_run_does_not_overwrite_a_fuller_tuning() {
        let mut cache = TuningCache::new();
        let mut full = entry(128, Pass::Forward, 2048, 1.5);
        full.candidates.push(CandidateResult {
            schedule: Schedule { stages: 3, ..full.schedule },
            outcome: Outcome::Timed { ms: 1.7, tflops: 90.0 },
        });
        assert_eq!(cache.insert(full), Merge::Added);
        let mut cut = entry(128, Pass::Forward, 2048, 1.9);
        cut.candidates[1].outcome = Outcome::NotRun { reason: "budget spent".into() };
        let merge = cache.insert(cut.clone());
        assert!(matches!(&merge, Merge::Kept { reason } if reason.contains("timed 2 candidates")), "{merge:?}");
        assert_eq!(cache.entries[0].time_ms, 1.5, "the fuller entry stays");
        // As fully measured as what is there: the new run wins.
        let mut as_full = cut.clone();
        as_full.candidates.push(CandidateResult {
            schedule: Schedule { stages: 4, ..cut.schedule },
            outcome: Outcome::Timed { ms: 2.0, tflops: 80.0 },
        });
        assert_eq!(cache.insert(as_full), Merge::Replaced);
        assert_eq!(cache.entries[0].time_ms, 1.9);
    }

    #[test]
    fn a_stale_entry_is_replaced_even_by_a_run_that_timed_fewer() {
        let mut full = entry(128, Pass::Forward, 2048, 1.5);
        full.candidates.push(CandidateResult {
            schedule: Schedule { stages: 3, ..full.schedule },
            outcome: Outcome::Timed { ms: 1.7, tflops: 90.0 },
        });
        let stale: [fn(&mut CacheEntry); 4] = [
            |e| e.cuda_source_hash = "0123456789abcdef".into(),
            |e| e.candidates_checksum = "fnv1a64:0000000000000000".into(),
            |e| e.sbgen_version = "0.0.1".into(),
            // `cache refresh --recompile`: the same source now, the times of another PTX.
            |e| e.recompiled_at = "2026-12-02T10:00:00Z".into(),
        ];
        for make_stale in stale {
            let mut old = full.clone();
            make_stale(&mut old);
            let mut cache = TuningCache { version: CACHE_VERSION, entries: vec![old] };
            assert_eq!(cache.insert(entry(128, Pass::Forward, 2048, 1.9)), Merge::Replaced);
            assert_eq!(cache.entries[0].time_ms, 1.9);
        }
    }

    #[test]
    fn save_reports_the_entries_it_kept_and_counts_only_what_it_wrote() {
        let dir = scratch("kept");
        let path = dir.join("sbgen-tune.json");
        let mut full = entry(128, Pass::Forward, 2048, 1.5);
        full.candidates.push(CandidateResult {
            schedule: Schedule { stages: 3, ..full.schedule },
            outcome: Outcome::Timed { ms: 1.7, tflops: 90.0 },
        });
        TuningCache { version: CACHE_VERSION, entries: vec![full] }.save(&path).unwrap();
        let mut ours = TuningCache::new();
        ours.insert(entry(128, Pass::Forward, 2048, 1.9));
        ours.insert(entry(64, Pass::Forward, 2048, 0.8));
        let report = ours.save(&path).unwrap();
        assert_eq!(report.written, 1);
        assert_eq!(report.kept.len(), 1, "{report:?}");
        assert!(report.kept[0].0.contains("fwd_d128") && report.kept[0].1.contains("timed 2"), "{report:?}");
        assert_eq!(report.cache.entries.len(), 2);
    }

    #[test]
    fn concurrent_saves_of_different_keys_lose_nothing() {
        let dir = scratch("concurrent");
        let path = dir.join("sbgen-tune.json");
        let rounds = 12u32;
        let savers: Vec<_> = [64, 128]
            .into_iter()
            .map(|head_dim| {
                let path = path.clone();
                let base = entry(head_dim, Pass::Forward, 1, 1.0);
                std::thread::spawn(move || {
                    for i in 0..rounds {
                        let mut cache = TuningCache::new();
                        cache.insert(CacheEntry { seq_bucket: 1 << i, ..base.clone() });
                        cache.save(&path).unwrap();
                    }
                })
            })
            .collect();
        for s in savers {
            s.join().unwrap();
        }
        assert_eq!(TuningCache::load(&path).unwrap().entries.len(), 2 * rounds as usize);
        assert!(leftovers(&dir).is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn saving_through_a_symlink_updates_the_target_and_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("symlink");
        let target = dir.join("real.json");
        let mut cache = TuningCache::new();
        cache.insert(entry(128, Pass::Forward, 2048, 1.5));
        cache.save(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("sbgen-tune.json");
        std::os::unix::fs::symlink("real.json", &link).unwrap();
        let mut more = TuningCache::new();
        more.insert(entry(64, Pass::Forward, 2048, 0.9));
        more.save(&link).unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(TuningCache::load(&target).unwrap().entries.len(), 2);
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn duplicate_keys_anywhere_are_corrupt() {
        let good = serde_json::to_string(&TuningCache {
            version: CACHE_VERSION,
            entries: vec![entry(128, Pass::Forward, 2048, 1.5)],
        })
        .unwrap();
        let cases = [
            good.replacen("{\"version\":1,", "{\"version\":1,\"version\":1,", 1),
            good.replacen("\"entries\":", "\"entries\":[],\"entries\":", 1),
            good.replacen("\"time_ms\":", "\"time_ms\":9.0,\"time_ms\":", 1),
        ];
        for text in cases {
            assert_ne!(text, good);
            let err = TuningCache::parse(&text, Path::new("c.json")).unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }), "{err:?}");
            assert!(err.to_string().contains("appears twice") && err.to_string().contains("sbgen tune"), "{err}");
        }
        TuningCache::parse(&good, Path::new("c.json")).unwrap();
    }

    #[test]
    fn a_bom_or_binary_junk_is_corrupt_with_the_hint_to_re_tune() {
        let dir = scratch("bom");
        let path = dir.join("sbgen-tune.json");
        for (bytes, expected) in [
            (b"\xEF\xBB\xBF{\"version\": 1, \"entries\": []}".to_vec(), "byte-order mark"),
            (vec![0x7f, b'E', b'L', b'F', 0xff, 0xfe, 0], "not UTF-8"),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            let err = TuningCache::load(&path).unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.contains(expected) && message.contains("re-run `sbgen tune"), "{message}");
        }
    }

    #[test]
    fn a_folder_a_device_or_a_huge_file_is_refused_before_reading() {
        let dir = scratch("not-a-file");
        let not_regular =
            |p: &Path| matches!(TuningCache::load(p), Err(CacheError::File(FileError::NotRegular { .. })));
        assert!(not_regular(&dir));
        if Path::new("/dev/zero").exists() {
            assert!(not_regular(Path::new("/dev/zero")));
        }
        // Sparse: no disk space is used.
        let huge = dir.join("huge.json");
        std::fs::File::create(&huge).unwrap().set_len(MAX_CACHE_BYTES + 1).unwrap();
        let err = TuningCache::load(&huge).unwrap_err();
        assert!(matches!(err, CacheError::Corrupt { .. }) && err.to_string().contains("at most"), "{err}");
    }

    #[test]
    fn entries_with_unchecked_fields_are_corrupt() {
        let good = serde_json::to_value(entry(128, Pass::Forward, 2048, 1.5)).unwrap();
        type Spoil = fn(&mut serde_json::Value);
        let cases: [(Spoil, &str); 5] = [
            (|e| e["spec"]["head_dim"] = 300.into(), "head_dim"),
            (|e| e["tflops"] = (-5.0).into(), "negative"),
            (|e| e["speedup_over_default"] = (-1.0).into(), "negative"),
            (|e| e["kernel_name"] = "sb_fwd_other".into(), "lower to"),
            (|e| e["manifest"]["name"] = "sb_fwd_other".into(), "manifest names `sb_fwd_other`"),
        ];
        for (spoil, expected) in cases {
            let mut e = good.clone();
            spoil(&mut e);
            let text = serde_json::json!({ "version": 1, "entries": [e] }).to_string();
            let err = TuningCache::parse(&text, Path::new("c.json")).unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }), "{expected}: {err:?}");
            assert!(err.to_string().contains(expected), "{err}");
        }
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
        assert_eq!(back, written.cache);
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
