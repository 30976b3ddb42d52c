//! The bounded fuzz run of `cargo test`: every target, from its committed corpus, for
//! `SBGEN_FUZZ_ITERS` mutated inputs (default 20,000) from seed `SBGEN_FUZZ_SEED` (default
//! fixed, so a failure replays). A crash fails the test with the input, saved under
//! `fuzz/artifacts/<target>/`.

use sbgen_fuzz::engine::{self, Config, DEFAULT_SEED};
use sbgen_fuzz::targets;
use std::path::Path;

const DEFAULT_ITERATIONS: u64 = 20_000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name} = `{v}`: expected a whole number")),
        Err(_) => default,
    }
}

fn fuzz(name: &str) {
    let target = targets::find(name).unwrap_or_else(|| panic!("no target `{name}`"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = engine::load_corpus(&root.join("corpus"), name).expect("the corpus is readable");
    assert!(!corpus.is_empty(), "corpus/{name}/ is empty");
    let config = Config {
        iterations: Some(env_u64("SBGEN_FUZZ_ITERS", DEFAULT_ITERATIONS)),
        time_limit: None,
        seed: env_u64("SBGEN_FUZZ_SEED", DEFAULT_SEED),
        artifacts: Some(root.join("artifacts")),
        stop_on_crash: true,
        progress_every: None,
    };
    let report = engine::run(target, &corpus, &config, |_| {});
    eprintln!(
        "{name}: {} executions in {:.1} s, distinct inputs accepted {} refused {}, distinct errors {}",
        report.executions,
        report.elapsed.as_secs_f64(),
        report.accepted,
        report.refused,
        report.messages
    );
    if let Some(crash) = report.crashes.first() {
        panic!("target `{name}` crashed (seed {}):\n{crash}", config.seed);
    }
    // A target that accepts nothing would test only its error paths: the corpus must reach past them.
    assert!(report.accepted > 0, "target `{name}` accepted no input");
}

#[test]
fn cache() {
    fuzz("cache");
}

#[test]
fn manifest() {
    fuzz("manifest");
}

#[test]
fn attr() {
    fuzz("attr");
}

#[test]
fn tensor_header() {
    fuzz("tensor_header");
}

#[test]
fn every_target_is_run_here() {
    let here = ["cache", "manifest", "attr", "tensor_header"];
    for t in targets::ALL {
        assert!(here.contains(&t.name), "target `{}` has no test in tests/fuzz.rs", t.name);
    }
}
