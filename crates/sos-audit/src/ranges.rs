//! Which inputs a stored element could have been quantized from. A quantizer's last pass maps
//! each input to the nearest code under the block's stored scales (ggml's reference quantizers,
//! legacy and K types alike), so the code fixes an interval of inputs: half a step either side,
//! open at a code the quantizer clamps to. Two copies of a tensor are re-quantizations of one
//! source only if, element by element, their intervals meet; an element whose intervals are
//! disjoint was changed. The test never guesses a tolerance, so it never calls a re-quantization
//! a change; what it cannot see is a change that stays inside both intervals (the error budget
//! the "Mind the Gap" attack hides in), and it says so through the intervals' widths.

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::Device;
use half::f16;
use sos_model::gguf::TensorType;

use crate::{Error, Result};

/// f16's relative rounding: scales stored as f16 were rounded from the f32 the quantizer used.
const F16_REL: f32 = 1.0 / 2048.0;

/// Per element: the stored value and the interval `[lo, hi]` of inputs that store as it.
#[derive(Debug, Clone, Default)]
pub struct Ranges {
    pub value: Vec<f32>,
    pub lo: Vec<f32>,
    pub hi: Vec<f32>,
}

/// Whether intervals can be derived for `ty` (Q2_K, Q3_K and Q8_K: not yet).
pub fn supported(ty: TensorType) -> bool {
    !matches!(ty, TensorType::Q2K | TensorType::Q3K | TensorType::Q8K)
}

/// The f32 values of `n` elements stored as `ty` in `bytes` (whole blocks).
pub fn dequantize(ty: TensorType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    qtensor_from_ggml(ty.to_candle(), bytes, vec![n], &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.to_vec1())
        .map_err(|e| Error::Invalid(format!("{}: {e}", ty.name())))
}

/// The ranges of `n` elements stored as `ty` in `bytes` (whole blocks).
pub fn ranges(ty: TensorType, bytes: &[u8], n: usize) -> Result<Ranges> {
    if !supported(ty) {
        return Err(Error::Invalid(format!("no interval rule for {} yet", ty.name())));
    }
    let value = dequantize(ty, bytes, n)?;
    let (mut lo, mut hi) = (vec![0f32; n], vec![0f32; n]);
    let (bs, bb) = ty.block();
    let (bs, bb) = (bs as usize, bb as usize);
    for (b, block) in bytes.chunks_exact(bb).enumerate().take(n.div_ceil(bs)) {
        let at = b * bs;
        let v = &value[at..at + bs];
        let (l, h) = (&mut lo[at..at + bs], &mut hi[at..at + bs]);
        match ty {
            TensorType::F32 => {
                l.copy_from_slice(v);
                h.copy_from_slice(v);
            }
            TensorType::F16 => float_ulp(v, l, h, 10),
            TensorType::BF16 => float_ulp(v, l, h, 7),
            // x = (q - off) d; q = trunc(x / d + off + 0.5), clamped to the top code.
            TensorType::Q4_0 => offset_codes(v, l, h, f16_at(block, 0), 8.0, 15.0),
            TensorType::Q5_0 => offset_codes(v, l, h, f16_at(block, 0), 16.0, 31.0),
            // x = q d + m; q = trunc((x - m) / d + 0.5), clamped to the top code.
            TensorType::Q4_1 => min_codes(v, l, h, f16_at(block, 0), f16_at(block, 2), 15.0),
            TensorType::Q5_1 => min_codes(v, l, h, f16_at(block, 0), f16_at(block, 2), 31.0),
            // x = q d; q = round(x / d), never clamped (the largest |x| is exactly 127 steps).
            TensorType::Q8_0 => {
                let d = f16_at(block, 0);
                for i in 0..bs {
                    let q = if d == 0.0 { 0.0 } else { (v[i] / d).round() };
                    (l[i], h[i]) = scaled(q - 0.5, q + 0.5, d, 0.0);
                }
            }
            TensorType::Q4K | TensorType::Q5K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let top = if ty == TensorType::Q4K { 15.0 } else { 31.0 };
                for j in 0..8 {
                    let (sc, m) = scale_min_k4(j, &block[4..16]);
                    // The last pass: l = clamp(round((x + dm) / (d sc)), 0, top), exact scales.
                    let (de, dm) = (d * sc as f32, dmin * m as f32);
                    for i in j * 32..(j + 1) * 32 {
                        if de == 0.0 {
                            (l[i], h[i]) = (f32::NEG_INFINITY, f32::INFINITY);
                            continue;
                        }
                        let q = ((v[i] + dm) / de).round().clamp(0.0, top);
                        let a = if q == 0.0 { f32::NEG_INFINITY } else { (q - 0.5) * de - dm };
                        let b = if q == top { f32::INFINITY } else { (q + 0.5) * de - dm };
                        (l[i], h[i]) = widen(a, b);
                    }
                }
            }
            TensorType::Q6K => {
                let d = f16_at(block, 208);
                for j in 0..16 {
                    let de = d * block[192 + j] as i8 as f32;
                    // l = clamp(round(x / (d sc)), -32, 31).
                    for i in j * 16..(j + 1) * 16 {
                        if de == 0.0 {
                            (l[i], h[i]) = (f32::NEG_INFINITY, f32::INFINITY);
                            continue;
                        }
                        let q = (v[i] / de).round().clamp(-32.0, 31.0);
                        let a = if q == -32.0 { f32::NEG_INFINITY } else { q - 0.5 };
                        let b = if q == 31.0 { f32::INFINITY } else { q + 0.5 };
                        let (x, y) = (a * de, b * de);
                        (l[i], h[i]) = widen(x.min(y), x.max(y));
                    }
                }
            }
            TensorType::Q2K | TensorType::Q3K | TensorType::Q8K => unreachable!("refused above"),
        }
    }
    Ok(Ranges { value, lo, hi })
}

/// Whether the intervals of element `i` of `a` and of `b` meet.
pub fn meet(a: &Ranges, b: &Ranges, i: usize) -> bool {
    a.lo[i] <= b.hi[i] && b.lo[i] <= a.hi[i]
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// A float type with `mant` stored mantissa bits: half a unit in the last place either side.
fn float_ulp(v: &[f32], l: &mut [f32], h: &mut [f32], mant: i32) {
    for i in 0..v.len() {
        let e = if v[i] == 0.0 { -14 } else { v[i].abs().log2().floor() as i32 };
        let half_ulp = 2f32.powi(e.max(-14) - mant - 1);
        (l[i], h[i]) = (v[i] - half_ulp, v[i] + half_ulp);
    }
}

/// Codes `q - off` with step `d` (f16, so the quantizer's own `d` is within `F16_REL` of it).
fn offset_codes(v: &[f32], l: &mut [f32], h: &mut [f32], d: f32, off: f32, top: f32) {
    for i in 0..v.len() {
        let q = if d == 0.0 { off } else { (v[i] / d).round() + off };
        let b = if q >= top { f32::INFINITY } else { q - off + 0.5 };
        (l[i], h[i]) = scaled(q - off - 0.5, b, d, 0.0);
    }
}

/// Codes `q` with step `d` above the minimum `m` (both f16).
fn min_codes(v: &[f32], l: &mut [f32], h: &mut [f32], d: f32, m: f32, top: f32) {
    for i in 0..v.len() {
        let q = if d == 0.0 { 0.0 } else { ((v[i] - m) / d).round() };
        let b = if q >= top { f32::INFINITY } else { q + 0.5 };
        (l[i], h[i]) = scaled(q - 0.5, b, d, m);
    }
}

/// `[a, b] * d + m` over the quantizer's possible `d` and `m` (each within f16 rounding of the
/// stored one).
fn scaled(a: f32, b: f32, d: f32, m: f32) -> (f32, f32) {
    if d == 0.0 {
        return (f32::NEG_INFINITY, f32::INFINITY);
    }
    let ds = [d * (1.0 - F16_REL), d * (1.0 + F16_REL)];
    let dm = m.abs() * F16_REL + 6e-8;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for t in [a, b] {
        for dd in ds {
            let x = if t.is_infinite() { t * dd.signum() } else { t * dd };
            lo = lo.min(x);
            hi = hi.max(x);
        }
    }
    widen(lo + m - dm, hi + m + dm)
}

/// A hair wider, for the rounding of this arithmetic itself.
fn widen(a: f32, b: f32) -> (f32, f32) {
    let e = 1e-6 * a.abs().max(b.abs()).min(f32::MAX) + 1e-12;
    (a - e, b + e)
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Tensor;
    use rand::{Rng, SeedableRng};

    fn quantize(ty: TensorType, x: &[f32]) -> Vec<u8> {
        let t = Tensor::from_vec(x.to_vec(), (1, x.len()), &Device::Cpu).unwrap();
        QTensor::quantize(&t, ty.to_candle()).unwrap().data().unwrap().to_vec()
    }

    const TYPES: [TensorType; 10] = [
        TensorType::F32,
        TensorType::F16,
        TensorType::BF16,
        TensorType::Q4_0,
        TensorType::Q4_1,
        TensorType::Q5_0,
        TensorType::Q5_1,
        TensorType::Q8_0,
        TensorType::Q4K,
        TensorType::Q5K,
    ];

    /// Every source element lies in the interval of its stored code, for every type: so two
    /// quantizations of one source always meet (no false "changed").
    #[test]
    fn the_source_lies_in_every_interval() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let x: Vec<f32> = (0..2048).map(|i| rng.gen_range(-1.0f32..1.0) * if i % 97 == 0 { 8.0 } else { 1.0 }).collect();
        for ty in TYPES.into_iter().chain([TensorType::Q6K]) {
            let r = ranges(ty, &quantize(ty, &x), x.len()).unwrap();
            for (i, &xi) in x.iter().enumerate() {
                assert!(r.lo[i] <= xi && xi <= r.hi[i], "{}: element {i}: {xi} outside [{}, {}]", ty.name(), r.lo[i], r.hi[i]);
            }
            for other in TYPES {
                let s = ranges(other, &quantize(other, &x), x.len()).unwrap();
                assert!((0..x.len()).all(|i| meet(&r, &s, i)), "{} vs {}", ty.name(), other.name());
            }
        }
    }

    /// A change larger than the step shows; the same change inside the step does not.
    #[test]
    fn a_moved_element_is_seen_when_it_leaves_the_interval() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let x: Vec<f32> = (0..256).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let r = ranges(TensorType::Q8_0, &quantize(TensorType::Q8_0, &x), 256).unwrap();
        let mut y = x.clone();
        y[7] += 0.2;
        let s = ranges(TensorType::Q4_1, &quantize(TensorType::Q4_1, &y), 256).unwrap();
        assert!(!meet(&r, &s, 7));
        assert!((0..256).filter(|&i| i / 32 != 0).all(|i| meet(&r, &s, i)));
    }
}
