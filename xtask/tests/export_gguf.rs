//! `cargo xtask export` (GGUF for llama.cpp) and the library calls under it: the file reads back
//! through a checking GGUF reader (header, metadata types, alignment, offsets); its weights are
//! bit for bit the model `merge_all` produces; q8_0/f16/bf16 data is the encoding of those
//! weights; the LoRA adapter GGUF holds PEFT's factors; the tokenizer metadata equals
//! `tokenizer.json` (the real Qwen2.5 tokenizer, from the shared data); bad input fails with a
//! message naming the option or file, and leaves no file behind. llama.cpp itself is checked by
//! `scripts/check_gguf.py` (too slow to build for CI).

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::DType;
use gguf::{GgmlType, GgufFile, Value};
use qwen2::{CheckpointReader, GgufDtype, Qwen2ForCausalLM};
use test_support::{fixtures, read_safetensors, run, run_ok, shared_data_or_skip};

#[path = "common/small_model.rs"]
mod small_model;
use small_model::small_model;

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

/// The merged model as `cargo xtask merge` computes it: `(key, shape, f32 values)` per parameter.
fn merged_params(base: &Path, adapter: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let loaded = qwen2::load_model::<Flex>(base, DType::F32, &Default::default()).unwrap();
    let (mut model, _, _) = lora_core::load_adapter(loaded.model, adapter).unwrap();
    lora_core::merge_all(&mut model).unwrap();
    let mut out = Vec::new();
    lora_core::visit_params(&model, |p: lora_core::ParamRef<'_, Flex>| {
        if !p.is_adapter() {
            let v = p
                .flat()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap();
            out.push((p.path.to_string(), p.shape.to_vec(), v));
        }
    });
    out
}

/// Exports `base` (+ `adapter`, merged) through the library, with no tokenizer metadata.
fn export(base: &Path, adapter: Option<&Path>, dtype: GgufDtype, out: &Path) {
    let dev = Default::default();
    let ckpt = CheckpointReader::open::<Flex>(base, &dev).unwrap();
    let mut lazy = adapter.map(|a| {
        let m = Qwen2ForCausalLM::<Flex>::new(&ckpt.config, &dev);
        lora_core::load_adapter(m, a).unwrap().0
    });
    qwen2::export_gguf(&ckpt, lazy.as_mut(), "tiny", dtype, vec![], out, &dev).unwrap();
}

fn u32_of(f: &GgufFile, key: &str) -> u32 {
    match f.get(key) {
        Some(Value::U32(v)) => *v,
        other => panic!("{key}: expected a u32, got {other:?}"),
    }
}

#[test]
fn merged_gguf_reads_back_and_holds_the_merge_of_merge_all() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-untied-f32-sharded");
    let adapter = fixtures().join("peft-tiny-untied");
    let merged = merged_params(&base, &adapter);
    for (dtype, file_type) in [
        (GgufDtype::F32, 0),
        (GgufDtype::F16, 1),
        (GgufDtype::Bf16, 32),
        (GgufDtype::Q8_0, 7),
    ] {
        let path = tmp.path().join(format!("m-{dtype:?}.gguf"));
        export(&base, Some(&adapter), dtype, &path);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(
            f.get("general.architecture").and_then(Value::as_str),
            Some("qwen2")
        );
        assert_eq!(f.get("general.type").and_then(Value::as_str), Some("model"));
        assert_eq!(u32_of(&f, "general.file_type"), file_type);
        for (key, want) in [
            ("qwen2.block_count", 2),
            ("qwen2.context_length", 512),
            ("qwen2.embedding_length", 64),
            ("qwen2.feed_forward_length", 128),
            ("qwen2.attention.head_count", 4),
            ("qwen2.attention.head_count_kv", 2),
        ] {
            assert_eq!(u32_of(&f, key), want, "{key}");
        }
        assert_eq!(f.get("qwen2.rope.freq_base"), Some(&Value::F32(1e6)));
        assert_eq!(
            f.get("qwen2.attention.layer_norm_rms_epsilon"),
            Some(&Value::F32(1e-6))
        );
        // Alignment and offsets: each tensor starts where the previous one's padded data ends.
        assert_eq!((f.alignment, f.data_start % 32), (32, 0));
        let mut next = 0u64;
        for t in &f.tensors {
            assert_eq!(t.offset, next, "offset of {}", t.name);
            let n: usize = t.shape.iter().product();
            next = (t.offset + t.ty.bytes_for(n) as u64).div_ceil(32) * 32;
        }
        assert_eq!(f.data_start + next, f.len() as u64);
        // Every parameter, under llama.cpp's name, in order, with its PyTorch shape.
        let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), merged.len());
        assert_eq!(
            names[..3],
            [
                "token_embd.weight",
                "blk.0.attn_q.weight",
                "blk.0.attn_q.bias"
            ]
        );
        assert!(names.contains(&"blk.1.attn_k.bias") && names.contains(&"output.weight"));
        for (t, (key, shape, values)) in f.tensors.iter().zip(&merged) {
            assert_eq!(
                qwen2::gguf_tensor_name(key).as_deref(),
                Some(t.name.as_str())
            );
            assert_eq!(&t.shape, shape, "{key}");
            let want_ty = match (dtype, shape.len()) {
                (_, 1) | (GgufDtype::F32, _) => GgmlType::F32,
                (GgufDtype::F16, _) => GgmlType::F16,
                (GgufDtype::Bf16, _) => GgmlType::Bf16,
                (GgufDtype::Q8_0, _) => GgmlType::Q8_0,
            };
            assert_eq!(t.ty, want_ty, "{key}");
            // The bytes are the encoding of merge_all's weights: bit for bit in f32.
            let mut want = Vec::new();
            gguf::quant::encode(want_ty, values, &mut want);
            assert!(
                f.tensor_bytes(t) == want.as_slice(),
                "{key} ({dtype:?}) differs"
            );
        }
    }
}

#[test]
fn a_tied_model_has_no_output_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tied.gguf");
    export(
        &fixtures().join("tiny-tied-f32"),
        None,
        GgufDtype::F32,
        &path,
    );
    let f = GgufFile::open(&path).unwrap();
    assert!(f.tensor("token_embd.weight").is_some());
    assert!(f.tensor("output.weight").is_none());
    assert_eq!(f.tensors.len(), 1 + 2 * 12 + 1);
}

#[test]
fn gguf_lora_holds_peft_s_factors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-untied-f32-sharded");
    let adapter = fixtures().join("peft-tiny-untied");
    let out = tmp.path().join("a.gguf");
    run_ok(
        XTASK,
        [
            "export",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--format",
            "gguf-lora",
            "--dtype",
            "f32",
            "--output",
            s(&out),
        ],
    );
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(
        f.get("general.type").and_then(Value::as_str),
        Some("adapter")
    );
    assert_eq!(f.get("adapter.type").and_then(Value::as_str), Some("lora"));
    assert_eq!(f.get("adapter.lora.alpha"), Some(&Value::F32(32.0)));
    let peft = read_safetensors(&adapter.join("adapter_model.safetensors"));
    assert_eq!(f.tensors.len(), peft.len());
    for (key, (_, shape, bytes)) in &peft {
        // base_model.model.<module>.lora_A.weight -> <gguf name of module.weight>.lora_a
        let module = key
            .strip_prefix("base_model.model.")
            .and_then(|k| k.strip_suffix(".weight"))
            .unwrap();
        let (module, factor) = module.rsplit_once('.').unwrap();
        let name = format!(
            "{}.{}",
            qwen2::gguf_tensor_name(&format!("{module}.weight")).unwrap(),
            factor.to_lowercase()
        );
        let t = f.tensor(&name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!((&t.shape, t.ty), (shape, GgmlType::F32), "{name}");
        assert!(
            f.tensor_bytes(t) == bytes.as_slice(),
            "{name} differs from {key}"
        );
    }
}

/// The real Qwen2.5 tokenizer's metadata, written to a file and read back, equals its
/// tokenizer.json and tokenizer_config.json.
#[test]
fn tokenizer_metadata_equals_tokenizer_json() {
    let Some(data) = shared_data_or_skip("tokenizer_metadata_equals_tokenizer_json") else {
        return;
    };
    let tok_dir = data.join("qwen2.5-tokenizer");
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"bos_token_id": 151643, "eos_token_id": 151645}"#,
    )
    .unwrap();
    let vocab = 151_936;
    let meta = qwen2::tokenizer_metadata(&tok_dir, &config, vocab).unwrap();
    let path = tmp.path().join("tok.gguf");
    gguf::write_gguf(&path, &meta, &[], |_, _| unreachable!()).unwrap();
    let f = GgufFile::open(&path).unwrap();

    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tok_dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tok_dir.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let mut want: Vec<String> = (0..vocab).map(|i| format!("[PAD{i}]")).collect();
    for (t, id) in tj["model"]["vocab"].as_object().unwrap() {
        want[id.as_u64().unwrap() as usize] = t.clone();
    }
    for a in tj["added_tokens"].as_array().unwrap() {
        want[a["id"].as_u64().unwrap() as usize] = a["content"].as_str().unwrap().into();
    }
    let strings = |key: &str| -> Vec<String> {
        f.get(key)
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("{key} missing"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens");
    assert_eq!(tokens.len(), vocab);
    if let Some(i) = (0..vocab).find(|i| tokens[*i] != want[*i]) {
        panic!(
            "token {i}: {:?}, tokenizer.json has {:?}",
            tokens[i], want[i]
        );
    }
    let merges: Vec<String> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert!(strings("tokenizer.ggml.merges") == merges, "merges differ");
    let types: Vec<i32> = f
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|v| match v {
            Value::I32(t) => *t,
            other => panic!("token type {other:?}"),
        })
        .collect();
    let count = |t: i32| types.iter().filter(|x| **x == t).count();
    // 151643 BPE tokens; 14 special added tokens + 6 `<|fim_*|>`-style ones are control; the
    // `<tool_call>` pair user-defined; the 271 ids past the tokenizer unused.
    assert_eq!(
        (count(1), count(3), count(4), count(5)),
        (151_643, 20, 2, 271)
    );
    assert_eq!((types[151_645], types[151_657]), (3, 4));
    assert_eq!(
        f.get("tokenizer.ggml.model").and_then(Value::as_str),
        Some("gpt2")
    );
    assert_eq!(
        f.get("tokenizer.ggml.pre").and_then(Value::as_str),
        Some("qwen2")
    );
    assert_eq!(u32_of(&f, "tokenizer.ggml.eos_token_id"), 151_645); // tokenizer_config: <|im_end|>
    assert_eq!(u32_of(&f, "tokenizer.ggml.padding_token_id"), 151_643); // <|endoftext|>
    assert_eq!(u32_of(&f, "tokenizer.ggml.bos_token_id"), 151_643); // config.json (config's is null)
    assert_eq!(
        f.get("tokenizer.ggml.add_bos_token"),
        Some(&Value::Bool(false))
    );
    assert_eq!(
        f.get("tokenizer.chat_template").and_then(Value::as_str),
        tc["chat_template"].as_str()
    );

    // A model whose vocabulary the tokenizer overflows is refused, naming both.
    let err = qwen2::tokenizer_metadata(&tok_dir, &config, 256)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("vocabulary of 256"),
        "{err}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_command_exports_a_model_with_its_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = small_model(&tmp.path().join("small"));
    let out = tmp.path().join("small.gguf");
    let (stdout, _) = run_ok(
        XTASK,
        [
            "export",
            "--model",
            s(&model),
            "--dtype",
            "q8_0",
            "--output",
            s(&out),
        ],
    );
    assert!(
        stdout.contains("wrote") && stdout.contains("Q8_0"),
        "{stdout}"
    );
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(u32_of(&f, "general.file_type"), 7);
    let tokens = f
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(tokens.len(), 300);
    assert_eq!(tokens[99].as_str(), Some("<|im_end|>"));
    assert_eq!(tokens[100].as_str(), Some("[PAD100]"));
    let merges = f
        .get("tokenizer.ggml.merges")
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(
        merges,
        [Value::String("Ġ t".into()), Value::String("h e".into())]
    );
    assert_eq!(u32_of(&f, "tokenizer.ggml.eos_token_id"), 99);
    // hidden 32: every 2-D weight is whole q8_0 blocks.
    assert_eq!(
        f.tensor("blk.0.ffn_down.weight").unwrap().ty,
        GgmlType::Q8_0
    );
    assert_eq!(f.tensor("blk.0.attn_q.bias").unwrap().ty, GgmlType::F32);
}

#[test]
fn bad_inputs_fail_with_a_clear_message_and_leave_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    let small = small_model(&tmp.path().join("small"));
    let fixture = fixtures().join("tiny-untied-f32-sharded");
    let adapter = fixtures().join("peft-tiny-untied");
    let outdir = tmp.path().join("out");
    std::fs::create_dir(&outdir).unwrap();
    let out = outdir.join("x.gguf");
    let existing = outdir.join("existing.gguf");
    std::fs::write(&existing, b"keep").unwrap();
    let a_file = outdir.join("existing.gguf/x.gguf");
    // The built-in demo's kind of tokenizer: one token per character.
    let wordlevel = tmp.path().join("wordlevel");
    std::fs::create_dir(&wordlevel).unwrap();
    std::fs::write(
        wordlevel.join("tokenizer.json"),
        r#"{"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}"#,
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (
            vec!["--model", s(&small), "--dtype", "q4_0", "--output", s(&out)],
            &["--dtype \"q4_0\"", "f32, f16, bf16 or q8_0"],
        ),
        (
            vec![
                "--model",
                s(&small),
                "--format",
                "onnx",
                "--output",
                s(&out),
            ],
            &["--format \"onnx\"", "gguf-lora"],
        ),
        (
            vec![
                "--model",
                s(&fixture),
                "--adapter",
                s(&adapter),
                "--format",
                "gguf-lora",
                "--dtype",
                "q8_0",
                "--output",
                s(&out),
            ],
            &["--dtype q8_0 with --format gguf-lora", "f32, f16 or bf16"],
        ),
        (
            vec![
                "--model",
                s(&small),
                "--format",
                "gguf-lora",
                "--output",
                s(&out),
            ],
            &["needs --adapter"],
        ),
        (
            vec!["--model", s(&small), "--output", s(&existing)],
            &["existing.gguf exists", "never overwrites"],
        ),
        (
            vec!["--model", s(&small), "--output", s(&a_file)],
            &["--output", "does not exist"],
        ),
        (
            vec!["--model", s(&small), "--output", s(&outdir)],
            &["exists"],
        ),
        // An adapter trained on another base (hidden 64 on a hidden-32 model), both formats.
        (
            vec![
                "--model",
                s(&small),
                "--adapter",
                s(&adapter),
                "--output",
                s(&out),
            ],
            &["peft-tiny-untied", "trained on a different base model"],
        ),
        (
            vec![
                "--model",
                s(&small),
                "--adapter",
                s(&adapter),
                "--format",
                "gguf-lora",
                "--output",
                s(&out),
            ],
            &["trained on a different base model"],
        ),
        // A model directory without a tokenizer, and a tokenizer that is not byte-level BPE.
        (
            vec!["--model", s(&fixture), "--output", s(&out)],
            &["tokenizer.json", "--tokenizer DIR"],
        ),
        (
            vec![
                "--model",
                s(&small),
                "--tokenizer",
                s(&wordlevel),
                "--output",
                s(&out),
            ],
            &["tokenizer model is WordLevel", "byte-level BPE"],
        ),
    ];
    for (args, want) in cases {
        let (status, stdout, stderr) = run(XTASK, std::iter::once("export").chain(args.clone()));
        assert!(!status.success(), "{args:?} succeeded: {stdout}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        for w in want {
            assert!(stderr.contains(w), "{args:?}: `{w}` not in: {stderr}");
        }
        let left: Vec<_> = std::fs::read_dir(&outdir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["existing.gguf"], "{args:?} left files");
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
}

/// A bf16 base exported as bf16 holds exactly what `cargo xtask merge` writes for it: the f32
/// merge rounded once to bf16, byte for byte, tensor by tensor.
#[test]
fn bf16_export_equals_merge_s_bf16_output() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-untied-bf16");
    let adapter = fixtures().join("peft-tiny-untied");
    let merged = tmp.path().join("merged");
    run_ok(
        XTASK,
        [
            "merge",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--output",
            s(&merged),
        ],
    );
    let path = tmp.path().join("m.gguf");
    export(&base, Some(&adapter), GgufDtype::Bf16, &path);
    let f = GgufFile::open(&path).unwrap();
    let st = read_safetensors(&merged.join("model.safetensors"));
    let mut compared = 0;
    for (key, (dtype, shape, bytes)) in &st {
        let t = f.tensor(&qwen2::gguf_tensor_name(key).unwrap()).unwrap();
        if shape.len() == 2 {
            assert_eq!(format!("{dtype:?}"), "BF16");
            assert!(
                f.tensor_bytes(t) == bytes.as_slice(),
                "{key} differs from merge's"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 1 + 2 * 7 + 1);
}

/// LoRA's variants: the merged GGUF of a `lora_bias` adapter holds merge_all's biases (and
/// weights), bit for bit in f32, and so does a DoRA adapter's; llama.cpp's LoRA format cannot hold
/// DoRA magnitudes or lora_B biases, so `--format gguf-lora` refuses both in one line that names
/// them and says to export the merged model; so does it for modules_to_save and trained token
/// rows (whole tensors), which the merged export writes (equal to merge_all's). A PiSSA/OLoRA
/// adapter (whose factors apply to the base's residual) is refused by both formats, pointing to
/// `cargo xtask merge`.
#[test]
fn variant_adapters_merge_into_gguf_and_are_refused_as_gguf_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-untied-f32-sharded");
    let ckpt = CheckpointReader::open::<Flex>(&base, &Default::default()).unwrap();
    for variant in [
        "peft-lora-bias",
        "peft-dora",
        "peft-modules-to-save",
        "peft-trainable-tokens",
    ] {
        let adapter = fixtures().join(variant);
        let merged = merged_params(&base, &adapter);
        let path = tmp.path().join(format!("{variant}.gguf"));
        export(&base, Some(&adapter), GgufDtype::F32, &path);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.tensors.len(), merged.len(), "{variant}");
        let mut changed_biases = 0;
        for (key, shape, values) in &merged {
            let t = f
                .tensor(&qwen2::gguf_tensor_name(key).unwrap())
                .unwrap_or_else(|| panic!("{variant}: {key} missing"));
            assert_eq!(&t.shape, shape, "{variant}: {key}");
            let mut want = Vec::new();
            gguf::quant::encode(GgmlType::F32, values, &mut want);
            assert!(
                f.tensor_bytes(t) == want.as_slice(),
                "{variant}: {key} differs from merge_all's"
            );
            if key.ends_with(".bias") && ckpt.read_f32(key).unwrap() != *values {
                changed_biases += 1;
            }
        }
        // The fixture's lora_bias adapter targets q, k and v of both layers; DoRA leaves biases.
        let want_changed = if variant == "peft-lora-bias" { 6 } else { 0 };
        assert_eq!(changed_biases, want_changed, "{variant}");
        if variant == "peft-modules-to-save" || variant == "peft-trainable-tokens" {
            // The trained table (or rows) replaced the base's in the file (equal to merge_all's
            // above, and not the base's).
            let key = "model.embed_tokens.weight";
            let t = f.tensor(&qwen2::gguf_tensor_name(key).unwrap()).unwrap();
            let mut base_bytes = Vec::new();
            gguf::quant::encode(GgmlType::F32, &ckpt.read_f32(key).unwrap(), &mut base_bytes);
            assert!(
                f.tensor_bytes(t) != base_bytes.as_slice(),
                "{variant}: embedding unchanged"
            );
            continue; // their gguf-lora refusal is checked below
        }

        let out = tmp.path().join(format!("{variant}-lora.gguf"));
        let (status, stdout, stderr) = run(
            XTASK,
            [
                "export",
                "--model",
                s(&base),
                "--adapter",
                s(&adapter),
                "--format",
                "gguf-lora",
                "--output",
                s(&out),
            ],
        );
        assert_eq!(status.code(), Some(1), "{variant}: {stdout}\n{stderr}");
        let what = if variant == "peft-dora" {
            "DoRA magnitudes (use_dora)"
        } else {
            "lora_B biases (lora_bias)"
        };
        assert!(
            stderr.trim().lines().count() == 1
                && stderr.contains(what)
                && stderr.contains("export the merged model instead"),
            "{variant}: {stderr}"
        );
        assert!(!out.exists(), "{variant}: left {}", out.display());
    }

    let small = small_model(&tmp.path().join("small"));
    for (format, fixture, needle) in [
        ("gguf", "peft-pissa", "init_lora_weights \"pissa\""),
        ("gguf-lora", "peft-pissa", "init_lora_weights \"pissa\""),
        ("gguf-lora", "peft-modules-to-save", "modules_to_save"),
        (
            "gguf-lora",
            "peft-trainable-tokens",
            "trainable_token_indices",
        ),
    ] {
        let adapter = fixtures().join(fixture);
        let out = tmp.path().join(format!("{fixture}-{format}.gguf"));
        let (status, stdout, stderr) = run(
            XTASK,
            [
                "export",
                "--model",
                s(&base),
                "--tokenizer",
                s(&small),
                "--adapter",
                s(&adapter),
                "--format",
                format,
                "--output",
                s(&out),
            ],
        );
        assert_eq!(
            status.code(),
            Some(1),
            "{fixture} {format}: {stdout}\n{stderr}"
        );
        let hint = if fixture == "peft-pissa" {
            "cargo xtask merge"
        } else {
            "export the merged model instead"
        };
        assert!(
            stderr.trim().lines().count() == 1 && stderr.contains(needle) && stderr.contains(hint),
            "{fixture} {format}: {stderr}"
        );
        assert!(!out.exists(), "{fixture} {format}: left {}", out.display());
    }
}
