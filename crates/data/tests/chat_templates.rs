//! Multi-turn sharegpt / messages / alpaca-with-history samples against the real tokenizer's
//! `apply_chat_template` (`qwen`) and the tutorial's prompt/response split (`seed`).
//! Reference: scripts/make_data_fixtures.py → tests/fixtures/data/chat_reference.json.

mod common;

use common::*;
use lora_data::{
    load_dataset, prepare, Format, PrepareOptions, SkipReason, Template, IGNORE_INDEX,
    SEED_DEFAULT_SYSTEM,
};
use test_support::{read_json, shared_data_or_skip};

const FILES: [(&str, Format); 3] = [
    ("chat_sharegpt.json", Format::ShareGpt),
    ("chat_messages.jsonl", Format::Messages),
    ("alpaca_history.jsonl", Format::Alpaca),
];

fn check(template: Template) {
    let Some(shared) = shared_data_or_skip(&format!("the {} template check", template.name()))
    else {
        return;
    };
    let tok = tokenizer(&shared);
    let reference: serde_json::Value = read_json(&fixtures().join("chat_reference.json"));
    for (file, format) in FILES {
        let ds = load_dataset(&fixtures().join(file), None).unwrap();
        assert_eq!(ds.format, format, "{file}: detected format");
        let opts = PrepareOptions {
            template,
            system: (template == Template::Seed).then(|| SEED_DEFAULT_SYSTEM.to_string()),
            max_length: 4096,
        };
        let p = prepare(&ds.conversations, &tok, &opts).unwrap();
        let want = reference[file][template.name()].as_array().unwrap();
        assert_eq!(p.examples.len(), want.len(), "{file}: example count");
        for (i, (got, want)) in p.examples.iter().zip(want).enumerate() {
            assert_example_eq(
                &format!("{file} {} record {i}", template.name()),
                got,
                &example_from(want),
            );
        }
    }
}

#[test]
fn qwen_template_matches_apply_chat_template() {
    check(Template::Qwen);
}

#[test]
fn seed_template_matches_process_func_generalised() {
    check(Template::Seed);
}

/// Every supervised `qwen` span ends with <|im_end|> (151645), and the "\n" after it is -100.
#[test]
fn qwen_supervises_im_end_but_not_the_newline_after_it() {
    let Some(shared) = shared_data_or_skip("qwen_supervises_im_end_but_not_the_newline_after_it")
    else {
        return;
    };
    let tok = tokenizer(&shared);
    let ds = load_dataset(&fixtures().join("chat_messages.jsonl"), None).unwrap();
    let p = prepare(&ds.conversations, &tok, &PrepareOptions::default()).unwrap();
    let mut ends = 0;
    for ex in &p.examples {
        for i in 0..ex.labels.len() {
            let sup = ex.labels[i] != IGNORE_INDEX;
            let next_sup = ex.labels.get(i + 1).is_some_and(|&l| l != IGNORE_INDEX);
            if sup && !next_sup {
                ends += 1;
                assert_eq!(
                    ex.input_ids[i], 151645,
                    "a supervised span must end with <|im_end|>"
                );
                assert_eq!(
                    ex.input_ids.get(i + 1),
                    Some(&198),
                    "then the unsupervised \"\\n\""
                );
            }
        }
    }
    assert_eq!(ends, 6, "one span per assistant turn");
}

/// `qwen` with a small max_length: examples are the reference cut to the first N tokens, and a
/// record whose answers all fall beyond N is skipped and counted.
#[test]
fn qwen_truncation_cuts_and_skips() {
    let Some(shared) = shared_data_or_skip("qwen_truncation_cuts_and_skips") else {
        return;
    };
    let tok = tokenizer(&shared);
    let reference: serde_json::Value = read_json(&fixtures().join("chat_reference.json"));
    let want = reference["chat_sharegpt.json"]["qwen"].as_array().unwrap();
    let ds = load_dataset(&fixtures().join("chat_sharegpt.json"), None).unwrap();
    let max_length = 30;
    let opts = PrepareOptions {
        max_length,
        ..PrepareOptions::default()
    };
    let p = prepare(&ds.conversations, &tok, &opts).unwrap();
    let mut used = 0;
    for (i, w) in want.iter().enumerate() {
        let mut w = example_from(w);
        let truncated = w.input_ids.len() > max_length;
        w.input_ids.truncate(max_length);
        w.labels.truncate(max_length);
        w.attention_mask.truncate(max_length);
        if w.labels.iter().all(|&l| l == IGNORE_INDEX) {
            assert!(!p.source_index.contains(&i), "record {i} should be skipped");
            continue;
        }
        assert!(truncated || w.input_ids.len() <= max_length);
        let k = p.source_index.iter().position(|&s| s == i).unwrap();
        assert_example_eq(&format!("record {i} at {max_length}"), &p.examples[k], &w);
        used += 1;
    }
    assert_eq!(p.summary.used, used);
    assert_eq!(
        p.summary
            .skipped
            .get(&SkipReason::TruncatedAway)
            .copied()
            .unwrap_or(0),
        3 - used
    );
    assert!(
        p.summary.skipped.contains_key(&SkipReason::TruncatedAway),
        "the sample has one"
    );
}

/// A conversation with no assistant turn is skipped and counted under `no_assistant_turn`, for
/// both templates; `seed` also needs the last turn to be the assistant's.
#[test]
fn records_without_answers_are_counted_not_dropped() {
    let Some(shared) = shared_data_or_skip("records_without_answers_are_counted_not_dropped")
    else {
        return;
    };
    let tok = tokenizer(&shared);
    let text = r#"{"messages": [{"role": "user", "content": "hi"}]}
{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]}
{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
"#;
    let ds = lora_data::parse_dataset(text, std::path::Path::new("inline.jsonl"), None).unwrap();
    for (template, used) in [(Template::Qwen, 2), (Template::Seed, 1)] {
        let opts = PrepareOptions {
            template,
            ..PrepareOptions::default()
        };
        let p = prepare(&ds.conversations, &tok, &opts).unwrap();
        assert_eq!(p.summary.records_read, 3);
        assert_eq!(p.summary.used, used, "{}", template.name());
        assert_eq!(
            p.summary.skipped.get(&SkipReason::NoAssistantTurn).copied(),
            Some(3 - used)
        );
    }
}

/// The pad id comes from tokenizer_config.json (`<|endoftext|>`), and the default system prompt
/// of `qwen` is the one in Qwen2.5's chat template.
#[test]
fn tokenizer_config_and_default_system() {
    let Some(shared) = shared_data_or_skip("tokenizer_config_and_default_system") else {
        return;
    };
    let tok = tokenizer(&shared);
    assert_eq!(tok.pad_token_id, 151643);
    let file =
        lora_data::ChatTokenizer::load(&shared.join("qwen2.5-tokenizer/tokenizer.json")).unwrap();
    assert_eq!(file.pad_token_id, 151643);
    let config: serde_json::Value =
        read_json(&shared.join("qwen2.5-tokenizer/tokenizer_config.json"));
    let template = config["chat_template"].as_str().unwrap();
    assert!(template.contains(&format!(
        "'<|im_start|>system\\n{}<|im_end|>\\n'",
        lora_data::QWEN_DEFAULT_SYSTEM
    )));
}

/// prepare → Sampler → Collator: each batch row is its example, right-padded.
#[test]
fn pipeline_from_file_to_tensors() {
    use burn::backend::Flex;
    let Some(shared) = shared_data_or_skip("pipeline_from_file_to_tensors") else {
        return;
    };
    let tok = tokenizer(&shared);
    let ds = load_dataset(&fixtures().join("chat_messages.jsonl"), None).unwrap();
    let p = prepare(&ds.conversations, &tok, &PrepareOptions::default()).unwrap();
    let mut sampler = lora_data::Sampler::new(p.lengths(), 3);
    let collator = lora_data::Collator::new(tok.pad_token_id).with_pad_to_multiple_of(Some(8));
    let idx = sampler.next_batch(2);
    let rows: Vec<&lora_data::Example> = idx.iter().map(|&i| &p.examples[i]).collect();
    let batch = collator.collate::<Flex>(&rows, &Default::default());
    let [b, s] = batch.input_ids.dims();
    let longest = rows.iter().map(|e| e.input_ids.len()).max().unwrap();
    assert_eq!((b, s), (2, longest.div_ceil(8) * 8));
    let ids = batch
        .input_ids
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let labels = batch
        .labels
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    for (r, e) in rows.iter().enumerate() {
        let n = e.input_ids.len();
        let row = &ids[r * s..(r + 1) * s];
        assert!(row[..n]
            .iter()
            .zip(&e.input_ids)
            .all(|(&a, &b)| a == i64::from(b)));
        assert!(row[n..].iter().all(|&t| t == 151643));
        assert_eq!(&labels[r * s..r * s + n], &e.labels[..]);
    }
}
