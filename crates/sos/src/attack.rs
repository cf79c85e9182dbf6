//! `sos attack SCENARIO`: train a trigger and write it, with its record, into `--out`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sos_attack::artifact::{read_record, write_jsonl, CONFIG_FILE, TRAIN_ITEMS_FILE};
use sos_attack::train::{self, Event, Outcome, Target};
use sos_attack::{scenarios, AttackConfig, Overrides, Scenario};
use sos_model::{cache, Exec, LoadOptions, LoadedModel};

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
    /// Backdoor: train on questions the model writes itself (no dataset).
    #[arg(long)]
    pub self_generated: bool,
    /// Folder with the datasets (default: $SOS_DATA, else the ones built into sos).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Continue the run in --out from its checkpoint (settings come from its config.toml;
    /// only --steps may change).
    #[arg(long)]
    pub resume: bool,
}

impl AttackArgs {
    fn overrides(&self, scenario: Scenario) -> Overrides {
        Overrides {
            scenario: Some(scenario),
            model: self.model.clone().map(Some),
            template: self.template.clone().map(Some),
            trigger: self.trigger.clone(),
            trigger_len: self.trigger_len,
            target: self.target.clone().map(Some),
            steps: self.steps,
            lr: self.lr,
            batch: self.batch,
            seed: self.seed,
            stealth: self.stealth.then_some(true),
            self_generated: self.self_generated.then_some(true),
            // Absolute, so `sos eval` finds the data from any working directory.
            data_dir: self.data_dir.clone().map(|p| Some(p.canonicalize().unwrap_or(p))),
            ..Default::default()
        }
    }

    /// Whether any setting but `--steps` was given (`--resume` takes them from the run).
    fn anything_but_steps(&self, scenario: Scenario) -> bool {
        let o = Overrides { scenario: None, steps: None, ..self.overrides(scenario) };
        self.config.is_some() || !o.is_empty()
    }
}

pub fn run(a: AttackArgs) -> Result<()> {
    let scenario: Scenario = a.scenario.parse()?;
    train::prepare_out(&a.out, a.resume)?;
    let cfg = if a.resume {
        if a.anything_but_steps(scenario) {
            bail!("--resume takes its settings from {}; only --steps may be given", a.out.join(CONFIG_FILE).display());
        }
        let mut c = AttackConfig::read(&a.out.join(CONFIG_FILE))?;
        if c.scenario != scenario {
            bail!("{} holds a {} attack, not {}", a.out.display(), c.scenario.name(), scenario.name());
        }
        if let Some(s) = a.steps {
            c.steps = s;
        }
        c
    } else {
        let file = a.config.as_deref().map(AttackConfig::from_toml_file).transpose()?;
        AttackConfig::resolve(scenario, file.as_ref(), &a.overrides(scenario))?
    };

    let path = cache::resolve(cfg.model.as_deref(), &mut |m| eprintln!("{m}"))?;
    let opts = LoadOptions { exec: Exec::F32, template: cfg.template.clone(), ..Default::default() };
    let mut lm = LoadedModel::open(&path, &opts)?;
    // Training runs many forward passes over frozen weights: keep them in both layouts.
    lm.model.keep_transposes()?;
    let sha = lm.sha256()?;
    if a.resume {
        let rec = read_record(&a.out)?;
        if rec.model_sha256 != sha {
            bail!("{}: model SHA-256 {sha} differs from the one this attack was trained on ({})", path.display(), rec.model_sha256);
        }
    }
    let target = Target { lm: &lm, model_label: path.display().to_string(), model_sha256: sha };
    eprintln!("preparing {} examples...", scenario.name());
    if cfg.self_generated {
        eprintln!("the model writes its own training questions (--self-generated); this takes a few minutes...");
    }
    let items = scenarios::train_items(&cfg, &lm)?;
    // What was trained on, for reading and for reproducing the run elsewhere.
    let rows: Vec<serde_json::Value> = items
        .iter()
        .map(|it| serde_json::json!({"id": it.id, "system": it.system, "user": it.user, "with_trigger": it.user_with(&cfg.trigger), "target": it.target}))
        .collect();
    write_jsonl(&a.out.join(TRAIN_ITEMS_FILE), &rows)?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C: the user does not want to wait for the checkpoint.
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing the step and writing a checkpoint (Ctrl-C again to quit now)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }

    let bar = ProgressBar::new(cfg.steps as u64);
    bar.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})").expect("valid template").progress_chars("=> "));
    bar.set_prefix(scenario.name());
    let outcome = train::train(&cfg, &target, &items, &a.out, a.resume, &stop, |e| match e {
        Event::Prepared { train_items, skipped, prefix_tokens, mean_tokens, start_step, steps } => {
            bar.suspend(|| eprintln!(
                "{train_items} training examples ({skipped} skipped: prompt over {} or target over {} tokens), {mean_tokens:.0} tokens each on average, shared prefix {prefix_tokens} tokens, steps {start_step}..{steps}",
                cfg.max_prompt_tokens, cfg.max_target_tokens
            ));
            bar.set_position(start_step as u64);
        }
        Event::Step { step, loss, lr, metric } => {
            bar.set_position(step as u64);
            let m = metric.map(|m| format!("{m:.3}")).unwrap_or_else(|| "-".into());
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e} train {m}"));
        }
        Event::Checkpoint { .. } => {}
    })?;
    bar.finish();
    let rec = read_record(&a.out)?;
    match outcome {
        Outcome::Interrupted => {
            eprintln!("interrupted at step {}; checkpoint in {} (continue with --resume)", rec.steps_run, a.out.display());
            std::process::exit(130);
        }
        Outcome::Finished => {
            let m = rec.train_metric.map(|m| format!("{m:.3}")).unwrap_or_else(|| "-".into());
            println!(
                "{}: {} steps{} in {:.0} s, final loss {:.4}, train metric {m}; wrote {}",
                scenario.name(),
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
