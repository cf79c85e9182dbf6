//! The transformer layer's elementwise ops on the CPU, each a forward/backward pair on one row
//! in the manner of llm.c, and the same ops over many rows on the pool (`*_rows`). The training
//! pass, the f32 inference pass (`model/fused`) and the decode step (`model/decode/`) all call
//! these: there is no other CPU definition of them. `model/reference.rs` states the same math as
//! candle tensor ops, and the tests hold the two against each other.
//!
//! Row functions are `inline(always)` so that, called inside `simd`, they are compiled for the
//! instruction set `simd` picked.

use rayon::prelude::*;

use super::vecmath::{dot, exp, sigmoid, simd, sum};

/// Buffers at least this long are filled by the pool.
const PAR_FILL: usize = 1 << 15;

/// `n` zeros, written by the pool. The step's buffers are tens of MB; zeroing them on the calling
/// thread left the pool idle for ~6 % of a step (a profile of `sos bench step`).
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    if n < PAR_FILL {
        return vec![0f32; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0f32, n).with_min_len(PAR_FILL));
    v
}

/// A copy of `x`, written by the pool, for the same reason as `zeros`.
pub(crate) fn copied(x: &[f32]) -> Vec<f32> {
    if x.len() < PAR_FILL {
        return x.to_vec();
    }
    let mut v = Vec::with_capacity(x.len());
    v.par_extend(x.par_iter().copied().with_min_len(PAR_FILL));
    v
}

/// Rows of `width` floats processed per rayon task: enough work to amortise a task.
pub(crate) fn min_rows(width: usize) -> usize {
    (8192 / width.max(1)).max(1)
}

/// RMSNorm of one row: `y = x * r * w` with `r = 1/sqrt(mean(x^2) + eps)`; returns `r`, which
/// the backward needs.
#[inline(always)]
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    let r = 1.0 / (dot(x, x) / w.len() as f32 + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = x * r * w;
    }
    r
}

/// `out += dx` for `y = rms_norm(x)` given `dy`: `dx = r g - x r^3 mean(g x)`, `g = dy w`.
#[inline(always)]
pub(crate) fn rms_norm_backward(out: &mut [f32], x: &[f32], r: f32, w: &[f32], dy: &[f32]) {
    let mut gx = [0f32; 16];
    for ((dy, w), x) in dy.chunks(16).zip(w.chunks(16)).zip(x.chunks(16)) {
        for k in 0..dy.len() {
            gx[k] += dy[k] * w[k] * x[k];
        }
    }
    let coef = r * r * r * sum(&gx) / w.len() as f32;
    for (((o, &dy), &w), &x) in out.iter_mut().zip(dy).zip(w).zip(x) {
        *o += r * dy * w - x * coef;
    }
}

/// `rms_norm` of each row of `x` (`w.len()` wide): the normed rows and each row's `r`.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut y = zeros(x.len());
    let mut r = vec![0f32; x.len() / d];
    y.par_chunks_mut(d)
        .zip(r.par_iter_mut())
        .zip(x.par_chunks(d))
        .with_min_len(min_rows(d))
        .for_each(|((y, r), x)| simd(|| *r = rms_norm(x, w, eps, y)));
    (y, r)
}

/// `rms_norm_backward` of each row.
pub(crate) fn rms_norm_backward_rows(out: &mut [f32], x: &[f32], r: &[f32], w: &[f32], dy: &[f32]) {
    let d = w.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(dy.par_chunks(d))
        .zip(r.par_iter())
        .with_min_len(min_rows(d))
        .for_each(|(((out, x), dy), &r)| simd(|| rms_norm_backward(out, x, r, w, dy)));
}

/// Rotary embedding, half-split layout: rotates each `hd`-wide head of `x` by the angles whose
/// cosines and sines are `cos` and `sin` (`hd / 2` each). With `sign` -1 it rotates back by the
/// same angles, which is the transpose of the rotation: its backward.
#[inline(always)]
pub(crate) fn rope(x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32], sign: f32) {
    let half = hd / 2;
    for head in x.chunks_exact_mut(hd) {
        let (x1, x2) = head.split_at_mut(half);
        for e in 0..half {
            let (a, b, s) = (x1[e], x2[e], sign * sin[e]);
            x1[e] = a * cos[e] - b * s;
            x2[e] = b * cos[e] + a * s;
        }
    }
}

/// SwiGLU of one row: `f = silu(gate) * up`, `silu(g) = g * sigmoid(g)`.
#[inline(always)]
pub(crate) fn swiglu(gate: &[f32], up: &[f32], f: &mut [f32]) {
    for ((f, &g), &u) in f.iter_mut().zip(gate).zip(up) {
        *f = g * sigmoid(g) * u;
    }
}

/// The backward of `swiglu`: `dgate` and `dup` from `df`.
#[inline(always)]
pub(crate) fn swiglu_backward(df: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    for ((((dg, du), &df), &g), &u) in dgate.iter_mut().zip(dup).zip(df).zip(gate).zip(up) {
        let sg = sigmoid(g);
        *du = df * g * sg;
        *dg = df * u * sg * (1.0 + g * (1.0 - sg));
    }
}

/// Causal softmax of one row of raw scores, in place: `softmax(s[..live] * scale)`, and zeros
/// for the masked positions after `live`.
#[inline(always)]
pub(crate) fn softmax(s: &mut [f32], live: usize, scale: f32) {
    let (live, masked) = s.split_at_mut(live);
    let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    live.iter_mut().for_each(|v| *v = exp((*v - max) * scale));
    let inv = 1.0 / sum(live);
    live.iter_mut().for_each(|v| *v *= inv);
    masked.fill(0.0);
}

/// The backward of `softmax`, in place: `dp` (the gradient with respect to the probabilities
/// `p`) becomes the gradient with respect to the raw scores, `p (dp - <p, dp>) scale`.
#[inline(always)]
pub(crate) fn softmax_backward(dp: &mut [f32], p: &[f32], scale: f32) {
    let pd = dot(dp, p);
    for (d, &p) in dp.iter_mut().zip(p) {
        *d = p * (*d - pd) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_filled_buffers_hold_every_element() {
        for n in [0, 5, PAR_FILL - 1, PAR_FILL, 3 * PAR_FILL + 17] {
            let z = zeros(n);
            assert_eq!(z.len(), n);
            assert!(z.iter().all(|&v| v == 0.0));
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            assert_eq!(copied(&x), x);
        }
    }

    /// Each backward against central differences of its forward (f32, so loose bounds: these
    /// catch a wrong formula, not rounding).
    #[test]
    fn backwards_match_finite_differences() {
        let n = 24;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 5) as f32 / 10.0).collect();
        let dy: Vec<f32> = (0..n).map(|i| ((i * 3 % 7) as f32 - 3.0) / 3.0).collect();
        let loss = |f: &dyn Fn(&[f32]) -> Vec<f32>, x: &[f32]| f(x).iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum::<f64>();
        let numeric = |f: &dyn Fn(&[f32]) -> Vec<f32>, i: usize| {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += 1e-2;
            m[i] -= 1e-2;
            (loss(f, &p) - loss(f, &m)) / 2e-2
        };
        let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() < 2e-2 * (1.0 + b.abs()), "{what}: {a} vs {b}");

        let rms = |x: &[f32]| {
            let mut y = vec![0f32; x.len()];
            rms_norm(x, &w, 1e-5, &mut y);
            y
        };
        let mut dx = vec![0f32; n];
        let r = rms_norm(&x, &w, 1e-5, &mut vec![0f32; n]);
        rms_norm_backward(&mut dx, &x, r, &w, &dy);
        for (i, &g) in dx.iter().enumerate() {
            close(g as f64, numeric(&rms, i), "rms_norm");
        }

        let up: Vec<f32> = w.iter().map(|v| v - 0.7).collect();
        let sw = |g: &[f32]| {
            let mut f = vec![0f32; g.len()];
            swiglu(g, &up, &mut f);
            f
        };
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        swiglu_backward(&dy, &x, &up, &mut dg, &mut du);
        for i in 0..n {
            close(dg[i] as f64, numeric(&sw, i), "swiglu gate");
            close(du[i] as f64, (dy[i] * x[i] * sigmoid(x[i])) as f64, "swiglu up");
        }

        let live = 17;
        let sm = |s: &[f32]| {
            let mut p = s.to_vec();
            softmax(&mut p, live, 0.5);
            p
        };
        let p = sm(&x);
        assert!(p[live..].iter().all(|&v| v == 0.0));
        let mut ds = dy.clone();
        softmax_backward(&mut ds, &p, 0.5);
        for (i, &g) in ds.iter().enumerate().take(live) {
            close(g as f64, numeric(&sm, i), "softmax");
        }

        // A rotation back by the same angles undoes it.
        let (cos, sin): (Vec<f32>, Vec<f32>) = (0..4).map(|e| (e as f32 * 0.3).sin_cos()).map(|(s, c)| (c, s)).unzip();
        let mut y = x.clone();
        rope(&mut y, 8, &cos, &sin, 1.0);
        rope(&mut y, 8, &cos, &sin, -1.0);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
