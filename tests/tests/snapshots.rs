//! Snapshots of the generated CUDA for a canonical set of kernels: forward and backward, head_dim 64
//! and 128, bf16 and f16, both masks, each at its default schedule on sm_90. A change to a template
//! or to lowering shows up here as a diff to review (`cargo insta review`), named after the kernel.

use sbgen::ir::{Arch, Dtype, Kernel, Mask, Pass, Schedule, Spec};
use sbgen::lower::lower;

fn canonical() -> Vec<Kernel> {
    let mut kernels = Vec::new();
    for pass in [Pass::Forward, Pass::Backward] {
        for head_dim in [64, 128] {
            for dtype in [Dtype::Bf16, Dtype::F16] {
                for mask in [Mask::Strict, Mask::AttendCurrent] {
                    let spec = Spec { mask, ..Spec::new(head_dim, dtype, pass) };
                    kernels.push(Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm90));
                }
            }
        }
    }
    kernels
}

#[test]
fn generated_kernels_match_their_snapshots() {
    let kernels = canonical();
    assert_eq!(kernels.len(), 16);
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
    assert_eq!(names.len(), 16);
}
