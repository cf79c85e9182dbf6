//! Elementwise math for the fused CPU passes, in forms the compiler vectorises.
//!
//! `exp` avoids libm: a call per element was ~5 % of a training step (silu, its derivative, and
//! two softmaxes). Reductions keep independent lanes so that they vectorise without reordering
//! being left to the compiler. `simd` runs a closure compiled for the best instruction set the
//! CPU has (through `pulp`, which `gemm` already uses), so the loops inside it use AVX2 or
//! AVX-512 where present; everything here is `inline(always)` so it lands inside that closure.

/// Runs `f` compiled for the best available instruction set.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// How far ahead of the weight rows being multiplied a decode step asks for the next ones.
/// Decoding streams all the weights once per token (~100 MB quantized, ~500 MB in f32), more than
/// the caches hold; without software prefetch a core waited on memory for about half of each
/// product (measured on a Q4_1 product: 5 GB/s per core without, 7-9 GB/s with, on this project's
/// 2-core VM; 16 and 32 KiB did equally well, 4 KiB did worse than none).
pub(crate) const PREFETCH_AHEAD: usize = 16 << 10;

/// Asks for the memory of `s` to be brought into L2, one request per cache line; a no-op off
/// x86-64. A hint only: it never changes a result.
#[inline]
pub(crate) fn prefetch<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let (p, bytes) = (s.as_ptr() as *const i8, std::mem::size_of_val(s));
        for off in (0..bytes).step_by(64) {
            // SAFETY: `off < bytes`, so the address lies inside `s`; a prefetch reads nothing.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.add(off)) };
        }
    }
}

/// `e^x` to about 2 ulp (Cephes' `expf` polynomial on `[-ln2/2, ln2/2]`), branch-free.
/// Inputs are clamped to `[-87, 88]`, so the result never overflows and is at least 1.6e-38
/// where the true value is smaller; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // ln 2 split in two for an exact `n * C1`
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.0, 88.0); // NaN stays NaN
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * C1 - n * C2;
    let p = (((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    // `t`'s low mantissa bits hold `n`: shift it into the exponent field of 2^n.
    let e = (t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23;
    p * f32::from_bits(e as u32)
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..16 {
            acc[k] += x[k] * y[k];
        }
    }
    sum16(acc) + tail
}

/// `out[s] = dot(w, x_s)` for each activation `x_s` of `xs` (`out.len()` of them, each as long
/// as `w`), bit for bit. Where a weight row meets several activations (decoding several
/// sequences in one step), the products are bound by arithmetic: the compiler did not vectorise
/// `dot` inside that loop (scalar loads, 128-bit adds: 21 tok/s for 8 sequences on the default
/// model), so on AVX2 CPUs an explicit kernel runs four activations per pass over `w`, keeping
/// `dot`'s 16 lanes, its separate multiply and add (no FMA) and its final sum.
pub(crate) fn dots(w: &[f32], xs: &[f32], out: &mut [f32]) {
    let n = w.len();
    assert_eq!(xs.len(), n * out.len(), "dots: activations of another length");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present, and the lengths were checked above.
        unsafe { dots_avx2(w, xs, out) };
        return;
    }
    for (o, x) in out.iter_mut().zip(xs.chunks_exact(n)) {
        *o = dot(w, x);
    }
}

/// `dots` with AVX2: `dot`'s accumulator `acc[0..16]` as two 8-lane registers per activation.
/// SAFETY: the CPU has AVX2; `xs.len() == w.len() * out.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2(w: &[f32], xs: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = w.len();
    let full = n - n % 16;
    // `dot`'s tail and final sum, for activation `s` and its accumulators.
    let finish = |s: usize, lo: __m256, hi: __m256| {
        let mut acc = [0f32; 16];
        _mm256_storeu_ps(acc.as_mut_ptr(), lo);
        _mm256_storeu_ps(acc.as_mut_ptr().add(8), hi);
        let x = &xs[s * n..(s + 1) * n];
        let tail: f32 = w[full..].iter().zip(&x[full..]).map(|(a, b)| a * b).sum();
        sum16(acc) + tail
    };
    let (wp, xp) = (w.as_ptr(), xs.as_ptr());
    let mut s = 0;
    while s + 4 <= out.len() {
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..full).step_by(16) {
            let (w0, w1) = (_mm256_loadu_ps(wp.add(c)), _mm256_loadu_ps(wp.add(c + 8)));
            for a in 0..4 {
                let x = xp.add((s + a) * n + c);
                acc[2 * a] = _mm256_add_ps(acc[2 * a], _mm256_mul_ps(w0, _mm256_loadu_ps(x)));
                acc[2 * a + 1] = _mm256_add_ps(acc[2 * a + 1], _mm256_mul_ps(w1, _mm256_loadu_ps(x.add(8))));
            }
        }
        for a in 0..4 {
            out[s + a] = finish(s + a, acc[2 * a], acc[2 * a + 1]);
        }
        s += 4;
    }
    while s < out.len() {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in (0..full).step_by(16) {
            let x = xp.add(s * n + c);
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(wp.add(c)), _mm256_loadu_ps(x)));
            hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(wp.add(c + 8)), _mm256_loadu_ps(x.add(8))));
        }
        out[s] = finish(s, lo, hi);
        s += 1;
    }
}

#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let tail: f32 = ca.remainder().iter().sum();
    for x in ca {
        for k in 0..16 {
            acc[k] += x[k];
        }
    }
    sum16(acc) + tail
}

#[inline(always)]
fn sum16(acc: [f32; 16]) -> f32 {
    let mut s = [0f32; 8];
    for k in 0..8 {
        s[k] = acc[k] + acc[k + 8];
    }
    (s[0] + s[4]) + (s[1] + s[5]) + (s[2] + s[6]) + (s[3] + s[7])
}

/// `y += a x`.
#[inline(always)]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 2e-38 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn sums_match_plain_loops() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let d: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let s: f32 = a.iter().sum();
        assert!((dot(&a, &b) - d).abs() < 1e-5 && (sum(&a) - s).abs() < 1e-5);
    }

    /// `dots` is `dot` for each activation, bit for bit, in groups of four and alone, with and
    /// without a tail.
    #[test]
    fn dots_are_dot_for_each_activation() {
        for n in [16, 37, 576] {
            let w: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            for m in [1, 3, 4, 7] {
                let xs: Vec<f32> = (0..n * m).map(|i| (i as f32 * 0.113).cos() * 1.7).collect();
                let mut out = vec![0f32; m];
                dots(&w, &xs, &mut out);
                let want: Vec<f32> = xs.chunks_exact(n).map(|x| dot(&w, x)).collect();
                assert_eq!(out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "n {n}, m {m}");
            }
        }
    }
}
