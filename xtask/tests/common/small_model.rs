//! A small Qwen2 model (vocab 300, hidden 32, random weights) with a byte-level BPE tokenizer, for
//! the tests of `cargo xtask export` (the fixtures have no tokenizer; the demo's is character-level).

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use qwen2::{Qwen2Config, Qwen2ForCausalLM};

/// A small model (vocab 300, hidden 32) with a byte-level BPE tokenizer: printable ASCII and
/// ChatML's specials, a few merges.
pub fn small_model(dir: &Path) -> PathBuf {
    let cfg = Qwen2Config::new(300, 32, 64, 1, 2, 1, false);
    let model = Qwen2ForCausalLM::<Flex>::new(&cfg, &Default::default());
    qwen2::save_model(&model, &cfg, dir).unwrap();
    let mut vocab = serde_json::Map::new();
    for b in b'!'..=b'~' {
        vocab.insert((b as char).to_string(), (b - b'!').into());
    }
    vocab.insert("Ġ".into(), 94.into());
    vocab.insert("Ġt".into(), 95.into());
    vocab.insert("he".into(), 96.into());
    let tok = serde_json::json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 97, "content": "<|endoftext|>", "special": true},
            {"id": 98, "content": "<|im_start|>", "special": true},
            {"id": 99, "content": "<|im_end|>", "special": true},
        ],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": [["Ġ", "t"], "h e"]},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": false,
            "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}"#,
    )
    .unwrap();
    dir.to_path_buf()
}
