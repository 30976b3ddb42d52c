use sbgen_macros::stick_breaking_attention;

// One error: `head_dim` is there, only its value is missing.
#[stick_breaking_attention(head_dim, dtype = "bf16")]
pub struct SbAttn;

fn main() {}
