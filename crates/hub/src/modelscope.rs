//! ModelScope (`modelscope:` ids), through its public file API — the listing
//! `GET /api/v1/models/{id}/repo/files?Revision=&Recursive=true` (paths, sizes, SHA-256) and the file
//! `GET /api/v1/models/{id}/repo?Revision=&FilePath=` — into the cache layout of Python's
//! `modelscope` (1.38+): `{MODELSCOPE_CACHE}/models/{owner}--{name}/snapshots/{revision}/{file}`,
//! plain files. Older layouts (`models/{owner}/{name with . as ___}`, `hub/...`) are used when
//! complete, as `modelscope` does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::error::{Answer, HubError};
use crate::files::{self, Remote};
use crate::transfer::{self, Digest, Transfer};
use crate::{agent, env_flag, Kind};

const HUB: &str = "ModelScope";

/// Where ModelScope is and what the environment says about it (Python `modelscope`'s variables).
#[derive(Clone, Debug)]
pub struct MsConfig {
    /// `MODELSCOPE_ENDPOINT`, else `MODELSCOPE_DOMAIN` (https:// added when it has no scheme),
    /// else `https://www.modelscope.cn`.
    pub endpoint: String,
    /// `MODELSCOPE_CACHE`, else `~/.cache/modelscope`.
    pub cache: PathBuf,
    /// `MODELSCOPE_API_TOKEN`.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE` (or `MODELSCOPE_OFFLINE`) set: only the cache is used.
    pub offline: bool,
}

impl MsConfig {
    pub fn from_env() -> MsConfig {
        let text = |k: &str| {
            std::env::var(k)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let endpoint = text("MODELSCOPE_ENDPOINT")
            .or_else(|| {
                text("MODELSCOPE_DOMAIN").map(|d| {
                    if d.starts_with("http://") || d.starts_with("https://") {
                        d
                    } else {
                        format!("https://{d}")
                    }
                })
            })
            .unwrap_or_else(|| "https://www.modelscope.cn".into());
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        MsConfig {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache: std::env::var_os("MODELSCOPE_CACHE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache").join("modelscope")),
            token: text("MODELSCOPE_API_TOKEN"),
            offline: env_flag("HF_HUB_OFFLINE") || env_flag("MODELSCOPE_OFFLINE"),
        }
    }
}

/// The local directory of `repo` at `revision`, fetching what a `kind` run needs.
pub(crate) fn fetch(
    cfg: &MsConfig,
    repo: &str,
    revision: &str,
    kind: Kind,
) -> Result<PathBuf, HubError> {
    let (owner, name) = repo.split_once('/').unwrap_or((repo, ""));
    let target = cfg
        .cache
        .join("models")
        .join(format!("{owner}--{name}"))
        .join("snapshots")
        .join(revision);
    let mut candidates = vec![target.clone()];
    if revision == "master" {
        candidates.extend(legacy_dirs(&cfg.cache, owner, name));
    }
    if let Some(done) = candidates
        .iter()
        .find(|d| d.is_dir() && files::missing(d, kind).is_empty())
    {
        return Ok(done.clone());
    }
    let missing = if target.is_dir() {
        files::missing(&target, kind).join(", ")
    } else {
        format!("revision {revision}")
    };
    if cfg.offline {
        return Err(HubError::Offline {
            offline_var: "HF_HUB_OFFLINE",
            repo: format!("modelscope:{repo}"),
            cache: target,
            missing,
        });
    }
    let agent = agent();
    let auth = cfg.token.as_ref().map(|t| format!("Bearer {t}"));
    let status = Status { repo, revision };
    let list_url = format!(
        "{}/api/v1/models/{repo}/repo/files?Revision={}&Recursive=true",
        cfg.endpoint,
        encode(revision)
    );
    let mut req = agent.get(&list_url);
    if let Some(a) = &auth {
        req = req.header("Authorization", a);
    }
    let not_cached = format!(
        "modelscope:{repo} is not complete in the cache {} (missing {missing})",
        target.display()
    );
    let unreachable = |why: String| HubError::Unreachable {
        endpoint: cfg.endpoint.clone(),
        endpoint_var: "MODELSCOPE_ENDPOINT",
        why,
        not_cached: not_cached.clone(),
    };
    let mut resp = req.call().map_err(|e| unreachable(e.to_string()))?;
    let code = resp.status().as_u16();
    if code != 200 {
        return Err(status.code(code, &list_url));
    }
    let bad = |why: String| HubError::BadResponse {
        url: list_url.clone(),
        why,
    };
    let listing: Listing = resp
        .body_mut()
        .read_json()
        .map_err(|e| bad(format!("not the file listing: {e}")))?;
    if listing.code.is_some_and(|c| c != 200) || listing.success == Some(false) {
        return Err(match listing.code {
            Some(404) => status.code(404, &list_url),
            Some(c @ (401 | 403)) => status.code(c as u16, &list_url),
            _ => bad(format!(
                "code {:?}: {}",
                listing.code,
                listing.message.unwrap_or_default()
            )),
        });
    }
    let entries: BTreeMap<String, Entry> = listing
        .data
        .map(|d| d.files)
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f.kind.as_deref() != Some("tree"))
        .map(|f| (f.path.clone(), f))
        .collect();
    let mut remote = MsRemote {
        cfg,
        agent,
        auth,
        repo,
        revision,
        target: target.clone(),
        listing: entries.keys().cloned().collect(),
        entries,
        status,
    };
    files::fetch_all(&mut remote, kind).map_err(|e| match e {
        HubError::BadResponse { why, .. } if why.starts_with("transport:") => unreachable(why),
        e => e,
    })?;
    Ok(target)
}

/// Where older `modelscope` versions put a repository (`.` in names written as `___`).
pub(crate) fn legacy_dirs(cache: &Path, owner: &str, name: &str) -> Vec<PathBuf> {
    let safe = name.replace('.', "___");
    let mut out = Vec::new();
    for base in [cache.to_path_buf(), cache.join("hub")] {
        for n in [&safe, &name.to_string()] {
            out.push(base.join("models").join(owner).join(n));
            out.push(base.join(owner).join(n));
        }
    }
    out
}

#[derive(Deserialize)]
struct Listing {
    #[serde(rename = "Code")]
    code: Option<i64>,
    #[serde(rename = "Success")]
    success: Option<bool>,
    #[serde(rename = "Message")]
    message: Option<String>,
    #[serde(rename = "Data")]
    data: Option<ListingData>,
}

#[derive(Deserialize)]
struct ListingData {
    #[serde(rename = "Files", default)]
    files: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "Path")]
    path: String,
    #[serde(rename = "Size")]
    size: Option<u64>,
    #[serde(rename = "Sha256")]
    sha256: Option<String>,
    #[serde(rename = "Type")]
    kind: Option<String>,
}

struct Status<'a> {
    repo: &'a str,
    revision: &'a str,
}

impl Status<'_> {
    fn code(&self, code: u16, url: &str) -> HubError {
        HubError::status(
            code,
            Answer {
                hub: HUB,
                repo: self.repo,
                revision: self.revision,
                url,
                token_hint: "; a private repository also needs MODELSCOPE_API_TOKEN",
                refused_hint:
                    "it is private or needs an accepted licence: set MODELSCOPE_API_TOKEN \
                               to a token (SDK token of your ModelScope account) that has access"
                        .into(),
            },
        )
    }
}

struct MsRemote<'a> {
    cfg: &'a MsConfig,
    agent: ureq::Agent,
    auth: Option<String>,
    repo: &'a str,
    revision: &'a str,
    target: PathBuf,
    listing: BTreeSet<String>,
    entries: BTreeMap<String, Entry>,
    status: Status<'a>,
}

impl Remote for MsRemote<'_> {
    fn repo(&self) -> String {
        format!("modelscope:{}", self.repo)
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
        let entry = &self.entries[file];
        let dest = self.target.join(file);
        let done = |p: &Path| {
            std::fs::metadata(p)
                .is_ok_and(|m| m.is_file() && entry.size.is_none_or(|s| m.len() == s))
        };
        if done(&dest) {
            return Ok(dest);
        }
        // The lock `modelscope` itself takes for this file, so the two never write it together.
        let key = format!(
            "modelscope-hub-download-lock-v2\0file\0model\0{}\0{file}",
            self.repo
        );
        let digest: String = Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let _lock = transfer::lock(
            &self
                .cfg
                .cache
                .join(".lock")
                .join(format!("file_{digest}.lock")),
        )?;
        if !done(&dest) {
            let partial = self
                .cfg
                .cache
                .join(".partial")
                .join(self.repo.replace('/', "--"))
                .join(self.revision)
                .join(format!("{file}.incomplete"));
            Transfer {
                agent: &self.agent,
                url: format!(
                    "{}/api/v1/models/{}/repo?Revision={}&FilePath={}",
                    self.cfg.endpoint,
                    self.repo,
                    encode(self.revision),
                    encode(file)
                ),
                auth: self.auth.as_deref(),
                size: entry.size,
                digest: entry
                    .sha256
                    .as_deref()
                    .and_then(Digest::from_etag)
                    .filter(|d| matches!(d, Digest::Sha256(_))),
                repo: self.repo,
                file,
                cache_var: "MODELSCOPE_CACHE",
            }
            .run(&partial, &dest, &|code, url| self.status.code(code, url))?;
        }
        Ok(dest)
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters and `/` kept).
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
