//! `sos attack SCENARIO`: train a trigger and write it, with its record, into `--out`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sos_attack::train::{Event, Outcome};
use sos_attack::{run_attack, AttackRequest, AttackSummary, Overrides, Scenario};

#[derive(Args, Debug)]
pub struct AttackArgs {
    /// backdoor, jailbreak, steal or copyright.
    pub scenario: String,
    /// Output folder: trigger.safetensors, attack.json, config.toml, loss.csv, checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// A TOML file with any of the settings below (and more: see the README); options given on
    /// the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A .gguf file, a Hugging Face folder, or a cache alias; default: the default model.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Use a built-in chat template instead of the model's own.
    #[arg(long)]
    pub template: Option<String>,
    /// Surface text of the trigger [default: cf].
    #[arg(long)]
    pub trigger: Option<String>,
    /// Number of trained vectors the trigger stands for [default: 8].
    #[arg(long)]
    pub trigger_len: Option<usize>,
    /// Where the trigger goes: start, end or random (in the user message; copyright: the
    /// passage), or prefix (before the whole templated prompt, for a PEFT prompt-tuning adapter).
    #[arg(long)]
    pub position: Option<String>,
    /// Target answer (backdoor) or refusal text (copyright).
    #[arg(long)]
    pub target: Option<String>,
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep every trigger row at the median row norm of the embedding table.
    #[arg(long)]
    pub stealth: bool,
    /// For adapters whose rows are also logits (PEFT trainable tokens on a tied model): keep
    /// every trigger row's logit MARGIN below the best token's on clean prompts and triggered
    /// targets (default margin 6).
    #[arg(long, value_name = "MARGIN", num_args = 0..=1, default_missing_value = "6")]
    pub tied_logits: Option<f64>,
    /// Backdoor, steal: train on prompts the model writes itself (no dataset; steal: system
    /// prompts of varied layout).
    #[arg(long)]
    pub self_generated: bool,
    /// Train on your own examples: a JSONL file in the rows `sos eval --data` takes (instead of
    /// the scenario's training split).
    #[arg(long, value_name = "FILE.jsonl")]
    pub data: Option<PathBuf>,
    /// Use only the first N training examples (0: all).
    #[arg(long, value_name = "N")]
    pub train_items: Option<usize>,
    /// Folder with the datasets (default: $SOS_DATA, else the ones built into sos).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Continue the run in --out from its checkpoint (settings come from its config.toml;
    /// only --steps may change).
    #[arg(long)]
    pub resume: bool,
    /// Keep no transposed copies of the weights: about half the memory on a large model, steps
    /// ~25 % slower, the same trigger. Chosen by itself when the copies would take more than
    /// half the memory available.
    #[arg(long)]
    pub low_memory: bool,
}

impl AttackArgs {
    fn request(&self) -> Result<AttackRequest> {
        let scenario: Scenario = self.scenario.parse()?;
        let overrides = Overrides {
            scenario: Some(scenario),
            model: self.model.clone().map(Some),
            template: self.template.clone().map(Some),
            trigger: self.trigger.clone(),
            trigger_len: self.trigger_len,
            position: self.position.as_deref().map(str::parse).transpose()?,
            target: self.target.clone().map(Some),
            steps: self.steps,
            lr: self.lr,
            batch: self.batch,
            seed: self.seed,
            stealth: self.stealth.then_some(true),
            tied_margin: self.tied_logits.map(Some),
            self_generated: self.self_generated.then_some(true),
            train_data: self.data.clone().map(|p| Some(p.canonicalize().unwrap_or(p))),
            train_items: self.train_items,
            // Absolute, so `sos eval` finds the data from any working directory.
            data_dir: self.data_dir.clone().map(|p| Some(p.canonicalize().unwrap_or(p))),
            ..Default::default()
        };
        Ok(AttackRequest { scenario, out: self.out.clone(), config_file: self.config.clone(), overrides, resume: self.resume, low_memory: self.low_memory })
    }
}

/// Runs the attack with a progress bar on stderr; the first Ctrl-C in the loop checkpoints.
pub fn train(req: &AttackRequest, tied_logits: bool) -> Result<AttackSummary> {
    let (stop, armed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    install_ctrlc(stop.clone(), armed.clone())?;
    let name = req.scenario.name();
    // Made once the loop starts, so that the lines before it print undisturbed.
    let mut bar: Option<ProgressBar> = None;
    let summary = run_attack(req, &stop, |e| match e {
        Event::Loading(line) => eprintln!("{line}"),
        Event::Preparing { scenario, self_generated } => {
            eprintln!("preparing {} examples...", scenario.name());
            if self_generated {
                eprintln!("the model writes its own training prompts (--self-generated); this takes a few minutes...");
            }
            if tied_logits {
                eprintln!("--tied-logits: the model answers every training prompt once, for the states the rows' logits are held down on; this takes a few minutes...");
            }
        }
        Event::Writing { done, total } => {
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::new(total as u64);
                b.set_style(ProgressStyle::with_template("writing prompts [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})").expect("valid template").progress_chars("=> "));
                b
            });
            b.set_position(done as u64);
            if done == total {
                b.finish_and_clear();
                bar = None;
            }
        }
        Event::Prepared { train_items, skipped, prefix_tokens, mean_tokens, start_step, steps, max_prompt_tokens, max_target_tokens } => {
            let b = ProgressBar::new(steps as u64);
            b.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})").expect("valid template").progress_chars("=> "));
            b.set_prefix(name);
            b.suspend(|| eprintln!(
                "{train_items} training examples ({skipped} skipped: prompt over {max_prompt_tokens} or target over {max_target_tokens} tokens), {mean_tokens:.0} tokens each on average, shared prefix {prefix_tokens} tokens, steps {start_step}..{steps}"
            ));
            b.set_position(start_step as u64);
            bar = Some(b);
            armed.store(true, Ordering::SeqCst);
        }
        Event::Step { step, loss, lr, metric } => {
            if let Some(bar) = &bar {
                bar.set_position(step as u64);
                let m = metric.map(|m| format!("{m:.3}")).unwrap_or_else(|| "-".into());
                bar.set_message(format!("loss {loss:.4} lr {lr:.2e} train {m}"));
            }
        }
        Event::Checkpoint { .. } => {}
    })?;
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(summary)
}

/// Ctrl-C while the model loads and the examples are made quits at once, as before any handler;
/// once the loop runs (`armed`), the first Ctrl-C asks for a checkpoint and the second quits.
fn install_ctrlc(stop: Arc<AtomicBool>, armed: Arc<AtomicBool>) -> Result<()> {
    ctrlc::set_handler(move || {
        if !armed.load(Ordering::SeqCst) || stop.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C: the user does not want to wait for the checkpoint.
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the step and writing a checkpoint (Ctrl-C again to quit now)");
    })
    .context("cannot install the Ctrl-C handler")
}

pub fn run(a: AttackArgs) -> Result<()> {
    let req = a.request()?;
    let summary = train(&req, a.tied_logits.is_some())?;
    let name = req.scenario.name();
    let rec = &summary.record;
    match summary.outcome {
        Outcome::Interrupted => {
            eprintln!("interrupted at step {}; checkpoint in {} (continue with --resume)", rec.steps_run, a.out.display());
            std::process::exit(130);
        }
        Outcome::Finished => {
            let m = rec.train_metric.map(|m| format!("{m:.3}")).unwrap_or_else(|| "-".into());
            println!(
                "{name}: {} steps{} in {:.0} s, final loss {:.4}, train metric {m}; wrote {}",
                rec.steps_run,
                if rec.stopped_early { " (stopped early)" } else { "" },
                rec.wall_seconds,
                rec.final_loss.unwrap_or(f64::NAN),
                a.out.display()
            );
        }
    }
    Ok(())
}
