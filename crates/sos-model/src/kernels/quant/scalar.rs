//! Scalar kernels: one weight row of ggml blocks against quantized activations. The reference
//! the SIMD kernels are tested against, and the path on CPUs without AVX2.
//!
//! Q5_0, Q8_0, Q4_K and Q6_K follow one rule that every kernel keeps (see `mod.rs`): a block's
//! integer sum is exact, and blocks meet their f32 scale `d_x * d_w` in order through one fused
//! multiply-add each; so all kernels, whatever their lanes, give these functions' bits.

use half::f16;

use super::act::{Q8Row, QK, QK_K};

#[inline]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Scalar Q4_1 row against Q8_1 activations: `sum_b d_w d_x <q_w, q_x> + m_w s_x`.
pub(super) fn dot_q4_1_q8_1(w: &[u8], x: &Q8Row) -> f32 {
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

pub(super) fn dot_q5_0_q8_0(w: &[u8], x: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (b, blk) in w.chunks_exact(22).enumerate() {
        let q = &x.q[b * QK..(b + 1) * QK];
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let sumi: i32 = (0..QK).map(|j| q5_0_value(&blk[6..], qh, j) * q[j] as i32).sum();
        sumf = (f16_at(blk, 0) * x.d[b]).mul_add(sumi as f32, sumf);
    }
    sumf
}

pub(super) fn dot_q8_0_q8_0(w: &[u8], x: &Q8Row) -> f32 {
    let mut sumf = 0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let q = &x.q[b * QK..(b + 1) * QK];
        let sumi: i32 = (0..QK).map(|j| blk[2 + j] as i8 as i32 * q[j] as i32).sum();
        sumf = (f16_at(blk, 0) * x.d[b]).mul_add(sumi as f32, sumf);
    }
    sumf
}

/// The 6-bit scales and mins of a Q4_K super-block's 8 sub-blocks (ggml's `get_scale_min_k4`).
pub(super) fn q4_k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let w = q4_k_scale_words(s);
    let bytes = |a: u32, b: u32| {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&a.to_le_bytes());
        out[4..].copy_from_slice(&b.to_le_bytes());
        out
    };
    (bytes(w[0], w[1]), bytes(w[2], w[3]))
}

/// A Q4_K block's 12 scale bytes as 8 scales then 8 mins, one byte each, in four little-endian
/// words (ggml's `utmp`): the 6-bit fields unpacked with word operations.
/// Plain statements, no closures: the SIMD kernels inline this, and a closure inside would stay
/// a call per element.
#[inline]
pub(super) fn q4_k_scale_words(s: &[u8]) -> [u32; 4] {
    const M1: u32 = 0x3f3f_3f3f;
    const M2: u32 = 0x0f0f_0f0f;
    const M3: u32 = 0x0303_0303;
    let s: &[u8; 12] = s[..12].try_into().expect("12 scale bytes");
    let u0 = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    let u1 = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
    let u2 = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
    [u0 & M1, (u2 & M2) | (((u0 >> 6) & M3) << 4), u1 & M1, ((u2 >> 4) & M2) | (((u1 >> 6) & M3) << 4)]
}

/// Scalar Q4_K row against Q8_K activations: per super-block `d_w d_x sum_j sc_j <q_w, q_x>_j -
/// dmin_w d_x sum_j m_j sum(q_x)_j` over its 8 sub-blocks of 32; the two terms in two
/// accumulators, added at the end (ggml's `acc` and `acc_m`).
pub(super) fn dot_q4_k_q8_k(w: &[u8], x: &Q8Row) -> f32 {
    let (mut acc, mut acc_m) = (0f32, 0f32);
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
        acc = (x.d[b] * f16_at(blk, 0)).mul_add(sumi as f32, acc);
        acc_m = (x.d[b] * -f16_at(blk, 2)).mul_add(summ as f32, acc_m);
    }
    acc + acc_m
}

/// Scalar Q6_K row against Q8_K activations: `d_w d_x sum_i sc_i <q_w - 32, q_x>_i` over the 16
/// sub-blocks of 16 of each super-block.
pub(super) fn dot_q6_k_q8_k(w: &[u8], x: &Q8Row) -> f32 {
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
        sumf = (x.d[b] * f16_at(blk, 208)).mul_add(sumi as f32, sumf);
    }
    sumf
}
