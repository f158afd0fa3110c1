//! `cargo xtask parity`: the fixture parity checks of the test suite as a command, on any device and
//! compute dtype — for running them on a GPU machine that has no Rust toolchain (the binary travels).
//! Prints one JSON line per fixture and exits non-zero if any exceeds its tolerance.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use qwen2::load_model;

/// Arguments of `parity`.
#[derive(clap::Args, Debug)]
pub struct ParityArgs {
    /// The fixtures directory (holds tiny-* and peft-tiny-untied).
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: PathBuf,
    /// cpu | cuda[:N]
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32 (tolerance 1e-4 against transformers' f32 logits) or bf16 (tolerance 0.15
    /// against transformers' bf16 logits, bf16 fixtures only).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(a: ParityArgs) -> anyhow::Result<()> {
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        d => bail!("--dtype {d:?}: use f32 or bf16"),
    };
    if !a.fixtures.join("tiny-tied-f32").is_dir() {
        bail!(
            "{}: no parity fixtures there; run from the repository root or pass --fixtures \
             with the repository's tests/fixtures directory",
            a.fixtures.display()
        );
    }
    let spec = a.device.clone();
    let failures = crate::on_device!(&spec,
        cpu => run_on::<burn::backend::Flex>(&a, &Default::default(), dtype)?,
        cuda(dev) => run_on::<burn::backend::Cuda>(&a, &dev, dtype)?,
    );
    if failures > 0 {
        bail!("{failures} fixture(s) outside tolerance");
    }
    Ok(())
}

struct Reference {
    f32: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
    i64: std::collections::HashMap<String, (Vec<usize>, Vec<i64>)>,
}

fn read(path: &Path) -> anyhow::Result<Reference> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let mut r = Reference {
        f32: Default::default(),
        i64: Default::default(),
    };
    for (k, v) in st.tensors() {
        let d = v.data();
        match v.dtype() {
            safetensors::Dtype::F32 => {
                let x = d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                r.f32.insert(k, (v.shape().to_vec(), x.collect()));
            }
            safetensors::Dtype::I64 => {
                let x = d
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8")));
                r.i64.insert(k, (v.shape().to_vec(), x.collect()));
            }
            _ => {}
        }
    }
    Ok(r)
}

fn run_on<B: Backend>(a: &ParityArgs, dev: &B::Device, dtype: DType) -> anyhow::Result<usize> {
    let (key, tol) = if dtype == DType::F32 {
        ("logits", 1e-4)
    } else {
        ("logits_bf16", 0.15)
    };
    let mut failures = 0;
    let mut cases: Vec<(String, PathBuf, Option<PathBuf>, PathBuf)> = Vec::new();
    for name in [
        "tiny-tied-f32",
        "tiny-untied-f32-sharded",
        "tiny-tied-bf16-sharded",
        "tiny-untied-bf16",
    ] {
        let dir = a.fixtures.join(name);
        cases.push((
            name.into(),
            dir.clone(),
            None,
            dir.join("reference.safetensors"),
        ));
    }
    if dtype == DType::F32 {
        let adapter = a.fixtures.join("peft-tiny-untied");
        let base = a.fixtures.join("tiny-untied-f32-sharded");
        cases.push((
            "peft-tiny-untied".into(),
            base,
            Some(adapter.clone()),
            adapter.join("reference.safetensors"),
        ));
    }
    for (name, model_dir, adapter, reference) in cases {
        let r = read(&reference)?;
        let Some((shape, want)) = r.f32.get(key) else {
            continue; // f32 fixtures have no bf16 reference
        };
        let ids = |k: &str| -> anyhow::Result<Tensor<B, 2, Int>> {
            let (s, v) = r
                .i64
                .get(k)
                .with_context(|| format!("{}: no {k}", reference.display()))?;
            Ok(Tensor::from_data(
                TensorData::new(v.clone(), [s[0], s[1]]),
                dev,
            ))
        };
        let mut model = load_model::<B>(&model_dir, dtype, dev)?.model;
        if let Some(ad) = &adapter {
            model = lora_core::load_adapter(model, ad)?.0;
        }
        let got = model
            .forward(ids("input_ids")?, Some(ids("attention_mask")?), None)
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let err = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
        let ok = err.is_finite() && err <= tol && got.len() == shape.iter().product::<usize>();
        failures += usize::from(!ok);
        outln!(
            "{}",
            serde_json::json!({"fixture": name, "device": a.device, "dtype": a.dtype,
                "max_abs_error": err, "tolerance": tol, "ok": ok})
        );
    }
    Ok(failures)
}
