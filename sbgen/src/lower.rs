//! Lowering: a validated [`Kernel`] rendered through the tera templates in `templates/` into CUDA C++
//! with every spec and schedule constant baked in, plus the [`KernelManifest`] that says how to launch
//! it. The templates only fill slots; the algorithm lives in the `.cuh` partials they include.

use crate::ir::{IrError, Kernel, Layout, Mask, Pass, Remainder, Softplus};
use sbgen_runtime::manifest::{
    GridRule, KernelManifest, LaunchStep, DECODE_PARAM_FIELDS, PARAM_FIELDS, SEGMENT_BWD_PARAM_FIELDS,
    SEGMENT_PARAM_FIELDS,
};
use serde::Serialize;
use std::sync::OnceLock;

/// The templates, embedded so that the binary and the macro need no files at run time.
const TEMPLATES: &[(&str, &str)] = &[
    ("sb_fwd.cu.tera", include_str!("../../templates/sb_fwd.cu.tera")),
    ("sb_bwd.cu.tera", include_str!("../../templates/sb_bwd.cu.tera")),
    ("sb_decode.cu.tera", include_str!("../../templates/sb_decode.cu.tera")),
    // The wgmma helpers the forward and backward share (included under `{% if wgmma %}`).
    ("sb_wgmma.cu.tera", include_str!("../../templates/sb_wgmma.cu.tera")),
    // The TMA loads' tensor maps, mbarrier waits and copies, shared the same way (under `{% if tma %}`).
    ("sb_tma.cu.tera", include_str!("../../templates/sb_tma.cu.tera")),
    // The producer warpgroup's loop and the computing warps' side of it (under `{% if producer %}`).
    ("sb_producer.cu.tera", include_str!("../../templates/sb_producer.cu.tera")),
    // Inside the kernel: the TMA mbarriers' set-up and the producer's role split (under `{% if tma %}`).
    ("sb_tma_setup.cu.tera", include_str!("../../templates/sb_tma_setup.cu.tera")),
];

/// The CUDA partials, pasted verbatim into the templates (not parsed by tera: inline PTX such as
/// `{%0, %1}` would read as template tags).
const COMMON_CUH: &str = include_str!("../../templates/sb_common.cuh");
const WALK_CUH: &str = include_str!("../../templates/sb_walk.cuh");
const SEGMENT_CUH: &str = include_str!("../../templates/sb_segment.cuh");

/// Threads and elements per CTA of the backward's finishing step (f32 accumulators -> dtype); the
/// segment pass's finishing step takes one element per thread.
const FINISH_THREADS: u32 = 256;
const FINISH_ELEMENTS_PER_THREAD: u32 = 8;

/// A kernel ready to compile: its name, CUDA source and launch manifest.
#[derive(Clone, Debug)]
pub struct Lowered {
    pub kernel: Kernel,
    pub name: String,
    pub cuda_source: String,
    pub manifest: KernelManifest,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LowerError {
    #[error("invalid kernel: {0}")]
    Invalid(#[from] IrError),
    #[error("template `{template}` failed to render: {message}")]
    Template { template: &'static str, message: String },
}

/// The values the templates see. Every field is a compile-time constant of the generated kernel.
#[derive(Serialize)]
struct TemplateContext {
    name: String,
    kernel_debug: String,
    is_bf16: bool,
    /// The tensors' head_dim (`DM` in the templates).
    head_dim: u32,
    /// The tile width: head_dim rounded up to a multiple of 32 (`D`).
    tile_head_dim: u32,
    block_m: u32,
    block_n: u32,
    warps: u32,
    threads: u32,
    m_tiles: u32,
    stages: u32,
    attend_current: bool,
    /// 0 BHND, 1 BNHD, 2 THD (the templates' LAYOUT_* constants).
    layout_code: u32,
    q_in_regs: bool,
    deterministic: bool,
    fuse: bool,
    early_exit: bool,
    early_exit_bits: u32,
    /// The weights' exp2 as the polynomial: for every key, or (`poly_half`, which emits `POLY_EXP2`
    /// as the int 2) for every other key. The bool's declaration is kept as it was so that the PTX of
    /// the other kernels, which shows the constant, stays the same.
    poly_exp2: bool,
    poly_half: bool,
    /// The stick in linear space (`softplus = linear`; emits `POLY_EXP2` as the int 3).
    stick_linear: bool,
    /// The forward's and backward's segment variants (context parallelism).
    segment: bool,
    /// The warpgroup's `wgmma` (sm_90a): the forward's Q K^T and P V, the backward's Q K^T, dO V^T
    /// and dZ K (docs/performance.md#wgmma), and with `wgmma_key_grads` its dK and dV.
    wgmma: bool,
    /// The backward's dK and dV on wgmma too (`key_grads_wgmma`): 64-key products, so block_n a
    /// multiple of 64, at most 128 columns (a product's accumulators beside dQ's), and one CTA per
    /// SM asked for (bounded to three, the 64-wide kernel spilled 16-224 bytes); else they stay on
    /// mma.sync (`key_grads`).
    wgmma_key_grads: bool,
    /// The in-block scan as a wgmma with a triangle of ones (`cumsum = tensor_core`).
    tc_cumsum: bool,
    /// K and V by TMA through the two tensor maps the kernel takes (docs/performance.md#tma).
    tma: bool,
    /// The TMA copies issued by a producer warpgroup after the computing warps
    /// (docs/performance.md#warp-specialisation); `threads` counts the computing warps only.
    producer: bool,
    /// The two computing warpgroups issue their products in turn (named barriers).
    pingpong: bool,
    /// Threads per CTA, the producer warpgroup's included (`__launch_bounds__`).
    launch_threads: u32,
    /// With `producer`: whether `setmaxnreg` moves registers from the producer to the computing
    /// warpgroups, and the counts each then holds.
    setmaxnreg: bool,
    producer_regs: u32,
    consumer_regs: u32,
    /// With `wgmma`: the PTX type of the inputs, the accumulator registers' operand list (`%0, ..`)
    /// and their C++ operands (`"+f"(s[0][0][0]), ..`), written here because `{%` in a template
    /// would read as a tag.
    wgmma_type: &'static str,
    wgmma_d_regs: String,
    wgmma_d_operands: String,
    /// The operand number of the A descriptor (B's and the accumulate flag follow).
    wgmma_a0: u32,
    /// P V on wgmma: the output accumulators' operand list and C++ operands, and the operand number
    /// of P's first register (the other three and V's descriptor follow).
    wgmma_o_regs: String,
    wgmma_o_operands: String,
    wgmma_pv_a0: u32,
    min_blocks: u32,
    smem: crate::ir::SmemLayout,
    params: Vec<(String, String)>,
    finish_threads: u32,
    finish_elements_per_thread: u32,
    sb_common_cuh: &'static str,
    sb_walk_cuh: &'static str,
    sb_segment_cuh: &'static str,
}

fn engine() -> &'static Result<tera::Tera, String> {
    static ENGINE: OnceLock<Result<tera::Tera, String>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut tera = tera::Tera::default();
        tera.autoescape_on(vec![]);
        tera.add_raw_templates(TEMPLATES.iter().copied()).map_err(|e| format!("{e:?}"))?;
        Ok(tera)
    })
}

/// Whether the forward keeps its Q fragments in registers for the whole walk (else it re-reads them
/// from the shared Q tile at each key block: 64 x 64 x 3 at 2,16,8192,128 took 2.230 ms that way in
/// session 9, 2.223 ms with them in registers in session 8, before the sequence views). They
/// fit next to the scores and output accumulators up to 128 columns with 32-key blocks; with 64- or
/// 128-key blocks the 128-wide tile's scores take 16-48 more registers per thread and the kernel
/// spilled 20-56 bytes under ptxas 13.0 (docs/performance.md#known-spills). A 256-wide tile's output
/// accumulators alone take 128 registers.
/// The decode's warps hold 16 query heads per m-tile and blocks of at most 64 keys: its Q fragments
/// fit in registers up to 128 columns.
fn q_fragments_in_registers(pass: Pass, tile_head_dim: u32, schedule: &crate::ir::Schedule) -> bool {
    match pass {
        Pass::Decode => tile_head_dim <= 128,
        Pass::Forward | Pass::Backward | Pass::Segment | Pass::SegmentBackward => {
            tile_head_dim < 128 || (tile_head_dim == 128 && schedule.block_n <= 32)
        }
    }
}

/// CTAs per SM that the register allocation must leave room for (`__launch_bounds__`' second
/// argument; 1 lets a kernel take up to 255 registers). The 4-warp wgmma backward at 64 columns
/// with the linear stick takes 196-201 registers unbounded, two CTAs per SM; bounded to three (168
/// registers, which its 64 KiB of shared memory allow) it compiles without spills and measured 1.06x
/// faster (docs/performance.md#wgmma). The MUFU walk spills 8 bytes at that bound, and so do the
/// fused remainder in BNHD (bf16) and, since the linear stick takes one reciprocal per run
/// (session 22), the packed batch (THD) with early exit (bf16): these keep the unbounded
/// allocation. The other kernels are not
/// bounded: the forward at 64 columns fits three CTAs unbounded (144 registers), and its 3-stage
/// variant bounded to three measured slower than the 2-stage one. A producer kernel with one
/// computing warpgroup asks for two (see [`register_split`]).
fn min_blocks_per_sm(kernel: &Kernel) -> u32 {
    const BOUNDED: u32 = 3;
    let (spec, s) = (&kernel.spec, &kernel.schedule);
    let fits = BOUNDED * (kernel.smem_layout().total + SMEM_RESERVED_PER_CTA) <= SMEM_PER_SM_SM90;
    let bounded = kernel.arch == crate::ir::Arch::Sm90
        && spec.pass == Pass::Backward
        && s.mma == crate::ir::MmaFamily::Wgmma
        && s.threads() == 128
        && s.softplus == Softplus::Linear
        && spec.remainder == Remainder::Return
        && !(spec.layout == crate::ir::Layout::Thd && spec.early_exit_bits.is_some())
        && spec.tile_head_dim() == 64
        && fits;
    if bounded {
        BOUNDED
    } else if s.loads == crate::ir::Loads::Producer && s.warps == 4 {
        // One computing warpgroup and its producer: two CTAs per SM where the shared memory allows,
        // so that 8 warps per SM compute, as without the producer. Not above 128 columns: ptxas
        // refuses the 256-wide P V wgmma (its 128 accumulators and operands) under the launch's 128
        // registers, setmaxnreg or not (C7602, 158 needed).
        if spec.tile_head_dim() <= 128 && 2 * (kernel.smem_layout().total + SMEM_RESERVED_PER_CTA) <= SMEM_PER_SM_SM90 {
            2
        } else {
            1
        }
    } else {
        1
    }
}

/// Registers per thread after `setmaxnreg`, producer and computing warpgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RegisterSplit {
    producer: u32,
    consumer: u32,
}

/// How a producer CTA shares the SM's 65536 registers: the launch gives every thread the same count
/// (`__launch_bounds__`: 65536 / (threads x CTAs per SM), in steps of 8); the producer keeps 24 (it
/// only counts stages and issues copies) and the computing warpgroups take the rest, at most 240
/// (docs/performance.md#warp-specialisation). `None` without a producer, or when the launch already
/// gives the computing warps as many (one CTA of 256 threads: 255 each).
fn register_split(kernel: &Kernel, min_blocks: u32) -> Option<RegisterSplit> {
    const SM_REGISTERS: u32 = 65536;
    const PRODUCER: u32 = 24;
    const MOST: u32 = 240;
    let s = &kernel.schedule;
    if s.loads != crate::ir::Loads::Producer {
        return None;
    }
    let per_cta = SM_REGISTERS / min_blocks;
    let at_launch = (per_cta / s.threads() / 8 * 8).min(255);
    let consumer = ((per_cta - PRODUCER * crate::ir::PRODUCER_THREADS) / s.compute_threads() / 8 * 8).min(MOST);
    (consumer > at_launch).then_some(RegisterSplit { producer: PRODUCER, consumer })
}

/// Shared memory of an sm_90 SM and what the driver reserves per CTA, in bytes.
const SMEM_PER_SM_SM90: u32 = 228 * 1024;
const SMEM_RESERVED_PER_CTA: u32 = 1024;

/// Lowers `kernel` to CUDA C++ and a launch manifest.
// `%` rather than `is_multiple_of`: the workspace's rust-version (1.80) predates it.
#[allow(clippy::manual_is_multiple_of)]
pub fn lower(kernel: &Kernel) -> Result<Lowered, LowerError> {
    kernel.validate()?;
    let spec = &kernel.spec;
    let s = &kernel.schedule;
    let name = kernel.name();
    let min_blocks = min_blocks_per_sm(kernel);
    let registers = register_split(kernel, min_blocks);
    let ctx = TemplateContext {
        name: name.clone(),
        kernel_debug: format!("spec {} | schedule {} | arch {}", spec.slug(), s, kernel.arch),
        is_bf16: spec.dtype == crate::ir::Dtype::Bf16,
        head_dim: spec.head_dim,
        tile_head_dim: spec.tile_head_dim(),
        block_m: s.block_m,
        block_n: s.block_n,
        warps: s.warps,
        threads: s.compute_threads(),
        // The decode's warps all hold the CTA's block_m query heads.
        m_tiles: if spec.pass == Pass::Decode { s.block_m / 16 } else { s.rows_per_warp() / 16 },
        stages: s.stages,
        attend_current: spec.mask == Mask::AttendCurrent,
        layout_code: match spec.layout {
            Layout::Bhnd => 0,
            Layout::Bnhd => 1,
            Layout::Thd => 2,
            Layout::Paged => 3,
        },
        // wgmma reads Q from shared memory through a descriptor.
        q_in_regs: s.mma != crate::ir::MmaFamily::Wgmma && q_fragments_in_registers(spec.pass, spec.tile_head_dim(), s),
        deterministic: spec.deterministic,
        fuse: spec.remainder == Remainder::Fuse,
        early_exit: spec.early_exit_bits.is_some(),
        early_exit_bits: spec.early_exit_bits.unwrap_or(0),
        poly_exp2: s.softplus == Softplus::Poly,
        poly_half: s.softplus == Softplus::Half,
        stick_linear: s.softplus == Softplus::Linear,
        segment: matches!(spec.pass, Pass::Segment | Pass::SegmentBackward),
        wgmma: s.mma == crate::ir::MmaFamily::Wgmma,
        wgmma_key_grads: s.mma == crate::ir::MmaFamily::Wgmma
            && spec.pass == Pass::Backward
            && s.block_n % 64 == 0
            && spec.tile_head_dim() <= 128
            && min_blocks == 1,
        tc_cumsum: s.cumsum == crate::ir::Cumsum::TensorCore,
        tma: s.loads.is_tma(),
        producer: s.loads == crate::ir::Loads::Producer,
        pingpong: s.pingpong,
        launch_threads: s.threads(),
        setmaxnreg: registers.is_some(),
        producer_regs: registers.map_or(0, |r| r.producer),
        consumer_regs: registers.map_or(0, |r| r.consumer),
        wgmma_type: if spec.dtype == crate::ir::Dtype::Bf16 { "bf16" } else { "f16" },
        wgmma_d_regs: (0..s.block_n / 2).map(|i| format!("%{i}")).collect::<Vec<_>>().join(", "),
        wgmma_d_operands: (0..s.block_n / 8)
            .flat_map(|nt| (0..4).map(move |e| format!("\"+f\"(s[0][{nt}][{e}])")))
            .collect::<Vec<_>>()
            .join(", "),
        wgmma_a0: s.block_n / 2,
        wgmma_o_regs: (0..spec.tile_head_dim() / 2).map(|i| format!("%{i}")).collect::<Vec<_>>().join(", "),
        wgmma_o_operands: (0..spec.tile_head_dim() / 8)
            .flat_map(|dt| (0..4).map(move |e| format!("\"+f\"(o[0][{dt}][{e}])")))
            .collect::<Vec<_>>()
            .join(", "),
        wgmma_pv_a0: spec.tile_head_dim() / 2,
        min_blocks,
        smem: kernel.smem_layout(),
        params: match spec.pass {
            Pass::Decode => DECODE_PARAM_FIELDS,
            Pass::Segment => SEGMENT_PARAM_FIELDS,
            Pass::SegmentBackward => SEGMENT_BWD_PARAM_FIELDS,
            Pass::Forward | Pass::Backward => PARAM_FIELDS,
        }
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect(),
        finish_threads: FINISH_THREADS,
        finish_elements_per_thread: FINISH_ELEMENTS_PER_THREAD,
        sb_common_cuh: COMMON_CUH,
        sb_walk_cuh: WALK_CUH,
        sb_segment_cuh: SEGMENT_CUH,
    };
    let template = match spec.pass {
        Pass::Forward | Pass::Segment => "sb_fwd.cu.tera",
        Pass::Backward | Pass::SegmentBackward => "sb_bwd.cu.tera",
        Pass::Decode => "sb_decode.cu.tera",
    };
    let tera = engine().as_ref().map_err(|message| LowerError::Template { template, message: message.clone() })?;
    let context = tera::Context::from_serialize(&ctx)
        .map_err(|e| LowerError::Template { template, message: format!("{e:?}") })?;
    let cuda_source =
        tera.render(template, &context).map_err(|e| LowerError::Template { template, message: format!("{e:?}") })?;

    let main = LaunchStep {
        function: name.clone(),
        grid: match spec.pass {
            Pass::Decode => GridRule::DecodeSplits { warps: s.warps, tile_heads: s.block_m },
            // The segment pass: N is the query segment's length.
            Pass::Forward | Pass::Backward | Pass::Segment | Pass::SegmentBackward => {
                GridRule::QueryBlocks { block_m: s.block_m }
            }
        },
        threads: s.threads(),
        dynamic_smem_bytes: ctx.smem.total,
        kv_tensor_maps: ctx.tma,
    };
    let steps = match spec.pass {
        // The decode merges in its last CTA per unit: one step.
        Pass::Forward | Pass::Decode => vec![main],
        // The walk runs once per key segment; the finishing step once after the last (over the elements
        // of o, not of K/V: the launcher gives the grid o's element count).
        Pass::Segment => vec![
            main,
            LaunchStep {
                function: format!("{name}_finish"),
                grid: GridRule::Elements { per_cta: FINISH_THREADS },
                threads: FINISH_THREADS,
                dynamic_smem_bytes: 0,
                kv_tensor_maps: false,
            },
        ],
        // The walk once per key segment; after the last, dK/dV (over the rank's K/V-shaped partials,
        // as the backward's finishing step) and dQ (over q's elements, one per thread).
        Pass::SegmentBackward => vec![
            main,
            LaunchStep {
                function: format!("{name}_finish"),
                grid: GridRule::Elements { per_cta: FINISH_THREADS * FINISH_ELEMENTS_PER_THREAD },
                threads: FINISH_THREADS,
                dynamic_smem_bytes: 0,
                kv_tensor_maps: false,
            },
            LaunchStep {
                function: format!("{name}_dq"),
                grid: GridRule::Elements { per_cta: FINISH_THREADS },
                threads: FINISH_THREADS,
                dynamic_smem_bytes: 0,
                kv_tensor_maps: false,
            },
        ],
        Pass::Backward => vec![
            main,
            LaunchStep {
                function: format!("{name}_finish"),
                grid: GridRule::Elements { per_cta: FINISH_THREADS * FINISH_ELEMENTS_PER_THREAD },
                threads: FINISH_THREADS,
                dynamic_smem_bytes: 0,
                kv_tensor_maps: false,
            },
        ],
    };
    let manifest = KernelManifest { name: name.clone(), spec: *spec, block_m: s.block_m, block_n: s.block_n, steps };
    Ok(Lowered { kernel: *kernel, name, cuda_source, manifest })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Arch, Dtype, Pass, Schedule, Spec};

    fn source(pass: Pass, softplus: Softplus) -> String {
        let spec = Spec::new(128, Dtype::Bf16, pass);
        let kernel = Kernel::new(spec, Schedule { softplus, ..Schedule::default_for(&spec) }, Arch::Sm90);
        lower(&kernel).expect("lowers").cuda_source
    }

    /// A TMA kernel takes the two tensor maps after its parameter block and says so in its manifest
    /// (the walk only); a cp.async kernel's source has none of it.
    #[test]
    fn tma_kernels_take_two_tensor_maps_and_their_manifest_says_so() {
        let forward = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let backward = Spec { pass: Pass::Backward, ..forward };
        for (spec, wgmma, maps) in [
            (forward, Schedule::wgmma_forward(&forward), vec![true]),
            // The walk takes them, not the finishing step.
            (backward, Schedule::wgmma_backward(&backward), vec![true, false]),
        ] {
            let wgmma = Schedule { loads: crate::ir::Loads::CpAsync, ..wgmma };
            let tma = lower(&Kernel::new(spec, Schedule { loads: crate::ir::Loads::Tma, ..wgmma }, Arch::Sm90))
                .expect("lowers");
            assert!(tma
                .cuda_source
                .contains("const __grid_constant__ SbTensorMap tmap_k, const __grid_constant__ SbTensorMap tmap_v"));
            assert!(tma.cuda_source.contains("cp.async.bulk.tensor.5d"));
            assert_eq!(tma.manifest.steps.iter().map(|s| s.kv_tensor_maps).collect::<Vec<_>>(), maps);
            let cp = lower(&Kernel::new(spec, wgmma, Arch::Sm90)).expect("lowers");
            assert!(!cp.cuda_source.contains("SbTensorMap") && !cp.cuda_source.contains("mbarrier"));
            assert!(cp.manifest.steps.iter().all(|s| !s.kv_tensor_maps));
            let json = serde_json::to_string(&cp.manifest).unwrap();
            assert!(!json.contains("kv_tensor_maps"), "manifests without TMA are written as before: {json}");
        }
    }

    /// A producer kernel launches its producer warpgroup after the computing warps, moves registers
    /// to them with `setmaxnreg` where the launch leaves fewer than they can have, and takes the
    /// tensor maps as a TMA kernel does.
    #[test]
    fn producer_kernels_launch_their_own_warpgroup_and_split_the_registers() {
        use crate::ir::Loads;
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let ws =
            Schedule { loads: Loads::Producer, block_m: 128, warps: 8, stages: 3, ..Schedule::wgmma_forward(&spec) };
        let two = Kernel::new(spec, ws, Arch::Sm90);
        let lowered = lower(&two).expect("lowers");
        assert_eq!(lowered.manifest.steps[0].threads, 384);
        assert!(lowered.manifest.steps[0].kv_tensor_maps);
        // 384 threads, one CTA per SM: 168 registers at launch; 24 for the producer leave 240.
        assert_eq!(register_split(&two, min_blocks_per_sm(&two)), Some(RegisterSplit { producer: 24, consumer: 240 }));
        let src = &lowered.cuda_source;
        assert!(src.contains("constexpr int THREADS = 256;") && src.contains("constexpr int LAUNCH_THREADS = 384;"));
        assert!(
            src.contains("setmaxnreg.dec.sync.aligned.u32 24;") && src.contains("setmaxnreg.inc.sync.aligned.u32 240;")
        );
        assert!(!src.contains("pingpong_take_turn"));
        let pp = lower(&Kernel::new(spec, Schedule { pingpong: true, ..ws }, Arch::Sm90)).expect("lowers");
        assert!(pp.cuda_source.contains("pingpong_take_turn();"));
        // One computing warpgroup: two CTAs per SM where the shared memory allows (232 registers).
        let one = Kernel::new(spec, Schedule { block_m: 64, warps: 4, ..ws }, Arch::Sm90);
        assert_eq!(min_blocks_per_sm(&one), 2);
        assert_eq!(register_split(&one, 2), Some(RegisterSplit { producer: 24, consumer: 232 }));
        // Four stages of 64 rows take too much shared memory for two: 255 registers at launch, no split.
        let deep = Kernel::new(spec, Schedule { block_m: 64, warps: 4, stages: 4, ..ws }, Arch::Sm90);
        assert_eq!(min_blocks_per_sm(&deep), 1);
        assert_eq!(register_split(&deep, 1), None);
        assert!(!lower(&deep).expect("lowers").cuda_source.contains("setmaxnreg"));
        // Nor at 256 wide, where ptxas needs more than 128 registers at launch for P V.
        let wide_spec = Spec::new(256, Dtype::Bf16, Pass::Forward);
        let wide = Kernel::new(wide_spec, Schedule { block_m: 64, warps: 4, block_n: 32, stages: 2, ..ws }, Arch::Sm90);
        assert_eq!((min_blocks_per_sm(&wide), register_split(&wide, 1)), (1, None));
    }

    /// The exp2 split reaches the stick math of every pass, and the MUFU and all-polynomial kernels
    /// keep the bool constant they had (it shows in their PTX, which the shipped cache holds); the
    /// linear stick is an int constant too.
    #[test]
    fn the_exp2_split_and_the_linear_stick_are_int_constants() {
        for pass in [Pass::Forward, Pass::Backward, Pass::Decode] {
            assert!(source(pass, Softplus::Mufu).contains("constexpr bool POLY_EXP2 = false;\n"), "{pass:?}");
            assert!(source(pass, Softplus::Poly).contains("constexpr bool POLY_EXP2 = true;\n"), "{pass:?}");
            let half = source(pass, Softplus::Half);
            assert!(half.contains("constexpr int POLY_EXP2 = 2;") && !half.contains("bool POLY_EXP2"), "{pass:?}");
        }
        // The linear stick lowers for the forward and the backward (the decode refuses it).
        for pass in [Pass::Forward, Pass::Backward] {
            let linear = source(pass, Softplus::Linear);
            assert!(linear.contains("constexpr int POLY_EXP2 = 3;") && !linear.contains("bool POLY_EXP2"), "{pass:?}");
        }
    }

    /// Three CTAs per SM are asked of the 4-warp linear wgmma backward at 64 columns on sm_90 with
    /// the remainder returned, when its shared memory allows three, and of nothing else.
    #[test]
    fn only_the_narrow_linear_wgmma_backward_is_bounded_to_three_ctas() {
        use crate::ir::MmaFamily;
        let bound = |head_dim: u32, pass: Pass, arch: Arch, edit: &dyn Fn(&mut Schedule)| {
            let spec = Spec::new(head_dim, Dtype::Bf16, pass);
            let mut schedule = Schedule::wgmma_backward(&spec);
            edit(&mut schedule);
            min_blocks_per_sm(&Kernel::new(spec, schedule, arch))
        };
        let keep = |_: &mut Schedule| {};
        assert_eq!(Schedule::wgmma_backward(&Spec::new(64, Dtype::Bf16, Pass::Backward)).softplus, Softplus::Linear);
        assert_eq!(bound(64, Pass::Backward, Arch::Sm90, &keep), 3);
        let source = lower(&Kernel::new(
            Spec::new(64, Dtype::Bf16, Pass::Backward),
            Schedule::wgmma_backward(&Spec::new(64, Dtype::Bf16, Pass::Backward)),
            Arch::Sm90,
        ))
        .expect("lowers")
        .cuda_source;
        assert!(source.contains("constexpr int MIN_BLOCKS = 3;"));
        assert_eq!(bound(128, Pass::Backward, Arch::Sm90, &keep), 1);
        assert_eq!(bound(64, Pass::Backward, Arch::Sm80, &keep), 1);
        assert_eq!(bound(64, Pass::Forward, Arch::Sm90, &keep), 1);
        assert_eq!(bound(64, Pass::Backward, Arch::Sm90, &|s| s.softplus = Softplus::Mufu), 1, "spills at 168");
        assert_eq!(bound(64, Pass::Backward, Arch::Sm90, &|s| s.mma = MmaFamily::MmaSync), 1);
        let fused = Spec { remainder: Remainder::Fuse, ..Spec::new(64, Dtype::Bf16, Pass::Backward) };
        assert_eq!(min_blocks_per_sm(&Kernel::new(fused, Schedule::wgmma_backward(&fused), Arch::Sm90)), 1, "spills");
        assert_eq!(bound(64, Pass::Backward, Arch::Sm90, &|s| s.stages = 3), 1, "80 KiB: two CTAs");
        let packed_exit = Spec {
            layout: crate::ir::Layout::Thd,
            early_exit_bits: Some(24),
            ..Spec::new(64, Dtype::Bf16, Pass::Backward)
        };
        let packed_exit_bound =
            min_blocks_per_sm(&Kernel::new(packed_exit, Schedule::wgmma_backward(&packed_exit), Arch::Sm90));
        assert_eq!(packed_exit_bound, 1, "spills");
        let packed = Spec { early_exit_bits: None, ..packed_exit };
        assert_eq!(min_blocks_per_sm(&Kernel::new(packed, Schedule::wgmma_backward(&packed), Arch::Sm90)), 3);
        assert_eq!(bound(64, Pass::Backward, Arch::Sm90, &|s| (s.block_m, s.warps) = (128, 8)), 1);
    }
}
