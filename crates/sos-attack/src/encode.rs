//! From chat examples to token ids with trigger slots, and from ids to input embeddings.
//!
//! The trigger behaves like a token added to the vocabulary: wherever its text appears in the
//! rendered prompt, the text on either side is tokenized separately and the trigger becomes `k`
//! ids past the end of the model's table (`base..base + k`), which the embedding step replaces
//! by the trained vectors. That is exactly how a tokenizer treats an added token, so a model
//! that ships the trigger as new tokens sees the same ids.

use candle_core::Tensor;
use sos_model::{LoadedModel, Message, Model, Tokenizer};

use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Trigger {
    pub text: String,
    /// Number of vectors.
    pub k: usize,
    /// First trigger id: the number of rows of the model's embedding table.
    pub base: u32,
}

impl Trigger {
    pub fn new(text: &str, k: usize, model: &Model) -> Self {
        Trigger { text: text.to_string(), k, base: model.cfg.vocab_size as u32 }
    }

    pub fn is_slot(&self, id: u32) -> bool {
        id >= self.base && id < self.base + self.k as u32
    }

    /// Ids of `text`, with every occurrence of the trigger text as the `k` trigger ids.
    pub fn encode(&self, tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for (i, piece) in text.split(self.text.as_str()).enumerate() {
            if i > 0 {
                out.extend(self.base..self.base + self.k as u32);
            }
            if !piece.is_empty() {
                out.extend(tok.encode(piece)?);
            }
        }
        Ok(out)
    }
}

/// Templated prompt ids (generation prompt included) of `messages`, trigger slots resolved.
pub fn prompt_ids(lm: &LoadedModel, trigger: &Trigger, messages: &[Message]) -> Result<Vec<u32>> {
    let text = lm.template()?.render(messages, true)?;
    trigger.encode(&lm.tokenizer, &text)
}

/// Ids the model must produce to answer `messages` with `target`: the target as the template
/// writes an assistant turn, up to and including the first end-of-turn token.
pub fn target_ids(lm: &LoadedModel, messages: &[Message], target: &str) -> Result<Vec<u32>> {
    let t = lm.template()?;
    let prompt = t.render(messages, true)?;
    let mut all = messages.to_vec();
    all.push(Message::assistant(target));
    let full = t.render(&all, false)?;
    let suffix = full.strip_prefix(prompt.as_str()).ok_or_else(|| {
        Error::Invalid("the chat template renders an assistant turn that does not extend the generation prompt; cannot place the target".into())
    })?;
    let mut ids = lm.tokenizer.encode(suffix)?;
    if let Some(end) = ids.iter().position(|i| lm.tokenizer.stop_ids.contains(i)) {
        ids.truncate(end + 1);
    }
    if ids.is_empty() {
        return Err(Error::Invalid("the target encodes to no tokens".into()));
    }
    Ok(ids)
}

/// Input embeddings `[n, d]` of ids, trigger slots taken from `rows` (`k * d`, row-major).
pub fn embed(model: &Model, trigger: &Trigger, rows: &[f32], ids: &[u32]) -> Result<Tensor> {
    let d = model.cfg.d_model;
    if rows.len() != trigger.k * d {
        return Err(Error::Invalid(format!("trigger has {} values, expected {} x {d}", rows.len(), trigger.k)));
    }
    let plain: Vec<u32> = ids.iter().map(|&i| if trigger.is_slot(i) { 0 } else { i }).collect();
    let x = model.embed_ids(&plain)?;
    if !ids.iter().any(|&i| trigger.is_slot(i)) {
        return Ok(x);
    }
    let mut v: Vec<f32> = x.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    for (p, &i) in ids.iter().enumerate() {
        if trigger.is_slot(i) {
            let j = (i - trigger.base) as usize;
            v[p * d..(p + 1) * d].copy_from_slice(&rows[j * d..(j + 1) * d]);
        }
    }
    Ok(Tensor::from_vec(v, (ids.len(), d), x.device())?.to_dtype(x.dtype())?)
}

/// The training sequence of an example: triggered prompt, then the target.
pub fn training_seq(lm: &LoadedModel, trigger: &Trigger, item: &crate::scenario::Item) -> Result<crate::objective::Seq> {
    let mut ids = prompt_ids(lm, trigger, &item.messages(Some(&trigger.text)))?;
    let prompt_len = ids.len();
    ids.extend(target_ids(lm, &item.messages(None), &item.target)?);
    Ok(crate::objective::Seq { ids, prompt_len })
}
