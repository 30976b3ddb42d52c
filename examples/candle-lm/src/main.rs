//! A character-level language model with stick-breaking attention, trained and sampled in candle
//! through `sbgen-candle`.
//!
//! ```text
//! cargo run --release -p candle-lm                                   # CPU, small model (what CI runs)
//! cargo run --release -p candle-lm --features cuda -- --device cuda \
//!     --seq 2048 --batch 4 --d-model 512 --heads 8 --layers 6 --steps 300 --compare
//! ```
//!
//! It trains on `data/corpus.txt` (sbgen's own documentation: a text that ships with the repo),
//! prints the loss and tokens/s per step, the peak memory of a step, and, with `--compare`, the same
//! model with candle's softmax attention and with stick-breaking written in plain candle ops. Then
//! it generates text through per-layer [`sbgen_candle::SbKvCache`]s and prints generation tokens/s.
//! It exits with an error when the final training loss is above `--target-loss`.

mod data;
mod memory;
mod model;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use clap::Parser;
use data::Corpus;
use model::{Attention, Config, Model};
use rand::rngs::StdRng;
use rand::SeedableRng;
use sbgen_candle::SbKvCache;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "Train and sample a character-level LM with stick-breaking attention (sbgen-candle)")]
struct Args {
    /// `cpu`, or `cuda` (device 0; needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Training steps.
    #[arg(long, default_value_t = 150)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per training sequence.
    #[arg(long, default_value_t = 64)]
    seq: usize,
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// The run fails when the mean training loss of the last 10 steps is above this (nats/char).
    #[arg(long, default_value_t = 2.6)]
    target_loss: f64,
    /// Also time the same model with candle softmax attention and with naive candle stick-breaking.
    #[arg(long)]
    compare: bool,
    /// Steps timed per model with `--compare` (after 2 untimed ones).
    #[arg(long, default_value_t = 10)]
    compare_steps: usize,
    /// Characters to generate after training.
    #[arg(long, default_value_t = 200)]
    generate: usize,
    /// The prompt the generation continues.
    #[arg(long, default_value = "Stick-breaking attention ")]
    prompt: String,
    /// Write the figures as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// On CUDA, leave the device's memory pool at the driver's default, which returns freed memory
    /// at every synchronisation (by default the example keeps it for reuse, for every model alike:
    /// `sbgen_candle::cuda::device::keep_memory_pool`).
    #[arg(long)]
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    trim_pool: bool,
}

fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context("opening CUDA device 0 (build with `--features cuda`)"),
        other => bail!("--device {other}: allowed cpu, cuda"),
    }
}

/// Time, tokens/s and peak memory of training steps of one model.
#[derive(Debug, Default, serde::Serialize)]
struct StepStats {
    attention: String,
    ms_per_step: f64,
    tokens_per_s: f64,
    /// The peak during the timed steps, and what was in use before them (weights, optimiser state).
    peak_bytes: Option<u64>,
    resident_bytes: Option<u64>,
    error: Option<String>,
}

struct Trainer {
    model: Model,
    varmap: VarMap,
    opt: AdamW,
}

impl Trainer {
    fn new(cfg: Config, lr: f64, dev: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
        let model = Model::new(cfg, vb)?;
        let opt = AdamW::new(varmap.all_vars(), ParamsAdamW { lr, weight_decay: 0.01, ..Default::default() })?;
        Ok(Trainer { model, varmap, opt })
    }

    /// One optimiser step on `(inputs, targets)`; returns the loss.
    fn step(&mut self, inputs: &Tensor, targets: &Tensor) -> Result<f32> {
        let logits = self.model.forward(inputs, None)?;
        let (b, n, vocab) = logits.dims3()?;
        let loss = candle_nn::loss::cross_entropy(&logits.reshape((b * n, vocab))?, &targets.reshape(b * n)?)?;
        self.opt.backward_step(&loss)?;
        Ok(loss.to_scalar::<f32>()?)
    }
}

/// Times `steps` training steps (after 2 untimed ones) and their peak memory.
fn time_steps(trainer: &mut Trainer, corpus: &Corpus, args: &Args, dev: &Device, steps: usize) -> Result<StepStats> {
    let mut rng = StdRng::seed_from_u64(args.seed + 1000);
    for _ in 0..2 {
        let (x, y) = corpus.batch(&mut rng, args.batch, args.seq, dev)?;
        trainer.step(&x, &y)?;
    }
    dev.synchronize()?;
    let resident_bytes = memory::current(dev)?;
    memory::reset_peak(dev)?;
    let start = Instant::now();
    for _ in 0..steps {
        let (x, y) = corpus.batch(&mut rng, args.batch, args.seq, dev)?;
        trainer.step(&x, &y)?;
    }
    dev.synchronize()?;
    let secs = start.elapsed().as_secs_f64() / steps as f64;
    Ok(StepStats {
        attention: trainer.model.attention().to_string(),
        ms_per_step: secs * 1e3,
        tokens_per_s: (args.batch * args.seq) as f64 / secs,
        peak_bytes: memory::peak(dev)?,
        resident_bytes,
        error: None,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.d_model % args.heads != 0 || args.steps < 10 || args.seq < 2 || args.batch == 0 {
        bail!("--d-model must be a multiple of --heads, --steps >= 10, --seq >= 2, --batch >= 1");
    }
    let dev = device(&args.device)?;
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        // The f32 projections on tensor cores (TF32), as a candle user training on a GPU would.
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        if let (Device::Cuda(d), false) = (&dev, args.trim_pool) {
            sbgen_candle::cuda::device::keep_memory_pool(d)?;
        }
    }
    let corpus = Corpus::load()?;
    let attn_dtype = if dev.is_cuda() { DType::BF16 } else { DType::F32 };
    let cfg = Config {
        vocab: corpus.vocab(),
        d_model: args.d_model,
        heads: args.heads,
        layers: args.layers,
        attention: Attention::Sbgen,
        attn_dtype,
    };
    println!(
        "candle-lm: {} chars, vocab {}, {} layers of d_model {} ({} heads of {}), batch {} x seq {}, {:?} attention in {:?} on {:?}",
        corpus.len(),
        cfg.vocab,
        cfg.layers,
        cfg.d_model,
        cfg.heads,
        cfg.head_dim(),
        args.batch,
        args.seq,
        cfg.attention,
        attn_dtype,
        dev
    );
    if dev.is_cuda() {
        // candle's CPU backend draws its initial weights from an unseeded generator.
        dev.set_seed(args.seed)?;
    }
    let mut trainer = Trainer::new(cfg, args.lr, &dev)?;
    let params: usize = trainer.varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    println!("parameters: {params}");

    // Training, with a linear warm-up of the learning rate.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut losses = Vec::with_capacity(args.steps);
    let warmup = (args.steps / 10).max(1);
    let train_start = Instant::now();
    for step in 0..args.steps {
        trainer.opt.set_learning_rate(args.lr * ((step + 1) as f64 / warmup as f64).min(1.0));
        let t = Instant::now();
        let (x, y) = corpus.batch(&mut rng, args.batch, args.seq, &dev)?;
        let loss = trainer.step(&x, &y)?; // reads the loss back: the step has finished
        losses.push(loss as f64);
        let secs = t.elapsed().as_secs_f64();
        if step % 10 == 0 || step + 1 == args.steps {
            println!(
                "step {step:4}  loss {loss:.4}  {:.1} ms  {:.0} tokens/s",
                secs * 1e3,
                (args.batch * args.seq) as f64 / secs
            );
        }
    }
    let train_secs = train_start.elapsed().as_secs_f64();
    let final_loss = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    let val_loss = validation_loss(&trainer.model, &corpus, &args, &dev)?;
    println!(
        "trained {} steps in {train_secs:.1} s: final loss {final_loss:.4} (mean of the last 10 steps), validation loss {val_loss:.4}, target {}",
        args.steps, args.target_loss
    );

    let mut stats = vec![time_steps(&mut trainer, &corpus, &args, &dev, args.compare_steps)?];
    if args.compare {
        for attention in [Attention::Softmax, Attention::NaiveSb] {
            let mut other = Trainer::new(Config { attention, ..cfg }, args.lr, &dev)?;
            let s = time_steps(&mut other, &corpus, &args, &dev, args.compare_steps).unwrap_or_else(|e| StepStats {
                attention: attention.to_string(),
                error: Some(format!("{e:#}")),
                ..Default::default()
            });
            drop(other);
            stats.push(s);
        }
    }
    println!("training step, batch {} x seq {} ({} timed steps each):", args.batch, args.seq, args.compare_steps);
    for s in &stats {
        match &s.error {
            Some(e) => println!("  {:9} failed: {e}", s.attention),
            None => println!(
                "  {:9} {:9.2} ms/step {:10.0} tokens/s  peak memory {} (resident before the steps {})",
                s.attention,
                s.ms_per_step,
                s.tokens_per_s,
                gib(s.peak_bytes),
                gib(s.resident_bytes),
            ),
        }
    }

    let (text, gen_tps, prefill_ms) = generate(&trainer.model, &corpus, &args, &dev)?;
    println!("generated {} chars at {gen_tps:.1} tokens/s (prefill {prefill_ms:.1} ms):", args.generate);
    println!("---\n{}{}\n---", args.prompt, text);

    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "device": format!("{dev:?}"),
            "config": { "vocab": cfg.vocab, "d_model": cfg.d_model, "heads": cfg.heads, "layers": cfg.layers,
                        "batch": args.batch, "seq": args.seq, "steps": args.steps, "lr": args.lr,
                        "attn_dtype": format!("{attn_dtype:?}"), "parameters": params },
            "losses": losses,
            "final_loss": final_loss,
            "validation_loss": val_loss,
            "train_seconds": train_secs,
            "step_stats": stats,
            "generation": { "chars": args.generate, "tokens_per_s": gen_tps, "prefill_ms": prefill_ms, "text": text },
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !final_loss.is_finite() || final_loss > args.target_loss {
        bail!("the final training loss {final_loss:.4} is above the target {}", args.target_loss);
    }
    Ok(())
}

fn gib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
}

/// Mean loss over 4 batches of the held-out tail of the corpus (no gradient).
fn validation_loss(model: &Model, corpus: &Corpus, args: &Args, dev: &Device) -> Result<f64> {
    let mut rng = StdRng::seed_from_u64(args.seed + 7);
    let mut sum = 0.0;
    for _ in 0..4 {
        let (x, y) = corpus.validation_batch(&mut rng, args.batch, args.seq, dev)?;
        let logits = model.forward(&x, None)?;
        let (b, n, vocab) = logits.dims3()?;
        let loss = candle_nn::loss::cross_entropy(&logits.reshape((b * n, vocab))?, &y.reshape(b * n)?)?;
        sum += loss.to_scalar::<f32>()? as f64;
    }
    Ok(sum / 4.0)
}

/// Greedy-with-temperature sampling through the KV caches. Returns the text, tokens/s of the
/// decode steps and the prefill's milliseconds.
fn generate(model: &Model, corpus: &Corpus, args: &Args, dev: &Device) -> Result<(String, f64, f64)> {
    let prompt = corpus.encode(&args.prompt)?;
    let capacity = prompt.len() + args.generate;
    let cfg = model.config();
    let mut caches = (0..cfg.layers)
        .map(|_| SbKvCache::contiguous(1, capacity, cfg.heads, cfg.head_dim(), cfg.attn_dtype, dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let t = Instant::now();
    let tokens = Tensor::new(prompt.as_slice(), dev)?.unsqueeze(0)?;
    let logits = model.forward(&tokens, Some(&mut caches))?;
    let mut last = logits.get(0)?.get(prompt.len() - 1)?;
    let mut rng = StdRng::seed_from_u64(args.seed + 3);
    let mut next = data::sample(&last, 0.8, &mut rng)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut out = vec![next];
    let t = Instant::now();
    for _ in 1..args.generate {
        last = model.step(&Tensor::new(&[next], dev)?, &mut caches)?.get(0)?;
        next = data::sample(&last, 0.8, &mut rng)?;
        out.push(next);
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((corpus.decode(&out), (args.generate - 1) as f64 / secs, prefill_ms))
}
