//! The *schedule* half of the IR: how a kernel computes its spec. Free for the tuner.

use serde::{Deserialize, Serialize};
use std::fmt;

/// How the in-block reverse cumulative sum of log2(1 - beta) is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Cumsum {
    /// fp32 in registers: each thread owns a contiguous run of keys (the K/V rows are permuted on
    /// load so the MMA layout gives it one), scans it sequentially, and a 4-lane shuffle scan joins
    /// the runs.
    Shuffle,
    /// A matmul with a constant triangular ones matrix on the tensor cores (inputs rounded to
    /// bf16), as the paper's reference does.
    TensorCore,
}

/// How 2^x is evaluated for the attention weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Softplus {
    /// Every exp2 and log2 on the special-function unit (`ex2.approx`, `lg2.approx`).
    Mufu,
    /// The weights' exp2 as a degree-5 polynomial on the FMA pipe (FlashAttention-4's trick), so
    /// the special-function unit does two of the three functions per score.
    Poly,
    /// The polynomial for every other key's weight, the special-function unit for the rest: the
    /// split between the two pipes (2.5 of the three functions per score on the special-function
    /// unit).
    Half,
    /// The stick in linear space: per score 2^x and 1 - beta = 1 / (1 + 2^x) (`ex2` and `rcp`, two
    /// special functions where the log-space walk takes three), products of (1 - beta) inside a
    /// thread's run of keys, log space between runs and blocks (docs/math.md#the-stick-in-linear-space).
    Linear,
}

/// Which tensor-core instructions the matmuls use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum MmaFamily {
    /// `mma.sync.m16n8k16` with `ldmatrix` (sm_80 and later).
    MmaSync,
    /// Hopper warpgroup `wgmma` (sm_90a only).
    Wgmma,
}

/// How the K and V tiles reach shared memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Loads {
    /// Every thread copies 16 bytes at a time (`cp.async`), in commit groups.
    #[default]
    CpAsync,
    /// The tensor-memory accelerator (sm_90a): one thread issues each tile through a tensor map the
    /// launcher makes, an mbarrier per stage counts the bytes (docs/performance.md#tma). The wgmma
    /// forward and backward.
    Tma,
    /// Warp specialisation: a producer warpgroup (one more per CTA, after the computing ones) issues
    /// the TMA copies and nothing else, with `setmaxnreg` giving its registers to the computing
    /// warpgroups; an mbarrier per stage says a stage is full, another that it is free again, so
    /// the forward's walk has no block barrier (docs/performance.md#warp-specialisation). The wgmma
    /// forward and backward.
    Producer,
}

impl Loads {
    fn is_cp_async(&self) -> bool {
        *self == Loads::CpAsync
    }

    /// Whether the K and V tiles come by TMA (with or without a producer warpgroup).
    pub fn is_tma(&self) -> bool {
        matches!(self, Loads::Tma | Loads::Producer)
    }
}

/// The producer warpgroup of [`Loads::Producer`]: `setmaxnreg` acts on whole warpgroups.
pub const PRODUCER_THREADS: u32 = 128;

/// How a kernel is tiled and pipelined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct Schedule {
    /// Query rows per CTA.
    pub block_m: u32,
    /// Keys per step of the right-to-left walk.
    pub block_n: u32,
    /// Warps per CTA; each owns `block_m / warps` query rows (16 or 32).
    pub warps: u32,
    /// Depth of the K/V `cp.async` pipeline (shared-memory buffers).
    pub stages: u32,
    pub cumsum: Cumsum,
    pub softplus: Softplus,
    pub mma: MmaFamily,
    /// Absent from cache files written before it existed (and not written when `cp_async`), so their
    /// entries and every kernel name (the schedule's hash) are unchanged.
    #[serde(default, skip_serializing_if = "Loads::is_cp_async")]
    pub loads: Loads,
    /// Ping-pong between the two computing warpgroups of a [`Loads::Producer`] CTA: each issues its
    /// products only after the other has issued its own, so one runs its stick math while the
    /// other's matmuls are on the tensor cores. Absent (false) in older cache files.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pingpong: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Schedule {
    /// The schedule used when nothing is tuned: 64 rows, 64 keys, 4 warps, double-buffered.
    pub const DEFAULT: Schedule = Schedule {
        block_m: 64,
        block_n: 64,
        warps: 4,
        stages: 2,
        cumsum: Cumsum::Shuffle,
        softplus: Softplus::Mufu,
        mma: MmaFamily::MmaSync,
        loads: Loads::CpAsync,
        pingpong: false,
    };

    /// The schedule used for `spec` when nothing is tuned: the fastest non-spilling schedule measured
    /// on the H200 (BENCHMARKS.md, 2026-11-29 and 2026-11-30). The forward at head_dim 64 takes
    /// 32-key blocks (`sbgen tune`: 5-6% faster than 64 at N = 2048 and 8192); the 96- and 128-wide
    /// forwards 64 x 64 on 3 stages (at 128 the Q fragments are then read from shared memory, see
    /// `lower.rs`: 2.230 ms at 2 x 16 x 8192, 1.06x the 64 x 32 x 2 schedule in the same tune run,
    /// 2026-11-30 session 9); the backward at head_dim 96 and 128 takes 32-key blocks (64 spills).
    /// A default must not spill: `check --emit-ptx` refuses spilling kernels, and CI compiles the
    /// defaults of every head_dim class for each arch (docs/performance.md#known-spills).
    pub fn default_for(spec: &sbgen_runtime::spec::Spec) -> Schedule {
        use sbgen_runtime::spec::Pass;
        let n32 = Schedule { block_n: 32, ..Schedule::DEFAULT };
        match (spec.pass, spec.tile_head_dim()) {
            // Wider than 128: 16 rows per warp and 32-key blocks are what fits in 255 registers
            // (64 x 64 spills 44 bytes in the forward at 256).
            // The segment pass walks as the forward does.
            (Pass::Forward | Pass::Segment, d) if d > 128 => n32,
            (Pass::Forward | Pass::Segment, d) if d > 64 => Schedule { stages: 3, ..Schedule::DEFAULT },
            (Pass::Forward | Pass::Segment, _) => n32,
            // Wider than 128: 128 rows on 8 warps, the faster at 256 (`sbgen tune`, 2026-11-30);
            // sm_80 has shared memory for 64 rows only (`default_on`).
            // The segment backward walks as the backward does.
            (Pass::Backward | Pass::SegmentBackward, d) if d > 128 => Schedule { block_m: 128, warps: 8, ..n32 },
            (Pass::Backward | Pass::SegmentBackward, d) if d > 64 => n32,
            (Pass::Backward | Pass::SegmentBackward, _) => Schedule::DEFAULT,
            // Decode: 16 query heads per tile (a group of up to 16 in one m-tile), 16-key blocks
            // (they divide every page size of a paged cache), 4 warps walking chunks on their own
            // with 3 stages each. Not yet timed (session 10): `sbgen tune` will decide.
            (Pass::Decode, _) => Schedule { block_m: 16, block_n: 16, warps: 4, stages: 3, ..Schedule::DEFAULT },
        }
    }

    /// The sm_90a segment pass's schedule up to head_dim 128 (the forward's walk from a carried state,
    /// context parallelism): 64 x 64 on 4 warps, double-buffered, Q K^T and P V on wgmma, the MUFU
    /// log-space stick math (docs/performance.md#wgmma: 1.40x the `mma.sync` default at 2,16,8192,128
    /// and 1.22x at 4,16,4096,64 on the H200, session 17, in one call). The forward itself takes
    /// [`Schedule::wgmma_forward`].
    pub const WGMMA_FORWARD: Schedule = Schedule { mma: MmaFamily::Wgmma, ..Schedule::DEFAULT };

    /// The sm_90a forward's schedule on wgmma: the stick in linear space ([`Softplus::Linear`]) on
    /// 64 x 64 tiles, two stages at head_dim 64 and three at 128 (the next block's Q K^T overlaps this
    /// block's stick math); above 128 the 64 x 32 tiles of [`Schedule::default_for`] with the MUFU walk,
    /// which the linear stick did not beat there. On the H200 in one call (session 20,
    /// BENCHMARKS.md): 1.08x the MUFU 64 x 64 x 2 kernel at 2,16,8192,128 and 1.17x at 4,16,4096,64;
    /// `sbgen tune` picks these at every bf16/f16 BHND spec of those widths.
    ///
    /// At head_dim 128 without early exit, warp specialisation ([`Loads::Producer`]): 128 x 64 on
    /// two computing warpgroups and a producer, three stages, 1.15x the 64 x 64 x 3 `cp.async`
    /// kernel at 2,16,8192,128 in one call (session 25, BENCHMARKS.md; ping-pong measured slower).
    /// With early exit the walks are a few blocks long and that kernel's first copies show (0.83x
    /// the `cp.async` one at T = 24), so early exit takes one computing warpgroup and a producer on
    /// 64 x 64 x 2 tiles, two CTAs per SM: 0.093 ms against 0.100 for the 64 x 64 x 3 `cp.async`
    /// kernel at 2,16,8192,128, T = 24 (session 26, call 1; 0.091 against 0.100 in session 25).
    pub fn wgmma_forward(spec: &sbgen_runtime::spec::Spec) -> Schedule {
        let linear = Schedule { softplus: Softplus::Linear, ..Schedule::WGMMA_FORWARD };
        match spec.tile_head_dim() {
            d if d <= 64 => linear,
            d if d <= 128 && spec.early_exit_bits.is_some() => Schedule { loads: Loads::Producer, ..linear },
            d if d <= 128 => Schedule { block_m: 128, warps: 8, stages: 3, loads: Loads::Producer, ..linear },
            _ => Schedule { mma: MmaFamily::Wgmma, ..Schedule::default_for(spec) },
        }
    }

    /// The sm_90a backward's schedule on wgmma (S, dP and dQ on the warpgroup; dK and dV too on the
    /// 128-wide tiles, on `mma.sync` at 64 and 256 wide, added to the f32 accumulators four columns
    /// per reduction; docs/performance.md#wgmma): 64 x 64 on 4 warps at
    /// head_dim 64, 128 x 64 on 8 warps (two warpgroups) at 128, 128 x 32 on 8 warps above. 128 query
    /// rows halve those additions per row; at 64 rows they bound the backward in L2, at 128 (session
    /// 23's profile) it is latency-bound (docs/performance.md#wgmma). Measured on the H200
    /// (BENCHMARKS.md, session 19, call C, backward = forward + backward less the forward): 7.58 ms
    /// at 2,16,8192,128 against 10.58 for the `mma.sync` default (1.40x; deterministic 1.59x), 2.43
    /// against 2.62 at 4,16,4096,64, 8.91 against 10.14 at 1,16,8192,256. Up to head_dim 128 with the stick in linear space ([`Softplus::Linear`]; the
    /// betas come out of it without a third special function): 1.04x the MUFU walk at 2,16,8192,128
    /// in one call, and `sbgen tune`'s pick at every bf16/f16 BHND spec of width 64 and 128 (session 20).
    /// At 128 wide K and V come by TMA ([`Loads::Tma`]): the backward 5.470-5.485 ms against
    /// 5.757-5.809 by `cp.async` at 2,16,8192,128 (1.05x; session 27, calls 1 and 2), and `sbgen
    /// tune`'s pick at both buckets of every 128-wide spec it re-tuned then (bf16 BHND, deterministic,
    /// THD, BNHD, BNHD fused; f16 BHND: 1.04-1.08x the best `cp.async` kernel). At 64 wide the two
    /// measured the same (2.227-2.240 against 2.248-2.257 ms at 4,16,4096,64); a producer warpgroup was
    /// slower at both widths (5.659 and 2.270 ms).
    pub fn wgmma_backward(spec: &sbgen_runtime::spec::Spec) -> Schedule {
        let wgmma = Schedule { mma: MmaFamily::Wgmma, ..Schedule::DEFAULT };
        let linear = Schedule { softplus: Softplus::Linear, ..wgmma };
        match spec.tile_head_dim() {
            d if d <= 64 => linear,
            d if d <= 128 => Schedule { block_m: 128, warps: 8, loads: Loads::Tma, ..linear },
            _ => Schedule { block_m: 128, block_n: 32, warps: 8, ..wgmma },
        }
    }

    /// [`Schedule::default_for`] on `arch`: on sm_90a the forward takes [`Schedule::wgmma_forward`] and
    /// its segment pass (the same walk from a carried state) wgmma with the MUFU walk where they lower
    /// (head_dim 64 and 128: [`Schedule::WGMMA_FORWARD`] for the segment pass; 256: the 64 x 32 tiles of
    /// [`Schedule::default_for`] on wgmma, 1.77x the `mma.sync` ones at N = 8192 in `sbgen tune`,
    /// session 17), and the backward
    /// takes [`Schedule::wgmma_backward`] where it lowers (head_dim 64, 128 and 256); where the schedule
    /// needs more shared memory than the arch has (the 192 and 256 wide backward's 128 rows on sm_80's
    /// 163 KiB), 64 x 32 on 4 warps; a decode keeps its tiles on 2 warps instead (each warp has its own
    /// K/V stages).
    pub fn default_on(spec: &sbgen_runtime::spec::Spec, arch: super::Arch) -> Schedule {
        // The segment pass (context parallelism) is the forward's walk from a carried state: the same tiles.
        if arch == super::Arch::Sm90
            && matches!(spec.pass, sbgen_runtime::spec::Pass::Forward | sbgen_runtime::spec::Pass::Segment)
        {
            let wgmma = if spec.pass == sbgen_runtime::spec::Pass::Forward {
                Schedule::wgmma_forward(spec)
            } else if spec.tile_head_dim() <= 128 {
                Schedule::WGMMA_FORWARD
            } else {
                Schedule { mma: MmaFamily::Wgmma, ..Schedule::default_for(spec) }
            };
            if super::Kernel::new(*spec, wgmma, arch).validate().is_ok() {
                return wgmma;
            }
        }
        if arch == super::Arch::Sm90 && spec.pass == sbgen_runtime::spec::Pass::Backward {
            let wgmma = Schedule::wgmma_backward(spec);
            if super::Kernel::new(*spec, wgmma, arch).validate().is_ok() {
                return wgmma;
            }
        }
        let schedule = Schedule::default_for(spec);
        if super::Kernel::new(*spec, schedule, arch).smem_layout().total <= arch.max_smem_per_block() {
            schedule
        } else if spec.pass == sbgen_runtime::spec::Pass::Decode {
            Schedule { warps: 2, ..schedule }
        } else {
            Schedule { block_m: 64, block_n: 32, warps: 4, ..schedule }
        }
    }

    /// Query rows each warp owns.
    pub fn rows_per_warp(&self) -> u32 {
        self.block_m / self.warps.max(1)
    }

    /// Threads per CTA: the computing warps', and a producer warpgroup's with [`Loads::Producer`].
    pub fn threads(&self) -> u32 {
        self.compute_threads() + if self.loads == Loads::Producer { PRODUCER_THREADS } else { 0 }
    }

    /// The threads that own query rows (`warps` warps).
    pub fn compute_threads(&self) -> u32 {
        self.warps * 32
    }

    /// A stable 8-hex-digit hash of the schedule (FNV-1a over its display form), used in kernel
    /// names so a PTX file, a cache entry and a snapshot can be matched by eye. Stable across Rust
    /// versions, unlike `DefaultHasher`.
    pub fn short_hash(&self) -> String {
        let mut h: u32 = 0x811c_9dc5;
        for byte in self.to_string().bytes() {
            h ^= byte as u32;
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("{h:08x}")
    }
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::DEFAULT
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "m{}n{}w{}s{}-{}-{}-{}",
            self.block_m,
            self.block_n,
            self.warps,
            self.stages,
            match self.cumsum {
                Cumsum::Shuffle => "shfl",
                Cumsum::TensorCore => "tccs",
            },
            match self.softplus {
                Softplus::Mufu => "mufu",
                Softplus::Poly => "poly",
                Softplus::Half => "half",
                Softplus::Linear => "lin",
            },
            match self.mma {
                MmaFamily::MmaSync => "mma",
                MmaFamily::Wgmma => "wgmma",
            }
        )?;
        // Only when not the default, so names written before the field existed stay the same.
        match self.loads {
            Loads::CpAsync => {}
            Loads::Tma => f.write_str("-tma")?,
            Loads::Producer => f.write_str("-ws")?,
        }
        if self.pingpong {
            f.write_str("-pp")?;
        }
        Ok(())
    }
}
