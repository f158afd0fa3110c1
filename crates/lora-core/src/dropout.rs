//! Inverted dropout on the adapter's input (PEFT's `lora_dropout`), active only under autodiff.
//!
//! On the host CPU (Burn's Flex backend, with the `cpu-kernels` feature) the keep-mask is drawn
//! from a counter-based hash on all cores (`kernels::cpu::keep_mask`): Burn's `Dropout` samples one
//! value at a time on one thread. Each call takes a 64-bit key from the backend's seeded generator,
//! so `B::seed` still fixes every mask (exact resume and checkpoint replay depend on that), and the
//! fused LoRA linear draws the same mask again in its backward from the key. Other backends draw
//! the mask on the device with Burn's own sampler.

use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use kernels::rng::{mix, GOLDEN_GAMMA};

/// `x ⊙ mask / (1 − p)` with each mask element 1 with probability `1 − p`; `x` itself when
/// autodiff is off (inference) or `p` is 0.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    if !keyed_masks::<B>() {
        return Dropout { prob: p }.forward(x);
    }
    let device = x.device();
    if p <= 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    keyed_dropout(x, draw_key::<B>(&device), 1.0 - p)
}

/// Whether masks on `B` are drawn from a key ([`keyed_dropout`]): on the host CPU with the
/// `cpu-kernels` feature.
pub(crate) fn keyed_masks<B: Backend>() -> bool {
    #[cfg(feature = "cpu-kernels")]
    return kernels::cpu::is_cpu_backend::<B>();
    #[cfg(not(feature = "cpu-kernels"))]
    return false;
}

/// `x ⊙ mask` with the mask of `key` (`kernels::cpu::keep_mask`), on a backend where
/// [`keyed_masks`] holds.
pub(crate) fn keyed_dropout<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    key: u64,
    keep: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "cpu-kernels")]
    {
        let shape = x.shape();
        let mask = kernels::cpu::keep_mask(key, shape.num_elements(), keep);
        let mask = burn::tensor::TensorData::new(mask, shape);
        let mask = Tensor::<B, D>::from_data(mask, &x.device());
        let mask = if x.dtype() == mask.dtype() {
            mask
        } else {
            mask.cast(x.dtype())
        };
        x * mask
    }
    #[cfg(not(feature = "cpu-kernels"))]
    {
        let _ = key;
        Dropout { prob: 1.0 - keep }.forward(x)
    }
}

std::thread_local! {
    /// This thread's key stream, once [`seed_dropout_keys`] set it: the next key's counter.
    static KEYS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// From now on this thread's dropout keys (the host-CPU masks, [`keyed_dropout`]) come from
/// `seed`, a counter hashed, instead of the backend's generator, which is one per process: worker
/// threads that train on one backend side by side (data parallelism in one process) then each
/// draw the masks their own seeds fix, whatever the others draw meanwhile. Seeding again restarts
/// the stream. Masks on other backends still come from `B::seed`.
pub fn seed_dropout_keys(seed: u64) {
    KEYS.with(|k| k.set(Some(mix(seed ^ GOLDEN_GAMMA))));
}

/// A 64-bit key: the next of this thread's stream when [`seed_dropout_keys`] started one, else from
/// the backend's seeded generator (three uniform draws, 23 random bits each).
pub(crate) fn draw_key<B: Backend>(device: &B::Device) -> u64 {
    if let Some(counter) = KEYS.with(|k| k.get()) {
        KEYS.with(|k| k.set(Some(counter.wrapping_add(GOLDEN_GAMMA))));
        return mix(counter);
    }
    let draws = Tensor::<B, 1>::random([3], Distribution::Default, device)
        .into_data()
        .convert::<f32>();
    draws
        .as_slice::<f32>()
        .expect("f32 data")
        .iter()
        .fold(GOLDEN_GAMMA, |k, v| mix(k ^ u64::from(v.to_bits())))
}
