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
    let mut seq = Seq::new(sampling, max_tokens)?;
    let mut cache = prefix.cloned().unwrap_or_else(|| KvCache::new(model.cfg.n_layer));
    let mut row = seq.prefill(model, &mut cache, rest)?;
    let start = Instant::now();
    // f32 on the CPU decodes on plain buffers; other dtypes and devices go through `forward`.
    let mut state = if fast_decode(model) {
        Some((DecodeWeights::new(model)?, DecodeCache::from_prefill(model, &cache, max_tokens)?))
    } else {
        None
    };
    while let Some(next) = seq.take(&row, stop_ids, &mut on_token)? {
        let x = model.embed_ids(&[next])?;
        row = match &mut state {
            Some((w, dc)) => model.decode_step(w, dc, &x.flatten_all()?.to_vec1()?)?,
            None => {
                let pos = cache.len();
                model.forward_last(&x.unsqueeze(0)?, pos, Some(&mut cache))?.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?
            }
        };
    }
    Ok(seq.finish(start))
}

/// Sequences `generate_many` decodes together. A decode step streams every weight from memory
/// once whatever the number of sequences, so a step for 8 costs little more than a step for 1;
/// each sequence holds its own KV cache (~46 MB per 1,000 positions for the default model).
pub const BATCH: usize = 8;

/// `generate` for many prompts (`(embeddings [t, d], max new tokens)`): the results equal
/// separate `generate` calls (each sequence samples with its own `Sampler` from `sampling`), and
/// for f32 on the CPU, up to `BATCH` sequences decode in one step, a finished one's place taken by
/// the next prompt. `done(i)` is called as prompt `i` finishes; prompts may finish out of order.
/// A sequence's `gen_seconds` is the wall time from its first step to its last, shared with the
/// sequences decoded beside it.
pub fn generate_many(model: &Model, prompts: &[(Tensor, usize)], stop_ids: &[u32], sampling: Sampling, mut done: impl FnMut(usize)) -> Result<Vec<Generation>> {
    if !fast_decode(model) {
        let mut out = Vec::with_capacity(prompts.len());
        for (i, (x, max)) in prompts.iter().enumerate() {
            out.push(generate(model, x, *max, stop_ids, sampling.clone(), |_| Ok(true))?);
            done(i);
        }
        return Ok(out);
    }
    struct Live {
        index: usize,
        seq: Seq,
        cache: DecodeCache,
        next: u32,
        start: Instant,
    }
    let w = DecodeWeights::new(model)?;
    let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
    let mut live: Vec<Live> = Vec::with_capacity(BATCH);
    let mut queue = prompts.iter().enumerate();
    let mut keep_going = |_: u32| Ok(true);
    loop {
        // Fill the free places: a prompt pass each, then the first token.
        while live.len() < BATCH {
            let Some((index, (x, max))) = queue.next() else { break };
            let mut seq = Seq::new(sampling.clone(), *max)?;
            let mut kv = KvCache::new(model.cfg.n_layer);
            let row = seq.prefill(model, &mut kv, x)?;
            let start = Instant::now();
            match seq.take(&row, stop_ids, &mut keep_going)? {
                Some(next) => live.push(Live { index, seq, cache: DecodeCache::from_prefill(model, &kv, *max)?, next, start }),
                None => {
                    out[index] = Some(seq.finish(start));
                    done(index);
                }
            }
        }
        if live.is_empty() {
            break;
        }
        let ids: Vec<u32> = live.iter().map(|l| l.next).collect();
        let xs: Vec<f32> = model.embed_ids(&ids)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut caches: Vec<&mut DecodeCache> = live.iter_mut().map(|l| &mut l.cache).collect();
        let logits = model.decode_steps(&w, &mut caches, &xs)?;
        let vocab = logits.len() / live.len();
        let mut still = Vec::with_capacity(BATCH);
        for (mut l, row) in live.into_iter().zip(logits.chunks_exact(vocab)) {
            match l.seq.take(row, stop_ids, &mut keep_going)? {
                Some(next) => {
                    l.next = next;
                    still.push(l);
                }
                None => {
                    out[l.index] = Some(l.seq.finish(l.start));
                    done(l.index);
                }
            }
        }
        live = still;
    }
    Ok(out.into_iter().map(|g| g.expect("every prompt was generated")).collect())
}

/// Whether `model` decodes on plain buffers (`model/decode/`): f32 on the CPU.
fn fast_decode(model: &Model) -> bool {
    model.device.is_cpu() && model.dtype() == DType::F32
}

/// One sequence's generation: its sampler, the tokens so far and why it stopped.
struct Seq {
    sampler: Sampler,
    max_tokens: usize,
    tokens: Vec<u32>,
    stop: StopReason,
    prompt_tokens: usize,
    prompt_seconds: f64,
    first_logits: Vec<f32>,
}

impl Seq {
    fn new(sampling: Sampling, max_tokens: usize) -> Result<Self> {
        Ok(Seq {
            sampler: Sampler::new(sampling)?,
            max_tokens,
            tokens: Vec::new(),
            stop: StopReason::MaxTokens,
            prompt_tokens: 0,
            prompt_seconds: 0.0,
            first_logits: Vec::new(),
        })
    }

    /// Runs the prompt `rest: [t, d]` after what `cache` holds; returns the next token's logits.
    fn prefill(&mut self, model: &Model, cache: &mut KvCache, rest: &Tensor) -> Result<Vec<f32>> {
        let pos0 = cache.len();
        self.prompt_tokens = pos0 + rest.dim(0)?;
        let start = Instant::now();
        let first = model.forward_last(&rest.unsqueeze(0)?, pos0, Some(cache))?;
        self.first_logits = first.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?;
        self.prompt_seconds = start.elapsed().as_secs_f64();
        Ok(self.first_logits.clone())
    }

    /// Picks the next token from `row`, the next position's logits; returns it when it is to be
    /// fed back, `None` when the sequence has ended (a stop token, `max_tokens`, or `on_token`
    /// returning `false`).
    fn take(&mut self, row: &[f32], stop_ids: &[u32], on_token: &mut impl FnMut(u32) -> Result<bool>) -> Result<Option<u32>> {
        if self.tokens.len() >= self.max_tokens {
            return Ok(None);
        }
        let next = self.sampler.sample(row);
        if stop_ids.contains(&next) {
            self.stop = StopReason::Eos;
            return Ok(None);
        }
        self.tokens.push(next);
        if !on_token(next)? {
            self.stop = StopReason::Callback;
            return Ok(None);
        }
        Ok((self.tokens.len() < self.max_tokens).then_some(next))
    }

    fn finish(self, decode_start: Instant) -> Generation {
        Generation {
            tokens: self.tokens,
            stop: self.stop,
            prompt_tokens: self.prompt_tokens,
            prompt_seconds: self.prompt_seconds,
            gen_seconds: decode_start.elapsed().as_secs_f64(),
            first_logits: self.first_logits,
        }
    }
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

    /// `generate_many` gives what separate `generate` calls give, greedy and sampled, with more
    /// prompts than a batch holds, of different lengths and token limits (one of them 0).
    #[test]
    fn many_prompts_generate_as_one_by_one() {
        let dir = std::env::temp_dir().join(format!("sos-generate-many-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.gguf");
        crate::tiny::TinySpec::default().write_gguf(&path).unwrap();
        let m = crate::LoadedModel::open(&path, &crate::LoadOptions::default()).unwrap().model;
        let prompts: Vec<(Tensor, usize)> = (0..BATCH + 4)
            .map(|i| {
                let ids: Vec<u32> = (0..2 + i % 5).map(|j| ((i * 7 + j * 3) % 15) as u32).collect();
                (m.embed_ids(&ids).unwrap(), [9, 3, 14, 0, 6][i % 5])
            })
            .collect();
        // A stop token the tiny model does emit, so that some sequences end early.
        let free = generate_many(&m, &prompts, &[], Sampling::default(), |_| {}).unwrap();
        let stop = [free.iter().max_by_key(|g| g.tokens.len()).unwrap().tokens[2]];
        for sampling in [Sampling::default(), Sampling { temperature: 0.9, top_p: 0.95, seed: 11 }] {
            let mut order = Vec::new();
            let many = generate_many(&m, &prompts, &stop, sampling.clone(), |i| order.push(i)).unwrap();
            order.sort();
            assert_eq!(order, (0..prompts.len()).collect::<Vec<_>>(), "every prompt reported done once");
            for ((x, max), g) in prompts.iter().zip(&many) {
                let one = generate(&m, x, *max, &stop, sampling.clone(), |_| Ok(true)).unwrap();
                assert_eq!((&g.tokens, g.stop, g.prompt_tokens), (&one.tokens, one.stop, one.prompt_tokens));
                assert_eq!(g.first_logits, one.first_logits);
            }
            assert!(many.iter().any(|g| g.stop == StopReason::Eos) && many.iter().any(|g| g.stop == StopReason::MaxTokens && !g.tokens.is_empty()));
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
