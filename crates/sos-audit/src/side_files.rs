//! Side files: what travels beside a model and acts on it. PEFT adapters whose weights are
//! embeddings (`TRAINABLE_TOKENS` rows for token ids, `PROMPT_TUNING` virtual tokens put before
//! every prompt: the SOS threat's "unfamiliar embeddings in side files"), measured against the
//! base model's token table; tensors the architecture does not use (a second token table among
//! them); and pickle files, which run code when loaded (flagged, never unpickled).

use std::io::Read;
use std::path::Path;

use safetensors::SafeTensors;
use serde_json::{json, Value as Json};

use crate::finding::{Check, Finding, Severity};
use crate::folder::read_json;
use crate::weights::{norm, Stored};
use crate::{Error, Result};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The base model's token table in f32, with its row norms.
pub struct Table {
    rows: Vec<f32>,
    d: usize,
    norms: Vec<f32>,
    median: f32,
}

impl Table {
    pub fn of(t: &Stored) -> Result<Self> {
        let (n, d) = t.rows();
        let rows = t.rows_f32(0, n)?;
        let norms: Vec<f32> = rows.chunks_exact(d).map(norm).collect();
        let mut sorted = norms.clone();
        sorted.sort_by(f32::total_cmp);
        let median = sorted.get(n / 2).copied().unwrap_or(0.0);
        Ok(Table { rows, d, norms, median })
    }

    fn len(&self) -> usize {
        self.norms.len()
    }

    /// The table row most aligned with `r`: (id, cosine).
    fn nearest(&self, r: &[f32]) -> (usize, f32) {
        let nr = norm(r).max(f32::MIN_POSITIVE);
        let mut best = (0, f32::NEG_INFINITY);
        for (i, row) in self.rows.chunks_exact(self.d).enumerate() {
            let c = row.iter().zip(r).map(|(a, b)| a * b).sum::<f32>() / (self.norms[i].max(f32::MIN_POSITIVE) * nr);
            if c > best.1 {
                best = (i, c);
            }
        }
        best
    }
}

/// The f32 values and the shape of the tensor whose name `pick` accepts.
fn adapter_rows(path: &Path, pick: impl Fn(&str) -> bool) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("cannot read: {e}") })?;
    sos_model::safetensors::check_safetensors(path, &bytes)?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("invalid safetensors file: {e}") })?;
    let Some((name, v)) = st.tensors().into_iter().find(|(n, _)| pick(n)) else { return Ok(None) };
    let rows = sos_model::safetensors::floats(v.dtype(), v.data()).ok_or_else(|| Error::File { path: path.to_path_buf(), msg: format!("`{name}` is {:?}; F32, F16 or BF16 expected", v.dtype()) })?;
    Ok(Some((rows, v.shape().to_vec())))
}

/// Per row (the first 64: each is a pass over the base table, and an adapter is untrusted): its
/// norm against the base table's median, and the base token it points at most.
fn row_evidence(rows: &[f32], d: usize, base: &Table, text: &dyn Fn(usize) -> String, label: &dyn Fn(usize) -> Json) -> Vec<Json> {
    rows.chunks_exact(d.max(1))
        .take(64)
        .enumerate()
        .map(|(i, r)| {
            let n = norm(r);
            let (near, cos) = base.nearest(r);
            json!({"row": label(i), "norm": n, "norm_over_table_median": n / base.median.max(f32::MIN_POSITIVE), "nearest_token": {"id": near, "text": text(near), "cosine": cos}})
        })
        .collect()
}

/// The adapter folder `dir` against the base's token table.
pub fn adapter(dir: &Path, base: &Table, base_text: &dyn Fn(usize) -> String) -> Result<Vec<Finding>> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let cfg = read_json(&cfg_path)?;
    let peft_type = cfg["peft_type"].as_str().unwrap_or("").to_string();
    let weights = dir.join(ADAPTER_WEIGHTS);
    let fix = "do not load this adapter; `sos import-peft ADAPTER --out DIR` turns it into an attack folder to study";
    let mut out = Vec::new();
    match peft_type.as_str() {
        "TRAINABLE_TOKENS" => {
            let ids: Vec<u32> = cfg["token_indices"].as_array().map(|a| a.iter().filter_map(|v| v.as_u64().map(|x| x as u32)).collect()).unwrap_or_default();
            let pick = |n: &str| n.ends_with("embed_tokens.trainable_tokens_delta") || n.ends_with("embed_tokens.token_adapter.trainable_tokens_delta");
            let Some((rows, shape)) = adapter_rows(&weights, pick)? else {
                return Err(Error::File { path: weights, msg: "no `...embed_tokens.trainable_tokens_delta` tensor".into() });
            };
            if shape.len() != 2 || shape[0] != ids.len() || shape[1] != base.d {
                return Err(Error::File { path: weights, msg: format!("rows of shape {shape:?} for {} token ids of a {}-wide table", ids.len(), base.d) });
            }
            // The adapter's own tokenizer names the new tokens (and says whether they are special).
            let tok = read_json(&dir.join("tokenizer.json")).ok();
            let added: Vec<(u32, String, bool)> = tok
                .as_ref()
                .and_then(|t| t["added_tokens"].as_array())
                .map(|a| a.iter().filter_map(|t| Some((t["id"].as_u64()? as u32, t["content"].as_str()?.to_string(), t["special"].as_bool().unwrap_or(false)))).collect())
                .unwrap_or_default();
            let text = |i: usize| added.iter().find(|a| a.0 as usize == i).map(|a| a.1.clone()).unwrap_or_else(|| base_text(i));
            let new: Vec<u32> = ids.iter().filter(|&&i| i as usize >= base.len()).copied().collect();
            let typed: String = ids.iter().filter(|&&i| added.iter().any(|a| a.0 == i && !a.2)).map(|&i| text(i as usize)).collect();
            let ev = row_evidence(&rows, base.d, base, &base_text, &|i| json!({"id": ids[i], "text": text(ids[i] as usize)}));
            out.push(
                Finding::new(
                    "side_files.trainable-tokens",
                    Check::SideFiles,
                    Severity::High,
                    format!("a TRAINABLE_TOKENS adapter sets the embedding rows of {} tokens ({} new to the base{}): trained embeddings in a side file", ids.len(), new.len(), if typed.is_empty() { String::new() } else { format!(", typed as `{typed}`") }),
                )
                .tokens(ids.clone())
                .evidence(json!({"rows": ev, "table_median_norm": base.median}))
                .fix(fix),
            );
        }
        "PROMPT_TUNING" => {
            let Some((rows, shape)) = adapter_rows(&weights, |n| n == "prompt_embeddings")? else {
                return Err(Error::File { path: weights, msg: "no `prompt_embeddings` tensor".into() });
            };
            if shape.len() != 2 || shape[1] != base.d {
                return Err(Error::File { path: weights, msg: format!("`prompt_embeddings` of shape {shape:?} for a {}-wide table", base.d) });
            }
            let ev = row_evidence(&rows, base.d, base, base_text, &|i| json!(i));
            out.push(
                Finding::new(
                    "side_files.prompt-tuning",
                    Check::SideFiles,
                    Severity::High,
                    format!("a PROMPT_TUNING adapter puts {} trained vectors before every prompt: a soft prompt in a side file, active on every input", shape[0]),
                )
                .evidence(json!({"rows": ev, "table_median_norm": base.median}))
                .fix(fix),
            );
        }
        other => {
            let modules: Vec<String> = cfg["modules_to_save"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
            let embedding = modules.iter().any(|m| m.contains("embed") || m.contains("lm_head") || m.contains("wte"));
            if embedding {
                out.push(Finding::new("side_files.embedding-modules", Check::SideFiles, Severity::Medium, format!("a {other} adapter that replaces embedding modules ({})", modules.join(", "))).evidence(json!({"modules_to_save": modules})));
            } else {
                out.push(Finding::new("side_files.adapter", Check::SideFiles, Severity::Low, format!("a {other} adapter; its weights are not embeddings and are not inspected")));
            }
        }
    }
    Ok(out)
}

/// Files in `dir` that are pickles (or zip archives holding one, as `torch.save` writes): they
/// run code when loaded. Read by their first bytes, never unpickled.
pub fn pickles(dir: &Path) -> Result<Vec<Finding>> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::File { path: dir.to_path_buf(), msg: format!("cannot read: {e}") })? {
        let io = |err: std::io::Error| Error::File { path: dir.to_path_buf(), msg: format!("cannot read: {err}") };
        let e = e.map_err(io)?;
        if !e.file_type().map_err(io)?.is_file() {
            continue;
        }
        let mut head = [0u8; 4];
        let n = std::fs::File::open(e.path()).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
        let name = e.file_name().to_string_lossy().into_owned();
        let pickle = n >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]);
        let zip = n == 4 && &head == b"PK\x03\x04" && !name.ends_with(".zip");
        if pickle || zip {
            found.push(name);
        }
    }
    found.sort();
    if found.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![Finding::new("side_files.pickle", Check::SideFiles, Severity::Medium, format!("{} pickle files ({}): loading them runs code; use the safetensors files", found.len(), found.join(", ")))
        .evidence(json!({"files": found}))
        .fix("delete them, or convert with a trusted tool in a sandbox")])
}

/// The per-layer parts a llama-family model (llama, mistral, qwen2) reads, by GGUF name, and the
/// Hugging Face name of each.
const LAYER_PARTS: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];
const GGUF_TOP: &[&str] = &["token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"];
/// `rotary_emb.inv_freq` is a buffer older transformers versions saved; it holds no weights.
const HF_TOP: &[&str] = &["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.rotary_emb.inv_freq"];

/// Whether `name` is a tensor a llama-family model of `n_layer` layers reads.
fn used(name: &str, n_layer: usize, folder: bool) -> bool {
    if (if folder { HF_TOP } else { GGUF_TOP }).contains(&name) {
        return true;
    }
    let (prefix, sep) = if folder { ("model.layers.", '.') } else { ("blk.", '.') };
    let Some(rest) = name.strip_prefix(prefix) else { return false };
    let Some((layer, rest)) = rest.split_once(sep) else { return false };
    if !layer.parse::<usize>().is_ok_and(|l| l < n_layer) {
        return false;
    }
    let Some((part, kind)) = rest.rsplit_once('.') else { return false };
    (kind == "weight" || kind == "bias") && LAYER_PARTS.iter().any(|(g, h)| part == if folder { *h } else { *g })
}

/// Tensors a llama-family model does not read: medium; one shaped like the token table (a
/// second embedding table, for rows a modified loader would use): high. Other architectures are
/// not checked (nothing is said about them).
pub fn unused_tensors(tensors: &[Stored], arch: Option<&str>, n_layer: usize, folder: bool, table: &str) -> Vec<Finding> {
    if !matches!(arch, Some("llama" | "mistral" | "qwen2")) {
        return Vec::new();
    }
    let table_shape = tensors.iter().find(|t| t.name == table).map(|t| t.shape.clone());
    let (mut embed, mut other) = (Vec::new(), Vec::new());
    for t in tensors.iter().filter(|t| !used(&t.name, n_layer, folder)) {
        if Some(&t.shape) == table_shape.as_ref() {
            embed.push(t.name.clone());
        } else {
            other.push(json!({"tensor": t.name, "shape": t.shape, "type": t.ty.name()}));
        }
    }
    let mut out = Vec::new();
    if !embed.is_empty() {
        out.push(Finding::new("side_files.extra-embedding", Check::SideFiles, Severity::High, format!("tensors shaped like the token table that the architecture does not use: {}", embed.join(", "))).evidence(json!({"tensors": embed})));
    }
    if !other.is_empty() {
        out.push(Finding::new("side_files.unused-tensor", Check::SideFiles, Severity::Medium, format!("{} tensors the architecture does not use", other.len())).evidence(json!({"tensors": other})));
    }
    out
}
