// A head_dim past 256 is refused at its literal. The stubs emitted next to the error have the THD
// entry points' parameters (`cu_seqlens`, `total_tokens`), so this use raises no follow-on error.
use sbgen_macros::stick_breaking_attention;
use sbgen_runtime::cudarc::driver::CudaView;
use sbgen_runtime::launcher::{ForwardArgs, LaunchError, Launcher, Shape};

#[stick_breaking_attention(head_dim = 300, layout = "thd")]
pub struct SbAttn;

type Forward = for<'a> fn(
    &Launcher,
    Shape,
    ForwardArgs<'a, sbgen_runtime::half::bf16>,
    &'a CudaView<'a, i32>,
    usize,
    Option<f32>,
) -> Result<(), LaunchError>;

fn main() {
    let _: Forward = SbAttn::forward;
}
