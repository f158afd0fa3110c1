//! qwen2's checkpoint loading on arbitrary weight files: `weight_files` (the shard index),
//! the safetensors header (length field, header JSON, dtypes, shapes, data offsets, file length)
//! and the import into a lazily built model, through the public `load_model`. Must give `Ok` or a
//! `Qwen2Error`, never a panic, and never allocate what a header merely claims (the model is tiny:
//! anything big is a bug; run with `-rss_limit_mb`/`-malloc_limit_mb`).
//!
//! Input: byte 0 picks what the rest is (`% 3`) and the dtype to load as (`/ 3 % 3`):
//! 0. the whole `model.safetensors`;
//! 1. two little-endian bytes of data length, then the header JSON: the file is the 8-byte length
//!    field, the header and that many zero bytes (so the fuzzer can change the JSON alone);
//! 2. `model.safetensors.index.json`, next to two valid shards of the tiny model.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use burn::backend::Flex;
use burn::tensor::DType;
use libfuzzer_sys::fuzz_target;
use qwen2::load_model;

/// A 1-layer tied Qwen2 (vocab 8, hidden 4, 2 heads of 2, 1 KV head): 14 tensors, 196 floats.
const CONFIG: &str = include_str!("../fixtures/config.json");
const SHARD_1: &[u8] = include_bytes!("../fixtures/model-00001-of-00002.safetensors");
const SHARD_2: &[u8] = include_bytes!("../fixtures/model-00002-of-00002.safetensors");
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// One model directory per fuzzing process: the config and both shards are written once.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path();
        std::fs::write(p.join("config.json"), CONFIG).expect("write config");
        std::fs::write(p.join("model-00001-of-00002.safetensors"), SHARD_1).expect("shard");
        std::fs::write(p.join("model-00002-of-00002.safetensors"), SHARD_2).expect("shard");
        dir
    })
    .path()
}

fn put(dir: &Path, name: &str, bytes: Option<&[u8]>) {
    let path = dir.join(name);
    match bytes {
        Some(b) => std::fs::write(path, b).expect("write scratch file"),
        None => {
            let _ = std::fs::remove_file(path);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let dir = model_dir();
    match pick % 3 {
        0 => {
            put(dir, INDEX, None);
            put(dir, SINGLE, Some(rest));
        }
        1 => {
            let Some((len, header)) = rest.split_first_chunk::<2>() else {
                return;
            };
            let mut file = (header.len() as u64).to_le_bytes().to_vec();
            file.extend_from_slice(header);
            file.resize(file.len() + usize::from(u16::from_le_bytes(*len)), 0);
            put(dir, INDEX, None);
            put(dir, SINGLE, Some(&file));
        }
        _ => {
            put(dir, SINGLE, None);
            put(dir, INDEX, Some(rest));
        }
    }
    let dtype = [DType::F32, DType::BF16, DType::F16][usize::from(pick / 3 % 3)];
    let result = load_model::<Flex>(dir, dtype, &Default::default());
    if std::env::var_os("FUZZ_SHOW").is_some() {
        eprintln!("{:?}", result.as_ref().map(|m| &m.report));
    }
    match result {
        Ok(loaded) => assert_eq!(loaded.report.tensors, 14),
        Err(e) => drop(e.to_string()),
    }
});
