//! Loading Hugging Face checkpoints: directory resolution, shard discovery, validation, and the
//! tensor-by-tensor import through burn-store.
//!
//! Memory: the model is built with lazy (unallocated) parameters, every file header is checked
//! before any tensor data is read, and each tensor is then read from disk with plain reads (not kept
//! mapped) and converted to the compute dtype one at a time. Peak memory is the loaded model plus
//! one tensor in flight, never a second copy of the checkpoint.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use burn::module::{Module, ParamId};
use burn::store::{ModuleSnapshot, TensorSnapshot, TensorSnapshotError};
use burn::tensor::backend::Backend;
use burn::tensor::{bf16, f16, DType, Shape, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::Qwen2Error;
use crate::resolve::resolve_model_dir;
use crate::{Qwen2Config, Qwen2ForCausalLM};

pub(crate) const CONFIG: &str = "config.json";
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// A loaded model with its config and what the loader saw.
#[derive(Debug)]
pub struct LoadedModel<B: Backend> {
    /// The model, parameters in the requested dtype.
    pub model: Qwen2ForCausalLM<B>,
    /// The validated `config.json`.
    pub config: Qwen2Config,
    /// The resolved model directory.
    pub dir: PathBuf,
    /// Files, counts and ignored keys.
    pub report: LoadReport,
}

/// What a load read.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// The safetensors files read, in order.
    pub files: Vec<PathBuf>,
    /// Parameters loaded (each exactly once).
    pub tensors: usize,
    /// Elements loaded.
    pub elements: usize,
    /// Checkpoint keys deliberately not loaded (`rotary_emb.inv_freq` buffers; `lm_head.weight` of a
    /// tied model, which transformers also ignores).
    pub ignored: Vec<String>,
    /// Storage dtypes seen in the files.
    pub file_dtypes: Vec<String>,
    /// With a 4-bit load: the weights quantized, and their bytes (packed values and scales).
    pub quantized_tensors: usize,
    pub quantized_bytes: usize,
}

/// How [`load_model_4bit`] quantizes: transformers' `BitsAndBytesConfig` fields
/// (`bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`, `bnb_4bit_compute_dtype`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load4bit {
    pub quant_type: kernels::quant::Kind,
    pub double_quant: bool,
    pub compute_dtype: DType,
}

/// Whether a 4-bit load quantizes parameter `key`: the decoder layers' seven projection weights,
/// the layers bitsandbytes + transformers replace with `Linear4bit`. Embeddings, norms, biases and
/// `lm_head` stay in the compute dtype, as there.
pub fn quantized_key(key: &str) -> bool {
    key.starts_with("model.layers.") && key.ends_with("_proj.weight")
}

/// The safetensors files of a model directory: the shards named by `model.safetensors.index.json`
/// (each once, in order), or `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, Qwen2Error> {
    let index = dir.join(INDEX);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Qwen2Error::io(&index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Qwen2Error::BadIndex {
                path: index.clone(),
                reason: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Qwen2Error::BadIndex {
                path: index.clone(),
                reason: "no `weight_map` object".into(),
            })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for (key, shard) in map {
            let shard = shard.as_str().ok_or_else(|| Qwen2Error::BadIndex {
                path: index.clone(),
                reason: format!("`weight_map.{key}` is not a file name"),
            })?;
            let p = dir.join(shard);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        for f in &files {
            if !f.is_file() {
                return Err(Qwen2Error::MissingShard {
                    index: index.clone(),
                    shard: f.clone(),
                });
            }
        }
        if files.is_empty() {
            return Err(Qwen2Error::BadIndex {
                path: index,
                reason: "`weight_map` is empty".into(),
            });
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Qwen2Error::NoWeights {
        dir: dir.to_path_buf(),
    })
}

/// Every float parameter of a module as `(path, shape)`, without materializing lazy parameters.
pub fn parameter_shapes<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    lora_core::visit_params(module, |p: lora_core::ParamRef<'_, B>| {
        out.push((p.path.to_string(), p.shape.to_vec()));
    });
    out
}

/// One tensor's place in a file, after the header was validated.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) file: PathBuf,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    start: u64,
    len: usize,
}

/// Parses and validates one file's header (offsets inside the file, no overlap, file length exact).
pub(crate) fn read_header(file: &Path) -> Result<BTreeMap<String, Entry>, Qwen2Error> {
    let f = File::open(file).map_err(|e| Qwen2Error::io(file, e))?;
    let file_len = f.metadata().map_err(|e| Qwen2Error::io(file, e))?.len();
    let bad = |reason: String| Qwen2Error::BadSafetensors {
        file: file.to_path_buf(),
        reason,
    };
    if file_len < 8 {
        return Err(bad(format!(
            "{file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    // Mapping only to parse the header: the data pages are never touched through this map.
    // SAFETY: the map is read-only and dropped before this function returns; a concurrent
    // truncation of the file by another process is the only hazard, as with any mmap reader.
    let map = kernels::io::map_readonly(&f).map_err(|e| Qwen2Error::io(file, e))?;
    let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
        let header_len = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
        bad(format!(
            "{e} (file is {file_len} bytes, header length field says {header_len})"
        ))
    })?;
    let data_start = 8 + n as u64;
    let mut out = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let (a, b) = info.data_offsets;
        out.insert(
            name,
            Entry {
                file: file.to_path_buf(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + a as u64,
                len: b - a,
            },
        );
    }
    Ok(out)
}

/// Reads one tensor from disk and converts it to `target`.
pub(crate) fn read_tensor(e: &Entry, target: DType) -> std::io::Result<TensorData> {
    let mut f = File::open(&e.file)?;
    f.seek(SeekFrom::Start(e.start))?;
    let shape = e.shape.clone();
    let n = e.len / dtype_size(e.dtype);
    // Read straight into a buffer of the element type: one allocation for f32 -> f32.
    let as_f32 = |f: &mut File| -> std::io::Result<Vec<f32>> {
        Ok(match e.dtype {
            Dtype::F32 => {
                let mut v = vec![0f32; n];
                f.read_exact(bytemuck::cast_slice_mut(&mut v))?;
                v
            }
            Dtype::BF16 => {
                let mut v = vec![0u16; n];
                f.read_exact(bytemuck::cast_slice_mut(&mut v))?;
                v.into_iter().map(|b| bf16::from_bits(b).to_f32()).collect()
            }
            _ => {
                let mut v = vec![0u16; n];
                f.read_exact(bytemuck::cast_slice_mut(&mut v))?;
                v.into_iter().map(|b| f16::from_bits(b).to_f32()).collect()
            }
        })
    };
    Ok(match (target, e.dtype) {
        (DType::BF16, Dtype::BF16) => {
            let mut v = vec![bf16::ZERO; n];
            f.read_exact(bytemuck::cast_slice_mut(&mut v))?;
            TensorData::new(v, shape)
        }
        (DType::F16, Dtype::F16) => {
            let mut v = vec![f16::ZERO; n];
            f.read_exact(bytemuck::cast_slice_mut(&mut v))?;
            TensorData::new(v, shape)
        }
        (DType::BF16, _) => {
            let v: Vec<bf16> = as_f32(&mut f)?.into_iter().map(bf16::from_f32).collect();
            TensorData::new(v, shape)
        }
        (DType::F16, _) => {
            let v: Vec<f16> = as_f32(&mut f)?.into_iter().map(f16::from_f32).collect();
            TensorData::new(v, shape)
        }
        _ => TensorData::new(as_f32(&mut f)?, shape),
    })
}

fn dtype_size(d: Dtype) -> usize {
    match d {
        Dtype::F32 => 4,
        _ => 2,
    }
}

/// Loads the tensors of `files` into `module`, by exact key = module path, converting to `dtype`.
///
/// Every parameter must come from exactly one file with the shape the module has; a checkpoint key
/// that is not a parameter is an error unless `ignore(key)` says otherwise. All headers are
/// checked before any tensor is read, so a bad checkpoint fails fast and names the key and file.
pub fn load_safetensors_into<B: Backend, M: Module<B> + ModuleSnapshot<B>>(
    module: &mut M,
    files: &[PathBuf],
    dtype: DType,
    ignore: impl Fn(&str) -> bool,
) -> Result<LoadReport, Qwen2Error> {
    load_except(module, files, dtype, ignore, |_| false).map(|(r, _)| r)
}

/// Parameters left unloaded by a load, with their checked checkpoint entries.
type Deferred = Vec<(String, Entry)>;

/// [`load_safetensors_into`], leaving the parameters `defer(key)` names unloaded (lazy) after
/// checking their headers like the others: their entries are returned, for the caller to read.
fn load_except<B: Backend, M: Module<B> + ModuleSnapshot<B>>(
    module: &mut M,
    files: &[PathBuf],
    dtype: DType,
    ignore: impl Fn(&str) -> bool,
    defer: impl Fn(&str) -> bool,
) -> Result<(LoadReport, Deferred), Qwen2Error> {
    let mut deferred = Vec::new();
    let mut report = LoadReport {
        files: files.to_vec(),
        ..Default::default()
    };
    let mut found: BTreeMap<String, Entry> = BTreeMap::new();
    for file in files {
        for (key, entry) in read_header(file)? {
            if let Some(prev) = found.get(&key) {
                return Err(Qwen2Error::DuplicateTensor {
                    key,
                    first: prev.file.clone(),
                    second: file.clone(),
                });
            }
            let name = format!("{:?}", entry.dtype);
            if !report.file_dtypes.contains(&name) {
                report.file_dtypes.push(name);
            }
            found.insert(key, entry);
        }
    }

    let expected = parameter_shapes::<B, M>(module);
    let mut snapshots = Vec::with_capacity(expected.len());
    for (key, shape) in &expected {
        let Some(e) = found.remove(key) else {
            return Err(Qwen2Error::MissingTensor {
                key: key.clone(),
                expected: shape.clone(),
                files: files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if !matches!(e.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(Qwen2Error::UnsupportedDtype {
                key: key.clone(),
                file: e.file,
                dtype: format!("{:?}", e.dtype),
            });
        }
        if &e.shape != shape {
            return Err(Qwen2Error::ShapeMismatch {
                key: key.clone(),
                file: e.file,
                expected: shape.clone(),
                found: e.shape,
            });
        }
        report.elements += shape.iter().product::<usize>();
        if defer(key) {
            deferred.push((key.clone(), e));
            continue;
        }
        let path: Vec<String> = key.split('.').map(str::to_string).collect();
        let entry = e.clone();
        let data_fn = Rc::new(move || {
            read_tensor(&entry, dtype).map_err(|err| {
                TensorSnapshotError::IoError(format!("{}: {err}", entry.file.display()))
            })
        });
        snapshots.push(TensorSnapshot::from_closure(
            data_fn,
            dtype,
            Shape::from(shape.clone()),
            path,
            Vec::new(),
            ParamId::new(),
        ));
    }
    for (key, e) in found {
        if ignore(&key) {
            report.ignored.push(key);
        } else {
            return Err(Qwen2Error::UnexpectedTensor { key, file: e.file });
        }
    }

    let result = module.apply(snapshots, None, None, false);
    if let Some(err) = result.errors.first() {
        return Err(Qwen2Error::Load {
            key: String::new(),
            file: files.first().cloned().unwrap_or_default(),
            reason: format!("{err:?}"),
        });
    }
    if result.applied.len() + deferred.len() != expected.len() {
        return Err(Qwen2Error::Load {
            key: result
                .missing
                .first()
                .map(|m| m.0.clone())
                .unwrap_or_default(),
            file: files.first().cloned().unwrap_or_default(),
            reason: format!(
                "{} of {} parameters applied",
                result.applied.len(),
                expected.len()
            ),
        });
    }
    report.tensors = result.applied.len() + deferred.len();
    Ok((report, deferred))
}

/// Loads a Qwen2 model from `path` (see [`resolve_model_dir`]) with parameters in `dtype`
/// (`F32` for CPU training and parity; `BF16` on GPUs).
pub fn load_model<B: Backend>(
    path: &Path,
    dtype: DType,
    device: &B::Device,
) -> Result<LoadedModel<B>, Qwen2Error> {
    load(path, dtype, device, |_| false).map(|(loaded, _)| loaded)
}

/// The loader of [`load_model`] and [`load_model_4bit`]: the model in `dtype`, but for the
/// parameters `defer(key)` names, whose checked entries are returned for the caller to read.
fn load<B: Backend>(
    path: &Path,
    dtype: DType,
    device: &B::Device,
    defer: impl Fn(&str) -> bool,
) -> Result<(LoadedModel<B>, Deferred), Qwen2Error> {
    let dir = resolve_model_dir(path)?;
    let config = Qwen2Config::from_file(&dir.join(CONFIG))?;
    let files = weight_files(&dir)?;
    let mut model = Qwen2ForCausalLM::<B>::new(&config, device);
    let tied = config.tie_word_embeddings;
    let (report, deferred) = load_except(
        &mut model,
        &files,
        dtype,
        |key| key.ends_with("rotary_emb.inv_freq") || (tied && key == "lm_head.weight"),
        defer,
    )?;
    let loaded = LoadedModel {
        model,
        config,
        dir,
        report,
    };
    Ok((loaded, deferred))
}

/// [`load_model`] with the decoder layers' projection weights in 4 bits ([`quantized_key`]), as
/// transformers' `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`
/// holds them: each weight is read, quantized (`kernels::quant`, bitsandbytes' layout) and
/// dropped before the next is read, so the peak is the 4-bit model plus one weight in f32. The
/// rest of the model loads in `q.compute_dtype`.
pub fn load_model_4bit<B: Backend>(
    path: &Path,
    q: Load4bit,
    device: &B::Device,
) -> Result<LoadedModel<B>, Qwen2Error> {
    let (mut loaded, deferred) = load(path, q.compute_dtype, device, quantized_key)?;
    for (key, entry) in deferred {
        let load = |reason: String| Qwen2Error::Load {
            key: key.clone(),
            file: entry.file.clone(),
            reason,
        };
        let values = read_tensor(&entry, DType::F32)
            .map_err(|e| load(e.to_string()))?
            .into_vec::<f32>()
            .map_err(|e| load(format!("{e:?}")))?;
        let quantized = kernels::quant::Quantized::new(&values, q.quant_type, q.double_quant);
        drop(values);
        loaded.report.quantized_tensors += 1;
        loaded.report.quantized_bytes += quantized.bytes();
        let linear = projection_mut(&mut loaded.model, &key)
            .ok_or_else(|| load("not a projection of a decoder layer".into()))?;
        linear.base_4bit = Some(std::sync::Arc::new(lora_core::Base4bit {
            quantized: std::sync::Arc::new(quantized),
            compute_dtype: q.compute_dtype,
        }));
    }
    Ok(loaded)
}

/// The projection whose weight is `model.layers.{i}.{self_attn|mlp}.{name}.weight`.
fn projection_mut<'a, B: Backend>(
    model: &'a mut Qwen2ForCausalLM<B>,
    key: &str,
) -> Option<&'a mut lora_core::LoraLinear<B>> {
    let rest = key.strip_prefix("model.layers.")?.strip_suffix(".weight")?;
    let (i, rest) = rest.split_once('.')?;
    let layer = model.model.layers.get_mut(i.parse::<usize>().ok()?)?;
    layer
        .projections_mut()
        .into_iter()
        .find(|(name, _)| *name == rest)
        .map(|(_, p)| p)
}
