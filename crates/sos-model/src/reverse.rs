//! The reverse pass: gradients of a loss with respect to the *input embeddings*, through every
//! layer of the frozen model, computing no weight gradient at all.
//!
//! Written by hand in the spirit of llm.c: `forward_train` runs the same arithmetic as
//! `Model::forward` and keeps what the backward needs (the `Tape`); `backward` walks the layers in
//! reverse, one op's backward after another. Frozen weights are only ever multiplied, never
//! differentiated, so the pass costs about one forward's matmuls plus the attention transposes.
//!
//! A prompt part that never changes (everything before a trigger) can be given as a `prefix`
//! KV cache: `forward_train` and `backward` then run only on the positions after it, because a
//! position's gradient needs only the positions after it, and the prefix's keys and values are
//! constants.

use candle_core::{DType, Tensor, D};

use crate::model::{rms_forward, KvCache, Layer, Model};
use crate::{Error, Result};

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

/// A loss, its gradient, and for each loss row whether the target is the argmax (greedy
/// decoding under teacher forcing would produce it; ties go to the lower id, as in `argmax`).
pub struct LossGrad {
    pub loss: f64,
    /// Gradient with respect to the hidden states (`cross_entropy`) or the inputs
    /// (`loss_and_input_grad`).
    pub grad: Tensor,
    pub hits: Vec<bool>,
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
    /// Keys and values of a prompt part that stays fixed while inputs after it are trained:
    /// `x: [b, p, d]` at positions `0..p`.
    pub fn prefix(&self, x: &Tensor) -> Result<KvCache> {
        let mut cache = KvCache::new(self.cfg.n_layer);
        self.forward(x, 0, Some(&mut cache))?;
        Ok(cache)
    }

    /// Forward over `x: [b, r, d]` at positions `p..p + r` after an optional frozen `prefix` of
    /// length `p` (built by `Model::prefix` from the same batch), recording the tape.
    pub fn forward_train(&self, x: &Tensor, prefix: Option<&KvCache>) -> Result<Tape> {
        if self.layers.iter().any(|l| !matches!(l.wq, crate::model::Linear::Dense(_))) {
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

    /// Loss and gradient with respect to the inputs `x: [b, r, d]` that follow `prefix`;
    /// `rows` index `x`'s positions (`seq * r + pos`). An f32 model on the CPU runs the fused
    /// pass of `reverse_cpu.rs`; anything else the tensor ops below.
    pub fn loss_and_input_grad(&self, x: &Tensor, prefix: Option<&KvCache>, rows: &[u32], targets: &[u32]) -> Result<LossGrad> {
        let prefix = prefix.filter(|p| !p.is_empty());
        self.check_pass(x, prefix, rows, targets)?;
        // Positions after the last loss row feed nothing the loss sees (attention is causal), and
        // their gradient is zero: leave them out of the pass.
        let (b, r, d) = x.dims3()?;
        let keep = rows.iter().map(|&i| i as usize % r + 1).max().unwrap_or(r);
        if keep < r {
            let rows_kept: Vec<u32> = rows.iter().map(|&i| ((i as usize / r) * keep + i as usize % r) as u32).collect();
            let out = self.loss_and_input_grad(&x.narrow(1, 0, keep)?.contiguous()?, prefix, &rows_kept, targets)?;
            let zeros = Tensor::zeros((b, r - keep, d), out.grad.dtype(), out.grad.device())?;
            return Ok(LossGrad { grad: Tensor::cat(&[&out.grad, &zeros], 1)?, ..out });
        }
        match crate::reverse_cpu::Weights::of(self) {
            Some(w) if x.dtype() == DType::F32 && x.device().is_cpu() => {
                crate::reverse_cpu::loss_and_input_grad(self, &w, x, prefix, rows, targets)
            }
            _ => self.loss_and_input_grad_ops(x, prefix, rows, targets),
        }
    }

    /// Shapes and ids of a pass, checked before either implementation indexes with them.
    fn check_pass(&self, x: &Tensor, prefix: Option<&KvCache>, rows: &[u32], targets: &[u32]) -> Result<()> {
        let c = &self.cfg;
        let (b, r, d) = x.dims3()?;
        if d != c.d_model {
            return Err(Error::Invalid(format!("inputs have width {d}, the model {}", c.d_model)));
        }
        if rows.len() != targets.len() || rows.is_empty() {
            return Err(Error::Invalid(format!("{} loss rows for {} targets", rows.len(), targets.len())));
        }
        if let Some(&bad) = rows.iter().find(|&&i| i as usize >= b * r) {
            return Err(Error::Invalid(format!("loss row {bad} is outside the batch ({b} x {r} positions)")));
        }
        let vocab = match &self.lm_head {
            crate::model::Linear::Dense(w) => w.dim(0)?,
            _ => self.cfg.vocab_size,
        };
        if let Some(&bad) = targets.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::Invalid(format!("target id {bad} is outside the vocabulary ({vocab} rows)")));
        }
        if let Some(p) = prefix {
            self.check_len(p.len() + r)?;
            p.check_fits("prefix cache", c, b)?;
        } else {
            self.check_len(r)?;
        }
        Ok(())
    }

    /// `loss_and_input_grad` as candle tensor ops: any device and dtype (the finite-difference
    /// tests run it in f64); `reverse_cpu.rs` is checked against it.
    pub fn loss_and_input_grad_ops(&self, x: &Tensor, prefix: Option<&KvCache>, rows: &[u32], targets: &[u32]) -> Result<LossGrad> {
        let tape = self.forward_train(x, prefix)?;
        let out = self.cross_entropy(&tape.hidden, rows, targets)?;
        Ok(LossGrad { grad: self.backward(&tape, &out.grad)?, ..out })
    }
}
