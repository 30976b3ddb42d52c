//! Snapshots of the generated CUDA for a canonical set of kernels, each at its default schedule on
//! sm_90: forward and backward, head_dim 64 and 128, bf16 and f16, both masks; plus the spec fields
//! that change the generated code elsewhere: head_dim 256 (the widest tile) and 80 (padded to a tile
//! of 96, docs/math.md#head-dims), the packed THD layout (docs/architecture.md#sequence-views) and
//! the deterministic backward (docs/math.md#deterministic-backward), and the decode against a
//! contiguous and a paged KV cache (docs/math.md#decode), and context parallelism's segment walk
//! (docs/math.md#context-parallelism), forward and backward; and the sm_90a forward on wgmma, the
//! default there (docs/performance.md#wgmma), with and without the overlapped next block (three
//! stages), and the segment walk on wgmma (its default there too); and the sm_90a backward on wgmma,
//! also the default there, at each of its tilings (64 x 64 at head_dim 64, deterministic with the
//! attend-current mask; 128 x 64 on 8 warps at 128; 128 x 32 on 8 warps at 256); and the wgmma
//! forward with K and V loaded by TMA (docs/performance.md#tma) at 64 and 128. Grouped-query attention needs
//! no kernel of its own: `kv_heads` is a launch parameter that every kernel reads. A change to a
//! template or to lowering shows up here as a diff to review (`cargo insta review`), named after the
//! kernel.

use sbgen::ir::{Arch, Dtype, Kernel, Layout, Loads, Mask, Pass, Schedule, Spec};
use sbgen::lower::lower;

fn canonical() -> Vec<Kernel> {
    let mut specs = Vec::new();
    for pass in [Pass::Forward, Pass::Backward] {
        for head_dim in [64, 128] {
            for dtype in [Dtype::Bf16, Dtype::F16] {
                for mask in [Mask::Strict, Mask::AttendCurrent] {
                    specs.push(Spec { mask, ..Spec::new(head_dim, dtype, pass) });
                }
            }
        }
    }
    for pass in [Pass::Forward, Pass::Backward] {
        specs.push(Spec::new(256, Dtype::Bf16, pass));
        specs.push(Spec::new(80, Dtype::F16, pass));
        specs.push(Spec { layout: Layout::Thd, ..Spec::new(128, Dtype::Bf16, pass) });
    }
    specs.push(Spec { deterministic: true, ..Spec::new(128, Dtype::Bf16, Pass::Backward) });
    specs.push(Spec::new(128, Dtype::Bf16, Pass::Decode));
    specs.push(Spec {
        layout: Layout::Paged,
        remainder: sbgen::ir::Remainder::Fuse,
        early_exit_bits: Some(24),
        ..Spec::new(128, Dtype::Bf16, Pass::Decode)
    });
    specs.push(Spec { layout: Layout::Bnhd, ..Spec::new(128, Dtype::Bf16, Pass::Segment) });
    specs.push(Spec {
        remainder: sbgen::ir::Remainder::Fuse,
        early_exit_bits: Some(24),
        ..Spec::new(64, Dtype::F16, Pass::Segment)
    });
    specs.push(Spec {
        layout: Layout::Bnhd,
        remainder: sbgen::ir::Remainder::Fuse,
        ..Spec::new(128, Dtype::Bf16, Pass::SegmentBackward)
    });
    let mut kernels: Vec<Kernel> =
        specs.into_iter().map(|spec| Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm90)).collect();
    let wgmma = Schedule::WGMMA_FORWARD;
    for (spec, schedule) in [
        (Spec::new(128, Dtype::Bf16, Pass::Forward), wgmma),
        (Spec { mask: Mask::AttendCurrent, ..Spec::new(64, Dtype::F16, Pass::Forward) }, wgmma),
        (Spec::new(128, Dtype::Bf16, Pass::Forward), Schedule { block_n: 32, stages: 3, ..wgmma }),
        (Spec { layout: Layout::Bnhd, ..Spec::new(128, Dtype::Bf16, Pass::Segment) }, wgmma),
        // The sm_90a forward's default at 128: the stick in linear space, three stages, a producer
        // warpgroup feeding two computing ones (docs/performance.md#warp-specialisation).
        (
            Spec::new(128, Dtype::Bf16, Pass::Forward),
            Schedule::wgmma_forward(&Spec::new(128, Dtype::Bf16, Pass::Forward)),
        ),
        // K and V by TMA (docs/performance.md#tma): the 2-stage pipeline at 64 (the tuned winner there)
        // and the 3-stage one with the overlapped next block at 128.
        (
            Spec::new(64, Dtype::Bf16, Pass::Forward),
            Schedule { loads: Loads::Tma, ..Schedule::wgmma_forward(&Spec::new(64, Dtype::Bf16, Pass::Forward)) },
        ),
        (
            Spec::new(128, Dtype::Bf16, Pass::Forward),
            Schedule {
                loads: Loads::Tma,
                stages: 3,
                ..Schedule::wgmma_forward(&Spec::new(64, Dtype::Bf16, Pass::Forward))
            },
        ),
        // The early-exit default at 128: one computing warpgroup and a producer, two CTAs per SM.
        (
            Spec { early_exit_bits: Some(24), ..Spec::new(128, Dtype::Bf16, Pass::Forward) },
            Schedule::wgmma_forward(&Spec { early_exit_bits: Some(24), ..Spec::new(128, Dtype::Bf16, Pass::Forward) }),
        ),
        // Warp specialisation (docs/performance.md#warp-specialisation): a producer warpgroup and two
        // computing ones in ping-pong at 128 (early exit, to show the stop flag's use), and one
        // computing warpgroup at 64 on two stages.
        (
            Spec { early_exit_bits: Some(24), ..Spec::new(128, Dtype::Bf16, Pass::Forward) },
            Schedule {
                loads: Loads::Producer,
                block_m: 128,
                warps: 8,
                pingpong: true,
                ..Schedule::wgmma_forward(&Spec::new(128, Dtype::Bf16, Pass::Forward))
            },
        ),
        (
            Spec::new(64, Dtype::Bf16, Pass::Forward),
            Schedule { loads: Loads::Producer, ..Schedule::wgmma_forward(&Spec::new(64, Dtype::Bf16, Pass::Forward)) },
        ),
        // The scan on tensor cores (docs/performance.md#the-scan-on-tensor-cores), with early exit
        // to show the masked block's path too.
        (
            Spec { early_exit_bits: Some(24), ..Spec::new(128, Dtype::Bf16, Pass::Forward) },
            Schedule { cumsum: sbgen::ir::Cumsum::TensorCore, ..wgmma },
        ),
    ] {
        kernels.push(Kernel::new(spec, schedule, Arch::Sm90));
    }
    for spec in [
        Spec { mask: Mask::AttendCurrent, deterministic: true, ..Spec::new(64, Dtype::F16, Pass::Backward) },
        Spec::new(128, Dtype::Bf16, Pass::Backward),
        Spec::new(256, Dtype::Bf16, Pass::Backward),
    ] {
        let schedule = Schedule::wgmma_backward(&spec);
        kernels.push(Kernel::new(spec, schedule, Arch::Sm90));
    }
    // The backward with K and V by TMA (docs/performance.md#tma), deterministic with early exit, so
    // that the groups left in flight after the walk and the turns it passes show too.
    let spec = Spec { deterministic: true, early_exit_bits: Some(24), ..Spec::new(128, Dtype::Bf16, Pass::Backward) };
    kernels.push(Kernel::new(spec, Schedule { loads: Loads::Tma, ..Schedule::wgmma_backward(&spec) }, Arch::Sm90));
    // The same by cp.async, the default before session 27.
    let spec = Spec::new(128, Dtype::Bf16, Pass::Backward);
    kernels.push(Kernel::new(spec, Schedule { loads: Loads::CpAsync, ..Schedule::wgmma_backward(&spec) }, Arch::Sm90));
    // And fed by a producer warpgroup (docs/performance.md#warp-specialisation).
    let spec = Spec::new(128, Dtype::Bf16, Pass::Backward);
    kernels.push(Kernel::new(spec, Schedule { loads: Loads::Producer, ..Schedule::wgmma_backward(&spec) }, Arch::Sm90));
    kernels
}

#[test]
fn generated_kernels_match_their_snapshots() {
    let kernels = canonical();
    assert_eq!(kernels.len(), 45);
    for kernel in kernels {
        let lowered = lower(&kernel).unwrap_or_else(|e| panic!("{}: {e}", kernel.name()));
        // The manifest is part of the contract too: grid rule, threads and shared memory.
        let manifest = serde_json::to_string_pretty(&lowered.manifest).expect("manifest serialises");
        insta::assert_snapshot!(lowered.name.clone(), format!("{manifest}\n\n{}", lowered.cuda_source));
    }
}

#[test]
fn names_are_unique_across_the_canonical_set() {
    let mut names: Vec<String> = canonical().iter().map(Kernel::name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 45);
}
