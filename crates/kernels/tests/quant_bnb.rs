//! `kernels::quant` against bitsandbytes' `quantize_4bit` / `dequantize_4bit` on the CPU
//! (`tests/fixtures/qlora/bnb.json`, written by `scripts/make_qlora_fixtures.py`): the packed
//! bytes, the scales (plain, or 8-bit with their block scales and offset) and the dequantized values,
//! bit for bit, for NF4 and FP4, with and without double quantization, on a small matrix (a
//! remainder block, a zero block) and a random 896×4864 one (Qwen2.5-0.5B's MLP shape).

use kernels::quant::{dynamic_code, Kind, Quantized, Scales};
use kernels::rng::SplitMix64;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/qlora/bnb.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The script's input: SplitMix64 in f32, the first block zero.
fn matrix(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let scale = 2f32.powi(-24);
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 40) as f32 * scale;
            let v = (rng.next_u64() >> 40) as f32 * scale;
            (u - 0.5) * (0.01 + v * v)
        })
        .collect();
    x[..64].fill(0.0);
    x
}

fn sha_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    sha(&bytes)
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn quantization_equals_bitsandbytes() {
    let f = fixture();
    let mut checked = 0;
    for case in f["cases"].as_array().unwrap() {
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let n = shape.iter().product();
        let kind = match case["kind"].as_str().unwrap() {
            "nf4" => Kind::Nf4,
            _ => Kind::Fp4,
        };
        let double = case["double"].as_bool().unwrap();
        let what = format!("{} {} double={double}", case["name"], kind.name());
        let want = &case["sha256"];
        let x = matrix(n, case["seed"].as_u64().unwrap());
        assert_eq!(sha_f32(&x), want["input"], "{what}: the generated input");
        let q = Quantized::new(&x, kind, double);
        let values = &case["values"];
        let report = |name: &str, got: Vec<f64>| {
            if let Some(w) = values.get(name).and_then(Value::as_array) {
                let bad: Vec<String> = got
                    .iter()
                    .zip(w)
                    .enumerate()
                    .filter(|(_, (g, w))| **g != w.as_f64().unwrap())
                    .take(5)
                    .map(|(i, (g, w))| format!("[{i}] ours {g} bnb {w}"))
                    .collect();
                format!("first differences: {bad:?}")
            } else {
                String::new()
            }
        };
        assert_eq!(
            sha(&q.packed),
            want["packed"],
            "{what}: packed bytes; {}",
            report("packed", q.packed.iter().map(|&b| b as f64).collect())
        );
        match &q.scales {
            Scales::F32(s) => assert_eq!(
                sha_f32(s),
                want["scales"],
                "{what}: scales; {}",
                report("scales", s.iter().map(|&v| v as f64).collect())
            ),
            Scales::Double {
                q: s,
                absmax2,
                offset,
            } => {
                assert_eq!(
                    sha_f32(dynamic_code()),
                    want["code"],
                    "{what}: the dynamic code; {}",
                    report("code", dynamic_code().iter().map(|&v| v as f64).collect())
                );
                assert_eq!(
                    sha_f32(&[*offset]),
                    want["scales_offset"],
                    "{what}: offset {offset}; {}",
                    report("scales_offset", vec![*offset as f64])
                );
                assert_eq!(
                    sha_f32(absmax2),
                    want["scales_absmax2"],
                    "{what}: absmax2; {}",
                    report(
                        "scales_absmax2",
                        absmax2.iter().map(|&v| v as f64).collect()
                    )
                );
                assert_eq!(
                    sha(s),
                    want["scales_q"],
                    "{what}: 8-bit scales; {}",
                    report("scales_q", s.iter().map(|&v| v as f64).collect())
                );
            }
        }
        assert_eq!(
            sha_f32(&q.dequantize()),
            want["dequantized"],
            "{what}: dequantized; {}",
            report(
                "dequantized",
                q.dequantize().iter().map(|&v| v as f64).collect()
            )
        );
        checked += 1;
    }
    assert_eq!(checked, 8);
}
