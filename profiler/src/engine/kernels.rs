//! Block dot-product kernels: the only `unsafe` of the workspace, behind run-time CPU
//! detection.
//!
//! Three weight formats cross memory:
//! - [`Q4Block`], ggml's Q4_1 byte for byte (20 bytes per 32 weights: `value = d·q + m`, `q`
//!   a nibble, `d` and `m` f16). Q4_0 and Q4_K tensors are held in it too, exactly or to f16
//!   rounding of their scales ([`super::quant`]). Decode streams every weight once per step, so
//!   these bytes are what bounds it.
//! - [`Q6Block`], a slice of ggml's Q6_K (28 bytes per 32 weights, exact).
//! - [`Q8Block`], 32 signed bytes with an f32 scale (36 bytes per 32 weights): Q8_0 tensors
//!   exactly, and every other format requantized.
//!
//! Batches unpack 4-bit tiles into [`U4Block`]s (one byte per value, f32 scales) once per
//! weight tile, so the nibbles are split once per tile rather than once per block pair.
//!
//! Activations are quantized once per matmul into [`XBlock`]s (ggml's Q8_1: 32 signed bytes,
//! the scale and the scaled sum, both f32), shared by every weight row.
//!
//! Within a block the products are summed in integers, which is exact; across blocks each
//! output element accumulates in a fixed lane pattern and a fixed order, and a Q4 row's `m`
//! terms in a sum of their own (a lane per row), also in block order. So an element's value
//! does not depend on the tile it was computed in: a 4×2 tile, a 4×1 tile and a single dot
//! give the same bits, which keeps every acceleration method's greedy output identical to the
//! baseline's.
//!
//! # Safety
//!
//! Every `unsafe` block below is one of three kinds: a call of a `#[target_feature]` function,
//! made only from an [`Isa`] that run-time detection constructed (so the CPU has the
//! features); an unaligned SIMD load or store of a block's bytes through a reference to the
//! block or a local array (in bounds by its size: 32 bytes for a 256-bit access, 16 for a
//! 128-bit one); or, in the hand-written decode and score loops, pointer offsets whose bounds
//! are asserted (rows at least as long as the activations) or implied by the loop (`j + 8 ≤ d`)
//! right there. Prefetches are hints and never fault.

#![allow(unsafe_code)]

use half::f16;

/// A format's tile on this CPU: its AVX2 kernel (also for one activation row where VNNI
/// exists: memory-bound there, and the VEX encoding decoded ~8 % faster; both give the same
/// bits), its VNNI kernel, else `$scalar` per element.
macro_rules! dispatch_tile {
    ($isa:expr, $w:expr, $x:expr, $out:expr, $kernel:ident, $scalar:expr) => {{
        let (w, x, out): (_, &[&[XBlock]], &mut [[f32; 2]; 4]) = ($w, $x, $out);
        debug_assert!(w.len() <= 4 && x.len() <= 2);
        match $isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx2` is only constructed after run-time detection of its features.
            Isa::Avx2 => unsafe { avx2::$kernel(w, x, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Vnni`'s features are a superset of AVX2's.
            Isa::Vnni if x.len() == 1 => unsafe { avx2::$kernel(w, x, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Vnni` is only constructed after run-time detection of its features.
            Isa::Vnni => unsafe { vnni::$kernel(w, x, out) },
            _ => {
                for (c, wc) in w.iter().enumerate() {
                    for (r, xr) in x.iter().enumerate() {
                        out[c][r] = $scalar(wc, xr);
                    }
                }
            }
        }
    }};
}

/// Whether decode's hand-written 4 × 1 tile runs: an x86 instruction set with AVX2 and a full
/// tile of one activation row.
#[cfg(target_arch = "x86_64")]
fn decode_isa(isa: Isa, w: &[&[impl Sized]], x: &[&[XBlock]]) -> bool {
    matches!(isa, Isa::Avx2 | Isa::Vnni) && x.len() == 1 && w.len() == 4
}

/// Values per block.
pub(crate) const QK: usize = 32;

/// A weight block of 32 values: `value[i] = d · qs[i]`, `|qs[i]| ≤ 127`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct Q8Block {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK],
}

/// A 4-bit weight block of 32 values (ggml's `block_q4_1`): `value[i] = d · q[i] + m`, with
/// `q[i] = qs[i] & 15` and `q[i + 16] = qs[i] >> 4` for `i < 16`; `d` and `m` are f16 bits.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct Q4Block {
    pub(crate) d: u16,
    pub(crate) m: u16,
    pub(crate) qs: [u8; QK / 2],
}

/// A [`Q4Block`] unpacked: its nibbles one per byte, its scale and offset as f32 (exact
/// conversions). Its tiles give the Q4 block's bits exactly; batches of activation rows use it
/// so the unpacking is done once per weight tile instead of once per block pair.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct U4Block {
    pub(crate) d: f32,
    pub(crate) m: f32,
    pub(crate) q: [u8; QK],
}

impl Weight for U4Block {
    type Wide = U4Block;
    const WIDENS: bool = false;

    fn widen(&self) -> Self {
        *self
    }

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            for (q, v) in b.q.iter().zip(o) {
                *v = b.d * f32::from(*q) + b.m;
            }
        }
    }

    fn dot_tile(isa: Isa, w: &[&[Self]], x: &[&[XBlock]], out: &mut [[f32; 2]; 4]) {
        dispatch_tile!(isa, w, x, out, dot_tile_u4, scalar_dot_u4)
    }
}

/// A 6-bit weight block of 32 values (a 32-value slice of ggml's `block_q6_K`, exactly):
/// `value[i] = d · sc[i / 16] · (q[i] − 32)` with `q[i] = (ql nibble) | (high bits) << 4`: the
/// low nibbles packed as [`Q4Block`]'s, the two high bits of value `8j + k` at bits `2j..2j+2`
/// of `qh[k]`. `d` is f16 bits (the super-block's scale), `sc` the two sub-block scales.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct Q6Block {
    pub(crate) d: u16,
    pub(crate) sc: [i8; 2],
    pub(crate) ql: [u8; QK / 2],
    pub(crate) qh: [u8; QK / 4],
}

impl Q6Block {
    /// Packs 32 six-bit values (each < 64, in value order).
    pub(crate) fn pack(d: f16, sc: [i8; 2], q: &[u8; QK]) -> Self {
        let mut ql = [0u8; QK / 2];
        let mut qh = [0u8; QK / 4];
        for (i, v) in q.iter().enumerate() {
            ql[i % 16] |= (v & 15) << (4 * (i / 16));
            qh[i % 8] |= ((v >> 4) & 3) << (2 * (i / 8));
        }
        Q6Block {
            d: d.to_bits(),
            sc,
            ql,
            qh,
        }
    }

    /// The 32 six-bit values, unsigned (`q`, before the −32).
    pub(crate) fn values(&self) -> [u8; QK] {
        let mut q = [0u8; QK];
        for (i, v) in q.iter_mut().enumerate() {
            *v = ((self.ql[i % 16] >> (4 * (i / 16))) & 15)
                | (((self.qh[i % 8] >> (2 * (i / 8))) & 3) << 4);
        }
        q
    }
}

impl Weight for Q6Block {
    type Wide = Q6Block;
    const WIDENS: bool = false;

    fn widen(&self) -> Self {
        *self
    }

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let d = f16::from_bits(b.d).to_f32();
            for (i, (q, v)) in b.values().iter().zip(o).enumerate() {
                *v = d * f32::from(b.sc[i / 16]) * f32::from(i16::from(*q) - 32);
            }
        }
    }

    fn dot_tile(isa: Isa, w: &[&[Self]], x: &[&[XBlock]], out: &mut [[f32; 2]; 4]) {
        dispatch_tile!(isa, w, x, out, dot_tile_q6, scalar_dot_q6)
    }
}

/// A block of 32 quantized activations: `value[i] = d · qs[i]`, and `s = d · Σ qs`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub(crate) struct XBlock {
    pub(crate) d: f32,
    pub(crate) s: f32,
    pub(crate) qs: [i8; QK],
}

impl XBlock {
    pub(crate) const ZERO: XBlock = XBlock {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };
}

/// Rounds `x` to a signed byte scale as ggml's `quantize_row_q8_0` does; returns the scale.
fn quantize_block(xs: &[f32], qs: &mut [i8; QK]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, v) in qs.iter_mut().zip(xs) {
        // Round half away from zero without a libm call (`f32::round` is one on baseline
        // x86-64); the cast truncates and saturates.
        let scaled = v * id;
        *q = (scaled + 0.5f32.copysign(scaled)).clamp(-127.0, 127.0) as i8;
    }
    d
}

/// Quantizes activations `x` (a multiple of 32 long) into `out`.
pub(crate) fn quantize(x: &[f32], out: &mut [XBlock]) {
    for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        block.d = quantize_block(xs, &mut block.qs);
        let sum: i32 = block.qs.iter().map(|&q| i32::from(q)).sum();
        block.s = block.d * sum as f32;
    }
}

/// A weight format the kernels multiply with activation blocks.
pub(crate) trait Weight: Copy + Send + Sync + 'static {
    /// Bytes per block.
    const BYTES: usize = std::mem::size_of::<Self>();

    /// Dequantizes `blocks` into `out` (32 values per block).
    fn dequantize(blocks: &[Self], out: &mut [f32]);

    /// `out[c][r] = w[c] · x[r]` for up to 4 weight rows and up to 2 activation rows (each a
    /// slice of blocks of equal length). Unused slots are left alone.
    fn dot_tile(isa: Isa, w: &[&[Self]], x: &[&[XBlock]], out: &mut [[f32; 2]; 4]);

    /// The block unpacked for reuse across many activation rows: a format whose tiles give
    /// exactly the same bits as this one's, with less work per block pair (the nibbles already
    /// split into bytes, the scales already f32). `Self` where there is nothing to unpack.
    type Wide: Weight;

    /// Whether [`Weight::Wide`] differs from `Self` (worth unpacking a tile into).
    const WIDENS: bool;

    fn widen(&self) -> Self::Wide;

    /// `dst = src` widened, block for block.
    fn widen_all(isa: Isa, src: &[Self], dst: &mut Vec<Self::Wide>) {
        let _ = isa;
        dst.clear();
        dst.extend(src.iter().map(Self::widen));
    }
}

impl Q8Block {
    pub(crate) const ZERO: Q8Block = Q8Block {
        d: 0.0,
        qs: [0; QK],
    };

    /// Quantizes weights `x` (a multiple of 32 long) into `out`.
    pub(crate) fn quantize(x: &[f32], out: &mut [Q8Block]) {
        for (block, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
            block.d = quantize_block(xs, &mut block.qs);
        }
    }
}

impl Weight for Q8Block {
    type Wide = Q8Block;
    const WIDENS: bool = false;

    fn widen(&self) -> Self {
        *self
    }

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            for (q, v) in b.qs.iter().zip(o) {
                *v = b.d * f32::from(*q);
            }
        }
    }

    fn dot_tile(isa: Isa, w: &[&[Self]], x: &[&[XBlock]], out: &mut [[f32; 2]; 4]) {
        #[cfg(target_arch = "x86_64")]
        if decode_isa(isa, w, x) {
            // SAFETY: `decode_isa` holds only for instruction sets constructed after run-time
            // detection of AVX2, FMA and F16C.
            return unsafe { avx2::decode_q8([w[0], w[1], w[2], w[3]], x[0], out) };
        }
        dispatch_tile!(isa, w, x, out, dot_tile_q8, scalar_dot_q8)
    }
}

impl Q4Block {
    pub(crate) fn d(&self) -> f32 {
        f16::from_bits(self.d).to_f32()
    }

    pub(crate) fn m(&self) -> f32 {
        f16::from_bits(self.m).to_f32()
    }

    /// The block's 32 nibbles in value order.
    pub(crate) fn nibbles(&self) -> [u8; QK] {
        let mut q = [0u8; QK];
        for (i, b) in self.qs.iter().enumerate() {
            q[i] = b & 15;
            q[i + QK / 2] = b >> 4;
        }
        q
    }

    /// Packs 32 nibbles (each < 16) in value order with the scale and offset given as f16.
    pub(crate) fn pack(d: f16, m: f16, q: &[u8; QK]) -> Self {
        let mut qs = [0u8; QK / 2];
        for (i, b) in qs.iter_mut().enumerate() {
            *b = (q[i] & 15) | ((q[i + QK / 2] & 15) << 4);
        }
        Q4Block {
            d: d.to_bits(),
            m: m.to_bits(),
            qs,
        }
    }
}

impl Weight for Q4Block {
    type Wide = U4Block;
    const WIDENS: bool = true;

    fn widen(&self) -> U4Block {
        U4Block {
            d: self.d(),
            m: self.m(),
            q: self.nibbles(),
        }
    }

    fn widen_all(isa: Isa, src: &[Self], dst: &mut Vec<U4Block>) {
        dst.clear();
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: both are only constructed after run-time detection of AVX2 and F16C.
            Isa::Avx2 | Isa::Vnni => unsafe { avx2::widen_q4(src, dst) },
            _ => dst.extend(src.iter().map(Self::widen)),
        }
    }

    fn dequantize(blocks: &[Self], out: &mut [f32]) {
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK)) {
            let (d, m) = (b.d(), b.m());
            for (q, v) in b.nibbles().iter().zip(o) {
                *v = d * f32::from(*q) + m;
            }
        }
    }

    fn dot_tile(isa: Isa, w: &[&[Self]], x: &[&[XBlock]], out: &mut [[f32; 2]; 4]) {
        #[cfg(target_arch = "x86_64")]
        if decode_isa(isa, w, x) {
            // SAFETY: `decode_isa` holds only for instruction sets constructed after run-time
            // detection of AVX2, FMA and F16C.
            return unsafe { avx2::decode_q4([w[0], w[1], w[2], w[3]], x[0], out) };
        }
        dispatch_tile!(isa, w, x, out, dot_tile_q4, scalar_dot_q4)
    }
}

/// Dot product of two f32 slices with eight partial sums in a fixed order: the same bits on
/// every instruction set (the vectorized loop computes exactly what the scalar one does; Rust
/// never fuses or reorders float operations).
#[cfg(test)]
pub(crate) fn dot_f32(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both are only constructed after run-time detection of AVX2 and FMA.
        Isa::Avx2 | Isa::Vnni => unsafe { avx2::dot_f32(a, b) },
        _ => generic::dot_f32(a, b),
    }
}

/// `out[i] = (q · keys[i]) · scale` for each row of `keys` (`out.len()` rows of `q.len()`), each
/// dot as [`dot_f32`]'s.
pub(crate) fn scores(isa: Isa, q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_f32`.
        Isa::Avx2 | Isa::Vnni => unsafe { avx2::scores(q, keys, scale, out) },
        _ => generic::scores(q, keys, scale, out),
    }
}

/// `y += Σᵢ w[i] · rows[i]` (`w.len()` rows of `y.len()`), rows added in order.
pub(crate) fn weighted_sum(isa: Isa, w: &[f32], rows: &[f32], y: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_f32`.
        Isa::Avx2 | Isa::Vnni => unsafe { avx2::weighted_sum(w, rows, y) },
        _ => generic::weighted_sum(w, rows, y),
    }
}

/// `x ← exp(x − max)` for every element, returning the sum: softmax's numerator and
/// denominator. A polynomial exp (relative error ~2·10⁻⁷), vectorized, the same bits on
/// every instruction set.
pub(crate) fn exp_sum(isa: Isa, x: &mut [f32], max: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot_f32`.
        Isa::Avx2 | Isa::Vnni => unsafe { avx2::exp_sum(x, max) },
        _ => generic::exp_sum(x, max),
    }
}

/// Plain-Rust bodies of the f32 primitives, inlined into each instruction set's wrapper so the
/// compiler vectorizes them for it.
mod generic {
    #[inline(always)]
    pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        // An explicit fold from +0.0 (`Sum` for floats may start from −0.0): the hand-written
        // kernels add the same +0.0.
        let tail = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .fold(0f32, |t, (x, y)| t + x * y);
        for (x, y) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        reduce(&acc, tail)
    }

    /// Four keys at a time: four independent accumulator chains instead of one, each key's
    /// sum computed exactly as [`dot_f32`] computes it (the same lanes, chunks and reduction).
    #[inline(always)]
    pub(super) fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        let d = q.len();
        let full = d - d % 8;
        let mut groups = out.chunks_exact_mut(4);
        let mut rows = keys.chunks_exact(4 * d);
        for (o, k) in (&mut groups).zip(&mut rows) {
            let mut acc = [[0f32; 8]; 4];
            for j in (0..full).step_by(8) {
                for (a, kr) in acc.iter_mut().zip(k.chunks_exact(d)) {
                    for i in 0..8 {
                        a[i] += q[j + i] * kr[j + i];
                    }
                }
            }
            for ((o, a), kr) in o.iter_mut().zip(&acc).zip(k.chunks_exact(d)) {
                let tail = q[full..]
                    .iter()
                    .zip(&kr[full..])
                    .fold(0f32, |t, (x, y)| t + x * y);
                *o = reduce(a, tail) * scale;
            }
        }
        for (o, k) in groups
            .into_remainder()
            .iter_mut()
            .zip(rows.remainder().chunks_exact(d))
        {
            *o = dot_f32(q, k) * scale;
        }
    }

    #[inline(always)]
    fn reduce(acc: &[f32; 8], tail: f32) -> f32 {
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
    }

    #[inline(always)]
    pub(super) fn weighted_sum(w: &[f32], rows: &[f32], y: &mut [f32]) {
        for (w, x) in w.iter().zip(rows.chunks_exact(y.len())) {
            for (y, x) in y.iter_mut().zip(x) {
                *y += w * x;
            }
        }
    }

    /// exp(v) for v ≤ 0 (softmax scores minus their max): 2ⁿ · p(r) with n = round(v·log₂e)
    /// and a degree-6 polynomial on r = v − n·ln2 ∈ [−ln2/2, ln2/2].
    #[inline(always)]
    fn exp_neg(v: f32) -> f32 {
        // Below −87 the result is under f32's normal range: flush to 0.
        let v = v.max(-87.0);
        // Round to nearest by adding 1.5 · 2²³ (exact for |v·log₂e| < 2²²).
        const MAGIC: f32 = 12_582_912.0;
        let n = (v * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
        // ln 2 split Cephes' way: n · 0.693359375 is exact for the n here.
        let r = (v - n * 0.693_359_4) + n * 2.121_944_4e-4;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (0.166_666_67
                        + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
        // n ∈ [−126, 0]: 2ⁿ is a normal f32 built from its exponent bits.
        f32::from_bits(((n as i32 + 127) as u32) << 23) * p
    }

    #[inline(always)]
    pub(super) fn exp_sum(x: &mut [f32], max: f32) -> f32 {
        let mut acc = [0f32; 8];
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            for i in 0..8 {
                c[i] = exp_neg(c[i] - max);
                acc[i] += c[i];
            }
        }
        let mut tail = 0f32;
        for v in chunks.into_remainder() {
            *v = exp_neg(*v - max);
            tail += *v;
        }
        ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
    }
}

/// Which kernels this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX2, FMA, F16C and AVX-512 VNNI (256-bit `vpdpbusd`).
    Vnni,
    /// Portable Rust.
    Scalar,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            let forced = std::env::var_os("METAINF_KERNELS");
            if forced.as_ref().is_some_and(|v| v == "scalar") {
                return Isa::Scalar;
            }
            if std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && forced.is_none_or(|v| v != "avx2")
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
                && std::arch::is_x86_feature_detected!("f16c")
            {
                all.push(Isa::Avx2);
                if std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    all.push(Isa::Vnni);
                }
            }
        }
        all
    }
}

fn isum(w: &[i8; QK], x: &[i8; QK]) -> i32 {
    w.iter()
        .zip(x)
        .map(|(p, q)| i32::from(*p) * i32::from(*q))
        .sum()
}

fn scalar_dot_q8(w: &[Q8Block], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    for (a, b) in w.iter().zip(x) {
        acc += a.d * b.d * isum(&a.qs, &b.qs) as f32;
    }
    acc
}

fn scalar_dot_u4(w: &[U4Block], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    let mut off = 0f32;
    for (a, b) in w.iter().zip(x) {
        let s: i32 =
            a.q.iter()
                .zip(&b.qs)
                .map(|(p, v)| i32::from(*p) * i32::from(*v))
                .sum();
        acc += a.d * b.d * s as f32;
    }
    for (a, b) in w.iter().zip(x) {
        off += a.m * b.s;
    }
    acc + off
}

fn scalar_dot_q6(w: &[Q6Block], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    for (a, b) in w.iter().zip(x) {
        let d = f16::from_bits(a.d).to_f32();
        let q = a.values();
        for h in 0..2 {
            let s: i32 = q[16 * h..16 * (h + 1)]
                .iter()
                .zip(&b.qs[16 * h..16 * (h + 1)])
                .map(|(p, v)| (i32::from(*p) - 32) * i32::from(*v))
                .sum();
            acc += d * f32::from(a.sc[h]) * b.d * s as f32;
        }
    }
    acc
}

/// The `m` part of a Q4 row's dot product, `Σ m·s` in block order: the same sum in every
/// kernel.
fn offsets(w: &[Q4Block], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    for (a, b) in w.iter().zip(x) {
        acc += a.m() * b.s;
    }
    acc
}

fn scalar_dot_q4(w: &[Q4Block], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    for (a, b) in w.iter().zip(x) {
        let q = a.nibbles();
        let s: i32 = q
            .iter()
            .zip(&b.qs)
            .map(|(p, v)| i32::from(*p) * i32::from(*v))
            .sum();
        acc += a.d() * b.d * s as f32;
    }
    acc + offsets(w, x)
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

        /// Prefetches what lies `bytes` after `p` (decode reads each weight once, so the next
        /// rows are fetched while these are computed).
        #[inline]
        #[target_feature(enable = $features)]
        fn prefetch_ahead<T>(p: &T, bytes: usize) {
            let p = (p as *const T).cast::<i8>().wrapping_add(bytes);
            // A prefetch is a hint: it never faults, even past the end of the weights.
            _mm_prefetch::<_MM_HINT_T0>(p)
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn load(qs: &[i8; QK]) -> __m256i {
            // SAFETY: `qs` is 32 bytes; the load is unaligned.
            unsafe { _mm256_loadu_si256(qs.as_ptr().cast::<__m256i>()) }
        }

        /// A Q8 weight block as (|w|, w).
        #[inline]
        #[target_feature(enable = $features)]
        fn prep_q8(b: &Q8Block) -> (__m256i, __m256i) {
            let w = load(&b.qs);
            (_mm256_sign_epi8(w, w), w)
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn sums_q8(w: (__m256i, __m256i), x: __m256i) -> __m256 {
            // |w| × (x · sign(w)): the unsigned × signed products maddubs wants. |qs| ≤ 127,
            // so nothing wraps and no pair sum saturates (2 · 127 · 127 < 32767).
            block_sums(w.0, _mm256_sign_epi8(x, w.1))
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn scale_q8(b: &Q8Block) -> __m256 {
            _mm256_set1_ps(b.d)
        }

        /// A Q4 weight block's 32 nibbles as bytes in value order.
        #[inline]
        #[target_feature(enable = $features)]
        fn prep_q4(b: &Q4Block) -> __m256i {
            // SAFETY: `qs` is 16 bytes; the load is unaligned.
            let raw = unsafe { _mm_loadu_si128(b.qs.as_ptr().cast::<__m128i>()) };
            let hi = _mm_srli_epi16(raw, 4);
            _mm256_and_si256(_mm256_set_m128i(hi, raw), _mm256_set1_epi8(0x0F))
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn sums_q4(q: __m256i, x: __m256i) -> __m256 {
            // Nibbles are unsigned already: 2 · 15 · 127 < 32767, nothing saturates.
            block_sums(q, x)
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn scale_q4(b: &Q4Block) -> __m256 {
            _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                b.d,
            )))))
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn prep_u4(b: &U4Block) -> __m256i {
            // SAFETY: `q` is 32 bytes; the load is unaligned.
            unsafe { _mm256_loadu_si256(b.q.as_ptr().cast::<__m256i>()) }
        }

        #[inline]
        #[target_feature(enable = $features)]
        fn scale_u4(b: &U4Block) -> __m256 {
            _mm256_set1_ps(b.d)
        }

        /// A Q6 weight block as signed bytes `q − 32` in value order: the low nibbles as Q4's,
        /// the two high bits of value `8j + k` at bits `2j` of `qh[k]`.
        #[inline]
        #[target_feature(enable = $features)]
        fn prep_q6(b: &Q6Block) -> (__m256i, __m256i) {
            // SAFETY: `ql` is 16 bytes; the load is unaligned.
            let raw = unsafe { _mm_loadu_si128(b.ql.as_ptr().cast::<__m128i>()) };
            let lo = _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw),
                _mm256_set1_epi8(0x0F),
            );
            let qh = _mm256_set1_epi64x(i64::from_le_bytes(b.qh));
            let hi = _mm256_srlv_epi64(qh, _mm256_set_epi64x(6, 4, 2, 0));
            let hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
            let q = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
            (_mm256_sign_epi8(q, q), q)
        }

        /// Lanes 0–3 hold the first 16 values' sums, lanes 4–7 the last 16's.
        #[inline]
        #[target_feature(enable = $features)]
        fn scale_q6(b: &Q6Block) -> __m256 {
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(b.d))));
            let sc = _mm256_set_m128(
                _mm_set1_ps(f32::from(b.sc[1])),
                _mm_set1_ps(f32::from(b.sc[0])),
            );
            _mm256_mul_ps(_mm256_set1_ps(d), sc)
        }

        /// The Q4 offsets `Σ_b m[c][b] · s[r][b]` of a tile, four weight rows to a vector:
        /// lane `c` adds its products in block order, a multiply then an add each, exactly as
        /// [`super::offsets`] and the decode kernel do.
        macro_rules! tile_offsets {
            ($fn_name:ident, $ty:ty, $m:expr) => {
                #[inline]
                #[target_feature(enable = $features)]
                fn $fn_name(w: &[&[$ty]], x: &[&[XBlock]]) -> [[f32; 2]; 4] {
                    let blocks = w.first().map_or(0, |r| r.len());
                    let m = |c: usize, b: usize| w.get(c).map_or(0.0, |r| $m(&r[b]));
                    let mut acc = [_mm_setzero_ps(); 2];
                    for b in 0..blocks {
                        let mv = _mm_set_ps(m(3, b), m(2, b), m(1, b), m(0, b));
                        for (a, xr) in acc.iter_mut().zip(x) {
                            *a = _mm_add_ps(*a, _mm_mul_ps(mv, _mm_set1_ps(xr[b].s)));
                        }
                    }
                    let mut out = [[0f32; 2]; 4];
                    for (r, a) in acc.iter().enumerate() {
                        let mut lanes = [0f32; 4];
                        // SAFETY: `lanes` is 16 bytes; the store is unaligned.
                        unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), *a) };
                        for (c, v) in lanes.iter().enumerate() {
                            out[c][r] = *v;
                        }
                    }
                    out
                }
            };
        }

        tile_offsets!(offsets_q4, Q4Block, |b: &Q4Block| _mm_cvtss_f32(
            _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(b.m)))
        ));
        tile_offsets!(offsets_u4, U4Block, |b: &U4Block| b.m);

        #[inline]
        #[target_feature(enable = $features)]
        fn no_offsets<T>(_: &[&[T]], _: &[&[XBlock]]) -> [[f32; 2]; 4] {
            [[0.0; 2]; 4]
        }

        /// Decode's Q4 tile, 4 weight rows × 1 activation row, by hand over raw pointers (the
        /// slice-based loop kept a bounds check and a stack copy per block): the four rows'
        /// scales and offsets are converted together (`[d0, m0, d1, m1, …]` in one
        /// `vcvtph2ps`), scaled by `[dx, s, dx, s, …]` in one multiply, and the offsets summed
        /// in the odd lanes of one accumulator. Each element's operations are those of
        /// [`dot_tile_q4`]'s: a multiply `d · dx`, an FMA per block, and `m · s` added per block
        /// in a lane of its own, so the bits are the same.
        // The VNNI instance goes unused: decode runs the AVX2 one on every x86 path.
        #[allow(dead_code)]
        #[target_feature(enable = $features)]
        pub(super) fn decode_q4(w: [&[Q4Block]; 4], x: &[XBlock], out: &mut [[f32; 2]; 4]) {
            let blocks = x.len();
            assert!(
                w.iter().all(|r| r.len() >= blocks),
                "weight rows shorter than x"
            );
            let rows = w.map(<[Q4Block]>::as_ptr);
            let xs = x.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut offs = _mm256_setzero_ps();
            let ahead = 8 * blocks * std::mem::size_of::<Q4Block>();
            let lanes = [0, 1, 2, 3].map(|c| _mm256_set1_epi32(2 * c));
            let mask = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            for b in 0..blocks {
                // SAFETY: b < blocks ≤ every row's length and x's length (asserted above), so
                // every pointer below is to a block in bounds; loads are unaligned.
                unsafe {
                    let xb = &*xs.add(b);
                    let lx = _mm256_loadu_si256(xb.qs.as_ptr().cast::<__m256i>());
                    let wb = rows.map(|r| r.add(b));
                    for p in wb {
                        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(ahead));
                    }
                    let dm = |p: *const Q4Block| p.cast::<i32>().read_unaligned();
                    let scales =
                        _mm256_cvtph_ps(_mm_set_epi32(dm(wb[3]), dm(wb[2]), dm(wb[1]), dm(wb[0])));
                    let v = _mm256_mul_ps(
                        scales,
                        _mm256_blend_ps::<0b1010_1010>(_mm256_set1_ps(xb.d), _mm256_set1_ps(xb.s)),
                    );
                    offs = _mm256_add_ps(offs, v);
                    for c in 0..4 {
                        let raw = _mm_loadu_si128((*wb[c]).qs.as_ptr().cast::<__m128i>());
                        let q =
                            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
                        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(
                            _mm256_maddubs_epi16(q, lx),
                            ones,
                        ));
                        acc[c] =
                            _mm256_fmadd_ps(_mm256_permutevar8x32_ps(v, lanes[c]), sums, acc[c]);
                    }
                }
            }
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` is 32 bytes; the store is unaligned.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), offs) };
            for (c, a) in acc.into_iter().enumerate() {
                out[c][0] = hsum(a) + lanes[2 * c + 1];
            }
        }

        /// Decode's Q8 tile (the output head of most files), 4 weight rows × 1 activation row,
        /// by hand over raw pointers; the same operations per element as [`dot_tile_q8`].
        #[allow(dead_code)]
        #[target_feature(enable = $features)]
        pub(super) fn decode_q8(w: [&[Q8Block]; 4], x: &[XBlock], out: &mut [[f32; 2]; 4]) {
            let blocks = x.len();
            assert!(
                w.iter().all(|r| r.len() >= blocks),
                "weight rows shorter than x"
            );
            let rows = w.map(<[Q8Block]>::as_ptr);
            let xs = x.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 4];
            let ahead = 8 * blocks * std::mem::size_of::<Q8Block>();
            for b in 0..blocks {
                // SAFETY: as in `decode_q4`.
                unsafe {
                    let xb = &*xs.add(b);
                    let lx = _mm256_loadu_si256(xb.qs.as_ptr().cast::<__m256i>());
                    let dx = _mm256_set1_ps(xb.d);
                    for c in 0..4 {
                        let p = rows[c].add(b);
                        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(ahead));
                        let lw = _mm256_loadu_si256((*p).qs.as_ptr().cast::<__m256i>());
                        let sums = sums_q8((_mm256_sign_epi8(lw, lw), lw), lx);
                        acc[c] = _mm256_fmadd_ps(
                            _mm256_mul_ps(_mm256_set1_ps((*p).d), dx),
                            sums,
                            acc[c],
                        );
                    }
                }
            }
            for (c, a) in acc.into_iter().enumerate() {
                out[c][0] = hsum(a);
            }
        }

        /// Generates one tile kernel for a weight format. Every element runs the same
        /// instruction sequence whatever the tile's shape: one accumulator, blocks in order,
        /// the same horizontal sum, then the format's scalar `tail` (the Q4 offsets).
        macro_rules! tile_kernel {
            ($name:ident, $ty:ty, $prep:ident, $sums:ident, $scale:ident, $tail:ident) => {
                #[target_feature(enable = $features)]
                pub(super) fn $name(w: &[&[$ty]], x: &[&[XBlock]], out: &mut [[f32; 2]; 4]) {
                    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                    let blocks = w.first().map_or(0, |r| r.len());
                    match (w.len(), x.len()) {
                        (4, 2) => {
                            // Eight named accumulators stay in registers (an indexed array
                            // spilled).
                            let (mut a00, mut a01, mut a10, mut a11) =
                                (acc[0][0], acc[0][1], acc[1][0], acc[1][1]);
                            let (mut a20, mut a21, mut a30, mut a31) =
                                (acc[2][0], acc[2][1], acc[3][0], acc[3][1]);
                            let (w0, w1, w2, w3) = (w[0], w[1], w[2], w[3]);
                            let (x0s, x1s) = (x[0], x[1]);
                            for b in 0..blocks {
                                let (x0, x1) = (&x0s[b], &x1s[b]);
                                let (lx0, lx1) = (load(&x0.qs), load(&x1.qs));
                                let (dx0, dx1) = (_mm256_set1_ps(x0.d), _mm256_set1_ps(x1.d));
                                let step = |wb: &$ty, s0: &mut __m256, s1: &mut __m256| {
                                    let p = $prep(wb);
                                    let d = $scale(wb);
                                    *s0 =
                                        _mm256_fmadd_ps(_mm256_mul_ps(d, dx0), $sums(p, lx0), *s0);
                                    *s1 =
                                        _mm256_fmadd_ps(_mm256_mul_ps(d, dx1), $sums(p, lx1), *s1);
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
                            let row_bytes = blocks * std::mem::size_of::<$ty>();
                            for b in 0..blocks {
                                // Rows are contiguous: the tile after next starts 8 rows on.
                                for wr in [w0, w1, w2, w3] {
                                    prefetch_ahead(&wr[b], 8 * row_bytes);
                                }
                                let x0 = &x0s[b];
                                let lx0 = load(&x0.qs);
                                let dx0 = _mm256_set1_ps(x0.d);
                                let step = |wb: &$ty, s: __m256| {
                                    _mm256_fmadd_ps(
                                        _mm256_mul_ps($scale(wb), dx0),
                                        $sums($prep(wb), lx0),
                                        s,
                                    )
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
                                        acc[c][r] = _mm256_fmadd_ps(
                                            _mm256_mul_ps($scale(wb), _mm256_set1_ps(xb.d)),
                                            $sums($prep(wb), load(&xb.qs)),
                                            acc[c][r],
                                        );
                                    }
                                }
                            }
                        }
                    }
                    let tail = $tail(w, x);
                    for c in 0..w.len() {
                        for r in 0..x.len() {
                            out[c][r] = hsum(acc[c][r]) + tail[c][r];
                        }
                    }
                }
            };
        }

        tile_kernel!(dot_tile_q8, Q8Block, prep_q8, sums_q8, scale_q8, no_offsets);
        tile_kernel!(dot_tile_q4, Q4Block, prep_q4, sums_q4, scale_q4, offsets_q4);
        tile_kernel!(dot_tile_q6, Q6Block, prep_q6, sums_q8, scale_q6, no_offsets);
        tile_kernel!(dot_tile_u4, U4Block, prep_u4, sums_q4, scale_u4, offsets_u4);
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Q4Block, Q6Block, Q8Block, QK, U4Block, XBlock};

    /// Eight lanes of partial sums of one block: Σ u·x over groups of four bytes, as f32, for
    /// unsigned `u` and signed `x` whose pair sums do not saturate 16 bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_sums(u: __m256i, x: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(u, x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    x86_kernels!("avx2,fma,f16c");

    /// [`Q4Block::widen`] for every block of `src`, appended to `dst`: the same values (the
    /// f16 conversions are exact either way).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn widen_q4(src: &[Q4Block], dst: &mut Vec<U4Block>) {
        dst.reserve(src.len());
        let mask = _mm256_set1_epi8(0x0F);
        for b in src {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(b.d) | (i32::from(b.m) << 16)));
            let mut q = [0u8; QK];
            // SAFETY: `qs` is 16 bytes and `q` 32; both accesses are unaligned.
            unsafe {
                let raw = _mm_loadu_si128(b.qs.as_ptr().cast::<__m128i>());
                let v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
                _mm256_storeu_si256(q.as_mut_ptr().cast::<__m256i>(), v);
            }
            dst.push(U4Block {
                d: _mm_cvtss_f32(dm),
                m: _mm_cvtss_f32(_mm_movehdup_ps(dm)),
                q,
            });
        }
    }

    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        super::generic::dot_f32(a, b)
    }

    /// [`super::generic::scores`] by hand (the vectorizer split its four 8-lane chains into
    /// 128-bit shuffles): lane `i` of a key's accumulator adds `q[j + i] · k[j + i]` over the
    /// chunks in order, a multiply then an add, and the reduction pairs lanes as
    /// `reduce` does, so the bits are the same.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        let d = q.len();
        if !d.is_multiple_of(8) {
            return super::generic::scores(q, keys, scale, out);
        }
        let reduce = |a: __m256| {
            let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            let h = _mm_hadd_ps(s, s);
            // (s0 + s1) + (s2 + s3), then + the (empty) tail.
            _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))) + 0.0
        };
        let mut groups = out.chunks_exact_mut(4);
        let mut rows = keys.chunks_exact(4 * d);
        for (o, k) in (&mut groups).zip(&mut rows) {
            let mut acc = [_mm256_setzero_ps(); 4];
            for j in (0..d).step_by(8) {
                // SAFETY: j + 8 ≤ d = q.len(), and key r's chunk ends at r·d + j + 8 ≤ 4·d =
                // k.len(); the loads are unaligned.
                unsafe {
                    let qv = _mm256_loadu_ps(q.as_ptr().add(j));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let kv = _mm256_loadu_ps(k.as_ptr().add(r * d + j));
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, kv));
                    }
                }
            }
            for (o, a) in o.iter_mut().zip(acc) {
                *o = reduce(a) * scale;
            }
        }
        for (o, k) in groups
            .into_remainder()
            .iter_mut()
            .zip(rows.remainder().chunks_exact(d))
        {
            *o = super::generic::dot_f32(q, k) * scale;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn weighted_sum(w: &[f32], rows: &[f32], y: &mut [f32]) {
        super::generic::weighted_sum(w, rows, y)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_sum(x: &mut [f32], max: f32) -> f32 {
        super::generic::exp_sum(x, max)
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Q4Block, Q6Block, Q8Block, QK, U4Block, XBlock};

    /// As the AVX2 version in one instruction: `vpdpbusd` sums the same four byte products
    /// per lane exactly, so both paths give the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    fn block_sums(u: __m256i, x: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x))
    }

    x86_kernels!("avx2,fma,f16c,avx512vnni,avx512vl");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(k: usize, seed: usize) -> Vec<f32> {
        (0..k)
            .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) / 137.0)
            .collect()
    }

    fn xblocks(values: &[f32]) -> Vec<XBlock> {
        let mut b = vec![XBlock::ZERO; values.len() / QK];
        quantize(values, &mut b);
        b
    }

    fn q8(values: &[f32]) -> Vec<Q8Block> {
        let mut b = vec![Q8Block::ZERO; values.len() / QK];
        Q8Block::quantize(values, &mut b);
        b
    }

    fn q4(values: &[f32]) -> Vec<Q4Block> {
        values
            .chunks_exact(QK)
            .map(|xs| {
                let (lo, hi) = xs
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
                let d = (hi - lo) / 15.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut q = [0u8; QK];
                for (q, v) in q.iter_mut().zip(xs) {
                    *q = (((v - lo) * id) + 0.5).clamp(0.0, 15.0) as u8;
                }
                Q4Block::pack(f16::from_f32(d), f16::from_f32(lo), &q)
            })
            .collect()
    }

    fn q6(values: &[f32]) -> Vec<Q6Block> {
        values
            .chunks_exact(QK)
            .map(|xs| {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / (31.0 * 100.0));
                let sc = [100i8, 97];
                let mut q = [0u8; QK];
                for (i, (q, v)) in q.iter_mut().zip(xs).enumerate() {
                    let step = d.to_f32() * f32::from(sc[i / 16]);
                    *q = ((v / step).round() + 32.0).clamp(0.0, 63.0) as u8;
                }
                Q6Block::pack(d, sc, &q)
            })
            .collect()
    }

    /// Every tile shape gives the same bits on each SIMD path, the SIMD paths agree with each
    /// other, and all of them agree with the dequantized f32 dot product.
    fn check_format<W: Weight + std::fmt::Debug>(w: &[Vec<W>], x: &[Vec<XBlock>]) {
        let wr: Vec<&[W]> = w.iter().map(Vec::as_slice).collect();
        let xr: Vec<&[XBlock]> = x.iter().map(Vec::as_slice).collect();
        let k = w[0].len() * QK;
        let mut simd_bits: Option<[[u32; 2]; 4]> = None;
        for isa in Isa::available() {
            let mut full = [[0f32; 2]; 4];
            W::dot_tile(isa, &wr, &xr, &mut full);
            if isa != Isa::Scalar {
                // AVX2 and VNNI sum the same integers per lane: the same bits.
                let bits = full.map(|row| row.map(f32::to_bits));
                assert_eq!(*simd_bits.get_or_insert(bits), bits, "{isa:?}");
            }
            for c in 0..4 {
                for r in 0..2 {
                    let mut one = [[0f32; 2]; 4];
                    W::dot_tile(isa, &wr[c..=c], &xr[r..=r], &mut one);
                    assert_eq!(
                        one[0][0].to_bits(),
                        full[c][r].to_bits(),
                        "{isa:?} 1x1 vs 4x2"
                    );
                    let mut col = [[0f32; 2]; 4];
                    W::dot_tile(isa, &wr, &xr[r..=r], &mut col);
                    assert_eq!(
                        col[c][0].to_bits(),
                        full[c][r].to_bits(),
                        "{isa:?} 4x1 vs 4x2"
                    );
                    let mut wf = vec![0f32; k];
                    W::dequantize(&w[c], &mut wf);
                    let exact: f32 = x[r]
                        .iter()
                        .zip(wf.chunks_exact(QK))
                        .map(|(xb, ws)| {
                            xb.qs
                                .iter()
                                .zip(ws)
                                .map(|(q, v)| xb.d * f32::from(*q) * v)
                                .sum::<f32>()
                        })
                        .sum();
                    assert!(
                        (full[c][r] - exact).abs() <= 1e-3 * exact.abs().max(1.0),
                        "{isa:?} {} vs {exact}",
                        full[c][r]
                    );
                }
            }
        }
    }

    #[test]
    fn every_tile_shape_gives_the_same_bits_and_matches_the_dequantized_dot() {
        let k = 18 * QK;
        let x: Vec<Vec<XBlock>> = (10..12).map(|s| xblocks(&row(k, s))).collect();
        check_format(&(0..4).map(|s| q8(&row(k, s))).collect::<Vec<_>>(), &x);
        let w4: Vec<Vec<Q4Block>> = (0..4).map(|s| q4(&row(k, s))).collect();
        check_format(&w4, &x);
        // Unpacked Q4 tiles give the packed ones' bits; every path unpacks alike.
        for isa in Isa::available() {
            let mut v = Vec::new();
            Q4Block::widen_all(isa, &w4[1], &mut v);
            assert_eq!(
                v,
                w4[1].iter().map(Weight::widen).collect::<Vec<_>>(),
                "{isa:?}"
            );
        }
        let wide: Vec<Vec<U4Block>> = w4
            .iter()
            .map(|r| r.iter().map(Weight::widen).collect())
            .collect();
        check_format(&wide, &x);
        let xr: Vec<&[XBlock]> = x.iter().map(Vec::as_slice).collect();
        for isa in Isa::available() {
            let (mut a, mut b) = ([[0f32; 2]; 4], [[0f32; 2]; 4]);
            Q4Block::dot_tile(
                isa,
                &w4.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                &xr,
                &mut a,
            );
            U4Block::dot_tile(
                isa,
                &wide.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                &xr,
                &mut b,
            );
            assert_eq!(
                a.map(|r| r.map(f32::to_bits)),
                b.map(|r| r.map(f32::to_bits)),
                "{isa:?}"
            );
        }
        check_format(&(0..4).map(|s| q6(&row(k, s))).collect::<Vec<_>>(), &x);
    }

    #[test]
    fn f32_primitives_agree_bitwise_across_instruction_sets_and_exp_is_accurate() {
        let a: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let logits: Vec<f32> = (0..77).map(|i| -(i as f32) * 0.9 + 3.0).collect();
        let mut seen: Option<(u32, Vec<u32>, u32, Vec<u32>)> = None;
        for isa in Isa::available() {
            let d = dot_f32(isa, &a, &b);
            let mut y = b[..7].to_vec();
            weighted_sum(isa, &[0.3, -0.2], &a[..14], &mut y);
            let mut sc = [0f32; 11];
            scores(isa, &a[..7], &b[..77], 0.5, &mut sc);
            for (i, v) in sc.iter().enumerate() {
                let want = dot_f32(isa, &a[..7], &b[7 * i..7 * (i + 1)]) * 0.5;
                assert_eq!(v.to_bits(), want.to_bits(), "key {i}");
            }
            let mut sc16 = [0f32; 4];
            scores(isa, &a[..16], &b[..64], 1.0, &mut sc16);
            for (i, v) in sc16.iter().enumerate() {
                let want = dot_f32(isa, &a[..16], &b[16 * i..16 * (i + 1)]);
                assert_eq!(v.to_bits(), want.to_bits(), "key {i} of 16");
            }
            let want = b[3] + 0.3 * a[3] + -0.2 * a[10];
            assert!((y[3] - want).abs() < 1e-6);
            let mut e = logits.clone();
            let sum = exp_sum(isa, &mut e, 3.0);
            let bits = (
                d.to_bits(),
                y.iter().map(|v| v.to_bits()).collect(),
                sum.to_bits(),
                e.iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(seen.get_or_insert_with(|| bits.clone()), &bits, "{isa:?}");
            let exact: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((d - exact).abs() < 1e-4);
            for (v, s) in e.iter().zip(&logits) {
                let want = (s - 3.0).exp();
                assert!(
                    (v - want).abs() <= 1e-6 * want.max(1e-30) || want < 1e-37,
                    "{v} vs {want}"
                );
            }
            assert!((sum - e.iter().sum::<f32>()).abs() < 1e-5);
        }
    }

    #[test]
    fn quantization_round_trips_within_a_step() {
        let v = row(4 * QK, 3);
        let mut back = vec![0f32; v.len()];
        Q8Block::dequantize(&q8(&v), &mut back);
        let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            v.iter()
                .zip(&back)
                .all(|(a, b)| (a - b).abs() <= amax / 127.0)
        );
        Q4Block::dequantize(&q4(&v), &mut back);
        let (lo, hi) = v
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
        assert!(
            v.iter()
                .zip(&back)
                .all(|(a, b)| (a - b).abs() <= (hi - lo) / 15.0)
        );
        // The activations' sums are the sums of what they hold.
        let xb = xblocks(&v);
        for b in &xb {
            let s: f32 = b.qs.iter().map(|q| b.d * f32::from(*q)).sum();
            assert!((b.s - s).abs() <= 1e-4 * s.abs().max(1.0));
        }
    }
}
