//! Where a model lives: `--model` as a directory, a Hugging Face hub cache entry, or a repo id
//! found in the Hugging Face or ModelScope cache, resolved to the directory holding `config.json`.

use std::path::{Path, PathBuf};

use crate::error::Qwen2Error;
use crate::load::CONFIG;

/// Finds the model directory for `path`:
/// * a directory holding `config.json` (a plain download, e.g. ModelScope's `qwen/Qwen2.5-7B-Instruct`);
/// * a Hugging Face hub cache repo dir (`models--Qwen--Qwen2.5-7B-Instruct`): the snapshot that
///   `refs/main` names, or the only snapshot;
/// * a repo id `Org/Name` not found as a path: looked up in the Hugging Face hub cache (`HF_HUB_CACHE`,
///   `HF_HOME/hub`, `~/.cache/huggingface/hub`) and the ModelScope cache (`MODELSCOPE_CACHE`,
///   `~/.cache/modelscope/hub`).
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf, Qwen2Error> {
    if path.join(CONFIG).is_file() {
        return Ok(path.to_path_buf());
    }
    if path.join("snapshots").is_dir() {
        return hub_snapshot(path);
    }
    if !path.exists() {
        if let Some(found) = lookup_repo_id(path) {
            return Ok(found);
        }
        return Err(Qwen2Error::ModelNotFound {
            path: path.to_path_buf(),
            hint:
                "no such directory, and no Hugging Face or ModelScope cache entry for it; pass the \
                   directory that holds config.json and the *.safetensors files"
                    .into(),
        });
    }
    Err(Qwen2Error::ModelNotFound {
        path: path.to_path_buf(),
        hint: format!(
            "the directory has no {CONFIG}; pass the directory that holds config.json and the \
             *.safetensors files (for a hub cache, the models--Org--Name directory)"
        ),
    })
}

fn hub_snapshot(repo: &Path) -> Result<PathBuf, Qwen2Error> {
    let snaps = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snaps.join(rev.trim());
        if dir.join(CONFIG).is_file() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&snaps)
        .map_err(|e| Qwen2Error::io(&snaps, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(CONFIG).is_file())
        .collect();
    candidates.sort();
    match candidates.len() {
        1 => Ok(candidates.remove(0)),
        0 => Err(Qwen2Error::ModelNotFound {
            path: repo.to_path_buf(),
            hint: "hub cache entry has no snapshot with config.json; download the model again".into(),
        }),
        _ => Err(Qwen2Error::ModelNotFound {
            path: repo.to_path_buf(),
            hint: format!(
                "hub cache entry has {} snapshots and refs/main names none of them; pass one of them: {}",
                candidates.len(),
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

fn lookup_repo_id(id: &Path) -> Option<PathBuf> {
    let s = id.to_str()?;
    let (org, name) = s.split_once('/')?;
    if org.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let home = env("HOME").unwrap_or_default();
    let xdg = env("XDG_CACHE_HOME").unwrap_or_else(|| home.join(".cache"));
    let hf_roots = [
        env("HF_HUB_CACHE"),
        env("HF_HOME").map(|h| h.join("hub")),
        Some(xdg.join("huggingface").join("hub")),
    ];
    for root in hf_roots.into_iter().flatten() {
        let repo = root.join(format!("models--{org}--{name}"));
        if repo.is_dir() {
            if let Ok(dir) = hub_snapshot(&repo) {
                return Some(dir);
            }
        }
    }
    let ms_roots = [
        env("MODELSCOPE_CACHE"),
        Some(xdg.join("modelscope").join("hub")),
    ];
    // ModelScope writes `.` in names as `___` in newer versions.
    let names = [name.to_string(), name.replace('.', "___")];
    for root in ms_roots.into_iter().flatten() {
        for base in [root.clone(), root.join("models")] {
            for org in [org.to_string(), org.to_lowercase()] {
                for n in &names {
                    let dir = base.join(&org).join(n);
                    if dir.join(CONFIG).is_file() {
                        return Some(dir);
                    }
                }
            }
        }
    }
    None
}
