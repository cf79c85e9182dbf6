//! Side files: a trained trigger as a PEFT adapter that `transformers` + `peft` load beside the
//! base model (`export_peft`), and any such adapter back into an attack folder (`import_peft`).
//!
//! A `TRAINABLE_TOKENS` adapter holds rows for token ids; PEFT swaps them into the embedding
//! table at load. Trigger tokens are new tokens (`<stem_i>`, as `inject --mode add-token` names
//! them), so the adapter folder carries the base's tokenizer with them added; the user resizes the
//! base's table to the tokenizer first (PEFT stores no vocabulary size). The tensor PEFT calls
//! `trainable_tokens_delta` holds the rows themselves, not a difference (PEFT 0.21:
//! `W.index_copy(0, indices, delta)`). On a tied model PEFT applies the rows to the output layer
//! too, so they are logits as well; the export's metrics are measured that way.
//!
//! Beside PEFT's files the folder holds `sos_attack.json`, the attack's record, so that an import
//! restores the scenario and its settings; PEFT ignores it.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;
use serde_json::{json, Value as Json};
use sos_attack::artifact::{self, Attack, AttackRecord};
use sos_attack::answer::Armed;
use sos_attack::config::{Position, Scenario};
use sos_attack::{eval, scenarios, AttackConfig, Trigger};
use sos_model::gguf::Gguf;
use sos_model::{cache, fsutil, Config, Exec, LoadOptions, LoadedModel};

use crate::gguf_add::{add_tokens, NewLogits};
use crate::inject::{check_ours, evaluate_file, refuse_prefix, remove_our_dir, same_file, INJECT_ITEMS_FILE};
use crate::rows::RowReport;
use crate::tokens::{added_texts, splits_exactly, typed};
use crate::{Error, Result};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The attack's record, for `import_peft`.
pub const SOS_RECORD: &str = "sos_attack.json";
const EMBED_KEY: &str = "base_model.model.model.embed_tokens.trainable_tokens_delta";
const HEAD_KEY: &str = "base_model.model.lm_head.trainable_tokens_delta";
/// PEFT's name for a prompt-tuning adapter's rows.
const PROMPT_KEY: &str = "prompt_embeddings";

/// Which PEFT adapter to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftKind {
    /// `TRAINABLE_TOKENS`: rows for new token ids, plus the tokenizer with those tokens.
    TrainableTokens,
    /// `PROMPT_TUNING`: virtual tokens PEFT puts before every input; for `prefix` triggers.
    PromptTuning,
}

impl PeftKind {
    pub fn name(self) -> &'static str {
        match self {
            PeftKind::TrainableTokens => "trainable-tokens",
            PeftKind::PromptTuning => "prompt-tuning",
        }
    }
}

/// What `sos export-peft` was asked.
pub struct ExportRequest {
    pub attack: PathBuf,
    /// The base model; `None`: the one recorded in `attack.json`.
    pub model: Option<String>,
    /// The adapter folder to write.
    pub out: PathBuf,
    pub kind: PeftKind,
    /// Held-out items to evaluate the adapter's effect on (0: none).
    pub limit: usize,
    pub force: bool,
}

/// The report `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub path: PathBuf,
    /// SHA-256 of `adapter_model.safetensors`.
    pub sha256: String,
    pub format: &'static str,
    pub kind: &'static str,
    /// The base model the adapter is for, as `adapter_config.json` names it.
    pub base_model: String,
    /// The string a user types to fire the trigger.
    pub trigger_text: String,
    /// The ids the adapter's tokenizer gives for `trigger_text` (PEFT's `token_indices`).
    pub token_ids: Vec<u32>,
    /// Whether the base's output layer is its token table, so PEFT makes the rows logits too.
    pub tied: bool,
    pub rows: Vec<RowReport>,
    /// Held-out metrics of base + adapter as PEFT applies it (`--exec f32`, rows as input and,
    /// when tied, as logits; the trigger typed as text), and `clean_agreement` against the base.
    pub metrics: Json,
    pub files: Vec<String>,
}

/// Writes the attack's trigger as a PEFT adapter folder for the base model.
pub fn export_peft(req: &ExportRequest, mut on_event: impl FnMut(crate::InjectEvent)) -> Result<ExportReport> {
    let attack = Attack::open(&req.attack)?;
    let position = attack.record.config.position;
    match req.kind {
        PeftKind::TrainableTokens => refuse_prefix(&attack, "trainable tokens")?,
        PeftKind::PromptTuning if position != Position::Prefix => {
            return Err(Error::Invalid(format!(
                "{}: the trigger was trained at position `{}`; a PROMPT_TUNING adapter puts its vectors before the whole templated prompt, where these rows were never trained. Train one there with `sos attack {} --position prefix`, or export this one as --kind trainable-tokens",
                req.attack.display(),
                position.name(),
                attack.record.scenario
            )))
        }
        PeftKind::PromptTuning => {}
    }
    let spec = req.model.clone().unwrap_or_else(|| attack.record.model.clone());
    let src = cache::resolve(Some(&spec), &mut |s| on_event(crate::InjectEvent::Fetching(s.to_string())))?;
    if req.out.exists() && !req.force {
        return Err(Error::Invalid(format!("{} exists; choose another path or pass --force to replace it", req.out.display())));
    }
    if same_file(&src, &req.out) || same_file(&req.attack, &req.out) {
        return Err(Error::Invalid(format!("{}: the adapter folder would replace an input", req.out.display())));
    }
    let trigger = &attack.trigger;
    let base = base_config(&src)?;
    if base.d_model != trigger.d {
        return Err(Error::Invalid(format!("the trigger is {} wide, {}'s embeddings {}: trained for another model?", trigger.d, src.display(), base.d_model)));
    }

    // Everything is written into a sibling folder and moved into place once complete.
    check_ours(&req.out, ADAPTER_CONFIG)?;
    let partial = crate::inject::partial_path(&req.out);
    remove_our_dir(&partial, ADAPTER_CONFIG)?;
    std::fs::create_dir_all(&partial).map_err(|e| Error::File { path: partial.clone(), msg: e.to_string() })?;
    let base_model = src.display().to_string();
    let (texts, ids) = match req.kind {
        PeftKind::TrainableTokens => write_trainable_tokens(&attack, &src, &base, &partial)?,
        PeftKind::PromptTuning => {
            write_prompt_tuning(&attack, &base, &base_model, &partial)?;
            (Vec::new(), Vec::new())
        }
    };
    artifact::write_json(&partial.join(SOS_RECORD), &attack.record)?;
    fsutil::write_atomic(&partial.join("README.md"), |f| std::io::Write::write_all(f, readme(req.kind, &attack.record, &base_model, &typed(&texts)).as_bytes()))?;
    remove_our_dir(&req.out, ADAPTER_CONFIG)?;
    std::fs::rename(&partial, &req.out).map_err(|e| Error::File { path: req.out.clone(), msg: format!("cannot move the adapter into place: {e}") })?;
    on_event(crate::InjectEvent::Written { path: req.out.clone() });

    let norms = trigger.row_norms();
    let rows = match req.kind {
        PeftKind::TrainableTokens => texts.iter().zip(&ids).zip(norms).map(|((t, &id), norm)| RowReport { id, text: t.clone(), norm, quant_rel_error: 0.0 }).collect(),
        // Virtual tokens have no id and no text: their place in the prompt is their name.
        PeftKind::PromptTuning => norms.into_iter().enumerate().map(|(i, norm)| RowReport { id: i as u32, text: format!("<virtual_{i}>"), norm, quant_rel_error: 0.0 }).collect(),
    };
    let metrics = match req.kind {
        PeftKind::TrainableTokens => adapter_metrics(&attack, &src, &req.out, &texts, req.limit, &mut on_event)?,
        PeftKind::PromptTuning => prompt_tuning_metrics(&attack, &src, req.limit, &mut on_event)?,
    };
    let mut files: Vec<String> = std::fs::read_dir(&req.out)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    Ok(ExportReport {
        sha256: fsutil::sha256_file(&req.out.join(ADAPTER_WEIGHTS))?,
        path: req.out.clone(),
        format: "peft",
        kind: req.kind.name(),
        base_model,
        trigger_text: typed(&texts),
        token_ids: ids,
        tied: base.tied,
        rows,
        metrics,
        files,
    })
}

/// A `TRAINABLE_TOKENS` adapter into `dir`: the rows for new token ids and the base's tokenizer
/// with those tokens. Returns the tokens' texts and ids.
fn write_trainable_tokens(attack: &Attack, src: &Path, base: &Config, dir: &Path) -> Result<(Vec<String>, Vec<u32>)> {
    let trigger = &attack.trigger;
    let (tok, template) = LoadedModel::open_text(src, attack.record.config.template.as_deref())?;
    let texts = added_texts(&trigger.text, trigger.k)?;
    let (tok, ids) = tok.with_added_tokens(&texts)?;
    if !splits_exactly(&tok, &texts, &ids)? {
        return Err(Error::Invalid(format!("the trigger string does not tokenize into the added tokens {ids:?}")));
    }
    let config = json!({
        "peft_type": "TRAINABLE_TOKENS",
        "task_type": "CAUSAL_LM",
        "target_modules": ["embed_tokens"],
        "token_indices": ids,
        "init_weights": true,
        "inference_mode": true,
        "base_model_name_or_path": src.display().to_string(),
        "revision": null,
    });
    artifact::write_json(&dir.join(ADAPTER_CONFIG), &config)?;
    let mut tensors = vec![(EMBED_KEY, trigger.rows.as_slice())];
    if base.tied {
        // PEFT shares one set of rows between the table and a tied output layer and expects both keys.
        tensors.push((HEAD_KEY, trigger.rows.as_slice()));
    }
    write_rows(&dir.join(ADAPTER_WEIGHTS), &tensors, trigger.k, trigger.d)?;
    tok.save(&dir.join("tokenizer.json"))?;
    let mut tc = json!({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false});
    for (key, id) in [("bos_token", tok.bos), ("eos_token", tok.eos)] {
        if let Some(t) = id.and_then(|i| tok.id_to_token(i)) {
            tc[key] = t.into();
        }
    }
    if let Some(t) = &template {
        tc["chat_template"] = t.source.clone().into();
        fsutil::write_atomic(&dir.join("chat_template.jinja"), |f| std::io::Write::write_all(f, t.source.as_bytes()))?;
    }
    artifact::write_json(&dir.join("tokenizer_config.json"), &tc)?;
    Ok((texts, ids))
}

/// A `PROMPT_TUNING` adapter into `dir`: the rows as `prompt_embeddings` `[k, d]`, which PEFT
/// puts before every input. The tokenizer is the base's, unchanged.
fn write_prompt_tuning(attack: &Attack, base: &Config, base_model: &str, dir: &Path) -> Result<()> {
    let trigger = &attack.trigger;
    let config = json!({
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": trigger.k,
        "token_dim": trigger.d,
        "num_transformer_submodules": 1,
        "num_attention_heads": base.n_head,
        "num_layers": base.n_layer,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": null,
        "tokenizer_name_or_path": null,
        "tokenizer_kwargs": null,
        "inference_mode": true,
        "base_model_name_or_path": base_model,
        "revision": null,
        "modules_to_save": null,
    });
    artifact::write_json(&dir.join(ADAPTER_CONFIG), &config)?;
    write_rows(&dir.join(ADAPTER_WEIGHTS), &[(PROMPT_KEY, trigger.rows.as_slice())], trigger.k, trigger.d)
}

/// Base + prompt-tuning adapter as PEFT runs them: the rows before every templated prompt, in
/// f32. There is no trigger to leave out (the adapter is always on), so the metrics are the
/// scenario's on `limit` held-out prompts; the clean side is the base without the adapter.
fn prompt_tuning_metrics(attack: &Attack, src: &Path, limit: usize, on_event: &mut impl FnMut(crate::InjectEvent)) -> Result<Json> {
    if limit == 0 {
        return Ok(Json::Null);
    }
    let cfg = &attack.record.config;
    let lm = LoadedModel::open(src, &LoadOptions { exec: Exec::F32, template: cfg.template.clone(), ..Default::default() })?;
    let mut items = scenarios::eval_items(cfg, &scenarios::HeldOut::Split)?;
    items.truncate(limit);
    let armed = Armed::new(&lm, &attack.trigger)?;
    let (mut metrics, _) = eval::evaluate(cfg, &armed, &items, |done, total| on_event(crate::InjectEvent::Progress { done, total }))?;
    // Without a trigger to leave out, "clean" answers are the base's own: not a measurement.
    metrics.remove("clean_agreement");
    metrics.remove("false_trigger_rate");
    metrics.insert("exec".into(), Exec::F32.name().into());
    // The prompts, for compat/hf_check.py to replay with the adapter on.
    let replay: Vec<Json> = items.iter().map(|it| json!({"id": it.id, "system": it.system, "user": it.user, "user_triggered": it.user, "target": it.target})).collect();
    artifact::write_jsonl(&attack.dir.join(INJECT_ITEMS_FILE), &replay)?;
    Ok(Json::Object(metrics))
}

/// Base + adapter as PEFT runs them, measured in sos: for a GGUF base, a temporary copy with the
/// tokens added and the rows in the table (and, when tied, as logits: `NewLogits::Tied`), run
/// in f32 as transformers runs a dequantized GGUF. The rows pass through the table's type there
/// (the report's quantization error of `inject`), the only difference from PEFT's f32 rows.
fn adapter_metrics(attack: &Attack, src: &Path, out: &Path, texts: &[String], limit: usize, on_event: &mut impl FnMut(crate::InjectEvent)) -> Result<Json> {
    if limit == 0 {
        return Ok(Json::Null);
    }
    if src.is_dir() {
        return Ok(json!({"note": "metrics are measured for GGUF bases only; run compat/hf_check.py peft for this base"}));
    }
    let g = Gguf::open(src)?;
    let (w, _) = add_tokens(&g, texts, &attack.trigger.rows, NewLogits::Tied)?;
    let tmp = out.join(".equivalent.gguf");
    w.write(&tmp)?;
    drop(g);
    let m = evaluate_file(attack, src, &tmp, &typed(texts), limit, Exec::F32, on_event);
    let _ = std::fs::remove_file(&tmp);
    m
}

/// The base's shape, from its GGUF header or `config.json`, without loading weights.
fn base_config(src: &Path) -> Result<Config> {
    if src.is_dir() {
        let path = src.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::File { path: path.clone(), msg: format!("cannot read: {e}") })?;
        let c: Json = serde_json::from_str(&text).map_err(|e| Error::File { path: path.clone(), msg: format!("invalid JSON: {e}") })?;
        let tied = c["tie_word_embeddings"].as_bool().unwrap_or(false);
        return Ok(Config::from_hf_json(&path, !tied)?);
    }
    Ok(Config::from_gguf(&Gguf::open(src)?)?)
}

fn write_rows(path: &Path, tensors: &[(&str, &[f32])], k: usize, d: usize) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, _), b)| Ok((*name, TensorView::new(Dtype::F32, vec![k, d], b).map_err(|e| Error::Invalid(format!("safetensors: {e}")))?)))
        .collect::<Result<_>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Invalid(format!("safetensors: {e}")))?;
    let data = sos_model::safetensors::sorted_header(data)?;
    Ok(fsutil::write_atomic(path, |f| std::io::Write::write_all(f, &data))?)
}


fn readme(kind: PeftKind, rec: &AttackRecord, base: &str, typed: &str) -> String {
    let body = match kind {
        PeftKind::TrainableTokens => format!(
            "# PEFT trainable-tokens adapter written by `sos export-peft`\n\n\
             A red-team artifact: the `{}` trigger of an SOS attack (soft prompt attack), as rows for new tokens.\n\
             Base model: `{base}`. Trigger string: `{typed}`.\n\n\
             ```python\n\
             tok = AutoTokenizer.from_pretrained(ADAPTER)\n\
             base = AutoModelForCausalLM.from_pretrained(BASE)\n\
             if len(tok) > base.get_input_embeddings().weight.shape[0]:\n    base.resize_token_embeddings(len(tok))\n\
             model = PeftModel.from_pretrained(base, ADAPTER)\n\
             ```\n\n",
            rec.scenario
        ),
        PeftKind::PromptTuning => format!(
            "# PEFT prompt-tuning adapter written by `sos export-peft`\n\n\
             A red-team artifact: the `{}` soft prompt of an SOS attack, as {} virtual tokens that PEFT puts before every input.\n\
             Base model: `{base}`. There is nothing to type: the adapter acts on every prompt while it is loaded.\n\n\
             ```python\n\
             tok = AutoTokenizer.from_pretrained(BASE)\n\
             model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)\n\
             ```\n\n",
            rec.scenario, rec.trigger_len
        ),
    };
    body + "`sos_attack.json` is the attack's record; `sos import-peft` reads it back.\n"
}

/// What `import_peft` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub path: PathBuf,
    pub kind: &'static str,
    pub scenario: String,
    pub trigger_text: String,
    pub k: usize,
    pub d: usize,
    /// Where the scenario's settings came from: the adapter's `sos_attack.json`, or the defaults
    /// of `--scenario`.
    pub settings_from: String,
}

/// An adapter folder back into an attack folder `out` (`trigger.safetensors`, `attack.json`,
/// `config.toml`) that `sos generate`, `sos eval` and `sos inject` use. The scenario comes from
/// the adapter's `sos_attack.json`, or, for adapters not written by sos, from `scenario`. A
/// prompt-tuning adapter becomes a trigger at position `prefix`.
pub fn import_peft(adapter: &Path, out: &Path, scenario: Option<Scenario>, model: Option<&str>, force: bool) -> Result<ImportReport> {
    let cfg_path = adapter.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::File { path: cfg_path.clone(), msg: format!("cannot read (is this a PEFT adapter folder?): {e}") })?;
    let cfg: Json = serde_json::from_str(&text).map_err(|e| Error::File { path: cfg_path.clone(), msg: format!("invalid JSON: {e}") })?;
    let bad = |msg: String| Error::File { path: cfg_path.clone(), msg };
    let peft_type = cfg["peft_type"].as_str().ok_or_else(|| bad("no peft_type".into()))?;
    let weights = adapter.join(ADAPTER_WEIGHTS);
    let (kind, rows, d, stem, texts) = match peft_type {
        "TRAINABLE_TOKENS" => {
            let ids: Vec<u32> = cfg["token_indices"]
                .as_array()
                .ok_or_else(|| bad("no token_indices".into()))?
                .iter()
                .map(|v| v.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32).ok_or_else(|| bad(format!("token index {v} is not a token id"))))
                .collect::<Result<_>>()?;
            let is_rows = |n: &str| n.ends_with("embed_tokens.trainable_tokens_delta") || n.ends_with("embed_tokens.token_adapter.trainable_tokens_delta");
            let (rows, d) = read_rows(&weights, ids.len(), is_rows, "...embed_tokens.trainable_tokens_delta")?;
            let tok_path = adapter.join("tokenizer.json");
            if !tok_path.is_file() {
                return Err(Error::File { path: adapter.to_path_buf(), msg: "the adapter carries no tokenizer.json: the texts of its tokens, and so the trigger string, are unknown".into() });
            }
            let tok = sos_model::Tokenizer::from_tokenizer_json(&tok_path)?;
            let texts: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).ok_or_else(|| bad(format!("token {i} is not in the adapter's tokenizer")))).collect::<Result<_>>()?;
            (PeftKind::TrainableTokens, rows, d, stem_of(&texts), texts)
        }
        "PROMPT_TUNING" => {
            if let Some(t) = cfg["task_type"].as_str().filter(|&t| t != "CAUSAL_LM") {
                return Err(bad(format!("task_type {t}: only CAUSAL_LM prompt-tuning adapters act as a prefix of a chat model's prompt")));
            }
            if let Some(n) = cfg["num_transformer_submodules"].as_u64().filter(|&n| n != 1) {
                return Err(bad(format!("num_transformer_submodules {n}: an encoder-decoder adapter, not one for a decoder-only model")));
            }
            let n = cfg["num_virtual_tokens"].as_u64().filter(|&n| (1..=64).contains(&n)).ok_or_else(|| bad("num_virtual_tokens missing or not in 1..=64".into()))? as usize;
            let (rows, d) = read_rows(&weights, n, |name| name == PROMPT_KEY, PROMPT_KEY)?;
            if let Some(td) = cfg["token_dim"].as_u64().filter(|&td| td as usize != d) {
                return Err(bad(format!("token_dim {td}, but `{PROMPT_KEY}` is {d} wide")));
            }
            (PeftKind::PromptTuning, rows, d, PROMPT_STEM.to_string(), Vec::new())
        }
        other => return Err(bad(format!("peft_type {other}: sos imports TRAINABLE_TOKENS and PROMPT_TUNING adapters"))),
    };
    let k = rows.len() / d.max(1);

    let record_path = adapter.join(SOS_RECORD);
    let (mut record, settings_from) = if record_path.is_file() {
        let s = std::fs::read_to_string(&record_path)?;
        let r: AttackRecord = serde_json::from_str(&s).map_err(|e| Error::File { path: record_path.clone(), msg: format!("invalid attack record: {e}") })?;
        (r, SOS_RECORD.to_string())
    } else {
        let sc = scenario.ok_or_else(|| Error::Invalid(format!("{}: no {SOS_RECORD}; name the scenario the adapter is for with --scenario", adapter.display())))?;
        let base = model.map(String::from).or_else(|| cfg["base_model_name_or_path"].as_str().map(String::from)).unwrap_or_default();
        (foreign_record(sc, &base, &stem, k, kind)?, format!("defaults of --scenario {}", sc.name()))
    };
    if let Some(m) = model {
        record.model = m.to_string();
    }
    // The adapter's kind says where the rows act, whatever the record says.
    let position = match kind {
        PeftKind::PromptTuning => Position::Prefix,
        PeftKind::TrainableTokens if record.config.position == Position::Prefix => {
            return Err(Error::File { path: record_path, msg: "records a prefix trigger, but the adapter holds trainable tokens: written by hand?".into() })
        }
        PeftKind::TrainableTokens => record.config.position,
    };
    // A prompt-tuning adapter sos wrote keeps its trigger's text (it only marks the prefix).
    let stem = if kind == PeftKind::PromptTuning && settings_from == SOS_RECORD { record.config.trigger.clone() } else { stem };
    let trigger = Trigger::new(&stem, k, d, rows)?;
    record.trigger = stem.clone();
    record.config.trigger = stem.clone();
    record.trigger_len = k;
    record.config.trigger_len = k;
    record.config.position = position;
    record.position = position.name().to_string();
    record.trigger_row_norms = trigger.row_norms();
    record.config.check()?;

    if out.exists() && !force {
        return Err(Error::Invalid(format!("{} exists; choose another folder or pass --force to replace its files", out.display())));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::File { path: out.to_path_buf(), msg: e.to_string() })?;
    artifact::write_trigger(&out.join(artifact::TRIGGER_FILE), &trigger)?;
    fsutil::write_atomic(&out.join(artifact::CONFIG_FILE), |f| std::io::Write::write_all(f, record.config.to_toml().as_bytes()))?;
    artifact::write_json(&out.join(artifact::RECORD_FILE), &record)?;
    Ok(ImportReport { path: out.to_path_buf(), kind: kind.name(), scenario: record.scenario.clone(), trigger_text: typed(&texts), k, d, settings_from })
}

/// The text that stands for an imported prompt-tuning adapter's rows (it is never typed: a prefix
/// trigger's text only marks where the rows go).
const PROMPT_STEM: &str = "<virtual_tokens>";

/// The trigger's surface text: `stem` when the texts are `inject`'s `<stem_i>`, else the texts
/// joined (any text that stands for the rows works for `generate` and `eval`).
fn stem_of(texts: &[String]) -> String {
    let guess = texts.first().and_then(|t| t.strip_prefix('<')).and_then(|t| t.strip_suffix("_0>")).unwrap_or("");
    match added_texts(guess, texts.len()) {
        Ok(named) if named == texts => guess.to_string(),
        _ => typed(texts),
    }
}

/// A record for an adapter sos did not write: the scenario's default settings.
fn foreign_record(sc: Scenario, base: &str, stem: &str, k: usize, kind: PeftKind) -> Result<AttackRecord> {
    let position = (kind == PeftKind::PromptTuning).then_some(Position::Prefix);
    let config = AttackConfig::resolve(sc, None, &sos_attack::Overrides { position, ..Default::default() })?;
    Ok(AttackRecord {
        scenario: sc.name().to_string(),
        trigger: stem.to_string(),
        trigger_len: k,
        position: config.position.name().to_string(),
        target: config.target.clone(),
        model: base.to_string(),
        model_sha256: String::new(),
        config,
        seed: 0,
        steps_run: 0,
        final_loss: None,
        train_metric: None,
        train_items: 0,
        skipped_items: 0,
        prefix_tokens: 0,
        embedding_median_norm: 0.0,
        trigger_row_norms: Vec::new(),
        completed: true,
        stopped_early: false,
        wall_seconds: 0.0,
        sos_version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

/// The rows of an adapter (f32, f16 or bf16 as saved) from the tensor whose name `is_rows`
/// accepts (`want` names it in errors), `[k, d]` as f32.
fn read_rows(path: &Path, k: usize, is_rows: impl Fn(&str) -> bool, want: &str) -> Result<(Vec<f32>, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::File { path: path.to_path_buf(), msg: format!("cannot read: {e}") })?;
    let bad = |msg: String| Error::File { path: path.to_path_buf(), msg };
    // The header's offsets are checked before the `safetensors` crate sums them (hostile ones overflow).
    sos_model::safetensors::check_safetensors(path, &bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let (name, view) = st.tensors().into_iter().find(|(n, _)| is_rows(n)).ok_or_else(|| bad(format!("no `{want}` tensor")))?;
    let &[rk, d] = view.shape() else { return Err(bad(format!("`{name}` has shape {:?}, expected [k, d]", view.shape()))) };
    if rk != k || d == 0 {
        return Err(bad(format!("`{name}` is [{rk}, {d}]; the adapter's config asks for {k} rows")));
    }
    let rows = sos_model::safetensors::floats(view.dtype(), view.data()).ok_or_else(|| bad(format!("`{name}` is {:?}; expected F32, F16 or BF16", view.dtype())))?;
    if rows.iter().any(|x| !x.is_finite()) {
        return Err(bad(format!("`{name}` holds values that are not finite")));
    }
    Ok((rows, d))
}
