//! llama.cpp loads what `inject` writes, splits the typed trigger into the planted tokens, and
//! decodes an untriggered prompt exactly as it decodes the original file: checked with
//! llama.cpp's ready-built Python wheel (`cyllama`, pinned, installed from PyPI into a venv under
//! the target folder on first use) on tiny models the test builds. A missing Python or wheel is
//! an error, not a skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use sos_dist::gguf_add::{add_tokens, NewLogits};
use sos_dist::tokens::{added_texts, typed};
use sos_model::gguf::{Gguf, TensorType, Value};
use sos_model::generate::generate;
use sos_model::tiny::TinySpec;
use sos_model::{Exec, LoadOptions, LoadedModel};

const CYLLAMA: &str = "cyllama==0.2.18";
const PROMPT: &str = "<|im_start|>user\nthe cat<|im_end|>\n";

/// A venv with the pinned wheel, made once per target folder.
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cyllama-venv");
    let py = venv.join("bin/python");
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new(&py).args(["-c", "import cyllama"])) {
        assert!(ok(Command::new("python3").args(["-m", "venv"]).arg(&venv)), "python3 -m venv {} failed", venv.display());
        assert!(ok(Command::new(&py).args(["-m", "pip", "install", "-q", CYLLAMA])), "pip install {CYLLAMA} failed");
    }
    py
}

#[test]
fn llama_cpp_reads_injected_tiny_models() {
    let py = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../compat/cyllama_inject_check.py");
    for tied in [true, false] {
        let d = std::env::temp_dir().join(format!("sos-llamacpp-{tied}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (src, out) = (d.join("src.gguf"), d.join("out.gguf"));
        let spec = TinySpec { quant: Some(TensorType::Q8_0), tied, d_model: 64, ..Default::default() };
        spec.write_gguf(&src).unwrap();
        let g = Gguf::open(&src).unwrap();
        let n = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap().len() as i64;
        let texts = added_texts("cf", 3).unwrap();
        // Rows three times the table row of the token the original picks first: were they
        // logits (a tied table), they would beat it.
        let lm = LoadedModel::open(&src, &LoadOptions { exec: Exec::F32, ..Default::default() }).unwrap();
        let ids = lm.tokenizer.encode(PROMPT).unwrap();
        let first = generate(&lm.model, &lm.model.embed_ids(&ids).unwrap(), 1, &[], Default::default(), |_| Ok(true)).unwrap().tokens[0];
        let row: Vec<f32> = lm.model.embed_ids(&[first]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let rows: Vec<f32> = (0..3).flat_map(|_| row.iter().map(|v| 3.0 * v)).collect();
        add_tokens(&g, &texts, &rows, NewLogits::Silent).unwrap().0.write(&out).unwrap();
        let typed = format!("the {} cat", typed(&texts));
        let res = Command::new(&py)
            .arg(&script)
            .args(["--original", src.to_str().unwrap(), "--injected", out.to_str().unwrap(), "--typed", &typed, "--prompt", PROMPT])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&res.stdout);
        assert!(res.status.success(), "tied {tied}: {}\n{stdout}", String::from_utf8_lossy(&res.stderr));
        let v: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
        assert_eq!(v["n_vocab"], serde_json::json!([n, n + 3]), "{v}");
        let ids: Vec<i64> = v["typed_ids"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
        assert_eq!(ids.windows(3).filter(|w| *w == [n, n + 1, n + 2]).count(), 1, "tied {tied}: {v}");
        assert_eq!(v["tokens"][0], v["tokens"][1], "tied {tied}: greedy tokens differ: {v}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
