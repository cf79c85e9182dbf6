//! Quantized matrix-vector kernels for GGUF Q4_1, Q5_0, Q8_0, Q4_K and Q6_K weights. candle has
//! no SIMD path for Q4_1 and Q5_0 (its dot products are scalar), and its K-quant products run on
//! its own thread pool, which a decode step split across our threads cannot share.
//!
//! The arithmetic follows ggml's CPU path, so `--exec quant` agrees with llama.cpp: activations
//! are quantized per 32-block to Q8_1 (for Q4_1 weights) or Q8_0 (Q5_0, Q8_0 weights), or per
//! 256-block to Q8_K (K-quants), with round-half-even; integer dot products per block, one f32
//! scale per block pair. Output rows are split across the rayon pool.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use crate::gguf::TensorType;
use crate::vecmath::{prefetch, PREFETCH_AHEAD};
use crate::{Error, Result};

const QK: usize = 32;
/// Values per K-quant super-block.
const QK_K: usize = 256;

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

/// Activations quantized to 8 bits per 32-block: scale `d`, `s = d * sum(q)` (Q8_1 only), values;
/// or per 256-block (Q8_K): scale `d`, values, and `sums` of each 16 values.
pub(crate) struct Q8Row {
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
    sums: Vec<i16>,
}

/// The quantized form a weight type's kernels read their activations in. Weights whose types
/// share a format (Q5_0 and Q8_0; Q4_K and Q6_K) can share one quantized vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActFormat {
    Q8_1,
    Q8_0,
    Q8K,
}

impl QWeight {
    /// Types with a kernel here; other types use candle's `QMatMul`.
    pub fn supports(ty: TensorType) -> bool {
        matches!(ty, TensorType::Q4_1 | TensorType::Q5_0 | TensorType::Q8_0 | TensorType::Q4K | TensorType::Q6K)
    }

    /// From raw ggml blocks (`data`, row-major). Block layouts: Q4_1 `{d, m: f16, qs[16]}`,
    /// Q5_0 `{d: f16, qh: u32, qs[16]}`, Q8_0 `{d: f16, qs: [i8; 32]}`, Q4_K `{d, dmin: f16,
    /// scales[12], qs[128]}`, Q6_K `{ql[128], qh[64], scales: [i8; 16], d: f16}`.
    pub fn new(ty: TensorType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let (bs, bb) = ty.block();
        if !Self::supports(ty) || rows == 0 || cols == 0 || cols % bs as usize != 0 || data.len() != rows * cols / bs as usize * bb as usize {
            return Err(Error::Invalid(format!("bad {} weight: {rows}x{cols} with {} bytes", ty.name(), data.len())));
        }
        Ok(QWeight { ty, rows, cols, data: std::sync::Arc::new(data.to_vec()) })
    }

    fn row_bytes(&self) -> usize {
        let (bs, bb) = self.ty.block();
        self.cols / bs as usize * bb as usize
    }

    /// Weight row `r`'s blocks.
    fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// How this weight's kernels read activations: Q8_1 for Q4_1, Q8_K for K-quants, Q8_0 otherwise.
    pub(crate) fn act_format(&self) -> ActFormat {
        match self.ty {
            TensorType::Q4_1 => ActFormat::Q8_1,
            TensorType::Q4K | TensorType::Q6K => ActFormat::Q8K,
            _ => ActFormat::Q8_0,
        }
    }

    /// `x` quantized the way this weight's kernels read it (`act_format`).
    pub(crate) fn quantize(&self, x: &[f32]) -> Q8Row {
        assert_eq!(x.len(), self.cols, "activation length");
        match self.act_format() {
            ActFormat::Q8K => quantize_q8_k(x),
            f => quantize_q8(x, f == ActFormat::Q8_1),
        }
    }

    /// Whether `qx` is `quantize`'s output for a vector of this weight's length: the kernels read
    /// its arrays unchecked.
    fn fits(&self, qx: &Q8Row) -> bool {
        let n = self.cols;
        qx.q.len() == n
            && match self.act_format() {
                ActFormat::Q8_1 => qx.d.len() == n / QK && qx.s.len() == n / QK,
                ActFormat::Q8_0 => qx.d.len() == n / QK,
                ActFormat::Q8K => qx.d.len() == n / QK_K && qx.sums.len() == n / 16,
            }
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
        assert!(self.fits(qx), "rows_into: activations quantized for another type or length");
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

    /// `W_i x` for several weights of one activation format that read the same vector (q/k/v,
    /// gate/up): the vector is quantized once and all rows go to the pool as one job.
    pub fn matvec_many(ws: &[&QWeight], x: &[f32]) -> Vec<Vec<f32>> {
        let Some(first) = ws.first() else { return Vec::new() };
        assert!(
            ws.iter().all(|w| w.act_format() == first.act_format() && w.cols == x.len()),
            "matvec_many: mixed activation formats or shapes"
        );
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
    Q8Row { d, s, q, sums: Vec::new() }
}

/// ggml's `quantize_row_q8_K_ref`: per 256-block, `q = min(127, round_half_even(x * -127 / max))`
/// where `max` is the value of largest magnitude (so the scale `d = 1 / (-127 / max)` may be
/// negative), kept in f32, and the sum of each 16 values.
fn quantize_q8_k(x: &[f32]) -> Q8Row {
    let nb = x.len() / QK_K;
    let mut d = Vec::with_capacity(nb);
    let mut q = vec![0i8; x.len()];
    let mut sums = vec![0i16; x.len() / 16];
    for (b, blk) in x.chunks_exact(QK_K).enumerate() {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in blk {
            if v.abs() > amax {
                (amax, max) = (v.abs(), v);
            }
        }
        if amax == 0.0 {
            d.push(0.0);
            continue;
        }
        let iscale = -127.0 / max;
        let qb = &mut q[b * QK_K..(b + 1) * QK_K];
        for (qv, &v) in qb.iter_mut().zip(blk) {
            *qv = (round_half_even(iscale * v) as i32).min(127) as i8;
        }
        for (sum, g) in sums[b * 16..(b + 1) * 16].iter_mut().zip(qb.chunks_exact(16)) {
            *sum = g.iter().map(|&v| v as i16).sum();
        }
        d.push(1.0 / iscale);
    }
    Q8Row { d, s: Vec::new(), q, sums }
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
            TensorType::Q4K => dot_q4_k_q8_k(w, x),
            TensorType::Q6K => dot_q6_k_q8_k(w, x),
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
            (Isa::Scalar, _) => {}
            (_, TensorType::Q4K) => return x86::k::dot_q4_k_q8_k(w, [x])[0],
            (_, TensorType::Q6K) => return x86::k::dot_q6_k_q8_k(w, [x])[0],
            (Isa::Vnni, TensorType::Q4_1) => return x86::vnni::dotn_q4_1_q8_1(w, x),
            (Isa::Vnni, TensorType::Q5_0) => return x86::vnni::dotn_signed::<N, true>(w, x),
            (Isa::Vnni, _) => return x86::vnni::dotn_signed::<N, false>(w, x),
            (Isa::Avx2, TensorType::Q4_1) => return x86::avx2::dotn_q4_1_q8_1(w, x),
            (Isa::Avx2, TensorType::Q5_0) => return x86::avx2::dotn_signed::<N, true>(w, x),
            (Isa::Avx2, _) => return x86::avx2::dotn_signed::<N, false>(w, x),
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
            (Isa::Scalar, _) => {}
            (_, TensorType::Q4K) => return x86::k::dot_q4_k_q8_k(w, x),
            (_, TensorType::Q6K) => return x86::k::dot_q6_k_q8_k(w, x),
            (Isa::Vnni, TensorType::Q4_1) => return x86::vnni::dotn2_q4_1_q8_1(w, x),
            (Isa::Vnni, TensorType::Q5_0) => return x86::vnni::dotn2_signed::<ROWS, true>(w, x),
            (Isa::Vnni, _) => return x86::vnni::dotn2_signed::<ROWS, false>(w, x),
            (Isa::Avx2, TensorType::Q4_1) => return x86::avx2::dotn2_q4_1_q8_1(w, x),
            (Isa::Avx2, TensorType::Q5_0) => return x86::avx2::dotn2_signed::<ROWS, true>(w, x),
            (Isa::Avx2, _) => return x86::avx2::dotn2_signed::<ROWS, false>(w, x),
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

/// The 6-bit scales and mins of a Q4_K super-block's 8 sub-blocks (ggml's `get_scale_min_k4`).
fn q4_k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (sc[j], m[j]) = if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
        };
    }
    (sc, m)
}

/// Scalar Q4_K row against Q8_K activations: per super-block `d_w d_x sum_j sc_j <q_w, q_x>_j -
/// dmin_w d_x sum_j m_j sum(q_x)_j` over its 8 sub-blocks of 32.
fn dot_q4_k_q8_k(w: &[u8], x: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let (sc, m) = q4_k_scales(&blk[4..16]);
        let (qs, q8) = (&blk[16..], &x.q[b * QK_K..(b + 1) * QK_K]);
        let mut sumi = 0i32;
        for j in 0..4 {
            for l in 0..32 {
                sumi += sc[2 * j] as i32 * (qs[32 * j + l] & 0x0F) as i32 * q8[64 * j + l] as i32;
                sumi += sc[2 * j + 1] as i32 * (qs[32 * j + l] >> 4) as i32 * q8[64 * j + 32 + l] as i32;
            }
        }
        let sums = &x.sums[b * 16..(b + 1) * 16];
        let summ: i32 = (0..8).map(|j| m[j] as i32 * (sums[2 * j] as i32 + sums[2 * j + 1] as i32)).sum();
        sumf += f16_at(blk, 0) * x.d[b] * sumi as f32 - f16_at(blk, 2) * x.d[b] * summ as f32;
    }
    sumf
}

/// Scalar Q6_K row against Q8_K activations: `d_w d_x sum_i sc_i <q_w - 32, q_x>_i` over the 16
/// sub-blocks of 16 of each super-block.
fn dot_q6_k_q8_k(w: &[u8], x: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let mut sumi = 0i32;
        for half in 0..2 {
            let (ql, qh, sc) = (&blk[64 * half..], &blk[128 + 32 * half..], &blk[192 + 8 * half..]);
            let q8 = &x.q[b * QK_K + 128 * half..];
            for l in 0..32 {
                let v = [
                    (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                    (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                    (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                    (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                ];
                for (k, &v) in v.iter().enumerate() {
                    sumi += sc[l / 16 + 2 * k] as i8 as i32 * (v as i32 - 32) * q8[l + 32 * k] as i32;
                }
            }
        }
        sumf += f16_at(blk, 208) * x.d[b] * sumi as f32;
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
            use super::hsum;
            use std::arch::x86_64::*;

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
    use std::arch::x86_64::*;

    /// The sum of 8 lanes, in ggml's order (`hsum_float_8`): halves, then pairs, then the last two.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        hsum4(_mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)))
    }

    /// The sum of 4 lanes, in ggml's order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum4(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    x86_kernels!(avx2, "avx2,fma,f16c", |a, b| _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
    x86_kernels!(vnni, "avx2,fma,f16c,avxvnni", |a, b| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b));

    /// K-quant rows against Q8_K activations with AVX2. Each row's integer sums fill the same 8
    /// lanes in the same order as ggml's AVX2 kernels, and the lanes meet the f32 scales the same
    /// way, so that results (and greedy choices at near-ties) match llama.cpp's.
    pub mod k {
        use super::super::{Q8Row, QK_K};
        use super::{hsum, hsum4};
        use std::arch::x86_64::*;

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn f16_at(p: *const u8) -> f32 {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)))
        }

        /// A Q4_K block's 12 scale bytes as 8 scales then 8 mins, one byte each (ggml's `utmp`).
        #[inline]
        unsafe fn scales_and_mins(p: *const u8) -> [u32; 4] {
            const M1: u32 = 0x3f3f_3f3f;
            const M2: u32 = 0x0f0f_0f0f;
            const M3: u32 = 0x0303_0303;
            let u = [0, 1, 2].map(|i| std::ptr::read_unaligned((p as *const u32).add(i)));
            [u[0] & M1, (u[2] & M2) | (((u[0] >> 6) & M3) << 4), u[1] & M1, ((u[2] >> 4) & M2) | (((u[1] >> 6) & M3) << 4)]
        }

        /// Scale `k` of the 8 16-bit scales in each half of `scales`, in every 16-bit lane.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn q4_scale(scales: __m256i, k: i32) -> __m256i {
            _mm256_shuffle_epi8(scales, _mm256_set1_epi16((((2 * k + 1) << 8) | (2 * k)) as i16))
        }

        /// `N` Q4_K rows against `A` activation rows (each weight block decoded once for all of
        /// them); `[a][i]` equals the result for row `i` alone against activation `a` alone. Plain
        /// loops, no closures: a closure does not inherit the target features and is not inlined.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn dot_q4_k_q8_k<const N: usize, const A: usize>(w: [&[u8]; N], x: [&Q8Row; A]) -> [[f32; N]; A] {
            let nb = w[0].len() / 144;
            debug_assert!(w.iter().all(|r| r.len() == w[0].len()));
            debug_assert!(x.iter().all(|x| x.q.len() >= nb * QK_K && x.d.len() >= nb && x.sums.len() >= nb * 16));
            let m4 = _mm256_set1_epi8(0x0F);
            let mut acc = [[_mm256_setzero_ps(); N]; A];
            let mut acc_m = [[_mm_setzero_ps(); N]; A];
            let mut q8s = [_mm_setzero_si128(); A];
            let mut out = [[0f32; N]; A];
            for b in 0..nb {
                for a in 0..A {
                    // Sums of the 8 sub-blocks of 32: pairs of 16-sums.
                    let s = _mm256_loadu_si256(x[a].sums.as_ptr().add(b * 16) as *const __m256i);
                    q8s[a] = _mm_hadd_epi16(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                }
                for i in 0..N {
                    let blk = w[i].as_ptr().add(b * 144);
                    let (dw, mw) = (f16_at(blk), f16_at(blk.add(2)));
                    let u = scales_and_mins(blk.add(4));
                    let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32));
                    let mins = _mm256_extracti128_si256(mins_and_scales, 1);
                    let sc = _mm256_castsi256_si128(mins_and_scales);
                    let scales = _mm256_set_m128i(sc, sc);
                    let mut sumi = [_mm256_setzero_si256(); A];
                    for j in 0..4 {
                        // Scale 2j for the low nibbles, 2j + 1 for the high ones.
                        let (scale_l, scale_h) = (q4_scale(scales, 2 * j as i32), q4_scale(scales, 2 * j as i32 + 1));
                        let q4bits = _mm256_loadu_si256(blk.add(16 + 32 * j) as *const __m256i);
                        let q4l = _mm256_and_si256(q4bits, m4);
                        let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
                        for a in 0..A {
                            let q8 = x[a].q.as_ptr().add(b * QK_K + 64 * j);
                            let q8l = _mm256_loadu_si256(q8 as *const __m256i);
                            let q8h = _mm256_loadu_si256(q8.add(32) as *const __m256i);
                            let p16l = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
                            let p16h = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
                            sumi[a] = _mm256_add_epi32(sumi[a], _mm256_add_epi32(p16l, p16h));
                        }
                    }
                    for a in 0..A {
                        let yd = *x[a].d.get_unchecked(b);
                        let (d, dmin) = (yd * dw, -yd * mw);
                        let prod = _mm_madd_epi16(mins, q8s[a]);
                        acc_m[a][i] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[a][i]);
                        acc[a][i] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[a]), acc[a][i]);
                    }
                }
            }
            for a in 0..A {
                for i in 0..N {
                    out[a][i] = hsum(acc[a][i]) + hsum4(acc_m[a][i]);
                }
            }
            out
        }

        /// The upper two bits of a Q6_K value, from bits `shift..shift + 2` of `high`, moved to bits 4-5.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn q6_high<const SHIFT: i32>(high: __m256i) -> __m256i {
            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, SHIFT), _mm256_set1_epi8(3)), 4)
        }

        /// Scales `2s` and `2s + 1` of a Q6_K block (16 bytes at `scales`), eight 16-bit lanes each.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn q6_scale(scales: __m128i, s: i64) -> __m256i {
            let pick = _mm_set_epi64x((2 * s + 1) * 0x0101_0101_0101_0101, 2 * s * 0x0101_0101_0101_0101);
            _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick))
        }

        /// `N` Q6_K rows against `A` activation rows, as `dot_q4_k_q8_k`. Plain loops, no
        /// closures: a closure does not inherit the target features and is not inlined here.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn dot_q6_k_q8_k<const N: usize, const A: usize>(w: [&[u8]; N], x: [&Q8Row; A]) -> [[f32; N]; A] {
            let nb = w[0].len() / 210;
            debug_assert!(w.iter().all(|r| r.len() == w[0].len()));
            debug_assert!(x.iter().all(|x| x.q.len() >= nb * QK_K && x.d.len() >= nb));
            let (m4, m32s) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(32));
            let mut acc = [[_mm256_setzero_ps(); N]; A];
            let mut out = [[0f32; N]; A];
            for b in 0..nb {
                for i in 0..N {
                    let blk = w[i].as_ptr().add(b * 210);
                    let dw = f16_at(blk.add(208));
                    let scales = _mm_loadu_si128(blk.add(192) as *const __m128i);
                    let mut sumi = [_mm256_setzero_si256(); A];
                    for j in 0..2 {
                        let (ql, qh) = (blk.add(64 * j), blk.add(128 + 32 * j));
                        let bits1 = _mm256_loadu_si256(ql as *const __m256i);
                        let bits2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                        let high = _mm256_loadu_si256(qh as *const __m256i);
                        let q6 = [
                            _mm256_or_si256(_mm256_and_si256(bits1, m4), q6_high::<0>(high)),
                            _mm256_or_si256(_mm256_and_si256(bits2, m4), q6_high::<2>(high)),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4), q6_high::<4>(high)),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4), q6_high::<6>(high)),
                        ];
                        let s0 = 4 * j as i64;
                        let scale = [q6_scale(scales, s0), q6_scale(scales, s0 + 1), q6_scale(scales, s0 + 2), q6_scale(scales, s0 + 3)];
                        for a in 0..A {
                            let q8 = x[a].q.as_ptr().add(b * QK_K + 128 * j);
                            let mut p16 = [_mm256_setzero_si256(); 4];
                            for k in 0..4 {
                                let q8k = _mm256_loadu_si256(q8.add(32 * k) as *const __m256i);
                                // maddubs needs unsigned weights: subtract 32 * the activation pair sums.
                                let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q6[k], q8k), _mm256_maddubs_epi16(m32s, q8k));
                                p16[k] = _mm256_madd_epi16(scale[k], p);
                            }
                            sumi[a] = _mm256_add_epi32(sumi[a], _mm256_add_epi32(p16[0], p16[1]));
                            sumi[a] = _mm256_add_epi32(sumi[a], _mm256_add_epi32(p16[2], p16[3]));
                        }
                    }
                    for a in 0..A {
                        let d = *x[a].d.get_unchecked(b) * dw;
                        acc[a][i] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[a]), acc[a][i]);
                    }
                }
            }
            for a in 0..A {
                for i in 0..N {
                    out[a][i] = hsum(acc[a][i]);
                }
            }
            out
        }
    }
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

    /// Every type with a kernel, with a row length that fits its blocks.
    const CASES: [(TensorType, usize); 5] =
        [(TensorType::Q4_1, 96), (TensorType::Q5_0, 96), (TensorType::Q8_0, 96), (TensorType::Q4K, 512), (TensorType::Q6K, 512)];

    /// The quantized product stays within the activation-quantization error of the exact product
    /// of the dequantized weights, and SIMD and scalar paths agree.
    #[test]
    fn kernels_match_dequantized_matmul() {
        for (ty, cols) in CASES {
            let (rows, m) = (40, 3);
            // The activation-quantization error of a row grows as the square root of its length.
            let tol = 0.05 * (cols as f32 / 96.0).sqrt();
            let (w, raw) = random_weight(ty, rows, cols, 3);
            let wf = dequant(&w, &raw);
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let x: Vec<f32> = (0..m * cols).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect();
            let got = w.matmul(&x, m);
            for i in 0..m {
                for r in 0..rows {
                    let exact: f32 = (0..cols).map(|k| x[i * cols + k] * wf[r * cols + k]).sum();
                    let g = got[i * rows + r];
                    assert!((g - exact).abs() < tol, "{}: row {r} got {g} want {exact}", ty.name());
                }
            }
            // Every variant this CPU can run agrees with the scalar one (up to summation
            // order), and the scalar one is itself close to the exact product.
            let qx = w.quantize(&x[..cols]);
            let rb = raw.len() / rows;
            for r in 0..rows {
                let wr = &raw[r * rb..(r + 1) * rb];
                let scalar = dot(Isa::Scalar, ty, wr, &qx);
                let exact: f32 = (0..cols).map(|k| x[k] * wf[r * cols + k]).sum();
                assert!((scalar - exact).abs() < tol, "{}: scalar {scalar} want {exact}", ty.name());
                assert!((scalar - got[r]).abs() < 1e-4, "{}: scalar {scalar} vs matmul {}", ty.name(), got[r]);
                for isa in Isa::available() {
                    let v = dot(isa, ty, wr, &qx);
                    assert!((scalar - v).abs() < 1e-4, "{isa:?} {}: {v} vs scalar {scalar}", ty.name());
                    // Rows in groups give each row's own result, bit for bit (the greedy
                    // agreement with llama.cpp depends on the summation order).
                    let group: [&[u8]; ROWS] = std::array::from_fn(|g| &raw[((r + 7 * g) % rows) * rb..((r + 7 * g) % rows + 1) * rb]);
                    let each = group.map(|w| dot(isa, ty, w, &qx));
                    assert_eq!(dotn(isa, ty, group, &qx), each, "{isa:?} {}: grouped rows differ", ty.name());
                }
            }
        }
    }

    /// Q8_K as ggml makes it: the value of largest magnitude maps to -127, the scale keeps its
    /// sign, and each 16 values' sum is kept.
    #[test]
    fn q8_k_follows_ggml() {
        let mut x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        x[300] = 3.0; // the second block's largest magnitude, positive
        x[7] = -2.5; // the first block's, negative
        x[256..].iter_mut().take(40).for_each(|v| *v = 0.0);
        let q = quantize_q8_k(&x);
        assert_eq!(q.d, vec![1.0 / (-127.0 / -2.5f32), 1.0 / (-127.0 / 3.0f32)]);
        assert_eq!((q.q[7], q.q[300]), (-127, -127));
        for (b, blk) in x.chunks_exact(QK_K).enumerate() {
            for (k, &v) in blk.iter().enumerate() {
                let want = (v * (-127.0 / if b == 0 { -2.5f32 } else { 3.0 })).round_ties_even().min(127.0) as i8;
                assert_eq!(q.q[b * QK_K + k], want, "block {b} value {k}");
            }
        }
        for (j, &sum) in q.sums.iter().enumerate() {
            assert_eq!(sum as i32, q.q[16 * j..16 * (j + 1)].iter().map(|&v| v as i32).sum::<i32>());
        }
        let zero = quantize_q8_k(&[0.0; QK_K]);
        assert_eq!(zero.d, vec![0.0]);
        assert!(zero.q.iter().all(|&v| v == 0) && zero.sums.iter().all(|&v| v == 0));
    }

    #[test]
    fn matvec_many_equals_separate_matvecs() {
        for (ty, cols) in CASES {
            let ws: Vec<QWeight> = [40, 17, 33].iter().enumerate().map(|(i, &r)| random_weight(ty, r, cols, i as u64).0).collect();
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
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
        for (ty, cols) in CASES {
            let (w, _) = random_weight(ty, 37, cols, 9);
            for m in [1, 2, 5] {
                let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.61).cos() * (1.0 + (i % 7) as f32)).collect();
                let batch = w.matmul(&x, m);
                for j in 0..m {
                    let one = w.matmul(&x[j * cols..(j + 1) * cols], 1);
                    assert_eq!(&batch[j * 37..(j + 1) * 37], &one[..], "{} m={m} j={j}", ty.name());
                }
            }
            let qx: Vec<Q8Row> = (0..2).map(|j| w.quantize(&(0..cols).map(|i| ((i * (j + 3)) as f32 * 0.13).sin()).collect::<Vec<_>>())).collect();
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
