//! A real small file system for the disk-full tests (the trainer's and the command line's), and
//! what those tests look at on it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a fresh temporary directory; unmounted on drop (also when a test fails).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after saying why) when mounting is not possible here; under `CI=true` that fails.
    pub fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            r => {
                let why = match r {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                if crate::ci() {
                    panic!("CI=true but `mount -t tmpfs` failed ({why}); the disk-full tests need root");
                }
                eprintln!("skipping: cannot mount a tmpfs ({why}); the disk-full tests need root");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Grows the file system in place, keeping its files (the user freeing space).
    pub fn resize(&self, bytes: u64) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(self.path())
            .status()
            .unwrap();
        assert!(ok.success(), "remount of {} failed", self.path().display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(self.dir.path()).status();
        if !ok.is_ok_and(|s| s.success()) {
            eprintln!("could not unmount {}", self.dir.path().display());
        }
    }
}

/// Every path under `dir`.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// The system's memory page size (a tmpfs allocates whole pages).
pub fn page_size() -> u64 {
    Command::new("getconf")
        .arg("PAGESIZE")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(4096)
}

/// Pages the files at `path` (a file, or every file under a directory) take on a tmpfs.
pub fn pages(path: &Path, page: u64) -> u64 {
    let files = if path.is_dir() {
        walk(path)
    } else {
        vec![path.to_path_buf()]
    };
    files
        .iter()
        .filter(|p| p.is_file())
        .map(|p| p.metadata().unwrap().len().div_ceil(page))
        .sum()
}

/// Asserts that nothing under `dir` is a partial or temporary file or directory (a name starting
/// with `.` or ending in `tmp-partial`) left by an interrupted write.
pub fn assert_no_partial_files(dir: &Path) {
    for p in walk(dir) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.') && !name.ends_with(".partial"),
            "partial file or directory left behind: {}",
            p.display()
        );
    }
}
