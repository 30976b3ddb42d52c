//! The ring driver: one rank's forward and backward over its segments, passing K/V around the ring
//! and walking each query segment's key segments nearest first with the per-row state of
//! docs/math.md#context-parallelism. This version computes in float64 on the CPU (the walk is the
//! reference's, cut at segment boundaries); run over [`crate::SimRing`] it is the simulated ring the
//! tests check against the single-sequence reference for any number of ranks.

use crate::error::DistError;
use crate::partition::Partition;
use crate::schedule::{holder_at, Pair, Schedule};
use crate::transport::Transport;
use sbgen_runtime::reference::{softplus2, Options};
use sbgen_runtime::spec::{Mask, Remainder};

/// The heads of one problem: q is `[batch, heads, seq, head_dim]`, k and v
/// `[batch, kv_heads, seq, head_dim]` (BHND); a rank holds `[.., local_len, ..]` of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Heads {
    pub(crate) fn check(&self) -> Result<(), DistError> {
        let bad = |field, got: usize, allowed: &str| {
            Err(DistError::Invalid { field, got: got.to_string(), allowed: allowed.to_string() })
        };
        if self.batch == 0 {
            return bad("batch", self.batch, ">= 1");
        }
        if self.head_dim == 0 {
            return bad("head_dim", self.head_dim, ">= 1");
        }
        if self.kv_heads == 0 || self.heads == 0 || self.heads % self.kv_heads != 0 {
            return bad("kv_heads", self.kv_heads, &format!("a divisor of heads = {}", self.heads));
        }
        Ok(())
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// What a rank did: segment pairs walked and skipped (early exit), elements it sent, and the most
/// other ranks' K/V it held at once beyond the one in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    pub pairs: usize,
    pub skipped: usize,
    pub sent: usize,
    pub kept_peak: usize,
}

/// A rank's forward result, local BHND: o `[B, H, n, D]`, rem and log2 rem `[B, H, n]`.
#[derive(Clone, Debug)]
pub struct RankForward {
    pub o: Vec<f64>,
    pub rem: Vec<f64>,
    pub log2_rem: Vec<f64>,
    pub stats: RingStats,
}

/// A rank's gradients, local BHND in the layouts of q, k and v.
#[derive(Clone, Debug)]
pub struct RankGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub stats: RingStats,
}

/// The walk's constants and the geometry every rank agrees on.
struct Ring<'a> {
    part: &'a Partition,
    heads: Heads,
    rank: usize,
    scale: f64,
    scale_log2: f64,
    threshold: f64,
    attend_current: bool,
    fuse: bool,
}

/// One rank's K and V, `[k | v]`, each `[B, H_kv, n_owner, D]`.
struct Kv<'a> {
    data: &'a [f64],
    owner_len: usize,
}

impl Ring<'_> {
    fn new<'a>(part: &'a Partition, heads: Heads, opts: &Options, rank: usize) -> Ring<'a> {
        let scale = opts.scale_for(heads.head_dim);
        Ring {
            part,
            heads,
            rank,
            scale,
            scale_log2: scale * std::f64::consts::LOG2_E,
            threshold: opts.early_exit_bits.map_or(f64::NEG_INFINITY, |t| -(t as f64)),
            attend_current: opts.mask == Mask::AttendCurrent,
            fuse: opts.remainder == Remainder::Fuse,
        }
    }

    fn local_len(&self) -> usize {
        self.part.local_len(self.rank)
    }

    fn kv_len(&self, owner: usize) -> usize {
        2 * self.heads.batch * self.heads.kv_heads * self.part.local_len(owner) * self.heads.head_dim
    }

    /// Local row index of (b, h, token t of the rank) in a `[B, heads, n, ..]` tensor.
    fn row(&self, heads: usize, b: usize, h: usize, t: usize) -> usize {
        (b * heads + h) * self.local_len() + t
    }

    /// The rows of query segment `pair.query` (every batch and head) walk the keys of segment
    /// `pair.key`, nearest first, each from its state `acc[row]`; `take(row, bh, kv_row, a, beta)` sees
    /// every key a row keeps (`bh` = b * heads + h; `kv_row` indexes `kv`'s K and V rows).
    fn walk(
        &self,
        pair: Pair,
        q: &[f64],
        kv: &Kv<'_>,
        acc: &mut [f64],
        mut take: impl FnMut(usize, usize, usize, f64, f64),
    ) {
        let (hd, d, group) = (self.heads, self.heads.head_dim, self.heads.group());
        let (qs, ks) = (self.part.segment(pair.query), self.part.segment(pair.key));
        let (q_off, k_off) = (self.part.local_offset(pair.query), self.part.local_offset(pair.key));
        for b in 0..hd.batch {
            for h in 0..hd.heads {
                let kv_head = b * hd.kv_heads + h / group;
                for (t, i) in qs.clone().enumerate() {
                    let row = self.row(hd.heads, b, h, q_off + t);
                    let qi = &q[row * d..][..d];
                    let end = if pair.is_diagonal() { i + usize::from(self.attend_current) } else { ks.end };
                    let mut a = acc[row];
                    for j in (ks.start..end.min(ks.end)).rev() {
                        if a < self.threshold {
                            break;
                        }
                        let kv_row = kv_head * kv.owner_len + k_off + (j - ks.start);
                        let x = self.scale_log2 * dot(qi, &kv.data[kv_row * d..][..d]);
                        let sp = softplus2(x);
                        take(row, b * hd.heads + h, kv_row, (x - sp + a).exp2(), (x - sp).exp2());
                        a -= sp;
                    }
                    acc[row] = a;
                }
            }
        }
    }

    /// True when every row of query segment `seg` has spent its stick below the early-exit threshold.
    fn spent(&self, seg: usize, acc: &[f64]) -> bool {
        let off = self.part.local_offset(seg);
        let len = self.part.segment(seg).len();
        (0..self.heads.batch * self.heads.heads)
            .all(|bh| (0..len).all(|t| acc[bh * self.local_len() + off + t] < self.threshold))
    }

    fn check_len(&self, tensor: &'static str, got: usize, heads: usize, inner: usize) -> Result<(), DistError> {
        let want = self.heads.batch * heads * self.local_len() * inner;
        if got == want {
            return Ok(());
        }
        Err(DistError::Length {
            tensor,
            got,
            expected: format!(
                "rank {} holds {} tokens of [{}, {heads}, _, {inner}] = {want}",
                self.rank,
                self.local_len(),
                self.heads.batch
            ),
        })
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The K/V ring of one pass: which ranks' K/V this rank holds, each step's shift, and what it keeps.
struct KvRing {
    held: Vec<Option<Vec<f64>>>,
    stats: RingStats,
}

impl KvRing {
    /// Walks `schedule`: `compute(pair, kv)` for every pair as its K/V is at hand, shifting the K/V
    /// of rank `holder_at(step)` on to the next rank during each step.
    fn run<T: Transport>(
        t: &mut T,
        ring: &Ring<'_>,
        k: &[f64],
        v: &[f64],
        mut compute: impl FnMut(Pair, &Kv<'_>, &mut RingStats),
    ) -> Result<RingStats, DistError> {
        let (ranks, rank) = (ring.part.ranks(), ring.rank);
        let schedule = Schedule::new(ring.part, rank);
        let mut me = KvRing { held: vec![None; ranks], stats: RingStats::default() };
        me.held[rank] = Some([k, v].concat());
        for step in 0..ranks {
            let passing = holder_at(ranks, rank, step);
            let next = holder_at(ranks, rank, step + 1);
            let shifting = step + 1 < ranks;
            if shifting {
                let send = me.held[passing].as_deref().expect("the K/V being passed on is held");
                t.start_shift(send, ring.kv_len(next))?;
                me.stats.sent += send.len();
            }
            for &pair in &schedule.steps[step] {
                let owner = ring.part.owner(pair.key);
                let data = me.held[owner].as_deref().expect("the schedule only takes pairs whose K/V is held");
                compute(pair, &Kv { data, owner_len: ring.part.local_len(owner) }, &mut me.stats);
            }
            if shifting {
                me.held[next] = Some(t.finish_shift()?);
            }
            // Drop what no later step reads (never this rank's own K/V, never the one to pass on next).
            for (o, slot) in me.held.iter_mut().enumerate() {
                let later = schedule.last_use[o].is_some_and(|s| s > step);
                if o != rank && !(shifting && o == next) && !later {
                    *slot = None;
                }
            }
            let kept = me.held.iter().enumerate().filter(|(o, h)| h.is_some() && *o != rank && *o != next).count();
            me.stats.kept_peak = me.stats.kept_peak.max(kept);
        }
        Ok(me.stats)
    }
}

/// One rank's forward: `q` `[B, H, n, D]`, `k`, `v` `[B, H_kv, n, D]`, n = `part.local_len(rank)`.
pub fn forward<T: Transport>(
    t: &mut T,
    part: &Partition,
    heads: Heads,
    opts: &Options,
    q: &[f64],
    k: &[f64],
    v: &[f64],
) -> Result<RankForward, DistError> {
    heads.check()?;
    check_ring(t, part)?;
    let ring = Ring::new(part, heads, opts, t.rank());
    let d = heads.head_dim;
    ring.check_len("q", q.len(), heads.heads, d)?;
    ring.check_len("k", k.len(), heads.kv_heads, d)?;
    ring.check_len("v", v.len(), heads.kv_heads, d)?;
    let rows = heads.batch * heads.heads * ring.local_len();
    let mut o = vec![0.0; rows * d];
    let mut acc = vec![0.0; rows];
    let mut spent = vec![false; part.segments()];
    let stats = KvRing::run(t, &ring, k, v, |pair, kv, stats| {
        if spent[pair.query] {
            stats.skipped += 1;
            return;
        }
        stats.pairs += 1;
        let v_off = kv.data.len() / 2;
        ring.walk(pair, q, kv, &mut acc, |row, _, kv_row, a, _| {
            let vj = &kv.data[v_off + kv_row * d..][..d];
            o[row * d..][..d].iter_mut().zip(vj).for_each(|(x, y)| *x += a * y);
        });
        spent[pair.query] = ring.spent(pair.query, &acc);
    })?;
    let rem: Vec<f64> = acc.iter().map(|l| l.exp2()).collect();
    if ring.fuse {
        for_each_own_row(&ring, |row, kv_row| {
            let vi = &v[kv_row * d..][..d];
            o[row * d..][..d].iter_mut().zip(vi).for_each(|(x, y)| *x += rem[row] * y);
        });
    }
    Ok(RankForward { o, rem, log2_rem: acc, stats })
}

/// Gradients of `sum(d_o * o) + sum(d_rem * rem)` for one rank; `fwd` is that rank's forward
/// result. dK and dV come back to their owners by a ring reduce-scatter.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Transport>(
    t: &mut T,
    part: &Partition,
    heads: Heads,
    opts: &Options,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    fwd: &RankForward,
    d_o: &[f64],
    d_rem: Option<&[f64]>,
) -> Result<RankGrads, DistError> {
    heads.check()?;
    check_ring(t, part)?;
    let ring = Ring::new(part, heads, opts, t.rank());
    let (d, rank, ranks) = (heads.head_dim, t.rank(), part.ranks());
    for (name, x, h) in [("q", q, heads.heads), ("k", k, heads.kv_heads), ("v", v, heads.kv_heads)] {
        ring.check_len(name, x.len(), h, d)?;
    }
    ring.check_len("o", fwd.o.len(), heads.heads, d)?;
    ring.check_len("d_o", d_o.len(), heads.heads, d)?;
    ring.check_len("log2_rem", fwd.log2_rem.len(), heads.heads, 1)?;
    if let Some(dr) = d_rem {
        ring.check_len("d_rem", dr.len(), heads.heads, 1)?;
    }
    let rows = heads.batch * heads.heads * ring.local_len();
    // Per row: D = dO . o (unfused), and dRem (+ dO . v_i when fused) times rem.
    let mut big_d = vec![0.0; rows];
    let mut d_rem_rem = vec![0.0; rows];
    let mut grads: Vec<Option<Vec<f64>>> = vec![None; ranks]; // per owner: [dk | dv]
    let own_kv_len = ring.kv_len(rank);
    let mut own = vec![0.0; own_kv_len];
    for_each_own_row(&ring, |row, kv_row| {
        let (doi, vi) = (&d_o[row * d..][..d], &v[kv_row * d..][..d]);
        let rem = fwd.log2_rem[row].exp2();
        let mut dot_o = dot(doi, &fwd.o[row * d..][..d]);
        let mut dr = d_rem.map_or(0.0, |x| x[row]);
        if ring.fuse {
            let dv = dot(doi, vi);
            dot_o -= rem * dv;
            dr += dv;
            let at = own_kv_len / 2 + kv_row * d;
            own[at..at + d].iter_mut().zip(doi).for_each(|(x, y)| *x += rem * y);
        }
        big_d[row] = dot_o;
        d_rem_rem[row] = dr * rem;
    });
    grads[rank] = Some(own);
    let mut dq = vec![0.0; rows * d];
    let mut acc = vec![0.0; rows];
    let mut walked = vec![0.0; rows]; // S: the sum of g over the keys walked so far
    let mut spent = vec![false; part.segments()];
    let scale = ring.scale;
    let mut stats = KvRing::run(t, &ring, k, v, |pair, kv, stats| {
        if spent[pair.query] {
            stats.skipped += 1;
            return;
        }
        stats.pairs += 1;
        let owner = part.owner(pair.key);
        let g_kv = grads[owner].get_or_insert_with(|| vec![0.0; kv.data.len()]);
        let half = kv.data.len() / 2;
        ring.walk(pair, q, kv, &mut acc, |row, _, kv_row, a, beta| {
            let (qi, doi) = (&q[row * d..][..d], &d_o[row * d..][..d]);
            let (kj, vj) = (&kv.data[kv_row * d..][..d], &kv.data[half + kv_row * d..][..d]);
            let g = a * dot(doi, vj);
            let dz = scale * (g - beta * (big_d[row] - walked[row] + d_rem_rem[row]));
            walked[row] += g;
            dq[row * d..][..d].iter_mut().zip(kj).for_each(|(x, y)| *x += dz * y);
            g_kv[kv_row * d..][..d].iter_mut().zip(qi).for_each(|(x, y)| *x += dz * y);
            g_kv[half + kv_row * d..][..d].iter_mut().zip(doi).for_each(|(x, y)| *x += a * y);
        });
        spent[pair.query] = ring.spent(pair.query, &acc);
    })?;
    let mine = reduce_scatter(t, &ring, grads, &mut stats)?;
    let (dk, dv) = mine.split_at(own_kv_len / 2);
    Ok(RankGrads { dq, dk: dk.to_vec(), dv: dv.to_vec(), stats })
}

/// Sums every rank's partial `[dk | dv]` of each owner's K/V onto the owner (a ring reduce-scatter):
/// shifts s = 1 .. P-1, at each rank r passing on its running sum for owner r - s and adding its own
/// partial to the sum for owner r - s - 1 that arrives; the last brings owner r's.
fn reduce_scatter<T: Transport>(
    t: &mut T,
    ring: &Ring<'_>,
    mut partials: Vec<Option<Vec<f64>>>,
    stats: &mut RingStats,
) -> Result<Vec<f64>, DistError> {
    let (ranks, rank) = (ring.part.ranks(), ring.rank);
    let owner_at = |s: usize| (rank + 2 * ranks - s % ranks) % ranks;
    for s in 1..ranks {
        let (out, inc) = (owner_at(s), owner_at(s + 1));
        let send = partials[out].take().unwrap_or_else(|| vec![0.0; ring.kv_len(out)]);
        t.start_shift(&send, ring.kv_len(inc))?;
        stats.sent += send.len();
        let got = t.finish_shift()?;
        let mine = partials[inc].get_or_insert_with(|| vec![0.0; got.len()]);
        mine.iter_mut().zip(&got).for_each(|(x, y)| *x += y);
    }
    Ok(partials[rank].take().unwrap_or_else(|| vec![0.0; ring.kv_len(rank)]))
}

/// `f(row, kv_row)` for each local query row and the row of its own token in the local K/V.
fn for_each_own_row(ring: &Ring<'_>, mut f: impl FnMut(usize, usize)) {
    let hd = ring.heads;
    let n = ring.local_len();
    for b in 0..hd.batch {
        for h in 0..hd.heads {
            for t in 0..n {
                f(ring.row(hd.heads, b, h, t), (b * hd.kv_heads + h / hd.group()) * n + t);
            }
        }
    }
}

fn check_ring<T: Transport>(t: &T, part: &Partition) -> Result<(), DistError> {
    if t.ranks() != part.ranks() || t.rank() >= t.ranks() {
        return Err(DistError::Invalid {
            field: "ranks",
            got: format!("a transport of {} ranks (this is rank {})", t.ranks(), t.rank()),
            allowed: format!("the partition's {} ranks", part.ranks()),
        });
    }
    Ok(())
}
