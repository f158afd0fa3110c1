//! Models and adapters in by name. `--model Qwen/Qwen2.5-7B-Instruct` is fetched from the Hugging
//! Face hub, `--model modelscope:qwen/Qwen2.5-7B-Instruct` from ModelScope, into the caches the
//! Python libraries use (so each side finds what the other fetched); a local directory is used as
//! it is.
//!
//! What is fetched is what a Qwen2 run reads (config, generation config, tokenizer files, the
//! safetensors weights or an adapter's two files), each file resumed from the bytes already on disk,
//! checked against the hub's size and digest, and moved under its final name only when complete. A
//! copy that is already complete is used without a request.
//!
//! ```no_run
//! use lora_hub::{fetch, Kind};
//! let dir = fetch("Qwen/Qwen2.5-0.5B-Instruct".as_ref(), Kind::Model, None)?;
//! assert!(dir.join("config.json").is_file());
//! # Ok::<(), lora_hub::HubError>(())
//! ```
#![forbid(unsafe_code)]

mod error;
mod files;
mod hf;
mod modelscope;
mod progress;
mod transfer;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::HubError;
pub use hf::HfConfig;
pub use modelscope::MsConfig;

/// What a repository holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A Qwen2 model (`config.json`, tokenizer, safetensors weights).
    Model,
    /// A PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`).
    Adapter,
    /// Only a Qwen2 model's `config.json` (what exporting an adapter alone reads of its base).
    Config,
}

/// The prefix that sends an id to ModelScope.
pub const MODELSCOPE_PREFIX: &str = "modelscope:";

/// Where a `--model` / `--adapter` argument points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A path on this machine (a directory, or a cache entry the model loader understands).
    Local(PathBuf),
    /// `Org/Name` on the Hugging Face hub.
    HuggingFace(String),
    /// `modelscope:Org/Name` on ModelScope.
    ModelScope(String),
}

impl Source {
    /// An existing path is local; `modelscope:Org/Name` is ModelScope; another `Org/Name` (two
    /// parts of letters, digits, `-`, `_`, `.`) is the Hugging Face hub; anything else is a local
    /// path (that the loader then reports missing).
    pub fn parse(arg: &Path) -> Source {
        if arg.exists() {
            return Source::Local(arg.to_path_buf());
        }
        let Some(s) = arg.to_str() else {
            return Source::Local(arg.to_path_buf());
        };
        if let Some(id) = s.strip_prefix(MODELSCOPE_PREFIX) {
            return Source::ModelScope(id.to_string());
        }
        if is_repo_id(s) {
            Source::HuggingFace(s.to_string())
        } else {
            Source::Local(arg.to_path_buf())
        }
    }
}

/// `Org/Name`, each part of ASCII letters, digits, `-`, `_`, `.`, not starting with `.` or `-`.
pub fn is_repo_id(s: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    matches!(s.split_once('/'), Some((org, name)) if part(org) && part(name))
}

/// The local directory for `arg` (see [`Source::parse`]): a local path as it is; a hub id from the
/// cache when complete there, else downloaded. `revision` is a branch, tag or commit (default:
/// `main` on the Hugging Face hub, `master` on ModelScope).
pub fn fetch(arg: &Path, kind: Kind, revision: Option<&str>) -> Result<PathBuf, HubError> {
    match Source::parse(arg) {
        Source::Local(p) => Ok(p),
        // A typo in a local path looks like an id too: say both readings when it is neither.
        Source::HuggingFace(id) => {
            fetch_hf(&HfConfig::from_env(), &id, kind, revision).map_err(|e| match e {
                HubError::NotFound { .. }
                | HubError::Unauthorized { .. }
                | HubError::Unreachable { .. }
                | HubError::Offline { .. } => HubError::NeitherPathNorId {
                    path: arg.to_path_buf(),
                    source: Box::new(e),
                },
                e => e,
            })
        }
        Source::ModelScope(id) => {
            if !is_repo_id(&id) {
                return Err(HubError::BadFile {
                    repo: format!("{MODELSCOPE_PREFIX}{id}"),
                    file: "the id".into(),
                    why: "a ModelScope id is owner/name, e.g. modelscope:qwen/Qwen2.5-7B-Instruct"
                        .into(),
                });
            }
            modelscope::fetch(
                &MsConfig::from_env(),
                &id,
                revision.unwrap_or("master"),
                kind,
            )
        }
    }
}

/// [`fetch`] of a Hugging Face id with an explicit configuration. With no revision given, a complete
/// copy of the id in the ModelScope cache (older tools put the tutorial's model there) is used before
/// anything is downloaded.
pub fn fetch_hf(
    cfg: &HfConfig,
    id: &str,
    kind: Kind,
    revision: Option<&str>,
) -> Result<PathBuf, HubError> {
    let rev = revision.unwrap_or("main");
    if revision.is_none() && hf::cached(cfg, id, rev, kind).is_none() {
        let ms = MsConfig::from_env();
        let (owner, name) = id.split_once('/').unwrap_or((id, ""));
        if let Some(dir) = modelscope_legacy_copy(&ms.cache, owner, name, kind) {
            return Ok(dir);
        }
    }
    hf::fetch(cfg, id, rev, kind)
}

/// [`fetch`] of a ModelScope id with an explicit configuration.
pub fn fetch_modelscope(
    cfg: &MsConfig,
    id: &str,
    kind: Kind,
    revision: Option<&str>,
) -> Result<PathBuf, HubError> {
    modelscope::fetch(cfg, id, revision.unwrap_or("master"), kind)
}

fn modelscope_legacy_copy(cache: &Path, owner: &str, name: &str, kind: Kind) -> Option<PathBuf> {
    let mut dirs = vec![cache
        .join("models")
        .join(format!("{owner}--{name}"))
        .join("snapshots")
        .join("master")];
    dirs.extend(modelscope::legacy_dirs(cache, owner, name));
    // Also lower-case owners (`qwen/` on ModelScope is `Qwen/` on the hub).
    let lower = owner.to_lowercase();
    if lower != owner {
        dirs.extend(modelscope::legacy_dirs(cache, &lower, name));
        dirs.push(
            cache
                .join("models")
                .join(format!("{lower}--{name}"))
                .join("snapshots")
                .join("master"),
        );
    }
    dirs.into_iter()
        .find(|d| d.is_dir() && files::missing(d, kind).is_empty())
}

/// The HTTP client of every transfer: status codes handled by the caller, a connection that stalls
/// for a minute counted as dropped (and resumed), proxies from the environment.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .user_agent(concat!("ferrolora/", env!("CARGO_PKG_VERSION"), "; hf-hub"))
        .build()
        .into()
}

/// `1`, `true`, `yes`, `on` (any case), as `huggingface_hub` reads its flags.
fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_name_their_source() {
        let hf = |s: &str| Source::HuggingFace(s.into());
        assert_eq!(
            Source::parse("Qwen/Qwen2.5-7B-Instruct".as_ref()),
            hf("Qwen/Qwen2.5-7B-Instruct")
        );
        assert_eq!(
            Source::parse("modelscope:qwen/Qwen2.5-7B-Instruct".as_ref()),
            Source::ModelScope("qwen/Qwen2.5-7B-Instruct".into())
        );
        for local in [
            "runs/a/b",
            "./x/y",
            "/abs/path",
            "just-a-name",
            "../up/x",
            "a/.hidden",
        ] {
            assert_eq!(
                Source::parse(local.as_ref()),
                Source::Local(local.into()),
                "{local}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Source::parse(dir.path()), Source::Local(dir.path().into()));
    }
}
