//! What `segment_check` and `ring_check` share: the flags, the inputs, the float64 references and
//! the comparisons.
#![allow(dead_code)] // each example uses its part

use cudarc::driver::{CudaSlice, CudaStream};
use rand::{Rng, SeedableRng};
use sbgen_dist::{Heads, Partition, Scheme};
use sbgen_runtime::launcher::{SbElement, Shape};
use sbgen_runtime::reference::softplus2;
use sbgen_runtime::spec::{Dtype, Layout, Mask, Pass, Remainder, Spec};
use std::collections::HashMap;
use std::sync::Arc;

pub type Error = Box<dyn std::error::Error>;

pub struct Args {
    pub seq: usize,
    pub ranks: usize,
    pub scheme: Scheme,
    pub heads: Heads,
    pub spec: Spec,
    pub long: bool,
    pub rows: usize,
    pub seed: u64,
    pub time: bool,
    pub backward: bool,
    /// Check the gradients against float64 above N = 8192 too (`--f64-backward`; the blocked
    /// reference on every host thread: minutes at N = 65536).
    pub f64_backward: bool,
    pub reps: usize,
}

/// The flags that take a value; `--time`, `--backward` and `--f64-backward` take none.
const VALUE_FLAGS: [&str; 16] = [
    "seq",
    "ranks",
    "scheme",
    "batch",
    "heads",
    "kv-heads",
    "head-dim",
    "dtype",
    "layout",
    "mask",
    "remainder",
    "early-exit",
    "data",
    "rows",
    "seed",
    "reps",
];

/// The command line: an unknown or repeated flag is an error (exit status 2 in the examples).
pub fn parse() -> Result<Args, String> {
    let mut m: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    let (mut time, mut backward, mut f64_backward) = (false, false, false);
    while let Some(k) = it.next() {
        let key = k.strip_prefix("--").ok_or_else(|| format!("unexpected argument `{k}`"))?.to_string();
        if key == "time" || key == "backward" || key == "f64-backward" {
            if (key == "time" && time) || (key == "backward" && backward) || (key == "f64-backward" && f64_backward) {
                return Err(format!("`--{key}` is given twice"));
            }
            time |= key == "time";
            backward |= key == "backward";
            f64_backward |= key == "f64-backward";
            continue;
        }
        if !VALUE_FLAGS.contains(&key.as_str()) {
            return Err(format!(
                "unknown flag `--{key}`: allowed --{}, --time, --backward, --f64-backward",
                VALUE_FLAGS.join(", --")
            ));
        }
        let v = it.next().ok_or_else(|| format!("`--{key}` needs a value"))?;
        if m.insert(key.clone(), v).is_some() {
            return Err(format!("`--{key}` is given twice"));
        }
    }
    let get = |k: &str, d: &str| m.get(k).cloned().unwrap_or_else(|| d.to_string());
    let num = |k: &str, d: &str| get(k, d).parse::<usize>().map_err(|e| format!("`--{k}`: {e}"));
    let heads = Heads {
        batch: num("batch", "1")?,
        heads: num("heads", "4")?,
        kv_heads: num("kv-heads", "2")?,
        head_dim: num("head-dim", "128")?,
    };
    let dtype: Dtype = get("dtype", "bf16").parse().map_err(|e| format!("{e}"))?;
    let layout: Layout = get("layout", "bhnd").parse().map_err(|e| format!("{e}"))?;
    let mask: Mask = get("mask", "strict").parse().map_err(|e| format!("{e}"))?;
    let remainder: Remainder = get("remainder", "return").parse().map_err(|e| format!("{e}"))?;
    let early_exit_bits = match get("early-exit", "off").as_str() {
        "off" => None,
        t => Some(t.parse::<u32>().map_err(|e| format!("`--early-exit`: {e} (a bit count or off)"))?),
    };
    let scheme = match get("scheme", "zigzag").as_str() {
        "zigzag" => Scheme::ZigZag,
        "contiguous" => Scheme::Contiguous,
        s => return Err(format!("`--scheme` = `{s}`: allowed zigzag, contiguous")),
    };
    let long = match get("data", "long").as_str() {
        "long" => true,
        "normal" => false,
        s => return Err(format!("`--data` = `{s}`: allowed long (beta near 1e-3), normal (N(0,1))")),
    };
    let spec =
        Spec { mask, layout, remainder, early_exit_bits, ..Spec::new(heads.head_dim as u32, dtype, Pass::Forward) };
    spec.validate().map_err(|e| e.to_string())?;
    Ok(Args {
        seq: num("seq", "4097")?,
        ranks: num("ranks", "2")?,
        scheme,
        heads,
        spec,
        long,
        rows: num("rows", "256")?,
        seed: num("seed", "1")? as u64,
        time,
        backward,
        f64_backward,
        reps: num("reps", "5")?.max(1),
    })
}

/// Says plainly why there is no GPU to run on (cudarc panics on the first call into a library it
/// cannot load): the CUDA driver, and with `nccl` NCCL's `libnccl.so`.
pub fn require_libraries(nccl: bool) -> Result<(), String> {
    // SAFETY: these only probe whether the libraries can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) is not installed".into());
    }
    #[cfg(feature = "nccl")]
    if nccl && !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err("NCCL (libnccl.so) is not on the library path (see sbgen_dist::nccl)".into());
    }
    #[cfg(not(feature = "nccl"))]
    let _ = nccl;
    Ok(())
}

/// Index of element (b, h, n, d) in a tensor of `heads` heads and `seq` tokens in `layout`.
pub fn at(layout: Layout, heads: usize, seq: usize, dim: usize, b: usize, h: usize, n: usize) -> usize {
    match layout {
        Layout::Bnhd => ((b * seq + n) * heads + h) * dim,
        _ => ((b * heads + h) * seq + n) * dim,
    }
}

/// `f(i, x[i])` for every element of `x`, in order, computed in chunks on every host thread: at
/// N = 524288 a tensor of 16 heads holds 2^30 elements, and session 18's two-GPU runs at that length
/// ran past their time limits on the host side, where these conversions ran on one thread.
pub fn par_map<A: Sync, B: Send>(x: &[A], f: impl Fn(usize, &A) -> B + Sync) -> Vec<B> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = x.len().div_ceil(threads).max(1 << 16);
    let parts: Vec<Vec<B>> = std::thread::scope(|sc| {
        let f = &f;
        let handles: Vec<_> = x
            .chunks(chunk)
            .enumerate()
            .map(|(c, src)| sc.spawn(move || src.iter().enumerate().map(|(j, x)| f(c * chunk + j, x)).collect()))
            .collect();
        handles.into_iter().map(|t| t.join().expect("par_map thread")).collect()
    });
    let mut out = Vec::with_capacity(x.len());
    for part in parts {
        out.extend(part);
    }
    out
}

/// `len` N(0, 1) values (Box-Muller), generated in parallel chunks seeded from `seed`.
pub fn normals(len: usize, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 20;
    let mut out = vec![0.0f32; len];
    std::thread::scope(|sc| {
        for (c, part) in out.chunks_mut(CHUNK).enumerate() {
            sc.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c as u64);
                for pair in part.chunks_mut(2) {
                    let (u, v): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen_range(0.0..1.0));
                    let r = (-2.0 * u.ln()).sqrt();
                    let t = std::f64::consts::TAU * v;
                    pair[0] = (r * t.cos()) as f32;
                    if let Some(x) = pair.get_mut(1) {
                        *x = (r * t.sin()) as f32;
                    }
                }
            });
        }
    });
    out
}

/// Inputs rounded to the element type, as f32 in `layout`.
pub fn inputs(a: &Args) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let h = a.heads;
    let round = |x: f32| match a.spec.dtype {
        Dtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        Dtype::F16 => half::f16::from_f32(x).to_f32(),
    };
    let d = h.head_dim;
    let (nq, nkv) = (h.batch * h.heads * a.seq * d, h.batch * h.kv_heads * a.seq * d);
    let (q, k, v) = (normals(nq, 3 * a.seed), normals(nkv, 3 * a.seed + 1), normals(nkv, 3 * a.seed + 2));
    // "long": scores near -7 (beta about 1e-3, so a row's stick lasts thousands of keys): q's column 0
    // is -7 sqrt(d) plus noise, k's column 0 is 1, the other columns small noise.
    let s = (d as f32).sqrt();
    let q = par_map(&q, |i, &x| {
        round(if !a.long {
            x
        } else if i % d == 0 {
            -7.0 * s + x
        } else {
            0.3 * x
        })
    });
    let k = par_map(&k, |i, &x| {
        round(if !a.long {
            x
        } else if i % d == 0 {
            1.0
        } else {
            0.3 * x
        })
    });
    let v = par_map(&v, |_, &x| round(x));
    (q, k, v)
}

/// The float64 walk of row `i` of head (b, h): o (unfused) and log2 of the stick left, keys
/// nearest first, stopping (with early exit) once the stick is below 2^-T.
pub fn row_reference(a: &Args, q: &[f32], k: &[f32], v: &[f32], b: usize, h: usize, i: usize) -> (Vec<f64>, f64) {
    let (hd, lay) = (a.heads, a.spec.layout);
    let d = hd.head_dim;
    let hk = h / (hd.heads / hd.kv_heads);
    let scale = 1.0 / (d as f64).sqrt();
    let qi = &q[at(lay, hd.heads, a.seq, d, b, h, i)..][..d];
    let mut o = vec![0.0f64; d];
    let mut l = 0.0f64; // log2 of the stick left
    let last = if a.spec.mask == Mask::AttendCurrent { i + 1 } else { i };
    for j in (0..last).rev() {
        if let Some(t) = a.spec.early_exit_bits {
            if l < -(t as f64) {
                break;
            }
        }
        let kj = &k[at(lay, hd.kv_heads, a.seq, d, b, hk, j)..][..d];
        let z = scale * std::f64::consts::LOG2_E * qi.iter().zip(kj).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>();
        // log2 beta = z - softplus2(z), log2 (1 - beta) = -softplus2(z)
        let sp = softplus2(z);
        let w = (l + z - sp).exp2();
        let vj = &v[at(lay, hd.kv_heads, a.seq, d, b, hk, j)..][..d];
        for (o, x) in o.iter_mut().zip(vj) {
            *o += w * *x as f64;
        }
        l -= sp;
    }
    (o, l)
}

pub fn upload<T: SbElement>(s: &Arc<CudaStream>, x: &[f32]) -> Result<CudaSlice<T>, Error> {
    let host: Vec<T> = par_map(x, |_, &v| T::from_f32(v));
    Ok(s.clone_htod(&host)?)
}

pub fn download<T: SbElement>(s: &Arc<CudaStream>, x: &CudaSlice<T>) -> Result<Vec<f32>, Error> {
    Ok(par_map(&s.clone_dtoh(x)?, |_, &v| v.to_f32()))
}

/// A local tensor of rank `r` ([outer, local, inner] in the partition's terms) cut from the full one.
pub fn scatter(a: &Args, part: &Partition, r: usize, x: &[f32], heads: usize) -> Vec<f32> {
    let (outer, inner) = outer_inner(a, heads, a.heads.head_dim);
    part.scatter(r, x, outer, inner)
}

pub fn outer_inner(a: &Args, heads: usize, dim: usize) -> (usize, usize) {
    match a.spec.layout {
        Layout::Bnhd => (a.heads.batch, heads * dim),
        _ => (a.heads.batch * heads, dim),
    }
}

/// Relative L2 distance; NaN or infinity anywhere gives NaN. Summed in chunks on every host thread.
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let len = got.len().min(want.len());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = len.div_ceil(threads).max(1 << 16);
    let sums: Vec<(f64, f64)> = std::thread::scope(|sc| {
        let parts: Vec<_> = got[..len]
            .chunks(chunk)
            .zip(want[..len].chunks(chunk))
            .map(|(g, w)| {
                sc.spawn(move || {
                    let (mut num, mut den) = (0.0, 0.0);
                    for (&g, &w) in g.iter().zip(w) {
                        if !g.is_finite() {
                            return (f64::NAN, 1.0);
                        }
                        num += (g as f64 - w).powi(2);
                        den += w * w;
                    }
                    (num, den)
                })
            })
            .collect();
        parts.into_iter().map(|t| t.join().expect("rel_l2 thread")).collect()
    });
    let (num, den) = sums.iter().fold((0.0, 0.0), |(n, d), &(a, b)| (n + a, d + b));
    (num / den.max(1e-300)).sqrt()
}

/// One head's (sequence b, head h of `heads`) N x D values as float64.
pub fn head(a: &Args, x: &[f32], heads: usize, b: usize, h: usize) -> Vec<f64> {
    let d = a.heads.head_dim;
    (0..a.seq).flat_map(|n| x[at(a.spec.layout, heads, a.seq, d, b, h, n)..][..d].iter().map(|&v| v as f64)).collect()
}

/// The float64 reference backward: dq, dk, dv in the inputs' layout (each query head on its K/V head;
/// dk and dv summed over a group). Up to N = 8192 the row-by-row reference, one thread per head;
/// beyond, the blocked one (`reference::blocked`, rows in blocks on every host thread).
#[allow(clippy::type_complexity)]
pub fn reference_grads(
    a: &Args,
    (q, k, v): (&[f32], &[f32], &[f32]),
    d_o: &[f32],
    d_rem: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    use sbgen_runtime::reference::{backward, blocked, Options};
    let h = a.heads;
    let d = h.head_dim;
    let opts = Options {
        mask: a.spec.mask,
        remainder: a.spec.remainder,
        early_exit_bits: a.spec.early_exit_bits,
        scale: None,
    };
    let jobs: Vec<(usize, usize)> = (0..h.batch).flat_map(|b| (0..h.heads).map(move |hh| (b, hh))).collect();
    let one_head = |b: usize, hh: usize| {
        let hk = hh / (h.heads / h.kv_heads);
        let one = Shape::new(1, 1, a.seq, d);
        let rows: Vec<f64> = (0..a.seq).map(|n| d_rem[(b * h.heads + hh) * a.seq + n] as f64).collect();
        let (q, k, v, d_o) = (
            head(a, q, h.heads, b, hh),
            head(a, k, h.kv_heads, b, hk),
            head(a, v, h.kv_heads, b, hk),
            head(a, d_o, h.heads, b, hh),
        );
        if a.seq <= 8192 {
            backward(one, &opts, &q, &k, &v, &d_o, Some(&rows))
        } else {
            let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let (_, g) = blocked::forward_backward(one, &opts, &q, &k, &v, Some(&d_o), Some(&rows), threads);
            g.expect("gradients asked for")
        }
    };
    let grads: Vec<_> = if a.seq <= 8192 {
        std::thread::scope(|sc| {
            let handles: Vec<_> = jobs.iter().map(|&(b, hh)| sc.spawn(move || one_head(b, hh))).collect();
            handles.into_iter().map(|t| t.join().expect("reference thread")).collect()
        })
    } else {
        jobs.iter().map(|&(b, hh)| one_head(b, hh)).collect()
    };
    let mut dq = vec![0.0; q.len()];
    let (mut dk, mut dv) = (vec![0.0; k.len()], vec![0.0; k.len()]);
    for (&(b, hh), g) in jobs.iter().zip(&grads) {
        let hk = hh / (h.heads / h.kv_heads);
        for n in 0..a.seq {
            let (qa, ka) =
                (at(a.spec.layout, h.heads, a.seq, d, b, hh, n), at(a.spec.layout, h.kv_heads, a.seq, d, b, hk, n));
            for c in 0..d {
                dq[qa + c] = g.dq[n * d + c];
                dk[ka + c] += g.dk[n * d + c];
                dv[ka + c] += g.dv[n * d + c];
            }
        }
    }
    (dq, dk, dv)
}

/// The forward's tolerance (docs/checking.md#tolerances); early exit may leave up to 2^-T of the
/// stick per row, which the walk here cuts per key and the kernels per block of keys.
pub fn forward_tolerance(a: &Args) -> f64 {
    5e-3 + a.spec.early_exit_bits.map_or(0.0, |t| 4.0 * 2f64.powi(-(t as i32)))
}

/// The gathered o and rem against the float64 walk on sampled rows: spread evenly, plus both sides of
/// every segment boundary, plus the last. Prints the errors; true when within the tolerance.
pub fn check_forward_rows(
    a: &Args,
    part: &Partition,
    (q, k, v): (&[f32], &[f32], &[f32]),
    o: &[f32],
    rem: &[f32],
) -> bool {
    let h = a.heads;
    let mut rows: Vec<usize> = (0..a.rows).map(|i| i * a.seq / a.rows.max(1)).collect();
    for s in 0..part.segments() {
        let start = part.segment(s).start;
        rows.extend(start.saturating_sub(2)..(start + 2).min(a.seq));
    }
    rows.push(a.seq - 1);
    rows.sort_unstable();
    rows.dedup();
    let jobs: Vec<(usize, usize, usize)> = (0..h.batch)
        .flat_map(|b| (0..h.heads).map(move |hh| (b, hh)))
        .flat_map(|(b, hh)| rows.iter().map(move |&i| (b, hh, i)))
        .collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk = jobs.len().div_ceil(threads).max(1);
    let refs: Vec<(Vec<f64>, f64)> = std::thread::scope(|sc| {
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|js| sc.spawn(|| js.iter().map(|&(b, hh, i)| row_reference(a, q, k, v, b, hh, i)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|t| t.join().expect("reference thread")).collect()
    });
    let d = h.head_dim;
    let (mut got_o, mut want_o, mut got_rem, mut want_rem) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (&(b, hh, i), (ro, rl)) in jobs.iter().zip(&refs) {
        let hk = hh / (h.heads / h.kv_heads);
        let off = at(a.spec.layout, h.heads, a.seq, d, b, hh, i);
        let rem_want = rl.exp2();
        let v_own = &v[at(a.spec.layout, h.kv_heads, a.seq, d, b, hk, i)..][..d];
        for c in 0..d {
            let fused = if a.spec.remainder == Remainder::Fuse { rem_want * v_own[c] as f64 } else { 0.0 };
            got_o.push(o[off + c]);
            want_o.push(ro[c] + fused);
        }
        got_rem.push(rem[(b * h.heads + hh) * a.seq + i]);
        want_rem.push(rem_want);
    }
    let (err_o, err_rem) = (rel_l2(&got_o, &want_o), rel_l2(&got_rem, &want_rem));
    let tol = forward_tolerance(a);
    let pass = err_o <= tol && err_rem <= tol;
    println!(
        "float64 walk, {} rows x {} heads: o rel L2 {err_o:.2e}, rem {err_rem:.2e} (tolerance {tol:.0e}) {}",
        rows.len(),
        h.batch * h.heads,
        if pass { "ok" } else { "FAILED" }
    );
    pass
}

/// The single-GPU kernels on the whole sequence, as the comparison for the pieces: o and rem, and
/// with `d_o` (and dRem) dq, dk, dv; with `reps` > 0 also the median forward and backward times of
/// `reps` runs after a warm-up (CUDA events).
pub struct Single {
    pub o: Vec<f32>,
    pub rem: Vec<f32>,
    pub grads: Option<(Vec<f32>, Vec<f32>, Vec<f32>)>,
    pub fwd_ms: Option<f64>,
    pub bwd_ms: Option<f64>,
}

#[allow(clippy::too_many_arguments)]
pub fn single_gpu<T: SbElement>(
    a: &Args,
    launcher: &sbgen_runtime::launcher::Launcher,
    arch: sbgen::ir::Arch,
    (q, k, v): (&[f32], &[f32], &[f32]),
    grads_of: Option<(&[f32], &[f32])>,
    reps: usize,
) -> Result<Single, Error> {
    use sbgen::ir::{Kernel, Schedule};
    use sbgen_runtime::launcher::{BackwardArgs, ForwardArgs, KernelBinary};
    let h = a.heads;
    let stream = launcher.stream().clone();
    let lower = |spec: Spec| -> Result<Arc<KernelBinary>, Error> {
        let lowered = sbgen::lower::lower(&Kernel::new(spec, Schedule::default_on(&spec, arch), arch))?;
        Ok(Arc::new(KernelBinary::new(lowered.manifest, Vec::new(), Some(lowered.cuda_source))))
    };
    let fwd = lower(a.spec)?;
    let shape = Shape::new(h.batch, h.heads, a.seq, h.head_dim).with_kv_heads(h.kv_heads);
    let (qd, kd, vd) = (upload::<T>(&stream, q)?, upload::<T>(&stream, k)?, upload::<T>(&stream, v)?);
    let rows = h.batch * h.heads * a.seq;
    let mut od = stream.alloc_zeros::<T>(q.len())?;
    let mut o_saved = stream.alloc_zeros::<f32>(q.len())?;
    let mut remd = stream.alloc_zeros::<f32>(rows)?;
    let mut lremd = stream.alloc_zeros::<f32>(rows)?;
    let mut forward = || -> Result<(), Error> {
        let args = ForwardArgs {
            q: qd.slice(..),
            k: kd.slice(..),
            v: vd.slice(..),
            o: od.slice_mut(..),
            rem: remd.slice_mut(..),
            log2_rem: lremd.slice_mut(..),
            o_saved: Some(o_saved.slice_mut(..)),
            varlen: None,
        };
        Ok(launcher.forward(&fwd, shape, args, None)?)
    };
    forward()?;
    let fwd_ms = if reps > 0 { Some(median_ms(&stream, reps, &mut forward)?) } else { None };
    let (o, rem) = (download(&stream, &od)?, stream.clone_dtoh(&remd)?);
    let (mut grads, mut bwd_ms) = (None, None);
    if let Some((d_o, d_rem)) = grads_of {
        let bwd = lower(Spec { pass: Pass::Backward, ..a.spec })?;
        let (dod, dremd) = (upload::<T>(&stream, d_o)?, stream.clone_htod(d_rem)?);
        let mut dq = stream.alloc_zeros::<T>(q.len())?;
        let (mut dk, mut dv) = (stream.alloc_zeros::<T>(k.len())?, stream.alloc_zeros::<T>(k.len())?);
        let mut backward = || -> Result<(), Error> {
            let args = BackwardArgs {
                q: qd.slice(..),
                k: kd.slice(..),
                v: vd.slice(..),
                o: od.slice(..),
                o_saved: o_saved.slice(..),
                d_o: dod.slice(..),
                d_rem: Some(dremd.slice(..)),
                log2_rem: lremd.slice(..),
                dq: dq.slice_mut(..),
                dk: dk.slice_mut(..),
                dv: dv.slice_mut(..),
                varlen: None,
            };
            Ok(launcher.backward(&bwd, shape, args, None)?)
        };
        backward()?;
        if reps > 0 {
            bwd_ms = Some(median_ms(&stream, reps, &mut backward)?);
        }
        grads = Some((download(&stream, &dq)?, download(&stream, &dk)?, download(&stream, &dv)?));
    }
    Ok(Single { o, rem, grads, fwd_ms, bwd_ms })
}

/// Median of `reps` runs of `f` on `stream` after one warm-up, timed with CUDA events.
pub fn median_ms(
    stream: &Arc<CudaStream>,
    reps: usize,
    f: &mut dyn FnMut() -> Result<(), Error>,
) -> Result<f64, Error> {
    use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
    f()?;
    let ctx = stream.context();
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let (e0, e1) = (ctx.new_event(Some(CU_EVENT_DEFAULT))?, ctx.new_event(Some(CU_EVENT_DEFAULT))?);
        e0.record(stream)?;
        f()?;
        e1.record(stream)?;
        e1.synchronize()?;
        t.push(e0.elapsed_ms(&e1)? as f64);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Gradient tolerance of `sbgen check` (docs/checking.md#tolerances), widened by early exit's bound.
pub fn grad_tolerance(a: &Args) -> f64 {
    1e-2 + a.spec.early_exit_bits.map_or(0.0, |t| 4.0 * 2f64.powi(-(t as i32)))
}

/// Prints and judges `got` against `want` (relative L2 each) within `tol`.
pub fn judge(what: &str, pairs: &[(&str, &[f32], &[f64])], tol: f64) -> bool {
    let errs: Vec<(String, f64)> = pairs.iter().map(|(n, g, w)| (n.to_string(), rel_l2(g, w))).collect();
    let pass = errs.iter().all(|(_, e)| *e <= tol);
    let text: Vec<String> = errs.iter().map(|(n, e)| format!("{n} {e:.2e}")).collect();
    println!("{what}: {} (tolerance {tol:.0e}) {}", text.join(", "), if pass { "ok" } else { "FAILED" });
    pass
}

pub fn widen(x: &[f32]) -> Vec<f64> {
    par_map(x, |_, &v| v as f64)
}

/// The segment-pass kernel (`pass` `Segment` or `SegmentBackward`) for the forward `spec`, at the
/// forward's or backward's default schedule on `arch`; the launcher compiles its source with NVRTC.
pub fn segment_kernel(
    spec: Spec,
    pass: Pass,
    arch: sbgen::ir::Arch,
) -> Result<sbgen_runtime::launcher::KernelBinary, Error> {
    use sbgen::ir::{Kernel, Schedule};
    let spec = Spec { pass, deterministic: false, ..spec };
    spec.validate()?;
    let lowered = sbgen::lower::lower(&Kernel::new(spec, Schedule::default_on(&spec, arch), arch))?;
    Ok(sbgen_runtime::launcher::KernelBinary::new(lowered.manifest, Vec::new(), Some(lowered.cuda_source)))
}

/// The device's arch as sbgen names it.
pub fn device_arch(launcher: &sbgen_runtime::launcher::Launcher) -> Result<sbgen::ir::Arch, Error> {
    let (major, minor) = launcher.store().compute_capability();
    sbgen::ir::Arch::for_device(major, minor)
        .ok_or_else(|| format!("compute capability {major}.{minor}: sbgen needs 8.0 or newer (sm_80, sm_90)").into())
}
