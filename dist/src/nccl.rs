//! The ring over NCCL (cudarc's `nccl` feature): one thread per GPU of this host, each with its own
//! communicator, and each shift on a stream of its own so that it overlaps the compute stream's
//! kernels (docs/math.md#context-parallelism). Several hosts are NCCL's own bootstrap: the same
//! ranks with an [`Id`] shared over the network instead of in memory.
//!
//! cudarc looks for `libnccl.so` (and a few versioned names, not `libnccl.so.2`): where only
//! `libnccl.so.2` exists, a folder on `LD_LIBRARY_PATH` with a `libnccl.so` link to it does.

use crate::error::DistError;
use crate::gpu::{BackwardInputs, RankBackward, RankForward};
use crate::partition::Partition;
use crate::ring::Heads;
use crate::schedule::Schedule;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, DeviceRepr};
use cudarc::nccl::result::{group_end, group_start};
use cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use sbgen_runtime::launcher::{Launcher, SbElement};
use std::sync::Arc;

/// One rank of a ring of GPUs in this process.
pub struct NcclRank {
    rank: usize,
    ranks: usize,
    comm: Comm,
    compute: Arc<CudaStream>,
}

impl NcclRank {
    /// Runs `body` on `ranks` threads, rank r on GPU r with its communicator, and returns the
    /// results in rank order. Fails before starting when the host has fewer GPUs than `ranks`.
    pub fn run<R: Send>(
        ranks: usize,
        body: impl Fn(&mut NcclRank) -> Result<R, DistError> + Sync,
    ) -> Result<Vec<Result<R, DistError>>, DistError> {
        let devices = CudaContext::device_count().map_err(|e| device_error(0, e))?;
        if ranks == 0 || ranks > devices as usize {
            return Err(DistError::Invalid {
                field: "ranks",
                got: ranks.to_string(),
                allowed: format!("1..={devices}, the GPUs of this host"),
            });
        }
        let id = Id::new().map_err(|e| nccl_error(0, e))?;
        let id = *id.internal();
        let body = &body;
        Ok(std::thread::scope(|scope| {
            let handles: Vec<_> = (0..ranks)
                .map(|rank| {
                    scope.spawn(move || {
                        let ctx = CudaContext::new(rank).map_err(|e| device_error(rank, e))?;
                        let compute = ctx.new_stream().map_err(|e| device_error(rank, e))?;
                        let comm_stream = ctx.new_stream().map_err(|e| device_error(rank, e))?;
                        // Blocks until every rank has joined.
                        let comm = Comm::from_rank(comm_stream, rank, ranks, Id::uninit(id))
                            .map_err(|e| nccl_error(rank, e))?;
                        body(&mut NcclRank { rank, ranks, comm, compute })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
        }))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// The stream the rank's kernels run on.
    pub fn compute_stream(&self) -> &Arc<CudaStream> {
        &self.compute
    }

    /// Starts a shift: once the compute stream's work so far is done (so `send` is written and
    /// `recv` no longer read), sends `send` to rank + 1 and receives `recv` from rank - 1, on the
    /// communication stream. Every rank must start its shifts in the same order, with `recv` as long
    /// as what rank - 1 sends.
    pub fn start_shift<T: NcclType + DeviceRepr>(
        &self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<(), DistError> {
        let comm_stream = self.comm.stream();
        comm_stream.join(&self.compute).map_err(|e| device_error(self.rank, e))?;
        let next = ((self.rank + 1) % self.ranks) as i32;
        let prev = ((self.rank + self.ranks - 1) % self.ranks) as i32;
        group_start().map_err(|e| nccl_error(self.rank, e))?;
        let sent = self.comm.send(send, next);
        let received = self.comm.recv(recv, prev);
        // The group must be closed whatever happened inside it.
        group_end().map_err(|e| nccl_error(self.rank, e))?;
        sent.map_err(|e| nccl_error(self.rank, e))?;
        received.map_err(|e| nccl_error(self.rank, e))?;
        Ok(())
    }

    /// Makes the compute stream wait for the shift started last (the host does not wait).
    pub fn finish_shift(&self) -> Result<(), DistError> {
        self.compute.join(&self.comm.stream()).map_err(|e| device_error(self.rank, e))
    }
}

fn device_error(rank: usize, e: cudarc::driver::DriverError) -> DistError {
    DistError::Device { rank, reason: e.to_string() }
}

fn nccl_error(rank: usize, e: cudarc::nccl::result::NcclError) -> DistError {
    DistError::Transport { rank, reason: format!("NCCL: {e:?}") }
}

/// The K and V of `n` elements each in a ring buffer (K from 0, V from `half`).
fn halves<T>(b: &CudaSlice<T>, n: usize, half: usize) -> (CudaView<'_, T>, CudaView<'_, T>) {
    (b.slice(..n), b.slice(half..half + n))
}

/// A rank's K/V on the move: two buffers of K then V (each sized for the largest rank's local K/V,
/// so every rank sends and receives the same count), and copies of the K/V a zig-zag schedule over
/// more than two ranks reads after it has passed on.
struct KvRing<T> {
    bufs: [CudaSlice<T>; 2],
    kept: Vec<Option<CudaSlice<T>>>,
    half: usize,
}

impl NcclRank {
    /// K/V elements of rank `owner`'s local tensors.
    fn kv_len(part: &Partition, heads: Heads, owner: usize) -> usize {
        heads.batch * heads.kv_heads * part.local_len(owner) * heads.head_dim
    }

    fn new_ring<T: SbElement>(
        &self,
        part: &Partition,
        heads: Heads,
        schedule: &Schedule,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
    ) -> Result<KvRing<T>, DistError> {
        let s = &self.compute;
        let dev = |e| device_error(self.rank, e);
        let half = (0..self.ranks).map(|o| Self::kv_len(part, heads, o)).max().unwrap_or(0).max(1);
        let mut own = s.alloc_zeros::<T>(2 * half).map_err(dev)?;
        let n = Self::kv_len(part, heads, self.rank);
        for (tensor, x) in [("k", k), ("v", v)] {
            if x.len() < n {
                return Err(DistError::Length {
                    tensor,
                    got: x.len(),
                    expected: format!("at least {n} (rank {}'s local tensor)", self.rank),
                });
            }
        }
        s.memcpy_dtod(&k.slice(..n), &mut own.slice_mut(..n)).map_err(dev)?;
        s.memcpy_dtod(&v.slice(..n), &mut own.slice_mut(half..half + n)).map_err(dev)?;
        let other = s.alloc_zeros::<T>(2 * half).map_err(dev)?;
        let mut kept = (0..self.ranks).map(|_| None).collect::<Vec<_>>();
        for o in schedule.kept() {
            kept[o] = Some(s.alloc_zeros::<T>(2 * half).map_err(dev)?);
        }
        Ok(KvRing { bufs: [own, other], kept, half })
    }

    /// Walks the ring's P steps: at step s the buffer in hand holds the K/V of rank (rank - s) mod P;
    /// its shift to the next rank runs on the communication stream while `step` launches the step's
    /// pairs on the compute stream; the compute stream waits for the shift before the next step.
    fn walk_ring<T: SbElement + NcclType>(
        &self,
        part: &Partition,
        heads: Heads,
        ring: &mut KvRing<T>,
        own: (&CudaSlice<T>, &CudaSlice<T>),
        mut step: impl for<'k> FnMut(
            usize,
            &dyn Fn(usize) -> Option<(CudaView<'k, T>, CudaView<'k, T>)>,
        ) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        let ranks = self.ranks;
        for s in 0..ranks {
            let holder = crate::schedule::holder_at(ranks, self.rank, s);
            let cur = s % 2;
            if s + 1 < ranks {
                let [a, b] = &mut ring.bufs;
                let (send, recv) = if cur == 0 { (&*a, b) } else { (&*b, a) };
                self.start_shift(send, recv)?;
            }
            {
                let half = ring.half;
                let bufs = &ring.bufs;
                let kept = &ring.kept;
                let kv = |owner: usize| {
                    let n = Self::kv_len(part, heads, owner);
                    if owner == holder {
                        Some(halves(&bufs[cur], n, half))
                    } else if owner == self.rank {
                        Some((own.0.slice(..n), own.1.slice(..n)))
                    } else {
                        kept.get(owner).and_then(|k| k.as_ref()).map(|b| halves(b, n, half))
                    }
                };
                step(s, &kv)?;
            }
            if let Some(Some(slot)) = ring.kept.get_mut(holder) {
                self.compute.memcpy_dtod(&ring.bufs[cur], slot).map_err(|e| device_error(self.rank, e))?;
            }
            if s + 1 < ranks {
                self.finish_shift()?;
            }
        }
        Ok(())
    }

    /// The rank's launches must go to this rank's compute stream.
    fn check_stream(&self, launcher: &Launcher) -> Result<(), DistError> {
        if !Arc::ptr_eq(launcher.stream(), &self.compute) {
            return Err(DistError::Invalid {
                field: "launcher",
                got: "a launcher on another stream".into(),
                allowed: "a launcher on this rank's compute stream (NcclRank::compute_stream)".into(),
            });
        }
        Ok(())
    }

    /// This rank's part of the forward over the ring: its local q, k, v (the spec's layout; see
    /// [`crate::gpu`]) in, its local o, rem and log2_rem out, for the partition and heads `fwd` was
    /// made for; `fwd` must launch on this rank's compute stream. Asynchronous: the compute stream
    /// holds the work when this returns.
    pub fn ring_forward<T: SbElement + NcclType>(
        &self,
        fwd: &mut RankForward<T>,
        qkv: (&CudaSlice<T>, &CudaSlice<T>, &CudaSlice<T>),
        o: &mut CudaSlice<T>,
        rem: &mut CudaSlice<f32>,
        log2_rem: &mut CudaSlice<f32>,
    ) -> Result<(), DistError> {
        self.check_stream(fwd.launcher())?;
        let (q, k, v) = qkv;
        let (part, heads) = (fwd.partition().clone(), fwd.heads());
        fwd.reset()?;
        let mut ring = self.new_ring(&part, heads, fwd.schedule(), k, v)?;
        self.walk_ring(&part, heads, &mut ring, (k, v), |s, kv| fwd.step(s, q, kv))?;
        fwd.finish(v, o, rem, log2_rem)
    }

    /// This rank's part of the backward over the ring: the K/V travel again, every rank adds into
    /// its partials, NCCL sums each owner's partials at its owner (one reduce per owner, grouped),
    /// and the rank writes its dq, dk, dv. Asynchronous as [`NcclRank::ring_forward`].
    pub fn ring_backward<T: SbElement + NcclType>(
        &self,
        bwd: &mut RankBackward<T>,
        kv: (&CudaSlice<T>, &CudaSlice<T>),
        x: &BackwardInputs<'_, T>,
        dq: &mut CudaSlice<T>,
        dk: &mut CudaSlice<T>,
        dv: &mut CudaSlice<T>,
    ) -> Result<(), DistError> {
        self.check_stream(bwd.launcher())?;
        let (k, v) = kv;
        let (part, heads) = (bwd.partition().clone(), bwd.heads());
        bwd.reset()?;
        let schedule = Schedule::new(&part, self.rank);
        let mut ring = self.new_ring(&part, heads, &schedule, k, v)?;
        self.walk_ring(&part, heads, &mut ring, (k, v), |s, kv| bwd.step(s, x, kv))?;
        // The partials: summed at their owners, on the communication stream after the walk.
        let comm_stream = self.comm.stream();
        comm_stream.join(&self.compute).map_err(|e| device_error(self.rank, e))?;
        group_start().map_err(|e| nccl_error(self.rank, e))?;
        let mut result = Ok(());
        for (owner, (pk, pv)) in bwd.partials_mut().iter_mut().enumerate() {
            for p in [pk, pv] {
                if let Err(e) = self.comm.reduce_in_place(p, &ReduceOp::Sum, owner as i32) {
                    result = Err(nccl_error(self.rank, e));
                }
            }
        }
        group_end().map_err(|e| nccl_error(self.rank, e))?;
        result?;
        self.finish_shift()?;
        let (sk, sv) = bwd
            .partial(self.rank)
            .ok_or_else(|| DistError::Transport { rank: self.rank, reason: "no partial for its own K/V".into() })?;
        bwd.finish(sk, sv, x, dq, dk, dv)
    }
}
