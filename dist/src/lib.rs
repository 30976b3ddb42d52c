//! Context parallelism for stick-breaking attention: one sequence's tokens spread over P ranks,
//! K/V passed around a ring, and each query's keys walked one segment at a time, nearest first, with
//! the small per-query state that makes the result exact (docs/math.md#context-parallelism).
//!
//! - [`Partition`]: which tokens each rank holds (contiguous, or zig-zag to balance the causal work).
//! - [`Schedule`]: which (query segment, key segment) pairs a rank computes at each ring step.
//! - [`shifts::shift_plan`]: which buffer holds the K/V in hand at each step and where each shift
//!   lands (what `nccl` follows).
//! - [`Transport`]: the ring's shifts; [`SimRing`] runs P ranks as threads of one process.
//! - [`ring::forward`] and [`ring::backward`]: one rank's part, in float64 on the CPU, dK and dV
//!   returned to their owners by a ring reduce-scatter.
//! - `gpu` (feature `cuda`): one rank's forward and backward on its GPU, a segment-pass launch per
//!   pair of its schedule carrying the f32 row state between them; `examples/segment_check.rs` runs
//!   every rank on one GPU against float64 and the single-GPU kernels.
//! - `nccl` (feature `nccl`): the ring over NCCL between the GPUs of one host: the shifts on a
//!   stream of their own, and `NcclRank::ring_forward` / `ring_backward`, which drive `gpu`'s steps
//!   with each shift hidden behind a step's compute and sum the dK/dV partials at their owners;
//!   `examples/ring_check.rs` checks and times them.
//! - `driver` (feature `nccl`): the whole ring on this host's GPUs in one call, from full tensors to
//!   gathered outputs and per-rank times (`sbgen bench --gpus N`).
//!
//! ```
//! use sbgen_dist::{ring, Heads, Partition, Scheme, SimRing, Transport};
//! use sbgen_runtime::reference::Options;
//!
//! let heads = Heads { batch: 1, heads: 2, kv_heads: 1, head_dim: 4 };
//! let part = Partition::new(10, 2, Scheme::ZigZag).unwrap();
//! let x = |len: usize| (0..len).map(|i| (i as f64 * 0.37).sin()).collect::<Vec<f64>>();
//! let (q, kv) = (x(2 * 10 * 4), x(10 * 4));
//! let outs = SimRing::run(2, |t| {
//!     let r = t.rank();
//!     let (ql, kl) = (part.scatter(r, &q, 2, 4), part.scatter(r, &kv, 1, 4));
//!     ring::forward(t, &part, heads, &Options::causal(), &ql, &kl, &kl).unwrap()
//! });
//! let o = part.gather(&outs.iter().map(|f| f.o.clone()).collect::<Vec<_>>(), 2, 4);
//! assert_eq!(o.len(), 2 * 10 * 4);
//! ```

#[cfg(feature = "nccl")]
pub mod driver;
mod error;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod partition;
pub mod ring;
pub mod schedule;
pub mod shifts;
pub mod transport;

pub use error::DistError;
pub use partition::{Partition, Scheme};
pub use ring::{Heads, RankForward, RankGrads, RingStats};
pub use schedule::{Pair, Schedule};
pub use transport::{SimRing, SimTransport, Transport};
