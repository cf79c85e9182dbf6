//! The training objective: mean cross-entropy of the target tokens under teacher forcing, with
//! the trigger vectors spliced into the prompts, and its gradient with respect to those vectors.
//!
//! Work the math does not need is skipped: the tokens every training sequence starts with (the
//! template's opening and a shared system prompt, up to the first trigger) are run once as a
//! frozen KV prefix; the reverse pass starts after it; the output layer runs only on the
//! positions that predict target tokens.

use candle_core::{DType, Tensor};
use sos_model::{KvCache, Model};

use crate::encode::Seq;
use crate::tied::States;
use crate::trigger::Trigger;
use crate::{Error, Result};

/// Padded positions one forward/backward pass may hold (sequences x longest length).
pub const TOKENS_PER_PASS: usize = 1024;

pub struct Objective<'m> {
    model: &'m Model,
    /// First trigger id: every id from here on is a trigger slot.
    pub base: u32,
    pub seqs: Vec<Seq>,
    /// Leading ids shared by every sequence, before any trigger or target.
    pub prefix_len: usize,
    /// Padded positions one pass may hold; `TOKENS_PER_PASS` unless changed.
    pub tokens_per_pass: usize,
    prefix: Option<KvCache>,
}

/// Loss, gradient with respect to the trigger rows, and per sequence whether greedy decoding
/// would produce its whole target.
pub struct StepOut {
    pub loss: f64,
    pub grad: Vec<f32>,
    pub hits: Vec<bool>,
}

struct Batch {
    /// Inputs from the first trigger position of the batch on: `[b, r, d]`.
    x: Tensor,
    /// Inputs between the shared prefix and the first trigger position, when there are any:
    /// they do not depend on the trigger, so they run forward only, as more prefix.
    x_frozen: Option<Tensor>,
    rows: Vec<u32>,
    targets: Vec<u32>,
    /// Sequence (index into the batch) of each loss row.
    row_seq: Vec<usize>,
    /// Flat position in `x` (`seq * r + pos`) and trigger row of every trigger slot.
    slots: Vec<(usize, usize)>,
    b: usize,
}

impl<'m> Objective<'m> {
    pub fn new(model: &'m Model, seqs: Vec<Seq>) -> Result<Self> {
        let base = Trigger::base(model);
        if seqs.is_empty() {
            return Err(Error::Invalid("no training sequences".into()));
        }
        if let Some(s) = seqs.iter().find(|s| s.prompt_len == 0 || s.target_len() == 0) {
            return Err(Error::Invalid(format!("a training sequence has an empty prompt or target ({} ids)", s.ids.len())));
        }
        let first = &seqs[0].ids;
        let mut p = seqs.iter().map(|s| s.prompt_len - 1).min().unwrap_or(0);
        for s in &seqs {
            let slot = s.ids.iter().position(|&i| i >= base).unwrap_or(s.ids.len());
            let common = s.ids.iter().zip(first).take_while(|(a, b)| a == b).count();
            p = p.min(slot).min(common);
        }
        let prefix = if p > 0 { Some(model.prefix(&model.embed_ids(&first[..p])?.unsqueeze(0)?)?) } else { None };
        Ok(Objective { model, base, seqs, prefix_len: p, tokens_per_pass: TOKENS_PER_PASS, prefix })
    }

    fn batch(&self, idx: &[usize], trigger: &Trigger) -> Result<Batch> {
        let p = self.prefix_len;
        let is_slot = |&i: &u32| i >= self.base;
        // Positions before every sequence's first trigger slot need no gradient.
        let skip = idx.iter().map(|&i| self.seqs[i].ids[p..].iter().position(is_slot).unwrap_or(0)).min().unwrap_or(0);
        let full = idx.iter().map(|&i| self.seqs[i].ids.len() - p).max().unwrap_or(0);
        let r = full - skip;
        let b = idx.len();
        let mut flat = Vec::with_capacity(b * full);
        let (mut rows, mut targets, mut row_seq, mut slots) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (bi, &i) in idx.iter().enumerate() {
            let s = &self.seqs[i];
            let tail = &s.ids[p..];
            for (pos, &id) in tail.iter().enumerate().skip(skip) {
                if id >= self.base {
                    slots.push((bi * r + pos - skip, (id - self.base) as usize));
                }
            }
            flat.extend_from_slice(tail);
            flat.resize(flat.len() + full - tail.len(), 0);
            // Position q (absolute) predicts id q + 1.
            for q in s.prompt_len - 1..s.ids.len() - 1 {
                rows.push((bi * r + q - p - skip) as u32);
                targets.push(s.ids[q + 1]);
                row_seq.push(bi);
            }
        }
        let x = trigger.embed(self.model, &flat)?.reshape((b, full, self.model.cfg.d_model))?;
        let (x, x_frozen) = if skip > 0 { (x.narrow(1, skip, r)?, Some(x.narrow(1, 0, skip)?)) } else { (x, None) };
        Ok(Batch { x, x_frozen, rows, targets, row_seq, slots, b })
    }

    /// The KV cache the trainable part of `batch` continues: the shared prefix, then the
    /// batch's frozen positions.
    fn cache_for(&self, batch: &Batch) -> Result<Option<KvCache>> {
        let mut cache = self.prefix_for(batch.b)?;
        if let Some(xf) = &batch.x_frozen {
            let mut c = cache.unwrap_or_else(|| KvCache::new(self.model.cfg.n_layer));
            self.model.forward(xf, self.prefix_len, Some(&mut c))?;
            cache = Some(c);
        }
        Ok(cache)
    }

    fn prefix_for(&self, b: usize) -> Result<Option<KvCache>> {
        Ok(match &self.prefix {
            Some(c) => Some(c.repeat_batch(b)?),
            None => None,
        })
    }

    fn seq_hits(batch: &Batch, row_hits: &[bool]) -> Vec<bool> {
        let mut hits = vec![true; batch.b];
        for (&s, &h) in batch.row_seq.iter().zip(row_hits) {
            hits[s] &= h;
        }
        hits
    }

    /// Splits `idx` into groups of similar length whose padded size stays within
    /// `tokens_per_pass` (a single longer sequence gets a pass of its own): padding is work the
    /// math does not need, and the tape's memory grows with the padded size.
    fn groups(&self, idx: &[usize]) -> Vec<Vec<usize>> {
        let len = |i: usize| self.seqs[i].ids.len() - self.prefix_len;
        let mut order: Vec<usize> = idx.to_vec();
        order.sort_by_key(|&i| (len(i), i));
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for i in order {
            match groups.last_mut() {
                // Sorted ascending, so the new sequence is the group's longest.
                Some(g) if (g.len() + 1) * len(i) <= self.tokens_per_pass => g.push(i),
                _ => groups.push(vec![i]),
            }
        }
        groups
    }

    /// Loss (mean over every target token of the batch) and trigger gradient over the
    /// sequences `idx`; `hits` follow `idx`'s order.
    pub fn loss_grad(&self, idx: &[usize], trigger: &Trigger) -> Result<StepOut> {
        let d = self.model.cfg.d_model;
        let total: usize = idx.iter().map(|&i| self.seqs[i].target_len()).sum();
        let mut loss = 0.0;
        let mut grad = vec![0f32; trigger.k * d];
        let mut hit_of = std::collections::HashMap::new();
        for g in self.groups(idx) {
            let batch = self.batch(&g, trigger)?;
            let cache = self.cache_for(&batch)?;
            let out = self.model.loss_and_input_grad(&batch.x, cache.as_ref(), &batch.rows, &batch.targets)?;
            // Each pass averages over its own rows; weight it by its share of all target tokens.
            let w = batch.rows.len() as f64 / total as f64;
            loss += out.loss * w;
            let dx: Vec<f32> = out.grad.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            for &(pos, j) in &batch.slots {
                for (acc, v) in grad[j * d..(j + 1) * d].iter_mut().zip(&dx[pos * d..(pos + 1) * d]) {
                    *acc += (*v as f64 * w) as f32;
                }
            }
            for (bi, h) in Self::seq_hits(&batch, &out.hits).into_iter().enumerate() {
                hit_of.insert(g[bi], h);
            }
        }
        let hits = idx.iter().map(|i| hit_of[i]).collect();
        Ok(StepOut { loss, grad, hits })
    }

    /// Per sequence of `idx`, whether greedy decoding reproduces its target (forward only).
    pub fn hits(&self, idx: &[usize], trigger: &Trigger) -> Result<Vec<bool>> {
        let mut hit_of = std::collections::HashMap::new();
        for g in self.groups(idx) {
            for (bi, h) in self.group_hits(&g, trigger)?.into_iter().enumerate() {
                hit_of.insert(g[bi], h);
            }
        }
        Ok(idx.iter().map(|i| hit_of[i]).collect())
    }

    fn group_hits(&self, idx: &[usize], trigger: &Trigger) -> Result<Vec<bool>> {
        let (batch, h) = self.target_states(idx, trigger)?;
        let logits = self.model.logits(&h)?;
        let best: Vec<u32> = logits.argmax(candle_core::D::Minus1)?.to_vec1()?;
        let row_hits: Vec<bool> = best.iter().zip(&batch.targets).map(|(a, b)| a == b).collect();
        Ok(Self::seq_hits(&batch, &row_hits))
    }

    /// Hidden states `[rows, d]` at the positions of `idx` that predict target tokens (forward
    /// only), with the batch they came from.
    fn target_states(&self, idx: &[usize], trigger: &Trigger) -> Result<(Batch, Tensor)> {
        let batch = self.batch(idx, trigger)?;
        let h = match self.cache_for(&batch)? {
            Some(mut c) => {
                let at = c.len();
                self.model.forward(&batch.x, at, Some(&mut c))?
            }
            None => self.model.forward(&batch.x, 0, None)?,
        };
        let h = Model::gather_rows(&h, &batch.rows)?;
        Ok((batch, h))
    }

    /// The bank states (see `tied`) of every target position of `idx` under `trigger`.
    pub fn tied_states(&self, idx: &[usize], trigger: &Trigger, margin: f64) -> Result<States> {
        let mut all = States::default();
        for g in self.groups(idx) {
            let (_, h) = self.target_states(&g, trigger)?;
            let s = States::of(self.model, &h, margin)?;
            all.normed.extend(s.normed);
            all.bound.extend(s.bound);
        }
        Ok(all)
    }
}
