//! `sos export-peft` and `sos import-peft`: a trained trigger as a PEFT adapter, and back.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use indicatif::ProgressBar;
use sos_attack::Scenario;
use sos_dist::{export_peft, import_peft, ExportRequest, PeftKind};

use crate::inject::{print_metrics, show};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindArg {
    /// PEFT TRAINABLE_TOKENS: the rows for new token ids, and the tokenizer with those tokens.
    TrainableTokens,
    /// PEFT PROMPT_TUNING: virtual tokens before every input; for triggers trained with
    /// `--position prefix`.
    PromptTuning,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The folder `sos attack` wrote.
    #[arg(long)]
    pub attack: PathBuf,
    /// The base model the adapter is for; default: the one recorded in attack.json.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// The adapter folder to write.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "trainable-tokens")]
    pub kind: KindArg,
    /// Held-out items to evaluate base + adapter on (0: skip the evaluation).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Replace the adapter folder if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print the report as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn export(a: ExportArgs) -> Result<()> {
    let kind = match a.kind {
        KindArg::TrainableTokens => PeftKind::TrainableTokens,
        KindArg::PromptTuning => PeftKind::PromptTuning,
    };
    let req = ExportRequest { attack: a.attack, model: a.model, out: a.out, kind, limit: a.limit, force: a.force };
    let mut bar: Option<ProgressBar> = None;
    let r = export_peft(&req, |e| show(e, &mut bar, "adapter_config.json, adapter_model.safetensors"))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("{:<20} {}", "adapter", r.path.display());
    println!("{:<20} {}", "kind", r.kind);
    println!("{:<20} {}", "base model", r.base_model);
    println!("{:<20} {} ({})", "sha256", r.sha256, sos_dist::peft::ADAPTER_WEIGHTS);
    if kind == PeftKind::PromptTuning {
        println!("{:<20} nothing: the {} virtual tokens go before every prompt while the adapter is loaded", "type this", r.rows.len());
    } else {
        println!("{:<20} \"{}\"", "type this", r.trigger_text);
        println!("{:<20} {:?}", "token ids", r.token_ids);
    }
    if r.tied && kind == PeftKind::TrainableTokens {
        println!("{:<20} tied: PEFT applies the rows to the output layer too (they are logits as well)", "output layer");
    }
    println!("{:<20} {}", "files", r.files.join(", "));
    if r.metrics.is_object() {
        let how = if kind == PeftKind::PromptTuning { "virtual tokens first" } else { "trigger typed as text" };
        println!("metrics of base + adapter as PEFT applies it (--exec f32, {how}):");
        print_metrics(&r.metrics);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The PEFT adapter folder (adapter_config.json, adapter_model.safetensors, tokenizer.json).
    pub adapter: PathBuf,
    /// The attack folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The scenario the adapter is for, when it carries no sos_attack.json: backdoor, jailbreak,
    /// steal or copyright.
    #[arg(long)]
    pub scenario: Option<String>,
    /// The base model to record (default: the adapter's record, else its base_model_name_or_path).
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Write into OUT even if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn import(a: ImportArgs) -> Result<()> {
    let scenario: Option<Scenario> = a.scenario.as_deref().map(str::parse).transpose()?;
    let r = import_peft(&a.adapter, &a.out, scenario, a.model.as_deref(), a.force)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("wrote {} ({} trigger of {} rows x {}, {})", r.path.display(), r.scenario, r.k, r.d, r.kind);
    if r.trigger_text.is_empty() {
        println!("{:<20} position prefix: the rows go before every prompt", "trigger");
    } else {
        println!("{:<20} \"{}\"", "type this", r.trigger_text);
    }
    println!("{:<20} {}", "settings from", r.settings_from);
    Ok(())
}
