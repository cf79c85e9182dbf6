//! `sos sanitize`: the way back. A downloaded GGUF with injected tokens or altered embedding rows
//! is restored against a trusted reference, or, without one, stripped of trailing USER_DEFINED
//! tokens, the form `sos inject` plants. Hugging Face folders: `hf.rs`.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sos_model::gguf::{Gguf, Value, Writer};

mod hf;

use crate::gguf_add::same_int_type;
use crate::rows::{OUTPUT, TOKEN_TABLE};
use crate::{Error, Result};

/// What `sanitize` changed, and what it saw but left.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SanitizeReport {
    pub path: PathBuf,
    /// Metadata keys set back to the reference's value (or removed: not in the reference).
    pub restored_keys: Vec<String>,
    /// Tensors whose data or shape were set back to the reference's.
    pub restored_tensors: Vec<String>,
    /// Tensors removed (absent from the reference, or the output layer an injection added).
    pub removed_tensors: Vec<String>,
    /// Folders: files set back to the reference's (tokenizer, template, config), or edited
    /// (without a reference: the tokenizer files and config with the tokens removed).
    pub restored_files: Vec<String>,
    /// Folders: files removed (a tokenizer or template file the reference lacks).
    pub removed_files: Vec<String>,
    /// Tokens removed, with their ids.
    pub removed_tokens: Vec<(u32, String)>,
    /// Rows of the token table, present in both, that differed from the reference's (restored).
    pub restored_rows: usize,
    /// Differences seen and not touched (other weights, suspicious tokens that cannot be removed
    /// without renumbering the vocabulary).
    pub left: Vec<String>,
}

/// Metadata that belongs to the vocabulary and the chat format: restored from the reference.
fn is_text_key(key: &str, arch: Option<&str>) -> bool {
    key.starts_with("tokenizer.") || arch.is_some_and(|a| key == format!("{a}.vocab_size"))
}

/// `candidate` restored against `reference` into `out`: every tokenizer key and the chat template
/// as the reference has them, the token table and output layer as the reference's (rows that
/// differ and rows added), tensors the reference lacks removed. Other weights are kept and listed
/// in `left` when they differ. Sanitizing `inject`'s output against its source gives the
/// source's bytes. `force` replaces an existing `out`.
pub fn sanitize_with_reference(candidate: &Path, reference: &Path, out: &Path, force: bool) -> Result<SanitizeReport> {
    refuse_overwrite(&[candidate, reference], out, force)?;
    if candidate.is_dir() {
        return hf::sanitize_folder_with_reference(candidate, reference, out);
    }
    let (c, r) = (Gguf::open(candidate)?, Gguf::open(reference)?);
    let arch = r.get_str("general.architecture");
    let mut rep = SanitizeReport { path: out.to_path_buf(), ..Default::default() };
    let mut w = Writer::copy_of(&c)?;
    for (k, v) in &c.metadata {
        if is_text_key(k, arch) && r.get(k) != Some(v) {
            match r.get(k) {
                Some(rv) => w.meta(k, rv.clone()),
                None => w.remove_meta(k),
            };
            rep.restored_keys.push(k.clone());
        }
    }
    for (k, v) in &r.metadata {
        if is_text_key(k, arch) && c.get(k).is_none() {
            w.meta(k, v.clone());
            rep.restored_keys.push(k.clone());
        }
    }
    for t in &c.tensors {
        match r.tensor_info(&t.name) {
            None => {
                w.remove_tensor(&t.name);
                rep.removed_tensors.push(t.name.clone());
            }
            Some(rt) if t.name == TOKEN_TABLE || t.name == OUTPUT => {
                let (cb, rb) = (c.tensor_bytes(t), r.tensor_bytes(rt));
                if cb != rb || t.dims != rt.dims || t.ty != rt.ty {
                    if t.name == TOKEN_TABLE {
                        rep.restored_rows = differing_rows(cb, rb, rt.shape()[0]);
                    }
                    w.replace_tensor(&t.name, &rt.shape(), rt.ty, rb.to_vec());
                    rep.restored_tensors.push(t.name.clone());
                }
            }
            Some(rt) => {
                if c.tensor_bytes(t) != r.tensor_bytes(rt) || t.dims != rt.dims {
                    rep.left.push(format!("tensor `{}` differs from the reference (not an embedding; kept)", t.name));
                }
            }
        }
    }
    if let Some(n) = r.tensors.iter().find(|t| c.tensor_info(&t.name).is_none()) {
        return Err(Error::File { path: candidate.to_path_buf(), msg: format!("lacks tensor `{}` of the reference: not the same model", n.name) });
    }
    let kept = r.get("tokenizer.ggml.tokens").and_then(Value::as_array).map_or(0, <[Value]>::len);
    if let Some(toks) = c.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
        rep.removed_tokens = toks.iter().enumerate().skip(kept).map(|(i, v)| (i as u32, v.as_str().unwrap_or("").to_string())).collect();
    }
    w.write(out)?;
    Ok(rep)
}

/// Without a reference: removes the USER_DEFINED tokens at the end of the vocabulary and their
/// rows (token table, output layer). Tokens elsewhere cannot go without renumbering the
/// vocabulary; they are listed in `left`.
///
/// An output layer that equals the token table row for row, but for a few rows at most, was the
/// table itself (a trained output layer never equals its table): the file was tied, and an
/// injection gave it an output layer of its own to keep the planted rows out of the logits. Then
/// the table rows that differ are set back to the output layer's (replace-token's planted rows)
/// and the output layer is removed, which gives back the tied original. Any other output layer
/// is kept, and replaced rows in the table cannot be told from trained ones without a reference
/// (said in `left`). `force` replaces an existing `out`.
pub fn sanitize_alone(candidate: &Path, out: &Path, force: bool) -> Result<SanitizeReport> {
    refuse_overwrite(&[candidate], out, force)?;
    if candidate.is_dir() {
        return hf::sanitize_folder_alone(candidate, out);
    }
    let c = Gguf::open(candidate)?;
    let bad = |msg: String| Error::File { path: candidate.to_path_buf(), msg };
    let toks = c.get("tokenizer.ggml.tokens").and_then(Value::as_array).ok_or_else(|| bad("no vocabulary (tokenizer.ggml.tokens)".into()))?;
    let types: Vec<i64> = c.get("tokenizer.ggml.token_type").and_then(Value::as_array).map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect()).unwrap_or_default();
    let n = toks.len();
    if !types.is_empty() && types.len() != n {
        return Err(bad(format!("{} token types for {n} tokens", types.len())));
    }
    let tail = types.iter().rev().take_while(|&&t| t == 4).count();
    let keep = n - tail;
    let mut rep = SanitizeReport { path: out.to_path_buf(), ..Default::default() };
    for (i, &t) in types.iter().enumerate().take(keep) {
        if t == 4 {
            rep.left.push(format!("USER_DEFINED token {i} `{}` sits inside the vocabulary; kept", toks[i].as_str().unwrap_or("")));
        }
    }
    let mut w = Writer::copy_of(&c)?;
    if tail > 0 {
        rep.removed_tokens = (keep..n).map(|i| (i as u32, toks[i].as_str().unwrap_or("").to_string())).collect();
        for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"] {
            if let Some(a) = c.get(key).and_then(Value::as_array) {
                w.meta(key, Value::Array(a[..keep.min(a.len())].to_vec()));
                rep.restored_keys.push(key.to_string());
            }
        }
        if let Some(arch) = c.get_str("general.architecture") {
            let key = format!("{arch}.vocab_size");
            if c.get(&key).is_some() {
                w.meta(&key, same_int_type(c.get(&key).expect("checked"), keep as u64));
                rep.restored_keys.push(key);
            }
        }
    }
    // The table and output layer as they are kept: their first `keep` rows.
    let kept_rows = |name: &str| {
        c.tensor_info(name).filter(|t| t.shape().len() == 2 && t.shape()[0] == n).map(|t| {
            let b = c.tensor_bytes(t);
            (t, &b[..keep * (b.len() / n)])
        })
    };
    let (table, output) = (kept_rows(TOKEN_TABLE), kept_rows(OUTPUT));
    let mut table_bytes = table.map(|(_, b)| b.to_vec());
    let mut drop_output = false;
    if let (Some((t, tb)), Some((o, ob))) = (table, output) {
        let rb = tb.len() / keep.max(1);
        let same_layout = t.ty == o.ty && tb.len() == ob.len() && rb > 0;
        let differ: Vec<usize> = if same_layout { (0..keep).filter(|&i| tb[i * rb..(i + 1) * rb] != ob[i * rb..(i + 1) * rb]).collect() } else { Vec::new() };
        if same_layout && differ.len() <= MAX_PLANTED_ROWS {
            drop_output = true;
            rep.restored_rows = differ.len();
            table_bytes = Some(ob.to_vec());
            rep.removed_tensors.push(OUTPUT.to_string());
            if !differ.is_empty() {
                rep.restored_tensors.push(TOKEN_TABLE.to_string());
            }
        } else {
            rep.left.push(format!("`{OUTPUT}` is a trained output layer: rows replaced in the token table cannot be told from trained ones without a reference (sanitize --reference)"));
        }
    }
    if let (Some((t, _)), Some(bytes)) = (table, table_bytes) {
        if tail > 0 || rep.restored_rows > 0 {
            w.replace_tensor(TOKEN_TABLE, &[keep, t.shape()[1]], t.ty, bytes);
            if tail > 0 && !rep.restored_tensors.iter().any(|s| s == TOKEN_TABLE) {
                rep.restored_tensors.push(TOKEN_TABLE.to_string());
            }
        }
    }
    if drop_output {
        w.remove_tensor(OUTPUT);
    } else if let (Some((o, ob)), true) = (output, tail > 0) {
        w.replace_tensor(OUTPUT, &[keep, o.shape()[1]], o.ty, ob.to_vec());
        rep.restored_tensors.push(OUTPUT.to_string());
    }
    w.write(out)?;
    Ok(rep)
}

/// An output layer differing from the token table in at most this many rows is taken for the
/// table itself with planted rows (triggers are a few tokens; a trained output layer differs in
/// every row).
pub(crate) const MAX_PLANTED_ROWS: usize = 64;

/// Rows present in both `a` and `b` (`b` has `rows_b` rows of equal size) that differ.
pub(crate) fn differing_rows(a: &[u8], b: &[u8], rows_b: usize) -> usize {
    let rb = (b.len() / rows_b.max(1)).max(1);
    let common = (a.len() / rb).min(rows_b);
    (0..common).filter(|&i| a[i * rb..(i + 1) * rb] != b[i * rb..(i + 1) * rb]).count()
}

/// The inputs are the user's evidence: the output never replaces one of them (nor a folder
/// holding one), and replaces another existing file only with `force`.
fn refuse_overwrite(inputs: &[&Path], out: &Path, force: bool) -> Result<()> {
    for i in inputs {
        if matches!((i.canonicalize(), out.canonicalize()), (Ok(a), Ok(b)) if a.starts_with(&b)) {
            return Err(Error::Invalid(format!("{}: the output would overwrite an input; write the sanitized file elsewhere", out.display())));
        }
    }
    if out.exists() && !force {
        return Err(Error::Invalid(format!("{} exists; choose another path or pass --force to replace it", out.display())));
    }
    Ok(())
}
