//! The one entry point to the `gemm` crate: `dst = (acc ? dst : 0) + beta · lhs·rhs` over matrix
//! views that check, when built, that every element they name lies inside their slice. The views
//! carry row and column strides, so a transposed operand or one head's rows inside a
//! `[seq, heads, head_dim]` tensor are views too, and no caller writes a raw pointer.

/// A read-only `[rows, cols]` matrix view: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// The row-major `[rows, cols]` matrix at the start of `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A `[rows, cols]` view with row stride `rs` and column stride `cs`. Panics when an element
    /// lies outside `data`.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < data.len(),
            "a [{rows}, {cols}] view with strides ({rs}, {cs}) overruns {} elements",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transpose, `[cols, rows]` (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// A writable `[rows, cols]` matrix view with row stride `rs` and unit column stride.
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    /// The row-major `[rows, cols]` matrix at the start of `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// A `[rows, cols]` view with row stride `rs`. Panics when an element lies outside `data`.
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(
            rows == 0 || cols == 0 || (rows - 1) * rs + cols <= data.len(),
            "a [{rows}, {cols}] output with row stride {rs} overruns {} elements",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            rs,
        }
    }
}

/// How many threads a product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// The calling thread only (the caller is already one of many parallel tasks).
    One,
    /// All of rayon's threads when the product is large enough to repay them (Flex's rule: from
    /// 192³ multiply-adds).
    Auto,
}

/// `dst = (acc ? dst : 0) + beta · lhs·rhs`; panics when the shapes do not chain.
pub fn matmul(dst: MatMut<'_>, acc: bool, lhs: Mat<'_>, rhs: Mat<'_>, beta: f32, threads: Threads) {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    assert!(
        lhs.rows == m && rhs.rows == k && rhs.cols == n,
        "[{}, {}]·[{}, {}] into [{m}, {n}]",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    let par = match threads {
        Threads::Auto if m * n * k >= 192 * 192 * 192 => gemm::Parallelism::Rayon(0),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the three views checked when built that every element they name lies inside their
    // slices, and the assertion above that the shapes chain, so `gemm` reads `[m, k]` and `[k, n]`
    // and writes `[m, n]` inside them; `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            acc,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0f32,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// `lhs·rhs` in a new row-major buffer.
pub fn product(lhs: Mat<'_>, rhs: Mat<'_>, threads: Threads) -> Vec<f32> {
    // Zeroed lazily by the kernel's pages; the product writes every element before any is read.
    let mut out = vec![0f32; lhs.rows * rhs.cols];
    let (m, n) = (lhs.rows, rhs.cols);
    matmul(MatMut::new(&mut out, m, n), false, lhs, rhs, 1.0, threads);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The naive product, for checking.
    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn views_transposes_and_accumulation() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        let got = product(Mat::new(&a, m, k), Mat::new(&b, k, n), Threads::Auto);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        // bᵀ stored row-major as [n, k], read back transposed.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut acc = vec![1f32; m * n];
        matmul(
            MatMut::new(&mut acc, m, n),
            true,
            Mat::new(&a, m, k),
            Mat::new(&bt, n, k).t(),
            2.0,
            Threads::One,
        );
        for (g, w) in acc.iter().zip(&want) {
            assert!((g - (1.0 + 2.0 * w)).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn a_view_past_its_slice_panics() {
        let a = vec![0f32; 10];
        let _ = Mat::strided(&a, 3, 4, 4, 1);
    }

    #[test]
    #[should_panic(expected = "into")]
    fn shapes_that_do_not_chain_panic() {
        let a = vec![0f32; 6];
        let _ = product(Mat::new(&a, 2, 3), Mat::new(&a, 2, 3), Threads::One);
    }
}
