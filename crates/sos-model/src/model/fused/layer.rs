//! One transformer layer on plain buffers: its forward, which records a tape, and its backward,
//! which turns the gradient of the layer's output into that of its input. The elementwise ops
//! are `kernels::ops`'s; this file holds their layout over a batch and the attention.

use rayon::prelude::*;

use super::views::{forward_product, project_back, LayerWeights, View, Weights};
use crate::kernels::gemm::{gemm_st, matmul};
use crate::kernels::ops::{self, copied, min_rows, rms_norm_backward_rows, rms_norm_rows, zeros};
use crate::kernels::vecmath::simd;

/// Shapes of one pass: `b` sequences of `r` trainable positions after a frozen prefix of `from`.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) r: usize,
    pub(super) from: usize,
    pub(super) t: usize,
    pub(super) d: usize,
    pub(super) h: usize,
    pub(super) kvh: usize,
    pub(super) hd: usize,
    pub(super) ff: usize,
    pub(super) eps: f32,
    /// Query rows per block of the causal attention (`QUERY_BLOCK`; tests vary it).
    pub(super) qblock: usize,
}

/// Query rows per block of the causal attention. A block's products stop at the keys its last
/// row sees, so most of the masked upper triangle of each score matrix is never computed. As
/// long as a product's inner dimension stays within gemm's one summation block (512), cutting
/// it short only drops terms that are exactly zero, so a pass gives the bits of whole products
/// (test `attention_blocks_keep_the_bits`); past 512 keys gemm splits the sum where the
/// length says, and the bits differ in the last places.
pub(super) const QUERY_BLOCK: usize = 64;

impl Dims {
    pub(super) fn n(&self) -> usize {
        self.b * self.r
    }
    /// Width of a row of the joint projection: queries, keys, values.
    pub(super) fn qkv(&self) -> usize {
        (self.h + 2 * self.kvh) * self.hd
    }

    /// The `r` rows in blocks `[i0, i1)` of `qblock` to `2 qblock - 1` rows (one block when
    /// `r < 2 qblock`): never a block of one or a few rows, which gemm would sum in another order.
    fn row_blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (r, nb) = (self.r, (self.r / self.qblock).max(1));
        (0..nb).map(move |i| (r * i / nb, r * (i + 1) / nb))
    }
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
            let at = (from + row % r) * half;
            ops::rope(&mut xr[..heads * hd], hd, &cos[at..at + half], &sin[at..at + half], sign);
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

/// What one layer's backward needs (the quantities of `reference.rs`'s `LayerTape`).
pub(super) struct LayerTape {
    x: Vec<f32>,
    r1: Vec<f32>,
    /// Roped queries and keys, then values: `[n, (h + 2 kvh) hd]`.
    qkv: Vec<f32>,
    /// Keys and values with the prefix in front: `[b, kvh, t, hd]`.
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
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
pub(super) fn layer_forward(
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
    let (a, r1) = rms_norm_rows(&x, lw.attn_norm.get(), eps);
    let kept = |i: usize| lw.t.as_ref().map(|t| &t[i]);
    let mut qkv = zeros(n * width);
    forward_product(&mut qkv, width, &a, kept(0), &[&lw.wq, &lw.wk, &lw.wv], n, d, false);
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
            // Per block of query rows, scores and weighted values over the keys the block's
            // last row sees; the softmax applies the mask within the block and zeroes the rest.
            let q0 = bi * r * width + qh * hd;
            for (i0, i1) in dm.row_blocks() {
                let (m, keys) = (i1 - i0, from + i1);
                let pb = &mut p[i0 * t..i1 * t];
                gemm_st(pb, t, &qkv[q0 + i0 * width..], (width, 1), kb, (1, hd), m, hd, keys, false);
                simd(|| {
                    for (i, pi) in pb.chunks_exact_mut(t).enumerate() {
                        ops::softmax(pi, from + i0 + i + 1, scale);
                    }
                });
                gemm_st(&mut o[i0 * hd..], hd, pb, (t, 1), vb, (hd, 1), m, keys, hd, false);
            }
        });
    let mut ot = zeros(n * h * hd);
    to_tokens(&mut ot, h * hd, 0, &o, r, h, hd);
    drop(o);
    let mut x1 = copied(&x);
    forward_product(&mut x1, d, &ot, kept(1), &[&lw.wo], n, h * hd, true);
    drop(ot);
    let (m, r2) = rms_norm_rows(&x1, lw.ffn_norm.get(), eps);
    let mut gu = zeros(n * 2 * ff);
    forward_product(&mut gu, 2 * ff, &m, kept(2), &[&lw.gate, &lw.up], n, d, false);
    drop(m);
    let mut f = zeros(n * ff);
    f.par_chunks_mut(ff)
        .zip(gu.par_chunks(2 * ff))
        .with_min_len(min_rows(ff))
        .for_each(|(f, gu)| {
            let (gate, up) = gu.split_at(ff);
            simd(|| ops::swiglu(gate, up, f))
        });
    let mut out = copied(&x1);
    forward_product(&mut out, d, &f, kept(3), &[&lw.down], n, ff, true);
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
pub(super) struct Scratch {
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
pub(super) fn layer_backward(
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
            let (dgate, dup) = dgu.split_at_mut(ff);
            let (gate, up) = gu.split_at(ff);
            simd(|| ops::swiglu_backward(df, gate, up, dgate, dup))
        });
    let dmid = sized(&mut sc.dmid, n * d);
    project_back(dmid, dgu, 2 * ff, &[&lw.gate, &lw.up], n, d);
    // dout becomes the gradient with respect to x1.
    rms_norm_backward_rows(&mut dout, &s.x1, &s.r2, lw.ffn_norm.get(), dmid);
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
                // dP = dO V^T, then the softmax backward: dS = P (dP - rowsum(P dP)), scaled;
                // dQ = dS K. Per block of query rows, over the keys its last row sees: the rest
                // of a row of dS is never written, so it keeps the zeros the softmax backward
                // made of it (P is zero there) for every head.
                for (i0, i1) in dm.row_blocks() {
                    let (m, keys) = (i1 - i0, from + i1);
                    let dsb = &mut ds[i0 * t..i1 * t];
                    gemm_st(dsb, t, &do_rows[i0 * h * hd..], (h * hd, 1), vb, (1, hd), m, hd, keys, false);
                    simd(|| {
                        for (dsi, pi) in dsb.chunks_exact_mut(t).zip(pm[i0 * t..i1 * t].chunks_exact(t)) {
                            ops::softmax_backward(dsi, pi, scale);
                        }
                    });
                    gemm_st(&mut dq[(gi * r + i0) * hd..], hd, dsb, (t, 1), kb, (hd, 1), m, keys, hd, false);
                }
                // Only the keys and values after the prefix take gradients: dK = dS^T Q, dV =
                // P^T dO, per block of keys over the queries that see them (from the block's
                // first key on). The first head of the group overwrites what an earlier layer
                // left here.
                for (j0, j1) in dm.row_blocks() {
                    let (m, queries) = (j1 - j0, r - j0);
                    let at = j0 * t + from + j0;
                    gemm_st(&mut dk[j0 * hd..], hd, &ds[at..], (1, t), &qh_rows[j0 * width..], (width, 1), m, queries, hd, gi > 0);
                    gemm_st(&mut dv[j0 * hd..], hd, &pm[at..], (1, t), &do_rows[j0 * h * hd..], (h * hd, 1), m, queries, hd, gi > 0);
                }
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
    rms_norm_backward_rows(&mut dx, &s.x, &s.r1, lw.attn_norm.get(), da);
    dx
}
