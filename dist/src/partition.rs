//! How one sequence's tokens are cut into segments and which rank owns each
//! (docs/math.md#context-parallelism).

use crate::error::DistError;
use std::ops::Range;

/// The most ranks a partition accepts: far beyond one host, small enough that a schedule stays tiny.
pub const MAX_RANKS: usize = 4096;

/// Which segments a rank owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// P segments, rank r owns segment r. The ring delivers keys nearest first, but under the causal
    /// mask rank r has r + 1 segment pairs to compute.
    Contiguous,
    /// 2P segments, rank r owns segments r and 2P - 1 - r: every rank has 2P + 1 segment pairs, two
    /// of them diagonal (the causal work balanced).
    ZigZag,
}

/// A sequence of `seq` tokens over `ranks` ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    seq: usize,
    ranks: usize,
    scheme: Scheme,
}

impl Partition {
    pub fn new(seq: usize, ranks: usize, scheme: Scheme) -> Result<Partition, DistError> {
        if ranks == 0 || ranks > MAX_RANKS {
            return Err(DistError::Invalid {
                field: "ranks",
                got: ranks.to_string(),
                allowed: format!("1..={MAX_RANKS}"),
            });
        }
        Ok(Partition { seq, ranks, scheme })
    }

    pub fn seq(&self) -> usize {
        self.seq
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Number of segments: P, or 2P for zig-zag.
    pub fn segments(&self) -> usize {
        match self.scheme {
            Scheme::Contiguous => self.ranks,
            Scheme::ZigZag => 2 * self.ranks,
        }
    }

    /// The global tokens of segment `s`: near-equal lengths (they differ by at most one token; a
    /// sequence shorter than the segment count leaves some empty).
    pub fn segment(&self, s: usize) -> Range<usize> {
        let n = self.segments();
        s * self.seq / n..(s + 1) * self.seq / n
    }

    /// The rank that owns segment `s`.
    pub fn owner(&self, s: usize) -> usize {
        match self.scheme {
            Scheme::Contiguous => s,
            Scheme::ZigZag => s.min(2 * self.ranks - 1 - s),
        }
    }

    /// The segments of `rank`, ascending: the order of its local tensors.
    pub fn local_segments(&self, rank: usize) -> Vec<usize> {
        match self.scheme {
            Scheme::Contiguous => vec![rank],
            Scheme::ZigZag => vec![rank, 2 * self.ranks - 1 - rank],
        }
    }

    /// Tokens held by `rank`.
    pub fn local_len(&self, rank: usize) -> usize {
        self.local_segments(rank).iter().map(|&s| self.segment(s).len()).sum()
    }

    /// Where segment `s` starts in its owner's local tensors (in tokens).
    pub fn local_offset(&self, s: usize) -> usize {
        let owner = self.owner(s);
        self.local_segments(owner).iter().take_while(|&&t| t != s).map(|&t| self.segment(t).len()).sum()
    }

    /// Rank `rank`'s rows of a `[outer, seq, inner]` tensor (BHND: outer = batch x heads, inner =
    /// head_dim), as `[outer, local_len, inner]`.
    pub fn scatter<T: Copy>(&self, rank: usize, x: &[T], outer: usize, inner: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(outer * self.local_len(rank) * inner);
        for o in 0..outer {
            for s in self.local_segments(rank) {
                let r = self.segment(s);
                out.extend_from_slice(&x[(o * self.seq + r.start) * inner..(o * self.seq + r.end) * inner]);
            }
        }
        out
    }

    /// The inverse of [`Partition::scatter`]: every rank's local tensor back into `[outer, seq, inner]`.
    pub fn gather<T: Copy + Default>(&self, locals: &[Vec<T>], outer: usize, inner: usize) -> Vec<T> {
        let mut out = vec![T::default(); outer * self.seq * inner];
        for (rank, local) in locals.iter().enumerate() {
            let n = self.local_len(rank);
            for o in 0..outer {
                for s in self.local_segments(rank) {
                    let r = self.segment(s);
                    let at = (o * n + self.local_offset(s)) * inner;
                    out[(o * self.seq + r.start) * inner..(o * self.seq + r.end) * inner]
                        .copy_from_slice(&local[at..at + r.len() * inner]);
                }
            }
        }
        out
    }
}
