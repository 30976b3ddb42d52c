//! The crate's errors. The public functions return `candle_core::Result`, as every candle op does;
//! these travel inside it (`candle_core::Error::Wrapped`, which keeps their message only: candle
//! erases the type), each naming the bad tensor or field and what is allowed.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SbCandleError {
    /// A tensor whose rank, dimensions or dtype do not fit the call.
    #[error("`{tensor}` has shape {got:?}: {expected}")]
    Shape { tensor: &'static str, got: Vec<usize>, expected: String },
    #[error("`{tensor}` is {got}: {expected}")]
    Dtype { tensor: &'static str, got: String, expected: String },
    #[error("`{field}` = {got} is not allowed: {allowed}")]
    Option { field: &'static str, got: String, allowed: &'static str },
    #[error("`cu_seqlens` {reason}")]
    CuSeqlens { reason: String },
    /// The tensors are on a device this build has no path for.
    #[error("stick-breaking attention on {device}: {reason}")]
    Device { device: String, reason: &'static str },
    /// No kernel for the call: options outside what sbgen's kernels support, or a tuning cache that
    /// cannot be read or does not match this sbgen.
    #[error("sbgen kernel: {reason}")]
    Kernel { reason: String },
    /// A KV cache call that does not fit the cache.
    #[error("KV cache: {reason}")]
    KvCache { reason: String },
}

impl From<SbCandleError> for candle_core::Error {
    fn from(e: SbCandleError) -> Self {
        candle_core::Error::wrap(e)
    }
}
