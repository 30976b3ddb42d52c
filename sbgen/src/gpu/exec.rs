//! Tensors on the device and one kernel run on them: upload in the kernel's layout, launch with
//! poisoned (NaN-filled) outputs, download back in canonical order (see [`Inputs`]) as f32.

use super::data::{from_layout, rows_to_layout, to_layout, to_layout_seqs, Inputs, Sequences};
use super::device::{Device, GpuError};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DeviceRepr};
use sbgen_runtime::launcher::{BackwardArgs, ForwardArgs, KernelBinary, SbElement, Varlen};
use sbgen_runtime::reference::Shape;
use sbgen_runtime::spec::Layout;

/// The bits every poisoned f32 holds (a NaN).
pub const POISON_F32: u32 = 0xFFFF_FFFF;
/// The bits every poisoned bf16 / f16 holds (a NaN in both).
pub const POISON_16: u16 = 0xFFFF;

/// Elements of poison on each side of a [`Guarded`] buffer (16 KiB of f32: keeps the tensor
/// 256-byte aligned).
pub const GUARD: usize = 4096;

/// A poisoned output tensor with poisoned guard zones on both sides: after a run, the tensor must
/// hold no poison (every element written) and the guards nothing else (nothing written outside).
pub struct Guarded<T> {
    buf: CudaSlice<T>,
    len: usize,
    is_poison: fn(&T) -> bool,
}

/// A guarded bf16 / f16 tensor of `len` elements.
pub fn guarded<T: SbElement>(dev: &Device, len: usize) -> Result<Guarded<T>, GpuError> {
    Guarded::with(dev, len, T::from_bits(POISON_16), |x| x.to_bits() == POISON_16)
}

/// A guarded f32 tensor of `len` elements.
pub fn guarded_f32(dev: &Device, len: usize) -> Result<Guarded<f32>, GpuError> {
    Guarded::with(dev, len, f32::from_bits(POISON_F32), |x| x.to_bits() == POISON_F32)
}

impl<T: DeviceRepr + Copy> Guarded<T> {
    fn with(dev: &Device, len: usize, poison: T, is_poison: fn(&T) -> bool) -> Result<Self, GpuError> {
        Ok(Guarded { buf: dev.stream.clone_htod(&vec![poison; len + 2 * GUARD])?, len, is_poison })
    }

    pub fn view(&self) -> CudaView<'_, T> {
        self.buf.slice(GUARD..GUARD + self.len)
    }

    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.buf.slice_mut(GUARD..GUARD + self.len)
    }

    /// The tensor's elements and the number of guard elements that were overwritten.
    pub fn read(&self, dev: &Device) -> Result<(Vec<T>, usize), GpuError> {
        let all = dev.stream.clone_dtoh(&self.buf)?;
        let outside = all[..GUARD].iter().chain(&all[GUARD + self.len..]).filter(|x| !(self.is_poison)(x)).count();
        Ok((all[GUARD..GUARD + self.len].to_vec(), outside))
    }
}

/// q, k, v, dO (in `layout`) and dRem on the device, for sequences of `seq_lens` tokens
/// (`shape.batch` of them, the longest `shape.seq`); k and v have `shape.kv_heads` heads.
pub struct DeviceProblem<T> {
    pub shape: Shape,
    pub layout: Layout,
    pub seq_lens: Vec<usize>,
    pub q: CudaSlice<T>,
    pub k: CudaSlice<T>,
    pub v: CudaSlice<T>,
    pub d_o: CudaSlice<T>,
    pub d_rem: Option<CudaSlice<f32>>,
    /// THD: the sequences' offsets (`cu_seqlens`), on the device.
    pub cu_seqlens: Option<CudaSlice<i32>>,
}

impl<T> Sequences for DeviceProblem<T> {
    fn shape(&self) -> Shape {
        self.shape
    }
    fn seq_lens(&self) -> &[usize] {
        &self.seq_lens
    }
}

/// `cu_seqlens` of `lens` on the device, for a THD problem (`None` for the dense layouts).
pub fn upload_cu_seqlens(dev: &Device, layout: Layout, lens: &[usize]) -> Result<Option<CudaSlice<i32>>, GpuError> {
    if layout != Layout::Thd {
        return Ok(None);
    }
    let cu = sbgen_runtime::varlen::cu_seqlens_of(lens)
        .ok_or_else(|| GpuError::Input("a packed batch of more than i32::MAX tokens".to_string()))?;
    Ok(Some(dev.stream.clone_htod(&cu)?))
}

/// The forward's outputs on the device. `o_saved` (o before the fused remainder, f32, in the
/// layout) is what a backward needs; `None` skips writing it.
pub struct ForwardOutputs<T> {
    pub o: CudaSlice<T>,
    pub rem: CudaSlice<f32>,
    pub log2_rem: CudaSlice<f32>,
    pub o_saved: Option<CudaSlice<f32>>,
}

/// The backward's outputs on the device.
pub struct GradOutputs<T> {
    pub dq: CudaSlice<T>,
    pub dk: CudaSlice<T>,
    pub dv: CudaSlice<T>,
}

/// Uploads a BHND f32 tensor as `T` in `layout`.
pub fn upload<T: SbElement>(
    dev: &Device,
    shape: Shape,
    layout: Layout,
    bhnd: &[f32],
) -> Result<CudaSlice<T>, GpuError> {
    let host: Vec<T> = to_layout(shape, layout, bhnd).into_iter().map(T::from_f32).collect();
    Ok(dev.stream.clone_htod(&host)?)
}

/// Uploads a BHND f32 tensor as f32 in `layout`.
pub fn upload_f32_in(dev: &Device, shape: Shape, layout: Layout, bhnd: &[f32]) -> Result<CudaSlice<f32>, GpuError> {
    Ok(dev.stream.clone_htod(&to_layout(shape, layout, bhnd))?)
}

/// Downloads an f32 tensor in `layout` in BHND order.
pub fn download_f32_in(dev: &Device, shape: Shape, layout: Layout, x: &CudaSlice<f32>) -> Result<Vec<f32>, GpuError> {
    Ok(from_layout(shape, layout, &dev.stream.clone_dtoh(x)?))
}

/// Uploads f32 values as they are.
pub fn upload_f32(dev: &Device, x: &[f32]) -> Result<CudaSlice<f32>, GpuError> {
    Ok(dev.stream.clone_htod(x)?)
}

/// `n` elements of NaN.
pub fn poisoned<T: SbElement>(dev: &Device, n: usize) -> Result<CudaSlice<T>, GpuError> {
    Ok(dev.stream.clone_htod(&vec![T::from_bits(POISON_16); n])?)
}

/// `n` f32 NaNs.
pub fn poisoned_f32(dev: &Device, n: usize) -> Result<CudaSlice<f32>, GpuError> {
    Ok(dev.stream.clone_htod(&vec![f32::from_bits(POISON_F32); n])?)
}

/// Downloads a `T` tensor in `layout` as f32 in BHND order.
pub fn download<T: SbElement>(
    dev: &Device,
    shape: Shape,
    layout: Layout,
    x: &CudaSlice<T>,
) -> Result<Vec<f32>, GpuError> {
    let host = dev.stream.clone_dtoh(x)?;
    let f: Vec<f32> = host.into_iter().map(T::to_f32).collect();
    Ok(from_layout(shape, layout, &f))
}

pub fn download_f32(dev: &Device, x: &CudaSlice<f32>) -> Result<Vec<f32>, GpuError> {
    Ok(dev.stream.clone_dtoh(x)?)
}

impl<T: SbElement> DeviceProblem<T> {
    /// Uploads `inputs` in `layout`; dRem only when `with_d_rem`. Sequences of different lengths
    /// need the THD layout.
    pub fn upload(dev: &Device, inputs: &Inputs, layout: Layout, with_d_rem: bool) -> Result<Self, GpuError> {
        let s = inputs.shape;
        let lens = &inputs.seq_lens;
        if layout != Layout::Thd && lens.iter().any(|&l| l != s.seq) {
            return Err(GpuError::Input(format!("sequences of lengths {lens:?} need the THD layout, not {layout}")));
        }
        let up = |heads: usize, x: &[f32]| -> Result<CudaSlice<T>, GpuError> {
            let host: Vec<T> =
                to_layout_seqs(lens, heads, s.head_dim, layout, x).into_iter().map(T::from_f32).collect();
            Ok(dev.stream.clone_htod(&host)?)
        };
        Ok(DeviceProblem {
            shape: s,
            layout,
            seq_lens: lens.clone(),
            q: up(s.heads, &inputs.q)?,
            k: up(s.kv_heads, &inputs.k)?,
            v: up(s.kv_heads, &inputs.v)?,
            d_o: up(s.heads, &inputs.d_o)?,
            d_rem: if with_d_rem {
                Some(upload_f32(dev, &rows_to_layout(lens, s.heads, layout, &inputs.d_rem))?)
            } else {
                None
            },
            cu_seqlens: upload_cu_seqlens(dev, layout, lens)?,
        })
    }
}

/// Launches the forward into freshly poisoned outputs (asynchronous: sync before reading); with
/// `save`, o_saved too (for a backward).
pub fn forward<T: SbElement>(
    dev: &Device,
    kernel: &KernelBinary,
    p: &DeviceProblem<T>,
    scale: Option<f32>,
    save: bool,
) -> Result<ForwardOutputs<T>, GpuError> {
    let mut out = ForwardOutputs {
        o: poisoned::<T>(dev, p.q_len())?,
        rem: poisoned_f32(dev, p.rows())?,
        log2_rem: poisoned_f32(dev, p.rows())?,
        o_saved: if save { Some(poisoned_f32(dev, p.q_len())?) } else { None },
    };
    forward_into(dev, kernel, p, &mut out, scale)?;
    Ok(out)
}

/// Launches the forward into existing outputs.
pub fn forward_into<T: SbElement>(
    dev: &Device,
    kernel: &KernelBinary,
    p: &DeviceProblem<T>,
    out: &mut ForwardOutputs<T>,
    scale: Option<f32>,
) -> Result<(), GpuError> {
    let views = FwdViews {
        o: out.o.as_view_mut(),
        rem: out.rem.as_view_mut(),
        log2_rem: out.log2_rem.as_view_mut(),
        o_saved: out.o_saved.as_mut().map(|x| x.as_view_mut()),
    };
    forward_to(dev, kernel, p, views, scale)
}

/// Where the forward writes (views into [`ForwardOutputs`] or into guarded buffers).
pub struct FwdViews<'a, T> {
    pub o: CudaViewMut<'a, T>,
    pub rem: CudaViewMut<'a, f32>,
    pub log2_rem: CudaViewMut<'a, f32>,
    pub o_saved: Option<CudaViewMut<'a, f32>>,
}

/// Launches the forward of `p`, writing into `out`. A launch that left the context unusable is
/// [`GpuError::ContextLost`].
pub fn forward_to<T: SbElement>(
    dev: &Device,
    kernel: &KernelBinary,
    p: &DeviceProblem<T>,
    out: FwdViews<'_, T>,
    scale: Option<f32>,
) -> Result<(), GpuError> {
    let cu = p.cu_seqlens.as_ref().map(|c| c.as_view());
    let args = ForwardArgs {
        q: p.q.as_view(),
        k: p.k.as_view(),
        v: p.v.as_view(),
        o: out.o,
        rem: out.rem,
        log2_rem: out.log2_rem,
        o_saved: out.o_saved,
        varlen: cu.as_ref().map(|cu_seqlens| Varlen { cu_seqlens, total_tokens: p.tokens() }),
    };
    dev.launcher.forward(kernel, p.shape, args, scale).map_err(|e| lost_or(e, kernel))
}

/// What the backward reads from the forward: o (the output), o_saved and log2_rem.
#[derive(Clone, Copy)]
pub struct Saved<'a, T> {
    pub o: &'a CudaSlice<T>,
    pub o_saved: &'a CudaSlice<f32>,
    pub log2_rem: &'a CudaSlice<f32>,
}

impl<'a, T> Saved<'a, T> {
    /// The saved values of a forward run with `save` (panics without o_saved).
    pub fn of(out: &'a ForwardOutputs<T>) -> Self {
        Saved {
            o: &out.o,
            o_saved: out.o_saved.as_ref().expect("the forward ran with `save`"),
            log2_rem: &out.log2_rem,
        }
    }
}

/// Launches the backward into freshly poisoned gradients.
pub fn backward<T: SbElement>(
    dev: &Device,
    kernel: &KernelBinary,
    p: &DeviceProblem<T>,
    saved: Saved<'_, T>,
    scale: Option<f32>,
) -> Result<GradOutputs<T>, GpuError> {
    let (n, kv) = (p.q_len(), p.kv_len());
    let mut g = GradOutputs { dq: poisoned::<T>(dev, n)?, dk: poisoned::<T>(dev, kv)?, dv: poisoned::<T>(dev, kv)? };
    backward_into(dev, kernel, p, saved, &mut g, scale)?;
    Ok(g)
}

/// Launches the backward into existing gradient buffers.
pub fn backward_into<T: SbElement>(
    dev: &Device,
    kernel: &KernelBinary,
    p: &DeviceProblem<T>,
    saved: Saved<'_, T>,
    g: &mut GradOutputs<T>,
    scale: Option<f32>,
) -> Result<(), GpuError> {
    let out = GradViews { dq: g.dq.as_view_mut(), dk: g.dk.as_view_mut(), dv: g.dv.as_view_mut() };
    backward_to(dev, kernel, p, saved, out, scale)
}

/// Where the backward writes dq, dk and dv (views into [`GradOutputs`] or into guarded buffers).
pub struct GradViews<'a, T> {
    pub dq: CudaViewMut<'a, T>,
    pub dk: CudaViewMut<'a, T>,
    pub dv: CudaViewMut<'a, T>,
}

/// Launches the backward of `p` on what the forward saved, writing the gradients into `out`.
pub fn backward_to<T: SbElement>(
    dev: &Device,
    kernel: &KernelBinary,
    p: &DeviceProblem<T>,
    saved: Saved<'_, T>,
    out: GradViews<'_, T>,
    scale: Option<f32>,
) -> Result<(), GpuError> {
    let cu = p.cu_seqlens.as_ref().map(|c| c.as_view());
    let args = BackwardArgs {
        q: p.q.as_view(),
        k: p.k.as_view(),
        v: p.v.as_view(),
        o: saved.o.as_view(),
        o_saved: saved.o_saved.as_view(),
        d_o: p.d_o.as_view(),
        d_rem: p.d_rem.as_ref().map(|d| d.as_view()),
        log2_rem: saved.log2_rem.as_view(),
        dq: out.dq,
        dk: out.dk,
        dv: out.dv,
        varlen: cu.as_ref().map(|cu_seqlens| Varlen { cu_seqlens, total_tokens: p.tokens() }),
    };
    dev.launcher.backward(kernel, p.shape, args, scale).map_err(|e| lost_or(e, kernel))
}

/// A launch error, or [`GpuError::ContextLost`] when it left the context unusable.
pub(crate) fn lost_or(e: sbgen_runtime::launcher::LaunchError, kernel: &KernelBinary) -> GpuError {
    match super::device::is_context_lost(&e) {
        Some(source) => GpuError::ContextLost { kernel: kernel.name().to_string(), source },
        None => GpuError::Launch(e),
    }
}
