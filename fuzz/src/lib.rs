//! Fuzzing of sbgen's parsers on stable Rust: a seeded mutation engine ([`mutate`], [`json`]), a
//! loop that runs a target under `catch_unwind` and saves what crashes it ([`engine`]), and one
//! target per parser ([`targets`]). `tests/fuzz.rs` runs every target for a fixed number of
//! iterations from the committed corpus (`corpus/<target>/`) as part of `cargo test`; the
//! `sbgen-fuzz` binary runs one for longer.

pub mod engine;
pub mod json;
mod macro_args;
pub mod mutate;
pub mod targets;

// `valid` names the parser `crate::attr`, as in the macro crate.
use macro_args::attr;
