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
use crate::shifts::{shift_plan, Held};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, CudaView, DeviceRepr};
use cudarc::nccl::result::{group_end, group_start};
use cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use sbgen_runtime::launcher::{Launcher, SbElement};
use std::any::Any;
use std::cell::RefCell;
use std::sync::Arc;

/// One rank of a ring of GPUs in this process.
pub struct NcclRank {
    rank: usize,
    ranks: usize,
    comm: Comm,
    compute: Arc<CudaStream>,
    /// The ring buffers of the last pass (a `KvRing<T>`), reused by the next one that fits.
    ring: RefCell<Option<Box<dyn Any>>>,
}

impl NcclRank {
    /// Runs `body` on `ranks` threads, rank r on GPU r with its communicator, and returns the
    /// results in rank order. Fails before starting when the host has fewer GPUs than `ranks`.
    /// With cudarc's `dynamic-loading`, a missing `libnccl.so` is a panic in cudarc at the first
    /// NCCL call: binaries check `cudarc::nccl::sys::is_culib_present()` first (`sbgen bench` does).
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
                        body(&mut NcclRank { rank, ranks, comm, compute, ring: RefCell::new(None) })
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
        self.grouped(|comm, next, prev| {
            comm.send(send, next)?;
            comm.recv(recv, prev).map(|_| ())
        })
    }

    /// Issues `ops` (given the communicator and the next and previous ranks) as one NCCL group on
    /// the communication stream, once the compute stream's work so far is done.
    fn grouped(
        &self,
        ops: impl FnOnce(&Comm, i32, i32) -> Result<(), cudarc::nccl::result::NcclError>,
    ) -> Result<(), DistError> {
        self.comm.stream().join(&self.compute).map_err(|e| device_error(self.rank, e))?;
        let next = ((self.rank + 1) % self.ranks) as i32;
        let prev = ((self.rank + self.ranks - 1) % self.ranks) as i32;
        group_start().map_err(|e| nccl_error(self.rank, e))?;
        let result = ops(&self.comm, next, prev);
        // The group must be closed whatever happened inside it.
        group_end().map_err(|e| nccl_error(self.rank, e))?;
        result.map_err(|e| nccl_error(self.rank, e))
    }

    /// Whether every rank is ready: each says `ok`, and all learn whether all said so (an NCCL
    /// all-reduce of one integer, min; the host waits for it). A rank whose setup failed calls it
    /// too, so that the others stop rather than wait for it in the ring.
    pub fn agree(&self, ok: bool) -> Result<bool, DistError> {
        let dev = |e| device_error(self.rank, e);
        let mut flag = self.compute.clone_htod(&[i32::from(ok)]).map_err(dev)?;
        self.grouped(|comm, _, _| comm.all_reduce_in_place(&mut flag, &ReduceOp::Min).map(|_| ()))?;
        self.finish_shift()?;
        let all = self.compute.clone_dtoh(&flag).map_err(dev)?;
        Ok(all.first() == Some(&1))
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

/// A rank's K/V on the move: two buffers of K then V (each with room for the largest rank's local
/// K/V; a shift sends the exact count of the K/V it carries), and copies of the K/V a zig-zag
/// schedule over more than two ranks reads after it has passed on. Kept by the rank between ring
/// passes ([`NcclRank`]'s cache), so a pass allocates and zeroes nothing.
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

    /// The rank's ring buffers for `part` and `heads`: the cached ones when they fit (same element
    /// type, size and kept owners), else new ones.
    fn take_ring<T: SbElement + 'static>(
        &self,
        part: &Partition,
        heads: Heads,
        schedule: &Schedule,
    ) -> Result<KvRing<T>, DistError> {
        let half = (0..self.ranks).map(|o| Self::kv_len(part, heads, o)).max().unwrap_or(0).max(1);
        let kept = schedule.kept();
        if let Some(cached) = self.ring.borrow_mut().take() {
            if let Ok(ring) = cached.downcast::<KvRing<T>>() {
                let fits = ring.half == half
                    && ring.kept.len() == self.ranks
                    && (0..self.ranks).all(|o| ring.kept[o].is_some() == kept.contains(&o));
                if fits {
                    return Ok(*ring);
                }
            }
        }
        let s = &self.compute;
        let dev = |e| device_error(self.rank, e);
        // Zeroed once, when allocated: the room past a rank's K/V is never read.
        let bufs = [s.alloc_zeros::<T>(2 * half).map_err(dev)?, s.alloc_zeros::<T>(2 * half).map_err(dev)?];
        let mut slots = (0..self.ranks).map(|_| None).collect::<Vec<_>>();
        for o in kept {
            slots[o] = Some(s.alloc_zeros::<T>(2 * half).map_err(dev)?);
        }
        Ok(KvRing { bufs, kept: slots, half })
    }

    /// Sends `send` (K then V, the K/V in hand) to rank + 1 and receives the K/V of `n_in` elements
    /// each from rank - 1 into `recv` (K from 0, V from `half`), on the communication stream once the
    /// compute stream's work so far is done (so the K/V sent is written and `recv` no longer read).
    fn shift_kv<T: NcclType + DeviceRepr>(
        &self,
        send: (CudaView<'_, T>, CudaView<'_, T>),
        recv: &mut CudaSlice<T>,
        n_in: usize,
        half: usize,
    ) -> Result<(), DistError> {
        self.grouped(|comm, next, prev| {
            // Point-to-point operations between two ranks match in the order they are issued.
            comm.send(&send.0, next)?;
            comm.send(&send.1, next)?;
            comm.recv(&mut recv.slice_mut(..n_in), prev)?;
            comm.recv(&mut recv.slice_mut(half..half + n_in), prev).map(|_| ())
        })
    }

    /// Walks the ring's P steps: at step s the rank holds the K/V of rank (rank - s) mod P (step 0:
    /// its own `k` and `v`, sent from where they are; later steps: the buffer received last). The
    /// shift of what it holds to the next rank runs on the communication stream while `step`
    /// launches the step's pairs on the compute stream; the compute stream waits for the shift
    /// before the next step.
    fn walk_ring<T: SbElement + NcclType + 'static>(
        &self,
        part: &Partition,
        heads: Heads,
        schedule: &Schedule,
        own: (&CudaSlice<T>, &CudaSlice<T>),
        mut step: impl for<'k> FnMut(
            usize,
            &dyn Fn(usize) -> Option<(CudaView<'k, T>, CudaView<'k, T>)>,
        ) -> Result<(), DistError>,
    ) -> Result<(), DistError> {
        let ranks = self.ranks;
        let n_own = Self::kv_len(part, heads, self.rank);
        for (tensor, x) in [("k", own.0), ("v", own.1)] {
            if x.len() < n_own {
                return Err(DistError::Length {
                    tensor,
                    got: x.len(),
                    expected: format!("at least {n_own} (rank {}'s local tensor)", self.rank),
                });
            }
        }
        let mut ring = self.take_ring::<T>(part, heads, schedule)?;
        let half = ring.half;
        let plan = shift_plan(ranks, self.rank, &schedule.kept());
        let mut walk = || -> Result<(), DistError> {
            for (s, st) in plan.iter().enumerate() {
                let n_hold = Self::kv_len(part, heads, st.holder);
                if let Some((from, into)) = st.receive {
                    let n_in = Self::kv_len(part, heads, from);
                    let [b0, b1] = &mut ring.bufs;
                    let (other, recv) = if into == 0 { (&*b1, b0) } else { (&*b0, b1) };
                    let send = match st.held {
                        Held::Own => (own.0.slice(..n_own), own.1.slice(..n_own)),
                        // The plan never receives into the buffer it sends from.
                        Held::Buffer(_) => halves(other, n_hold, half),
                    };
                    self.shift_kv(send, recv, n_in, half)?;
                }
                {
                    let bufs = &ring.bufs;
                    let kept = &ring.kept;
                    let kv = |owner: usize| {
                        let n = Self::kv_len(part, heads, owner);
                        match st.held {
                            _ if owner == self.rank => Some((own.0.slice(..n), own.1.slice(..n))),
                            Held::Buffer(b) if owner == st.holder => Some(halves(&bufs[b], n, half)),
                            _ => kept.get(owner).and_then(|k| k.as_ref()).map(|b| halves(b, n, half)),
                        }
                    };
                    step(s, &kv)?;
                }
                if let (true, Held::Buffer(b)) = (st.keep, st.held) {
                    let dev = |e| device_error(self.rank, e);
                    let [b0, b1] = &ring.bufs;
                    let from = if b == 0 { b0 } else { b1 };
                    if let Some(Some(slot)) = ring.kept.get_mut(st.holder) {
                        // K and V, the holder's counts only.
                        self.compute.memcpy_dtod(&from.slice(..n_hold), &mut slot.slice_mut(..n_hold)).map_err(dev)?;
                        self.compute
                            .memcpy_dtod(&from.slice(half..half + n_hold), &mut slot.slice_mut(half..half + n_hold))
                            .map_err(dev)?;
                    }
                }
                if st.receive.is_some() {
                    self.finish_shift()?;
                }
            }
            Ok(())
        };
        let result = walk();
        *self.ring.borrow_mut() = Some(Box::new(ring));
        result
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
    pub fn ring_forward<T: SbElement + NcclType + 'static>(
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
        let schedule = fwd.schedule().clone();
        self.walk_ring(&part, heads, &schedule, (k, v), |s, kv| fwd.step(s, q, kv))?;
        fwd.finish(v, o, rem, log2_rem)
    }

    /// The transfers of a ring pass alone, no kernels: [`NcclRank::ring_forward`]'s K/V shifts (and
    /// kept copies) for `part` and `heads`, this rank's `k` and `v` sent first, and with `partials`
    /// (the backward's, [`RankBackward::partials_mut`]) also the reduces that
    /// [`NcclRank::ring_backward`] ends with. Issued on the compute stream's timeline (it waits for
    /// them), so events recorded there around the call time the communication alone.
    pub fn ring_transfers<T: SbElement + NcclType + 'static>(
        &self,
        part: &Partition,
        heads: Heads,
        kv: (&CudaSlice<T>, &CudaSlice<T>),
        partials: Option<&mut [(CudaSlice<f32>, CudaSlice<f32>)]>,
    ) -> Result<(), DistError> {
        let schedule = Schedule::new(part, self.rank);
        self.walk_ring(part, heads, &schedule, kv, |_, _| Ok(()))?;
        if let Some(partials) = partials {
            self.reduce_partials(partials.iter_mut().map(|(k, v)| (k, v)))?;
        }
        Ok(())
    }

    /// Sums every owner's dK/dV partials at that owner (NCCL reduces, grouped), on the communication
    /// stream once the compute stream's work so far is done; the compute stream waits for them.
    fn reduce_partials<'p>(
        &self,
        partials: impl Iterator<Item = (&'p mut CudaSlice<f32>, &'p mut CudaSlice<f32>)>,
    ) -> Result<(), DistError> {
        self.grouped(|comm, _, _| {
            for (owner, (pk, pv)) in partials.enumerate() {
                comm.reduce_in_place(pk, &ReduceOp::Sum, owner as i32)?;
                comm.reduce_in_place(pv, &ReduceOp::Sum, owner as i32)?;
            }
            Ok(())
        })?;
        self.finish_shift()
    }

    /// This rank's part of the backward over the ring: the K/V travel again, every rank adds into
    /// its partials, NCCL sums each owner's partials at its owner (one reduce per owner, grouped),
    /// and the rank writes its dq, dk, dv. Asynchronous as [`NcclRank::ring_forward`].
    pub fn ring_backward<T: SbElement + NcclType + 'static>(
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
        self.walk_ring(&part, heads, &schedule, (k, v), |s, kv| bwd.step(s, x, kv))?;
        // The partials: summed at their owners, on the communication stream after the walk.
        self.reduce_partials(bwd.partials_mut().iter_mut().map(|(k, v)| (k, v)))?;
        let (sk, sv) = bwd
            .partial(self.rank)
            .ok_or_else(|| DistError::Transport { rank: self.rank, reason: "no partial for its own K/V".into() })?;
        bwd.finish(sk, sv, x, dq, dk, dv)
    }
}
