//! The tokenizer as llama.cpp's GGUF metadata, what `convert_hf_to_gguf.py` writes for Qwen2
//! (`_set_vocab_gpt2` + `gguf.SpecialVocab`), read from the Hugging Face files directly:
//!
//! - `tokenizer.ggml.model = gpt2` (byte-level BPE), `tokenizer.ggml.pre = qwen2` (its
//!   pre-tokenizer regex);
//! - `tokens`: one per id up to config.json's `vocab_size` (ids without a token, the padding of
//!   the embedding, become `[PAD{id}]`); `token_type`: 1 normal, 3 control (an added token marked
//!   special, or looking like `<|...|>`), 4 user-defined (another added token), 5 unused (padding);
//! - `merges` as `"left right"` strings (a pair-list `tokenizer.json` is joined, a space inside a
//!   part written as `Ġ`, as the converter does);
//! - special token ids: `tokenizer_config.json`'s `{bos,eos,unk,sep,pad,cls,mask}_token` looked up
//!   among the added tokens, else config.json's `*_token_id`; its `add_*_token` flags;
//! - `tokenizer.chat_template` from `tokenizer_config.json` (else `chat_template.json`, else
//!   `chat_template.jinja`).

use std::collections::HashMap;
use std::path::Path;

use gguf::Value;
use serde_json::Value as Json;

use crate::error::Qwen2Error;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// `SpecialVocab.special_token_types` and the key each one is written under.
const SPECIALS: [(&str, &str); 7] = [
    ("bos", "bos_token_id"),
    ("eos", "eos_token_id"),
    ("unk", "unknown_token_id"),
    ("sep", "seperator_token_id"), // sic: llama.cpp's key
    ("pad", "padding_token_id"),
    ("cls", "cls_token_id"),
    ("mask", "mask_token_id"),
];

fn read_json(path: &Path) -> Result<Json, Qwen2Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Qwen2Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Qwen2Error::Tokenizer {
        path: path.to_path_buf(),
        reason: format!("not valid JSON ({e})"),
    })
}

/// The tokenizer metadata of a GGUF file for a model of `vocab_size` ids, from `tok_dir`
/// (`tokenizer.json`, `tokenizer_config.json`, ...) and `config_json` (the model's config, for
/// special ids the tokenizer files do not name).
pub fn tokenizer_metadata(
    tok_dir: &Path,
    config_json: &Path,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>, Qwen2Error> {
    let tok_path = tok_dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(Qwen2Error::Tokenizer {
            path: tok_path,
            reason: "not found: GGUF embeds the tokenizer; pass --tokenizer DIR (a directory with \
                     the model's tokenizer.json and tokenizer_config.json)"
                .into(),
        });
    }
    let tok = read_json(&tok_path)?;
    let bad = |reason: String| Qwen2Error::Tokenizer {
        path: tok_path.clone(),
        reason,
    };
    let model = &tok["model"];
    match model["type"].as_str() {
        Some("BPE") => {}
        other => {
            return Err(bad(format!(
                "the tokenizer model is {}; GGUF export writes llama.cpp's `gpt2` tokenizer, a \
                 byte-level BPE as Qwen2's: pass --tokenizer DIR with the model's own tokenizer.json",
                other.unwrap_or("missing")
            )))
        }
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("`model.vocab` is not an object of token → id".into()))?;
    // id → (token, type)
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::with_capacity(vocab.len());
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("`model.vocab` gives token {token:?} the id {id}")))?;
        by_id.insert(id as usize, (token.clone(), NORMAL));
    }
    let added: Vec<&Json> = tok["added_tokens"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    for a in &added {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(bad(format!(
                "an `added_tokens` entry has no id or content: {a}"
            )));
        };
        let special = a["special"].as_bool().unwrap_or(false);
        let ty = if special || looks_special(content) {
            CONTROL
        } else {
            USER_DEFINED
        };
        by_id.insert(id as usize, (content.to_string(), ty));
    }
    if let Some(max) = by_id.keys().max().filter(|m| **m >= vocab_size) {
        return Err(bad(format!(
            "token id {max} is outside the model's vocabulary of {vocab_size} (config.json \
             `vocab_size`): this tokenizer is not the model's; pass --tokenizer DIR with its own"
        )));
    }
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for id in 0..vocab_size {
        match by_id.remove(&id) {
            Some((t, ty)) => {
                tokens.push(t);
                types.push(ty);
            }
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(UNUSED);
            }
        }
    }
    let merges = merges(&model["merges"]).ok_or_else(|| {
        bad("`model.merges` is neither a list of \"a b\" strings nor of [a, b] pairs".into())
    })?;

    let mut meta = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), Value::strings(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::i32s(types)),
        ("tokenizer.ggml.merges".into(), Value::strings(merges)),
    ];

    let tc_path = tok_dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() {
        read_json(&tc_path)?
    } else {
        Json::Null
    };
    let config = if config_json.is_file() {
        read_json(config_json)?
    } else {
        Json::Null
    };
    let mut adds = Vec::new();
    for (typ, key) in SPECIALS {
        // The converter looks the name up among the added tokens only, then falls back to config.json.
        let named = match &tc[format!("{typ}_token")] {
            Json::String(s) => Some(s.as_str()),
            Json::Object(o) => o.get("content").and_then(Json::as_str),
            _ => None,
        };
        let from_tokenizer = named.and_then(|n| {
            added
                .iter()
                .find(|a| a["content"].as_str() == Some(n))
                .and_then(|a| a["id"].as_u64())
        });
        let from_config = match &config[format!("{typ}_token_id")] {
            Json::Number(n) => n.as_u64(),
            Json::Array(v) => v.first().and_then(Json::as_u64),
            _ => None,
        };
        if let Some(id) = from_tokenizer
            .or(from_config)
            .filter(|id| (*id as usize) < vocab_size)
        {
            meta.push((format!("tokenizer.ggml.{key}"), Value::U32(id as u32)));
        }
        if let Some(add) = tc[format!("add_{typ}_token")].as_bool() {
            adds.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(add)));
        }
    }
    meta.extend(adds);
    if let Some(t) = chat_template(tok_dir, &tc)? {
        meta.extend(t);
    }
    Ok(meta)
}

/// `SpecialVocab`'s `does_token_look_special` for the shapes Qwen2's tokenizers use.
fn looks_special(t: &str) -> bool {
    (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Merges as `"a b"` strings; pairs are joined with a space, a space inside a part written as
/// U+0120 (`Ġ`, space + 256), as the converter does.
fn merges(m: &Json) -> Option<Vec<String>> {
    let items = m.as_array()?;
    items
        .iter()
        .map(|x| match x {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) if p.len() == 2 => {
                let part = |v: &Json| v.as_str().map(|s| s.replace(' ', "\u{120}"));
                Some(format!("{} {}", part(&p[0])?, part(&p[1])?))
            }
            _ => None,
        })
        .collect()
}

/// `tokenizer.chat_template` (and, for a list of named templates, `tokenizer.chat_template.NAME`).
fn chat_template(dir: &Path, tc: &Json) -> Result<Option<Vec<(String, Value)>>, Qwen2Error> {
    let key = "tokenizer.chat_template".to_string();
    let from = |t: &Json| -> Option<Vec<(String, Value)>> {
        match t {
            Json::String(s) => Some(vec![(key.clone(), Value::String(s.clone()))]),
            Json::Array(named) => Some(
                named
                    .iter()
                    .filter_map(|e| Some((e["name"].as_str()?, e["template"].as_str()?)))
                    .map(|(n, t)| {
                        let k = if n == "default" {
                            key.clone()
                        } else {
                            format!("{key}.{n}")
                        };
                        (k, Value::String(t.to_string()))
                    })
                    .collect(),
            ),
            _ => None,
        }
    };
    if let Some(t) = from(&tc["chat_template"]) {
        return Ok(Some(t));
    }
    let json = dir.join("chat_template.json");
    if json.is_file() {
        if let Some(t) = from(&read_json(&json)?["chat_template"]) {
            return Ok(Some(t));
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja).map_err(|e| Qwen2Error::io(&jinja, e))?;
        return Ok(Some(vec![(key, Value::String(t))]));
    }
    Ok(None)
}
