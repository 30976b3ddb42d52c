//! `sbgen emit`: lower one spec to CUDA C++ and write `<kernel name>.cu` per pass plus
//! `manifest.json`, touching only files whose content changed.

use super::{Outcome, UsageError};
use crate::ir::{
    Arch, Cumsum, Dtype, Kernel, Layout, Loads, Mask, MmaFamily, Pass, Remainder, Schedule, Softplus, Spec,
};
use crate::lower::{lower, LowerError};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct EmitArgs {
    /// Head dimension: any 1..=256 (tiles are head_dim rounded up to a multiple of 32; 32, 64, 96, 128, 256 need no padding).
    #[arg(long)]
    pub head_dim: u32,
    /// Element type: bf16 or f16.
    #[arg(long)]
    pub dtype: Dtype,
    /// Which passes to emit: fwd, bwd, both, or decode (one new token per sequence against a KV
    /// cache: the forward's last row, split across key chunks; docs/math.md#decode).
    #[arg(long, value_enum, default_value_t = EmitPass::Both)]
    pub pass: EmitPass,
    /// Decode only: the KV cache, contiguous (`--layout bhnd` or `bnhd`) or paged
    /// ([num_pages, page_size, H_kv, D] with a block table; the same as `--layout paged`).
    #[arg(long, value_enum)]
    pub kv_cache: Option<KvCache>,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Target architecture: sm_80 or sm_90 (compiled as sm_90a).
    #[arg(long, default_value = "sm_90")]
    pub arch: Arch,
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Output folder.
    #[arg(long, default_value = "sbgen-out")]
    pub out: PathBuf,
}

/// The spec fields besides head_dim, dtype and pass, shared by the subcommands that take one spec
/// (`emit`, `run`) and by `tune`.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Causal mask: strict (key j < query i) or attend_current (j <= i).
    #[arg(long, default_value_t = Mask::Strict)]
    pub mask: Mask,
    /// Memory order of q, k, v, o (and do, the gradients): bhnd, bnhd, or thd (a packed batch of
    /// sequences of any lengths, [T, H, D] with cu_seqlens; `--varlen` is the same).
    #[arg(long, default_value_t = Layout::Bhnd)]
    pub layout: Layout,
    /// The THD layout (packed variable-length batch): the same as `--layout thd`.
    #[arg(long, conflicts_with = "layout")]
    pub varlen: bool,
    /// Return the leftover stick separately (return) or fuse rem * v_i into o (fuse).
    #[arg(long, default_value_t = Remainder::Return)]
    pub remainder: Remainder,
    /// Stop the walk once less than 2^-T of every row's stick is left (8..=60; off when absent).
    #[arg(long, value_name = "T")]
    pub early_exit_bits: Option<u32>,
    /// Backward only: bit-identical dq, dk, dv across runs (dK/dV added in a fixed order; see
    /// docs/math.md#deterministic-backward). The forward is always deterministic.
    #[arg(long)]
    pub deterministic: bool,
}

impl SpecArgs {
    /// The layout asked for (`--varlen` is `--layout thd`).
    pub fn layout(&self) -> Layout {
        if self.varlen {
            Layout::Thd
        } else {
            self.layout
        }
    }

    /// The spec of `pass` with these fields (`deterministic` applies to the backward only).
    pub fn spec(&self, head_dim: u32, dtype: Dtype, pass: Pass) -> Spec {
        Spec {
            head_dim,
            dtype,
            mask: self.mask,
            layout: self.layout(),
            remainder: self.remainder,
            pass,
            early_exit_bits: self.early_exit_bits,
            deterministic: self.deterministic && pass == Pass::Backward,
        }
    }
}

/// Schedule overrides; absent fields keep the default schedule (64 x 64, 4 warps, 2 stages, mufu).
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Query rows per CTA.
    #[arg(long)]
    pub block_m: Option<u32>,
    /// Keys per step of the walk.
    #[arg(long)]
    pub block_n: Option<u32>,
    /// Warps per CTA (default: block_m / 16, or block_m / 32 when that is what gives 4 or 8).
    #[arg(long)]
    pub warps: Option<u32>,
    /// K/V pipeline stages.
    #[arg(long)]
    pub stages: Option<u32>,
    /// How the stick's special functions are evaluated: mufu, poly (the weights' exp2 as a polynomial
    /// on the FMA pipe), half (the polynomial for every other key) or linear (the stick in linear
    /// space: 2^x per score and one reciprocal per run of keys, about one special function per
    /// score in the forward where mufu takes three;
    /// docs/math.md#the-stick-in-linear-space).
    #[arg(long, value_parser = parse_softplus)]
    pub softplus: Option<Softplus>,
    /// How the in-block reverse cumulative sum of log2(1 - beta) is taken: shuffle (fp32 in
    /// registers and a 4-lane shuffle scan) or tensor_core (a wgmma with a triangle of ones; the
    /// wgmma forward with a log-space walk on 64-key blocks and 2 stages only,
    /// docs/performance.md#the-scan-on-tensor-cores).
    #[arg(long, value_parser = parse_cumsum)]
    pub cumsum: Option<Cumsum>,
    /// Tensor-core instructions: mma_sync, or wgmma (sm_90a; the forward's Q K^T and P V, the
    /// backward's Q K^T, dO V^T and dZ K, and its dK and dV on 64-key blocks up to head_dim 128,
    /// docs/performance.md#wgmma).
    #[arg(long, value_parser = parse_mma)]
    pub mma: Option<MmaFamily>,
    /// How K and V reach shared memory: cp_async (every thread, 16 bytes per copy), tma (the
    /// tensor-memory accelerator through tensor maps the launcher makes, docs/performance.md#tma),
    /// or producer (TMA issued by a producer warpgroup of its own, which gives its registers to the
    /// computing warps, docs/performance.md#warp-specialisation). Both in the wgmma forward and
    /// backward.
    #[arg(long, value_parser = parse_loads)]
    pub loads: Option<Loads>,
    /// With `--loads producer` on 8 warps and 3 or more stages: the two computing warpgroups issue
    /// their products in turn (ping-pong), one's stick math under the other's matmuls.
    #[arg(long)]
    pub pingpong: bool,
}

/// `emit`'s passes: those of [`PassChoice`] and the decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EmitPass {
    Fwd,
    Bwd,
    Both,
    Decode,
}

impl EmitPass {
    fn passes(self) -> &'static [Pass] {
        match self {
            EmitPass::Fwd => &[Pass::Forward],
            EmitPass::Bwd => &[Pass::Backward],
            EmitPass::Both => &[Pass::Forward, Pass::Backward],
            EmitPass::Decode => &[Pass::Decode],
        }
    }
}

/// A decode's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvCache {
    Contiguous,
    Paged,
}

/// The passes `check` and `run` take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PassChoice {
    Fwd,
    Bwd,
    Both,
    /// One new token per sequence against a KV cache (docs/math.md#decode).
    Decode,
}

fn parse_softplus(s: &str) -> Result<Softplus, String> {
    match s.to_ascii_lowercase().as_str() {
        "mufu" => Ok(Softplus::Mufu),
        "poly" => Ok(Softplus::Poly),
        "half" => Ok(Softplus::Half),
        "linear" => Ok(Softplus::Linear),
        _ => Err(format!("`softplus` = `{s}` is not a valid value: allowed mufu, poly, half, linear")),
    }
}

fn parse_cumsum(s: &str) -> Result<Cumsum, String> {
    match s.to_ascii_lowercase().replace('-', "_").as_str() {
        "shuffle" => Ok(Cumsum::Shuffle),
        "tensor_core" => Ok(Cumsum::TensorCore),
        _ => Err(format!("`cumsum` = `{s}` is not a valid value: allowed shuffle, tensor_core")),
    }
}

fn parse_mma(s: &str) -> Result<MmaFamily, String> {
    match s.to_ascii_lowercase().replace('-', "_").as_str() {
        "mma_sync" => Ok(MmaFamily::MmaSync),
        "wgmma" => Ok(MmaFamily::Wgmma),
        _ => Err(format!("`mma` = `{s}` is not a valid value: allowed mma_sync, wgmma")),
    }
}

fn parse_loads(s: &str) -> Result<Loads, String> {
    match s.to_ascii_lowercase().replace('-', "_").as_str() {
        "cp_async" => Ok(Loads::CpAsync),
        "tma" => Ok(Loads::Tma),
        "producer" => Ok(Loads::Producer),
        _ => Err(format!("`loads` = `{s}` is not a valid value: allowed cp_async, tma, producer")),
    }
}

impl ScheduleArgs {
    pub fn schedule(&self) -> Schedule {
        let mut s = Schedule::DEFAULT;
        if let Some(m) = self.block_m {
            s.block_m = m;
            // 16 rows per warp when that gives 4 or 8 warps, else 32; otherwise validation reports
            // `block_m` against the default warps.
            s.warps = [16, 32]
                .iter()
                .map(|rows| m / rows)
                .find(|&w| m % 16 == 0 && matches!(w, 4 | 8) && m % w == 0)
                .unwrap_or(Schedule::DEFAULT.warps);
        }
        if let Some(w) = self.warps {
            s.warps = w;
        }
        if let Some(n) = self.block_n {
            s.block_n = n;
        }
        if let Some(st) = self.stages {
            s.stages = st;
        }
        if let Some(sp) = self.softplus {
            s.softplus = sp;
        }
        if let Some(c) = self.cumsum {
            s.cumsum = c;
        }
        if let Some(m) = self.mma {
            s.mma = m;
        }
        if let Some(l) = self.loads {
            s.loads = l;
        }
        s.pingpong = self.pingpong;
        s
    }
}

pub fn run(args: &EmitArgs, out: &mut dyn Write) -> Result<Outcome> {
    // Validate every kernel before writing anything.
    let layout = match (args.kv_cache, args.pass) {
        (None, _) => args.spec.layout(),
        (Some(_), pass) if pass != EmitPass::Decode => {
            return Err(UsageError::new("`--kv-cache` is the decode's cache: add `--pass decode`").into())
        }
        (Some(KvCache::Paged), _) => Layout::Paged,
        (Some(KvCache::Contiguous), _) if args.spec.layout() == Layout::Paged => {
            return Err(UsageError::new("`--kv-cache contiguous` with `--layout paged`: pick one").into())
        }
        (Some(KvCache::Contiguous), _) => args.spec.layout(),
    };
    let mut kernels = Vec::new();
    for &pass in args.pass.passes() {
        let spec = Spec { layout, ..args.spec.spec(args.head_dim, args.dtype, pass) };
        // No schedule flag: the spec's default schedule, the kernel check, run and the macro use.
        let schedule =
            super::check::schedule_override(&args.schedule).unwrap_or_else(|| Schedule::default_on(&spec, args.arch));
        let kernel = Kernel::new(spec, schedule, args.arch);
        kernel.validate().map_err(UsageError::new)?;
        kernels.push(kernel);
    }
    let mut lowered = Vec::new();
    for kernel in &kernels {
        match lower(kernel) {
            Ok(l) => lowered.push(l),
            Err(LowerError::Invalid(e)) => return Err(UsageError::new(e).into()),
            Err(e) => return Err(e).with_context(|| format!("lowering `{}`", kernel.name())),
        }
    }

    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create `{}`", args.out.display()))?;
    for l in &lowered {
        let path = args.out.join(format!("{}.cu", l.name));
        report(out, &path, write_if_changed(&path, l.cuda_source.as_bytes())?)?;
    }
    let manifests: Vec<_> = lowered.iter().map(|l| &l.manifest).collect();
    let mut json = serde_json::to_string_pretty(&manifests).context("serialising the manifest")?;
    json.push('\n');
    let path = args.out.join("manifest.json");
    report(out, &path, write_if_changed(&path, json.as_bytes())?)?;
    Ok(Outcome::Success)
}

fn report(out: &mut dyn Write, path: &Path, written: bool) -> Result<()> {
    writeln!(out, "{} {}", if written { "wrote    " } else { "unchanged" }, path.display())?;
    Ok(())
}

/// Writes `bytes` to `path` unless it already holds exactly them (so build tools and editors see no
/// change), atomically ([`crate::files::write_atomic`]). Returns whether it wrote.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    crate::files::write_atomic(path, bytes)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_m_alone_sets_16_rows_per_warp() {
        let args = ScheduleArgs {
            block_m: Some(128),
            block_n: None,
            warps: None,
            stages: None,
            softplus: None,
            cumsum: None,
            mma: None,
            loads: None,
            pingpong: false,
        };
        let s = args.schedule();
        assert_eq!((s.block_m, s.warps), (128, 8));
        let args = ScheduleArgs { block_m: Some(256), ..args };
        assert_eq!(args.schedule().warps, 8);
        let args = ScheduleArgs { block_m: Some(96), ..args };
        assert_eq!(args.schedule().warps, 4, "falls back to the default, so `block_m` is what gets reported");
        let args = ScheduleArgs { block_m: Some(128), warps: Some(4), ..args };
        assert_eq!(args.schedule().warps, 4);
    }

    #[test]
    fn softplus_parse_names_the_field() {
        assert_eq!(parse_softplus("POLY"), Ok(Softplus::Poly));
        assert_eq!(parse_softplus("half"), Ok(Softplus::Half));
        assert_eq!(parse_softplus("Linear"), Ok(Softplus::Linear));
        assert!(parse_softplus("fast").unwrap_err().contains("`softplus`"));
        assert_eq!(parse_cumsum("tensor-core"), Ok(Cumsum::TensorCore));
        assert!(parse_cumsum("tc").unwrap_err().contains("`cumsum`"));
    }
}
