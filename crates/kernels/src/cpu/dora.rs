//! DoRA's row norms `n_i = ‖W_i + s·(B·A)_i‖₂` of the `[out, in]` matrix `W + s·B·A`, detached,
//! in one pass over `W` on all cores: no `[out, in]` temporary is written.
//!
//! Each row is taken in blocks of [`BLOCK`] columns: the block of `(B·A)_i` is accumulated from
//! the `r` rows of `A` (`p_j = Σ_k B_ik·A_kj`, `k` in order, from zero), then `v_j = W_ij + p_j·s`
//! in the Burn form's order (the product, then the scaling, then the sum), and `v_j²` is summed
//! in f64 (16 lanes, added in order at the end of the row). The Burn form sums its f32 squares in
//! another order, so the two agree to rounding.

use std::any::TypeId;

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{contiguous, enabled, flex, same_type, slice, to_host, Ad};

/// Columns per block of a row (the block of `B·A` stays in registers).
const BLOCK: usize = 64;

/// Lanes of the f64 sum of squares.
const LANES: usize = 16;

/// Rows per parallel task.
const ROWS: usize = 8;

/// `‖W_i + s·(B·A)_i‖₂` for every row `i` of `w` `[out, in]`, with `a` `[r, in]` and `b` `[out, r]`:
/// an f32 `[out]` tensor on their device with no autodiff graph (a leaf that takes no gradient).
/// `None` unless `B` is Flex or `Autodiff<Flex>`, the fused operations are [`enabled`], all three
/// are f32 and their shapes agree; the caller then computes the norms with Burn ops.
pub fn dora_row_norms<B: Backend>(
    w: &Tensor<B, 2>,
    a: &Tensor<B, 2>,
    b: &Tensor<B, 2>,
    scaling: f64,
) -> Option<Tensor<B, 1>> {
    if !enabled()
        || [w.dtype(), a.dtype(), b.dtype()]
            .iter()
            .any(|&d| d != DType::F32)
    {
        return None;
    }
    let ([out, k], [r, ka], [ob, rb]) = (w.dims(), a.dims(), b.dims());
    if ka != k || ob != out || rb != r {
        return None;
    }
    let (wf, af, bf) = (host_values(w)?, host_values(a)?, host_values(b)?);
    let norms = row_norms(
        slice(&wf),
        slice(&af),
        slice(&bf),
        out,
        k,
        r,
        scaling as f32,
    );
    let t = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(flex(norms, [out])));
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        same_type(t)
    } else {
        same_type(Tensor::<Ad, 1>::from_inner(t))
    }
}

/// The contiguous f32 values of `t` when `B` is Flex or `Autodiff<Flex>` (a copy only when `t` is
/// a non-contiguous view), else `None`.
fn host_values<B: Backend>(t: &Tensor<B, 2>) -> Option<FlexTensor> {
    let p = match same_type::<Tensor<B, 2>, Tensor<Flex, 2>>(t.clone()) {
        Some(t) => t.into_primitive().tensor(),
        None => to_host(t.clone())?.primitive,
    };
    Some(contiguous(p))
}

/// The norms of the rows of `w` `[out, k]` + `s·b·a` (`a` `[r, k]`, `b` `[out, r]`), row-major.
fn row_norms(w: &[f32], a: &[f32], b: &[f32], out: usize, k: usize, r: usize, s: f32) -> Vec<f32> {
    let mut n = vec![0f32; out];
    if k == 0 {
        return n;
    }
    let kern = Kernel::detect();
    n.par_chunks_mut(ROWS)
        .zip(w.par_chunks(ROWS * k))
        .enumerate()
        .for_each(|(c, (n, w))| {
            for (q, (n, w)) in n.iter_mut().zip(w.chunks_exact(k)).enumerate() {
                let i = c * ROWS + q;
                *n = kern.row(w, a, &b[i * r..(i + 1) * r], s).sqrt() as f32;
            }
        });
    n
}

/// The vector code this CPU runs (the same loops, compiled for its instructions; with FMA the
/// products of `B·A` accumulate in fused multiply-adds, as a GEMM does).
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

    /// `Σ_j (w_j + s·Σ_k b_k·a_kj)²` in f64, for one row `w` (`k` elements), `a` `[r, k]` and
    /// `b` the row's `r` elements of `B`.
    fn row(self, w: &[f32], a: &[f32], b: &[f32], s: f32) -> f64 {
        assert_eq!(a.len(), b.len() * w.len(), "a is [r, k]");
        match self {
            // SAFETY: `detect` saw AVX-512F; the body indexes slices only (bounds-checked).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { row_avx512(w, a, b, s) },
            // SAFETY: `detect` saw AVX2 and FMA; as above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { row_avx2(w, a, b, s) },
            Kernel::Generic => row_body::<false>(w, a, b, s),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn row_avx512(w: &[f32], a: &[f32], b: &[f32], s: f32) -> f64 {
    row_body::<true>(w, a, b, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(w: &[f32], a: &[f32], b: &[f32], s: f32) -> f64 {
    row_body::<true>(w, a, b, s)
}

/// `x·y + z`, fused when `FMA` (only compiled so where the CPU has the instruction).
#[inline(always)]
fn madd<const FMA: bool>(x: f32, y: f32, z: f32) -> f32 {
    if FMA {
        x.mul_add(y, z)
    } else {
        x * y + z
    }
}

/// See [`Kernel::row`]: blocks of [`BLOCK`] columns, then the tail.
#[inline(always)]
fn row_body<const FMA: bool>(w: &[f32], a: &[f32], b: &[f32], s: f32) -> f64 {
    let k = w.len();
    let mut acc = [0f64; LANES];
    let full = k / BLOCK * BLOCK;
    let mut j0 = 0;
    while j0 < full {
        let mut p = [0f32; BLOCK];
        for (q, &bk) in b.iter().enumerate() {
            let ar: &[f32; BLOCK] = a[q * k + j0..q * k + j0 + BLOCK].try_into().unwrap();
            for (p, &x) in p.iter_mut().zip(ar) {
                *p = madd::<FMA>(bk, x, *p);
            }
        }
        let wr: &[f32; BLOCK] = w[j0..j0 + BLOCK].try_into().unwrap();
        for (p, w) in p.chunks_exact(LANES).zip(wr.chunks_exact(LANES)) {
            for l in 0..LANES {
                let v = (w[l] + p[l] * s) as f64;
                acc[l] += v * v;
            }
        }
        j0 += BLOCK;
    }
    let mut tail = 0f64;
    for (j, &wj) in w.iter().enumerate().skip(full) {
        let mut p = 0f32;
        for (q, &bk) in b.iter().enumerate() {
            p = madd::<FMA>(bk, a[q * k + j], p);
        }
        let v = (wj + p * s) as f64;
        tail += v * v;
    }
    let mut sum = 0f64;
    for v in acc {
        sum += v;
    }
    sum + tail
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;

    use super::*;

    fn data(len: usize, seed: u32, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(97_531))
                    .rotate_left(13)
                    .wrapping_mul(2_246_822_519);
                ((h >> 8) as f32 / 16_777_216.0 - 0.5) * scale
            })
            .collect()
    }

    fn tensor<B: Backend>(v: Vec<f32>, shape: [usize; 2]) -> Tensor<B, 2> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    /// `lora_core::LoraLinear::weight_norm`'s Burn-ops form.
    fn burn_form<B: Backend>(
        w: &Tensor<B, 2>,
        a: &Tensor<B, 2>,
        b: &Tensor<B, 2>,
        s: f64,
    ) -> Vec<f32> {
        let lw = b.clone().detach().matmul(a.clone().detach());
        let total = w.clone().detach() + lw.mul_scalar(s);
        let n = total.powi_scalar(2).sum_dim(1).sqrt().squeeze_dim::<1>(1);
        n.into_data().to_vec::<f32>().unwrap()
    }

    fn exact(w: &[f32], a: &[f32], b: &[f32], k: usize, r: usize, s: f64) -> Vec<f64> {
        w.chunks_exact(k)
            .enumerate()
            .map(|(i, w)| {
                (0..k)
                    .map(|j| {
                        let p: f64 = (0..r)
                            .map(|q| b[i * r + q] as f64 * a[q * k + j] as f64)
                            .sum();
                        let v = w[j] as f64 + s * p;
                        v * v
                    })
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    }

    /// The largest difference over the largest norm.
    fn rel(x: impl Iterator<Item = (f64, f64)>) -> f64 {
        let (mut d, mut m) = (0f64, 0f64);
        for (x, y) in x {
            d = d.max((x - y).abs());
            m = m.max(y.abs());
        }
        d / m
    }

    fn check<B: Backend>(out: usize, k: usize, r: usize, s: f64, seed: u32) {
        let (wv, av, bv) = (
            data(out * k, seed, 0.1),
            data(r * k, seed + 1, 0.2),
            data(out * r, seed + 2, 0.3),
        );
        let (w, a, b) = (
            tensor::<B>(wv.clone(), [out, k]),
            tensor::<B>(av.clone(), [r, k]).require_grad(),
            tensor::<B>(bv.clone(), [out, r]).require_grad(),
        );
        let got = dora_row_norms(&w, &a, &b, s).expect("applies");
        assert!(!got.is_require_grad());
        assert_eq!(got.dims(), [out]);
        let got = got.into_data().to_vec::<f32>().unwrap();
        let want = burn_form(&w, &a, &b, s);
        let ex = exact(&wv, &av, &bv, k, r, s);
        let e_burn = rel(got.iter().zip(&want).map(|(&x, &y)| (x as f64, y as f64)));
        let e_exact = rel(got.iter().zip(&ex).map(|(&x, &y)| (x as f64, y)));
        let e_burn_exact = rel(want.iter().zip(&ex).map(|(&x, &y)| (x as f64, y)));
        eprintln!(
            "[{out}, {k}] r {r}: vs Burn {e_burn:.2e}, vs f64 {e_exact:.2e} (Burn vs f64 {e_burn_exact:.2e})"
        );
        assert!(
            e_burn <= 1e-6,
            "[{out}, {k}] r {r}: {e_burn:e} from the Burn form"
        );
        assert!(e_exact <= 1e-6, "[{out}, {k}] r {r}: {e_exact:e} from f64");
    }

    #[test]
    fn equals_the_burn_form() {
        for (i, &(out, k, r)) in [
            (40, 48, 1),
            (40, 48, 8),
            (896, 128, 8),
            (896, 128, 16),
            (130, 4864, 8),
            (130, 4864, 16),
            (33, 197, 3),
            (7, 64, 1),
            (129, 895, 16),
        ]
        .iter()
        .enumerate()
        {
            check::<Flex>(out, k, r, 2.0, 3 * i as u32);
            check::<Ad>(out, k, r, 0.5, 3 * i as u32 + 1);
        }
    }

    /// A transposed (non-contiguous) base weight gives the norms of the matrix it shows.
    #[test]
    fn takes_a_transposed_weight() {
        let (out, k, r) = (70, 131, 8);
        let wt = tensor::<Ad>(data(out * k, 5, 0.1), [k, out]);
        let w = wt.clone().transpose();
        let (a, b) = (
            tensor::<Ad>(data(r * k, 6, 0.2), [r, k]),
            tensor::<Ad>(data(out * r, 7, 0.3), [out, r]),
        );
        let got = dora_row_norms(&w, &a, &b, 2.0)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let plain = tensor::<Ad>(w.into_data().to_vec::<f32>().unwrap(), [out, k]);
        let want = dora_row_norms(&plain, &a, &b, 2.0)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn other_dtypes_are_not_taken() {
        let (out, k, r) = (6, 10, 2);
        let w = tensor::<Ad>(data(out * k, 1, 0.1), [out, k]);
        let (a, b) = (
            tensor::<Ad>(data(r * k, 2, 0.2), [r, k]),
            tensor::<Ad>(data(out * r, 3, 0.3), [out, r]),
        );
        assert!(dora_row_norms(&w, &a, &b, 1.0).is_some());
        for dtype in [DType::F64, DType::BF16] {
            let wd = w.clone().cast(dtype);
            assert!(dora_row_norms(&wd, &a, &b, 1.0).is_none(), "{dtype:?}");
            let ad = a.clone().cast(dtype);
            assert!(dora_row_norms(&w, &ad, &b, 1.0).is_none(), "{dtype:?}");
            let all = [w.clone(), a.clone(), b.clone()].map(|t| t.cast(dtype));
            assert!(
                dora_row_norms(&all[0], &all[1], &all[2], 1.0).is_none(),
                "{dtype:?}"
            );
        }
        // Shapes that do not agree.
        assert!(dora_row_norms(&w, &a.clone().transpose(), &b, 1.0).is_none());
    }

    /// Every vector path computes within rounding of the generic one.
    #[test]
    fn every_kernel_agrees() {
        let (k, r) = (BLOCK * 5 + 7, 8);
        let (w, a, b) = (data(k, 1, 0.1), data(r * k, 2, 0.2), data(r, 3, 0.3));
        let want = Kernel::Generic.row(&w, &a, &b, 2.0);
        let got = Kernel::detect().row(&w, &a, &b, 2.0);
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    }
}
