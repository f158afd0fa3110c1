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
    /// The base weight in 4 bits (QLoRA: a model loaded with `load_in_4bit`). When set, `weight`
    /// stays lazy (never allocated) and every product dequantizes this weight for that call, so
    /// the full-precision base exists one layer at a time (plus what a training step keeps for
    /// its backward).
    #[module(skip)]
    pub base_4bit: Option<Arc<Base4bit>>,
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
            lora_dropout: None,
            scaling: 1.0,
            merged: false,
            base_4bit: None,
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
        if self.base_4bit.is_some() {
            return Err(state(
                "the base weight is 4-bit (load_in_4bit): merge into the full-precision model \
                 instead (load it without 4-bit quantization)",
            ));
        }
        let w = self.weight.val();
        let rg = w.is_require_grad();
        let new = self.folded(w, merge, module)?;
        // The base stays frozen: detach from the adapter's graph, keep the flag it had.
        self.weight = self
            .weight
            .clone()
            .map(|_| new.detach().set_require_grad(rg));
        self.merged = merge;
        Ok(())
    }

    /// `w + scaling·B·A` for a base weight `w` held outside the layer (a checkpoint streamed tensor
    /// by tensor, whose layer keeps its weight lazy): exactly what [`Self::merge`] folds into
    /// `self.weight`, with the same refusal of NaN/Inf.
    pub fn merged_weight(&self, w: Tensor<B, 2>, module: &str) -> Result<Tensor<B, 2>, LoraError> {
        self.folded(w, true, module)
    }

    /// `w ± scaling·B·A` in `w`'s dtype (the delta computed in the adapter's, as PEFT), refusing a
    /// result with NaN/Inf.
    fn folded(
        &self,
        w: Tensor<B, 2>,
        merge: bool,
        module: &str,
    ) -> Result<Tensor<B, 2>, LoraError> {
        let delta = self.delta_weight().ok_or_else(|| LoraError::MergeState {
            module: module.to_string(),
            reason: "no adapter attached".to_string(),
        })?;
        let delta = delta.detach().cast(w.dtype());
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
        Ok(new)
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
        let y = kernels::cpu::linear_rows(x, w, bias.as_ref())?;
        let Some((a, b)) = self.active_adapter() else {
            return Some(y);
        };
        // As `forward_burn`: the scaling multiplies the thin `[rows, r]` product.
        let low = kernels::cpu::linear_rows(x, &a, None)?.mul_scalar(self.scaling);
        Some(y + kernels::cpu::linear_rows(&low, &b, None)?)
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
        if q.compute_dtype != DType::F32 {
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
        let xd = if dtype == adapter_dtype {
            x.clone()
        } else {
            x.clone().cast(adapter_dtype)
        };
        let xd = match (&self.lora_dropout, key) {
            (Some(d), Some(key)) => keyed_dropout(xd, key, 1.0 - d.prob),
            (Some(d), None) if !keyed_masks::<B>() => dropout(xd, d.prob),
            _ => xd,
        };
        // Rank-r side path: two thin GEMMs instead of a full-size `W + s·B·A`.
        // The scaling multiplies the thin `[rows, r]` product, not the `[rows, out]` one (the same
        // value, bit for bit when the scaling is a power of two, as alpha 32 / r 8 is).
        let low = xd.matmul(a.transpose()).mul_scalar(self.scaling); // [rows, r]
        let side = low.matmul(b.transpose()); // [rows, out]
        let side = if dtype == adapter_dtype {
            side
        } else {
            side.cast(dtype)
        };
        self.base(x, w) + side
    }
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
            lora_dropout: None,
            scaling: 1.0,
            merged: false,
            base_4bit: None,
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
