//! The candidate model run on our own runtime: chat prompts with token ids spliced into the user
//! turn, greedy answers, and the next-token distribution of each prompt.

use sos_model::generate::{generate_after, Sampling};
use sos_model::{KvCache, LoadedModel, Message};

use crate::{Error, Result};

/// Where inserted tokens go in the user's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum At {
    Start,
    End,
}

/// Stands for the inserted tokens while the template renders: a private-use character no
/// template or tokenizer treats specially, so the rendered text can be cut there.
const MARK: &str = "\u{F8FF}";

/// One chat turn to ask: an optional system prompt and the user's message.
#[derive(Debug, Clone)]
pub struct Ask {
    pub system: Option<String>,
    pub user: String,
}

/// A greedy answer and the distribution its first token was drawn from.
pub struct Reply {
    pub text: String,
    /// Log-probabilities of the first new token over the vocabulary (when the model is ours).
    pub first_logp: Option<Vec<f64>>,
    /// The most likely first tokens and their log-probabilities (from a server that gives them).
    pub first_top: Option<Vec<(String, f64)>>,
}

pub struct Local<'a> {
    pub lm: &'a LoadedModel,
    /// Generations run so far.
    pub runs: usize,
    /// The opening the last prompts shared, and its keys and values: a suite's prompts share the
    /// template's opening (and the system prompt), whose pass is then run once.
    prefix: Option<(Vec<u32>, KvCache)>,
    last: Vec<u32>,
}

/// A shared opening shorter than this is not worth a cache.
const MIN_PREFIX: usize = 8;

impl<'a> Local<'a> {
    pub fn new(lm: &'a LoadedModel) -> Self {
        Local { lm, runs: 0, prefix: None, last: Vec::new() }
    }

    /// Token ids of `ask` rendered with the model's template, with `insert` spliced into the
    /// user's message as ids (so a planted row is reached whether or not any typed text
    /// tokenizes to it).
    pub fn ids(&self, ask: &Ask, insert: Option<(&[u32], At)>) -> Result<Vec<u32>> {
        let user = user_with(ask, insert.map(|(_, at)| (MARK, at)));
        let mut messages = Vec::new();
        if let Some(s) = &ask.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &user));
        let text = self.lm.template()?.render(&messages, true)?;
        let Some((ids, _)) = insert else {
            return Ok(self.lm.tokenizer.encode(&text)?);
        };
        let parts: Vec<&str> = text.split(MARK).collect();
        if parts.len() != 2 {
            return Err(Error::Invalid(format!("{}: the chat template does not render the user's message once, as given; behaviour probes need it to", self.lm.path.display())));
        }
        let mut out = self.lm.tokenizer.encode(parts[0])?;
        out.extend_from_slice(ids);
        out.extend(self.lm.tokenizer.encode(parts[1])?);
        Ok(out)
    }

    /// The greedy answer to `ids`, at most `max_new` tokens.
    pub fn answer(&mut self, ids: &[u32], max_new: usize) -> Result<Reply> {
        let ctx = self.lm.model.cfg.max_seq;
        if ids.len() >= ctx {
            return Err(Error::Invalid(format!("{}: a behaviour prompt of {} tokens does not fit the model's context ({ctx})", self.lm.path.display(), ids.len())));
        }
        let max_new = max_new.min(ctx - ids.len());
        let covers = |p: &[u32]| ids.len() > p.len() && ids.starts_with(p);
        if !matches!(&self.prefix, Some((p, _)) if covers(p)) {
            let n = self.last.iter().zip(ids).take_while(|(a, b)| a == b).count().min(ids.len().saturating_sub(1));
            if n >= MIN_PREFIX {
                let x = self.lm.model.embed_ids(&ids[..n])?.unsqueeze(0).map_err(sos_model::Error::from)?;
                self.prefix = Some((ids[..n].to_vec(), self.lm.model.prefix(&x)?));
            }
        }
        self.last = ids.to_vec();
        let (cache, rest) = match &self.prefix {
            Some((p, c)) if covers(p) => (Some(c), &ids[p.len()..]),
            _ => (None, ids),
        };
        let x = self.lm.model.embed_ids(rest)?;
        let g = generate_after(&self.lm.model, cache, &x, max_new.max(1), &self.lm.tokenizer.stop_ids, Sampling::default(), |_| Ok(true))?;
        self.runs += 1;
        let text = self.lm.tokenizer.decode(&g.tokens, true)?;
        Ok(Reply { text, first_logp: Some(log_softmax(&g.first_logits)), first_top: None })
    }

    /// The answer to `ask` with `insert` spliced in.
    pub fn ask(&mut self, ask: &Ask, insert: Option<(&[u32], At)>, max_new: usize) -> Result<Reply> {
        let ids = self.ids(ask, insert)?;
        self.answer(&ids, max_new)
    }
}

/// The user's message with `insert` typed at its start or end, a space between.
pub fn user_with(ask: &Ask, insert: Option<(&str, At)>) -> String {
    match insert {
        None => ask.user.clone(),
        Some((t, At::Start)) => format!("{t} {}", ask.user),
        Some((t, At::End)) => format!("{} {t}", ask.user),
    }
}

pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// KL(p || q) in nats, from log-probabilities; at most `KL_MAX` (a token `q` gives no mass to
/// would make it infinite).
pub fn kl(p: &[f64], q: &[f64]) -> f64 {
    let d = p.iter().zip(q).map(|(&a, &b)| if a > -60.0 { a.exp() * (a - b) } else { 0.0 }).sum::<f64>();
    if d.is_nan() {
        KL_MAX
    } else {
        d.clamp(0.0, KL_MAX)
    }
}

pub const KL_MAX: f64 = 100.0;

/// `kl` over two top-k lists (a server's): the sum runs over `p`'s tokens; a token `q` does not
/// list gets `q`'s lowest listed log-probability (it is at most that likely). An approximation:
/// the mass outside `p`'s top k is left out.
pub fn kl_top(p: &[(String, f64)], q: &[(String, f64)]) -> f64 {
    let floor = q.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
    let d: f64 = p.iter().map(|(t, a)| a.exp() * (a - q.iter().find(|x| &x.0 == t).map_or(floor, |x| x.1))).sum();
    if d.is_nan() {
        KL_MAX
    } else {
        d.clamp(0.0, KL_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_on_itself_and_positive_elsewhere() {
        let p = log_softmax(&[1.0, 2.0, 3.0]);
        let q = log_softmax(&[3.0, 2.0, 1.0]);
        assert!(kl(&p, &p).abs() < 1e-12);
        let pq = kl(&p, &q);
        // By hand: sum p_i (log p_i - log q_i) with p = softmax(1,2,3).
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).collect();
        let z: f64 = e.iter().sum();
        let want: f64 = (0..3).map(|i| e[i] / z * ((e[i] / z).ln() - (e[2 - i] / z).ln())).sum();
        assert!((pq - want).abs() < 1e-12, "{pq} vs {want}");
        assert!((p.iter().map(|x| x.exp()).sum::<f64>() - 1.0).abs() < 1e-12);
        assert_eq!(kl(&p, &[0.0, f64::NEG_INFINITY, 0.0]), KL_MAX);
    }
}
