//! The safetensors header reader behind `sbgen run` (`sbgen::tensor_file::parse_header`): the
//! 8-byte little-endian length, then the JSON header, over bytes a user's file starts with. It
//! must refuse or accept any input without panicking, overflowing or allocating what the length
//! claims.

use super::{Target, Verdict};
use crate::mutate::InputKind;

pub const TARGET: Target = Target {
    name: "tensor_header",
    about: "the safetensors header `sbgen run` reads (length prefix + JSON)",
    run,
    input: InputKind::LengthPrefixedJson,
    dictionary: &[&[
        "__metadata__",
        "dtype",
        "shape",
        "data_offsets",
        "F32",
        "BF16",
        "F16",
        "F64",
        "I64",
        "U8",
        "BOOL",
        "q",
        "k",
        "v",
        "o",
        "rem",
    ]],
};

pub fn run(data: &[u8]) -> Verdict {
    match sbgen::tensor_file::parse_header(data) {
        Ok(_) => Verdict::Accepted,
        Err(e) => Verdict::Refused(e.to_string()),
    }
}
