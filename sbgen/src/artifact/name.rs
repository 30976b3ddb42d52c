//! PTX file names: `<kernel name>-<source hash>.<target>.ptx`, with the 16 hex digits of the CUDA
//! source's FNV-1a hash, so a file made from other templates is never taken for a kernel of the same
//! name. The one rule by which `sbgen tune --compile-only --emit-ptx` and `sbgen check --emit-ptx`
//! write PTX, `--ptx-dir` finds it and `#[stick_breaking_attention]` embeds it. No feature gate: the
//! macro builds sbgen without `cli`.

use crate::files::FileError;
use crate::lower::Lowered;
use sbgen_runtime::hash::source_hash;
use std::path::{Path, PathBuf};

/// `<name>-<source hash>.<target>.ptx`.
pub fn ptx_file_name(lowered: &Lowered) -> String {
    format!("{}-{}.{}.ptx", lowered.name, source_hash(&lowered.cuda_source), lowered.kernel.arch.compile_target())
}

/// The PTX of `lowered` in `dir` and the file it came from, or `None` when `dir` has no such file;
/// a file that exists but cannot be read is an error.
pub fn read_ptx(dir: &Path, lowered: &Lowered) -> Result<Option<(PathBuf, String)>, FileError> {
    let path = dir.join(ptx_file_name(lowered));
    match std::fs::read_to_string(&path) {
        Ok(ptx) => Ok(Some((path, ptx))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FileError::Io { action: "read", path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};
    use crate::lower::lower;

    fn lowered(arch: Arch) -> Lowered {
        lower(&Kernel::new(Spec::new(64, Dtype::Bf16, Pass::Forward), Schedule::DEFAULT, arch)).unwrap()
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sbgen-name-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn ptx_file_names_carry_the_source_hash_and_target() {
        let lowered = lowered(Arch::Sm90);
        let name = ptx_file_name(&lowered);
        assert_eq!(name, format!("{}-{}.sm_90a.ptx", lowered.name, source_hash(&lowered.cuda_source)));
        assert_eq!(name.len(), lowered.name.len() + 1 + 16 + ".sm_90a.ptx".len(), "{name}");
        let mut other = lowered.clone();
        other.cuda_source.push(' ');
        assert_ne!(ptx_file_name(&other), name);
        assert!(ptx_file_name(&self::lowered(Arch::Sm80)).ends_with(".sm_80.ptx"));
    }

    #[test]
    fn reads_the_file_of_that_name_and_only_that_one() {
        let dir = scratch("read");
        let (sm90, sm80) = (lowered(Arch::Sm90), lowered(Arch::Sm80));
        assert!(read_ptx(&dir, &sm90).unwrap().is_none());
        std::fs::write(dir.join(ptx_file_name(&sm90)), "// ptx").unwrap();
        let (path, ptx) = read_ptx(&dir, &sm90).unwrap().unwrap();
        assert_eq!((path, ptx.as_str()), (dir.join(ptx_file_name(&sm90)), "// ptx"));
        assert!(read_ptx(&dir, &sm80).unwrap().is_none(), "another target's file is not taken");
        let mut edited = sm90.clone();
        edited.cuda_source.push(' ');
        assert!(read_ptx(&dir, &edited).unwrap().is_none(), "another source's file is not taken");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_read_is_an_error_naming_it() {
        let dir = scratch("unreadable");
        let lowered = lowered(Arch::Sm90);
        std::fs::create_dir(dir.join(ptx_file_name(&lowered))).unwrap();
        let err = read_ptx(&dir, &lowered).unwrap_err();
        assert!(err.to_string().contains(&ptx_file_name(&lowered)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
