//! A compiled kernel as the launcher takes it: the manifest, PTX for one or more architectures and,
//! optionally, the CUDA source to compile with NVRTC on a device none of the PTX fits. Also the
//! rule that picks the PTX for a device.

use crate::hash::Fnv64;
use crate::manifest::KernelManifest;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// One kernel, ready to load. Built by `sbgen` (lower + compile) or embedded by the macro.
/// Read-only once built: the module store keys loaded modules by name and a fingerprint of the
/// code, computed once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelBinary {
    manifest: KernelManifest,
    /// `(target, ptx)` pairs; the target is what the PTX was compiled for: `sm_90a`, `sm_80`, ...
    ptx: Vec<(String, String)>,
    /// The CUDA C++ source, compiled with NVRTC for the device's arch when no PTX fits.
    #[serde(default)]
    cuda_source: Option<String>,
    #[serde(skip)]
    fingerprint: OnceLock<u64>,
}

impl PartialEq for KernelBinary {
    fn eq(&self, other: &Self) -> bool {
        self.manifest == other.manifest && self.ptx == other.ptx && self.cuda_source == other.cuda_source
    }
}

impl Eq for KernelBinary {}

impl KernelBinary {
    pub fn new(manifest: KernelManifest, ptx: Vec<(String, String)>, cuda_source: Option<String>) -> Self {
        KernelBinary { manifest, ptx, cuda_source, fingerprint: OnceLock::new() }
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn manifest(&self) -> &KernelManifest {
        &self.manifest
    }

    /// `(target, ptx)` pairs.
    pub fn ptx(&self) -> &[(String, String)] {
        &self.ptx
    }

    pub fn cuda_source(&self) -> Option<&str> {
        self.cuda_source.as_deref()
    }

    /// A 64-bit FNV-1a hash of the manifest, every PTX and the source: two binaries of the same
    /// name from different sbgen versions (other templates, another parameter block) differ here,
    /// so one process never launches one's module with the other's manifest.
    pub fn fingerprint(&self) -> u64 {
        *self.fingerprint.get_or_init(|| {
            let mut h = Fnv64::new();
            h.write(serde_json::to_string(&self.manifest).unwrap_or_default().as_bytes());
            for (target, ptx) in &self.ptx {
                h.write(target.as_bytes());
                h.write(&[0]);
                h.write(ptx.as_bytes());
                h.write(&[0]);
            }
            // A tag byte first, so an empty source differs from none.
            match &self.cuda_source {
                Some(source) => {
                    h.write(&[1]);
                    h.write(source.as_bytes());
                }
                None => h.write(&[0]),
            }
            h.finish()
        })
    }
}

/// A compilation target parsed from `sm_XY` / `sm_XYa` / `compute_XY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub major: u32,
    pub minor: u32,
    /// `sm_90a`: architecture-specific features; runs only on exactly that compute capability.
    pub arch_specific: bool,
}

impl Target {
    pub fn parse(s: &str) -> Option<Target> {
        let rest = s.strip_prefix("sm_").or_else(|| s.strip_prefix("compute_"))?;
        let (digits, arch_specific) = match rest.strip_suffix('a') {
            Some(d) => (d, true),
            None => (rest, false),
        };
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Some(Target { major: major.parse().ok()?, minor: minor.parse().ok()?, arch_specific })
    }

    /// True when PTX for this target can be JIT-compiled and run on a device of `cc`.
    pub fn runs_on(&self, cc: (u32, u32)) -> bool {
        if self.arch_specific {
            (self.major, self.minor) == cc
        } else {
            (self.major, self.minor) <= cc
        }
    }

    /// The target for a device of compute capability `cc` when no PTX fits and its source is
    /// compiled there: `sm_90a` on 9.0 (so wgmma code compiles), `sm_XY` elsewhere. NVRTC gets its
    /// virtual arch ([`super::nvrtc::virtual_arch`]), as for sbgen's own compilations.
    pub fn for_device(cc: (u32, u32)) -> String {
        if cc == (9, 0) {
            "sm_90a".to_string()
        } else {
            format!("sm_{}{}", cc.0, cc.1)
        }
    }
}

/// The index in `ptx` of the best PTX for a device of compute capability `cc`: an exact match of
/// the compute capability first (arch-specific before generic), else the newest target below it.
pub fn pick_ptx(ptx: &[(String, String)], cc: (u32, u32)) -> Option<usize> {
    let mut best: Option<(usize, (bool, u32, u32, bool))> = None;
    for (i, (target, _)) in ptx.iter().enumerate() {
        let Some(t) = Target::parse(target) else {
            continue;
        };
        if !t.runs_on(cc) {
            continue;
        }
        let key = ((t.major, t.minor) == cc, t.major, t.minor, t.arch_specific);
        if !matches!(&best, Some((_, k)) if *k >= key) {
            best = Some((i, key));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptx(targets: &[&str]) -> Vec<(String, String)> {
        targets.iter().map(|t| (t.to_string(), String::new())).collect()
    }

    #[test]
    fn parses_targets() {
        assert_eq!(Target::parse("sm_90a"), Some(Target { major: 9, minor: 0, arch_specific: true }));
        assert_eq!(Target::parse("sm_80"), Some(Target { major: 8, minor: 0, arch_specific: false }));
        assert_eq!(Target::parse("sm_120"), Some(Target { major: 12, minor: 0, arch_specific: false }));
        assert_eq!(Target::parse("compute_86"), Some(Target { major: 8, minor: 6, arch_specific: false }));
        assert_eq!(Target::parse("sm_9"), None);
        assert_eq!(Target::parse("gfx90a"), None);
    }

    #[test]
    fn picks_the_arch_specific_ptx_on_hopper() {
        assert_eq!(pick_ptx(&ptx(&["sm_80", "sm_90a"]), (9, 0)), Some(1));
        assert_eq!(pick_ptx(&ptx(&["sm_90a", "sm_80"]), (9, 0)), Some(0));
    }

    #[test]
    fn sm_90a_ptx_does_not_run_on_other_devices() {
        assert_eq!(pick_ptx(&ptx(&["sm_90a"]), (8, 0)), None);
        assert_eq!(pick_ptx(&ptx(&["sm_90a"]), (10, 0)), None);
        assert_eq!(pick_ptx(&ptx(&["sm_90a", "sm_80"]), (10, 0)), Some(1));
    }

    #[test]
    fn generic_ptx_runs_on_newer_devices() {
        assert_eq!(pick_ptx(&ptx(&["sm_80"]), (8, 6)), Some(0));
        assert_eq!(pick_ptx(&ptx(&["sm_80"]), (9, 0)), Some(0));
        assert_eq!(pick_ptx(&ptx(&["sm_80"]), (7, 5)), None);
        assert_eq!(pick_ptx(&ptx(&["sm_80", "sm_86"]), (8, 9)), Some(1));
        assert_eq!(pick_ptx(&ptx(&["sm_86", "sm_80"]), (8, 0)), Some(1));
    }

    #[test]
    fn the_fingerprint_tells_apart_same_named_binaries_with_other_code() {
        let manifest: KernelManifest = serde_json::from_str(
            r#"{"name":"sb_fwd_x","spec":{"head_dim":128,"dtype":"bf16","mask":"strict","layout":"bhnd","remainder":"return","pass":"forward"},"block_m":64,"block_n":64,"steps":[]}"#,
        )
        .unwrap();
        let a = KernelBinary::new(manifest.clone(), ptx(&["sm_90a"]), Some("src".into()));
        let same = KernelBinary::new(manifest.clone(), ptx(&["sm_90a"]), Some("src".into()));
        assert_eq!(a.fingerprint(), same.fingerprint());
        assert_eq!(a, same);
        let others = [
            KernelBinary::new(manifest.clone(), vec![("sm_90a".into(), "x".into())], Some("src".into())),
            KernelBinary::new(manifest.clone(), ptx(&["sm_80"]), Some("src".into())),
            KernelBinary::new(manifest.clone(), ptx(&["sm_90a"]), Some("src2".into())),
            KernelBinary::new(manifest.clone(), ptx(&["sm_90a"]), None),
            KernelBinary::new(manifest.clone(), ptx(&["sm_90a"]), Some(String::new())),
            KernelBinary::new(KernelManifest { block_n: 32, ..manifest }, ptx(&["sm_90a"]), Some("src".into())),
        ];
        for other in &others {
            assert_eq!(other.name(), a.name());
            assert_ne!(other.fingerprint(), a.fingerprint(), "{other:?}");
        }
        // A deserialized binary computes its own fingerprint (the cached one is not serialized).
        let back: KernelBinary = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(back.fingerprint(), a.fingerprint());
    }

    #[test]
    fn nvrtc_target_for_devices() {
        assert_eq!(Target::for_device((9, 0)), "sm_90a");
        assert_eq!(Target::for_device((8, 6)), "sm_86");
    }
}
