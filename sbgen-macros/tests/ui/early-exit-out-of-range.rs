use sbgen_macros::stick_breaking_attention;

#[stick_breaking_attention(head_dim = 128, early_exit_bits = 4)]
pub struct SbAttn;

fn main() {}
