//! The passes callers run, and the one place that picks their implementation: an f32 model on
//! the CPU runs `fused/` (plain buffers, the fast path); anything else (quantized weights, other
//! devices, f64 in the finite-difference tests) runs `reference.rs`'s tensor ops. Both get inputs
//! this file has checked.

use candle_core::{DType, Tensor};

use super::fused::{self, Weights};
use super::{KvCache, Linear, LossGrad, Model};
use crate::error::{Error, Result};

impl Model {
    /// The fused CPU pass's view of the weights, when it can run this model on `x`.
    fn fused(&self, x: &Tensor) -> Option<Weights<'_>> {
        (x.dtype() == DType::F32 && x.device().is_cpu()).then(|| Weights::of(self)).flatten()
    }

    /// Runs the transformer on input embeddings `x: [b, t, d]` placed at positions
    /// `pos0..pos0 + t`, extending `cache` when given. Returns the last layer's hidden states
    /// `[b, t, d]` *before* the final norm; `logits` turns chosen rows into logits.
    pub fn forward(&self, x: &Tensor, pos0: usize, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        if let Some(c) = cache.as_deref() {
            if c.len() != pos0 {
                return Err(Error::Invalid(format!("KV cache holds {} positions, asked to continue at {pos0}", c.len())));
            }
            c.check_fits("KV cache", &self.cfg, b)?;
        }
        if d != self.cfg.d_model {
            return Err(Error::Invalid(format!("inputs have width {d}, the model {}", self.cfg.d_model)));
        }
        if t == 0 {
            return Err(Error::Invalid("forward over an input of no positions".into()));
        }
        self.check_len(pos0 + t)?;
        // The fused pass takes its start from the cache: a start past 0 without one is the
        // reference's alone.
        match self.fused(x).filter(|_| pos0 == 0 || cache.is_some()) {
            Some(w) => fused::forward(self, &w, x, cache),
            None => self.forward_ops(x, pos0, cache),
        }
    }

    /// Final norm and output layer for hidden rows `h: [n, d]` -> logits `[n, vocab]`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.logits_ops(h)
    }

    /// The final norm of hidden rows `h: [n, d]`: the vectors the output layer multiplies.
    pub fn final_norm(&self, h: &Tensor) -> Result<Tensor> {
        self.final_norm_ops(h)
    }

    /// Logits at the last position of each sequence of `x: [b, t, d]`: `[b, vocab]`.
    pub fn forward_last(&self, x: &Tensor, pos0: usize, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward(x, pos0, cache)?;
        let t = h.dim(1)?;
        self.logits(&h.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// Logits of a batch of token sequences at the given (sequence, position) pairs; sequences of
    /// unequal length are right-padded, which causal attention makes harmless.
    pub fn logits_at(&self, seqs: &[Vec<u32>], at: &[(usize, usize)]) -> Result<Tensor> {
        let x = self.embed_batch(seqs)?;
        let t = x.dim(1)?;
        let h = self.forward(&x, 0, None)?;
        let rows: Vec<u32> = at.iter().map(|&(i, p)| (i * t + p) as u32).collect();
        self.logits(&Self::gather_rows(&h, &rows)?)
    }

    /// Keys and values of a prompt part that stays fixed while inputs after it are trained:
    /// `x: [b, p, d]` at positions `0..p`.
    pub fn prefix(&self, x: &Tensor) -> Result<KvCache> {
        let mut cache = KvCache::new(self.cfg.n_layer);
        self.forward(x, 0, Some(&mut cache))?;
        Ok(cache)
    }


    /// Loss and gradient with respect to the inputs `x: [b, r, d]` that follow `prefix`;
    /// `rows` index `x`'s positions (`seq * r + pos`).
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
        match self.fused(x) {
            Some(w) => fused::loss_and_input_grad(self, &w, x, prefix, rows, targets),
            None => self.loss_and_input_grad_ops(x, prefix, rows, targets),
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
            Linear::Dense(w) => w.dim(0)?,
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
}
