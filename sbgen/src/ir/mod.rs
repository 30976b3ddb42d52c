//! The attention IR: a [`Spec`] (what the model needs), a [`Schedule`] (how, chosen by the tuner)
//! and an [`Arch`], validated together as a [`Kernel`].

mod arch;
mod kernel;
mod schedule;

pub use arch::{Arch, UnknownArch};
pub use kernel::{IrError, Kernel, SmemLayout};
pub use sbgen_runtime::spec::{Dtype, Layout, Mask, Pass, Remainder, Spec, SpecError};
pub use schedule::{Cumsum, Loads, MmaFamily, Schedule, Softplus, PRODUCER_THREADS};
