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
    let outs = NcclRank::run(part.ranks(), |r| {
        let rank = r.rank();
        let dev = |e: cudarc::driver::DriverError| DistError::Device { rank, reason: e.to_string() };
        let stream = r.compute_stream().clone();
        let launcher =
            Arc::new(Launcher::new(stream.clone()).map_err(|e| DistError::Device { rank, reason: e.to_string() })?);
        let n = part.local_len(rank);
        let up =
            |x: &[T], outer: usize, inner: usize| stream.clone_htod(&part.scatter(rank, x, outer, inner)).map_err(dev);
        let (ql, kl, vl) =
            (up(inputs.q, outer_q, inner_q)?, up(inputs.k, outer_kv, inner_kv)?, up(inputs.v, outer_kv, inner_kv)?);
        let poison = |len: usize| stream.clone_htod(&vec![T::from_bits(T::NAN_BITS); len.max(1)]).map_err(dev);
        let nan_rows = |len: usize| stream.clone_htod(&vec![f32::NAN; len.max(1)]).map_err(dev);
        let local_rows = heads.batch * heads.heads * n;
        let (mut o, mut rem, mut lrem) = (poison(outer_q * n * inner_q)?, nan_rows(local_rows)?, nan_rows(local_rows)?);
        let mut fwd = RankForward::<T>::new(launcher.clone(), kernels.forward.clone(), part, rank, heads, None)?;
        r.ring_forward(&mut fwd, (&ql, &kl, &vl), &mut o, &mut rem, &mut lrem)?;
        let take = |x: &CudaSlice<T>, len: usize| -> Result<Vec<T>, DistError> {
            let mut v = stream.clone_dtoh(x).map_err(dev)?;
            v.truncate(len);
            Ok(v)
        };
        let o_host = take(&o, outer_q * n * inner_q)?;
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
        let mut grads = None;
        if let Some((d_o, bwd_kernel)) = &gradients {
            let mut bwd = RankBackward::<T>::new(launcher.clone(), bwd_kernel.clone(), part, rank, heads, None)?;
            let dol = up(d_o, outer_q, inner_q)?;
            let dreml = match inputs.d_rem {
                Some(d) => Some(stream.clone_htod(&part.scatter(rank, d, heads.batch * heads.heads, 1)).map_err(dev)?),
                None => None,
            };
            let (mut dq, mut dk, mut dv) =
                (poison(outer_q * n * inner_q)?, poison(outer_kv * n * inner_kv)?, poison(outer_kv * n * inner_kv)?);
            {
                let (o_saved, log2_rem) = fwd.state();
                let x = BackwardInputs { q: &ql, d_o: &dol, o_saved, log2_rem, d_rem: dreml.as_ref(), v: &vl };
                r.ring_backward(&mut bwd, (&kl, &vl), &x, &mut dq, &mut dk, &mut dv)?;
            }
            grads = Some((
                take(&dq, outer_q * n * inner_q)?,
                take(&dk, outer_kv * n * inner_kv)?,
                take(&dv, outer_kv * n * inner_kv)?,
            ));
            if timing.reps > 0 {
                times.forward_backward = time_reps(&stream, timing, rank, &mut || {
                    r.ring_forward(&mut fwd, (&ql, &kl, &vl), &mut o, &mut rem, &mut lrem)?;
                    let (o_saved, log2_rem) = fwd.state();
                    let x = BackwardInputs { q: &ql, d_o: &dol, o_saved, log2_rem, d_rem: dreml.as_ref(), v: &vl };
                    r.ring_backward(&mut bwd, (&kl, &vl), &x, &mut dq, &mut dk, &mut dv)
                })?;
                times.transfers_forward_backward = time_reps(&stream, timing, rank, &mut || {
                    r.ring_transfers::<T>(part, heads, (&kl, &vl), Some(bwd.partials_mut()))
                })?;
            }
        }
        stream.synchronize().map_err(dev)?;
        Ok(RankOut { o: o_host, rem: rem_host, grads, times })
    })?;
    let outs: Vec<RankOut<T>> = outs.into_iter().collect::<Result<_, _>>()?;

    let o = part.gather(&outs.iter().map(|r| r.o.clone()).collect::<Vec<_>>(), outer_q, inner_q);
    let rem = part.gather(&outs.iter().map(|r| r.rem.clone()).collect::<Vec<_>>(), heads.batch * heads.heads, 1);
    let grads = if gradients.is_some() {
        let pick = |i: usize| -> Vec<Vec<T>> {
            outs.iter().map(|r| r.grads.as_ref().map(|g| [&g.0, &g.1, &g.2][i].clone()).unwrap_or_default()).collect()
        };
        Some((
            part.gather(&pick(0), outer_q, inner_q),
            part.gather(&pick(1), outer_kv, inner_kv),
            part.gather(&pick(2), outer_kv, inner_kv),
        ))
    } else {
        None
    };
    Ok(RingOutputs { o, rem, grads, times: outs.into_iter().map(|r| r.times).collect() })
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
