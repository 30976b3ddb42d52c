//! The whole ring on this host's GPUs in one call (feature `nccl`): the full tensors cut into each
//! rank's local ones, every rank's forward (and backward) over NCCL, the outputs gathered back, and
//! with timing, each rank's times of its ring passes and of their transfers alone. `sbgen bench
//! --gpus N` and `examples/ring_check.rs` are built on it.
//!
//! Timing is per rank, with CUDA events on its compute stream: a forward repetition is one
//! [`NcclRank::ring_forward`]; a forward + backward repetition is a ring forward then a
//! [`NcclRank::ring_backward`]; the transfers alone are [`NcclRank::ring_transfers`] (what the same
//! passes send, with no kernels running). The ring's time is its slowest rank's.

use crate::error::DistError;
use crate::gpu::{BackwardInputs, RankBackward, RankForward};
use crate::nccl::NcclRank;
use crate::partition::Partition;
use crate::ring::Heads;
use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use cudarc::nccl::safe::NcclType;
use sbgen_runtime::launcher::{KernelBinary, Launcher, SbElement};
use sbgen_runtime::spec::{Layout, Pass};
use std::sync::Arc;

/// The kernels a ring run launches: the segment forward, and for gradients the segment backward
/// (of the same spec but the pass).
#[derive(Clone)]
pub struct RingKernels {
    pub forward: Arc<KernelBinary>,
    pub backward: Option<Arc<KernelBinary>>,
}

/// The full tensors of the sequence (every rank's tokens) in the kernels' layout: q, o and dO
/// `[batch, heads, seq, head_dim]` (BHND) or `[batch, seq, heads, head_dim]` (BNHD), k and v with
/// `kv_heads`; dRem `[batch, heads, seq]`. Gradients need `d_o` and a backward kernel.
pub struct RingInputs<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub d_o: Option<&'a [T]>,
    pub d_rem: Option<&'a [f32]>,
}

/// Repetitions to time (none: the outputs only) after `warmup` untimed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingTiming {
    pub warmup: usize,
    pub reps: usize,
}

/// One rank's milliseconds per repetition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankTimes {
    pub forward: Vec<f64>,
    /// A ring forward then a ring backward.
    pub forward_backward: Vec<f64>,
    /// The forward's K/V shifts alone.
    pub transfers_forward: Vec<f64>,
    /// The shifts of a forward and a backward and the backward's partial reduces, alone.
    pub transfers_forward_backward: Vec<f64>,
}

/// The gathered outputs of the first (untimed) run, in the inputs' layout, and each rank's times.
pub struct RingOutputs<T> {
    pub o: Vec<T>,
    pub rem: Vec<f32>,
    /// dq, dk, dv when gradients were asked for.
    pub grads: Option<(Vec<T>, Vec<T>, Vec<T>)>,
    pub times: Vec<RankTimes>,
}

/// `[outer, seq, inner]` of a tensor with `heads` heads in `layout`, as the partition cuts it.
fn outer_inner(layout: Layout, h: Heads, heads: usize) -> (usize, usize) {
    match layout {
        Layout::Bnhd => (h.batch, heads * h.head_dim),
        _ => (h.batch * heads, h.head_dim),
    }
}

/// Runs the ring over `part.ranks()` GPUs of this host (rank r on GPU r): the forward, and the
/// backward when `inputs.d_o` is given, once with outputs poisoned beforehand (NaN), then timed as
/// `timing` asks. Each rank's launchers run on its compute stream.
pub fn run_ring<T: SbElement + NcclType + DeviceRepr + Default + 'static>(
    part: &Partition,
    heads: Heads,
    kernels: &RingKernels,
    inputs: &RingInputs<'_, T>,
    timing: RingTiming,
) -> Result<RingOutputs<T>, DistError> {
    heads.check()?;
    let spec = kernels.forward.manifest().spec;
    if spec.pass != Pass::Segment {
        return Err(DistError::Invalid {
            field: "kernels.forward",
            got: kernels.forward.manifest().name.clone(),
            allowed: "a segment kernel (Pass::Segment)".into(),
        });
    }
    let layout = spec.layout;
    let (outer_q, inner_q) = outer_inner(layout, heads, heads.heads);
    let (outer_kv, inner_kv) = outer_inner(layout, heads, heads.kv_heads);
    let (q_len, kv_len, rows) =
        (outer_q * part.seq() * inner_q, outer_kv * part.seq() * inner_kv, heads.batch * heads.heads * part.seq());
    let length = |tensor: &'static str, got: usize, want: usize| {
        if got == want {
            Ok(())
        } else {
            Err(DistError::Length { tensor, got, expected: format!("{want} (the whole sequence of the partition)") })
        }
    };
    length("q", inputs.q.len(), q_len)?;
    length("k", inputs.k.len(), kv_len)?;
    length("v", inputs.v.len(), kv_len)?;
    let gradients = match (inputs.d_o, &kernels.backward) {
        (Some(d_o), Some(bwd)) => {
            length("d_o", d_o.len(), q_len)?;
            if let Some(d_rem) = inputs.d_rem {
                length("d_rem", d_rem.len(), rows)?;
            }
            Some((d_o, bwd.clone()))
        }
        (None, _) => None,
        (Some(_), None) => {
            return Err(DistError::Invalid {
                field: "kernels.backward",
                got: "none".into(),
                allowed: "a segment backward kernel when d_o is given".into(),
            })
        }
    };

    struct RankOut<T> {
        o: Vec<T>,
        rem: Vec<f32>,
        grads: Option<(Vec<T>, Vec<T>, Vec<T>)>,
        times: RankTimes,
    }
    /// What a rank's backward reads and writes beside the forward's state.
    struct Grads<T> {
        bwd: RankBackward<T>,
        d_o: CudaSlice<T>,
        d_rem: Option<CudaSlice<f32>>,
        dq: CudaSlice<T>,
        dk: CudaSlice<T>,
        dv: CudaSlice<T>,
    }
    let outs = NcclRank::run(part.ranks(), |r| {
        let rank = r.rank();
        let dev = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
        let stream = r.compute_stream().clone();
        let n = part.local_len(rank);
        let local_rows = heads.batch * heads.heads * n;
        let (q_local, kv_local) = (outer_q * n * inner_q, outer_kv * n * inner_kv);
        let up =
            |x: &[T], outer: usize, inner: usize| stream.clone_htod(&part.scatter(rank, x, outer, inner)).map_err(dev);
        let poison = |len: usize| stream.clone_htod(&vec![T::from_bits(T::NAN_BITS); len.max(1)]).map_err(dev);
        let nan_rows = |len: usize| stream.clone_htod(&vec![f32::NAN; len.max(1)]).map_err(dev);
        // Everything that can fail on one rank alone, before the first NCCL operation: a rank that
        // stopped later would leave the others waiting in the ring.
        let setup = (|| {
            let launcher =
                Arc::new(Launcher::new(stream.clone()).map_err(|e| DistError::Device { rank, reason: e.to_string() })?);
            let qkv =
                (up(inputs.q, outer_q, inner_q)?, up(inputs.k, outer_kv, inner_kv)?, up(inputs.v, outer_kv, inner_kv)?);
            let outs = (poison(q_local)?, nan_rows(local_rows)?, nan_rows(local_rows)?);
            let fwd = RankForward::<T>::new(launcher.clone(), kernels.forward.clone(), part, rank, heads, None)?;
            let grads = match &gradients {
                Some((d_o, kernel)) => Some(Grads {
                    bwd: RankBackward::<T>::new(launcher.clone(), kernel.clone(), part, rank, heads, None)?,
                    d_o: up(d_o, outer_q, inner_q)?,
                    d_rem: match inputs.d_rem {
                        Some(d) => Some(up_rows(&stream, part, rank, heads, d).map_err(dev)?),
                        None => None,
                    },
                    dq: poison(q_local)?,
                    dk: poison(kv_local)?,
                    dv: poison(kv_local)?,
                }),
                None => None,
            };
            Ok::<_, DistError>((qkv, outs, fwd, grads))
        })();
        if !r.agree(setup.is_ok())? {
            return Err(setup.err().unwrap_or(DistError::Transport {
                rank,
                reason: "another rank failed to set up; the ring did not start".into(),
            }));
        }
        let ((ql, kl, vl), (mut o, mut rem, mut lrem), mut fwd, mut grads) = setup?;
        r.ring_forward(&mut fwd, (&ql, &kl, &vl), &mut o, &mut rem, &mut lrem)?;
        let take = |x: &CudaSlice<T>, len: usize| -> Result<Vec<T>, DistError> {
            let mut v = stream.clone_dtoh(x).map_err(dev)?;
            v.truncate(len);
            Ok(v)
        };
        let o_host = take(&o, q_local)?;
        let mut rem_host = stream.clone_dtoh(&rem).map_err(dev)?;
        rem_host.truncate(local_rows);
        let mut times = RankTimes::default();
        if timing.reps > 0 {
            times.forward = time_reps(&stream, timing, rank, &mut || {
                r.ring_forward(&mut fwd, (&ql, &kl, &vl), &mut o, &mut rem, &mut lrem)
            })?;
            times.transfers_forward =
                time_reps(&stream, timing, rank, &mut || r.ring_transfers::<T>(part, heads, (&kl, &vl), None))?;
        }
        let mut grads_host = None;
        if let Some(g) = grads.as_mut() {
            {
                let (o_saved, log2_rem) = fwd.state();
                let x = BackwardInputs { q: &ql, d_o: &g.d_o, o_saved, log2_rem, d_rem: g.d_rem.as_ref(), v: &vl };
                r.ring_backward(&mut g.bwd, (&kl, &vl), &x, &mut g.dq, &mut g.dk, &mut g.dv)?;
            }
            grads_host = Some((take(&g.dq, q_local)?, take(&g.dk, kv_local)?, take(&g.dv, kv_local)?));
            if timing.reps > 0 {
                times.forward_backward = time_reps(&stream, timing, rank, &mut || {
                    r.ring_forward(&mut fwd, (&ql, &kl, &vl), &mut o, &mut rem, &mut lrem)?;
                    let (o_saved, log2_rem) = fwd.state();
                    let x = BackwardInputs { q: &ql, d_o: &g.d_o, o_saved, log2_rem, d_rem: g.d_rem.as_ref(), v: &vl };
                    r.ring_backward(&mut g.bwd, (&kl, &vl), &x, &mut g.dq, &mut g.dk, &mut g.dv)
                })?;
                // The forward's shifts, the backward's (the same), and the backward's reduces.
                times.transfers_forward_backward = time_reps(&stream, timing, rank, &mut || {
                    r.ring_transfers::<T>(part, heads, (&kl, &vl), None)?;
                    r.ring_transfers::<T>(part, heads, (&kl, &vl), Some(g.bwd.partials_mut()))
                })?;
            }
        }
        stream.synchronize().map_err(dev)?;
        Ok(RankOut { o: o_host, rem: rem_host, grads: grads_host, times })
    })?;
    let mut outs: Vec<RankOut<T>> = outs.into_iter().collect::<Result<_, _>>()?;

    // Moved out of the ranks' outputs, not copied (at 1,16,131072,128 each is 512 MiB on the host).
    let mut gather = |pick: &mut dyn FnMut(&mut RankOut<T>) -> Vec<T>, outer: usize, inner: usize| {
        let locals: Vec<Vec<T>> = outs.iter_mut().map(&mut *pick).collect();
        part.gather(&locals, outer, inner)
    };
    let o = gather(&mut |r| std::mem::take(&mut r.o), outer_q, inner_q);
    let grads = if gradients.is_some() {
        let grads_of = |i: usize| {
            move |r: &mut RankOut<T>| {
                r.grads.as_mut().map(|g| std::mem::take([&mut g.0, &mut g.1, &mut g.2][i])).unwrap_or_default()
            }
        };
        Some((
            gather(&mut grads_of(0), outer_q, inner_q),
            gather(&mut grads_of(1), outer_kv, inner_kv),
            gather(&mut grads_of(2), outer_kv, inner_kv),
        ))
    } else {
        None
    };
    let rems: Vec<Vec<f32>> = outs.iter_mut().map(|r| std::mem::take(&mut r.rem)).collect();
    let rem = part.gather(&rems, heads.batch * heads.heads, 1);
    Ok(RingOutputs { o, rem, grads, times: outs.into_iter().map(|r| r.times).collect() })
}

/// Rank `rank`'s rows of a `[batch, heads, seq]` tensor, on the device.
fn up_rows(
    stream: &Arc<CudaStream>,
    part: &Partition,
    rank: usize,
    heads: Heads,
    rows: &[f32],
) -> Result<CudaSlice<f32>, cudarc::driver::DriverError> {
    stream.clone_htod(&part.scatter(rank, rows, heads.batch * heads.heads, 1))
}

/// `timing.warmup` untimed runs of `f`, then `timing.reps` timed ones, each between its own pair
/// of CUDA events on `stream`; milliseconds per repetition.
fn time_reps(
    stream: &Arc<CudaStream>,
    timing: RingTiming,
    rank: usize,
    f: &mut dyn FnMut() -> Result<(), DistError>,
) -> Result<Vec<f64>, DistError> {
    let dev = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
    for _ in 0..timing.warmup {
        f()?;
    }
    let ctx = stream.context();
    let mut events = Vec::with_capacity(timing.reps);
    for _ in 0..timing.reps {
        let (start, end) =
            (ctx.new_event(Some(CU_EVENT_DEFAULT)).map_err(dev)?, ctx.new_event(Some(CU_EVENT_DEFAULT)).map_err(dev)?);
        start.record(stream).map_err(dev)?;
        f()?;
        end.record(stream).map_err(dev)?;
        events.push((start, end));
    }
    stream.synchronize().map_err(dev)?;
    events.iter().map(|(s, e)| s.elapsed_ms(e).map(|ms| ms as f64).map_err(dev)).collect()
}
