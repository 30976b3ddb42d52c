//! The candle op: q, k, v (float32, packed `[T, H, D]` / `[T, H_kv, D]`) to one `[T, H, D + 1]`
//! tensor holding o and, in the last column, rem. One output lets candle's autograd carry the
//! gradients of both (the caller narrows it into o and rem; the narrowings are differentiable), and
//! `bwd` splits the incoming gradient back into dO and dRem.

use crate::cpu::{self, Geometry};
use crate::error::SbCandleError;
use crate::options::SbOptions;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

pub struct StickBreaking {
    pub geometry: Geometry,
    pub opts: SbOptions,
}

/// The float32 data of a contiguous CPU tensor argument.
fn f32_data<'a>(name: &'static str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        return Err(SbCandleError::Dtype {
            tensor: name,
            got: format!("{:?}", s.dtype()),
            expected: "f32 here".into(),
        }
        .into());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(SbCandleError::Shape {
            tensor: name,
            got: l.dims().to_vec(),
            expected: "a contiguous tensor (the wrapper makes it one)".into(),
        }
        .into()),
    }
}

/// A tensor's elements as a float32 vector.
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp3 for StickBreaking {
    fn name(&self) -> &'static str {
        "stick-breaking-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geometry;
        let (q, k, v) = (f32_data("q", s1, l1)?, f32_data("k", s2, l2)?, f32_data("v", s3, l3)?);
        let (o, rem) = cpu::forward(g, &self.opts, q, k, v);
        let (t, h, d) = (g.tokens(), g.heads, g.head_dim);
        let mut packed = Vec::with_capacity(t * h * (d + 1));
        for (row, r) in rem.iter().enumerate() {
            packed.extend_from_slice(&o[row * d..][..d]);
            packed.push(*r);
        }
        Ok((CpuStorage::F32(packed), Shape::from((t, h, d + 1))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.geometry.head_dim;
        let d_o = host_f32(&grad_res.narrow(2, 0, d)?)?;
        let d_rem = host_f32(&grad_res.narrow(2, d, 1)?)?;
        let (dq, dk, dv) =
            cpu::backward(&self.geometry, &self.opts, &host_f32(q)?, &host_f32(k)?, &host_f32(v)?, &d_o, &d_rem);
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}
