//! `sbgen run`: one kernel on tensors from a safetensors file, outputs to another.
//!
//! Input tensors (names exact, little-endian, contiguous, as `safetensors.torch.save_file` writes).
//! k and v may have fewer heads than q, `H_kv` dividing `H` (grouped-query attention; `H_kv = 1` is
//! multi-query); everything else about them matches q.
//!
//! | name         | dtype                              | `--layout bhnd` | `--layout bnhd` | `--layout thd` | when |
//! |--------------|------------------------------------|-----------------|-----------------|----------------|------|
//! | `q`          | BF16 or F16                        | [B, H, N, D]    | [B, N, H, D]    | [T, H, D]      | always |
//! | `k`, `v`     | same as q                          | [B, H_kv, N, D] | [B, N, H_kv, D] | [T, H_kv, D]   | always |
//! | `do`         | same as q                          | same as q       | same as q       | same as q      | backward |
//! | `drem`       | F32 (BF16, F16, F64 are converted) | [B, H, N]       | [B, H, N]       | [H, T]         | backward, optional |
//! | `cu_seqlens` | I32                                | refused         | refused         | [B + 1]        | thd only |
//!
//! THD is a packed batch: sequence b is tokens `cu_seqlens[b] .. cu_seqlens[b + 1]`, checked on the
//! host ([`check_cu_seqlens`]: 0 first, non-decreasing, T last); B and the longest sequence (the
//! problem's N) come from it. Empty sequences are allowed, but not a batch of nothing but empty
//! sequences: the kernels need N >= 1, and such a run is refused rather than writing empty outputs.
//!
//! Outputs: `o` (q's dtype and shape; o + rem * v with `--remainder fuse`), `rem` and `log2_rem`
//! (F32, [B, H, N]; THD [H, T]) for the forward; `dq` (q's dtype and shape), `dk`, `dv` (k's dtype
//! and shape) for the backward. The backward runs the forward first (it needs o and log2_rem), so
//! `--pass bwd` writes all of them. Tensors are uploaded as they are (they are already in the
//! kernel's layout). The dtype comes from q, D from q's last dimension (any of [`HEAD_DIM_RANGE`]).

use super::data::Sequences;
use super::device::{Device, GpuError};
use super::exec::{self, DeviceProblem};
use super::kernels::{BuildError, KernelBuilder};
use crate::files::{self, FileError};
use crate::ir::{Dtype, Layout, Mask, Pass, Remainder, Schedule, Spec};
use crate::tensor_file::{TensorDtype, TensorFile, TensorFileError, TensorView};
use safetensors::Dtype as StDtype;
use sbgen_runtime::launcher::SbElement;
use sbgen_runtime::reference::Shape;
use sbgen_runtime::spec::HEAD_DIM_RANGE;
use sbgen_runtime::varlen::check_cu_seqlens;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which passes to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunPass {
    Forward,
    Backward,
    Both,
}

/// One `sbgen run` request.
#[derive(Clone, Debug)]
pub struct RunRequest {
    pub input: PathBuf,
    pub output: PathBuf,
    pub pass: RunPass,
    pub mask: Mask,
    pub layout: Layout,
    pub remainder: Remainder,
    pub early_exit_bits: Option<u32>,
    /// A deterministic backward (the forward always is).
    pub deterministic: bool,
    /// `None`: each spec's default schedule on the device's arch ([`Schedule::default_on`]).
    pub schedule: Option<Schedule>,
    pub scale: Option<f32>,
}

impl RunRequest {
    /// The kernels the request runs: the backward needs the forward's outputs, so it runs both.
    pub fn passes(&self) -> &'static [Pass] {
        match self.pass {
            RunPass::Forward => &[Pass::Forward],
            RunPass::Backward | RunPass::Both => &[Pass::Forward, Pass::Backward],
        }
    }

    /// The spec of `pass` for inputs of `head_dim` and `dtype`: the same rule as
    /// `cli::emit::SpecArgs::spec` (`deterministic` applies to the backward only).
    pub fn spec(&self, head_dim: u32, dtype: Dtype, pass: Pass) -> Spec {
        Spec {
            head_dim,
            dtype,
            mask: self.mask,
            layout: self.layout,
            remainder: self.remainder,
            pass,
            early_exit_bits: self.early_exit_bits,
            deterministic: self.deterministic && pass == Pass::Backward,
        }
    }
}

/// Why a run failed. [`RunError::Input`] is the caller's to fix (exit 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A missing, misshapen or mistyped tensor, a bad `cu_seqlens`, or an unreadable or invalid
    /// file: names the tensor (and index) or the file.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("cannot {action} `{}`: {message}", .path.display())]
    Io { action: &'static str, path: PathBuf, message: String },
    #[error(transparent)]
    File(#[from] FileError),
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub shape: Shape,
    pub dtype: Dtype,
    pub kernels: Vec<String>,
    /// (tensor name, shape) of each tensor written.
    pub written: Vec<(String, Vec<usize>)>,
    /// Tensors with NaN or infinite elements, and how many.
    pub non_finite: Vec<(String, usize)>,
}

/// The input file with its tensors checked against the request (names, dtypes, shapes,
/// `cu_seqlens`), from the header and `cu_seqlens` alone: the rest of the data stays mapped,
/// unread, until [`run`] uploads it.
#[derive(Debug)]
pub struct Loaded {
    /// B (THD: the number of sequences), H, H_kv, N (THD: the longest sequence), D.
    pub shape: Shape,
    pub dtype: Dtype,
    /// `shape.head_dim`, checked to be in [`HEAD_DIM_RANGE`].
    pub head_dim: u32,
    /// Each sequence's length: `[N; B]`, or THD's from `cu_seqlens`.
    pub seq_lens: Vec<usize>,
    /// THD: the packed token count T; `None` for the dense layouts.
    pub packed_tokens: Option<usize>,
    /// q's dimensions as in the file (the layout's order): also o's, do's and dq's.
    dims: Vec<usize>,
    /// k's (and v's, dk's, dv's) dimensions as in the file.
    kv_dims: Vec<usize>,
    /// rem's and log2_rem's dimensions: [B, H, N], or THD's [H, T].
    row_dims: Vec<usize>,
    file: TensorFile,
    /// Whether the file's `drem` is used (a backward pass and the tensor present).
    d_rem: bool,
}

/// Where each layout keeps the heads axis, and how it spells its dimensions.
fn layout_axes(layout: Layout) -> (usize, &'static str, &'static str) {
    match layout {
        Layout::Bhnd => (1, "[B, H, N, D] (--layout bhnd)", "[B, H_kv, N, D]"),
        Layout::Bnhd => (2, "[B, N, H, D] (--layout bnhd)", "[B, N, H_kv, D]"),
        Layout::Thd => (1, "[T, H, D] (--layout thd)", "[T, H_kv, D]"),
        Layout::Paged => (1, "[B, H, D] (--layout paged)", "[num_pages, page_size, H_kv, D]"),
    }
}

/// Opens and checks the input file for `req` (no GPU needed): what `run` would refuse, it refuses
/// here. The file is read once: the header and `cu_seqlens` now, the rest when [`run`] uploads it.
pub fn load(req: &RunRequest) -> Result<Loaded, RunError> {
    let input = req.input.display();
    let file = TensorFile::open(&req.input).map_err(|e| match e {
        TensorFileError::File(_) | TensorFileError::Length { .. } => RunError::Input(e.to_string()),
        other => RunError::Input(format!("`{input}` is not a valid safetensors file: {other}")),
    })?;
    let names = file.names().join(", ");
    let missing = |name: &str, why: &str| {
        RunError::Input(format!("tensor `{name}` is missing from `{input}`{why} (it has: {})", names.escape_debug()))
    };
    let get = |name: &str| file.tensor(name).ok_or_else(|| missing(name, ""));
    let thd = req.layout == Layout::Thd;
    let (heads_axis, layout_dims, kv_layout_dims) = layout_axes(req.layout);
    let rank = if thd { 3 } else { 4 };
    // First: a packed file run without --layout thd would otherwise be refused for q's rank.
    if !thd && file.tensor("cu_seqlens").is_some() {
        return Err(RunError::Input(format!(
            "tensor `cu_seqlens` describes a packed batch, but the layout is {}: use --layout thd (or --varlen) \
             with q, k, v of shape [T, H, D]",
            req.layout
        )));
    }

    let q = get("q")?;
    let dtype = match q.dtype {
        TensorDtype::BF16 => Dtype::Bf16,
        TensorDtype::F16 => Dtype::F16,
        other => return Err(RunError::Input(format!("tensor `q` has dtype {other}: allowed BF16, F16"))),
    };
    let dims = q.shape.to_vec();
    if dims.len() != rank {
        return Err(RunError::Input(format!(
            "tensor `q` has shape {dims:?}: expected {rank} dimensions {layout_dims}"
        )));
    }
    // Before anything else reads D: a cast would turn 2^32 + 64 into 64.
    let head_dim = match u32::try_from(dims[rank - 1]) {
        Ok(d) if HEAD_DIM_RANGE.contains(&d) => d,
        _ => {
            return Err(RunError::Input(format!(
                "tensor `q` has head dimension D = {}: supported head dimensions are {}..={}",
                dims[rank - 1],
                HEAD_DIM_RANGE.start(),
                HEAD_DIM_RANGE.end()
            )))
        }
    };
    // THD's T may be 0 here (every sequence empty): refused below, with `cu_seqlens` in hand.
    let first_sized = usize::from(thd);
    if dims[first_sized..].contains(&0) {
        return Err(RunError::Input(format!(
            "tensor `q` has shape {dims:?}: every dimension {}must be at least 1",
            if thd { "but T " } else { "" }
        )));
    }
    let heads = dims[heads_axis];

    // k: q's dimensions but for the heads, which must divide q's.
    let k = get("k")?;
    let same_dtype = |name: &str, t: &TensorView<'_>| -> Result<(), RunError> {
        if t.dtype != q.dtype {
            return Err(RunError::Input(format!(
                "tensor `{name}` has dtype {}: it must match `q` ({})",
                t.dtype, q.dtype
            )));
        }
        Ok(())
    };
    same_dtype("k", &k)?;
    // A k of the wrong rank gets H_kv = 0 here and fails the comparison below.
    let kv_heads = if k.shape.len() == rank { k.shape[heads_axis] } else { 0 };
    let mut kv_dims = dims.clone();
    kv_dims[heads_axis] = kv_heads;
    if k.shape != kv_dims.as_slice() {
        return Err(RunError::Input(format!(
            "tensor `k` has shape {:?}: expected {kv_layout_dims} with `q`'s other dimensions {dims:?}",
            k.shape
        )));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(RunError::Input(format!(
            "tensor `k` has H_kv = {kv_heads} heads, which does not divide `q`'s H = {heads} heads \
             (grouped-query attention needs H a multiple of H_kv, H_kv >= 1)"
        )));
    }
    let v = get("v")?;
    same_dtype("v", &v)?;
    if v.shape != k.shape {
        return Err(RunError::Input(format!("tensor `v` has shape {:?}: it must match `k` {kv_dims:?}", v.shape)));
    }
    let backward = req.pass != RunPass::Forward;
    if backward {
        let d_o = get("do")?;
        same_dtype("do", &d_o)?;
        if d_o.shape != dims.as_slice() {
            return Err(RunError::Input(format!("tensor `do` has shape {:?}: it must match `q` {dims:?}", d_o.shape)));
        }
    }

    let (shape, seq_lens, packed_tokens, row_dims) = if thd {
        let tokens = dims[0];
        let cu = cu_seqlens(&file, tokens, || missing("cu_seqlens", " (--layout thd needs it)"))?;
        let packed = check_cu_seqlens(&cu, tokens)
            .map_err(|e| RunError::Input(format!("tensor `cu_seqlens` in `{input}`: {e}")))?;
        if packed.max_seqlen == 0 {
            return Err(RunError::Input(format!(
                "tensor `cu_seqlens` = {cu:?} describes {} empty sequences: nothing to run (the kernels need \
                 at least one token)",
                packed.batch
            )));
        }
        // check_cu_seqlens proved the offsets non-decreasing, so each difference is a length.
        let lens = cu.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
        let shape = Shape::new(packed.batch, heads, packed.max_seqlen, dims[2]).with_kv_heads(kv_heads);
        (shape, lens, Some(tokens), vec![heads, tokens])
    } else {
        let (batch, seq) = match req.layout {
            Layout::Bnhd => (dims[0], dims[1]),
            _ => (dims[0], dims[2]),
        };
        let shape = Shape::new(batch, heads, seq, dims[3]).with_kv_heads(kv_heads);
        (shape, vec![seq; batch], None, vec![batch, heads, seq])
    };

    let d_rem = backward && file.tensor("drem").is_some();
    if d_rem {
        let t = get("drem")?;
        if t.shape != row_dims.as_slice() {
            let named = if thd { "[H, T]" } else { "[B, H, N]" };
            return Err(RunError::Input(format!(
                "tensor `drem` has shape {:?}: expected {named} = {row_dims:?}",
                t.shape
            )));
        }
        if !matches!(t.dtype, TensorDtype::F32 | TensorDtype::F64 | TensorDtype::BF16 | TensorDtype::F16) {
            return Err(RunError::Input(format!(
                "tensor `drem` has dtype {}: allowed F32 (or BF16, F16, F64)",
                t.dtype
            )));
        }
    }
    Ok(Loaded { shape, dtype, head_dim, seq_lens, packed_tokens, dims, kv_dims, row_dims, file, d_rem })
}

/// THD's `cu_seqlens` as i32 values: an I32 tensor of one dimension (its offsets are checked by the
/// caller).
fn cu_seqlens(file: &TensorFile, tokens: usize, missing: impl FnOnce() -> RunError) -> Result<Vec<i32>, RunError> {
    let t = file.tensor("cu_seqlens").ok_or_else(missing)?;
    if t.dtype != TensorDtype::I32 {
        return Err(RunError::Input(format!("tensor `cu_seqlens` has dtype {}: allowed I32", t.dtype)));
    }
    if t.shape.len() != 1 {
        return Err(RunError::Input(format!(
            "tensor `cu_seqlens` has shape {:?}: expected [B + 1] (0, then each sequence's end, the last = T = \
             {tokens})",
            t.shape
        )));
    }
    Ok(t.data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

impl Loaded {
    /// The spec of `pass` for this input and `req`.
    pub fn spec(&self, req: &RunRequest, pass: Pass) -> Spec {
        req.spec(self.head_dim, self.dtype, pass)
    }

    /// The sizes for a report line: `B=2, H=8, H_kv=2, N=128, D=64`, or for THD
    /// `T=300 in B=3 sequences, H=8, H_kv=2, max N=128, D=64`.
    pub fn sizes(&self) -> String {
        let s = self.shape;
        let heads = format!("H={}, H_kv={}", s.heads, s.kv_heads);
        match self.packed_tokens {
            Some(t) => format!("T={t} in B={} sequences, {heads}, max N={}, D={}", s.batch, s.seq, s.head_dim),
            None => format!("B={}, {heads}, N={}, D={}", s.batch, s.seq, s.head_dim),
        }
    }

    /// The 16-bit elements of `name` (checked by [`load`] to be q's dtype).
    fn bits(&self, name: &str) -> Vec<u16> {
        let data = self.file.tensor(name).map_or(&[][..], |t| t.data);
        data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()
    }

    /// `drem` as f32, when used.
    fn d_rem(&self) -> Option<Vec<f32>> {
        let t = self.file.tensor("drem").filter(|_| self.d_rem)?;
        let data = t.data;
        Some(match t.dtype {
            TensorDtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                .collect(),
            TensorDtype::BF16 => {
                data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            TensorDtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            // F32, the only other dtype `load` lets through.
            _ => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        })
    }
}

/// Runs the request on `dev` with the input `load` checked, and writes the output file.
pub fn run(dev: &Device, builder: &KernelBuilder, req: &RunRequest, loaded: Loaded) -> Result<RunReport, RunError> {
    match loaded.dtype {
        Dtype::Bf16 => run_typed::<half::bf16>(dev, builder, req, loaded),
        Dtype::F16 => run_typed::<half::f16>(dev, builder, req, loaded),
    }
}

fn run_typed<T: SbElement>(
    dev: &Device,
    builder: &KernelBuilder,
    req: &RunRequest,
    l: Loaded,
) -> Result<RunReport, RunError> {
    let timeout = Duration::from_secs(300);
    let spec = |pass| l.spec(req, pass);
    let fwd = builder.build(&builder.kernel(spec(Pass::Forward), req.schedule))?;
    let upload = |name: &str| {
        let x: Vec<T> = l.bits(name).into_iter().map(T::from_bits).collect();
        dev.stream.clone_htod(&x).map_err(GpuError::from)
    };
    let backward = req.pass != RunPass::Forward;
    let q_len: usize = l.dims.iter().product();
    let problem = DeviceProblem::<T> {
        shape: l.shape,
        layout: req.layout,
        // The file's `cu_seqlens`, rebuilt from the lengths `load` checked it into.
        cu_seqlens: exec::upload_cu_seqlens(dev, req.layout, &l.seq_lens)?,
        seq_lens: l.seq_lens.clone(),
        q: upload("q")?,
        k: upload("k")?,
        v: upload("v")?,
        d_o: if backward {
            upload("do")?
        } else {
            // The forward takes no dO, but the problem holds one: zeros, q-sized.
            dev.stream.clone_htod(&vec![T::from_bits(0); q_len]).map_err(GpuError::from)?
        },
        d_rem: match l.d_rem() {
            Some(d) => Some(exec::upload_f32(dev, &d)?),
            None => None,
        },
    };
    debug_assert_eq!(problem.q_len(), q_len, "q's file shape and the problem agree");
    let mut kernels = vec![fwd.name().to_string()];
    let out = exec::forward(dev, &fwd, &problem, req.scale, req.pass != RunPass::Forward)?;
    dev.sync(fwd.name(), timeout)?;
    let st_dtype = match l.dtype {
        Dtype::Bf16 => StDtype::BF16,
        Dtype::F16 => StDtype::F16,
    };
    let mut out_file = OutFile::default();
    let o: Vec<T> = dev.stream.clone_dtoh(&out.o).map_err(GpuError::from)?;
    out_file.push(
        "o",
        st_dtype,
        &l.dims,
        o.iter().map(|v| v.to_f32()),
        o.iter().flat_map(|v| v.to_bits().to_le_bytes()),
    );
    for (name, x) in [("rem", &out.rem), ("log2_rem", &out.log2_rem)] {
        let x = exec::download_f32(dev, x)?;
        out_file.push(name, StDtype::F32, &l.row_dims, x.iter().copied(), x.iter().flat_map(|v| v.to_le_bytes()));
    }
    if req.pass != RunPass::Forward {
        let bwd = builder.build(&builder.kernel(spec(Pass::Backward), req.schedule))?;
        kernels.push(bwd.name().to_string());
        let g = exec::backward(dev, &bwd, &problem, exec::Saved::of(&out), req.scale)?;
        dev.sync(bwd.name(), timeout)?;
        for (name, x, dims) in [("dq", &g.dq, &l.dims), ("dk", &g.dk, &l.kv_dims), ("dv", &g.dv, &l.kv_dims)] {
            let x: Vec<T> = dev.stream.clone_dtoh(x).map_err(GpuError::from)?;
            out_file.push(
                name,
                st_dtype,
                dims,
                x.iter().map(|v| v.to_f32()),
                x.iter().flat_map(|v| v.to_bits().to_le_bytes()),
            );
        }
    }
    let OutFile { tensors, non_finite } = out_file;
    let written = tensors.iter().map(|(n, _, s, _)| (n.clone(), s.clone())).collect();
    let mut meta = HashMap::new();
    meta.insert("sbgen_version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    meta.insert("kernels".to_string(), kernels.join(","));
    meta.insert("device".to_string(), dev.describe());
    write_safetensors(&req.output, &tensors, meta)?;
    Ok(RunReport { shape: l.shape, dtype: l.dtype, kernels, written, non_finite })
}

/// The output tensors as they are collected.
#[derive(Default)]
struct OutFile {
    tensors: Vec<(String, StDtype, Vec<usize>, Vec<u8>)>,
    non_finite: Vec<(String, usize)>,
}

impl OutFile {
    fn push(
        &mut self,
        name: &str,
        dtype: StDtype,
        shape: &[usize],
        values: impl Iterator<Item = f32>,
        bytes: impl Iterator<Item = u8>,
    ) {
        let bad = values.filter(|v| !v.is_finite()).count();
        if bad > 0 {
            self.non_finite.push((name.to_string(), bad));
        }
        self.tensors.push((name.to_string(), dtype, shape.to_vec(), bytes.collect()));
    }
}

/// Writes `(name, dtype, shape, bytes)` tensors to `path` atomically ([`files::write_atomic`]: a
/// failed write leaves the old file and no temp file).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, StDtype, Vec<usize>, Vec<u8>)],
    meta: HashMap<String, String>,
) -> Result<(), RunError> {
    let serialise = |e: safetensors::SafeTensorError| RunError::Io {
        action: "serialise",
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(serialise)?;
    let bytes = safetensors::serialize(views, Some(meta)).map_err(serialise)?;
    Ok(files::write_atomic(path, &bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(input: &Path, layout: Layout, pass: RunPass) -> RunRequest {
        RunRequest {
            input: input.to_path_buf(),
            output: input.with_extension("out"),
            pass,
            mask: Mask::Strict,
            layout,
            remainder: Remainder::Return,
            early_exit_bits: None,
            deterministic: false,
            schedule: None,
            scale: None,
        }
    }

    fn tensor(name: &str, dtype: StDtype, shape: &[usize]) -> (String, StDtype, Vec<usize>, Vec<u8>) {
        let n: usize = shape.iter().product();
        let size = match dtype {
            StDtype::F32 | StDtype::I32 => 4,
            StDtype::F64 | StDtype::I64 => 8,
            _ => 2,
        };
        (name.to_string(), dtype, shape.to_vec(), vec![0u8; n * size])
    }

    fn file(name: &str, tensors: &[(String, StDtype, Vec<usize>, Vec<u8>)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sbgen-run-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        write_safetensors(&path, tensors, HashMap::new()).unwrap();
        path
    }

    fn input_error(req: &RunRequest) -> String {
        match load(req) {
            Err(RunError::Input(m)) => m,
            other => panic!("expected an input error, got {other:?}"),
        }
    }

    #[test]
    fn reads_bnhd_shapes_and_the_dtype() {
        let s = [2, 7, 3, 64];
        let path = file(
            "bnhd.safetensors",
            &[tensor("q", StDtype::F16, &s), tensor("k", StDtype::F16, &s), tensor("v", StDtype::F16, &s)],
        );
        let loaded = load(&request(&path, Layout::Bnhd, RunPass::Forward)).unwrap();
        assert_eq!(loaded.shape, Shape::new(2, 3, 7, 64));
        assert_eq!(loaded.dtype, Dtype::F16);
    }

    #[test]
    fn names_a_missing_tensor() {
        let s = [1, 2, 5, 64];
        let path = file("missing.safetensors", &[tensor("q", StDtype::BF16, &s), tensor("k", StDtype::BF16, &s)]);
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Forward));
        assert!(m.contains("tensor `v` is missing"), "{m}");
        let path = file(
            "missing-do.safetensors",
            &[tensor("q", StDtype::BF16, &s), tensor("k", StDtype::BF16, &s), tensor("v", StDtype::BF16, &s)],
        );
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Both));
        assert!(m.contains("tensor `do` is missing"), "{m}");
    }

    #[test]
    fn names_a_misshapen_or_mistyped_tensor() {
        let s = [1, 2, 5, 64];
        let path = file(
            "shape.safetensors",
            &[
                tensor("q", StDtype::BF16, &s),
                tensor("k", StDtype::BF16, &[1, 2, 4, 64]),
                tensor("v", StDtype::BF16, &s),
            ],
        );
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Forward));
        assert!(m.contains("tensor `k` has shape [1, 2, 4, 64]") && m.contains("[1, 2, 5, 64]"), "{m}");
        let path = file(
            "dtype.safetensors",
            &[tensor("q", StDtype::BF16, &s), tensor("k", StDtype::BF16, &s), tensor("v", StDtype::F16, &s)],
        );
        assert!(input_error(&request(&path, Layout::Bhnd, RunPass::Forward)).contains("tensor `v` has dtype F16"));
        let path = file("f32.safetensors", &[tensor("q", StDtype::F32, &s)]);
        assert!(input_error(&request(&path, Layout::Bhnd, RunPass::Forward)).contains("allowed BF16, F16"));
        let path = file("rank.safetensors", &[tensor("q", StDtype::BF16, &[2, 5, 64])]);
        assert!(input_error(&request(&path, Layout::Bhnd, RunPass::Forward)).contains("4 dimensions"));
        let path = file("d300.safetensors", &[tensor("q", StDtype::BF16, &[1, 1, 4, 300])]);
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Forward));
        assert!(m.contains("D = 300") && m.contains("1..=256"), "{m}");
        let path = file(
            "drem.safetensors",
            &[
                tensor("q", StDtype::BF16, &s),
                tensor("k", StDtype::BF16, &s),
                tensor("v", StDtype::BF16, &s),
                tensor("do", StDtype::BF16, &s),
                tensor("drem", StDtype::F32, &[1, 5, 2]),
            ],
        );
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Backward));
        assert!(m.contains("tensor `drem` has shape [1, 5, 2]: expected [B, H, N] = [1, 2, 5]"), "{m}");
    }

    #[test]
    fn refuses_a_file_that_is_not_safetensors() {
        let path = std::env::temp_dir().join(format!("sbgen-run-garbage-{}.safetensors", std::process::id()));
        std::fs::write(&path, b"not a tensor file").unwrap();
        assert!(input_error(&request(&path, Layout::Bhnd, RunPass::Forward)).contains("not a valid safetensors file"));
    }

    #[test]
    fn a_head_dim_past_u32_is_refused_not_truncated() {
        // 2^32 + 64 would become 64 through `as u32`; a zero batch keeps the file empty.
        let d = (1usize << 32) + 64;
        let path = file("d-huge.safetensors", &[tensor("q", StDtype::BF16, &[0, 1, 1, d])]);
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Forward));
        assert!(m.contains("D = 4294967360") && m.contains("1..=256"), "{m}");
    }

    #[test]
    fn refuses_a_device_a_folder_and_duplicate_tensor_names() {
        let dir = std::env::temp_dir();
        assert!(input_error(&request(&dir, Layout::Bhnd, RunPass::Forward)).contains("not a regular file"));
        if Path::new("/dev/zero").exists() {
            let m = input_error(&request(Path::new("/dev/zero"), Layout::Bhnd, RunPass::Forward));
            assert!(m.contains("not a regular file"), "{m}");
        }
        let json = r#"{"q": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
                       "q": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.extend_from_slice(&[0, 0]);
        let path = dir.join(format!("sbgen-run-dup-{}.safetensors", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Forward));
        assert!(m.contains("`q` appears twice"), "{m}");
    }

    /// An I32 `cu_seqlens` holding `offsets`.
    fn cu(offsets: &[i32]) -> (String, StDtype, Vec<usize>, Vec<u8>) {
        let bytes = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        ("cu_seqlens".to_string(), StDtype::I32, vec![offsets.len()], bytes)
    }

    /// q, k, v (and do) of `q` and `kv` shapes, BF16.
    fn qkv(q: &[usize], kv: &[usize]) -> Vec<(String, StDtype, Vec<usize>, Vec<u8>)> {
        vec![
            tensor("q", StDtype::BF16, q),
            tensor("k", StDtype::BF16, kv),
            tensor("v", StDtype::BF16, kv),
            tensor("do", StDtype::BF16, q),
        ]
    }

    #[test]
    fn thd_shapes_come_from_cu_seqlens() {
        // Three sequences of 3, 0 and 7 tokens; GQA with 2 K/V heads; D = 50.
        let mut t = qkv(&[10, 4, 50], &[10, 2, 50]);
        t.push(cu(&[0, 3, 3, 10]));
        let path = file("thd.safetensors", &t);
        let loaded = load(&request(&path, Layout::Thd, RunPass::Forward)).unwrap();
        assert_eq!(loaded.shape, Shape::new(3, 4, 7, 50).with_kv_heads(2));
        assert_eq!(loaded.seq_lens, vec![3, 0, 7]);
        assert_eq!(loaded.packed_tokens, Some(10));
        assert_eq!((loaded.kv_dims.clone(), loaded.row_dims.clone()), (vec![10, 2, 50], vec![4, 10]));
        assert_eq!(loaded.sizes(), "T=10 in B=3 sequences, H=4, H_kv=2, max N=7, D=50");
        // drem is [H, T] in THD.
        t.push(tensor("drem", StDtype::F32, &[4, 10]));
        let path = file("thd-drem.safetensors", &t);
        assert!(load(&request(&path, Layout::Thd, RunPass::Both)).unwrap().d_rem);
        t.pop();
        t.push(tensor("drem", StDtype::F32, &[1, 4, 7]));
        let path = file("thd-drem-bhn.safetensors", &t);
        let m = input_error(&request(&path, Layout::Thd, RunPass::Both));
        assert!(m.contains("tensor `drem` has shape [1, 4, 7]: expected [H, T] = [4, 10]"), "{m}");
        // A 4-dimensional q is not THD.
        let path = file("thd-rank.safetensors", &qkv(&[1, 10, 4, 64], &[1, 10, 4, 64]));
        let m = input_error(&request(&path, Layout::Thd, RunPass::Forward));
        assert!(m.contains("expected 3 dimensions [T, H, D]"), "{m}");
    }

    #[test]
    fn gqa_takes_k_and_v_with_fewer_heads_that_divide_q_s() {
        for (layout, q, kv, shape) in [
            (Layout::Bhnd, [1, 8, 5, 64], [1, 2, 5, 64], Shape::new(1, 8, 5, 64).with_kv_heads(2)),
            (Layout::Bhnd, [1, 8, 5, 64], [1, 1, 5, 64], Shape::new(1, 8, 5, 64).with_kv_heads(1)),
            (Layout::Bnhd, [2, 5, 6, 32], [2, 5, 3, 32], Shape::new(2, 6, 5, 32).with_kv_heads(3)),
        ] {
            let path = file(&format!("gqa-{layout}-{}.safetensors", shape.kv_heads), &qkv(&q, &kv));
            let loaded = load(&request(&path, layout, RunPass::Both)).unwrap();
            assert_eq!(loaded.shape, shape, "{layout}");
            assert_eq!(loaded.kv_dims, kv.to_vec());
        }
        let path = file("gqa-3-of-8.safetensors", &qkv(&[1, 8, 5, 64], &[1, 3, 5, 64]));
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Forward));
        assert!(m.contains("`k` has H_kv = 3 heads") && m.contains("`q`'s H = 8"), "{m}");
        // v follows k, not q.
        let mut t = qkv(&[1, 8, 5, 64], &[1, 2, 5, 64]);
        t[2] = tensor("v", StDtype::BF16, &[1, 8, 5, 64]);
        let path = file("gqa-v.safetensors", &t);
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Forward));
        assert!(m.contains("tensor `v` has shape [1, 8, 5, 64]: it must match `k` [1, 2, 5, 64]"), "{m}");
    }

    #[test]
    fn bad_cu_seqlens_are_refused_naming_the_index() {
        let with = |name: &str, offsets: &[i32], tokens: usize| {
            let mut t = qkv(&[tokens, 2, 64], &[tokens, 2, 64]);
            t.push(cu(offsets));
            file(name, &t)
        };
        let req = |path: &Path| request(path, Layout::Thd, RunPass::Forward);
        let m = input_error(&req(&with("cu-dec.safetensors", &[0, 5, 3, 10], 10)));
        assert!(m.contains("`cu_seqlens[2]` = 3 is less than `cu_seqlens[1]` = 5"), "{m}");
        let m = input_error(&req(&with("cu-total.safetensors", &[0, 4, 9], 10)));
        assert!(m.contains("`cu_seqlens[2]` = 9") && m.contains("10"), "{m}");
        let m = input_error(&req(&with("cu-first.safetensors", &[2, 10], 10)));
        assert!(m.contains("`cu_seqlens[0]` = 2"), "{m}");
        let m = input_error(&req(&with("cu-empty.safetensors", &[0, 0, 0], 0)));
        assert!(m.contains("2 empty sequences: nothing to run"), "{m}");
        let path = file("cu-missing.safetensors", &qkv(&[10, 2, 64], &[10, 2, 64]));
        let m = input_error(&req(&path));
        assert!(m.contains("tensor `cu_seqlens` is missing") && m.contains("--layout thd needs it"), "{m}");
        let mut t = qkv(&[10, 2, 64], &[10, 2, 64]);
        t.push(tensor("cu_seqlens", StDtype::I64, &[2]));
        let m = input_error(&req(&file("cu-i64.safetensors", &t)));
        assert!(m.contains("tensor `cu_seqlens` has dtype I64: allowed I32"), "{m}");
        let mut t = qkv(&[10, 2, 64], &[10, 2, 64]);
        t.push(tensor("cu_seqlens", StDtype::I32, &[2, 2]));
        let m = input_error(&req(&file("cu-2d.safetensors", &t)));
        assert!(m.contains("tensor `cu_seqlens` has shape [2, 2]: expected [B + 1]"), "{m}");
    }

    #[test]
    fn cu_seqlens_in_a_dense_layout_is_refused() {
        let mut t = qkv(&[1, 2, 5, 64], &[1, 2, 5, 64]);
        t.push(cu(&[0, 5]));
        let path = file("cu-dense.safetensors", &t);
        for layout in [Layout::Bhnd, Layout::Bnhd] {
            let m = input_error(&request(&path, layout, RunPass::Forward));
            assert!(m.contains("tensor `cu_seqlens`") && m.contains("use --layout thd"), "{m}");
        }
    }

    #[test]
    fn any_head_dim_up_to_256_is_accepted() {
        for d in [96, 50, 1, 256] {
            let path = file(&format!("d{d}.safetensors"), &qkv(&[1, 2, 3, d], &[1, 2, 3, d]));
            let loaded = load(&request(&path, Layout::Bhnd, RunPass::Both)).unwrap();
            assert_eq!((loaded.head_dim, loaded.shape.head_dim), (d as u32, d));
        }
        let path = file("d0.safetensors", &[tensor("q", StDtype::BF16, &[1, 2, 3, 0])]);
        let m = input_error(&request(&path, Layout::Bhnd, RunPass::Forward));
        assert!(m.contains("D = 0") && m.contains("1..=256"), "{m}");
    }

    #[test]
    fn deterministic_applies_to_the_backward_only() {
        let mut req = request(Path::new("unused"), Layout::Thd, RunPass::Both);
        req.deterministic = true;
        assert!(!req.spec(64, Dtype::Bf16, Pass::Forward).deterministic);
        let bwd = req.spec(64, Dtype::Bf16, Pass::Backward);
        assert!(bwd.deterministic && bwd.layout == Layout::Thd);
    }
}
