//! `Kernel { spec, schedule, arch }` and its validation: every check that must pass before lowering,
//! each failure naming the field and what is allowed.

use super::arch::Arch;
use super::schedule::{Cumsum, Loads, MmaFamily, Schedule, Softplus};
use sbgen_runtime::spec::{Pass, Spec, SpecError};
use serde::{Deserialize, Serialize};

/// One kernel: what it computes, how, and for which GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Kernel {
    pub spec: Spec,
    pub schedule: Schedule,
    pub arch: Arch,
}

/// Why a kernel cannot be lowered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IrError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("`{field}` = {got} is not allowed: {allowed}")]
    Field { field: &'static str, got: u32, allowed: &'static str },
    #[error("`{field}` = {value} is not supported: {reason}")]
    Unsupported { field: &'static str, value: String, reason: &'static str },
    #[error(
        "shared memory: the schedule needs {needed} bytes per block, over the {limit}-byte limit of {arch} \
         (lower `stages`, `block_n` or `block_m`)"
    )]
    SharedMemory { needed: u32, limit: u32, arch: Arch },
}

/// Byte offsets of the shared-memory buffers of a kernel. Rendered into the template as constants,
/// and summed for the launch rule, so the two cannot disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SmemLayout {
    /// Q tile (block_m x head_dim); reused to stage the output tile for coalesced stores.
    pub q: u32,
    /// dO tile (block_m x head_dim), backward only.
    pub d_o: u32,
    /// `stages` K tiles (block_n x head_dim), one after another.
    pub k: u32,
    /// `stages` V tiles.
    pub v: u32,
    /// Attention weights, block_m x block_n, backward only (the A of dV = A^T dO).
    pub p: u32,
    /// Score gradients, block_m x block_n, backward only (the dZ of dK = dZ^T Q).
    pub dz: u32,
    /// The scan's triangle of ones (block_n x block_n elements, [`Cumsum::TensorCore`]); zero bytes
    /// (at `mbar`) otherwise.
    pub ones: u32,
    /// `stages` mbarriers (8 bytes each) of the TMA loads ([`Loads::Tma`]); with a producer
    /// warpgroup ([`Loads::Producer`]) `stages` "full" then `stages` "free" mbarriers and an 8-byte
    /// stop flag; `total` otherwise (none).
    pub mbar: u32,
    pub total: u32,
}

impl Kernel {
    pub fn new(spec: Spec, schedule: Schedule, arch: Arch) -> Self {
        Kernel { spec, schedule, arch }
    }

    /// Checks everything the templates rely on. Lowering calls this first.
    pub fn validate(&self) -> Result<(), IrError> {
        self.spec.validate()?;
        if self.spec.pass == Pass::Decode {
            self.validate_decode_tiles()?;
        } else {
            self.validate_walk_tiles()?;
        }
        let s = &self.schedule;
        if !(2..=4).contains(&s.stages) {
            return Err(IrError::Field { field: "stages", got: s.stages, allowed: "2 to 4" });
        }
        if s.cumsum == Cumsum::TensorCore {
            if let Some(reason) = self.tensor_core_cumsum_refusal() {
                return Err(IrError::Unsupported { field: "cumsum", value: "tensor_core".into(), reason });
            }
        }
        if s.softplus == Softplus::Linear && !matches!(self.spec.pass, Pass::Forward | Pass::Backward) {
            return Err(IrError::Unsupported {
                field: "softplus",
                value: "linear".into(),
                reason: "the stick in linear space is checked on the GPU for the forward and the backward only \
                         so far (not the decode or the segment passes): mufu, poly or half there",
            });
        }
        if s.mma == MmaFamily::Wgmma {
            if let Some(reason) = self.wgmma_refusal() {
                return Err(IrError::Unsupported { field: "mma", value: "wgmma".into(), reason });
            }
        }
        if let Some(reason) = self.tma_refusal() {
            return Err(IrError::Unsupported {
                field: "loads",
                value: if s.loads == Loads::Tma { "tma" } else { "producer" }.into(),
                reason,
            });
        }
        if s.pingpong
            && !(s.loads == Loads::Producer && s.warps == 8 && s.stages >= 3 && self.spec.pass == Pass::Forward)
        {
            return Err(IrError::Unsupported {
                field: "pingpong",
                value: "true".into(),
                reason: "ping-pong orders the products of two computing warpgroups fed by a producer in the \
                         forward: loads = producer, 8 warps (block_m = 128) and 3 or more stages (each step \
                         issues both of its products before its stick math)",
            });
        }
        let layout = self.smem_layout();
        let limit = self.arch.max_smem_per_block();
        if layout.total > limit {
            return Err(IrError::SharedMemory { needed: layout.total, limit, arch: self.arch });
        }
        Ok(())
    }

    /// Why the K/V loads of this schedule cannot lower, if they cannot: the templates copy K and V by
    /// TMA, issued by a computing thread or by a producer warpgroup, in the wgmma forward and backward.
    fn tma_refusal(&self) -> Option<&'static str> {
        let s = &self.schedule;
        match (s.loads, self.spec.pass) {
            (Loads::CpAsync, _) => None,
            _ if s.mma != MmaFamily::Wgmma => Some("TMA loads are built for the wgmma kernels only (mma = wgmma)"),
            (_, Pass::Forward | Pass::Backward) => None,
            _ => Some(
                "the templates load K and V by TMA in the wgmma forward and backward only so far (not the \
                 segment passes or the decode)",
            ),
        }
    }

    /// Why `mma = wgmma` cannot lower for this kernel, if it cannot: the templates run the
    /// forward's Q K^T and P V and the backward's Q K^T, dO V^T, dZ K (and dK, dV where the tiles
    /// allow, see `lower.rs`) on wgmma (one warpgroup per
    /// 64 query rows, the tiles in 128-byte-swizzled panels of 64 columns; docs/performance.md#wgmma).
    // `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
    #[allow(clippy::manual_is_multiple_of)]
    fn wgmma_refusal(&self) -> Option<&'static str> {
        let s = &self.schedule;
        if self.arch != Arch::Sm90 {
            return Some("wgmma needs sm_90a");
        }
        if !matches!(self.spec.pass, Pass::Forward | Pass::Segment | Pass::Backward) {
            return Some("the templates have wgmma for the forward, its segment pass and the backward only so far (not the decode or the segment backward)");
        }
        if self.spec.head_dim % 64 != 0 || s.compute_threads() % (self.spec.head_dim / 8) != 0 {
            return Some(
                "wgmma's K tile is in panels of 64 columns, each row copied by whole groups of threads: \
                 head_dim 64, 128 or 256",
            );
        }
        if s.rows_per_warp() != 16 {
            return Some("a warpgroup of 4 warps takes 64 rows: 16 rows per warp (block_m = 16 * warps)");
        }
        None
    }

    /// Why the in-block scan cannot run on the tensor cores here, if it cannot: the templates have it
    /// in the wgmma forward's log-space walk, as one more wgmma per block with a constant 64 x 64
    /// triangle of ones in shared memory (docs/performance.md#the-scan-on-tensor-cores).
    fn tensor_core_cumsum_refusal(&self) -> Option<&'static str> {
        let s = &self.schedule;
        if s.mma != MmaFamily::Wgmma || self.spec.pass != Pass::Forward {
            return Some(
                "the templates have the scan on tensor cores in the wgmma forward only (mma = wgmma, pass = forward)",
            );
        }
        if s.softplus == Softplus::Linear {
            return Some(
                "the linear stick multiplies (1 - beta) inside a run of keys: there is no sum of logs to scan",
            );
        }
        if s.block_n != 64 {
            return Some("the triangle of ones is one 64 x 64 wgmma operand (128-byte rows): block_n = 64");
        }
        if s.stages != 2 {
            return Some(
                "with 3 or more stages the next block's products are in flight under the stick math, and waiting \
                 for the scan's product would wait for them too: stages = 2",
            );
        }
        None
    }

    /// The forward's and backward's tiles: `block_m` query rows on `warps` warps, `block_n` keys per
    /// step of the walk.
    // `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
    #[allow(clippy::manual_is_multiple_of)]
    fn validate_walk_tiles(&self) -> Result<(), IrError> {
        let s = &self.schedule;
        if !matches!(s.warps, 4 | 8) {
            return Err(IrError::Field { field: "warps", got: s.warps, allowed: "4 or 8" });
        }
        if s.block_m % s.warps != 0 || !matches!(s.block_m / s.warps, 16 | 32) {
            return Err(IrError::Field {
                field: "block_m",
                got: s.block_m,
                allowed: "16 or 32 rows per warp (block_m = 16 * warps or 32 * warps)",
            });
        }
        if !matches!(s.block_n, 32 | 64 | 128) {
            return Err(IrError::Field { field: "block_n", got: s.block_n, allowed: "32, 64 or 128" });
        }
        Ok(())
    }

    /// The decode's tiles: every warp of a CTA walks its own chunks of keys for the same `block_m`
    /// query heads (one or two m-tiles of a K/V head's group), `block_n` keys per step.
    fn validate_decode_tiles(&self) -> Result<(), IrError> {
        let s = &self.schedule;
        if !matches!(s.warps, 1 | 2 | 4 | 8) {
            return Err(IrError::Field { field: "warps", got: s.warps, allowed: "1, 2, 4 or 8 (decode)" });
        }
        if !matches!(s.block_m, 16 | 32) {
            return Err(IrError::Field {
                field: "block_m",
                got: s.block_m,
                allowed: "16 or 32 query heads of a group per tile (decode)",
            });
        }
        if !matches!(s.block_n, 16 | 32 | 64) {
            return Err(IrError::Field { field: "block_n", got: s.block_n, allowed: "16, 32 or 64 (decode)" });
        }
        Ok(())
    }

    pub fn smem_layout(&self) -> SmemLayout {
        let s = &self.schedule;
        let elem = self.spec.dtype.size_bytes() as u32;
        let d = self.spec.tile_head_dim();
        if self.spec.pass == Pass::Decode {
            // One Q tile of the CTA's query heads, then each warp's K and V stages (k and v are the
            // first warp's; the template offsets the others).
            let q_tile = s.block_m * d * elem;
            let per_warp = 2 * s.stages * s.block_n * d * elem;
            let total = q_tile + s.warps * per_warp;
            let k = q_tile;
            let v = k + s.stages * s.block_n * d * elem;
            return SmemLayout { q: 0, d_o: 0, k, v, p: total, dz: total, ones: total, mbar: total, total };
        }
        let q_tile = s.block_m * d * elem;
        let kv_tile = s.block_n * d * elem;
        // The segment backward stages the same tiles as the backward.
        let backward = matches!(self.spec.pass, Pass::Backward | Pass::SegmentBackward);
        let q = 0;
        let d_o = q + q_tile;
        let k = d_o + if backward { q_tile } else { 0 };
        let v = k + s.stages * kv_tile;
        let p = v + s.stages * kv_tile;
        let pm_tile = if backward { s.block_m * s.block_n * elem } else { 0 };
        let dz = p + pm_tile;
        let ones = dz + pm_tile;
        let mbar = ones + if s.cumsum == Cumsum::TensorCore { s.block_n * s.block_n * elem } else { 0 };
        let barriers = match s.loads {
            Loads::CpAsync => 0,
            Loads::Tma => 8 * s.stages,
            Loads::Producer => 16 * s.stages + 8,
        };
        let total = mbar + barriers;
        SmemLayout { q, d_o, k, v, p, dz, ones, mbar, total }
    }

    /// The kernel's name: `sb_` + spec slug + schedule hash.
    pub fn name(&self) -> String {
        format!("sb_{}_{}", self.spec.slug(), self.schedule.short_hash())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Cumsum, Dtype, Loads, MmaFamily, Softplus};

    fn kernel(pass: Pass, schedule: Schedule) -> Kernel {
        Kernel::new(Spec::new(128, Dtype::Bf16, pass), schedule, Arch::Sm90)
    }

    fn error(k: Kernel) -> String {
        k.validate().expect_err("the kernel should be invalid").to_string()
    }

    #[test]
    fn default_schedules_validate_for_every_pass_head_dim_and_arch() {
        for pass in [Pass::Forward, Pass::Backward, Pass::Decode, Pass::Segment, Pass::SegmentBackward] {
            for head_dim in [1, 16, 32, 50, 64, 80, 96, 128, 160, 200, 256] {
                for arch in Arch::ALL {
                    let spec = Spec::new(head_dim, Dtype::F16, pass);
                    let k = Kernel::new(spec, Schedule::default_on(&spec, arch), arch);
                    assert_eq!(k.validate(), Ok(()), "{k:?}");
                }
            }
        }
    }

    #[test]
    fn each_bad_field_is_named_with_what_is_allowed() {
        let d = Schedule::DEFAULT;
        let cases = [
            (Schedule { warps: 6, ..d }, "`warps` = 6 is not allowed: 4 or 8"),
            (Schedule { block_m: 48, ..d }, "`block_m` = 48 is not allowed: 16 or 32 rows per warp"),
            (Schedule { block_n: 48, ..d }, "`block_n` = 48 is not allowed: 32, 64 or 128"),
            (Schedule { stages: 5, ..d }, "`stages` = 5 is not allowed: 2 to 4"),
            (Schedule { stages: 1, ..d }, "`stages` = 1 is not allowed: 2 to 4"),
            (
                Schedule { cumsum: Cumsum::TensorCore, ..d },
                "`cumsum` = tensor_core is not supported: the templates have the scan on tensor cores in the wgmma forward only",
            ),
            (
                Schedule { mma: MmaFamily::Wgmma, block_m: 128, ..d },
                "`mma` = wgmma is not supported: a warpgroup of 4 warps takes 64 rows",
            ),
        ];
        for (schedule, expected) in cases {
            let text = error(kernel(Pass::Forward, schedule));
            assert!(text.starts_with(expected), "{text}");
        }
        let wgmma80 =
            Kernel::new(Spec::new(64, Dtype::Bf16, Pass::Forward), Schedule { mma: MmaFamily::Wgmma, ..d }, Arch::Sm80);
        assert!(error(wgmma80).contains("wgmma needs sm_90a"));
        for (head_dim, pass) in [
            (96, Pass::Forward),
            (96, Pass::Backward),
            (64, Pass::Decode),
            (64, Pass::SegmentBackward),
            (96, Pass::Segment),
        ] {
            let wgmma =
                Schedule { mma: MmaFamily::Wgmma, ..Schedule::default_for(&Spec::new(head_dim, Dtype::Bf16, pass)) };
            let k = Kernel::new(Spec::new(head_dim, Dtype::Bf16, pass), wgmma, Arch::Sm90);
            assert!(error(k).starts_with("`mma` = wgmma is not supported"), "{head_dim} {pass:?}");
        }
        let spec_error = Kernel::new(Spec::new(300, Dtype::Bf16, Pass::Forward), d, Arch::Sm90);
        assert!(matches!(spec_error.validate(), Err(IrError::Spec(SpecError::HeadDim { got: 300, .. }))));
    }

    #[test]
    fn shared_memory_over_the_arch_limit_names_both_numbers() {
        let big = Schedule { block_m: 128, block_n: 128, warps: 8, stages: 4, ..Schedule::DEFAULT };
        let k = Kernel::new(Spec::new(128, Dtype::Bf16, Pass::Backward), big, Arch::Sm80);
        // Q and dO (2 x 32 KiB) + 4 stages of K and V (8 x 32 KiB) + P and dZ (2 x 32 KiB).
        assert_eq!(k.smem_layout().total, 384 * 1024);
        match k.validate() {
            Err(IrError::SharedMemory { needed, limit, arch }) => {
                assert_eq!((needed, limit, arch), (384 * 1024, 163 * 1024, Arch::Sm80));
            }
            other => panic!("{other:?}"),
        }
        assert!(error(k).contains("393216 bytes per block, over the 166912-byte limit of sm_80"));
    }

    #[test]
    fn segment_passes_stage_and_schedule_as_their_base_passes() {
        for (segment, base) in [(Pass::Segment, Pass::Forward), (Pass::SegmentBackward, Pass::Backward)] {
            for head_dim in [64, 128, 256] {
                let (s, b) = (Spec::new(head_dim, Dtype::Bf16, segment), Spec::new(head_dim, Dtype::Bf16, base));
                assert_eq!(Schedule::default_for(&s), Schedule::default_for(&b));
                let schedule = Schedule::default_for(&b);
                assert_eq!(
                    Kernel::new(s, schedule, Arch::Sm90).smem_layout(),
                    Kernel::new(b, schedule, Arch::Sm90).smem_layout(),
                    "{segment:?} at head_dim {head_dim}"
                );
                // On sm_90a the segment walk takes the forward's wgmma tiles, so the ring's pieces run
                // as fast as the single-GPU forward; the segment backward has no wgmma variant yet and
                // keeps the backward's mma.sync tiles while the backward takes wgmma.
                for arch in Arch::ALL {
                    let schedule = Schedule::default_on(&s, arch);
                    assert!(Kernel::new(s, schedule, arch).validate().is_ok(), "{segment:?} {head_dim} on {arch}");
                    let wgmma = arch == Arch::Sm90 && segment == Pass::Segment;
                    assert_eq!(schedule.mma == MmaFamily::Wgmma, wgmma, "{segment:?} {head_dim} on {arch}");
                    if wgmma {
                        // The forward's key blocks, and its rows where the forward has no producer
                        // warpgroup (at 128 wide it takes 128 rows on two computing warpgroups, which
                        // the segment walk has not); the segment walk keeps the MUFU stick math (the
                        // linear stick is not checked there yet) and its two stages.
                        let f = Schedule::default_on(&b, arch);
                        assert_eq!(schedule.block_n, f.block_n, "{segment:?} {head_dim} on {arch}");
                        if f.loads != Loads::Producer {
                            assert_eq!(
                                (schedule.block_m, schedule.warps),
                                (f.block_m, f.warps),
                                "{segment:?} {head_dim} on {arch}"
                            );
                        }
                        assert_eq!(schedule.softplus, Softplus::Mufu, "{segment:?} {head_dim} on {arch}");
                    } else if arch != Arch::Sm90 {
                        assert_eq!(schedule, Schedule::default_on(&b, arch), "{segment:?} {head_dim} on {arch}");
                    } else {
                        assert_eq!(schedule, Schedule::default_for(&b), "{segment:?} {head_dim} on {arch}");
                        assert_eq!(Schedule::default_on(&b, arch).mma, MmaFamily::Wgmma, "{head_dim}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_linear_stick_lowers_for_the_forward_and_backward_only() {
        let linear = Schedule { softplus: Softplus::Linear, ..Schedule::DEFAULT };
        for pass in [Pass::Forward, Pass::Backward] {
            assert_eq!(
                Kernel::new(Spec::new(128, Dtype::Bf16, pass), linear, Arch::Sm80).validate(),
                Ok(()),
                "{pass:?}"
            );
        }
        let decode = Schedule { block_m: 16, block_n: 16, ..linear };
        for (pass, schedule) in [(Pass::Decode, decode), (Pass::Segment, linear), (Pass::SegmentBackward, linear)] {
            let err = Kernel::new(Spec::new(128, Dtype::Bf16, pass), schedule, Arch::Sm90).validate().unwrap_err();
            assert!(err.to_string().starts_with("`softplus` = linear is not supported"), "{pass:?}: {err}");
        }
    }

    #[test]
    fn smem_layout_places_buffers_back_to_back() {
        let k = kernel(Pass::Forward, Schedule::DEFAULT);
        let l = k.smem_layout();
        // Q 64x128, then 2 stages each of K and V 64x128, all 2-byte elements; no dO, P or dZ.
        assert_eq!((l.q, l.d_o, l.k, l.v, l.p, l.dz, l.total), (0, 16384, 16384, 49152, 81920, 81920, 81920));
        let b = kernel(Pass::Backward, Schedule { block_n: 32, ..Schedule::DEFAULT }).smem_layout();
        assert_eq!((b.d_o, b.k, b.v, b.p, b.dz, b.total), (16384, 32768, 49152, 65536, 69632, 73728));
    }

    #[test]
    fn kernels_round_trip_through_json() {
        let mut spec = Spec::new(64, Dtype::F16, Pass::Backward);
        spec.early_exit_bits = Some(24);
        let k = Kernel::new(spec, Schedule { softplus: Softplus::Poly, stages: 3, ..Schedule::DEFAULT }, Arch::Sm80);
        let json = serde_json::to_string(&k).unwrap();
        assert!(json.contains("\"dtype\":\"f16\"") && json.contains("\"softplus\":\"poly\""), "{json}");
        assert!(json.contains("\"arch\":\"sm_80\""), "{json}");
        let back: Kernel = serde_json::from_str(&json).unwrap();
        assert_eq!(back, k);
        // An old spec without the optional field still reads.
        let without_ee = json.replace(",\"early_exit_bits\":24", "");
        let old: Kernel = serde_json::from_str(&without_ee).unwrap();
        assert_eq!(old.spec.early_exit_bits, None);
    }

    #[test]
    fn tma_loads_and_the_producer_are_the_wgmma_forwards_and_backwards() {
        let tma = Schedule { mma: MmaFamily::Wgmma, loads: Loads::Tma, ..Schedule::DEFAULT };
        let ws = Schedule { loads: Loads::Producer, ..tma };
        for pass in [Pass::Forward, Pass::Backward] {
            assert_eq!(kernel(pass, tma).validate(), Ok(()));
            assert_eq!(kernel(pass, ws).validate(), Ok(()));
        }
        let cases = [
            (Pass::Forward, Schedule { mma: MmaFamily::MmaSync, ..tma }, "`loads` = tma", "wgmma kernels only"),
            (Pass::Backward, Schedule { mma: MmaFamily::MmaSync, ..ws }, "`loads` = producer", "wgmma kernels only"),
            (Pass::Segment, tma, "`loads` = tma", "forward and backward only"),
            (Pass::Segment, ws, "`loads` = producer", "forward and backward only"),
        ];
        for (pass, schedule, value, reason) in cases {
            let e = error(kernel(pass, schedule));
            assert!(e.contains(value) && e.contains(reason), "{pass:?} {schedule}: {e}");
        }
        assert!(error(Kernel::new(Spec::new(128, Dtype::Bf16, Pass::Forward), tma, Arch::Sm80)).contains("sm_90a"));
    }

    #[test]
    fn ping_pong_needs_a_producer_on_two_warpgroups_and_three_stages() {
        let ws = Schedule {
            block_m: 128,
            warps: 8,
            stages: 3,
            mma: MmaFamily::Wgmma,
            loads: Loads::Producer,
            pingpong: true,
            ..Schedule::DEFAULT
        };
        assert_eq!(kernel(Pass::Forward, ws).validate(), Ok(()));
        assert_eq!(kernel(Pass::Forward, Schedule { pingpong: false, block_m: 64, warps: 4, ..ws }).validate(), Ok(()));
        for bad in [
            Schedule { loads: Loads::Tma, ..ws },
            Schedule { block_m: 64, warps: 4, ..ws },
            Schedule { stages: 2, ..ws },
        ] {
            let e = error(kernel(Pass::Forward, bad));
            assert!(e.contains("`pingpong`") && e.contains("loads = producer"), "{bad}: {e}");
        }
        // The backward takes a producer, not ping-pong.
        assert_eq!(kernel(Pass::Backward, Schedule { pingpong: false, ..ws }).validate(), Ok(()));
        let e = error(kernel(Pass::Backward, ws));
        assert!(e.contains("`pingpong`") && e.contains("in the forward"), "{e}");
        let e = error(kernel(Pass::Segment, Schedule { pingpong: false, ..ws }));
        assert!(e.contains("`loads` = producer"), "{e}");
    }

    #[test]
    fn producer_schedules_add_free_barriers_and_a_stop_flag_and_name_themselves() {
        let tma = kernel(
            Pass::Forward,
            Schedule { mma: MmaFamily::Wgmma, stages: 3, loads: Loads::Tma, ..Schedule::DEFAULT },
        );
        let ws = Kernel { schedule: Schedule { loads: Loads::Producer, ..tma.schedule }, ..tma };
        let (a, b) = (tma.smem_layout(), ws.smem_layout());
        assert_eq!((b.mbar, b.total), (a.mbar, a.mbar + 2 * 24 + 8));
        assert_eq!(ws.schedule.to_string(), "m64n64w4s3-shfl-mufu-wgmma-ws");
        assert_eq!((ws.schedule.threads(), ws.schedule.compute_threads()), (256, 128));
        let pp = Schedule { block_m: 128, warps: 8, pingpong: true, ..ws.schedule };
        assert_eq!(pp.to_string(), "m128n64w8s3-shfl-mufu-wgmma-ws-pp");
        let json = serde_json::to_string(&pp).unwrap();
        assert!(json.contains("\"loads\":\"producer\"") && json.contains("\"pingpong\":true"), "{json}");
        assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), pp);
        assert!(!serde_json::to_string(&ws.schedule).unwrap().contains("pingpong"));
    }

    #[test]
    fn tma_schedules_keep_their_stages_mbarriers_after_the_tiles() {
        let cp = kernel(Pass::Forward, Schedule { mma: MmaFamily::Wgmma, stages: 3, ..Schedule::DEFAULT });
        let tma = Kernel { schedule: Schedule { loads: Loads::Tma, ..cp.schedule }, ..cp };
        let (a, b) = (cp.smem_layout(), tma.smem_layout());
        assert_eq!((a.mbar, a.total), (a.total, 114688));
        assert_eq!((b.k, b.v, b.mbar, b.total), (a.k, a.v, a.total, a.total + 24));
    }

    #[test]
    fn loads_show_in_the_name_only_when_not_cp_async_and_old_json_still_parses() {
        let cp = Schedule { mma: MmaFamily::Wgmma, ..Schedule::DEFAULT };
        let tma = Schedule { loads: Loads::Tma, ..cp };
        assert_eq!(cp.to_string(), "m64n64w4s2-shfl-mufu-wgmma");
        assert_eq!(tma.to_string(), "m64n64w4s2-shfl-mufu-wgmma-tma");
        assert_ne!(cp.short_hash(), tma.short_hash());
        // cp.async is not written, so cache entries written before the field are the same bytes.
        let json = serde_json::to_string(&cp).unwrap();
        assert!(!json.contains("loads"), "{json}");
        assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), cp);
        let json = serde_json::to_string(&tma).unwrap();
        assert!(json.contains("\"loads\":\"tma\""), "{json}");
        assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), tma);
    }

    #[test]
    fn names_carry_the_spec_and_a_schedule_hash() {
        let k = kernel(Pass::Forward, Schedule::DEFAULT);
        let name = k.name();
        assert!(name.starts_with("sb_fwd_d128_bf16_strict_bhnd_ret_full_"), "{name}");
        assert_eq!(name.len(), "sb_fwd_d128_bf16_strict_bhnd_ret_full_".len() + 8);
        let other = kernel(Pass::Forward, Schedule { stages: 3, ..Schedule::DEFAULT }).name();
        assert_ne!(name, other);
    }
}
