//! PEFT adapter files, both directions: `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` and `adapter_config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::config::LoraConfig;
use crate::error::LoraError;
use crate::target::{apply_lora, is_targeted, LoraModel, LoraReport};

/// PEFT's weights file name.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's config file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's key prefix for a `PeftModelForCausalLM` around a `*ForCausalLM`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Every adapter parameter of `model` as `(path, tensor)`, in model order.
pub fn adapter_tensors<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, Tensor<B, 2>)> {
    struct Collect<B: Backend> {
        stack: Vec<String>,
        out: Vec<(String, Tensor<B, 2>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect<B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let path = self.stack.join(".");
            if D == 2 && (path.ends_with(".lora_A.weight") || path.ends_with(".lora_B.weight")) {
                // Same tensor (same autodiff node), only the rank is made static.
                let t = Tensor::<B, 2>::from_primitive(p.val().into_primitive());
                self.out.push((path, t));
            }
        }
    }
    let mut c = Collect {
        stack: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut c);
    c.out
}

/// Writes `dir/adapter_model.safetensors` (f32) and `dir/adapter_config.json` as PEFT's
/// `save_pretrained` does. Each file is written to a temporary name and renamed, so an interrupted
/// save never leaves a half-written file under the final name.
pub fn save_adapter<B: Backend, M: Module<B>>(
    model: &M,
    cfg: &LoraConfig,
    dir: &Path,
) -> Result<PathBuf, LoraError> {
    std::fs::create_dir_all(dir).map_err(|e| LoraError::write(dir, e))?;
    let tensors = adapter_tensors(model);
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (path, t) in tensors {
        let shape = t.dims().to_vec();
        let v = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| LoraError::BadFile {
                file: dir.join(ADAPTER_WEIGHTS),
                reason: format!("reading `{path}`: {e:?}"),
            })?;
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((format!("{PEFT_PREFIX}{path}"), shape, bytes));
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("sizes agree"),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| LoraError::BadFile {
        file: dir.join(ADAPTER_WEIGHTS),
        reason: e.to_string(),
    })?;
    let weights = dir.join(ADAPTER_WEIGHTS);
    write_atomic(&weights, &bytes)?;
    let mut cfg = cfg.clone();
    cfg.inference_mode = true; // as PEFT's save_pretrained writes it
    let json = serde_json::to_string_pretty(&cfg).expect("config serializes");
    write_atomic(&dir.join(ADAPTER_CONFIG), json.as_bytes())?;
    Ok(weights)
}

/// Writes `path` via a temporary sibling, an fsync and a rename, then fsyncs the directory: after
/// `Ok`, `path` holds `bytes` durably; after `Err`, `path` is untouched (its previous content, or
/// absent) and the temporary file is removed. A full device gives [`LoraError::NoSpace`] naming
/// `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LoraError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp-partial");
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        // Frees what the partial file took (on a full disk, the space the user needs).
        let _ = std::fs::remove_file(&tmp);
        return Err(LoraError::write(path, e));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// Makes a rename or file creation in `dir` durable. Best effort: some file systems refuse to
/// fsync a directory, and the file's data is already synced.
pub fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Loads a PEFT LoRA adapter directory into `model` (PEFT `PeftModel.from_pretrained`): reads and
/// validates `adapter_config.json`, attaches adapters to the targeted modules, then fills them from
/// `adapter_model.safetensors`. Every expected tensor must be present with the right shape, and
/// every tensor in the file must be used.
pub fn load_adapter<B: Backend, M: LoraModel<B>>(
    model: M,
    dir: &Path,
) -> Result<(M, LoraConfig, LoraReport), LoraError> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    if !cfg_path.is_file() {
        return Err(LoraError::io(
            &cfg_path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no adapter_config.json: pass a directory written by PEFT's save_pretrained or by this crate",
            ),
        ));
    }
    let cfg = LoraConfig::from_file(&cfg_path)?;
    let file = dir.join(ADAPTER_WEIGHTS);
    if !file.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            "only adapter_model.bin (pickle) is present: re-save the adapter with safe_serialization=True"
        } else {
            "file not found"
        };
        return Err(LoraError::io(
            &file,
            std::io::Error::new(std::io::ErrorKind::NotFound, hint),
        ));
    }
    let bytes = std::fs::read(&file).map_err(|e| LoraError::io(&file, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| LoraError::BadFile {
        file: file.clone(),
        reason: format!("not a valid safetensors file ({e}); re-download or re-save it"),
    })?;
    let mut found: BTreeMap<String, TensorView> = st.tensors().into_iter().collect();

    // Every shape the config implies is checked against the file before `apply_lora` allocates
    // the adapters: a config claiming a huge rank must fail here, not in the allocator.
    let mut model = model;
    let head = model.output_head();
    for (path, linear) in model.lora_linears() {
        if !is_targeted(&cfg, &path, head.as_deref()) {
            continue;
        }
        let (r, [out_f, in_f]) = (cfg.rank_for(&path), linear.shape());
        for (which, expected) in [("lora_A", [r, in_f]), ("lora_B", [out_f, r])] {
            let key = format!("{PEFT_PREFIX}{path}.{which}.weight");
            let view = found.get(&key).ok_or_else(|| LoraError::MissingTensor {
                key: key.clone(),
                module: path.clone(),
                file: file.clone(),
            })?;
            if view.shape() != expected {
                return Err(LoraError::ShapeMismatch {
                    key,
                    module: path.clone(),
                    file: file.clone(),
                    expected: expected.to_vec(),
                    found: view.shape().to_vec(),
                });
            }
        }
    }

    let (mut model, report) = apply_lora(model, &cfg)?;
    for (path, linear) in model.lora_linears() {
        if !linear.has_adapter() {
            continue;
        }
        for which in ["lora_A", "lora_B"] {
            let key = format!("{PEFT_PREFIX}{path}.{which}.weight");
            let view = found.remove(&key).ok_or_else(|| LoraError::MissingTensor {
                key: key.clone(),
                module: path.clone(),
                file: file.clone(),
            })?;
            let slot = if which == "lora_A" {
                linear.lora_A.as_mut()
            } else {
                linear.lora_B.as_mut()
            }
            .expect("attached above");
            let expected = slot.weight.shape().dims::<2>().to_vec();
            if view.shape() != expected.as_slice() {
                return Err(LoraError::ShapeMismatch {
                    key,
                    module: path.clone(),
                    file: file.clone(),
                    expected,
                    found: view.shape().to_vec(),
                });
            }
            let values = to_f32(&view).ok_or_else(|| LoraError::BadFile {
                file: file.clone(),
                reason: format!(
                    "tensor `{key}` has dtype {:?}; expected F32, BF16 or F16",
                    view.dtype()
                ),
            })?;
            let device = slot.weight.device();
            let t = Tensor::<B, 2>::from_data(
                TensorData::new(values, [expected[0], expected[1]]),
                (&device, DType::F32),
            );
            slot.weight = slot.weight.clone().map(|_| t.require_grad());
        }
    }
    if !found.is_empty() {
        let keys: Vec<&String> = found.keys().take(5).collect();
        return Err(LoraError::UnexpectedTensors {
            file,
            keys: format!(
                "{keys:?}{}",
                if found.len() > 5 {
                    format!(" and {} more", found.len() - 5)
                } else {
                    String::new()
                }
            ),
        });
    }
    Ok((model, cfg, report))
}

fn to_f32(v: &TensorView) -> Option<Vec<f32>> {
    let d = v.data();
    Some(match v.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| burn::tensor::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => return None,
    })
}
