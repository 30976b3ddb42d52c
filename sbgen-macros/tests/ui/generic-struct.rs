use sbgen_macros::stick_breaking_attention;

// One error at the generics, no follow-on error from the launchers.
#[stick_breaking_attention(head_dim = 128)]
pub struct SbAttn<T>(T);

fn main() {}
