//! lora-core's `LoraConfig::from_json_str` (PEFT `adapter_config.json`: parse + `validate()`) on
//! arbitrary bytes, then what applying an accepted config reads from it: per-module rank, alpha and
//! scaling (`rank_pattern`/`alpha_pattern` regexes) and target matching. Must give `Ok` or a
//! `LoraError`, never a panic; an accepted config must serialize and parse back as accepted.
//!
//! Input: byte 0 picks the mode (`% 2`); the rest is the file.
//! 0. parse, validate and query the config alone;
//! 1. also `load_adapter` it onto a tiny lazily built Qwen2 (the `safetensors_header` model) next to
//!    a valid `adapter_model.safetensors` (r = 2 on q_proj and v_proj): whatever the config claims,
//!    the load must fail cleanly (run with `-malloc_limit_mb`: nothing it claims may be allocated
//!    before it is checked against the file).
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use burn::backend::Flex;
use libfuzzer_sys::fuzz_target;
use lora_core::{is_targeted, load_adapter, LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use qwen2::{Qwen2Config, Qwen2ForCausalLM};

/// Module paths as a Qwen2 model lists them.
const PATHS: [&str; 3] = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.11.mlp.down_proj",
    "lm_head",
];
const MODEL_CONFIG: &str = include_str!("../fixtures/config.json");
const ADAPTER: &[u8] = include_bytes!("../fixtures/adapter_model.safetensors");

/// One adapter directory per fuzzing process; the weights are written once.
fn adapter_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(ADAPTER_WEIGHTS), ADAPTER).expect("write adapter");
        dir
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match LoraConfig::from_json_str(&text) {
        Ok(cfg) => {
            for path in PATHS {
                assert!(cfg.rank_for(path) >= 1);
                assert!(cfg.alpha_for(path).is_finite());
                let _ = cfg.scaling_for(path);
                let _ = is_targeted(&cfg, path, Some("lm_head"));
            }
            let again = serde_json::to_string(&cfg).expect("serialize");
            if let Err(e) = LoraConfig::from_json_str(&again) {
                panic!("accepted config does not parse back: {e}\n{again}");
            }
        }
        Err(e) => drop(e.to_string()),
    }
    if pick % 2 == 1 {
        let dir = adapter_dir();
        std::fs::write(dir.join(ADAPTER_CONFIG), text.as_bytes()).expect("write config");
        let cfg = Qwen2Config::from_json_str(MODEL_CONFIG).expect("tiny config");
        let model = Qwen2ForCausalLM::<Flex>::new(&cfg, &Default::default());
        match load_adapter(model, dir) {
            Ok((_, _, report)) => drop(format!("{report:?}")),
            Err(e) => drop(e.to_string()),
        }
    }
});
