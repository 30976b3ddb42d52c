//! The fuzz loop: run every corpus entry as it is, then mutated inputs, each under `catch_unwind`,
//! until an iteration count or a time limit. A panic in a target, or an invariant it asserts, is a
//! crash: the input is saved under `artifacts/<target>/<hash>` and reported as escaped bytes.
//!
//! There is no coverage feedback (that needs compiler instrumentation, i.e. nightly or AFL). As a
//! cheap stand-in, an input joins the working pool when it is accepted and new, or refused with an
//! error message of a shape not seen before (numbers and quoted text blanked), so mutations start
//! from inputs that reach further into the parser; half of them start from a committed entry.

use crate::mutate::Mutator;
use crate::targets::{Target, Verdict};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sbgen_runtime::hash::fnv1a64;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

/// The seed when none is given, so the bounded run in the tests is the same everywhere.
pub const DEFAULT_SEED: u64 = 0x5b6e_f022_2026;

/// Inputs kept beside the corpus; beyond this a new one replaces a random one.
const MAX_POOL: usize = 512;

/// How long and from where to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Mutated inputs to run (the corpus entries run first, on top of these).
    pub iterations: Option<u64>,
    /// Stop after this long.
    pub time_limit: Option<Duration>,
    pub seed: u64,
    /// Where crashing inputs are written (`<dir>/<target>/<hash>`); `None`: not written.
    pub artifacts: Option<PathBuf>,
    /// Stop at the first crash (the tests) or keep going (long runs).
    pub stop_on_crash: bool,
    /// Called about every `progress_every` with the figures so far.
    pub progress_every: Option<Duration>,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub executions: u64,
    pub elapsed: Duration,
    /// Distinct inputs (by hash) the target accepted and refused.
    pub accepted: usize,
    pub refused: usize,
    /// Distinct refusal messages, digits blanked.
    pub messages: usize,
    /// Inputs that crashed the target; `crashes` keeps the first of each distinct panic message.
    pub crashed: u64,
    pub crashes: Vec<Crash>,
}

impl Report {
    pub fn execs_per_second(&self) -> f64 {
        self.executions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// An input that made the target panic.
#[derive(Clone, Debug)]
pub struct Crash {
    pub input: Vec<u8>,
    /// The panic message with its location.
    pub message: String,
    /// Where the input was saved, if it was.
    pub saved: Option<PathBuf>,
}

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.message)?;
        if let Some(path) = &self.saved {
            writeln!(f, "input saved to {}", path.display())?;
        }
        write!(f, "input ({} bytes): b\"{}\"", self.input.len(), self.input.escape_ascii())
    }
}

/// The committed seed inputs of `target` (`corpus/<target>/*`), in file-name order.
pub fn load_corpus(dir: &Path, target: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(dir.join(target))?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    paths.sort();
    paths.into_iter().filter(|p| p.is_file()).map(std::fs::read).collect()
}

/// Runs `target` from `corpus` as `config` says.
pub fn run(target: &Target, corpus: &[Vec<u8>], config: &Config, mut progress: impl FnMut(&Report)) -> Report {
    // Each target its own stream, so adding a target does not change another's inputs.
    let seed = config.seed ^ fnv1a64(target.name.as_bytes());
    let mut mutator = Mutator::new(StdRng::seed_from_u64(seed), target.input, target.dictionary);
    let seeds: Vec<Vec<u8>> = if corpus.is_empty() { vec![Vec::new()] } else { corpus.to_vec() };
    let mut pool = seeds.clone();
    let (mut accepted, mut refused, mut messages) = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut crash_messages = HashSet::new();
    let mut report = Report::default();
    let start = Instant::now();
    let mut last_progress = start;
    let mut mutated = 0u64;
    let mut queue = corpus.iter().cloned();
    loop {
        let input = match queue.next() {
            Some(seed_input) => seed_input,
            None => {
                if config.iterations.is_some_and(|n| mutated >= n) {
                    break;
                }
                mutated += 1;
                let rng = mutator.rng();
                // Half the time a committed entry: the pool fills with refused inputs, and the
                // seeds are what reaches past the first checks.
                let from = if rng.gen_bool(0.5) { &seeds } else { &pool };
                let mut input = from.choose(rng).expect("never empty").clone();
                let other = pool.choose(rng).expect("never empty").clone();
                mutator.mutate(&mut input, &other);
                input
            }
        };
        let hash = fnv1a64(&input);
        report.executions += 1;
        match execute(target, &input) {
            Ok(Verdict::Accepted) => {
                if accepted.insert(hash) {
                    keep(&mut pool, &input, mutator.rng());
                }
            }
            Ok(Verdict::Refused(message)) => {
                refused.insert(hash);
                if messages.insert(message_shape(&message)) {
                    keep(&mut pool, &input, mutator.rng());
                }
            }
            Err(message) => {
                report.crashed += 1;
                if crash_messages.insert(message_shape(&message)) {
                    let saved = config.artifacts.as_ref().and_then(|dir| save(dir, target.name, hash, &input));
                    report.crashes.push(Crash { input, message, saved });
                }
                if config.stop_on_crash {
                    break;
                }
            }
        }
        let now = Instant::now();
        if config.time_limit.is_some_and(|limit| now - start >= limit) {
            break;
        }
        if config.progress_every.is_some_and(|every| now - last_progress >= every) {
            last_progress = now;
            report.fill(start, &accepted, &refused, &messages);
            progress(&report);
        }
    }
    report.fill(start, &accepted, &refused, &messages);
    report
}

impl Report {
    fn fill(&mut self, start: Instant, accepted: &HashSet<u64>, refused: &HashSet<u64>, messages: &HashSet<String>) {
        self.elapsed = start.elapsed();
        self.accepted = accepted.len();
        self.refused = refused.len();
        self.messages = messages.len();
    }
}

fn keep(pool: &mut Vec<Vec<u8>>, input: &[u8], rng: &mut StdRng) {
    if pool.len() < MAX_POOL {
        pool.push(input.to_vec());
    } else {
        let i = rng.gen_range(0..pool.len());
        pool[i] = input.to_vec();
    }
}

/// A message's shape: numbers and quoted text blanked, so "`x` at line 3" and "`y` at line 4"
/// count once (errors quote the input, and every distinct quote would flood the pool).
fn message_shape(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(200));
    let mut quote = None;
    for c in message.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => continue,
            None if c == '`' || c == '"' => {
                quote = Some(c);
                out.push_str("__");
            }
            None if c.is_ascii_digit() => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            None => out.push(c),
        }
        if out.len() >= 200 {
            break;
        }
    }
    out
}

/// Writes a crashing input; a failure to write is reported on stderr and the run goes on.
fn save(dir: &Path, target: &str, hash: u64, input: &[u8]) -> Option<PathBuf> {
    let folder = dir.join(target);
    let path = folder.join(format!("{hash:016x}"));
    match std::fs::create_dir_all(&folder).and_then(|()| std::fs::write(&path, input)) {
        Ok(()) => Some(path),
        Err(e) => {
            eprintln!("sbgen-fuzz: cannot save a crashing input to `{}`: {e}", path.display());
            None
        }
    }
}

thread_local! {
    /// True while this thread runs a target: its panics are captured, not printed.
    static IN_TARGET: Cell<bool> = const { Cell::new(false) };
    static PANIC_MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `target` on `input`; `Err` holds the panic message and location.
pub fn execute(target: &Target, input: &[u8]) -> Result<Verdict, String> {
    install_panic_hook();
    IN_TARGET.with(|t| t.set(true));
    let result = std::panic::catch_unwind(|| (target.run)(input));
    IN_TARGET.with(|t| t.set(false));
    result.map_err(|payload| {
        PANIC_MESSAGE.with(|m| m.borrow_mut().take()).unwrap_or_else(|| {
            let text = payload.downcast_ref::<&str>().map(|s| s.to_string());
            text.or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic".into())
        })
    })
}

/// One process-wide hook: quiet and recording on threads inside a target, the previous hook
/// elsewhere (so the test harness and real bugs still print).
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_TARGET.with(Cell::get) {
                PANIC_MESSAGE.with(|m| *m.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mutate::InputKind;

    /// Panics on inputs that hold `!!`, the way a parser bug would.
    fn fragile(input: &[u8]) -> Verdict {
        if input.windows(2).any(|w| w == b"!!") {
            panic!("found the bug");
        }
        match input.first() {
            Some(b'a') => Verdict::Accepted,
            _ => Verdict::Refused(format!("bad at {}", input.len())),
        }
    }

    const FRAGILE: Target =
        Target { name: "fragile", about: "", run: fragile, input: InputKind::Text, dictionary: &[&["!"]] };

    fn config(iterations: u64) -> Config {
        Config {
            iterations: Some(iterations),
            time_limit: None,
            seed: DEFAULT_SEED,
            artifacts: None,
            stop_on_crash: true,
            progress_every: None,
        }
    }

    #[test]
    fn finds_saves_and_prints_a_crash() {
        let dir = std::env::temp_dir().join(format!("sbgen-fuzz-test-{}", std::process::id()));
        let config = Config { artifacts: Some(dir.clone()), ..config(100_000) };
        let report = run(&FRAGILE, &[b"abc".to_vec()], &config, |_| {});
        assert_eq!(report.crashes.len(), 1, "{report:?}");
        let crash = &report.crashes[0];
        assert!(crash.message.contains("found the bug") && crash.message.contains("engine.rs"), "{}", crash.message);
        let saved = crash.saved.as_ref().expect("saved");
        assert_eq!(std::fs::read(saved).unwrap(), crash.input);
        assert!(crash.to_string().contains(&crash.input.escape_ascii().to_string()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn runs_the_corpus_first_and_counts_distinct_inputs() {
        let corpus = [b"abc".to_vec(), b"xyz".to_vec(), b"abc".to_vec()];
        let report = run(&FRAGILE, &corpus, &config(0), |_| {});
        assert_eq!(report.executions, 3);
        assert_eq!((report.accepted, report.refused, report.messages), (1, 1, 1));
        let crash = run(&FRAGILE, &[b"a!!".to_vec()], &config(0), |_| {});
        assert_eq!(crash.crashes.len(), 1);
        assert_eq!(crash.executions, 1);
    }

    #[test]
    fn a_seed_replays_the_same_run() {
        let quiet = Target { run: |_| Verdict::Accepted, ..FRAGILE };
        let figures = |seed| {
            let r = run(&quiet, &[b"abc".to_vec()], &Config { seed, ..config(300) }, |_| {});
            (r.executions, r.accepted)
        };
        assert_eq!(figures(1), figures(1));
        assert_eq!(figures(1).0, 301);
    }

    #[test]
    fn message_shapes_blank_numbers_and_quotes() {
        assert_eq!(message_shape("at line 12 column 7"), "at line # column #");
        assert_eq!(
            message_shape("unknown key `speed`: valid keys are `a`, \"b\""),
            "unknown key __: valid keys are __, __"
        );
    }
}
