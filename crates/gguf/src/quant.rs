//! Tensor encodings, as ggml's reference code (`ggml-quants.c`, `ggml.c`) defines them.
//!
//! - f16 and bf16: round to nearest, ties to even (`GGML_FP32_TO_FP16`, `GGML_FP32_TO_BF16`).
//! - `Q8_0`: `block_q8_0 { ggml_half d; int8_t qs[32]; }` — per block of 32 values,
//!   `d = max|x| / 127` stored as f16, `qs[j] = roundf(x[j] / d)` with the reciprocal taken in
//!   f32 from the unrounded `d` (`quantize_row_q8_0_ref`); a block of zeros has `d = 0` and
//!   `qs = 0`. Dequantized: `x[j] = f16→f32(d) · qs[j]`.

use half::{bf16, f16};

use crate::GgmlType;

/// Values per `Q8_0` block (`QK8_0`).
pub const Q8_0_BLOCK: usize = 32;
/// Bytes per `Q8_0` block: the f16 scale and 32 `i8`.
pub const Q8_0_BLOCK_BYTES: usize = 2 + Q8_0_BLOCK;

/// Appends one `Q8_0` block encoding `x` (32 values) to `out`.
pub fn quantize_block_q8_0(x: &[f32; Q8_0_BLOCK], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    // f32::round rounds half away from zero, as C's roundf.
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// Appends `x` encoded as `ty` to `out`. `x.len()` must be a multiple of the type's block length
/// (the writer checks shapes before asking for data).
pub fn encode(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    out.reserve(ty.bytes_for(x.len()));
    match ty {
        GgmlType::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(x.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes())),
        GgmlType::Bf16 => out.extend(x.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            for block in x.chunks_exact(Q8_0_BLOCK) {
                quantize_block_q8_0(block.try_into().expect("chunk of 32"), out);
            }
        }
    }
}

/// The values `bytes` (encoded as `ty`) stand for, as f32.
pub fn decode(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        GgmlType::Q8_0 => bytes
            .chunks_exact(Q8_0_BLOCK_BYTES)
            .flat_map(|b| {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                b[2..].iter().map(move |q| d * f32::from(*q as i8))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block worked by hand: values -1.0, -15/16, ..., 0.9375 (k/16 - 1 for k = 0..32), with
    /// one value raised to 2.54 so the scale is not a power of two.
    #[test]
    fn q8_0_block_equals_the_hand_computed_one() {
        let mut x = [0.0f32; 32];
        for (k, v) in x.iter_mut().enumerate() {
            *v = k as f32 / 16.0 - 1.0;
        }
        x[31] = 2.54;
        let mut out = Vec::new();
        quantize_block_q8_0(&x, &mut out);
        assert_eq!(out.len(), 34);
        // d = 2.54 / 127 = 0.02; as f16: 0.02 = 1.28 · 2^-6, mantissa 0.28·1024 = 286.72 → 287,
        // bits (15 - 6) << 10 | 287 = 0x251F.
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x251F);
        // q = round(x / 0.02) computed with id = 1/d in f32: -1.0 → -50, -0.9375 → -46.875 → -47,
        // -0.5 → -25, -0.0625 (k = 15) → -3.125 → -3, 0 → 0, 0.5 → 25, 0.875 (k = 30) →
        // 43.75 → 44, 2.54 → 127.
        let q = |k: usize| out[2 + k] as i8;
        assert_eq!(
            [q(0), q(1), q(8), q(15), q(16), q(24), q(30), q(31)],
            [-50, -47, -25, -3, 0, 25, 44, 127]
        );
        // Decoding multiplies by the f16 scale (0.020004272...).
        let back = decode(GgmlType::Q8_0, &out);
        let d = f16::from_bits(0x251F).to_f32();
        assert_eq!(back[31], 127.0 * d);
        assert_eq!(back[0], -50.0 * d);
        assert!((back[31] - 2.54).abs() < 1e-3);
    }

    #[test]
    fn q8_0_rounds_half_away_from_zero_and_zero_block_has_zero_scale() {
        // max 127 → d = 1, id = 1: 0.5 → 1, -0.5 → -1, 1.5 → 2, -2.5 → -3 (roundf, not
        // ties-to-even).
        let mut x = [0.0f32; 32];
        x[..5].copy_from_slice(&[127.0, 0.5, -0.5, 1.5, -2.5]);
        let mut out = Vec::new();
        quantize_block_q8_0(&x, &mut out);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3C00); // 1.0
        let q: Vec<i8> = out[2..7].iter().map(|b| *b as i8).collect();
        assert_eq!(q, [127, 1, -1, 2, -3]);

        let mut out = Vec::new();
        quantize_block_q8_0(&[0.0; 32], &mut out);
        assert_eq!(out, vec![0u8; 34]);
    }

    #[test]
    fn half_encodings_round_to_nearest_even() {
        // 1 + 2^-11 is halfway between f16 1.0 and 1 + 2^-10: ties to even gives 1.0.
        let mut out = Vec::new();
        encode(GgmlType::F16, &[1.0 + 2f32.powi(-11), -2.0], &mut out);
        assert_eq!(out, [0x00, 0x3C, 0x00, 0xC0]);
        let mut out = Vec::new();
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even gives 1.0 (0x3F80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even gives 0x3F82.
        encode(
            GgmlType::Bf16,
            &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)],
            &mut out,
        );
        assert_eq!(out, [0x80, 0x3F, 0x82, 0x3F]);
        assert_eq!(decode(GgmlType::Bf16, &out), [1.0, 1.0 + 2f32.powi(-6)]);
    }
}
