//! Walking a module's float parameters by path: the one module-path visitor of the workspace,
//! used to count parameters, collect adapter factors, list shapes against a checkpoint and export
//! weights.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

/// One float parameter met by [`visit_params`].
pub struct ParamRef<'a, B: Backend> {
    /// Its module path, e.g. `model.layers.0.self_attn.q_proj.lora_A.weight` (the checkpoint key,
    /// for a model whose field names are the checkpoint's module names).
    pub path: &'a str,
    /// Its shape, read without materializing a lazy parameter.
    pub shape: &'a [usize],
    /// Whether it holds values (false for a lazy parameter nothing has used or loaded yet).
    pub loaded: bool,
    value: &'a dyn Fn() -> TensorPrimitive<B>,
}

impl<B: Backend> ParamRef<'_, B> {
    /// Its value as a rank-`D` tensor (the parameter itself: the same autodiff node), or `None`
    /// when its rank is not `D`. Materializes a lazy parameter.
    pub fn value<const D: usize>(&self) -> Option<Tensor<B, D>> {
        (self.shape.len() == D).then(|| Tensor::from_primitive((self.value)()))
    }

    /// Its value flattened to one dimension (no copy for a contiguous tensor).
    pub fn flat(&self) -> Tensor<B, 1> {
        fn flat<B: Backend, const D: usize>(p: &ParamRef<'_, B>) -> Tensor<B, 1> {
            p.value::<D>().expect("rank checked").reshape([-1])
        }
        match self.shape.len() {
            1 => flat::<B, 1>(self),
            2 => flat::<B, 2>(self),
            3 => flat::<B, 3>(self),
            4 => flat::<B, 4>(self),
            r => panic!(
                "parameter `{}` has rank {r}; ranks 1 to 4 are handled",
                self.path
            ),
        }
    }

    /// Whether it belongs to the adapter: a `lora_A` / `lora_B` module's parameter (the factors,
    /// `lora_B.bias`), DoRA's `lora_magnitude_vector`, or trained token rows (`token_adapter`).
    pub fn is_adapter(&self) -> bool {
        is_adapter_path(self.path)
    }

    /// The path of the module it belongs to (`lm_head.weight` → `lm_head`).
    pub fn module(&self) -> &str {
        module_of(self.path)
    }
}

/// [`ParamRef::is_adapter`] for a parameter path.
pub(crate) fn is_adapter_path(path: &str) -> bool {
    path.split('.').any(|s| {
        matches!(
            s,
            "lora_A" | "lora_B" | "lora_magnitude_vector" | "token_adapter"
        )
    })
}

/// The module path of a parameter path (`lm_head.weight` → `lm_head`).
pub(crate) fn module_of(param_path: &str) -> &str {
    param_path.rsplit_once('.').map_or("", |(m, _)| m)
}

/// Calls `f` with every float parameter of `module`, in module order.
pub fn visit_params<B: Backend, M: Module<B>>(module: &M, mut f: impl FnMut(ParamRef<'_, B>)) {
    struct Visitor<'f, F> {
        stack: Vec<String>,
        f: &'f mut F,
    }
    impl<B: Backend, F: FnMut(ParamRef<'_, B>)> ModuleVisitor<B> for Visitor<'_, F> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let path = self.stack.join(".");
            let shape = p.lazy_shape().to_vec();
            let value = || p.val().into_primitive();
            (self.f)(ParamRef {
                path: &path,
                shape: &shape,
                loaded: p.is_initialized(),
                value: &value,
            });
        }
    }
    module.visit(&mut Visitor {
        stack: Vec::new(),
        f: &mut f,
    });
}

/// `(adapter elements, all elements)` of a module, without materializing lazy parameters.
pub fn param_count<B: Backend, M: Module<B>>(model: &M) -> (usize, usize) {
    let (mut lora, mut all) = (0, 0);
    visit_params(model, |p: ParamRef<'_, B>| {
        let n = p.shape.iter().product::<usize>();
        all += n;
        if p.is_adapter() {
            lora += n;
        }
    });
    (lora, all)
}
