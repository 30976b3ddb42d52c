// Every error of the attribute is reported in one build, and the struct is still emitted with typed
// `forward` / `backward` stubs: the uses in `main` raise no follow-on errors.
use sbgen_macros::stick_breaking_attention;

#[stick_breaking_attention(head_dim = 300, dtype = "int7", colour = "red", early_exit_bits = "24", head_dim = 64)]
pub struct SbAttn;

fn main() {
    let _ = SbAttn;
    let _ = SbAttn::forward;
    let _ = SbAttn::backward;
}
