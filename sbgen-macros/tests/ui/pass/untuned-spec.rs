// Specs the cache has no entry for (tests/ui.rs points SBGEN_CACHE at tests/fixtures/tuned-cache.json,
// which holds head_dim 128 bf16 only; the built-in default cache, empty, behaves the same): each pass
// embeds its spec's default schedule as CUDA source. Runs without a GPU: it only reads the tables.
use sbgen_macros::stick_breaking_attention;
use sbgen_runtime::{Dtype, Layout, Pass};

#[stick_breaking_attention(head_dim = 128, dtype = "f16", mask = "strict", layout = "bhnd", remainder = "return")]
pub struct SbAttn;

#[stick_breaking_attention(head_dim = 64, dtype = "f16", layout = "bnhd", remainder = "fuse", early_exit_bits = 24, seq = 4096)]
struct SbAttnHalf;

#[stick_breaking_attention(head_dim = 96, layout = "thd", kv_cache = "paged")]
struct SbAttnPaged;

#[stick_breaking_attention(head_dim = 32, layout = "thd")]
struct SbAttnPacked;

fn main() {
    assert_eq!(SbAttn::FORWARD_SPEC.head_dim, 128);
    assert_eq!(SbAttn::BACKWARD_SPEC.pass, Pass::Backward);
    let fwd = SbAttn::forward_kernels().binaries().unwrap();
    assert_eq!(fwd.len(), 1);
    assert!(fwd[0].ptx().is_empty());
    assert!(fwd[0].cuda_source().unwrap().contains(&fwd[0].manifest().name));
    assert_eq!(fwd[0].manifest().spec, SbAttn::FORWARD_SPEC);
    let bwd = SbAttn::backward_kernels().binaries().unwrap();
    assert_eq!(bwd[0].manifest().spec, SbAttn::BACKWARD_SPEC);
    assert_eq!(bwd[0].manifest().steps.len(), 2);
    // Picked for any device: the source is NVRTC-compiled for it.
    assert_eq!(SbAttn::forward_kernels().pick((9, 0), 4096).unwrap().name(), fwd[0].name());

    assert_eq!(SbAttnHalf::FORWARD_SPEC.dtype, Dtype::F16);
    assert_eq!(SbAttnHalf::FORWARD_SPEC.layout, Layout::Bnhd);
    assert_eq!(SbAttnHalf::FORWARD_SPEC.early_exit_bits, Some(24));
    assert!(SbAttnHalf::forward_kernels().binaries().unwrap()[0].name().starts_with("sb_fwd_d64_f16_strict_bnhd_fuse_ee24_"));

    // The decode: the forward's spec with the cache's layout (a paged cache when asked; a
    // contiguous one in the forward's layout, and BNHD for a packed forward), one step.
    assert_eq!(SbAttn::DECODE_SPEC, sbgen_runtime::Spec { pass: Pass::Decode, ..SbAttn::FORWARD_SPEC });
    assert_eq!(SbAttnHalf::DECODE_SPEC.layout, Layout::Bnhd);
    assert_eq!(SbAttnHalf::DECODE_SPEC.early_exit_bits, Some(24));
    assert_eq!(SbAttnPaged::DECODE_SPEC.layout, Layout::Paged);
    assert_eq!(SbAttnPacked::DECODE_SPEC.layout, Layout::Bnhd);
    let dec = SbAttnPaged::decode_kernels().binaries().unwrap();
    assert_eq!(dec[0].manifest().spec, SbAttnPaged::DECODE_SPEC);
    assert_eq!(dec[0].manifest().steps.len(), 1);
    assert!(dec[0].name().starts_with("sb_dec_d96_bf16_strict_paged_ret_full_"));

    // The typed entry points exist with the dtype's element type.
    let _: fn(&_, _, sbgen_runtime::launcher::DecodeArgs<'_, sbgen_runtime::half::f16>, _) -> _ = SbAttnHalf::decode;
    let _: fn(&_, _, sbgen_runtime::launcher::DecodeArgs<'_, sbgen_runtime::half::bf16>, _) -> _ = SbAttnPaged::decode;
    let _: fn(&_, _, sbgen_runtime::launcher::ForwardArgs<'_, sbgen_runtime::half::f16>, _) -> _ = SbAttn::forward;
    let _: fn(&_, _, sbgen_runtime::launcher::BackwardArgs<'_, sbgen_runtime::half::f16>, _) -> _ = SbAttnHalf::backward;
}
