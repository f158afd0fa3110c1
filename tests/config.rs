//! `Qwen2Config` against real `config.json` files (transformers 4.x layout, from ../shared) and the
//! transformers-5 layout (the fixtures), plus `validate()`'s rejections.

use qwen2::{Qwen2Config, Qwen2Error};
use test_support::{fixtures, shared_data_or_skip};

#[test]
fn real_qwen25_configs_parse() {
    let Some(shared) = shared_data_or_skip("real_qwen25_configs_parse") else {
        return;
    };
    let dir = shared.join("qwen2.5-configs");
    let c7 = Qwen2Config::from_file(&dir.join("Qwen2.5-7B-Instruct/config.json")).unwrap();
    assert_eq!(
        (
            c7.hidden_size,
            c7.intermediate_size,
            c7.num_hidden_layers,
            c7.vocab_size
        ),
        (3584, 18944, 28, 152064)
    );
    assert_eq!(
        (
            c7.num_attention_heads,
            c7.num_key_value_heads(),
            c7.head_dim()
        ),
        (28, 4, 128)
    );
    assert!(!c7.tie_word_embeddings);
    assert_eq!(c7.rope_theta(), 1e6);
    assert_eq!(c7.rms_norm_eps, 1e-6);
    assert_eq!(c7.storage_dtype(), Some("bfloat16"));
    assert_eq!(c7.sliding_window, Some(131072));
    // transformers counts 7,615,616,512 (Qwen2ForCausalLM on the meta device, 2026-11-28).
    assert_eq!(c7.num_parameters(), 7_615_616_512);

    let c05 = Qwen2Config::from_file(&dir.join("Qwen2.5-0.5B-Instruct/config.json")).unwrap();
    assert_eq!(
        (c05.hidden_size, c05.num_hidden_layers, c05.head_dim()),
        (896, 24, 64)
    );
    assert!(c05.tie_word_embeddings);
    // transformers counts 494,032,768 (meta device; the tied head counted once).
    assert_eq!(c05.num_parameters(), 494_032_768);
}

#[test]
fn transformers5_layout_parses() {
    // As written by transformers 5: rope_parameters, dtype, sliding_window null, layer_types.
    let c = Qwen2Config::from_file(&fixtures().join("tiny-tied-f32/config.json")).unwrap();
    assert_eq!(c.rope_theta(), 1e6);
    assert_eq!(c.sliding_window, None);
    assert_eq!(c.storage_dtype(), Some("float32"));
    let text = r#"{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
        "intermediate_size": 8, "vocab_size": 10, "rope_parameters": {"rope_theta": 5e5,
        "rope_type": "default"}, "sliding_window": null, "dtype": "bfloat16", "future_key": [1, 2]}"#;
    let c = Qwen2Config::from_json_str(text).unwrap();
    assert_eq!(c.rope_theta(), 5e5);
    assert_eq!(
        c.num_key_value_heads(),
        4,
        "defaults to num_attention_heads"
    );
    assert_eq!(c.storage_dtype(), Some("bfloat16"));
}

fn invalid(json: &str) -> String {
    match Qwen2Config::from_json_str(json) {
        Err(e @ Qwen2Error::InvalidConfig { .. }) => e.to_string(),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn impossible_configs_are_rejected_with_reason() {
    // A valid config with the fields of `extra` (a JSON object's inner text) overriding.
    let base = |extra: &str| {
        let mut v: serde_json::Value = serde_json::from_str(
            r#"{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10}"#,
        )
        .unwrap();
        let over: serde_json::Value =
            serde_json::from_str(&format!("{{{}}}", &extra[1..])).unwrap();
        for (k, x) in over.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string()
    };
    assert!(Qwen2Config::from_json_str(&base(",")).is_ok());
    let e = invalid(&base(r#", "num_attention_heads": 5"#));
    assert!(
        e.contains("hidden_size") && e.contains("num_attention_heads"),
        "{e}"
    );
    let e = invalid(&base(r#", "num_key_value_heads": 3"#));
    assert!(e.contains("num_key_value_heads"), "{e}");
    let e = invalid(&base(r#", "vocab_size": 0"#));
    assert!(e.contains("vocab_size"), "{e}");
    let e = invalid(&base(r#", "hidden_act": "gelu""#));
    assert!(e.contains("silu"), "{e}");
    let e = invalid(&base(r#", "use_sliding_window": true"#));
    assert!(e.contains("sliding"), "{e}");
    let e = invalid(&base(
        r#", "rope_scaling": {"type": "yarn", "factor": 4.0}"#,
    ));
    assert!(e.contains("rope_scaling"), "{e}");
    let e = invalid(&base(r#", "model_type": "llama""#));
    assert!(e.contains("llama"), "{e}");
    let e = invalid(&base(r#", "rms_norm_eps": 0.0"#));
    assert!(e.contains("rms_norm_eps"), "{e}");
}

#[test]
fn malformed_config_names_field() {
    let e = Qwen2Config::from_json_str(r#"{"hidden_size": "big"}"#).unwrap_err();
    assert!(matches!(e, Qwen2Error::ConfigParse { .. }));
    assert!(e.to_string().contains("invalid type"), "{e}");
    let e = Qwen2Config::from_json_str("{not json").unwrap_err();
    assert!(matches!(e, Qwen2Error::ConfigParse { .. }), "{e}");
}
