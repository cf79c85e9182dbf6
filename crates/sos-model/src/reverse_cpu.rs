//! The reverse pass on plain f32 buffers: the CPU fast path of `reverse.rs`.
//!
//! `reverse.rs` states the pass as candle tensor ops, which run on any device and dtype (the
//! finite-difference tests use f64). On the CPU those ops cost nearly as much as the arithmetic:
//! each of ~30 ops per layer allocates its output and makes one more pass over memory, and
//! candle's elementwise ops wake a spinning thread pool that, on 2 cores, competes with the
//! matmul threads. A profile of a batch 8 x 64 step put ~45 % of the time outside the matmul
//! kernels. Here the same arithmetic runs as fused loops over flat buffers split across rayon's
//! pool, and the weight products go straight to `gemm`. `tests/reverse_cpu.rs` checks it against
//! `reverse.rs`.
//!
//! Layouts: activations are token-major `[n = b*r, width]`; keys and values `[b, kvh, t, hd]`
//! (prefix first); attention probabilities `[b, h, r, t]`.

use std::ops::Range;

use candle_core::{CpuStorage, DType, Device, Storage, StorageRef, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::model::{Exec, KvCache, Layer, Linear, Model};
use crate::reverse::LossGrad;
use crate::vecmath::{axpy, dot, exp, sigmoid, simd, sum};
use crate::Result;

/// A contiguous f32 CPU tensor's values, borrowed without a copy.
struct View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> View<'a> {
    fn of(t: &'a Tensor) -> Option<Self> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets()?;
        matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))).then_some(View { guard, start, end })
    }

    fn dense(l: &'a Linear) -> Option<Self> {
        match l {
            Linear::Dense(t) => Self::of(t),
            Linear::Quant(_) | Linear::Kernel(_) => None,
        }
    }

    fn get(&self) -> &[f32] {
        self.storage()[self.start..self.end].as_ref()
    }

    fn storage(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => v,
            _ => unreachable!("View::of admits f32 CPU storage only"),
        }
    }

    /// The values of `parts` as one slice when they lie back to back in one storage, as
    /// `load.rs` stacks the weights that read the same input.
    fn joined<'v>(parts: &[&'v View<'a>]) -> Option<&'v [f32]> {
        let first = parts.first()?;
        let adjacent = parts
            .windows(2)
            .all(|w| std::ptr::eq(w[0].storage(), w[1].storage()) && w[0].end == w[1].start);
        adjacent.then(|| &first.storage()[first.start..parts.last().map_or(first.end, |l| l.end)])
    }
}

struct LayerWeights<'a> {
    attn_norm: View<'a>,
    wq: View<'a>,
    wk: View<'a>,
    wv: View<'a>,
    wo: View<'a>,
    bq: Option<View<'a>>,
    bk: Option<View<'a>>,
    bv: Option<View<'a>>,
    ffn_norm: View<'a>,
    gate: View<'a>,
    up: View<'a>,
    down: View<'a>,
    /// `Model::keep_transposes`'s copies, `[in, out]`, for the forward.
    t: Option<[View<'a>; 4]>,
}

impl<'a> LayerWeights<'a> {
    fn of(l: &'a Layer) -> Option<Self> {
        let bias = |b: &'a Option<Tensor>| -> Option<Option<View<'a>>> {
            match b {
                Some(t) => View::of(t).map(Some),
                None => Some(None),
            }
        };
        Some(LayerWeights {
            attn_norm: View::of(&l.attn_norm)?,
            wq: View::dense(&l.wq)?,
            wk: View::dense(&l.wk)?,
            wv: View::dense(&l.wv)?,
            wo: View::dense(&l.wo)?,
            bq: bias(&l.bq)?,
            bk: bias(&l.bk)?,
            bv: bias(&l.bv)?,
            ffn_norm: View::of(&l.ffn_norm)?,
            gate: View::dense(&l.w_gate)?,
            up: View::dense(&l.w_up)?,
            down: View::dense(&l.w_down)?,
            t: None,
        })
    }
}

/// Every weight the pass reads, borrowed from the model for the duration of one pass.
pub(crate) struct Weights<'a> {
    layers: Vec<LayerWeights<'a>>,
    norm: View<'a>,
    lm_head: View<'a>,
    /// The output layer transposed, `[d, vocab]`, when the model keeps transposes.
    lm_head_t: Option<View<'a>>,
    cos: View<'a>,
    sin: View<'a>,
}

impl<'a> Weights<'a> {
    /// `None` unless every tensor the pass reads is a contiguous f32 CPU tensor.
    pub(crate) fn of(m: &'a Model) -> Option<Self> {
        // `quant` mode rounds attention operands as llama.cpp does; only `f32` is plain arithmetic.
        if !matches!(m.device, Device::Cpu) || m.dtype() != DType::F32 || m.exec != Exec::F32 {
            return None;
        }
        let mut layers: Vec<LayerWeights> = m.layers.iter().map(LayerWeights::of).collect::<Option<_>>()?;
        let mut lm_head_t = None;
        if let Some(t) = &m.transposed {
            for (lw, lt) in layers.iter_mut().zip(&t.layers) {
                lw.t = Some([View::of(&lt.qkv)?, View::of(&lt.wo)?, View::of(&lt.gate_up)?, View::of(&lt.down)?]);
            }
            lm_head_t = Some(View::of(&t.lm_head)?);
        }
        Some(Weights {
            layers,
            norm: View::of(&m.norm)?,
            lm_head: View::dense(&m.lm_head)?,
            lm_head_t,
            cos: View::of(&m.cos)?,
            sin: View::of(&m.sin)?,
        })
    }
}

/// A raw pointer handed to the threads of one `matmul`; each writes its own columns.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Single-threaded `c (+)= a b` on strided operands, for the small per-head products of the
/// attention: element `(i, j)` of `c` is `c[i * ldc + j]`, of `a` is `a[i * a_s.0 + j * a_s.1]`,
/// of `b` is `b[i * b_s.0 + j * b_s.1]`, so transposed views cost nothing.
#[allow(clippy::too_many_arguments)]
fn gemm_st(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    a_s: (usize, usize),
    b: &[f32],
    b_s: (usize, usize),
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0, "gemm_st: empty inner dimension");
    let last = |(rs, cs): (usize, usize), rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last((ldc, 1), m, n) < c.len() && last(a_s, m, k) < a.len() && last(b_s, k, n) < b.len(),
        "gemm_st shapes"
    );
    // SAFETY: the assert keeps every element the strides reach inside the slices.
    unsafe { gemm_raw(c.as_mut_ptr(), ldc, a.as_ptr(), a_s, b.as_ptr(), b_s, m, k, n, acc) }
}

/// The one call into `gemm`: `c (+)= a b` with element `(i, j)` of `c` at `c[i * ldc + j]`, of `a`
/// at `a[i * a_s.0 + j * a_s.1]`, of `b` at `b[i * b_s.0 + j * b_s.1]`, on one thread.
///
/// # Safety
/// Every element those strides reach for `i < m`, `j < n` (and `k`) must lie inside the
/// allocations behind the pointers, and no other thread may touch the elements of `c` written.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    c: *mut f32,
    ldc: usize,
    a: *const f32,
    a_s: (usize, usize),
    b: *const f32,
    b_s: (usize, usize),
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        acc,
        a,
        a_s.1 as isize,
        a_s.0 as isize,
        b,
        b_s.1 as isize,
        b_s.0 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// `c = a b`, or `c += a b` with `acc`, for `a: [m, k]` and `c: [m, n]` row-major with row
/// strides `lda` and `ldc` (so that a column block of a wider buffer can be read or written),
/// and `b: [k, n]` row-major, or stored transposed `[n, k]` when `b_t` (a `Linear` weight
/// `[out, in]` in its forward).
///
/// The columns are split evenly across the pool, each part a single-threaded `gemm`: gemm's own
/// split left a core idle for a third of some of these shapes (1.5 of 2 cores busy), and a
/// column split packs each weight column once.
#[allow(clippy::too_many_arguments)]
fn matmul(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b_t: bool,
    acc: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && lda >= k, "matmul strides");
    assert!(
        c.len() >= (m - 1) * ldc + n && a.len() >= (m - 1) * lda + k && b.len() >= k * n,
        "matmul shapes"
    );
    let (b_cs, b_rs) = if b_t { (k, 1) } else { (1, n) };
    // Column blocks of 16 (one AVX-512 register), as even as that allows.
    let blocks = n.div_ceil(16);
    let parts = rayon::current_num_threads()
        .min(blocks)
        .min((m * n * k / (1 << 18)).max(1));
    let cp = SendPtr(c.as_mut_ptr());
    let run = |p: usize| {
        let (j0, j1) = (
            (blocks * p / parts * 16).min(n),
            (blocks * (p + 1) / parts * 16).min(n),
        );
        // Rebinding makes the closure capture the whole `SendPtr` (which is Sync), not its field.
        #[allow(clippy::redundant_locals)]
        let cp = cp;
        // SAFETY: the asserts above keep every element the strides reach inside the slices, and
        // the parts write disjoint column ranges of `c`.
        unsafe { gemm_raw(cp.0.add(j0), ldc, a.as_ptr(), (lda, 1), b.as_ptr().add(j0 * b_cs), (b_rs, b_cs), m, k, j1 - j0, acc) }
    };
    if parts == 1 {
        run(0);
    } else {
        (0..parts).into_par_iter().for_each(run);
    }
}

/// `y[:, block i] = x W_i^T` for weights `W_i: [out_i, k]` that read the same input `x: [m, k]`,
/// into consecutive column blocks of `y` (row stride `ldy`): one gemm when the weights are
/// stacked in memory, else one per weight.
fn project(y: &mut [f32], ldy: usize, x: &[f32], ws: &[&View], m: usize, k: usize) {
    if let Some(w) = View::joined(ws) {
        return matmul(y, ldy, x, k, w, m, k, w.len() / k, true, false);
    }
    let mut col = 0;
    for w in ws {
        let out = w.get().len() / k;
        matmul(&mut y[col..], ldy, x, k, w.get(), m, k, out, true, false);
        col += out;
    }
}

/// The backward of `project`: `dx = sum_i dy[:, block i] W_i`, `dx: [m, k]`.
fn project_back(dx: &mut [f32], dy: &[f32], ldy: usize, ws: &[&View], m: usize, k: usize) {
    if let Some(w) = View::joined(ws) {
        return matmul(dx, k, dy, ldy, w, m, w.len() / k, k, false, false);
    }
    let mut col = 0;
    for (i, w) in ws.iter().enumerate() {
        let out = w.get().len() / k;
        matmul(dx, k, &dy[col..], ldy, w.get(), m, out, k, false, i > 0);
        col += out;
    }
}

/// `n` zeros, written by the pool. The step's buffers are tens of MB; zeroing them on the calling
/// thread left the pool idle for ~6 % of a step (a profile of `sos bench step`).
fn zeros(n: usize) -> Vec<f32> {
    if n < PAR_FILL {
        return vec![0f32; n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(0f32, n).with_min_len(PAR_FILL));
    v
}

/// A copy of `x`, written by the pool, for the same reason as `zeros`.
fn copied(x: &[f32]) -> Vec<f32> {
    if x.len() < PAR_FILL {
        return x.to_vec();
    }
    let mut v = Vec::with_capacity(x.len());
    v.par_extend(x.par_iter().copied().with_min_len(PAR_FILL));
    v
}

/// Buffers at least this long are filled by the pool.
const PAR_FILL: usize = 1 << 15;

/// Rows of `width` floats processed per rayon task: enough work to amortise a task.
fn min_rows(width: usize) -> usize {
    (8192 / width.max(1)).max(1)
}

/// RMSNorm of each row of `x` (`d` = `w.len()` wide): `y = x * r * w`, `r = 1/sqrt(mean(x^2) + eps)`.
fn rms(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut y = zeros(x.len());
    let mut r = vec![0f32; x.len() / d];
    y.par_chunks_mut(d)
        .zip(r.par_iter_mut())
        .zip(x.par_chunks(d))
        .with_min_len(min_rows(d))
        .for_each(|((y, r), x)| {
            simd(|| {
                *r = 1.0 / (dot(x, x) / d as f32 + eps).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * *r * w;
                }
            })
        });
    (y, r)
}

/// `out += dx` for the RMSNorm `y = x * r * w` given `dy`: `dx = r g - x r^3 mean(g x)`, `g = dy w`.
fn rms_backward_add(out: &mut [f32], x: &[f32], r: &[f32], w: &[f32], dy: &[f32]) {
    let d = w.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(dy.par_chunks(d))
        .zip(r.par_iter())
        .with_min_len(min_rows(d))
        .for_each(|(((out, x), dy), &r)| {
            simd(|| {
                let mut gx = [0f32; 16];
                for ((dy, w), x) in dy.chunks(16).zip(w.chunks(16)).zip(x.chunks(16)) {
                    for k in 0..dy.len() {
                        gx[k] += dy[k] * w[k] * x[k];
                    }
                }
                let coef = r * r * r * sum(&gx) / d as f32;
                for (((o, &dy), &w), &x) in out.iter_mut().zip(dy).zip(w).zip(x) {
                    *o += r * dy * w - x * coef;
                }
            })
        });
}

/// Adds `bias` (if any) to each row of `x: [b*r, width]` and rotates the row's first `heads`
/// heads (the queries and keys) by its position, `from + row % r`. `sign` -1 rotates back: the
/// transpose of the rotation, for the backward.
#[allow(clippy::too_many_arguments)]
fn bias_rope(
    x: &mut [f32],
    bias: Option<&[f32]>,
    width: usize,
    heads: usize,
    hd: usize,
    r: usize,
    from: usize,
    w: &Weights,
    sign: f32,
) {
    let half = hd / 2;
    let (cos, sin) = (w.cos.get(), w.sin.get());
    x.par_chunks_mut(width)
        .enumerate()
        .with_min_len(min_rows(width))
        .for_each(|(row, xr)| {
            if let Some(b) = bias {
                xr.iter_mut().zip(b).for_each(|(x, b)| *x += b);
            }
            let pos = from + row % r;
            let (c, s) = (
                &cos[pos * half..(pos + 1) * half],
                &sin[pos * half..(pos + 1) * half],
            );
            for head in xr[..heads * hd].chunks_exact_mut(hd) {
                let (x1, x2) = head.split_at_mut(half);
                for e in 0..half {
                    let (a, b, s) = (x1[e], x2[e], sign * s[e]);
                    x1[e] = a * c[e] - b * s;
                    x2[e] = b * c[e] + a * s;
                }
            }
        });
}

/// Head-major `src: [b, heads, r, hd]` into the token-major column block starting at `col` of
/// `dst: [b*r, ld]`.
fn to_tokens(
    dst: &mut [f32],
    ld: usize,
    col: usize,
    src: &[f32],
    r: usize,
    heads: usize,
    hd: usize,
) {
    dst.par_chunks_mut(ld)
        .enumerate()
        .with_min_len(min_rows(ld))
        .for_each(|(row, o)| {
            let (bi, i) = (row / r, row % r);
            for h in 0..heads {
                let at = ((bi * heads + h) * r + i) * hd;
                o[col + h * hd..col + (h + 1) * hd].copy_from_slice(&src[at..at + hd]);
            }
        });
}

/// Shapes of one pass: `b` sequences of `r` trainable positions after a frozen prefix of `from`.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    r: usize,
    from: usize,
    t: usize,
    d: usize,
    h: usize,
    kvh: usize,
    hd: usize,
    ff: usize,
    eps: f32,
}

impl Dims {
    fn n(&self) -> usize {
        self.b * self.r
    }
    /// Width of a row of the joint projection: queries, keys, values.
    fn qkv(&self) -> usize {
        (self.h + 2 * self.kvh) * self.hd
    }
}

/// What one layer's backward needs (the quantities of `reverse::LayerTape`).
struct LayerTape {
    x: Vec<f32>,
    r1: Vec<f32>,
    /// Roped queries and keys, then values: `[n, (h + 2 kvh) hd]`.
    qkv: Vec<f32>,
    /// Keys and values with the prefix in front: `[b, kvh, t, hd]`.
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities `[b, h, r, t]`.
    p: Vec<f32>,
    x1: Vec<f32>,
    r2: Vec<f32>,
    /// Gate and up projections side by side: `[n, 2 ff]`.
    gu: Vec<f32>,
}

/// The q/k/v biases as one row (Qwen2 has them; Llama none).
fn qkv_bias(lw: &LayerWeights, dm: Dims) -> Option<Vec<f32>> {
    if lw.bq.is_none() && lw.bk.is_none() && lw.bv.is_none() {
        return None;
    }
    let part = |b: &Option<View>, len: usize| {
        b.as_ref()
            .map_or_else(|| vec![0f32; len], |v| v.get().to_vec())
    };
    let (nq, nkv) = (dm.h * dm.hd, dm.kvh * dm.hd);
    Some([part(&lw.bq, nq), part(&lw.bk, nkv), part(&lw.bv, nkv)].concat())
}

/// One layer forward; returns the tape and the layer output.
fn layer_forward(
    w: &Weights,
    lw: &LayerWeights,
    dm: Dims,
    x: Vec<f32>,
    prefix: Option<(&[f32], &[f32])>,
) -> (LayerTape, Vec<f32>) {
    let Dims {
        r,
        from,
        t,
        d,
        h,
        kvh,
        hd,
        ff,
        eps,
        ..
    } = dm;
    let (n, width, g) = (dm.n(), dm.qkv(), h / kvh);
    let (a, r1) = rms(&x, lw.attn_norm.get(), eps);
    let mut qkv = zeros(n * width);
    match &lw.t {
        Some([qkv_t, ..]) => matmul(&mut qkv, width, &a, d, qkv_t.get(), n, d, width, false, false),
        None => project(&mut qkv, width, &a, &[&lw.wq, &lw.wk, &lw.wv], n, d),
    }
    drop(a);
    bias_rope(
        &mut qkv,
        qkv_bias(lw, dm).as_deref(),
        width,
        h + kvh,
        hd,
        r,
        from,
        w,
        1.0,
    );
    // Keys and values with the prefix in front: [b, kvh, t, hd].
    let mut k = zeros(dm.b * kvh * t * hd);
    let mut v = zeros(dm.b * kvh * t * hd);
    k.par_chunks_mut(t * hd)
        .zip(v.par_chunks_mut(t * hd))
        .enumerate()
        .for_each(|(bk, (kc, vc))| {
            let (bi, kv) = (bk / kvh, bk % kvh);
            if let Some((pk, pv)) = prefix {
                kc[..from * hd].copy_from_slice(&pk[bk * from * hd..(bk + 1) * from * hd]);
                vc[..from * hd].copy_from_slice(&pv[bk * from * hd..(bk + 1) * from * hd]);
            }
            for i in 0..r {
                let row = (bi * r + i) * width;
                let (ks, vs) = (row + (h + kv) * hd, row + (h + kvh + kv) * hd);
                kc[(from + i) * hd..(from + i + 1) * hd].copy_from_slice(&qkv[ks..ks + hd]);
                vc[(from + i) * hd..(from + i + 1) * hd].copy_from_slice(&qkv[vs..vs + hd]);
            }
        });
    // Causal attention, one task per (sequence, query head).
    let scale = 1.0 / (hd as f32).sqrt();
    let mut p = zeros(dm.b * h * r * t);
    let mut o = zeros(n * h * hd); // head-major
    p.par_chunks_mut(r * t)
        .zip(o.par_chunks_mut(r * hd))
        .enumerate()
        .for_each(|(bh, (p, o))| {
            let (bi, qh) = (bh / h, bh % h);
            let base = (bi * kvh + qh / g) * t * hd;
            let (kb, vb) = (&k[base..base + t * hd], &v[base..base + t * hd]);
            // Scores of all r x t pairs in one product; the causal mask is applied in the softmax.
            let q0 = bi * r * width + qh * hd;
            gemm_st(p, t, &qkv[q0..], (width, 1), kb, (1, hd), r, hd, t, false);
            simd(|| {
                for (i, pi) in p.chunks_exact_mut(t).enumerate() {
                    let (live, masked) = pi.split_at_mut(from + i + 1);
                    let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    live.iter_mut().for_each(|v| *v = exp((*v - max) * scale));
                    let inv = 1.0 / sum(live);
                    live.iter_mut().for_each(|v| *v *= inv);
                    masked.fill(0.0);
                }
            });
            gemm_st(o, hd, p, (t, 1), vb, (hd, 1), r, t, hd, false);
        });
    let mut ot = zeros(n * h * hd);
    to_tokens(&mut ot, h * hd, 0, &o, r, h, hd);
    drop(o);
    let mut x1 = copied(&x);
    let (wo, wo_is_t) = match &lw.t {
        Some([_, wo_t, ..]) => (wo_t.get(), false),
        None => (lw.wo.get(), true),
    };
    matmul(&mut x1, d, &ot, h * hd, wo, n, h * hd, d, wo_is_t, true);
    drop(ot);
    let (m, r2) = rms(&x1, lw.ffn_norm.get(), eps);
    let mut gu = zeros(n * 2 * ff);
    match &lw.t {
        Some([_, _, gu_t, _]) => matmul(&mut gu, 2 * ff, &m, d, gu_t.get(), n, d, 2 * ff, false, false),
        None => project(&mut gu, 2 * ff, &m, &[&lw.gate, &lw.up], n, d),
    }
    drop(m);
    let mut f = zeros(n * ff);
    f.par_chunks_mut(ff)
        .zip(gu.par_chunks(2 * ff))
        .with_min_len(min_rows(ff))
        .for_each(|(f, gu)| {
            simd(|| {
                let (gt, u) = gu.split_at(ff);
                for ((f, &gv), &u) in f.iter_mut().zip(gt).zip(u) {
                    *f = gv * sigmoid(gv) * u;
                }
            })
        });
    let mut out = copied(&x1);
    let (down, down_is_t) = match &lw.t {
        Some([.., down_t]) => (down_t.get(), false),
        None => (lw.down.get(), true),
    };
    matmul(&mut out, d, &f, ff, down, n, ff, d, down_is_t, true);
    (
        LayerTape {
            x,
            r1,
            qkv,
            k,
            v,
            p,
            x1,
            r2,
            gu,
        },
        out,
    )
}

/// Buffers of the backward pass, reused from layer to layer. Every product writes its buffer
/// whole before reading it (or overwrites it: `acc` false on its first write), so the values a
/// previous layer left behind never leak into a result, and only the first layer pays for zeroing.
#[derive(Default)]
struct Scratch {
    df: Vec<f32>,
    dgu: Vec<f32>,
    dmid: Vec<f32>,
    d_o: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dqkv: Vec<f32>,
    da: Vec<f32>,
}

/// `buf` as `n` floats; only growth is zeroed.
fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        *buf = zeros(n);
    }
    &mut buf[..n]
}

/// One layer backward: `dout` with respect to the layer output -> with respect to its input
/// (computed in place of `dout`).
fn layer_backward(
    w: &Weights,
    lw: &LayerWeights,
    dm: Dims,
    s: &LayerTape,
    mut dout: Vec<f32>,
    sc: &mut Scratch,
) -> Vec<f32> {
    let Dims {
        r,
        from,
        t,
        d,
        h,
        kvh,
        hd,
        ff,
        ..
    } = dm;
    let (n, width, g) = (dm.n(), dm.qkv(), h / kvh);
    let scale = 1.0 / (hd as f32).sqrt();

    // MLP: out = x1 + down(silu(gate) * up).
    let df = sized(&mut sc.df, n * ff);
    matmul(df, ff, &dout, d, lw.down.get(), n, d, ff, false, false);
    let df = &*df;
    let dgu = sized(&mut sc.dgu, n * 2 * ff);
    dgu.par_chunks_mut(2 * ff)
        .zip(df.par_chunks(ff))
        .zip(s.gu.par_chunks(2 * ff))
        .with_min_len(min_rows(ff))
        .for_each(|((dgu, df), gu)| {
            simd(|| {
                let (dg, du) = dgu.split_at_mut(ff);
                let (gt, u) = gu.split_at(ff);
                for ((((dg, du), &df), &gv), &u) in dg.iter_mut().zip(du).zip(df).zip(gt).zip(u) {
                    let sg = sigmoid(gv);
                    *du = df * gv * sg;
                    *dg = df * u * sg * (1.0 + gv * (1.0 - sg));
                }
            })
        });
    let dmid = sized(&mut sc.dmid, n * d);
    project_back(dmid, dgu, 2 * ff, &[&lw.gate, &lw.up], n, d);
    // dout becomes the gradient with respect to x1.
    rms_backward_add(&mut dout, &s.x1, &s.r2, lw.ffn_norm.get(), dmid);
    let dx1 = dout;

    // Attention, one task per (sequence, KV head): the task owns the gradients of its keys and
    // values, which every query head of the group adds to.
    let d_o = sized(&mut sc.d_o, n * h * hd);
    matmul(
        d_o,
        h * hd,
        &dx1,
        d,
        lw.wo.get(),
        n,
        d,
        h * hd,
        false,
        false,
    );
    let d_o = &*d_o;
    let dq = sized(&mut sc.dq, n * h * hd); // head-major
    let dk = sized(&mut sc.dk, n * kvh * hd); // head-major, own positions only
    let dv = sized(&mut sc.dv, n * kvh * hd);
    dq.par_chunks_mut(g * r * hd)
        .zip(dk.par_chunks_mut(r * hd))
        .zip(dv.par_chunks_mut(r * hd))
        .enumerate()
        .for_each(|(bk, ((dq, dk), dv))| {
            let (bi, kv) = (bk / kvh, bk % kvh);
            let base = bk * t * hd;
            let (kb, vb) = (&s.k[base..base + t * hd], &s.v[base..base + t * hd]);
            let mut ds = vec![0f32; r * t];
            for gi in 0..g {
                let qh = kv * g + gi;
                let pm = &s.p[(bi * h + qh) * r * t..][..r * t];
                let (q0, o0) = (bi * r * width + qh * hd, bi * r * h * hd + qh * hd);
                let (qh_rows, do_rows) = (&s.qkv[q0..], &d_o[o0..]);
                // dP = dO V^T, then the softmax backward: dS = P (dP - rowsum(P dP)), scaled.
                gemm_st(&mut ds, t, do_rows, (h * hd, 1), vb, (1, hd), r, hd, t, false);
                simd(|| {
                    for (dsi, pi) in ds.chunks_exact_mut(t).zip(pm.chunks_exact(t)) {
                        let pd = dot(dsi, pi);
                        for (d, &p) in dsi.iter_mut().zip(pi) {
                            *d = p * (*d - pd) * scale;
                        }
                    }
                });
                gemm_st(&mut dq[gi * r * hd..], hd, &ds, (t, 1), kb, (hd, 1), r, t, hd, false);
                // Only the keys and values after the prefix take gradients: dK = dS^T Q, dV = P^T dO.
                // The first head of the group overwrites what an earlier layer left here.
                gemm_st(dk, hd, &ds[from..], (1, t), qh_rows, (width, 1), r, r, hd, gi > 0);
                gemm_st(dv, hd, &pm[from..], (1, t), do_rows, (h * hd, 1), r, r, hd, gi > 0);
            }
        });
    let dqkv = sized(&mut sc.dqkv, n * width);
    to_tokens(dqkv, width, 0, dq, r, h, hd);
    to_tokens(dqkv, width, h * hd, dk, r, kvh, hd);
    to_tokens(dqkv, width, (h + kvh) * hd, dv, r, kvh, hd);
    bias_rope(dqkv, None, width, h + kvh, hd, r, from, w, -1.0);
    let da = sized(&mut sc.da, n * d);
    project_back(da, dqkv, width, &[&lw.wq, &lw.wk, &lw.wv], n, d);
    let mut dx = dx1;
    rms_backward_add(&mut dx, &s.x, &s.r1, lw.attn_norm.get(), da);
    dx
}

/// Mean cross-entropy of `targets` at hidden rows `rows` of `hidden: [n, d]`, its gradient with
/// respect to `hidden`, and per row whether the target is the argmax (ties to the lower id).
fn cross_entropy(
    w: &Weights,
    hidden: &[f32],
    d: usize,
    eps: f32,
    rows: &[u32],
    targets: &[u32],
) -> (f64, Vec<f32>, Vec<bool>) {
    let nr = rows.len();
    let mut hs = vec![0f32; nr * d];
    for (dst, &row) in hs.chunks_exact_mut(d).zip(rows) {
        dst.copy_from_slice(&hidden[row as usize * d..(row as usize + 1) * d]);
    }
    let (hn, rr) = rms(&hs, w.norm.get(), eps);
    let lm = w.lm_head.get();
    let vocab = lm.len() / d;
    let mut logits = zeros(nr * vocab);
    match &w.lm_head_t {
        Some(t) => matmul(&mut logits, vocab, &hn, d, t.get(), nr, d, vocab, false, false),
        None => matmul(&mut logits, vocab, &hn, d, lm, nr, d, vocab, true, false),
    }
    drop(hn);
    // In place: logits -> d loss / d logits = (softmax - onehot) / nr.
    let per_row: Vec<(f64, bool)> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(l, &tgt)| {
            simd(|| {
                let (best, &max) = l
                    .iter()
                    .enumerate()
                    .fold(
                        (0, &f32::NEG_INFINITY),
                        |acc, x| if x.1 > acc.1 { x } else { acc },
                    );
                let picked = l[tgt as usize] - max;
                l.iter_mut().for_each(|v| *v = exp(*v - max));
                let total = sum(l);
                let inv = 1.0 / (total * nr as f32);
                l.iter_mut().for_each(|v| *v *= inv);
                l[tgt as usize] -= 1.0 / nr as f32;
                (picked as f64 - (total as f64).ln(), best == tgt as usize)
            })
        })
        .collect();
    let loss = -per_row.iter().map(|p| p.0).sum::<f64>() / nr as f64;
    let mut dhn = vec![0f32; nr * d];
    matmul(&mut dhn, d, &logits, vocab, lm, nr, vocab, d, false, false);
    drop(logits);
    let mut dhs = vec![0f32; nr * d];
    rms_backward_add(&mut dhs, &hs, &rr, w.norm.get(), &dhn);
    let mut dh = zeros(hidden.len());
    for (src, &row) in dhs.chunks_exact(d).zip(rows) {
        axpy(&mut dh[row as usize * d..(row as usize + 1) * d], 1.0, src);
    }
    (loss, dh, per_row.into_iter().map(|p| p.1).collect())
}

/// `Model::loss_and_input_grad` on plain buffers; the caller has checked the shapes and ids.
fn dims(m: &Model, b: usize, r: usize, from: usize) -> Dims {
    let c = &m.cfg;
    Dims {
        b,
        r,
        from,
        t: from + r,
        d: c.d_model,
        h: c.n_head,
        kvh: c.n_kv_head,
        hd: c.head_dim,
        ff: c.d_ff,
        eps: c.rms_eps as f32,
    }
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Layer `i`'s cached keys and values of the sequences `seqs`, as flat `[seqs, kvh, len, hd]`.
fn prefix_kv(prefix: Option<&KvCache>, i: usize, seqs: &Range<usize>) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    let part = |t: &Tensor| flat(&t.narrow(0, seqs.start, seqs.len())?);
    match prefix.map(|p| &p.layers()[i]) {
        Some(Some((pk, pv))) => Ok(Some((part(pk)?, part(pv)?))),
        Some(None) if prefix.is_some_and(|p| p.is_empty()) => Ok(None),
        Some(None) => Err(crate::Error::Invalid("prefix cache is missing a layer".into())),
        None => Ok(None),
    }
}

/// `Model::forward` on plain buffers: hidden states `[b, t, d]` before the final norm, with the
/// cache (if any) extended by `x`'s positions. The caller has checked the shapes.
pub(crate) fn forward(m: &Model, w: &Weights, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
    let (b, r, d) = x.dims3()?;
    let from = cache.as_deref().map_or(0, |c| c.len());
    let dm = dims(m, b, r, from);
    let mut h = flat(x)?;
    let mut kvs = Vec::with_capacity(w.layers.len());
    for (i, lw) in w.layers.iter().enumerate() {
        let kv = prefix_kv(cache.as_deref(), i, &(0..b))?;
        let (tape, out) = layer_forward(w, lw, dm, h, kv.as_ref().map(|(k, v)| (&k[..], &v[..])));
        if cache.is_some() {
            let shape = (b, dm.kvh, dm.t, dm.hd);
            kvs.push((Tensor::from_vec(tape.k, shape, &Device::Cpu)?, Tensor::from_vec(tape.v, shape, &Device::Cpu)?));
        }
        h = out;
    }
    if let Some(c) = cache {
        c.set(kvs, dm.t);
    }
    Ok(Tensor::from_vec(h, (b, r, d), &Device::Cpu)?)
}

pub(crate) fn loss_and_input_grad(
    m: &Model,
    w: &Weights,
    x: &Tensor,
    prefix: Option<&KvCache>,
    rows: &[u32],
    targets: &[u32],
) -> Result<LossGrad> {
    let (b, r, d) = x.dims3()?;
    let from = prefix.map_or(0, |p| p.len());
    let dm = dims(m, b, r, from);
    let h = flat(x)?;
    let groups = groups(b);
    // Values of sequences `g` in a batch-major buffer of `per` values per sequence.
    let part = |v: &[f32], g: &Range<usize>, per: usize| v[g.start * per..g.end * per].to_vec();
    let forwards: Vec<(Vec<LayerTape>, Vec<f32>)> = groups
        .par_iter()
        .map(|g| forward_group(w, dims(m, g.len(), r, from), part(&h, g, r * d), prefix, g))
        .collect::<Result<_>>()?;
    drop(h);
    let (tapes, outs): (Vec<_>, Vec<_>) = forwards.into_iter().unzip();
    let (loss, g, hits) = cross_entropy(w, &outs.concat(), d, dm.eps, rows, targets);
    drop(outs);
    let grads: Vec<Vec<f32>> = groups
        .par_iter()
        .zip(tapes)
        .map(|(grp, tapes)| backward_group(w, dims(m, grp.len(), r, from), tapes, part(&g, grp, r * d)))
        .collect();
    Ok(LossGrad {
        loss,
        grad: Tensor::from_vec(grads.concat(), (b, r, d), &Device::Cpu)?,
        hits,
    })
}

/// The batch's sequences in one group per thread of the pool (at most one group per sequence).
///
/// Sequences never meet inside the model, so the groups run their forwards and backwards as
/// independent tasks, one per thread, and meet only around the output layer; the parallel loops
/// inside a group still hand work to a thread that has run out of its own. With the whole batch
/// as one group, the threads met at every product and elementwise pass (~400 times a step). In
/// four in-process A/B runs of `sos bench step` on 2 threads (30-40 alternating pairs each) the
/// groups took 0.94-0.99 of that time for the full step and 0.96-0.99 for the cached one: a small
/// gain, and no loss. The output layer stays one product over all loss rows: it is the largest
/// weight, and split by columns each thread packs only its own half of it.
fn groups(b: usize) -> Vec<Range<usize>> {
    let n = rayon::current_num_threads().clamp(1, b.max(1));
    (0..n).map(|i| b * i / n..b * (i + 1) / n).collect()
}

/// Every layer forward over the group of sequences `seqs` (inputs `h`, and their part of the
/// prefix cache, read one layer at a time): the layers' tapes and the last hidden state.
fn forward_group(
    w: &Weights,
    dm: Dims,
    mut h: Vec<f32>,
    prefix: Option<&KvCache>,
    seqs: &Range<usize>,
) -> Result<(Vec<LayerTape>, Vec<f32>)> {
    let mut tapes = Vec::with_capacity(w.layers.len());
    for (i, lw) in w.layers.iter().enumerate() {
        let kv = prefix_kv(prefix, i, seqs)?;
        let (tape, out) = layer_forward(w, lw, dm, h, kv.as_ref().map(|(k, v)| (&k[..], &v[..])));
        tapes.push(tape);
        h = out;
    }
    Ok((tapes, h))
}

/// Every layer backward over one group, from the gradient of its last hidden state to that of
/// its inputs. Each layer's tape is freed once its backward is done.
fn backward_group(w: &Weights, dm: Dims, tapes: Vec<LayerTape>, mut g: Vec<f32>) -> Vec<f32> {
    let mut scratch = Scratch::default();
    for (lw, tape) in w.layers.iter().zip(tapes).rev() {
        g = layer_backward(w, lw, dm, &tape, g, &mut scratch);
    }
    g
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
}
