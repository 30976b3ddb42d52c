//! `sbgen run`: one kernel on tensors from a safetensors file, outputs to another.
//!
//! Input tensors (names exact, little-endian, contiguous, as `safetensors.torch.save_file` writes):
//!
//! | name   | dtype                   | shape (`--layout bhnd`) | shape (`--layout bnhd`) | when |
//! |--------|-------------------------|-------------------------|-------------------------|------|
//! | `q`    | BF16 or F16             | [B, H, N, D]            | [B, N, H, D]            | always |
//! | `k`    | same as q               | same as q               | same as q               | always |
//! | `v`    | same as q               | same as q               | same as q               | always |
//! | `do`   | same as q               | same as q               | same as q               | backward |
//! | `drem` | F32 (BF16, F16, F64 are converted) | [B, H, N]    | [B, H, N]               | backward, optional |
//!
//! Outputs: `o` (q's dtype and shape; o + rem * v with `--remainder fuse`), `rem` and `log2_rem`
//! (F32, [B, H, N]) for the forward; `dq`, `dk`, `dv` (q's dtype and shape) for the backward. The
//! backward runs the forward first (it needs o and log2_rem), so `--pass bwd` writes all of them.
//! The dtype comes from q; D must be a supported head dimension (64, 128).

use super::device::{Device, GpuError};
use super::exec::{self, DeviceProblem};
use super::kernels::{BuildError, KernelBuilder};
use crate::files::{self, FileError};
use crate::ir::{Dtype, Layout, Mask, Pass, Remainder, Schedule, Spec};
use crate::tensor_file::{TensorDtype, TensorFile, TensorFileError};
use safetensors::Dtype as StDtype;
use sbgen_runtime::launcher::SbElement;
use sbgen_runtime::reference::Shape;
use sbgen_runtime::spec::HEAD_DIM_RANGE;
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
    /// `None`: each spec's default schedule ([`Schedule::default_for`]).
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
}

/// Why a run failed. [`RunError::Input`] is the caller's to fix (exit 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A missing, misshapen or mistyped tensor, or an unreadable or invalid file: names the tensor
    /// or the file.
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

/// The input file with its tensors checked against the request (names, dtypes, shapes), from the
/// header alone: the data stays mapped, unread, until [`run`] uploads it.
#[derive(Debug)]
pub struct Loaded {
    pub shape: Shape,
    pub dtype: Dtype,
    /// `shape.head_dim`, checked to be a supported head dimension.
    pub head_dim: u32,
    /// q's dimensions as in the file (the layout's order).
    dims: Vec<usize>,
    file: TensorFile,
    /// Whether the file's `drem` is used (a backward pass and the tensor present).
    d_rem: bool,
}

/// Opens and checks the input file for `req` (no GPU needed): what `run` would refuse, it refuses
/// here. The file is read once: the header now, the data when [`run`] uploads it.
pub fn load(req: &RunRequest) -> Result<Loaded, RunError> {
    let input = req.input.display();
    let file = TensorFile::open(&req.input).map_err(|e| match e {
        TensorFileError::File(_) | TensorFileError::Length { .. } => RunError::Input(e.to_string()),
        other => RunError::Input(format!("`{input}` is not a valid safetensors file: {other}")),
    })?;
    let names = file.names().join(", ");
    let get = |name: &str| {
        file.tensor(name).ok_or_else(|| {
            RunError::Input(format!("tensor `{name}` is missing from `{input}` (it has: {})", names.escape_debug()))
        })
    };
    let q = get("q")?;
    let dtype = match q.dtype {
        TensorDtype::BF16 => Dtype::Bf16,
        TensorDtype::F16 => Dtype::F16,
        other => return Err(RunError::Input(format!("tensor `q` has dtype {other}: allowed BF16, F16"))),
    };
    let dims = q.shape.to_vec();
    let layout_dims = match req.layout {
        Layout::Bhnd => "[B, H, N, D] (--layout bhnd)",
        Layout::Bnhd => "[B, N, H, D] (--layout bnhd)",
        Layout::Thd => "[T, H, D] (--layout thd)",
    };
    if dims.len() != 4 {
        return Err(RunError::Input(format!("tensor `q` has shape {dims:?}: expected 4 dimensions {layout_dims}")));
    }
    // Before anything else reads D: a cast would turn 2^32 + 64 into 64.
    let head_dim = match u32::try_from(dims[3]) {
        Ok(d) if HEAD_DIM_RANGE.contains(&d) => d,
        _ => {
            return Err(RunError::Input(format!(
                "tensor `q` has head dimension D = {}: supported head dimensions are {}..={}",
                dims[3],
                HEAD_DIM_RANGE.start(),
                HEAD_DIM_RANGE.end()
            )))
        }
    };
    let shape = match req.layout {
        Layout::Bhnd => Shape::new(dims[0], dims[1], dims[2], dims[3]),
        Layout::Bnhd => Shape::new(dims[0], dims[2], dims[1], dims[3]),
        Layout::Thd => return Err(RunError::Input("THD is not wired into `run` yet".into())),
    };
    if shape.is_empty() {
        return Err(RunError::Input(format!("tensor `q` has shape {dims:?}: every dimension must be at least 1")));
    }
    let like_q = |name: &str| -> Result<(), RunError> {
        let t = get(name)?;
        if t.dtype != q.dtype {
            return Err(RunError::Input(format!(
                "tensor `{name}` has dtype {}: it must match `q` ({})",
                t.dtype, q.dtype
            )));
        }
        if t.shape != dims.as_slice() {
            return Err(RunError::Input(format!(
                "tensor `{name}` has shape {:?}: it must match `q` {dims:?}",
                t.shape
            )));
        }
        Ok(())
    };
    like_q("k")?;
    like_q("v")?;
    let backward = req.pass != RunPass::Forward;
    if backward {
        like_q("do")?;
    }
    let d_rem = backward && file.tensor("drem").is_some();
    if d_rem {
        let t = get("drem")?;
        let want = [shape.batch, shape.heads, shape.seq];
        if t.shape != want {
            return Err(RunError::Input(format!(
                "tensor `drem` has shape {:?}: expected [B, H, N] = {want:?}",
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
    Ok(Loaded { shape, dtype, head_dim, dims, file, d_rem })
}

impl Loaded {
    /// The spec of `pass` for this input and `req`.
    pub fn spec(&self, req: &RunRequest, pass: Pass) -> Spec {
        Spec {
            head_dim: self.head_dim,
            dtype: self.dtype,
            mask: req.mask,
            layout: req.layout,
            remainder: req.remainder,
            pass,
            early_exit_bits: req.early_exit_bits,
            deterministic: false,
        }
    }

    /// The 16-bit elements of `name` (checked by [`load`] to be q's dtype and shape).
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
    let problem = DeviceProblem::<T> {
        shape: l.shape,
        layout: req.layout,
        q: upload("q")?,
        k: upload("k")?,
        v: upload("v")?,
        d_o: if backward {
            upload("do")?
        } else {
            let zeros = vec![T::from_bits(0); l.shape.batch * l.shape.heads * l.shape.seq * l.shape.head_dim];
            dev.stream.clone_htod(&zeros).map_err(GpuError::from)?
        },
        d_rem: match l.d_rem() {
            Some(d) => Some(exec::upload_f32(dev, &d)?),
            None => None,
        },
    };
    let mut kernels = vec![fwd.name().to_string()];
    let out = exec::forward(dev, &fwd, &problem, req.scale, req.pass != RunPass::Forward)?;
    dev.sync(fwd.name(), timeout)?;
    let st_dtype = match l.dtype {
        Dtype::Bf16 => StDtype::BF16,
        Dtype::F16 => StDtype::F16,
    };
    let rows = vec![l.shape.batch, l.shape.heads, l.shape.seq];
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
        out_file.push(name, StDtype::F32, &rows, x.iter().copied(), x.iter().flat_map(|v| v.to_le_bytes()));
    }
    if req.pass != RunPass::Forward {
        let bwd = builder.build(&builder.kernel(spec(Pass::Backward), req.schedule))?;
        kernels.push(bwd.name().to_string());
        let g = exec::backward(dev, &bwd, &problem, exec::Saved::of(&out), req.scale)?;
        dev.sync(bwd.name(), timeout)?;
        for (name, x) in [("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)] {
            let x: Vec<T> = dev.stream.clone_dtoh(x).map_err(GpuError::from)?;
            out_file.push(
                name,
                st_dtype,
                &l.dims,
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
            schedule: None,
            scale: None,
        }
    }

    fn tensor(name: &str, dtype: StDtype, shape: &[usize]) -> (String, StDtype, Vec<usize>, Vec<u8>) {
        let n: usize = shape.iter().product();
        let size = match dtype {
            StDtype::F32 => 4,
            StDtype::F64 => 8,
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
        assert!(m.contains("tensor `k` has shape [1, 2, 4, 64]"), "{m}");
        let path = file(
            "dtype.safetensors",
            &[tensor("q", StDtype::BF16, &s), tensor("k", StDtype::BF16, &s), tensor("v", StDtype::F16, &s)],
        );
        assert!(input_error(&request(&path, Layout::Bhnd, RunPass::Forward)).contains("tensor `v` has dtype F16"));
        let path = file("f32.safetensors", &[tensor("q", StDtype::F32, &s)]);
        assert!(input_error(&request(&path, Layout::Bhnd, RunPass::Forward)).contains("allowed BF16, F16"));
        let path = file("rank.safetensors", &[tensor("q", StDtype::BF16, &[2, 5, 64])]);
        assert!(input_error(&request(&path, Layout::Bhnd, RunPass::Forward)).contains("4 dimensions"));
        let path = file("d96.safetensors", &[tensor("q", StDtype::BF16, &[1, 1, 4, 96])]);
        assert!(input_error(&request(&path, Layout::Bhnd, RunPass::Forward)).contains("D = 96"));
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
        assert!(m.contains("D = 4294967360") && m.contains("[64, 128]"), "{m}");
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
}
