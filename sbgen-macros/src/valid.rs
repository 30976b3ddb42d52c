//! Checks the parsed [`Options`] against what the kernels support and builds the specs. Every problem
//! is an error at the literal that caused it; a missing `head_dim` points at the attribute.

use crate::attr::{Errors, Options};
use proc_macro2::Span;
use sbgen_runtime::spec::{
    Dtype, Layout, Mask, Pass, Remainder, Spec, SpecError, EARLY_EXIT_BITS_RANGE, HEAD_DIM_RANGE,
};

/// What the checks leave: the forward and backward specs and the sequence length to pick kernels for,
/// if one was given. `None` when a check failed; the errors are in `errors` then (the stubs are typed
/// from [`dtype`] and [`layout`]).
pub struct Checked {
    pub forward: Spec,
    /// The forward's spec with `pass` backward and the `deterministic` key (a forward is always
    /// deterministic, so the key applies to the backward only).
    pub backward: Spec,
    /// The decode's spec: the forward's with `pass` decode and the cache's layout (`kv_cache =
    /// "paged"`: paged; else the forward's bhnd or bnhd, and bnhd, the token-major cache, for thd).
    pub decode: Spec,
    pub seq: Option<usize>,
}

pub fn check(options: &Options, errors: &mut Errors) -> Option<Checked> {
    let mut ok = errors.is_empty();
    let head_dim = match &options.head_dim {
        Some(h) if HEAD_DIM_RANGE.contains(&h.value) => h.value,
        Some(h) => {
            errors.at(h.span, SpecError::HeadDim { got: h.value, range: HEAD_DIM_RANGE });
            ok = false;
            0
        }
        None => {
            // A `head_dim` that failed to parse was reported already.
            if !options.given.contains(&"head_dim") {
                errors.at(
                    Span::call_site(),
                    format!(
                        "missing `head_dim`: add e.g. `head_dim = 128` (allowed {}..={})",
                        HEAD_DIM_RANGE.start(),
                        HEAD_DIM_RANGE.end()
                    ),
                );
            }
            ok = false;
            0
        }
    };
    let early_exit_bits = match &options.early_exit_bits {
        Some(t) if !EARLY_EXIT_BITS_RANGE.contains(&t.value) => {
            errors.at(t.span, SpecError::EarlyExitBits { got: t.value, range: EARLY_EXIT_BITS_RANGE });
            ok = false;
            None
        }
        t => t.as_ref().map(|t| t.value),
    };
    let seq = match &options.seq {
        Some(s) if s.value == 0 || s.value > i32::MAX as u64 => {
            errors.at(s.span, format!("`seq` = {} is out of range: allowed 1..={}", s.value, i32::MAX));
            ok = false;
            None
        }
        s => s.as_ref().map(|s| s.value as usize),
    };
    if !ok {
        return None;
    }
    let forward = Spec {
        head_dim,
        dtype: dtype(options),
        mask: options.mask.as_ref().map_or(Mask::Strict, |m| m.value),
        layout: layout(options),
        remainder: options.remainder.as_ref().map_or(Remainder::Return, |r| r.value),
        pass: Pass::Forward,
        early_exit_bits,
        deterministic: false,
    };
    let deterministic = options.deterministic.as_ref().is_some_and(|d| d.value);
    let backward = Spec { pass: Pass::Backward, deterministic, ..forward };
    let decode_layout = match (options.kv_cache_paged.as_ref().is_some_and(|p| p.value), forward.layout) {
        (true, _) => Layout::Paged,
        (false, Layout::Thd) => Layout::Bnhd,
        (false, layout) => layout,
    };
    let decode = Spec { pass: Pass::Decode, layout: decode_layout, ..forward };
    Some(Checked { forward, backward, decode, seq })
}

/// The element type, `bf16` unless given (also used to type the stubs emitted on error).
pub fn dtype(options: &Options) -> Dtype {
    options.dtype.as_ref().map_or(Dtype::Bf16, |d| d.value)
}

/// The layout, `bhnd` unless given (a THD spec's entry points take `cu_seqlens`; the stubs too).
pub fn layout(options: &Options) -> Layout {
    options.layout.as_ref().map_or(Layout::Bhnd, |l| l.value)
}
