use sbgen_macros::stick_breaking_attention;

#[stick_breaking_attention(head_dim = 96)]
pub struct SbAttn;

fn main() {}
