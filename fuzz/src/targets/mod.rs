//! The fuzz targets: one per parser that reads what a user or another tool wrote. Each takes the
//! raw bytes, returns whether the parser accepted them, and panics (through `assert!`) when an
//! accepted input breaks an invariant, e.g. "what is written back loads back the same".

pub mod attr;
pub mod cache;
pub mod manifest;
pub mod tensor_header;

use crate::mutate::InputKind;

/// What a parser made of an input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// Refused, with the error as the user would see it.
    Refused(String),
}

/// One parser under test.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Also the folder of its corpus (`corpus/<name>/`) and artifacts.
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&[u8]) -> Verdict,
    pub input: InputKind,
    /// Words the mutator inserts (keys, enum values, tokens the parser knows), in lists.
    pub dictionary: &'static [&'static [&'static str]],
}

/// Every target.
pub const ALL: &[Target] = &[cache::TARGET, manifest::TARGET, attr::TARGET, tensor_header::TARGET];

/// The target called `name`.
pub fn find(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

/// The spec's JSON keys and values, in the cache's and the manifest's dictionaries.
pub const SPEC_WORDS: &[&str] = &[
    "head_dim",
    "dtype",
    "mask",
    "pass",
    "early_exit_bits",
    "bf16",
    "attend_current",
    "bnhd",
    "fuse",
    "backward",
    "thd",
    "deterministic",
];
