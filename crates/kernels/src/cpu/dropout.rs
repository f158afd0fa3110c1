//! Dropout keep-masks from a counter-based hash, on all cores. Burn's `Dropout` samples one
//! Bernoulli value at a time from a ChaCha generator on one thread, which cost about 14% of a
//! training step of Qwen2.5-0.5B's layer shape. A mask here is a function of a 64-bit key and the
//! element's index alone, so the fused LoRA linear draws it again in its backward instead of
//! keeping it, and the result does not depend on how the work is split between threads.

use rayon::prelude::*;

use crate::rng::{mix, GOLDEN_GAMMA};

/// `n` values, each `1 / keep` with probability `keep` and 0 otherwise; element `i` depends only on
/// `key` and `i` (two elements per hash, 32 bits each).
pub fn keep_mask(key: u64, n: usize, keep: f64) -> Vec<f32> {
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
                let h = mix(key.wrapping_add((base / 2 + j as u64).wrapping_mul(GOLDEN_GAMMA)));
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
