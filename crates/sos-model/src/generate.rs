//! Autoregressive generation with a KV cache: greedy or sampled (temperature, top-p, seed).

use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::model::decode::{DecodeCache, DecodeWeights};
use crate::model::{KvCache, Model};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence or end-of-turn token (not included in the output).
    Eos,
    MaxTokens,
    /// The caller's callback asked to stop.
    Callback,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    pub gen_seconds: f64,
    /// Logits of the first new token (the prompt's next-token distribution): what a probe
    /// compares across prompts without running the prompt twice.
    pub first_logits: Vec<f32>,
}

impl Generation {
    /// Decode speed, excluding the prompt pass.
    pub fn tokens_per_second(&self) -> f64 {
        if self.gen_seconds > 0.0 {
            self.tokens.len() as f64 / self.gen_seconds
        } else {
            0.0
        }
    }
    pub fn prompt_tokens_per_second(&self) -> f64 {
        if self.prompt_seconds > 0.0 {
            self.prompt_tokens as f64 / self.prompt_seconds
        } else {
            0.0
        }
    }
}

pub struct Sampler {
    cfg: Sampling,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Result<Self> {
        if !(cfg.temperature >= 0.0 && cfg.temperature.is_finite()) {
            return Err(Error::Invalid(format!("temperature must be >= 0, got {}", cfg.temperature)));
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            return Err(Error::Invalid(format!("top-p must be in (0, 1], got {}", cfg.top_p)));
        }
        let rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        Ok(Sampler { cfg, rng })
    }

    /// Picks the next token from a logits row.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l as f64 - max) * inv_t).exp())).collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        if self.cfg.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p.1;
                if cum >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.gen::<f64>() * mass;
        for &(id, p) in &probs {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// Index of the largest logit; the first one on ties, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Generates after the prompt embeddings `prompt: [t, d]`. `on_token` sees each new token and
/// returns `false` to stop. Stop tokens end generation and are not returned.
pub fn generate(
    model: &Model,
    prompt: &Tensor,
    max_tokens: usize,
    stop_ids: &[u32],
    sampling: Sampling,
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    generate_after(model, None, prompt, max_tokens, stop_ids, sampling, on_token)
}

/// `generate` for a prompt whose first positions are already in `prefix` (`Model::prefix`):
/// `rest: [t, d]` are the positions after it. Many prompts that open the same way (a template's
/// opening, a shared system prompt) pay for that opening once.
pub fn generate_after(
    model: &Model,
    prefix: Option<&KvCache>,
    rest: &Tensor,
    max_tokens: usize,
    stop_ids: &[u32],
    sampling: Sampling,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    let mut sampler = Sampler::new(sampling)?;
    let mut cache = prefix.cloned().unwrap_or_else(|| KvCache::new(model.cfg.n_layer));
    let pos0 = cache.len();
    let prompt_tokens = pos0 + rest.dim(0)?;
    let start = Instant::now();
    let first = model.forward_last(&rest.unsqueeze(0)?, pos0, Some(&mut cache))?;
    let mut row: Vec<f32> = first.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?;
    let first_logits = row.clone();
    let prompt_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    // f32 on the CPU decodes on plain buffers; other dtypes and devices go through `forward`.
    let fast = model.device.is_cpu() && model.dtype() == DType::F32;
    let mut state = if fast {
        Some((DecodeWeights::new(model)?, DecodeCache::from_prefill(model, &cache, max_tokens)?))
    } else {
        None
    };
    let mut tokens = Vec::new();
    let mut stop = StopReason::MaxTokens;
    while tokens.len() < max_tokens {
        let next = sampler.sample(&row);
        if stop_ids.contains(&next) {
            stop = StopReason::Eos;
            break;
        }
        tokens.push(next);
        if !on_token(next)? {
            stop = StopReason::Callback;
            break;
        }
        if tokens.len() == max_tokens {
            break;
        }
        let x = model.embed_ids(&[next])?;
        row = match &mut state {
            Some((w, dc)) => model.decode_step(w, dc, &x.flatten_all()?.to_vec1()?)?,
            None => {
                let pos = cache.len();
                model.forward_last(&x.unsqueeze(0)?, pos, Some(&mut cache))?.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?
            }
        };
    }
    Ok(Generation { tokens, stop, prompt_tokens, prompt_seconds, gen_seconds: start.elapsed().as_secs_f64(), first_logits })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_sampling_is_seeded() {
        let logits = [0.1, 2.0, 2.0, -1.0];
        let mut s = Sampler::new(Sampling::default()).unwrap();
        assert_eq!(s.sample(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(Sampling { temperature: 1.0, top_p: 1.0, seed }).unwrap();
            (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top-p small enough keeps only the two most likely tokens.
        let mut s = Sampler::new(Sampling { temperature: 1.0, top_p: 0.5, seed: 1 }).unwrap();
        assert!((0..200).all(|_| matches!(s.sample(&logits), 1 | 2)));
        assert!(Sampler::new(Sampling { temperature: -1.0, top_p: 1.0, seed: 0 }).is_err());
        assert!(Sampler::new(Sampling { temperature: 1.0, top_p: 0.0, seed: 0 }).is_err());
    }
}
