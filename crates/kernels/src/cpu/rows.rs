//! `x·Wᵀ` for a few rows at inference (batched decoding), each output the same dot product whatever
//! the number of rows: a sequence decoded among others gets exactly the values it gets alone.
//!
//! A GEMM library picks its blocking, its K-splitting and its vector kernel from the shape, so the
//! row `j` of `X·Wᵀ` can change in its last bits when rows are added; over enough decoding steps a
//! greedy choice between two close logits then flips. Here every output `y[j, o]` is
//! `dot(x[j], w[o])` summed in one fixed order (16 lanes over the input, the lanes added in order,
//! then the tail), and the rows only share the pass over the weight: each weight row is loaded once
//! for all rows, which is what makes a batch of decoding steps cost about as much as one (decoding is
//! bound by reading the weights). The order does not depend on the CPU's vector width either: the
//! AVX-512 and AVX2 builds of the loop compute the same sums (no fused multiply-add).

use rayon::prelude::*;

const LANES: usize = 16;
/// Weight rows per task: enough work to amortize a task, few enough to spread 896 rows over cores.
const BLOCK: usize = 32;

/// `y[j·out + o] = Σᵢ x[j·k + i]·w[o·k + i] (+ bias[o])` for `x` `[n, k]`, `w` `[out, k]`, both
/// row-major, `y` `[n, out]`.
pub fn linear_rows(x: &[f32], w: &[f32], bias: Option<&[f32]>, n: usize, k: usize) -> Vec<f32> {
    assert!(
        k > 0 && x.len() == n * k && w.len().is_multiple_of(k),
        "linear_rows: bad shapes"
    );
    let out = w.len() / k;
    if let Some(b) = bias {
        assert_eq!(b.len(), out, "linear_rows: bias length");
    }
    // Computed as yᵀ `[out, n]` (each task owns whole rows of it), transposed at the end.
    let mut yt = vec![0f32; out * n];
    let task = |(blk, dst): (usize, &mut [f32])| {
        let o0 = blk * BLOCK;
        let rows = dst.len() / n;
        block(x, &w[o0 * k..(o0 + rows) * k], n, k, dst);
    };
    if out * n * k >= 1 << 16 {
        yt.par_chunks_mut(BLOCK * n).enumerate().for_each(task);
    } else {
        yt.chunks_mut(BLOCK * n).enumerate().for_each(task);
    }
    let mut y = vec![0f32; n * out];
    for o in 0..out {
        let b = bias.map_or(0.0, |b| b[o]);
        for j in 0..n {
            y[j * out + o] = yt[o * n + j] + b;
        }
    }
    y
}

/// `dst[r·n + j] = dot(w[r], x[j])` for the weight rows of `w`.
fn block(x: &[f32], w: &[f32], n: usize, k: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { block_avx512(x, w, n, k, dst) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { block_avx2(x, w, n, k, dst) };
        }
    }
    block_generic(x, w, n, k, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512(x: &[f32], w: &[f32], n: usize, k: usize, dst: &mut [f32]) {
    block_generic(x, w, n, k, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_avx2(x: &[f32], w: &[f32], n: usize, k: usize, dst: &mut [f32]) {
    block_generic(x, w, n, k, dst)
}

/// Four weight rows at a time against each input row: four independent sums in flight.
#[inline(always)]
fn block_generic(x: &[f32], w: &[f32], n: usize, k: usize, dst: &mut [f32]) {
    let rows = w.len() / k;
    let mut r = 0;
    while r + 4 <= rows {
        let ws = [
            &w[r * k..(r + 1) * k],
            &w[(r + 1) * k..(r + 2) * k],
            &w[(r + 2) * k..(r + 3) * k],
            &w[(r + 3) * k..(r + 4) * k],
        ];
        for j in 0..n {
            let d = dot4(ws, &x[j * k..(j + 1) * k]);
            for (q, v) in d.into_iter().enumerate() {
                dst[(r + q) * n + j] = v;
            }
        }
        r += 4;
    }
    for r in r..rows {
        for j in 0..n {
            dst[r * n + j] = dot(&w[r * k..(r + 1) * k], &x[j * k..(j + 1) * k]);
        }
    }
}

/// The fixed-order dot product: lane `l` sums elements `l, l + 16, ...`; the lanes are added in
/// order; then the tail, in order.
#[inline(always)]
fn dot(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, xc) = (w.chunks_exact(LANES), x.chunks_exact(LANES));
    let (wt, xt) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    finish(&acc, wt, xt)
}

/// [`dot`] of four weight rows with one input row, each sum in the same order as [`dot`].
#[inline(always)]
fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    let mut acc = [[0f32; LANES]; 4];
    let full = x.len() / LANES * LANES;
    let mut i = 0;
    while i < full {
        let b = &x[i..i + LANES];
        for q in 0..4 {
            let a = &w[q][i..i + LANES];
            for l in 0..LANES {
                acc[q][l] += a[l] * b[l];
            }
        }
        i += LANES;
    }
    std::array::from_fn(|q| finish(&acc[q], &w[q][full..], &x[full..]))
}

#[inline(always)]
fn finish(acc: &[f32; LANES], wt: &[f32], xt: &[f32]) -> f32 {
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    for (a, b) in wt.iter().zip(xt) {
        s += a * b;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                    / 16_777_216.0
                    - 0.5
            })
            .collect()
    }

    #[test]
    fn rows_do_not_depend_on_the_other_rows() {
        let (k, out) = (131, 77); // tails in both the lanes and the 4-row groups
        let w = data(out * k, 1);
        let b = data(out, 2);
        let x = data(9 * k, 3);
        let all = linear_rows(&x, &w, Some(&b), 9, k);
        for j in 0..9 {
            let one = linear_rows(&x[j * k..(j + 1) * k], &w, Some(&b), 1, k);
            assert_eq!(one, all[j * out..(j + 1) * out], "row {j}");
        }
        // And it is x·Wᵀ + b.
        for j in 0..9 {
            for o in 0..out {
                let want: f64 = (0..k)
                    .map(|i| x[j * k + i] as f64 * w[o * k + i] as f64)
                    .sum::<f64>()
                    + b[o] as f64;
                assert!((all[j * out + o] as f64 - want).abs() < 1e-4, "({j}, {o})");
            }
        }
    }

    #[test]
    fn the_parallel_path_equals_the_serial_one() {
        let (k, out) = (896, 300);
        let w = data(out * k, 4);
        let x = data(3 * k, 5);
        let par = linear_rows(&x, &w, None, 3, k);
        let mut yt = vec![0f32; out * 3];
        block_generic(&x, &w, 3, k, &mut yt);
        for o in 0..out {
            for j in 0..3 {
                assert_eq!(par[j * out + o], yt[o * 3 + j]);
            }
        }
    }
}
