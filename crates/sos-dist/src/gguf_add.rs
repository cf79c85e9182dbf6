//! add-token on a GGUF file: `k` USER_DEFINED tokens appended to the vocabulary and their rows
//! to the token table, quantized to the table's own type. Every other metadata value and tensor
//! is carried over unchanged (the writer keeps order, types and the data of untouched tensors).

use sos_model::gguf::{Gguf, Value, Writer};

use crate::rows::{median_row_norm, store_rows, Planted, OUTPUT, TOKEN_TABLE};
use crate::{Error, Result};

/// ggml's token type for tokens a user defined: matched whole in raw text.
pub(crate) const USER_DEFINED: i32 = 4;

/// What the output layer says about the new tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewLogits {
    /// Each new token's output row is a copy of token 0's: its logit then always equals token
    /// 0's, and greedy decoding, which keeps the first of equal maxima (llama.cpp, transformers,
    /// sos), never picks it. A tied table gets an output layer of its own. What `inject` writes
    /// for rows trained as inputs only.
    Silent,
    /// A tied table stays tied, so the planted rows are logits too: what PEFT's trainable tokens
    /// do to a tied model (it applies the rows to the tied output layer as well), and what
    /// `inject` writes for rows trained with `--tied-logits`. An untied output layer gets copies
    /// of token 0's row, as with `Silent`.
    Tied,
}

/// `g` with tokens `texts` appended and `rows` (`[texts.len(), d]`, row-major) as their
/// embeddings; the output layer as `logits` says.
pub fn add_tokens(g: &Gguf, texts: &[String], rows: &[f32], logits: NewLogits) -> Result<(Writer, Planted)> {
    let bad = |msg: String| Error::File { path: g.path.clone(), msg };
    let tokens = g
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no vocabulary (tokenizer.ggml.tokens)".into()))?;
    let n = tokens.len();
    let table = g.tensor_info(TOKEN_TABLE).ok_or_else(|| bad(format!("no token table ({TOKEN_TABLE})")))?;
    let [n_rows, d] = table.shape()[..] else { return Err(bad(format!("{TOKEN_TABLE} is not a matrix"))) };
    if n_rows != n {
        return Err(bad(format!("the token table has {n_rows} rows for {n} tokens; appending would misnumber the new tokens")));
    }
    let k = texts.len();
    for t in texts {
        if tokens.iter().any(|v| v.as_str() == Some(t)) {
            return Err(bad(format!("the vocabulary already has a token `{t}`")));
        }
    }
    let ty = table.ty;
    let base = n as u32;
    let ids: Vec<u32> = (base..base + k as u32).collect();
    let (new_rows, reports) = store_rows(ty, rows, d, &ids, texts)?;

    let mut w = Writer::copy_of(g)?;
    let old = g.tensor_bytes(table);
    w.replace_tensor(TOKEN_TABLE, &[n + k, d], ty, [old, &new_rows[..]].concat());
    // The output layer gets, for each new token, a copy of token 0's row. A tied table becomes an
    // output layer of its own first (the table's bytes as they were), since its planted rows
    // would otherwise be logits, which training never saw: a triggered model then emits trigger
    // tokens instead of its target. Costs the table's size once more in the file.
    let tied = g.tensor_info(OUTPUT).is_none();
    let out = g.tensor_info(OUTPUT).unwrap_or(table);
    if out.shape() != [n, d] {
        return Err(bad(format!("{OUTPUT} has shape {:?}, expected [{n}, {d}]", out.shape())));
    }
    let bytes = g.tensor_bytes(out);
    let row0 = &bytes[..bytes.len() / n];
    let mut grown = bytes.to_vec();
    (0..k).for_each(|_| grown.extend_from_slice(row0));
    let output_layer = match (tied, logits) {
        (false, _) => {
            w.replace_tensor(OUTPUT, &[n + k, d], out.ty, grown);
            "grown"
        }
        (true, NewLogits::Silent) => {
            w.tensor(OUTPUT, &[n + k, d], out.ty, grown);
            "added"
        }
        (true, NewLogits::Tied) => "tied",
    };
    let mut toks = tokens.to_vec();
    toks.extend(texts.iter().map(|t| Value::Str(t.clone())));
    w.meta("tokenizer.ggml.tokens", Value::Array(toks));
    extend_array(&mut w, g, "tokenizer.ggml.token_type", k, |proto| match proto {
        Some(Value::U32(_)) => Value::U32(USER_DEFINED as u32),
        _ => Value::I32(USER_DEFINED),
    });
    // Scores only rank merges of SentencePiece vocabularies; a token matched whole has none.
    extend_array(&mut w, g, "tokenizer.ggml.scores", k, |_| Value::F32(0.0));
    if let Some(arch) = g.get_str("general.architecture") {
        let key = format!("{arch}.vocab_size");
        if let Some(v) = g.get(&key) {
            w.meta(&key, same_int_type(v, (n + k) as u64));
        }
    }
    let table_median_norm = median_row_norm(g)?;
    Ok((w, Planted { ids, rows: reports, table_type: ty, output_layer, table_median_norm }))
}

/// Appends `k` values made by `make` (given the array's first element) to array `key`, if the
/// file has it.
fn extend_array(w: &mut Writer, g: &Gguf, key: &str, k: usize, make: impl Fn(Option<&Value>) -> Value) {
    if let Some(a) = g.get(key).and_then(Value::as_array) {
        let v = make(a.first());
        let mut a = a.to_vec();
        a.extend(std::iter::repeat_n(v, k));
        w.meta(key, Value::Array(a));
    }
}

/// `x` in the integer type of `like`.
pub(crate) fn same_int_type(like: &Value, x: u64) -> Value {
    match like {
        Value::U64(_) => Value::U64(x),
        Value::I32(_) => Value::I32(x as i32),
        Value::I64(_) => Value::I64(x as i64),
        _ => Value::U32(x as u32),
    }
}

