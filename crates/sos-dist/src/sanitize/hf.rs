//! `sos sanitize` on Hugging Face folders: the folder counterpart of `mod.rs`, written as a
//! sibling folder and moved into place.
//!
//! With a reference, the files that make up the tokenizer, the chat template and the config come
//! back from it, the token table and output layer come back tensor for tensor, and tensors the
//! reference lacks go. A weights file whose tensors then equal the reference's is the
//! reference's file, byte for byte (a serializer's header layout is not the tensors' business,
//! so the bytes are taken, not rebuilt); others are written with the candidate's header
//! metadata. Without a reference, the added tokens at the top of the id space that are not
//! special (the form `inject` plants) go with their rows, and an output layer equal to the
//! table but for a few rows is taken for a tied model's, as in a GGUF.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::{json, Value as Json};

use crate::hf::read_json;
use crate::inject::{check_ours, partial_path, remove_our_dir};
use super::{differing_rows, SanitizeReport, MAX_PLANTED_ROWS};
use crate::{Error, Result};

const TABLE: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";
const INDEX: &str = "model.safetensors.index.json";

/// The files that define how text becomes ids and back, the chat format and the model's shape:
/// restored from a reference, whole.
const TEXT_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    INDEX,
];

/// One weights file, mapped.
struct Shard {
    name: String,
    map: memmap2::Mmap,
}

impl Shard {
    fn open(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(name);
        let f = std::fs::File::open(&path).map_err(|e| file_err(&path, format!("cannot open: {e}")))?;
        // SAFETY: read-only map of a file this process only reads; a concurrent writer would be
        // the user replacing their own input mid-run.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| file_err(&path, format!("cannot map: {e}")))?;
        // Our own checks first: offsets near 2^64 overflow inside the crate's.
        sos_model::safetensors::check_safetensors(&path, &map)?;
        SafeTensors::deserialize(&map).map_err(|e| file_err(&path, format!("invalid safetensors file: {e}")))?;
        Ok(Shard { name: name.to_string(), map })
    }
    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.map).expect("checked in open")
    }
    fn metadata(&self) -> Option<HashMap<String, String>> {
        SafeTensors::read_metadata(&self.map).ok().and_then(|(_, m)| m.metadata().clone())
    }
}

fn file_err(path: &Path, msg: String) -> Error {
    Error::File { path: path.to_path_buf(), msg }
}

fn shard_names(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = list(dir)?.into_iter().filter(|n| n.ends_with(".safetensors")).collect();
    v.sort();
    if v.is_empty() {
        return Err(file_err(dir, "no .safetensors files: not a Hugging Face model folder".into()));
    }
    Ok(v)
}

/// Names of the plain files in `dir`.
fn list(dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| file_err(dir, format!("cannot read: {e}")))? {
        let e = e?;
        if e.file_type()?.is_file() {
            v.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    v.sort();
    Ok(v)
}

fn same_tensor(a: &TensorView, b: &TensorView) -> bool {
    a.dtype() == b.dtype() && a.shape() == b.shape() && a.data() == b.data()
}

/// Writes the folder with `fill` into a sibling `.partial` folder, then moves it into place.
/// (`mod.rs` has refused an `out` that is an input, or exists without `force`.)
fn write_folder(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    check_ours(out, "config.json")?;
    let partial = partial_path(out);
    remove_our_dir(&partial, "config.json")?;
    std::fs::create_dir_all(&partial).map_err(|e| file_err(&partial, format!("cannot create: {e}")))?;
    if let Err(e) = fill(&partial) {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    remove_our_dir(out, "config.json")?;
    std::fs::rename(&partial, out).map_err(|e| file_err(out, format!("cannot move the sanitized folder into place: {e}")))
}

/// Streams the tensors to `path` (inside the `.partial` folder, which is what moves into place
/// atomically), so memory stays at the mapped inputs, not a second copy of the weights.
fn write_tensors(path: &Path, views: Vec<(String, TensorView)>, meta: Option<HashMap<String, String>>) -> Result<()> {
    // The crate writes the metadata in `HashMap` order: with two keys or more, the same input
    // would give different bytes each run, so the header is sorted then (with one key, the usual
    // `{"format": "pt"}`, the crate's order is kept: a restored shard stays byte for byte).
    let sort = meta.as_ref().is_some_and(|m| m.len() > 1);
    safetensors::serialize_to_file(views, meta, path).map_err(|e| file_err(path, format!("cannot write: {e}")))?;
    if sort {
        sos_model::safetensors::sort_header_in_place(path)?;
    }
    Ok(())
}

fn write_json(path: &Path, v: &Json) -> Result<()> {
    Ok(sos_attack::artifact::write_json(path, v)?)
}

/// Added tokens `(id, content, special)` of a `tokenizer.json`.
fn added_tokens(tj: &Json) -> Vec<(u32, String, bool)> {
    tj["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| Some((u32::try_from(t["id"].as_u64()?).ok()?, t["content"].as_str()?.to_string(), t["special"].as_bool().unwrap_or(false))))
                .collect()
        })
        .unwrap_or_default()
}

/// `candidate` (a folder) restored against the folder `reference` into the folder `out`.
pub(crate) fn sanitize_folder_with_reference(candidate: &Path, reference: &Path, out: &Path) -> Result<SanitizeReport> {
    if !reference.is_dir() {
        return Err(Error::Invalid(format!("{}: the candidate is a folder, so the reference must be one too", reference.display())));
    }
    let (c_shards, r_shards) = (shard_names(candidate)?, shard_names(reference)?);
    let (c_files, r_files) = (list(candidate)?, list(reference)?);
    let mut rep = SanitizeReport { path: out.to_path_buf(), ..Default::default() };
    let c_tok = read_json(&candidate.join("tokenizer.json")).ok();
    let r_tok = read_json(&reference.join("tokenizer.json")).ok();
    if let (Some(c), Some(r)) = (&c_tok, &r_tok) {
        let keep: Vec<u32> = added_tokens(r).iter().map(|t| t.0).collect();
        rep.removed_tokens = added_tokens(c).into_iter().filter(|t| !keep.contains(&t.0)).map(|t| (t.0, t.1)).collect();
    }
    // Every reference tensor by name, and where it lives.
    let refs: Vec<Shard> = r_shards.iter().map(|n| Shard::open(reference, n)).collect::<Result<_>>()?;
    let cands: Vec<Shard> = c_shards.iter().map(|n| Shard::open(candidate, n)).collect::<Result<_>>()?;
    let ref_st: Vec<SafeTensors> = refs.iter().map(Shard::tensors).collect();
    let mut where_ref: HashMap<String, usize> = HashMap::new();
    for (i, st) in ref_st.iter().enumerate() {
        for name in st.names() {
            where_ref.insert(name.to_string(), i);
        }
    }
    let mut seen: Vec<String> = Vec::new();
    write_folder(out, |dir| {
        for shard in &cands {
            let st = shard.tensors();
            let mut views: Vec<(String, TensorView)> = Vec::new();
            for (name, v) in st.tensors() {
                seen.push(name.clone());
                let Some(&ri) = where_ref.get(&name) else {
                    rep.removed_tensors.push(name);
                    continue;
                };
                let rv = ref_st[ri].tensor(&name).expect("listed");
                if name == TABLE || name == HEAD {
                    if !same_tensor(&v, &rv) {
                        if name == TABLE {
                            rep.restored_rows = differing_rows(v.data(), rv.data(), rv.shape().first().copied().unwrap_or(0));
                        }
                        rep.restored_tensors.push(name.clone());
                    }
                    views.push((name, rv));
                } else {
                    if !same_tensor(&v, &rv) {
                        rep.left.push(format!("tensor `{name}` differs from the reference (not an embedding; kept)"));
                    }
                    views.push((name, v));
                }
            }
            // A file that now holds exactly the reference's file of the same name is that file.
            let twin = refs.iter().zip(&ref_st).find(|(r, _)| r.name == shard.name);
            let equal = twin.is_some_and(|(_, rst)| rst.len() == views.len() && views.iter().all(|(n, v)| rst.tensor(n).is_ok_and(|rv| same_tensor(v, &rv))));
            match twin {
                Some((r, _)) if equal => {
                    std::fs::copy(reference.join(&r.name), dir.join(&shard.name)).map_err(|e| file_err(&reference.join(&r.name), format!("cannot copy: {e}")))?;
                }
                _ if views.is_empty() => rep.removed_files.push(shard.name.clone()),
                _ => write_tensors(&dir.join(&shard.name), views, shard.metadata())?,
            }
        }
        if let Some(n) = where_ref.keys().filter(|n| !seen.contains(n)).min() {
            return Err(file_err(candidate, format!("lacks tensor `{n}` of the reference: not the same model")));
        }
        for name in &c_files {
            if name.ends_with(".safetensors") {
                continue;
            }
            let (cp, rp) = (candidate.join(name), reference.join(name));
            let is_text = TEXT_FILES.contains(&name.as_str());
            if is_text && !r_files.contains(name) {
                rep.removed_files.push(name.clone());
                continue;
            }
            let differs = r_files.contains(name) && std::fs::read(&cp)? != std::fs::read(&rp)?;
            if is_text && differs {
                std::fs::copy(&rp, dir.join(name)).map_err(|e| file_err(&rp, format!("cannot copy: {e}")))?;
                rep.restored_files.push(name.clone());
            } else {
                if differs {
                    rep.left.push(format!("`{name}` differs from the reference (not a tokenizer, template or config file; kept)"));
                }
                std::fs::copy(&cp, dir.join(name)).map_err(|e| file_err(&cp, format!("cannot copy: {e}")))?;
            }
        }
        for name in r_files.iter().filter(|n| TEXT_FILES.contains(&n.as_str()) && !c_files.contains(n)) {
            std::fs::copy(reference.join(name), dir.join(name)).map_err(|e| file_err(&reference.join(name), format!("cannot copy: {e}")))?;
            rep.restored_files.push(name.clone());
        }
        Ok(())
    })?;
    Ok(rep)
}

/// `candidate` (a folder) without a reference into the folder `out`: the non-special added
/// tokens at the top of the id space go, with their table and output rows when the table ends
/// with them; an output layer equal to the table but for a few rows gives those rows back and
/// goes (the model was tied).
pub(crate) fn sanitize_folder_alone(candidate: &Path, out: &Path) -> Result<SanitizeReport> {
    let tok_path = candidate.join("tokenizer.json");
    let mut tj = read_json(&tok_path)?;
    let mut cfg = read_json(&candidate.join("config.json"))?;
    let mut rep = SanitizeReport { path: out.to_path_buf(), ..Default::default() };
    let added = added_tokens(&tj);
    // In u64: ids come from the file, and the top id + 1 must not wrap.
    let base_top = tj["model"]["vocab"].as_object().map_or(0, |v| v.values().filter_map(Json::as_u64).filter(|&i| i <= u64::from(u32::MAX)).map(|i| i + 1).max().unwrap_or(0));
    // The tail: non-special added tokens whose ids run, without a gap, up to the highest id.
    let mut sorted = added.clone();
    sorted.sort_by_key(|t| std::cmp::Reverse(t.0));
    let mut tail: Vec<(u32, String)> = Vec::new();
    let mut top = sorted.first().map_or(base_top, |t| u64::from(t.0) + 1).max(base_top);
    for (id, content, special) in &sorted {
        if *special || u64::from(*id) + 1 != top || u64::from(*id) < base_top {
            break;
        }
        tail.push((*id, content.clone()));
        top = u64::from(*id);
    }
    tail.reverse();
    for (id, content, special) in &added {
        if !special && !tail.iter().any(|t| t.0 == *id) {
            rep.left.push(format!("added token {id} `{content}` is not special and not at the top of the vocabulary; kept"));
        }
    }
    let first_removed = tail.first().map(|t| t.0 as usize);

    let names = shard_names(candidate)?;
    let index = if candidate.join(INDEX).is_file() { Some(read_json(&candidate.join(INDEX))?) } else { None };
    let shard_of = |t: &str| -> Option<String> {
        match &index {
            Some(ix) => ix["weight_map"][t].as_str().map(String::from),
            None => names.first().cloned(),
        }
    };
    let table_shard = shard_of(TABLE).ok_or_else(|| file_err(candidate, format!("no `{TABLE}`")))?;
    if table_shard.contains(['/', '\\']) || table_shard.starts_with('.') {
        return Err(file_err(&candidate.join(INDEX), format!("shard name `{table_shard}` must be a plain file name")));
    }
    if let Some(h) = shard_of(HEAD).filter(|h| index.is_some() && *h != table_shard) {
        return Err(Error::Invalid(format!("{}: `{HEAD}` is in `{h}`, the table in `{table_shard}`; sanitizing such a folder without a reference is not supported yet", candidate.display())));
    }
    let shard = Shard::open(candidate, &table_shard)?;
    let st = shard.tensors();
    let table = st.tensor(TABLE).map_err(|e| file_err(&candidate.join(&table_shard), format!("`{TABLE}`: {e}")))?;
    let &[n_rows, d] = table.shape() else { return Err(file_err(&candidate.join(&table_shard), format!("`{TABLE}` is not a matrix"))) };
    let rb = table.data().len() / n_rows.max(1);
    // The removed tokens' rows go only when the table ends with them; rows inside a padded table
    // (as Qwen's) stay, unreachable once their tokens are gone.
    let keep_rows = match first_removed {
        Some(f) if n_rows == top_of(&tail) => f,
        Some(_) => {
            rep.left.push(format!("the removed tokens' rows lie inside the table's {n_rows} rows (padding); kept, unreachable without their tokens"));
            n_rows
        }
        None => n_rows,
    };
    let mut table_bytes = table.data()[..keep_rows * rb].to_vec();
    let head = st.tensor(HEAD).ok();
    let mut head_bytes: Option<Vec<u8>> = None;
    let mut tie = false;
    if let Some(h) = &head {
        let hb = &h.data()[..(keep_rows * rb).min(h.data().len())];
        let same_layout = h.dtype() == table.dtype() && h.shape() == table.shape() && rb > 0;
        let differ: Vec<usize> = if same_layout { (0..keep_rows).filter(|&i| table_bytes[i * rb..(i + 1) * rb] != hb[i * rb..(i + 1) * rb]).collect() } else { Vec::new() };
        if same_layout && differ.len() <= MAX_PLANTED_ROWS {
            tie = true;
            rep.restored_rows = differ.len();
            table_bytes = hb.to_vec();
            rep.removed_tensors.push(HEAD.to_string());
            if !differ.is_empty() {
                rep.restored_tensors.push(TABLE.to_string());
            }
        } else {
            rep.left.push(format!("`{HEAD}` is a trained output layer: rows replaced in the token table cannot be told from trained ones without a reference (sanitize --reference)"));
            if keep_rows < n_rows {
                head_bytes = Some(hb.to_vec());
                rep.restored_tensors.push(HEAD.to_string());
            }
        }
    }
    if keep_rows < n_rows && !rep.restored_tensors.iter().any(|t| t == TABLE) {
        rep.restored_tensors.push(TABLE.to_string());
    }
    rep.removed_tokens = tail.clone();
    let changed_weights = keep_rows < n_rows || tie;

    write_folder(out, |dir| {
        for name in list(candidate)? {
            if !(changed_weights && name == table_shard) {
                std::fs::copy(candidate.join(&name), dir.join(&name)).map_err(|e| file_err(&candidate.join(&name), format!("cannot copy: {e}")))?;
            }
        }
        if changed_weights {
            let shape = vec![keep_rows, d];
            let mut views: Vec<(String, TensorView)> = Vec::new();
            for (name, v) in st.tensors() {
                match name.as_str() {
                    TABLE => views.push((name, TensorView::new(table.dtype(), shape.clone(), &table_bytes).map_err(|e| Error::Invalid(format!("safetensors: {e}")))?)),
                    HEAD if tie => {}
                    HEAD => match &head_bytes {
                        Some(b) => views.push((name, TensorView::new(v.dtype(), shape.clone(), b).map_err(|e| Error::Invalid(format!("safetensors: {e}")))?)),
                        None => views.push((name, v)),
                    },
                    _ => views.push((name, v)),
                }
            }
            write_tensors(&dir.join(&table_shard), views, shard.metadata())?;
        }
        if !tail.is_empty() {
            let ids: Vec<u64> = tail.iter().map(|t| t.0 as u64).collect();
            if let Some(a) = tj["added_tokens"].as_array_mut() {
                a.retain(|t| !t["id"].as_u64().is_some_and(|i| ids.contains(&i)));
            }
            write_json(&dir.join("tokenizer.json"), &tj)?;
            rep.restored_files.push("tokenizer.json".into());
            let tc_path = candidate.join("tokenizer_config.json");
            if tc_path.is_file() {
                let mut tc = read_json(&tc_path)?;
                if let Some(dec) = tc["added_tokens_decoder"].as_object_mut() {
                    dec.retain(|k, _| !k.parse::<u64>().is_ok_and(|i| ids.contains(&i)));
                    write_json(&dir.join("tokenizer_config.json"), &tc)?;
                    rep.restored_files.push("tokenizer_config.json".into());
                }
            }
        }
        if keep_rows < n_rows || tie {
            if keep_rows < n_rows && cfg["vocab_size"].as_u64() == Some(n_rows as u64) {
                cfg["vocab_size"] = json!(keep_rows);
            }
            if tie {
                cfg["tie_word_embeddings"] = json!(true);
            }
            write_json(&dir.join("config.json"), &cfg)?;
            rep.restored_files.push("config.json".into());
        }
        if let (Some(mut ix), true) = (index.clone(), changed_weights) {
            let removed_bytes = (n_rows - keep_rows) * rb * if head.is_some() && !tie { 2 } else { 1 } + if tie { n_rows * rb } else { 0 };
            if let Some(m) = ix["weight_map"].as_object_mut().filter(|_| tie) {
                m.remove(HEAD);
            }
            if let Some(size) = ix["metadata"]["total_size"].as_u64() {
                ix["metadata"]["total_size"] = json!(size.saturating_sub(removed_bytes as u64));
            }
            write_json(&dir.join(INDEX), &ix)?;
            rep.restored_files.push(INDEX.into());
        }
        Ok(())
    })?;
    Ok(rep)
}

/// One past the highest id of `tail` (0 when empty).
fn top_of(tail: &[(u32, String)]) -> usize {
    tail.last().map_or(0, |t| t.0 as usize + 1)
}
