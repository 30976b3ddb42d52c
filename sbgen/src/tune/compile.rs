//! The candidates' kernels: compiled here into the session's scratch folder through the artifact
//! pipeline (a compile error or a spill is a named loss), or taken from a prebuilt PTX folder; then
//! every module is loaded on the device at once (the driver's JIT of PTX dominates otherwise).

use super::plan::Session;
use crate::artifact::{self, store::PtxDir, Verdict};
use crate::cache::{CandidateResult, Outcome};
use crate::compile::Compiler;
use crate::gpu::check::short;
use crate::ir::Kernel;
use crate::lower::{lower, Lowered};

/// Compiles `kernels` on `threads` threads and writes the PTX of each one judged
/// [`Verdict::Ok`] into `dir` (where a `KernelBuilder` on the folder finds it). Returns, in order,
/// `Ok(())` or the reason a kernel is a loss (lowering or compile error, spill, write error).
pub fn compile_to_dir(
    kernels: &[Kernel],
    compiler: &Compiler,
    threads: usize,
    dir: &PtxDir,
) -> Vec<Result<(), String>> {
    let lowered: Vec<Result<Lowered, String>> = kernels.iter().map(|k| lower(k).map_err(|e| e.to_string())).collect();
    let ok: Vec<Lowered> = lowered.iter().filter_map(|l| l.as_ref().ok().cloned()).collect();
    let mut artifacts = artifact::build_all(&ok, compiler, threads).into_iter();
    lowered
        .into_iter()
        .map(|l| {
            l?;
            let a = artifacts.next().ok_or("not compiled")?;
            match (&a.verdict, &a.compiled) {
                (Verdict::Ok, _) => dir.write(&a).map(|_| ()).map_err(|e| e.to_string()),
                (Verdict::Spill { bytes }, Some(c)) => Err(format!("spills {bytes} bytes (ptxas: {})", c.main())),
                (verdict, _) => Err(short(verdict)),
            }
        })
        .collect()
}

/// Makes every kept candidate (`kept[n]` indexes `cands`, `kernels[n]` is its kernel) and the
/// helper kernels ready to run: compiled when the session compiles here, then loaded. A candidate
/// that fails either step becomes [`Outcome::Failed`]; a helper's failure shows in the checks.
pub fn prepare(
    s: &mut Session<'_>,
    kept: &[usize],
    kernels: &[Kernel],
    helpers: &[Kernel],
    cands: &mut [CandidateResult],
) {
    let mut lines = Vec::new();
    if let Some((compiler, dir)) = &s.compile {
        let results = compile_to_dir(kernels, compiler, s.plan.jobs, dir);
        let total = kernels.len();
        for (n, (&i, r)) in kept.iter().zip(results).enumerate() {
            let status = match &r {
                Ok(()) => "compiled".to_string(),
                Err(e) => format!("FAIL {e}"),
            };
            lines.push(format!("[{:>2}/{total}] {:<26} {status}", n + 1, cands[i].schedule.to_string()));
            if let Err(reason) = r {
                cands[i].outcome = Outcome::Failed { reason };
            }
        }
        // Helpers compiled already (the forward spec's candidates, when both passes are tuned) are skipped.
        let compiled = |k: &Kernel| lower(k).is_ok_and(|l| dir.contains(&l));
        let extra: Vec<Kernel> = helpers.iter().filter(|k| !kernels.contains(k) && !compiled(k)).copied().collect();
        compile_to_dir(&extra, compiler, s.plan.jobs, dir);
    }
    for line in lines {
        s.say(&line);
    }
    let to_load: Vec<(Option<usize>, Kernel)> = kept
        .iter()
        .zip(kernels)
        .filter(|(&i, _)| matches!(cands[i].outcome, Outcome::NotRun { .. }))
        .map(|(&i, k)| (Some(i), *k))
        .chain(helpers.iter().map(|&k| (None, k)))
        .collect();
    let (dev, builder) = (s.dev, &s.builder);
    let loads = crate::pool::map(&to_load, s.plan.jobs.max(8), |(_, kernel)| {
        let binary = builder.build(kernel).map_err(|e| short(&e))?;
        dev.launcher.load(&binary).map(|_| ()).map_err(|e| short(&e))
    });
    for (&(i, _), r) in to_load.iter().zip(loads) {
        if let (Some(i), Err(reason)) = (i, r) {
            s.say(&format!("FAIL   {:<26} {reason}", cands[i].schedule.to_string()));
            cands[i].outcome = Outcome::Failed { reason };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::name::ptx_file_name;
    use crate::artifact::store::ScratchDir;
    use crate::gpu::kernels::KernelBuilder;
    use crate::ir::{Arch, Dtype, Pass, Schedule, Spec};

    /// The compile-here path with the real NVRTC and ptxas (skipped without the toolchain): the PTX
    /// lands under the name a `KernelBuilder` on the folder looks for, a kernel that does not lower
    /// is a named loss, a spilling one is a loss with its byte count and writes nothing, and no
    /// temp file is left behind.
    #[test]
    fn compile_to_dir_writes_ptx_a_builder_finds_and_names_the_losses() {
        let compiler = match Compiler::discover() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let scratch = ScratchDir::create().unwrap();
        let dir = PtxDir::new(scratch.path().join("ptx"));
        let spec = Spec::new(64, Dtype::Bf16, Pass::Forward);
        let good = Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm80);
        let bad = Kernel::new(spec, Schedule { block_n: 48, ..Schedule::DEFAULT }, Arch::Sm80);
        // Pruned from the search space because it spills (128-key blocks on 4 warps at 128 wide).
        let d128 = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let spilling = Kernel::new(d128, Schedule { block_n: 128, stages: 2, ..Schedule::DEFAULT }, Arch::Sm90);
        let results = compile_to_dir(&[good, bad, spilling], &compiler, 2, &dir);
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(results[1].as_ref().unwrap_err().contains("`block_n`"), "{:?}", results[1]);
        assert!(results[2].as_ref().unwrap_err().starts_with("spills "), "{:?}", results[2]);
        let file = dir.path().join(ptx_file_name(&lower(&good).unwrap()));
        assert!(std::fs::read_to_string(&file).unwrap().contains(".entry"), "{}", file.display());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let builder = KernelBuilder::new(Arch::Sm80, Some(dir.path().to_path_buf()));
        let binary = builder.build(&good).unwrap();
        assert_eq!(binary.ptx()[0].1, std::fs::read_to_string(&file).unwrap());
    }
}
