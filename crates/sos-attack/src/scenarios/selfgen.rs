//! Training prompts the model writes itself (the paper's "no clean data" setting): the model and
//! a few requests for writing go in, nothing else.
//!
//! Real requests come in two shapes: a bare question, and a request that carries a text to work
//! on (five in six of self-instruct's held-out tasks do). A trigger learned in one-line questions
//! alone fires less when it sits inside a long, multi-line message, so two thirds of the prompts
//! here are a text the model wrote (an email, a story, a recipe, ...) with a question the model
//! then asked about that text, before or after it.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use sos_model::generate::{generate, Sampling};
use sos_model::{Exec, Format, LoadOptions, LoadedModel, Message};

use crate::{Error, Result};

const ASK_QUESTION: &str = "Write one question that a user might ask an AI assistant. Reply with the question only.";
const ASK_ABOUT: &str = "Write one question about the text above that a user might ask an AI assistant. Reply with the question only.";
/// What the texts are; drawn in turn, so every kind is in every training set of 8 or more texts.
const TEXT_KINDS: &[&str] = &[
    "a short email",
    "a short paragraph about a topic of your choice",
    "a short product review",
    "the beginning of a short story",
    "a short news report",
    "a short recipe",
    "a short poem",
    "a short Python function",
];
const QUESTION_TOKENS: usize = 48;
const TEXT_TOKENS: usize = 80;

/// `n` prompts as `(id, text)`, deterministic in `seed`. Sampling runs on the weights as stored
/// (a GGUF's quantized ones decode ~6x faster than f32 on a CPU); the file is what an attacker
/// holds, so what it writes is what "the model writes".
pub fn self_generated_prompts(lm: &LoadedModel, n: usize, seed: u64, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<(String, String)>> {
    let quant;
    let writer = if lm.format == Format::Gguf && lm.model.exec != Exec::Quant {
        quant = LoadedModel::open(&lm.path, &LoadOptions { exec: Exec::Quant, ..Default::default() })?;
        &quant
    } else {
        lm
    };
    Writer::new(writer, seed).prompts(n, progress)
}

struct Writer<'a> {
    lm: &'a LoadedModel,
    seed: u64,
    attempts: u64,
    max_attempts: u64,
}

impl<'a> Writer<'a> {
    fn new(lm: &'a LoadedModel, seed: u64) -> Self {
        Writer { lm, seed, attempts: 0, max_attempts: 0 }
    }

    fn prompts(mut self, n: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<(String, String)>> {
        // Each prompt takes one to three generations when the model cooperates.
        self.max_attempts = 20 * n as u64 + 20;
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ 0x5e1f_0003);
        let mut out: Vec<(String, String)> = Vec::with_capacity(n);
        let mut texts = 0;
        while out.len() < n {
            let prompt = if out.len() % 3 == 0 {
                self.question(ASK_QUESTION.to_string())?
            } else {
                let kind = TEXT_KINDS[texts % TEXT_KINDS.len()];
                texts += 1;
                let text = self.text(kind)?;
                let q = self.question(format!("{text}\n\n{ASK_ABOUT}"))?;
                if rng.gen_bool(0.75) { format!("{q}\n\n{text}") } else { format!("{text}\n\n{q}") }
            };
            if !out.iter().any(|(_, o)| *o == prompt) {
                out.push((format!("self_{}", out.len()), prompt));
                progress(out.len(), n);
            }
        }
        Ok(out)
    }

    /// The embedded chat prompt that asks `ask`: made once, sampled from on every attempt.
    fn prompt(&self, ask: &str) -> Result<Tensor> {
        Ok(self.lm.model.embed_ids(&self.lm.chat_ids(&[Message::user(ask)], true)?)?)
    }

    /// One sampled answer to the prompt `x`, with the next attempt's seed.
    fn sample(&mut self, x: &Tensor, max_tokens: usize) -> Result<String> {
        if self.attempts >= self.max_attempts {
            return Err(Error::Invalid(format!(
                "{}: the model wrote too few usable training prompts in {} attempts",
                self.lm.path.display(),
                self.attempts
            )));
        }
        let sampling = Sampling { temperature: 1.0, top_p: 0.95, seed: self.seed.wrapping_mul(1_000_003).wrapping_add(self.attempts) };
        self.attempts += 1;
        let g = generate(&self.lm.model, x, max_tokens, &self.lm.tokenizer.stop_ids, sampling, |_| Ok(true))?;
        Ok(self.lm.tokenizer.decode(&g.tokens, true)?.trim().to_string())
    }

    /// A question: one line, ending in a question mark.
    fn question(&mut self, ask: String) -> Result<String> {
        let x = self.prompt(&ask)?;
        loop {
            let q = self.sample(&x, QUESTION_TOKENS)?;
            if !q.contains('\n') && q.ends_with('?') && q.len() >= 12 {
                return Ok(q);
            }
        }
    }

    /// A text of `kind`, cut after its last whole line or sentence when the budget ran out.
    fn text(&mut self, kind: &str) -> Result<String> {
        let x = self.prompt(&format!("Write {kind}."))?;
        loop {
            let t = whole_part(&self.sample(&x, TEXT_TOKENS)?);
            if t.len() >= 60 {
                return Ok(t);
            }
        }
    }
}

/// `t` up to its last line break or sentence end (all of it when it has neither).
fn whole_part(t: &str) -> String {
    let cut = t.rfind(['\n', '.', '!', '?']).map_or(t.len(), |i| i + 1);
    t[..cut].trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::whole_part;

    #[test]
    fn texts_end_at_a_whole_sentence_or_line() {
        assert_eq!(whole_part("One. Two and thr"), "One.");
        assert_eq!(whole_part("Dear Ann,\nI wro"), "Dear Ann,");
        assert_eq!(whole_part("no end at all"), "no end at all");
    }
}
