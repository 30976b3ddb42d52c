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
use crate::ir::{Dtype, Layout, Mask, Pass, Remainder, Schedule, Spec};
use safetensors::{Dtype as StDtype, SafeTensors};
use sbgen_runtime::launcher::SbElement;
use sbgen_runtime::reference::Shape;
use sbgen_runtime::spec::SUPPORTED_HEAD_DIMS;
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

/// Why a run failed. [`RunError::Input`] is the caller's to fix (exit 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A missing, misshapen or mistyped tensor, or an unreadable file: names the tensor.
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("cannot {action} `{}`: {message}", .path.display())]
    Io { action: &'static str, path: PathBuf, message: String },
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

/// The tensors of the input file, checked.
struct Loaded {
    shape: Shape,
    dims: Vec<usize>,
    dtype: Dtype,
    q: Vec<u16>,
    k: Vec<u16>,
    v: Vec<u16>,
    d_o: Option<Vec<u16>>,
    d_rem: Option<Vec<f32>>,
}

/// Reads and checks the input file for `req` (no GPU needed).
fn load(req: &RunRequest) -> Result<Loaded, RunError> {
    let bytes = std::fs::read(&req.input)
        .map_err(|e| RunError::Input(format!("cannot read `{}`: {e}", req.input.display())))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| RunError::Input(format!("`{}` is not a safetensors file: {e}", req.input.display())))?;
    let names = {
        let mut n: Vec<&str> = file.names();
        n.sort();
        n.join(", ")
    };
    let get = |name: &str| {
        file.tensor(name).map_err(|_| {
            RunError::Input(format!("tensor `{name}` is missing from `{}` (it has: {names})", req.input.display()))
        })
    };
    let q = get("q")?;
    let dtype = match q.dtype() {
        StDtype::BF16 => Dtype::Bf16,
        StDtype::F16 => Dtype::F16,
        other => return Err(RunError::Input(format!("tensor `q` has dtype {other:?}: allowed BF16, F16"))),
    };
    let dims = q.shape().to_vec();
    let layout_dims = match req.layout {
        Layout::Bhnd => "[B, H, N, D] (--layout bhnd)",
        Layout::Bnhd => "[B, N, H, D] (--layout bnhd)",
    };
    if dims.len() != 4 {
        return Err(RunError::Input(format!("tensor `q` has shape {dims:?}: expected 4 dimensions {layout_dims}")));
    }
    let shape = match req.layout {
        Layout::Bhnd => Shape::new(dims[0], dims[1], dims[2], dims[3]),
        Layout::Bnhd => Shape::new(dims[0], dims[2], dims[1], dims[3]),
    };
    if shape.is_empty() {
        return Err(RunError::Input(format!("tensor `q` has shape {dims:?}: every dimension must be at least 1")));
    }
    if !SUPPORTED_HEAD_DIMS.contains(&(shape.head_dim as u32)) {
        return Err(RunError::Input(format!(
            "tensor `q` has head dimension D = {}: supported head dimensions are {SUPPORTED_HEAD_DIMS:?}",
            shape.head_dim
        )));
    }
    let like_q = |name: &str| -> Result<Vec<u16>, RunError> {
        let t = get(name)?;
        if t.dtype() != q.dtype() {
            return Err(RunError::Input(format!(
                "tensor `{name}` has dtype {:?}: it must match `q` ({:?})",
                t.dtype(),
                q.dtype()
            )));
        }
        if t.shape() != dims.as_slice() {
            return Err(RunError::Input(format!(
                "tensor `{name}` has shape {:?}: it must match `q` {dims:?}",
                t.shape()
            )));
        }
        Ok(t.data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect())
    };
    let backward = req.pass != RunPass::Forward;
    let d_rem = if backward && file.names().contains(&"drem") {
        let t = get("drem")?;
        let want = [shape.batch, shape.heads, shape.seq];
        if t.shape() != want {
            return Err(RunError::Input(format!(
                "tensor `drem` has shape {:?}: expected [B, H, N] = {want:?}",
                t.shape()
            )));
        }
        let data = t.data();
        let values: Vec<f32> = match t.dtype() {
            StDtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            StDtype::F64 => data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            StDtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            StDtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(RunError::Input(format!(
                    "tensor `drem` has dtype {other:?}: allowed F32 (or BF16, F16, F64)"
                )))
            }
        };
        Some(values)
    } else {
        None
    };
    Ok(Loaded {
        shape,
        dtype,
        q: like_q("q")?,
        k: like_q("k")?,
        v: like_q("v")?,
        d_o: if backward { Some(like_q("do")?) } else { None },
        d_rem,
        dims,
    })
}

/// Checks the input file without a GPU: what `run` would refuse, it refuses here.
pub fn check_inputs(req: &RunRequest) -> Result<(Shape, Dtype), RunError> {
    let l = load(req)?;
    Ok((l.shape, l.dtype))
}

/// Runs the request on `dev`.
pub fn run(dev: &Device, builder: &KernelBuilder, req: &RunRequest) -> Result<RunReport, RunError> {
    let loaded = load(req)?;
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
    let spec = |pass| Spec {
        head_dim: l.shape.head_dim as u32,
        dtype: l.dtype,
        mask: req.mask,
        layout: req.layout,
        remainder: req.remainder,
        pass,
        early_exit_bits: req.early_exit_bits,
    };
    let fwd = builder.build(&builder.kernel(spec(Pass::Forward), req.schedule))?;
    let to_t = |x: &[u16]| -> Vec<T> { x.iter().map(|&b| T::from_bits(b)).collect() };
    let upload = |x: &[u16]| dev.stream.clone_htod(&to_t(x)).map_err(GpuError::from);
    let zeros = vec![0u16; l.q.len()];
    let problem = DeviceProblem::<T> {
        shape: l.shape,
        layout: req.layout,
        q: upload(&l.q)?,
        k: upload(&l.k)?,
        v: upload(&l.v)?,
        d_o: upload(l.d_o.as_deref().unwrap_or(&zeros))?,
        d_rem: match &l.d_rem {
            Some(d) => Some(exec::upload_f32(dev, d)?),
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

/// Writes `(name, dtype, shape, bytes)` tensors to `path` (temp file + rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, StDtype, Vec<usize>, Vec<u8>)],
    meta: HashMap<String, String>,
) -> Result<(), RunError> {
    let io = |action, message: String| RunError::Io { action, path: path.to_path_buf(), message };
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| io("serialise", e.to_string()))?;
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| io("serialise", e.to_string()))?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| io("write", e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| io("rename into", e.to_string()))
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
        match check_inputs(req) {
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
        let (shape, dtype) = check_inputs(&request(&path, Layout::Bnhd, RunPass::Forward)).unwrap();
        assert_eq!(shape, Shape::new(2, 3, 7, 64));
        assert_eq!(dtype, Dtype::F16);
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
        assert!(input_error(&request(&path, Layout::Bhnd, RunPass::Forward)).contains("not a safetensors file"));
    }
}
