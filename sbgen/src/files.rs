//! Files sbgen writes, written without losing data: an output path checked before any work
//! ([`check_output`]), an atomic replace that follows symlinks and keeps the file's mode
//! ([`write_atomic`]), and an advisory lock for read-modify-write cycles ([`lock`]).
//!
//! std, thiserror and fs4 only (no CUDA, no CLI): the tuning cache uses this without feature `cli`.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a file could not be checked, locked or written. Every message names the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    #[error("cannot {action} `{}`: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` is the input `{}`: writing it would replace the input; choose another output file", .path.display(), .input.display())]
    IsInput { path: PathBuf, input: PathBuf },
    #[error("the folder of `{}` does not exist (`{}`): create it first", .path.display(), .folder.display())]
    NoFolder { path: PathBuf, folder: PathBuf },
    #[error("`{}` is a folder: give a file name", .path.display())]
    IsFolder { path: PathBuf },
    #[error("`{}` is not a regular file (a folder, device, pipe or socket)", .path.display())]
    NotRegular { path: PathBuf },
    #[error("cannot write in the folder `{}` of `{}`: {source}", .folder.display(), .path.display())]
    Unwritable {
        path: PathBuf,
        folder: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    /// Whether the user can fix this by choosing or repairing the path (everything but an I/O
    /// failure of the system itself): the CLI reports these as usage errors (exit 2).
    pub fn is_users_to_fix(&self) -> bool {
        !matches!(self, FileError::Io { .. })
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError::Io { action, path, source }
}

/// The folder `path` is in (`.` for a bare file name).
fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The file `path` names once symlinks are followed (itself when it is not a link). A dangling link
/// resolves to where it points, so that writing creates the target instead of replacing the link.
pub fn resolve(path: &Path) -> Result<PathBuf, FileError> {
    let mut path = path.to_path_buf();
    // Bounded like the kernel's own limit on link chains (ELOOP).
    for _ in 0..40 {
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&path).map_err(io("read the link", &path))?;
                path = folder_of(&path).join(target);
            }
            _ => return Ok(path),
        }
    }
    Err(FileError::Io {
        action: "follow the links of",
        path,
        source: std::io::Error::other("too many levels of symbolic links"),
    })
}

/// The canonical form of `path`, which need not exist yet (its folder must): two paths naming the
/// same file compare equal.
fn canonical(path: &Path) -> Result<PathBuf, FileError> {
    if path.exists() {
        return std::fs::canonicalize(path).map_err(io("resolve", path));
    }
    let target = resolve(path)?;
    let folder = folder_of(&target);
    let name = target.file_name().ok_or_else(|| FileError::IsFolder { path: path.to_path_buf() })?;
    let folder = std::fs::canonicalize(&folder)
        .map_err(|_| FileError::NoFolder { path: path.to_path_buf(), folder: folder.clone() })?;
    Ok(folder.join(name))
}

/// Checks, before any work is spent, that `path` can be written as a whole file by
/// [`write_atomic`]: it is none of `inputs`, not a folder or other non-regular file, and its folder
/// exists and lets a file be created (probed by creating and removing one).
pub fn check_output(path: &Path, inputs: &[&Path]) -> Result<(), FileError> {
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR) {
        return Err(FileError::IsFolder { path: path.to_path_buf() });
    }
    let target = resolve(path)?;
    let folder = folder_of(&target);
    if !folder.is_dir() {
        return Err(FileError::NoFolder { path: path.to_path_buf(), folder });
    }
    let out = canonical(path)?;
    for input in inputs {
        if canonical(input).is_ok_and(|i| i == out) || same_file(input, path) {
            return Err(FileError::IsInput { path: path.to_path_buf(), input: input.to_path_buf() });
        }
    }
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => return Err(FileError::NotRegular { path: path.to_path_buf() }),
        _ => {}
    }
    let probe = temp_name(&folder, &target);
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(source) => Err(FileError::Unwritable { path: path.to_path_buf(), folder, source }),
    }
}

/// Hard links to one file have different canonical paths; the file system's identity tells.
#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &Path, _: &Path) -> bool {
    false
}

/// A fresh hidden name next to `target` in `folder`: `.<file>.tmp-<pid>-<n>`.
fn temp_name(folder: &Path, target: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    folder.join(format!(".{file_name}.tmp-{}-{n}", std::process::id()))
}

/// Writes `bytes` to `path` through a temp file next to it: write, fsync, rename, fsync the folder.
/// Readers see the old file or the new one, never a part; the temp file is removed on any error.
/// A symlink is followed (the file it points to is replaced, the link stays) and an existing file's
/// permission bits are kept.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let target = resolve(path)?;
    let folder = folder_of(&target);
    let tmp = temp_name(&folder, &target);
    let permissions = std::fs::metadata(&target).ok().filter(|m| m.is_file()).map(|m| m.permissions());
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        if let Some(p) = permissions {
            f.set_permissions(p).map_err(io("set the permissions of", &tmp))?;
        }
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, &target).map_err(io("replace", &target))?;
        // Make the rename durable; not every filesystem lets a folder be opened, so failures are ignored.
        if let Ok(d) = std::fs::File::open(&folder) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An exclusive advisory lock, held until dropped.
#[derive(Debug)]
pub struct FileLock {
    // Closing the file releases the lock.
    _file: std::fs::File,
}

/// Takes an exclusive advisory lock on `<path>.lock` (after following symlinks, so every name of
/// one file shares its lock), waiting for another holder to finish. The sidecar file stays: removing
/// it would let a waiter lock a file a newcomer no longer sees.
pub fn lock(path: &Path) -> Result<FileLock, FileError> {
    let target = resolve(path)?;
    let mut name = target.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    let lock_path = folder_of(&target).join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io("create the lock file", &lock_path))?;
    fs4::FileExt::lock(&file).map_err(io("lock", &lock_path))?;
    Ok(FileLock { _file: file })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh, empty folder under the temp dir, unique per test name and process.
    pub(crate) fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sbgen-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The temp files [`write_atomic`] left in `dir`.
    pub(crate) fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file_and_names_the_file() {
        let dir = scratch("failed");
        let blocked = dir.join("blocked.json");
        std::fs::create_dir_all(&blocked).unwrap();
        let err = write_atomic(&blocked, b"{}").unwrap_err().to_string();
        assert!(err.contains("blocked.json"), "{err}");
        assert_eq!(leftovers(&dir), Vec::<String>::new());
    }

    #[test]
    fn the_output_check_refuses_the_input_a_folder_a_missing_folder_and_a_device() {
        let dir = scratch("check");
        let input = dir.join("in.safetensors");
        std::fs::write(&input, b"x").unwrap();
        let fresh = dir.join("out.safetensors");
        check_output(&fresh, &[&input]).unwrap();
        assert!(!fresh.exists() && leftovers(&dir).is_empty(), "the probe is removed");
        // The same file under other spellings.
        let dotted = dir.join(".").join("in.safetensors");
        for same in [input.clone(), dotted] {
            assert!(matches!(check_output(&same, &[&input]), Err(FileError::IsInput { .. })), "{same:?}");
        }
        #[cfg(unix)]
        {
            let link = dir.join("link.safetensors");
            std::os::unix::fs::symlink(&input, &link).unwrap();
            assert!(matches!(check_output(&link, &[&input]), Err(FileError::IsInput { .. })));
            let hard = dir.join("hard.safetensors");
            std::fs::hard_link(&input, &hard).unwrap();
            assert!(matches!(check_output(&hard, &[&input]), Err(FileError::IsInput { .. })));
        }
        assert!(matches!(check_output(&dir, &[]), Err(FileError::IsFolder { .. })));
        let missing = dir.join("nowhere").join("out.safetensors");
        let err = check_output(&missing, &[]).unwrap_err();
        assert!(matches!(err, FileError::NoFolder { .. }), "{err:?}");
        assert!(err.to_string().contains("nowhere"), "{err}");
        if Path::new("/dev/null").exists() {
            assert!(matches!(check_output(Path::new("/dev/null"), &[]), Err(FileError::NotRegular { .. })));
        }
        // A folder no file can be created in, even by root.
        if Path::new("/proc/self").is_dir() {
            let err = check_output(Path::new("/proc/sbgen-out.json"), &[]).unwrap_err();
            assert!(matches!(err, FileError::Unwritable { .. }), "{err:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn writing_through_a_symlink_replaces_the_target_and_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("write-through-symlink");
        std::fs::create_dir_all(dir.join("real")).unwrap();
        let target = dir.join("real").join("cache.json");
        std::fs::write(&target, b"old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.join("cache.json");
        std::os::unix::fs::symlink(Path::new("real").join("cache.json"), &link).unwrap();
        write_atomic(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o640);
        assert!(leftovers(&dir).is_empty() && leftovers(&dir.join("real")).is_empty());
    }

    #[test]
    fn the_lock_excludes_a_second_holder_until_dropped() {
        let dir = scratch("lock");
        let path = dir.join("cache.json");
        let held = lock(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _second = lock(&path).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "the second lock waits");
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the second lock is taken once the first is gone");
        waiter.join().unwrap();
        assert!(dir.join("cache.json.lock").exists());
    }
}
