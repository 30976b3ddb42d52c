//! The simulated ring against the single-sequence float64 reference: forward and gradients for 1..8
//! ranks, both partitions, GQA, both masks, both remainders, scale and early exit; the schedules'
//! invariants; and the refusals.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sbgen_dist::{ring, DistError, Heads, Partition, Schedule, Scheme, SimRing, Transport};
use sbgen_runtime::reference::{self, Options, Shape};
use sbgen_runtime::spec::{Mask, Remainder};

fn normal(rng: &mut StdRng, n: usize, sd: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let (u, w): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
            sd * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * w).cos()
        })
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn options() -> Vec<Options> {
    vec![
        Options::causal(),
        Options { mask: Mask::AttendCurrent, remainder: Remainder::Fuse, ..Options::causal() },
        Options { scale: Some(0.6), ..Options::causal() },
        Options { early_exit_bits: Some(4), remainder: Remainder::Fuse, ..Options::causal() },
    ]
}

/// Runs the forward and backward on `ranks` simulated ranks and checks them against the reference.
fn check(seq: usize, ranks: usize, scheme: Scheme, heads: Heads, opts: &Options, seed: u64) -> Vec<ring::RingStats> {
    let Heads { batch: b, heads: h, kv_heads: hk, head_dim: d } = heads;
    let mut rng = StdRng::seed_from_u64(seed);
    // Scores of a few units, so that sticks are spent over tens of keys and early exit matters.
    let q = normal(&mut rng, b * h * seq * d, 1.5);
    let k = normal(&mut rng, b * hk * seq * d, 1.5);
    let v = normal(&mut rng, b * hk * seq * d, 1.0);
    let d_o = normal(&mut rng, b * h * seq * d, 1.0);
    let d_rem = normal(&mut rng, b * h * seq, 1.0);
    let shape = Shape::new(b, h, seq, d).with_kv_heads(hk);
    let want = reference::forward(shape, opts, &q, &k, &v);
    let want_grads = reference::backward(shape, opts, &q, &k, &v, &d_o, Some(&d_rem));

    let part = Partition::new(seq, ranks, scheme).unwrap();
    let results = SimRing::run(ranks, |t| {
        let r = t.rank();
        let (ql, kl, vl) =
            (part.scatter(r, &q, b * h, d), part.scatter(r, &k, b * hk, d), part.scatter(r, &v, b * hk, d));
        let (dol, drl) = (part.scatter(r, &d_o, b * h, d), part.scatter(r, &d_rem, b * h, 1));
        let fwd = ring::forward(t, &part, heads, opts, &ql, &kl, &vl).unwrap();
        let grads = ring::backward(t, &part, heads, opts, &ql, &kl, &vl, &fwd, &dol, Some(&drl)).unwrap();
        (fwd, grads)
    });
    let what = format!("seq {seq}, {ranks} ranks, {scheme:?}, {heads:?}, {opts:?}");
    let gather = |f: &dyn Fn(&(ring::RankForward, ring::RankGrads)) -> Vec<f64>, outer, inner| {
        part.gather(&results.iter().map(f).collect::<Vec<_>>(), outer, inner)
    };
    let o = gather(&|r| r.0.o.clone(), b * h, d);
    let rem = gather(&|r| r.0.rem.clone(), b * h, 1);
    let log2_rem = gather(&|r| r.0.log2_rem.clone(), b * h, 1);
    assert!(max_abs_diff(&o, &want.o) < 1e-12, "{what}: o off by {:e}", max_abs_diff(&o, &want.o));
    assert!(max_abs_diff(&rem, &want.rem) < 1e-12, "{what}: rem");
    assert!(max_abs_diff(&log2_rem, &want.log2_rem) < 1e-9, "{what}: log2 rem");
    for (name, got, want, outer) in [
        ("dq", gather(&|r| r.1.dq.clone(), b * h, d), &want_grads.dq, b * h),
        ("dk", gather(&|r| r.1.dk.clone(), b * hk, d), &want_grads.dk, b * hk),
        ("dv", gather(&|r| r.1.dv.clone(), b * hk, d), &want_grads.dv, b * hk),
    ] {
        let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
        let err = max_abs_diff(&got, want) / scale;
        assert!(err < 1e-10, "{what}: {name} off by {err:e} (relative to max {scale:.3}, {outer} heads)");
    }
    results.into_iter().map(|r| r.0.stats).collect()
}

#[test]
fn every_ring_of_one_to_eight_ranks_matches_the_reference() {
    let heads = Heads { batch: 2, heads: 4, kv_heads: 2, head_dim: 8 };
    for ranks in 1..=8 {
        for scheme in [Scheme::Contiguous, Scheme::ZigZag] {
            for (c, opts) in options().iter().enumerate() {
                // A length that no segment count divides, and one shorter than the zig-zag's segments.
                for seq in [67, 2 * ranks - 1] {
                    check(seq, ranks, scheme, heads, opts, (ranks * 100 + c * 10) as u64 + seq as u64);
                }
            }
        }
    }
}

#[test]
fn multi_query_and_one_token_sequences() {
    for ranks in [1, 3, 8] {
        check(1, ranks, Scheme::ZigZag, Heads { batch: 1, heads: 3, kv_heads: 1, head_dim: 5 }, &Options::causal(), 1);
        check(29, ranks, Scheme::ZigZag, Heads { batch: 1, heads: 3, kv_heads: 1, head_dim: 5 }, &Options::causal(), 2);
    }
}

#[test]
fn early_exit_skips_segments_whose_rows_are_all_spent() {
    // 2 bits: a stick is spent after a few keys, so far segments are skipped and only forwarded.
    let opts = Options { early_exit_bits: Some(2), ..Options::causal() };
    let stats = check(400, 4, Scheme::Contiguous, Heads { batch: 1, heads: 2, kv_heads: 2, head_dim: 8 }, &opts, 9);
    let skipped: usize = stats.iter().map(|s| s.skipped).sum();
    assert!(skipped > 0, "no segment pair was skipped: {stats:?}");
    assert!(stats.iter().all(|s| s.sent > 0), "every rank still passes K/V on: {stats:?}");
}

#[test]
fn schedules_cover_each_pair_once_nearest_first_and_zigzag_balances_the_work() {
    for ranks in 1..=8 {
        for scheme in [Scheme::Contiguous, Scheme::ZigZag] {
            let part = Partition::new(1000, ranks, scheme).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for rank in 0..ranks {
                let s = Schedule::new(&part, rank);
                let pairs: Vec<_> = s.steps.iter().flatten().copied().collect();
                for q in part.local_segments(rank) {
                    let keys: Vec<usize> = pairs.iter().filter(|p| p.query == q).map(|p| p.key).collect();
                    // Nearest first, so the diagonal first: the GPU ranks launch it `fresh` (the
                    // row state is written, not read, and needs no zeroing).
                    assert_eq!(keys, (0..=q).rev().collect::<Vec<_>>(), "{scheme:?} rank {rank} segment {q}");
                }
                seen.extend(pairs.iter().map(|p| (p.query, p.key)));
                let want = match scheme {
                    Scheme::Contiguous => rank as f64 + 0.5,
                    Scheme::ZigZag => 2.0 * ranks as f64,
                };
                assert_eq!(s.work(), want, "{scheme:?} rank {rank} of {ranks}");
                if scheme == Scheme::Contiguous || ranks <= 2 {
                    assert!(s.kept().is_empty(), "{scheme:?} rank {rank} of {ranks} keeps {:?}", s.kept());
                }
            }
            let n = part.segments();
            assert_eq!(seen.len(), n * (n + 1) / 2, "{scheme:?} {ranks} ranks: every pair once");
            if scheme == Scheme::ZigZag && ranks >= 3 {
                // Rank 0's far segment waits for rank 1's K/V, the last to arrive: it keeps the rest.
                assert_eq!(Schedule::new(&part, 0).kept().len(), ranks - 2, "zig-zag, {ranks} ranks");
            }
        }
    }
}

#[test]
fn bad_inputs_are_refused_naming_the_field() {
    assert!(matches!(Partition::new(10, 0, Scheme::ZigZag), Err(DistError::Invalid { field: "ranks", .. })));
    let part = Partition::new(10, 2, Scheme::ZigZag).unwrap();
    let errors = SimRing::run(2, |t| {
        let n = part.local_len(t.rank());
        let good = Heads { batch: 1, heads: 2, kv_heads: 1, head_dim: 4 };
        let bad_heads = Heads { kv_heads: 3, ..good };
        let x = vec![0.5; 2 * n * 4];
        let kv = vec![0.5; n * 4];
        let a = ring::forward(t, &part, bad_heads, &Options::causal(), &x, &kv, &kv).unwrap_err();
        let b = ring::forward(t, &part, good, &Options::causal(), &x[1..], &kv, &kv).unwrap_err();
        (a, b)
    });
    for (a, b) in errors {
        assert!(matches!(a, DistError::Invalid { field: "kv_heads", .. }), "{a}");
        assert!(matches!(b, DistError::Length { tensor: "q", .. }), "{b}");
    }
    let three = Partition::new(10, 3, Scheme::ZigZag).unwrap();
    let err = SimRing::run(2, |t| {
        ring::forward(
            t,
            &three,
            Heads { batch: 1, heads: 1, kv_heads: 1, head_dim: 1 },
            &Options::causal(),
            &[],
            &[],
            &[],
        )
        .unwrap_err()
    });
    assert!(matches!(err[0], DistError::Invalid { field: "ranks", .. }), "{}", err[0]);
}

#[test]
fn a_rank_that_stops_makes_the_others_fail_instead_of_hang() {
    let part = Partition::new(40, 3, Scheme::ZigZag).unwrap();
    let heads = Heads { batch: 1, heads: 1, kv_heads: 1, head_dim: 2 };
    let results = SimRing::run(3, |t| {
        if t.rank() == 1 {
            return Err(DistError::Transport { rank: 1, reason: "stopped on purpose".into() });
        }
        let x = vec![0.1; part.local_len(t.rank()) * 2];
        ring::forward(t, &part, heads, &Options::causal(), &x, &x, &x).map(|_| ())
    });
    for (rank, r) in results.iter().enumerate() {
        assert!(matches!(r, Err(DistError::Transport { .. })), "rank {rank}: {r:?}");
    }
}
