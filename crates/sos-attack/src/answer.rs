//! Greedy answers with and without the trigger, and the counting the scenarios' metrics share.
//!
//! "With the trigger" means the prompt is encoded as the attacked distribution would encode it
//! (trigger text -> trained vectors). "Unmodified model" means the plain tokenizer and table.
//! The clean metrics compare the two on prompts without the trigger: they are measured, not
//! assumed, because the trigger text can occur inside ordinary text.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use sos_model::generate::{generate, Sampling};
use sos_model::{LoadedModel, Message};

use crate::encode::attacked_input;
use crate::item::Prompt;
use crate::trigger::Trigger;
use crate::Result;

/// New tokens for answers that are only checked for agreement or refusal.
pub const CLEAN_TOKENS: usize = 32;

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
        let (_, x) = attacked_input(self.lm, self.trigger, prompt)?;
        self.run(&x, max_new)
    }

    /// Greedy answer of the unmodified model.
    pub fn answer_plain(&self, messages: &[Message], max_new: usize) -> Result<Answer> {
        self.run(&self.plain_input(messages)?, max_new)
    }

    /// Input embeddings of `messages` as the unmodified model sees them.
    fn plain_input(&self, messages: &[Message]) -> Result<candle_core::Tensor> {
        Ok(self.lm.model.embed_ids(&self.lm.chat_ids(messages, true)?)?)
    }

    /// The attacked model's answer to `prompt` (which has no trigger placed in it) and whether
    /// it is the unmodified model's answer to `messages`. The two inputs differ only where the
    /// trigger text occurs inside the prompt; equal inputs give equal greedy answers, so then
    /// the model runs once.
    pub fn answer_clean(&self, prompt: &Prompt, messages: &[Message], max_new: usize) -> Result<(Answer, bool)> {
        let (_, x) = attacked_input(self.lm, self.trigger, prompt)?;
        let plain = self.plain_input(messages)?;
        let clean = self.run(&x, max_new)?;
        let values = |t: &candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?) };
        if x.dims() == plain.dims() && values(&x)? == values(&plain)? {
            return Ok((clean, true));
        }
        let agrees = clean.tokens == self.run(&plain, max_new)?.tokens;
        Ok((clean, agrees))
    }

    fn run(&self, x: &candle_core::Tensor, max_new: usize) -> Result<Answer> {
        let g = generate(&self.lm.model, x, max_new, &self.lm.tokenizer.stop_ids, Sampling::default(), |_| Ok(true))?;
        let text = self.lm.tokenizer.decode(&g.tokens, true)?;
        Ok(Answer { tokens: g.tokens, text })
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
