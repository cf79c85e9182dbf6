//! Activations quantized the way ggml's CPU kernels read them: per 32-block to Q8_1 / Q8_0, or
//! per 256-block to Q8_K, with round-half-even.

use half::f16;

/// Values per 32-block (Q4_1, Q5_0, Q8_0, Q8_1).
pub(super) const QK: usize = 32;
/// Values per K-quant super-block.
pub(super) const QK_K: usize = 256;

/// Activations quantized to 8 bits per 32-block: scale `d`, `s = d * sum(q)` (Q8_1 only), values;
/// or per 256-block (Q8_K): scale `d`, values, and `sums` of each 16 values.
pub(crate) struct Q8Row {
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    pub(super) q: Vec<i8>,
    pub(super) sums: Vec<i16>,
}

/// The quantized form a weight type's kernels read their activations in. Weights whose types
/// share a format (Q5_0 and Q8_0; Q4_K and Q6_K) can share one quantized vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActFormat {
    Q8_1,
    Q8_0,
    Q8K,
}

/// ggml's `quantize_row_q8_1` / `quantize_row_q8_0` (AVX2 flavour: `q = round_half_even(x * 127 / amax)`).
pub(super) fn quantize_q8(x: &[f32], with_sum: bool) -> Q8Row {
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

/// One super-block of ggml's `quantize_row_q8_K_ref` (`dispatch::quantize_q8_k` runs it per
/// block, or its AVX-512 twin): `q = min(127, round_half_even(x * -127 / max))` where `max` is
/// the value of largest magnitude (so the scale `d = 1 / (-127 / max)` may be negative), kept in
/// f32, and the sum of each 16 values. Returns the scale.
pub(super) fn q8_k_block(x: &[f32; QK_K], q: &mut [i8; QK_K], sums: &mut [i16; 16]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    if amax == 0.0 {
        q.fill(0);
        sums.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (qv, &v) in q.iter_mut().zip(x) {
        *qv = (round_half_even(iscale * v) as i32).min(127) as i8;
    }
    for (sum, g) in sums.iter_mut().zip(q.chunks_exact(16)) {
        *sum = g.iter().map(|&v| v as i16).sum();
    }
    1.0 / iscale
}

/// Round half to even for |v| < 2^22 (here |v| <= 127): adding 1.5 * 2^23 pushes the fraction
/// out of the mantissa under the default rounding mode, without a libm call.
#[inline]
pub(super) fn round_half_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}
