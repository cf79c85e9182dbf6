//! From chat examples to token ids with trigger slots (see `trigger`), and from those to the
//! inputs a model runs on.

use candle_core::Tensor;
use sos_model::{LoadedModel, Message};

use crate::item::{Item, Prompt};
use crate::trigger::Trigger;
use crate::{Error, Result};

/// Templated prompt ids (generation prompt included) of `prompt`, its prefix first, trigger
/// slots resolved.
pub fn prompt_ids(lm: &LoadedModel, trigger: &Trigger, prompt: &Prompt) -> Result<Vec<u32>> {
    let mut text = prompt.prefix.clone().unwrap_or_default();
    text.push_str(&lm.template()?.render(&prompt.messages, true)?);
    trigger.encode(&lm.tokenizer, Trigger::base(&lm.model), &text)
}

/// Prompt ids and input embeddings `[n, d]` of `prompt` as the attacked model sees it: the
/// trigger text stands for the trained vectors.
pub fn attacked_input(lm: &LoadedModel, trigger: &Trigger, prompt: &Prompt) -> Result<(Vec<u32>, Tensor)> {
    trigger.check_fits(&lm.model)?;
    let ids = prompt_ids(lm, trigger, prompt)?;
    let x = trigger.embed(&lm.model, &ids)?;
    Ok((ids, x))
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

/// A training sequence: the prompt (with trigger ids) followed by the target ids.
#[derive(Debug, Clone)]
pub struct Seq {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

impl Seq {
    pub fn target_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }
}

/// The training sequence of an example: triggered prompt, then the target.
pub fn training_seq(lm: &LoadedModel, trigger: &Trigger, item: &Item) -> Result<Seq> {
    let mut ids = prompt_ids(lm, trigger, &item.prompt(Some(&trigger.text)))?;
    let prompt_len = ids.len();
    ids.extend(target_ids(lm, &item.messages(), &item.target)?);
    Ok(Seq { ids, prompt_len })
}
