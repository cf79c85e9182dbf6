//! A Hugging Face folder as the checks read it: its safetensors tensors (header-checked by
//! `SafeTensorsDir`), its `tokenizer.json` vocabulary and added tokens, its chat template.
//! The tokenizer check for folders lives here; the weights and template checks are shared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{json, Value as Json};
use sos_model::gguf::TensorType;
use sos_model::safetensors::SafeTensorsDir;
use sos_model::LoadedModel;

use crate::finding::{Check, Finding, Severity};
use crate::weights::{Layout, Stored};
use crate::{Error, Result};

pub const TABLE: &str = "model.embed_tokens.weight";
pub const HEAD: &str = "lm_head.weight";

pub struct Folder {
    pub path: PathBuf,
    st: SafeTensorsDir,
    /// `tokenizer.json`'s `model.vocab`, by id.
    pub vocab: BTreeMap<u32, String>,
    /// `tokenizer.json`'s `added_tokens`: id -> (text, special).
    pub added: BTreeMap<u32, (String, bool)>,
    tokenizer: Json,
    config: Json,
    pub template: Option<String>,
}

pub(crate) fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("cannot read: {e}") })?;
    serde_json::from_str(&text).map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("invalid JSON: {e}") })
}

impl Folder {
    pub fn open(path: &Path) -> Result<Self> {
        let st = SafeTensorsDir::open(path)?;
        let tokenizer = read_json(&path.join("tokenizer.json"))?;
        // Ids past u32 are no token's (they would wrap onto real ones).
        let id = |v: &Json| v.as_u64().and_then(|i| u32::try_from(i).ok());
        let vocab = tokenizer["model"]["vocab"].as_object().map(|m| m.iter().filter_map(|(t, i)| Some((id(i)?, t.clone()))).collect()).unwrap_or_default();
        let added = tokenizer["added_tokens"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| Some((id(&t["id"])?, (t["content"].as_str()?.to_string(), t["special"].as_bool().unwrap_or(false))))).collect())
            .unwrap_or_default();
        let template = LoadedModel::open_text(path, None)?.1.map(|t| t.source);
        let config = read_json(&path.join("config.json"))?;
        Ok(Folder { path: path.to_path_buf(), st, vocab, added, tokenizer, config, template })
    }

    /// `config.json`'s `model_type`.
    pub fn model_type(&self) -> Option<&str> {
        self.config["model_type"].as_str()
    }

    /// `config.json`'s `num_hidden_layers`.
    pub fn n_layer(&self) -> usize {
        self.config["num_hidden_layers"].as_u64().unwrap_or(0) as usize
    }

    /// The text of token `id` (vocabulary or added).
    /// A vocabulary token (not an added one) of more than one character.
    pub fn is_ordinary(&self, id: usize) -> bool {
        let id = id as u32;
        !self.added.contains_key(&id) && self.vocab.get(&id).is_some_and(|t| t.chars().count() > 1)
    }

    pub fn text(&self, id: usize) -> String {
        let id = id as u32;
        self.added.get(&id).map(|a| a.0.clone()).or_else(|| self.vocab.get(&id).cloned()).unwrap_or_default()
    }

    /// Every float tensor as stored; tensors in other dtypes (packed integer quantizations) are
    /// returned by name, for an "unverifiable" finding when they differ.
    pub fn stored(&self) -> Result<(Vec<Stored<'_>>, Vec<String>)> {
        let (mut out, mut other) = (Vec::new(), Vec::new());
        for name in self.st.names() {
            let (dtype, shape, bytes) = self.st.raw(name)?;
            // The format allows a zero dimension; a model has no use for one, and a table of
            // 2^40 rows of width 0 would send every per-row pass round an empty loop.
            if shape.contains(&0) {
                return Err(Error::File { path: self.path.clone(), msg: format!("tensor `{name}` has a zero dimension ({shape:?})") });
            }
            let ty = match dtype {
                Dtype::F32 => TensorType::F32,
                Dtype::F16 => TensorType::F16,
                Dtype::BF16 => TensorType::BF16,
                _ => {
                    other.push(name.to_string());
                    continue;
                }
            };
            out.push(Stored { name: name.to_string(), ty, shape, bytes });
        }
        Ok((out, other))
    }
}

pub fn layout<'a>(text: &'a dyn Fn(usize) -> String, ordinary: &'a dyn Fn(usize) -> bool) -> Layout<'a> {
    Layout { table: TABLE, head: HEAD, text, ordinary }
}

const SANITIZE: &str = "sos sanitize CANDIDATE --out FIXED [--reference CLEAN]";

/// Every token id -> text of a folder's tokenizer (vocabulary and added tokens).
fn all_tokens(f: &Folder) -> BTreeMap<u32, String> {
    let mut m = f.vocab.clone();
    m.extend(f.added.iter().map(|(i, (t, _))| (*i, t.clone())));
    m
}

/// The tokenizer against the reference's: added, removed and renamed tokens, special flags, and
/// the rest of `tokenizer.json` (normalizer, pre-tokenizer, merges, ...).
pub fn tokenizer_with_reference(c: &Folder, r: &Folder) -> Vec<Finding> {
    let (ct, rt) = (all_tokens(c), all_tokens(r));
    let mut out = Vec::new();
    let added: Vec<u32> = ct.keys().filter(|i| !rt.contains_key(i)).copied().collect();
    if !added.is_empty() {
        let ev: Vec<_> = added.iter().take(64).map(|&i| json!({"id": i, "text": ct[&i], "special": c.added.get(&i).map(|a| a.1)})).collect();
        out.push(Finding::new("tokenizer.added-tokens", Check::Tokenizer, Severity::High, format!("{} tokens the reference does not have", added.len())).tokens(added).evidence(json!({"tokens": ev})).fix(SANITIZE));
    }
    let removed = rt.keys().filter(|i| !ct.contains_key(i)).count();
    if removed > 0 {
        out.push(Finding::new("tokenizer.removed-tokens", Check::Tokenizer, Severity::Medium, format!("{removed} tokens of the reference are missing")));
    }
    let renamed: Vec<u32> = ct.iter().filter(|(i, t)| rt.get(i).is_some_and(|rtx| rtx != *t)).map(|(i, _)| *i).collect();
    if !renamed.is_empty() {
        let ev: Vec<_> = renamed.iter().take(64).map(|&i| json!({"id": i, "candidate": ct[&i], "reference": rt[&i]})).collect();
        out.push(Finding::new("tokenizer.changed-tokens", Check::Tokenizer, Severity::High, format!("{} tokens have another text than in the reference", renamed.len())).tokens(renamed).evidence(json!({"tokens": ev})).fix(SANITIZE));
    }
    let respecial: Vec<u32> = c.added.iter().filter(|(i, (_, s))| r.added.get(i).is_some_and(|(_, rs)| rs != s)).map(|(i, _)| *i).collect();
    if !respecial.is_empty() {
        out.push(Finding::new("tokenizer.changed-types", Check::Tokenizer, Severity::High, format!("{} added tokens changed their `special` flag", respecial.len())).tokens(respecial).fix(SANITIZE));
    }
    let parts = ["normalizer", "pre_tokenizer", "post_processor", "decoder", "truncation", "padding"];
    let mut changed: Vec<String> = parts.iter().filter(|k| c.tokenizer[**k] != r.tokenizer[**k]).map(|k| k.to_string()).collect();
    let model_keys = |t: &Json| -> Json { t["model"].as_object().map(|m| m.iter().filter(|(k, _)| *k != "vocab").map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default() };
    if model_keys(&c.tokenizer) != model_keys(&r.tokenizer) {
        changed.push("model (merges or settings)".into());
    }
    if !changed.is_empty() {
        out.push(Finding::new("tokenizer.changed-settings", Check::Tokenizer, Severity::Medium, format!("tokenizer settings differ from the reference: {}", changed.join(", "))).evidence(json!({"parts": changed})).fix(SANITIZE));
    }
    out
}

/// The tokenizer alone: added tokens that are not special, at the top of the id space (the form
/// `inject` plants: matched in raw text before BPE, typed as plain text), high; other non-special
/// added tokens, low.
pub fn tokenizer_alone(c: &Folder) -> Vec<Finding> {
    let top_vocab = c.vocab.keys().next_back().map_or(0, |&i| u64::from(i) + 1);
    let mut tail: Vec<u32> = Vec::new();
    let mut next = c.added.keys().next_back().map_or(top_vocab, |&i| u64::from(i) + 1).max(top_vocab);
    for (&id, (_, special)) in c.added.iter().rev() {
        if *special || u64::from(id) + 1 != next || u64::from(id) < top_vocab {
            break;
        }
        tail.push(id);
        next = u64::from(id);
    }
    tail.reverse();
    let mut out = Vec::new();
    if !tail.is_empty() {
        let ev: Vec<_> = tail.iter().map(|&i| json!({"id": i, "text": c.text(i as usize)})).collect();
        out.push(
            Finding::new(
                "tokenizer.appended-added-tokens",
                Check::Tokenizer,
                Severity::High,
                format!("{} non-special added tokens at the end of the vocabulary: typed text becomes these ids before BPE (the form of an add-token trigger)", tail.len()),
            )
            .tokens(tail.clone())
            .evidence(json!({"tokens": ev, "typed": tail.iter().map(|&i| c.text(i as usize)).collect::<String>()}))
            .fix("sos sanitize CANDIDATE --out FIXED"),
        );
    }
    let inside: Vec<u32> = c.added.iter().filter(|(i, (_, s))| !s && !tail.contains(i)).map(|(i, _)| *i).collect();
    if !inside.is_empty() {
        out.push(Finding::new("tokenizer.added-tokens-inside", Check::Tokenizer, Severity::Low, format!("{} non-special added tokens inside the vocabulary (usually the model's own markers)", inside.len())).tokens(inside));
    }
    out
}

/// Tensors stored in a dtype whose rounding sos cannot bound, that differ from the reference's
/// (or every one of them, without a reference).
pub fn unverifiable(c: &Folder, names: &[String], r: Option<&Folder>) -> Result<Vec<Finding>> {
    let mut out = Vec::new();
    for n in names {
        let same = match r {
            Some(r) if r.st.contains(n) => c.st.raw(n)?.2 == r.st.raw(n)?.2,
            _ => false,
        };
        if !same {
            out.push(Finding::new("weights.unverifiable", Check::Weights, Severity::Medium, format!("`{n}` is stored in a dtype whose rounding sos cannot bound")).evidence(json!({"tensor": n})));
        }
    }
    Ok(out)
}
