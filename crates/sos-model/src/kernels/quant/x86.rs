//! AVX2 and AVX-VNNI kernels for Q4_1, Q5_0 and Q8_0 rows; `k.rs` holds the K-quant ones.
//!
//! # Safety
//! Every function here is `unsafe` for two reasons, which `dispatch.rs` answers at its one call
//! site: the CPU must have the features it is compiled for (`Isa::detect` checked them), and
//! its pointer reads must stay inside the rows and activations it gets (`QWeight::new` checked
//! each row's length against its type's blocks; `rows_into` checks the activations with `fits`).

/// The x86 kernels, instantiated twice: with AVX2 (`maddubs` + `madd`) and with AVX-VNNI
/// (`vpdpbusd`, one instruction for the same sums; the products never saturate here: at most
/// 2 * 15 * 127 or 2 * 127 * 127 per pair).
macro_rules! x86_kernels {
    ($name:ident, $feat:literal, |$a:ident, $b:ident| $udot:expr) => {
        pub mod $name {
            use super::super::act::{Q8Row, QK};
            use super::{f16x2, fma_rows, hsum, nibbles, signed_block};
            use std::arch::x86_64::*;

            /// Unsigned bytes `a` times signed bytes `b`, summed in fours into 8 i32 lanes.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn udot($a: __m256i, $b: __m256i) -> __m256i {
                $udot
            }

            /// Signed bytes times signed bytes, via |a| and b with a's sign.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn sdot(a: __m256i, b: __m256i) -> __m256i {
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
                        acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(_mm_cvtss_f32(dm) * d), _mm256_cvtepi32_ps(udot(nibbles(blk.add(4)), qx)), acc[i]);
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
                            acc[a][i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * d[a]), _mm256_cvtepi32_ps(udot(qw, qx[a])), acc[a][i]);
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

            /// `N` Q5_0 (`Q5`) or Q8_0 rows against `M` Q8_0 activation rows (`M` = 1: one), each
            /// block decoded once for all of them. Every (row, activation) pair follows the scalar
            /// kernel's arithmetic (an exact integer sum per block, one fused multiply-add with
            /// `d_w * d_x`), so results equal it bit for bit whatever `N` and `M` are.
            #[target_feature(enable = $feat)]
            pub unsafe fn dotnm_signed<const N: usize, const M: usize, const Q5: bool>(w: [&[u8]; N], x: [&Q8Row; M]) -> [[f32; N]; M] {
                let bb = if Q5 { 22 } else { 34 };
                let nb = w[0].len() / bb;
                debug_assert!(w.iter().all(|r| r.len() == w[0].len()) && x.iter().all(|x| x.q.len() >= nb * QK && x.d.len() >= nb));
                let mut acc = [[0f32; N]; M];
                let p = w.map(|r| r.as_ptr());
                for b in 0..nb {
                    let (mut qx, mut d) = ([_mm256_setzero_si256(); M], [0f32; M]);
                    for a in 0..M {
                        (qx[a], d[a]) = (_mm256_loadu_si256(x[a].q.as_ptr().add(b * QK) as *const __m256i), *x[a].d.get_unchecked(b));
                    }
                    let (mut qw, mut dw) = ([_mm256_setzero_si256(); N], [0f32; N]);
                    for i in 0..N {
                        (qw[i], dw[i]) = signed_block::<Q5>(p[i].add(b * bb));
                    }
                    for a in 0..M {
                        let (mut sums, mut dd) = ([_mm256_setzero_si256(); N], [0f32; N]);
                        for i in 0..N {
                            (sums[i], dd[i]) = (sdot(qw[i], qx[a]), dw[i] * d[a]);
                        }
                        fma_rows(&mut acc[a], dd, sums);
                    }
                }
                acc
            }
        }
    };
}

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

/// The two f16 values at `p` as f32 lanes 0 and 1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16x2(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)))
}

/// 16 bytes of nibbles -> 32 bytes: low nibbles (values 0..16), then high (16..32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let low = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low))
}

/// A Q5_0 (`Q5`) or Q8_0 block at `blk` as 32 signed bytes and its scale, for the
/// one-activation kernels and the tiled ones' decoding. Q5_0: bytes whose fifth bit is clear get
/// 0xF0, which turns `nibble - 16` into the signed byte directly.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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

/// Half `j` of a Q6_K block at `blk` (values `128 j..128 j + 128`) as four vectors of 32 unsigned
/// values 0..64 (the stored `q`, before the offset of 32), for the one-activation and tiled kernels.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_values(blk: *const u8, j: usize) -> [__m256i; 4] {
    /// The upper two bits of a value, from bits `SHIFT..SHIFT + 2` of `high`, moved to bits 4-5.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn high2<const SHIFT: i32>(high: __m256i) -> __m256i {
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, SHIFT), _mm256_set1_epi8(3)), 4)
    }
    let m4 = _mm256_set1_epi8(0x0F);
    let (ql, qh) = (blk.add(64 * j), blk.add(128 + 32 * j));
    let bits1 = _mm256_loadu_si256(ql as *const __m256i);
    let bits2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
    let high = _mm256_loadu_si256(qh as *const __m256i);
    [
        _mm256_or_si256(_mm256_and_si256(bits1, m4), high2::<0>(high)),
        _mm256_or_si256(_mm256_and_si256(bits2, m4), high2::<2>(high)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits1, 4), m4), high2::<4>(high)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits2, 4), m4), high2::<6>(high)),
    ]
}

/// The exact sum of 8 integer lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    hsum4_i32(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)))
}

/// The exact sum of 4 integer lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum4_i32(s: __m128i) -> i32 {
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)))
}

/// `acc[i] = d[i] * (sum of s[i]'s lanes) + acc[i]`, rounded once (`f32::mul_add`). The integer
/// sums are exact, so this is the scalar kernels' step bit for bit; four rows at a time share
/// the horizontal adds.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_rows<const N: usize>(acc: &mut [f32; N], d: [f32; N], s: [__m256i; N]) {
    let mut i = 0;
    while i + 4 <= N {
        // hadd pairs lanes; three of them leave row r's partial sums in lane r of both halves.
        let h = _mm256_hadd_epi32(_mm256_hadd_epi32(s[i], s[i + 1]), _mm256_hadd_epi32(s[i + 2], s[i + 3]));
        let t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        let a = _mm_fmadd_ps(_mm_loadu_ps(d.as_ptr().add(i)), _mm_cvtepi32_ps(t), _mm_loadu_ps(acc.as_ptr().add(i)));
        _mm_storeu_ps(acc.as_mut_ptr().add(i), a);
        i += 4;
    }
    while i < N {
        acc[i] = d[i].mul_add(hsum_i32(s[i]) as f32, acc[i]);
        i += 1;
    }
}

/// `fma_rows` for sums in 4 integer lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_rows4<const N: usize>(acc: &mut [f32; N], d: [f32; N], s: [__m128i; N]) {
    let mut i = 0;
    while i + 4 <= N {
        let t = _mm_hadd_epi32(_mm_hadd_epi32(s[i], s[i + 1]), _mm_hadd_epi32(s[i + 2], s[i + 3]));
        let a = _mm_fmadd_ps(_mm_loadu_ps(d.as_ptr().add(i)), _mm_cvtepi32_ps(t), _mm_loadu_ps(acc.as_ptr().add(i)));
        _mm_storeu_ps(acc.as_mut_ptr().add(i), a);
        i += 4;
    }
    while i < N {
        acc[i] = d[i].mul_add(hsum4_i32(s[i]) as f32, acc[i]);
        i += 1;
    }
}

x86_kernels!(avx2, "avx2,fma,f16c", |a, b| _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
x86_kernels!(vnni, "avx2,fma,f16c,avxvnni", |a, b| _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b));
// The same 256-bit kernels with AVX-512's encoding: 32 vector registers, which hold the 16
// accumulators of 4 rows x 4 activations (`dotnm_signed`) without spilling.
x86_kernels!(vnni512, "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni", |a, b| _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b));


pub mod act;
pub mod k;
pub mod tiled;
