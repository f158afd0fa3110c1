//! Which files a run needs from a repository, in the order they are fetched, and whether a local
//! copy already has them all.
//!
//! A model: `config.json` first (so that a repository of another architecture stops before its
//! weights), the small optional files, `tokenizer.json`, then the weights (`model.safetensors`, or
//! the index and every shard it names). An adapter: `adapter_config.json` and
//! `adapter_model.safetensors`. Weights come last, so a copy that has its weights is complete.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::HubError;
use crate::Kind;

const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const WEIGHTS: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
const ADAPTER_CONFIG: &str = "adapter_config.json";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Fetched when the repository has them; a run works without them.
const MODEL_OPTIONAL: &[&str] = &[
    "generation_config.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    // Where newer repositories keep the chat template (`merge` copies it into its output).
    "chat_template.jinja",
];

/// A repository at one resolved revision, as the fetch plan sees it.
pub(crate) trait Remote {
    /// `Org/Name` with the hub, for messages.
    fn repo(&self) -> String;
    /// The files of the repository (paths from its root).
    fn listing(&self) -> &BTreeSet<String>;
    /// The local path of `file`, fetched and checked if it is not there yet.
    fn ensure(&mut self, file: &str) -> Result<PathBuf, HubError>;
    /// Notes that the optional `file` is not in the repository.
    fn absent(&mut self, _file: &str) -> Result<(), HubError> {
        Ok(())
    }
}

/// Fetches every file a `kind` run needs, in order.
pub(crate) fn fetch_all(remote: &mut dyn Remote, kind: Kind) -> Result<(), HubError> {
    let missing = |remote: &dyn Remote, file: &str, what| HubError::MissingFile {
        repo: remote.repo(),
        file: file.to_string(),
        what,
    };
    let need = |remote: &mut dyn Remote, file: &str, what| {
        if remote.listing().contains(file) {
            remote.ensure(file)
        } else {
            Err(missing(remote, file, what))
        }
    };
    match kind {
        Kind::Config => {
            let config = need(remote, CONFIG, "it is not a transformers model repository")?;
            check_qwen2(&remote.repo(), &config)?;
        }
        Kind::Adapter => {
            need(
                remote,
                ADAPTER_CONFIG,
                "it is not a PEFT adapter repository",
            )?;
            need(
                remote,
                ADAPTER_WEIGHTS,
                "ferrolora reads adapter_model.safetensors (convert an adapter_model.bin with PEFT first)",
            )?;
        }
        Kind::Model => {
            let config = need(remote, CONFIG, "it is not a transformers model repository")?;
            check_qwen2(&remote.repo(), &config)?;
            for file in MODEL_OPTIONAL {
                if remote.listing().contains(*file) {
                    remote.ensure(file)?;
                } else {
                    remote.absent(file)?;
                }
            }
            need(
                remote,
                TOKENIZER,
                "the tokenizer is read from tokenizer.json",
            )?;
            if remote.listing().contains(INDEX) {
                let index = remote.ensure(INDEX)?;
                for shard in shards(&remote.repo(), &index)? {
                    need(remote, &shard, "the index names it")?;
                }
            } else {
                need(
                    remote,
                    WEIGHTS,
                    "ferrolora reads safetensors weights (model.safetensors, or \
                     model.safetensors.index.json and its shards); convert pytorch_model.bin first",
                )?;
            }
        }
    }
    Ok(())
}

/// What a local copy in `dir` lacks for a `kind` run (empty: complete).
pub(crate) fn missing(dir: &Path, kind: Kind) -> Vec<String> {
    let absent = |f: &str| !dir.join(f).is_file();
    let mut out: Vec<String> = Vec::new();
    match kind {
        Kind::Config => {
            if absent(CONFIG) {
                out.push(CONFIG.into());
            }
        }
        Kind::Adapter => {
            for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
                if absent(f) {
                    out.push(f.into());
                }
            }
        }
        Kind::Model => {
            for f in [CONFIG, TOKENIZER] {
                if absent(f) {
                    out.push(f.into());
                }
            }
            if !absent(INDEX) {
                match shards("", &dir.join(INDEX)) {
                    Ok(shards) => out.extend(shards.into_iter().filter(|s| absent(s))),
                    Err(_) => out.push(INDEX.into()),
                }
            } else if absent(WEIGHTS) {
                out.push(WEIGHTS.into());
            }
        }
    }
    out
}

/// The shard files an index names, each once; names that would leave the directory are refused.
fn shards(repo: &str, index: &Path) -> Result<BTreeSet<String>, HubError> {
    let bad = |why: String| HubError::BadFile {
        repo: repo.to_string(),
        file: INDEX.to_string(),
        why,
    };
    let text = std::fs::read_to_string(index).map_err(|e| HubError::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut out = BTreeSet::new();
    for (key, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map[{key:?}] is not a file name")))?;
        if !safe_relative(file) {
            return Err(bad(format!(
                "weight_map[{key:?}] = {file:?} is not a file in the repository"
            )));
        }
        out.insert(file.to_string());
    }
    Ok(out)
}

/// A path that stays inside the repository: relative, no `..`, no empty parts.
pub(crate) fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\\')
        && path
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
}

/// Refuses a `config.json` of another architecture (before its weights are fetched).
fn check_qwen2(repo: &str, config: &Path) -> Result<(), HubError> {
    let text = std::fs::read_to_string(config).map_err(|e| HubError::io(config, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| HubError::BadFile {
        repo: repo.to_string(),
        file: CONFIG.to_string(),
        why: format!("not JSON: {e}"),
    })?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let architectures: Vec<String> = json
        .get("architectures")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if model_type.as_deref() == Some("qwen2")
        || architectures.iter().any(|a| a == "Qwen2ForCausalLM")
    {
        Ok(())
    } else {
        Err(HubError::NotQwen2 {
            repo: repo.to_string(),
            model_type,
            architectures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_the_repository_are_refused() {
        for ok in ["model-00001-of-00002.safetensors", "sub/dir/x.safetensors"] {
            assert!(safe_relative(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a\\b",
            "./a",
        ] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }

    #[test]
    fn a_copy_is_complete_when_its_weights_are_there() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        assert_eq!(
            missing(p, Kind::Model),
            ["config.json", "tokenizer.json", "model.safetensors"]
        );
        for f in ["config.json", "tokenizer.json"] {
            std::fs::write(p.join(f), "{}").unwrap();
        }
        std::fs::write(
            p.join(INDEX),
            r#"{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(p.join("s1.safetensors"), "").unwrap();
        assert_eq!(missing(p, Kind::Model), ["s2.safetensors"]);
        std::fs::write(p.join("s2.safetensors"), "").unwrap();
        assert!(missing(p, Kind::Model).is_empty());
        assert_eq!(missing(p, Kind::Adapter), [ADAPTER_CONFIG, ADAPTER_WEIGHTS]);
    }

    #[test]
    fn other_architectures_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("config.json");
        std::fs::write(
            &c,
            r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}"#,
        )
        .unwrap();
        let e = check_qwen2("meta/llama", &c).unwrap_err().to_string();
        assert!(
            e.contains("meta/llama is not a Qwen2 model") && e.contains("\"llama\""),
            "{e}"
        );
        std::fs::write(&c, r#"{"model_type": "qwen2"}"#).unwrap();
        check_qwen2("q", &c).unwrap();
    }
}
