use sbgen_macros::stick_breaking_attention;

#[stick_breaking_attention(head_dim = 128, mask = "causal", layout = "bshd", remainder = "drop")]
pub struct SbAttn;

fn main() {}
