//! One file over HTTP into a cache: resumed from the bytes already on disk, checked against the
//! size and digest the hub gave, and moved under its final name only when complete and correct.
//!
//! Like `huggingface_hub`, the bytes go to a partial file beside the final one (`<blob>.incomplete`
//! for the Hugging Face cache), a later run continues it with an HTTP `Range` request, and the final
//! name appears by one rename. Unlike `huggingface_hub` the digest is checked before that rename: the
//! SHA-256 of an LFS file (its ETag), the git blob SHA-1 of a small file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use crate::error::HubError;
use crate::progress::Bar;

/// How many times a dropped connection is resumed within one run before giving up.
const ATTEMPTS: usize = 4;

/// The digest a file must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Digest {
    /// Hex SHA-256 of the content (the hub's ETag of an LFS file; ModelScope's `Sha256`).
    Sha256(String),
    /// Hex SHA-1 of `blob {size}\0` + content: the git object id (the hub's ETag of a small file).
    GitSha1(String),
}

impl Digest {
    /// The digest an ETag stands for: 64 hex digits are a SHA-256, 40 a git blob id.
    pub(crate) fn from_etag(etag: &str) -> Option<Digest> {
        let hex = etag
            .trim_matches('"')
            .trim_start_matches("W/")
            .trim_matches('"');
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        match hex.len() {
            64 => Some(Digest::Sha256(hex.to_ascii_lowercase())),
            40 => Some(Digest::GitSha1(hex.to_ascii_lowercase())),
            _ => None,
        }
    }
}

enum Hasher {
    Sha256(Sha256),
    GitSha1(Sha1),
    None,
}

impl Hasher {
    fn new(digest: Option<&Digest>, size: Option<u64>) -> Hasher {
        match (digest, size) {
            (Some(Digest::Sha256(_)), _) => Hasher::Sha256(Sha256::new()),
            (Some(Digest::GitSha1(_)), Some(size)) => {
                let mut h = Sha1::new();
                h.update(format!("blob {size}\0").as_bytes());
                Hasher::GitSha1(h)
            }
            _ => Hasher::None,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::GitSha1(h) => h.update(bytes),
            Hasher::None => {}
        }
    }

    fn hex(self) -> Option<String> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        match self {
            Hasher::Sha256(h) => Some(hex(&h.finalize())),
            Hasher::GitSha1(h) => Some(hex(&h.finalize())),
            Hasher::None => None,
        }
    }
}

/// One download: where from, what it must be, and how to name it in messages.
pub(crate) struct Transfer<'a> {
    pub agent: &'a ureq::Agent,
    pub url: String,
    /// `Authorization` header value (`Bearer …`), sent to the hub and not across redirects.
    pub auth: Option<&'a str>,
    pub size: Option<u64>,
    pub digest: Option<Digest>,
    pub repo: &'a str,
    pub file: &'a str,
    /// The environment variable that moves this cache (for the disk-full message).
    pub cache_var: &'static str,
}

impl Transfer<'_> {
    /// Fetches the file into `partial` (resuming what is there), checks it, then renames it to
    /// `dest`. `status` turns an HTTP error status into the hub's error.
    pub(crate) fn run(
        &self,
        partial: &Path,
        dest: &Path,
        status: &dyn Fn(u16, &str) -> HubError,
    ) -> Result<(), HubError> {
        for dir in [partial.parent(), dest.parent()].into_iter().flatten() {
            std::fs::create_dir_all(dir).map_err(|e| HubError::write(dir, e, self.cache_var))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(partial)
            .map_err(|e| HubError::write(partial, e, self.cache_var))?;
        let mut have = file.metadata().map_err(|e| HubError::io(partial, e))?.len();
        if self.size.is_some_and(|size| have > size) {
            have = truncate(&mut file, partial)?;
        }
        let mut bar = Bar::new(self.repo, self.file, self.size, have);
        let mut hasher = self.rehash(&mut file, partial, have)?;
        let mut attempt = 0;
        while self.size != Some(have) {
            attempt += 1;
            match self.fetch_from(&mut file, partial, &mut have, &mut hasher, &mut bar, status) {
                Ok(Fetched::Done) => break,
                Ok(Fetched::Restart) => {
                    have = truncate(&mut file, partial)?;
                    hasher = Hasher::new(self.digest.as_ref(), self.size);
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Dropped(why)) => {
                    if attempt >= ATTEMPTS {
                        file.sync_all().ok();
                        bar.abandon();
                        return Err(if have == 0 {
                            HubError::BadResponse {
                                url: self.url.clone(),
                                why: format!("transport: {why}"),
                            }
                        } else {
                            HubError::Interrupted {
                                url: self.url.clone(),
                                got: have,
                                size: self.size.map_or("?".into(), |s| s.to_string()),
                                attempts: attempt,
                                partial: partial.to_path_buf(),
                            }
                        });
                    }
                    std::thread::sleep(Duration::from_millis(250 << attempt));
                }
            }
        }
        bar.finish();
        self.verify(have, hasher, partial)?;
        file.sync_all()
            .map_err(|e| HubError::write(partial, e, self.cache_var))?;
        drop(file);
        std::fs::rename(partial, dest).map_err(|e| HubError::write(dest, e, self.cache_var))?;
        kernels::io::sync_dir(dest.parent().unwrap_or(Path::new(".")));
        Ok(())
    }

    /// The hasher state after the `have` bytes already in the partial file (a resumed download).
    fn rehash(&self, file: &mut File, partial: &Path, have: u64) -> Result<Hasher, HubError> {
        let mut hasher = Hasher::new(self.digest.as_ref(), self.size);
        if have > 0 && !matches!(hasher, Hasher::None) {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| HubError::io(partial, e))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut left = have;
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = file
                    .read(&mut buf[..want])
                    .map_err(|e| HubError::io(partial, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
        }
        file.seek(SeekFrom::Start(have))
            .map_err(|e| HubError::io(partial, e))?;
        Ok(hasher)
    }

    /// One request from byte `have` on, appended to the file as it arrives.
    fn fetch_from(
        &self,
        file: &mut File,
        partial: &Path,
        have: &mut u64,
        hasher: &mut Hasher,
        bar: &mut Bar,
        status: &dyn Fn(u16, &str) -> HubError,
    ) -> Result<Fetched, Failure> {
        let mut req = self.agent.get(&self.url);
        if let Some(auth) = self.auth {
            req = req.header("Authorization", auth);
        }
        if *have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let mut resp = req.call().map_err(|e| Failure::Dropped(e.to_string()))?;
        match resp.status().as_u16() {
            206 => {
                let start = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(*have) {
                    return Ok(Fetched::Restart);
                }
            }
            // The whole file: a server that ignores ranges, or a first request.
            200 if *have > 0 => return Ok(Fetched::Restart),
            200 => {}
            416 => return Ok(Fetched::Restart),
            code => return Err(Failure::Fatal(status(code, &self.url))),
        }
        let mut body = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Dropped(e.to_string())),
            };
            file.write_all(&buf[..n])
                .map_err(|e| Failure::Fatal(HubError::write(partial, e, self.cache_var)))?;
            hasher.update(&buf[..n]);
            *have += n as u64;
            bar.advance(n as u64);
            if self.size.is_some_and(|size| *have > size) {
                // More bytes than the hub announced: the check below names it.
                break;
            }
        }
        match self.size {
            Some(size) if *have < size => Err(Failure::Dropped(format!(
                "the body ended after {have} of {size} bytes"
            ))),
            _ => Ok(Fetched::Done),
        }
    }

    fn verify(&self, have: u64, hasher: Hasher, partial: &Path) -> Result<(), HubError> {
        let fail = |what: String| {
            std::fs::remove_file(partial).ok();
            Err(HubError::Integrity {
                repo: self.repo.to_string(),
                file: self.file.to_string(),
                what,
            })
        };
        if let Some(size) = self.size {
            if have != size {
                return fail(format!("{have} bytes, the hub announced {size}"));
            }
        }
        if let (Some(want), Some(got)) = (&self.digest, hasher.hex()) {
            let (name, want) = match want {
                Digest::Sha256(w) => ("sha256", w),
                Digest::GitSha1(w) => ("git blob sha1", w),
            };
            if &got != want {
                return fail(format!("{name} {got}, the hub announced {want}"));
            }
        }
        Ok(())
    }
}

enum Fetched {
    Done,
    /// The server did not continue at our offset: start the file over.
    Restart,
}

enum Failure {
    /// The connection failed or dropped: worth resuming.
    Dropped(String),
    Fatal(HubError),
}

fn truncate(file: &mut File, path: &Path) -> Result<u64, HubError> {
    file.set_len(0).map_err(|e| HubError::io(path, e))?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| HubError::io(path, e))?;
    Ok(0)
}

/// `bytes 100-199/200` → 100.
fn content_range_start(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// A blocking exclusive lock on `path` (created if missing), held until the guard drops: two
/// processes fetching the same file take turns instead of writing one partial file together.
pub(crate) fn lock(path: &Path) -> Result<File, HubError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| HubError::io(dir, e))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| HubError::io(path, e))?;
    let waited = Instant::now();
    file.lock().map_err(|e| HubError::io(path, e))?;
    if waited.elapsed() > Duration::from_millis(500) {
        eprintln!(
            "waited {:.1} s for another download of the same file",
            waited.elapsed().as_secs_f64()
        );
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_name_their_digest() {
        let sha = "a".repeat(64);
        assert_eq!(
            Digest::from_etag(&format!("\"{sha}\"")),
            Some(Digest::Sha256(sha))
        );
        let git = "0123456789abcdef0123456789ABCDEF01234567";
        assert_eq!(
            Digest::from_etag(git),
            Some(Digest::GitSha1(git.to_ascii_lowercase()))
        );
        assert_eq!(Digest::from_etag("W/\"abc-123\""), None);
        assert_eq!(Digest::from_etag("xyz"), None);
    }

    #[test]
    fn git_blob_ids_match_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let mut h = Hasher::new(Some(&Digest::GitSha1(String::new())), Some(6));
        h.update(b"hello\n");
        assert_eq!(h.hex().unwrap(), "ce013625030ba8dba906f756967f9e9ca394464a");
    }

    #[test]
    fn content_range_gives_its_start() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes */200"), None);
    }
}
