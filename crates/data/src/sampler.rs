//! Epoch-wise sample order: a deterministic shuffle per epoch from a seed, optionally grouped by
//! length, with a checkpointable position so a run resumes mid-epoch exactly.
//!
//! Mirrors transformers' `RandomSampler` (one permutation per epoch) and `LengthGroupedSampler`
//! (shuffle, cut into mega-batches of 50 batches, sort each by length descending, put the longest
//! example first so an out-of-memory shows up at step one). The generator is SplitMix64
//! (`kernels::rng`) rather than `rand`, so the order can never change under a dependency upgrade.

use kernels::rng::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Where the sampler stands: the epoch, and how many samples of it were already handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SamplerState {
    /// 0-based epoch.
    pub epoch: u64,
    /// Samples of this epoch already handed out (the position in its order).
    pub index: usize,
}

#[derive(Debug, Clone)]
pub struct Sampler {
    lengths: Vec<usize>,
    seed: u64,
    shuffle: bool,
    /// `Some(batch_size)`: group by length with mega-batches of `50 * batch_size`.
    group_by_length: Option<usize>,
    state: SamplerState,
    /// The order of `state.epoch`, computed once per epoch.
    order: Option<(u64, Vec<usize>)>,
}

/// transformers' `LengthGroupedSampler` mega-batch multiplier.
const MEGABATCH_MULT: usize = 50;

impl Sampler {
    /// A shuffling sampler over examples with these lengths (the lengths only matter when grouping).
    pub fn new(lengths: Vec<usize>, seed: u64) -> Self {
        Self {
            lengths,
            seed,
            shuffle: true,
            group_by_length: None,
            state: SamplerState::default(),
            order: None,
        }
    }

    /// Keep the input order (evaluation, debugging).
    pub fn sequential(mut self) -> Self {
        self.shuffle = false;
        self.order = None;
        self
    }

    /// Group examples of similar length (less padding) for batches of `batch_size`.
    pub fn group_by_length(mut self, batch_size: usize) -> Self {
        self.group_by_length = Some(batch_size.max(1));
        self.order = None;
        self
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Continues from a saved position. Fails if it lies past the end of an epoch of this dataset.
    pub fn resume(mut self, state: SamplerState) -> Result<Self> {
        if state.index > self.lengths.len() {
            return Err(DataError::BadSamplerState {
                got_epoch: state.epoch,
                got_index: state.index,
                len: self.lengths.len(),
            });
        }
        self.state = state;
        Ok(self)
    }

    /// The full order of `epoch`: a pure function of (seed, epoch, lengths, options).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let n = self.lengths.len();
        let mut order: Vec<usize> = (0..n).collect();
        if !self.shuffle {
            return order;
        }
        let mut rng = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        for i in (1..n).rev() {
            order.swap(i, rng.below(i + 1));
        }
        if let Some(bs) = self.group_by_length {
            for mega in order.chunks_mut(MEGABATCH_MULT * bs) {
                // Stable sort: ties keep their shuffled order.
                mega.sort_by_key(|&i| std::cmp::Reverse(self.lengths[i]));
            }
            if let Some(longest) =
                (0..n).max_by_key(|&k| (self.lengths[order[k]], std::cmp::Reverse(k)))
            {
                order.swap(0, longest);
            }
        }
        order
    }

    /// The next batch of up to `batch_size` indices. A batch never spans two epochs: the last one
    /// of an epoch may be short, and after it the position moves to `(epoch + 1, 0)`.
    /// Returns an empty batch only for an empty dataset.
    pub fn next_batch(&mut self, batch_size: usize) -> Vec<usize> {
        let n = self.lengths.len();
        if n == 0 {
            return Vec::new();
        }
        if self.state.index >= n {
            self.state = SamplerState {
                epoch: self.state.epoch + 1,
                index: 0,
            };
        }
        let epoch = self.state.epoch;
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.order = Some((epoch, self.epoch_order(epoch)));
        }
        let Some((_, order)) = &self.order else {
            unreachable!("the order was set just above")
        };
        let start = self.state.index;
        let end = (start + batch_size.max(1)).min(n);
        let batch = order[start..end].to_vec();
        self.state.index = end;
        if end == n {
            self.state = SamplerState {
                epoch: epoch + 1,
                index: 0,
            };
        }
        batch
    }
}
