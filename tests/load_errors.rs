//! Every way a checkpoint can be wrong gets an error naming the file, the key and the shapes.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use ferrolora::Cpu;
use qwen2::{load_model, resolve_model_dir, LoadedModel, Qwen2Error};
use safetensors::Dtype;
use test_support::{copy_dir_files, fixtures, read_safetensors, write_safetensors};

fn load(dir: &Path) -> Result<LoadedModel<Cpu>, Qwen2Error> {
    load_model::<Cpu>(dir, DType::F32, &Default::default())
}

/// A private copy of a fixture directory.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    copy_dir_files(&fixtures().join(name), &dst);
    (tmp, dst)
}

fn err(dir: &Path) -> (Qwen2Error, String) {
    let e = load(dir).expect_err("load should fail");
    let msg = e.to_string();
    (e, msg)
}

#[test]
fn missing_directory() {
    let (e, msg) = err(Path::new("no/such/model-dir"));
    assert!(matches!(e, Qwen2Error::ModelNotFound { .. }), "{msg}");
    assert!(
        msg.contains("no/such/model-dir") && msg.contains("config.json"),
        "{msg}"
    );
}

#[test]
fn directory_without_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (e, msg) = err(tmp.path());
    assert!(matches!(e, Qwen2Error::ModelNotFound { .. }), "{msg}");
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn config_without_weights() {
    let (_t, dir) = copy_fixture("tiny-tied-f32");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::NoWeights { .. }), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn impossible_config_in_directory_names_file() {
    let (_t, dir) = copy_fixture("tiny-tied-f32");
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = cfg.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 6");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::InvalidConfig { .. }), "{msg}");
    assert!(
        msg.contains("config.json") && msg.contains("num_attention_heads"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors() {
    let (_t, dir) = copy_fixture("tiny-tied-f32");
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1000]).unwrap();
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::BadSafetensors { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn corrupt_header() {
    let (_t, dir) = copy_fixture("tiny-tied-f32");
    let f = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8..24].copy_from_slice(b"this is not json");
    std::fs::write(&f, &bytes).unwrap();
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::BadSafetensors { .. }), "{msg}");

    // A header length far beyond the file.
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::BadSafetensors { .. }), "{msg}");

    // Not even 8 bytes.
    std::fs::write(&f, b"abc").unwrap();
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::BadSafetensors { .. }), "{msg}");
}

#[test]
fn missing_tensor_names_key_and_shape() {
    let (_t, dir) = copy_fixture("tiny-tied-f32");
    let f = dir.join("model.safetensors");
    let mut t = read_safetensors(&f);
    t.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    write_safetensors(&f, &t);
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains("model.layers.1.mlp.up_proj.weight") && msg.contains("[128, 64]"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_names_key_file_and_both_shapes() {
    let (_t, dir) = copy_fixture("tiny-tied-f32");
    let f = dir.join("model.safetensors");
    let mut t = read_safetensors(&f);
    let e = t.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap();
    e.1 = vec![64, 32]; // same byte count, transposed-looking shape
    write_safetensors(&f, &t);
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("k_proj.weight") && msg.contains("[64, 32]") && msg.contains("[32, 64]"),
        "{msg}"
    );
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn unexpected_tensor_is_an_error() {
    let (_t, dir) = copy_fixture("tiny-tied-f32");
    let f = dir.join("model.safetensors");
    let mut t = read_safetensors(&f);
    t.insert(
        "model.layers.2.mlp.up_proj.weight".into(),
        (Dtype::F32, vec![2], vec![0; 8]),
    );
    write_safetensors(&f, &t);
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::UnexpectedTensor { .. }), "{msg}");
    assert!(msg.contains("model.layers.2.mlp.up_proj.weight"), "{msg}");
}

#[test]
fn unsupported_dtype() {
    let (_t, dir) = copy_fixture("tiny-tied-f32");
    let f = dir.join("model.safetensors");
    let mut t = read_safetensors(&f);
    t.get_mut("model.norm.weight").unwrap().0 = Dtype::I32;
    write_safetensors(&f, &t);
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::UnsupportedDtype { .. }), "{msg}");
    assert!(
        msg.contains("model.norm.weight") && msg.contains("I32"),
        "{msg}"
    );
}

#[test]
fn index_naming_missing_shard() {
    let (_t, dir) = copy_fixture("tiny-untied-f32-sharded");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::MissingShard { .. }), "{msg}");
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");

    std::fs::write(
        dir.join("model.safetensors.index.json"),
        "{\"weight_map\": 3}",
    )
    .unwrap();
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::BadIndex { .. }), "{msg}");
}

#[test]
fn duplicate_tensor_across_shards() {
    let (_t, dir) = copy_fixture("tiny-untied-f32-sharded");
    let f1 = dir.join("model-00001-of-00002.safetensors");
    let f2 = dir.join("model-00002-of-00002.safetensors");
    let (t1, mut t2) = (read_safetensors(&f1), read_safetensors(&f2));
    let (k, v) = t1.iter().next().unwrap();
    t2.insert(k.clone(), v.clone());
    write_safetensors(&f2, &t2);
    let (e, msg) = err(&dir);
    assert!(matches!(e, Qwen2Error::DuplicateTensor { .. }), "{msg}");
    assert!(msg.contains(k.as_str()), "{msg}");
}

#[test]
fn tied_checkpoint_with_lm_head_is_loaded_and_reports_it() {
    let (_t, dir) = copy_fixture("tiny-tied-f32");
    let f = dir.join("model.safetensors");
    let mut t = read_safetensors(&f);
    let emb = t["model.embed_tokens.weight"].clone();
    t.insert("lm_head.weight".into(), emb);
    t.insert(
        "model.rotary_emb.inv_freq".into(),
        (Dtype::F32, vec![8], vec![0; 32]),
    );
    write_safetensors(&f, &t);
    let m = load(&dir).unwrap();
    assert_eq!(
        m.report.ignored,
        vec!["lm_head.weight", "model.rotary_emb.inv_freq"]
    );
}

#[test]
fn resolves_hub_and_modelscope_caches() {
    let tmp = tempfile::tempdir().unwrap();
    // Hugging Face hub cache: models--Org--Name/{refs/main, snapshots/<rev>/...}
    let repo = tmp.path().join("hub/models--Qwen--Tiny-Instruct");
    let snap = repo.join("snapshots/0123abc");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abc\n").unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-tied-f32").join(f), snap.join(f)).unwrap();
    }
    assert_eq!(resolve_model_dir(&repo).unwrap(), snap);
    assert!(load(&repo).is_ok());

    // ModelScope layout: <cache>/qwen/Qwen2___5-Tiny (newer versions write '.' as '___').
    let ms = tmp.path().join("modelscope/qwen/Qwen2___5-Tiny");
    std::fs::create_dir_all(&ms).unwrap();
    std::fs::copy(
        fixtures().join("tiny-tied-f32/config.json"),
        ms.join("config.json"),
    )
    .unwrap();

    // Repo ids resolve through the cache variables (this is the only test that sets them).
    std::env::set_var("HF_HUB_CACHE", tmp.path().join("hub"));
    std::env::set_var("MODELSCOPE_CACHE", tmp.path().join("modelscope"));
    assert_eq!(
        resolve_model_dir(Path::new("Qwen/Tiny-Instruct")).unwrap(),
        snap
    );
    assert_eq!(
        resolve_model_dir(Path::new("qwen/Qwen2.5-Tiny")).unwrap(),
        ms
    );
    assert!(resolve_model_dir(Path::new("Qwen/Absent")).is_err());
}
