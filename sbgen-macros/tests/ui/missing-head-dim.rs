use sbgen_macros::stick_breaking_attention;

#[stick_breaking_attention(dtype = "f16")]
pub struct SbAttn;

fn main() {}
