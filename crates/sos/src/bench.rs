//! `sos bench generate|step`: throughput numbers, the median of several runs after a warm-up.
//! Ratios against peers (llama.cpp, PyTorch) come from the scripts under `bench/`, which run
//! these commands and the peer in the same session.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use serde_json::json;
use sos_model::generate::{generate, generate_many, Sampling};
use sos_model::Model;

use sos_attack::train::{self, Event, Target};
use sos_attack::{load_model, scenarios, AttackConfig, Overrides, Purpose, Scenario};
use sos_model::{Exec, LoadOptions};

use crate::common::{peak_rss_mib, ModelArgs};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Prompt processing and decode speed with the KV cache (greedy, EOS ignored).
    Generate(GenBench),
    /// One attack step: forward, loss on target positions, gradient to the input embeddings.
    /// `seconds_per_step` caches the prompt before the soft positions as a prefix (as the attack
    /// does); `seconds_per_step_full` runs every position forward and backward.
    Step(StepBench),
    /// Time for the default backdoor attack to reach a train metric of 1.0 (its first
    /// evaluation at 1.0); `--export` writes the exact problem for a peer (bench/torch_attack.py).
    Attack(AttackBench),
    /// Whole-file SHA-256 (what `sos manifest` and the audit's provenance cost) against
    /// `openssl dgst -sha256` on the same file, in the same run.
    Hash(HashBench),
}

#[derive(Args, Debug)]
pub struct HashBench {
    /// The file to hash (ideally about 1 GB).
    pub file: std::path::PathBuf,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenBench {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 100)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Sequences decoded together (`generate_many`); above 1, a one-sequence run in the same
    /// process gives `batch_speedup`.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StepBench {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Trigger positions whose gradient is wanted.
    #[arg(long, default_value_t = 8)]
    pub soft: usize,
    /// Positions with a loss (the output layer runs on these only).
    #[arg(long, default_value_t = 16)]
    pub targets: usize,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Without the transposed copies of the weights training keeps when they fit (`sos attack
    /// --low-memory`).
    #[arg(long)]
    pub low_memory: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AttackBench {
    /// A .gguf file, a Hugging Face folder, or a cache alias; default: the default model.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Step budget of the run, which is also the length of its cosine schedule, so it changes
    /// the learning rate of every step [default: the backdoor default, 200].
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Folder with the datasets (default: $SOS_DATA, else the ones built into sos).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Write the problem (token ids, starting trigger, batches, settings) to this JSON file.
    #[arg(long)]
    pub export: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const FILLER: &str = "The quick brown fox jumps over the lazy dog while the committee reviews the annual report on river water quality, and a child reads a story about ships. ";

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Generate(a) => bench_generate(a),
        BenchCmd::Step(a) => bench_step(a),
        BenchCmd::Attack(a) => bench_attack(a),
        BenchCmd::Hash(a) => bench_hash(a),
    }
}

/// Best of `runs` for sos's SHA-256 and for openssl's, alternating, on a file read once before
/// (page cache warm for both).
fn bench_hash(a: HashBench) -> Result<()> {
    anyhow::ensure!(a.runs >= 1, "runs must be >= 1");
    let size = std::fs::metadata(&a.file)?.len() as f64;
    sos_audit::manifest::sha256_file(&a.file)?;
    let (mut ours, mut theirs) = (f64::INFINITY, f64::INFINITY);
    let mut openssl_ok = true;
    for _ in 0..a.runs {
        let t = Instant::now();
        let d = sos_audit::manifest::sha256_file(&a.file)?;
        ours = ours.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        match std::process::Command::new("openssl").args(["dgst", "-sha256"]).arg(&a.file).output() {
            Ok(o) if o.status.success() => {
                theirs = theirs.min(t.elapsed().as_secs_f64());
                let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
                anyhow::ensure!(String::from_utf8_lossy(&o.stdout).contains(&hex), "openssl and sos disagree on the digest of {}", a.file.display());
            }
            _ => openssl_ok = false,
        }
    }
    let gbs = |s: f64| size / s / 1e9;
    let ratio = if openssl_ok { Some(theirs / ours) } else { None };
    if a.json {
        println!("{}", json!({"file": a.file.display().to_string(), "bytes": size, "sos_s": ours, "sos_gb_s": gbs(ours), "openssl_s": openssl_ok.then_some(theirs), "openssl_gb_s": openssl_ok.then(|| gbs(theirs)), "speed_vs_openssl": ratio}));
    } else {
        println!("sos     {:.3} s  {:.2} GB/s", ours, gbs(ours));
        if let Some(r) = ratio {
            println!("openssl {:.3} s  {:.2} GB/s", theirs, gbs(theirs));
            println!("sos speed / openssl speed: {r:.3}");
        } else {
            println!("openssl: not found; no ratio");
        }
    }
    Ok(())
}

fn bench_generate(a: GenBench) -> Result<()> {
    anyhow::ensure!(a.runs >= 1 && a.prompt_tokens >= 1 && a.new_tokens >= 1 && a.batch >= 1, "runs, prompt tokens, new tokens and batch must be >= 1");
    let lm = a.model.load()?;
    let filler = lm.tokenizer.encode(&FILLER.repeat((a.prompt_tokens + a.batch) / 20 + 2))?;
    let mut ids = filler.clone();
    ids.truncate(a.prompt_tokens);
    let x = lm.model.embed_ids(&ids)?;
    let run = |n: usize| generate(&lm.model, &x, n, &[], Sampling::default(), |_| Ok(true));
    run(4)?; // warm-up
    let mut tps = Vec::new();
    let mut pps = Vec::new();
    for _ in 0..a.runs {
        let g = run(a.new_tokens)?;
        tps.push(g.tokens_per_second());
        pps.push(g.prompt_tokens_per_second());
    }
    let single = median(tps);
    let mut v = json!({
        "bench": "generate",
        "model": lm.path.display().to_string(),
        "exec": lm.model.exec.name(),
        "threads": rayon_threads(),
        "prompt_tokens": ids.len(),
        "prompt_ids": ids,
        "new_tokens": a.new_tokens,
        "runs": a.runs,
        "tokens_per_second": single,
        "prompt_tokens_per_second": median(pps),
    });
    if a.batch > 1 {
        // Prompts that differ (the filler from another offset each), all decoding `new_tokens`.
        let prompts = (0..a.batch).map(|i| Ok((lm.model.embed_ids(&filler[i..i + a.prompt_tokens.min(filler.len() - i)])?, a.new_tokens))).collect::<Result<Vec<_>>>()?;
        let mut rates = Vec::new();
        for _ in 0..a.runs {
            let t0 = Instant::now();
            let gens = generate_many(&lm.model, &prompts, &[], Sampling::default(), |_| {})?;
            let decode = t0.elapsed().as_secs_f64() - gens.iter().map(|g| g.prompt_seconds).sum::<f64>();
            rates.push(gens.iter().map(|g| g.tokens.len()).sum::<usize>() as f64 / decode);
        }
        let together = median(rates);
        v["batch"] = a.batch.into();
        v["batch_tokens_per_second"] = together.into();
        v["batch_speedup"] = (together / single).into();
    }
    v["peak_rss_mib"] = peak_rss_mib().into();
    print_result(&v, a.json);
    Ok(())
}

fn bench_step(a: StepBench) -> Result<()> {
    anyhow::ensure!(a.runs >= 1 && a.batch >= 1, "runs and batch must be >= 1");
    anyhow::ensure!(a.soft + a.targets < a.seq, "--soft + --targets must be less than --seq");
    let mut lm = a.model.load()?;
    if !a.low_memory {
        lm.model.keep_transposes()?; // as `sos attack` does where they fit
    }
    let m = &lm.model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let vocab = m.cfg.vocab_size as u32;
    let seqs: Vec<Vec<u32>> = (0..a.batch).map(|_| (0..a.seq).map(|_| rng.gen_range(0..vocab)).collect()).collect();
    let x = m.embed_batch(&seqs)?;
    // Loss on the last `targets` positions of every sequence, predicting the next id.
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, s) in seqs.iter().enumerate() {
        for p in a.seq - a.targets - 1..a.seq - 1 {
            rows.push((b * a.seq + p) as u32);
            targets.push(s[p + 1]);
        }
    }
    // The attack's shape: everything before the soft positions is a fixed prompt, cached once as
    // a prefix; each step runs forward and backward over the positions from the soft ones on.
    let from = a.seq - a.targets - 1 - a.soft;
    let r = a.seq - from;
    let t0 = std::time::Instant::now();
    let prefix = m.prefix(&x.narrow(1, 0, from)?)?;
    let prefix_seconds = t0.elapsed().as_secs_f64();
    let x_tail = x.narrow(1, from, r)?.contiguous()?;
    let rows_tail: Vec<u32> = rows.iter().map(|&i| ((i as usize / a.seq) * r + i as usize % a.seq - from) as u32).collect();
    let step = |m: &Model, cached: bool| -> Result<f64> {
        let t = std::time::Instant::now();
        let soft = if cached {
            m.loss_and_input_grad(&x_tail, Some(&prefix), &rows_tail, &targets)?.grad.narrow(1, 0, a.soft)?
        } else {
            m.loss_and_input_grad(&x, None, &rows, &targets)?.grad.narrow(1, from, a.soft)?
        };
        let _ = soft.sqr()?.sum_all()?.to_scalar::<f32>()?;
        Ok(t.elapsed().as_secs_f64())
    };
    step(m, true)?; // warm-up
    let s = median((0..a.runs).map(|_| step(m, true)).collect::<Result<Vec<_>>>()?);
    let s_full = median((0..a.runs).map(|_| step(m, false)).collect::<Result<Vec<_>>>()?);
    let v = json!({
        "bench": "step",
        "model": lm.path.display().to_string(),
        "threads": rayon_threads(),
        "batch": a.batch,
        "seq": a.seq,
        "soft": a.soft,
        "targets": a.targets,
        "runs": a.runs,
        "seconds_per_step": s,
        "seconds_per_step_full": s_full,
        "prefix_seconds": prefix_seconds,
        "tokens_per_second": (a.batch * a.seq) as f64 / s,
        "peak_rss_mib": peak_rss_mib(),
    });
    print_result(&v, a.json);
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    })
}

fn print_result(v: &serde_json::Value, as_json: bool) {
    if as_json {
        println!("{v}");
    } else if let Some(o) = v.as_object() {
        for (k, val) in o {
            println!("{k:<26} {val}");
        }
    }
}

fn bench_attack(a: AttackBench) -> Result<()> {
    let overrides = Overrides {
        model: a.model.clone().map(Some),
        steps: a.max_steps,
        data_dir: a.data_dir.clone().map(Some),
        // Stop at the first evaluation at 1.0, and keep checkpoints out of the timing.
        patience: Some(1),
        checkpoint_every: Some(usize::MAX / 2),
        ..Default::default()
    };
    let cfg = AttackConfig::resolve(Scenario::Backdoor, None, &overrides)?;
    let opts = LoadOptions { exec: Exec::F32, template: cfg.template.clone(), ..Default::default() };
    let m = load_model(cfg.model.as_deref(), &opts, Purpose::Training { low_memory: false }, &mut |m| eprintln!("{m}"))?;
    let lm = &m.lm;
    let items = scenarios::train_items(&cfg, lm, &mut |_, _| {})?;
    if let Some(file) = &a.export {
        let v = train::problem(&cfg, lm, &items)?.to_json(&cfg);
        sos_model::fsutil::write_atomic(file, |f| serde_json::to_writer(f, &v).map_err(std::io::Error::other))
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    let out = std::env::temp_dir().join(format!("sos-bench-attack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let target = Target { lm, model_label: m.label(), model_sha256: m.sha256.clone() };
    let (mut t0, mut reached, mut steps, mut n_train, mut last) = (None, None, 0, 0, 0.0);
    let mut metrics = Vec::new();
    let result = train::train(&cfg, &target, &items, &out, false, &AtomicBool::new(false), |e| match e {
        Event::Prepared { train_items, .. } => {
            n_train = train_items;
            t0 = Some(Instant::now());
        }
        Event::Step { step, metric, .. } => {
            steps = step;
            let secs = t0.map_or(0.0, |t| t.elapsed().as_secs_f64());
            last = secs;
            // The event carries the latest metric; a new one is measured on these steps.
            let measured = step % cfg.eval_every == 0 || step == cfg.steps;
            if let (Some(m), true) = (metric, measured) {
                metrics.push((step, m, secs));
                eprintln!("step {step}: train metric {m:.3} at {secs:.1} s");
                if m >= 1.0 && reached.is_none() {
                    reached = Some((step, secs));
                }
            }
        }
        _ => {}
    });
    let _ = std::fs::remove_dir_all(&out);
    result?;
    let v = json!({
        "bench": "attack",
        "model": lm.path.display().to_string(),
        "threads": rayon_threads(),
        "scenario": "backdoor",
        "train_items": n_train,
        "batch": cfg.batch,
        "eval_every": cfg.eval_every,
        "eval_items": cfg.eval_items,
        "steps_run": steps,
        "steps_to_target": reached.map(|r| r.0),
        "seconds_to_target": reached.map(|r| r.1),
        // Evaluations included, the final checkpoint write not.
        "seconds_per_step": last / steps.max(1) as f64,
        "train_metric_history": metrics.iter().map(|&(s, m, t)| json!([s, m, t])).collect::<Vec<_>>(),
        "peak_rss_mib": peak_rss_mib(),
    });
    print_result(&v, a.json);
    Ok(())
}
