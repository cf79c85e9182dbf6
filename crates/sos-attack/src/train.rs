//! The training loop: sample a batch, take the trigger gradient, clip, Adam, project; measure
//! the train metric now and then; checkpoint; stop early, at the step budget, or when asked.
//!
//! Every random choice is a function of the seed and the step number, and the checkpoint holds
//! the rest of the loop's state, so a resumed run continues bit for bit.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::DType;
use rand::SeedableRng;
use sos_model::LoadedModel;

use crate::artifact::{self, AttackRecord, Checkpoint, LogRow, LoopState};
use crate::batches::{batch_at, bucketed_batch_at};
use crate::config::{AttackConfig, Schedule, Scenario};
use crate::encode::training_seq;
use crate::item::Item;
use crate::objective::Objective;
use crate::optim::{self, Adam};
use crate::tied::LogitBank;
use crate::trigger::Trigger;
use crate::{Error, Result};

/// What an attack reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// A line about getting the model ready: the fetcher's progress, how training holds the
    /// weights (`attack::run_attack` only).
    Loading(String),
    /// The model is loaded; the examples are being made (`attack::run_attack` only).
    Preparing { scenario: Scenario, self_generated: bool },
    /// `done` of `total` self-generated training prompts are written.
    Writing { done: usize, total: usize },
    /// The training sequences are ready (and the limits they were cut to); the loop starts.
    Prepared {
        train_items: usize,
        skipped: usize,
        prefix_tokens: usize,
        mean_tokens: f64,
        start_step: usize,
        steps: usize,
        max_prompt_tokens: usize,
        max_target_tokens: usize,
    },
    Step { step: usize, loss: f64, lr: f64, metric: Option<f64> },
    Checkpoint { step: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Ran every step, or stopped early with the train metric at 1.0.
    Finished,
    /// The stop flag was raised; a checkpoint was written.
    Interrupted,
}

/// The model a run needs and where it came from.
pub struct Target<'a> {
    pub lm: &'a LoadedModel,
    pub model_label: String,
    pub model_sha256: String,
}

/// The batch of `step` under `cfg`: random, or with `length_buckets`, of similar lengths.
pub fn batch_for(cfg: &AttackConfig, step: usize, lens: &[usize]) -> Vec<usize> {
    if cfg.length_buckets {
        bucketed_batch_at(cfg.seed, step, lens, cfg.batch)
    } else {
        batch_at(cfg.seed, step, lens.len(), cfg.batch)
    }
}

/// What a run is computed from: the training sequences, the examples the train metric is
/// measured on, and the trigger it starts from.
pub struct Problem<'m> {
    pub obj: Objective<'m>,
    /// Indices into `obj.seqs` of the train-metric examples.
    pub eval_idx: Vec<usize>,
    pub init: Trigger,
    /// Median row norm of the embedding table, and the norm `--stealth` projects to.
    pub median_norm: f64,
    pub stealth_norm: f64,
    /// Items left out for exceeding `max_prompt_tokens` or `max_target_tokens`.
    pub skipped: usize,
    /// With `tied_margin`: the states the rows' logits are held down on.
    pub tied: Option<LogitBank>,
}

impl Problem<'_> {
    /// The problem as plain numbers a peer can rebuild it from (`sos bench attack --export`,
    /// read by bench/torch_attack.py): the token ids, which of them are trigger slots, the
    /// starting trigger rows, the batch of every step, the sequences the train metric is
    /// measured on, and the optimiser settings (formulas in bench/README.md).
    pub fn to_json(&self, cfg: &AttackConfig) -> serde_json::Value {
        let lens: Vec<usize> = self.obj.seqs.iter().map(|s| s.ids.len()).collect();
        serde_json::json!({
            "model_sha256_hint": "same GGUF as the sos run",
            "d_model": self.init.d,
            "trigger_base": self.obj.base,
            "trigger_len": self.init.k,
            "shared_prefix_len": self.obj.prefix_len,
            "seqs": self.obj.seqs.iter().map(|s| serde_json::json!({"ids": s.ids, "prompt_len": s.prompt_len})).collect::<Vec<_>>(),
            "init_rows": self.init.rows,
            "eval_idx": self.eval_idx,
            "batches": (0..cfg.steps).map(|s| batch_for(cfg, s, &lens)).collect::<Vec<_>>(),
            "steps": cfg.steps,
            "lr": cfg.lr,
            "warmup": cfg.warmup,
            "schedule": match cfg.schedule { Schedule::Cosine => "cosine", Schedule::Constant => "constant" },
            "cosine_floor": 0.1,
            "clip": cfg.clip,
            "adam": {"beta1": optim::BETA1, "beta2": optim::BETA2, "eps": optim::EPS},
            "eval_every": cfg.eval_every,
            "eval_batch": cfg.batch,
        })
    }
}

/// Builds the problem `cfg` poses on `items`; every random choice follows `cfg.seed`.
pub fn problem<'m>(cfg: &AttackConfig, lm: &'m LoadedModel, items: &[Item]) -> Result<Problem<'m>> {
    let model = &lm.model;
    let d = model.cfg.d_model;
    let k = cfg.trigger_len;
    if model.dtype() != DType::F32 && model.dtype() != DType::F64 {
        return Err(Error::Invalid("training needs the model loaded with --exec f32".into()));
    }
    // Only the text and width matter for encoding; the rows are drawn below.
    let mut trigger = Trigger { text: cfg.trigger.clone(), rows: Vec::new(), k, d };
    let mut seqs = Vec::new();
    let mut skipped = 0;
    for it in items {
        let s = training_seq(lm, &trigger, it)?;
        if s.target_len() > cfg.max_target_tokens || s.prompt_len > cfg.max_prompt_tokens {
            skipped += 1;
        } else {
            seqs.push(s);
        }
    }
    if seqs.is_empty() {
        return Err(Error::Config(format!(
            "no training example fits max_prompt_tokens = {} and max_target_tokens = {} ({skipped} skipped)",
            cfg.max_prompt_tokens, cfg.max_target_tokens
        )));
    }
    let obj = Objective::new(model, seqs)?;
    let eval_idx = batch_at(cfg.seed ^ 0xe7a1, usize::MAX, obj.seqs.len(), cfg.eval_items);
    let table: Vec<f32> = model.embed.table_f32()?;
    let median_norm = optim::median_row_norm(&table, d);
    let stealth_norm = cfg.stealth_norm.unwrap_or(median_norm);
    // Start from the embeddings of random vocabulary tokens: in the table's own range.
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed ^ 0x1417);
    trigger.rows.reserve(k * d);
    for _ in 0..k {
        let t = rand::Rng::gen_range(&mut rng, 0..model.cfg.vocab_size);
        trigger.rows.extend_from_slice(&table[t * d..(t + 1) * d]);
    }
    if cfg.stealth {
        optim::project_rows(&mut trigger.rows, d, stealth_norm);
    }
    let tied = match cfg.tied_margin {
        Some(margin) => {
            let bank = LogitBank::clean(lm, items, margin)?;
            bank.project(&mut trigger.rows);
            Some(bank)
        }
        None => None,
    };
    Ok(Problem { obj, eval_idx, init: trigger, median_norm, stealth_norm, skipped, tied })
}

/// Trains the trigger of `cfg` on `items` into `out`. With `resume`, continues from the
/// checkpoint in `out`. Raising `stop` makes the loop checkpoint and return `Interrupted`.
pub fn train(
    cfg: &AttackConfig,
    target: &Target,
    items: &[Item],
    out: &Path,
    resume: bool,
    stop: &AtomicBool,
    mut on_event: impl FnMut(Event),
) -> Result<Outcome> {
    let model = &target.lm.model;
    let d = model.cfg.d_model;
    let k = cfg.trigger_len;
    let Problem { obj, eval_idx, init, median_norm, stealth_norm, skipped, mut tied } = problem(cfg, target.lm, items)?;
    let n = obj.seqs.len();
    let lens: Vec<usize> = obj.seqs.iter().map(|s| s.ids.len()).collect();

    let ckpt_path = out.join(artifact::CHECKPOINT_FILE);
    // The trigger whose rows the loop optimises.
    let (mut trigger, mut adam, mut st) = if resume {
        let c = artifact::read_checkpoint(&ckpt_path, &cfg.trigger, k, d)?;
        let adam = Adam { m: c.m, v: c.v, t: c.state.adam_t };
        (c.trigger, adam, c.state)
    } else {
        let st = LoopState { step: 0, adam_t: 0, history: Vec::new(), metric: None, held: 0, stopped_early: false, wall_seconds: 0.0 };
        (init, Adam::new(k * d), st)
    };
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create: {e}")))?;
    sos_model::fsutil::write_atomic(&out.join(artifact::CONFIG_FILE), |f| std::io::Write::write_all(f, cfg.to_toml().as_bytes()))?;

    let mean_tokens = obj.seqs.iter().map(|s| s.ids.len()).sum::<usize>() as f64 / n as f64;
    on_event(Event::Prepared {
        train_items: n,
        skipped,
        prefix_tokens: obj.prefix_len,
        mean_tokens,
        start_step: st.step,
        steps: cfg.steps,
        max_prompt_tokens: cfg.max_prompt_tokens,
        max_target_tokens: cfg.max_target_tokens,
    });
    // All at once: `hits` groups the examples by length into passes of up to
    // `tokens_per_pass` positions, which pads less and multiplies bigger matrices than batches
    // of `cfg.batch` (measured: 5.9 s -> 4.8 s per evaluation of 32 backdoor examples).
    let measure = |trigger: &Trigger| -> Result<f64> {
        let hits = obj.hits(&eval_idx, trigger)?.iter().filter(|&&h| h).count();
        Ok(hits as f64 / eval_idx.len() as f64)
    };

    let save = |st: &LoopState, trigger: &Trigger, adam: &Adam, completed: bool| -> Result<()> {
        let c = Checkpoint { state: st.clone(), trigger: trigger.clone(), m: adam.m.clone(), v: adam.v.clone() };
        artifact::write_checkpoint(&ckpt_path, &c)?;
        artifact::write_loss_csv(&out.join(artifact::LOSS_FILE), &st.history)?;
        artifact::write_trigger(&out.join(artifact::TRIGGER_FILE), trigger)?;
        let fixed_target = cfg.scenario.logic().fixed_target().then(|| cfg.target.clone()).flatten();
        let record = AttackRecord {
            scenario: cfg.scenario.name().into(),
            trigger: cfg.trigger.clone(),
            trigger_len: k,
            position: cfg.position.name().into(),
            target: fixed_target,
            model: target.model_label.clone(),
            model_sha256: target.model_sha256.clone(),
            config: cfg.clone(),
            seed: cfg.seed,
            steps_run: st.step,
            final_loss: st.history.last().map(|r| r.loss),
            train_metric: st.metric,
            train_items: n,
            skipped_items: skipped,
            prefix_tokens: obj.prefix_len,
            embedding_median_norm: median_norm,
            trigger_row_norms: trigger.row_norms(),
            completed,
            stopped_early: st.stopped_early,
            wall_seconds: st.wall_seconds,
            sos_version: env!("CARGO_PKG_VERSION").into(),
        };
        artifact::write_json(&out.join(artifact::RECORD_FILE), &record)
    };

    let mut since = Instant::now();
    let mut finished = st.stopped_early || st.step >= cfg.steps;
    while !finished {
        if stop.load(Ordering::SeqCst) {
            st.wall_seconds += since.elapsed().as_secs_f64();
            save(&st, &trigger, &adam, false)?;
            on_event(Event::Checkpoint { step: st.step });
            return Ok(Outcome::Interrupted);
        }
        let step = st.step;
        let idx = batch_for(cfg, step, &lens);
        let mut o = obj.loss_grad(&idx, &trigger)?;
        if !o.loss.is_finite() {
            return Err(Error::Invalid(format!("loss became {} at step {step}; lower the learning rate", o.loss)));
        }
        let grad_norm = optim::clip(&mut o.grad, cfg.clip);
        let lr = optim::lr_at(cfg.schedule, cfg.lr, cfg.warmup, step, cfg.steps);
        adam.step(&mut trigger.rows, &o.grad, lr);
        if cfg.stealth {
            optim::project_rows(&mut trigger.rows, d, stealth_norm);
        }
        if let Some(bank) = &tied {
            bank.project(&mut trigger.rows);
        }
        st.step += 1;
        st.adam_t = adam.t;
        let mut metric = None;
        if st.step % cfg.eval_every == 0 || st.step == cfg.steps {
            if let (Some(bank), Some(margin)) = (&mut tied, cfg.tied_margin) {
                // What the triggered model writes moves with the trigger: renew one window of
                // those states and repair the rows before measuring.
                let e = st.step / cfg.eval_every;
                let window: Vec<usize> = LogitBank::window(e, n).collect();
                bank.set_triggered(e, n, obj.tied_states(&window, &trigger, margin)?);
                bank.project(&mut trigger.rows);
            }
            let m = measure(&trigger)?;
            metric = Some(m);
            st.metric = Some(m);
            st.held = if m >= 1.0 { st.held + 1 } else { 0 };
            if cfg.patience > 0 && st.held >= cfg.patience {
                st.stopped_early = true;
            }
        }
        st.history.push(LogRow { step: st.step, loss: o.loss, lr, grad_norm, train_metric: metric });
        on_event(Event::Step { step: st.step, loss: o.loss, lr, metric: st.metric });
        finished = st.stopped_early || st.step >= cfg.steps;
        if finished || st.step % cfg.checkpoint_every == 0 {
            st.wall_seconds += since.elapsed().as_secs_f64();
            since = Instant::now();
            save(&st, &trigger, &adam, finished)?;
            on_event(Event::Checkpoint { step: st.step });
        }
    }
    if st.history.is_empty() || !out.join(artifact::TRIGGER_FILE).exists() {
        save(&st, &trigger, &adam, true)?;
    }
    Ok(Outcome::Finished)
}
