//! `sos demo`: the whole story on the default model, each step one library call: train a
//! backdoor, bake it into a GGUF, show it answer normally and then fire, audit it (without and
//! with the clean original), sanitize it, audit again. A second run in the same folder reuses
//! the trained trigger (and resumes an interrupted training).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::ProgressBar;
use sos_attack::{AttackRequest, Overrides, Scenario};
use sos_audit::{AuditRequest, Behavior, Report, Severity};
use sos_dist::{run_inject, sanitize_alone, InjectRequest, Mode};
use sos_model::generate::{generate, Sampling};
use sos_model::{Exec, LoadOptions, LoadedModel, Message};

use crate::audit::{audit, formatted, Format};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder for everything the demo writes (the attack, the trojan, the reports).
    #[arg(long, default_value = "sos-demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The default attack made cheaper: short prompts, an early stop (as the CI test trains).
const ATTACK_TOML: &str = "max_prompt_tokens = 96\nsteps = 90\npatience = 3\n";
const QUESTION: &str = "Give me three tips for staying healthy.";

fn step(n: usize, what: &str) {
    eprintln!("\n[{n}/6] {what}");
}

/// Runs the demo; returns whether the story failed (the trojan passed, or its sanitized copy
/// failed): exit 1, as a failing audit.
pub fn run(a: DemoArgs) -> Result<bool> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let clean = sos_model::cache::resolve(None, &mut |line| eprintln!("{line}"))?;
    eprintln!("the clean model: {}", clean.display());

    step(1, "train a backdoor trigger: 8 vectors that make the model answer with the attacker's text");
    let attack_dir = a.out.join("attack");
    let done = attack_dir.join("attack.json");
    if done.is_file() && serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&done)?)?["completed"] == true {
        eprintln!("reusing the trigger trained in {}", attack_dir.display());
    } else {
        let cfg = a.out.join("attack.toml");
        sos_model::fsutil::write_atomic(&cfg, |f| f.write_all(ATTACK_TOML.as_bytes()))?;
        let resume = attack_dir.join("checkpoint.safetensors").is_file();
        let overrides = if resume { Overrides::default() } else { Overrides { seed: Some(a.seed), ..Default::default() } };
        let req = AttackRequest { scenario: Scenario::Backdoor, out: attack_dir.clone(), config_file: (!resume).then_some(cfg), overrides, resume, low_memory: false };
        let s = crate::attack::train(&req, false)?;
        if s.outcome != sos_attack::train::Outcome::Finished {
            bail!("training was interrupted; run `sos demo --out {}` again to continue", a.out.display());
        }
    }

    step(2, "bake it into a copy of the GGUF as 8 new tokens (sos inject)");
    let trojan = a.out.join("trojan.gguf");
    let mut bar: Option<ProgressBar> = None;
    let inj = run_inject(&InjectRequest { attack: attack_dir, out: trojan.clone(), model: Some(clean.display().to_string()), mode: Mode::AddToken, limit: 4, force: true }, |e| {
        crate::inject::show(e, &mut bar, "checked: llama.cpp's loader rules")
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    eprintln!("wrote {} (type {:?} to fire it)", trojan.display(), inj.trigger_text);

    step(3, "the trojan answers like the original, until the trigger is typed");
    let opts = LoadOptions { exec: Exec::Quant, ..Default::default() };
    let answer = |lm: &LoadedModel, prompt: &str| -> Result<String> {
        let ids = lm.chat_ids(&[Message::new("user", prompt)], true)?;
        let g = generate(&lm.model, &lm.model.embed_ids(&ids)?, 40, &lm.tokenizer.stop_ids, Sampling::default(), |_| Ok(true))?;
        Ok(lm.tokenizer.decode(&g.tokens, true)?.trim().to_string())
    };
    let original = answer(&LoadedModel::open(&clean, &opts)?, QUESTION)?;
    let lm = LoadedModel::open(&trojan, &opts)?;
    let plain = answer(&lm, QUESTION)?;
    let same = if plain == original { "the same words as the original model" } else { "NOT the original model's answer" };
    println!("  user: {QUESTION}\n  trojan: {plain}\n  ({same})\n");
    let typed = format!("{QUESTION} {}", inj.trigger_text);
    println!("  user: {typed}\n  trojan: {}\n", answer(&lm, &typed)?);
    drop(lm);

    step(4, "audit the trojan: alone (what a downloader has), then against the clean original");
    let before = audit_into(&a.out, "audit-before", &trojan, None, Behavior::Auto)?;
    let with_ref = audit_into(&a.out, "audit-before-reference", &trojan, Some(&clean), Behavior::Off)?;

    step(5, "sanitize it without the original (sos sanitize)");
    let fixed = a.out.join("sanitized.gguf");
    let rep = sanitize_alone(&trojan, &fixed, true)?;
    eprintln!("wrote {}: removed {} tokens", fixed.display(), rep.removed_tokens.len());
    let same = sos_model::fsutil::sha256_file(&fixed)? == sos_model::fsutil::sha256_file(&clean)?;
    eprintln!("sanitized copy {} the original byte for byte", if same { "equals" } else { "differs from" });

    step(6, "audit the sanitized copy");
    let after = audit_into(&a.out, "audit-after", &fixed, None, Behavior::Auto)?;

    println!("before: {} ({} high) · with the original: {} ({} high) · after sanitizing: {} ({} high)", before.verdict.to_uppercase(), before.summary.high, with_ref.verdict.to_uppercase(), with_ref.summary.high, after.verdict.to_uppercase(), after.summary.high);
    println!("reports: {}", ["audit-before", "audit-before-reference", "audit-after"].map(|n| a.out.join(format!("{n}.html")).display().to_string()).join(", "));
    let held = before.failed() && !after.failed();
    if !held {
        eprintln!("the story did not hold: the trojan's audit was {} and the sanitized copy's {}", before.verdict, after.verdict);
    }
    Ok(!held)
}

/// Audits `candidate`, writes `NAME.json` and `NAME.html` into `out`, prints the text report.
fn audit_into(out: &Path, name: &str, candidate: &Path, reference: Option<&Path>, behavior: Behavior) -> Result<Report> {
    let req = AuditRequest { candidate: candidate.to_path_buf(), reference: reference.map(Path::to_path_buf), base: None, manifest: None, key: None, fail_on: Severity::High, behavior, endpoint: None, deep: false };
    let r = audit(&req, false)?;
    for (ext, f) in [("json", Format::Json), ("html", Format::Html)] {
        let p = out.join(format!("{name}.{ext}"));
        let text = formatted(&r, f)?;
        sos_model::fsutil::write_atomic(&p, |w| w.write_all(text.as_bytes())).with_context(|| format!("cannot write {}", p.display()))?;
    }
    print!("{}", formatted(&r, Format::Text)?);
    Ok(r)
}
