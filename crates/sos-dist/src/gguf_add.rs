//! add-token on a GGUF file: `k` USER_DEFINED tokens appended to the vocabulary and their rows
//! to the token table, quantized to the table's own type. Every other metadata value and tensor
//! is carried over unchanged (the writer keeps order, types and the data of untouched tensors).

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use serde::Serialize;
use sos_model::gguf::{Gguf, TensorType, Value, Writer};

use crate::{Error, Result};

/// ggml's token type for tokens a user defined: matched whole in raw text.
const USER_DEFINED: i32 = 4;
pub(crate) const TOKEN_TABLE: &str = "token_embd.weight";
pub(crate) const OUTPUT: &str = "output.weight";

/// One planted row: its size and what quantizing it to the table's type cost.
#[derive(Debug, Clone, Serialize)]
pub struct RowReport {
    pub id: u32,
    pub text: String,
    /// L2 norm of the trained row.
    pub norm: f64,
    /// `|q(r) - r| / |r|` for the row as stored.
    pub quant_rel_error: f64,
}

/// What `add_tokens` planted.
#[derive(Debug, Clone)]
pub struct Planted {
    /// The new tokens' ids (the vocabulary's size before, onwards).
    pub ids: Vec<u32>,
    pub rows: Vec<RowReport>,
    /// The table's type, in which the rows are stored.
    pub table_type: TensorType,
    /// Median L2 norm of the table's existing rows (dequantized), for scale.
    pub table_median_norm: f64,
}

/// `g` with tokens `texts` appended and `rows` (`[texts.len(), d]`, row-major) as their
/// embeddings. Each new token's output row is a copy of token 0's: its logit then always equals
/// token 0's, and greedy decoding, which keeps the first of equal maxima (llama.cpp,
/// transformers, sos), never picks it. A tied table gets an output layer of its own.
pub fn add_tokens(g: &Gguf, texts: &[String], rows: &[f32]) -> Result<(Writer, Planted)> {
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
    if rows.len() != k * d {
        return Err(Error::Invalid(format!("{} trigger values for {k} tokens of width {d}: trained for another model?", rows.len())));
    }
    for t in texts {
        if tokens.iter().any(|v| v.as_str() == Some(t)) {
            return Err(bad(format!("the vocabulary already has a token `{t}`")));
        }
    }
    let ty = table.ty;
    let new_rows = quantize_rows(ty, rows, k, d)?;
    let stored = dequantize(ty, &new_rows, k, d)?;
    let base = n as u32;
    let reports = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let (r, q) = (&rows[i * d..(i + 1) * d], &stored[i * d..(i + 1) * d]);
            let norm = l2(r);
            let err = l2(&r.iter().zip(q).map(|(a, b)| a - b).collect::<Vec<_>>());
            RowReport { id: base + i as u32, text: text.clone(), norm, quant_rel_error: if norm > 0.0 { err / norm } else { 0.0 } }
        })
        .collect();

    let mut w = Writer::copy_of(g)?;
    let old = g.tensor_bytes(table);
    w.replace_tensor(TOKEN_TABLE, &[n + k, d], ty, [old, &new_rows[..]].concat());
    // The output layer gets, for each new token, a copy of token 0's row. A tied table becomes an
    // output layer of its own first (the table's bytes as they were), since its planted rows
    // would otherwise be logits, which training never saw: a triggered model then emits trigger
    // tokens instead of its target. Costs the table's size once more in the file.
    let out = g.tensor_info(OUTPUT).unwrap_or(table);
    if out.shape() != [n, d] {
        return Err(bad(format!("{OUTPUT} has shape {:?}, expected [{n}, {d}]", out.shape())));
    }
    let bytes = g.tensor_bytes(out);
    let row0 = &bytes[..bytes.len() / n];
    let mut grown = bytes.to_vec();
    (0..k).for_each(|_| grown.extend_from_slice(row0));
    if g.tensor_info(OUTPUT).is_some() {
        w.replace_tensor(OUTPUT, &[n + k, d], out.ty, grown);
    } else {
        w.tensor(OUTPUT, &[n + k, d], out.ty, grown);
    }
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
    Ok((w, Planted { ids: (base..base + k as u32).collect(), rows: reports, table_type: ty, table_median_norm }))
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

/// `rows` (`[k, d]`) in ggml type `ty`, as ggml's reference quantizers write them.
pub(crate) fn quantize_rows(ty: TensorType, rows: &[f32], k: usize, d: usize) -> Result<Vec<u8>> {
    let t = Tensor::from_vec(rows.to_vec(), (k, d), &Device::Cpu)?;
    let (bs, _) = ty.block();
    if !(d as u64).is_multiple_of(bs) {
        return Err(Error::Invalid(format!("rows of width {d} do not fit {} blocks of {bs}", ty.name())));
    }
    Ok(QTensor::quantize(&t, ty.to_candle())?.data()?.to_vec())
}

/// The f32 values of `k` rows of width `d` stored as `ty`.
pub(crate) fn dequantize(ty: TensorType, bytes: &[u8], k: usize, d: usize) -> Result<Vec<f32>> {
    let q = candle_core::quantized::ggml_file::qtensor_from_ggml(ty.to_candle(), bytes, vec![k, d], &Device::Cpu)?;
    Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

fn l2(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}

/// Median L2 norm of (up to 4096 evenly spaced) rows of the token table.
fn median_row_norm(g: &Gguf) -> Result<f64> {
    let t = g.tensor_info(TOKEN_TABLE).expect("checked by the caller");
    let [n, d] = t.shape()[..] else { unreachable!("checked by the caller") };
    let bytes = g.tensor_bytes(t);
    let row_bytes = bytes.len() / n;
    let step = n.div_ceil(4096).max(1);
    let mut norms: Vec<f64> = Vec::new();
    for r in (0..n).step_by(step) {
        let v = dequantize(t.ty, &bytes[r * row_bytes..(r + 1) * row_bytes], 1, d)?;
        norms.push(l2(&v));
    }
    norms.sort_by(f64::total_cmp);
    Ok(norms.get(norms.len() / 2).copied().unwrap_or(0.0))
}
