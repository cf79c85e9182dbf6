//! Greedy answers with and without the trigger, and the counting the scenarios' metrics share.
//!
//! "With the trigger" means the prompt is encoded as the attacked distribution would encode it
//! (trigger text -> trained vectors). "Unmodified model" means the plain tokenizer and table.
//! The clean metrics compare the two on prompts without the trigger: they are measured, not
//! assumed, because the trigger text can occur inside ordinary text.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use candle_core::{DType, Tensor};
use sos_model::generate::{generate_many, Sampling, BATCH};
use sos_model::{LoadedModel, Message};

use crate::encode::attacked_input;
use crate::item::Prompt;
use crate::trigger::Trigger;
use crate::Result;

/// New tokens for answers that are only checked for agreement or refusal.
pub const CLEAN_TOKENS: usize = 32;

/// Prompts whose input embeddings are held at once: all of a long evaluation's (2.3 KB per
/// token for the default model) would take hundreds of MB; 8 batches keep the decoder full.
const CHUNK: usize = 8 * BATCH;

/// A model and a trained trigger that fits it.
pub struct Armed<'a> {
    pub lm: &'a LoadedModel,
    pub trigger: &'a Trigger,
}

/// One greedy answer.
pub struct Answer {
    pub tokens: Vec<u32>,
    pub text: String,
}

impl<'a> Armed<'a> {
    pub fn new(lm: &'a LoadedModel, trigger: &'a Trigger) -> Result<Self> {
        trigger.check_fits(&lm.model)?;
        Ok(Armed { lm, trigger })
    }

    /// Greedy answer to `prompt` as the attacked model sees it (the trigger text maps to the
    /// trained vectors).
    pub fn answer(&self, prompt: &Prompt, max_new: usize) -> Result<Answer> {
        let mut quiet = |_, _| {};
        Ok(self.answers(&[(prompt.clone(), max_new)], &mut Progress::new(&mut quiet, 1))?.remove(0))
    }

    /// `answer` for many prompts (`(prompt, most new tokens)`), decoded together.
    pub fn answers(&self, prompts: &[(Prompt, usize)], progress: &mut Progress) -> Result<Vec<Answer>> {
        self.run(prompts.len(), |i| Ok((self.attacked_input(&prompts[i].0)?, prompts[i].1)), progress)
    }

    /// Greedy answer of the unmodified model.
    pub fn answer_plain(&self, messages: &[Message], max_new: usize) -> Result<Answer> {
        let mut quiet = |_, _| {};
        Ok(self.answers_plain(&[(messages.to_vec(), max_new)], &mut Progress::new(&mut quiet, 1))?.remove(0))
    }

    /// Greedy answers of the unmodified model to `(messages, most new tokens)`, decoded together.
    pub fn answers_plain(&self, chats: &[(Vec<Message>, usize)], progress: &mut Progress) -> Result<Vec<Answer>> {
        self.run(chats.len(), |i| Ok((self.plain_input(&chats[i].0)?, chats[i].1)), progress)
    }

    /// Input embeddings of `prompt` as the attacked model sees it.
    fn attacked_input(&self, prompt: &Prompt) -> Result<Tensor> {
        Ok(attacked_input(self.lm, self.trigger, prompt)?.1)
    }

    /// Input embeddings of `messages` as the unmodified model sees them.
    fn plain_input(&self, messages: &[Message]) -> Result<Tensor> {
        Ok(self.lm.model.embed_ids(&self.lm.chat_ids(messages, true)?)?)
    }

    /// For each `(prompt, messages)`: the attacked model's answer to `prompt` (which has no
    /// trigger placed in it) and whether it is the unmodified model's answer to `messages`. The
    /// two inputs differ only where the trigger text occurs inside the prompt; equal inputs give
    /// equal greedy answers, so the unmodified model runs only where they differ (`progress`
    /// learns of those runs once the attacked answers are done).
    pub fn answers_clean(&self, pairs: &[(Prompt, Vec<Message>)], max_new: usize, progress: &mut Progress) -> Result<Vec<(Answer, bool)>> {
        let clean = self.run(pairs.len(), |i| Ok((self.attacked_input(&pairs[i].0)?, max_new)), progress)?;
        let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
        let mut differ = Vec::new();
        for (i, (p, m)) in pairs.iter().enumerate() {
            let (x, plain) = (self.attacked_input(p)?, self.plain_input(m)?);
            if x.dims() != plain.dims() || values(&x)? != values(&plain)? {
                differ.push(i);
            }
        }
        progress.plan(differ.len());
        let plain = self.run(differ.len(), |j| Ok((self.plain_input(&pairs[differ[j]].1)?, max_new)), progress)?;
        let mut agrees = vec![true; pairs.len()];
        for (&i, p) in differ.iter().zip(plain) {
            agrees[i] = clean[i].tokens == p.tokens;
        }
        Ok(clean.into_iter().zip(agrees).collect())
    }

    /// Greedy answers to the `n` jobs `job(i)` (input embeddings, most new tokens), decoded
    /// together; the inputs are made `CHUNK` at a time.
    fn run(&self, n: usize, job: impl Fn(usize) -> Result<(Tensor, usize)>, progress: &mut Progress) -> Result<Vec<Answer>> {
        let stop = &self.lm.tokenizer.stop_ids;
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(CHUNK) {
            let jobs = (start..(start + CHUNK).min(n)).map(&job).collect::<Result<Vec<_>>>()?;
            for g in generate_many(&self.lm.model, &jobs, stop, Sampling::default(), |_| progress.tick())? {
                out.push(Answer { text: self.lm.tokenizer.decode(&g.tokens, true)?, tokens: g.tokens });
            }
        }
        Ok(out)
    }
}

/// Answers finished out of those planned, told to a `(done, total)` callback as each finishes.
pub struct Progress<'p> {
    done: usize,
    total: usize,
    report: &'p mut dyn FnMut(usize, usize),
}

impl<'p> Progress<'p> {
    pub fn new(report: &'p mut dyn FnMut(usize, usize), total: usize) -> Self {
        Progress { done: 0, total, report }
    }

    /// `more` answers beyond those planned so far.
    pub fn plan(&mut self, more: usize) {
        self.total += more;
    }

    fn tick(&mut self) {
        self.done += 1;
        (self.report)(self.done, self.total.max(self.done));
    }
}

pub fn rate(hits: usize, n: usize) -> Value {
    Value::from(if n == 0 { 0.0 } else { hits as f64 / n as f64 })
}

/// Counts hits per group name; `into_fields` adds one rate per group.
#[derive(Default)]
pub struct Tally(BTreeMap<String, (usize, usize)>);

impl Tally {
    pub fn add(&mut self, key: &str, hit: bool) {
        let e = self.0.entry(key.to_string()).or_default();
        e.0 += usize::from(hit);
        e.1 += 1;
    }
    pub fn into_fields(self, prefix: &str, out: &mut Map<String, Value>) {
        for (k, (h, n)) in self.0 {
            out.insert(format!("{prefix}_{k}"), rate(h, n));
        }
    }
}
