//! The tuning cache (`sbgen-tune.json`, and the default cache the macro embeds), through
//! [`TuningCache::parse`]. A refusal must name the file; a cache that loads must load back the same
//! after being written as `save` writes it, and `lookup` must find each of its entries' specs.

use super::{Target, Verdict, SPEC_WORDS};
use crate::mutate::InputKind;
use sbgen::cache::TuningCache;
use std::path::Path;

pub const TARGET: Target = Target {
    name: "cache",
    about: "the tuning cache file, as `sbgen cache show`, `tune` and the macro read it",
    run,
    input: InputKind::Json,
    dictionary: &[
        SPEC_WORDS,
        &[
            "version",
            "entries",
            "arch",
            "spec",
            "seq_bucket",
            "schedule",
            "kernel_name",
            "time_ms",
            "tflops",
            "speedup_over_default",
            "shape",
            "gpu_name",
            "candidates",
            "outcome",
            "timed",
            "failed",
            "wrong_result",
            "pruned",
            "not_run",
            "manifest",
            "ptx",
            "sm_90",
            "sm_80",
            "block_m",
            "stages",
            "warps",
            "cumsum",
        ],
    ],
};

/// The name errors must carry.
const PATH: &str = "fuzz/sbgen-tune.json";

pub fn run(data: &[u8]) -> Verdict {
    // The bytes as a file holds them: a BOM or invalid UTF-8 goes through the same refusals.
    let cache = match TuningCache::parse_bytes(data, Path::new(PATH)) {
        Ok(cache) => cache,
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains(PATH), "a cache error does not name the file: {message}");
            return Verdict::Refused(message);
        }
    };
    let mut written = serde_json::to_string_pretty(&cache).expect("a cache serializes");
    written.push('\n');
    let back = TuningCache::parse(&written, Path::new(PATH))
        .unwrap_or_else(|e| panic!("a cache that loaded does not load back after writing it: {e}"));
    assert_eq!(back, cache, "a cache changes when written and read back");
    for entry in &cache.entries {
        for seq in [0, 1, entry.seq_bucket as usize, usize::MAX] {
            let found = cache.lookup(entry.arch, &entry.spec, seq).expect("the entry's own spec is found");
            assert_eq!((found.arch, found.spec), (entry.arch, entry.spec));
        }
        for candidate in &entry.candidates {
            let _ = candidate.outcome.to_string();
        }
    }
    Verdict::Accepted
}
