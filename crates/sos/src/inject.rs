//! `sos inject --attack DIR --out FILE`: the trained trigger baked into a copy of the model.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sos_dist::{run_inject, InjectEvent, InjectRequest, Mode};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    /// Append the trigger's k rows as k new USER_DEFINED tokens.
    AddToken,
    /// Overwrite the rows of k existing tokens that are rare in ordinary text (chosen and
    /// reported); the vocabulary stays as it was.
    ReplaceToken,
}

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// The folder `sos attack` wrote.
    #[arg(long)]
    pub attack: PathBuf,
    /// The file to write (a GGUF); for a Hugging Face folder model, the folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The model to inject into; default: the one recorded in attack.json.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    #[arg(long, value_enum, default_value = "add-token")]
    pub mode: ModeArg,
    /// Held-out items to evaluate the written file on (0: skip the evaluation).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print the report as one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InjectArgs) -> Result<()> {
    let mode = match a.mode {
        ModeArg::AddToken => Mode::AddToken,
        ModeArg::ReplaceToken => Mode::ReplaceToken,
    };
    let req = InjectRequest { attack: a.attack, out: a.out, model: a.model, mode, limit: a.limit, force: a.force };
    let mut bar: Option<ProgressBar> = None;
    let report = run_inject(&req, |e| show(e, &mut bar, "checked: the loader's rules (llama.cpp's for a GGUF), tokenization of the trigger"))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("{:<20} {}", "file", report.path.display());
    println!("{:<20} {}", "sha256", report.sha256);
    println!("{:<20} {}", "mode", report.mode);
    let note = if report.trigger_text.starts_with(' ') { " (the leading space is part of it)" } else { "" };
    println!("{:<20} \"{}\"{note}", "type this", report.trigger_text);
    println!("{:<20} {:?}", "token ids", report.token_ids);
    println!("{:<20} {} (table rows: median norm {:.3})", "row type", report.table_type, report.table_median_norm);
    for r in &report.rows {
        println!("  {:<18} id {:<7} norm {:>8.3}  quantization error {:.2}%", r.text, r.id, r.norm, 100.0 * r.quant_rel_error);
    }
    if report.metrics.is_object() {
        println!("metrics of the file (--exec quant, trigger typed as text):");
        print_metrics(&report.metrics);
    }
    Ok(())
}

/// Progress of `inject` and `export-peft` on stderr: fetching, the written path, an eval bar.
pub fn show(e: InjectEvent, bar: &mut Option<ProgressBar>, checked: &str) {
    match e {
        InjectEvent::Fetching(line) => eprintln!("{line}"),
        InjectEvent::Written { path } => eprintln!("wrote {} ({checked})", path.display()),
        InjectEvent::Progress { done, total } => {
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::new(total as u64);
                b.set_style(ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})").expect("valid template").progress_chars("=> "));
                b
            });
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    }
}

/// The held-out metrics, one per line.
pub fn print_metrics(m: &serde_json::Value) {
    if let Some(m) = m.as_object() {
        for (k, v) in m {
            match v.as_f64() {
                Some(x) if v.is_f64() => println!("  {k:<30} {x:.4}"),
                _ => println!("  {k:<30} {v}"),
            }
        }
    }
}
