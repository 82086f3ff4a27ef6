//! GGUF weight tensors into the kernels' block formats ([`super::kernels`]).
//!
//! | GGUF type | held as | exact? |
//! |---|---|---|
//! | Q4_1 | [`Q4Block`], byte for byte | yes |
//! | Q4_0 | [`Q4Block`] with `m = −8·d` | yes (a power-of-two multiple of an f16 is an f16) |
//! | Q4_K | [`Q4Block`] per 32-value sub-block, `d = d·sc`, `m = −dmin·min` rounded to f16 | to f16 rounding of the two scales (relative 2⁻¹², far below the 4-bit step) |
//! | Q8_0 | [`Q8Block`], the scale widened to f32 | yes |
//! | Q5_0 | [`Q8Block`] with `q − 16` (5 bits fit in 8) | yes |
//! | Q6_K | [`Q6Block`] per 32 values (the super-block's `d`, two sub-block scales) | yes |
//! | anything else (F32, F16, BF16, Q5_1, Q5_K, Q2_K, Q3_K, …) | [`Q8Block`], requantized | to 8 bits |
//!
//! `METAINF_WEIGHTS=q8` holds every tensor as Q8 (the format the engine had before it read
//! 4-bit blocks natively), for side-by-side measurements.

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::kernels::{Q4Block, Q6Block, Q8Block, QK, Weight};
use crate::error::{ProfilerError, Result};

/// One tensor's weights, rows of `cols / 32` blocks each.
pub(crate) enum Blocks {
    Q8(Vec<Q8Block>),
    Q6(Vec<Q6Block>),
    Q4(Vec<Q4Block>),
}

impl Blocks {
    /// Bytes the blocks take (what a pass over the tensor streams from memory).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Blocks::Q8(b) => b.len() * Q8Block::BYTES,
            Blocks::Q6(b) => b.len() * Q6Block::BYTES,
            Blocks::Q4(b) => b.len() * Q4Block::BYTES,
        }
    }

    /// The format's name, for logs and the roofline.
    pub(crate) fn format(&self) -> &'static str {
        match self {
            Blocks::Q8(_) => "q8",
            Blocks::Q6(_) => "q6",
            Blocks::Q4(_) => "q4",
        }
    }

    /// Appends `other` if it has the same format; hands it back otherwise.
    pub(crate) fn append(&mut self, other: Blocks) -> Option<Blocks> {
        match (self, other) {
            (Blocks::Q8(a), Blocks::Q8(b)) => a.extend(b),
            (Blocks::Q6(a), Blocks::Q6(b)) => a.extend(b),
            (Blocks::Q4(a), Blocks::Q4(b)) => a.extend(b),
            (_, other) => return Some(other),
        }
        None
    }

    /// Dequantizes blocks `first..first + out.len() / 32` into `out`.
    pub(crate) fn dequantize(&self, first: usize, out: &mut [f32]) {
        let n = out.len() / QK;
        match self {
            Blocks::Q8(b) => Q8Block::dequantize(&b[first..first + n], out),
            Blocks::Q6(b) => Q6Block::dequantize(&b[first..first + n], out),
            Blocks::Q4(b) => Q4Block::dequantize(&b[first..first + n], out),
        }
    }
}

/// Whether 4-bit tensors keep their 4-bit blocks (the default) or are requantized to Q8.
fn keep_native() -> bool {
    std::env::var_os("METAINF_WEIGHTS").is_none_or(|v| v != "q8")
}

/// The blocks of a `rows × cols` weight tensor named `name`.
pub(crate) fn blocks(name: &str, tensor: &QTensor, rows: usize, cols: usize) -> Result<Blocks> {
    if !cols.is_multiple_of(QK) {
        return Err(ProfilerError::Model(format!(
            "tensor {name}: {cols} columns cannot be held in blocks of {QK}"
        )));
    }
    let n = rows
        .checked_mul(cols / QK)
        .ok_or_else(|| ProfilerError::Model(format!("tensor {name}: size overflows")))?;
    let dtype = tensor.dtype();
    let native = keep_native();
    let raw = || -> Result<std::borrow::Cow<'_, [u8]>> {
        let data = tensor.data()?;
        let (values_per_block, bytes_per_block) = match dtype {
            GgmlDType::Q4_0 => (QK, 18),
            GgmlDType::Q4_1 => (QK, 20),
            GgmlDType::Q8_0 => (QK, 34),
            GgmlDType::Q5_0 => (QK, 22),
            GgmlDType::Q4K => (256, 144),
            GgmlDType::Q6K => (256, 210),
            _ => (QK, 0),
        };
        let expected = (n * QK / values_per_block).checked_mul(bytes_per_block);
        if !(n * QK).is_multiple_of(values_per_block) || expected != Some(data.len()) {
            return Err(ProfilerError::Model(format!(
                "tensor {name}: {} bytes of {dtype:?} do not hold {rows}x{cols} values",
                data.len()
            )));
        }
        Ok(data)
    };
    let h = |b: &[u8], at: usize| f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]));
    match dtype {
        GgmlDType::Q8_0 => {
            let data = raw()?;
            Ok(Blocks::Q8(
                data.chunks_exact(34)
                    .map(|b| {
                        let mut qs = [0i8; QK];
                        for (q, v) in qs.iter_mut().zip(&b[2..]) {
                            *q = i8::from_ne_bytes([*v]);
                        }
                        Q8Block {
                            d: h(b, 0).to_f32(),
                            qs,
                        }
                    })
                    .collect(),
            ))
        }
        GgmlDType::Q5_0 => {
            // d, 32 high bits, 16 bytes of low nibbles: value (q − 16)·d, q of 5 bits, which
            // an 8-bit block with the same d holds exactly (ggml's dequantize_row_q5_0).
            let data = raw()?;
            Ok(Blocks::Q8(
                data.chunks_exact(22)
                    .map(|b| {
                        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                        let mut qs = [0i8; QK];
                        for (j, byte) in b[6..22].iter().enumerate() {
                            let hi0 = ((qh >> j) << 4) & 0x10;
                            let hi1 = (qh >> (j + 12)) & 0x10;
                            qs[j] = ((u32::from(byte & 0x0F) | hi0) as i8) - 16;
                            qs[j + QK / 2] = ((u32::from(byte >> 4) | hi1) as i8) - 16;
                        }
                        Q8Block {
                            d: h(b, 0).to_f32(),
                            qs,
                        }
                    })
                    .collect(),
            ))
        }
        GgmlDType::Q4_0 | GgmlDType::Q4_1 if native => {
            let data = raw()?;
            // Q4_1: d, m, 16 bytes of nibbles; Q4_0: d, the nibbles, and m = −8·d.
            let (size, qs_at) = if dtype == GgmlDType::Q4_1 {
                (20, 4)
            } else {
                (18, 2)
            };
            Ok(Blocks::Q4(
                data.chunks_exact(size)
                    .map(|b| {
                        let d = h(b, 0);
                        let m = if qs_at == 4 {
                            h(b, 2)
                        } else {
                            f16::from_f32(-8.0 * d.to_f32())
                        };
                        let mut qs = [0u8; QK / 2];
                        qs.copy_from_slice(&b[qs_at..]);
                        Q4Block {
                            d: d.to_bits(),
                            m: m.to_bits(),
                            qs,
                        }
                    })
                    .collect(),
            ))
        }
        GgmlDType::Q4K if native => {
            let data = raw()?;
            let mut out = Vec::with_capacity(n);
            for b in data.chunks_exact(144) {
                let (d, dmin) = (h(b, 0).to_f32(), h(b, 2).to_f32());
                let scales = &b[4..16];
                let qs = &b[16..];
                for j in 0..4 {
                    let q = &qs[32 * j..32 * (j + 1)];
                    for (sub, shift) in [(2 * j, 0), (2 * j + 1, 4)] {
                        let (sc, mn) = scale_min_k4(sub, scales);
                        let (bd, bm) = (d * f32::from(sc), -(dmin * f32::from(mn)));
                        let (hd, hm) = (f16::from_f32(bd), f16::from_f32(bm));
                        if !hd.is_finite() || !hm.is_finite() {
                            return Err(ProfilerError::Model(format!(
                                "tensor {name}: a Q4_K scale does not fit an f16"
                            )));
                        }
                        let mut nib = [0u8; QK];
                        for (v, byte) in nib.iter_mut().zip(q) {
                            *v = (byte >> shift) & 15;
                        }
                        out.push(Q4Block::pack(hd, hm, &nib));
                    }
                }
            }
            Ok(Blocks::Q4(out))
        }
        GgmlDType::Q6K if native => {
            let data = raw()?;
            let mut out = Vec::with_capacity(n);
            for b in data.chunks_exact(210) {
                let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
                let d = h(b, 208);
                // ggml's dequantize_row_q6_K: value v of the super-block from its low nibble,
                // its two high bits, and the scale of sub-block v / 16.
                let mut q = [0u8; 256];
                for half in 0..2 {
                    let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                    for l in 0..32 {
                        let v = &mut q[128 * half..];
                        v[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
                        v[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                        v[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                        v[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                    }
                }
                for (j, vals) in q.chunks_exact(QK).enumerate() {
                    let mut v = [0u8; QK];
                    v.copy_from_slice(vals);
                    let sc = [scales[2 * j], scales[2 * j + 1]].map(|s| i8::from_ne_bytes([s]));
                    out.push(Q6Block::pack(d, sc, &v));
                }
            }
            Ok(Blocks::Q6(out))
        }
        _ => {
            let values = tensor
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            if values.len() != rows * cols {
                return Err(ProfilerError::Model(format!(
                    "tensor {name}: {} values, expected {rows}x{cols}",
                    values.len()
                )));
            }
            let mut b = vec![Q8Block::ZERO; n];
            use rayon::prelude::*;
            b.par_chunks_mut(cols / QK)
                .zip(values.par_chunks(cols))
                .for_each(|(b, v)| Q8Block::quantize(v, b));
            Ok(Blocks::Q8(b))
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K super-block (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    /// Each native conversion holds what candle's own dequantization of the file's blocks
    /// gives: exactly for Q4_0, Q4_1, Q5_0 and Q8_0, to f16 rounding of the scales for Q4_K.
    #[test]
    fn native_blocks_hold_the_values_candle_dequantizes() {
        let (rows, cols) = (8, 512);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("tensor");
        for (dtype, tol) in [
            (GgmlDType::Q4_0, 0.0),
            (GgmlDType::Q4_1, 0.0),
            (GgmlDType::Q8_0, 0.0),
            (GgmlDType::Q5_0, 0.0),
            (GgmlDType::Q4K, 2e-3),
            (GgmlDType::Q6K, 1e-6),
        ] {
            let q = QTensor::quantize(&t, dtype).expect("quantize");
            let want = q
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .expect("dequantize");
            let b = blocks("t", &q, rows, cols).expect("blocks");
            let format = match dtype {
                GgmlDType::Q8_0 | GgmlDType::Q5_0 => "q8",
                GgmlDType::Q6K => "q6",
                _ => "q4",
            };
            assert_eq!(b.format(), format);
            let mut got = vec![0f32; rows * cols];
            b.dequantize(0, &mut got);
            let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= tol * amax, "{dtype:?}: {g} vs {w}");
            }
        }
        // Formats without a native path are requantized to 8 bits.
        let q = QTensor::quantize(&t, GgmlDType::Q5K).expect("quantize");
        let b = blocks("t", &q, rows, cols).expect("blocks");
        assert_eq!(b.format(), "q8");
        // A tensor whose bytes do not match its shape is refused, not read past.
        let q = QTensor::quantize(&t, GgmlDType::Q4_1).expect("quantize");
        assert!(blocks("t", &q, rows * 2, cols).is_err());
    }
}
