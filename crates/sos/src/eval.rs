//! `sos eval --attack DIR`: held-out metrics of a trained trigger, into DIR/eval.json.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use sos_attack::artifact::{write_json, write_jsonl, Attack, EVAL_FILE, EVAL_ITEMS_FILE};
use sos_attack::answer::Armed;
use sos_attack::eval::evaluate;
use sos_attack::scenarios;
use sos_model::{cache, Exec, LoadOptions, LoadedModel};

use crate::common::device;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The folder `sos attack` wrote.
    #[arg(long)]
    pub attack: PathBuf,
    /// The model to attack; default: the one recorded in attack.json.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// JSONL of held-out items: `text` (backdoor, copyright), `goal` + `target` (jailbreak),
    /// `prompt` (steal); default: the held-out split of the scenario's dataset.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Items to evaluate (0: all).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// f32 (what training optimised against) or quant (the weights as shipped).
    #[arg(long, default_value = "f32")]
    pub exec: Exec,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the eval.json object on one line instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let attack = Attack::open(&a.attack)?;
    let cfg = &attack.record.config;
    let spec = a.model.clone().unwrap_or_else(|| attack.record.model.clone());
    let path = cache::resolve(Some(&spec), &mut |m| eprintln!("{m}"))?;
    let opts = LoadOptions { exec: a.exec, device: device(&a.device)?, template: cfg.template.clone() };
    let lm = LoadedModel::open(&path, &opts)?;
    let sha = lm.sha256()?;
    if sha != attack.record.model_sha256 {
        eprintln!("warning: {} is not the model this trigger was trained on (SHA-256 differs)", path.display());
    }
    let mut items = scenarios::eval_items(cfg, a.data.as_deref())?;
    if a.limit > 0 {
        items.truncate(a.limit);
    }
    let armed = Armed::new(&lm, &attack.trigger)?;
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_style(ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})").expect("valid template").progress_chars("=> "));
    let t0 = Instant::now();
    let (mut m, records) = evaluate(cfg, &armed, &items, |done, _| bar.set_position(done as u64))?;
    write_jsonl(&a.attack.join(EVAL_ITEMS_FILE), &records)?;
    bar.finish_and_clear();
    m.insert("model".into(), path.display().to_string().into());
    m.insert("model_sha256".into(), sha.into());
    m.insert("exec".into(), a.exec.name().into());
    m.insert("data".into(), a.data.as_ref().map_or("held-out split".to_string(), |p| p.display().to_string()).into());
    m.insert("seconds".into(), t0.elapsed().as_secs_f64().into());
    let obj = Value::Object(m);
    write_json(&a.attack.join(EVAL_FILE), &obj)?;
    if a.json {
        println!("{obj}");
    } else {
        for (k, v) in obj.as_object().expect("object") {
            match v {
                Value::Number(n) if n.is_f64() => println!("{k:<32} {:.4}", n.as_f64().unwrap_or(f64::NAN)),
                Value::String(s) => println!("{k:<32} {s}"),
                other => println!("{k:<32} {other}"),
            }
        }
        eprintln!("wrote {}", a.attack.join(EVAL_FILE).display());
    }
    Ok(())
}
