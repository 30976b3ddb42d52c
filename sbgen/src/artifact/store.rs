//! Where artifacts are written: [`PtxDir`], a folder of PTX files named so that a `KernelBuilder`
//! on the folder finds them (`--emit-ptx`, `--ptx-dir`), and [`ScratchDir`], the folder `sbgen tune`
//! compiles into when it has a toolchain, removed when the run ends.

use super::name::ptx_file_name;
use super::{Artifact, Verdict};
use crate::files::{self, FileError};
use std::path::{Path, PathBuf};

/// Why an artifact was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Only a kernel that compiled without spilling is written ([`Verdict::Ok`]).
    #[error("`{kernel}` is not written: {why}")]
    Refused { kernel: String, why: &'static str },
    /// Creating a folder or writing a file failed.
    #[error(transparent)]
    File(#[from] FileError),
}

/// A folder of PTX files, created on the first write.
#[derive(Clone, Debug)]
pub struct PtxDir {
    path: PathBuf,
}

impl PtxDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        PtxDir { path: path.into() }
    }

    /// The folder at `path`, created now (with its parents) and probed for a new file, so that a
    /// path that cannot hold PTX is reported before anything is compiled.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self, FileError> {
        let path = path.into();
        std::fs::create_dir_all(&path).map_err(|source| FileError::Io {
            action: "create",
            path: path.clone(),
            source,
        })?;
        files::check_output(&path.join("probe.ptx"), &[])?;
        Ok(PtxDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the artifact's PTX atomically (a reader never sees part of a file) under its
    /// source-hashed name, if its verdict is [`Verdict::Ok`]. Returns the file's path.
    pub fn write(&self, artifact: &Artifact) -> Result<PathBuf, StoreError> {
        let kernel = || artifact.lowered.name.clone();
        let compiled = match (&artifact.verdict, &artifact.compiled) {
            (Verdict::Ok, Some(c)) => c,
            (Verdict::Spill { .. }, _) => return Err(StoreError::Refused { kernel: kernel(), why: "it spills" }),
            _ => return Err(StoreError::Refused { kernel: kernel(), why: "it did not compile" }),
        };
        std::fs::create_dir_all(&self.path).map_err(|source| FileError::Io {
            action: "create",
            path: self.path.clone(),
            source,
        })?;
        let path = self.path.join(ptx_file_name(&artifact.lowered));
        files::write_atomic(&path, compiled.ptx.as_bytes())?;
        Ok(path)
    }

    /// Whether the folder already holds the PTX of `lowered`.
    pub fn contains(&self, lowered: &crate::lower::Lowered) -> bool {
        self.path.join(ptx_file_name(lowered)).is_file()
    }
}

/// A scratch folder under the temp dir that this process created itself (`create_dir` fails on an
/// existing path, so no other user's folder or link is reused), removed when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn create() -> Result<Self, StoreError> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let mut attempt = 0;
        loop {
            let path = std::env::temp_dir().join(format!("sbgen-tune-{}-{nanos:x}-{attempt}", std::process::id()));
            // `create_dir` (not `_all`) fails when the path exists: the folder is ours alone.
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(ScratchDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 15 => attempt += 1,
                Err(source) => return Err(FileError::Io { action: "create the scratch folder", path, source }.into()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{CompileError, Compiled};
    use crate::ir::{Arch, Dtype, Kernel, Pass, Schedule, Spec};
    use crate::lower::lower;

    fn artifact(verdict: Verdict) -> Artifact {
        let kernel = Kernel::new(Spec::new(64, Dtype::Bf16, Pass::Forward), Schedule::DEFAULT, Arch::Sm90);
        let lowered = lower(&kernel).unwrap();
        let compiled = (!matches!(verdict, Verdict::Error(_))).then(|| Compiled {
            name: lowered.name.clone(),
            target: "sm_90a",
            ptx: ".entry x".into(),
            cubin: Vec::new(),
            functions: Vec::new(),
            ptxas_log: String::new(),
        });
        Artifact { lowered, compiled, verdict }
    }

    fn files(dir: &Path) -> Vec<String> {
        match std::fs::read_dir(dir) {
            Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
            Err(_) => Vec::new(),
        }
    }

    #[test]
    fn only_an_ok_verdict_is_written_under_its_hashed_name() {
        let scratch = ScratchDir::create().unwrap();
        let dir = PtxDir::new(scratch.path().join("ptx"));
        let spill = dir.write(&artifact(Verdict::Spill { bytes: 12 })).unwrap_err();
        assert!(matches!(spill, StoreError::Refused { why: "it spills", .. }), "{spill}");
        let error = Verdict::Error(CompileError::Panicked { kernel: "k".into(), message: "x".into() });
        assert!(matches!(dir.write(&artifact(error)), Err(StoreError::Refused { .. })));
        assert!(files(dir.path()).is_empty(), "a refused artifact left a file");

        let ok = artifact(Verdict::Ok);
        assert!(!dir.contains(&ok.lowered));
        let path = dir.write(&ok).unwrap();
        assert_eq!(path, dir.path().join(ptx_file_name(&ok.lowered)));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), ".entry x");
        assert!(dir.contains(&ok.lowered));
        assert_eq!(files(dir.path()).len(), 1, "no temp file is left");
    }

    #[test]
    fn scratch_folders_are_distinct_and_removed_on_drop() {
        let (a, b) = (ScratchDir::create().unwrap(), ScratchDir::create().unwrap());
        assert_ne!(a.path, b.path);
        assert!(a.path.is_dir() && b.path.is_dir());
        std::fs::write(a.path.join("x.ptx"), "x").unwrap();
        let path = a.path.clone();
        drop(a);
        assert!(!path.exists(), "a scratch folder outlived its run");
    }
}
