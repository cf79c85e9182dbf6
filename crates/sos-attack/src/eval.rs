//! Held-out evaluation of a trained trigger: the scenario scores greedy answers.

use serde_json::{Map, Value};

use crate::answer::Armed;
use crate::config::AttackConfig;
use crate::item::Item;
use crate::{Error, Result};

/// Evaluates on `items` (already limited). Returns the flat metrics object of `eval.json` and
/// one record per answer (prompt, answers, verdicts) for `eval_items.jsonl`.
/// `progress(done, total)` is called after each item.
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
