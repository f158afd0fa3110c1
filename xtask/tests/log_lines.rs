//! The JSON log lines `finetune` prints carry 6 significant digits, as transformers' logs do;
//! `metrics.jsonl` keeps full precision.

use test_support::run_ok;

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

/// Significant digits of a JSON number's text (`1.98289` → 6, `9.87654e-5` → 6, `120.0` → 2).
fn significant_digits(number: &str) -> usize {
    let mantissa = number.split(['e', 'E']).next().unwrap();
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    digits.trim_start_matches('0').trim_end_matches('0').len()
}

#[test]
fn printed_log_lines_round_to_six_significant_digits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let (stdout, _) = run_ok(
        XTASK,
        [
            "finetune",
            "--output",
            dir.to_str().unwrap(),
            "--max-steps",
            "3",
            "--logging-steps",
            "1",
        ],
    );
    let printed: Vec<&str> = stdout.lines().filter(|l| l.contains("\"loss\"")).collect();
    assert_eq!(printed.len(), 3, "{stdout}");
    for line in &printed {
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        for key in v.keys() {
            // The number's text as printed: after `"key":`, up to the next `,` or `}`.
            let at = line.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
            let text = line[at..].split([',', '}']).next().unwrap();
            assert!(
                significant_digits(text) <= 6,
                "{key} printed as {text}: {line}"
            );
        }
    }
    // The file keeps every digit: its losses are not all 6-digit round numbers.
    let metrics = std::fs::read_to_string(dir.join("adapter/metrics.jsonl")).unwrap();
    assert!(
        metrics
            .lines()
            .filter_map(|l| l.split("\"loss\":").nth(1))
            .any(|t| significant_digits(t.split([',', '}']).next().unwrap()) > 6),
        "{metrics}"
    );
}
