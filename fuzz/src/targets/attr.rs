//! The arguments of `#[stick_breaking_attention(...)]`: a fuzzed string is lexed into a token
//! stream, as rustc hands it to the macro, then parsed by the macro's own `attr` and checked by its
//! `valid` (both compiled into this crate, see `lib.rs`). Errors must come as errors; arguments
//! that pass must read back the same once written out as `key = literal, ...`, and the checks must
//! return a spec exactly when they report no error.

use super::{Target, Verdict};
use crate::macro_args::attr::{self, Errors, Options};
use crate::macro_args::valid;
use crate::mutate::InputKind;
use proc_macro2::{Literal, TokenStream};
use std::str::FromStr;

pub const TARGET: Target = Target {
    name: "attr",
    about: "the #[stick_breaking_attention(...)] arguments, as the macro parses and checks them",
    run,
    input: InputKind::Text,
    dictionary: &[&[
        "head_dim",
        "dtype",
        "mask",
        "layout",
        "remainder",
        "early_exit_bits",
        "cache",
        "seq",
        " = ",
        ", ",
        "::",
        "\"bf16\"",
        "\"f16\"",
        "\"attend_current\"",
        "\"bnhd\"",
        "\"fuse\"",
        "128",
        "64",
        "0",
        "-1",
        "4294967360",
        "128u8",
        "1e3",
        "0x80",
        "1_000",
        "r#\"x\"#",
        "b\"x\"",
        "'c'",
        "true",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        "#",
        "\\",
        "\"",
        "//",
        "/*",
    ]],
};

pub fn run(data: &[u8]) -> Verdict {
    let text = String::from_utf8_lossy(data);
    let tokens = match TokenStream::from_str(&text) {
        Ok(tokens) => tokens,
        Err(e) => return Verdict::Refused(format!("does not lex: {e}")),
    };
    let mut errors = Errors::default();
    let options = attr::parse(tokens, &mut errors);
    let checked = valid::check(&options, &mut errors);
    assert_eq!(checked.is_some(), errors.is_empty(), "`check` returns a spec exactly when there is no error");
    if !errors.is_empty() {
        return Verdict::Refused(errors.to_compile_error().to_string());
    }
    let written = write(&options);
    let mut again_errors = Errors::default();
    let again = attr::parse(TokenStream::from_str(&written).expect("written arguments lex"), &mut again_errors);
    assert!(again_errors.is_empty(), "`{written}` does not parse: {}", again_errors.to_compile_error());
    assert_eq!(write(&again), written, "arguments change when written and parsed again");
    Verdict::Accepted
}

/// The options as `key = literal, ...`, every key that is set, in [`attr::KEYS`] order.
fn write(o: &Options) -> String {
    let int = |key: &str, v: Option<u64>| v.map(|v| format!("{key} = {v}"));
    let text = |key: &str, v: Option<String>| v.map(|v| format!("{key} = {}", Literal::string(&v)));
    [
        int("head_dim", o.head_dim.as_ref().map(|s| s.value.into())),
        text("dtype", o.dtype.as_ref().map(|s| s.value.to_string())),
        text("mask", o.mask.as_ref().map(|s| s.value.to_string())),
        text("layout", o.layout.as_ref().map(|s| s.value.to_string())),
        text("remainder", o.remainder.as_ref().map(|s| s.value.to_string())),
        int("early_exit_bits", o.early_exit_bits.as_ref().map(|s| s.value.into())),
        text("cache", o.cache.as_ref().map(|s| s.value.clone())),
        int("seq", o.seq.as_ref().map(|s| s.value)),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ")
}
