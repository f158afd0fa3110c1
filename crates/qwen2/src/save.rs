//! Writing a model as a Hugging Face directory: `config.json` + `model.safetensors` (f32), keys =
//! module paths. Used for random test checkpoints; each file is written to a temporary name and
//! renamed.

use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::error::Qwen2Error;
use crate::{Qwen2Config, Qwen2ForCausalLM};

/// Writes `dir/config.json` and `dir/model.safetensors` (every parameter, f32; adapters excluded).
pub fn save_model<B: Backend>(
    model: &Qwen2ForCausalLM<B>,
    config: &Qwen2Config,
    dir: &Path,
) -> Result<(), Qwen2Error> {
    struct Collect {
        stack: Vec<String>,
        out: Vec<(String, Vec<usize>, Vec<u8>)>,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if self.stack.iter().any(|s| s == "lora_A" || s == "lora_B") {
                return;
            }
            let t = p.val();
            let shape = t.dims().to_vec();
            let v = t
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .unwrap_or_default();
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.out.push((self.stack.join("."), shape, bytes));
        }
    }
    let mut c = Collect {
        stack: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut c);
    std::fs::create_dir_all(dir).map_err(|e| Qwen2Error::io(dir, e))?;
    let views: Vec<(String, TensorView)> = c
        .out
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("sizes agree"),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let file = dir.join("model.safetensors");
    let bytes =
        safetensors::serialize(views, Some(meta)).map_err(|e| Qwen2Error::BadSafetensors {
            file: file.clone(),
            reason: e.to_string(),
        })?;
    write_atomic(&file, &bytes)?;
    let mut cfg = config.clone();
    cfg.torch_dtype = Some("float32".into());
    cfg.dtype = None;
    let json = serde_json::to_string_pretty(&cfg).expect("config serializes");
    write_atomic(&dir.join("config.json"), json.as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Qwen2Error> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(|e| Qwen2Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Qwen2Error::io(path, e))
}
