//! The element types a kernel can take, tied to the spec's [`Dtype`] so that the launcher can check
//! the tensors against the kernel before launching.

use crate::spec::Dtype;
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

/// A 16-bit float type the kernels read and write. Implemented for [`half::bf16`] and [`half::f16`].
pub trait SbElement: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync + 'static + private::Sealed {
    const DTYPE: Dtype;
    /// The bit pattern of a quiet NaN, used to poison outputs in tests.
    const NAN_BITS: u16;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn from_bits(bits: u16) -> Self;
    fn to_bits(self) -> u16;
}

impl SbElement for half::bf16 {
    const DTYPE: Dtype = Dtype::Bf16;
    const NAN_BITS: u16 = 0xFFFF;
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_bits(bits: u16) -> Self {
        half::bf16::from_bits(bits)
    }
    fn to_bits(self) -> u16 {
        half::bf16::to_bits(self)
    }
}

impl SbElement for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
    const NAN_BITS: u16 = 0xFFFF;
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_bits(bits: u16) -> Self {
        half::f16::from_bits(bits)
    }
    fn to_bits(self) -> u16 {
        half::f16::to_bits(self)
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_bits_are_nan() {
        assert!(half::bf16::from_bits(<half::bf16 as SbElement>::NAN_BITS).is_nan());
        assert!(half::f16::from_bits(<half::f16 as SbElement>::NAN_BITS).is_nan());
    }
}
