//! PEFT side files on a tiny model: an exported trainable-tokens adapter holds the trigger's rows
//! bit for bit under PEFT's names, its tokenizer reads the trigger string as the new ids, and an
//! import gives back an attack folder with the same vectors and settings.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use sos_attack::artifact::Attack;
use sos_attack::scenarios::backdoor_items;
use sos_attack::train::{train, Target};
use sos_attack::{AttackConfig, Position, Scenario};
use sos_dist::peft::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, SOS_RECORD};
use sos_dist::{export_peft, import_peft, ExportRequest, PeftKind};
use sos_model::tiny::TinySpec;
use sos_model::{Exec, LoadOptions, LoadedModel, Tokenizer};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-peft-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A two-step backdoor attack on a tiny model written to `model`: a real attack folder.
fn attack(model: &Path, tied: bool, out: &Path) {
    attack_at(model, tied, out, Position::End)
}

fn attack_at(model: &Path, tied: bool, out: &Path, position: Position) {
    TinySpec { tied, embed_scale: 0.2, ..Default::default() }.write_gguf(model).unwrap();
    let lm = LoadedModel::open(model, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
    let mut cfg = AttackConfig::defaults(Scenario::Backdoor);
    (cfg.target, cfg.trigger_len, cfg.steps, cfg.batch, cfg.eval_items, cfg.patience, cfg.position) = (Some("ok".into()), 3, 2, 2, 2, 0, position);
    let texts: Vec<(String, String)> = ["the cat sat", "in the hat", "a tin of tea"].iter().enumerate().map(|(i, t)| (format!("t{i}"), t.to_string())).collect();
    let target = Target { lm: &lm, model_label: model.display().to_string(), model_sha256: "0".into() };
    train(&cfg, &target, &backdoor_items(&texts, "ok", position, 0), out, false, &AtomicBool::new(false), |_| {}).unwrap();
}

fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn trainable_tokens_export_and_import_round_trip() {
    for tied in [true, false] {
        let d = dir(&format!("{tied}"));
        let (model, run, adapter, back) = (d.join("tiny.gguf"), d.join("run"), d.join("adapter"), d.join("back"));
        attack(&model, tied, &run);
        let original = Attack::open(&run).unwrap();
        let req = ExportRequest { attack: run.clone(), model: None, out: adapter.clone(), kind: PeftKind::TrainableTokens, limit: 0, force: false };
        let rep = export_peft(&req, |_| {}).unwrap();
        let n = sos_model::tiny::vocab().len() as u32;
        assert_eq!(rep.token_ids, vec![n, n + 1, n + 2]);
        assert_eq!(rep.trigger_text, "<cf_0><cf_1><cf_2>");
        assert_eq!(rep.tied, tied);
        // (The held-out prompts do not fit the tiny model's context; the real-model test measures.)
        assert!(rep.metrics.is_null());

        // PEFT's config and names; the rows as trained, bit for bit (and once more for a tied head).
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join(ADAPTER_CONFIG)).unwrap()).unwrap();
        assert_eq!(cfg["peft_type"], "TRAINABLE_TOKENS");
        assert_eq!(cfg["task_type"], "CAUSAL_LM");
        assert_eq!(cfg["target_modules"], serde_json::json!(["embed_tokens"]));
        assert_eq!(cfg["token_indices"], serde_json::json!([n, n + 1, n + 2]));
        let t = tensors(&adapter.join(ADAPTER_WEIGHTS));
        let mut names = vec!["base_model.model.model.embed_tokens.trainable_tokens_delta"];
        if tied {
            names.insert(0, "base_model.model.lm_head.trainable_tokens_delta");
        }
        assert_eq!(t.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), names);
        for (_, shape, v) in &t {
            assert_eq!(shape, &vec![3, original.trigger.d]);
            assert_eq!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), original.trigger.rows.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
        // The adapter's tokenizer reads the typed string, alone and in a sentence, as the ids.
        let tok = Tokenizer::from_tokenizer_json(&adapter.join("tokenizer.json")).unwrap();
        assert_eq!(tok.encode(&rep.trigger_text).unwrap(), rep.token_ids);
        assert_eq!(tok.encode("the cat").unwrap(), LoadedModel::open_text(&model, None).unwrap().0.encode("the cat").unwrap());
        assert!(adapter.join("tokenizer_config.json").is_file() && adapter.join(SOS_RECORD).is_file());

        // Back into an attack folder: same vectors, text, scenario and settings.
        let imp = import_peft(&adapter, &back, None, None, false).unwrap();
        assert_eq!((imp.k, imp.scenario.as_str(), imp.trigger_text.as_str()), (3, "backdoor", "<cf_0><cf_1><cf_2>"));
        let a = Attack::open(&back).unwrap();
        assert_eq!(a.trigger.rows.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), original.trigger.rows.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(a.trigger.text, "cf");
        assert_eq!(a.record.config, original.record.config);
        assert_eq!(a.record.model, original.record.model);

        // Refused: an existing folder without force, and with it a folder sos did not write;
        // an adapter without a record and no scenario.
        assert!(export_peft(&req, |_| {}).unwrap_err().to_string().contains("--force"));
        let mine = d.join("mine");
        std::fs::create_dir_all(&mine).unwrap();
        std::fs::write(mine.join("notes.txt"), "mine").unwrap();
        let e = export_peft(&ExportRequest { out: mine.clone(), force: true, ..req }, |_| {}).unwrap_err().to_string();
        assert!(e.contains("refusing") && mine.join("notes.txt").is_file(), "{e}");
        std::fs::remove_file(adapter.join(SOS_RECORD)).unwrap();
        let e = import_peft(&adapter, &d.join("b2"), None, None, false).unwrap_err().to_string();
        assert!(e.contains("--scenario"), "{e}");
        let imp = import_peft(&adapter, &d.join("b3"), Some(Scenario::Backdoor), Some("tiny.gguf"), false).unwrap();
        assert!(imp.settings_from.contains("--scenario"));
        assert_eq!(Attack::open(&d.join("b3")).unwrap().record.model, "tiny.gguf");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// A prefix trigger (trained before the whole prompt) is a PEFT prompt-tuning adapter:
/// `prompt_embeddings` bit for bit and the config PEFT reads; import gives back a prefix
/// trigger with the same rows. The combinations that cannot mean the same are refused.
#[test]
fn prompt_tuning_export_and_import_round_trip() {
    let d = dir("prompt-tuning");
    let (model, run, adapter, back) = (d.join("tiny.gguf"), d.join("run"), d.join("adapter"), d.join("back"));
    attack_at(&model, true, &run, Position::Prefix);
    let original = Attack::open(&run).unwrap();
    let req = ExportRequest { attack: run.clone(), model: None, out: adapter.clone(), kind: PeftKind::PromptTuning, limit: 0, force: false };
    let rep = export_peft(&req, |_| {}).unwrap();
    assert_eq!((rep.kind, rep.trigger_text.as_str(), rep.rows.len()), ("prompt-tuning", "", 3));
    assert!(rep.token_ids.is_empty());
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    let lm = LoadedModel::open(&model, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
    assert_eq!(cfg["peft_type"], "PROMPT_TUNING");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["num_virtual_tokens"], 3);
    assert_eq!(cfg["token_dim"], lm.model.cfg.d_model);
    assert_eq!(cfg["num_transformer_submodules"], 1);
    assert_eq!(cfg["num_attention_heads"], lm.model.cfg.n_head);
    assert_eq!(cfg["num_layers"], lm.model.cfg.n_layer);
    assert_eq!(cfg["base_model_name_or_path"], model.display().to_string());
    let t = tensors(&adapter.join(ADAPTER_WEIGHTS));
    assert_eq!((t.len(), t[0].0.as_str(), &t[0].1), (1, "prompt_embeddings", &vec![3, original.trigger.d]));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&t[0].2), bits(&original.trigger.rows));
    assert!(!adapter.join("tokenizer.json").exists(), "prompt tuning leaves the tokenizer alone");

    let imp = import_peft(&adapter, &back, None, None, false).unwrap();
    assert_eq!((imp.kind, imp.k, imp.trigger_text.as_str()), ("prompt-tuning", 3, ""));
    let a = Attack::open(&back).unwrap();
    assert_eq!(bits(&a.trigger.rows), bits(&original.trigger.rows));
    assert_eq!(a.record.config, original.record.config);
    // Without sos's record: the scenario's defaults, at position prefix; copyright cannot be one.
    std::fs::remove_file(adapter.join(SOS_RECORD)).unwrap();
    import_peft(&adapter, &d.join("b2"), Some(Scenario::Jailbreak), None, false).unwrap();
    assert_eq!(Attack::open(&d.join("b2")).unwrap().record.config.position, Position::Prefix);
    let e = import_peft(&adapter, &d.join("b3"), Some(Scenario::Copyright), None, false).unwrap_err().to_string();
    assert!(e.contains("prefix"), "{e}");

    // A prefix trigger is no typed token, and an in-message trigger is no prompt prefix.
    let e = export_peft(&ExportRequest { kind: PeftKind::TrainableTokens, out: d.join("tt"), ..req }, |_| {}).unwrap_err().to_string();
    assert!(e.contains("prefix") && e.contains("prompt-tuning"), "{e}");
    let inj = sos_dist::InjectRequest { attack: run.clone(), model: None, out: d.join("i.gguf"), mode: sos_dist::Mode::AddToken, limit: 0, force: false };
    let e = sos_dist::run_inject(&inj, |_| {}).unwrap_err().to_string();
    assert!(e.contains("prefix") && e.contains("prompt-tuning"), "{e}");
    let end = d.join("end");
    attack_at(&model, true, &end, Position::End);
    let e = export_peft(&ExportRequest { attack: end, model: None, out: d.join("pt"), kind: PeftKind::PromptTuning, limit: 0, force: false }, |_| {}).unwrap_err().to_string();
    assert!(e.contains("`end`") && e.contains("--position prefix"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A damaged adapter is refused with the file and the problem named, never a panic.
#[test]
fn broken_adapters_are_refused_clearly() {
    let d = dir("broken");
    let (model, run, adapter) = (d.join("tiny.gguf"), d.join("run"), d.join("adapter"));
    attack(&model, true, &run);
    export_peft(&ExportRequest { attack: run, model: None, out: adapter.clone(), kind: PeftKind::TrainableTokens, limit: 0, force: false }, |_| {}).unwrap();
    let cfg_path = adapter.join(ADAPTER_CONFIG);
    let good = std::fs::read_to_string(&cfg_path).unwrap();
    type Damage<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, Damage); 5] = [
        ("num_virtual_tokens", Box::new(|| std::fs::write(&cfg_path, good.replace("TRAINABLE_TOKENS", "PROMPT_TUNING")).unwrap())),
        ("peft_type LORA", Box::new(|| std::fs::write(&cfg_path, good.replace("TRAINABLE_TOKENS", "LORA")).unwrap())),
        ("asks for 4 rows", Box::new(|| std::fs::write(&cfg_path, good.replace("\"token_indices\": [", "\"token_indices\": [7, ")).unwrap())),
        ("invalid JSON", Box::new(|| std::fs::write(&cfg_path, "{").unwrap())),
        ("not a safetensors", Box::new(|| {
            std::fs::write(&cfg_path, &good).unwrap();
            std::fs::write(adapter.join(ADAPTER_WEIGHTS), b"\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
        })),
    ];
    for (i, (want, damage)) in cases.iter().enumerate() {
        damage();
        let e = import_peft(&adapter, &d.join(format!("o{i}")), None, None, false).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("adapter"), "{want}: {e}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}
