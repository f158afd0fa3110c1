//! The Hugging Face hub, through `hf-hub` (its API, file metadata and cache layout) with our own
//! transfer, into the cache `huggingface_hub` uses:
//! `models--Org--Name/{blobs/<etag>, snapshots/<commit>/<file> → ../../blobs/<etag>, refs/<revision>}`,
//! partial files as `blobs/<etag>.incomplete` and locks as `.locks/models--Org--Name/<etag>.lock`, as
//! Python writes them, so either side finds (and safely shares) what the other fetched.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Answer, HubError};
use crate::files::{self, Remote};
use crate::transfer::{self, Digest, Transfer};
use crate::{agent, env_flag, Kind};

const HUB: &str = "the Hugging Face hub";

/// Where the hub is and what the environment says about it (`huggingface_hub`'s variables).
#[derive(Clone, Debug)]
pub struct HfConfig {
    /// `HF_ENDPOINT`, default `https://huggingface.co`.
    pub endpoint: String,
    /// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
    /// else `~/.cache/huggingface/hub`.
    pub cache: PathBuf,
    /// `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `HF_HOME/token`).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE` set to 1/true/yes/on: only the cache is used.
    pub offline: bool,
}

impl HfConfig {
    pub fn from_env() -> HfConfig {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let home = var("HF_HOME").unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .unwrap_or_else(|| var("HOME").unwrap_or_default().join(".cache"))
                .join("huggingface")
        });
        let token_file = var("HF_TOKEN_PATH").unwrap_or_else(|| home.join("token"));
        let token = std::env::var("HF_TOKEN")
            .ok()
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        HfConfig {
            endpoint: std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            cache: var("HF_HUB_CACHE").unwrap_or_else(|| home.join("hub")),
            token,
            offline: env_flag("HF_HUB_OFFLINE"),
        }
    }
}

/// The local snapshot directory of `repo` at `revision`, fetching what a `kind` run needs.
pub(crate) fn fetch(
    cfg: &HfConfig,
    repo: &str,
    revision: &str,
    kind: Kind,
) -> Result<PathBuf, HubError> {
    let folder = Repo::with_revision(repo.into(), RepoType::Model, revision.into()).folder_name();
    let root = cfg.cache.join(&folder);
    let cached = cached_snapshot(&root, revision);
    let missing = match &cached {
        Some(dir) => files::missing(dir, kind),
        None => vec![format!("revision {revision}")],
    };
    if let (Some(dir), true) = (&cached, missing.is_empty()) {
        return Ok(dir.clone());
    }
    if cfg.offline {
        return Err(HubError::Offline {
            offline_var: "HF_HUB_OFFLINE",
            repo: repo.into(),
            cache: root,
            missing: missing.join(", "),
        });
    }
    let api = ApiBuilder::from_cache(Cache::new(cfg.cache.clone()))
        .with_endpoint(cfg.endpoint.clone())
        .with_token(cfg.token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| HubError::BadResponse {
            url: cfg.endpoint.clone(),
            why: e.to_string(),
        })?;
    let status = Status {
        cfg,
        repo,
        revision,
    };
    let not_cached = format!(
        "{repo} is not complete in the cache {} (missing {})",
        root.display(),
        missing.join(", ")
    );
    let unreachable = |why: String| HubError::Unreachable {
        endpoint: cfg.endpoint.clone(),
        endpoint_var: "HF_ENDPOINT",
        why,
        not_cached: not_cached.clone(),
    };
    let info = api
        .repo(Repo::with_revision(
            repo.into(),
            RepoType::Model,
            revision.into(),
        ))
        .info()
        .map_err(|e| status.api_error(e, &cfg.endpoint, &unreachable))?;
    if !is_commit(&info.sha) {
        return Err(HubError::BadResponse {
            url: format!("{}/api/models/{repo}/revision/{revision}", cfg.endpoint),
            why: format!("commit {:?} is not a 40-digit hex id", info.sha),
        });
    }
    let auth = cfg.token.as_ref().map(|t| format!("Bearer {t}"));
    let mut remote = HfRemote {
        api,
        agent: agent(),
        auth,
        cfg,
        repo,
        sha: info.sha.clone(),
        root: root.clone(),
        folder,
        listing: info.siblings.into_iter().map(|s| s.rfilename).collect(),
        status,
    };
    files::fetch_all(&mut remote, kind).map_err(|e| match e {
        // A connection lost between files: say so with what is still missing.
        HubError::BadResponse { why, .. } if why.starts_with("transport:") => unreachable(why),
        e => e,
    })?;
    if revision != info.sha {
        let reference = root.join("refs").join(revision);
        if let Some(dir) = reference.parent() {
            std::fs::create_dir_all(dir).map_err(|e| HubError::write(dir, e, "HF_HUB_CACHE"))?;
        }
        // Through a temporary file of this process's own: another process may write the same ref.
        let mut tmp = reference.as_os_str().to_owned();
        tmp.push(format!(".{}.partial", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, info.sha.as_bytes())
            .and_then(|()| std::fs::rename(&tmp, &reference))
            .map_err(|e| {
                std::fs::remove_file(&tmp).ok();
                HubError::write(&reference, e, "HF_HUB_CACHE")
            })?;
    }
    Ok(root.join("snapshots").join(&info.sha))
}

/// The complete snapshot of `repo` at `revision` in the cache, if there is one.
pub(crate) fn cached(cfg: &HfConfig, repo: &str, revision: &str, kind: Kind) -> Option<PathBuf> {
    let folder = Repo::with_revision(repo.into(), RepoType::Model, revision.into()).folder_name();
    cached_snapshot(&cfg.cache.join(folder), revision)
        .filter(|d| files::missing(d, kind).is_empty())
}

/// The snapshot a revision names in the cache: a commit id directly, a branch or tag through
/// `refs/<revision>`.
fn cached_snapshot(root: &Path, revision: &str) -> Option<PathBuf> {
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(root.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let dir = root.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// HTTP statuses in the hub's words.
struct Status<'a> {
    cfg: &'a HfConfig,
    repo: &'a str,
    revision: &'a str,
}

impl Status<'_> {
    fn code(&self, code: u16, url: &str) -> HubError {
        let has_token = self.cfg.token.is_some();
        HubError::status(
            code,
            Answer {
                hub: HUB,
                repo: self.repo,
                revision: self.revision,
                url,
                token_hint: if has_token {
                    ""
                } else {
                    "; a private repository also needs HF_TOKEN"
                },
                refused_hint: if has_token {
                    "the token (HF_TOKEN or the token file) has no access to it: accept the \
                     model's terms on its page on the hub, or use a token that has access"
                        .into()
                } else {
                    "it is gated or private, or does not exist: check the name, then set HF_TOKEN \
                     (or run `hf auth login`) with a token that has access"
                        .into()
                },
            },
        )
    }

    fn api_error(
        &self,
        e: ApiError,
        url: &str,
        unreachable: &dyn Fn(String) -> HubError,
    ) -> HubError {
        match e {
            ApiError::RequestError(e) => match *e {
                ureq::Error::StatusCode(code) => self.code(code, url),
                e => unreachable(e.to_string()),
            },
            ApiError::IoError(e) => unreachable(e.to_string()),
            e => HubError::BadResponse {
                url: url.into(),
                why: e.to_string(),
            },
        }
    }
}

struct HfRemote<'a> {
    api: Api,
    agent: ureq::Agent,
    auth: Option<String>,
    cfg: &'a HfConfig,
    repo: &'a str,
    sha: String,
    root: PathBuf,
    folder: String,
    listing: BTreeSet<String>,
    status: Status<'a>,
}

impl Remote for HfRemote<'_> {
    fn repo(&self) -> String {
        self.repo.to_string()
    }

    fn listing(&self) -> &BTreeSet<String> {
        &self.listing
    }

    fn ensure(&mut self, file: &str) -> Result<PathBuf, HubError> {
        if !files::safe_relative(file) {
            return Err(HubError::BadResponse {
                url: self.cfg.endpoint.clone(),
                why: format!("the repository lists a file {file:?} outside itself"),
            });
        }
        let pointer = self.root.join("snapshots").join(&self.sha).join(file);
        if pointer.is_file() {
            return Ok(pointer);
        }
        let url = self
            .api
            .repo(Repo::with_revision(
                self.repo.into(),
                RepoType::Model,
                self.sha.clone(),
            ))
            .url(file);
        let transport = |why: String| HubError::BadResponse {
            url: url.clone(),
            why: format!("transport: {why}"),
        };
        let meta = self
            .api
            .metadata(&url)
            .map_err(|e| self.status.api_error(e, &url, &transport))?;
        let etag = meta.etag().to_string();
        if etag.is_empty() || !files::safe_relative(&etag) || etag.contains('/') {
            return Err(HubError::BadResponse {
                url,
                why: format!("ETag {etag:?} cannot name a blob"),
            });
        }
        let blob = self.root.join("blobs").join(&etag);
        if !blob.is_file() {
            let lock_path = self
                .cfg
                .cache
                .join(".locks")
                .join(&self.folder)
                .join(format!("{etag}.lock"));
            let _lock = transfer::lock(&lock_path)?;
            // Another process may have finished it while we waited.
            if !blob.is_file() {
                let partial = self.root.join("blobs").join(format!("{etag}.incomplete"));
                Transfer {
                    agent: &self.agent,
                    url: url.clone(),
                    auth: self.auth.as_deref(),
                    size: Some(meta.size() as u64),
                    digest: Digest::from_etag(&etag),
                    repo: self.repo,
                    file,
                    cache_var: "HF_HUB_CACHE",
                }
                .run(&partial, &blob, &|code, url| self.status.code(code, url))?;
            }
        }
        link(&blob, &pointer)?;
        Ok(pointer)
    }

    fn absent(&mut self, file: &str) -> Result<(), HubError> {
        // `huggingface_hub`'s marker for "this revision has no such file".
        let marker = self.root.join(".no_exist").join(&self.sha).join(file);
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir).map_err(|e| HubError::write(dir, e, "HF_HUB_CACHE"))?;
        }
        std::fs::write(&marker, b"").map_err(|e| HubError::write(&marker, e, "HF_HUB_CACHE"))
    }
}

/// `snapshots/<commit>/<file>` → the blob, as a relative symbolic link (a copy where links are not
/// possible).
fn link(blob: &Path, pointer: &Path) -> Result<(), HubError> {
    let dir = pointer.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| HubError::write(dir, e, "HF_HUB_CACHE"))?;
    // From `snapshots/<commit>/a/b` up to the repository folder, then into `blobs/`.
    let depth = pointer
        .strip_prefix(
            blob.parent()
                .and_then(Path::parent)
                .unwrap_or(Path::new("")),
        )
        .map(|rel| rel.components().count() - 1)
        .unwrap_or(2);
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().unwrap_or_default());
    // A name of this process's own: another process may be linking the same file.
    let mut tmp = pointer.as_os_str().to_owned();
    tmp.push(format!(".{}.link.partial", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::remove_file(&tmp).ok();
    #[cfg(unix)]
    let made = std::os::unix::fs::symlink(&target, &tmp);
    #[cfg(not(unix))]
    let made = std::fs::copy(blob, &tmp).map(|_| ());
    made.map_err(|e| HubError::write(&tmp, e, "HF_HUB_CACHE"))?;
    std::fs::rename(&tmp, pointer).map_err(|e| HubError::write(pointer, e, "HF_HUB_CACHE"))
}
