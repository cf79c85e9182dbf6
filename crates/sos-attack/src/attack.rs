//! `sos attack` as a library call: settings (fresh or from the run being resumed), the model,
//! the training examples, then the training loop, all written into the run's folder.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde_json::json;
use sos_model::{Exec, LoadOptions};

use crate::artifact::{self, read_record, write_jsonl, AttackRecord, CONFIG_FILE, TRAIN_ITEMS_FILE};
use crate::config::{AttackConfig, Overrides, Scenario};
use crate::item::Item;
use crate::load::{load_model, Purpose};
use crate::scenarios;
use crate::train::{self, Event, Outcome, Target};
use crate::{Error, Result};

/// What `sos attack` was asked.
#[derive(Debug, Clone)]
pub struct AttackRequest {
    pub scenario: Scenario,
    /// The run's folder.
    pub out: PathBuf,
    /// A TOML file of settings; the command line's win over it.
    pub config_file: Option<PathBuf>,
    /// Settings given on the command line.
    pub overrides: Overrides,
    /// Continue the run in `out` from its checkpoint. Its settings are the run's own; only
    /// `steps` may be given.
    pub resume: bool,
    /// Keep no transposed copies of the weights (`load::Purpose`): slower steps, less memory,
    /// the same results.
    pub low_memory: bool,
}

pub struct AttackSummary {
    pub outcome: Outcome,
    /// `attack.json` as the run left it.
    pub record: AttackRecord,
}

/// The output folder of a run: refuses to overwrite a previous run unless resuming.
pub fn prepare_out(out: &Path, resume: bool) -> Result<PathBuf> {
    let ckpt = out.join(artifact::CHECKPOINT_FILE);
    if resume {
        if !ckpt.is_file() {
            return Err(Error::file(&ckpt, "nothing to resume: no checkpoint here"));
        }
    } else if out.join(artifact::RECORD_FILE).exists() || ckpt.exists() {
        return Err(Error::file(out, "already holds an attack; pass --resume to continue it, or choose another --out"));
    }
    Ok(out.to_path_buf())
}

/// The settings of the run `req` asks for. A resumed run keeps the settings it was started
/// with, so that it continues bit for bit; only the step budget may grow or shrink.
pub fn resolve_config(req: &AttackRequest) -> Result<AttackConfig> {
    if !req.resume {
        let file = req.config_file.as_deref().map(AttackConfig::from_toml_file).transpose()?;
        return AttackConfig::resolve(req.scenario, file.as_ref(), &req.overrides);
    }
    let path = req.out.join(CONFIG_FILE);
    let others = Overrides { scenario: None, steps: None, ..req.overrides.clone() };
    if req.config_file.is_some() || !others.is_empty() {
        return Err(Error::Config(format!("--resume takes its settings from {}; only --steps may be given", path.display())));
    }
    let mut c = AttackConfig::read(&path)?;
    if c.scenario != req.scenario {
        return Err(Error::Config(format!("{} holds a {} attack, not {}", req.out.display(), c.scenario.name(), req.scenario.name())));
    }
    if let Some(s) = req.overrides.steps {
        c.steps = s;
    }
    Ok(c)
}

/// What was trained on, for reading and for reproducing the run elsewhere.
fn write_train_items(out: &Path, cfg: &AttackConfig, items: &[Item]) -> Result<()> {
    let rows: Vec<serde_json::Value> = items
        .iter()
        .map(|it| json!({"id": it.id, "system": it.system, "user": it.user, "with_trigger": it.user_with(&cfg.trigger), "target": it.target}))
        .collect();
    write_jsonl(&out.join(TRAIN_ITEMS_FILE), &rows)
}

/// Runs the attack `req` asks for into `req.out`. Raising `stop` makes the loop checkpoint and
/// return `Outcome::Interrupted`.
pub fn run_attack(req: &AttackRequest, stop: &AtomicBool, mut on_event: impl FnMut(Event)) -> Result<AttackSummary> {
    prepare_out(&req.out, req.resume)?;
    let cfg = resolve_config(req)?;
    let opts = LoadOptions { exec: Exec::F32, template: cfg.template.clone(), ..Default::default() };
    let m = load_model(cfg.model.as_deref(), &opts, Purpose::Training { low_memory: req.low_memory }, &mut |s| on_event(Event::Loading(s.to_string())))?;
    if req.resume {
        let rec = read_record(&req.out)?;
        if rec.model_sha256 != m.sha256 {
            return Err(Error::file(&m.path, format!("model SHA-256 {} differs from the one this attack was trained on ({})", m.sha256, rec.model_sha256)));
        }
    }
    on_event(Event::Preparing { scenario: cfg.scenario, self_generated: cfg.self_generated });
    let items = scenarios::train_items(&cfg, &m.lm, &mut |done, total| on_event(Event::Writing { done, total }))?;
    write_train_items(&req.out, &cfg, &items)?;
    let target = Target { lm: &m.lm, model_label: m.label(), model_sha256: m.sha256.clone() };
    let outcome = train::train(&cfg, &target, &items, &req.out, req.resume, stop, &mut on_event)?;
    Ok(AttackSummary { outcome, record: read_record(&req.out)? })
}
