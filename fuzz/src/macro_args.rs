//! The macro's argument parser and checks, compiled from its own sources: a proc-macro crate
//! exports only macros, so this is how the fuzzer calls its functions on fuzzed tokens.

#![allow(dead_code)]

#[path = "../../sbgen-macros/src/attr.rs"]
pub mod attr;
#[path = "../../sbgen-macros/src/valid.rs"]
pub mod valid;
