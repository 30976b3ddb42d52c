//! Kernels embedded in a user's crate by `#[stick_breaking_attention]`: static tables of manifests
//! (as JSON), PTX per arch and CUDA source, turned into [`KernelBinary`]s once, and the rule that
//! picks one for a device and a sequence length.
//!
//! The macro emits one [`EmbeddedKernel`] per cache entry (a tuned schedule for one arch and one
//! sequence-length bucket) plus, when the cache has no entry for some arch, a fallback: the spec's
//! default schedule as CUDA source only, NVRTC-compiled at first use.

use super::binary::{pick_ptx, KernelBinary, Target};
use super::error::LaunchError;
use crate::bucket;
use crate::manifest::KernelManifest;
use std::sync::OnceLock;

/// One kernel as the macro writes it: everything `'static`, nothing parsed yet.
#[derive(Debug)]
pub struct EmbeddedKernel {
    /// The arch the entry was tuned on (`sm_90`, `sm_80`), or `None` for the default-schedule
    /// fallback that carries source only.
    pub arch: Option<&'static str>,
    /// The largest sequence length of the entry's bucket (`None`: any length).
    pub seq_bucket: Option<u64>,
    /// The [`KernelManifest`] as JSON.
    pub manifest_json: &'static str,
    /// `(target, ptx)` pairs, e.g. `("sm_90a", "...")`.
    pub ptx: &'static [(&'static str, &'static str)],
    pub cuda_source: Option<&'static str>,
}

impl EmbeddedKernel {
    /// The launcher's form of this kernel. A manifest that does not parse (an sbgen-runtime other
    /// than the one the macro expanded against) is a [`LaunchError::Manifest`].
    pub fn to_binary(&self) -> Result<KernelBinary, LaunchError> {
        let manifest: KernelManifest = serde_json::from_str(self.manifest_json).map_err(|e| LaunchError::Manifest {
            kernel: format!("embedded kernel for {}", self.arch.unwrap_or("any arch")),
            reason: format!(
                "the embedded manifest does not parse ({e}); rebuild the crate with matching sbgen versions"
            ),
        })?;
        Ok(KernelBinary::new(
            manifest,
            self.ptx.iter().map(|(t, p)| (t.to_string(), p.to_string())).collect(),
            self.cuda_source.map(str::to_string),
        ))
    }
}

/// The kernels of one pass of one `#[stick_breaking_attention]` struct, parsed on first use.
#[derive(Debug)]
pub struct EmbeddedSet {
    /// The struct's name, for error messages.
    pub owner: &'static str,
    pub kernels: &'static [EmbeddedKernel],
    /// The parsed kernels, or why they do not parse (kept as the error's kernel and reason).
    parsed: OnceLock<Result<Vec<KernelBinary>, (String, String)>>,
}

impl EmbeddedSet {
    pub const fn new(owner: &'static str, kernels: &'static [EmbeddedKernel]) -> Self {
        EmbeddedSet { owner, kernels, parsed: OnceLock::new() }
    }

    /// Every kernel in the launcher's form, parsed once.
    pub fn binaries(&self) -> Result<&[KernelBinary], LaunchError> {
        let parsed = self.parsed.get_or_init(|| {
            self.kernels.iter().map(EmbeddedKernel::to_binary).collect::<Result<Vec<_>, _>>().map_err(|e| match e {
                LaunchError::Manifest { kernel, reason } => (kernel, reason),
                other => (self.owner.to_string(), other.to_string()),
            })
        });
        match parsed {
            Ok(binaries) => Ok(binaries),
            Err((kernel, reason)) => Err(LaunchError::Manifest { kernel: kernel.clone(), reason: reason.clone() }),
        }
    }

    /// The kernel for a device of compute capability `cc` and sequence length `seq`
    /// (see [`pick_embedded`]).
    pub fn pick(&self, cc: (u32, u32), seq: usize) -> Result<&KernelBinary, LaunchError> {
        match pick_embedded(self.kernels, cc, seq) {
            Some(i) => Ok(&self.binaries()?[i]),
            None => Err(LaunchError::NoKernelForArch {
                kernel: self.owner.to_string(),
                device_arch: Target::for_device(cc),
                available: self
                    .kernels
                    .iter()
                    .flat_map(|k| k.ptx.iter().map(|(t, _)| *t))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// Which embedded kernel runs on a device of compute capability `cc` for sequence length `seq`:
///
/// 1. tuned kernels with PTX for exactly this compute capability; else
/// 2. the default-schedule fallback (CUDA source, compiled by NVRTC for the device); else
/// 3. tuned kernels with PTX that runs on the device (older generic targets).
///
/// Among the kernels of the first non-empty group, the tuning cache's rule ([`bucket::pick`]): the
/// nearest bucket at or above `seq`'s, else the largest (a kernel without a bucket holds every length).
pub fn pick_embedded(kernels: &[EmbeddedKernel], cc: (u32, u32), seq: usize) -> Option<usize> {
    let exact = |k: &EmbeddedKernel| {
        k.ptx.iter().any(|(t, _)| Target::parse(t).is_some_and(|t| t.runs_on(cc) && (t.major, t.minor) == cc))
    };
    let fallback = |k: &EmbeddedKernel| k.ptx.is_empty() && k.cuda_source.is_some();
    let runs = |k: &EmbeddedKernel| {
        let ptx: Vec<(String, String)> = k.ptx.iter().map(|(t, _)| (t.to_string(), String::new())).collect();
        pick_ptx(&ptx, cc).is_some()
    };
    let groups: [&dyn Fn(&EmbeddedKernel) -> bool; 3] = [&exact, &fallback, &runs];
    for group in groups {
        let members: Vec<usize> = (0..kernels.len()).filter(|&i| group(&kernels[i])).collect();
        if members.is_empty() {
            continue;
        }
        return bucket::pick(members.into_iter().map(|i| (i, kernels[i].seq_bucket.unwrap_or(u64::MAX))), seq);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{"name":"sb_fwd_x","spec":{"head_dim":128,"dtype":"bf16","mask":"strict","layout":"bhnd","remainder":"return","pass":"forward"},"block_m":64,"block_n":64,"steps":[]}"#;

    const fn tuned(target: &'static str, bucket: u64) -> EmbeddedKernel {
        const fn ptx(target: &'static str) -> &'static [(&'static str, &'static str)] {
            match target.as_bytes() {
                b"sm_90a" => &[("sm_90a", "")],
                _ => &[("sm_80", "")],
            }
        }
        EmbeddedKernel {
            arch: Some(target),
            seq_bucket: Some(bucket),
            manifest_json: MANIFEST,
            ptx: ptx(target),
            cuda_source: None,
        }
    }

    const FALLBACK: EmbeddedKernel =
        EmbeddedKernel { arch: None, seq_bucket: None, manifest_json: MANIFEST, ptx: &[], cuda_source: Some("") };

    #[test]
    fn exact_arch_then_bucket_holding_the_length() {
        let ks = [tuned("sm_90a", 1024), tuned("sm_90a", 8192), tuned("sm_80", 1024), FALLBACK];
        assert_eq!(pick_embedded(&ks, (9, 0), 512), Some(0));
        assert_eq!(pick_embedded(&ks, (9, 0), 1024), Some(0));
        assert_eq!(pick_embedded(&ks, (9, 0), 1025), Some(1));
        // Longer than every bucket: the largest.
        assert_eq!(pick_embedded(&ks, (9, 0), 100_000), Some(1));
        assert_eq!(pick_embedded(&ks, (8, 0), 100_000), Some(2));
    }

    /// The bucket rule is the tuning cache's: `bucket::pick`, which `TuningCache::lookup` calls too.
    #[test]
    fn within_a_group_the_bucket_is_the_one_bucket_pick_takes() {
        let ks = [tuned("sm_90a", 8192), tuned("sm_90a", 2048), tuned("sm_90a", 1 << 31), tuned("sm_80", 64)];
        for seq in [0, 1, 2047, 2048, 2049, 8193, 1 << 31, usize::MAX] {
            let sm90 = ks.iter().enumerate().filter(|(_, k)| k.arch == Some("sm_90a"));
            let want = bucket::pick(sm90.map(|(i, k)| (i, k.seq_bucket.unwrap())), seq);
            assert_eq!(pick_embedded(&ks, (9, 0), seq), want, "seq {seq}");
        }
    }

    #[test]
    fn fallback_source_before_older_ptx() {
        let ks = [tuned("sm_80", 1024), FALLBACK];
        assert_eq!(pick_embedded(&ks, (8, 6), 64), Some(1));
        assert_eq!(pick_embedded(&ks[..1], (8, 6), 64), Some(0));
        assert_eq!(pick_embedded(&ks[..1], (7, 5), 64), None);
        // sm_90a PTX never runs on a 10.0 device; the source does.
        let ks = [tuned("sm_90a", 1024), FALLBACK];
        assert_eq!(pick_embedded(&ks, (10, 0), 64), Some(1));
    }

    #[test]
    fn parses_the_manifest_once() {
        static KS: [EmbeddedKernel; 1] = [FALLBACK];
        static SET: EmbeddedSet = EmbeddedSet::new("SbAttn", &KS);
        let a = SET.pick((9, 0), 10).unwrap() as *const KernelBinary;
        let b = SET.pick((9, 0), 20).unwrap() as *const KernelBinary;
        assert_eq!(a, b);
        assert_eq!(SET.binaries().unwrap()[0].manifest().name, "sb_fwd_x");
    }
}
