//! Tokenizers from `tokenizer.json` or from GGUF metadata (`tokenizer.ggml.*`).
//!
//! A GGUF vocabulary is turned into the equivalent `tokenizer.json` document and handed to the
//! `tokenizers` crate, so both sources run the same, reference implementation of BPE.

use std::path::Path;

use serde_json::json;

use crate::format::gguf::{Gguf, Value};
use crate::bail_format;
use crate::error::{Error, Result};

#[derive(Clone)]
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
        if model != "gpt2" && model != "llama" {
            bail_format!(
                path,
                "tokenizer type `{model}` is not supported (supported: gpt2-style byte-level BPE, llama-style SentencePiece); pass a Hugging Face folder with tokenizer.json instead"
            );
        }
        let strings = |key: &str| -> Result<Vec<&str>> {
            let arr = g.get(key).and_then(Value::as_array).ok_or_else(|| Error::format(path, format!("missing `{key}`")))?;
            arr.iter()
                .map(|v| v.as_str().ok_or_else(|| Error::format(path, format!("`{key}` must be an array of strings"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
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
        // llama.cpp's default: SentencePiece vocabularies start raw text with BOS.
        let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(model == "llama");

        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
        // ggml token types: 2 = unknown, 3 = control, 4 = user-defined. Control and user-defined
        // tokens are matched whole in text; llama.cpp's SentencePiece path matches unknown too.
        let whole = |t: i64| t == 3 || t == 4 || (model == "llama" && t == 2);
        let added: Vec<serde_json::Value> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| whole(t))
            .map(|(i, &t)| {
                // Matched in the raw text, before any normalizer: llama.cpp splits them off first
                // and treats the text after each as a new start (space prefix included).
                json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": t != 4})
            })
            .collect();
        let (normalizer, pre_tokenizer, decoder, bpe) = if model == "llama" {
            sentencepiece_parts(g, &tokens, &types, vocab)?
        } else {
            byte_level_parts(g, strings("tokenizer.ggml.merges")?, vocab)?
        };
        let doc = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": decoder,
            "model": bpe,
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

    /// A copy with `texts` added as ordinary tokens, matched whole in raw text before any other
    /// rule (as `transformers` reads `tokenizer.json`'s added tokens), and their ids: the next free
    /// ids, in order. A text the vocabulary has already is refused.
    pub fn with_added_tokens(&self, texts: &[String]) -> Result<(Tokenizer, Vec<u32>)> {
        if let Some(t) = texts.iter().find(|t| self.inner.token_to_id(t).is_some()) {
            return Err(Error::Invalid(format!("the vocabulary already has a token `{t}`")));
        }
        let mut out = self.clone();
        let added: Vec<tokenizers::AddedToken> = texts.iter().map(|t| tokenizers::AddedToken::from(t.clone(), false)).collect();
        out.inner.add_tokens(added).map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?;
        let ids = texts.iter().map(|t| out.inner.token_to_id(t).ok_or_else(|| Error::Invalid(format!("tokenizer: `{t}` was not added")))).collect::<Result<Vec<_>>>()?;
        Ok((out, ids))
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

/// The longest piece that merges may form, in characters.
const MAX_MERGED_CHARS: usize = 64;
/// More merges per piece than this is refused as implausible (Gemma 3 has 1.96).
const MERGES_PER_PIECE: usize = 8;

/// Normalizer, pre-tokenizer, decoder and model of a `tokenizer.json` document.
type Parts = (serde_json::Value, serde_json::Value, serde_json::Value, serde_json::Value);

/// The parts for a gpt2-style byte-level BPE vocabulary.
fn byte_level_parts(g: &Gguf, merges: Vec<&str>, vocab: serde_json::Map<String, serde_json::Value>) -> Result<Parts> {
    let path = &g.path;
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(Error::format(path, format!("malformed merge `{m}`"))),
        })
        .collect::<Result<_>>()?;
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
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    let bpe = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                     "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                     "ignore_merges": false, "vocab": vocab, "merges": merges});
    Ok((serde_json::Value::Null, pre_tokenizer, decoder, bpe))
}

/// The parts for a llama-style SentencePiece vocabulary (`tokenizer.ggml.model = llama`): pieces
/// with scores, `▁` for spaces, `<0xXX>` pieces for bytes that no piece covers.
///
/// SentencePiece joins the adjacent pair whose joined piece scores highest: BPE with merges ranked
/// by that score. The merges are derived from the pieces as transformers' `SentencePieceExtractor`
/// derives them (every split of a piece into two pieces, by the piece's score, then by id), and
/// BPE with byte fallback runs them. One difference remains: where two different joined pieces
/// score exactly the same, llama.cpp joins the leftmost pair and this the lower id.
fn sentencepiece_parts(g: &Gguf, tokens: &[&str], types: &[i64], vocab: serde_json::Map<String, serde_json::Value>) -> Result<Parts> {
    let path = &g.path;
    let scores: Vec<f64> = match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
        Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        Some(a) => bail_format!(path, "`tokenizer.ggml.scores` has {} entries but there are {} tokens", a.len(), tokens.len()),
        None => bail_format!(path, "missing `tokenizer.ggml.scores` (a SentencePiece vocabulary needs them)"),
    };
    let add_space_prefix = g.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
    // Ids as the vocabulary map resolves them: the last of duplicate pieces, as in `vocab`.
    let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let ids = &ids;
    // Merges form normal pieces (type 1; the others are matched whole or are byte fallbacks) of
    // at most MAX_MERGED_CHARS characters: SentencePiece's own limit is 16 by default, and the
    // bound keeps a hostile vocabulary (`a`, `aa`, `aaa`, ...) from asking for a merge per
    // character pair of every piece.
    let splits = |i: usize| {
        let piece = tokens[i];
        let usable = types[i] == 1 && ids.get(piece) == Some(&i) && piece.chars().nth(MAX_MERGED_CHARS).is_none();
        piece.char_indices().skip(1).filter(move |_| usable).filter_map(move |(cut, _)| Some((*ids.get(&piece[..cut])?, *ids.get(&piece[cut..])?)))
    };
    let count: usize = (0..tokens.len()).map(|i| splits(i).count()).sum();
    if count > MERGES_PER_PIECE * tokens.len() {
        bail_format!(path, "the SentencePiece vocabulary implies {count} merges for {} pieces (real vocabularies have about 2 per piece)", tokens.len());
    }
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::with_capacity(count);
    for i in 0..tokens.len() {
        merges.extend(splits(i).map(|(l, r)| (scores[i], i, l, r)));
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    let merges: Vec<serde_json::Value> = merges.iter().map(|&(_, _, l, r)| json!([tokens[l], tokens[r]])).collect();
    let unk = types.iter().position(|&t| t == 2).map(|i| tokens[i]);
    let space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let normalizer = if add_space_prefix {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"}, space]})
    } else {
        space
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let bpe = json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                     "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                     "ignore_merges": false, "vocab": vocab, "merges": merges});
    Ok((normalizer, serde_json::Value::Null, json!({"type": "Sequence", "decoders": decoders}), bpe))
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
        let mut w = crate::format::gguf::Writer::new();
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

    /// llama.cpp's SentencePiece tokenization, written plainly. Whole-matched tokens (`<ud>`,
    /// `</s>`) split the raw text first; each piece of text after the start or after such a token
    /// gets the space prefix, has its spaces escaped, and then (`llm_tokenizer_spm_session`) the
    /// adjacent pair whose joined piece scores highest is joined (the leftmost on ties) until none
    /// joins; what is left maps to pieces, or to `<0xXX>` pieces byte by byte.
    fn spm_reference(tokens: &[String], scores: &[f32], text: &str, prefix: bool) -> Vec<u32> {
        let id = |s: &str| tokens.iter().position(|t| t == s);
        let spm = |text: &str| -> Vec<u32> {
            let mut sym: Vec<String> = text.chars().map(String::from).collect();
            loop {
                let best = (0..sym.len().saturating_sub(1))
                    .filter_map(|i| id(&format!("{}{}", sym[i], sym[i + 1])).map(|t| (scores[t], i)))
                    .fold(None, |acc: Option<(f32, usize)>, (sc, i)| match acc {
                        Some((bs, _)) if bs >= sc => acc,
                        _ => Some((sc, i)),
                    });
                let Some((_, i)) = best else { break };
                let right = sym.remove(i + 1);
                sym[i].push_str(&right);
            }
            sym.iter()
                .flat_map(|s| match id(s) {
                    Some(t) => vec![t as u32],
                    None => s.bytes().map(|b| id(&format!("<0x{b:02X}>")).expect("byte piece") as u32).collect(),
                })
                .collect()
        };
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = ["<ud>", "</s>"].iter().filter_map(|t| rest.find(t).map(|at| (at, *t))).min();
            let (raw, special) = match next {
                Some((at, t)) => (&rest[..at], Some(t)),
                None => (rest, None),
            };
            if !raw.is_empty() {
                out.extend(spm(&format!("{}{}", if prefix { " " } else { "" }, raw).replace(' ', "\u{2581}")));
            }
            match special {
                Some(t) => {
                    out.push(id(t).unwrap() as u32);
                    rest = &rest[raw.len() + t.len()..];
                }
                None => rest = "",
            }
        }
        out
    }

    /// A SentencePiece vocabulary in GGUF metadata: pieces over a small alphabet with distinct
    /// random scores, controls, and the 256 byte pieces.
    fn spm_gguf(seed: u64, add_space_prefix: bool) -> (Gguf, Vec<String>, Vec<f32>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "<ud>"].iter().map(|s| s.to_string()).collect();
        let mut types = vec![2i32, 3, 3, 4];
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend(std::iter::repeat_n(6, 256));
        let alphabet = ['a', 'b', 'c', '\u{2581}'];
        for c in alphabet {
            tokens.push(c.to_string());
            types.push(1);
        }
        while tokens.len() < 260 + 4 + 60 {
            let len = rng.gen_range(2..6);
            let piece: String = (0..len).map(|_| alphabet[rng.gen_range(0..alphabet.len())]).collect();
            if !tokens.contains(&piece) {
                tokens.push(piece);
                types.push(1);
            }
        }
        let mut scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
        // Distinct scores in an order unrelated to the ids.
        for i in (263..scores.len()).rev() {
            let j = rng.gen_range(263..=i);
            scores.swap(i, j);
        }
        let mut w = crate::format::gguf::Writer::new();
        w.meta("tokenizer.ggml.model", Value::Str("llama".into()))
            .meta("tokenizer.ggml.tokens", Value::Array(tokens.iter().map(|t| Value::Str(t.clone())).collect()))
            .meta("tokenizer.ggml.scores", Value::Array(scores.iter().map(|&v| Value::F32(v)).collect()))
            .meta("tokenizer.ggml.token_type", Value::Array(types.iter().map(|&t| Value::I32(t)).collect()))
            .meta("tokenizer.ggml.bos_token_id", Value::U32(1))
            .meta("tokenizer.ggml.eos_token_id", Value::U32(2))
            .meta("tokenizer.ggml.add_space_prefix", Value::Bool(add_space_prefix));
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        (Gguf::from_bytes("spm.gguf", bytes).unwrap(), tokens, scores)
    }

    #[test]
    fn sentencepiece_vocabulary_tokenizes_like_llama_cpp() {
        use rand::{Rng, SeedableRng};
        for (seed, prefix) in [(1, true), (2, false), (3, true)] {
            let (g, tokens, scores) = spm_gguf(seed, prefix);
            let tok = Tokenizer::from_gguf(&g).unwrap();
            assert!(tok.add_bos && tok.bos == Some(1) && tok.stop_ids.contains(&2));
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
            let parts = ["a", "b", "c", " ", " ", "\u{e9}", "\n", "<ud>", "</s>"];
            for _ in 0..300 {
                let len = rng.gen_range(1..24);
                let text: String = (0..len).map(|_| parts[rng.gen_range(0..parts.len())]).collect();
                let want = spm_reference(&tokens, &scores, &text, prefix);
                assert_eq!(tok.encode(&text).unwrap(), want, "seed {seed}, text {text:?}");
                if !text.contains('<') {
                    assert_eq!(tok.decode(&want, false).unwrap(), text, "seed {seed}: decode is not the inverse of encode");
                }
            }
            // Whole-matched tokens in the text: control and user-defined.
            let ids = tok.encode("ab</s>a<ud>b").unwrap();
            assert!(ids.contains(&2) && ids.contains(&3), "{ids:?}");
        }
    }

    /// `a`, `aa`, ... would ask for a merge per character pair of every piece: refused, with the
    /// file named, instead of gigabytes of merges.
    #[test]
    fn implausibly_many_sentencepiece_merges_are_an_error() {
        let tokens: Vec<Value> = (1..=64).map(|n| Value::Str("a".repeat(n))).collect();
        let mut w = crate::format::gguf::Writer::new();
        w.meta("tokenizer.ggml.model", Value::Str("llama".into()))
            .meta("tokenizer.ggml.scores", Value::Array((0..64).map(|i| Value::F32(-(i as f32))).collect()))
            .meta("tokenizer.ggml.tokens", Value::Array(tokens));
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        let g = Gguf::from_bytes("aaaa.gguf", bytes).unwrap();
        let e = Tokenizer::from_gguf(&g).err().expect("must be an error").to_string();
        assert!(e.contains("aaaa.gguf") && e.contains("merges"), "{e}");
    }

    #[test]
    fn sentencepiece_without_scores_is_an_error() {
        let mut w = crate::format::gguf::Writer::new();
        w.meta("tokenizer.ggml.model", Value::Str("llama".into())).meta("tokenizer.ggml.tokens", str_array(&["a", "b"]));
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        let g = Gguf::from_bytes("noscores.gguf", bytes).unwrap();
        let e = Tokenizer::from_gguf(&g).err().expect("must be an error").to_string();
        assert!(e.contains("noscores.gguf") && e.contains("tokenizer.ggml.scores"), "{e}");
    }
}
