//! The crate's errors, each naming the bad field and what is allowed.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DistError {
    #[error("`{field}` = {got} is not allowed: {allowed}")]
    Invalid { field: &'static str, got: String, allowed: String },
    /// A tensor whose length does not match the partition.
    #[error("`{tensor}` has {got} elements, {expected}")]
    Length { tensor: &'static str, got: usize, expected: String },
    /// A rank of the ring stopped or sent what the protocol did not expect.
    #[error("ring transport, rank {rank}: {reason}")]
    Transport { rank: usize, reason: String },
    /// A CUDA driver call on a rank's GPU failed (feature `nccl`).
    #[error("CUDA on rank {rank}: {reason}")]
    Device { rank: usize, reason: String },
}
