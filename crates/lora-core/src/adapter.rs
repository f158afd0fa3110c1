//! PEFT adapter files, both directions: `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` and `adapter_config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::config::LoraConfig;
use crate::error::LoraError;
use crate::modules::{is_module_to_save, load_saved, saved_shapes};
use crate::params::{module_of, visit_params, ParamRef};
use crate::target::{apply_lora, is_targeted, LoraModel, LoraReport};

/// PEFT's weights file name.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's config file name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's key prefix for a `PeftModelForCausalLM` around a `*ForCausalLM`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The two LoRA factors of a layer, by their PEFT module names.
pub(crate) const FACTORS: [&str; 2] = ["lora_A", "lora_B"];

/// The key of factor `factor` (`lora_A` / `lora_B`) of the layer at `module` in PEFT's
/// `adapter_model.safetensors`: what [`save_adapter`] writes and [`load_adapter`] reads.
pub fn adapter_key(module: &str, factor: &str) -> String {
    format!("{PEFT_PREFIX}{module}.{factor}.weight")
}

/// Every adapter factor of `model` as `(layer path, factor, tensor)`, in model order; the tensor is
/// the parameter itself (same autodiff node).
fn adapter_factors<B: Backend, M: Module<B>>(
    model: &M,
) -> Vec<(String, &'static str, Tensor<B, 2>)> {
    let mut out = Vec::new();
    visit_params(model, |p: ParamRef<'_, B>| {
        for factor in FACTORS {
            let module = p.path.strip_suffix(&format!(".{factor}.weight") as &str);
            if let (Some(module), Some(t)) = (module, p.value::<2>()) {
                out.push((module.to_string(), factor, t));
            }
        }
    });
    out
}

/// The key in PEFT's `adapter_model.safetensors` of an adapter parameter at module path `path`:
/// `base_model.model.<path>`, except DoRA's `….lora_magnitude_vector.weight`, which PEFT stores
/// as `….lora_magnitude_vector`.
pub fn adapter_file_key(path: &str) -> String {
    let path = path
        .strip_suffix(".lora_magnitude_vector.weight")
        .map(|m| format!("{m}.lora_magnitude_vector"))
        .unwrap_or_else(|| path.to_string());
    format!("{PEFT_PREFIX}{path}")
}

/// Every adapter parameter of `model` (factors, `lora_B` biases, DoRA magnitudes) as
/// `(file key, shape, values)`, in model order.
fn adapter_entries<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, Vec<usize>, Tensor<B, 1>)> {
    let mut out = Vec::new();
    visit_params(model, |p: ParamRef<'_, B>| {
        if p.is_adapter() {
            out.push((adapter_file_key(p.path), p.shape.to_vec(), p.flat()));
        }
    });
    out
}

/// The tensors PEFT's file holds for the adapter of a linear `[out, in]` at `module` with rank
/// `r`: `(key suffix, shape)`.
fn expected_entries(
    r: usize,
    [out_f, in_f]: [usize; 2],
    lora_bias: bool,
    dora: bool,
) -> Vec<(&'static str, Vec<usize>)> {
    let mut e = vec![
        ("lora_A.weight", vec![r, in_f]),
        ("lora_B.weight", vec![out_f, r]),
    ];
    if lora_bias {
        e.push(("lora_B.bias", vec![out_f]));
    }
    if dora {
        e.push(("lora_magnitude_vector", vec![out_f]));
    }
    e
}

/// Every adapter parameter of `model` as `(parameter path, tensor)`, in model order, e.g.
/// `model.layers.0.self_attn.q_proj.lora_A.weight`; the tensor is the parameter itself.
pub fn adapter_tensors<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, Tensor<B, 2>)> {
    adapter_factors(model)
        .into_iter()
        .map(|(module, factor, t)| (format!("{module}.{factor}.weight"), t))
        .collect()
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
    let mut data: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
    for (key, shape, t) in adapter_entries(model) {
        let v = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| LoraError::BadFile {
                file: dir.join(ADAPTER_WEIGHTS),
                reason: format!("reading `{key}`: {e:?}"),
            })?;
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        data.push((key, shape, Dtype::F32, bytes));
    }
    // The modules to save, whole, in their own dtype (as PEFT writes them).
    let mut failed = None;
    visit_params(model, |p: ParamRef<'_, B>| {
        if p.is_adapter() || !is_module_to_save(cfg, p.module()) || failed.is_some() {
            return;
        }
        let key = format!("{PEFT_PREFIX}{}", p.path);
        let t = p.flat();
        let (dtype, data_dtype) = match t.dtype() {
            DType::BF16 => (Dtype::BF16, DType::BF16),
            DType::F16 => (Dtype::F16, DType::F16),
            _ => (Dtype::F32, DType::F32),
        };
        let values = t.into_data().convert_dtype(data_dtype);
        data.push((key, p.shape.to_vec(), dtype, values.as_bytes().to_vec()));
        failed = (values.dtype != data_dtype).then(|| p.path.to_string());
    });
    if let Some(path) = failed {
        return Err(LoraError::BadFile {
            file: dir.join(ADAPTER_WEIGHTS),
            reason: format!("converting `{path}` for the file"),
        });
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(k, s, d, b)| {
            (
                k.clone(),
                TensorView::new(*d, s.clone(), b).expect("sizes agree"),
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

/// [`kernels::io::write_atomic`] with this crate's error, naming `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LoraError> {
    kernels::io::write_atomic(path, bytes).map_err(|e| LoraError::write(path, e))
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
        let entries = expected_entries(
            cfg.rank_for(&path),
            linear.shape(),
            cfg.lora_bias(),
            cfg.use_dora,
        );
        for (suffix, expected) in entries {
            let key = format!("{PEFT_PREFIX}{path}.{suffix}");
            checked_view(&found, &key, &path, &expected, &file)?;
        }
    }

    let (model, report) = apply_lora(model, &cfg)?;
    // The modules to save: every parameter from the file, with its shape.
    let mut saved = BTreeMap::new();
    for (path, shape) in saved_shapes(&model, &cfg) {
        let key = format!("{PEFT_PREFIX}{path}");
        let values = take_f32(&mut found, &key, module_of(&path), &shape, &file)?;
        saved.insert(path, values);
    }
    let mut model = load_saved(model, &cfg, saved);
    for (path, linear) in model.lora_linears() {
        if !linear.has_adapter() {
            continue;
        }
        let entries = expected_entries(
            cfg.rank_for(&path),
            linear.shape(),
            linear.lora_bias().is_some(),
            linear.is_dora(),
        );
        for (suffix, expected) in entries {
            let key = format!("{PEFT_PREFIX}{path}.{suffix}");
            let values = take_f32(&mut found, &key, &path, &expected, &file)?;
            linear.set_adapter_tensor(suffix, values);
        }
    }
    for (path, emb) in model.lora_embeddings() {
        let Some(t) = &emb.token_adapter else {
            continue;
        };
        let key = format!("{PEFT_PREFIX}{path}.token_adapter.trainable_tokens_delta");
        let expected = vec![t.token_indices.len(), emb.shape()[1]];
        let values = take_f32(&mut found, &key, &path, &expected, &file)?;
        emb.set_trained_rows(values);
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

/// The tensor `key` of the adapter file `file`, checked to have shape `expected`; errors name the
/// key, the module and the file.
fn checked_view<'a, 'd>(
    found: &'a BTreeMap<String, TensorView<'d>>,
    key: &str,
    module: &str,
    expected: &[usize],
    file: &Path,
) -> Result<&'a TensorView<'d>, LoraError> {
    let view = found.get(key).ok_or_else(|| LoraError::MissingTensor {
        key: key.to_string(),
        module: module.to_string(),
        file: file.to_path_buf(),
    })?;
    if view.shape() != expected {
        return Err(LoraError::ShapeMismatch {
            key: key.to_string(),
            module: module.to_string(),
            file: file.to_path_buf(),
            expected: expected.to_vec(),
            found: view.shape().to_vec(),
        });
    }
    Ok(view)
}

/// [`checked_view`]'s tensor as f32 values, taken out of `found` (what remains at the end is
/// unexpected).
fn take_f32(
    found: &mut BTreeMap<String, TensorView<'_>>,
    key: &str,
    module: &str,
    expected: &[usize],
    file: &Path,
) -> Result<Vec<f32>, LoraError> {
    let values = view_f32(checked_view(found, key, module, expected, file)?, key, file)?;
    found.remove(key);
    Ok(values)
}

/// A tensor's values as f32, or the error naming its dtype, key and file.
fn view_f32(view: &TensorView, key: &str, file: &Path) -> Result<Vec<f32>, LoraError> {
    to_f32(view).ok_or_else(|| LoraError::BadFile {
        file: file.to_path_buf(),
        reason: format!(
            "tensor `{key}` has dtype {:?}; expected F32, BF16 or F16",
            view.dtype()
        ),
    })
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

#[cfg(feature = "decompositions")]
/// PEFT's `save_pretrained(out, path_initial_model_for_weight_conversion=initial)` on files: the
/// adapter in `trained` (trained from a PiSSA / OLoRA init, so it applies to the residual base
/// that init left) is rewritten into `out` as a plain LoRA of rank `2r` that applies to the
/// ORIGINAL base weights, using the factors the init produced (`initial`, the adapter saved right
/// after `apply_lora`): `A' = [A; A0]`, `B' = [B, −B0]` ([`crate::init::to_plain_lora`]), `r` and
/// `lora_alpha` doubled (`lora_alpha·√2` with rsLoRA), `init_lora_weights = true`; every other
/// tensor (biases, modules to save, token rows) is copied. vLLM, llama.cpp and any PEFT loader
/// then apply it to the model as published.
pub fn convert_to_lora(trained: &Path, initial: &Path, out: &Path) -> Result<PathBuf, LoraError> {
    let read = |dir: &Path| -> Result<(Vec<u8>, PathBuf), LoraError> {
        let file = dir.join(ADAPTER_WEIGHTS);
        let bytes = std::fs::read(&file).map_err(|e| LoraError::io(&file, e))?;
        Ok((bytes, file))
    };
    let cfg_path = trained.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| LoraError::io(&cfg_path, e))?;
    let cfg = LoraConfig::from_json_str(&text).map_err(|e| e.with_path(&cfg_path))?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| LoraError::ConfigParse {
            path: Some(cfg_path.clone()),
            reason: e.to_string(),
        })?;
    let bad = |reason: String| LoraError::InvalidConfig {
        path: Some(cfg_path.clone()),
        reason,
    };
    if cfg.use_dora {
        return Err(bad(
            "a DoRA adapter cannot be rewritten as a plain LoRA (its magnitudes are not a \
             low-rank difference)"
                .into(),
        ));
    }
    crate::init::to_plain_lora_config(&mut json).map_err(|e| bad(e.to_string()))?;
    let ((tb, tfile), (ib, ifile)) = (read(trained)?, read(initial)?);
    let (t, i) = (parse_st(&tb, &tfile)?, parse_st(&ib, &ifile)?);
    let values =
        |st: &SafeTensors, file: &Path, key: &str| -> Result<(Vec<f32>, Vec<usize>), LoraError> {
            let v = st.tensor(key).map_err(|_| LoraError::MissingTensor {
                key: key.to_string(),
                module: key.rsplit_once(".lora_").map_or("", |(m, _)| m).to_string(),
                file: file.to_path_buf(),
            })?;
            let f = view_f32(&v, key, file)?;
            Ok((f, v.shape().to_vec()))
        };
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut keys: Vec<String> = t.names().into_iter().map(String::from).collect();
    keys.sort();
    for key in keys {
        let (v, shape) = values(&t, &tfile, &key)?;
        let (v0, shape0) = if key.ends_with(".lora_A.weight") || key.ends_with(".lora_B.weight") {
            values(&i, &ifile, &key)?
        } else {
            data.push((key, shape, bytes(&v)));
            continue;
        };
        if shape != shape0 {
            return Err(LoraError::ShapeMismatch {
                key,
                module: String::new(),
                file: ifile.clone(),
                expected: shape,
                found: shape0,
            });
        }
        if key.ends_with(".lora_A.weight") {
            let (r, inp) = (shape[0], shape[1]);
            data.push((key, vec![2 * r, inp], bytes(&[v, v0].concat())));
        } else {
            let (outf, r) = (shape[0], shape[1]);
            let b = crate::init::to_plain_b(&v, &v0, outf, r);
            data.push((key, vec![outf, 2 * r], bytes(&b)));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| LoraError::write(out, e))?;
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
    let weights = out.join(ADAPTER_WEIGHTS);
    let file_bytes = safetensors::serialize(views, Some(meta)).map_err(|e| LoraError::BadFile {
        file: weights.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&weights, &file_bytes)?;
    let json = serde_json::to_string_pretty(&json).expect("config serializes");
    write_atomic(&out.join(ADAPTER_CONFIG), json.as_bytes())?;
    Ok(weights)
}

/// `bytes` as a safetensors file, or the error naming `file`.
#[cfg(feature = "decompositions")]
fn parse_st<'a>(bytes: &'a [u8], file: &Path) -> Result<SafeTensors<'a>, LoraError> {
    SafeTensors::deserialize(bytes).map_err(|e| LoraError::BadFile {
        file: file.to_path_buf(),
        reason: format!("not a valid safetensors file ({e}); re-download or re-save it"),
    })
}
