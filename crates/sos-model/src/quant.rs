//! Quantized matrix-vector kernels for GGUF Q4_1, Q5_0 and Q8_0 weights, where candle has no
//! SIMD path (its Q4_1 and Q5_0 dot products are scalar).
//!
//! The arithmetic follows ggml's CPU path, so `--exec quant` agrees with llama.cpp: activations
//! are quantized per 32-block to Q8_1 (for Q4_1 weights) or Q8_0 (Q5_0, Q8_0 weights) with
//! round-half-even, integer dot products per block, one f32 scale per block pair.
//! Output rows are split across the rayon pool.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use crate::gguf::TensorType;
use crate::vecmath::{prefetch, PREFETCH_AHEAD};
use crate::{Error, Result};

const QK: usize = 32;

/// A weight matrix `[rows, cols]` in its ggml blocks, row-major, as stored in the file: decoding
/// is bound by memory bandwidth, so the blocks stay as compact as llama.cpp keeps them and the
/// kernels convert the f16 scales inline.
#[derive(Debug, Clone)]
pub struct QWeight {
    pub ty: TensorType,
    pub rows: usize,
    pub cols: usize,
    data: std::sync::Arc<Vec<u8>>,
}

/// Activations quantized to 8 bits per 32-block: scale `d`, `s = d * sum(q)` (Q8_1 only), values.
pub(crate) struct Q8Row {
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
}

impl QWeight {
    /// Types with a kernel here; other types use candle's `QMatMul`.
    pub fn supports(ty: TensorType) -> bool {
        matches!(ty, TensorType::Q4_1 | TensorType::Q5_0 | TensorType::Q8_0)
    }

    /// From raw ggml blocks (`data`, row-major). Block layouts: Q4_1 `{d, m: f16, qs[16]}`,
    /// Q5_0 `{d: f16, qh: u32, qs[16]}`, Q8_0 `{d: f16, qs: [i8; 32]}`.
    pub fn new(ty: TensorType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let (bs, bb) = ty.block();
        if !Self::supports(ty) || rows == 0 || cols == 0 || cols % bs as usize != 0 || data.len() != rows * cols / bs as usize * bb as usize {
            return Err(Error::Invalid(format!("bad {} weight: {rows}x{cols} with {} bytes", ty.name(), data.len())));
        }
        Ok(QWeight { ty, rows, cols, data: std::sync::Arc::new(data.to_vec()) })
    }

    fn row_bytes(&self) -> usize {
        self.cols / QK * self.ty.block().1 as usize
    }

    /// Weight row `r`'s blocks.
    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// `x` quantized the way this weight's kernels read it (Q8_1 for Q4_1, Q8_0 otherwise).
    pub(crate) fn quantize(&self, x: &[f32]) -> Q8Row {
        assert_eq!(x.len(), self.cols, "activation length");
        quantize_q8(x, self.ty == TensorType::Q4_1)
    }

    /// Prefetches the `ROWS` rows' worth of bytes that start `PREFETCH_AHEAD` beyond row `r`.
    #[inline]
    fn prefetch_rows(&self, r: usize) {
        let rb = self.row_bytes();
        let at = (r * rb + PREFETCH_AHEAD).min(self.data.len());
        prefetch(&self.data[at..(at + ROWS * rb).min(self.data.len())]);
    }

    /// Rows `rows` of `W x` into `out`, for `qx` from `quantize`: rows in groups of `ROWS`
    /// (independent accumulator chains), the rest one by one.
    pub(crate) fn rows_into(&self, qx: &Q8Row, rows: Range<usize>, out: &mut [f32]) {
        assert!(rows.end <= self.rows && out.len() == rows.len(), "rows_into: bad range");
        let isa = Isa::detect();
        let mut groups = out.chunks_exact_mut(ROWS);
        for (g, dst) in (&mut groups).enumerate() {
            let r = rows.start + g * ROWS;
            self.prefetch_rows(r);
            dst.copy_from_slice(&dotn::<ROWS>(isa, self.ty, std::array::from_fn(|i| self.row(r + i)), qx));
        }
        let rest = groups.into_remainder();
        let r = rows.end - rest.len();
        for (i, dst) in rest.iter_mut().enumerate() {
            *dst = dot(isa, self.ty, self.row(r + i), qx);
        }
    }

    /// `W_i x` for several weights of one type that read the same vector (q/k/v, gate/up): the
    /// vector is quantized once and all rows go to the pool as one job.
    pub fn matvec_many(ws: &[&QWeight], x: &[f32]) -> Vec<Vec<f32>> {
        let Some(first) = ws.first() else { return Vec::new() };
        assert!(ws.iter().all(|w| w.ty == first.ty && w.cols == x.len()), "matvec_many: mixed types or shapes");
        let qx = first.quantize(x);
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.rows]).collect();
        const ROWS_PER_TASK: usize = 16;
        let tasks: Vec<(&QWeight, usize, &mut [f32])> = ws
            .iter()
            .zip(outs.iter_mut())
            .flat_map(|(w, out)| out.chunks_mut(ROWS_PER_TASK).enumerate().map(move |(i, c)| (*w, i * ROWS_PER_TASK, c)))
            .collect();
        tasks.into_par_iter().for_each(|(w, r0, out)| w.rows_into(&qx, r0..r0 + out.len(), out));
        outs
    }

    /// `x: [m, cols]` (row-major) -> `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        let qx: Vec<Q8Row> = x.par_chunks(self.cols).map(|r| self.quantize(r)).collect();
        let isa = Isa::detect();
        // Transposed result [rows, m]: each task owns whole weight rows and reads each once.
        let mut out_t = vec![0f32; self.rows * m];
        let rows_per_task = 16;
        out_t.par_chunks_mut(rows_per_task * m).enumerate().for_each(|(task, chunk)| {
            let (r0, rows) = (task * rows_per_task, chunk.len() / m);
            // Rows in groups of `ROWS` (independent accumulator chains), the rest one by one;
            // activations two at a time, so that each weight block is unpacked once for both.
            let grouped = rows - rows % ROWS;
            for i in (0..grouped).step_by(ROWS) {
                self.prefetch_rows(r0 + i);
                let w = std::array::from_fn(|g| self.row(r0 + i + g));
                let mut pairs = qx.chunks_exact(2);
                for (jp, q) in (&mut pairs).enumerate() {
                    for (a, v) in dotn2(isa, self.ty, w, [&q[0], &q[1]]).into_iter().enumerate() {
                        for (g, v) in v.into_iter().enumerate() {
                            chunk[(i + g) * m + 2 * jp + a] = v;
                        }
                    }
                }
                if let [q] = pairs.remainder() {
                    for (g, v) in dotn(isa, self.ty, w, q).into_iter().enumerate() {
                        chunk[(i + g) * m + m - 1] = v;
                    }
                }
            }
            for i in grouped..rows {
                for (j, q) in qx.iter().enumerate() {
                    chunk[i * m + j] = dot(isa, self.ty, self.row(r0 + i), q);
                }
            }
        });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * self.rows];
        out.par_chunks_mut(self.rows).enumerate().for_each(|(j, row)| {
            for (r, o) in row.iter_mut().enumerate() {
                *o = out_t[r * m + j];
            }
        });
        out
    }
}

/// ggml's `quantize_row_q8_1` / `quantize_row_q8_0` (AVX2 flavour: `q = round_half_even(x * 127 / amax)`).
fn quantize_q8(x: &[f32], with_sum: bool) -> Q8Row {
    let nb = x.len() / QK;
    let mut d = Vec::with_capacity(nb);
    let mut s = Vec::with_capacity(if with_sum { nb } else { 0 });
    let mut q = vec![0i8; x.len()];
    for (b, blk) in x.chunks_exact(QK).enumerate() {
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (k, &v) in blk.iter().enumerate() {
            let qi = round_half_even(v * id) as i32;
            q[b * QK + k] = qi as i8;
            sum += qi;
        }
        // Stored as f16 in ggml's blocks; round-trip to get the same value back.
        d.push(f16::from_f32(scale).to_f32());
        if with_sum {
            s.push(f16::from_f32(scale * sum as f32).to_f32());
        }
    }
    Q8Row { d, s, q }
}

/// Round half to even for |v| < 2^22 (here |v| <= 127): adding 1.5 * 2^23 pushes the fraction
/// out of the mantissa under the default rounding mode, without a libm call.
#[inline]
fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Dot product with 8 independent accumulators, which the compiler vectorises.
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Which kernels this CPU runs (std caches the feature bits, so detecting is a few loads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Isa {
    Scalar,
    Avx2,
    Vnni,
}

impl Isa {
    /// The fastest variant this CPU can run.
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                return if has!("avxvnni") { Isa::Vnni } else { Isa::Avx2 };
            }
        }
        Isa::Scalar
    }

    /// Every variant this CPU can run, slowest first.
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Vnni].into_iter().filter(|&i| i <= Self::detect()).collect()
    }
}

/// One weight row (raw ggml blocks of type `ty`) against one quantized activation row.
fn dot(isa: Isa, ty: TensorType, w: &[u8], x: &Q8Row) -> f32 {
    if isa == Isa::Scalar {
        return match ty {
            TensorType::Q4_1 => dot_q4_1_q8_1(w, x),
            TensorType::Q5_0 => dot_q5_0_q8_0(w, x),
            _ => dot_q8_0_q8_0(w, x),
        };
    }
    dotn(isa, ty, [w], x)[0]
}

/// Rows processed together by `dotn`.
const ROWS: usize = 4;

/// `N` weight rows of type `ty` against one activation row; each result equals `dot` on its row.
fn dotn<const N: usize>(isa: Isa, ty: TensorType, w: [&[u8]; N], x: &Q8Row) -> [f32; N] {
    // SAFETY: `isa` is at most `Isa::detect()`, which detected the features each variant is
    // compiled for; `QWeight::new` checked every row's length.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (isa, ty) {
            (Isa::Vnni, TensorType::Q4_1) => return x86::vnni::dotn_q4_1_q8_1(w, x),
            (Isa::Vnni, TensorType::Q5_0) => return x86::vnni::dotn_signed::<N, true>(w, x),
            (Isa::Vnni, _) => return x86::vnni::dotn_signed::<N, false>(w, x),
            (Isa::Avx2, TensorType::Q4_1) => return x86::avx2::dotn_q4_1_q8_1(w, x),
            (Isa::Avx2, TensorType::Q5_0) => return x86::avx2::dotn_signed::<N, true>(w, x),
            (Isa::Avx2, _) => return x86::avx2::dotn_signed::<N, false>(w, x),
            (Isa::Scalar, _) => {}
        }
    }
    w.map(|r| dot(Isa::Scalar, ty, r, x))
}

/// `ROWS` weight rows against two activation rows; `[a][i]` equals `dot` on row `i` and activation `a`.
fn dotn2(isa: Isa, ty: TensorType, w: [&[u8]; ROWS], x: [&Q8Row; 2]) -> [[f32; ROWS]; 2] {
    // SAFETY: as in `dotn`.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (isa, ty) {
            (Isa::Vnni, TensorType::Q4_1) => return x86::vnni::dotn2_q4_1_q8_1(w, x),
            (Isa::Vnni, TensorType::Q5_0) => return x86::vnni::dotn2_signed::<ROWS, true>(w, x),
            (Isa::Vnni, _) => return x86::vnni::dotn2_signed::<ROWS, false>(w, x),
            (Isa::Avx2, TensorType::Q4_1) => return x86::avx2::dotn2_q4_1_q8_1(w, x),
            (Isa::Avx2, TensorType::Q5_0) => return x86::avx2::dotn2_signed::<ROWS, true>(w, x),
            (Isa::Avx2, _) => return x86::avx2::dotn2_signed::<ROWS, false>(w, x),
            (Isa::Scalar, _) => {}
        }
    }
    x.map(|x| dotn(isa, ty, w, x))
}

/// Scalar Q4_1 row against Q8_1 activations: `sum_b d_w d_x <q_w, q_x> + m_w s_x`.
fn dot_q4_1_q8_1(w: &[u8], x: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (b, blk) in w.chunks_exact(20).enumerate() {
        let q = &x.q[b * QK..(b + 1) * QK];
        let sumi: i32 = (0..16).map(|j| (blk[4 + j] & 0x0F) as i32 * q[j] as i32 + (blk[4 + j] >> 4) as i32 * q[j + 16] as i32).sum();
        sumf += f16_at(blk, 0) * x.d[b] * sumi as f32 + f16_at(blk, 2) * x.s[b];
    }
    sumf
}

/// Q5_0 value `j` of a block: its nibble, plus 16 if bit `j` of `qh` is set, minus 16.
fn q5_0_value(qs: &[u8], qh: u32, j: usize) -> i32 {
    let nib = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 } as i32;
    (nib | ((((qh >> j) & 1) as i32) << 4)) - 16
}

fn dot_q5_0_q8_0(w: &[u8], x: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (b, blk) in w.chunks_exact(22).enumerate() {
        let q = &x.q[b * QK..(b + 1) * QK];
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let sumi: i32 = (0..QK).map(|j| q5_0_value(&blk[6..], qh, j) * q[j] as i32).sum();
        sumf += f16_at(blk, 0) * x.d[b] * sumi as f32;
    }
    sumf
}

fn dot_q8_0_q8_0(w: &[u8], x: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let q = &x.q[b * QK..(b + 1) * QK];
        let sumi: i32 = (0..QK).map(|j| blk[2 + j] as i8 as i32 * q[j] as i32).sum();
        sumf += f16_at(blk, 0) * x.d[b] * sumi as f32;
    }
    sumf
}

/// The x86 kernels, instantiated twice: with AVX2 (`maddubs` + `madd`) and with AVX-VNNI
/// (`vpdpbusd`, one instruction for the same sums; the products never saturate here: at most
/// 2 * 15 * 127 or 2 * 127 * 127 per pair).
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernels {
    ($name:ident, $feat:literal, |$a:ident, $b:ident| $udot:expr) => {
        pub mod $name {
            use super::super::{Q8Row, QK};
            use std::arch::x86_64::*;

            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }

            /// The two f16 values at `p` as f32 lanes 0 and 1.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn f16x2(p: *const u8) -> __m128 {
                _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)))
            }

            /// 16 bytes of nibbles -> 32 bytes: low nibbles (values 0..16), then high (16..32).
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn nibbles(p: *const u8) -> __m256i {
                let q = _mm_loadu_si128(p as *const __m128i);
                let low = _mm_set1_epi8(0x0F);
                _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low))
            }

            /// Unsigned bytes `a` times signed bytes `b`, summed in fours into 8 f32 lanes.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn udot($a: __m256i, $b: __m256i) -> __m256 {
                _mm256_cvtepi32_ps($udot)
            }

            /// Signed bytes times signed bytes, via |a| and b with a's sign.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn sdot(a: __m256i, b: __m256i) -> __m256 {
                udot(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
            }

            /// `N` Q4_1 rows against the same activations (`N` = 1: one row). Each row keeps one
            /// accumulator and the blocks in order, ggml's summation order, so that results (and
            /// greedy choices at near-ties) match llama.cpp's; with `N` > 1 the independent chains
            /// fill the wait on each fused multiply-add, and each result equals `N` = 1's.
            #[target_feature(enable = $feat)]
            pub unsafe fn dotn_q4_1_q8_1<const N: usize>(w: [&[u8]; N], x: &Q8Row) -> [f32; N] {
                let nb = w[0].len() / 20;
                debug_assert!(w.iter().all(|r| r.len() == w[0].len()) && x.q.len() >= nb * QK && x.d.len() >= nb && x.s.len() >= nb);
                let mut acc = [_mm256_setzero_ps(); N];
                let mut summs = [0f32; N];
                let p = w.map(|r| r.as_ptr());
                let (xq, xd, xs) = (x.q.as_ptr(), x.d.as_ptr(), x.s.as_ptr());
                for b in 0..nb {
                    let (d, s) = (*xd.add(b), *xs.add(b));
                    let qx = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
                    for i in 0..N {
                        let blk = p[i].add(b * 20);
                        let dm = f16x2(blk);
                        summs[i] += _mm_cvtss_f32(_mm_movehdup_ps(dm)) * s;
                        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(_mm_cvtss_f32(dm) * d), udot(nibbles(blk.add(4)), qx), acc[i]);
                    }
                }
                let mut out = [0f32; N];
                for i in 0..N {
                    out[i] = hsum(acc[i]) + summs[i];
                }
                out
            }

            /// `N` Q4_1 rows against two activation rows: each weight block is unpacked once
            /// for both. Every (row, activation) pair keeps `dotn_q4_1_q8_1`'s operations and order.
            #[target_feature(enable = $feat)]
            pub unsafe fn dotn2_q4_1_q8_1<const N: usize>(w: [&[u8]; N], x: [&Q8Row; 2]) -> [[f32; N]; 2] {
                let nb = w[0].len() / 20;
                debug_assert!(w.iter().all(|r| r.len() == w[0].len()) && x.iter().all(|x| x.q.len() >= nb * QK && x.d.len() >= nb && x.s.len() >= nb));
                let mut acc = [[_mm256_setzero_ps(); N]; 2];
                let mut summs = [[0f32; N]; 2];
                let p = w.map(|r| r.as_ptr());
                for b in 0..nb {
                    let qx = x.map(|x| _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i));
                    let (d, s) = (x.map(|x| *x.d.get_unchecked(b)), x.map(|x| *x.s.get_unchecked(b)));
                    for i in 0..N {
                        let blk = p[i].add(b * 20);
                        let dm = f16x2(blk);
                        let (dw, mw) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
                        let qw = nibbles(blk.add(4));
                        for a in 0..2 {
                            summs[a][i] += mw * s[a];
                            acc[a][i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * d[a]), udot(qw, qx[a]), acc[a][i]);
                        }
                    }
                }
                let mut out = [[0f32; N]; 2];
                for a in 0..2 {
                    for i in 0..N {
                        out[a][i] = hsum(acc[a][i]) + summs[a][i];
                    }
                }
                out
            }

            /// A Q5_0 (`Q5`) or Q8_0 block at `blk` as 32 signed bytes and its scale. Q5_0:
            /// bytes whose fifth bit is clear get 0xF0, which turns `nibble - 16` into the signed
            /// byte directly.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn signed_block<const Q5: bool>(blk: *const u8) -> (__m256i, f32) {
                let dw = _mm_cvtss_f32(f16x2(blk));
                if !Q5 {
                    return (_mm256_loadu_si256(blk.add(2) as *const __m256i), dw);
                }
                let high = _mm256_set1_epi8(0xF0u8 as i8);
                // Byte i of the expansion tests bit i: pick byte i/8 of the word, mask bit i%8.
                let shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
                let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                let qh = std::ptr::read_unaligned(blk.add(2) as *const i32);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(qh), shuf), bit), bit);
                (_mm256_or_si256(nibbles(blk.add(6)), _mm256_andnot_si256(set, high)), dw)
            }

            /// `N` Q5_0 (`Q5`) or Q8_0 rows against the same Q8_0 activations, as `dotn_q4_1_q8_1`.
            #[target_feature(enable = $feat)]
            pub unsafe fn dotn_signed<const N: usize, const Q5: bool>(w: [&[u8]; N], x: &Q8Row) -> [f32; N] {
                let bb = if Q5 { 22 } else { 34 };
                let nb = w[0].len() / bb;
                debug_assert!(w.iter().all(|r| r.len() == w[0].len()) && x.q.len() >= nb * QK && x.d.len() >= nb);
                let mut acc = [_mm256_setzero_ps(); N];
                let p = w.map(|r| r.as_ptr());
                let (xq, xd) = (x.q.as_ptr(), x.d.as_ptr());
                for b in 0..nb {
                    let d = *xd.add(b);
                    let qx = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
                    for i in 0..N {
                        let (qw, dw) = signed_block::<Q5>(p[i].add(b * bb));
                        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * d), sdot(qw, qx), acc[i]);
                    }
                }
                let mut out = [0f32; N];
                for i in 0..N {
                    out[i] = hsum(acc[i]);
                }
                out
            }

            /// `N` Q5_0 (`Q5`) or Q8_0 rows against two activation rows, each block decoded once
            /// for both; every pair keeps `dotn_signed`'s operations and order.
            #[target_feature(enable = $feat)]
            pub unsafe fn dotn2_signed<const N: usize, const Q5: bool>(w: [&[u8]; N], x: [&Q8Row; 2]) -> [[f32; N]; 2] {
                let bb = if Q5 { 22 } else { 34 };
                let nb = w[0].len() / bb;
                debug_assert!(w.iter().all(|r| r.len() == w[0].len()) && x.iter().all(|x| x.q.len() >= nb * QK && x.d.len() >= nb));
                let mut acc = [[_mm256_setzero_ps(); N]; 2];
                let p = w.map(|r| r.as_ptr());
                for b in 0..nb {
                    let qx = x.map(|x| _mm256_loadu_si256(x.q.as_ptr().add(b * QK) as *const __m256i));
                    let d = x.map(|x| *x.d.get_unchecked(b));
                    for i in 0..N {
                        let (qw, dw) = signed_block::<Q5>(p[i].add(b * bb));
                        for a in 0..2 {
                            acc[a][i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * d[a]), sdot(qw, qx[a]), acc[a][i]);
                        }
                    }
                }
                let mut out = [[0f32; N]; 2];
                for a in 0..2 {
                    for i in 0..N {
                        out[a][i] = hsum(acc[a][i]);
                    }
                }
                out
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    x86_kernels!(avx2, "avx2,fma,f16c", |a, b| _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
    x86_kernels!(vnni, "avx2,fma,f16c,avxvnni", |a, b| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn dequant(w: &QWeight, raw: &[u8]) -> Vec<f32> {
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(w.ty.to_candle(), raw, vec![w.rows, w.cols], &candle_core::Device::Cpu)
            .unwrap()
            .dequantize(&candle_core::Device::Cpu)
            .unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn random_weight(ty: TensorType, rows: usize, cols: usize, seed: u64) -> (QWeight, Vec<u8>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let src: Vec<f32> = (0..rows * cols).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
        let t = candle_core::Tensor::from_vec(src, (rows, cols), &candle_core::Device::Cpu).unwrap();
        let q = candle_core::quantized::QTensor::quantize(&t, ty.to_candle()).unwrap();
        let raw = q.data().unwrap().to_vec();
        (QWeight::new(ty, rows, cols, &raw).unwrap(), raw)
    }

    /// The quantized product stays within the activation-quantization error of the exact product
    /// of the dequantized weights, and SIMD and scalar paths agree.
    #[test]
    fn kernels_match_dequantized_matmul() {
        for ty in [TensorType::Q4_1, TensorType::Q5_0, TensorType::Q8_0] {
            let (rows, cols, m) = (40, 96, 3);
            let (w, raw) = random_weight(ty, rows, cols, 3);
            let wf = dequant(&w, &raw);
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let x: Vec<f32> = (0..m * cols).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
            let got = w.matmul(&x, m);
            for i in 0..m {
                for r in 0..rows {
                    let exact: f32 = (0..cols).map(|k| x[i * cols + k] * wf[r * cols + k]).sum();
                    let g = got[i * rows + r];
                    assert!((g - exact).abs() < 0.05, "{}: row {r} got {g} want {exact}", ty.name());
                }
            }
            // Every variant this CPU can run agrees with the scalar one (up to summation
            // order), and the scalar one is itself close to the exact product.
            let qx = quantize_q8(&x[..cols], ty == TensorType::Q4_1);
            let rb = raw.len() / rows;
            for r in 0..rows {
                let wr = &raw[r * rb..(r + 1) * rb];
                let scalar = dot(Isa::Scalar, ty, wr, &qx);
                let exact: f32 = (0..cols).map(|k| x[k] * wf[r * cols + k]).sum();
                assert!((scalar - exact).abs() < 0.05, "{}: scalar {scalar} want {exact}", ty.name());
                assert!((scalar - got[r]).abs() < 1e-4, "scalar {scalar} vs matmul {}", got[r]);
                for isa in Isa::available() {
                    let v = dot(isa, ty, wr, &qx);
                    assert!((scalar - v).abs() < 1e-4, "{isa:?}: {v} vs scalar {scalar}");
                    // Rows in groups give each row's own result, bit for bit (the greedy
                    // agreement with llama.cpp depends on the summation order).
                    let group: [&[u8]; ROWS] = std::array::from_fn(|g| &raw[((r + 7 * g) % rows) * rb..((r + 7 * g) % rows + 1) * rb]);
                    let each = group.map(|w| dot(isa, ty, w, &qx));
                    assert_eq!(dotn(isa, ty, group, &qx), each, "{isa:?} {}: grouped rows differ", ty.name());
                }
            }
        }
    }

    #[test]
    fn matvec_many_equals_separate_matvecs() {
        for ty in [TensorType::Q4_1, TensorType::Q5_0, TensorType::Q8_0] {
            let ws: Vec<QWeight> = [(40, 64), (17, 64), (33, 64)].iter().enumerate().map(|(i, &(r, c))| random_weight(ty, r, c, i as u64).0).collect();
            let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
            let many = QWeight::matvec_many(&ws.iter().collect::<Vec<_>>(), &x);
            for (w, got) in ws.iter().zip(&many) {
                assert_eq!(got, &w.matmul(&x, 1), "{}", ty.name());
            }
        }
    }

    /// A batch of activations gives, bit for bit, what each activation gives alone (grouped rows
    /// and paired activations only reorder independent sums), with every kernel variant.
    #[test]
    fn batched_products_equal_one_activation_at_a_time() {
        for ty in [TensorType::Q4_1, TensorType::Q5_0, TensorType::Q8_0] {
            let (w, _) = random_weight(ty, 37, 96, 9);
            for m in [1, 2, 5] {
                let x: Vec<f32> = (0..m * 96).map(|i| (i as f32 * 0.61).cos() * (1.0 + (i % 7) as f32)).collect();
                let batch = w.matmul(&x, m);
                for j in 0..m {
                    let one = w.matmul(&x[j * 96..(j + 1) * 96], 1);
                    assert_eq!(&batch[j * 37..(j + 1) * 37], &one[..], "{} m={m} j={j}", ty.name());
                }
            }
            let qx: Vec<Q8Row> = (0..2).map(|j| w.quantize(&(0..96).map(|i| ((i * (j + 3)) as f32 * 0.13).sin()).collect::<Vec<_>>())).collect();
            for isa in Isa::available() {
                let rows = std::array::from_fn(|g| w.row(4 + g));
                let pair = dotn2(isa, ty, rows, [&qx[0], &qx[1]]);
                for a in 0..2 {
                    for g in 0..ROWS {
                        assert_eq!(pair[a][g].to_bits(), dot(isa, ty, w.row(4 + g), &qx[a]).to_bits(), "{} {isa:?}", ty.name());
                    }
                }
            }
        }
    }

    #[test]
    fn magic_rounding_is_round_half_even() {
        for v in [-127.0f32, -2.5, -1.5, -0.5, 0.49999997, 0.5, 1.5, 2.5, 3.5, 126.5, 127.0] {
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..100_000 {
            let v = rng.gen::<f32>() * 254.0 - 127.0;
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
    }

    #[test]
    fn zero_block_quantizes_to_zero() {
        let q = quantize_q8(&[0.0; 32], true);
        assert_eq!(q.d, vec![0.0]);
        assert!(q.q.iter().all(|&v| v == 0));
    }
}
