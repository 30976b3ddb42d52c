//! The ring over NCCL (cudarc's `nccl` feature): one thread per GPU of this host, each with its own
//! communicator, and each shift on a stream of its own so that it overlaps the compute stream's
//! kernels (docs/math.md#context-parallelism). Several hosts are NCCL's own bootstrap: the same
//! ranks with an [`Id`] shared over the network instead of in memory.
//!
//! cudarc looks for `libnccl.so` (and a few versioned names, not `libnccl.so.2`): where only
//! `libnccl.so.2` exists, a folder on `LD_LIBRARY_PATH` with a `libnccl.so` link to it does.

use crate::error::DistError;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr};
use cudarc::nccl::result::{group_end, group_start};
use cudarc::nccl::safe::{Comm, Id, NcclType};
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
