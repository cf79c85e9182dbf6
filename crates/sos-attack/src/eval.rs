//! Held-out evaluation of a trained trigger: `run_eval` is `sos eval` as a library call.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use serde_json::{Map, Value};
use sos_model::{Exec, LoadOptions};

use crate::answer::Armed;
use crate::artifact::{write_json, write_jsonl, Attack, EVAL_FILE, EVAL_ITEMS_FILE};
use crate::config::AttackConfig;
use crate::data::Datasets;
use crate::item::Item;
use crate::load::{load_model, Purpose};
use crate::scenarios::{self, HeldOut};
use crate::{Error, Result};

/// Evaluates on `items` (already limited). Returns the flat metrics object of `eval.json` and
/// one record per answer (prompt, answers, verdicts) for `eval_items.jsonl`.
/// `progress(done, total)` is called after each answer (an item takes one or more).
pub fn evaluate(cfg: &AttackConfig, armed: &Armed, items: &[Item], mut progress: impl FnMut(usize, usize)) -> Result<(Map<String, Value>, Vec<Value>)> {
    if items.is_empty() {
        return Err(Error::Invalid("no evaluation items".into()));
    }
    let mut out = Map::new();
    out.insert("scenario".into(), cfg.scenario.name().into());
    out.insert("n".into(), items.len().into());
    let records = cfg.scenario.logic().evaluate(armed, items, &mut progress, &mut out)?;
    Ok((out, records))
}

/// What `sos eval` was asked.
pub struct EvalRequest {
    /// The folder `sos attack` wrote; the results go there too.
    pub attack: PathBuf,
    /// The model to attack; `None`: the one recorded in `attack.json`.
    pub model: Option<String>,
    /// The held-out split, a named set, or a user's JSONL file.
    pub data: HeldOut,
    /// Items to evaluate; 0 is all.
    pub limit: usize,
    pub exec: Exec,
    pub device: Device,
}

/// What happens during `run_eval`.
#[derive(Debug, Clone)]
pub enum EvalEvent {
    /// A progress line of fetching the model.
    Fetching(String),
    /// The items are ready; evaluation starts.
    Started { items: usize },
    /// `done` of `total` answers (an item takes one or more; `total` can grow).
    Progress { done: usize, total: usize },
}

pub struct EvalReport {
    /// The `eval.json` object.
    pub metrics: Value,
    /// Set when the model is not the one the trigger was trained on: evaluation still runs (a
    /// trigger may carry over, e.g. to a quantized copy), but the numbers mean something else.
    pub warning: Option<String>,
    /// Where `eval.json` was written.
    pub eval_file: PathBuf,
}

/// Evaluates the trigger in `req.attack` on held-out items and writes `eval.json` and
/// `eval_items.jsonl` next to it (`eval.NAME.json`, `eval_items.NAME.jsonl` for a named set).
pub fn run_eval(req: &EvalRequest, mut on_event: impl FnMut(EvalEvent)) -> Result<EvalReport> {
    let attack = Attack::open(&req.attack)?;
    let cfg = &attack.record.config;
    let spec = req.model.clone().unwrap_or_else(|| attack.record.model.clone());
    let opts = LoadOptions { exec: req.exec, device: req.device.clone(), template: cfg.template.clone() };
    let m = load_model(Some(&spec), &opts, Purpose::Inference, &mut |s| on_event(EvalEvent::Fetching(s.to_string())))?;
    let warning = (m.sha256 != attack.record.model_sha256)
        .then(|| format!("{} is not the model this trigger was trained on (SHA-256 differs)", m.path.display()));
    let mut items = scenarios::eval_items(cfg, &req.data)?;
    if req.limit > 0 {
        items.truncate(req.limit);
    }
    let armed = Armed::new(&m.lm, &attack.trigger)?;
    on_event(EvalEvent::Started { items: items.len() });
    let t0 = Instant::now();
    let (mut metrics, records) = evaluate(cfg, &armed, &items, |done, total| on_event(EvalEvent::Progress { done, total }))?;
    // A named set's results sit beside the split's instead of replacing them.
    let (eval_name, items_name) = match &req.data {
        HeldOut::Set(n) => (format!("eval.{n}.json"), format!("eval_items.{n}.jsonl")),
        _ => (EVAL_FILE.to_string(), EVAL_ITEMS_FILE.to_string()),
    };
    write_jsonl(&req.attack.join(items_name), &records)?;
    metrics.insert("model".into(), m.label().into());
    metrics.insert("model_sha256".into(), m.sha256.clone().into());
    metrics.insert("exec".into(), req.exec.name().into());
    // Which data the numbers are of: the user's file, or the held-out split of the built-in
    // datasets or of the folder that replaced them.
    let data = match &req.data {
        HeldOut::File(p) => p.display().to_string(),
        HeldOut::Split => format!("held-out split ({})", Datasets::resolve(cfg.data_dir.as_deref())?.label()),
        HeldOut::Set(name) => format!("held-out set {name} ({})", Datasets::resolve(cfg.data_dir.as_deref())?.label()),
    };
    metrics.insert("data".into(), data.into());
    metrics.insert("seconds".into(), t0.elapsed().as_secs_f64().into());
    let metrics = Value::Object(metrics);
    let eval_file = req.attack.join(eval_name);
    write_json(&eval_file, &metrics)?;
    Ok(EvalReport { metrics, warning, eval_file })
}
