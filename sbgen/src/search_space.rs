//! The default search space of schedules, as literal tables (CUTLASS style).
//!
//! For a spec and an arch, [`variants`] takes the cross product of one [`SearchSpace`]'s tables and
//! yields every candidate with its verdict: `Ok(())`, or a [`Pruned`] reason, either from
//! [`Kernel::validate`] (shared memory, divisibility, choices the templates do not implement) or from
//! an [`EXCLUSIONS`] entry (choices the IR accepts but the search space leaves out on purpose).
//!
//! To change what the tuner tries, edit the tables: [`RULES`] picks a space per pass / tile width /
//! arch (first match wins), so a pass whose large tiles spill can get a smaller table without
//! touching the others. Choices the templates do not implement yet stay in the tables: they are
//! pruned with a printable reason today and join the search the day validation accepts them.
//!
//! Rules and exclusions key on the tile width, [`Spec::tile_head_dim`] (head_dim rounded up to a
//! multiple of 32), never on head_dim itself: a padded head_dim (80) compiles to the registers and
//! shared memory of its tile (96), so every head_dim in 1..=256 has the space of its tile. The
//! layout (THD included), mask, remainder, early exit and `deterministic` do not choose the space: a
//! deterministic backward or a THD spec searches what its dense, non-deterministic twin searches.

use crate::ir::{Arch, Cumsum, IrError, Kernel, Loads, MmaFamily, Pass, Schedule, Softplus, Spec};
use std::fmt;

/// Query rows per CTA and the warps that share them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub block_m: u32,
    pub warps: u32,
}

/// One table of schedule choices; its candidates are the cross product of the fields.
#[derive(Clone, Copy, Debug)]
pub struct SearchSpace {
    pub tiles: &'static [Tile],
    pub block_n: &'static [u32],
    pub stages: &'static [u32],
    pub softplus: &'static [Softplus],
    pub cumsum: &'static [Cumsum],
    pub mma: &'static [MmaFamily],
    pub loads: &'static [Loads],
    pub pingpong: &'static [bool],
}

/// Which specs and arches a [`SearchSpace`] applies to; `None` matches anything.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub pass: Option<Pass>,
    /// Tile widths ([`Spec::tile_head_dim`]) the rule applies to.
    pub tile_head_dims: Option<&'static [u32]>,
    pub arch: Option<Arch>,
    pub space: &'static SearchSpace,
}

/// A schedule the IR accepts but the search space leaves out, with the reason printed for it.
#[derive(Clone, Copy, Debug)]
pub struct Exclusion {
    pub reason: &'static str,
    pub applies: fn(&Kernel) -> bool,
}

/// The default table. 16 rows per warp (block_m = 16 * warps) with `mma.sync` and the shuffle
/// cumsum are what the templates implement everywhere: 2 tiles x 3 block_n x 2 stages x 2 softplus
/// = 24 candidates per spec before the shared-memory check; on sm_90a each has a `wgmma` twin where
/// the tiles lower, and the `wgmma` candidates a TMA twin and a producer twin (`loads`). The
/// 32-rows-per-warp tile and the tensor-core cumsum are listed so that their pruning is visible.
pub const DEFAULT_SPACE: SearchSpace = SearchSpace {
    tiles: &[
        Tile { block_m: 64, warps: 4 },
        Tile { block_m: 128, warps: 8 },
        Tile { block_m: 128, warps: 4 }, // 32 rows per warp: see EXCLUSIONS
    ],
    block_n: &[32, 64, 128],
    stages: &[2, 3],
    // The MUFU log-space walk against the stick in linear space (in the forward about one special
    // function per score instead of three, in the backward two). `Poly` and `Half` are left out: on
    // the wgmma forward they measured 1.63x and 1.49x slower than the MUFU at 2,16,8192,128
    // (BENCHMARKS.md, session 17), as the kernel is bound by dependent-instruction latency more than
    // by the special-function unit; `--softplus poly|half` times them.
    softplus: &[Softplus::Mufu, Softplus::Linear],
    cumsum: &[Cumsum::Shuffle, Cumsum::TensorCore],
    mma: &[MmaFamily::MmaSync, MmaFamily::Wgmma],
    // TMA loads where the templates have them (the wgmma forward and backward), by one thread of the
    // computing warps or by a producer warpgroup; pruned elsewhere with the reason.
    loads: &[Loads::CpAsync, Loads::Tma, Loads::Producer],
    // Ping-pong where it applies (a producer and two computing warpgroups, 3 or more stages);
    // listed so that its exclusion is visible (EXCLUSIONS).
    pingpong: &[false, true],
};

/// The default table with 32- and 64-key blocks only: 128-key blocks spill for the 64-wide forward
/// and backward (block_n = 128 holds 2 x 64 score accumulators per thread), for the 32-wide
/// backward (96-144 bytes under ptxas 13.0) and for the 96-wide forward (112-240 bytes). The 96-
/// and 128-wide backward take it too, on `mma.sync` without its 64-key blocks, which spill (an
/// [`EXCLUSIONS`] entry); wgmma's backward fits them (its B operands are read from shared memory).
pub const NARROW_SPACE: SearchSpace = SearchSpace { block_n: &[32, 64], ..DEFAULT_SPACE };

/// The decode's table (its `block_m` is query heads per m-tile, its warps each walk their own chunks:
/// docs/math.md#decode): 16 heads on 2, 4 or 8 warps, key blocks of 16, 32 and 64, 2 or 3 stages;
/// the MUFU exp2, the shuffle cumsum and `mma.sync` only. A decode waits on memory: what moves its
/// time is the bytes in flight per SM (warps, block, stages), not the arithmetic (the polynomial
/// exp2 is left out). 32 heads per tile (two m-tiles) spill 64-488 bytes at 128 wide under ptxas
/// 13.0 and are left out too. Chunks and splits are the launcher's, at run time.
pub const DECODE_SPACE: SearchSpace = SearchSpace {
    tiles: &[Tile { block_m: 16, warps: 4 }, Tile { block_m: 16, warps: 2 }, Tile { block_m: 16, warps: 8 }],
    block_n: &[16, 32, 64],
    stages: &[2, 3],
    softplus: &[Softplus::Mufu],
    cumsum: &[Cumsum::Shuffle],
    mma: &[MmaFamily::MmaSync],
    loads: &[Loads::CpAsync],
    pingpong: &[false],
};

/// Which table each (pass, tile width, arch) uses; the first matching rule wins, the last matches
/// all. Tiles wider than 128 take the default table, narrowed by an [`EXCLUSIONS`] entry that says
/// why.
pub const RULES: &[Rule] = &[
    Rule { pass: Some(Pass::Decode), tile_head_dims: None, arch: None, space: &DECODE_SPACE },
    Rule { pass: Some(Pass::Backward), tile_head_dims: Some(&[32, 96, 128]), arch: None, space: &NARROW_SPACE },
    Rule { pass: None, tile_head_dims: Some(&[64]), arch: None, space: &NARROW_SPACE },
    Rule { pass: Some(Pass::Forward), tile_head_dims: Some(&[96]), arch: None, space: &NARROW_SPACE },
    Rule { pass: None, tile_head_dims: None, arch: None, space: &DEFAULT_SPACE },
];

/// Schedules left out of the default search even though they validate. The spill entries come from
/// compiling every candidate with the pinned CUDA 13.0 compilers (NVRTC, then `ptxas -v`), the
/// check CI repeats: a variant the tuner may choose must not spill (docs/architecture.md#artifact-pipeline).
pub const EXCLUSIONS: &[Exclusion] = &[
    Exclusion {
        reason: "spills registers (ptxas 13.0): a producer warpgroup feeding two computing ones at 256 wide \
                 with the linear stick (32 bytes at their 240 registers)",
        applies: |k| {
            k.schedule.loads == Loads::Producer
                && k.schedule.warps == 8
                && k.schedule.softplus == Softplus::Linear
                && k.spec.tile_head_dim() > 128
        },
    },
    Exclusion {
        reason: "spills registers (ptxas 13.0): the backward with a producer warpgroup on 32-key blocks with \
                 the linear stick, 32 bytes in its deterministic (128 wide) and THD early-exit (64 wide) \
                 variants",
        applies: |k| {
            k.spec.pass == Pass::Backward
                && k.schedule.loads == Loads::Producer
                && k.schedule.block_n == 32
                && k.schedule.softplus == Softplus::Linear
        },
    },
    Exclusion {
        reason: "ping-pong is left to `--pingpong`: slower than the producer kernel without it (1.056 \
                 against 1.013 ms at 2,16,8192,128, session 25), and racecheck reports hazards in its \
                 epilogue that are not understood yet (docs/performance.md#warp-specialisation)",
        applies: |k| k.schedule.pingpong,
    },
    Exclusion {
        reason: "spills registers (ptxas 13.0): the decode's 64-key blocks at 96 and 128 wide (8-176 \
                 bytes) and its blocks of more than 16 keys above 128 (48 bytes at 256 on sm_80)",
        applies: |k| {
            k.spec.pass == Pass::Decode
                && ((k.spec.tile_head_dim() >= 96 && k.schedule.block_n == 64)
                    || (k.spec.tile_head_dim() > 128 && k.schedule.block_n > 16))
        },
    },
    Exclusion {
        reason: "32 rows per warp (block_m = 32 * warps) is left out of the default search space until \
                 the templates' two-m-tile path is tuned",
        applies: |k| k.schedule.rows_per_warp() == 32,
    },
    Exclusion {
        reason: "spills registers (ptxas 13.0): the mma.sync backward at tile widths 96 and 128 keeps dQ \
                 (48 or 64 f32 registers per thread) beside the scores, the betas, dP and the B fragments: \
                 64-key blocks spill 56-80 bytes (8 warps and sm_80 included); on wgmma they fit",
        applies: |k| {
            k.spec.pass == Pass::Backward
                && matches!(k.spec.tile_head_dim(), 96 | 128)
                && k.schedule.block_n == 64
                && k.schedule.mma == MmaFamily::MmaSync
        },
    },
    Exclusion {
        reason: "spills registers (ptxas 13.0): the linear stick on the 96-wide mma.sync forward, 64 x 64 \
                 tiles with 3 stages, 16 bytes at the padded head_dim 80 on sm_90a",
        applies: |k| {
            k.spec.pass == Pass::Forward
                && k.spec.tile_head_dim() == 96
                && k.schedule.softplus == Softplus::Linear
                && (k.schedule.block_m, k.schedule.block_n, k.schedule.stages) == (64, 64, 3)
                && k.schedule.mma == MmaFamily::MmaSync
        },
    },
    Exclusion {
        reason: "spills registers (ptxas 13.0): 128 x 128 tiles hold too many accumulators",
        applies: |k| k.schedule.block_m == 128 && k.schedule.block_n == 128,
    },
    Exclusion {
        reason: "spills registers (ptxas 13.0): the polynomial exp2 with 128-key blocks at head_dim 128",
        applies: |k| {
            k.spec.tile_head_dim() == 128 && k.schedule.block_n == 128 && k.schedule.softplus == Softplus::Poly
        },
    },
    Exclusion {
        reason: "spills registers (ptxas 13.0): the 128-wide forward on 4 warps with 128-key blocks, \
                 80-128 bytes on sm_80 and sm_90a",
        applies: |k| {
            k.spec.pass == Pass::Forward
                && k.spec.tile_head_dim() == 128
                && (k.schedule.block_m, k.schedule.block_n) == (64, 128)
        },
    },
    Exclusion {
        reason: "spills registers (ptxas 13.0): tiles wider than 128 fit in 255 registers with 32-key \
                 blocks only (at head_dim 256, 64 x 64 spills 80-88 bytes in the forward and 556 in the \
                 backward; 64 x 32 and 128 x 32 on 8 warps do not)",
        applies: |k| k.spec.tile_head_dim() > 128 && k.schedule.block_n > 32,
    },
];

/// Why a candidate is not compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pruned {
    /// [`Kernel::validate`] rejects it.
    Invalid(IrError),
    /// An [`EXCLUSIONS`] entry leaves it out.
    Excluded(&'static str),
}

impl fmt::Display for Pruned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pruned::Invalid(e) => write!(f, "{e}"),
            Pruned::Excluded(reason) => f.write_str(reason),
        }
    }
}

impl SearchSpace {
    /// The table [`RULES`] assigns to `spec` on `arch` (by its tile width: see the module doc).
    pub fn for_spec(spec: &Spec, arch: Arch) -> &'static SearchSpace {
        RULES
            .iter()
            .find(|r| {
                r.pass.iter().all(|&p| p == spec.pass)
                    && r.tile_head_dims.iter().all(|tiles| tiles.contains(&spec.tile_head_dim()))
                    && r.arch.iter().all(|&a| a == arch)
            })
            .map(|r| r.space)
            .unwrap_or(&DEFAULT_SPACE)
    }

    /// Every schedule of the cross product, in table order.
    pub fn schedules(&self) -> impl Iterator<Item = Schedule> + '_ {
        self.tiles.iter().flat_map(move |tile| {
            self.block_n.iter().flat_map(move |&block_n| {
                self.stages.iter().flat_map(move |&stages| {
                    self.softplus.iter().flat_map(move |&softplus| {
                        self.cumsum.iter().flat_map(move |&cumsum| {
                            self.mma.iter().flat_map(move |&mma| {
                                self.loads.iter().flat_map(move |&loads| {
                                    self.pingpong.iter().map(move |&pingpong| Schedule {
                                        block_m: tile.block_m,
                                        block_n,
                                        warps: tile.warps,
                                        stages,
                                        cumsum,
                                        softplus,
                                        mma,
                                        loads,
                                        pingpong,
                                    })
                                })
                            })
                        })
                    })
                })
            })
        })
    }

    /// Number of candidates (valid or not).
    pub fn len(&self) -> usize {
        self.tiles.len()
            * self.block_n.len()
            * self.stages.len()
            * self.softplus.len()
            * self.cumsum.len()
            * self.mma.len()
            * self.loads.len()
            * self.pingpong.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The verdict on one candidate.
pub fn check(kernel: &Kernel) -> Result<(), Pruned> {
    kernel.validate().map_err(Pruned::Invalid)?;
    match EXCLUSIONS.iter().find(|e| (e.applies)(kernel)) {
        Some(e) => Err(Pruned::Excluded(e.reason)),
        None => Ok(()),
    }
}

/// Every candidate kernel for `spec` on `arch`, with its verdict, in table order.
pub fn variants(spec: Spec, arch: Arch) -> impl Iterator<Item = (Kernel, Result<(), Pruned>)> {
    SearchSpace::for_spec(&spec, arch).schedules().map(move |schedule| {
        let kernel = Kernel::new(spec, schedule, arch);
        let verdict = check(&kernel);
        (kernel, verdict)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dtype, Layout, Remainder};
    use sbgen_runtime::spec::{HEAD_DIM_RANGE, NATIVE_HEAD_DIMS};
    use std::collections::HashSet;

    const PASSES: [Pass; 2] = [Pass::Forward, Pass::Backward];

    /// Every candidate's schedule and verdict, without the kernel (whose name carries the spec).
    fn verdicts(spec: Spec, arch: Arch) -> Vec<(Schedule, Result<(), Pruned>)> {
        variants(spec, arch).map(|(k, v)| (k.schedule, v)).collect()
    }

    fn accepted(spec: Spec, arch: Arch) -> Vec<Schedule> {
        variants(spec, arch).filter(|(_, v)| v.is_ok()).map(|(k, _)| k.schedule).collect()
    }

    #[test]
    fn forward_d64_keeps_the_16_schedules_of_its_narrow_table_and_their_wgmma_and_tma_twins_on_sm90() {
        for arch in Arch::ALL {
            let all = accepted(Spec::new(64, Dtype::Bf16, Pass::Forward), arch);
            // The scan on tensor cores: the wgmma forward's log-space walk on 64-key blocks and 2 stages,
            // each with its shuffle twin kept.
            let (tensor_core, kept): (Vec<Schedule>, Vec<Schedule>) =
                all.iter().partition(|s| s.cumsum == Cumsum::TensorCore);
            for s in &tensor_core {
                assert!(
                    s.mma == MmaFamily::Wgmma && s.softplus == Softplus::Mufu && s.block_n == 64 && s.stages == 2,
                    "{s}"
                );
                assert!(kept.contains(&Schedule { cumsum: Cumsum::Shuffle, ..*s }), "{s}");
            }
            assert_eq!(tensor_core.len(), if arch == Arch::Sm90 { 2 * 3 } else { 0 }, "{arch}: {tensor_core:?}");
            let sync: Vec<_> = kept.iter().filter(|s| s.mma == MmaFamily::MmaSync).collect();
            assert_eq!(sync.len(), 16, "{arch}: {kept:?}");
            for s in &kept {
                assert_eq!(s.block_m, 16 * s.warps);
                assert!(s.block_n <= 64);
                assert_eq!(s.cumsum, Cumsum::Shuffle);
                if s.mma == MmaFamily::Wgmma {
                    assert_eq!(arch, Arch::Sm90);
                    let twin = Schedule { mma: MmaFamily::MmaSync, loads: Loads::CpAsync, pingpong: false, ..*s };
                    assert!(sync.contains(&&twin));
                }
                if s.loads.is_tma() {
                    assert_eq!(s.mma, MmaFamily::Wgmma);
                    assert!(kept.contains(&Schedule { loads: Loads::CpAsync, pingpong: false, ..*s }));
                }
                assert!(!s.pingpong, "ping-pong is excluded: {s}");
            }
            // On sm_90a each mma.sync schedule has a wgmma twin with cp.async, with TMA and with a
            // producer warpgroup.
            assert_eq!(kept.len(), if arch == Arch::Sm90 { 16 * 4 } else { 16 }, "{arch}");
        }
    }

    #[test]
    fn the_wgmma_backward_has_a_tma_twin_for_each_candidate_and_a_producer_one_where_it_fits() {
        for head_dim in [64, 128, 256] {
            let kept = accepted(Spec::new(head_dim, Dtype::Bf16, Pass::Backward), Arch::Sm90);
            let cp: Vec<_> = kept.iter().filter(|s| s.mma == MmaFamily::Wgmma && s.loads == Loads::CpAsync).collect();
            assert!(!cp.is_empty(), "d{head_dim}");
            for s in &cp {
                assert!(kept.contains(&Schedule { loads: Loads::Tma, ..**s }), "d{head_dim}: {s}");
            }
            let tma = kept.iter().filter(|s| s.loads == Loads::Tma).count();
            assert_eq!(tma, cp.len(), "d{head_dim}");
            // Up to 128 wide, a producer twin where it does not spill (not on 32-key blocks with the
            // linear stick).
            for s in cp.iter().filter(|_| head_dim <= 128) {
                let ws = Schedule { loads: Loads::Producer, ..**s };
                let fits = !(s.block_n == 32 && s.softplus == Softplus::Linear);
                assert_eq!(kept.contains(&ws), fits, "d{head_dim}: {ws}");
            }
        }
    }

    #[test]
    fn each_head_dim_and_dtype_keeps_at_least_16_variants_on_sm90() {
        // 16, not the 24 of before: since the sequence views (GQA, THD) the 128-wide forward on 4 warps
        // fits 32-key blocks only.
        for head_dim in [64, 128] {
            for dtype in Dtype::ALL {
                let kept: usize = [Pass::Forward, Pass::Backward]
                    .into_iter()
                    .map(|pass| accepted(Spec::new(head_dim, dtype, pass), Arch::Sm90).len())
                    .sum();
                assert!(kept >= 16, "d{head_dim} {dtype}: {kept}");
            }
        }
    }

    #[test]
    fn the_128_wide_forward_with_64_key_blocks_is_searched_on_both_arches() {
        // It reads its Q fragments from shared memory (lower.rs), which keeps it from spilling.
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let wide_keys = Schedule { stages: 3, ..Schedule::DEFAULT };
        for arch in Arch::ALL {
            let found = variants(spec, arch).find(|(k, _)| k.schedule == wide_keys).map(|(_, v)| v.is_ok());
            assert_eq!(found, Some(true), "{arch}");
        }
        // The default schedule for the spec is in the searched set.
        assert!(accepted(spec, Arch::Sm90).contains(&Schedule::default_for(&spec)));
    }

    #[test]
    fn candidates_are_distinct_and_counted() {
        let spec = Spec::new(128, Dtype::F16, Pass::Backward);
        let all: Vec<_> = variants(spec, Arch::Sm90).collect();
        assert_eq!(all.len(), SearchSpace::for_spec(&spec, Arch::Sm90).len());
        let names: HashSet<String> = all.iter().map(|(k, _)| k.name()).collect();
        assert_eq!(names.len(), all.len(), "schedule hashes collide");
    }

    #[test]
    fn every_pruned_variant_has_a_reason_naming_what_is_wrong() {
        for &head_dim in NATIVE_HEAD_DIMS {
            for pass in PASSES {
                for arch in Arch::ALL {
                    let all: Vec<_> = variants(Spec::new(head_dim, Dtype::Bf16, pass), arch).collect();
                    for (kernel, verdict) in &all {
                        let Err(reason) = verdict else { continue };
                        let text = reason.to_string();
                        let s = &kernel.schedule;
                        if s.cumsum == Cumsum::TensorCore {
                            // The scan's own refusal, or what prunes its shuffle twin too.
                            let twin = Schedule { cumsum: Cumsum::Shuffle, ..*s };
                            let twin_pruned = all.iter().any(|(k, v)| k.schedule == twin && v.is_err());
                            assert!(text.contains("`cumsum`") || twin_pruned, "{kernel:?}: {text}");
                        } else if s.pingpong {
                            // Ping-pong needs a producer on two warpgroups (what else is wrong may come first), and
                            // the search leaves it out.
                            let named = [
                                "`pingpong`",
                                "ping-pong is left",
                                "`loads`",
                                "`mma`",
                                "shared memory",
                                "spills",
                                "32 rows per warp",
                            ];
                            assert!(named.iter().any(|n| text.contains(n)), "{kernel:?}: {text}");
                        } else if s.loads.is_tma()
                            && !(s.mma == MmaFamily::Wgmma && matches!(pass, Pass::Forward | Pass::Backward))
                        {
                            // TMA is the wgmma forward's and backward's; a kernel that cannot take wgmma
                            // says so first.
                            assert!(text.contains("`loads`") || text.contains("`mma`"), "{kernel:?}: {text}");
                        } else if s.mma == MmaFamily::Wgmma {
                            let named = ["`mma`", "shared memory", "spills", "32 rows per warp"];
                            assert!(named.iter().any(|n| text.contains(n)), "{text}");
                        } else if s.rows_per_warp() == 32 {
                            // Validation (shared memory) runs before the exclusions.
                            assert!(text.contains("32 rows per warp") || text.contains("shared memory"), "{text}");
                        } else {
                            let named = ["shared memory", "spills", "`block_n`"];
                            assert!(named.iter().any(|n| text.contains(n)), "{kernel:?}: {text}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_head_dim_searches_the_space_of_its_tile() {
        for head_dim in HEAD_DIM_RANGE {
            for pass in PASSES {
                for arch in Arch::ALL {
                    let spec = Spec::new(head_dim, Dtype::F16, pass);
                    let tile = Spec::new(spec.tile_head_dim(), Dtype::F16, pass);
                    assert!(std::ptr::eq(SearchSpace::for_spec(&spec, arch), SearchSpace::for_spec(&tile, arch)));
                    let kept = accepted(spec, arch);
                    assert!(!kept.is_empty(), "head_dim {head_dim} {pass:?} {arch}: nothing to tune");
                    // wgmma takes whole 64-column panels: other head dims refuse it (`mma`), their
                    // tile's class may not.
                    let (mut got, mut want) = (verdicts(spec, arch), verdicts(tile, arch));
                    if head_dim % 64 != 0 {
                        for (s, v) in got.iter().filter(|(s, _)| s.mma == MmaFamily::Wgmma) {
                            let text = v.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                            assert!(text.contains("`mma`") || text.contains("`cumsum`"), "{head_dim} {s:?}: {text}");
                        }
                        got.retain(|(s, _)| s.mma == MmaFamily::MmaSync);
                        want.retain(|(s, _)| s.mma == MmaFamily::MmaSync);
                    }
                    assert_eq!(got, want, "head_dim {head_dim} {pass:?} {arch}");
                }
            }
        }
    }

    /// Each spec's untuned schedule is one of the candidates the tuner may choose, so a tuned
    /// winner is never worse than it by construction.
    #[test]
    fn every_default_schedule_is_in_the_searched_set() {
        for head_dim in HEAD_DIM_RANGE {
            for pass in PASSES {
                for arch in Arch::ALL {
                    for layout in [Layout::Bhnd, Layout::Bnhd, Layout::Thd] {
                        for remainder in [Remainder::Return, Remainder::Fuse] {
                            let spec = Spec { layout, remainder, ..Spec::new(head_dim, Dtype::Bf16, pass) };
                            let default = Schedule::default_on(&spec, arch);
                            assert!(
                                accepted(spec, arch).contains(&default),
                                "{} on {arch}: default {default} is pruned: {:?}",
                                spec.slug(),
                                variants(spec, arch).find(|(k, _)| k.schedule == default).map(|(_, v)| v)
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn deterministic_and_thd_specs_search_what_their_dense_twin_searches() {
        for &head_dim in NATIVE_HEAD_DIMS {
            for arch in Arch::ALL {
                let twin = Spec::new(head_dim, Dtype::Bf16, Pass::Backward);
                let deterministic = Spec { deterministic: true, ..twin };
                let thd = Spec { layout: Layout::Thd, ..twin };
                let both = Spec { layout: Layout::Thd, ..deterministic };
                for spec in [deterministic, thd, both] {
                    assert_eq!(verdicts(spec, arch), verdicts(twin, arch), "{}", spec.slug());
                }
                let fwd = Spec::new(head_dim, Dtype::Bf16, Pass::Forward);
                assert_eq!(verdicts(Spec { layout: Layout::Thd, ..fwd }, arch), verdicts(fwd, arch));
            }
        }
    }

    #[test]
    fn tiles_wider_than_128_keep_16_rows_per_warp_and_32_key_blocks_only() {
        for head_dim in [129, 160, 192, 200, 224, 256] {
            for pass in PASSES {
                for arch in Arch::ALL {
                    let spec = Spec::new(head_dim, Dtype::Bf16, pass);
                    for (kernel, verdict) in variants(spec, arch) {
                        let s = kernel.schedule;
                        match verdict {
                            Ok(()) => assert_eq!((s.rows_per_warp(), s.block_n), (16, 32), "{}", kernel.name()),
                            // Larger key blocks that would fit in shared memory are pruned as spilling.
                            Err(Pruned::Excluded(reason)) if s.block_n > 32 && s.rows_per_warp() == 16 => {
                                assert!(reason.starts_with("spills registers"), "{reason}")
                            }
                            Err(_) => {}
                        }
                    }
                }
            }
        }
        // What was measured not to spill at 256 is searched: 64 x 32, and 128 x 32 on 8 warps on sm_90.
        for pass in PASSES {
            let kept = accepted(Spec::new(256, Dtype::Bf16, pass), Arch::Sm90);
            for (block_m, warps) in [(64, 4), (128, 8)] {
                assert!(kept.iter().any(|s| (s.block_m, s.warps, s.block_n) == (block_m, warps, 32)), "{pass:?}");
            }
        }
    }

    #[test]
    fn both_passes_keep_8_warp_schedules_whose_dkdv_tile_splits_unevenly() {
        // 8 warps, 32-key blocks at tile 96: 2 x 6 = 12 dK/dV pieces for 8 warps; the backward's
        // last warps take fewer (templates/sb_walk.cuh, key_grads).
        let eight = Schedule { block_m: 128, warps: 8, block_n: 32, ..Schedule::DEFAULT };
        for pass in PASSES {
            assert!(accepted(Spec::new(80, Dtype::Bf16, pass), Arch::Sm90).contains(&eight), "{pass:?}");
        }
    }

    #[test]
    fn the_wide_tile_exclusion_never_applies_at_64_and_128() {
        for head_dim in [64, 128] {
            for pass in PASSES {
                for arch in Arch::ALL {
                    for (_, verdict) in variants(Spec::new(head_dim, Dtype::Bf16, pass), arch) {
                        if let Err(reason) = verdict {
                            let text = reason.to_string();
                            assert!(!text.contains("wider than 128"), "{text}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn wgmma_on_sm80_says_it_needs_sm90a() {
        let spec = Spec::new(64, Dtype::Bf16, Pass::Forward);
        let (_, verdict) = variants(spec, Arch::Sm80)
            .find(|(k, _)| k.schedule.mma == MmaFamily::Wgmma && k.schedule.cumsum == Cumsum::Shuffle)
            .unwrap();
        assert!(verdict.unwrap_err().to_string().contains("needs sm_90a"));
    }

    #[test]
    fn large_backward_tiles_are_pruned_for_shared_memory_on_sm80() {
        // 128 x 128 tiles with 3 stages need 320 KiB for the backward at D = 128.
        let kept = accepted(Spec::new(128, Dtype::Bf16, Pass::Backward), Arch::Sm80);
        assert!(!kept.is_empty());
        assert!(kept.len() < 24);
        assert!(!kept.iter().any(|s| s.block_m == 128 && s.block_n == 128 && s.stages == 3));
    }

    #[test]
    fn the_decode_searches_its_own_table_with_its_default_for_every_cache() {
        for arch in Arch::ALL {
            for head_dim in [32, 64, 80, 128, 160, 256] {
                for layout in [Layout::Bhnd, Layout::Bnhd, Layout::Paged] {
                    let spec = Spec { layout, ..Spec::new(head_dim, Dtype::Bf16, Pass::Decode) };
                    let kept = accepted(spec, arch);
                    assert!(kept.contains(&Schedule::default_on(&spec, arch)), "{} on {arch}", spec.slug());
                    assert!(kept.iter().all(|s| s.mma == MmaFamily::MmaSync && s.block_m == 16), "{kept:?}");
                    // Paged caches search the same key blocks (a block spanning pages is gathered
                    // page run by page run).
                    if head_dim <= 64 {
                        assert!(kept.iter().any(|s| s.block_n == 64), "{} on {arch}: {kept:?}", spec.slug());
                    }
                }
            }
        }
    }
}
