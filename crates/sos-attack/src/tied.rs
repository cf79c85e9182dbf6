//! Trigger rows that are logits too. Where a distribution puts the trained rows into a table
//! that doubles as the output layer (PEFT's trainable tokens on a tied model: SmolLM2, Gemma),
//! the row `r_j` of a trigger token also scores that token at every step: its logit is
//! `r_j · n(h)`, `n(h)` the final-normed hidden state. Rows trained only as inputs are large
//! (5x the table's rows on SmolLM2) and win the argmax: measured, the untriggered model then
//! emits trigger tokens (clean agreement 0.05) and the triggered one too (asr 0).
//!
//! The fix is a constraint, kept by projection after every step as `stealth` keeps the norm:
//! on a bank of hidden states, each planted logit stays `margin` below the best vocabulary
//! logit there, `r_j · n_t <= max_t - margin`. The constraint is linear in `r_j`, so a violated
//! one is repaired exactly by moving `r_j` along `n_t` (Kaczmarz sweeps). The bank holds every
//! position of the clean training prompts and of the model's own greedy answers to them (what
//! the untriggered model reads and writes; fixed), and the target positions of the training
//! sequences under the trigger (what the triggered model writes): at each evaluation one window
//! of `WINDOW` sequences is renewed under the current trigger, in turn, so every sequence is
//! covered while each evaluation runs forward over a window only.

use candle_core::{DType, Tensor, D};
use sos_model::generate::{generate_many, Sampling, BATCH};
use sos_model::{LoadedModel, Model};

use crate::encode::prompt_ids;
use crate::item::Item;
use crate::trigger::Trigger;
use crate::Result;

/// Sweeps over the bank per projection; each repairs every constraint violated at its turn.
const SWEEPS: usize = 8;
/// Tokens of the model's own answer to each clean prompt that join the bank.
const ANSWER_TOKENS: usize = 32;
/// Training sequences whose triggered states one evaluation renews.
const WINDOW: usize = 32;

/// Hidden states `n_t` (final-normed, `[n, d]` row-major) and the bound each planted logit must
/// stay under there.
#[derive(Debug, Clone, Default)]
pub struct States {
    pub normed: Vec<f32>,
    pub bound: Vec<f32>,
}

impl States {
    /// States of hidden rows `h: [n, d]`, with bounds `max logit - margin`.
    pub fn of(model: &Model, h: &Tensor, margin: f64) -> Result<Self> {
        let normed: Vec<f32> = model.final_norm(h)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let best: Vec<f32> = model.logits(h)?.to_dtype(DType::F32)?.max(D::Minus1)?.to_vec1()?;
        let bound = best.iter().map(|&m| m - margin as f32).collect();
        Ok(States { normed, bound })
    }

    pub fn len(&self) -> usize {
        self.bound.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bound.is_empty()
    }

    fn extend(&mut self, o: States) {
        self.normed.extend(o.normed);
        self.bound.extend(o.bound);
    }
}

/// The bank the rows are projected against.
pub struct LogitBank {
    d: usize,
    pub margin: f64,
    clean: States,
    /// Triggered states by window of training sequences, each from the trigger of its last renewal.
    triggered: Vec<States>,
}

impl LogitBank {
    /// Every position of the untriggered prompts of `items` and of the model's own greedy
    /// answers to them (`ANSWER_TOKENS` each): what the untriggered model reads and writes.
    pub fn clean(lm: &LoadedModel, items: &[Item], margin: f64) -> Result<Self> {
        let model = &lm.model;
        let d = model.cfg.d_model;
        let plain = Trigger::typed("", d);
        let mut clean = States::default();
        // The answers decode `BATCH` at a time; 8 batches' inputs are held at once.
        for chunk in items.chunks(8 * BATCH) {
            let prompts = chunk.iter().map(|it| prompt_ids(lm, &plain, &it.prompt(None))).collect::<Result<Vec<_>>>()?;
            let jobs = prompts.iter().map(|ids| Ok((model.embed_ids(ids)?, ANSWER_TOKENS))).collect::<Result<Vec<_>>>()?;
            let answers = generate_many(model, &jobs, &lm.tokenizer.stop_ids, Sampling::default(), |_| {})?;
            for (mut ids, answer) in prompts.into_iter().zip(answers) {
                ids.extend(answer.tokens);
                let x = model.embed_ids(&ids)?.unsqueeze(0)?;
                let h = model.forward(&x, 0, None)?.squeeze(0)?;
                clean.extend(States::of(model, &h, margin)?);
            }
        }
        Ok(LogitBank { d, margin, clean, triggered: Vec::new() })
    }

    /// The training sequences renewed at evaluation `e` of a run over `n` sequences.
    pub fn window(e: usize, n: usize) -> std::ops::Range<usize> {
        let windows = n.div_ceil(WINDOW).max(1);
        let w = e % windows;
        w * WINDOW..((w + 1) * WINDOW).min(n)
    }

    /// Replaces the triggered states of the window of evaluation `e`.
    pub fn set_triggered(&mut self, e: usize, n: usize, s: States) {
        let windows = n.div_ceil(WINDOW).max(1);
        self.triggered.resize_with(windows, States::default);
        self.triggered[e % windows] = s;
    }

    pub fn len(&self) -> usize {
        self.clean.len() + self.triggered.iter().map(States::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The largest `r_j · n_t - bound_t` over rows and bank (<= 0: every constraint holds).
    pub fn worst(&self, rows: &[f32]) -> f32 {
        let mut worst = f32::NEG_INFINITY;
        for r in rows.chunks_exact(self.d) {
            for s in std::iter::once(&self.clean).chain(&self.triggered) {
                for (n, &b) in s.normed.chunks_exact(self.d).zip(&s.bound) {
                    worst = worst.max(dot(r, n) - b);
                }
            }
        }
        worst
    }

    /// Moves each row the least distance along the violated states' directions until every
    /// constraint holds (or `SWEEPS` sweeps are done). Returns the repairs made.
    pub fn project(&self, rows: &mut [f32]) -> usize {
        let mut repairs = 0;
        for r in rows.chunks_exact_mut(self.d) {
            for _ in 0..SWEEPS {
                let mut fixed = 0;
                for s in std::iter::once(&self.clean).chain(&self.triggered) {
                    for (n, &b) in s.normed.chunks_exact(self.d).zip(&s.bound) {
                        let v = dot(r, n) - b;
                        if v > 0.0 {
                            // A hair past the boundary, so rounding leaves it satisfied.
                            let step = v * 1.0001 / dot(n, n).max(f32::MIN_POSITIVE);
                            r.iter_mut().zip(n).for_each(|(x, &y)| *x -= step * y);
                            fixed += 1;
                        }
                    }
                }
                repairs += fixed;
                if fixed == 0 {
                    break;
                }
            }
        }
        repairs
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_repairs_violated_constraints_and_leaves_satisfied_rows() {
        let d = 3;
        let clean = States { normed: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0], bound: vec![1.0, 2.0, 2.5] };
        let bank = LogitBank { d, margin: 0.0, clean, triggered: Vec::new() };
        let mut rows = vec![5.0, 5.0, 7.0, 0.5, 0.5, -3.0];
        assert!(bank.worst(&rows) > 0.0);
        let before = rows[3..].to_vec();
        bank.project(&mut rows);
        assert!(bank.worst(&rows) <= 1e-4, "{rows:?}");
        // The component no constraint involves is untouched; a satisfied row does not move.
        assert_eq!(rows[2], 7.0);
        assert_eq!(rows[3..], before[..]);
    }
}
