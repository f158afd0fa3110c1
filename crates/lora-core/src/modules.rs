//! PEFT's `modules_to_save`: whole modules (an output head, an embedding) trained in full beside
//! the adapters and stored in the adapter file.
//!
//! PEFT wraps each such module in a `ModulesToSaveWrapper` that trains a copy and keeps the
//! original for when the adapter is disabled; this crate trains the module's own parameters in
//! place (one copy in memory, not two) and reports the parameter counts PEFT prints, which count
//! the copy twice. In the file the parameters keep their plain module path,
//! `base_model.model.lm_head.weight`, as PEFT writes them.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::LoraConfig;
use crate::linear::param_id;
use crate::params::{is_adapter_path, module_of, visit_params, ParamRef};

/// Whether `modules_to_save` names the module at `path` (PEFT: `path.endswith(name)`).
pub fn is_module_to_save(cfg: &LoraConfig, path: &str) -> bool {
    cfg.modules_to_save
        .iter()
        .flatten()
        .any(|name| path.ends_with(name.as_str()))
}

/// `(parameter path, shape)` of every parameter of the modules `modules_to_save` names.
pub(crate) fn saved_shapes<B: Backend, M: Module<B>>(
    model: &M,
    cfg: &LoraConfig,
) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    visit_params(model, |p: ParamRef<'_, B>| {
        if !p.is_adapter() && is_module_to_save(cfg, p.module()) {
            out.push((p.path.to_string(), p.shape.to_vec()));
        }
    });
    out
}

/// What [`SavedMapper`] does to each parameter of the modules to save.
enum Op {
    /// Make it trainable.
    Unfreeze,
    /// Set it from these values (parameter path → f32 values), trainable.
    Load(BTreeMap<String, Vec<f32>>),
}

/// Applies an [`Op`] to every parameter of the modules `modules_to_save` names.
struct SavedMapper<'a> {
    cfg: &'a LoraConfig,
    stack: Vec<String>,
    op: Op,
}

impl<B: Backend> ModuleMapper<B> for SavedMapper<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = self.stack.join(".");
        if is_adapter_path(&path) || !is_module_to_save(self.cfg, module_of(&path)) {
            return p;
        }
        // Ids from the path, so that optimizer state finds the parameter again in a resumed run.
        match &mut self.op {
            Op::Unfreeze if p.is_initialized() => {
                Param::initialized(param_id(&path), p.val().detach().require_grad())
            }
            // Never loaded (a model built to count parameters): stays lazy.
            Op::Unfreeze => p.set_require_grad(true),
            Op::Load(values) => {
                let Some(v) = values.remove(&path) else {
                    return p;
                };
                let (shape, device) = (p.lazy_shape(), p.lazy_device());
                let dtype = if p.is_initialized() {
                    p.val().dtype()
                } else {
                    burn::tensor::DType::F32
                };
                let t = Tensor::<B, D>::from_data(TensorData::new(v, shape), (&device, dtype));
                Param::initialized(param_id(&path), t.require_grad())
            }
        }
    }
}

/// Makes the parameters of every module `modules_to_save` names trainable, each with an id from
/// its path. A parameter that was never loaded (a model built to count parameters) stays lazy.
pub(crate) fn unfreeze_saved<B: Backend, M: Module<B>>(model: M, cfg: &LoraConfig) -> M {
    model.map(&mut SavedMapper {
        cfg,
        stack: Vec::new(),
        op: Op::Unfreeze,
    })
}

/// Sets the parameters of the modules to save from `values` (parameter path → f32 values of the
/// parameter's shape), trainable, in each parameter's own dtype.
pub(crate) fn load_saved<B: Backend, M: Module<B>>(
    model: M,
    cfg: &LoraConfig,
    values: BTreeMap<String, Vec<f32>>,
) -> M {
    model.map(&mut SavedMapper {
        cfg,
        stack: Vec::new(),
        op: Op::Load(values),
    })
}
