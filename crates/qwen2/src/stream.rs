//! A checkpoint read tensor by tensor, without building the model: for exports whose memory must
//! stay near one tensor (`cargo xtask export`). The headers are validated against the config's
//! parameters as [`crate::load_model`] does (each parameter present once with its shape, a float
//! dtype, no unknown tensor but those `load_model` ignores), before any data is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::DType;
use safetensors::Dtype;

use crate::error::Qwen2Error;
use crate::load::{parameter_shapes, read_header, read_tensor, weight_files, Entry};
use crate::resolve::resolve_model_dir;
use crate::{Qwen2Config, Qwen2ForCausalLM};

/// A model directory opened for reading one parameter at a time.
pub struct CheckpointReader {
    /// The resolved model directory.
    pub dir: PathBuf,
    /// Its `config.json`.
    pub config: Qwen2Config,
    /// `(key, shape)` of every parameter, in module order (the order [`Self::read_f32`] is asked in
    /// by an export).
    pub params: Vec<(String, Vec<usize>)>,
    /// The safetensors dtypes found (`F32`, `BF16`, ...).
    pub file_dtypes: Vec<String>,
    entries: BTreeMap<String, Entry>,
}

impl CheckpointReader {
    /// Resolves `path` as [`crate::load_model`] does and validates every header.
    pub fn open<B: Backend>(path: &Path, device: &B::Device) -> Result<Self, Qwen2Error> {
        let dir = resolve_model_dir(path)?;
        let config = Qwen2Config::from_file(&dir.join("config.json"))?;
        let files = weight_files(&dir)?;
        // A lazy model: its parameters' shapes, nothing allocated.
        let params = parameter_shapes::<B, _>(&Qwen2ForCausalLM::<B>::new(&config, device));
        let mut found: BTreeMap<String, Entry> = BTreeMap::new();
        let mut file_dtypes = Vec::new();
        for file in &files {
            for (key, entry) in read_header(file)? {
                if let Some(prev) = found.get(&key) {
                    return Err(Qwen2Error::DuplicateTensor {
                        key,
                        first: prev.file.clone(),
                        second: file.clone(),
                    });
                }
                let name = format!("{:?}", entry.dtype);
                if !file_dtypes.contains(&name) {
                    file_dtypes.push(name);
                }
                found.insert(key, entry);
            }
        }
        let mut entries = BTreeMap::new();
        for (key, shape) in &params {
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
            entries.insert(key.clone(), e);
        }
        let tied = config.tie_word_embeddings;
        if let Some((key, e)) = found
            .into_iter()
            .find(|(k, _)| !(k.ends_with("rotary_emb.inv_freq") || (tied && k == "lm_head.weight")))
        {
            return Err(Qwen2Error::UnexpectedTensor { key, file: e.file });
        }
        Ok(Self {
            dir,
            config,
            params,
            file_dtypes,
            entries,
        })
    }

    /// The values of parameter `key` as f32, row-major, read from disk now.
    pub fn read_f32(&self, key: &str) -> Result<Vec<f32>, Qwen2Error> {
        let e = self.entries.get(key).ok_or_else(|| Qwen2Error::Load {
            key: key.to_string(),
            file: self.dir.clone(),
            reason: "not a parameter of this model".into(),
        })?;
        let load = |reason: String| Qwen2Error::Load {
            key: key.to_string(),
            file: e.file.clone(),
            reason,
        };
        read_tensor(e, DType::F32)
            .map_err(|err| load(err.to_string()))?
            .into_vec::<f32>()
            .map_err(|err| load(format!("{err:?}")))
    }
}
