//! `Kernel { spec, schedule, arch }` and its validation: every check that must pass before lowering,
//! each failure naming the field and what is allowed.

use super::arch::Arch;
use super::schedule::{Cumsum, MmaFamily, Schedule};
use sbgen_runtime::spec::{Pass, Spec, SpecError};
use serde::{Deserialize, Serialize};

/// One kernel: what it computes, how, and for which GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Kernel {
    pub spec: Spec,
    pub schedule: Schedule,
    pub arch: Arch,
}

/// Why a kernel cannot be lowered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IrError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("`{field}` = {got} is not allowed: {allowed}")]
    Field { field: &'static str, got: u32, allowed: &'static str },
    #[error("`{field}` = {value} is not supported: {reason}")]
    Unsupported { field: &'static str, value: String, reason: &'static str },
    #[error(
        "shared memory: the schedule needs {needed} bytes per block, over the {limit}-byte limit of {arch} \
         (lower `stages`, `block_n` or `block_m`)"
    )]
    SharedMemory { needed: u32, limit: u32, arch: Arch },
}

/// Byte offsets of the shared-memory buffers of a kernel. Rendered into the template as constants,
/// and summed for the launch rule, so the two cannot disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SmemLayout {
    /// Q tile (block_m x head_dim); reused to stage the output tile for coalesced stores.
    pub q: u32,
    /// dO tile (block_m x head_dim), backward only.
    pub d_o: u32,
    /// `stages` K tiles (block_n x head_dim), one after another.
    pub k: u32,
    /// `stages` V tiles.
    pub v: u32,
    /// Attention weights, block_m x block_n, backward only (the A of dV = A^T dO).
    pub p: u32,
    /// Score gradients, block_m x block_n, backward only (the dZ of dK = dZ^T Q).
    pub dz: u32,
    pub total: u32,
}

impl Kernel {
    pub fn new(spec: Spec, schedule: Schedule, arch: Arch) -> Self {
        Kernel { spec, schedule, arch }
    }

    /// Checks everything the templates rely on. Lowering calls this first.
    pub fn validate(&self) -> Result<(), IrError> {
        self.spec.validate()?;
        let s = &self.schedule;
        if !matches!(s.warps, 4 | 8) {
            return Err(IrError::Field { field: "warps", got: s.warps, allowed: "4 or 8" });
        }
        if s.block_m % s.warps != 0 || !matches!(s.block_m / s.warps, 16 | 32) {
            return Err(IrError::Field {
                field: "block_m",
                got: s.block_m,
                allowed: "16 or 32 rows per warp (block_m = 16 * warps or 32 * warps)",
            });
        }
        if !matches!(s.block_n, 32 | 64 | 128) {
            return Err(IrError::Field { field: "block_n", got: s.block_n, allowed: "32, 64 or 128" });
        }
        if !(2..=4).contains(&s.stages) {
            return Err(IrError::Field { field: "stages", got: s.stages, allowed: "2 to 4" });
        }
        if s.cumsum == Cumsum::TensorCore {
            return Err(IrError::Unsupported {
                field: "cumsum",
                value: "tensor_core".into(),
                reason: "the templates implement `shuffle` only so far",
            });
        }
        if s.mma == MmaFamily::Wgmma {
            return Err(IrError::Unsupported {
                field: "mma",
                value: "wgmma".into(),
                reason: match self.arch {
                    Arch::Sm80 => "wgmma needs sm_90a",
                    Arch::Sm90 => "the templates implement `mma_sync` only so far",
                },
            });
        }
        if self.spec.pass == Pass::Backward {
            // dK/dV tiles (block_n x head_dim) are split among the warps in 16 x 16 pieces.
            let pieces = (s.block_n / 16) * (self.spec.head_dim / 16);
            if pieces % s.warps != 0 {
                return Err(IrError::Field {
                    field: "block_n",
                    got: s.block_n,
                    allowed: "a size whose dK/dV tile splits evenly among the warps",
                });
            }
        }
        let layout = self.smem_layout();
        let limit = self.arch.max_smem_per_block();
        if layout.total > limit {
            return Err(IrError::SharedMemory { needed: layout.total, limit, arch: self.arch });
        }
        Ok(())
    }

    pub fn smem_layout(&self) -> SmemLayout {
        let s = &self.schedule;
        let elem = self.spec.dtype.size_bytes() as u32;
        let d = self.spec.head_dim;
        let q_tile = s.block_m * d * elem;
        let kv_tile = s.block_n * d * elem;
        let backward = self.spec.pass == Pass::Backward;
        let q = 0;
        let d_o = q + q_tile;
        let k = d_o + if backward { q_tile } else { 0 };
        let v = k + s.stages * kv_tile;
        let p = v + s.stages * kv_tile;
        let pm_tile = if backward { s.block_m * s.block_n * elem } else { 0 };
        let dz = p + pm_tile;
        let total = dz + pm_tile;
        SmemLayout { q, d_o, k, v, p, dz, total }
    }

    /// The kernel's name: `sb_` + spec slug + schedule hash.
    pub fn name(&self) -> String {
        format!("sb_{}_{}", self.spec.slug(), self.schedule.short_hash())
    }
}
