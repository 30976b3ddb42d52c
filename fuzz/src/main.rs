//! `sbgen-fuzz <target> [--iters N] [--seed S] [--seconds T]`: runs one target from its committed
//! corpus until N mutated inputs or T seconds (default 60 s), printing executions, execs/s, the
//! distinct inputs accepted and refused, and every crash (saved under `fuzz/artifacts/<target>/`).
//! Exit status: 0 without crashes, 1 with, 2 for a bad command line.

use sbgen_fuzz::engine::{self, Config, Report, DEFAULT_SEED};
use sbgen_fuzz::targets::{self, Target};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: sbgen-fuzz <target> [--iters N] [--seed S] [--seconds T]";

struct Args {
    target: &'static Target,
    iterations: Option<u64>,
    seconds: Option<f64>,
    seed: u64,
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let names = || targets::ALL.iter().map(|t| format!("  {:<14}{}", t.name, t.about)).collect::<Vec<_>>().join("\n");
    let mut target = None;
    let (mut iterations, mut seconds, mut seed) = (None, None, DEFAULT_SEED);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| it.next().cloned().ok_or_else(|| format!("`{flag}` needs a value"));
        match arg.as_str() {
            "--iters" => {
                let v = value("--iters")?;
                iterations = Some(v.parse().map_err(|_| format!("`--iters` = `{v}`: expected a whole number"))?);
            }
            "--seed" => {
                let v = value("--seed")?;
                seed = v.parse().map_err(|_| format!("`--seed` = `{v}`: expected a whole number"))?;
            }
            "--seconds" => {
                let v = value("--seconds")?;
                let s: f64 = v.parse().map_err(|_| format!("`--seconds` = `{v}`: expected a number"))?;
                if !(s.is_finite() && s > 0.0 && s <= 1e7) {
                    return Err(format!("`--seconds` = `{v}`: allowed more than 0, at most 1e7"));
                }
                seconds = Some(s);
            }
            "-h" | "--help" => return Err(format!("targets:\n{}", names())),
            name if target.is_none() && !name.starts_with('-') => {
                target = Some(targets::find(name).ok_or_else(|| format!("no target `{name}`; targets:\n{}", names()))?);
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    let target = target.ok_or_else(|| format!("which target? targets:\n{}", names()))?;
    if iterations.is_none() && seconds.is_none() {
        seconds = Some(60.0);
    }
    Ok(Args { target, iterations, seconds, seed })
}

fn print(target: &str, r: &Report) {
    println!(
        "{target}: {} executions in {:.1} s ({:.0}/s), distinct inputs accepted {} refused {}, distinct errors {}, crashes {} ({} distinct)",
        r.executions,
        r.elapsed.as_secs_f64(),
        r.execs_per_second(),
        r.accepted,
        r.refused,
        r.messages,
        r.crashed,
        r.crashes.len()
    );
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(message) => {
            eprintln!("sbgen-fuzz: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = match engine::load_corpus(&root.join("corpus"), args.target.name) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sbgen-fuzz: cannot read the corpus of `{}`: {e}", args.target.name);
            return ExitCode::FAILURE;
        }
    };
    let config = Config {
        iterations: args.iterations,
        time_limit: args.seconds.map(Duration::from_secs_f64),
        seed: args.seed,
        artifacts: Some(root.join("artifacts")),
        stop_on_crash: false,
        progress_every: Some(Duration::from_secs(10)),
    };
    println!("{}: {} corpus entries, seed {}", args.target.name, corpus.len(), args.seed);
    let report = engine::run(args.target, &corpus, &config, |r| print(args.target.name, r));
    for crash in &report.crashes {
        println!("crash: {crash}");
    }
    print(args.target.name, &report);
    if report.crashes.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
