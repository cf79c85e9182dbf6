//! The audit on tiny models the tests build: what `sos inject` plants is named, with a
//! reference and without; a re-quantized copy is benign; a changed template is found.

use std::path::{Path, PathBuf};

use sos_audit::{run_audit, AuditRequest, Report, Severity};
use sos_dist::gguf_add::{add_tokens, NewLogits};
use sos_dist::gguf_replace::replace_tokens;
use sos_dist::tokens::added_texts;
use sos_model::gguf::{Gguf, TensorType, Value, Writer};
use sos_model::tiny::TinySpec;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-audit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn audit(c: &Path, r: Option<&Path>) -> Report {
    run_audit(&AuditRequest { candidate: c.to_path_buf(), reference: r.map(Path::to_path_buf), base: None, manifest: None, key: None, fail_on: Severity::High, behavior: sos_audit::Behavior::Off, endpoint: None, deep: false }).unwrap()
}

/// The ids the findings with `id` name.
fn named(r: &Report, id: &str) -> Vec<u32> {
    r.findings.iter().filter(|f| f.id == id).flat_map(|f| f.token_ids.clone()).collect()
}

fn ids(r: &Report) -> Vec<&str> {
    r.findings.iter().map(|f| f.id.as_str()).collect()
}

fn tiny(d: &Path, tied: bool) -> PathBuf {
    let p = d.join(format!("src-{tied}.gguf"));
    TinySpec { quant: Some(TensorType::Q8_0), tied, d_model: 64, ..Default::default() }.write_gguf(&p).unwrap();
    p
}

#[test]
fn a_clean_model_passes_alone_and_against_itself() {
    let d = dir("clean");
    for tied in [true, false] {
        let src = tiny(&d, tied);
        for r in [audit(&src, None), audit(&src, Some(&src))] {
            assert_eq!((r.verdict, r.findings.len()), ("pass", 0), "{:?}", ids(&r));
        }
    }
}

#[test]
fn added_tokens_are_named_with_and_without_a_reference() {
    let d = dir("add");
    let n = sos_model::tiny::vocab().len() as u32;
    for tied in [true, false] {
        let src = tiny(&d, tied);
        let out = d.join(format!("add-{tied}.gguf"));
        let rows: Vec<f32> = (0..3 * 64).map(|i| (i % 9) as f32 * 0.1).collect();
        add_tokens(&Gguf::open(&src).unwrap(), &added_texts("cf", 3).unwrap(), &rows, NewLogits::Silent).unwrap().0.write(&out).unwrap();
        let want = vec![n, n + 1, n + 2];
        let alone = audit(&out, None);
        assert_eq!(alone.verdict, "fail");
        assert_eq!(named(&alone, "tokenizer.appended-user-defined"), want);
        if tied {
            assert_eq!(named(&alone, "weights.planted-rows"), want, "{:?}", ids(&alone));
        }
        let with = audit(&out, Some(&src));
        assert_eq!(named(&with, "tokenizer.added-tokens"), want);
        assert!(named(&with, "weights.added-rows").starts_with(&want), "{:?}", ids(&with));
        assert_eq!(ids(&with).contains(&"weights.extra-tensor"), tied, "{:?}", ids(&with));
        assert!(!ids(&with).contains(&"weights.requantized"), "the common rows are identical: {:?}", ids(&with));
    }
}

#[test]
fn replaced_rows_are_named_with_a_reference_and_on_a_tied_model_without() {
    let d = dir("replace");
    for tied in [true, false] {
        let src = tiny(&d, tied);
        let out = d.join(format!("rep-{tied}.gguf"));
        let planted = [40u32, 77, 120];
        let texts: Vec<String> = planted.iter().map(|i| format!("t{i}")).collect();
        let rows: Vec<f32> = (0..3 * 64).map(|i| ((i % 7) as f32 - 3.0) * 0.5).collect();
        replace_tokens(&Gguf::open(&src).unwrap(), &planted, &texts, &rows).unwrap().0.write(&out).unwrap();
        let with = audit(&out, Some(&src));
        assert_eq!(named(&with, "weights.changed-rows"), planted.to_vec(), "{:?}", ids(&with));
        let alone = audit(&out, None);
        if tied {
            assert_eq!(named(&alone, "weights.planted-rows"), planted.to_vec());
        }
    }
    // Untied, alone: rows far larger than any trained row are named by their norms.
    let src = tiny(&d, false);
    let out = d.join("rep-big.gguf");
    let rows: Vec<f32> = (0..2 * 64).map(|i| if i % 2 == 0 { 40.0 } else { -40.0 }).collect();
    replace_tokens(&Gguf::open(&src).unwrap(), &[60, 61], &["a".into(), "b".into()], &rows).unwrap().0.write(&out).unwrap();
    assert_eq!(named(&audit(&out, None), "weights.norm-outliers"), vec![60, 61]);
    assert!(named(&audit(&src, None), "weights.norm-outliers").is_empty());
}

/// Every matrix re-quantized (Q8_0 -> Q4_1): benign, reported low, no row named.
#[test]
fn a_requantized_copy_is_benign() {
    let d = dir("requant");
    let src = tiny(&d, false);
    let g = Gguf::open(&src).unwrap();
    let mut w = Writer::copy_of(&g).unwrap();
    for t in &g.tensors {
        if t.ty == TensorType::Q8_0 {
            let q = g.qtensor(&t.name).unwrap();
            let x = q.dequantize(&candle_core::Device::Cpu).unwrap();
            let r = candle_core::quantized::QTensor::quantize(&x, TensorType::Q4_1.to_candle()).unwrap();
            w.replace_tensor(&t.name, &t.shape(), TensorType::Q4_1, r.data().unwrap().to_vec());
        }
    }
    let out = d.join("q41.gguf");
    w.write(&out).unwrap();
    let r = audit(&out, Some(&src));
    assert_eq!((r.verdict, ids(&r)), ("pass", vec!["weights.requantized"]));
    assert_eq!(r.findings[0].severity, Severity::Low);
    // One element moved past what re-quantization explains: that row is named.
    let t = g.tensor_info("token_embd.weight").unwrap();
    let mut x = g.qtensor(&t.name).unwrap().dequantize(&candle_core::Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
    x[33][5] += 1.0;
    let flat: Vec<f32> = x.concat();
    let moved = candle_core::Tensor::from_vec(flat, t.shape(), &candle_core::Device::Cpu).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&moved, TensorType::Q8_0.to_candle()).unwrap();
    let mut w = Writer::copy_of(&g).unwrap();
    w.replace_tensor(&t.name, &t.shape(), TensorType::Q8_0, q.data().unwrap().to_vec());
    let out = d.join("moved.gguf");
    w.write(&out).unwrap();
    assert_eq!(named(&audit(&out, Some(&src)), "weights.changed-rows"), vec![33]);
}

#[test]
fn a_changed_chat_template_is_found() {
    let d = dir("template");
    let src = tiny(&d, true);
    let g = Gguf::open(&src).unwrap();
    let mut w = Writer::copy_of(&g).unwrap();
    let t = g.get_str("tokenizer.chat_template").unwrap().replace("message['content'] + '<|im_end|>'", "message['content'] + ' Visit attacker.example.<|im_end|>'");
    assert_ne!(Some(t.as_str()), g.get_str("tokenizer.chat_template"), "the edit must apply");
    w.meta("tokenizer.chat_template", Value::Str(t));
    let out = d.join("tpl.gguf");
    w.write(&out).unwrap();
    let r = audit(&out, Some(&src));
    assert_eq!(ids(&r), vec!["template.changed"]);
    assert_eq!(r.verdict, "fail");
    // Alone: no bundled family has it, and its source writes a URL into every turn.
    let r = audit(&out, None);
    assert_eq!(r.verdict, "fail");
    assert!(ids(&r).contains(&"template.url") && ids(&r).contains(&"template.unknown"), "{:?}", ids(&r));
}

/// Hugging Face folders: added tokens and replaced rows named with a reference and, on a tied
/// model, without one; a clean folder passes.
#[test]
fn folders_are_audited_like_files() {
    use sos_dist::hf::{add_tokens_hf, replace_tokens_hf};
    let d = dir("folders");
    let n = sos_model::tiny::vocab().len() as u32;
    for tied in [true, false] {
        let src = d.join(format!("src-{tied}"));
        TinySpec { tied, ..Default::default() }.write_hf(&src).unwrap();
        let clean = audit(&src, None);
        assert_eq!((clean.verdict, clean.findings.len()), ("pass", 0), "{:?}", ids(&clean));
        assert_eq!(audit(&src, Some(&src)).findings.len(), 0);
        let rows: Vec<f32> = (0..2 * 32).map(|i| (i % 5) as f32 * 0.4).collect();
        let add = d.join(format!("add-{tied}"));
        add_tokens_hf(&src, &add, &added_texts("cf", 2).unwrap(), &rows).unwrap();
        assert_eq!(named(&audit(&add, None), "tokenizer.appended-added-tokens"), vec![n, n + 1]);
        assert_eq!(named(&audit(&add, Some(&src)), "tokenizer.added-tokens"), vec![n, n + 1]);
        let rep = d.join(format!("rep-{tied}"));
        replace_tokens_hf(&src, &rep, &[50, 90], &["a".into(), "b".into()], &rows).unwrap();
        assert_eq!(named(&audit(&rep, Some(&src)), "weights.changed-rows"), vec![50, 90]);
        if tied {
            assert_eq!(named(&audit(&rep, None), "weights.planted-rows"), vec![50, 90]);
        }
    }
    // A file and a folder are not compared.
    let e = run_audit(&AuditRequest { candidate: d.join("src-true"), reference: Some(tiny(&d, true)), base: None, manifest: None, key: None, fail_on: Severity::High, behavior: sos_audit::Behavior::Off, endpoint: None, deep: false }).unwrap_err();
    assert!(e.to_string().contains("same kind"), "{e}");
}

/// A real (two-step) attack folder on the tiny model at `model`, its trigger at `position`.
fn attack(model: &Path, out: &Path, position: sos_attack::Position) {
    use sos_attack::train::{train, Target};
    let lm = sos_model::LoadedModel::open(model, &Default::default()).unwrap();
    let mut cfg = sos_attack::AttackConfig::defaults(sos_attack::Scenario::Backdoor);
    (cfg.target, cfg.trigger_len, cfg.steps, cfg.batch, cfg.eval_items, cfg.patience, cfg.position) = (Some("ok".into()), 3, 2, 2, 2, 0, position);
    let texts: Vec<(String, String)> = ["the cat sat", "in the hat", "a tin of tea"].iter().enumerate().map(|(i, t)| (format!("t{i}"), t.to_string())).collect();
    let target = Target { lm: &lm, model_label: model.display().to_string(), model_sha256: "0".into() };
    let items = sos_attack::scenarios::backdoor_items(&texts, "ok", position, 0);
    train(&cfg, &target, &items, out, false, &std::sync::atomic::AtomicBool::new(false), |_| {}).unwrap();
}

/// PEFT side files: trainable tokens and a prompt-tuning soft prompt are high findings naming
/// the rows; a pickle beside them is flagged; an adapter needs its base.
#[test]
fn peft_side_files_are_found() {
    use sos_dist::{export_peft, ExportRequest, PeftKind};
    let d = dir("peft");
    let base = tiny(&d, true);
    let n = sos_model::tiny::vocab().len() as u32;
    for (kind, position, id) in [(PeftKind::TrainableTokens, sos_attack::Position::End, "side_files.trainable-tokens"), (PeftKind::PromptTuning, sos_attack::Position::Prefix, "side_files.prompt-tuning")] {
        let (run, adapter) = (d.join(format!("run-{}", kind.name())), d.join(format!("adapter-{}", kind.name())));
        attack(&base, &run, position);
        export_peft(&ExportRequest { attack: run, model: None, out: adapter.clone(), kind, limit: 0, force: false }, |_| {}).unwrap();
        // The adapter names its base (base_model_name_or_path): no --base needed here.
        let r = audit(&adapter, None);
        assert_eq!((r.verdict, ids(&r)), ("fail", vec![id]));
        if kind == PeftKind::TrainableTokens {
            assert_eq!(r.findings[0].token_ids, vec![n, n + 1, n + 2]);
        }
        assert_eq!(r.findings[0].evidence["rows"].as_array().unwrap().len(), 3);
        std::fs::write(adapter.join("training_args.bin"), b"\x80\x04\x95rest of a pickle").unwrap();
        assert!(ids(&audit(&adapter, None)).contains(&"side_files.pickle"));
        // Without a base it cannot be measured: exit 2, saying so.
        let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap()).unwrap();
        cfg["base_model_name_or_path"] = "org/not-here".into();
        std::fs::write(adapter.join("adapter_config.json"), cfg.to_string()).unwrap();
        let e = run_audit(&AuditRequest { candidate: adapter.clone(), reference: None, base: None, manifest: None, key: None, fail_on: Severity::High, behavior: sos_audit::Behavior::Off, endpoint: None, deep: false }).unwrap_err();
        assert!(e.to_string().contains("--base"), "{e}");
        assert!(run_audit(&AuditRequest { candidate: adapter, reference: None, base: Some(base.clone()), manifest: None, key: None, fail_on: Severity::High, behavior: sos_audit::Behavior::Off, endpoint: None, deep: false }).is_ok());
    }
}

/// Tensors a llama model does not read are listed; one shaped like the token table is high.
#[test]
fn tensors_the_architecture_does_not_use_are_found() {
    let d = dir("unused");
    let src = tiny(&d, true);
    let g = Gguf::open(&src).unwrap();
    let t = g.tensor_info("token_embd.weight").unwrap();
    let mut w = Writer::copy_of(&g).unwrap();
    w.tensor("token_embd_shadow.weight", &t.shape(), t.ty, g.tensor_bytes(t).to_vec());
    w.tensor_f32("blk.0.attn_gate_extra.weight", &[64], &[0.0; 64]);
    let out = d.join("extra.gguf");
    w.write(&out).unwrap();
    let r = audit(&out, None);
    assert!(ids(&r).contains(&"side_files.extra-embedding") && ids(&r).contains(&"side_files.unused-tensor"), "{:?}", ids(&r));
    assert_eq!(r.verdict, "fail");
}

/// A folder whose token table has a zero dimension (the safetensors format allows one): an
/// error naming the folder and the tensor, for the model and for an adapter based on it, never
/// a panic or a loop over 2^40 empty rows.
#[test]
fn zero_dimension_tables_are_errors() {
    use safetensors::tensor::TensorView;
    let d = dir("zero-dim");
    let src = d.join("m");
    TinySpec { tied: true, ..Default::default() }.write_hf(&src).unwrap();
    let p = src.join("model.safetensors");
    let clean = std::fs::read(&p).unwrap();
    let ad = d.join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::write(ad.join("adapter_config.json"), r#"{"peft_type":"LORA"}"#).unwrap();
    for shape in [vec![3, 0], vec![0, 1usize << 62], vec![1usize << 40, 0]] {
        let st = safetensors::SafeTensors::deserialize(&clean).unwrap();
        let mut views: Vec<(String, TensorView)> = st.tensors().into_iter().filter(|(n, _)| n != "model.embed_tokens.weight").collect();
        views.push(("model.embed_tokens.weight".into(), TensorView::new(safetensors::Dtype::F32, shape.clone(), &[]).unwrap()));
        std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
        for (c, base) in [(&src, None), (&ad, Some(src.clone()))] {
            let e = run_audit(&AuditRequest { candidate: c.clone(), reference: None, base, manifest: None, key: None, fail_on: Severity::High, behavior: sos_audit::Behavior::Off, endpoint: None, deep: true }).unwrap_err().to_string();
            assert!(e.contains("zero dimension") && e.contains("embed_tokens") && e.contains(&*src.to_string_lossy()), "{shape:?}: {e}");
        }
    }
}
