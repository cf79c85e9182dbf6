//! `act.rs`'s Q8_K quantization with AVX-512: the same steps on 16 lanes, so the same bytes.
//!
//! # Safety
//! The caller has detected AVX-512 F/BW (`Isa::Vnni512`).

use std::arch::x86_64::*;

/// One 256-value super-block of `quantize_q8_k`: returns its scale `d` and fills `q` and the 16
/// sums of 16 values; an all-zero block gives `d = 0` and zeros.
#[target_feature(enable = "avx512f,avx512bw")]
pub(in crate::kernels::quant) unsafe fn q8_k_block(x: &[f32; 256], q: &mut [i8; 256], sums: &mut [i16; 16]) -> f32 {
    let p = x.as_ptr();
    let mut amax = _mm512_setzero_ps();
    for i in 0..16 {
        // Operands in this order so that a NaN value is skipped, as the scalar loop skips it.
        amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(p.add(16 * i))), amax);
    }
    let amax = _mm512_reduce_max_ps(amax);
    if amax == 0.0 {
        q.fill(0);
        sums.fill(0);
        return 0.0;
    }
    // ggml keeps the first value of largest magnitude (its sign decides the scale's).
    let mut max = amax;
    for i in 0..16 {
        let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(_mm512_loadu_ps(p.add(16 * i))), _mm512_set1_ps(amax));
        if hit != 0 {
            max = x[16 * i + hit.trailing_zeros() as usize];
            break;
        }
    }
    let iscale = -127.0 / max;
    for (i, sum) in sums.iter_mut().enumerate() {
        // Round half to even (the default rounding mode) as `round_half_even`, then the clamp.
        let v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_set1_ps(iscale), _mm512_loadu_ps(p.add(16 * i))));
        let v = _mm512_min_epi32(v, _mm512_set1_epi32(127));
        let bytes = _mm512_cvtepi32_epi8(v);
        _mm_storeu_si128(q.as_mut_ptr().add(16 * i) as *mut __m128i, bytes);
        // Summed from the stored bytes: a NaN input converts to i32::MIN and is stored as 0.
        *sum = _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(bytes)) as i16;
    }
    1.0 / iscale
}
