//! Decoder layer, `Qwen2Model` and `Qwen2ForCausalLM`, mirroring HF `modeling_qwen2.py`.
//!
//! Field names are HF module names, so every parameter path equals its checkpoint key:
//! `model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, `model.norm.weight`,
//! `lm_head.weight` (absent when the embeddings are tied).

use burn::module::{Initializer, Module};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};
use lora_core::{LoraEmbedding, LoraLinear};

use crate::attention::{AttentionBias, LayerCache, Qwen2Attention};
use crate::mlp::Qwen2Mlp;
use crate::norm::Qwen2RmsNorm;
use crate::rope::RopeCache;
use crate::Qwen2Config;

/// One pre-norm decoder block: attention and MLP, each with a residual connection.
#[derive(Module, Debug)]
pub struct Qwen2DecoderLayer<B: Backend> {
    /// Attention block.
    pub self_attn: Qwen2Attention<B>,
    /// Feed-forward block.
    pub mlp: Qwen2Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: Qwen2RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: Qwen2RmsNorm<B>,
}

impl<B: Backend> Qwen2DecoderLayer<B> {
    /// Lazily initialised random layer.
    pub fn new(cfg: &Qwen2Config, device: &B::Device) -> Self {
        Self {
            self_attn: Qwen2Attention::new(cfg, device),
            mlp: Qwen2Mlp::new(cfg, device),
            input_layernorm: Qwen2RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, device),
            post_attention_layernorm: Qwen2RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, device),
        }
    }

    /// `[batch, seq, hidden] -> [batch, seq, hidden]`; with a `cache`, `x` follows the cached
    /// positions and extends the cache (see [`Qwen2Attention::forward`]).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeCache<B>,
        bias: &AttentionBias<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let attn = self.input_layernorm.forward(x.clone());
        let h = x + self.self_attn.forward(attn, rope, bias, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }

    /// The seven projections with their module paths within the layer (`self_attn.q_proj`, ...,
    /// `mlp.down_proj`).
    pub fn projections_mut(&mut self) -> [(&'static str, &mut LoraLinear<B>); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ]
    }

    /// One new token per sequence, each after its own cache: [`Qwen2Attention::forward_rows`] and
    /// [`Qwen2Mlp::forward_rows`] (batched decoding; rows independent of each other).
    pub fn forward_rows(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeCache<B>,
        caches: &mut [&mut LayerCache<B>],
    ) -> Tensor<B, 3> {
        let attn = self.input_layernorm.forward(x.clone());
        let h = x + self.self_attn.forward_rows(attn, rope, caches);
        h.clone()
            + self
                .mlp
                .forward_rows(self.post_attention_layernorm.forward(h))
    }
}

/// The decoder stack without the output head (HF `Qwen2Model`).
#[derive(Module, Debug)]
pub struct Qwen2Model<B: Backend> {
    /// Token embeddings `[vocab, hidden]` (trained rows with `trainable_token_indices`).
    pub embed_tokens: LoraEmbedding<B>,
    /// Decoder layers.
    pub layers: Vec<Qwen2DecoderLayer<B>>,
    /// Final norm.
    pub norm: Qwen2RmsNorm<B>,
}

/// HF `Qwen2ForCausalLM`: the decoder stack plus the language-model head.
#[derive(Module, Debug)]
pub struct Qwen2ForCausalLM<B: Backend> {
    /// The decoder stack.
    pub model: Qwen2Model<B>,
    /// Output head `[vocab, hidden]`; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<LoraLinear<B>>,
    /// RoPE base.
    pub rope_theta: f64,
    /// Width of one attention head.
    pub head_dim: usize,
}

impl<B: Backend> Qwen2ForCausalLM<B> {
    /// A model with lazily initialised random weights (normal with `initializer_range`, norms at 1).
    ///
    /// Nothing is allocated until a parameter is first used, so loading a checkpoint into this model
    /// never holds a second copy of the weights.
    pub fn new(cfg: &Qwen2Config, device: &B::Device) -> Self {
        let std = cfg.initializer_range;
        let init = Initializer::Normal { mean: 0.0, std };
        Self {
            model: Qwen2Model {
                embed_tokens: LoraEmbedding {
                    weight: init.init([cfg.vocab_size, cfg.hidden_size], device),
                    token_adapter: None,
                },
                layers: (0..cfg.num_hidden_layers)
                    .map(|_| Qwen2DecoderLayer::new(cfg, device))
                    .collect(),
                norm: Qwen2RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, device),
            },
            lm_head: (!cfg.tie_word_embeddings)
                .then(|| LoraLinear::new(cfg.hidden_size, cfg.vocab_size, false, std, device)),
            rope_theta: cfg.rope_theta(),
            head_dim: cfg.head_dim(),
        }
    }

    /// Final hidden states `[batch, seq, hidden]` (after `model.norm`), for callers that compute
    /// their own head (e.g. a loss over supervised positions only).
    ///
    /// * `input_ids` `[batch, seq]`.
    /// * `attention_mask` `[batch, seq]`, 1 for real tokens and 0 for padding (left or right);
    ///   `None` means no padding.
    /// * `position_ids` `[batch, seq]`; `None` means `0..seq` for every row, as transformers does
    ///   when none are given (`generate` derives them from the mask instead).
    pub fn forward_hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        position_ids: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let [batch, seq] = input_ids.dims();
        let x = self.model.embed_tokens.forward(input_ids);
        let (rope, bias) = self.padded_inputs(
            [batch, seq],
            attention_mask,
            position_ids,
            x.dtype(),
            &x.device(),
        );
        self.run_layers(x, &rope, &bias)
    }

    /// Rotary tables and attention bias of padded rows `[batch, seq]`; `attention_mask` and
    /// `position_ids` as in [`Self::forward_hidden`].
    pub fn padded_inputs(
        &self,
        [batch, seq]: [usize; 2],
        attention_mask: Option<Tensor<B, 2, Int>>,
        position_ids: Option<Tensor<B, 2, Int>>,
        dtype: DType,
        device: &B::Device,
    ) -> (RopeCache<B>, AttentionBias<B>) {
        let position_ids = position_ids.unwrap_or_else(|| {
            Tensor::<B, 1, Int>::arange(0..seq as i64, device)
                .reshape([1, seq])
                .expand([batch, seq])
        });
        let rope = RopeCache::new(position_ids, self.rope_theta, self.head_dim, dtype);
        let mask = attention_mask_4d(attention_mask, batch, seq, device);
        (rope, AttentionBias::Dense(additive_mask(mask)))
    }

    /// Final hidden states `[1, seq, hidden]` of a padding-free batch: `input_ids` `[1, seq]` holds
    /// sequences of `seq_lens` back to back (they add up to `seq`). Each sequence gets positions
    /// from 0 and attends only within itself, so its hidden states equal those of the same
    /// sequence in a padded batch, without computing anything for padding.
    pub fn forward_hidden_packed(
        &self,
        input_ids: Tensor<B, 2, Int>,
        seq_lens: &[usize],
    ) -> Tensor<B, 3> {
        let x = self.model.embed_tokens.forward(input_ids);
        let (rope, bias) = self.packed_inputs(seq_lens, x.dtype(), &x.device());
        self.run_layers(x, &rope, &bias)
    }

    /// Rotary tables and attention bias of a padding-free row of sequences of `seq_lens`.
    pub fn packed_inputs(
        &self,
        seq_lens: &[usize],
        dtype: DType,
        device: &B::Device,
    ) -> (RopeCache<B>, AttentionBias<B>) {
        let seq: usize = seq_lens.iter().sum();
        let positions: Vec<i64> = seq_lens.iter().flat_map(|&n| 0..n as i64).collect();
        let positions =
            Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [1, seq]), device);
        let rope = RopeCache::new(positions, self.rope_theta, self.head_dim, dtype);
        let mut by_len: Vec<(usize, Tensor<B, 4>)> = Vec::new();
        let masks = seq_lens
            .iter()
            .map(|&n| match by_len.iter().find(|(m, _)| *m == n) {
                Some((_, mask)) => mask.clone(),
                None => {
                    let mask = additive_mask(attention_mask_4d::<B>(None, 1, n, device));
                    by_len.push((n, mask.clone()));
                    mask
                }
            })
            .collect();
        (rope, AttentionBias::Packed(masks))
    }

    fn run_layers(
        &self,
        mut x: Tensor<B, 3>,
        rope: &RopeCache<B>,
        bias: &AttentionBias<B>,
    ) -> Tensor<B, 3> {
        for layer in &self.model.layers {
            x = layer.forward(x, rope, bias, None);
        }
        self.model.norm.forward(x)
    }

    /// Logits `[batch, seq, vocab]` for hidden states `[batch, seq, hidden]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            // Tied: the head is the embedding matrix `E` `[vocab, hidden]`, as `LoraLinear`
            // multiplies its weight: `h·Eᵀ` over the rows, or `E·hᵀ` for one row at inference
            // (every decoding step), where the transposed view is ~20× slower on Flex.
            None if self.model.embed_tokens.token_adapter.is_some() => {
                // Trained token rows: their logits columns come from those rows.
                let [b, s, h] = hidden.dims();
                let logits = self.model.embed_tokens.head(hidden.reshape([b * s, h]));
                let vocab = logits.dims()[1];
                logits.reshape([b, s, vocab])
            }
            None => {
                let e = self.model.embed_tokens.weight.val();
                let [b, s, h] = hidden.dims();
                let vocab = e.dims()[0];
                let logits = if b * s == 1 && !B::ad_enabled(&hidden.device()) {
                    let row = hidden.clone().reshape([1, h]);
                    match kernels::cpu::linear_rows(&row, &e, None) {
                        Some(l) => l,
                        None => e.matmul(hidden.reshape([h, 1])),
                    }
                } else {
                    hidden.reshape([b * s, h]).matmul(e.transpose())
                };
                logits.reshape([b, s, vocab])
            }
        }
    }

    /// Logits `[n, vocab]` of final hidden states `[n, hidden]` at inference, each row independent
    /// of the others (batched decoding): equal to [`Self::logits`] of that row alone.
    pub fn logits_rows(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(head) => head.forward_rows(hidden),
            None if self.model.embed_tokens.token_adapter.is_some() => {
                self.model.embed_tokens.head(hidden)
            }
            None => {
                let e = self.model.embed_tokens.weight.val();
                match kernels::cpu::linear_rows(&hidden, &e, None) {
                    Some(l) => l,
                    None => {
                        let [n, h] = hidden.dims();
                        self.logits(hidden.reshape([1, n, h]))
                            .reshape([n, e.dims()[0]])
                    }
                }
            }
        }
    }

    /// The decoder layers' seven projections replaced by their 4-bit forms
    /// ([`lora_core::LoraLinear::quantize_base`]; what [`crate::load_model_4bit`] holds, for a
    /// model already in memory).
    pub fn quantize_4bit(&mut self, q: crate::Load4bit) {
        for l in &mut self.model.layers {
            for (_, p) in l.projections_mut() {
                p.quantize_base(q.quant_type, q.double_quant, q.compute_dtype);
            }
        }
    }

    /// Logits `[batch, seq, vocab]`; arguments as in [`Self::forward_hidden`].
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Int>>,
        position_ids: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        self.logits(self.forward_hidden(input_ids, attention_mask, position_ids))
    }
}

/// HF's additive form of a boolean mask, in f32: `f32::MIN` where masked, 0 elsewhere.
pub fn additive_mask<B: Backend>(mask: Tensor<B, 4, Bool>) -> Tensor<B, 4> {
    let device = mask.device();
    Tensor::<B, 4>::zeros(mask.dims(), (&device, DType::F32)).mask_fill(mask, f32::MIN)
}

/// `[batch, 1, seq, seq]`, true where query `i` may not see key `j`: future keys, and padded keys.
pub fn attention_mask_4d<B: Backend>(
    attention_mask: Option<Tensor<B, 2, Int>>,
    batch: usize,
    seq: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    // tril_mask marks what lies outside the lower triangle: key index > query index.
    let causal = Tensor::<B, 2, Bool>::tril_mask([seq, seq], 0, device)
        .reshape([1, 1, seq, seq])
        .expand([batch, 1, seq, seq]);
    match attention_mask {
        None => causal,
        Some(m) => {
            // [batch, seq] -> [batch, 1, 1, seq]: a padded key is hidden from every query.
            let pad = m
                .equal_elem(0)
                .reshape([batch, 1, 1, seq])
                .expand([batch, 1, seq, seq]);
            causal.bool_or(pad)
        }
    }
}

impl<B: Backend> lora_core::LoraModel<B> for Qwen2ForCausalLM<B> {
    /// In `named_modules` order: per layer q, k, v, o, then gate, up, down; `lm_head` last.
    fn lora_linears(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        let mut out = Vec::with_capacity(self.model.layers.len() * 7 + 1);
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        if let Some(head) = self.lm_head.as_mut() {
            out.push(("lm_head".to_string(), head));
        }
        out
    }

    fn output_head(&self) -> Option<String> {
        self.lm_head.as_ref().map(|_| "lm_head".to_string())
    }

    fn lora_embeddings(&mut self) -> Vec<(String, &mut LoraEmbedding<B>)> {
        vec![(
            "model.embed_tokens".to_string(),
            &mut self.model.embed_tokens,
        )]
    }
}
