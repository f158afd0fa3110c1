//! The LoRA-wrappable linear layer, mirroring PEFT's `lora.Linear` around a `torch.nn.Linear`.
//!
//! Differences from Burn's `nn::Linear`: the weight keeps the `[out, in]` layout of PyTorch
//! checkpoints (Burn's stores `[in, out]`); multiplying by its transposed view costs nothing on Flex
//! (strided GEMM), so no conversion happens at load time.
#![allow(non_snake_case)] // `lora_A` / `lora_B`: the field names are PEFT's checkpoint keys.

use burn::module::{Initializer, Module, Param, ParamId};
use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

use crate::config::InitLoraWeights;
use crate::dropout::{draw_key, dropout, is_host_backend, keyed_dropout};
use crate::error::LoraError;

/// One LoRA factor; its parameter path ends in `lora_A.weight` / `lora_B.weight`, as in PEFT.
#[derive(Module, Debug)]
pub struct LoraWeight<B: Backend> {
    /// `lora_A`: `[r, in]`; `lora_B`: `[out, r]`.
    pub weight: Param<Tensor<B, 2>>,
}

/// A linear layer `y = x·Wᵀ + b` that can carry a LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// Base weight, `[out_features, in_features]` (PyTorch layout).
    pub weight: Param<Tensor<B, 2>>,
    /// Optional base bias, `[out_features]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Down projection `[r, in_features]`, present when an adapter is attached.
    pub lora_A: Option<LoraWeight<B>>,
    /// Up projection `[out_features, r]`, present when an adapter is attached.
    pub lora_B: Option<LoraWeight<B>>,
    /// Dropout applied to the adapter's input only (PEFT `lora_dropout`); active under autodiff.
    pub lora_dropout: Option<Dropout>,
    /// `lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA); unused without an adapter.
    pub scaling: f64,
    /// Whether `scaling·B·A` is currently folded into `weight` (then forward skips the side path).
    pub merged: bool,
}

impl<B: Backend> LoraLinear<B> {
    /// A layer with lazily initialised random weights (normal, std `init_std`), no adapter.
    ///
    /// Parameters are lazy: nothing is allocated until first use, so a model built this way and then
    /// loaded from a checkpoint never holds the random values.
    pub fn new(
        in_features: usize,
        out_features: usize,
        bias: bool,
        init_std: f64,
        device: &B::Device,
    ) -> Self {
        let init = Initializer::Normal {
            mean: 0.0,
            std: init_std,
        };
        Self {
            weight: init.init([out_features, in_features], device),
            bias: bias.then(|| Initializer::Zeros.init([out_features], device)),
            lora_A: None,
            lora_B: None,
            lora_dropout: None,
            scaling: 1.0,
            merged: false,
        }
    }

    /// Attaches a fresh adapter of rank `r` as PEFT's `update_layer` + `reset_lora_parameters`:
    /// * `init = true`: A ~ Kaiming-uniform(a = √5) = U(±1/√in), B = 0 (the adapter starts as identity);
    /// * `"gaussian"`: A ~ N(0, 1/r), B = 0;
    /// * `false`: A ~ U(±1/√in), B ~ U(±1/√r) (nn.Linear's default init; for tests).
    ///
    /// Parameter ids derive from `module` (the module path), so they are the same in every run that
    /// builds the same model: optimizer state saved by one run finds its parameters in another.
    pub fn attach_adapter(
        &mut self,
        module: &str,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: &InitLoraWeights,
    ) {
        let [out_f, in_f] = self.shape();
        let device = self.weight.lazy_device();
        let kaiming = |fan_in: usize| {
            Distribution::Uniform(-1.0 / (fan_in as f64).sqrt(), 1.0 / (fan_in as f64).sqrt())
        };
        let (dist_a, dist_b) = match init {
            InitLoraWeights::Bool(true) => (kaiming(in_f), None),
            InitLoraWeights::Bool(false) => (kaiming(in_f), Some(kaiming(r))),
            InitLoraWeights::Named(_) => (Distribution::Normal(0.0, 1.0 / r as f64), None),
        };
        let a = Tensor::<B, 2>::random([r, in_f], dist_a, &device);
        let b = match dist_b {
            Some(d) => Tensor::<B, 2>::random([out_f, r], d, &device),
            None => Tensor::<B, 2>::zeros([out_f, r], &device),
        };
        self.lora_A = Some(LoraWeight {
            weight: Param::initialized(
                param_id(&format!("{module}.lora_A.weight")),
                a.require_grad(),
            ),
        });
        self.lora_B = Some(LoraWeight {
            weight: Param::initialized(
                param_id(&format!("{module}.lora_B.weight")),
                b.require_grad(),
            ),
        });
        self.lora_dropout = (dropout > 0.0).then_some(Dropout { prob: dropout });
        self.scaling = scaling;
        self.merged = false;
    }

    /// Removes the adapter (unmerging it first if merged).
    pub fn detach_adapter(&mut self, module: &str) -> Result<(), LoraError> {
        if self.merged {
            self.unmerge(module)?;
        }
        self.lora_A = None;
        self.lora_B = None;
        self.lora_dropout = None;
        Ok(())
    }

    /// `scaling · B·A`, `[out, in]`.
    pub fn delta_weight(&self) -> Option<Tensor<B, 2>> {
        let (a, b) = (self.lora_A.as_ref()?, self.lora_B.as_ref()?);
        Some(
            b.weight
                .val()
                .matmul(a.weight.val())
                .mul_scalar(self.scaling),
        )
    }

    /// Folds `scaling·B·A` into the base weight (PEFT `merge(safe_merge=True)`): refuses a result
    /// with NaN/Inf, leaving the layer unchanged.
    pub fn merge(&mut self, module: &str) -> Result<(), LoraError> {
        self.fold(module, true)
    }

    /// Subtracts `scaling·B·A` from the merged base weight (PEFT `unmerge`).
    pub fn unmerge(&mut self, module: &str) -> Result<(), LoraError> {
        self.fold(module, false)
    }

    fn fold(&mut self, module: &str, merge: bool) -> Result<(), LoraError> {
        let state = |reason: &str| LoraError::MergeState {
            module: module.to_string(),
            reason: reason.to_string(),
        };
        if self.merged == merge {
            return Err(state(if merge {
                "already merged"
            } else {
                "not merged"
            }));
        }
        let delta = self
            .delta_weight()
            .ok_or_else(|| state("no adapter attached"))?;
        let w = self.weight.val();
        let (dtype, rg) = (w.dtype(), w.is_require_grad());
        let delta = delta.detach().cast(dtype);
        let new = if merge { w + delta } else { w - delta };
        let finite = new.clone().is_nan().bool_or(new.clone().is_inf()).any();
        if finite
            .into_data()
            .to_vec::<bool>()
            .map(|v| v[0])
            .unwrap_or(true)
        {
            return Err(LoraError::NonFiniteMerge {
                module: module.to_string(),
            });
        }
        // The base stays frozen: detach from the adapter's graph, keep the flag it had.
        self.weight = self
            .weight
            .clone()
            .map(|_| new.detach().set_require_grad(rg));
        self.merged = merge;
        Ok(())
    }

    /// `[out_features, in_features]` without materializing a lazy weight.
    pub fn shape(&self) -> [usize; 2] {
        self.weight.lazy_shape().dims::<2>()
    }

    /// Whether an adapter is attached.
    pub fn has_adapter(&self) -> bool {
        self.lora_A.is_some() && self.lora_B.is_some()
    }

    /// The base map only: `x·Wᵀ + b` over the last dimension.
    pub fn forward_base<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let y = matmul_t(x, self.weight.val());
        match &self.bias {
            Some(b) => y + b.val().unsqueeze::<D>(),
            None => y,
        }
    }

    /// `x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ`; the base alone when no adapter is attached.
    ///
    /// Training on the CPU (`Autodiff<Flex>`, f32, frozen base) runs this as one operation with its
    /// own backward, on all cores (see `host.rs`); everything else runs [`Self::forward_reference`].
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let key = self.dropout_key(&x.device());
        if crate::host::applies(self, x.dtype()) {
            crate::host::forward(self, x, key)
        } else {
            self.forward_burn(x, key)
        }
    }

    /// Whether [`Self::forward`] runs the host operation for an input of `dtype`: on
    /// `Autodiff<Flex>`, all in f32, with a frozen base, unless `FERROLORA_HOST_KERNELS=0`.
    pub fn runs_on_host(&self, dtype: burn::tensor::DType) -> bool {
        crate::host::applies(self, dtype)
    }

    /// [`Self::forward`] written with Burn ops, on any backend: the definition the host operation
    /// is tested against.
    pub fn forward_reference<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let key = self.dropout_key(&x.device());
        self.forward_burn(x, key)
    }

    /// On the host under autodiff, the key of this call's dropout mask, drawn from the backend's
    /// generator ([`dropout`]); drawn before anything else of the call, whichever path runs.
    fn dropout_key(&self, device: &B::Device) -> Option<u64> {
        let p = self.lora_dropout.as_ref()?.prob;
        (self.has_adapter()
            && !self.merged
            && p > 0.0
            && is_host_backend::<B>()
            && B::ad_enabled(device))
        .then(|| draw_key::<B>(device))
    }

    fn forward_burn<const D: usize>(&self, x: Tensor<B, D>, key: Option<u64>) -> Tensor<B, D> {
        let (Some(a), Some(b), false) = (&self.lora_A, &self.lora_B, self.merged) else {
            return self.forward_base(x);
        };
        // Mixed precision: a bf16 base with f32 adapters computes the side path in the adapters'
        // dtype and adds it back in the base's (PEFT casts, then applies dropout, in that order).
        let (a, b) = (a.weight.val(), b.weight.val());
        let (dtype, adapter_dtype) = (x.dtype(), a.dtype());
        let xd = if dtype == adapter_dtype {
            x.clone()
        } else {
            x.clone().cast(adapter_dtype)
        };
        let xd = match (&self.lora_dropout, key) {
            (Some(d), Some(key)) => keyed_dropout(xd, key, 1.0 - d.prob),
            (Some(d), None) if !is_host_backend::<B>() => dropout(xd, d.prob),
            _ => xd,
        };
        // Rank-r side path: two thin GEMMs instead of a full-size `W + s·B·A`.
        // The scaling multiplies the thin `[.., r]` product, not the `[.., out]` one (the same
        // value, bit for bit when the scaling is a power of two, as alpha 32 / r 8 is).
        let low = matmul_t(xd, a).mul_scalar(self.scaling); // [.., r]
        let side = matmul_t(low, b); // [.., out]
        let side = if dtype == adapter_dtype {
            side
        } else {
            side.cast(dtype)
        };
        self.forward_base(x) + side
    }
}

/// `x·wᵀ` for `x` `[.., in]` and a weight `w` `[out, in]`: one 2-D product over the flattened
/// leading dimensions, with `w` multiplied as a transposed view. (Unsqueezing the transposed view to
/// `x`'s rank instead makes Burn copy it into a contiguous tensor on every call: the whole weight,
/// the output head's 545 MB for Qwen2.5-0.5B.)
pub fn matmul_t<B: Backend, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = x.reshape([rows, dims[D - 1]]).matmul(w.transpose());
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}

/// A stable parameter id from a parameter path (FNV-1a, 64 bit).
pub fn param_id(path: &str) -> ParamId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ParamId::from(h)
}
