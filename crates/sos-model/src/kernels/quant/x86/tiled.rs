//! Prompt products (many activations against one weight) on AVX-512 VNNI CPUs, for Q5_0, Q8_0,
//! Q4_K and Q6_K weights.
//!
//! The one-activation kernels decode each weight block for every activation they meet, and
//! their byte products (`maddubs` + `madd`, or `vpdpbusd` on 8 lanes) leave the lanes to be
//! summed per row. Here a tile of `TILE` weight rows is decoded once into plain signed bytes,
//! and 16 activations share each vector: one 64-byte load holds 4 consecutive values of 16
//! activations (`Panel`), and one `vpdpbusd` multiplies them by 4 bytes of one weight row,
//! broadcast, into 16 per-activation sums. No horizontal sums are left.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes: activations are stored plus 128, and the
//! excess, `128 * sum(w)` per block, is known when the weights are decoded (`corr`). Integer
//! sums are exact, and each lane then takes the scalar kernel's f32 steps (`scalar.rs`), so
//! every result equals the scalar and one-activation kernels bit for bit.
//!
//! # Safety
//! The caller has detected AVX-512 F/BW/VL/VNNI (`Isa::Vnni512`); `Panel` and `Tile` size their
//! buffers from the weight's shape, which `QWeight::shared` checked against its blocks.

// Loops over the register arrays index them, `[group][row]`, as the sums are written above.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::super::act::{Q8Row, QK, QK_K};
use super::super::scalar::q4_k_scale_words;
use super::{q6_values, signed_block};
use crate::format::gguf::TensorType;

/// Activations per vector.
pub(in crate::kernels::quant) const LANES: usize = 16;
/// Weight rows decoded together.
pub(in crate::kernels::quant) const TILE: usize = 6;
/// Activation groups per pass: each broadcast weight word serves 32 activations, and the 6 x 2
/// running sums with their scaled totals fill 24 of the 32 registers. (Measured on Qwen2.5 1.5B
/// prompts: 6 x 2 ran 1.11x 8 x 1, 1.2x 4 x 3, and about as 8 x 2.)
const GROUPS: usize = 2;

/// Values per block that carries one f32 scale: 32 (Q5_0, Q8_0) or 256 (K-quants).
fn block_len(ty: TensorType) -> usize {
    if matches!(ty, TensorType::Q4K | TensorType::Q6K) {
        QK_K
    } else {
        QK
    }
}

/// Quantized activations in groups of `LANES`, laid out for the tile kernels.
pub(in crate::kernels::quant) struct Panel {
    cols: usize,
    /// `[group][cols / 4][LANES][4]`: each activation value plus 128, as unsigned bytes.
    q: Vec<u8>,
    /// `[group][block][LANES]`: the activation scales.
    d: Vec<f32>,
    /// Q8_K only, `[group][super-block][4][LANES]`: the sums of sub-blocks `2p` and `2p + 1` (32
    /// values each) as the low and high i16 of one i32, for Q4_K's minimums.
    sums: Vec<i32>,
}

impl Panel {
    /// `x` quantized for a weight of type `ty` with `cols` columns (`QWeight::quantize`).
    pub(in crate::kernels::quant) fn new(x: &[Q8Row], ty: TensorType, cols: usize) -> Panel {
        let groups = x.len().div_ceil(LANES);
        let (quads, nb) = (cols / 4, cols / block_len(ty));
        let mut q = vec![0x80u8; groups * cols * LANES];
        let mut d = vec![0f32; groups * nb * LANES];
        let k_quant = block_len(ty) == QK_K;
        let mut sums = vec![0i32; if k_quant { groups * nb * 4 * LANES } else { 0 }];
        for (a, row) in x.iter().enumerate() {
            let (g, l) = (a / LANES, a % LANES);
            let dst = &mut q[g * cols * LANES..(g + 1) * cols * LANES];
            for (t, four) in row.q.chunks_exact(4).enumerate().take(quads) {
                let v = u32::from_le_bytes([four[0] as u8, four[1] as u8, four[2] as u8, four[3] as u8]) ^ 0x8080_8080;
                dst[(t * LANES + l) * 4..(t * LANES + l + 1) * 4].copy_from_slice(&v.to_le_bytes());
            }
            for b in 0..nb {
                d[(g * nb + b) * LANES + l] = row.d[b];
                if k_quant {
                    for p in 0..4 {
                        let s = &row.sums[b * 16 + 4 * p..b * 16 + 4 * p + 4];
                        let (lo, hi) = (s[0] as i32 + s[1] as i32, s[2] as i32 + s[3] as i32);
                        sums[((g * nb + b) * 4 + p) * LANES + l] = (lo as u16 as u32 | ((hi as u16 as u32) << 16)) as i32;
                    }
                }
            }
        }
        Panel { cols, q, d, sums }
    }
}

/// `TILE` weight rows decoded to signed bytes, with what each block needs besides them.
pub(in crate::kernels::quant) struct Tile {
    ty: TensorType,
    cols: usize,
    /// `[TILE][cols]`.
    q: Vec<i8>,
    /// `[TILE][block]`: the weight scale `d`; for Q4_K also `-dmin` in `dmin`.
    d: Vec<f32>,
    dmin: Vec<f32>,
    /// `[TILE][block][sub-block]`: Q4_K's 8 and Q6_K's 16 sub-block scales.
    sc: Vec<i32>,
    /// Q4_K, `[TILE][block][4]`: the minimums of sub-blocks `2p` and `2p + 1` as two i16.
    mins: Vec<i32>,
    /// `[TILE][block]`: `-128 * sum(w)` (K-quants: weighted by the sub-block scales), the
    /// excess of the unsigned activations.
    corr: Vec<i32>,
}

impl Tile {
    pub(in crate::kernels::quant) fn new(ty: TensorType, cols: usize) -> Tile {
        let nb = cols / block_len(ty);
        let nsub = match ty {
            TensorType::Q4K => 8,
            TensorType::Q6K => 16,
            _ => 0,
        };
        Tile {
            ty,
            cols,
            q: vec![0; TILE * cols],
            d: vec![0.0; TILE * nb],
            dmin: vec![0.0; TILE * nb],
            sc: vec![0; TILE * nb * nsub],
            mins: vec![0; TILE * nb * 4],
            corr: vec![0; TILE * nb],
        }
    }

    /// Whether this tile holds rows of type `ty`.
    pub(in crate::kernels::quant) fn decodes(&self, ty: TensorType) -> bool {
        self.ty == ty
    }

    /// Decodes `rows` (at most `TILE`, each one weight row's raw blocks); missing rows are zero.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    unsafe fn load(&mut self, rows: &[&[u8]]) {
        debug_assert!(rows.len() <= TILE);
        let nb = self.cols / block_len(self.ty);
        for r in 0..TILE {
            let q = &mut self.q[r * self.cols..(r + 1) * self.cols];
            let Some(row) = rows.get(r) else {
                q.fill(0);
                self.d[r * nb..(r + 1) * nb].fill(0.0);
                self.dmin[r * nb..(r + 1) * nb].fill(0.0);
                self.corr[r * nb..(r + 1) * nb].fill(0);
                continue;
            };
            for b in 0..nb {
                let i = r * nb + b;
                match self.ty {
                    TensorType::Q4K => {
                        let blk = &row[b * 144..(b + 1) * 144];
                        // 8 scale bytes, then 8 minimum bytes.
                        let words = q4_k_scale_words(&blk[4..16]);
                        let sm = _mm_set_epi32(words[3] as i32, words[2] as i32, words[1] as i32, words[0] as i32);
                        self.d[i] = f16_at(blk, 0);
                        self.dmin[i] = -f16_at(blk, 2);
                        _mm256_storeu_si256(self.sc.as_mut_ptr().add(i * 8) as *mut __m256i, _mm256_cvtepu8_epi32(sm));
                        // The minimums as 16-bit pairs: bytes widened to 16 bits are those pairs.
                        _mm_storeu_si128(self.mins.as_mut_ptr().add(i * 4) as *mut __m128i, _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8)));
                        // sum_j sc_j * sum(w)_j, in the four 64-bit lanes of `sad`.
                        let mut corr = _mm256_setzero_si256();
                        let m4 = _mm256_set1_epi8(0x0F);
                        for j in 0..4 {
                            let bits = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * j) as *const __m256i);
                            let (lo, hi) = (_mm256_and_si256(bits, m4), _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4));
                            let dst = q.as_mut_ptr().add(b * QK_K + 64 * j);
                            _mm256_storeu_si256(dst as *mut __m256i, lo);
                            _mm256_storeu_si256(dst.add(32) as *mut __m256i, hi);
                            let (sl, sh) = ((words[j / 2] >> (16 * (j % 2))) & 0xFF, (words[j / 2] >> (16 * (j % 2) + 8)) & 0xFF);
                            corr = _mm256_add_epi64(corr, _mm256_mul_epu32(_mm256_sad_epu8(lo, _mm256_setzero_si256()), _mm256_set1_epi64x(sl as i64)));
                            corr = _mm256_add_epi64(corr, _mm256_mul_epu32(_mm256_sad_epu8(hi, _mm256_setzero_si256()), _mm256_set1_epi64x(sh as i64)));
                        }
                        self.corr[i] = -128 * hsum_i64(corr) as i32;
                    }
                    TensorType::Q6K => {
                        let blk = row.as_ptr().add(b * 210);
                        self.d[i] = f16_at(&row[b * 210..], 208);
                        let scales: [i8; 16] = std::ptr::read_unaligned(blk.add(192) as *const [i8; 16]);
                        // sum_i sc_i * sum(u)_i in the 64-bit lanes of `sad` (lanes 0-1: the
                        // first 16 bytes, lanes 2-3: the next 16); u = w + 32 is subtracted after.
                        let mut corr = _mm256_setzero_si256();
                        for j in 0..2 {
                            for (k, &u) in q6_values(blk, j).iter().enumerate() {
                                let dst = q.as_mut_ptr().add(b * QK_K + 128 * j + 32 * k);
                                _mm256_storeu_si256(dst as *mut __m256i, _mm256_sub_epi8(u, _mm256_set1_epi8(32)));
                                let sub = 8 * j + 2 * k;
                                let (s0, s1) = (scales[sub] as i64, scales[sub + 1] as i64);
                                corr = _mm256_add_epi64(corr, _mm256_mul_epi32(_mm256_sad_epu8(u, _mm256_setzero_si256()), _mm256_set_epi64x(s1, s1, s0, s0)));
                            }
                        }
                        let sc = _mm_loadu_si128(blk.add(192) as *const __m128i);
                        let sc32 = [_mm256_cvtepi8_epi32(sc), _mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))];
                        _mm256_storeu_si256(self.sc.as_mut_ptr().add(i * 16) as *mut __m256i, sc32[0]);
                        _mm256_storeu_si256(self.sc.as_mut_ptr().add(i * 16 + 8) as *mut __m256i, sc32[1]);
                        let sc_sum: i32 = scales.iter().map(|&s| s as i32).sum();
                        self.corr[i] = -128 * (hsum_i64(corr) as i32 - 32 * 16 * sc_sum);
                    }
                    ty => {
                        // Q5_0 and Q8_0: signed bytes; their sum through the unsigned `sad` of w + 128.
                        let blk = row.as_ptr().add(b * self.ty.block().1 as usize);
                        let (w, d) = if ty == TensorType::Q5_0 { signed_block::<true>(blk) } else { signed_block::<false>(blk) };
                        self.d[i] = d;
                        _mm256_storeu_si256(q.as_mut_ptr().add(b * QK) as *mut __m256i, w);
                        let biased = _mm256_xor_si256(w, _mm256_set1_epi8(0x80u8 as i8));
                        self.corr[i] = -128 * (byte_sum(biased) - 128 * 32);
                    }
                }
            }
        }
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The sum of 32 unsigned bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn byte_sum(v: __m256i) -> i32 {
    let s = _mm256_sad_epu8(v, _mm256_setzero_si256());
    let s = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    _mm_cvtsi128_si32(_mm_add_epi64(s, _mm_unpackhi_epi64(s, s)))
}

/// The sum of 4 64-bit lanes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum_i64(v: __m256i) -> i64 {
    let s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_cvtsi128_si64(_mm_add_epi64(s, _mm_unpackhi_epi64(s, s)))
}

/// 4 bytes of weight row `r` at value `k`, in all 16 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn w4(tile: &Tile, r: usize, k: usize) -> __m512i {
    // A broadcast straight from memory is a load; through a general register it would take a
    // slot on the vector port the products need.
    _mm512_broadcastd_epi32(_mm_loadu_si32(tile.q.as_ptr().add(r * tile.cols + k) as *const _))
}

/// The 64 bytes of activation quad `t` (values `4t..4t + 4` of 16 activations) in group `g`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn x4(panel: &Panel, g: usize, t: usize) -> __m512i {
    _mm512_loadu_si512(panel.q.as_ptr().add((g * panel.cols / 4 + t) * LANES * 4) as *const _)
}

/// The tile's `TILE` rows against activation groups `g0..g0 + G` of `panel`: `[group][row]`,
/// 16 lanes each. Two groups at a time let each broadcast weight word serve 32 activations.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn products<const G: usize>(tile: &Tile, panel: &Panel, g0: usize) -> [[__m512; TILE]; G] {
    debug_assert_eq!(tile.cols, panel.cols);
    match tile.ty {
        TensorType::Q4K => q4_k::<G>(tile, panel, g0),
        TensorType::Q6K => q6_k::<G>(tile, panel, g0),
        _ => blocks32::<G>(tile, panel, g0),
    }
}

// The kernels below use plain loops, no closures: a closure is not inlined into them with their
// target features.

/// `raw[i][r] += <w_r, x>` over `Q` quads from quad `t0`, for the activations of group `g0 + i`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn dots<const G: usize, const Q: usize>(tile: &Tile, panel: &Panel, g0: usize, t0: usize, raw: &mut [[__m512i; TILE]; G]) {
    for t in t0..t0 + Q {
        let mut x = [_mm512_setzero_si512(); G];
        for i in 0..G {
            x[i] = x4(panel, g0 + i, t);
        }
        for r in 0..TILE {
            let w = w4(tile, r, 4 * t);
            for i in 0..G {
                raw[i][r] = _mm512_dpbusd_epi32(raw[i][r], x[i], w);
            }
        }
    }
}

/// The blocks' `corr` (see `Tile`) of block `b` in every lane: where each block's sums start.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn start<const G: usize>(tile: &Tile, nb: usize, b: usize) -> [[__m512i; TILE]; G] {
    let mut s = [[_mm512_setzero_si512(); TILE]; G];
    for r in 0..TILE {
        let c = _mm512_set1_epi32(*tile.corr.get_unchecked(r * nb + b));
        for i in 0..G {
            s[i][r] = c;
        }
    }
    s
}

/// `sum[i][r] += raw[i][r] * sc[r]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn add_scaled<const G: usize>(sum: &mut [[__m512i; TILE]; G], raw: &[[__m512i; TILE]; G], sc: &[i32], stride: usize) {
    for r in 0..TILE {
        let s = _mm512_set1_epi32(*sc.get_unchecked(r * stride));
        for i in 0..G {
            sum[i][r] = _mm512_add_epi32(sum[i][r], _mm512_mullo_epi32(raw[i][r], s));
        }
    }
}

/// `acc[i][r] = fma(d_x * d_w[r], f32(sum[i][r]), acc[i][r])` with group `g0 + i`'s scales `d_x`
/// of block `b` (the scalar kernel's step, lane by lane).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn scale_into<const G: usize>(acc: &mut [[__m512; TILE]; G], sum: &[[__m512i; TILE]; G], panel: &Panel, g0: usize, nb: usize, b: usize, dw: &[f32]) {
    for i in 0..G {
        let xd = _mm512_loadu_ps(panel.d.as_ptr().add(((g0 + i) * nb + b) * LANES));
        for r in 0..TILE {
            let d = _mm512_mul_ps(xd, _mm512_set1_ps(*dw.get_unchecked(r * nb + b)));
            acc[i][r] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sum[i][r]), acc[i][r]);
        }
    }
}

/// Q5_0 and Q8_0: per block of 32, an exact sum, then `acc = fma(d_w * d_x, sum, acc)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn blocks32<const G: usize>(tile: &Tile, panel: &Panel, g0: usize) -> [[__m512; TILE]; G] {
    let nb = tile.cols / QK;
    let mut acc = [[_mm512_setzero_ps(); TILE]; G];
    for b in 0..nb {
        let mut s = start::<G>(tile, nb, b);
        dots::<G, { QK / 4 }>(tile, panel, g0, b * QK / 4, &mut s);
        scale_into(&mut acc, &s, panel, g0, nb, b, &tile.d);
    }
    acc
}

/// Q4_K: per super-block, `sum_j sc_j <w, x>_j` and `sum_j m_j sum(x)_j` exact, then the
/// scalar kernel's two accumulators.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn q4_k<const G: usize>(tile: &Tile, panel: &Panel, g0: usize) -> [[__m512; TILE]; G] {
    let nb = tile.cols / QK_K;
    let mut acc = [[_mm512_setzero_ps(); TILE]; G];
    let mut acc_m = [[_mm512_setzero_ps(); TILE]; G];
    for b in 0..nb {
        let mut sumi = start::<G>(tile, nb, b);
        for j in 0..8 {
            let mut raw = [[_mm512_setzero_si512(); TILE]; G];
            dots::<G, 8>(tile, panel, g0, (b * QK_K + 32 * j) / 4, &mut raw);
            add_scaled(&mut sumi, &raw, &tile.sc[b * 8 + j..], nb * 8);
        }
        let mut summ = [[_mm512_setzero_si512(); TILE]; G];
        for i in 0..G {
            for p in 0..4 {
                let sums = _mm512_loadu_si512(panel.sums.as_ptr().add((((g0 + i) * nb + b) * 4 + p) * LANES) as *const _);
                for r in 0..TILE {
                    let m = _mm512_set1_epi32(*tile.mins.get_unchecked((r * nb + b) * 4 + p));
                    summ[i][r] = _mm512_dpwssd_epi32(summ[i][r], sums, m);
                }
            }
        }
        scale_into(&mut acc, &sumi, panel, g0, nb, b, &tile.d);
        scale_into(&mut acc_m, &summ, panel, g0, nb, b, &tile.dmin);
    }
    for i in 0..G {
        for r in 0..TILE {
            acc[i][r] = _mm512_add_ps(acc[i][r], acc_m[i][r]);
        }
    }
    acc
}

/// Q6_K: per super-block, `sum_i sc_i <w, x>_i` over 16 sub-blocks of 16, exact.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn q6_k<const G: usize>(tile: &Tile, panel: &Panel, g0: usize) -> [[__m512; TILE]; G] {
    let nb = tile.cols / QK_K;
    let mut acc = [[_mm512_setzero_ps(); TILE]; G];
    for b in 0..nb {
        let mut sumi = start::<G>(tile, nb, b);
        for j in 0..16 {
            let mut raw = [[_mm512_setzero_si512(); TILE]; G];
            dots::<G, 4>(tile, panel, g0, (b * QK_K + 16 * j) / 4, &mut raw);
            add_scaled(&mut sumi, &raw, &tile.sc[b * 16 + j..], nb * 16);
        }
        scale_into(&mut acc, &sumi, panel, g0, nb, b, &tile.d);
    }
    acc
}

/// One task of the tiled product: `rows` (at most `TILE` weight rows) decoded into `tile`, then
/// run against every activation group of `panel`. Result `(a, r)` goes to `out[a * ld + r]`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
pub(in crate::kernels::quant) unsafe fn run(tile: &mut Tile, panel: &Panel, rows: &[&[u8]], m: usize, out: *mut f32, ld: usize) {
    let groups = m.div_ceil(LANES);
    debug_assert!(panel.q.len() >= groups * panel.cols * LANES && ld < (i32::MAX as usize) / LANES);
    tile.load(rows);
    let mut g0 = 0;
    while g0 < groups {
        match groups - g0 {
            1 => store(&products::<1>(tile, panel, g0), g0, rows.len(), m, out, ld),
            2 => store(&products::<2>(tile, panel, g0), g0, rows.len(), m, out, ld),
            _ => store(&products::<GROUPS>(tile, panel, g0), g0, rows.len(), m, out, ld),
        }
        g0 += GROUPS.min(groups - g0);
    }
}

/// Rows `..n` of `v` (groups `g0..`) to `out[a * ld + r]`: lane `l` of group `g` is activation
/// `16 g + l`, so each vector scatters down one column.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn store<const G: usize>(v: &[[__m512; TILE]; G], g0: usize, n: usize, m: usize, out: *mut f32, ld: usize) {
    let step = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(ld as i32));
    for (i, v) in v.iter().enumerate() {
        let g = g0 + i;
        // Lanes past the last activation hold padding; a mask keeps them out.
        let mask = ((1u32 << (m - g * LANES).min(LANES)) - 1) as u16;
        for (r, v) in v.iter().take(n).enumerate() {
            _mm512_mask_i32scatter_ps::<4>(out.add(g * LANES * ld + r) as *mut _, mask, step, *v);
        }
    }
}
