//! The candidates of one spec: the search space in timing order (the spec's default schedule
//! first), pruned ones with their reason, and the helper kernels the backward's check and timing
//! run beside them.

use super::plan::{forward_of, Session};
use crate::cache::{candidates_checksum, CandidateResult, Outcome};
use crate::ir::{Arch, Kernel, Pass, Schedule, Spec};
use crate::search_space::variants;

/// Every candidate of `spec` in timing order: the default schedule first, then the search space's,
/// nearest the default first ([`choices_apart`]; table order among equals), so that a `--budget-s`
/// that runs out leaves out the candidates least like the best schedule measured so far rather
/// than the last rows of the table (the 128-row tiles, the backward's winners at 128 wide). Pruned
/// ones carry their reason, the rest [`Outcome::NotRun`] (to be measured). Also returns the
/// candidate list's checksum, which is over the table order and so does not change with this one.
pub fn candidates(spec: Spec, arch: Arch) -> (Vec<CandidateResult>, String) {
    let all: Vec<(Kernel, Result<(), crate::search_space::Pruned>)> = variants(spec, arch).collect();
    let checksum = candidates_checksum(all.iter().map(|(k, v)| (&k.schedule, v.is_ok())));
    let default = Schedule::default_on(&spec, arch);
    let pending = || Outcome::NotRun { reason: "not measured yet".into() };
    let mut out = vec![CandidateResult { schedule: default, outcome: pending() }];
    for (kernel, verdict) in all {
        if kernel.schedule == default {
            continue;
        }
        let outcome = match verdict {
            Ok(()) => pending(),
            Err(reason) => Outcome::Pruned { reason: reason.to_string() },
        };
        out.push(CandidateResult { schedule: kernel.schedule, outcome });
    }
    // Stable: table order among candidates as far from the default.
    out[1..].sort_by_key(|c| choices_apart(&c.schedule, &default));
    (out, checksum)
}

/// How many of a schedule's choices differ from `other`'s: the tile (rows and warps together), the
/// key block, the stages, the scan, the stick, the matmul family, the loads and ping-pong.
fn choices_apart(a: &Schedule, other: &Schedule) -> usize {
    [
        (a.block_m, a.warps) != (other.block_m, other.warps),
        a.block_n != other.block_n,
        a.stages != other.stages,
        a.cumsum != other.cumsum,
        a.softplus != other.softplus,
        a.mma != other.mma,
        a.loads != other.loads,
        a.pingpong != other.pingpong,
    ]
    .into_iter()
    .filter(|&differs| differs)
    .count()
}

/// Pruned schedules grouped by reason, in order of first appearance.
pub fn pruned_groups<'a>(pruned: impl IntoIterator<Item = (Schedule, &'a str)>) -> Vec<(&'a str, Vec<Schedule>)> {
    let mut groups: Vec<(&str, Vec<Schedule>)> = Vec::new();
    for (schedule, reason) in pruned {
        match groups.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, list)) => list.push(schedule),
            None => groups.push((reason, vec![schedule])),
        }
    }
    groups
}

/// Prints the spec's header and one line per distinct pruning reason (every pruned candidate is
/// in the cache with its reason).
pub fn announce(s: &mut Session<'_>, spec: Spec, cands: &[CandidateResult]) {
    let pruned: Vec<(Schedule, &str)> = cands
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Pruned { reason } => Some((c.schedule, reason.as_str())),
            _ => None,
        })
        .collect();
    s.say(&format!(
        "== {} on {}: {} candidates, {} pruned",
        spec.slug(),
        s.plan.arch.compile_target(),
        cands.len(),
        pruned.len()
    ));
    for (reason, schedules) in pruned_groups(pruned) {
        s.say(&format!("pruned x{:<3} {reason}", schedules.len()));
    }
}

/// Kernels that are not candidates but run with them: a backward's check runs the forward of the
/// same schedule, and its timing the spec's default forward. None for a forward spec.
pub fn helpers(spec: Spec, kernels: &[Kernel]) -> Vec<Kernel> {
    let (Some(first), Pass::Backward) = (kernels.first(), spec.pass) else {
        return Vec::new();
    };
    let fwd = forward_of(spec);
    let mut helpers = vec![Kernel::new(fwd, Schedule::default_on(&fwd, first.arch), first.arch)];
    helpers.extend(kernels.iter().map(|k| Kernel { spec: fwd, ..*k }));
    helpers.sort_by_key(|k| k.schedule);
    helpers.dedup();
    helpers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Dtype;

    #[test]
    fn candidates_start_with_the_default_and_carry_the_pruning_reasons() {
        for pass in [Pass::Forward, Pass::Backward] {
            let spec = Spec::new(128, Dtype::Bf16, pass);
            let (list, checksum) = candidates(spec, Arch::Sm90);
            assert_eq!(list[0].schedule, Schedule::default_on(&spec, Arch::Sm90));
            assert_eq!(list.iter().filter(|c| c.schedule == list[0].schedule).count(), 1);
            assert!(list.iter().any(|c| matches!(&c.outcome, Outcome::Pruned { reason } if !reason.is_empty())));
            let pending = list.iter().filter(|c| matches!(c.outcome, Outcome::NotRun { .. })).count();
            let kept = variants(spec, Arch::Sm90).filter(|(_, v)| v.is_ok()).count();
            assert_eq!(pending, kept, "the default is one of the kept candidates");
            assert!(checksum.starts_with("fnv1a64:"));
            assert_eq!(checksum, candidates(spec, Arch::Sm90).1);
        }
    }

    #[test]
    fn candidates_nearest_the_default_come_first() {
        let spec = Spec::new(128, Dtype::Bf16, Pass::Backward);
        let (list, _) = candidates(spec, Arch::Sm90);
        let default = list[0].schedule;
        let apart: Vec<usize> = list[1..].iter().map(|c| choices_apart(&c.schedule, &default)).collect();
        assert!(apart.windows(2).all(|w| w[0] <= w[1]), "{apart:?}");
        assert_eq!(apart[0], 1);
        // The default's cp.async and producer twins are among the first, the 64-row mma.sync
        // candidates among the last.
        let position = |s: Schedule| list.iter().position(|c| c.schedule == s).expect("a candidate");
        let cp = position(Schedule { loads: crate::ir::Loads::CpAsync, ..default });
        let far = position(Schedule {
            block_m: 64,
            warps: 4,
            block_n: 32,
            mma: crate::ir::MmaFamily::MmaSync,
            ..Schedule::DEFAULT
        });
        assert!(cp < far, "{cp} {far}");
        assert_eq!(choices_apart(&default, &default), 0);
        assert_eq!(
            choices_apart(&Schedule { block_m: 64, warps: 4, ..default }, &default),
            1,
            "the tile is one choice"
        );
    }

    #[test]
    fn pruned_schedules_group_by_reason_in_order_of_first_appearance() {
        let (a, b, c) = (
            Schedule::DEFAULT,
            Schedule { block_n: 32, ..Schedule::DEFAULT },
            Schedule { stages: 3, ..Schedule::DEFAULT },
        );
        let groups = pruned_groups([(a, "smem"), (b, "spills"), (c, "smem")]);
        assert_eq!(groups, vec![("smem", vec![a, c]), ("spills", vec![b])]);
    }

    #[test]
    fn the_backward_runs_the_default_forward_and_each_schedules_forward() {
        let bwd = Spec::new(64, Dtype::Bf16, Pass::Backward);
        let fwd = Spec { pass: Pass::Forward, ..bwd };
        let other = Schedule { stages: 3, ..Schedule::DEFAULT };
        let kernels = [Kernel::new(bwd, Schedule::DEFAULT, Arch::Sm90), Kernel::new(bwd, other, Arch::Sm90)];
        let got = helpers(bwd, &kernels);
        assert!(got.iter().all(|k| k.spec == fwd && k.arch == Arch::Sm90));
        let mut want = vec![Schedule::DEFAULT, other, Schedule::default_on(&fwd, Arch::Sm90)];
        want.sort();
        want.dedup();
        assert_eq!(got.iter().map(|k| k.schedule).collect::<Vec<_>>(), want);
        let fwd_kernels = [Kernel::new(fwd, Schedule::DEFAULT, Arch::Sm90)];
        assert!(helpers(fwd, &fwd_kernels).is_empty(), "a forward needs no helpers");
    }

    #[test]
    fn a_deterministic_backward_runs_on_the_plain_forward() {
        let bwd = Spec { deterministic: true, ..Spec::new(96, Dtype::Bf16, Pass::Backward) };
        let fwd = forward_of(bwd);
        assert_eq!(fwd, Spec::new(96, Dtype::Bf16, Pass::Forward));
        assert_eq!(fwd.validate(), Ok(()));
        let kernels = [Kernel::new(bwd, Schedule::default_for(&bwd), Arch::Sm80)];
        assert!(helpers(bwd, &kernels).iter().all(|k| k.spec == fwd && k.validate().is_ok()));
    }

    #[test]
    fn candidates_of_a_padded_head_dim_are_those_of_its_tile() {
        for pass in [Pass::Forward, Pass::Backward] {
            let (padded, tile) = (Spec::new(80, Dtype::F16, pass), Spec::new(96, Dtype::F16, pass));
            let schedules = |spec| candidates(spec, Arch::Sm90).0.into_iter().map(|c| c.schedule).collect::<Vec<_>>();
            assert_eq!(schedules(padded), schedules(tile));
            assert_eq!(candidates(padded, Arch::Sm90).1, candidates(tile, Arch::Sm90).1, "same checksum");
        }
    }
}
