use sbgen_macros::stick_breaking_attention;

#[stick_breaking_attention(head_dim = 128, kv_cache = "ring")]
pub struct SbAttn;

fn main() {}
