//! A model behind an OpenAI-compatible server (llama.cpp's `llama-server`, llama-cpp-python,
//! vLLM, ...): the behaviour suites ask `/v1/chat/completions` greedily, with the flagged
//! tokens typed as their text, and, where the server gives them, read the first answer token's
//! top log-probabilities from `/v1/completions` (the prompt rendered with the file's own chat
//! template). Every request has a timeout; every failure names the URL.

use std::time::Duration;

use serde_json::{json, Value as Json};

use super::local::{user_with, Ask, At};
use crate::{Error, Result};

/// Where the server is and how long to wait for one answer.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// The server's address, with or without the `/v1` suffix.
    pub url: String,
    /// The `model` field of the requests (servers that host one model ignore it).
    pub model: Option<String>,
    pub timeout: Duration,
    /// Sent as `Authorization: Bearer ...` when set.
    pub api_key: Option<String>,
}

pub struct Endpoint {
    cfg: EndpointConfig,
    /// `.../v1`
    base: String,
    agent: ureq::Agent,
}

impl Endpoint {
    pub fn new(cfg: EndpointConfig) -> Result<Self> {
        let u = cfg.url.trim_end_matches('/');
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            return Err(Error::Invalid(format!("--endpoint {}: expected an http:// or https:// URL", cfg.url)));
        }
        let base = if u.ends_with("/v1") { u.to_string() } else { format!("{u}/v1") };
        let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10).min(cfg.timeout)).timeout(cfg.timeout).build();
        Ok(Endpoint { cfg, base, agent })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// The greedy answer (temperature 0, seed 0) to `ask` with `insert` typed in.
    pub fn chat(&self, ask: &Ask, insert: Option<(&str, At)>, max_new: usize) -> Result<String> {
        let mut messages = Vec::new();
        if let Some(s) = &ask.system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": user_with(ask, insert)}));
        let mut body = json!({"messages": messages, "max_tokens": max_new, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stream": false});
        body["model"] = json!(self.cfg.model.as_deref().unwrap_or("sos-audit"));
        let v = self.post("chat/completions", &body)?;
        let content = &v["choices"][0]["message"]["content"];
        match content {
            Json::String(s) => Ok(s.clone()),
            Json::Null if v["choices"][0]["message"].is_object() => Ok(String::new()),
            _ => Err(self.bad(&format!("the answer has no choices[0].message.content: {}", snippet(&v.to_string())))),
        }
    }

    /// The `k` most likely first tokens after `prompt` and their log-probabilities, from
    /// `/v1/completions` with `logprobs`; `None` when the server does not give them (no such
    /// route, or an answer without them). Both shapes servers use are read: OpenAI's legacy
    /// `logprobs.top_logprobs[0]` (`{token: logprob}`, llama-cpp-python) and the chat-style
    /// `logprobs.content[0].top_logprobs` (`[{token, logprob}]`, llama.cpp's server).
    pub fn top_logprobs(&self, prompt: &str, k: usize) -> Result<Option<Vec<(String, f64)>>> {
        let mut body = json!({"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "seed": 0, "stream": false, "logprobs": k});
        body["model"] = json!(self.cfg.model.as_deref().unwrap_or("sos-audit"));
        let v = match self.send("completions", &body)? {
            Answer::Json(v) => v,
            // A server without the route (or without logprobs on it) answers with an error
            // status; anything else (unreachable, timeouts, not JSON) is the audit's problem.
            Answer::Status(..) => return Ok(None),
        };
        let lp = &v["choices"][0]["logprobs"];
        let top: Vec<(String, f64)> = if let Some(m) = lp["top_logprobs"][0].as_object() {
            m.iter().filter_map(|(t, l)| Some((t.clone(), l.as_f64()?))).collect()
        } else if let Some(a) = lp["content"][0]["top_logprobs"].as_array() {
            a.iter().filter_map(|e| Some((e["token"].as_str()?.to_string(), e["logprob"].as_f64()?))).collect()
        } else {
            Vec::new()
        };
        Ok((!top.is_empty()).then_some(top))
    }

    fn bad(&self, what: &str) -> Error {
        Error::Invalid(format!("endpoint {}: {what}", self.base))
    }

    fn post(&self, path: &str, body: &Json) -> Result<Json> {
        match self.send(path, body)? {
            Answer::Json(v) => Ok(v),
            Answer::Status(code, body) => Err(self.bad(&format!("{path} answered HTTP {code}: {}", snippet(&body)))),
        }
    }

    /// POSTs `body` to `path`: the JSON answer, or the error status and body the server sent.
    fn send(&self, path: &str, body: &Json) -> Result<Answer> {
        let url = format!("{}/{path}", self.base);
        let mut req = self.agent.post(&url).set("Content-Type", "application/json");
        if let Some(k) = &self.cfg.api_key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let text = match req.send_string(&body.to_string()) {
            Ok(resp) => resp.into_string().map_err(|e| self.bad(&format!("cannot read the answer: {e}")))?,
            Err(ureq::Error::Status(code, resp)) => return Ok(Answer::Status(code, resp.into_string().unwrap_or_default())),
            Err(ureq::Error::Transport(t)) => {
                let timed_out = t.kind() == ureq::ErrorKind::Io && t.to_string().to_lowercase().contains("timed out");
                return Err(if timed_out { self.bad(&format!("no answer from {path} within {} s (--timeout)", self.cfg.timeout.as_secs())) } else { self.bad(&format!("cannot reach the server: {t}")) });
            }
        };
        if text.trim().is_empty() {
            return Err(self.bad(&format!("{path} answered with an empty body")));
        }
        serde_json::from_str(&text).map(Answer::Json).map_err(|e| self.bad(&format!("{path} did not answer JSON ({e}): {}", snippet(&text))))
    }
}

/// What a server answered: JSON, or an error status with its body.
enum Answer {
    Json(Json),
    Status(u16, String),
}

fn snippet(s: &str) -> String {
    let t: String = s.chars().take(200).collect();
    if s.chars().count() > 200 {
        t + "..."
    } else {
        t
    }
}
