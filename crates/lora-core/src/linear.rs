//! The LoRA-wrappable linear layer, mirroring PEFT's `lora.Linear` around a `torch.nn.Linear`.
//!
//! Differences from Burn's `nn::Linear`: the weight keeps the `[out, in]` layout of PyTorch
//! checkpoints (Burn's stores `[in, out]`); multiplying by its transposed view costs nothing on Flex
//! (strided GEMM), so no conversion happens at load time.
#![allow(non_snake_case)] // `lora_A` / `lora_B`: the field names are PEFT's checkpoint keys.

use std::sync::Arc;

use burn::module::{Initializer, Module, Param, ParamId};
use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};

use crate::config::InitLoraWeights;
use crate::dropout::{draw_key, dropout, keyed_dropout, keyed_masks};
use crate::error::LoraError;

/// One LoRA factor; its parameter path ends in `lora_A.weight` / `lora_B.weight`, as in PEFT.
#[derive(Module, Debug)]
pub struct LoraWeight<B: Backend> {
    /// `lora_A`: `[r, in]`; `lora_B`: `[out, r]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `lora_B.bias` `[out]` with PEFT's `lora_bias = true` (trained, added as `scaling·bias`);
    /// never on `lora_A`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

/// DoRA's magnitude `[out]` (PEFT's `lora_magnitude_vector`; parameter path
/// `lora_magnitude_vector.weight`, file key `lora_magnitude_vector`).
#[derive(Module, Debug)]
pub struct LoraMagnitude<B: Backend> {
    /// The magnitude of each output row of the adapted weight.
    pub weight: Param<Tensor<B, 1>>,
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
    /// DoRA (`use_dora`): the magnitude vector; `None` for plain LoRA.
    pub lora_magnitude_vector: Option<LoraMagnitude<B>>,
    /// Dropout applied to the adapter's input only (PEFT `lora_dropout`); active under autodiff.
    pub lora_dropout: Option<Dropout>,
    /// `lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA); unused without an adapter.
    pub scaling: f64,
    /// Whether `scaling·B·A` is currently folded into `weight` (then forward skips the side path).
    pub merged: bool,
    /// The base weight in 4 bits (QLoRA: a model loaded with `load_in_4bit`). When set, `weight`
    /// stays lazy (never allocated) and every product dequantizes this weight for that call, so
    /// the full-precision base exists one layer at a time (plus what a training step keeps for
    /// its backward).
    #[module(skip)]
    pub base_4bit: Option<Arc<Base4bit>>,
    /// With a merged DoRA adapter, the row norms `‖W + s·B·A‖` of the merge (PEFT caches them
    /// too): unmerging divides by `magnitude / norm` of the unmerged weight.
    #[module(skip)]
    pub merged_norm: Option<Vec<f32>>,
    /// DoRA's `m / ‖W + s·B·A‖`, computed once for inference ([`Self::cache_dora_scale`]); any
    /// change of the adapter through this type's methods drops it. Never set while training.
    #[module(skip)]
    pub dora_scale_cache: Option<Arc<Vec<f32>>>,
}

/// The factors and residual of the init `name` ("pissa", "pissa_niter_N", "olora") of the weight
/// `values` `[out, in]` at rank `r`.
#[cfg(feature = "decompositions")]
fn decompose(
    name: &str,
    values: &[f32],
    [out, inp]: [usize; 2],
    r: usize,
    scaling: f64,
) -> Result<crate::init::Decomposed, LoraError> {
    Ok(if name == "olora" {
        crate::init::olora(values, out, inp, r, scaling)
    } else {
        let niter = name
            .strip_prefix("pissa_niter_")
            .and_then(|n| n.parse().ok());
        crate::init::pissa(values, out, inp, r, scaling, niter)
    })
}

/// Without SVD and QR in the build: refused.
#[cfg(not(feature = "decompositions"))]
fn decompose(
    name: &str,
    _: &[f32],
    _: [usize; 2],
    _: usize,
    _: f64,
) -> Result<Decomposed, LoraError> {
    Err(LoraError::InvalidConfig {
        path: None,
        reason: format!(
            "`init_lora_weights` {name:?} needs lora-core's `decompositions` feature (SVD / QR), \
             which this build leaves out"
        ),
    })
}

/// What [`decompose`] would give, in a build without it.
#[cfg(not(feature = "decompositions"))]
struct Decomposed {
    a: Vec<f32>,
    b: Vec<f32>,
    residual: Vec<f32>,
}

/// A base weight in bitsandbytes' 4-bit layout (`kernels::quant`), and the dtype products run in
/// (`bnb_4bit_compute_dtype`).
#[derive(Debug)]
pub struct Base4bit {
    pub quantized: Arc<kernels::quant::Quantized>,
    pub compute_dtype: DType,
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
            lora_magnitude_vector: None,
            lora_dropout: None,
            scaling: 1.0,
            merged: false,
            base_4bit: None,
            merged_norm: None,
            dora_scale_cache: None,
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
            bias: None,
        });
        self.lora_B = Some(LoraWeight {
            weight: Param::initialized(
                param_id(&format!("{module}.lora_B.weight")),
                b.require_grad(),
            ),
            bias: None,
        });
        self.lora_magnitude_vector = None;
        self.lora_dropout = (dropout > 0.0).then_some(Dropout { prob: dropout });
        self.scaling = scaling;
        self.merged = false;
        self.merged_norm = None;
        self.dora_scale_cache = None;
    }

    /// PEFT's PiSSA / OLoRA initializations (`init_lora_weights = "pissa"`, `"pissa_niter_N"`,
    /// `"olora"`; [`crate::init`]): the attached factors are set from the SVD / QR of the base
    /// weight and the base weight becomes the residual `W − s·B·A` (in its own dtype), so the
    /// layer computes what it computed before. Other inits leave the layer as it is, and so does
    /// a base weight that was never loaded (a model built to count parameters).
    pub fn init_from_base(
        &mut self,
        module: &str,
        init: &InitLoraWeights,
    ) -> Result<(), LoraError> {
        let InitLoraWeights::Named(name) = init else {
            return Ok(());
        };
        if !init.decomposes() {
            return Ok(());
        }
        let Some((a, _)) = self.active_adapter() else {
            return Ok(());
        };
        if self.base_4bit.is_some() {
            return Err(LoraError::InvalidConfig {
                path: None,
                reason: format!(
                    "`init_lora_weights` {name:?} on the 4-bit base of `{module}`: initialize on \
                     the full-precision model (as PEFT asks for PiSSA), then quantize the residual"
                ),
            });
        }
        if !self.weight.is_initialized() {
            return Ok(());
        }
        let (r, [out, inp]) = (a.dims()[0], self.shape());
        if r > out.min(inp) {
            return Err(LoraError::InvalidConfig {
                path: None,
                reason: format!(
                    "`init_lora_weights` {name:?} with rank {r} on `{module}` ([{out}, {inp}]): \
                     the rank must not exceed {}",
                    out.min(inp)
                ),
            });
        }
        let w = self.weight.val();
        let (dtype, device, rg) = (w.dtype(), w.device(), w.is_require_grad());
        let values = w
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| LoraError::InvalidConfig {
                path: None,
                reason: format!("reading the base weight of `{module}`: {e:?}"),
            })?;
        let d = decompose(name, &values, [out, inp], r, self.scaling)?;
        self.set_adapter_tensor("lora_A.weight", d.a);
        self.set_adapter_tensor("lora_B.weight", d.b);
        let residual = Tensor::<B, 2>::from_data(
            TensorData::new(d.residual, [out, inp]),
            (&device, DType::F32),
        );
        let residual = if dtype == DType::F32 {
            residual
        } else {
            residual.cast(dtype)
        };
        self.weight = self.weight.clone().map(|_| residual.set_require_grad(rg));
        self.dora_scale_cache = None;
        Ok(())
    }

    /// Gives the attached `lora_B` a trainable bias, zero at first (PEFT `lora_bias = true`).
    pub fn add_lora_bias(&mut self, module: &str) {
        let [out, _] = self.shape();
        let device = self.weight.lazy_device();
        if let Some(b) = self.lora_B.as_mut() {
            let zeros = Tensor::<B, 1>::zeros([out], &device);
            b.bias = Some(Param::initialized(
                param_id(&format!("{module}.lora_B.bias")),
                zeros.require_grad(),
            ));
        }
    }

    /// Turns the attached adapter into DoRA (PEFT `use_dora = true`): the magnitude starts as the
    /// row norms of `W + s·B·A` with the current factors, so the layer's output is unchanged.
    pub fn add_dora(&mut self, module: &str) {
        self.dora_scale_cache = None;
        let Some((a, b)) = self.active_adapter() else {
            return;
        };
        let id = param_id(&format!("{module}.lora_magnitude_vector.weight"));
        let weight = if self.weight.is_initialized() || self.base_4bit.is_some() {
            // A fresh leaf: the norm computed under autodiff is the result of operations.
            let norm = self.weight_norm(&a, &b);
            let norm = Tensor::<B, 1>::from_data(norm.to_data(), (&norm.device(), norm.dtype()));
            Param::initialized(id, norm.require_grad())
        } else {
            // A model built without weights (counting parameters, planning memory): the norms of
            // a weight that does not exist are not computed, and nothing is allocated.
            let [out, _] = self.shape();
            Param::uninitialized(
                id,
                move |device, grad| Tensor::<B, 1>::ones([out], device).set_require_grad(grad),
                self.weight.lazy_device(),
                true,
                [out].into(),
            )
        };
        self.lora_magnitude_vector = Some(LoraMagnitude { weight });
    }

    /// `‖W + s·B·A‖` over each output row, in the adapter's dtype, detached (PEFT's
    /// `get_weight_norm`, which DoRA treats as a constant). On the host in f32, one pass over `W`
    /// on all cores (`kernels::cpu::dora_row_norms`); elsewhere Burn ops.
    fn weight_norm(&self, a: &Tensor<B, 2>, b: &Tensor<B, 2>) -> Tensor<B, 1> {
        let w = self.w();
        #[cfg(feature = "cpu-kernels")]
        if let Some(norm) = kernels::cpu::dora_row_norms(&w, a, b, self.scaling) {
            return norm;
        }
        let lora_weight = b.clone().detach().matmul(a.clone().detach());
        let w = w.detach();
        let w = if w.dtype() == lora_weight.dtype() {
            w
        } else {
            w.cast(lora_weight.dtype())
        };
        let total = w + lora_weight.mul_scalar(self.scaling);
        total.powi_scalar(2).sum_dim(1).sqrt().squeeze_dim::<1>(1)
    }

    /// Sets the adapter parameter named by its file-key suffix (`lora_A.weight`, `lora_B.weight`,
    /// `lora_B.bias`, `lora_magnitude_vector`) to `values` (f32, trainable), keeping its id;
    /// `values` must hold as many elements as the parameter. Returns whether the layer has it.
    pub fn set_adapter_tensor(&mut self, suffix: &str, values: Vec<f32>) -> bool {
        self.dora_scale_cache = None;
        fn set<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>, values: Vec<f32>) {
            let (shape, device) = (p.lazy_shape(), p.lazy_device());
            let t =
                Tensor::<B, D>::from_data(TensorData::new(values, shape), (&device, DType::F32));
            *p = p.clone().map(|_| t.require_grad());
        }
        match suffix {
            "lora_A.weight" => self.lora_A.as_mut().map(|f| set(&mut f.weight, values)),
            "lora_B.weight" => self.lora_B.as_mut().map(|f| set(&mut f.weight, values)),
            "lora_B.bias" => self
                .lora_B
                .as_mut()
                .and_then(|f| f.bias.as_mut())
                .map(|b| set(b, values)),
            "lora_magnitude_vector" => self
                .lora_magnitude_vector
                .as_mut()
                .map(|m| set(&mut m.weight, values)),
            _ => None,
        }
        .is_some()
    }

    /// Whether the adapter is DoRA.
    pub fn is_dora(&self) -> bool {
        self.lora_magnitude_vector.is_some()
    }

    /// Removes the adapter (unmerging it first if merged).
    pub fn detach_adapter(&mut self, module: &str) -> Result<(), LoraError> {
        if self.merged {
            self.unmerge(module)?;
        }
        self.lora_A = None;
        self.lora_B = None;
        self.lora_magnitude_vector = None;
        self.dora_scale_cache = None;
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
        self.dora_scale_cache = None;
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
        if self.base_4bit.is_some() {
            return Err(state(
                "the base weight is 4-bit (load_in_4bit): merge into the full-precision model \
                 instead (load it without 4-bit quantization)",
            ));
        }
        // The bias first: it is the only check that can refuse after the weight is computed.
        let new_bias = match &self.bias {
            Some(b) => Some(self.folded_bias(b.val(), merge, module)?),
            None if self.lora_bias().is_some() => {
                return Err(state(
                    "the adapter has lora_bias = true but the base layer has no bias, so it \
                     cannot be merged (PEFT refuses it too); use the adapter unmerged",
                ))
            }
            None => None,
        };
        let w = self.weight.val();
        let rg = w.is_require_grad();
        let stored = if merge { None } else { self.merged_norm.take() };
        let (new, norm) = match self.folded(w, merge, module, stored.clone()) {
            Ok(v) => v,
            Err(e) => {
                self.merged_norm = stored;
                return Err(e);
            }
        };
        // The base stays frozen: detach from the adapter's graph, keep the flag it had.
        self.weight = self
            .weight
            .clone()
            .map(|_| new.detach().set_require_grad(rg));
        if let (Some(bias), Some(new)) = (self.bias.as_mut(), new_bias) {
            let rg = bias.val().is_require_grad();
            *bias = bias.clone().map(|_| new.detach().set_require_grad(rg));
        }
        self.merged_norm = if merge { norm } else { None };
        self.merged = merge;
        Ok(())
    }

    /// What [`Self::merge`] folds into `self.weight`, for a base weight `w` held outside the layer
    /// (a checkpoint streamed tensor by tensor, whose layer keeps its weight lazy), with the same
    /// refusal of NaN/Inf: `w + s·B·A`, or DoRA's `m / ‖w + s·B·A‖ ⊙ (w + s·B·A)`.
    pub fn merged_weight(&self, w: Tensor<B, 2>, module: &str) -> Result<Tensor<B, 2>, LoraError> {
        Ok(self.folded(w, true, module, None)?.0)
    }

    /// What [`Self::merge`] makes of the base bias `b` held outside the layer: `b + s·lora_B.bias`
    /// with `lora_bias`, else `b`.
    pub fn merged_bias(&self, b: Tensor<B, 1>, module: &str) -> Result<Tensor<B, 1>, LoraError> {
        self.folded_bias(b, true, module)
    }

    /// `lora_B.bias`, when the adapter has one.
    pub fn lora_bias(&self) -> Option<Tensor<B, 1>> {
        self.lora_B.as_ref()?.bias.as_ref().map(|b| b.val())
    }

    fn folded_bias(
        &self,
        b: Tensor<B, 1>,
        merge: bool,
        module: &str,
    ) -> Result<Tensor<B, 1>, LoraError> {
        let Some(lb) = self.lora_bias() else {
            return Ok(b);
        };
        let delta = lb.detach().mul_scalar(self.scaling).cast(b.dtype());
        let new = if merge { b + delta } else { b - delta };
        check_finite(new, module)
    }

    /// `w ± s·B·A` in `w`'s dtype (the delta computed in the adapter's, as PEFT), refusing a
    /// result with NaN/Inf. With DoRA, merging gives `m / n ⊙ (w + s·B·A)` with `n` the row norms
    /// of `w + s·B·A` (returned, for the unmerge), and unmerging `w / (m / n) − s·B·A` with the
    /// `n` of the merge (`norm`), all in f32 as PEFT computes them.
    fn folded(
        &self,
        w: Tensor<B, 2>,
        merge: bool,
        module: &str,
        norm: Option<Vec<f32>>,
    ) -> Result<(Tensor<B, 2>, Option<Vec<f32>>), LoraError> {
        let delta = self.delta_weight().ok_or_else(|| LoraError::MergeState {
            module: module.to_string(),
            reason: "no adapter attached".to_string(),
        })?;
        let Some(m) = &self.lora_magnitude_vector else {
            let delta = delta.detach().cast(w.dtype());
            let new = if merge { w + delta } else { w - delta };
            return Ok((check_finite(new, module)?, None));
        };
        let (dtype, device) = (w.dtype(), w.device());
        let (w, delta) = (w.cast(DType::F32), delta.detach().cast(DType::F32));
        let m = m.weight.val().detach().cast(DType::F32);
        let (new, norm) = if merge {
            let total = w + delta;
            let norm = total.clone().powi_scalar(2).sum_dim(1).sqrt(); // [out, 1]
            let factor = m.unsqueeze_dim::<2>(1) / norm.clone();
            let norm = norm.into_data().convert::<f32>().into_vec::<f32>();
            (factor * total, norm.ok())
        } else {
            let norm = norm.ok_or_else(|| LoraError::MergeState {
                module: module.to_string(),
                reason: "the DoRA merge's weight norms are unknown".to_string(),
            })?;
            let n = norm.len();
            let norm = Tensor::<B, 1>::from_data(TensorData::new(norm, [n]), (&device, DType::F32));
            let factor = m.unsqueeze_dim::<2>(1) / norm.unsqueeze_dim::<2>(1);
            (w / factor - delta, None)
        };
        Ok((check_finite(new.cast(dtype), module)?, norm))
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
        over_rows(x, |x| self.base(x, &self.w()))
    }

    /// `x·Wᵀ + b + scaling · (dropout(x)·Aᵀ)·Bᵀ`; the base alone when no adapter is attached.
    ///
    /// Training on the CPU (`Autodiff<Flex>`, f32, frozen base) runs this as one fused operation
    /// with its own backward, on all cores (`kernels::cpu::lora_linear`); inference on a single row
    /// (every decoding step) multiplies the stored weight by the row; everything else runs
    /// [`Self::forward_reference`].
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let key = self.dropout_key(&x.device());
        over_rows(x, |x| {
            if let Some(y) = self.forward_fused_4bit(&x, key) {
                return y;
            }
            self.forward_with(x, key, &self.w())
        })
    }

    /// [`Self::forward`] for `x` `[rows, in]` with the base weight `w` at hand.
    fn forward_with(&self, x: Tensor<B, 2>, key: Option<u64>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        if self.has_variant() {
            if let Some(y) = self.forward_variant_fused(&x, key, w) {
                return y;
            }
            if x.dims()[0] == 1 && !B::ad_enabled(&x.device()) {
                if let Some(y) = self.rows_kernel(&x, w) {
                    return y;
                }
            }
            return self.forward_burn(x, key, w);
        }
        if let Some(y) = self.forward_fused(&x, key, w) {
            return y;
        }
        if x.dims()[0] == 1 && !B::ad_enabled(&x.device()) {
            if let Some(y) = self.rows_kernel(&x, w) {
                return y;
            }
            return self.forward_row(x, w);
        }
        self.forward_burn(x, key, w)
    }

    /// Inference over a few rows at once (a step of batched decoding), `x` `[.., in]`. On the CPU
    /// (plain Flex, f32) every row's result is independent of the other rows and equal to what
    /// [`Self::forward`] gives that row alone (`kernels::cpu::linear_rows`), so a sequence decodes
    /// the same tokens alone or in a batch; elsewhere this is [`Self::forward`].
    pub fn forward_rows<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let key = self.dropout_key(&x.device());
        over_rows(x, |x| {
            if let Some(y) = self.forward_fused_4bit(&x, key) {
                return y;
            }
            // One dequantization of a 4-bit base serves whichever path runs.
            let w = self.w();
            match self.rows_kernel(&x, &w) {
                Some(y) => y,
                None => self.forward_with(x, key, &w),
            }
        })
    }

    /// `x·Wᵀ + b + scaling·(x·Aᵀ)·Bᵀ` with the row-independent CPU kernel, at inference.
    #[cfg(feature = "cpu-kernels")]
    fn rows_kernel(&self, x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        if B::ad_enabled(&x.device()) {
            return None;
        }
        let bias = self.bias.as_ref().map(|b| b.val());
        let Some((a, b)) = self.active_adapter() else {
            return kernels::cpu::linear_rows(x, w, bias.as_ref());
        };
        // As `forward_burn`: the scaling multiplies the thin `[rows, r]` product.
        let low = kernels::cpu::linear_rows(x, &a, None)?.mul_scalar(self.scaling);
        let side = kernels::cpu::linear_rows(&low, &b, None)?;
        let side = match self.lora_bias() {
            Some(lb) => side + lb.mul_scalar(self.scaling).unsqueeze::<2>(),
            None => side,
        };
        // DoRA without dropout: `m / ‖W + s·B·A‖ ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b` (see `forward_burn`);
        // every operation after the products is elementwise, so rows stay independent.
        if let Some(g) = self.dora_scale(&a, &b) {
            let y = kernels::cpu::linear_rows(x, w, None)? + side;
            let y = y * g.unsqueeze::<2>();
            return Some(match bias {
                Some(bias) => y + bias.unsqueeze::<2>(),
                None => y,
            });
        }
        Some(kernels::cpu::linear_rows(x, w, bias.as_ref())? + side)
    }

    #[cfg(not(feature = "cpu-kernels"))]
    fn rows_kernel(&self, _: &Tensor<B, 2>, _: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        None
    }

    /// Whether [`Self::forward`] runs the fused operation for an input of `dtype`: on
    /// `Autodiff<Flex>`, all in f32, with a frozen base, unless `FERROLORA_FUSED_KERNELS=0` (or
    /// without the `cpu-kernels` feature).
    pub fn runs_fused(&self, dtype: burn::tensor::DType) -> bool {
        #[cfg(feature = "cpu-kernels")]
        {
            let adapter = self.active_adapter();
            let bias = self.bias.as_ref().map(|b| b.val());
            let adapter = adapter.as_ref().map(|(a, b)| (a, b));
            kernels::cpu::lora_linear_applies(dtype, &self.w(), bias.as_ref(), adapter)
        }
        #[cfg(not(feature = "cpu-kernels"))]
        {
            let _ = dtype;
            false
        }
    }

    /// [`Self::forward`] written with Burn ops, on any backend: the definition the fused operation
    /// is tested against.
    pub fn forward_reference<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let key = self.dropout_key(&x.device());
        over_rows(x, |x| self.forward_burn(x, key, &self.w()))
    }

    /// Replaces the base weight by its 4-bit form (bitsandbytes' layout, `kernels::quant`), as
    /// bitsandbytes' `Linear4bit` replaces an `nn.Linear` of a model in memory; the full-precision
    /// weight is released (a lazy placeholder of its shape stays, never allocated).
    pub fn quantize_base(
        &mut self,
        quant_type: kernels::quant::Kind,
        double_quant: bool,
        compute_dtype: DType,
    ) {
        let [out, d_in] = self.shape();
        let device = self.weight.lazy_device();
        let values = self
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 after convert");
        let quantized = kernels::quant::Quantized::new(&values, quant_type, double_quant);
        self.dora_scale_cache = None;
        self.weight = Initializer::Zeros.init([out, d_in], &device);
        self.base_4bit = Some(Arc::new(Base4bit {
            quantized: Arc::new(quantized),
            compute_dtype,
        }));
    }

    /// The base weight `[out, in]`: the parameter, or the 4-bit weight dequantized now.
    fn w(&self) -> Tensor<B, 2> {
        match &self.base_4bit {
            None => self.weight.val(),
            Some(q) => {
                let [out, d_in] = self.shape();
                let data = TensorData::new(q.quantized.dequantize(), [out, d_in]);
                Tensor::from_data(data, (&self.weight.lazy_device(), q.compute_dtype))
            }
        }
    }

    /// `(A, B)` of an attached adapter that is not merged.
    fn active_adapter(&self) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
        match (&self.lora_A, &self.lora_B, self.merged) {
            (Some(a), Some(b), false) => Some((a.weight.val(), b.weight.val())),
            _ => None,
        }
    }

    /// On the host under autodiff, the key of this call's dropout mask, drawn from the backend's
    /// generator ([`dropout`]); drawn before anything else of the call, whichever path runs.
    fn dropout_key(&self, device: &B::Device) -> Option<u64> {
        let p = self.lora_dropout.as_ref()?.prob;
        (self.has_adapter()
            && !self.merged
            && p > 0.0
            && keyed_masks::<B>()
            && B::ad_enabled(device))
        .then(|| draw_key::<B>(device))
    }

    /// The fused operation, when it applies.
    #[cfg(feature = "cpu-kernels")]
    fn forward_fused(
        &self,
        x: &Tensor<B, 2>,
        key: Option<u64>,
        w: &Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        let bias = self.bias.as_ref().map(|b| b.val());
        kernels::cpu::lora_linear(x, w, bias.as_ref(), self.fused_adapter(key).as_ref())
    }

    /// The active adapter as the fused operations take it, with this call's dropout key.
    #[cfg(feature = "cpu-kernels")]
    fn fused_adapter(&self, key: Option<u64>) -> Option<kernels::cpu::Adapter<B>> {
        let keep = 1.0 - self.lora_dropout.as_ref().map_or(0.0, |d| d.prob);
        self.active_adapter().map(|(a, b)| kernels::cpu::Adapter {
            a,
            b,
            scaling: self.scaling,
            dropout: key.map(|k| (k, keep)),
        })
    }

    /// The fused operation over a 4-bit base (f32 compute), which keeps only the packed weight
    /// for its backward.
    #[cfg(feature = "cpu-kernels")]
    fn forward_fused_4bit(&self, x: &Tensor<B, 2>, key: Option<u64>) -> Option<Tensor<B, 2>> {
        let q = self.base_4bit.as_ref()?;
        if q.compute_dtype != DType::F32 || self.has_variant() {
            return None;
        }
        let bias = self.bias.as_ref().map(|b| b.val());
        kernels::cpu::lora_linear_4bit(
            x,
            &q.quantized,
            self.shape(),
            bias.as_ref(),
            self.fused_adapter(key).as_ref(),
        )
    }

    #[cfg(not(feature = "cpu-kernels"))]
    fn forward_fused_4bit(&self, _: &Tensor<B, 2>, _: Option<u64>) -> Option<Tensor<B, 2>> {
        None
    }

    #[cfg(not(feature = "cpu-kernels"))]
    fn forward_fused(
        &self,
        _: &Tensor<B, 2>,
        _: Option<u64>,
        _: &Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        None
    }

    /// `x·Wᵀ + b` for `x` `[rows, in]`.
    fn base(&self, x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        let y = if self.weight_first(&x) {
            // (W·xᵀ)ᵀ: the same product with the weight on the left, where Flex's GEMM runs
            // 1.4–2.4× faster at prompt-sized row counts (`cargo xtask bench-matmul`, 2 threads:
            // 129×4864·(896×4864)ᵀ 79 GFLOP/s, 896×4864·(129×4864)ᵀ 186; 129×896·(4864×896)ᵀ 168,
            // 4864×896·(129×896)ᵀ 251).
            w.clone().matmul(x.transpose()).transpose()
        } else {
            x.matmul(w.clone().transpose())
        };
        match &self.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        }
    }

    /// Whether [`Self::base`] multiplies with the weight on the left: at inference on the CPU
    /// (plain Flex: prompts, evaluation), for more than one row.
    fn weight_first(&self, x: &Tensor<B, 2>) -> bool {
        #[cfg(feature = "cpu-kernels")]
        {
            x.dims()[0] > 1
                && kernels::cpu::is_cpu_backend::<B>()
                && !B::ad_enabled(&x.device())
                && kernels::cpu::enabled()
        }
        #[cfg(not(feature = "cpu-kernels"))]
        {
            let _ = x;
            false
        }
    }

    /// One row `x` `[1, in]` for inference (no dropout), as `W·xᵀ` with `W` `[out, in]` as stored:
    /// on Flex a matrix-vector product with the transposed view `x·Wᵀ` is ~20× slower than with the
    /// contiguous weight (measured: 22 ms against 1 ms for 4864×896), and decoding is nothing but
    /// such products.
    fn forward_row(&self, x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        let [out, d_in] = self.shape();
        // [1, in] -> [in, 1] (free), [out, in] @ [in, 1] -> [out, 1]
        let xc = x.reshape([d_in, 1]);
        let mut y = w.clone().matmul(xc.clone());
        if let Some(bias) = &self.bias {
            y = y + bias.val().reshape([out, 1]);
        }
        if let Some((a, b)) = self.active_adapter() {
            // A bf16 base with f32 adapters: the side path runs in the adapters' dtype and is
            // added back in the base's, as in `forward_burn` (and PEFT).
            let (dtype, adapter_dtype) = (y.dtype(), a.dtype());
            let xc = if dtype == adapter_dtype {
                xc
            } else {
                xc.cast(adapter_dtype)
            };
            // [r, in] @ [in, 1] -> [r, 1]; [out, r] @ [r, 1] -> [out, 1]
            let side = b.matmul(a.matmul(xc)).mul_scalar(self.scaling);
            y = y + if dtype == adapter_dtype {
                side
            } else {
                side.cast(dtype)
            };
        }
        y.reshape([1, out])
    }

    /// The Burn-ops form for `x` `[rows, in]`.
    fn forward_burn(&self, x: Tensor<B, 2>, key: Option<u64>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        let Some((a, b)) = self.active_adapter() else {
            return self.base(x, w);
        };
        // Mixed precision: a bf16 base with f32 adapters computes the side path in the adapters'
        // dtype and adds it back in the base's (PEFT casts, then applies dropout, in that order).
        let (dtype, adapter_dtype) = (x.dtype(), a.dtype());
        let to = |t: Tensor<B, 2>, d: DType| if t.dtype() == d { t } else { t.cast(d) };
        let xa = to(x.clone(), adapter_dtype);
        let xd = self.dropped(xa.clone(), key);
        let input = xd.clone().unwrap_or(xa);
        // Rank-r side path: two thin GEMMs instead of a full-size `W + s·B·A`.
        // The scaling multiplies the thin `[rows, r]` product, not the `[rows, out]` one (the same
        // value, bit for bit when the scaling is a power of two, as alpha 32 / r 8 is).
        let low = input.matmul(a.clone().transpose()).mul_scalar(self.scaling); // [rows, r]
        let mut side = low.matmul(b.clone().transpose()); // [rows, out]
        if let Some(lb) = self.lora_bias() {
            // `lora_B(·)·s` with `lora_B` carrying a bias: `s·bias` on every row.
            side = side + lb.mul_scalar(self.scaling).unsqueeze::<2>();
        }
        let base = self.base(x, w);
        let Some(g) = self.dora_scale(&a, &b) else {
            return base + to(side, dtype);
        };
        // DoRA (PEFT's `DoraLinearLayer.forward`): with `g = m / ‖W + s·B·A‖` (the norm a
        // constant), `(g − 1)·base + g·s·lora`, where `base` is the base output without its bias
        // when no dropout is active, and `dropout(x)·Wᵀ` when one is.
        let g = g.unsqueeze::<2>();
        let base_result = match xd {
            None => {
                let b0 = to(base.clone(), adapter_dtype);
                match &self.bias {
                    Some(bias) => b0 - to(bias.val().unsqueeze::<2>(), adapter_dtype),
                    None => b0,
                }
            }
            Some(xd) => xd.matmul(to(w.clone(), adapter_dtype).transpose()),
        };
        let dora = (g.clone() - 1.0) * base_result + g * side;
        base + to(dora, dtype)
    }

    /// The adapter's input after this call's dropout, or `None` when no dropout is active (no
    /// adapter dropout, or not training).
    fn dropped(&self, x: Tensor<B, 2>, key: Option<u64>) -> Option<Tensor<B, 2>> {
        let d = self.lora_dropout.as_ref()?;
        match key {
            Some(key) => Some(keyed_dropout(x, key, 1.0 - d.prob)),
            None if !keyed_masks::<B>() && d.prob > 0.0 && B::ad_enabled(&x.device()) => {
                Some(dropout(x, d.prob))
            }
            None => None,
        }
    }

    /// Whether the attached, unmerged adapter is DoRA or has a `lora_B` bias: the forward paths
    /// of plain LoRA do not take those.
    fn has_variant(&self) -> bool {
        !self.merged && (self.is_dora() || self.lora_bias().is_some())
    }

    /// DoRA's `m / ‖W + s·B·A‖` `[out]` (the norm detached), for the factors `a`, `b`: the cached
    /// values at inference when [`Self::cache_dora_scale`] stored them.
    fn dora_scale(&self, a: &Tensor<B, 2>, b: &Tensor<B, 2>) -> Option<Tensor<B, 1>> {
        let m = self.lora_magnitude_vector.as_ref()?.weight.val();
        if let Some(g) = &self.dora_scale_cache {
            if !B::ad_enabled(&m.device()) {
                let data = TensorData::new(g.as_ref().clone(), [g.len()]);
                return Some(Tensor::from_data(data, (&m.device(), m.dtype())));
            }
        }
        Some(m / self.weight_norm(a, b))
    }

    /// For inference with a DoRA adapter that no longer changes (chat, serve): computes
    /// `m / ‖W + s·B·A‖` once, so that a forward does not recompute the norms (PEFT's
    /// `ENABLE_DORA_CACHING`). Changing the adapter through this type's methods drops the cache;
    /// a model that trains must not call this.
    pub fn cache_dora_scale(&mut self) {
        self.dora_scale_cache = None;
        let Some((a, b)) = self.active_adapter() else {
            return;
        };
        if let Some(g) = self.dora_scale(&a, &b) {
            let v = g.into_data().convert::<f32>().into_vec::<f32>();
            self.dora_scale_cache = v.ok().map(Arc::new);
        }
    }

    /// The DoRA and `lora_bias` forms on the CPU's fused operation (`kernels::cpu::lora_linear`,
    /// its backward written out), the rest in Burn ops:
    /// * `lora_bias`: the fused layer plus `s·bias`;
    /// * DoRA, no dropout: `g ⊙ F(x) + b` with `F(x) = x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, `g = m / ‖W + s·B·A‖`;
    /// * DoRA with dropout (`xd = dropout(x)`): `(x − xd)·Wᵀ + b + g ⊙ F(xd)`.
    ///
    /// These equal [`Self::forward_burn`]'s terms rearranged, which round differently (~1e-7).
    #[cfg(feature = "cpu-kernels")]
    fn forward_variant_fused(
        &self,
        x: &Tensor<B, 2>,
        key: Option<u64>,
        w: &Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        let (a, b) = self.active_adapter()?;
        if !self.runs_fused(x.dtype()) {
            return None;
        }
        let bias = self.bias.as_ref().map(|b| b.val());
        let Some(g) = self.dora_scale(&a, &b) else {
            let y =
                kernels::cpu::lora_linear(x, w, bias.as_ref(), self.fused_adapter(key).as_ref())?;
            let lb = self.lora_bias()?;
            return Some(y + lb.mul_scalar(self.scaling).unsqueeze::<2>());
        };
        let adapter = kernels::cpu::Adapter {
            a,
            b,
            scaling: self.scaling,
            dropout: None,
        };
        let xd = self.dropped(x.clone(), key);
        let f = kernels::cpu::lora_linear(xd.as_ref().unwrap_or(x), w, None, Some(&adapter))?;
        let f = f * g.unsqueeze::<2>();
        Some(match xd {
            None => match bias {
                Some(bias) => f + bias.unsqueeze::<2>(),
                None => f,
            },
            Some(xd) => kernels::cpu::lora_linear(&(x.clone() - xd), w, bias.as_ref(), None)? + f,
        })
    }

    #[cfg(not(feature = "cpu-kernels"))]
    fn forward_variant_fused(
        &self,
        _: &Tensor<B, 2>,
        _: Option<u64>,
        _: &Tensor<B, 2>,
    ) -> Option<Tensor<B, 2>> {
        None
    }
}

/// `t`, or the error PEFT's safe merge gives when it holds NaN or Inf.
fn check_finite<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    module: &str,
) -> Result<Tensor<B, D>, LoraError> {
    let bad = t.clone().is_nan().bool_or(t.clone().is_inf()).any();
    if bad
        .into_data()
        .to_vec::<bool>()
        .map(|v| v[0])
        .unwrap_or(true)
    {
        return Err(LoraError::NonFiniteMerge {
            module: module.to_string(),
        });
    }
    Ok(t)
}

/// `f` applied to `x` `[.., in]` as one 2-D matrix `[rows, in]`, the result given back its leading
/// dimensions. (A weight multiplied as a transposed view of rank `D` instead makes Burn copy it into
/// a contiguous tensor on every call: the whole weight, the output head's 545 MB for
/// Qwen2.5-0.5B.)
fn over_rows<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = f(x.reshape([rows, dims[D - 1]]));
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}

impl<B: Backend> From<burn::nn::Linear<B>> for LoraLinear<B> {
    /// Wraps Burn's own linear layer, so that a Burn-native model can take adapters: its weight,
    /// stored `[in, out]` (or as a transposed view with `LinearLayout::Col`), is copied once into
    /// the `[out, in]` layout of PyTorch checkpoints that this layer uses; its parameter id, bias
    /// and gradient flag are kept.
    fn from(linear: burn::nn::Linear<B>) -> Self {
        let weight = linear.weight.map(|w| {
            let (device, dtype, grad) = (w.device(), w.dtype(), w.is_require_grad());
            // [in, out] -> [out, in], contiguous
            let data = w.transpose().into_data();
            Tensor::<B, 2>::from_data(data, (&device, dtype)).set_require_grad(grad)
        });
        Self {
            weight,
            bias: linear.bias,
            lora_A: None,
            lora_B: None,
            lora_magnitude_vector: None,
            lora_dropout: None,
            scaling: 1.0,
            merged: false,
            base_4bit: None,
            merged_norm: None,
            dora_scale_cache: None,
        }
    }
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
