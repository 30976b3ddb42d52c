//! What a call computes beyond its tensors, and the checks on it.

use crate::error::SbCandleError;

/// What happens to the part of each row's stick no key took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Remainder {
    /// Returned as `rem`; `o` holds the keys' share only.
    #[default]
    Return,
    /// Also added to `o` as `rem * v_i` (the row's own value), as the paper's models do.
    Fuse,
}

/// Options of [`crate::stick_breaking_attention`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SbOptions {
    /// Score scale; `None` is `1 / sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Query i attends keys `0..=i` instead of `0..i`.
    pub attend_current: bool,
    pub remainder: Remainder,
    /// `Some(T)`: a row stops once less than `2^-T` of its stick is left (the keys it skips would
    /// get less than that in all). 1..=126.
    pub early_exit_bits: Option<u32>,
}

impl Default for SbOptions {
    fn default() -> Self {
        SbOptions { scale: None, attend_current: false, remainder: Remainder::Return, early_exit_bits: None }
    }
}

/// Early-exit bits a float32 stick can resolve.
pub const EARLY_EXIT_BITS: std::ops::RangeInclusive<u32> = 1..=126;

impl SbOptions {
    /// Refuses options no kernel can honour, naming the field.
    pub fn validate(&self) -> Result<(), SbCandleError> {
        if let Some(s) = self.scale {
            if !s.is_finite() || s == 0.0 {
                return Err(SbCandleError::Option {
                    field: "scale",
                    got: s.to_string(),
                    allowed: "finite and non-zero",
                });
            }
        }
        if let Some(t) = self.early_exit_bits {
            if !EARLY_EXIT_BITS.contains(&t) {
                return Err(SbCandleError::Option { field: "early_exit_bits", got: t.to_string(), allowed: "1..=126" });
            }
        }
        Ok(())
    }

    /// The score scale for `head_dim`.
    pub fn scale_for(&self, head_dim: usize) -> f64 {
        self.scale.unwrap_or_else(|| 1.0 / (head_dim as f64).sqrt())
    }
}
