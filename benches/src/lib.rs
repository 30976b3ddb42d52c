//! Benchmarks live in `benches/`: `lowering.rs` (lower() and NVRTC compile time, CPU) and
//! `launch.rs` (the `#[stick_breaking_attention]` launch path on a GPU).
