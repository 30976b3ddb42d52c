// A packed variable-length (THD) spec with a padded head_dim and a deterministic backward; the
// fixture cache (tests/ui.rs) has no entry for it, so each pass embeds its default schedule as CUDA
// source. `deterministic` applies to the backward only. Runs without a GPU: it only reads the tables
// and checks the entry points' types.
use sbgen_macros::stick_breaking_attention;
use sbgen_runtime::cudarc::driver::CudaView;
use sbgen_runtime::half::bf16;
use sbgen_runtime::launcher::{BackwardArgs, ForwardArgs, LaunchError, Launcher, Shape};
use sbgen_runtime::{Layout, Pass};

#[stick_breaking_attention(head_dim = 80, layout = "thd", deterministic = true)]
pub struct SbVarlen;

#[stick_breaking_attention(head_dim = 128, layout = "varlen", deterministic = false)]
pub struct SbVarlen128;

// The THD entry points take the packed batch's `cu_seqlens` and token count after `args`.
type Forward = for<'a> fn(&Launcher, Shape, ForwardArgs<'a, bf16>, &'a CudaView<'a, i32>, usize, Option<f32>)
    -> Result<(), LaunchError>;
type Backward = for<'a> fn(&Launcher, Shape, BackwardArgs<'a, bf16>, &'a CudaView<'a, i32>, usize, Option<f32>)
    -> Result<(), LaunchError>;

fn main() {
    assert_eq!(SbVarlen::FORWARD_SPEC.layout, Layout::Thd);
    assert_eq!(SbVarlen::FORWARD_SPEC.head_dim, 80);
    assert!(!SbVarlen::FORWARD_SPEC.deterministic);
    assert_eq!(SbVarlen::BACKWARD_SPEC.pass, Pass::Backward);
    assert!(SbVarlen::BACKWARD_SPEC.deterministic);
    assert!(SbVarlen::BACKWARD_SPEC.validate().is_ok() && SbVarlen::FORWARD_SPEC.validate().is_ok());

    let fwd = SbVarlen::forward_kernels().binaries().unwrap();
    assert_eq!(fwd.len(), 1);
    assert_eq!(fwd[0].manifest().spec, SbVarlen::FORWARD_SPEC);
    assert!(fwd[0].name().starts_with("sb_fwd_d80_bf16_strict_thd_ret_full_"), "{}", fwd[0].name());
    let bwd = SbVarlen::backward_kernels().binaries().unwrap();
    assert_eq!(bwd[0].manifest().spec, SbVarlen::BACKWARD_SPEC);
    assert!(bwd[0].name().starts_with("sb_bwd_d80_bf16_strict_thd_ret_full_det_"), "{}", bwd[0].name());
    assert!(bwd[0].cuda_source().unwrap().contains("constexpr bool DETERMINISTIC = true;"));

    assert_eq!(SbVarlen128::FORWARD_SPEC.layout, Layout::Thd);
    assert!(!SbVarlen128::BACKWARD_SPEC.deterministic);

    let _: Forward = SbVarlen::forward;
    let _: Backward = SbVarlen::backward;
    let _: Forward = SbVarlen128::forward;
}
