//! The tokenizer check on a GGUF: the vocabulary against a reference's, or alone.
//!
//! llama.cpp matches USER_DEFINED tokens in raw text before BPE, so a token appended as
//! USER_DEFINED is a string anyone can type that becomes a planted row: the form of an
//! add-token trigger. Alone, such tokens at the end of the vocabulary are named; USER_DEFINED
//! tokens inside it (Qwen's `<tool_call>`) are the model's own and only listed.

use serde_json::json;
use sos_model::gguf::{Gguf, Value};

use crate::finding::{Check, Finding, Severity};

/// ggml's token types.
pub const NORMAL: i64 = 1;
pub const CONTROL: i64 = 3;
pub const USER_DEFINED: i64 = 4;

/// The vocabulary of a GGUF: texts and types.
pub struct Vocab {
    pub texts: Vec<String>,
    pub types: Vec<i64>,
}

impl Vocab {
    pub fn of(g: &Gguf) -> Self {
        let texts: Vec<String> = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(|a| a.iter().map(|v| v.as_str().unwrap_or("").to_string()).collect()).unwrap_or_default();
        let types: Vec<i64> = g.get("tokenizer.ggml.token_type").and_then(Value::as_array).map(|a| a.iter().map(|v| v.as_i64().unwrap_or(NORMAL)).collect()).unwrap_or_default();
        Vocab { texts, types }
    }
    pub fn ty(&self, i: usize) -> i64 {
        self.types.get(i).copied().unwrap_or(NORMAL)
    }
    pub fn len(&self) -> usize {
        self.texts.len()
    }
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
    /// The USER_DEFINED tokens at the end of the vocabulary (ids in order).
    pub fn trailing_user_defined(&self) -> Vec<u32> {
        let n = self.len();
        let tail = (0..n).rev().take_while(|&i| self.ty(i) == USER_DEFINED).count();
        (n - tail..n).map(|i| i as u32).collect()
    }
}

fn type_name(t: i64) -> &'static str {
    match t {
        1 => "normal",
        2 => "unknown",
        3 => "control",
        4 => "user-defined",
        5 => "unused",
        6 => "byte",
        _ => "other",
    }
}

const SANITIZE: &str = "sos sanitize CANDIDATE --out FIXED [--reference CLEAN]";

/// The vocabulary against the reference's: added, removed, renamed and retyped tokens, and
/// other tokenizer settings that differ (the chat template is the template check's).
pub fn with_reference(c: &Gguf, r: &Gguf) -> Vec<Finding> {
    let (cv, rv) = (Vocab::of(c), Vocab::of(r));
    let mut out = Vec::new();
    if cv.len() > rv.len() {
        let ids: Vec<u32> = (rv.len()..cv.len()).map(|i| i as u32).collect();
        let texts: Vec<_> = ids.iter().map(|&i| json!({"id": i, "text": cv.texts[i as usize], "type": type_name(cv.ty(i as usize))})).collect();
        out.push(
            Finding::new("tokenizer.added-tokens", Check::Tokenizer, Severity::High, format!("{} tokens the reference does not have", ids.len()))
                .tokens(ids)
                .evidence(json!({"tokens": texts, "reference_vocab": rv.len(), "candidate_vocab": cv.len()}))
                .fix(SANITIZE),
        );
    }
    if cv.len() < rv.len() {
        out.push(
            Finding::new("tokenizer.removed-tokens", Check::Tokenizer, Severity::Medium, format!("{} tokens of the reference are missing", rv.len() - cv.len()))
                .evidence(json!({"reference_vocab": rv.len(), "candidate_vocab": cv.len()})),
        );
    }
    let common = cv.len().min(rv.len());
    let renamed: Vec<u32> = (0..common).filter(|&i| cv.texts[i] != rv.texts[i]).map(|i| i as u32).collect();
    if !renamed.is_empty() {
        let ev: Vec<_> = renamed.iter().take(64).map(|&i| json!({"id": i, "candidate": cv.texts[i as usize], "reference": rv.texts[i as usize]})).collect();
        out.push(
            Finding::new("tokenizer.changed-tokens", Check::Tokenizer, Severity::High, format!("{} tokens have another text than in the reference", renamed.len()))
                .tokens(renamed)
                .evidence(json!({"tokens": ev}))
                .fix(SANITIZE),
        );
    }
    let retyped: Vec<u32> = (0..common).filter(|&i| cv.ty(i) != rv.ty(i)).map(|i| i as u32).collect();
    if !retyped.is_empty() {
        let ev: Vec<_> = retyped.iter().take(64).map(|&i| json!({"id": i, "text": cv.texts[i as usize], "candidate": type_name(cv.ty(i as usize)), "reference": type_name(rv.ty(i as usize))})).collect();
        out.push(
            Finding::new("tokenizer.changed-types", Check::Tokenizer, Severity::High, format!("{} tokens have another type than in the reference", retyped.len()))
                .tokens(retyped)
                .evidence(json!({"tokens": ev}))
                .fix(SANITIZE),
        );
    }
    let keys = |g: &Gguf| -> Vec<String> { g.metadata.iter().map(|(k, _)| k.clone()).filter(|k| k.starts_with("tokenizer.") && !matches!(k.as_str(), "tokenizer.ggml.tokens" | "tokenizer.ggml.token_type" | "tokenizer.ggml.scores" | "tokenizer.chat_template")).collect() };
    let mut changed: Vec<String> = keys(c).into_iter().filter(|k| c.get(k) != r.get(k)).collect();
    changed.extend(keys(r).into_iter().filter(|k| c.get(k).is_none()));
    if !changed.is_empty() {
        out.push(
            Finding::new("tokenizer.changed-settings", Check::Tokenizer, Severity::Medium, format!("tokenizer settings differ from the reference: {}", changed.join(", ")))
                .evidence(json!({"keys": changed}))
                .fix(SANITIZE),
        );
    }
    out
}

/// The vocabulary alone: USER_DEFINED tokens appended at its end (high), USER_DEFINED tokens
/// inside it (low: most are the model's own, such as tool-call markers).
pub fn alone(c: &Gguf) -> Vec<Finding> {
    let v = Vocab::of(c);
    let mut out = Vec::new();
    let tail = v.trailing_user_defined();
    if !tail.is_empty() {
        let ev: Vec<_> = tail.iter().map(|&i| json!({"id": i, "text": v.texts[i as usize]})).collect();
        out.push(
            Finding::new(
                "tokenizer.appended-user-defined",
                Check::Tokenizer,
                Severity::High,
                format!("{} USER_DEFINED tokens appended after the vocabulary: typed text becomes these ids before BPE (the form of an add-token trigger)", tail.len()),
            )
            .tokens(tail.clone())
            .evidence(json!({"tokens": ev, "typed": tail.iter().map(|&i| v.texts[i as usize].as_str()).collect::<String>()}))
            .fix("sos sanitize CANDIDATE --out FIXED"),
        );
    }
    let inside: Vec<u32> = (0..v.len() - tail.len()).filter(|&i| v.ty(i) == USER_DEFINED).map(|i| i as u32).collect();
    if !inside.is_empty() {
        let ev: Vec<_> = inside.iter().take(64).map(|&i| json!({"id": i, "text": v.texts[i as usize]})).collect();
        out.push(
            Finding::new("tokenizer.user-defined", Check::Tokenizer, Severity::Low, format!("{} USER_DEFINED tokens inside the vocabulary (usually the model's own markers)", inside.len()))
                .tokens(inside)
                .evidence(json!({"tokens": ev})),
        );
    }
    out
}
