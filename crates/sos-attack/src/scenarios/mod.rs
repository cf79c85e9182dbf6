//! The four scenarios, one file each, behind one trait: what each changes in the default
//! settings, the examples it trains and evaluates on (from `data`, or from a user's JSONL file),
//! where the trigger goes in them, and how held-out answers are scored.
//!
//! `Scenario` (in `config`) is the parsed name; `Scenario::logic` maps it to its implementation.

mod backdoor;
mod compose;
mod copyright;
mod jailbreak;
mod selfgen;
mod steal;

use std::path::Path;

use rand::Rng;
use serde_json::{Map, Value};
use sos_model::LoadedModel;

use crate::answer::Armed;
use crate::config::{AttackConfig, Overrides, Position, Scenario};
use crate::data::{self, Datasets};
use crate::item::Item;
use crate::{Error, Result};

pub use backdoor::{backdoor_items, DEFAULT_BACKDOOR_TARGET};
pub use compose::composed_system_prompts;
pub use copyright::{copyright_items, COPYRIGHT_REQUESTS, DEFAULT_COPYRIGHT_TARGET};
pub use jailbreak::jailbreak_items;
pub use selfgen::{self_generated_prompts, self_generated_system_prompts};
pub use steal::steal_items;

/// What makes one scenario differ from another.
pub trait ScenarioLogic: Sync {
    /// Changes the scenario makes to the common defaults.
    fn defaults(&self, c: &mut AttackConfig);

    /// Whether `target` is the one answer of every example, recorded in `attack.json`;
    /// otherwise each example has its own.
    fn fixed_target(&self) -> bool {
        false
    }

    /// Examples from the datasets: the training split, or the held-out one. `seed` places the
    /// trigger where the position is drawn.
    fn dataset_items(&self, cfg: &AttackConfig, data: &Datasets, held_out: bool, seed: u64) -> Result<Vec<Item>>;

    /// Training examples the model writes itself (`self_generated`, which `AttackConfig::check`
    /// allows only for scenarios that have them). `progress(done, total)` follows the writing.
    fn self_generated_items(&self, cfg: &AttackConfig, _lm: &LoadedModel, _progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<Item>> {
        Err(Error::Config(format!("{} has no self-generated training examples", cfg.scenario.name())))
    }

    /// Held-out sets besides the split, by name (`sos eval --set NAME`): other kinds of data
    /// than anything trained on.
    fn held_out_sets(&self) -> &'static [&'static str] {
        &[]
    }

    /// The items of held-out set `name` (one of `held_out_sets`).
    fn set_items(&self, _cfg: &AttackConfig, _data: &Datasets, name: &str, _seed: u64) -> Result<Vec<Item>> {
        Err(Error::Config(format!("no held-out set `{name}`")))
    }

    /// Held-out examples from the rows of a user's JSONL file (`path` names it in errors).
    fn file_items(&self, cfg: &AttackConfig, path: &Path, rows: &[Value], seed: u64) -> Result<Vec<Item>>;

    /// Answers every item, adds the scenario's metrics to `out`, and returns one record per
    /// answer for `eval_items.jsonl`. `progress(done, total)` follows the answers, decoded
    /// together (`Armed::answers`); `total` can grow as the evaluation plans more.
    fn evaluate(&self, armed: &Armed, items: &[Item], progress: &mut dyn FnMut(usize, usize), out: &mut Map<String, Value>) -> Result<Vec<Value>>;
}

impl Scenario {
    pub fn logic(self) -> &'static dyn ScenarioLogic {
        match self {
            Scenario::Backdoor => &backdoor::Backdoor,
            Scenario::Jailbreak => &jailbreak::Jailbreak,
            Scenario::Steal => &steal::Steal,
            Scenario::Copyright => &copyright::Copyright,
        }
    }
}

// Here rather than in `config`: the defaults depend on the scenario's logic, and `config`
// stays free of it (the scenarios read settings, so the other way would be a circle).
impl AttackConfig {
    /// The common defaults, as the scenario changes them.
    pub fn defaults(scenario: Scenario) -> Self {
        let mut c = Self::common_defaults(scenario);
        scenario.logic().defaults(&mut c);
        c
    }

    /// Defaults of the scenario, then `file`'s settings, then `cli`'s.
    pub fn resolve(scenario: Scenario, file: Option<&Overrides>, cli: &Overrides) -> Result<Self> {
        let mut c = Self::defaults(scenario);
        for o in file.into_iter().chain(Some(cli)) {
            if let Some(s) = o.scenario {
                if s != scenario {
                    return Err(Error::Config(format!("the config says scenario `{}` but the command asks for `{}`", s.name(), scenario.name())));
                }
            }
            c.apply(o);
        }
        c.check()?;
        Ok(c)
    }
}

/// Training examples of the scenario from the data folder, a user's file (`train_data`), or
/// the model (self-generated backdoor prompts or steal's system prompts), at most `train_items`
/// of them.
pub fn train_items(cfg: &AttackConfig, lm: &LoadedModel, progress: &mut dyn FnMut(usize, usize)) -> Result<Vec<Item>> {
    let logic = cfg.scenario.logic();
    let items = match &cfg.train_data {
        Some(path) => file_items(cfg, path, cfg.seed)?,
        None if cfg.self_generated => logic.self_generated_items(cfg, lm, progress)?,
        None => logic.dataset_items(cfg, &Datasets::resolve(cfg.data_dir.as_deref())?, false, cfg.seed)?,
    };
    Ok(limit(items, cfg.train_items))
}

/// Which held-out examples `sos eval` answers.
#[derive(Debug, Clone, Default)]
pub enum HeldOut {
    /// The scenario's held-out split.
    #[default]
    Split,
    /// A named set of the scenario (`ScenarioLogic::held_out_sets`).
    Set(String),
    /// A user's JSONL file.
    File(std::path::PathBuf),
}

/// Held-out examples: the split of the data folder, a named set, or a user's JSONL file.
pub fn eval_items(cfg: &AttackConfig, source: &HeldOut) -> Result<Vec<Item>> {
    // Evaluation uses its own seed stream so trigger places differ from training's.
    let seed = cfg.seed.wrapping_add(1);
    let logic = cfg.scenario.logic();
    match source {
        HeldOut::Split => logic.dataset_items(cfg, &Datasets::resolve(cfg.data_dir.as_deref())?, true, seed),
        HeldOut::Set(name) => {
            let sets = logic.held_out_sets();
            if !sets.contains(&name.as_str()) {
                let known = if sets.is_empty() { "it has none".to_string() } else { format!("it has: {}", sets.join(", ")) };
                return Err(Error::Config(format!("{} has no held-out set `{name}` ({known})", cfg.scenario.name())));
            }
            logic.set_items(cfg, &Datasets::resolve(cfg.data_dir.as_deref())?, name, seed)
        }
        HeldOut::File(path) => file_items(cfg, path, seed),
    }
}

fn file_items(cfg: &AttackConfig, path: &Path, seed: u64) -> Result<Vec<Item>> {
    let rows = data::read_jsonl(path)?;
    if rows.is_empty() {
        return Err(Error::file(path, "no rows"));
    }
    cfg.scenario.logic().file_items(cfg, path, &rows, seed)
}

fn limit(items: Vec<Item>, n: usize) -> Vec<Item> {
    if n == 0 {
        items
    } else {
        items.into_iter().take(n).collect()
    }
}

/// The `id` of a user's JSONL row, or `rowN`.
fn row_id(row: &Value, i: usize) -> String {
    row["id"].as_str().map(String::from).unwrap_or_else(|| format!("row{}", i + 1))
}

/// `(id, row[key])` of every row.
fn id_and_field(path: &Path, rows: &[Value], key: &str) -> Result<Vec<(String, String)>> {
    rows.iter().enumerate().map(|(i, r)| Ok((row_id(r, i), data::field(path, r, i, key)?))).collect()
}

/// A byte offset drawn among the word boundaries of `text` (its start, its end and every
/// whitespace position).
fn random_boundary(text: &str, rng: &mut impl Rng) -> usize {
    let mut cuts = vec![0];
    cuts.extend(text.char_indices().filter(|(_, c)| *c == ' ').map(|(i, _)| i));
    cuts.push(text.len());
    cuts[rng.gen_range(0..cuts.len())]
}

fn place(text: &str, pos: Position, rng: &mut impl Rng) -> usize {
    match pos {
        // A prefix trigger is not in the text at all (`Item::prompt` puts it before the prompt).
        Position::Start | Position::Prefix => 0,
        Position::End => text.len(),
        Position::Random => random_boundary(text, rng),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_command_line_override_defaults() {
        let file: Overrides = toml::from_str("steps = 50\nlr = 0.5\ntrigger = \"zz\"").unwrap();
        let cli = Overrides { lr: Some(0.25), ..Default::default() };
        let c = AttackConfig::resolve(Scenario::Backdoor, Some(&file), &cli).unwrap();
        assert_eq!((c.steps, c.lr, c.trigger.as_str()), (50, 0.25, "zz"));
        assert_eq!(c.target.as_deref(), Some(DEFAULT_BACKDOOR_TARGET));
        let back: AttackConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(toml::from_str::<Overrides>("stepz = 3").is_err());
        let cli = Overrides { trigger_len: Some(0), ..Default::default() };
        assert!(AttackConfig::resolve(Scenario::Steal, None, &cli).is_err());
        let file = Overrides { scenario: Some(Scenario::Steal), ..Default::default() };
        assert!(AttackConfig::resolve(Scenario::Backdoor, Some(&file), &Overrides::default()).is_err());
        let cli = Overrides { target: Some(Some("say cf".into())), ..Default::default() };
        assert!(AttackConfig::resolve(Scenario::Backdoor, None, &cli).is_err());
        assert!(Overrides::default().is_empty() && !cli.is_empty());
        let cli = Overrides { position: Some(Position::Prefix), ..Default::default() };
        assert!(AttackConfig::resolve(Scenario::Copyright, None, &cli).is_err());
        assert!(AttackConfig::resolve(Scenario::Steal, None, &cli).is_ok());
        assert!("prefix".parse::<Position>().is_ok() && "middle".parse::<Position>().is_err());
    }
}
