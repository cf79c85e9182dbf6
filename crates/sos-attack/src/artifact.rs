//! What an attack leaves in its output folder, and reading it back:
//!
//! - `trigger.safetensors`: tensor `trigger`, `[k, d]`, f32 (metadata: trigger text);
//! - `attack.json`: the record of the run (`AttackRecord`);
//! - `config.toml`: the resolved settings;
//! - `loss.csv`: `step,loss,lr,grad_norm,train_metric`;
//! - `checkpoint.safetensors`: trigger, Adam moments and the loop's state, for `--resume`;
//! - `train_items.jsonl`: the training examples;
//! - `eval.json`, `eval_items.jsonl`: written by `sos eval` (`eval::run_eval`).
//!
//! Every file is written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sos_model::fsutil::write_atomic;

use crate::config::AttackConfig;
use crate::trigger::Trigger;
use crate::{Error, Result};

pub const TRIGGER_FILE: &str = "trigger.safetensors";
pub const RECORD_FILE: &str = "attack.json";
pub const CONFIG_FILE: &str = "config.toml";
pub const LOSS_FILE: &str = "loss.csv";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const EVAL_FILE: &str = "eval.json";
pub const EVAL_ITEMS_FILE: &str = "eval_items.jsonl";
pub const TRAIN_ITEMS_FILE: &str = "train_items.jsonl";

/// One line of `loss.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// The train metric if it was measured at this step.
    pub train_metric: Option<f64>,
}

/// `attack.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttackRecord {
    pub scenario: String,
    pub trigger: String,
    pub trigger_len: usize,
    pub position: String,
    /// The fixed target (backdoor, copyright); `None` when each example has its own.
    pub target: Option<String>,
    pub model: String,
    pub model_sha256: String,
    pub config: AttackConfig,
    pub seed: u64,
    pub steps_run: usize,
    pub final_loss: Option<f64>,
    /// Share of the train-metric examples whose target greedy decoding reproduces (teacher
    /// forced: every target token is the argmax).
    pub train_metric: Option<f64>,
    pub train_items: usize,
    /// Training examples left out because their prompt or target is over the length limits.
    pub skipped_items: usize,
    /// Leading tokens shared by every training sequence, run once as a frozen prefix.
    pub prefix_tokens: usize,
    pub embedding_median_norm: f64,
    pub trigger_row_norms: Vec<f64>,
    pub completed: bool,
    pub stopped_early: bool,
    pub wall_seconds: f64,
    pub sos_version: String,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_f32(path: &Path, st: &safetensors::SafeTensors, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = st.tensor(name).map_err(|e| Error::file(path, format!("tensor `{name}`: {e}")))?;
    if t.dtype() != Dtype::F32 {
        return Err(Error::file(path, format!("tensor `{name}` is {:?}, expected F32", t.dtype())));
    }
    let n: usize = t.shape().iter().product();
    if n != len {
        return Err(Error::file(path, format!("tensor `{name}` has {n} values, expected {len}")));
    }
    Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

/// Writes named f32 tensors with metadata, atomically.
pub fn write_tensors(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])], meta: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| f32_bytes(v)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((name.to_string(), TensorView::new(Dtype::F32, shape.clone(), b).map_err(|e| Error::Invalid(e.to_string()))?)))
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Invalid(format!("safetensors: {e}")))?;
    let data = sos_model::safetensors::sorted_header(data)?;
    Ok(write_atomic(path, |f| std::io::Write::write_all(f, &data))?)
}

pub fn write_trigger(path: &Path, t: &Trigger) -> Result<()> {
    let meta = HashMap::from([("trigger".to_string(), t.text.clone()), ("format".to_string(), "sos-trigger-1".to_string())]);
    write_tensors(path, &[("trigger", vec![t.k, t.d], &t.rows)], meta)
}

pub fn read_trigger(path: &Path) -> Result<Trigger> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let t = st.tensor("trigger").map_err(|_| Error::file(path, "no tensor `trigger`"))?;
    let shape = t.shape().to_vec();
    if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
        return Err(Error::file(path, format!("tensor `trigger` has shape {shape:?}, expected [k, d]")));
    }
    let rows = read_f32(path, &st, "trigger", shape[0] * shape[1])?;
    if rows.iter().any(|x| !x.is_finite()) {
        return Err(Error::file(path, "tensor `trigger` holds NaN or infinite values"));
    }
    let text = meta.metadata().as_ref().and_then(|m| m.get("trigger").cloned()).unwrap_or_default();
    Ok(Trigger { text, rows, k: shape[0], d: shape[1] })
}

/// The checkpoint: everything `--resume` needs to continue bit for bit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub step: usize,
    pub adam_t: u64,
    pub history: Vec<LogRow>,
    pub metric: Option<f64>,
    pub held: usize,
    pub stopped_early: bool,
    pub wall_seconds: f64,
}

pub struct Checkpoint {
    pub state: LoopState,
    pub trigger: Trigger,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

pub fn write_checkpoint(path: &Path, c: &Checkpoint) -> Result<()> {
    let meta = HashMap::from([("state".to_string(), serde_json::to_string(&c.state).expect("state serializes"))]);
    let shape = vec![c.trigger.k, c.trigger.d];
    write_tensors(path, &[("trigger", shape.clone(), &c.trigger.rows), ("adam_m", shape.clone(), &c.m), ("adam_v", shape, &c.v)], meta)
}

/// The checkpoint of a run whose trigger is `text` with `k` rows of width `d` (the file does
/// not hold the text: `config.toml` does).
pub fn read_checkpoint(path: &Path, text: &str, k: usize, d: usize) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::file(path, format!("not a checkpoint: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, format!("not a checkpoint: {e}")))?;
    let state_json = meta.metadata().as_ref().and_then(|m| m.get("state").cloned()).ok_or_else(|| Error::file(path, "checkpoint has no state"))?;
    let state: LoopState = serde_json::from_str(&state_json).map_err(|e| Error::file(path, format!("checkpoint state: {e}")))?;
    let n = k * d;
    let trigger = Trigger { text: text.to_string(), rows: read_f32(path, &st, "trigger", n)?, k, d };
    Ok(Checkpoint { state, trigger, m: read_f32(path, &st, "adam_m", n)?, v: read_f32(path, &st, "adam_v", n)? })
}

pub fn write_loss_csv(path: &Path, rows: &[LogRow]) -> Result<()> {
    let mut s = String::from("step,loss,lr,grad_norm,train_metric\n");
    for r in rows {
        let m = r.train_metric.map(|m| format!("{m}")).unwrap_or_default();
        s.push_str(&format!("{},{},{},{},{}\n", r.step, r.loss, r.lr, r.grad_norm, m));
    }
    Ok(write_atomic(path, |f| std::io::Write::write_all(f, s.as_bytes()))?)
}

pub fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let s = serde_json::to_string_pretty(v).expect("serializes") + "\n";
    Ok(write_atomic(path, |f| std::io::Write::write_all(f, s.as_bytes()))?)
}

pub fn write_jsonl(path: &Path, rows: &[serde_json::Value]) -> Result<()> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&r.to_string());
        s.push('\n');
    }
    Ok(write_atomic(path, |f| std::io::Write::write_all(f, s.as_bytes()))?)
}

pub fn read_record(dir: &Path) -> Result<AttackRecord> {
    let path = dir.join(RECORD_FILE);
    let s = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read (is this an attack folder?): {e}")))?;
    serde_json::from_str(&s).map_err(|e| Error::file(&path, format!("invalid attack record: {e}")))
}

/// An attack folder read back: record and trigger, checked against each other.
pub struct Attack {
    pub dir: PathBuf,
    pub record: AttackRecord,
    pub trigger: Trigger,
}

impl Attack {
    pub fn open(dir: &Path) -> Result<Self> {
        let record = read_record(dir)?;
        let path = dir.join(TRIGGER_FILE);
        let mut trigger = read_trigger(&path)?;
        if trigger.k != record.trigger_len {
            return Err(Error::file(&path, format!("{} trigger rows but attack.json says {}", trigger.k, record.trigger_len)));
        }
        if trigger.text.is_empty() {
            trigger.text = record.trigger.clone();
        }
        Ok(Attack { dir: dir.to_path_buf(), record, trigger })
    }
}
