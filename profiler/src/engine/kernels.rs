//! Q8_0 dot-product kernels: the only `unsafe` of the workspace, behind run-time CPU
//! detection.
//!
//! Weights and activations are held as blocks of 32 signed bytes with an f32 scale (ggml's
//! Q8_0 with the scale widened, so no f16 conversion sits in the inner loop). Within a block
//! the products are summed in integers, which is exact; across blocks each output element
//! accumulates in a fixed lane pattern and a fixed order. So an element's value does not depend
//! on the tile it was computed in: a 4×2 tile, a 4×1 tile and a single dot give the same bits,
//! which keeps every acceleration method's greedy output identical to the baseline's.
//!
//! candle's own `BlockQ8_0::vec_dot` computes one element per call with one dependent FMA
//! chain; these kernels compute 4 weight rows × 2 activation rows per pass, sharing each
//! weight load and running 8 independent chains.

#![allow(unsafe_code)]

/// Values per block.
pub(crate) const QK: usize = 32;

/// A block of 32 quantized values: `value[i] = d · qs[i]`, `|qs[i]| ≤ 127`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct Q8Block {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK],
}

impl Q8Block {
    pub(crate) const ZERO: Q8Block = Q8Block {
        d: 0.0,
        qs: [0; QK],
    };
}

/// Quantizes `x` (a multiple of 32 long) into `out`, as ggml's `quantize_row_q8_0`.
pub(crate) fn quantize(x: &[f32], out: &mut [Q8Block]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = d;
        for (q, v) in block.qs.iter_mut().zip(xs) {
            // Round half away from zero without a libm call (`f32::round` is one on baseline
            // x86-64); the cast truncates and saturates.
            let scaled = v * id;
            *q = (scaled + 0.5f32.copysign(scaled)).clamp(-127.0, 127.0) as i8;
        }
    }
}

/// Dequantizes `blocks` into `out`.
pub(crate) fn dequantize(blocks: &[Q8Block], out: &mut [f32]) {
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
        for (q, v) in b.qs.iter().zip(o) {
            *v = b.d * f32::from(*q);
        }
    }
}

/// Which kernels this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX2 and FMA.
    Avx2,
    /// AVX2, FMA and AVX-512 VNNI (256-bit `vpdpbusd`).
    Vnni,
    /// Portable Rust.
    Scalar,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            if std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::env::var_os("METAINF_KERNELS").is_none_or(|v| v != "avx2")
            {
                return Isa::Vnni;
            }
            return Isa::Avx2;
        }
        Isa::Scalar
    }

    /// Every kernel this CPU can run (the tests compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                all.push(Isa::Avx2);
            }
            if Isa::detect() == Isa::Vnni {
                all.push(Isa::Vnni);
            }
        }
        all
    }
}

/// `out[c][r] = w[c] · x[r]` for up to 4 weight rows and up to 2 activation rows (each a
/// slice of blocks of equal length). Unused slots are left alone.
pub(crate) fn dot_tile(isa: Isa, w: &[&[Q8Block]], x: &[&[Q8Block]], out: &mut [[f32; 2]; 4]) {
    debug_assert!(w.len() <= 4 && x.len() <= 2);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only constructed after run-time detection of AVX2 and FMA.
        Isa::Avx2 => unsafe { avx2::dot_tile(w, x, out) },
        #[cfg(target_arch = "x86_64")]
        // One activation row (decode) is memory-bound, and the VEX-encoded AVX2 kernel decodes
        // ~8 % faster there; both give the same bits, so the choice is free.
        // SAFETY: `Isa::Vnni` is only constructed after run-time detection of AVX2, FMA and
        // AVX-512 VNNI/VL.
        Isa::Vnni if x.len() == 1 => unsafe { avx2::dot_tile(w, x, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Vnni` is only constructed after run-time detection of its features,
        // a superset of AVX2's.
        Isa::Vnni => unsafe { vnni::dot_tile(w, x, out) },
        _ => {
            for (c, wc) in w.iter().enumerate() {
                for (r, xr) in x.iter().enumerate() {
                    out[c][r] = scalar_dot(wc, xr);
                }
            }
        }
    }
}

fn scalar_dot(w: &[Q8Block], x: &[Q8Block]) -> f32 {
    let mut acc = 0f32;
    for (a, b) in w.iter().zip(x) {
        let s: i32 =
            a.qs.iter()
                .zip(&b.qs)
                .map(|(p, q)| i32::from(*p) * i32::from(*q))
                .sum();
        acc += a.d * b.d * s as f32;
    }
    acc
}

/// The x86 kernels, instantiated once per instruction set; only `block_sums` differs.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernels {
    ($features:literal) => {
        #[inline]
        #[target_feature(enable = $features)]
        fn hsum(x: __m256) -> f32 {
            let hi = _mm256_extractf128_ps(x, 1);
            let s = _mm_add_ps(hi, _mm256_castps256_ps128(x));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }

        /// Prefetches the block `ahead` blocks after `b` (decode reads each weight once, so the
        /// next rows are fetched while these are computed).
        #[inline]
        #[target_feature(enable = $features)]
        fn prefetch_ahead(b: &Q8Block, ahead: usize) {
            let p = (b as *const Q8Block).wrapping_add(ahead).cast::<i8>();
            // A prefetch is a hint: it never faults, even past the end of the weights.
            _mm_prefetch::<_MM_HINT_T0>(p)
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn load(b: &Q8Block) -> __m256i {
            // SAFETY: `qs` is 32 bytes; the load is unaligned.
            unsafe { _mm256_loadu_si256(b.qs.as_ptr().cast::<__m256i>()) }
        }

        /// See [`super::dot_tile`]. Every element runs the same instruction sequence whatever the
        /// tile's shape: one accumulator, blocks in order, the same horizontal sum.
        #[target_feature(enable = $features)]
        pub(super) fn dot_tile(w: &[&[Q8Block]], x: &[&[Q8Block]], out: &mut [[f32; 2]; 4]) {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let blocks = w.first().map_or(0, |r| r.len());
            match (w.len(), x.len()) {
                (4, 2) => {
                    // Eight named accumulators stay in registers (an indexed array spilled).
                    let (mut a00, mut a01, mut a10, mut a11) =
                        (acc[0][0], acc[0][1], acc[1][0], acc[1][1]);
                    let (mut a20, mut a21, mut a30, mut a31) =
                        (acc[2][0], acc[2][1], acc[3][0], acc[3][1]);
                    let (w0, w1, w2, w3) = (w[0], w[1], w[2], w[3]);
                    let (x0s, x1s) = (x[0], x[1]);
                    for b in 0..blocks {
                        let (x0, x1) = (&x0s[b], &x1s[b]);
                        let (lx0, lx1) = (load(x0), load(x1));
                        let step = |wb: &Q8Block, s0: &mut __m256, s1: &mut __m256| {
                            let lw = load(wb);
                            let aw = _mm256_sign_epi8(lw, lw);
                            *s0 = _mm256_fmadd_ps(
                                _mm256_set1_ps(wb.d * x0.d),
                                block_sums(aw, lw, lx0),
                                *s0,
                            );
                            *s1 = _mm256_fmadd_ps(
                                _mm256_set1_ps(wb.d * x1.d),
                                block_sums(aw, lw, lx1),
                                *s1,
                            );
                        };
                        step(&w0[b], &mut a00, &mut a01);
                        step(&w1[b], &mut a10, &mut a11);
                        step(&w2[b], &mut a20, &mut a21);
                        step(&w3[b], &mut a30, &mut a31);
                    }
                    acc = [[a00, a01], [a10, a11], [a20, a21], [a30, a31]];
                }
                (4, 1) => {
                    let (mut a0, mut a1, mut a2, mut a3) =
                        (acc[0][0], acc[1][0], acc[2][0], acc[3][0]);
                    let (w0, w1, w2, w3) = (w[0], w[1], w[2], w[3]);
                    let x0s = x[0];
                    for b in 0..blocks {
                        // Rows are contiguous: the next tile's rows start 4 rows further on.
                        for wr in [w0, w1, w2, w3] {
                            prefetch_ahead(&wr[b], 8 * blocks);
                        }
                        let x0 = &x0s[b];
                        let lx0 = load(x0);
                        let step = |wb: &Q8Block, s: __m256| {
                            let lw = load(wb);
                            let aw = _mm256_sign_epi8(lw, lw);
                            _mm256_fmadd_ps(_mm256_set1_ps(wb.d * x0.d), block_sums(aw, lw, lx0), s)
                        };
                        a0 = step(&w0[b], a0);
                        a1 = step(&w1[b], a1);
                        a2 = step(&w2[b], a2);
                        a3 = step(&w3[b], a3);
                    }
                    acc[0][0] = a0;
                    acc[1][0] = a1;
                    acc[2][0] = a2;
                    acc[3][0] = a3;
                }
                _ => {
                    for (c, wc) in w.iter().enumerate() {
                        for (r, xr) in x.iter().enumerate() {
                            for b in 0..blocks {
                                let (wb, xb) = (&wc[b], &xr[b]);
                                let lw = load(wb);
                                let aw = _mm256_sign_epi8(lw, lw);
                                acc[c][r] = _mm256_fmadd_ps(
                                    _mm256_set1_ps(wb.d * xb.d),
                                    block_sums(aw, lw, load(xb)),
                                    acc[c][r],
                                );
                            }
                        }
                    }
                }
            }
            for c in 0..w.len() {
                for r in 0..x.len() {
                    out[c][r] = hsum(acc[c][r]);
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Q8Block;

    /// Eight lanes of partial sums of one block: Σ w·x over groups of four bytes, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn block_sums(abs_w: __m256i, w: __m256i, x: __m256i) -> __m256 {
        // maddubs wants unsigned × signed: |w| × (x · sign(w)). |qs| ≤ 127, so nothing wraps
        // and no pair sum saturates (2 · 127 · 127 < 32767).
        let sx = _mm256_sign_epi8(x, w);
        let pairs = _mm256_maddubs_epi16(abs_w, sx);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    x86_kernels!("avx2,fma");
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::Q8Block;

    /// As the AVX2 version in one instruction: `vpdpbusd` sums the same four byte products
    /// per lane exactly, so both paths give the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    fn block_sums(abs_w: __m256i, w: __m256i, x: __m256i) -> __m256 {
        let sx = _mm256_sign_epi8(x, w);
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), abs_w, sx))
    }

    x86_kernels!("avx2,fma,avx512vnni,avx512vl");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(values: &[f32]) -> Vec<Q8Block> {
        let mut b = vec![Q8Block::ZERO; values.len() / QK];
        quantize(values, &mut b);
        b
    }

    #[test]
    fn every_tile_shape_gives_the_same_bits_and_matches_the_scalar_dot() {
        let k = 18 * QK;
        let row = |seed: usize| -> Vec<f32> {
            (0..k)
                .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) / 137.0)
                .collect()
        };
        let w: Vec<Vec<Q8Block>> = (0..4).map(|s| blocks(&row(s))).collect();
        let x: Vec<Vec<Q8Block>> = (10..12).map(|s| blocks(&row(s))).collect();
        let wr: Vec<&[Q8Block]> = w.iter().map(Vec::as_slice).collect();
        let xr: Vec<&[Q8Block]> = x.iter().map(Vec::as_slice).collect();
        let mut simd_bits: Option<[[u32; 2]; 4]> = None;
        for isa in Isa::available() {
            let mut full = [[0f32; 2]; 4];
            dot_tile(isa, &wr, &xr, &mut full);
            if isa != Isa::Scalar {
                // AVX2 and VNNI sum the same integers per lane: the same bits.
                let bits = full.map(|row| row.map(f32::to_bits));
                assert_eq!(*simd_bits.get_or_insert(bits), bits, "{isa:?}");
            }
            for c in 0..4 {
                for r in 0..2 {
                    let mut one = [[0f32; 2]; 4];
                    dot_tile(isa, &wr[c..=c], &xr[r..=r], &mut one);
                    assert_eq!(
                        one[0][0].to_bits(),
                        full[c][r].to_bits(),
                        "{isa:?} 1x1 vs 4x2"
                    );
                    let mut col = [[0f32; 2]; 4];
                    dot_tile(isa, &wr, &xr[r..=r], &mut col);
                    assert_eq!(
                        col[c][0].to_bits(),
                        full[c][r].to_bits(),
                        "{isa:?} 4x1 vs 4x2"
                    );
                    let exact = scalar_dot(&w[c], &x[r]);
                    assert!(
                        (full[c][r] - exact).abs() <= 1e-3 * exact.abs().max(1.0),
                        "{} vs {exact}",
                        full[c][r]
                    );
                }
            }
        }
        // Quantization round-trips within half a step.
        let v = row(3);
        let mut back = vec![0f32; k];
        dequantize(&blocks(&v), &mut back);
        let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            v.iter()
                .zip(&back)
                .all(|(a, b)| (a - b).abs() <= amax / 127.0)
        );
    }
}
