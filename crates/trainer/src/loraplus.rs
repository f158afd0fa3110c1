//! LoRA+ (Hayou, Ghosh and Yu, 2024), as PEFT's `create_loraplus_optimizer` sets it up: the `lora_B`
//! matrices in a parameter group whose learning rate is `loraplus_lr_ratio` times the others'. One
//! optimizer keeps every parameter's moments; a step updates the `lora_B` parameters with the
//! scaled rate and the rest with the plain one (AdamW's decoupled weight decay then scales with
//! each group's rate, as in PyTorch).

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;

/// Moves the gradients of every parameter under a `lora_B` module, and of every 1-D parameter
/// (DoRA's magnitudes, `lora_B` biases), out of `grads`, into the set returned: PEFT's `groupB`
/// (`"lora_B" in name or param.ndim == 1`).
pub fn take_lora_b<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
) -> GradientsParams {
    struct Split<'a> {
        stack: Vec<String>,
        from: &'a mut GradientsParams,
        to: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Split<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if D == 1 || self.stack.iter().any(|s| s == "lora_B") {
                if let Some(g) = self.from.remove::<B::InnerBackend, D>(p.id) {
                    self.to.register::<B::InnerBackend, D>(p.id, g);
                }
            }
        }
    }
    let mut v = Split {
        stack: Vec::new(),
        from: grads,
        to: GradientsParams::new(),
    };
    model.visit(&mut v);
    v.to
}
