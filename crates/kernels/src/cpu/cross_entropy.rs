//! Softmax cross-entropy through a frozen linear output head, on all cores, without the
//! `[rows, vocab]` logits ([`fused_linear_cross_entropy`]). Burn's ops for the same (`matmul`,
//! `max_dim`, `softmax`, `gather`, `scatter`, `matmul`) make about eight passes, most on one
//! thread, over a chunk's 256 × 151,936 logits.

use std::any::Any;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::gemm::{matmul, Mat, MatMut, Threads};

/// Lanes of the reductions: independent accumulators the compiler keeps in vector registers.
const LANES: usize = 16;

#[inline(always)]
fn lane_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in rest.iter().chain(acc.iter()) {
        m = if x > m { x } else { m };
    }
    m
}

/// `exp(x)` for `x ≤ 0` (a value minus its row's maximum), within about 2 ulp of the exact value;
/// values below −87.3 give about 1e-38 instead of a subnormal. Branch-free so that it vectorizes:
/// `exp(x) = 2^n · exp(r)` with `n = round(x / ln 2)`, `|r| ≤ ln 2 / 2`, and a degree-6 polynomial
/// for `exp(r)` (Cephes' `expf` coefficients).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Rows of the output head's weight per block of [`fused_linear_cross_entropy`]: 256 × 896 f32 is 0.9 MB,
/// so a block stays in a core's L2 cache between its two products.
const VOCAB_BLOCK: usize = 256;

/// Blocks per parallel task of [`fused_linear_cross_entropy`] (a fixed grouping: see there).
const GROUP_BLOCKS: usize = 32;

/// Running softmax state of some vocabulary blocks (online softmax, as in flash attention).
struct Partial {
    /// Per row: the largest logit seen.
    max: Vec<f32>,
    /// Per row: `Σ exp(logit − max)` over the blocks seen.
    sum: Vec<f32>,
    /// `[rows, hidden]`: `Σ exp(logit_v − max) · w_v` over the blocks seen.
    acc: Vec<f32>,
    /// Per row: the target's logit, once its block is seen.
    picked: Vec<f32>,
}

impl Partial {
    fn new(rows: usize, hidden: usize) -> Self {
        Self {
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0.0; rows],
            acc: vec![0.0; rows * hidden],
            picked: vec![f32::NAN; rows],
        }
    }

    /// Brings row `i` to the running maximum `m` (rescales its sum and accumulator).
    fn rescale(&mut self, i: usize, m: f32, hidden: usize) {
        if self.max[i] == m {
            return;
        }
        let f = exp_nonpositive(self.max[i] - m);
        self.sum[i] *= f;
        for a in &mut self.acc[i * hidden..(i + 1) * hidden] {
            *a *= f;
        }
        self.max[i] = m;
    }

    /// Adds one vocabulary block: `w` `[vb, hidden]` holds the head's rows from `v0`; `l` is scratch
    /// for the block's logits `[n, vb]`.
    fn add_block(&mut self, rows: &[f32], w: &[f32], v0: usize, targets: &[usize], l: &mut [f32]) {
        let (n, hidden) = (self.max.len(), rows.len() / self.max.len());
        let vb = w.len() / hidden;
        logits_block(rows, w, l, n, vb, hidden);
        for (i, row) in l.chunks_exact_mut(vb).enumerate() {
            let t = targets[i];
            if (v0..v0 + vb).contains(&t) {
                self.picked[i] = row[t - v0];
            }
            let m = self.max[i].max(lane_max(row));
            self.rescale(i, m, hidden);
            self.sum[i] += exp_in_place(row, m);
        }
        // acc += exp(logits − max) · w_block
        accumulate_block(l, w, &mut self.acc, n, vb, hidden);
    }

    fn merge(mut self, mut other: Self, hidden: usize) -> Self {
        for i in 0..self.max.len() {
            let m = self.max[i].max(other.max[i]);
            if m == f32::NEG_INFINITY {
                continue;
            }
            self.rescale(i, m, hidden);
            other.rescale(i, m, hidden);
            self.sum[i] += other.sum[i];
            if self.picked[i].is_nan() {
                self.picked[i] = other.picked[i];
            }
        }
        for (a, b) in self.acc.iter_mut().zip(&other.acc) {
            *a += b;
        }
        self
    }
}

/// Loss sum and `d(loss / norm)/d(rows)` of softmax cross-entropy through a frozen linear head,
/// without the `[rows, vocab]` logits: `rows` `[n, hidden]` and `weight` `[vocab, hidden]` row-major.
///
/// The vocabulary is walked in blocks of 256 (`VOCAB_BLOCK`) rows of `weight`, in parallel. Each block's
/// logits `rows · w_blockᵀ` are exponentiated against a running maximum and multiplied straight back
/// by the same block (`Σ exp(logit_v − max) · w_v`) while it is in cache; at the end the gradient is
/// `(Σ_v p_v · w_v − w_target) / norm` and each row's loss `max + ln Σ exp − logit[target]`.
///
/// Panics when a target lies outside `0..vocab` or the slices do not have the stated shapes.
pub fn fused_linear_cross_entropy(
    rows: &[f32],
    weight: &[f32],
    targets: &[i64],
    hidden: usize,
    norm: f32,
) -> (f64, Vec<f32>) {
    let n = targets.len();
    assert!(hidden > 0 && rows.len() == n * hidden && weight.len().is_multiple_of(hidden));
    let vocab = weight.len() / hidden;
    let targets: Vec<usize> = targets
        .iter()
        .map(|&t| {
            usize::try_from(t)
                .ok()
                .filter(|&t| t < vocab)
                .unwrap_or_else(|| panic!("target {t} outside the vocabulary of {vocab}"))
        })
        .collect();
    // Blocks are grouped in a fixed way and the groups merged in order, so the sums do not depend on
    // how rayon splits the work: the same inputs give the same bits (exact resume relies on it).
    let blocks = vocab.div_ceil(VOCAB_BLOCK);
    let groups: Vec<Partial> = (0..blocks.div_ceil(GROUP_BLOCKS))
        .into_par_iter()
        .map(|g| {
            let mut st = Partial::new(n, hidden);
            let mut logits = vec![0f32; n * VOCAB_BLOCK];
            for b in g * GROUP_BLOCKS..blocks.min((g + 1) * GROUP_BLOCKS) {
                let v0 = b * VOCAB_BLOCK;
                let vb = VOCAB_BLOCK.min(vocab - v0);
                let w = &weight[v0 * hidden..(v0 + vb) * hidden];
                st.add_block(rows, w, v0, &targets, &mut logits[..n * vb]);
            }
            st
        })
        .collect();
    let total = groups
        .into_iter()
        .reduce(|a, b| a.merge(b, hidden))
        .expect("a vocabulary of at least one token");
    let mut loss = 0f64;
    let mut grad = total.acc;
    for (i, g) in grad.chunks_exact_mut(hidden).enumerate() {
        let scale = 1.0 / (total.sum[i] * norm);
        let wt = &weight[targets[i] * hidden..(targets[i] + 1) * hidden];
        for (x, &w) in g.iter_mut().zip(wt) {
            *x = *x * scale - w / norm;
        }
        loss += f64::from(total.max[i]) + f64::from(total.sum[i]).ln() - f64::from(total.picked[i]);
    }
    (loss, grad)
}

/// Loss sum `[1]` and `d(loss / norm)/d(rows)` `[n, hidden]` of softmax cross-entropy of `rows`
/// `[n, hidden]` through the frozen head `weight` `[vocab, hidden]` against `targets` `[n]`
/// ([`fused_linear_cross_entropy`] over the weight's own memory), or `None` when the operation
/// does not apply: a backend other than plain Flex (the head's gradient is returned, not
/// recorded: callers run it on the inner backend of `Autodiff<Flex>`), a dtype other than f32,
/// a weight that is not contiguous, or `FERROLORA_FUSED_KERNELS=0`.
pub fn linear_cross_entropy<B: Backend>(
    rows: &Tensor<B, 2>,
    targets: &Tensor<B, 1, Int>,
    weight: &Tensor<B, 2>,
    norm: f64,
) -> Option<(Tensor<B, 1>, Tensor<B, 2>)> {
    if !super::is_cpu_backend::<B>()
        || !super::enabled()
        || rows.dtype() != DType::F32
        || weight.dtype() != DType::F32
    {
        return None;
    }
    let hidden = weight.dims()[1];
    let prim = match weight.clone().into_primitive() {
        TensorPrimitive::Float(p) => p,
        TensorPrimitive::QFloat(_) => return None,
    };
    let w = (&prim as &dyn Any).downcast_ref::<FlexTensor>()?;
    let device = rows.device();
    let x = rows.clone().into_data().convert::<f32>();
    let t = targets.clone().into_data().convert::<i64>();
    let (loss, grad) = fused_linear_cross_entropy(
        x.as_slice::<f32>().ok()?,
        w.as_slice::<f32>()?,
        t.as_slice::<i64>().ok()?,
        hidden,
        norm as f32,
    );
    Some((
        Tensor::from_data(TensorData::new(vec![loss as f32], [1]), &device),
        Tensor::from_data(TensorData::new(grad, [rows.dims()[0], hidden]), &device),
    ))
}

/// `l` `[n, vb]` = `rows` `[n, hidden]` · `w`ᵀ (`w` `[vb, hidden]`).
fn logits_block(rows: &[f32], w: &[f32], l: &mut [f32], n: usize, vb: usize, hidden: usize) {
    assert!(rows.len() == n * hidden && w.len() == vb * hidden && l.len() == n * vb);
    #[cfg(target_arch = "x86_64")]
    // Past about a hundred rows `gemm`'s packed kernel is faster for this product (measured with
    // `cargo bench --bench head`: 73 rows 241 against 262 ms, 256 rows 829 against 761 ms).
    if n < 128 && is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); the shapes are checked above.
        return unsafe { avx512::logits(rows, w, l, n, vb, hidden) };
    }
    let l = MatMut::new(l, n, vb);
    let w = Mat::new(w, vb, hidden).t();
    matmul(l, false, Mat::new(rows, n, hidden), w, 1.0, Threads::One);
}

/// `acc` `[n, hidden]` += `e` `[n, vb]` · `w` `[vb, hidden]`.
fn accumulate_block(e: &[f32], w: &[f32], acc: &mut [f32], n: usize, vb: usize, hidden: usize) {
    assert!(e.len() == n * vb && w.len() == vb * hidden && acc.len() == n * hidden);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above); the shapes are checked above.
        return unsafe { avx512::accumulate(e, w, acc, n, vb, hidden) };
    }
    let acc = MatMut::new(acc, n, hidden);
    matmul(
        acc,
        true,
        Mat::new(e, n, vb),
        Mat::new(w, vb, hidden),
        1.0,
        Threads::One,
    );
}

/// The two products of a vocabulary block with AVX-512, reading the weight block where it lies:
/// `gemm` packs each operand into its own layout first, which for these shapes (a few dozen to a
/// few hundred rows against 256 weight rows) cost about a quarter of the head's time. Register
/// tiles: 4 rows × 6 weight rows of dot products for the logits; 6 rows × 64 columns of
/// accumulators for `e · w`. A hidden size that is not a multiple of 16 is finished with masked
/// loads.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles read clearest as `a[r][j]`
mod avx512 {
    use std::arch::x86_64::*;

    /// The mask of the last `rem` (1..16) lanes of a row chunk, or all 16 lanes.
    #[inline(always)]
    fn lanes(rem: usize) -> __mmask16 {
        if rem >= 16 {
            0xFFFF
        } else {
            ((1u32 << rem) - 1) as __mmask16
        }
    }

    /// `l[i, v] = x[i] · w[v]`, `x` `[n, h]`, `w` `[vb, h]`, `l` `[n, vb]`.
    ///
    /// # Safety
    /// AVX-512F must be available; the slices must have the stated shapes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn logits(x: &[f32], w: &[f32], l: &mut [f32], n: usize, vb: usize, h: usize) {
        // Rows in groups that stay in L2 while the block's weight rows stream past them.
        const GROUP: usize = 48;
        for g in (0..n).step_by(GROUP) {
            let end = n.min(g + GROUP);
            let mut v = 0;
            while v < vb {
                let vt = if v + 6 <= vb { 6 } else { 1 };
                let mut i = g;
                while i < end {
                    // SAFETY: rows i.. and weight rows v.. lie inside the slices (loop bounds).
                    unsafe {
                        match (end - i >= 4, vt) {
                            (true, 6) => dots::<4, 6>(x, w, l, i, v, vb, h),
                            (true, _) => dots::<4, 1>(x, w, l, i, v, vb, h),
                            (false, 6) => dots::<1, 6>(x, w, l, i, v, vb, h),
                            (false, _) => dots::<1, 1>(x, w, l, i, v, vb, h),
                        }
                    }
                    i += if end - i >= 4 { 4 } else { 1 };
                }
                v += vt;
            }
        }
    }

    /// One `R × V` tile of [`logits`] at rows `i0`, weight rows `v0`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dots<const R: usize, const V: usize>(
        x: &[f32],
        w: &[f32],
        l: &mut [f32],
        i0: usize,
        v0: usize,
        vb: usize,
        h: usize,
    ) {
        debug_assert!((i0 + R) * h <= x.len() && (v0 + V) * h <= w.len());
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let mut k = 0;
        while k < h {
            let m = lanes(h - k);
            let mut xv = [_mm512_setzero_ps(); R];
            for (r, xv) in xv.iter_mut().enumerate() {
                // SAFETY: row i0 + r, columns k.. under the mask, inside `x`.
                *xv = unsafe { _mm512_maskz_loadu_ps(m, xp.add((i0 + r) * h + k)) };
            }
            for c in 0..V {
                // SAFETY: weight row v0 + c, columns k.. under the mask, inside `w`.
                let wv = unsafe { _mm512_maskz_loadu_ps(m, wp.add((v0 + c) * h + k)) };
                for r in 0..R {
                    acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
                }
            }
            k += 16;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (c, a) in acc.iter().enumerate() {
                l[(i0 + r) * vb + v0 + c] = _mm512_reduce_add_ps(*a);
            }
        }
    }

    /// `acc[i, :] += Σ_v e[i, v] · w[v, :]`, `e` `[n, vb]`, `w` `[vb, h]`, `acc` `[n, h]`.
    ///
    /// # Safety
    /// AVX-512F must be available; the slices must have the stated shapes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn accumulate(e: &[f32], w: &[f32], acc: &mut [f32], n: usize, vb: usize, h: usize) {
        let mut c = 0;
        while c < h {
            let wide = h - c >= 64;
            let mut i = 0;
            while i < n {
                // SAFETY: rows i.., columns c.. (masked at the end of a row) lie inside the slices.
                unsafe {
                    match (n - i >= 6, wide) {
                        (true, true) => axpys::<6, 4>(e, w, acc, i, c, vb, h),
                        (true, false) => axpys::<6, 1>(e, w, acc, i, c, vb, h),
                        (false, true) => axpys::<1, 4>(e, w, acc, i, c, vb, h),
                        (false, false) => axpys::<1, 1>(e, w, acc, i, c, vb, h),
                    }
                }
                i += if n - i >= 6 { 6 } else { 1 };
            }
            c += if wide { 64 } else { 16 };
        }
    }

    /// One tile of [`accumulate`]: rows `i0..i0 + R`, columns `c0..c0 + 16·C` (the last 16 masked
    /// to the row's end).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn axpys<const R: usize, const C: usize>(
        e: &[f32],
        w: &[f32],
        acc: &mut [f32],
        i0: usize,
        c0: usize,
        vb: usize,
        h: usize,
    ) {
        debug_assert!((i0 + R) * h <= acc.len() && (i0 + R) * vb <= e.len());
        let (ep, wp, ap) = (e.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        let masks: [__mmask16; C] = std::array::from_fn(|j| lanes(h - c0 - 16 * j));
        let mut a = [[_mm512_setzero_ps(); C]; R];
        for r in 0..R {
            for j in 0..C {
                // SAFETY: row i0 + r of `acc`, columns under the mask.
                a[r][j] =
                    unsafe { _mm512_maskz_loadu_ps(masks[j], ap.add((i0 + r) * h + c0 + 16 * j)) };
            }
        }
        for v in 0..vb {
            let mut wv = [_mm512_setzero_ps(); C];
            for j in 0..C {
                // SAFETY: weight row v, columns under the mask.
                wv[j] = unsafe { _mm512_maskz_loadu_ps(masks[j], wp.add(v * h + c0 + 16 * j)) };
            }
            for r in 0..R {
                // SAFETY: e[i0 + r, v] is inside `e`.
                let b = _mm512_set1_ps(unsafe { *ep.add((i0 + r) * vb + v) });
                for j in 0..C {
                    a[r][j] = _mm512_fmadd_ps(b, wv[j], a[r][j]);
                }
            }
        }
        for r in 0..R {
            for j in 0..C {
                // SAFETY: as for the loads.
                unsafe {
                    _mm512_mask_storeu_ps(ap.add((i0 + r) * h + c0 + 16 * j), masks[j], a[r][j])
                };
            }
        }
    }
}

/// `row[j] = exp(row[j] − max)`; returns their sum.
fn exp_in_place(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { exp_in_place_avx512(row, max) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { exp_in_place_avx2(row, max) };
        }
    }
    exp_in_place_generic(row, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_in_place_avx512(row: &mut [f32], max: f32) -> f32 {
    exp_in_place_generic(row, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_in_place_avx2(row: &mut [f32], max: f32) -> f32 {
    exp_in_place_generic(row, max)
}

#[inline(always)]
fn exp_in_place_generic(row: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp_nonpositive(*x - max);
            *a += *x;
        }
    }
    let mut sum: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - max);
        sum += *x;
    }
    sum + acc.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_within_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        assert!(exp_nonpositive(-1000.0) < 1.5e-38);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn target_outside_vocab_panics() {
        fused_linear_cross_entropy(&[0.0; 2], &[0.0; 4], &[2, 4], 1, 1.0); // vocabulary of 4
    }

    #[test]
    fn fused_head_equals_logits_then_softmax() {
        // Tile edges of the AVX-512 kernels: row counts around 4 and 6, hidden sizes below, at and
        // past 16 and 64 columns, and vocabularies that end in a partial block.
        for (n, hidden, vocab) in [
            (3, 7, 2 * VOCAB_BLOCK + 37),
            (13, 85, VOCAB_BLOCK + 11),
            (8, 64, VOCAB_BLOCK - 5),
            (1, 16, 7),
        ] {
            check_against_f64(n, hidden, vocab);
        }
    }

    fn check_against_f64(n: usize, hidden: usize, vocab: usize) {
        let norm = 5.0f32;
        let mut s = 3u64;
        let mut draw = |scale: f32| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        };
        let rows: Vec<f32> = (0..n * hidden).map(|_| draw(4.0)).collect();
        let weight: Vec<f32> = (0..vocab * hidden).map(|_| draw(4.0)).collect();
        // Targets in the first, a middle and the last (partial) block.
        let targets: Vec<i64> = (0..n)
            .map(|i| [1, (VOCAB_BLOCK + 5) % vocab, vocab - 1][i % 3] as i64)
            .collect();
        let (loss, grad) = fused_linear_cross_entropy(&rows, &weight, &targets, hidden, norm);
        let mut want_loss = 0f64;
        for i in 0..n {
            let x = &rows[i * hidden..(i + 1) * hidden];
            let logits: Vec<f64> = (0..vocab)
                .map(|v| {
                    (0..hidden)
                        .map(|h| x[h] as f64 * weight[v * hidden + h] as f64)
                        .sum()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            let t = targets[i] as usize;
            want_loss += m + z.ln() - logits[t];
            for h in 0..hidden {
                let mut g: f64 = (0..vocab)
                    .map(|v| (logits[v] - m).exp() / z * weight[v * hidden + h] as f64)
                    .sum();
                g = (g - weight[t * hidden + h] as f64) / norm as f64;
                let got = grad[i * hidden + h] as f64;
                assert!(
                    (got - g).abs() < 1e-5,
                    "{n}x{hidden}x{vocab}: row {i} dim {h}: {got} vs {g}"
                );
            }
        }
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss.abs(),
            "{loss} vs {want_loss}"
        );
    }
}
