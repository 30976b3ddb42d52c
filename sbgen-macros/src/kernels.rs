//! The kernels to embed: finds the tuning cache (attribute, `SBGEN_CACHE`, the crate's
//! `sbgen-tune.json`, the built-in default), takes its entries for the spec and lowers the spec's
//! default schedule for every arch the cache has no entry for.

use crate::attr::{Errors, Options};
use proc_macro2::Span;
use sbgen::artifact::name::read_ptx;
use sbgen::cache::{CacheError, TuningCache, DEFAULT_CACHE_FILE};
use sbgen::ir::{Arch, Kernel, Pass, Schedule, Spec};
use std::path::{Path, PathBuf};

/// The cache in use and the file it came from (`None`: the built-in default).
pub struct Found {
    pub cache: TuningCache,
    pub file: Option<PathBuf>,
}

/// One kernel to embed, as plain data.
pub struct Embed {
    /// The arch the entry was tuned on; `None` for the default-schedule source fallback.
    pub arch: Option<Arch>,
    pub seq_bucket: Option<u32>,
    pub name: String,
    pub manifest_json: String,
    pub ptx: Vec<(String, String)>,
    pub cuda_source: Option<String>,
}

/// Finds and reads the cache. Errors point at `cache = "..."` when the key was given, else at the
/// attribute.
pub fn find_cache(options: &Options, errors: &mut Errors) -> Option<Found> {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_default();
    let (path, span, required, from) = if let Some(c) = &options.cache {
        (crate_dir.join(&c.value), c.span, true, "the `cache` key")
    } else if let Some(env) = std::env::var_os("SBGEN_CACHE").filter(|v| !v.is_empty()) {
        (crate_dir.join(env), Span::call_site(), true, "env `SBGEN_CACHE`")
    } else {
        (crate_dir.join(DEFAULT_CACHE_FILE), Span::call_site(), false, "the crate's default cache file")
    };
    match TuningCache::load(&path) {
        Ok(cache) => Some(Found { cache, file: Some(absolute(&path)) }),
        Err(CacheError::Missing { .. }) if !required => {
            match TuningCache::parse(sbgen::DEFAULT_CACHE, Path::new("<sbgen built-in default cache>")) {
                Ok(cache) => Some(Found { cache, file: None }),
                Err(e) => {
                    errors.at(span, e);
                    None
                }
            }
        }
        Err(e) => {
            errors.at(span, format!("{e} (the cache file comes from {from}, relative to CARGO_MANIFEST_DIR)"));
            None
        }
    }
}

/// The kernels of `spec` (one pass): the cache's entries (all buckets, or the one `lookup` picks for
/// `seq`), plus, for each arch without an entry, the spec's default schedule: as PTX when `ptx_dir`
/// (env `SBGEN_PTX_DIR` at expansion) holds it under the name `sbgen check --emit-ptx` and
/// `sbgen tune --compile-only --emit-ptx` write ([`sbgen::artifact::name`]), and always as CUDA
/// source (NVRTC at first use) for devices no PTX fits. Returns the PTX files read too (build inputs).
/// A PTX file of that name that cannot be read is an error, not a silent fallback to source.
pub fn pick(
    cache: &TuningCache,
    spec: &Spec,
    seq: Option<usize>,
    ptx_dir: Option<&Path>,
) -> Result<(Vec<Embed>, Vec<PathBuf>), String> {
    let mut out = Vec::new();
    let mut files = Vec::new();
    let mut missing_arch = false;
    for arch in Arch::ALL {
        let entries: Vec<_> = match seq {
            Some(n) => cache.lookup(arch, spec, n).into_iter().collect(),
            None => cache.entries.iter().filter(|e| e.arch == arch && e.spec == *spec).collect(),
        };
        if entries.is_empty() {
            missing_arch = true;
            if let Some(dir) = ptx_dir {
                let kernel = Kernel::new(*spec, Schedule::default_on(spec, arch), arch);
                let lowered =
                    sbgen::lower::lower(&kernel).map_err(|e| format!("lowering the default schedule: {e}"))?;
                if let Some((file, ptx)) = read_ptx(dir, &lowered).map_err(|e| format!("`SBGEN_PTX_DIR`: {e}"))? {
                    out.push(Embed {
                        arch: Some(arch),
                        seq_bucket: None,
                        name: lowered.name,
                        manifest_json: serde_json::to_string(&lowered.manifest).map_err(|e| e.to_string())?,
                        ptx: vec![(arch.compile_target().to_string(), ptx)],
                        cuda_source: None,
                    });
                    files.push(absolute(&file));
                }
            }
        }
        for e in entries {
            e.check_lowering()?;
            let manifest_json = serde_json::to_string(&e.manifest).map_err(|e| e.to_string())?;
            out.push(Embed {
                arch: Some(arch),
                seq_bucket: Some(e.seq_bucket),
                name: e.kernel_name.clone(),
                manifest_json,
                ptx: vec![(arch.compile_target().to_string(), e.ptx.clone())],
                cuda_source: None,
            });
        }
    }
    if missing_arch {
        // The kernel's source differs between arches only in a comment; sm_80's shared-memory limit
        // is the smaller, so a schedule valid there is valid on every supported device.
        // (A decode's default at head_dim 256 needs 2 warps to fit sm_80: `default_on` says so.)
        let schedule = match spec.pass {
            Pass::Decode => Schedule::default_on(spec, Arch::Sm80),
            Pass::Forward | Pass::Backward | Pass::Segment | Pass::SegmentBackward => Schedule::default_for(spec),
        };
        let kernel = Kernel::new(*spec, schedule, Arch::Sm80);
        let lowered = sbgen::lower::lower(&kernel).map_err(|e| format!("lowering the default schedule: {e}"))?;
        out.push(Embed {
            arch: None,
            seq_bucket: None,
            name: lowered.name,
            manifest_json: serde_json::to_string(&lowered.manifest).map_err(|e| e.to_string())?,
            ptx: Vec::new(),
            cuda_source: Some(lowered.cuda_source),
        });
    }
    Ok((out, files))
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::Spanned;
    use sbgen::cache::{CacheEntry, Outcome};
    use sbgen::ir::{Dtype, Layout, MmaFamily, Pass, Remainder};

    fn entry(arch: Arch, spec: Spec, seq_bucket: u32) -> CacheEntry {
        let kernel = Kernel::new(spec, Schedule::default_on(&spec, arch), arch);
        CacheEntry::untimed(kernel, seq_bucket, format!("// ptx {arch} {seq_bucket}")).unwrap()
    }

    fn cache(entries: Vec<CacheEntry>) -> TuningCache {
        TuningCache { entries, ..TuningCache::new() }
    }

    #[test]
    fn every_bucket_of_a_tuned_arch_and_source_for_the_others() {
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let other = Spec { head_dim: 64, ..spec };
        let c =
            cache(vec![entry(Arch::Sm90, spec, 1024), entry(Arch::Sm90, spec, 8192), entry(Arch::Sm90, other, 1024)]);
        let (k, _) = pick(&c, &spec, None, None).unwrap();
        assert_eq!(k.len(), 3);
        assert_eq!((k[0].arch, k[0].seq_bucket), (Some(Arch::Sm90), Some(1024)));
        assert_eq!(k[0].ptx, vec![("sm_90a".to_string(), "// ptx sm_90 1024".to_string())]);
        assert_eq!(k[1].seq_bucket, Some(8192));
        // No sm_80 entry: the default schedule as source.
        assert_eq!((k[2].arch, k[2].ptx.len()), (None, 0));
        assert!(k[2].cuda_source.as_deref().unwrap().contains(&k[2].name));
        let manifest: sbgen_runtime::KernelManifest = serde_json::from_str(&k[0].manifest_json).unwrap();
        assert_eq!(manifest.spec, spec);
    }

    #[test]
    fn seq_keeps_the_bucket_lookup_picks_and_no_fallback_when_every_arch_is_tuned() {
        let spec = Spec::new(64, Dtype::F16, Pass::Backward);
        let c = cache(vec![entry(Arch::Sm90, spec, 1024), entry(Arch::Sm90, spec, 8192), entry(Arch::Sm80, spec, 512)]);
        let (k, _) = pick(&c, &spec, Some(2000), None).unwrap();
        let got: Vec<_> = k.iter().map(|k| (k.arch, k.seq_bucket)).collect();
        assert_eq!(got, vec![(Some(Arch::Sm80), Some(512)), (Some(Arch::Sm90), Some(8192))]);
    }

    #[test]
    fn an_entry_that_no_longer_matches_the_lowering_is_refused() {
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        let mut stale = entry(Arch::Sm90, spec, 1024);
        stale.manifest.steps[0].dynamic_smem_bytes += 16;
        let err = pick(&cache(vec![stale]), &spec, None, None).err().expect("a stale entry is refused");
        assert!(err.contains("launch manifest differs") && err.contains("re-run `sbgen tune`"), "{err}");
        let mut renamed = entry(Arch::Sm90, spec, 1024);
        renamed.cuda_source_hash = "0000".to_string();
        let err = pick(&cache(vec![renamed]), &spec, None, None).err().expect("a changed source is refused");
        assert!(err.contains("CUDA source"), "{err}");
    }

    #[test]
    fn empty_cache_lowers_the_default_schedule() {
        let c = TuningCache::new();
        for pass in [Pass::Forward, Pass::Backward] {
            // 80: a head_dim padded to the tile width 96.
            for head_dim in [64, 128, 80] {
                let spec = Spec::new(head_dim, Dtype::Bf16, pass);
                let (k, _) = pick(&c, &spec, None, None).unwrap();
                assert_eq!(k.len(), 1);
                assert_eq!(k[0].name, Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm90).name());
            }
        }
    }

    /// The new spec fields reach the embedded source and manifest: THD, and the deterministic
    /// backward (its manifest's spec says so, which the launcher sizes the turn counters from).
    #[test]
    fn thd_and_deterministic_specs_lower() {
        let c = TuningCache::new();
        let thd = Spec { layout: Layout::Thd, ..Spec::new(128, Dtype::Bf16, Pass::Forward) };
        let det = Spec { layout: Layout::Thd, deterministic: true, ..Spec::new(80, Dtype::F16, Pass::Backward) };
        for spec in [thd, det] {
            let (k, _) = pick(&c, &spec, None, None).unwrap();
            let manifest: sbgen_runtime::KernelManifest = serde_json::from_str(&k[0].manifest_json).unwrap();
            assert_eq!(manifest.spec, spec);
            assert!(k[0].name.contains(&spec.slug()), "{} for {}", k[0].name, spec.slug());
            let source = k[0].cuda_source.as_deref().unwrap();
            assert!(source.contains("constexpr int LAYOUT = 2;"), "THD layout code");
            if spec.deterministic {
                assert!(source.contains("constexpr bool DETERMINISTIC = true;"));
                assert!(source.contains("constexpr int DM = 80;") && source.contains("constexpr int D = 96;"));
            }
        }
    }

    /// The shipped default cache must still lower to the same kernels (else every user of the macro
    /// without a cache of their own gets a compile error): a template change means re-tuning it
    /// (README, "Re-tuning the default cache").
    #[test]
    fn shipped_default_cache_covers_its_specs_and_matches_this_sbgen() {
        let c = TuningCache::parse(sbgen::DEFAULT_CACHE, Path::new("sbgen/default-cache.json")).unwrap();
        for e in &c.entries {
            e.check_lowering().unwrap();
            assert!(!e.ptx.is_empty(), "{} has no PTX", e.kernel_name);
            // `sbgen tune` stores no pruned candidates (tune/record.rs), and neither does this file.
            let pruned = e.candidates.iter().filter(|c| matches!(c.outcome, Outcome::Pruned { .. })).count();
            assert_eq!(pruned, 0, "{} stores {pruned} pruned candidates", e.kernel_name);
        }
        // The specs it was tuned for, all with the strict mask: BHND with a returned remainder, BNHD
        // (candle, flash-attn) with the remainder fused (the paper's models) and returned (sbgen-candle's
        // dense path), and THD with it returned (sbgen-candle's packed batches).
        let variants = [
            (Layout::Bhnd, Remainder::Return),
            (Layout::Bnhd, Remainder::Fuse),
            (Layout::Bnhd, Remainder::Return),
            (Layout::Thd, Remainder::Return),
        ];
        for pass in [Pass::Forward, Pass::Backward] {
            for dtype in [Dtype::Bf16, Dtype::F16] {
                for (head_dim, (layout, remainder)) in [64, 128].into_iter().flat_map(|d| variants.map(|v| (d, v))) {
                    let spec = Spec { layout, remainder, ..Spec::new(head_dim, dtype, pass) };
                    let (k, _) = pick(&c, &spec, None, None).unwrap();
                    let buckets: Vec<_> = k.iter().map(|k| (k.arch, k.seq_bucket)).collect();
                    assert_eq!(
                        buckets,
                        vec![(Some(Arch::Sm90), Some(2048)), (Some(Arch::Sm90), Some(8192)), (None, None)],
                        "{spec:?}"
                    );
                }
            }
        }
        // The decode: contiguous (BHND, and BNHD for sbgen-candle's SbKvCache) and paged caches,
        // returned remainder, at 8192 and 32768 cached tokens.
        for dtype in [Dtype::Bf16, Dtype::F16] {
            for head_dim in [64, 128] {
                for layout in [Layout::Bhnd, Layout::Bnhd, Layout::Paged] {
                    let spec = Spec { layout, ..Spec::new(head_dim, dtype, Pass::Decode) };
                    let (k, _) = pick(&c, &spec, None, None).unwrap();
                    let buckets: Vec<_> = k.iter().map(|k| (k.arch, k.seq_bucket)).collect();
                    assert_eq!(
                        buckets,
                        vec![(Some(Arch::Sm90), Some(8192)), (Some(Arch::Sm90), Some(32768)), (None, None)],
                        "{spec:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn default_schedule_ptx_from_the_ptx_folder() {
        let dir = std::env::temp_dir().join(format!("sbgen-macros-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = Spec::new(128, Dtype::Bf16, Pass::Backward);
        let lowered =
            sbgen::lower::lower(&Kernel::new(spec, Schedule::default_on(&spec, Arch::Sm90), Arch::Sm90)).unwrap();
        // Written under the name sbgen's `KernelBuilder::emit_ptx` and `tune --compile-only` give it.
        let file = dir.join(sbgen::artifact::name::ptx_file_name(&lowered));
        std::fs::write(&file, "// ptx").unwrap();
        let (k, files) = pick(&TuningCache::new(), &spec, None, Some(&dir)).unwrap();
        let got: Vec<_> = k.iter().map(|k| (k.arch, k.ptx.len(), k.cuda_source.is_some())).collect();
        assert_eq!(got, vec![(Some(Arch::Sm90), 1, false), (None, 0, true)]);
        assert_eq!(k[0].ptx[0], ("sm_90a".to_string(), "// ptx".to_string()));
        // sm_90a's default backward is a wgmma kernel; the portable source is `default_for`'s mma.sync one.
        assert_eq!(k[0].name, lowered.name);
        assert_eq!(Schedule::default_on(&spec, Arch::Sm90).mma, MmaFamily::Wgmma);
        assert_eq!(k[1].name, Kernel::new(spec, Schedule::default_for(&spec), Arch::Sm80).name());
        assert_eq!(files, vec![std::fs::canonicalize(&file).unwrap()]);

        // A file of that name that cannot be read is reported, not skipped.
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        let err = pick(&TuningCache::new(), &spec, None, Some(&dir)).err().expect("an unreadable PTX file is an error");
        assert!(err.contains("SBGEN_PTX_DIR") && err.contains(&file.display().to_string()), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cache_key_names_a_file_that_must_exist() {
        let dir = std::env::temp_dir().join(format!("sbgen-macros-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tuned.json");
        let spec = Spec::new(128, Dtype::Bf16, Pass::Forward);
        cache(vec![entry(Arch::Sm80, spec, 4096)]).save(&file).unwrap();

        let mut options = Options {
            cache: Some(Spanned { value: file.to_string_lossy().into_owned(), span: Span::call_site() }),
            ..Options::default()
        };
        let mut errors = Errors::default();
        let found = find_cache(&options, &mut errors).unwrap();
        assert!(errors.is_empty());
        assert_eq!(found.cache.entries.len(), 1);
        assert_eq!(found.file.as_deref(), Some(std::fs::canonicalize(&file).unwrap().as_path()));

        options.cache.as_mut().unwrap().value = dir.join("missing.json").to_string_lossy().into_owned();
        assert!(find_cache(&options, &mut errors).is_none());
        assert!(!errors.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
