//! Which (query segment, key segment) pairs a rank computes at each step of the K/V ring
//! (docs/math.md#context-parallelism).

use crate::partition::Partition;

/// One pair: the rows of query segment `query` walk the keys of segment `key` (`key <= query`; equal
/// is the diagonal, with the causal mask inside).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    pub query: usize,
    pub key: usize,
}

impl Pair {
    pub fn is_diagonal(&self) -> bool {
        self.query == self.key
    }
}

/// A rank's plan. Step s holds the K/V of rank `(rank - s) mod P` (step 0: its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub rank: usize,
    /// `steps[s]`: the pairs computed at step s, in order.
    pub steps: Vec<Vec<Pair>>,
    /// For each rank: the last step at which its K/V is read, if any.
    pub last_use: Vec<Option<usize>>,
}

/// The rank whose K/V `rank` holds at step `step`.
pub fn holder_at(ranks: usize, rank: usize, step: usize) -> usize {
    (rank + ranks - step % ranks) % ranks
}

/// The step at which `rank` first holds the K/V of `owner`.
pub fn arrival(ranks: usize, rank: usize, owner: usize) -> usize {
    (rank + ranks - owner) % ranks
}

impl Schedule {
    /// Every query segment of `rank` walks its key segments strictly nearest first; a step takes
    /// each one's next pairs as long as their K/V has arrived. Empty segments have no pairs.
    pub fn new(p: &Partition, rank: usize) -> Schedule {
        let ranks = p.ranks();
        // Each local query segment's key segments, nearest first.
        let mut queues: Vec<Vec<Pair>> = p
            .local_segments(rank)
            .into_iter()
            .filter(|&q| !p.segment(q).is_empty())
            .map(|q| (0..=q).rev().filter(|&k| !p.segment(k).is_empty()).map(|k| Pair { query: q, key: k }).collect())
            .collect();
        for q in &mut queues {
            q.reverse(); // pop from the back = nearest first
        }
        let mut steps = vec![Vec::new(); ranks];
        let mut last_use = vec![None; ranks];
        for (s, step) in steps.iter_mut().enumerate() {
            for queue in &mut queues {
                while let Some(&pair) = queue.last() {
                    let owner = p.owner(pair.key);
                    if arrival(ranks, rank, owner) > s {
                        break;
                    }
                    queue.pop();
                    step.push(pair);
                    last_use[owner] = Some(s);
                }
            }
        }
        debug_assert!(queues.iter().all(Vec::is_empty), "every K/V has arrived by step P - 1");
        Schedule { rank, steps, last_use }
    }

    /// The ranks (other than this one) whose K/V must be kept past the step it arrived at.
    pub fn kept(&self) -> Vec<usize> {
        let ranks = self.steps.len();
        (0..ranks)
            .filter(|&o| o != self.rank && self.last_use[o].is_some_and(|s| s > arrival(ranks, self.rank, o)))
            .collect()
    }

    /// Segment pairs computed, counting a diagonal as half (the causal work).
    pub fn work(&self) -> f64 {
        self.steps.iter().flatten().map(|p| if p.is_diagonal() { 0.5 } else { 1.0 }).sum()
    }
}
