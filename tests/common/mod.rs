//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use ferrolora::Cpu;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub const FIXTURES: [&str; 4] = [
    "tiny-tied-f32",
    "tiny-untied-f32-sharded",
    "tiny-tied-bf16-sharded",
    "tiny-untied-bf16",
];

/// The shared data directory, or `None` (with a message) when it is absent outside CI.
/// Under CI (`CI=true`) a missing directory fails the test instead of skipping it.
pub fn shared_data() -> Option<PathBuf> {
    match ferrolora::shared_data_dir() {
        Some(p) => Some(p),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but ../shared/data is missing; set FERROLORA_SHARED_DATA")
        }
        None => {
            eprintln!(
                "skipping: shared data not found; set FERROLORA_SHARED_DATA to the directory holding \
                 qwen2.5-configs/, qwen2.5-tokenizer/ and huanhuan/"
            );
            None
        }
    }
}

/// A tensor from a safetensors file, as raw f32 (or i64 widened to f32 for ids) values.
pub struct Ref {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

pub fn read_reference(path: &Path) -> BTreeMap<String, Ref> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let (f32v, i64v) = match view.dtype() {
            safetensors::Dtype::F32 => (
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                vec![],
            ),
            safetensors::Dtype::I64 => (
                vec![],
                data.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            d => panic!("unexpected dtype {d:?} for {name}"),
        };
        out.insert(
            name,
            Ref {
                shape: view.shape().to_vec(),
                f32: f32v,
                i64: i64v,
            },
        );
    }
    out
}

pub fn int2(r: &Ref) -> Tensor<Cpu, 2, Int> {
    Tensor::from_data(
        TensorData::new(r.i64.clone(), [r.shape[0], r.shape[1]]),
        &Default::default(),
    )
}

/// Max |a - b|, panicking with the first differing values when it exceeds `tol`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut max = 0f32;
    let mut first_bad = None;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if !d.is_finite() || d > tol {
            first_bad.get_or_insert((i, *g, *w));
        }
        if d > max || d.is_nan() {
            max = d;
        }
    }
    if let Some((i, g, w)) = first_bad {
        panic!(
            "{what}: max abs error {max:e} > {tol:e}; first at flat index {i}: got {g}, want {w}"
        );
    }
    max
}

pub fn to_vec3(t: Tensor<Cpu, 3>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}
