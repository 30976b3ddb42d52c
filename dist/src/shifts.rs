//! Where a rank's K/V in hand comes from at each step of the ring, and where each shift puts what
//! it receives: the buffer plan [`crate::nccl`] follows, pure so that it is tested without GPUs.
//!
//! At step s a rank holds the K/V of rank `(rank - s) mod P` (`holder_at`): at step 0 its own,
//! sent from the local tensors; later, what the shift of the step before received. Each step but
//! the last starts a shift that sends what is held to rank + 1 and receives from rank - 1 into the
//! receive buffer not held, two buffers alternating. A K/V the schedule reads after it has passed
//! on (zig-zag over more than two ranks) is copied aside at the step it is held.

use crate::schedule::holder_at;

/// Where the K/V in hand lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// The rank's own local k and v.
    Own,
    /// Receive buffer 0 or 1.
    Buffer(usize),
}

/// One step of a rank's walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShiftStep {
    /// Whose K/V is held.
    pub holder: usize,
    pub held: Held,
    /// The shift started at this step: whose K/V it receives and into which buffer (none at the
    /// last step).
    pub receive: Option<(usize, usize)>,
    /// Copy the held K/V aside for a later step.
    pub keep: bool,
}

/// Rank `rank`'s steps in a ring of `ranks`, keeping aside the K/V of the ranks in `kept`.
pub fn shift_plan(ranks: usize, rank: usize, kept: &[usize]) -> Vec<ShiftStep> {
    (0..ranks)
        .map(|s| {
            let holder = holder_at(ranks, rank, s);
            ShiftStep {
                holder,
                // Received at step s - 1 into buffer (s - 1) % 2.
                held: if s == 0 { Held::Own } else { Held::Buffer((s - 1) % 2) },
                receive: (s + 1 < ranks).then(|| (holder_at(ranks, rank, s + 1), s % 2)),
                keep: holder != rank && kept.contains(&holder),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::{Partition, Scheme};
    use crate::schedule::Schedule;

    /// Plays every rank's plan step by step: each buffer's content (whose K/V) follows the shifts,
    /// and every pair a step computes finds its K/V held, own or kept.
    #[test]
    #[allow(clippy::needless_range_loop)] // steps and ranks index several tables at once
    fn every_step_holds_what_it_computes_and_shifts_match_between_neighbours() {
        for ranks in 1..=8 {
            for scheme in [Scheme::Contiguous, Scheme::ZigZag] {
                let part = Partition::new(1000, ranks, scheme).unwrap();
                let schedules: Vec<Schedule> = (0..ranks).map(|r| Schedule::new(&part, r)).collect();
                let plans: Vec<Vec<ShiftStep>> =
                    (0..ranks).map(|r| shift_plan(ranks, r, &schedules[r].kept())).collect();
                let mut buffers: Vec<[Option<usize>; 2]> = vec![[None, None]; ranks];
                let mut kept: Vec<Vec<usize>> = vec![Vec::new(); ranks];
                for s in 0..ranks {
                    for r in 0..ranks {
                        let step = plans[r][s];
                        let held = match step.held {
                            Held::Own => Some(r),
                            Held::Buffer(b) => buffers[r][b],
                        };
                        assert_eq!(held, Some(step.holder), "{ranks} {scheme:?} rank {r} step {s}");
                        if let Some((owner, b)) = step.receive {
                            assert_ne!(step.held, Held::Buffer(b), "receives into the buffer it reads");
                            // What rank r receives is what rank r - 1 holds and sends.
                            let prev = (r + ranks - 1) % ranks;
                            assert_eq!(owner, plans[prev][s].holder, "{ranks} {scheme:?} rank {r} step {s}");
                        }
                        if step.keep {
                            kept[r].push(step.holder);
                        }
                        for pair in &schedules[r].steps[s] {
                            let o = part.owner(pair.key);
                            assert!(
                                o == r || o == step.holder || kept[r].contains(&o),
                                "{ranks} {scheme:?} {r} {s} {pair:?}"
                            );
                        }
                    }
                    // The shifts land (finish_shift) before the next step.
                    for r in 0..ranks {
                        if let Some((owner, b)) = plans[r][s].receive {
                            buffers[r][b] = Some(owner);
                        }
                    }
                }
            }
        }
    }
}
