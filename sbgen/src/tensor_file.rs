//! Reading safetensors files without trusting them: the 8-byte header length and the JSON header
//! are read and checked first ([`parse_header`], pure and panic-free on any bytes), then the data is
//! memory-mapped, so a huge file costs no memory until a tensor is used and `/dev/zero` or a pipe
//! is refused before it is read ([`TensorFile::open`]).
//!
//! Format: `u64` little-endian header length N, N bytes of JSON
//! `{"<name>": {"dtype": "BF16", "shape": [..], "data_offsets": [start, end]}, "__metadata__": {..}}`,
//! then the data; offsets are relative to the data and the tensors must tile it exactly.

use crate::files::FileError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The largest header accepted: 16 MiB, room for about 100,000 tensor entries (`run` reads at most
/// five). Lower than the `safetensors` crate's 100 MB because the header is parsed into JSON values,
/// about 16 times its size in memory for a crafted header.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

/// An element type of a safetensors file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorDtype {
    Bool,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl TensorDtype {
    const ALL: [(&'static str, TensorDtype, usize); 15] = [
        ("BOOL", TensorDtype::Bool, 1),
        ("U8", TensorDtype::U8, 1),
        ("I8", TensorDtype::I8, 1),
        ("F8_E5M2", TensorDtype::F8E5M2, 1),
        ("F8_E4M3", TensorDtype::F8E4M3, 1),
        ("I16", TensorDtype::I16, 2),
        ("U16", TensorDtype::U16, 2),
        ("F16", TensorDtype::F16, 2),
        ("BF16", TensorDtype::BF16, 2),
        ("I32", TensorDtype::I32, 4),
        ("U32", TensorDtype::U32, 4),
        ("F32", TensorDtype::F32, 4),
        ("I64", TensorDtype::I64, 8),
        ("U64", TensorDtype::U64, 8),
        ("F64", TensorDtype::F64, 8),
    ];

    fn parse(s: &str) -> Option<TensorDtype> {
        TensorDtype::ALL.iter().find(|(name, _, _)| *name == s).map(|(_, d, _)| *d)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        TensorDtype::ALL.iter().find(|(_, d, _)| *d == self).map_or(1, |(_, _, size)| *size)
    }

    /// The name the format uses (`BF16`).
    pub fn name(self) -> &'static str {
        TensorDtype::ALL.iter().find(|(_, d, _)| *d == self).map_or("?", |(name, _, _)| name)
    }
}

impl std::fmt::Display for TensorDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of the header: its data is `data[start..end]` of the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

/// A checked header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Bytes before the data: 8 + the JSON's length.
    pub data_start: usize,
    /// Length of the data section (the tensors tile it exactly).
    pub data_len: usize,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The free-form `__metadata__` strings.
    pub metadata: BTreeMap<String, String>,
}

/// Why a safetensors file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TensorFileError {
    #[error("{len} bytes: too short for the 8-byte header length")]
    TooShort { len: usize },
    #[error("the header is {len} bytes, more than the {MAX_HEADER_BYTES} allowed")]
    HeaderTooLarge { len: u64 },
    #[error("the header is {len} bytes but only {available} follow the length")]
    Truncated { len: u64, available: usize },
    #[error("the header is not valid JSON: {0}")]
    Json(String),
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error("{0}")]
    Layout(String),
    /// Unreadable, or not a regular file.
    #[error(transparent)]
    File(#[from] FileError),
    #[error("`{}` is {file_len} bytes, but its header describes {expected}", .path.display())]
    Length { path: PathBuf, file_len: u64, expected: u64 },
}

/// A tensor as the JSON spells it; checked into a [`TensorInfo`].
#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses and checks a header from the first bytes of a file (at least 8 + N; more is ignored):
/// the length, JSON with no key twice, a known dtype per tensor, offsets in order with
/// `end - start` = product of the shape * dtype size (no overflow), the tensors tiling the data
/// from 0 with no gap or overlap. Never panics.
pub fn parse_header(bytes: &[u8]) -> Result<Header, TensorFileError> {
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(TensorFileError::TooShort { len: bytes.len() });
    };
    let mut le = [0u8; 8];
    le.copy_from_slice(len_bytes);
    let len = u64::from_le_bytes(le);
    if len > MAX_HEADER_BYTES {
        return Err(TensorFileError::HeaderTooLarge { len });
    }
    // len <= 1e8 fits in usize on every platform sbgen builds for.
    let data_start = 8 + len as usize;
    let Some(json) = bytes.get(8..data_start) else {
        return Err(TensorFileError::Truncated { len, available: bytes.len() - 8 });
    };
    let json_err = |e: serde_json::Error| TensorFileError::Json(e.to_string());
    crate::json::check_no_duplicate_keys(json).map_err(json_err)?;
    let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(json).map_err(json_err)?;
    let mut header = Header { data_start, ..Header::default() };
    for (name, value) in entries {
        let bad = |message: String| TensorFileError::Tensor { name: name.escape_debug().to_string(), message };
        if name == "__metadata__" {
            header.metadata = serde_json::from_value(value)
                .map_err(|e| TensorFileError::Json(format!("`__metadata__` must map strings to strings: {e}")))?;
            continue;
        }
        let raw: RawTensor = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        let dtype = TensorDtype::parse(&raw.dtype).ok_or_else(|| {
            let known: Vec<&str> = TensorDtype::ALL.iter().map(|(n, _, _)| *n).collect();
            bad(format!("unknown dtype `{}` (known: {})", raw.dtype.escape_debug(), known.join(", ")))
        })?;
        let shape: Vec<usize> = raw
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| bad(format!("shape {:?} does not fit in memory", raw.shape)))?;
        let bytes_needed = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {shape:?} of {dtype} overflows")))?;
        let [start, end] = raw.data_offsets;
        let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
            return Err(bad(format!("data_offsets {:?} do not fit in memory", raw.data_offsets)));
        };
        if end < start || end - start != bytes_needed {
            return Err(bad(format!(
                "shape {shape:?} of {dtype} needs {bytes_needed} bytes, but data_offsets are [{start}, {end}]"
            )));
        }
        header.tensors.insert(name, TensorInfo { dtype, shape, start, end });
    }
    // The tensors must tile [0, data_len): sorted by start, each begins where the previous ended.
    let mut spans: Vec<(usize, usize, &str)> =
        header.tensors.iter().map(|(name, t)| (t.start, t.end, name.as_str())).collect();
    spans.sort_unstable();
    let mut at = 0;
    for (start, end, name) in spans {
        if start != at {
            let what = if start < at { "overlaps the tensor before it" } else { "leaves a gap before it" };
            return Err(TensorFileError::Layout(format!(
                "tensor `{}` starts at data offset {start}, which {what} (expected {at})",
                name.escape_debug()
            )));
        }
        at = end;
    }
    header.data_len = at;
    Ok(header)
}

/// A safetensors file with a checked header and its data memory-mapped.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    header: Header,
    map: memmap2::Mmap,
}

/// A tensor's dtype, shape and bytes (little-endian, row-major).
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub dtype: TensorDtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorFile {
    /// Opens `path`: a regular file only (checked before opening, so a pipe does not block); reads
    /// the 8-byte length and the header, checks it, checks that the file is exactly as long as the
    /// header says, and maps the file.
    pub fn open(path: &Path) -> Result<TensorFile, TensorFileError> {
        use std::io::Read;
        let io = |action: &'static str| {
            move |source| TensorFileError::File(FileError::Io { action, path: path.to_path_buf(), source })
        };
        let meta = std::fs::metadata(path).map_err(io("read"))?;
        if !meta.is_file() {
            return Err(FileError::NotRegular { path: path.to_path_buf() }.into());
        }
        let mut file = std::fs::File::open(path).map_err(io("open"))?;
        let mut head = [0u8; 8];
        // `read` may return fewer bytes than asked; only the file's end makes it too short.
        let mut n = 0;
        while n < 8 {
            match file.read(&mut head[n..]) {
                Ok(0) => return Err(TensorFileError::TooShort { len: n }),
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("read")(e)),
            }
        }
        let len = u64::from_le_bytes(head);
        if len > MAX_HEADER_BYTES {
            return Err(TensorFileError::HeaderTooLarge { len });
        }
        let mut bytes = head.to_vec();
        (&mut file).take(len).read_to_end(&mut bytes).map_err(io("read"))?;
        let header = parse_header(&bytes)?;
        let expected = header.data_start as u64 + header.data_len as u64;
        let file_len = file.metadata().map_err(io("read"))?.len();
        if file_len != expected {
            return Err(TensorFileError::Length { path: path.to_path_buf(), file_len, expected });
        }
        // SAFETY: the map is read-only and lives as long as `TensorFile`. Another process truncating
        // the file meanwhile would make reads fault; that is the contract of reading a mapped file,
        // and sbgen refuses to write its output over its input.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io("map"))?;
        if (map.len() as u64) < expected {
            return Err(TensorFileError::Length { path: path.to_path_buf(), file_len: map.len() as u64, expected });
        }
        Ok(TensorFile { path: path.to_path_buf(), header, map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The names of the tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.header.tensors.keys().map(String::as_str).collect()
    }

    /// The tensor `name`, if the file has it.
    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let t = self.header.tensors.get(name)?;
        let base = self.header.data_start;
        // In bounds: `open` checked the map against the header, `parse_header` the offsets.
        let data = self.map.get(base + t.start..base + t.end)?;
        Some(TensorView { dtype: t.dtype, shape: &t.shape, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_bytes(json: &str, data_len: usize) -> Vec<u8> {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.resize(b.len() + data_len, 0);
        b
    }

    #[test]
    fn a_valid_header_is_read_with_its_tensors_and_metadata() {
        let json = r#"{"__metadata__": {"k": "v"}, "q": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                       "r": {"dtype": "F32", "shape": [], "data_offsets": [12, 16]}}"#;
        let h = parse_header(&file_bytes(json, 16)).unwrap();
        assert_eq!(h.data_start, 8 + json.len());
        assert_eq!(h.data_len, 16);
        assert_eq!(h.tensors["q"], TensorInfo { dtype: TensorDtype::BF16, shape: vec![2, 3], start: 0, end: 12 });
        assert_eq!(h.metadata["k"], "v");
        // An empty file body is fine too.
        assert_eq!(parse_header(&file_bytes("{}", 0)).unwrap().data_len, 0);
    }

    #[test]
    fn a_bad_header_is_refused_saying_why() {
        let t = |name: &str, dtype: &str, shape: &str, offsets: &str| {
            format!(r#""{name}": {{"dtype": "{dtype}", "shape": {shape}, "data_offsets": {offsets}}}"#)
        };
        let q = t("q", "BF16", "[2]", "[0, 4]");
        let cases = [
            (format!("{{{q}, {q}}}"), "appears twice"),
            (format!("{{{}}}", t("q", "BF17", "[2]", "[0, 4]")), "unknown dtype `BF17`"),
            (format!("{{{}}}", t("q", "BF16", "[3]", "[0, 4]")), "needs 6"),
            (format!("{{{}}}", t("q", "BF16", "[2]", "[4, 0]")), "data_offsets are [4, 0]"),
            (format!("{{{}}}", t("q", "F64", "[4294967296, 4294967296]", "[0, 8]")), "overflows"),
            (format!("{{{}}}", t("q", "BF16", "[2]", "[0, 18446744073709551615]")), "needs 4"),
            (format!("{{{q}, {}}}", t("k", "BF16", "[2]", "[2, 6]")), "overlaps"),
            (format!("{{{q}, {}}}", t("k", "BF16", "[2]", "[6, 10]")), "gap"),
            (format!("{{{}}}", t("q", "BF16", "[2]", "[2, 6]")), "gap"),
            ("[1, 2]".to_string(), "not valid JSON"),
            (r#"{"__metadata__": {"a": 1}}"#.to_string(), "__metadata__"),
        ];
        for (json, expected) in cases {
            let err = parse_header(&file_bytes(&json, 64)).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn the_length_prefix_is_checked_before_anything_is_read() {
        assert!(matches!(parse_header(b"\x01\x02"), Err(TensorFileError::TooShort { len: 2 })));
        let huge = u64::MAX.to_le_bytes();
        assert!(matches!(parse_header(&huge), Err(TensorFileError::HeaderTooLarge { .. })));
        let mut short = 100u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"{}");
        assert!(matches!(parse_header(&short), Err(TensorFileError::Truncated { len: 100, available: 2 })));
    }

    #[test]
    fn no_input_panics() {
        // A cheap deterministic sweep over prefixes and single-byte corruptions of a valid file
        // (the fuzz target covers far more).
        let json = r#"{"q": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}"#;
        let good = file_bytes(json, 12);
        for cut in 0..good.len() {
            let _ = parse_header(&good[..cut]);
        }
        for i in 0..good.len() {
            for b in [0u8, b'"', b'9', b'{', 0xff] {
                let mut bad = good.clone();
                bad[i] = b;
                let _ = parse_header(&bad);
            }
        }
    }

    #[test]
    fn open_refuses_non_regular_files_and_a_wrong_length_and_maps_the_data() {
        let dir = std::env::temp_dir().join(format!("sbgen-tensor-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_regular =
            |p: &Path| matches!(TensorFile::open(p), Err(TensorFileError::File(FileError::NotRegular { .. })));
        assert!(not_regular(&dir));
        if Path::new("/dev/zero").exists() {
            assert!(not_regular(Path::new("/dev/zero")));
        }
        let json = r#"{"q": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}"#;
        let path = dir.join("t.safetensors");
        let mut bytes = file_bytes(json, 0);
        bytes.extend_from_slice(&[7, 8, 9]);
        std::fs::write(&path, &bytes).unwrap();
        let f = TensorFile::open(&path).unwrap();
        let q = f.tensor("q").unwrap();
        assert_eq!((q.dtype, q.shape, q.data), (TensorDtype::U8, &[3usize][..], &[7u8, 8, 9][..]));
        assert_eq!(f.names(), vec!["q"]);
        bytes.push(0);
        std::fs::write(&path, &bytes).unwrap();
        let err = TensorFile::open(&path).unwrap_err();
        assert!(matches!(err, TensorFileError::Length { file_len, expected, .. } if file_len == expected + 1), "{err}");
    }
}
