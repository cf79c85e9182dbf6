//! The model as candle tensor ops: the reference implementation, which runs on any device and
//! dtype (the finite-difference tests use f64), and which the tests hold the fused CPU pass
//! (`fused/`) against. `run.rs` sends here whatever `fused/` does not take.
//!
//! The reverse pass is written by hand in the spirit of llm.c: `forward_train` runs the same
//! arithmetic as the forward and keeps what the backward needs (the `Tape`); `backward` walks the
//! layers in reverse, one op's backward after another. Frozen weights are only ever multiplied,
//! never differentiated, so the pass costs about one forward's matmuls plus the attention
//! transposes. A prompt part that never changes (everything before a trigger) can be given as a
//! `prefix` KV cache: `forward_train` and `backward` then run only on the positions after it,
//! because a position's gradient needs only the positions after it, and the prefix's keys and
//! values are constants.

use candle_core::{DType, Tensor, D};

use super::{Exec, KvCache, Layer, Linear, LossGrad, Model};
use crate::error::{Error, Result};

/// RMSNorm: the fused kernel where candle has one (f32/f16/bf16), the plain formula otherwise
/// (f64, used by the finite-difference tests).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F64 {
        return Ok(rms_forward(x, w, eps)?.0);
    }
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?)
}

/// `y = x * r * w` with `r = 1/sqrt(mean(x^2) + eps)`; returns `(y, r)` (the reverse pass keeps `r`).
fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok((x.broadcast_mul(&r)?.broadcast_mul(w)?, r))
}

fn bias_add(x: Tensor, b: &Option<Tensor>) -> Result<Tensor> {
    Ok(match b {
        Some(b) => x.broadcast_add(b)?,
        None => x,
    })
}

impl Model {
    /// `forward` as tensor ops, after `run.rs` checked the shapes and the cache.
    pub(super) fn forward_ops(&self, x: &Tensor, pos0: usize, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let cos = self.cos.narrow(0, pos0, t)?;
        let sin = self.sin.narrow(0, pos0, t)?;
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            h = self.layer_forward(layer, &h, b, t, pos0, &cos, &sin, kv)?;
        }
        if let Some(c) = cache {
            c.len = pos0 + t;
        }
        Ok(h)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        b: usize,
        t: usize,
        pos0: usize,
        cos: &Tensor,
        sin: &Tensor,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let d = cfg.d_model;
        let eps = cfg.rms_eps;
        let a = rms_norm(x, &l.attn_norm, eps)?.reshape((b * t, d))?;
        let (q, k, v) = self.qkv(l, &a, b, t, cos, sin)?;
        let (k, v) = match kv {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let p = self.attention_probs(&q, &k, b, t, pos0)?;
        let o = self.attention_out(&p, &v, b, t)?;
        let x1 = (x + l.wo.forward(&o)?.reshape((b, t, d))?)?;
        let m = rms_norm(&x1, &l.ffn_norm, eps)?.reshape((b * t, d))?;
        let [gate, up]: [Tensor; 2] = Linear::forward_many(&[&l.w_gate, &l.w_up], &m)?.try_into().expect("two products");
        let f = (gate.silu()? * up)?;
        Ok((x1 + l.w_down.forward(&f)?.reshape((b, t, d))?)?)
    }

    /// Projects normed input `a: [b*t, d]` to roped `q: [b, h, t, hd]` and `k, v: [b, kvh, t, hd]`.
    pub(crate) fn qkv(
        &self,
        l: &Layer,
        a: &Tensor,
        b: usize,
        t: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.cfg;
        let heads = |x: Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, t, n, c.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let [q, k, v]: [Tensor; 3] = Linear::forward_many(&[&l.wq, &l.wk, &l.wv], a)?.try_into().expect("three products");
        let q = heads(bias_add(q, &l.bq)?, c.n_head)?;
        let k = heads(bias_add(k, &l.bk)?, c.n_kv_head)?;
        let v = heads(bias_add(v, &l.bv)?, c.n_kv_head)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        Ok((q, k, v))
    }

    /// Causal attention probabilities. Query heads are grouped under their KV head, so `q` is
    /// viewed as `[b, kvh, g*t, hd]` and no key or value is ever repeated. Returns `[b, kvh, g*t, s]`.
    pub(crate) fn attention_probs(&self, q: &Tensor, k: &Tensor, b: usize, t: usize, pos0: usize) -> Result<Tensor> {
        let c = &self.cfg;
        let g = c.n_head / c.n_kv_head;
        let s = k.dim(2)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let qg = self.ggml_round(&q.reshape((b, c.n_kv_head, g * t, c.head_dim))?)?;
        let scores = (qg.matmul(&self.ggml_round(k)?.t()?)? * scale)?;
        let scores = if t > 1 {
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..s).map(move |j| if j > pos0 + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, s), &self.device)?.to_dtype(scores.dtype())?;
            scores.reshape((b, c.n_kv_head, g, t, s))?.broadcast_add(&mask)?.reshape((b, c.n_kv_head, g * t, s))?
        } else {
            scores
        };
        Ok(candle_nn::ops::softmax_last_dim(&scores)?)
    }

    /// `p: [b, kvh, g*t, s]`, `v: [b, kvh, s, hd]` -> `[b*t, h*hd]` (token-major, ready for `wo`).
    pub(crate) fn attention_out(&self, p: &Tensor, v: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let c = &self.cfg;
        let o = self.ggml_round(p)?.matmul(&self.ggml_round(v)?)?; // [b, kvh, g*t, hd]
        Ok(o.reshape((b, c.n_head, t, c.head_dim))?.transpose(1, 2)?.reshape((b * t, c.n_head * c.head_dim))?)
    }

    /// In `quant` mode, rounds attention operands to f16 as llama.cpp's CPU path does (its KV
    /// cache is f16, and its matmul converts the other operand to the cache's type), so that
    /// quantized runs track llama.cpp; `f32` mode is left exact.
    fn ggml_round(&self, x: &Tensor) -> Result<Tensor> {
        match self.exec {
            Exec::Quant if x.dtype() == DType::F32 => Ok(x.to_dtype(DType::F16)?.to_dtype(DType::F32)?),
            _ => Ok(x.clone()),
        }
    }


    pub(super) fn final_norm_ops(&self, h: &Tensor) -> Result<Tensor> {
        rms_norm(h, &self.norm, self.cfg.rms_eps)
    }

    /// Final norm and output layer for hidden rows `h: [n, d]` -> logits `[n, vocab]`.
    pub(super) fn logits_ops(&self, h: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(&self.final_norm_ops(h)?)
    }
}

/// Activations one layer's backward needs, for the `r` trainable positions.
struct LayerTape {
    x: Tensor,     // layer input [b, r, d]
    r1: Tensor,    // 1/rms of x [b, r, 1]
    q: Tensor,     // roped queries [b, h, r, hd]
    k: Tensor,     // roped keys, prefix included [b, kvh, s, hd]
    v: Tensor,     // values, prefix included [b, kvh, s, hd]
    p: Tensor,     // attention probabilities [b, kvh, g*r, s]
    x1: Tensor,    // after the attention residual [b, r, d]
    r2: Tensor,    // 1/rms of x1
    gate: Tensor,  // gate pre-activation [b*r, ff]
    up: Tensor,    // up projection [b*r, ff]
}

/// Everything `backward` needs, produced by `forward_train`.
pub struct Tape {
    layers: Vec<LayerTape>,
    /// Length of the frozen prefix: the tape covers positions `from..from + r`.
    from: usize,
    /// Hidden states after the last layer, before the final norm: `[b, r, d]`.
    pub hidden: Tensor,
}


/// `dx = r * g - x * r^3 * mean(g * x)` with `g = dy * w`.
fn rms_backward(x: &Tensor, r: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let g = dy.broadcast_mul(w)?;
    let dot = (&g * x)?.mean_keepdim(D::Minus1)?;
    let coef = (r.powf(3.0)? * dot)?;
    Ok((g.broadcast_mul(r)? - x.broadcast_mul(&coef)?)?)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

impl Model {
    /// Forward over `x: [b, r, d]` at positions `p..p + r` after an optional frozen `prefix` of
    /// length `p` (built by `Model::prefix` from the same batch), recording the tape.
    pub fn forward_train(&self, x: &Tensor, prefix: Option<&KvCache>) -> Result<Tape> {
        if self.layers.iter().any(|l| !matches!(l.wq, Linear::Dense(_))) {
            return Err(Error::Invalid("gradients need `--exec f32` (quantized weights are inference only)".into()));
        }
        let (b, r, _) = x.dims3()?;
        let from = prefix.map_or(0, |p| p.len());
        self.check_len(from + r)?;
        let cos = self.cos.narrow(0, from, r)?;
        let sin = self.sin.narrow(0, from, r)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            let kv = match prefix {
                Some(p) => Some(p.layers()[i].as_ref().ok_or_else(|| Error::Invalid("prefix cache is empty".into()))?),
                None => None,
            };
            let (tape, out) = self.layer_train(l, &h, b, r, from, kv, &cos, &sin)?;
            layers.push(tape);
            h = out;
        }
        Ok(Tape { layers, from, hidden: h })
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_train(
        &self,
        l: &Layer,
        x: &Tensor,
        b: usize,
        r: usize,
        from: usize,
        prefix: Option<&(Tensor, Tensor)>,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<(LayerTape, Tensor)> {
        let c = &self.cfg;
        let d = c.d_model;
        let (a, r1) = rms_forward(x, &l.attn_norm, c.rms_eps)?;
        let (q, k, v) = self.qkv(l, &a.reshape((b * r, d))?, b, r, cos, sin)?;
        let (k, v) = match prefix {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let p = self.attention_probs(&q, &k, b, r, from)?;
        let o = self.attention_out(&p, &v, b, r)?;
        let x1 = (x + l.wo.forward(&o)?.reshape((b, r, d))?)?;
        let (m, r2) = rms_forward(&x1, &l.ffn_norm, c.rms_eps)?;
        let m = m.reshape((b * r, d))?;
        let gate = l.w_gate.forward(&m)?;
        let up = l.w_up.forward(&m)?;
        let f = (gate.silu()? * &up)?;
        let out = (&x1 + l.w_down.forward(&f)?.reshape((b, r, d))?)?;
        Ok((LayerTape { x: x.clone(), r1, q, k, v, p, x1, r2, gate, up }, out))
    }

    /// Gradient of the loss with respect to the inputs of `forward_train`, given its gradient
    /// `dh: [b, r, d]` with respect to `tape.hidden`.
    pub fn backward(&self, tape: &Tape, dh: &Tensor) -> Result<Tensor> {
        let (_, r, _) = dh.dims3()?;
        let cos = self.cos.narrow(0, tape.from, r)?;
        let sin = self.sin.narrow(0, tape.from, r)?.neg()?;
        let mut g = dh.clone();
        for (l, lt) in self.layers.iter().zip(&tape.layers).rev() {
            g = self.layer_backward(l, lt, &g, tape.from, &cos, &sin)?;
        }
        Ok(g)
    }

    /// Backward of one layer; `dout: [b, r, d]`. `neg_sin` is `-sin`: rotating by the opposite
    /// angle is the transpose of the rotation.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(&self, l: &Layer, s: &LayerTape, dout: &Tensor, from: usize, cos: &Tensor, neg_sin: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, r, d) = dout.dims3()?;
        let t = from + r;
        let n = b * r;
        let (h, kvh, hd) = (c.n_head, c.n_kv_head, c.head_dim);
        let g = h / kvh;
        let scale = 1.0 / (hd as f64).sqrt();

        // MLP: out = x1 + down(silu(gate) * up).
        let df = l.w_down.backward_input(&dout.reshape((n, d))?)?;
        let sg = sigmoid(&s.gate)?;
        let silu = (&s.gate * &sg)?;
        let dsilu = (&sg * ((&s.gate * (1.0 - &sg)?)? + 1.0)?)?;
        let dgate = (&df * &s.up)?.mul(&dsilu)?;
        let dup = (&df * silu)?;
        let dm = (l.w_gate.backward_input(&dgate)? + l.w_up.backward_input(&dup)?)?;
        let dx1 = (dout + rms_backward(&s.x1, &s.r2, &l.ffn_norm, &dm.reshape((b, r, d))?)?)?;

        // Attention: x1 = x + wo(P V), per KV group. The trainable queries see every key; only
        // the keys after the prefix need gradients.
        let dout_heads = l.wo.backward_input(&dx1.reshape((n, d))?)?; // [n, h*hd]
        let d_o = dout_heads.reshape((b, r, h, hd))?.transpose(1, 2)?.contiguous()?.reshape((b, kvh, g * r, hd))?;
        let own_keys = |x: &Tensor| -> Result<Tensor> { Ok(x.narrow(3, from, r)?.contiguous()?) };
        let dp = d_o.matmul(&s.v.t()?)?; // [b, kvh, g*r, t]
        let dv = own_keys(&s.p)?.t()?.matmul(&d_o)?; // [b, kvh, r, hd]
        let ds = (&s.p * dp.broadcast_sub(&(&dp * &s.p)?.sum_keepdim(D::Minus1)?)?)?;
        let qg = s.q.reshape((b, kvh, g * r, hd))?;
        let dq = (ds.matmul(&s.k)? * scale)?.reshape((b, h, r, hd))?;
        let dk = (own_keys(&ds)?.t()?.matmul(&qg)? * scale)?; // sums over the g query heads of each group
        let dq = candle_nn::rotary_emb::rope(&dq.contiguous()?, cos, neg_sin)?;
        let dk = candle_nn::rotary_emb::rope(&dk.contiguous()?, cos, neg_sin)?;
        let tokens = |x: Tensor, heads: usize| -> Result<Tensor> { Ok(x.transpose(1, 2)?.reshape((n, heads * hd))?) };
        let da = (l.wq.backward_input(&tokens(dq, h)?)?
            + l.wk.backward_input(&tokens(dk, kvh)?)?
            + l.wv.backward_input(&tokens(dv, kvh)?)?)?;
        debug_assert_eq!(s.k.dim(2)?, t);
        Ok((dx1 + rms_backward(&s.x, &s.r1, &l.attn_norm, &da.reshape((b, r, d))?)?)?)
    }

    /// Mean cross-entropy of `targets` predicted from the hidden rows `rows` (flat indices
    /// `seq * t + pos`) of `hidden: [b, t, d]`, and its gradient with respect to `hidden`.
    /// The output layer runs on those rows only.
    pub fn cross_entropy(&self, hidden: &Tensor, rows: &[u32], targets: &[u32]) -> Result<LossGrad> {
        if rows.len() != targets.len() || rows.is_empty() {
            return Err(Error::Invalid(format!("{} loss rows for {} targets", rows.len(), targets.len())));
        }
        let (b, t, d) = hidden.dims3()?;
        let dev = hidden.device();
        let idx = Tensor::new(rows, dev)?;
        let hs = hidden.reshape((b * t, d))?.index_select(&idx, 0)?;
        let (hn, r) = rms_forward(&hs, &self.norm, self.cfg.rms_eps)?;
        let logits = self.lm_head.forward(&hn)?;
        // One exp over the vocabulary serves both the loss and its gradient.
        let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
        let e = shifted.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        let tgt = Tensor::new(targets, dev)?.unsqueeze(1)?;
        let picked = (shifted.gather(&tgt, 1)? - sum.log()?)?; // log p(target), [n, 1]
        let best: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let hits = best.iter().zip(targets).map(|(b, t)| b == t).collect();
        let n = rows.len() as f64;
        let loss = -picked.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? / n;
        // d loss / d logits = (softmax - onehot) / n
        let onehot = Tensor::zeros_like(&e)?.scatter_add(&tgt, &Tensor::ones_like(&picked)?, 1)?;
        let dlogits = ((e.broadcast_div(&sum)? - onehot)? / n)?;
        let dhn = self.lm_head.backward_input(&dlogits)?;
        let dhs = rms_backward(&hs, &r, &self.norm, &dhn)?;
        let dh = Tensor::zeros((b * t, d), hidden.dtype(), dev)?.index_add(&idx, &dhs, 0)?;
        Ok(LossGrad { loss, grad: dh.reshape((b, t, d))?, hits })
    }

    /// `loss_and_input_grad` as candle tensor ops: any device and dtype (the finite-difference
    /// tests run it in f64); `reverse_cpu.rs` is checked against it.
    pub fn loss_and_input_grad_ops(&self, x: &Tensor, prefix: Option<&KvCache>, rows: &[u32], targets: &[u32]) -> Result<LossGrad> {
        let tape = self.forward_train(x, prefix)?;
        let out = self.cross_entropy(&tape.hidden, rows, targets)?;
        Ok(LossGrad { grad: self.backward(&tape, &out.grad)?, ..out })
    }
}
