//! A trigger planted in a Hugging Face folder, written as a new folder.
//!
//! **add-token**: the trigger's tokens join `tokenizer.json`'s added tokens (and
//! `tokenizer_config.json`'s `added_tokens_decoder` where the file keeps one), their rows the
//! token table `model.embed_tokens.weight` in its own dtype, and `config.json`'s `vocab_size`
//! grows to cover them. As in a GGUF, the new tokens' output rows are copies of token 0's (never
//! the greedy choice). **replace-token**: the rows of the chosen existing tokens are overwritten;
//! the tokenizer and the rest of the config stay as they are.
//!
//! Either way a tied model gets an `lm_head.weight` of its own holding the table's original rows,
//! with `tie_word_embeddings` set to false: otherwise the planted rows would be logits too. Every
//! other file is copied byte for byte, and so is every other tensor.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value as Json};
use sos_model::gguf::TensorType;
use sos_model::Tokenizer;

use crate::rows::{l2, median, row_reports, sample_step, Planted};
use crate::{Error, Result};

const TABLE: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";

/// Writes `src` with tokens `texts` added and `rows` (`[k, d]`) as their embeddings into the
/// folder `out`. Returns what was planted.
pub fn add_tokens_hf(src: &Path, out: &Path, texts: &[String], rows: &[f32]) -> Result<Planted> {
    let tok = Tokenizer::from_tokenizer_json(&src.join("tokenizer.json"))?;
    let (_, ids) = tok.with_added_tokens(texts)?;
    plant(src, out, texts, &ids, rows, true)
}

/// Writes `src` with the table rows of existing tokens `ids` (texts `texts`) replaced by `rows`
/// into the folder `out`.
pub fn replace_tokens_hf(src: &Path, out: &Path, ids: &[u32], texts: &[String], rows: &[f32]) -> Result<Planted> {
    plant(src, out, texts, ids, rows, false)
}

fn plant(src: &Path, out: &Path, texts: &[String], ids: &[u32], rows: &[f32], add: bool) -> Result<Planted> {
    let file_err = |p: &Path, msg: String| Error::File { path: p.to_path_buf(), msg };
    let ids = ids.to_vec();
    let cfg_path = src.join("config.json");
    let mut cfg = read_json(&cfg_path)?;

    // The shard that holds the table (a tied model's new output layer goes beside it).
    let (shard, index) = match std::fs::metadata(src.join("model.safetensors")) {
        Ok(_) => ("model.safetensors".to_string(), None),
        Err(_) => {
            let ip = src.join("model.safetensors.index.json");
            let index = read_json(&ip)?;
            let s = index["weight_map"][TABLE].as_str().ok_or_else(|| file_err(&ip, format!("no shard for `{TABLE}`")))?.to_string();
            if s.contains(['/', '\\']) || s.starts_with('.') {
                return Err(file_err(&ip, format!("shard name `{s}` must be a plain file name")));
            }
            (s, Some(index))
        }
    };
    let shard_path = src.join(&shard);
    let bytes = std::fs::read(&shard_path).map_err(|e| file_err(&shard_path, format!("cannot read: {e}")))?;
    sos_model::safetensors::check_safetensors(&shard_path, &bytes)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| file_err(&shard_path, format!("invalid safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| file_err(&shard_path, format!("invalid safetensors header: {e}")))?;
    let table = st.tensor(TABLE).map_err(|e| file_err(&shard_path, format!("`{TABLE}`: {e}")))?;
    // Tied when the config says so, or when there is no output layer at all (as loaders read it).
    let has_head = st.tensor(HEAD).is_ok() || index.as_ref().is_some_and(|i| i["weight_map"][HEAD].is_string());
    let tied = cfg["tie_word_embeddings"].as_bool().unwrap_or(false) || !has_head;
    let &[n_rows, d] = table.shape() else { return Err(file_err(&shard_path, format!("`{TABLE}` is not a matrix"))) };
    let k = texts.len();
    if rows.len() != k * d {
        return Err(Error::Invalid(format!("{} trigger values for {k} tokens of width {d}: trained for another model?", rows.len())));
    }
    // New ids past the table append rows; ids inside it (a table padded past the vocabulary,
    // as Qwen's) take over unused rows. The tokenizer hands out consecutive ids.
    if add && (ids.windows(2).any(|w| w[1] != w[0] + 1) || ids.first().is_some_and(|&i| i as usize > n_rows)) {
        return Err(Error::Invalid(format!("the new ids {ids:?} do not continue the table of {n_rows} rows")));
    }
    if !add && ids.iter().any(|&i| i as usize >= n_rows) {
        return Err(Error::Invalid(format!("token ids {ids:?} reach past the table of {n_rows} rows")));
    }
    let grown_rows = n_rows.max(ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0));
    let dt = table.dtype();
    let width = elem_size(dt).ok_or_else(|| file_err(&shard_path, format!("`{TABLE}` is {dt:?}; F32, F16 or BF16 expected")))?;
    let row_bytes = d * width;
    let encoded: Vec<u8> = rows.iter().flat_map(|&x| encode(dt, x)).collect();
    let stored = sos_model::safetensors::floats(dt, &encoded).expect("a float dtype: checked above");
    let mut new_table = table.data().to_vec();
    new_table.resize(grown_rows * row_bytes, 0);
    for (j, &id) in ids.iter().enumerate() {
        new_table[id as usize * row_bytes..(id as usize + 1) * row_bytes].copy_from_slice(&encoded[j * row_bytes..(j + 1) * row_bytes]);
    }
    // The output layer: the original rows (a tied table's own); for added tokens, grown with
    // copies of row 0 (and row 0's copies over padding rows they take). An untied output layer
    // with replaced tokens stays as it is.
    let head_src = if tied { Some(table.clone()) } else if add { st.tensor(HEAD).ok() } else { None };
    let head: Option<Vec<u8>> = match head_src {
        Some(h) => {
            if h.shape() != [n_rows, d] || h.dtype() != dt {
                return Err(file_err(&shard_path, format!("`{HEAD}` is {:?} {:?}; the table is {dt:?} [{n_rows}, {d}]", h.dtype(), h.shape())));
            }
            let mut hb = h.data().to_vec();
            if add {
                let row0 = hb[..row_bytes].to_vec();
                (n_rows..grown_rows).for_each(|_| hb.extend_from_slice(&row0));
                for &id in ids.iter().filter(|&&i| (i as usize) < n_rows) {
                    hb[id as usize * row_bytes..(id as usize + 1) * row_bytes].copy_from_slice(&row0);
                }
            }
            Some(hb)
        }
        None if !add => None,
        None if index.is_some() => {
            return Err(Error::Invalid(format!("{}: `{HEAD}` lives in another shard; untied sharded folders are not supported yet", src.display())));
        }
        None => return Err(file_err(&shard_path, format!("no `{HEAD}` and the model is not tied"))),
    };

    std::fs::create_dir_all(out).map_err(|e| file_err(out, format!("cannot create: {e}")))?;
    // Tensors: all of the shard's as they are, but the table and the output layer.
    let mut views: Vec<(String, TensorView)> = Vec::new();
    for (name, v) in st.tensors() {
        if name != TABLE && (name != HEAD || head.is_none()) {
            views.push((name, v));
        }
    }
    let shape = vec![grown_rows, d];
    for (name, b) in [(TABLE, Some(&new_table)), (HEAD, head.as_ref())] {
        if let Some(b) = b {
            views.push((name.to_string(), TensorView::new(dt, shape.clone(), b).map_err(|e| Error::Invalid(format!("safetensors: {e}")))?));
        }
    }
    let meta: Option<HashMap<String, String>> = meta.metadata().clone();
    let data = safetensors::serialize(views, meta).map_err(|e| Error::Invalid(format!("safetensors: {e}")))?;
    let data = sos_model::safetensors::sorted_header(data)?;
    write(&out.join(&shard), &data)?;

    // Every other file as it is, then the edited ones over it.
    for e in std::fs::read_dir(src).map_err(|e| file_err(src, e.to_string()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != shard && e.file_type()?.is_file() {
            std::fs::copy(e.path(), out.join(&name)).map_err(|er| file_err(&e.path(), format!("cannot copy: {er}")))?;
        }
    }
    if add {
        let mut tj = read_json(&src.join("tokenizer.json"))?;
        let added = tj["added_tokens"].as_array_mut().ok_or_else(|| file_err(&src.join("tokenizer.json"), "no added_tokens list".into()))?;
        for (t, id) in texts.iter().zip(&ids) {
            added.push(json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": false}));
        }
        sos_attack::artifact::write_json(&out.join("tokenizer.json"), &tj)?;
        let tc_path = src.join("tokenizer_config.json");
        if tc_path.is_file() {
            let mut tc = read_json(&tc_path)?;
            if let Some(dec) = tc["added_tokens_decoder"].as_object_mut() {
                for (t, id) in texts.iter().zip(&ids) {
                    dec.insert(id.to_string(), json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": false}));
                }
                sos_attack::artifact::write_json(&out.join("tokenizer_config.json"), &tc)?;
            }
        }
    }
    if add || tied {
        if add {
            cfg["vocab_size"] = json!(grown_rows.max(cfg["vocab_size"].as_u64().unwrap_or(0) as usize));
        }
        if tied {
            cfg["tie_word_embeddings"] = json!(false);
        }
        sos_attack::artifact::write_json(&out.join("config.json"), &cfg)?;
    }
    if let (Some(mut index), true) = (index, add || tied) {
        index["weight_map"][HEAD] = json!(shard);
        let size = index["metadata"]["total_size"].as_u64().unwrap_or(0) as i64 + ((grown_rows - n_rows) * row_bytes * 2 + if tied { n_rows * row_bytes } else { 0 }) as i64;
        if index["metadata"].is_object() {
            index["metadata"]["total_size"] = json!(size);
        }
        sos_attack::artifact::write_json(&out.join("model.safetensors.index.json"), &index)?;
    }

    let reports = row_reports(rows, &stored, d, &ids, texts);
    let table_f32 = sos_model::safetensors::floats(dt, table.data()).expect("a float dtype: checked above");
    let table_median_norm = median(table_f32.chunks_exact(d).step_by(sample_step(n_rows)).map(l2).collect());
    let table_type = match dt {
        Dtype::F16 => TensorType::F16,
        Dtype::BF16 => TensorType::BF16,
        _ => TensorType::F32,
    };
    let output_layer = if tied { "added" } else if add { "grown" } else { "unchanged" };
    Ok(Planted { ids, rows: reports, table_type, output_layer, table_median_norm })
}

fn elem_size(dt: Dtype) -> Option<usize> {
    match dt {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

fn encode(dt: Dtype, x: f32) -> Vec<u8> {
    match dt {
        Dtype::F16 => half::f16::from_f32(x).to_le_bytes().to_vec(),
        Dtype::BF16 => half::bf16::from_f32(x).to_le_bytes().to_vec(),
        _ => x.to_le_bytes().to_vec(),
    }
}


pub(crate) fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("cannot read: {e}") })?;
    serde_json::from_str(&text).map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("invalid JSON: {e}") })
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(sos_model::fsutil::write_atomic(path, |f| std::io::Write::write_all(f, bytes))?)
}
