//! All 3,729 Huanhuan records through the `seed` template against the tutorial's Python
//! `process_func` (reference: scripts/make_data_fixtures.py → tests/fixtures/data/huanhuan_seed_reference.json).

mod common;

use common::*;
use lora_data::{load_dataset, prepare, Format, PrepareOptions, SkipReason, Template};
use sha2::Digest;
use test_support::{read_json, shared_data_or_skip};

fn run(max_length: usize) -> Option<(lora_data::Prepared, serde_json::Value)> {
    let shared = shared_data_or_skip(&format!("the Huanhuan check at max_length {max_length}"))?;
    let reference: serde_json::Value = read_json(&fixtures().join("huanhuan_seed_reference.json"));
    let ds = load_dataset(&shared.join("huanhuan/huanhuan.json"), None).unwrap();
    assert_eq!(ds.format, Format::Alpaca);
    let opts = PrepareOptions {
        template: Template::Seed,
        system: Some(reference["system"].as_str().unwrap().to_string()),
        max_length,
    };
    Some((
        prepare(&ds.conversations, &tokenizer(&shared), &opts).unwrap(),
        reference,
    ))
}

#[test]
fn all_records_match_process_func() {
    let Some((p, r)) = run(384) else { return };
    let n = r["records"].as_u64().unwrap() as usize;
    assert_eq!(n, 3729);
    assert_eq!(p.summary.records_read, n);
    assert_eq!(p.summary.used, n, "no record may be skipped at 384");
    assert_eq!(p.summary.truncated as u64, r["truncated"].as_u64().unwrap());
    assert_eq!(p.summary.tokens, r["tokens"].as_u64().unwrap());
    assert_eq!(
        p.summary.supervised_tokens,
        r["supervised_tokens"].as_u64().unwrap()
    );

    // Per-record hashes first, so a mismatch names the record and shows where it differs.
    let per = r["record_sha256_12"].as_array().unwrap();
    let mut total = sha2::Sha256::new();
    for (i, ex) in p.examples.iter().enumerate() {
        assert_eq!(p.source_index[i], i);
        let line = canonical_line(ex);
        let got = &sha256_hex(line.as_bytes())[..12];
        assert_eq!(
            got,
            per[i].as_str().unwrap(),
            "record {i} differs from process_func: {line}"
        );
        total.update(line.as_bytes());
    }
    assert_eq!(hex(&total.finalize()), r["sha256"].as_str().unwrap());

    for (k, want) in r["spot"].as_object().unwrap() {
        let i: usize = k.parse().unwrap();
        assert_example_eq(&format!("record {i}"), &p.examples[i], &example_from(want));
    }
}

/// At 64 tokens a third of the records are cut and some lose every answer token: the survivors
/// must equal process_func's output, the rest be skipped and counted.
#[test]
fn truncation_at_64_matches_and_skips_fully_masked() {
    let Some((p, r)) = run(64) else { return };
    let r = &r["max_length_64"];
    let skipped: Vec<usize> = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert!(!skipped.is_empty());
    assert_eq!(p.summary.truncated as u64, r["truncated"].as_u64().unwrap());
    assert_eq!(
        p.summary.skipped.get(&SkipReason::TruncatedAway).copied(),
        Some(skipped.len())
    );
    assert_eq!(p.summary.used + skipped.len(), 3729);
    let kept: Vec<usize> = (0..3729).filter(|i| !skipped.contains(i)).collect();
    assert_eq!(p.source_index, kept);
    assert!(p.examples.iter().all(|e| e.input_ids.len() <= 64));
    assert_eq!(p.summary.length_max, 64);
    assert_eq!(p.summary.tokens, r["tokens"].as_u64().unwrap());
    assert_eq!(
        p.summary.supervised_tokens,
        r["supervised_tokens"].as_u64().unwrap()
    );
    let mut total = sha2::Sha256::new();
    for ex in &p.examples {
        total.update(canonical_line(ex).as_bytes());
    }
    assert_eq!(hex(&total.finalize()), r["sha256"].as_str().unwrap());
}
