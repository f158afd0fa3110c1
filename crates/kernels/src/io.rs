//! Files written and read with the care a training run needs: a file is replaced atomically and
//! durably (never half-written under its final name, whatever fails), and a checkpoint is read
//! through a read-only memory map, tensor by tensor from the page cache, so loading never holds a
//! second copy of the weights.

use std::fs::File;
use std::io::Write;
use std::path::Path;

pub use memmap2::Mmap;

/// The suffix of the temporary sibling [`write_atomic`] writes first.
pub const PARTIAL_SUFFIX: &str = "partial";

/// Writes `path` via a temporary sibling (`path` with the extension [`PARTIAL_SUFFIX`]), an fsync
/// and a rename, then fsyncs the directory: after `Ok`, `path` holds `bytes` durably; after `Err`,
/// `path` is untouched (its previous content, or absent) and the temporary file is removed (on a
/// full disk it holds the space the user needs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(PARTIAL_SUFFIX);
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// [`write_atomic`] for a file too large to hold in memory: `fill` writes the content through a
/// buffered writer, in as many pieces as it likes, to the temporary sibling; then fsync, rename and
/// directory fsync as [`write_atomic`]. After `Err` (from `fill` or the file system) `path` is
/// untouched and the temporary file is removed.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let tmp = path.with_extension(PARTIAL_SUFFIX);
    let written = File::create(&tmp).and_then(|f| {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        fill(&mut w)?;
        let f = w
            .into_inner()
            .map_err(std::io::IntoInnerError::into_error)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// Makes a rename or file creation in `dir` durable. Best effort: some file systems refuse to
/// fsync a directory, and the file's data is already synced.
pub fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Whether `e` says the file system is out of space: ENOSPC, a disk quota (EDQUOT) or the
/// file-size limit (EFBIG). Each leaves nothing to do but free space or write elsewhere.
pub fn is_storage_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge
    )
}

/// Maps `file` read-only.
///
/// The map's bytes would change if another process wrote the file while it is mapped; this
/// project writes every file it produces with [`write_atomic`] (a new file, then a rename), so a
/// file being loaded is never rewritten in place by it.
pub fn map_readonly(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only and lives as long as the `Mmap` returned; the one hazard, the
    // file changing under the map, is documented above and never caused by this project.
    unsafe { Mmap::map(file) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_atomically_and_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // A path whose parent is a file cannot be written: the error comes back, nothing is left.
        let blocked = path.join("child.json");
        assert!(write_atomic(&blocked, b"x").is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        let map = map_readonly(&File::open(&path).unwrap()).unwrap();
        assert_eq!(&map[..], b"two");
    }

    #[test]
    fn streamed_write_is_atomic_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        write_atomic_with(&path, |w| {
            w.write_all(b"GG")?;
            w.write_all(b"UF")
        })
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"GGUF");
        // A failure halfway leaves the previous file and no temporary one.
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("conversion failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "conversion failed");
        assert_eq!(std::fs::read(&path).unwrap(), b"GGUF");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
