//! Tokenizers from `tokenizer.json` or from GGUF metadata (`tokenizer.ggml.*`).
//!
//! A GGUF vocabulary is turned into the equivalent `tokenizer.json` document and handed to the
//! `tokenizers` crate, so both sources run the same, reference implementation of BPE.

use std::path::Path;

use serde_json::json;

use crate::gguf::{Gguf, Value};
use crate::{bail_format, Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end an assistant turn (EOS and the template's end-of-turn markers).
    pub stop_ids: Vec<u32>,
    /// Whether a BOS token must be prepended to raw text (the chat templates we know add their own).
    pub add_bos: bool,
}

/// Split patterns of llama.cpp's `tokenizer.ggml.pre` values, as in the models' own tokenizer.json.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// End-of-turn markers of common chat formats; those present in a vocabulary stop generation.
const TURN_END_TOKENS: &[&str] = &["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>"];

impl Tokenizer {
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::format(path, format!("invalid tokenizer.json: {e}")))?;
        Ok(Self::finish(inner, None, None, false))
    }

    /// Sets BOS/EOS from `tokenizer_config.json`-style token strings.
    pub fn with_special_names(mut self, bos: Option<&str>, eos: Option<&str>, add_bos: bool) -> Self {
        self.bos = bos.and_then(|b| self.inner.token_to_id(b)).or(self.bos);
        if let Some(e) = eos.and_then(|e| self.inner.token_to_id(e)) {
            self.eos = Some(e);
            self.add_stop_id(e);
        }
        self.add_bos = add_bos;
        self
    }

    pub fn add_stop_id(&mut self, id: u32) {
        if !self.stop_ids.contains(&id) {
            self.stop_ids.push(id);
        }
    }

    fn finish(inner: tokenizers::Tokenizer, bos: Option<u32>, eos: Option<u32>, add_bos: bool) -> Self {
        // Only as special tokens: in some vocabularies `</s>` is also plain text.
        let specials = inner.get_added_tokens_decoder();
        let turn_ends: Vec<u32> = TURN_END_TOKENS
            .iter()
            .filter_map(|t| inner.token_to_id(t))
            .filter(|id| specials.get(id).is_some_and(|a| a.special))
            .collect();
        let mut tok = Tokenizer { inner, bos, eos, stop_ids: Vec::new(), add_bos };
        eos.into_iter().chain(turn_ends).for_each(|id| tok.add_stop_id(id));
        tok
    }

    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let path = &g.path;
        let model = g.get_str("tokenizer.ggml.model").ok_or_else(|| Error::format(path, "no tokenizer in the file (tokenizer.ggml.model missing)"))?;
        if model != "gpt2" {
            bail_format!(
                path,
                "tokenizer type `{model}` is not supported yet (only gpt2-style byte-level BPE); pass a Hugging Face folder with tokenizer.json instead"
            );
        }
        let strings = |key: &str| -> Result<Vec<&str>> {
            let arr = g.get(key).and_then(Value::as_array).ok_or_else(|| Error::format(path, format!("missing `{key}`")))?;
            arr.iter()
                .map(|v| v.as_str().ok_or_else(|| Error::format(path, format!("`{key}` must be an array of strings"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail_format!(path, "`tokenizer.ggml.token_type` has {} entries but there are {} tokens", types.len(), tokens.len());
        }
        let id = |key: &str| -> Result<Option<u32>> {
            match g.get(key).and_then(Value::as_u64) {
                Some(v) if (v as usize) < tokens.len() => Ok(Some(v as u32)),
                Some(v) => bail_format!(path, "`{key}` = {v} is outside the vocabulary ({} tokens)", tokens.len()),
                None => Ok(None),
            }
        };
        let (bos, eos, eot) = (id("tokenizer.ggml.bos_token_id")?, id("tokenizer.ggml.eos_token_id")?, id("tokenizer.ggml.eot_token_id")?);
        let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);

        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
        let merges: Vec<serde_json::Value> = merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(Error::format(path, format!("malformed merge `{m}`"))),
            })
            .collect::<Result<_>>()?;
        // ggml token types: 3 = control, 4 = user-defined; both are matched whole in text.
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| {
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": t == 4, "special": t == 3})
            })
            .collect();
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let pre_tokenizer = match pre {
            "smollm" => json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_PATTERN), byte_level(false)]}),
            "llama3" | "llama-bpe" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_PATTERN), byte_level(false)]}),
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            other => bail_format!(path, "pre-tokenizer `{other}` is not supported (supported: smollm, qwen2, llama-bpe, gpt2)"),
        };
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(doc)
            .map_err(|e| Error::format(path, format!("cannot build the tokenizer from GGUF metadata: {e}")))?;
        let mut t = Self::finish(inner, bos, eos, add_bos);
        if let Some(e) = eot {
            t.add_stop_id(e);
        }
        Ok(t)
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are recognised;
    /// nothing is added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; with `skip_special`, control tokens such as `<|im_end|>` are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Invalid(format!("tokenizer: {e}")))
    }

    /// Writes the equivalent `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.inner.to_string(true).map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?;
        crate::fsutil::write_atomic(path, |f| std::io::Write::write_all(f, text.as_bytes()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids and texts of the special (added) tokens.
    pub fn special_tokens(&self) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        v.sort();
        v
    }
}

/// Incremental detokenization for streaming: yields the text each new token completes, holding
/// back bytes of a multi-byte character until it is whole.
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        StreamDecoder { ids: Vec::new(), printed: 0 }
    }
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed || !text.is_char_boundary(self.printed) {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn str_array(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::Str(s.to_string())).collect())
    }

    #[test]
    fn token_types_longer_than_tokens_are_an_error() {
        // A control-token type past the end of the vocabulary used to index `tokens` out of
        // bounds (a panic); reproduced with the `gguf_header` fuzz target.
        let mut w = crate::gguf::Writer::new();
        w.meta("tokenizer.ggml.model", Value::Str("gpt2".into()))
            .meta("tokenizer.ggml.tokens", str_array(&["a"]))
            .meta("tokenizer.ggml.merges", str_array(&["a a"]))
            .meta("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1), Value::I32(3)]));
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        let g = Gguf::from_bytes("types.gguf", bytes).unwrap();
        let e = Tokenizer::from_gguf(&g).err().expect("must be an error").to_string();
        assert!(e.contains("types.gguf") && e.contains("has 2 entries but there are 1 tokens"), "{e}");
    }
}
