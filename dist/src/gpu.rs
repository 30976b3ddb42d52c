//! One rank's context-parallel forward on its GPU (feature `cuda`): each segment pair of the rank's
//! [`Schedule`] is one launch of the segment pass (`Pass::Segment`), whose rows continue from the
//! f32 state (o, log2 of the stick left) the nearer key segments left; after the last step one
//! finishing launch writes o, rem and log2_rem (docs/math.md#context-parallelism).
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
use sbgen::ir::{Arch, Kernel, Schedule as KernelSchedule};
use sbgen_runtime::launcher::{KernelBinary, Launcher, SbElement, SegmentFinishArgs, SegmentShape, SegmentWalkArgs};
use sbgen_runtime::spec::{Layout, Pass, Remainder, Spec};
use std::sync::Arc;

/// The segment-pass kernel for a forward `spec` (its mask, remainder, early exit, dtype, head dim and
/// layout) at the forward's default schedule, lowered for `arch`; the launcher compiles its source with
/// NVRTC at the first launch.
pub fn segment_kernel(spec: Spec, arch: Arch) -> Result<KernelBinary, DistError> {
    let spec = Spec { pass: Pass::Segment, deterministic: false, ..spec };
    spec.validate().map_err(|e| invalid("spec", spec.slug(), &e.to_string()))?;
    let kernel = Kernel::new(spec, KernelSchedule::default_on(&spec, arch), arch);
    let lowered = sbgen::lower::lower(&kernel).map_err(|e| invalid("spec", spec.slug(), &e.to_string()))?;
    Ok(KernelBinary::new(lowered.manifest, Vec::new(), Some(lowered.cuda_source)))
}

/// The device's arch as sbgen names it.
pub fn device_arch(launcher: &Launcher) -> Result<Arch, DistError> {
    let (major, minor) = launcher.store().compute_capability();
    Arch::for_device(major, minor)
        .ok_or_else(|| invalid("device", format!("compute capability {major}.{minor}"), "8.0 or newer (sm_80, sm_90)"))
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
    /// Allocates rank `rank`'s state for `kernel` (from [`segment_kernel`]). `scale` defaults to
    /// 1/sqrt(head_dim).
    pub fn new(
        launcher: Arc<Launcher>,
        kernel: Arc<KernelBinary>,
        part: &Partition,
        rank: usize,
        heads: Heads,
        scale: Option<f32>,
    ) -> Result<Self, DistError> {
        heads.check()?;
        if rank >= part.ranks() {
            return Err(invalid("rank", rank, &format!("0..{}", part.ranks())));
        }
        let spec = kernel.manifest().spec;
        if spec.pass != Pass::Segment {
            return Err(invalid("kernel", &kernel.manifest().name, "a segment-pass kernel (segment_kernel)"));
        }
        if spec.head_dim as usize != heads.head_dim {
            return Err(invalid("head_dim", heads.head_dim, &format!("the kernel's, {}", spec.head_dim)));
        }
        // A segment's views start inside the local tensors: 16-byte aligned only when a token's row is.
        if heads.head_dim % 8 != 0 {
            return Err(invalid("head_dim", heads.head_dim, "a multiple of 8 (segments start on 16-byte rows)"));
        }
        let n = part.local_len(rank);
        let rows = heads.batch * heads.heads * n;
        let stream = launcher.stream().clone();
        let device = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
        let o_state = stream.alloc_zeros::<f32>((rows * heads.head_dim).max(1)).map_err(device)?;
        let l_state = stream.alloc_zeros::<f32>(rows.max(1)).map_err(device)?;
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

    /// Zeroes the state for a new forward (a fresh [`RankForward`] starts zeroed).
    pub fn reset(&mut self) -> Result<(), DistError> {
        let rank = self.schedule.rank;
        let stream = self.launcher.stream();
        let device = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
        stream.memset_zeros(&mut self.o_state).map_err(device)?;
        stream.memset_zeros(&mut self.l_state).map_err(device)?;
        self.launched = 0;
        Ok(())
    }

    /// Elements from a local tensor's start to token `token` of its first head or sequence.
    fn token_offset(&self, token: usize, heads: usize) -> usize {
        match self.layout {
            Layout::Bnhd => token * heads * self.heads.head_dim,
            _ => token * self.heads.head_dim,
        }
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
        let pairs: Vec<Pair> = self.schedule.steps.get(step).cloned().unwrap_or_default();
        let h = self.heads;
        for pair in pairs {
            let (qs, ks) = (self.part.segment(pair.query), self.part.segment(pair.key));
            let owner = self.part.owner(pair.key);
            let (k, v) = kv(owner).ok_or_else(|| DistError::Transport {
                rank,
                reason: format!("step {step} needs the K/V of rank {owner}, which is not at hand"),
            })?;
            let n_q = self.part.local_len(rank);
            let n_kv = self.part.local_len(owner);
            let shape = SegmentShape {
                batch: h.batch,
                heads: h.heads,
                kv_heads: h.kv_heads,
                head_dim: h.head_dim,
                q_len: qs.len(),
                kv_len: ks.len(),
                q_seq: n_q,
                kv_seq: n_kv,
                offset: qs.start - ks.start,
            };
            let (q_at, kv_at) = (self.part.local_offset(pair.query), self.part.local_offset(pair.key));
            let q_off = self.token_offset(q_at, h.heads);
            let kv_off = self.token_offset(kv_at, h.kv_heads);
            let o_off = self.token_offset(q_at, h.heads);
            let args = SegmentWalkArgs {
                q: q.slice(q_off..),
                k: k.slice(kv_off..),
                v: v.slice(kv_off..),
                o_state: self.o_state.slice_mut(o_off..),
                l_state: self.l_state.slice_mut(q_at..),
            };
            self.launcher
                .segment_walk(&self.kernel, shape, args, self.scale)
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
        let n = self.part.local_len(self.schedule.rank);
        let h = self.heads;
        (h.batch * h.heads * n * h.head_dim, h.batch * h.kv_heads * n * h.head_dim, h.batch * h.heads * n)
    }

    /// The state's f32 elements (for a caller that checks how much memory a rank holds).
    pub fn state_len(&self) -> usize {
        self.o_state.len() + self.l_state.len()
    }
}
