//! `sos eval --attack DIR`: held-out metrics of a trained trigger, into DIR/eval.json.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use sos_attack::scenarios::HeldOut;
use sos_attack::{run_eval, EvalEvent, EvalRequest};
use sos_model::Exec;

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
    #[arg(long, conflicts_with = "set")]
    pub data: Option<PathBuf>,
    /// A named held-out set instead of the split: `long` (steal: long system prompts of other
    /// collections), `other-authors` (copyright: prose by authors never trained on). Results go
    /// to eval.NAME.json.
    #[arg(long)]
    pub set: Option<String>,
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
    let data = match (a.data, a.set) {
        (Some(p), _) => HeldOut::File(p),
        (None, Some(name)) => HeldOut::Set(name),
        (None, None) => HeldOut::Split,
    };
    let req = EvalRequest { attack: a.attack, model: a.model, data, limit: a.limit, exec: a.exec, device: device(&a.device)? };
    let mut bar: Option<ProgressBar> = None;
    let report = run_eval(&req, |e| match e {
        EvalEvent::Fetching(line) => eprintln!("{line}"),
        EvalEvent::Started { items } => {
            let b = ProgressBar::new(items as u64);
            b.set_style(ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})").expect("valid template").progress_chars("=> "));
            bar = Some(b);
        }
        EvalEvent::Progress { done, total } => {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(w) = &report.warning {
        eprintln!("warning: {w}");
    }
    if a.json {
        println!("{}", report.metrics);
    } else {
        for (k, v) in report.metrics.as_object().expect("object") {
            match v {
                Value::Number(n) if n.is_f64() => println!("{k:<32} {:.4}", n.as_f64().unwrap_or(f64::NAN)),
                Value::String(s) => println!("{k:<32} {s}"),
                other => println!("{k:<32} {other}"),
            }
        }
        eprintln!("wrote {}", report.eval_file.display());
    }
    Ok(())
}
