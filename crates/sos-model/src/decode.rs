//! The one-token decode step on plain buffers.
//!
//! Decoding does a few microseconds of arithmetic per op, so running it as ~25 tensor ops per
//! layer spends most of its time dispatching them. This step does the same arithmetic as
//! `Model::forward` for a single new position, in plain loops over `Vec<f32>`, with the KV cache
//! as flat per-layer buffers; only the weight products go to the matmul kernels.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::model::{Exec, KvCache, Linear, Model};
use crate::quant::dot_f32 as dot;
use crate::{Error, Result};

/// Keys and values for decoding: per layer `[kv_head][position][head_dim]`, preallocated.
pub struct DecodeCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
    cap: usize,
    inv_freq: Vec<f32>,
}

impl DecodeCache {
    /// Takes over a prefilled `KvCache`, with room for `extra` more positions.
    pub fn from_prefill(model: &Model, kv: &KvCache, extra: usize) -> Result<Self> {
        let c = &model.cfg;
        let len = kv.len();
        // Room for `extra` more positions, but never past the model's context.
        let cap = (len + extra).min(model.cos.dim(0)?);
        let mut k = Vec::with_capacity(c.n_layer);
        let mut v = Vec::with_capacity(c.n_layer);
        for layer in kv.layers() {
            let (kt, vt) = layer.as_ref().ok_or_else(|| Error::Invalid("decode needs a prefilled KV cache".into()))?;
            for (src, dst) in [(kt, &mut k), (vt, &mut v)] {
                // [1, kvh, len, hd] -> [kvh][cap][hd]
                let flat: Vec<f32> = src.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let mut buf = vec![0f32; c.n_kv_head * cap * c.head_dim];
                for h in 0..c.n_kv_head {
                    let n = len * c.head_dim;
                    buf[h * cap * c.head_dim..h * cap * c.head_dim + n].copy_from_slice(&flat[h * n..(h + 1) * n]);
                }
                dst.push(buf);
            }
        }
        Ok(DecodeCache { k, v, len, cap, inv_freq: c.rope_inv_freq() })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A frozen weight applied to one vector.
fn matvec(l: &Linear, x: &[f32]) -> Result<Vec<f32>> {
    match l {
        Linear::Kernel(w) => Ok(w.matmul(x, 1)),
        Linear::Dense(w) => dense_matvec(w, x),
        Linear::Quant(_) => {
            let t = Tensor::from_slice(x, (1, x.len()), &candle_core::Device::Cpu)?;
            Ok(l.forward(&t)?.flatten_all()?.to_vec1()?)
        }
    }
}

/// `W_i x` for weights that read the same vector: one pool job when all are our kernels.
fn matvec_many(ls: &[&Linear], x: &[f32]) -> Result<Vec<Vec<f32>>> {
    let kernels: Option<Vec<&crate::quant::QWeight>> = ls
        .iter()
        .map(|l| match l {
            Linear::Kernel(w) => Some(w),
            _ => None,
        })
        .collect();
    match kernels {
        Some(ws) if ws.iter().all(|w| w.ty == ws[0].ty) => Ok(crate::quant::QWeight::matvec_many(&ws, x)),
        _ => ls.iter().map(|l| matvec(l, x)).collect(),
    }
}

/// `W x` for an f32 weight `[out, in]` on the CPU, rows split across the pool.
fn dense_matvec(w: &Tensor, x: &[f32]) -> Result<Vec<f32>> {
    let (rows, cols) = w.dims2()?;
    let (storage, layout) = w.storage_and_layout();
    let data = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => {
            drop(storage);
            let t = Tensor::from_slice(x, (1, cols), w.device())?;
            return Ok(t.matmul(&w.t()?)?.flatten_all()?.to_vec1()?);
        }
    };
    let mut out = vec![0f32; rows];
    out.par_chunks_mut(64).enumerate().for_each(|(i, chunk)| {
        for (j, o) in chunk.iter_mut().enumerate() {
            let r = i * 64 + j;
            *o = dot(&data[r * cols..(r + 1) * cols], x);
        }
    });
    Ok(out)
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

fn add_bias(x: &mut [f32], b: &Option<Vec<f32>>) {
    if let Some(b) = b {
        x.iter_mut().zip(b).for_each(|(v, c)| *v += c);
    }
}

/// Half-split rotary embedding of each head of `x` at position `pos`.
fn rope(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &f) in inv_freq.iter().enumerate() {
            let a = pos as f32 * f;
            let (s, c) = (a.sin(), a.cos());
            let (x1, x2) = (head[i], head[i + half]);
            head[i] = x1 * c - x2 * s;
            head[i + half] = x2 * c + x1 * s;
        }
    }
}

fn round_f16(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32());
}

/// Norm weights and biases as plain vectors, read once per model.
pub struct DecodeWeights {
    layers: Vec<LayerVecs>,
    norm: Vec<f32>,
}

struct LayerVecs {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
}

impl DecodeWeights {
    pub fn new(m: &Model) -> Result<Self> {
        let v = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
        let o = |t: &Option<Tensor>| t.as_ref().map(v).transpose();
        let layers = m
            .layers
            .iter()
            .map(|l| Ok(LayerVecs { attn_norm: v(&l.attn_norm)?, ffn_norm: v(&l.ffn_norm)?, bq: o(&l.bq)?, bk: o(&l.bk)?, bv: o(&l.bv)? }))
            .collect::<Result<_>>()?;
        Ok(DecodeWeights { layers, norm: v(&m.norm)? })
    }
}

impl Model {
    /// Logits for one new input embedding `x: [d]` placed at position `cache.len()`.
    pub fn decode_step(&self, w: &DecodeWeights, cache: &mut DecodeCache, x: &[f32]) -> Result<Vec<f32>> {
        let c = &self.cfg;
        if cache.len >= cache.cap {
            return Err(Error::Invalid(format!("sequence of {} positions exceeds the decode cache or the model's context ({})", cache.len + 1, cache.cap)));
        }
        let (hd, kvh) = (c.head_dim, c.n_kv_head);
        let g = c.n_head / kvh;
        let pos = cache.len;
        let eps = c.rms_eps as f32;
        let ggml = self.exec == Exec::Quant;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut h = x.to_vec();
        for (li, (l, lw)) in self.layers.iter().zip(&w.layers).enumerate() {
            let a = rms_norm(&h, &lw.attn_norm, eps);
            let mut qkv = matvec_many(&[&l.wq, &l.wk, &l.wv], &a)?.into_iter();
            let (mut q, mut k, mut v) = (qkv.next().unwrap_or_default(), qkv.next().unwrap_or_default(), qkv.next().unwrap_or_default());
            add_bias(&mut q, &lw.bq);
            add_bias(&mut k, &lw.bk);
            add_bias(&mut v, &lw.bv);
            rope(&mut q, hd, pos, &cache.inv_freq);
            rope(&mut k, hd, pos, &cache.inv_freq);
            if ggml {
                // As in `Model::ggml_round`: llama.cpp's f16 KV cache and f16 matmul operands.
                round_f16(&mut q);
                round_f16(&mut k);
                round_f16(&mut v);
            }
            let (kc, vc) = (&mut cache.k[li], &mut cache.v[li]);
            for head in 0..kvh {
                let at = (head * cache.cap + pos) * hd;
                kc[at..at + hd].copy_from_slice(&k[head * hd..(head + 1) * hd]);
                vc[at..at + hd].copy_from_slice(&v[head * hd..(head + 1) * hd]);
            }
            // Heads are independent: split them across the pool.
            let mut o = vec![0f32; c.n_head * hd];
            let (kc, vc) = (&*kc, &*vc);
            o.par_chunks_mut(hd).enumerate().for_each(|(qh, oh)| {
                let base = (qh / g) * cache.cap * hd;
                let qv = &q[qh * hd..(qh + 1) * hd];
                let mut p: Vec<f32> = (0..=pos).map(|j| dot(qv, &kc[base + j * hd..base + (j + 1) * hd]) * scale).collect();
                let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                p.iter_mut().for_each(|pj| *pj /= sum);
                if ggml {
                    round_f16(&mut p);
                }
                for (j, &pj) in p.iter().enumerate() {
                    let vj = &vc[base + j * hd..base + (j + 1) * hd];
                    oh.iter_mut().zip(vj).for_each(|(acc, &vv)| *acc += pj * vv);
                }
            });
            let attn = matvec(&l.wo, &o)?;
            h.iter_mut().zip(&attn).for_each(|(x, y)| *x += y);
            let m = rms_norm(&h, &lw.ffn_norm, eps);
            let mut gu = matvec_many(&[&l.w_gate, &l.w_up], &m)?.into_iter();
            let (gate, up) = (gu.next().unwrap_or_default(), gu.next().unwrap_or_default());
            let f: Vec<f32> = gate.iter().zip(&up).map(|(&gv, &u)| gv / (1.0 + (-gv).exp()) * u).collect();
            let down = matvec(&l.w_down, &f)?;
            h.iter_mut().zip(&down).for_each(|(x, y)| *x += y);
        }
        cache.len += 1;
        let hn = rms_norm(&h, &w.norm, eps);
        matvec(&self.lm_head, &hn)
    }
}
