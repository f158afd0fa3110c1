//! Inverted dropout on the adapter's input (PEFT's `lora_dropout`), active only under autodiff.
//!
//! On the host CPU (Burn's Flex backend) the keep-mask is drawn from a counter-based hash on all
//! cores: Burn's `Dropout` samples one Bernoulli value at a time from a ChaCha generator on one
//! thread, which cost about 14% of a training step of Qwen2.5-0.5B's layer shape. Each call takes
//! a 64-bit key from the backend's seeded generator, so `B::seed` still fixes every mask (exact
//! resume and checkpoint replay depend on that). Other backends draw the mask on the device with
//! Burn's own sampler.

use std::any::TypeId;

use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};
use rayon::prelude::*;

/// `x ⊙ mask / (1 − p)` with each mask element 1 with probability `1 − p`; `x` itself when
/// autodiff is off (inference) or `p` is 0.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    if !is_host_backend::<B>() {
        return Dropout { prob: p }.forward(x);
    }
    let device = x.device();
    if p <= 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    keyed_dropout(x, draw_key::<B>(&device), 1.0 - p)
}

/// `x ⊙ mask` with the host mask of `key` ([`keep_mask`]).
pub(crate) fn keyed_dropout<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    key: u64,
    keep: f64,
) -> Tensor<B, D> {
    let shape = x.shape();
    let mask = keep_mask(key, shape.num_elements(), keep);
    let mask = Tensor::<B, D>::from_data(TensorData::new(mask, shape), &x.device());
    let mask = if x.dtype() == mask.dtype() {
        mask
    } else {
        mask.cast(x.dtype())
    };
    x * mask
}

/// A 64-bit key from the backend's seeded generator: three uniform draws, 23 random bits each.
pub(crate) fn draw_key<B: Backend>(device: &B::Device) -> u64 {
    let draws = Tensor::<B, 1>::random([3], Distribution::Default, device)
        .into_data()
        .convert::<f32>();
    draws
        .as_slice::<f32>()
        .expect("f32 data")
        .iter()
        .fold(0x9E37_79B9_7F4A_7C15u64, |k, v| {
            mix(k ^ u64::from(v.to_bits()))
        })
}

/// Whether `B` computes on the host CPU (Flex, also under `Autodiff`), where a kernel written in
/// Rust over the tensor's own memory beats a chain of single-threaded backend ops.
pub fn is_host_backend<B: Backend>() -> bool {
    TypeId::of::<B::Device>() == TypeId::of::<burn::backend::flex::FlexDevice>()
}

/// SplitMix64's finalizer: a bijective 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` values, each `1 / keep` with probability `keep` and 0 otherwise; element `i` depends only on
/// `key` and `i` (two elements per hash, 32 bits each), so the result does not depend on threads.
pub(crate) fn keep_mask(key: u64, n: usize, keep: f64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    // P(u < threshold) = keep for u uniform on [0, 2^32).
    let threshold = (keep * 4_294_967_296.0).round().min(4_294_967_295.0) as u64;
    let scale = (1.0 / keep) as f32;
    let mut out = vec![0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = (c * CHUNK) as u64;
            for (j, pair) in chunk.chunks_mut(2).enumerate() {
                let h = mix(
                    key.wrapping_add((base / 2 + j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                );
                for (slot, bits) in pair.iter_mut().zip([h as u32, (h >> 32) as u32]) {
                    *slot = if u64::from(bits) < threshold {
                        scale
                    } else {
                        0.0
                    };
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rate_and_scale() {
        let n = 1_000_003;
        let m = keep_mask(42, n, 0.9);
        let kept = m.iter().filter(|&&v| v != 0.0).count();
        // Binomial(n, 0.9): standard deviation about 300; allow 6 of them.
        assert!(
            (kept as f64 - 0.9 * n as f64).abs() < 1800.0,
            "kept {kept} of {n}"
        );
        assert!(m.iter().all(|&v| v == 0.0 || v == (1.0 / 0.9f64) as f32));
    }

    #[test]
    fn same_key_same_mask_other_key_other_mask() {
        let a = keep_mask(7, 200_000, 0.5);
        assert_eq!(a, keep_mask(7, 200_000, 0.5));
        let b = keep_mask(8, 200_000, 0.5);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        // Independent masks at p = 0.5 agree on about half the elements.
        assert!((same as f64 - 100_000.0).abs() < 3_000.0, "{same}");
    }

    #[test]
    fn neighbouring_elements_are_independent() {
        // Pairs (2i, 2i+1) come from one hash; (2i+1, 2i+2) from two. Both must look independent.
        let m = keep_mask(3, 400_000, 0.5);
        for off in [0usize, 1] {
            let both = m
                .iter()
                .skip(off)
                .step_by(2)
                .zip(m.iter().skip(off + 1).step_by(2))
                .filter(|(a, b)| **a != 0.0 && **b != 0.0)
                .count();
            assert!(
                (both as f64 - 50_000.0).abs() < 1_500.0,
                "offset {off}: {both}"
            );
        }
    }
}
