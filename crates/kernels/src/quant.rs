//! bitsandbytes' 4-bit block quantization (QLoRA's NF4, and FP4) with its double quantization of
//! the block scales: the layout and the values `bitsandbytes.functional.quantize_4bit` produces on
//! the CPU, bit for bit (checked against bitsandbytes 0.50.2 by `scripts/make_qlora_fixtures.py`).
//!
//! * The input, flattened, is cut into blocks of 64; each block's scale is its largest magnitude
//!   (`absmax`, f32). Each value is scaled by the reciprocal of its block's scale (a remainder
//!   block divides instead, as bitsandbytes does), clamped to [-1, 1], and given the index of its
//!   nearest code (the codes' midpoints as bucket bounds, a value on a bound going to the lower
//!   bucket: `torch.bucketize`).
//! * Two indices per byte, the first in the high nibble.
//! * Double quantization (`bnb_4bit_use_double_quant`): the scales minus their mean (`offset`, torch's
//!   single-threaded float mean) are quantized to 8 bits in blocks of 256 with bitsandbytes' signed
//!   dynamic code, each block with its own f32 scale, through the 65536-point grid bitsandbytes' CPU
//!   kernel uses.
//! * Dequantization: `code[index] · scale` in f32 (the scale itself being
//!   `code8[q] · scale2 + offset` under double quantization).

/// bitsandbytes' NF4 code (`_get_4bit_code("nf4")`): the normal distribution's quantiles, sorted.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 code (`_get_4bit_code("fp4")`), in index order (sign bit 3, not sorted).
pub const FP4: [f32; 16] = [
    0.0,
    0.005_208_333_5,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    0.0,
    -0.005_208_333_5,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// The order that sorts [`FP4`] (as `torch.argsort` gives it; the two zeros keep index order).
const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// Values per 4-bit block (bitsandbytes' default, and what transformers uses).
pub const BLOCK: usize = 64;
/// Scales per block of the double quantization.
pub const BLOCK2: usize = 256;

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nf4,
    Fp4,
}

impl Kind {
    /// bitsandbytes' name (`bnb_4bit_quant_type`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nf4 => "nf4",
            Kind::Fp4 => "fp4",
        }
    }

    /// The 16 values an index stands for.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            Kind::Nf4 => &NF4,
            Kind::Fp4 => &FP4,
        }
    }
}

/// The block scales, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    /// One f32 per block of [`BLOCK`].
    F32(Vec<f32>),
    /// `scale[i] = DYNAMIC[q[i]] · absmax2[i / 256] + offset`.
    Double {
        q: Vec<u8>,
        absmax2: Vec<f32>,
        offset: f32,
    },
}

impl Scales {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Scales::F32(v) => 4 * v.len(),
            Scales::Double { q, absmax2, .. } => q.len() + 4 * absmax2.len() + 4,
        }
    }

    /// The f32 scale of every block.
    pub fn values(&self) -> Vec<f32> {
        match self {
            Scales::F32(v) => v.clone(),
            Scales::Double { q, absmax2, offset } => {
                let code = dynamic_code();
                q.iter()
                    .enumerate()
                    .map(|(i, &q)| code[q as usize] * absmax2[i / BLOCK2] + offset)
                    .collect()
            }
        }
    }
}

/// A tensor in 4 bits.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub kind: Kind,
    /// Elements (the original tensor's, flattened).
    pub len: usize,
    /// Two indices per byte, the first in the high nibble (an odd length is padded with the index
    /// of 0.0, as bitsandbytes pads).
    pub packed: Vec<u8>,
    pub scales: Scales,
}

impl Quantized {
    /// Quantizes `a` (any shape, flattened) as `quantize_4bit(a, blocksize=64, quant_type=kind,
    /// compress_statistics=double)`.
    pub fn new(a: &[f32], kind: Kind, double: bool) -> Self {
        let (idx, absmax, pad) = quantize_indices(a, kind);
        let packed = idx
            .chunks(2)
            .map(|p| (p[0] << 4) | p.get(1).copied().unwrap_or(pad))
            .collect();
        let scales = if double {
            double_quantize(&absmax)
        } else {
            Scales::F32(absmax)
        };
        Self {
            kind,
            len: a.len(),
            packed,
            scales,
        }
    }

    /// Bytes held (data and scales).
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.scales.bytes()
    }

    /// The f32 values (`dequantize_4bit` to float32).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len];
        self.dequantize_into(&mut out);
        out
    }

    /// [`Self::dequantize`] into `out` (`len` elements), on all cores with the `cpu` feature
    /// (each value is one product, so the result does not depend on how the work is split).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.len, "dequantize_into: output length");
        let scales = self.scales.values();
        // Chunks of whole blocks.
        const CHUNK: usize = BLOCK * 256;
        let run =
            |(c, chunk): (usize, &mut [f32])| self.dequantize_range(c * CHUNK, chunk, &scales);
        #[cfg(feature = "cpu")]
        {
            use rayon::prelude::*;
            out.par_chunks_mut(CHUNK).enumerate().for_each(run);
        }
        #[cfg(not(feature = "cpu"))]
        out.chunks_mut(CHUNK).enumerate().for_each(run);
    }

    /// Values `start..start + out.len()` (`start` a multiple of [`BLOCK`]).
    fn dequantize_range(&self, start: usize, out: &mut [f32], scales: &[f32]) {
        let code = self.kind.code();
        for (k, chunk) in out.chunks_mut(BLOCK).enumerate() {
            let b = start / BLOCK + k;
            let s = scales[b];
            for (j, o) in chunk.iter_mut().enumerate() {
                let i = b * BLOCK + j;
                let byte = self.packed[i / 2];
                let q = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0xF
                };
                *o = code[q as usize] * s;
            }
        }
    }
}

/// The 4-bit index of every value, the scale of every block, and the index of 0.0 (the padding).
fn quantize_indices(a: &[f32], kind: Kind) -> (Vec<u8>, Vec<f32>, u8) {
    let code = kind.code();
    // Sorted codes, their midpoints, and the index each sorted position stands for.
    let order: [u8; 16] = match kind {
        Kind::Nf4 => std::array::from_fn(|i| i as u8),
        Kind::Fp4 => FP4_ORDER,
    };
    let bounds: [f32; 15] =
        std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0);
    let bucket = |x: f32| -> u8 {
        // torch.bucketize(right=False): the number of bounds strictly below x.
        let k = bounds.iter().take_while(|&&b| b < x).count();
        order[k]
    };
    let full = a.len() / BLOCK * BLOCK;
    let mut idx = Vec::with_capacity(a.len());
    let mut absmax = Vec::with_capacity(a.len().div_ceil(BLOCK));
    for block in a[..full].chunks(BLOCK) {
        let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(m);
        let r = 1.0 / m.max(1e-38);
        idx.extend(block.iter().map(|&v| bucket((v * r).clamp(-1.0, 1.0))));
    }
    if full < a.len() {
        let rest = &a[full..];
        let m = rest.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(m);
        let d = m.max(1e-38);
        idx.extend(rest.iter().map(|&v| bucket((v / d).clamp(-1.0, 1.0))));
    }
    (idx, absmax, bucket(0.0))
}

/// bitsandbytes' signed dynamic 8-bit code (`create_dynamic_map()`), sorted.
pub fn dynamic_code() -> &'static [f32; 256] {
    static CODE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    CODE.get_or_init(|| {
        let mut data: Vec<f32> = Vec::with_capacity(256);
        // max_exponent_bits 7, total_bits 8, signed: fraction_items = 2^i + 1 for i in 0..7.
        for i in 0..7 {
            let items = (1usize << i) + 1;
            let bounds = linspace_f32(0.1, 1.0, items);
            let scale = 10f64.powi(i - 6) as f32;
            for w in bounds.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(scale * mean);
                data.push(-(scale * mean));
            }
        }
        data.push(0.0);
        data.push(1.0);
        while data.len() < 256 {
            data.push(0.0);
        }
        data.sort_by(f32::total_cmp);
        data.try_into().unwrap()
    })
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: from the start for the first
/// half, from the end for the rest, each a fused multiply-add (one rounding), as torch's vectorized
/// kernel computes it.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// The scales minus their mean, 8-bit blockwise (`quantize_blockwise(absmax - offset, 256)`), as
/// bitsandbytes' CPU kernel does it: each value times its block's reciprocal scale, clamped, placed
/// on a grid of 65536 points over [-1, 1] (`⌊((x + 1) · 0.5) · 65535 + 0.5⌋`), and given the code the
/// grid point is nearest to (a table built once). That is the nearest code except within half a grid
/// step of a midpoint between two codes.
fn double_quantize(absmax: &[f32]) -> Scales {
    let offset = mean_f32(absmax);
    let table = grid_table();
    let mut q = Vec::with_capacity(absmax.len());
    let mut absmax2 = Vec::with_capacity(absmax.len().div_ceil(BLOCK2));
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    for block in centred.chunks(BLOCK2) {
        let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax2.push(m);
        if m == 0.0 {
            q.extend(std::iter::repeat_n(0, block.len()));
            continue;
        }
        let r = 1.0 / m;
        q.extend(block.iter().map(|&v| {
            let x = (v * r).clamp(-1.0, 1.0);
            table[((x + 1.0) * 0.5 * (GRID - 1) as f32 + 0.5) as usize]
        }));
    }
    Scales::Double { q, absmax2, offset }
}

/// Points of the grid of [`grid_table`].
const GRID: usize = 65536;

/// For each grid point `-1 + 2i / 65535`, the index of the nearest dynamic code (the lower one
/// when the point lies on a midpoint).
fn grid_table() -> &'static [u8] {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let code = dynamic_code();
        let mid: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut k = 0;
        (0..GRID)
            .map(|i| {
                let x = -1.0 + (2.0 * i as f32) / (GRID - 1) as f32;
                while k < mid.len() && mid[k] < x {
                    k += 1;
                }
                k as u8
            })
            .collect()
    })
}

/// `torch.mean` of f32 values on the CPU, as one thread computes it: ATen's cascade sum over
/// 8-lane vectors (4 vectors in flight, partial sums promoted through 4 levels), the scalar tail,
/// then the lanes in order; divided by the count. (With several threads torch splits more than
/// 32768 values into one chunk per thread and adds the chunks' sums, which can change the last
/// bit; the fixtures are made with one thread.)
fn mean_f32(v: &[f32]) -> f32 {
    torch_sum(v) / v.len() as f32
}

const LANES8: usize = 8;

fn torch_sum(x: &[f32]) -> f32 {
    let n = x.len();
    if n < LANES8 {
        // Scalar rows: the same cascade with one lane.
        let acc = row_sum::<1>(n, |i| [x[i]]);
        return acc[0];
    }
    let vs = n / LANES8;
    let acc = row_sum::<LANES8>(vs, |i| x[i * LANES8..(i + 1) * LANES8].try_into().unwrap());
    let mut total = 0f32;
    for &t in &x[vs * LANES8..] {
        total += t;
    }
    for a in acc {
        total += a;
    }
    total
}

fn add<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
    for (a, b) in a.iter_mut().zip(b) {
        *a += b;
    }
}

/// ATen's `row_sum`: the rows as `[-1, 4]`, a cascade over each column, the remainder into the
/// first, then the four added in order.
fn row_sum<const W: usize>(size: usize, load: impl Fn(usize) -> [f32; W]) -> [f32; W] {
    const ILP: usize = 4;
    let size_ilp = size / ILP;
    let mut sums = multi_row_sum::<W, ILP>(size_ilp, &load);
    for i in size_ilp * ILP..size {
        add(&mut sums[0], &load(i));
    }
    let (first, rest) = sums.split_at_mut(1);
    for s in rest.iter() {
        add(&mut first[0], s);
    }
    first[0]
}

/// ATen's `multi_row_sum`: four levels of partial sums, each level `2^p` steps of the one below.
fn multi_row_sum<const W: usize, const R: usize>(
    size: usize,
    load: &impl Fn(usize) -> [f32; W],
) -> [[f32; W]; R] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 1 {
        0
    } else {
        usize::BITS - (size - 1).leading_zeros()
    } as usize;
    let power = (ceil_log2 / LEVELS).max(4);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[[0f32; W]; R]; LEVELS];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &load(i * R + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (below, this) = acc.split_at_mut(j);
            for (lower, upper) in below[j - 1].iter_mut().zip(this[0].iter_mut()) {
                add(upper, lower);
                *lower = [0f32; W];
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &load(i * R + k));
        }
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (a, b) in first[0].iter_mut().zip(level) {
            add(a, b);
        }
    }
    first[0]
}
