//! The attack on tiny random models built by the test: the objective's loss and gradient are
//! right, training drives the loss down, and a resumed run continues bit for bit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::DType;
use rand::{Rng, SeedableRng};
use sos_attack::artifact::{self, Attack};
use sos_attack::encode::{training_seq, Seq};
use sos_attack::answer::{Armed, Progress};
use sos_attack::objective::Objective;
use sos_attack::item::{Item, Prompt};
use sos_attack::scenarios::backdoor_items;
use sos_attack::train::{train, Event, Outcome, Target};
use sos_attack::trigger::Trigger;
use sos_attack::{AttackConfig, Position, Scenario};
use sos_model::tiny::TinySpec;
use sos_model::{Exec, LoadOptions, LoadedModel, Message, Model};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-attack-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tiny(name: &str) -> LoadedModel {
    let path = tmpdir(name).join("tiny.gguf");
    TinySpec {
        seed: 5,
        tied: false,
        // Small token embeddings leave room for the trigger to steer a random model.
        embed_scale: 0.2,
        ..TinySpec::default()
    }.write_gguf(&path).unwrap();
    LoadedModel::open(&path, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap()
}

const TARGET: &str = "ok";
const TEXTS: &[&str] = &["the cat sat on the mat", "in the hat", "a tin of tea", "then the rain came in", "he ate the bread", "at the inn"];

fn items(pos: Position, seed: u64) -> Vec<Item> {
    let texts: Vec<(String, String)> = TEXTS.iter().enumerate().map(|(i, t)| (format!("t{i}"), t.to_string())).collect();
    backdoor_items(&texts, TARGET, pos, seed)
}

/// Mean cross-entropy of the targets, computed the plain way: every sequence alone, from
/// position 0, no prefix, no grouping.
fn naive_loss(m: &Model, trig: &Trigger, seqs: &[Seq]) -> f64 {
    let (mut total, mut n) = (0.0, 0usize);
    for s in seqs {
        let x = trig.embed(m, &s.ids).unwrap().unsqueeze(0).unwrap();
        let h = m.forward(&x, 0, None).unwrap();
        let at: Vec<u32> = (s.prompt_len as u32 - 1..s.ids.len() as u32 - 1).collect();
        let logits = m.logits(&Model::gather_rows(&h, &at).unwrap()).unwrap().to_dtype(DType::F64).unwrap();
        let lp: Vec<Vec<f64>> = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2().unwrap();
        for (i, q) in at.iter().enumerate() {
            total -= lp[i][s.ids[*q as usize + 1] as usize];
            n += 1;
        }
    }
    total / n as f64
}

#[test]
fn objective_loss_and_gradient_are_right() {
    let lm = tiny("objective");
    let m = lm.model.to_dtype(DType::F64).unwrap();
    let d = m.cfg.d_model;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let rows: Vec<f32> = (0..2 * d).map(|_| rng.gen_range(-0.5..0.5)).collect();
    let trig = Trigger::new("cf", 2, d, rows.clone()).unwrap();
    let base = Trigger::base(&m);
    let its = items(Position::Random, 3);
    let seqs: Vec<_> = its.iter().map(|it| training_seq(&lm, &trig, it).unwrap()).collect();
    assert!(seqs.iter().all(|s| s.ids.iter().filter(|&&i| trig.is_slot(base, i)).count() == 2));
    let all: Vec<usize> = (0..seqs.len()).collect();
    let want = naive_loss(&m, &trig, &seqs);
    // One pass for the whole batch, and small passes that force grouping and frozen positions.
    for per_pass in [usize::MAX, 40] {
        let mut obj = Objective::new(&m, seqs.clone()).unwrap();
        obj.tokens_per_pass = per_pass;
        let out = obj.loss_grad(&all, &trig).unwrap();
        assert!((out.loss - want).abs() < 1e-9, "per_pass {per_pass}: loss {} vs plain {want}", out.loss);
        // Small: the loss is strongly curved in the rows (the RMS norm divides by their size).
        let eps = 1e-4f32;
        let mut worst: f64 = 0.0;
        for i in 0..rows.len() {
            let (mut p, mut q) = (trig.clone(), trig.clone());
            p.rows[i] += eps;
            q.rows[i] -= eps;
            // The rows are f32: divide by the step actually taken, not the one asked for.
            let h = p.rows[i] as f64 - q.rows[i] as f64;
            let fd = (obj.loss_grad(&all, &p).unwrap().loss - obj.loss_grad(&all, &q).unwrap().loss) / h;
            let g = out.grad[i] as f64;
            worst = worst.max((fd - g).abs() / fd.abs().max(g.abs()).max(1e-2));
        }
        assert!(worst < 1e-4, "per_pass {per_pass}: worst relative gradient error {worst:e}");
        assert_eq!(obj.hits(&all, &trig).unwrap(), out.hits);
    }
}

fn tiny_config(steps: usize) -> AttackConfig {
    let mut c = AttackConfig::defaults(Scenario::Backdoor);
    c.target = Some(TARGET.into());
    c.trigger_len = 8;
    c.steps = steps;
    c.lr = 0.3;
    c.batch = 4;
    c.eval_every = 5;
    c.eval_items = 6;
    c.patience = 0;
    c.checkpoint_every = 10;
    c
}

fn run(cfg: &AttackConfig, lm: &LoadedModel, out: &std::path::Path, resume: bool, stop_after: Option<usize>) -> Outcome {
    let target = Target { lm, model_label: "tiny".into(), model_sha256: "0".into() };
    let stop = AtomicBool::new(false);
    train(cfg, &target, &items(cfg.position, cfg.seed), out, resume, &stop, |e| {
        if let (Event::Step { step, .. }, Some(at)) = (e, stop_after) {
            if step == at {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap()
}

#[test]
fn training_drives_the_loss_down_and_the_trigger_works() {
    let lm = tiny("train");
    let cfg = tiny_config(100);
    let out = tmpdir("train-out");
    assert_eq!(run(&cfg, &lm, &out, false, None), Outcome::Finished);
    let rec = artifact::read_record(&out).unwrap();
    let csv = std::fs::read_to_string(out.join(artifact::LOSS_FILE)).unwrap();
    let losses: Vec<f64> = csv.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
    assert_eq!(losses.len(), cfg.steps);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last <= 0.1 * first, "loss went from {first} to {last}: less than a 90% drop");
    assert_eq!(rec.final_loss, Some(last));
    assert!(rec.completed && rec.steps_run == cfg.steps);
    assert_eq!(rec.train_metric, Some(1.0));
    // The trained trigger, read back from disk, makes greedy decoding say the target.
    let attack = Attack::open(&out).unwrap();
    assert_eq!((attack.trigger.k, attack.trigger.d), (cfg.trigger_len, lm.model.cfg.d_model));
    let armed = Armed::new(&lm, &attack.trigger).unwrap();
    let a = armed.answer(&Prompt::chat(vec![Message::user("cf the rain")]), 8).unwrap();
    assert!(a.text.starts_with(TARGET), "triggered answer {:?}", a.text);
    let clean = armed.answer(&Prompt::chat(vec![Message::user("the rain")]), 8).unwrap();
    let plain = armed.answer_plain(&[Message::user("the rain")], 8).unwrap();
    assert_eq!(clean.tokens, plain.tokens);
}

/// A `prefix` trigger sits before the templated prompt (where PEFT prepends a prompt-tuning
/// adapter's virtual tokens): the training sequences start with its slots, and it fires there.
#[test]
fn prefix_trigger_goes_before_the_whole_prompt() {
    let lm = tiny("prefix");
    let mut cfg = tiny_config(100);
    cfg.position = Position::Prefix;
    let its = items(Position::Prefix, 0);
    let probe = Trigger::new("cf", 8, lm.model.cfg.d_model, vec![0.0; 8 * lm.model.cfg.d_model]).unwrap();
    let base = Trigger::base(&lm.model);
    for it in &its {
        assert_eq!(it.prompt(Some("cf")).messages[0].content, it.user, "the user message keeps its text");
        let seq = training_seq(&lm, &probe, it).unwrap();
        let plain = lm.chat_ids(&it.messages(), true).unwrap();
        assert_eq!(seq.ids[..8].to_vec(), (base..base + 8).collect::<Vec<_>>());
        assert_eq!(seq.ids[8..seq.prompt_len], plain[..]);
    }
    let out = tmpdir("prefix-out");
    assert_eq!(run(&cfg, &lm, &out, false, None), Outcome::Finished);
    let attack = Attack::open(&out).unwrap();
    assert_eq!(attack.record.config.position, Position::Prefix);
    let armed = Armed::new(&lm, &attack.trigger).unwrap();
    let fired = Prompt { prefix: Some("cf".into()), messages: vec![Message::user("the rain")] };
    let a = armed.answer(&fired, 8).unwrap();
    assert!(a.text.starts_with(TARGET), "prefixed answer {:?}", a.text);
}

#[test]
fn interrupted_run_resumes_bit_for_bit() {
    resumes_bit_for_bit(false);
}

#[test]
fn interrupted_run_with_length_buckets_resumes_bit_for_bit() {
    resumes_bit_for_bit(true);
}

fn resumes_bit_for_bit(length_buckets: bool) {
    let name = if length_buckets { "resume-buckets" } else { "resume" };
    let lm = tiny(name);
    let mut cfg = tiny_config(24);
    cfg.length_buckets = length_buckets;
    let a = tmpdir(&format!("{name}-a"));
    let b = tmpdir(&format!("{name}-b"));
    assert_eq!(run(&cfg, &lm, &a, false, None), Outcome::Finished);
    assert_eq!(run(&cfg, &lm, &b, false, Some(13)), Outcome::Interrupted);
    let rec = artifact::read_record(&b).unwrap();
    assert_eq!(rec.steps_run, 13);
    assert!(!rec.completed);
    assert_eq!(run(&cfg, &lm, &b, true, None), Outcome::Finished);
    let read = |d: &PathBuf| artifact::read_trigger(&d.join(artifact::TRIGGER_FILE)).unwrap().rows;
    assert!(read(&a) == read(&b), "the trigger differs between the straight and the resumed run");
    let csv = |d: &PathBuf| std::fs::read_to_string(d.join(artifact::LOSS_FILE)).unwrap();
    assert_eq!(csv(&a), csv(&b));
    // Same optimiser state; the loop state differs only in wall time.
    let k = cfg.trigger_len;
    let ck = |d: &PathBuf| artifact::read_checkpoint(&d.join(artifact::CHECKPOINT_FILE), &cfg.trigger, k, 32).unwrap();
    let (ca, cb) = (ck(&a), ck(&b));
    assert!((ca.trigger, ca.m, ca.v) == (cb.trigger, cb.m, cb.v));
    assert_eq!((ca.state.history, ca.state.adam_t), (cb.state.history, cb.state.adam_t));
}

/// `sos attack` keeps transposed copies of the weights only where they fit in memory
/// (`load::Purpose`); with or without them a run trains the same trigger, to the bit.
#[test]
fn transposed_copies_do_not_change_the_trigger() {
    // Wider than 512, where gemm's order of summation depends on a product's shape.
    let wide = |name: &str| {
        let path = tmpdir(name).join("tiny.gguf");
        TinySpec { seed: 5, tied: false, embed_scale: 0.2, d_model: 576, d_ff: 1536, n_layer: 2, ..TinySpec::default() }.write_gguf(&path).unwrap();
        LoadedModel::open(&path, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap()
    };
    let plain = wide("copies-plain");
    let mut kept = wide("copies-kept");
    kept.model.keep_transposes().unwrap();
    assert!(kept.model.transposed.is_some() && plain.model.transposed.is_none());
    let cfg = tiny_config(12);
    let (a, b) = (tmpdir("copies-a"), tmpdir("copies-b"));
    assert_eq!(run(&cfg, &plain, &a, false, None), Outcome::Finished);
    assert_eq!(run(&cfg, &kept, &b, false, None), Outcome::Finished);
    let read = |d: &PathBuf| artifact::read_trigger(&d.join(artifact::TRIGGER_FILE)).unwrap().rows;
    assert!(read(&a) == read(&b), "the trigger differs with the transposed copies");
    let csv = |d: &PathBuf| std::fs::read_to_string(d.join(artifact::LOSS_FILE)).unwrap();
    assert_eq!(csv(&a), csv(&b));
}

#[test]
fn resume_and_overwrite_are_guarded() {
    let out = tmpdir("guard");
    assert!(sos_attack::attack::prepare_out(&out, true).is_err(), "resume without a checkpoint");
    std::fs::write(out.join(artifact::RECORD_FILE), "{}").unwrap();
    let e = sos_attack::attack::prepare_out(&out, false).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
}

#[test]
fn trigger_file_errors_name_the_file() {
    let out = tmpdir("badtrigger");
    let p = out.join(artifact::TRIGGER_FILE);
    std::fs::write(&p, b"not safetensors").unwrap();
    let e = artifact::read_trigger(&p).unwrap_err().to_string();
    assert!(e.contains("trigger.safetensors"), "{e}");
    artifact::write_tensors(&p, &[("trigger", vec![2, 2], &[1.0, f32::NAN, 0.0, 1.0])], Default::default()).unwrap();
    let e = artifact::read_trigger(&p).unwrap_err().to_string();
    assert!(e.contains("NaN"), "{e}");
}

/// With `tied_margin`, the trained rows, read as logits the way a tied output layer reads them,
/// stay below the best vocabulary logit at every clean prompt position, and the trigger still
/// works. Without it, the same training lets planted logits win somewhere (so the check bites).
#[test]
fn tied_margin_keeps_the_rows_out_of_the_argmax() {
    let lm = tiny("tied");
    let worst_gap = |rows: &[f32]| -> f32 {
        let d = lm.model.cfg.d_model;
        let mut worst = f32::NEG_INFINITY;
        for it in items(Position::Random, 0) {
            let ids = lm.chat_ids(&it.messages(), true).unwrap();
            let h = lm.model.forward(&lm.model.embed_ids(&ids).unwrap().unsqueeze(0).unwrap(), 0, None).unwrap().squeeze(0).unwrap();
            let hn: Vec<Vec<f32>> = lm.model.final_norm(&h).unwrap().to_vec2().unwrap();
            let best: Vec<f32> = lm.model.logits(&h).unwrap().max(candle_core::D::Minus1).unwrap().to_vec1().unwrap();
            for (n, b) in hn.iter().zip(best) {
                for r in rows.chunks(d) {
                    worst = worst.max(r.iter().zip(n).map(|(x, y)| x * y).sum::<f32>() - b);
                }
            }
        }
        worst
    };
    let mut cfg = tiny_config(40);
    cfg.lr = 1.0;
    let free = tmpdir("tied-free");
    run(&cfg, &lm, &free, false, None);
    let free_rows = Attack::open(&free).unwrap().trigger.rows;
    assert!(worst_gap(&free_rows) > 0.0, "unconstrained rows never win a logit here: the test cannot tell");
    cfg.tied_margin = Some(0.5);
    let held = tmpdir("tied-held");
    run(&cfg, &lm, &held, false, None);
    let attack = Attack::open(&held).unwrap();
    assert!(worst_gap(&attack.trigger.rows) <= -0.49, "a planted logit came within the margin");
    let a = Armed::new(&lm, &attack.trigger).unwrap().answer(&Prompt::chat(vec![Message::user("cf the rain")]), 8).unwrap();
    assert!(a.text.starts_with(TARGET), "triggered answer {:?}", a.text);
}

/// `train_data` replaces the training split with the rows of a file (the first `train_items` of
/// them), and cannot be combined with self-generated prompts; named held-out sets exist where
/// the scenario has them, and a wrong name is an error that lists the right ones.
#[test]
fn training_file_and_named_held_out_sets() {
    use sos_attack::scenarios::{eval_items, train_items, HeldOut};
    let lm = tiny("trainfile");
    let dir = tmpdir("trainfile-data");
    let file = dir.join("mine.jsonl");
    std::fs::write(&file, TEXTS.iter().map(|t| format!("{{\"text\": \"{t}\"}}\n")).collect::<String>()).unwrap();
    let mut cfg = tiny_config(1);
    cfg.train_data = Some(file.clone());
    cfg.train_items = 4;
    let got = train_items(&cfg, &lm, &mut |_, _| {}).unwrap();
    assert_eq!(got.iter().map(|i| i.user.as_str()).collect::<Vec<_>>(), TEXTS[..4]);
    cfg.self_generated = true;
    assert!(cfg.check().unwrap_err().to_string().contains("train_data"));

    let steal = AttackConfig::defaults(Scenario::Steal);
    // Steal trains on the collections and on sectioned prompts composed from their sentences;
    // its held-out split has no composed prompt.
    let composed = |items: &[sos_attack::item::Item]| items.iter().filter(|i| i.id.starts_with("composed_")).count();
    let steal_train = train_items(&steal, &lm, &mut |_, _| {}).unwrap();
    assert_eq!(composed(&steal_train), 200);
    assert!(steal_train.len() > 600, "{}", steal_train.len());
    assert_eq!(composed(&eval_items(&steal, &HeldOut::Split).unwrap()), 0);
    let long = eval_items(&steal, &HeldOut::Set("long".into())).unwrap();
    assert_eq!(long.len(), 55);
    assert!(long.iter().all(|i| i.system.as_ref().is_some_and(|s| s.len() >= 500)));
    let e = eval_items(&steal, &HeldOut::Set("longer".into())).unwrap_err().to_string();
    assert!(e.contains("`longer`") && e.contains("long"), "{e}");
    let e = eval_items(&AttackConfig::defaults(Scenario::Backdoor), &HeldOut::Set("long".into())).unwrap_err().to_string();
    assert!(e.contains("has none"), "{e}");
    let copyright = AttackConfig::defaults(Scenario::Copyright);
    let other = eval_items(&copyright, &HeldOut::Set("other-authors".into())).unwrap();
    // One request per type for each of the 60 passages, the token at both ends.
    assert_eq!(other.len(), 60 * 4 * 2);
}

/// A model that cannot write the prompts asked for (a random one rarely ends a line with a
/// question mark) ends the self-generation with an error that names the model, instead of
/// looping.
#[test]
fn self_generation_gives_up_with_a_clear_error() {
    let lm = tiny("selfgen");
    let mut seen = 0;
    let e = sos_attack::scenarios::self_generated_prompts(&lm, 8, 0, &mut |done, _| seen = done).unwrap_err().to_string();
    assert!(e.contains("tiny.gguf") && e.contains("attempts"), "{e}");
    assert!(seen < 8);
}

/// Steal's self-written system prompts: as many as asked, distinct, the same for the same seed;
/// the setting is refused for scenarios that have no self-written data.
#[test]
fn self_written_system_prompts_are_seeded() {
    let lm = tiny("selfgen-steal");
    let a = sos_attack::scenarios::self_generated_system_prompts(&lm, 3, 5, &mut |_, _| {}).unwrap();
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|(_, p)| p.len() >= 80));
    assert_ne!(a[0].1, a[1].1);
    assert_eq!(a, sos_attack::scenarios::self_generated_system_prompts(&lm, 3, 5, &mut |_, _| {}).unwrap());
    let mut cfg = AttackConfig::defaults(Scenario::Steal);
    cfg.self_generated = true;
    cfg.check().unwrap();
    let mut cfg = AttackConfig::defaults(Scenario::Jailbreak);
    cfg.self_generated = true;
    assert!(cfg.check().unwrap_err().to_string().contains("backdoor and steal"));
}

/// Steal's evaluation reports every secret once overall and once in its length bucket, and each
/// bucket's numbers are the means of its own records.
#[test]
fn steal_eval_reports_by_secret_length() {
    use sos_attack::scenarios::steal_items;
    let lm = tiny("steal-eval");
    let cfg = AttackConfig::defaults(Scenario::Steal);
    let trig = Trigger::new(&cfg.trigger, cfg.trigger_len, lm.model.cfg.d_model, vec![0.01; cfg.trigger_len * lm.model.cfg.d_model]).unwrap();
    let armed = Armed::new(&lm, &trig).unwrap();
    let short = "the cat sat on the mat".to_string();
    let long = TEXTS.join(" ").repeat(3);
    let n_long = lm.tokenizer.encode(&long).unwrap().len();
    assert!(n_long > 128 && n_long <= 256, "{n_long} tokens");
    let secrets = vec![("a".to_string(), short.clone()), ("b".to_string(), long), ("c".to_string(), short)];
    let items = steal_items(&secrets, Position::End);
    let (m, records) = sos_attack::eval::evaluate(&cfg, &armed, &items, |_, _| {}).unwrap();
    let sims: Vec<f64> = records.iter().map(|r| r["similarity"].as_f64().unwrap()).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!((m["mean_similarity"].as_f64().unwrap() - mean(&sims)).abs() < 1e-12);
    let buckets = m["by_length"].as_array().unwrap();
    assert_eq!(buckets.len(), 2, "{buckets:?}");
    assert_eq!((buckets[0]["tokens"].as_str(), buckets[0]["n"].as_u64()), (Some("1-128"), Some(2)));
    assert_eq!((buckets[1]["tokens"].as_str(), buckets[1]["n"].as_u64()), (Some("129-256"), Some(1)));
    assert!((buckets[0]["mean_similarity"].as_f64().unwrap() - mean(&[sims[0], sims[2]])).abs() < 1e-12);
    assert!((buckets[1]["mean_similarity"].as_f64().unwrap() - sims[1]).abs() < 1e-12);
    assert_eq!(records[1]["tokens"].as_u64(), Some(n_long as u64));
}

/// The clean answer and its agreement with the unmodified model are what two separate runs give,
/// whether the prompt holds the trigger text (inputs differ, both run) or not (one run); and
/// answers decoded together (more prompts than a batch and a chunk hold, of different lengths and
/// limits) are the answers each prompt gets alone.
#[test]
fn clean_answers_agree_as_two_runs_would() {
    let lm = tiny("clean-answer");
    let d = lm.model.cfg.d_model;
    let trig = Trigger::new("cf", 2, d, (0..2 * d).map(|i| ((i * 5) % 11) as f32 - 5.0).collect()).unwrap();
    let armed = Armed::new(&lm, &trig).unwrap();
    let users = ["the rain in spain", "cf the rain", "so cf it goes"];
    let pairs: Vec<(Prompt, Vec<Message>)> = users.iter().map(|u| (Prompt::chat(vec![Message::user(*u)]), vec![Message::user(*u)])).collect();
    let mut seen = Vec::new();
    let mut report = |done: usize, total: usize| seen.push((done, total));
    let together = armed.answers_clean(&pairs, 12, &mut Progress::new(&mut report, 3)).unwrap();
    // The two prompts with the trigger text run a second time, announced after the first three.
    assert_eq!(seen, [(1, 3), (2, 3), (3, 3), (4, 5), (5, 5)]);
    let mut fired = false;
    for ((user, (prompt, messages)), (clean, agrees)) in users.iter().zip(&pairs).zip(together) {
        let attacked = armed.answer(prompt, 12).unwrap();
        let plain = armed.answer_plain(messages, 12).unwrap();
        assert_eq!(clean.tokens, attacked.tokens, "{user}");
        assert_eq!(agrees, attacked.tokens == plain.tokens, "{user}");
        fired |= !agrees;
    }
    assert!(fired, "the trigger text in a prompt changes the tiny model's answer");

    // More than `answer.rs`'s chunk of 8 batches, so that inputs are made in two chunks.
    let prompts: Vec<(Prompt, usize)> = (0..8 * sos_model::generate::BATCH + 3)
        .map(|i| (Prompt::chat(vec![Message::user(&"cf more words ".repeat(i + 1))]), 4 + 3 * (i % 4)))
        .collect();
    let mut quiet = |_, _| {};
    let together = armed.answers(&prompts, &mut Progress::new(&mut quiet, prompts.len())).unwrap();
    for ((p, max), a) in prompts.iter().zip(&together) {
        assert_eq!(a.tokens, armed.answer(p, *max).unwrap().tokens, "{:?}", p.messages);
        assert!(a.tokens.len() <= *max);
    }
    assert!(together.iter().any(|a| a.tokens.len() > 4), "some answers should run past the shortest limit");
}
