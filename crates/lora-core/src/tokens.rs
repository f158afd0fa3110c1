//! PEFT's `trainable_token_indices` (PEFT ≥ 0.15): an embedding whose rows for a few token ids
//! train, the rest frozen; the cheap way to learn new special tokens.
//!
//! As PEFT's `TrainableTokensLayer`, the trained rows are a separate parameter
//! `token_adapter.trainable_tokens_delta` `[n, hidden]` that starts as a copy of the base rows
//! and *replaces* them (it is not added to them); a tied output head reads the same replaced rows.
//! In the file: `base_model.model.<embedding path>.token_adapter.trainable_tokens_delta`.

use burn::module::{Initializer, Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::error::LoraError;
use crate::linear::param_id;

/// The trained rows of an embedding (PEFT's `TrainableTokensLayer`).
#[derive(Module, Debug)]
pub struct TrainableTokens<B: Backend> {
    /// The rows of the tokens in `token_indices`, in that order, `[n, hidden]`.
    pub trainable_tokens_delta: Param<Tensor<B, 2>>,
    /// The token ids whose rows train, in the order PEFT keeps them (the config's order).
    #[module(skip)]
    pub token_indices: Vec<usize>,
}

/// A token embedding `[vocab, hidden]` that can carry [`TrainableTokens`].
#[derive(Module, Debug)]
pub struct LoraEmbedding<B: Backend> {
    /// The table, `[vocab, hidden]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Trained rows replacing the table's, when `trainable_token_indices` names this embedding.
    pub token_adapter: Option<TrainableTokens<B>>,
}

impl<B: Backend> LoraEmbedding<B> {
    /// A table with lazily initialised random weights (normal, std `init_std`), no trained rows.
    pub fn new(vocab: usize, hidden: usize, init_std: f64, device: &B::Device) -> Self {
        let init = Initializer::Normal {
            mean: 0.0,
            std: init_std,
        };
        Self {
            weight: init.init([vocab, hidden], device),
            token_adapter: None,
        }
    }

    /// `[vocab, hidden]` without materializing a lazy table.
    pub fn shape(&self) -> [usize; 2] {
        self.weight.lazy_shape().dims::<2>()
    }

    /// Embeddings `[batch, seq, hidden]` of `ids` `[batch, seq]`: the table's rows, the trained
    /// rows where an id is one of the trained tokens.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let base = burn::tensor::module::embedding(self.weight.val(), ids.clone());
        let Some(t) = &self.token_adapter else {
            return base;
        };
        let (mask, local) = t.locate(ids);
        let rows = burn::tensor::module::embedding(t.trainable_tokens_delta.val(), local);
        let [b, s, h] = base.dims();
        base.mask_where(mask.unsqueeze_dim::<3>(2).expand([b, s, h]), rows)
    }

    /// `h·Wᵀ` for `h` `[rows, hidden]` with this table as a tied output head: the columns of the
    /// trained tokens come from the trained rows, as PEFT's tied adapter computes them.
    pub fn head(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let logits = h.clone().matmul(self.weight.val().transpose());
        let Some(t) = &self.token_adapter else {
            return logits;
        };
        let trained = h.matmul(t.trainable_tokens_delta.val().transpose()); // [rows, n]
        t.replace(logits, 1, trained)
    }

    /// Attaches trainable rows for `indices` (PEFT `update_layer`: a copy of the table's rows,
    /// trainable), with a parameter id from `module`, the embedding's path.
    pub fn attach_tokens(&mut self, module: &str, indices: &[usize]) -> Result<(), LoraError> {
        let [vocab, hidden] = self.shape();
        if let Some(&bad) = indices.iter().find(|&&i| i >= vocab) {
            return Err(LoraError::InvalidConfig {
                path: None,
                reason: format!(
                    "`trainable_token_indices` has token id {bad}, but `{module}` has {vocab} rows"
                ),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(&dup) = indices.iter().find(|&&i| !seen.insert(i)) {
            return Err(LoraError::InvalidConfig {
                path: None,
                reason: format!("`trainable_token_indices` lists token id {dup} twice"),
            });
        }
        let device = self.weight.lazy_device();
        let id = param_id(&format!("{module}.token_adapter.trainable_tokens_delta"));
        let delta = if self.weight.is_initialized() {
            let idx = Tensor::<B, 1, Int>::from_data(
                TensorData::new(indices.iter().map(|&i| i as i64).collect(), [indices.len()]),
                &device,
            );
            let rows = self.weight.val().detach().select(0, idx);
            // A fresh leaf of the rows' values.
            let rows = Tensor::<B, 2>::from_data(rows.to_data(), (&device, rows.dtype()));
            Param::initialized(id, rows.require_grad())
        } else {
            let n = indices.len();
            Param::uninitialized(
                id,
                move |d, grad| Tensor::<B, 2>::zeros([n, hidden], d).set_require_grad(grad),
                device,
                true,
                [n, hidden].into(),
            )
        };
        self.token_adapter = Some(TrainableTokens {
            trainable_tokens_delta: delta,
            token_indices: indices.to_vec(),
        });
        Ok(())
    }

    /// Sets the trained rows from f32 values `[n, hidden]` (trainable, keeping the id); returns
    /// whether the embedding has trained rows.
    pub fn set_trained_rows(&mut self, values: Vec<f32>) -> bool {
        let Some(t) = self.token_adapter.as_mut() else {
            return false;
        };
        let p = &mut t.trainable_tokens_delta;
        let (shape, device) = (p.lazy_shape(), p.lazy_device());
        let dtype = burn::tensor::DType::F32;
        let v = Tensor::<B, 2>::from_data(TensorData::new(values, shape), (&device, dtype));
        *p = p.clone().map(|_| v.require_grad());
        true
    }

    /// The table with the trained rows written in (PEFT `merge`), for a table `w` held outside
    /// the module (a checkpoint streamed tensor by tensor); `w` itself without trained rows.
    pub fn merged_weight(&self, w: Tensor<B, 2>) -> Tensor<B, 2> {
        let Some(t) = &self.token_adapter else {
            return w;
        };
        let delta = t.trainable_tokens_delta.val().detach().cast(w.dtype());
        t.replace(w, 0, delta)
    }

    /// Writes the trained rows into the table and drops them (PEFT `merge_and_unload`). Returns
    /// whether there were any.
    pub fn merge(&mut self) -> bool {
        if self.token_adapter.is_none() {
            return false;
        }
        let w = self.weight.val();
        let rg = w.is_require_grad();
        let merged = self.merged_weight(w.detach());
        self.weight = self.weight.clone().map(|_| merged.set_require_grad(rg));
        self.token_adapter = None;
        true
    }
}

impl<B: Backend> TrainableTokens<B> {
    /// `t` with its slices along `dim` (rows: 0, columns: 1) at `token_indices` replaced by those
    /// of `values` (in `token_indices` order): exactly the values, not a sum.
    fn replace(&self, t: Tensor<B, 2>, dim: usize, values: Tensor<B, 2>) -> Tensor<B, 2> {
        let (dims, device) = (t.dims(), t.device());
        let placed = Tensor::<B, 2>::zeros(dims, (&device, t.dtype())).select_assign(
            dim,
            self.index_tensor(&device),
            values,
            IndexingUpdateOp::Add,
        );
        let mut hit = vec![false; dims[dim]];
        for &i in &self.token_indices {
            hit[i] = true;
        }
        let shape = if dim == 0 { [dims[0], 1] } else { [1, dims[1]] };
        let hit = Tensor::<B, 2, Bool>::from_data(TensorData::new(hit, shape), &device);
        t.mask_where(hit.expand(dims), placed)
    }

    /// `token_indices` as an id tensor.
    fn index_tensor(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        let v: Vec<i64> = self.token_indices.iter().map(|&i| i as i64).collect();
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), device)
    }

    /// For `ids` `[batch, seq]`: where an id is a trained token, and each id's row in the trained
    /// rows (0 elsewhere).
    fn locate(&self, ids: Tensor<B, 2, Int>) -> (Tensor<B, 2, Bool>, Tensor<B, 2, Int>) {
        let device = ids.device();
        let shape = ids.dims();
        let host = ids.into_data().convert::<i64>();
        let host = host.as_slice::<i64>().expect("i64 ids");
        let mut mask = Vec::with_capacity(host.len());
        let mut local = Vec::with_capacity(host.len());
        for &id in host {
            let at = self.token_indices.iter().position(|&t| t as i64 == id);
            mask.push(at.is_some());
            local.push(at.unwrap_or(0) as i64);
        }
        (
            Tensor::from_data(TensorData::new(mask, shape), &device),
            Tensor::from_data(TensorData::new(local, shape), &device),
        )
    }
}
