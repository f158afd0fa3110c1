//! Batching examples into Burn tensors, with transformers' `DataCollatorForSeq2Seq` semantics:
//! right-pad every row to the longest in the batch (optionally rounded up to a multiple, e.g. 8 for
//! tensor cores), ids with the pad id, labels with -100, attention mask with 0.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::template::IGNORE_INDEX;
use crate::Example;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collator {
    /// Id written into `input_ids` padding (Qwen2.5: `<|endoftext|>`, 151643).
    pub pad_token_id: u32,
    /// Round the padded length up to a multiple of this (`pad_to_multiple_of`); `None` = longest.
    pub pad_to_multiple_of: Option<usize>,
    /// Padding-free batches: the examples back to back in one row (see [`Collator::pad`]).
    pub padding_free: bool,
}

/// A padded batch as flat row-major `[batch, seq]` values, before it becomes tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
    /// Padding-free batches: the length of each sequence in the one row, in order (a trailing
    /// run of padding, when rounded up to a multiple, counts as one more).
    pub seq_lens: Option<Vec<usize>>,
}

/// Model inputs: `input_ids`, `attention_mask` and `labels`, each `[batch, seq]`.
#[derive(Debug, Clone)]
pub struct Batch<B: Backend> {
    pub input_ids: Tensor<B, 2, Int>,
    pub attention_mask: Tensor<B, 2, Int>,
    pub labels: Tensor<B, 2, Int>,
    /// `Some` for a padding-free batch (`batch` is then 1): the sequence lengths of the row.
    pub seq_lens: Option<Vec<usize>>,
}

impl Collator {
    pub fn new(pad_token_id: u32) -> Self {
        Self {
            pad_token_id,
            pad_to_multiple_of: None,
            padding_free: false,
        }
    }

    /// Padding-free batches on or off (off by default).
    pub fn with_padding_free(mut self, on: bool) -> Self {
        self.padding_free = on;
        self
    }

    pub fn with_pad_to_multiple_of(mut self, m: Option<usize>) -> Self {
        self.pad_to_multiple_of = m.filter(|&m| m > 1);
        self
    }

    /// Pads `examples` into flat rows. Panics on an empty batch (a caller bug, not bad data).
    ///
    /// Padding-free: one row of the examples back to back, `seq_lens` set, and each example's
    /// first label -100 (its first token is never predicted in a padded batch either; in the row,
    /// the position before it belongs to the previous example).
    pub fn pad(&self, examples: &[&Example]) -> PaddedBatch {
        assert!(!examples.is_empty(), "collating an empty batch");
        if self.padding_free {
            return self.pack(examples);
        }
        let longest = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0);
        let seq = match self.pad_to_multiple_of {
            Some(m) => longest.div_ceil(m) * m,
            None => longest,
        };
        let n = examples.len() * seq;
        let mut out = PaddedBatch {
            batch: examples.len(),
            seq,
            input_ids: Vec::with_capacity(n),
            attention_mask: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            seq_lens: None,
        };
        for e in examples {
            let pad = seq - e.input_ids.len();
            out.input_ids
                .extend(e.input_ids.iter().map(|&t| i64::from(t)));
            out.input_ids
                .extend(std::iter::repeat_n(i64::from(self.pad_token_id), pad));
            out.attention_mask
                .extend(e.attention_mask.iter().map(|&m| i64::from(m)));
            out.attention_mask.extend(std::iter::repeat_n(0, pad));
            out.labels.extend_from_slice(&e.labels);
            out.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        }
        out
    }

    fn pack(&self, examples: &[&Example]) -> PaddedBatch {
        let mut seq_lens: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
        let total: usize = seq_lens.iter().sum();
        let seq = match self.pad_to_multiple_of {
            Some(m) => total.div_ceil(m) * m,
            None => total,
        };
        let mut out = PaddedBatch {
            batch: 1,
            seq,
            input_ids: Vec::with_capacity(seq),
            attention_mask: Vec::with_capacity(seq),
            labels: Vec::with_capacity(seq),
            seq_lens: None,
        };
        for e in examples {
            out.input_ids
                .extend(e.input_ids.iter().map(|&t| i64::from(t)));
            out.attention_mask
                .extend(e.attention_mask.iter().map(|&m| i64::from(m)));
            let first = out.labels.len();
            out.labels.extend_from_slice(&e.labels);
            if let Some(l) = out.labels.get_mut(first) {
                *l = IGNORE_INDEX;
            }
        }
        if seq > total {
            let pad = seq - total;
            seq_lens.push(pad);
            out.input_ids
                .extend(std::iter::repeat_n(i64::from(self.pad_token_id), pad));
            out.attention_mask.extend(std::iter::repeat_n(0, pad));
            out.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        }
        seq_lens.retain(|&n| n > 0);
        out.seq_lens = Some(seq_lens);
        out
    }

    /// Pads `examples` and uploads them as Int tensors on `device`.
    pub fn collate<B: Backend>(&self, examples: &[&Example], device: &B::Device) -> Batch<B> {
        let p = self.pad(examples);
        let shape = [p.batch, p.seq];
        let t = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device);
        Batch {
            input_ids: t(p.input_ids),
            attention_mask: t(p.attention_mask),
            labels: t(p.labels),
            seq_lens: p.seq_lens,
        }
    }
}
