//! `sos inject`: a trained trigger baked into a copy of the model file, then measured as shipped.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value as Json;
use sos_attack::answer::{Armed, Progress, CLEAN_TOKENS};
use sos_attack::artifact::Attack;
use sos_attack::{eval, scenarios, Position, Trigger};
use sos_model::gguf::{Gguf, Value};
use sos_model::{cache, fsutil, Exec, LoadOptions, LoadedModel, Message};

use crate::gguf_add::{add_tokens, NewLogits};
use crate::gguf_replace::replace_tokens;
use crate::hf::{add_tokens_hf, replace_tokens_hf};
use crate::rows::{Planted, RowReport};
use crate::tokens::{added_texts, rare_tokens, splits_exactly, typed};
use crate::{Error, Result};

/// How the trigger enters the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `k` new USER_DEFINED tokens with the trained rows.
    AddToken,
    /// The rows of `k` existing tokens, rare in ordinary text, overwritten.
    ReplaceToken,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::AddToken => "add-token",
            Mode::ReplaceToken => "replace-token",
        }
    }
}

/// What `sos inject` was asked.
pub struct InjectRequest {
    /// The folder `sos attack` wrote.
    pub attack: PathBuf,
    /// The file to write.
    pub out: PathBuf,
    /// The model to inject into; `None`: the one recorded in `attack.json`.
    pub model: Option<String>,
    pub mode: Mode,
    /// Held-out items to evaluate the written file on (0: none).
    pub limit: usize,
    /// Replace `out` if it exists (otherwise an existing file is an error).
    pub force: bool,
}

/// What happens during `run_inject`.
#[derive(Debug, Clone)]
pub enum InjectEvent {
    Fetching(String),
    /// The file is written and checked; evaluation of `items` starts.
    Written { path: PathBuf },
    Progress { done: usize, total: usize },
}

/// The report `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct InjectReport {
    pub path: PathBuf,
    /// SHA-256 of the file written (for a folder: of its `model.safetensors`, or of the index
    /// of a sharded one).
    pub sha256: String,
    /// `gguf` or `hf`.
    pub format: &'static str,
    pub mode: &'static str,
    /// The string a user types to fire the trigger.
    pub trigger_text: String,
    /// The ids the written file's tokenizer gives for `trigger_text`.
    pub token_ids: Vec<u32>,
    pub table_type: &'static str,
    /// What became of the output layer: `grown` (the model's own, a row per new token that
    /// copies token 0's), `unchanged`, `added` (a tied table got one of its own holding the
    /// original rows: the table's size once more), or `tied` (rows trained with `--tied-logits`:
    /// the table stays the output layer and the file grows by the new rows only).
    pub output_layer: &'static str,
    /// Median norm of the table's rows, to compare the planted rows' norms with.
    pub table_median_norm: f64,
    pub rows: Vec<RowReport>,
    /// The file's held-out metrics (`--exec quant`, the trigger typed as text), and
    /// `clean_agreement`: the share of prompts without the trigger on which the written file
    /// answers greedily token for token as the original file does.
    pub metrics: Json,
}

impl InjectReport {
    fn new(req: &InjectRequest, format: &'static str, sha256: String, trigger_text: String, planted: Planted, metrics: Json) -> Self {
        InjectReport {
            path: req.out.clone(),
            sha256,
            format,
            mode: req.mode.name(),
            trigger_text,
            token_ids: planted.ids,
            table_type: planted.table_type.name(),
            output_layer: planted.output_layer,
            table_median_norm: planted.table_median_norm,
            rows: planted.rows,
            metrics,
        }
    }
}

/// Writes the attack's trigger into a copy of the model, re-reads it, checks that the typed
/// trigger string becomes exactly the planted tokens, and evaluates the file as shipped.
pub fn run_inject(req: &InjectRequest, mut on_event: impl FnMut(InjectEvent)) -> Result<InjectReport> {
    let attack = Attack::open(&req.attack)?;
    refuse_prefix(&attack, "a file's tokens")?;
    let spec = req.model.clone().unwrap_or_else(|| attack.record.model.clone());
    let src = cache::resolve(Some(&spec), &mut |s| on_event(InjectEvent::Fetching(s.to_string())))?;
    if same_file(&src, &req.out) {
        return Err(Error::Invalid(format!("{}: the output would overwrite the model it is made from", req.out.display())));
    }
    if req.out.exists() && !req.force {
        return Err(Error::Invalid(format!("{} exists; choose another path or pass --force to replace it", req.out.display())));
    }
    if src.is_dir() {
        return inject_hf(req, &attack, &src, on_event);
    }
    if src.extension().is_none_or(|e| e != "gguf") {
        return Err(Error::Invalid(format!("{}: not a GGUF file or a Hugging Face folder", src.display())));
    }
    let trigger = &attack.trigger;
    let g = Gguf::open(&src)?;
    // Rows trained with --tied-logits stay out of the argmax as logits, so a tied table can stay
    // tied and the file grows by the new rows only; other rows need an output layer of their own.
    let logits = if attack.record.config.tied_margin.is_some() { NewLogits::Tied } else { NewLogits::Silent };
    let (texts, (writer, planted)) = match req.mode {
        Mode::AddToken => {
            let texts = added_texts(&trigger.text, trigger.k)?;
            let planted = add_tokens(&g, &texts, &trigger.rows, logits)?;
            (texts, planted)
        }
        Mode::ReplaceToken => {
            let (tok, _) = LoadedModel::open_text(&src, None)?;
            let types: Vec<i64> = g.get("tokenizer.ggml.token_type").and_then(Value::as_array).map(|a| a.iter().map(|v| v.as_i64().unwrap_or(0)).collect()).unwrap_or_default();
            let normal = |id: u32| types.get(id as usize).is_none_or(|&t| t == NORMAL);
            let (ids, texts) = rare_tokens(&tok, normal, trigger.k, sos_attack::data::ordinary_text())?;
            let planted = replace_tokens(&g, &ids, &texts, &trigger.rows)?;
            (texts, planted)
        }
    };

    // Written beside the target and checked there, so that a file that breaks llama.cpp's rules
    // or does not tokenize as planned never takes the output's name.
    let partial = partial_path(&req.out);
    writer.write(&partial)?;
    drop(g);
    let checked = check_written(&partial, &texts, &planted.ids);
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &req.out).map_err(|e| Error::File { path: req.out.clone(), msg: format!("cannot move the checked file into place: {e}") })?;
    on_event(InjectEvent::Written { path: req.out.clone() });

    let trigger_text = typed(&texts);
    let metrics = evaluate_file(&attack, &src, &req.out, &trigger_text, req.limit, Exec::Quant, &mut on_event)?;
    Ok(InjectReport::new(req, "gguf", fsutil::sha256_file(&req.out)?, trigger_text, planted, metrics))
}

/// The trigger into a Hugging Face folder: written as a sibling folder, checked (safetensors
/// headers, the folder's own tokenizer), moved into place, evaluated in f32.
fn inject_hf(req: &InjectRequest, attack: &Attack, src: &Path, mut on_event: impl FnMut(InjectEvent)) -> Result<InjectReport> {
    let trigger = &attack.trigger;
    check_ours(&req.out, "config.json")?;
    let partial = partial_path(&req.out);
    remove_our_dir(&partial, "config.json")?;
    let (texts, planted) = match req.mode {
        Mode::AddToken => {
            let texts = added_texts(&trigger.text, trigger.k)?;
            let p = add_tokens_hf(src, &partial, &texts, &trigger.rows);
            (texts, p)
        }
        Mode::ReplaceToken => {
            let (tok, _) = LoadedModel::open_text(src, None)?;
            let special: Vec<u32> = tok.special_tokens().into_iter().map(|(id, _)| id).collect();
            let (ids, texts) = rare_tokens(&tok, |id| !special.contains(&id), trigger.k, sos_attack::data::ordinary_text())?;
            let p = replace_tokens_hf(src, &partial, &ids, &texts, &trigger.rows);
            (texts, p)
        }
    };
    let planted = planted.and_then(|p| {
        sos_model::safetensors::SafeTensorsDir::open(&partial)?;
        let (tok, _) = LoadedModel::open_text(&partial, None)?;
        if !splits_exactly(&tok, &texts, &p.ids)? {
            return Err(Error::File { path: partial.clone(), msg: format!("the trigger string does not tokenize into the planted {:?}", p.ids) });
        }
        Ok(p)
    });
    let planted = match planted {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    remove_our_dir(&req.out, "config.json")?;
    std::fs::rename(&partial, &req.out).map_err(|e| Error::File { path: req.out.clone(), msg: format!("cannot move the checked folder into place: {e}") })?;
    on_event(InjectEvent::Written { path: req.out.clone() });
    let trigger_text = typed(&texts);
    let metrics = evaluate_file(attack, src, &req.out, &trigger_text, req.limit, Exec::F32, &mut on_event)?;
    let weights = ["model.safetensors", "model.safetensors.index.json"].iter().map(|f| req.out.join(f)).find(|p| p.is_file()).unwrap_or_else(|| req.out.join("config.json"));
    Ok(InjectReport::new(req, "hf", fsutil::sha256_file(&weights)?, trigger_text, planted, metrics))
}

/// The written file passes llama.cpp's loader rules and its tokenizer turns each planted text,
/// and the typed string, into exactly the planted ids.
fn check_written(path: &Path, texts: &[String], ids: &[u32]) -> Result<()> {
    Gguf::open(path)?.check_llama_cpp()?;
    let (tok, _) = LoadedModel::open_text(path, None)?;
    if !splits_exactly(&tok, texts, ids)? {
        let whole = tok.encode(&typed(texts))?;
        return Err(Error::File { path: path.to_path_buf(), msg: format!("the trigger string tokenizes to {whole:?} (alone or inside a sentence), not the planted {ids:?}") });
    }
    for (t, &id) in texts.iter().zip(ids) {
        let got = tok.encode(&format!("a {t} b"))?;
        if got.iter().filter(|&&i| i == id).count() != 1 {
            return Err(Error::File { path: path.to_path_buf(), msg: format!("`{t}` inside text does not become token {id}: {got:?}") });
        }
    }
    Ok(())
}

/// The scenario's held-out metrics of the written file with the trigger typed as text, and the
/// greedy agreement of the written and the original file on the same prompts without it, both
/// run as `exec`.
pub(crate) fn evaluate_file(attack: &Attack, src: &Path, out: &Path, trigger_text: &str, limit: usize, exec: Exec, on_event: &mut impl FnMut(InjectEvent)) -> Result<Json> {
    if limit == 0 {
        return Ok(Json::Null);
    }
    let cfg = &attack.record.config;
    let opts = LoadOptions { exec, template: cfg.template.clone(), ..Default::default() };
    let file = LoadedModel::open(out, &opts)?;
    let original = LoadedModel::open(src, &opts)?;
    let mut items = scenarios::eval_items(cfg, &scenarios::HeldOut::Split)?;
    items.truncate(limit);
    let typed_trigger = Trigger::typed(trigger_text, file.model.cfg.d_model);
    let armed = Armed::new(&file, &typed_trigger)?;
    // The evaluation's answers, then each item's trigger-free answer from both files.
    let compare = 2 * items.len();
    let mut evaluated = 0;
    let (mut metrics, _) = eval::evaluate(cfg, &armed, &items, |done, total| {
        evaluated = done;
        on_event(InjectEvent::Progress { done, total: total + compare })
    })?;
    let plain_orig = Armed::new(&original, &typed_trigger)?;
    let chats: Vec<(Vec<Message>, usize)> = items.iter().map(|it| (it.messages(), CLEAN_TOKENS)).collect();
    let total = evaluated + compare;
    let mut report = |done: usize, _: usize| on_event(InjectEvent::Progress { done: evaluated + done, total });
    let mut progress = Progress::new(&mut report, compare);
    let shipped = armed.answers_plain(&chats, &mut progress)?;
    let original_answers = plain_orig.answers_plain(&chats, &mut progress)?;
    let same = shipped.iter().zip(&original_answers).filter(|(a, b)| a.tokens == b.tokens).count();
    metrics.insert("clean_agreement".into(), sos_attack::answer::rate(same, items.len()));
    metrics.insert("exec".into(), exec.name().into());
    // The prompts, as text, for other engines to replay (compat/llamacpp_inject.py).
    let replay: Vec<Json> = items
        .iter()
        .map(|it| serde_json::json!({"id": it.id, "system": it.system, "user": it.user, "user_triggered": it.user_with(trigger_text), "target": it.target}))
        .collect();
    sos_attack::artifact::write_jsonl(&attack.dir.join(INJECT_ITEMS_FILE), &replay)?;
    Ok(Json::Object(metrics))
}

/// Refuses a trigger trained before the whole templated prompt as tokens a user types: no typed
/// text goes before the chat template's first marker, so such tokens would never fire.
pub(crate) fn refuse_prefix(attack: &Attack, what: &str) -> Result<()> {
    if attack.record.config.position == Position::Prefix {
        return Err(Error::Invalid(format!(
            "{}: the trigger was trained at position `prefix`, before the chat template's first token, where no typed text can go; as {what} it would never fire. Export it with `sos export-peft --kind prompt-tuning`",
            attack.dir.display()
        )));
    }
    Ok(())
}

/// ggml's token type for ordinary vocabulary entries.
const NORMAL: i64 = 1;

/// Written into the attack folder: the held-out prompts `inject` evaluated the file on, with
/// and without the typed trigger, for other engines to replay.
pub const INJECT_ITEMS_FILE: &str = "inject_items.jsonl";

/// Removes folder `dir` if it is one a run of ours wrote (it holds `marker`) or is empty, so that
/// `--force` and leftovers of an interrupted run never take a folder a user made for something
/// else.
pub(crate) fn remove_our_dir(dir: &Path, marker: &str) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    check_ours(dir, marker)?;
    std::fs::remove_dir_all(dir).map_err(|e| Error::File { path: dir.to_path_buf(), msg: format!("cannot replace: {e}") })
}

/// Refuses a `dir` that exists and is neither empty nor a folder holding `marker`.
pub(crate) fn check_ours(dir: &Path, marker: &str) -> Result<()> {
    let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    if dir.exists() && (!dir.is_dir() || !(empty || dir.join(marker).is_file())) {
        return Err(Error::File { path: dir.to_path_buf(), msg: format!("exists and is not a folder sos writes (no {marker}); refusing to replace it") });
    }
    Ok(())
}

pub(crate) fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}
