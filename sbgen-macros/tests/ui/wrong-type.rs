use sbgen_macros::stick_breaking_attention;

#[stick_breaking_attention(head_dim = "128", dtype = bf16, deterministic = "yes")]
pub struct SbAttn;

fn main() {}
