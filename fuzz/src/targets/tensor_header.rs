//! The safetensors header reader behind `sbgen run` (`sbgen::tensor_file::parse_header`): the
//! 8-byte little-endian length, then the JSON header, over bytes a user's file starts with. It
//! must refuse or accept any input without panicking, overflowing or allocating what the length
//! claims, and a header it accepts must describe data a reader can index without checking again:
//! every tensor's bytes are its shape times its element size, and the tensors tile the data.

use super::{Target, Verdict};
use crate::mutate::InputKind;
use sbgen::tensor_file::{parse_header, TensorInfo};

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
    let header = match parse_header(data) {
        Ok(header) => header,
        Err(e) => return Verdict::Refused(e.to_string()),
    };
    let declared = u64::from_le_bytes(data[..8].try_into().expect("an accepted header has its length"));
    assert_eq!(header.data_start as u64, 8 + declared, "data_start is not 8 + the declared length");
    assert!(header.data_start <= data.len(), "data_start {} is past the input", header.data_start);
    let mut tensors: Vec<&TensorInfo> = header.tensors.values().collect();
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut at = 0;
    for t in tensors {
        let elements = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elements.and_then(|n| n.checked_mul(t.dtype.size()));
        assert_eq!(bytes, Some(t.end - t.start), "a tensor's bytes are not its shape times its size: {t:?}");
        assert_eq!(t.start, at, "the tensors do not tile the data: {:?}", header.tensors);
        at = t.end;
    }
    assert_eq!(at, header.data_len, "the tensors do not cover data_len");
    Verdict::Accepted
}
