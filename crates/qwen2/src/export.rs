//! Writing a model's weights as a Hugging Face checkpoint: `model.safetensors`, or shards
//! `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` — what transformers'
//! `save_pretrained(max_shard_size=...)` writes. Keys are module paths (= HF keys), LoRA factors
//! are left out (merge them first), and every tensor is stored in one chosen dtype.
//!
//! Differs from HF on purpose only in memory: shards are built and written one at a time, so the
//! extra memory is one shard, not a second copy of the model. Each file is written under a
//! temporary name and renamed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::error::Qwen2Error;
use crate::Qwen2ForCausalLM;

/// What [`export_weights`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The safetensors files, in order.
    pub files: Vec<PathBuf>,
    /// The index file, when the weights were sharded.
    pub index: Option<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written (the index's `metadata.total_size`).
    pub total_size: u64,
}

/// Writes every non-LoRA parameter of `model` into `dir` in `dtype` (F32, BF16 or F16), in shards
/// of at most `max_shard_bytes` of tensor data (a tensor larger than that gets a shard of its own,
/// as HF does). One shard is written as `model.safetensors` without an index.
pub fn export_weights<B: Backend>(
    model: &Qwen2ForCausalLM<B>,
    dir: &Path,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<ExportReport, Qwen2Error> {
    let (st_dtype, elem) = match dtype {
        DType::F32 => (Dtype::F32, 4u64),
        DType::BF16 => (Dtype::BF16, 2),
        DType::F16 => (Dtype::F16, 2),
        other => {
            return Err(Qwen2Error::Write {
                path: dir.to_path_buf(),
                reason: format!("cannot store weights as {other:?}; use F32, BF16 or F16"),
            })
        }
    };
    let tensors = collect(model);
    // HF's greedy split: start a new shard when the next tensor would overflow the current one.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, (_, shape, _)) in tensors.iter().enumerate() {
        let bytes = shape.iter().product::<usize>() as u64 * elem;
        if size + bytes > max_shard_bytes && !shards.last().is_some_and(Vec::is_empty) {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        size += bytes;
    }
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let n = shards.len();
    let mut report = ExportReport {
        files: Vec::new(),
        index: None,
        tensors: tensors.len(),
        total_size: 0,
    };
    let mut weight_map = BTreeMap::new();
    for (s, members) in shards.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", s + 1)
        };
        let file = dir.join(&name);
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(members.len());
        for &i in members {
            let (key, shape, t) = &tensors[i];
            let bytes = t
                .clone()
                .into_data()
                .convert_dtype(dtype)
                .into_bytes()
                .to_vec();
            report.total_size += bytes.len() as u64;
            weight_map.insert(key.clone(), name.clone());
            data.push((key.clone(), shape.clone(), bytes));
        }
        let views = data
            .iter()
            .map(|(k, shape, b)| {
                TensorView::new(st_dtype, shape.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Qwen2Error::Write {
                        path: file.clone(),
                        reason: format!("tensor `{k}`: {e}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Qwen2Error::Write {
            path: file.clone(),
            reason: e.to_string(),
        })?;
        drop(data);
        write_atomic(&file, &bytes)?;
        report.files.push(file);
    }
    if n > 1 {
        let index = dir.join("model.safetensors.index.json");
        let json = serde_json::json!({
            "metadata": { "total_size": report.total_size },
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&json).expect("index serializes");
        write_atomic(&index, text.as_bytes())?;
        report.index = Some(index);
    }
    Ok(report)
}

/// `(key, shape, flat tensor)` of every parameter except LoRA factors, in module order.
fn collect<B: Backend>(model: &Qwen2ForCausalLM<B>) -> Vec<(String, Vec<usize>, Tensor<B, 1>)> {
    let mut out = Vec::new();
    lora_core::visit_params(model, |p: lora_core::ParamRef<'_, B>| {
        if !p.is_adapter() {
            // A flat view (no copy for a contiguous tensor), so one type holds every rank.
            out.push((p.path.to_string(), p.shape.to_vec(), p.flat()));
        }
    });
    out
}

fn write_err(path: &Path, e: std::io::Error) -> Qwen2Error {
    let reason = if kernels::io::is_storage_full(&e) {
        format!("no space left on device ({e}): free space and run the command again")
    } else {
        e.to_string()
    };
    Qwen2Error::Write {
        path: path.to_path_buf(),
        reason,
    }
}

/// [`kernels::io::write_atomic`] with this crate's error, naming `path`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Qwen2Error> {
    kernels::io::write_atomic(path, bytes).map_err(|e| write_err(path, e))
}

/// Parses a shard size as transformers does: an integer number of bytes, or a number with a unit
/// `KB`/`MB`/`GB` (powers of 1000) or `KiB`/`MiB`/`GiB` (powers of 1024), e.g. `5GB`, `20KB`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v.is_finite() && v >= 1.0).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::{parse_size, write_atomic, write_err};

    #[test]
    fn a_full_device_is_named_and_a_failed_write_leaves_nothing_behind() {
        let full = std::io::Error::from_raw_os_error(28); // ENOSPC
        let msg = write_err(std::path::Path::new("out/model.safetensors"), full).to_string();
        assert!(
            msg.contains("out/model.safetensors") && msg.contains("no space left on device"),
            "{msg}"
        );
        assert!(
            msg.contains("free space and run the command again"),
            "{msg}"
        );
        let other = std::io::Error::from_raw_os_error(13); // EACCES
        assert!(!write_err(std::path::Path::new("x"), other)
            .to_string()
            .contains("no space"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        write_atomic(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        // A rename onto a directory fails after the temporary file was written: it must be gone.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir_all(blocked.join("inner")).unwrap();
        assert!(write_atomic(&blocked, b"data").is_err());
        assert!(!dir.path().join("blocked.partial").exists());
        assert!(blocked.join("inner").is_dir());
    }

    #[test]
    fn sizes_parse_like_transformers() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("20KB"), Some(20_000));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("1234"), Some(1234));
        assert_eq!(parse_size("5 gb"), Some(5_000_000_000));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("0"), None);
    }
}
