//! transformers' `clip_grad_norm_`: one global L2 norm over every gradient, then one scale factor.
//! (Burn's `GradientClippingConfig::Norm` clips each tensor separately, which is not the same.)

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

struct Visit<'a> {
    grads: &'a mut GradientsParams,
    sq: f64,
    scale: Option<f32>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Visit<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let Some(g) = self.grads.remove::<B::InnerBackend, D>(p.id) else {
            return;
        };
        let g = match self.scale {
            None => {
                self.sq += g.clone().powi_scalar(2).sum().into_scalar().elem::<f64>();
                g
            }
            Some(s) => g.mul_scalar(s),
        };
        self.grads.register::<B::InnerBackend, D>(p.id, g);
    }
}

/// Returns the global norm before clipping, and scales every gradient by
/// `min(1, max_norm / (norm + 1e-6))` when `max_norm > 0` (PyTorch's formula).
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let mut v = Visit {
        grads,
        sq: 0.0,
        scale: None,
    };
    model.visit(&mut v);
    let norm = v.sq.sqrt();
    if max_norm > 0.0 && norm.is_finite() {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        if coef < 1.0 {
            let mut v = Visit {
                grads: v.grads,
                sq: 0.0,
                scale: Some(coef as f32),
            };
            model.visit(&mut v);
        }
    }
    norm
}
