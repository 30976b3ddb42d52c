use sbgen_macros::stick_breaking_attention;

#[stick_breaking_attention(head_dim = 64, dtype = "bf16", dtype = "f16")]
pub struct SbAttn;

fn main() {}
