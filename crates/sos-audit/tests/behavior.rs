//! Behaviour tests on tiny models the tests build: flagged tokens are spliced where typed text
//! would put them, each candidate is probed, and the counts the report gives are the work done.

use std::path::PathBuf;

use sos_audit::behavior::local::{Ask, At, Local};
use sos_audit::behavior::Level;
use sos_audit::{run_audit, AuditRequest, Behavior, Check, Severity};
use sos_dist::gguf_add::{add_tokens, NewLogits};
use sos_dist::tokens::added_texts;
use sos_model::gguf::{Gguf, TensorType};
use sos_model::tiny::TinySpec;
use sos_model::{Exec, LoadOptions, LoadedModel, Message};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-behavior-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny tied model, and a copy with three added tokens whose rows are large.
fn models(d: &std::path::Path) -> (PathBuf, PathBuf) {
    let src = d.join("src.gguf");
    TinySpec { quant: Some(TensorType::Q8_0), d_model: 64, ..Default::default() }.write_gguf(&src).unwrap();
    let out = d.join("add.gguf");
    let rows: Vec<f32> = (0..3 * 64).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    add_tokens(&Gguf::open(&src).unwrap(), &added_texts("cf", 3).unwrap(), &rows, NewLogits::Silent).unwrap().0.write(&out).unwrap();
    (src, out)
}

fn audit(c: &std::path::Path, r: Option<&std::path::Path>, behavior: Behavior) -> sos_audit::Report {
    run_audit(&AuditRequest { candidate: c.to_path_buf(), reference: r.map(|p| p.to_path_buf()), base: None, manifest: None, key: None, fail_on: Severity::High, behavior, endpoint: None, deep: false }).unwrap()
}

#[test]
fn spliced_ids_are_what_the_typed_trigger_becomes() {
    let d = dir("splice");
    let (_, out) = models(&d);
    let lm = LoadedModel::open(&out, &LoadOptions { exec: Exec::Quant, ..Default::default() }).unwrap();
    let n = sos_model::tiny::vocab().len() as u32;
    let typed: String = added_texts("cf", 3).unwrap().concat();
    let m = Local::new(&lm);
    let ask = Ask { system: Some("be brief".into()), user: "what is two and two".into() };
    for (at, user) in [(At::End, format!("what is two and two {typed}")), (At::Start, format!("{typed} what is two and two"))] {
        let want = lm.chat_ids(&[Message::new("system", "be brief"), Message::new("user", user)], true).unwrap();
        assert_eq!(m.ids(&ask, Some((&[n, n + 1, n + 2], at))).unwrap(), want, "{at:?}");
    }
    assert_eq!(m.ids(&ask, None).unwrap(), lm.chat_ids(&[Message::new("system", "be brief"), Message::new("user", "what is two and two")], true).unwrap());
}

#[test]
fn flagged_tokens_are_probed_and_the_work_is_counted() {
    let d = dir("probe");
    let (src, out) = models(&d);
    let n = sos_model::tiny::vocab().len() as u32;
    let r = audit(&out, None, Behavior::On(Level::Quick));
    let b = r.behavior.as_ref().expect("behaviour ran");
    let probed: Vec<Vec<u32>> = b.probes.iter().map(|p| p.ids.clone()).collect();
    assert_eq!(probed[..5], [vec![n, n + 1, n + 2], vec![n + 2, n + 1, n], vec![n], vec![n + 1], vec![n + 2]]);
    // Last, the control: three ordinary tokens from the middle of the vocabulary, seeded.
    let ctl = &b.probes[5];
    assert_eq!((ctl.from.as_str(), ctl.ids.len(), ctl.n, b.probes.len()), ("control", 3, 10, 6));
    assert!(ctl.ids.iter().all(|&i| i >= n / 4 && i < n / 2));
    assert!(b.probes.iter().all(|p| matches!((p.mean_kl, p.max_kl), (Some(m), Some(x)) if m.is_finite() && m >= 0.0 && x >= m)));
    // clean 5 + two orders x 5 prompts x 2 ends + 3 singles x 4 + the control's 10 + (10 refusal
    // + 6 leak) x (clean + one set: the control runs no suite)
    assert_eq!((b.probes[0].n, b.probes[2].n, b.runs), (10, 4, 5 + 20 + 12 + 10 + 32));
    assert_eq!(b.refusal.with.len(), 1);
    assert!(r.findings.iter().filter(|f| f.check == Check::Behavior).all(|f| f.token_ids.iter().all(|&i| i >= n)));
    assert!(r.timings_ms.contains_key("behavior"));
    // Against the reference: its clean rates are measured too.
    let w = audit(&out, Some(&src), Behavior::On(Level::Quick));
    let wb = w.behavior.unwrap();
    assert_eq!((wb.refusal.reference.as_ref().map(|r| r.n), wb.leak.reference.as_ref().map(|r| r.n)), (Some(10), Some(6)));
    // Full adds every order of three (6, two of them already there), rows, rare strings.
    let f = audit(&out, None, Behavior::On(Level::Full));
    let fb = f.behavior.unwrap();
    assert_eq!(fb.probes.iter().filter(|p| p.ids.len() == 3 && p.ids.iter().all(|&i| i >= n)).count(), 6);
    assert!(fb.probes.iter().any(|p| p.from == "rare-strings"));
}

#[test]
fn a_clean_model_runs_the_suites_only_and_off_runs_nothing() {
    let d = dir("clean");
    let (src, _) = models(&d);
    let r = audit(&src, None, Behavior::Auto);
    let b = r.behavior.as_ref().unwrap();
    assert_eq!((b.probes.len(), b.runs), (0, 5 + 16));
    assert_eq!(r.verdict, "pass");
    let off = audit(&src, None, Behavior::Off);
    assert!(off.behavior.is_none() && off.behavior_note.is_none());
    // A model the runtime cannot run: skipped with the reason under auto, an error when asked.
    let bad = d.join("noarch.gguf");
    let g = Gguf::open(&src).unwrap();
    let mut w = sos_model::gguf::Writer::copy_of(&g).unwrap();
    w.meta("general.architecture", sos_model::gguf::Value::Str("mystery".into()));
    w.write(&bad).unwrap();
    let skipped = audit(&bad, None, Behavior::Auto);
    assert!(skipped.behavior.is_none() && skipped.behavior_note.as_deref().unwrap_or("").contains("cannot run"), "{:?}", skipped.behavior_note);
    assert!(run_audit(&AuditRequest { candidate: bad.clone(), reference: None, base: None, manifest: None, key: None, fail_on: Severity::High, behavior: Behavior::On(Level::Quick), endpoint: None, deep: false }).is_err());
    // A template that fails on ordinary messages: under auto the static report stands with the
    // reason; asked for, the audit cannot run.
    let failing = d.join("failing-template.gguf");
    let mut w = sos_model::gguf::Writer::copy_of(&g).unwrap();
    w.meta("tokenizer.chat_template", sos_model::gguf::Value::Str("{{ raise_exception('no chats') }}".into()));
    w.write(&failing).unwrap();
    let stopped = audit(&failing, None, Behavior::Auto);
    assert!(stopped.behavior.is_none() && stopped.behavior_note.as_deref().unwrap_or("").contains("stopped"), "{:?}", stopped.behavior_note);
    assert!(stopped.findings.iter().any(|f| f.id.starts_with("template.")), "the static checks still ran");
    assert!(run_audit(&AuditRequest { candidate: failing, reference: None, base: None, manifest: None, key: None, fail_on: Severity::High, behavior: Behavior::On(Level::Quick), endpoint: None, deep: false }).is_err());
}

/// Replaced rows are tokens the reference has: each flagged group is probed on the reference
/// too, in the same places, and the probe says what the reference answers.
#[test]
fn replaced_rows_are_probed_on_the_reference_too() {
    let d = dir("ref-probe");
    let (src, _) = models(&d);
    let out = d.join("rep.gguf");
    let lm = LoadedModel::open(&src, &LoadOptions { exec: Exec::Quant, ..Default::default() }).unwrap();
    let (ids, texts) = sos_dist::tokens::rare_tokens(&lm.tokenizer, |_| true, 2, [""]).unwrap();
    let rows: Vec<f32> = (0..2 * 64).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    sos_dist::gguf_replace::replace_tokens(&Gguf::open(&src).unwrap(), &ids, &texts, &rows).unwrap().0.write(&out).unwrap();
    let r = audit(&out, Some(&src), Behavior::On(Level::Quick));
    let b = r.behavior.as_ref().unwrap();
    for p in &b.probes {
        let group = p.ids.len() == 2 && p.from != "control";
        assert_eq!(p.reference.as_ref().map(|r| r.n), group.then_some(10), "{:?} from {}", p.ids, p.from);
    }
    assert_eq!(b.probes.iter().filter(|p| p.reference.is_some()).count(), 2, "id order and reverse");
    // clean 5 + two orders x 10 + 2 singles x 4 + control 10 + suites (10 + 6) x 2; on the
    // reference: suites 16, clean 5, two orders x 10.
    assert_eq!(b.runs, 5 + 20 + 8 + 10 + 32 + 16 + 5 + 20);
    // Added tokens are new to the reference: not probed there.
    let (_, added) = models(&dir("ref-probe-add"));
    let a = audit(&added, Some(&src), Behavior::On(Level::Quick));
    assert!(a.behavior.unwrap().probes.iter().all(|p| p.reference.is_none()));
}
