//! K-quant rows against Q8_K activations with AVX2 (`avx2`), and the same code with AVX-512's
//! encoding (`avx512`: 32 vector registers, for four activations at a time). Each super-block's
//! integer sums (ggml's AVX2 lanes) are added exactly and meet the f32 scales in one fused
//! multiply-add, as in the scalar kernels, so every variant gives the scalar kernel's bits.
//!
//! # Safety
//! As for `x86.rs`: the caller has detected AVX2, FMA and F16C, and the rows and activations hold
//! whole super-blocks.

macro_rules! k_kernels {
    ($name:ident, $feat:literal) => {
        pub mod $name {
        use super::super::super::act::{Q8Row, QK_K};
        use super::super::super::scalar::q4_k_scale_words;
        use super::super::{fma_rows, fma_rows4, q6_values};
        use std::arch::x86_64::*;

        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn f16_at(p: *const u8) -> f32 {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const u16) as i32)))
        }

        /// Scale `k` of the 8 16-bit scales in each half of `scales`, in every 16-bit lane.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn q4_scale(scales: __m256i, k: i32) -> __m256i {
            _mm256_shuffle_epi8(scales, _mm256_set1_epi16((((2 * k + 1) << 8) | (2 * k)) as i16))
        }

        /// `N` Q4_K rows against `A` activation rows (each weight block decoded once for all of
        /// them); `[a][i]` equals the result for row `i` alone against activation `a` alone. Plain
        /// loops, no closures: a closure does not inherit the target features and is not inlined.
        #[target_feature(enable = $feat)]
        pub unsafe fn dot_q4_k_q8_k<const N: usize, const A: usize>(w: [&[u8]; N], x: [&Q8Row; A]) -> [[f32; N]; A] {
            let nb = w[0].len() / 144;
            debug_assert!(w.iter().all(|r| r.len() == w[0].len()));
            debug_assert!(x.iter().all(|x| x.q.len() >= nb * QK_K && x.d.len() >= nb && x.sums.len() >= nb * 16));
            let m4 = _mm256_set1_epi8(0x0F);
            let mut acc = [[0f32; N]; A];
            let mut acc_m = [[0f32; N]; A];
            let mut q8s = [_mm_setzero_si128(); A];
            let mut out = [[0f32; N]; A];
            for b in 0..nb {
                let (mut sumi, mut summ) = ([[_mm256_setzero_si256(); N]; A], [[_mm_setzero_si128(); N]; A]);
                let (mut dw, mut mw) = ([0f32; N], [0f32; N]);
                for a in 0..A {
                    // Sums of the 8 sub-blocks of 32: pairs of 16-sums.
                    let s = _mm256_loadu_si256(x[a].sums.as_ptr().add(b * 16) as *const __m256i);
                    q8s[a] = _mm_hadd_epi16(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
                }
                for i in 0..N {
                    let blk = w[i].as_ptr().add(b * 144);
                    (dw[i], mw[i]) = (f16_at(blk), f16_at(blk.add(2)));
                    let u = q4_k_scale_words(std::slice::from_raw_parts(blk.add(4), 12));
                    let mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32));
                    let mins = _mm256_extracti128_si256(mins_and_scales, 1);
                    let sc = _mm256_castsi256_si128(mins_and_scales);
                    let scales = _mm256_set_m128i(sc, sc);
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
                            sumi[a][i] = _mm256_add_epi32(sumi[a][i], _mm256_add_epi32(p16l, p16h));
                        }
                    }
                    for a in 0..A {
                        summ[a][i] = _mm_madd_epi16(mins, q8s[a]);
                    }
                }
                for a in 0..A {
                    let yd = *x[a].d.get_unchecked(b);
                    let (mut d, mut dm) = ([0f32; N], [0f32; N]);
                    for i in 0..N {
                        (d[i], dm[i]) = (yd * dw[i], yd * -mw[i]);
                    }
                    fma_rows(&mut acc[a], d, sumi[a]);
                    fma_rows4(&mut acc_m[a], dm, summ[a]);
                }
            }
            for a in 0..A {
                for i in 0..N {
                    out[a][i] = acc[a][i] + acc_m[a][i];
                }
            }
            out
        }

        /// Scales `2s` and `2s + 1` of a Q6_K block (16 bytes at `scales`), eight 16-bit lanes each.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn q6_scale(scales: __m128i, s: i64) -> __m256i {
            let pick = _mm_set_epi64x((2 * s + 1) * 0x0101_0101_0101_0101, 2 * s * 0x0101_0101_0101_0101);
            _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, pick))
        }

        /// `N` Q6_K rows against `A` activation rows, as `dot_q4_k_q8_k`. Plain loops, no
        /// closures: a closure does not inherit the target features and is not inlined here.
        #[target_feature(enable = $feat)]
        pub unsafe fn dot_q6_k_q8_k<const N: usize, const A: usize>(w: [&[u8]; N], x: [&Q8Row; A]) -> [[f32; N]; A] {
            let nb = w[0].len() / 210;
            debug_assert!(w.iter().all(|r| r.len() == w[0].len()));
            debug_assert!(x.iter().all(|x| x.q.len() >= nb * QK_K && x.d.len() >= nb));
            let m32s = _mm256_set1_epi8(32);
            let mut acc = [[0f32; N]; A];
            for b in 0..nb {
                let mut sumi = [[_mm256_setzero_si256(); N]; A];
                let mut dw = [0f32; N];
                for i in 0..N {
                    let blk = w[i].as_ptr().add(b * 210);
                    dw[i] = f16_at(blk.add(208));
                    let scales = _mm_loadu_si128(blk.add(192) as *const __m128i);
                    for j in 0..2 {
                        let q6 = q6_values(blk, j);
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
                            sumi[a][i] = _mm256_add_epi32(sumi[a][i], _mm256_add_epi32(p16[0], p16[1]));
                            sumi[a][i] = _mm256_add_epi32(sumi[a][i], _mm256_add_epi32(p16[2], p16[3]));
                        }
                    }
                }
                for a in 0..A {
                    let mut d = [0f32; N];
                    for i in 0..N {
                        d[i] = *x[a].d.get_unchecked(b) * dw[i];
                    }
                    fma_rows(&mut acc[a], d, sumi[a]);
                }
            }
            acc
        }
        }
    };
}

k_kernels!(avx2, "avx2,fma,f16c");
k_kernels!(avx512, "avx2,fma,f16c,avx512f,avx512vl,avx512bw");
