//! `sbgen run --pass decode`: one decode kernel on a KV cache from a safetensors file. [`load`]
//! checks the file without a GPU (everything a user must fix is refused there); [`run`] uploads it,
//! launches the decode and writes o and rem.

use super::decode::{decode_to, DeviceCache};
use super::device::{Device, GpuError};
use super::kernels::KernelBuilder;
use super::run::{write_safetensors, RunError, RunReport};
use crate::ir::{Dtype, Layout, Mask, Pass, Remainder, Schedule, Spec};
use crate::tensor_file::{TensorDtype, TensorFile, TensorFileError, TensorView};
use safetensors::Dtype as StDtype;
use sbgen_runtime::kv_cache::check_kv_tables;
use sbgen_runtime::launcher::{DecodeSplit, KvCacheGeometry, SbElement};
use sbgen_runtime::reference::{DecodeShape, Shape};
use sbgen_runtime::spec::HEAD_DIM_RANGE;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// What `run --pass decode` was asked to do.
#[derive(Clone, Debug)]
pub struct DecodeRequest {
    pub input: PathBuf,
    pub output: PathBuf,
    pub mask: Mask,
    /// bhnd or bnhd (a contiguous cache) or paged.
    pub layout: Layout,
    pub remainder: Remainder,
    pub early_exit_bits: Option<u32>,
    pub schedule: Option<Schedule>,
    pub scale: Option<f32>,
}

impl DecodeRequest {
    pub fn spec(&self, head_dim: u32, dtype: Dtype) -> Spec {
        Spec {
            head_dim,
            dtype,
            mask: self.mask,
            layout: self.layout,
            remainder: self.remainder,
            pass: Pass::Decode,
            early_exit_bits: self.early_exit_bits,
            deterministic: false,
        }
    }
}

/// A checked input file.
pub struct DecodeLoaded {
    pub shape: DecodeShape,
    pub dtype: Dtype,
    pub geometry: KvCacheGeometry,
    pub seqlens: Vec<i32>,
    pub block_table: Option<Vec<i32>>,
    file: TensorFile,
}

impl DecodeLoaded {
    /// `B=8, H=32, H_kv=8, D=128, cache 4096 tokens per sequence` (or `paged 100 x 16`).
    pub fn sizes(&self) -> String {
        let s = self.shape;
        let cache = match self.geometry {
            KvCacheGeometry::Contiguous { capacity } => format!("cache {capacity} tokens per sequence"),
            KvCacheGeometry::Paged { num_pages, page_size, max_pages } => {
                format!("paged cache {num_pages} pages x {page_size} tokens, {max_pages} per sequence")
            }
        };
        let longest = self.seqlens.iter().copied().max().unwrap_or(0);
        format!("B={}, H={}, H_kv={}, D={}, {cache}, longest {longest}", s.batch, s.heads, s.kv_heads, s.head_dim)
    }
}

fn input(message: String) -> RunError {
    RunError::Input(message)
}

/// An I32 tensor's values.
fn i32s(t: &TensorView<'_>) -> Vec<i32> {
    t.data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Opens and checks the input file of a decode: q `[B, H, D]`, k_cache and v_cache in the layout's
/// form, seqlens_k I32 `[B]` (each in 0..=the cache's tokens per sequence), block_table I32 `[B,
/// max_pages]` for a paged cache (the pages holding each sequence's tokens in 0..num_pages).
pub fn load(req: &DecodeRequest) -> Result<DecodeLoaded, RunError> {
    let name = req.input.display();
    let file = TensorFile::open(&req.input).map_err(|e| match e {
        TensorFileError::File(_) | TensorFileError::Length { .. } => input(e.to_string()),
        other => input(format!("`{name}` is not a valid safetensors file: {other}")),
    })?;
    let names = file.names().join(", ");
    let get = |t: &str, why: &str| {
        file.tensor(t).ok_or_else(|| {
            input(format!("tensor `{t}` is missing from `{name}`{why} (it has: {})", names.escape_debug()))
        })
    };
    let paged = req.layout == Layout::Paged;
    if !paged && file.tensor("block_table").is_some() {
        return Err(input(format!(
            "tensor `block_table` describes a paged cache, but the layout is {}: use --layout paged",
            req.layout
        )));
    }
    let q = get("q", "")?;
    let dtype = match q.dtype {
        TensorDtype::BF16 => Dtype::Bf16,
        TensorDtype::F16 => Dtype::F16,
        other => return Err(input(format!("tensor `q` has dtype {other}: allowed BF16, F16"))),
    };
    if q.shape.len() != 3 || q.shape.contains(&0) {
        return Err(input(format!(
            "tensor `q` has shape {:?}: expected [B, H, D] (the new token of each sequence), every dimension at least 1",
            q.shape
        )));
    }
    let (batch, heads) = (q.shape[0], q.shape[1]);
    let head_dim = match u32::try_from(q.shape[2]) {
        Ok(d) if HEAD_DIM_RANGE.contains(&d) => d as usize,
        _ => {
            return Err(input(format!(
                "tensor `q` has head dimension D = {}: supported head dimensions are {}..={}",
                q.shape[2],
                HEAD_DIM_RANGE.start(),
                HEAD_DIM_RANGE.end()
            )))
        }
    };
    let k = get("k_cache", "")?;
    let form = match req.layout {
        Layout::Bhnd => "[B, H_kv, N, D] (--layout bhnd)",
        Layout::Bnhd => "[B, N, H_kv, D] (--layout bnhd)",
        Layout::Paged => "[num_pages, page_size, H_kv, D] (--layout paged)",
        Layout::Thd => return Err(input("a decode reads a KV cache: --layout bhnd, bnhd or paged, not thd".into())),
    };
    if k.dtype != q.dtype {
        return Err(input(format!("tensor `k_cache` has dtype {}: it must match `q` ({})", k.dtype, q.dtype)));
    }
    if k.shape.len() != 4 || k.shape[3] != head_dim || k.shape.contains(&0) {
        return Err(input(format!(
            "tensor `k_cache` has shape {:?}: expected {form} with `q`'s D = {head_dim}, every dimension at least 1",
            k.shape
        )));
    }
    let (kv_heads, geometry) = match req.layout {
        Layout::Bhnd => (k.shape[1], KvCacheGeometry::Contiguous { capacity: k.shape[2] }),
        Layout::Bnhd => (k.shape[2], KvCacheGeometry::Contiguous { capacity: k.shape[1] }),
        _ => {
            let table = get("block_table", " (a paged cache needs it: I32 [B, max_pages])")?;
            if table.dtype != TensorDtype::I32
                || table.shape.len() != 2
                || table.shape[0] != batch
                || table.shape[1] == 0
            {
                return Err(input(format!(
                    "tensor `block_table` is {} {:?}: expected I32 [B, max_pages] with `q`'s B = {batch}, max_pages >= 1",
                    table.dtype, table.shape
                )));
            }
            let geometry =
                KvCacheGeometry::Paged { num_pages: k.shape[0], page_size: k.shape[1], max_pages: table.shape[1] };
            (k.shape[2], geometry)
        }
    };
    if !req.layout.eq(&Layout::Paged) && k.shape[0] != batch {
        return Err(input(format!("tensor `k_cache` has shape {:?}: its B must be `q`'s B = {batch}", k.shape)));
    }
    if heads % kv_heads != 0 {
        return Err(input(format!(
            "tensor `k_cache` has H_kv = {kv_heads} heads, which does not divide `q`'s H = {heads} heads"
        )));
    }
    let v = get("v_cache", "")?;
    if v.dtype != k.dtype || v.shape != k.shape {
        return Err(input(format!(
            "tensor `v_cache` is {} {:?}: it must match `k_cache` ({} {:?})",
            v.dtype, v.shape, k.dtype, k.shape
        )));
    }
    let lens = get("seqlens_k", " (I32 [B]: tokens cached per sequence, the new token's included)")?;
    if lens.dtype != TensorDtype::I32 || lens.shape != [batch] {
        return Err(input(format!(
            "tensor `seqlens_k` is {} {:?}: expected I32 [B] with `q`'s B = {batch}",
            lens.dtype, lens.shape
        )));
    }
    let seqlens = i32s(&lens);
    let block_table = file.tensor("block_table").map(|t| i32s(&t));
    check_kv_tables(geometry, batch, &seqlens, block_table.as_deref()).map_err(|e| input(format!("`{name}`: {e}")))?;
    let shape = DecodeShape { batch, heads, kv_heads, head_dim };
    Ok(DecodeLoaded { shape, dtype, geometry, seqlens, block_table, file })
}

/// Runs the decode of `req` on `dev` and writes o `[B, H, D]` and rem F32 `[B, H]`.
pub fn run(dev: &Device, builder: &KernelBuilder, req: &DecodeRequest, l: DecodeLoaded) -> Result<RunReport, RunError> {
    match l.dtype {
        Dtype::Bf16 => run_typed::<half::bf16>(dev, builder, req, l),
        Dtype::F16 => run_typed::<half::f16>(dev, builder, req, l),
    }
}

fn run_typed<T: SbElement>(
    dev: &Device,
    builder: &KernelBuilder,
    req: &DecodeRequest,
    l: DecodeLoaded,
) -> Result<RunReport, RunError> {
    let s = l.shape;
    let kernel = builder.build(&builder.kernel(req.spec(s.head_dim as u32, l.dtype), req.schedule))?;
    let bits = |name: &str| -> Vec<T> {
        let data = l.file.tensor(name).map_or(&[][..], |t| t.data);
        data.chunks_exact(2).map(|b| T::from_bits(u16::from_le_bytes([b[0], b[1]]))).collect()
    };
    let q = dev.stream.clone_htod(&bits("q")).map_err(GpuError::from)?;
    let cache = DeviceCache::<T> {
        k: dev.stream.clone_htod(&bits("k_cache")).map_err(GpuError::from)?,
        v: dev.stream.clone_htod(&bits("v_cache")).map_err(GpuError::from)?,
        geometry: l.geometry,
        seqlens: dev.stream.clone_htod(&l.seqlens).map_err(GpuError::from)?,
        block_table: l.block_table.as_ref().map(|t| dev.stream.clone_htod(t)).transpose().map_err(GpuError::from)?,
    };
    let mut o = dev.stream.alloc_zeros::<T>(s.len()).map_err(GpuError::from)?;
    let mut rem = dev.stream.alloc_zeros::<f32>(s.rows()).map_err(GpuError::from)?;
    let split = DecodeSplit::default();
    decode_to(dev, &kernel, s, &q, &cache, o.as_view_mut(), rem.as_view_mut(), split, req.scale)?;
    dev.sync(kernel.name(), Duration::from_secs(300))?;
    let o: Vec<T> = dev.stream.clone_dtoh(&o).map_err(GpuError::from)?;
    let rem: Vec<f32> = dev.stream.clone_dtoh(&rem).map_err(GpuError::from)?;
    let st_dtype = match l.dtype {
        Dtype::Bf16 => StDtype::BF16,
        Dtype::F16 => StDtype::F16,
    };
    let mut non_finite = Vec::new();
    for (name, bad) in [
        ("o", o.iter().filter(|x| !x.to_f32().is_finite()).count()),
        ("rem", rem.iter().filter(|x| !x.is_finite()).count()),
    ] {
        if bad > 0 {
            non_finite.push((name.to_string(), bad));
        }
    }
    let tensors = vec![
        (
            "o".to_string(),
            st_dtype,
            vec![s.batch, s.heads, s.head_dim],
            o.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        ),
        ("rem".to_string(), StDtype::F32, vec![s.batch, s.heads], rem.iter().flat_map(|x| x.to_le_bytes()).collect()),
    ];
    let written = tensors.iter().map(|(n, _, d, _)| (n.clone(), d.clone())).collect();
    let mut meta = HashMap::new();
    meta.insert("sbgen_version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    meta.insert("kernels".to_string(), kernel.name().to_string());
    meta.insert("device".to_string(), dev.describe());
    write_safetensors(&req.output, &tensors, meta)?;
    let shape = Shape::new(s.batch, s.heads, l.geometry.capacity(), s.head_dim).with_kv_heads(s.kv_heads);
    Ok(RunReport { shape, dtype: l.dtype, kernels: vec![kernel.name().to_string()], written, non_finite })
}
