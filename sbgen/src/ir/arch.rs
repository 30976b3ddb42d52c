//! Target architectures and their limits.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A GPU architecture the templates target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Arch {
    /// Ampere (A100): `mma.sync`, `cp.async`.
    #[serde(rename = "sm_80")]
    Sm80,
    /// Hopper (H100, H200), compiled as `sm_90a` so that `wgmma` variants can use it.
    #[serde(rename = "sm_90")]
    Sm90,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Sm80, Arch::Sm90];

    /// Largest dynamic shared memory one block may opt into, in bytes.
    pub fn max_smem_per_block(self) -> u32 {
        match self {
            Arch::Sm80 => 163 * 1024,
            Arch::Sm90 => 227 * 1024,
        }
    }

    /// The `--gpu-architecture` NVRTC and ptxas take.
    pub fn compile_target(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90a",
        }
    }

    /// Compute capability (major, minor) a device must have to run this arch's code.
    pub fn compute_capability(self) -> (u32, u32) {
        match self {
            Arch::Sm80 => (8, 0),
            Arch::Sm90 => (9, 0),
        }
    }

    /// The arch whose code runs best on a device of compute capability `major.minor`, if any.
    pub fn for_device(major: u32, minor: u32) -> Option<Arch> {
        match (major, minor) {
            (9, 0) => Some(Arch::Sm90),
            (8, _) | (9, _) | (10..=12, _) => Some(Arch::Sm80),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        })
    }
}

/// An arch name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`arch` = `{0}` is not supported: allowed sm_80, sm_90 (sm_90a)")]
pub struct UnknownArch(pub String);

impl FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Self, UnknownArch> {
        match s.to_ascii_lowercase().as_str() {
            "sm_80" | "sm80" | "80" => Ok(Arch::Sm80),
            "sm_90" | "sm_90a" | "sm90" | "90" => Ok(Arch::Sm90),
            _ => Err(UnknownArch(s.to_string())),
        }
    }
}
