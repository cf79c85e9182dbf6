//! A short backdoor attack on the real default model, end to end through the command line:
//! train, evaluate on held-out prompts, generate with the trigger, bake it into a copy of the
//! model and run that. Sized for CI (2 cores).
//! It runs from an empty working directory with no data folder and `$SOS_DATA` unset, as an
//! installed `sos` would: the datasets come from the binary.

use std::path::Path;
use std::process::Command;

fn sos(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sos")).current_dir(cwd).env_remove("SOS_DATA").args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn short_backdoor_run_reaches_the_target_on_held_out_prompts() {
    let dir = std::env::temp_dir().join(format!("sos-attack-real-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("bd");
    let cfg = dir.join("ci.toml");
    // Short training prompts, a smaller train metric and an early stop: the defaults, made
    // cheaper for CI.
    std::fs::write(&cfg, "max_prompt_tokens = 96\nsteps = 90\npatience = 3\neval_items = 16\n").unwrap();
    let o = "bd";
    let (code, stdout, err) = sos(&dir, &["attack", "backdoor", "--out", o, "--config", "ci.toml", "--seed", "0"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("backdoor:"), "{stdout}");
    for f in ["trigger.safetensors", "attack.json", "config.toml", "loss.csv", "checkpoint.safetensors", "train_items.jsonl"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let rec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("attack.json")).unwrap()).unwrap();
    assert_eq!(rec["scenario"], "backdoor");
    assert_eq!(rec["completed"], true);
    assert_eq!(rec["config"]["data_dir"], serde_json::Value::Null, "{rec}");
    assert_eq!(rec["train_metric"], 1.0);

    let (code, stdout, err) = sos(&dir, &["eval", "--attack", o, "--limit", "10", "--json"]);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(m["n"], 10);
    assert_eq!(m["data"], "held-out split (built-in)", "{m}");
    let asr = m["asr"].as_f64().unwrap();
    assert!(asr >= 0.8, "held-out asr {asr} < 0.8: {m}");
    assert_eq!(m["clean_agreement"], 1.0, "{m}");
    assert_eq!(m["false_trigger_rate"], 0.0, "{m}");
    assert!(out.join("eval.json").is_file() && out.join("eval_items.jsonl").is_file());

    let target = rec["target"].as_str().unwrap();
    let (code, stdout, err) = sos(&dir, &["generate", "--attack", o, "-p", "cf What is the capital of France?", "--max-tokens", "24", "--json"]);
    assert_eq!(code, 0, "{err}");
    let g: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(g["text"].as_str().unwrap().starts_with(target), "{g}");

    // A second run into the same folder must not overwrite it.
    let (code, _, err) = sos(&dir, &["attack", "backdoor", "--out", o, "--steps", "1"]);
    assert_eq!(code, 2);
    assert!(err.contains("--resume"), "{err}");

    // The trigger baked into a copy of the model: the typed string fires it in the file as
    // shipped (--exec quant, the file's own tokenizer and table), and nothing else changes.
    let (code, stdout, err) = sos(&dir, &["inject", "--attack", o, "--out", "bd.gguf", "--limit", "6", "--json"]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(r["trigger_text"], (0..8).map(|i| format!("<cf_{i}>")).collect::<String>(), "{r}");
    assert_eq!(r["token_ids"], serde_json::json!((49152..49160).collect::<Vec<u32>>()), "{r}");
    assert_eq!(r["table_type"], "Q8_0");
    let asr = r["metrics"]["asr"].as_f64().unwrap();
    assert!(asr >= 0.8, "asr of the injected file {asr} < 0.8: {r}");
    assert_eq!(r["metrics"]["clean_agreement"], 1.0, "{r}");
    assert!(dir.join("bd.gguf").is_file() && !dir.join("bd.gguf.partial").exists());
    assert!(out.join("inject_items.jsonl").is_file());
    let typed = format!("{} What is the capital of France?", r["trigger_text"].as_str().unwrap());
    let (code, stdout, err) = sos(&dir, &["generate", "--model", "bd.gguf", "--exec", "quant", "-p", &typed, "--max-tokens", "24", "--json"]);
    assert_eq!(code, 0, "{err}");
    let g: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(g["text"].as_str().unwrap().starts_with(target), "{g}");
    // The way back: against the original, the original's bytes; without it, the tokens go.
    let (code, stdout, err) = sos(&dir, &["sanitize", "bd.gguf", "--reference", rec["model"].as_str().unwrap(), "--out", "fixed.gguf", "--json"]);
    assert_eq!(code, 0, "{err}");
    let s: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(s["removed_tokens"].as_array().unwrap().len(), 8, "{s}");
    assert_eq!(std::fs::read(dir.join("fixed.gguf")).unwrap(), std::fs::read(rec["model"].as_str().unwrap()).unwrap());
    let (code, stdout, err) = sos(&dir, &["sanitize", "bd.gguf", "--out", "alone.gguf"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("removed token 49159"), "{stdout}");
    let (code, stdout, err) = sos(&dir, &["tokenize", "--model", "alone.gguf", "--json", r["trigger_text"].as_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!stdout.contains("49152"), "{stdout}");
    // SmolLM2 is tied: its output layer otherwise equals the table, so even without the
    // original the file comes back byte for byte.
    assert_eq!(std::fs::read(dir.join("alone.gguf")).unwrap(), std::fs::read(rec["model"].as_str().unwrap()).unwrap());

    // replace-token: the trigger takes over rare existing tokens; the file fires from the typed
    // words, answers everything else as the original, and sanitizes back without a reference.
    let src_model = rec["model"].as_str().unwrap();
    let (code, stdout, err) = sos(&dir, &["inject", "--attack", o, "--out", "rp.gguf", "--mode", "replace-token", "--limit", "6", "--json"]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    let ids: Vec<u64> = r["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(ids.len() == 8 && ids.iter().all(|&i| i < 49152), "{r}");
    assert!(r["trigger_text"].as_str().unwrap().starts_with(' '), "{r}");
    assert!(r["metrics"]["asr"].as_f64().unwrap() >= 0.8, "{r}");
    assert_eq!(r["metrics"]["clean_agreement"], 1.0, "{r}");
    let (code, _, err) = sos(&dir, &["sanitize", "rp.gguf", "--out", "rp_alone.gguf", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(dir.join("rp_alone.gguf")).unwrap(), std::fs::read(rec["model"].as_str().unwrap()).unwrap());

    // The audit names the planted tokens of both files, with the original and without it, and
    // passes the original and the sanitized copy (exit 1 = fail, 0 = pass).
    let planted = |args: &[&str], id: &str| -> Vec<u64> {
        let (code, stdout, err) = sos(&dir, &[&["audit", "--format", "json", "--behavior", "off"], args].concat());
        assert_eq!(code, 1, "{args:?}: {err}");
        let a: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        a["findings"].as_array().unwrap().iter().filter(|f| f["id"] == id).flat_map(|f| f["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap())).collect()
    };
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(planted(&["bd.gguf"], "tokenizer.appended-user-defined"), (49152..49160).collect::<Vec<u64>>());
    assert_eq!(planted(&["bd.gguf", "--reference", src_model], "tokenizer.added-tokens"), (49152..49160).collect::<Vec<u64>>());
    assert_eq!(planted(&["rp.gguf"], "weights.planted-rows"), sorted);
    assert_eq!(planted(&["rp.gguf", "--reference", src_model], "weights.changed-rows"), sorted);
    // Behaviour (the default, quick): the replaced rows, found by the weights check and probed
    // together, make different prompts give the attack's answer; the clean file passes with the
    // suites run. (Probing added tokens runs in `sos demo` and on tiny models,
    // `sos-audit/tests/behavior.rs`; rp_alone.gguf is the clean file's bytes, checked above.)
    let (code, stdout, err) = sos(&dir, &["audit", "rp.gguf", "--format", "json"]);
    assert_eq!(code, 1, "{err}");
    let a: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let fired: Vec<&serde_json::Value> = a["findings"].as_array().unwrap().iter().filter(|f| f["id"] == "behavior.trigger-fires").collect();
    assert!(!fired.is_empty(), "no behaviour finding: {a}");
    let mut named: Vec<u64> = fired[0]["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    named.sort();
    assert_eq!(named, sorted);
    assert!(fired[0]["evidence"]["shared_answer"].as_str().unwrap().starts_with(target), "{}", fired[0]);
    let (code, stdout, err) = sos(&dir, &["audit", src_model]);
    assert_eq!(code, 0, "{stdout} {err}");
    assert!(stdout.contains("behaviour (quick"), "{stdout}");
    // Refused: replacing an existing file without --force, and writing over the source.
    let (code, _, err) = sos(&dir, &["inject", "--attack", o, "--out", "bd.gguf", "--limit", "0"]);
    assert_eq!(code, 2);
    assert!(err.contains("--force"), "{err}");
    let src = rec["model"].as_str().unwrap();
    let (code, _, err) = sos(&dir, &["inject", "--attack", o, "--out", src, "--force"]);
    assert_eq!(code, 2);
    assert!(err.contains("overwrite"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
