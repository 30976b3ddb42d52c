//! One rank's context-parallel forward and backward on its GPU (feature `cuda`): each segment pair of
//! the rank's [`Schedule`] is one launch of the segment pass (`Pass::Segment`, [`RankForward`]),
//! whose rows continue from the f32 state (o, log2 of the stick left) the nearer key segments left;
//! after the last step one finishing launch writes o, rem and log2_rem. The backward
//! ([`RankBackward`], `Pass::SegmentBackward`) walks the same pairs in the same order carrying
//! (dQ, log2 of the stick, sum of g), adds dK and dV into a partial per owner of the K/V, and after
//! the partials are summed at their owners writes dQ, dK and dV (docs/math.md#context-parallelism).
//!
//! Local tensors are the rank's segments one after another, in the spec's layout: BHND
//! `[batch, heads, local_len, head_dim]` or BNHD `[batch, local_len, heads, head_dim]` (k and v with
//! `kv_heads`). Where the K/V of another rank comes from is the caller's business: the NCCL ring,
//! or, to check the kernels on one GPU, the other ranks' tensors on the same device.

use crate::error::DistError;
use crate::partition::Partition;
use crate::ring::Heads;
use crate::schedule::{Pair, Schedule};
use cudarc::driver::{CudaSlice, CudaView};
use sbgen_runtime::launcher::{
    KernelBinary, Launcher, LocalShape, SbElement, SegmentBwdFinishArgs, SegmentBwdWalkArgs, SegmentFinishArgs,
    SegmentShape, SegmentWalkArgs,
};
use sbgen_runtime::spec::{Layout, Pass, Remainder, Spec};
use std::sync::Arc;

/// A rank's arguments against its kernel: `rank` in the partition, `kernel` of `pass`, head_dim the
/// kernel's and a multiple of 8 (a segment's views start inside the local tensors: 16-byte aligned
/// only when a token's row is). Returns the kernel's spec.
fn check_rank(
    kernel: &KernelBinary,
    pass: Pass,
    part: &Partition,
    rank: usize,
    heads: Heads,
) -> Result<Spec, DistError> {
    heads.check()?;
    if rank >= part.ranks() {
        return Err(invalid("rank", rank, &format!("0..{}", part.ranks())));
    }
    let spec = kernel.manifest().spec;
    if spec.pass != pass {
        return Err(invalid("kernel", &kernel.manifest().name, &format!("a {pass} kernel")));
    }
    if spec.head_dim as usize != heads.head_dim || heads.head_dim % 8 != 0 {
        return Err(invalid(
            "head_dim",
            heads.head_dim,
            &format!("the kernel's ({}), a multiple of 8 (segments start on 16-byte rows)", spec.head_dim),
        ));
    }
    Ok(spec)
}

fn invalid(field: &'static str, got: impl ToString, allowed: &str) -> DistError {
    DistError::Invalid { field, got: got.to_string(), allowed: allowed.to_string() }
}

/// One rank's forward: the row state between launches and the plan of its steps.
pub struct RankForward<T> {
    launcher: Arc<Launcher>,
    kernel: Arc<KernelBinary>,
    part: Partition,
    schedule: Schedule,
    heads: Heads,
    layout: Layout,
    scale: Option<f32>,
    o_state: CudaSlice<f32>,
    l_state: CudaSlice<f32>,
    /// Pairs launched and pairs left out because their key segment is empty.
    pub launched: usize,
    _element: std::marker::PhantomData<T>,
}

impl<T: SbElement> RankForward<T> {
    /// Allocates rank `rank`'s state for `kernel`, a `Pass::Segment` kernel (sbgen lowers it from the
    /// forward's spec with the pass changed, at the forward's default schedule). `scale` defaults to
    /// 1/sqrt(head_dim).
    pub fn new(
        launcher: Arc<Launcher>,
        kernel: Arc<KernelBinary>,
        part: &Partition,
        rank: usize,
        heads: Heads,
        scale: Option<f32>,
    ) -> Result<Self, DistError> {
        let spec = check_rank(&kernel, Pass::Segment, part, rank, heads)?;
        let n = part.local_len(rank);
        let rows = heads.batch * heads.heads * n;
        let stream = launcher.stream().clone();
        let device = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
        let o_state = nan_filled(&stream, rows * heads.head_dim).map_err(device)?;
        let l_state = nan_filled(&stream, rows).map_err(device)?;
        Ok(RankForward {
            launcher,
            kernel,
            part: part.clone(),
            schedule: Schedule::new(part, rank),
            heads,
            layout: spec.layout,
            scale,
            o_state,
            l_state,
            launched: 0,
            _element: std::marker::PhantomData,
        })
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Starts a new forward. The state needs no zeroing: each query segment's first pair is its
    /// diagonal (the schedule walks nearest first), launched `fresh`, which writes every row's state
    /// without reading it.
    pub fn reset(&mut self) -> Result<(), DistError> {
        self.launched = 0;
        Ok(())
    }

    /// Launches ring step `step`'s pairs on the launcher's stream. `q` is this rank's local q;
    /// `kv(owner)` gives the local k and v of rank `owner` (every owner this step reads: the one held
    /// at this step, and for zig-zag over more than two ranks the ones kept from earlier steps).
    pub fn step<'a>(
        &mut self,
        step: usize,
        q: &CudaSlice<T>,
        kv: &dyn Fn(usize) -> Option<(CudaView<'a, T>, CudaView<'a, T>)>,
    ) -> Result<(), DistError> {
        let rank = self.schedule.rank;
        let (q_len, _, _) = local_elements(&self.part, self.heads, rank);
        need(rank, "q", q.len(), q_len)?;
        let pairs: Vec<Pair> = self.schedule.steps.get(step).cloned().unwrap_or_default();
        for pair in pairs {
            let pv = pair_views(&self.part, self.layout, self.heads, rank, pair);
            let (k, v) = kv_of(kv, &self.part, self.heads, rank, step, pv.owner)?;
            let args = SegmentWalkArgs {
                q: q.slice(pv.q_off..),
                k: k.slice(pv.kv_off..),
                v: v.slice(pv.kv_off..),
                o_state: self.o_state.slice_mut(pv.q_off..),
                l_state: self.l_state.slice_mut(pv.row_off..),
                fresh: pair.is_diagonal(),
            };
            self.launcher
                .segment_walk(&self.kernel, pv.shape, args, self.scale)
                .map_err(|e| DistError::Device { rank, reason: e.to_string() })?;
            self.launched += 1;
        }
        Ok(())
    }

    /// Writes the local o (the spec's layout), rem and log2_rem (`[batch, heads, local_len]`) from the
    /// state after the last step. `v` is this rank's local v (the fused remainder adds each query
    /// token's own value).
    pub fn finish(
        &self,
        v: &CudaSlice<T>,
        o: &mut CudaSlice<T>,
        rem: &mut CudaSlice<f32>,
        log2_rem: &mut CudaSlice<f32>,
    ) -> Result<(), DistError> {
        let rank = self.schedule.rank;
        let n = self.part.local_len(rank);
        if n == 0 {
            return Ok(());
        }
        let h = self.heads;
        let shape = SegmentShape {
            batch: h.batch,
            heads: h.heads,
            kv_heads: h.kv_heads,
            head_dim: h.head_dim,
            q_len: n,
            kv_len: n,
            q_seq: n,
            kv_seq: n,
            offset: 0,
        };
        let fuse = self.kernel.manifest().spec.remainder == Remainder::Fuse;
        let args = SegmentFinishArgs {
            o_state: self.o_state.slice(..),
            l_state: self.l_state.slice(..),
            v_own: fuse.then(|| v.slice(..)),
            o: o.slice_mut(..),
            rem: rem.slice_mut(..),
            log2_rem: log2_rem.slice_mut(..),
        };
        self.launcher
            .segment_finish(&self.kernel, shape, args)
            .map_err(|e| DistError::Device { rank, reason: e.to_string() })?;
        Ok(())
    }

    /// Elements of this rank's local q-shaped and K/V-shaped tensors, and its rows.
    pub fn local_elements(&self) -> (usize, usize, usize) {
        local_elements(&self.part, self.heads, self.schedule.rank)
    }

    pub fn partition(&self) -> &Partition {
        &self.part
    }

    pub fn heads(&self) -> Heads {
        self.heads
    }

    pub fn launcher(&self) -> &Arc<Launcher> {
        &self.launcher
    }

    /// The state after the last step: o before any fused remainder (f32, the local q-shaped tensor)
    /// and log2 of the stick left per row: what the backward reads as `o_saved` and `log2_rem`.
    pub fn state(&self) -> (&CudaSlice<f32>, &CudaSlice<f32>) {
        (&self.o_state, &self.l_state)
    }
}

/// A row state of `len` f32 (at least one) filled with NaN: each pass writes it before reading it
/// (the first pair of a query segment is launched `fresh`), and any row that were read unwritten
/// would show as NaN in the outputs.
fn nan_filled(
    stream: &Arc<cudarc::driver::CudaStream>,
    len: usize,
) -> Result<CudaSlice<f32>, cudarc::driver::DriverError> {
    stream.clone_htod(&vec![f32::NAN; len.max(1)])
}

/// Elements of rank `rank`'s local q-shaped and K/V-shaped tensors, and its rows.
fn local_elements(part: &Partition, h: Heads, rank: usize) -> (usize, usize, usize) {
    let n = part.local_len(rank);
    (h.batch * h.heads * n * h.head_dim, h.batch * h.kv_heads * n * h.head_dim, h.batch * h.heads * n)
}

/// Refuses a view shorter than `needed` elements before it is cut (cudarc's `slice` panics past the
/// end; the launcher's own checks come after the cut).
fn need(rank: usize, tensor: &'static str, got: usize, needed: usize) -> Result<(), DistError> {
    if got < needed {
        return Err(DistError::Length {
            tensor,
            got,
            expected: format!("at least {needed} (rank {rank}'s local tensor)"),
        });
    }
    Ok(())
}

/// The K/V of `owner` from the caller, checked to be there and long enough.
fn kv_of<'a, T>(
    kv: &dyn Fn(usize) -> Option<(CudaView<'a, T>, CudaView<'a, T>)>,
    part: &Partition,
    heads: Heads,
    rank: usize,
    step: usize,
    owner: usize,
) -> Result<(CudaView<'a, T>, CudaView<'a, T>), DistError> {
    let (k, v) = kv(owner).ok_or_else(|| DistError::Transport {
        rank,
        reason: format!("step {step} needs the K/V of rank {owner}, which is not at hand"),
    })?;
    let (_, kv_len, _) = local_elements(part, heads, owner);
    need(rank, "k", k.len(), kv_len)?;
    need(rank, "v", v.len(), kv_len)?;
    Ok((k, v))
}

/// Where one pair's views start and how they are spaced.
struct PairViews {
    shape: SegmentShape,
    /// Element offsets of the query segment in q-shaped local tensors, of its rows in per-row ones,
    /// and of the key segment in its owner's K/V-shaped local tensors.
    q_off: usize,
    row_off: usize,
    kv_off: usize,
    owner: usize,
}

fn pair_views(part: &Partition, layout: Layout, h: Heads, rank: usize, pair: Pair) -> PairViews {
    let (qs, ks) = (part.segment(pair.query), part.segment(pair.key));
    let owner = part.owner(pair.key);
    let token = |t: usize, heads: usize| match layout {
        Layout::Bnhd => t * heads * h.head_dim,
        _ => t * h.head_dim,
    };
    let (q_at, kv_at) = (part.local_offset(pair.query), part.local_offset(pair.key));
    PairViews {
        shape: SegmentShape {
            batch: h.batch,
            heads: h.heads,
            kv_heads: h.kv_heads,
            head_dim: h.head_dim,
            q_len: qs.len(),
            kv_len: ks.len(),
            q_seq: part.local_len(rank),
            kv_seq: part.local_len(owner),
            offset: qs.start - ks.start,
        },
        q_off: token(q_at, h.heads),
        row_off: q_at,
        kv_off: token(kv_at, h.kv_heads),
        owner,
    }
}

/// What a rank's backward reads besides the K/V it is handed: its local q, dO, the forward's final
/// f32 o and log2 of the stick (`RankForward::state`), dRem (`None`: no gradient into rem) and, with a
/// fused remainder, its local v.
pub struct BackwardInputs<'a, T> {
    pub q: &'a CudaSlice<T>,
    pub d_o: &'a CudaSlice<T>,
    pub o_saved: &'a CudaSlice<f32>,
    pub log2_rem: &'a CudaSlice<f32>,
    pub d_rem: Option<&'a CudaSlice<f32>>,
    pub v: &'a CudaSlice<T>,
}

/// One rank's backward: its row state (dQ, log2 of the stick, sum of g) between launches, and an f32
/// dK/dV partial for each rank's K/V (K/V-shaped like that rank's local tensors), which the ring sums
/// at their owners (one NCCL reduce per owner).
pub struct RankBackward<T> {
    launcher: Arc<Launcher>,
    kernel: Arc<KernelBinary>,
    part: Partition,
    schedule: Schedule,
    heads: Heads,
    layout: Layout,
    scale: Option<f32>,
    dq_state: CudaSlice<f32>,
    l_state: CudaSlice<f32>,
    s_state: CudaSlice<f32>,
    partials: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    pub launched: usize,
    _element: std::marker::PhantomData<T>,
}

impl<T: SbElement> RankBackward<T> {
    /// Allocates rank `rank`'s state and partials for `kernel` (a `Pass::SegmentBackward` kernel).
    pub fn new(
        launcher: Arc<Launcher>,
        kernel: Arc<KernelBinary>,
        part: &Partition,
        rank: usize,
        heads: Heads,
        scale: Option<f32>,
    ) -> Result<Self, DistError> {
        let spec = check_rank(&kernel, Pass::SegmentBackward, part, rank, heads)?;
        let stream = launcher.stream().clone();
        let device = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
        let n = part.local_len(rank);
        let rows = heads.batch * heads.heads * n;
        let dq_state = nan_filled(&stream, rows * heads.head_dim).map_err(device)?;
        let l_state = nan_filled(&stream, rows).map_err(device)?;
        let s_state = nan_filled(&stream, rows).map_err(device)?;
        let schedule = Schedule::new(part, rank);
        let mut partials = Vec::with_capacity(part.ranks());
        for owner in 0..part.ranks() {
            // Full size for every owner, walked or not: a collective reduce takes the same count on
            // every rank.
            let len = heads.batch * heads.kv_heads * part.local_len(owner) * heads.head_dim;
            let dk = stream.alloc_zeros::<f32>(len.max(1)).map_err(device)?;
            let dv = stream.alloc_zeros::<f32>(len.max(1)).map_err(device)?;
            partials.push((dk, dv));
        }
        Ok(RankBackward {
            launcher,
            kernel,
            part: part.clone(),
            schedule,
            heads,
            layout: spec.layout,
            scale,
            dq_state,
            l_state,
            s_state,
            partials,
            launched: 0,
            _element: std::marker::PhantomData,
        })
    }

    /// Zeroes the partials for a new backward (the row state is written by each query segment's
    /// first pair, its diagonal, launched `fresh`).
    pub fn reset(&mut self) -> Result<(), DistError> {
        let rank = self.schedule.rank;
        let stream = self.launcher.stream().clone();
        let device = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
        for (dk, dv) in &mut self.partials {
            stream.memset_zeros(dk).map_err(device)?;
            stream.memset_zeros(dv).map_err(device)?;
        }
        self.launched = 0;
        Ok(())
    }

    /// Launches ring step `step`'s pairs, in the forward's order, adding into the partials of the
    /// K/V's owners. `kv(owner)` as in [`RankForward::step`].
    pub fn step<'a>(
        &mut self,
        step: usize,
        x: &BackwardInputs<'_, T>,
        kv: &dyn Fn(usize) -> Option<(CudaView<'a, T>, CudaView<'a, T>)>,
    ) -> Result<(), DistError> {
        let rank = self.schedule.rank;
        let fuse = self.kernel.manifest().spec.remainder == Remainder::Fuse;
        let (q_len, kv_len, rows) = local_elements(&self.part, self.heads, rank);
        need(rank, "q", x.q.len(), q_len)?;
        need(rank, "d_o", x.d_o.len(), q_len)?;
        need(rank, "o_saved", x.o_saved.len(), q_len)?;
        need(rank, "log2_rem", x.log2_rem.len(), rows)?;
        if let Some(d_rem) = x.d_rem {
            need(rank, "d_rem", d_rem.len(), rows)?;
        }
        if fuse {
            need(rank, "v", x.v.len(), kv_len)?;
        }
        let pairs: Vec<Pair> = self.schedule.steps.get(step).cloned().unwrap_or_default();
        for pair in pairs {
            let pv = pair_views(&self.part, self.layout, self.heads, rank, pair);
            let (k, v) = kv_of(kv, &self.part, self.heads, rank, step, pv.owner)?;
            // The query tokens' own values: this rank's v at the query segment, K/V-shaped.
            let own_off = match self.layout {
                Layout::Bnhd => pv.row_off * self.heads.kv_heads * self.heads.head_dim,
                _ => pv.row_off * self.heads.head_dim,
            };
            let (dk_acc, dv_acc) = &mut self.partials[pv.owner];
            let args = SegmentBwdWalkArgs {
                q: x.q.slice(pv.q_off..),
                k: k.slice(pv.kv_off..),
                v: v.slice(pv.kv_off..),
                o_saved: x.o_saved.slice(pv.q_off..),
                log2_rem: x.log2_rem.slice(pv.row_off..),
                d_o: x.d_o.slice(pv.q_off..),
                d_rem: x.d_rem.map(|d| d.slice(pv.row_off..)),
                v_own: fuse.then(|| x.v.slice(own_off..)),
                dq_state: self.dq_state.slice_mut(pv.q_off..),
                l_state: self.l_state.slice_mut(pv.row_off..),
                s_state: self.s_state.slice_mut(pv.row_off..),
                dk_accum: dk_acc.slice_mut(pv.kv_off..),
                dv_accum: dv_acc.slice_mut(pv.kv_off..),
                fresh: pair.is_diagonal(),
            };
            self.launcher
                .segment_backward_walk(&self.kernel, pv.shape, args, self.scale)
                .map_err(|e| DistError::Device { rank, reason: e.to_string() })?;
            self.launched += 1;
        }
        Ok(())
    }

    /// This rank's f32 dK, dV partials for the K/V of `owner` (what the reduce at `owner` sums).
    pub fn partial(&self, owner: usize) -> Option<&(CudaSlice<f32>, CudaSlice<f32>)> {
        self.partials.get(owner)
    }

    /// Every owner's partials, for a collective that sums them in place at their owners.
    pub fn partials_mut(&mut self) -> &mut [(CudaSlice<f32>, CudaSlice<f32>)] {
        &mut self.partials
    }

    pub fn partition(&self) -> &Partition {
        &self.part
    }

    pub fn heads(&self) -> Heads {
        self.heads
    }

    pub fn launcher(&self) -> &Arc<Launcher> {
        &self.launcher
    }

    /// Writes dK and dV from `dk_sum`, `dv_sum` (the sums over every rank of the partials for this
    /// rank's K/V) and dQ from the state.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        dk_sum: &CudaSlice<f32>,
        dv_sum: &CudaSlice<f32>,
        x: &BackwardInputs<'_, T>,
        dq: &mut CudaSlice<T>,
        dk: &mut CudaSlice<T>,
        dv: &mut CudaSlice<T>,
    ) -> Result<(), DistError> {
        let rank = self.schedule.rank;
        let h = self.heads;
        let local = LocalShape {
            batch: h.batch,
            heads: h.heads,
            kv_heads: h.kv_heads,
            head_dim: h.head_dim,
            seq: self.part.local_len(rank),
        };
        if local.seq == 0 {
            return Ok(());
        }
        let args = SegmentBwdFinishArgs {
            dk_accum: dk_sum.slice(..),
            dv_accum: dv_sum.slice(..),
            log2_rem: x.log2_rem.slice(..),
            d_o: x.d_o.slice(..),
            dq_state: self.dq_state.slice(..),
            dk: dk.slice_mut(..),
            dv: dv.slice_mut(..),
            dq: dq.slice_mut(..),
        };
        self.launcher
            .segment_backward_finish(&self.kernel, local, args, self.scale)
            .map_err(|e| DistError::Device { rank, reason: e.to_string() })
    }
}
