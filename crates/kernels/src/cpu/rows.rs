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
//! AVX-512, AVX2 and portable forms of the loop compute the same sums (16 lanes of fused
//! multiply-adds, whatever the register width).

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
    let mut y = vec![0f32; n * out];
    let dst = Dst(y.as_mut_ptr());
    let task = |blk: usize| {
        let o0 = blk * BLOCK;
        let rows = BLOCK.min(out - o0);
        // This block's outputs as yᵀ `[rows, n]`, then written into its columns of y.
        let mut t = vec![0f32; rows * n];
        block(x, &w[o0 * k..(o0 + rows) * k], n, k, &mut t);
        for j in 0..n {
            for r in 0..rows {
                let v = t[r * n + j] + bias.map_or(0.0, |b| b[o0 + r]);
                // SAFETY: j < n and o0 + r < out, so the index lies inside y (n · out elements);
                // each block writes only its own columns o0..o0 + rows, so no two tasks write the
                // same element, and y is not read until every task has finished.
                unsafe { dst.at(j * out + o0 + r).write(v) };
            }
        }
    };
    let blocks = out.div_ceil(BLOCK);
    if out * n * k >= 1 << 16 {
        (0..blocks).into_par_iter().for_each(task);
    } else {
        (0..blocks).for_each(task);
    }
    y
}

/// The output of [`linear_rows`], written by the tasks at disjoint indices.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: the tasks write disjoint elements through it (see `linear_rows`), and the buffer outlives
// them.
unsafe impl Send for Dst {}
// SAFETY: as above.
unsafe impl Sync for Dst {}

impl Dst {
    /// The address of element `i` (a method, so that closures capture the whole `Dst`).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `dst[r·n + j] = dot(w[r], x[j])` for the weight rows of `w`, in tiles of 4 weight rows by 4 (or
/// 2, or 1) input rows: each weight load serves up to four sums, each input load four.
fn block(x: &[f32], w: &[f32], n: usize, k: usize, dst: &mut [f32]) {
    let rows = w.len() / k;
    let kern = Kernel::detect();
    let wr = |r: usize| &w[r * k..(r + 1) * k];
    let xr = |j: usize| &x[j * k..(j + 1) * k];
    let mut r = 0;
    while r < rows {
        let four = r + 4 <= rows;
        let mut j = 0;
        while j < n {
            let two = j + 2 <= n;
            if four && j + 4 <= n {
                let d = kern.tile::<4, 4>(
                    [wr(r), wr(r + 1), wr(r + 2), wr(r + 3)],
                    [xr(j), xr(j + 1), xr(j + 2), xr(j + 3)],
                );
                for (q, v) in d.iter().enumerate() {
                    dst[(r + q) * n + j..(r + q) * n + j + 4].copy_from_slice(v);
                }
                j += 4;
                continue;
            }
            match (four, two) {
                (true, true) => {
                    let d = kern
                        .tile::<4, 2>([wr(r), wr(r + 1), wr(r + 2), wr(r + 3)], [xr(j), xr(j + 1)]);
                    for (q, v) in d.iter().enumerate() {
                        dst[(r + q) * n + j] = v[0];
                        dst[(r + q) * n + j + 1] = v[1];
                    }
                }
                (true, false) => {
                    let d = kern.tile::<4, 1>([wr(r), wr(r + 1), wr(r + 2), wr(r + 3)], [xr(j)]);
                    for (q, v) in d.iter().enumerate() {
                        dst[(r + q) * n + j] = v[0];
                    }
                }
                (false, _) => dst[r * n + j] = kern.tile::<1, 1>([wr(r)], [xr(j)])[0][0],
            }
            j += if two && four { 2 } else { 1 };
        }
        r += if four { 4 } else { 1 };
    }
}

/// The vector code this CPU runs. All three compute every sum identically: lane `l` of 16
/// accumulates `w[i]·x[i]` for `i ≡ l (mod 16)` with fused multiply-adds, the lanes are then
/// added in order, then the tail (`k mod 16` elements) with fused multiply-adds, in order.
#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Generic,
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Generic
    }

    /// `out[q][c] = dot(w[q], x[c])`; every slice has the same length.
    #[inline(always)]
    fn tile<const R: usize, const C: usize>(self, w: [&[f32]; R], x: [&[f32]; C]) -> [[f32; C]; R] {
        let k = x[0].len();
        assert!(w.iter().all(|r| r.len() == k) && x.iter().all(|r| r.len() == k));
        let lanes = match self {
            // SAFETY: `detect` saw AVX-512F; every slice holds `k` elements (asserted above).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { lanes_avx512::<R, C>(w, x, k) },
            // SAFETY: `detect` saw AVX2 and FMA; as above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { lanes_avx2::<R, C>(w, x, k) },
            Kernel::Generic => lanes_generic::<R, C>(w, x, k),
        };
        let full = k / LANES * LANES;
        std::array::from_fn(|q| {
            std::array::from_fn(|c| {
                let mut s = 0f32;
                for v in lanes[q][c] {
                    s += v;
                }
                for (a, b) in w[q][full..].iter().zip(&x[c][full..]) {
                    s = a.mul_add(*b, s);
                }
                s
            })
        })
    }
}

/// The 16 lane sums of each tile entry over the first `k / 16 · 16` elements.
fn lanes_generic<const R: usize, const C: usize>(
    w: [&[f32]; R],
    x: [&[f32]; C],
    k: usize,
) -> [[[f32; LANES]; C]; R] {
    let mut acc = [[[0f32; LANES]; C]; R];
    let mut i = 0;
    while i + LANES <= k {
        for q in 0..R {
            for c in 0..C {
                for l in 0..LANES {
                    acc[q][c][l] = w[q][i + l].mul_add(x[c][i + l], acc[q][c][l]);
                }
            }
        }
        i += LANES;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lanes_avx512<const R: usize, const C: usize>(
    w: [&[f32]; R],
    x: [&[f32]; C],
    k: usize,
) -> [[[f32; LANES]; C]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let mut i = 0;
    while i + LANES <= k {
        // SAFETY: i + 16 <= k and every slice holds k elements.
        let xv: [__m512; C] =
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(x[c].as_ptr().add(i)) });
        for q in 0..R {
            // SAFETY: as above.
            let a = unsafe { _mm512_loadu_ps(w[q].as_ptr().add(i)) };
            for c in 0..C {
                acc[q][c] = _mm512_fmadd_ps(a, xv[c], acc[q][c]);
            }
        }
        i += LANES;
    }
    let mut out = [[[0f32; LANES]; C]; R];
    for q in 0..R {
        for c in 0..C {
            // SAFETY: the destination holds 16 floats.
            unsafe { _mm512_storeu_ps(out[q][c].as_mut_ptr(), acc[q][c]) };
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lanes_avx2<const R: usize, const C: usize>(
    w: [&[f32]; R],
    x: [&[f32]; C],
    k: usize,
) -> [[[f32; LANES]; C]; R] {
    use std::arch::x86_64::*;
    // Lanes 0..8 and 8..16 in two registers.
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    let mut i = 0;
    while i + LANES <= k {
        // SAFETY: i + 16 <= k and every slice holds k elements.
        let xv: [[__m256; 2]; C] = std::array::from_fn(|c| unsafe {
            [
                _mm256_loadu_ps(x[c].as_ptr().add(i)),
                _mm256_loadu_ps(x[c].as_ptr().add(i + 8)),
            ]
        });
        for q in 0..R {
            // SAFETY: as above.
            let a = unsafe {
                [
                    _mm256_loadu_ps(w[q].as_ptr().add(i)),
                    _mm256_loadu_ps(w[q].as_ptr().add(i + 8)),
                ]
            };
            for c in 0..C {
                for h in 0..2 {
                    acc[q][c][h] = _mm256_fmadd_ps(a[h], xv[c][h], acc[q][c][h]);
                }
            }
        }
        i += LANES;
    }
    let mut out = [[[0f32; LANES]; C]; R];
    for q in 0..R {
        for c in 0..C {
            // SAFETY: the destination holds 16 floats.
            unsafe {
                _mm256_storeu_ps(out[q][c].as_mut_ptr(), acc[q][c][0]);
                _mm256_storeu_ps(out[q][c].as_mut_ptr().add(8), acc[q][c][1]);
            }
        }
    }
    out
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

    /// The vector paths compute exactly the generic one's sums.
    #[test]
    fn every_kernel_gives_the_same_bits() {
        let k = 16 * 7 + 5;
        let w = data(4 * k, 6);
        let x = data(2 * k, 7);
        let ws = [&w[..k], &w[k..2 * k], &w[2 * k..3 * k], &w[3 * k..]];
        let xs = [&x[..k], &x[k..]];
        let want = Kernel::Generic.tile::<4, 2>(ws, xs);
        let got = Kernel::detect().tile::<4, 2>(ws, xs);
        assert_eq!(got, want);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert_eq!(Kernel::Avx2.tile::<4, 2>(ws, xs), want);
            assert_eq!(
                Kernel::Avx2.tile::<1, 1>([ws[2]], [xs[1]])[0][0],
                want[2][1]
            );
        }
    }

    #[test]
    fn the_parallel_path_equals_the_serial_one() {
        let (k, out) = (896, 300);
        let w = data(out * k, 4);
        let x = data(3 * k, 5);
        let par = linear_rows(&x, &w, None, 3, k);
        let mut yt = vec![0f32; out * 3];
        block(&x, &w, 3, k, &mut yt);
        for o in 0..out {
            for j in 0..3 {
                assert_eq!(par[j * out + o], yt[o * 3 + j]);
            }
        }
    }
}
