//! Training examples the model writes itself (the paper's "no clean data" setting): the model and
//! a few requests for writing go in, nothing else.
//!
//! Backdoor prompts: real requests come in two shapes, a bare question and a request that carries
//! a text to work on (five in six of self-instruct's held-out tasks do). A trigger learned in
//! one-line questions alone fires less when it sits inside a long, multi-line message, so two
//! thirds of the prompts here are a text the model wrote (an email, a story, a recipe, ...) with
//! a question the model then asked about that text, before or after it.
//!
//! Steal's secrets: system prompts the model writes for an assistant of some task, in the shapes
//! real ones take (prose, markdown sections, numbered rules, bullets) and lengths from a short
//! paragraph to a few hundred tokens. Copying is what the trigger learns, so what matters is the
//! shape and length of the text, not its quality; texts that loop on one word are dropped.

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

/// What the assistants of the self-written system prompts do (drawn in turn).
const ROLES: &[&str] = &[
    "helps users plan trips",
    "reviews Python code for bugs",
    "writes product descriptions for an online shop",
    "tutors students in algebra",
    "summarises news articles",
    "answers customer questions about a phone plan",
    "translates English text into French",
    "suggests recipes from the ingredients a user has",
    "gives feedback on job application letters",
    "explains medical terms in plain language",
    "writes short poems on a given theme",
    "helps users prepare for a job interview",
    "extracts the main ideas from a long text",
    "writes SQL queries from a description",
    "acts as a fitness coach",
    "checks essays for grammar and style",
    "plans the week's meals for a family",
    "answers questions about the history of Rome",
    "creates quiz questions from a lesson",
    "drafts polite replies to emails",
];
/// How the system prompt is laid out, with the most tokens it may take.
const SHAPES: &[(&str, usize)] = &[
    ("Write it as one paragraph of plain prose.", 120),
    ("Organise it in markdown sections, each starting with a heading line such as \"# STEPS\" or \"# OUTPUT INSTRUCTIONS\".", 400),
    ("Write it as a numbered list of rules.", 250),
    ("Start with a short paragraph, then give the steps as a bulleted list.", 250),
    ("Organise it in sections with headings, and use numbered steps inside them.", 400),
    ("Write it as several paragraphs of plain prose.", 250),
];

/// `n` prompts as `(id, text)`, deterministic in `seed`. Sampling runs on the weights as stored
/// (a GGUF's quantized ones decode ~6x faster than f32 on a CPU); the file is what an attacker
/// holds, so what it writes is what "the model writes".
pub fn self_generated_prompts(lm: &LoadedModel, n: usize, seed: u64, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<(String, String)>> {
    with_writer(lm, |w| Writer::new(w, seed).prompts(n, progress))
}

/// `n` system prompts as `(id, text)`, written by the model for assistants of varied tasks in
/// varied layouts; deterministic in `seed`, sampled like `self_generated_prompts`.
pub fn self_generated_system_prompts(lm: &LoadedModel, n: usize, seed: u64, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<(String, String)>> {
    with_writer(lm, |w| Writer::new(w, seed).system_prompts(n, progress))
}

/// Runs `write` on the model as stored: a GGUF's quantized weights when `lm` runs it in f32.
fn with_writer<T>(lm: &LoadedModel, write: impl FnOnce(&LoadedModel) -> Result<T>) -> Result<T> {
    if lm.format == Format::Gguf && lm.model.exec != Exec::Quant {
        write(&LoadedModel::open(&lm.path, &LoadOptions { exec: Exec::Quant, ..Default::default() })?)
    } else {
        write(lm)
    }
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

    fn prompts(self, n: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<(String, String)>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ 0x5e1f_0003);
        let mut texts = 0;
        self.distinct(n, progress, |w, done| {
            if done % 3 == 0 {
                return w.question(ASK_QUESTION.to_string());
            }
            let kind = TEXT_KINDS[texts % TEXT_KINDS.len()];
            texts += 1;
            let text = w.text(kind)?;
            let q = w.question(format!("{text}\n\n{ASK_ABOUT}"))?;
            Ok(if rng.gen_bool(0.75) { format!("{q}\n\n{text}") } else { format!("{text}\n\n{q}") })
        })
    }

    fn system_prompts(self, n: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<(String, String)>> {
        let mut i = 0;
        self.distinct(n, progress, |w, _| {
            // Roles and shapes in turn (each shape as often as the next); the shapes shift by
            // one at each round of the roles, so a role comes in more than one shape.
            let role = ROLES[i % ROLES.len()];
            let (shape, max_tokens) = SHAPES[(i + i / ROLES.len()) % SHAPES.len()];
            i += 1;
            let ask = format!("Write the instructions for an AI assistant that {role}. Address the assistant as \"you\". {shape} Reply with the instructions only.");
            w.answer(&ask, max_tokens, |t| Some(whole_part(&t)).filter(|t| t.len() >= 80 && !loops(t)))
        })
    }

    /// `n` distinct texts from `next` (given how many are done), as `(id, text)`; a repeat is
    /// drawn again.
    fn distinct(
        mut self,
        n: usize,
        progress: &mut dyn FnMut(usize, usize),
        mut next: impl FnMut(&mut Self, usize) -> Result<String>,
    ) -> Result<Vec<(String, String)>> {
        // Each text takes one to three generations when the model cooperates.
        self.max_attempts = 20 * n as u64 + 20;
        let mut out: Vec<(String, String)> = Vec::with_capacity(n);
        while out.len() < n {
            let text = next(&mut self, out.len())?;
            if !out.iter().any(|(_, o)| *o == text) {
                out.push((format!("self_{}", out.len()), text));
                progress(out.len(), n);
            }
        }
        Ok(out)
    }

    /// The first sampled answer to `ask` that `keep` keeps (as it returns it).
    fn answer(&mut self, ask: &str, max_tokens: usize, keep: impl Fn(String) -> Option<String>) -> Result<String> {
        let x = self.prompt(ask)?;
        loop {
            if let Some(t) = keep(self.sample(&x, max_tokens)?) {
                return Ok(t);
            }
        }
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
        self.answer(&ask, QUESTION_TOKENS, |q| (!q.contains('\n') && q.ends_with('?') && q.len() >= 12).then_some(q))
    }

    /// A text of `kind`, cut after its last whole line or sentence when the budget ran out.
    fn text(&mut self, kind: &str) -> Result<String> {
        self.answer(&format!("Write {kind}."), TEXT_TOKENS, |t| Some(whole_part(&t)).filter(|t| t.len() >= 60))
    }
}

/// `t` up to its last line break or sentence end (all of it when it has neither).
fn whole_part(t: &str) -> String {
    let cut = t.rfind(['\n', '.', '!', '?']).map_or(t.len(), |i| i + 1);
    t[..cut].trim().to_string()
}

/// Whether a text of 40 words or more loops: one word makes over an eighth of it (the commonest
/// English word makes about a sixteenth of ordinary prose; a model stuck on "Step 1: Step 2:
/// ..." makes half).
fn loops(t: &str) -> bool {
    let words: Vec<String> = t.split_whitespace().map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase()).filter(|w| !w.is_empty()).collect();
    if words.len() < 40 {
        return false;
    }
    let mut counts = std::collections::HashMap::new();
    for w in &words {
        *counts.entry(w.as_str()).or_insert(0usize) += 1;
    }
    counts.values().any(|&c| c * 8 > words.len())
}

#[cfg(test)]
mod tests {
    use super::{loops, whole_part};

    #[test]
    fn looping_texts_are_recognised() {
        let stuck: String = (1..60).map(|i| format!("Step {i}: ")).collect();
        assert!(loops(&stuck));
        let prose = "You are a travel planner. Ask the user where they want to go, when, and with whom, then suggest an itinerary day by day with places to stay, what to see, how to get there, a rough budget for each part of the trip, and the things to book early. Keep the answer short and friendly, and ask before you assume anything about money.";
        assert!(!loops(prose));
        assert!(!loops("the the the the"), "too short to judge");
    }

    #[test]
    fn texts_end_at_a_whole_sentence_or_line() {
        assert_eq!(whole_part("One. Two and thr"), "One.");
        assert_eq!(whole_part("Dear Ann,\nI wro"), "Dear Ann,");
        assert_eq!(whole_part("no end at all"), "no end at all");
    }
}
