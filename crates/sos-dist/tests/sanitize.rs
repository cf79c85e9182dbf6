//! The way back: sanitizing an injected file against its source gives the source's bytes;
//! without a source, the planted tokens and their rows go.

mod common;
use common::tensors;

use std::path::PathBuf;

use sos_dist::gguf_add::{add_tokens, NewLogits};
use sos_dist::gguf_replace::replace_tokens;
use sos_dist::tokens::{added_texts, rare_tokens};
use sos_dist::{sanitize_alone, sanitize_with_reference};
use sos_model::gguf::{Gguf, TensorType, Value};
use sos_model::tiny::TinySpec;
use sos_model::LoadedModel;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sos-sanitize-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The two ways `inject` plants a trigger in `g`: the written file's bytes and the token texts.
fn plant(g: &Gguf, src: &std::path::Path, replace: bool, rows: &[f32], out: &std::path::Path) -> Vec<String> {
    if replace {
        let (tok, _) = LoadedModel::open_text(src, None).unwrap();
        let (ids, texts) = rare_tokens(&tok, |_| true, 2, [""]).unwrap();
        replace_tokens(g, &ids, &texts, rows).unwrap().0.write(out).unwrap();
        texts
    } else {
        let texts = added_texts("cf", 2).unwrap();
        add_tokens(g, &texts, rows, NewLogits::Silent).unwrap().0.write(out).unwrap();
        texts
    }
}

#[test]
fn sanitizing_an_injected_file_restores_its_source() {
    for (tied, replace) in [(true, false), (false, false), (true, true), (false, true)] {
        let d = dir(&format!("{tied}-{replace}"));
        let (src, inj, fixed, alone) = (d.join("src.gguf"), d.join("inj.gguf"), d.join("fixed.gguf"), d.join("alone.gguf"));
        TinySpec { quant: Some(TensorType::Q8_0), tied, ..Default::default() }.write_gguf(&src).unwrap();
        let g = Gguf::open(&src).unwrap();
        let n = g.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap().len();
        let rows: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).sin()).collect();
        let texts = plant(&g, &src, replace, &rows, &inj);
        let case = format!("tied {tied}, replace {replace}");

        let rep = sanitize_with_reference(&inj, &src, &fixed, false).unwrap();
        assert_eq!(std::fs::read(&fixed).unwrap(), std::fs::read(&src).unwrap(), "{case}: {rep:?}");
        if replace {
            assert!(rep.removed_tokens.is_empty() && rep.restored_rows == 2, "{case}: {rep:?}");
        } else {
            assert_eq!(rep.removed_tokens, vec![(n as u32, texts[0].clone()), (n as u32 + 1, texts[1].clone())]);
        }
        assert!(rep.restored_tensors.contains(&"token_embd.weight".to_string()));
        assert_eq!(rep.removed_tensors.is_empty(), !tied, "{case}: {rep:?}");
        assert!(rep.left.is_empty(), "{case}: {rep:?}");

        // Without the source: the planted tokens and their rows go. A tied source comes back
        // byte for byte (its output layer equals the table but for the planted rows); an untied
        // one too after add-token, while rows replaced in its table cannot be told (and say so).
        let rep = sanitize_alone(&inj, &alone, false).unwrap();
        assert_eq!(rep.removed_tokens.len(), if replace { 0 } else { 2 });
        let h = Gguf::open(&alone).unwrap();
        h.check_llama_cpp().unwrap();
        assert_eq!(h.get("tokenizer.ggml.tokens").and_then(Value::as_array).unwrap().len(), n);
        if tied || !replace {
            assert_eq!(std::fs::read(&alone).unwrap(), std::fs::read(&src).unwrap(), "{case}: {rep:?}");
            assert_eq!(rep.restored_rows, if replace { 2 } else { 0 }, "{case}");
        } else {
            assert_eq!(std::fs::read(&alone).unwrap(), std::fs::read(&inj).unwrap(), "{case}: nothing to change");
        }
        // An untied file's table can hide replaced rows: the report says so.
        assert_eq!(rep.left.iter().any(|l| l.contains("--reference")), !tied, "{case}: {rep:?}");
        assert_eq!(rep.left.len(), usize::from(!tied), "{case}: {rep:?}");
        // An input is never overwritten.
        assert!(sanitize_alone(&inj, &inj, true).is_err() && sanitize_with_reference(&inj, &src, &src, true).is_err());
        // An existing output needs `force`.
        assert!(sanitize_alone(&inj, &alone, false).unwrap_err().to_string().contains("--force"));
        sanitize_alone(&inj, &alone, true).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// A file that never had an injection is left as it is, tied or not.
#[test]
fn sanitizing_a_clean_file_changes_nothing() {
    for tied in [true, false] {
        let d = dir(&format!("clean-{tied}"));
        let (src, alone) = (d.join("src.gguf"), d.join("alone.gguf"));
        TinySpec { quant: Some(TensorType::Q8_0), tied, ..Default::default() }.write_gguf(&src).unwrap();
        let rep = sanitize_alone(&src, &alone, false).unwrap();
        assert_eq!(std::fs::read(&alone).unwrap(), std::fs::read(&src).unwrap(), "tied {tied}: {rep:?}");
        assert!(rep.removed_tokens.is_empty() && rep.removed_tensors.is_empty() && rep.restored_rows == 0, "{rep:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

/// More token types than tokens (a hostile header): an error naming the file, not a panic.
#[test]
fn token_types_that_do_not_match_the_tokens_are_an_error() {
    let d = dir("types");
    let p = d.join("t.gguf");
    let mut w = sos_model::gguf::Writer::new();
    w.meta("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .meta("tokenizer.ggml.tokens", Value::Array(vec![Value::Str("a".into())]))
        .meta("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(4), Value::I32(4)]));
    w.tensor_f32("token_embd.weight", &[1, 4], &[0.0; 4]);
    w.write(&p).unwrap();
    let e = sanitize_alone(&p, &d.join("out.gguf"), true).unwrap_err().to_string();
    assert!(e.contains("t.gguf") && e.contains("2 token types for 1 tokens"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Every plain file of a folder, by name.
fn files(d: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap()).map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())).collect();
    v.sort();
    v
}

/// Hugging Face folders: against the source, every file comes back byte for byte; alone, the
/// added tokens and their rows go and a tied model's own output layer is folded back, so the
/// tensors and the tokenizer's tokens are the source's again.
#[test]
fn sanitizing_an_injected_folder_restores_its_source() {
    use sos_dist::hf::{add_tokens_hf, replace_tokens_hf};
    for (tied, replace) in [(true, false), (false, false), (true, true), (false, true)] {
        let d = dir(&format!("hf-{tied}-{replace}"));
        let (src, inj, fixed, alone) = (d.join("src"), d.join("inj"), d.join("fixed"), d.join("alone"));
        let spec = TinySpec { tied, ..Default::default() };
        spec.write_hf(&src).unwrap();
        let rows: Vec<f32> = (0..2 * spec.d_model).map(|i| (i % 5) as f32 * 0.3).collect();
        let (tok, _) = LoadedModel::open_text(&src, None).unwrap();
        let (ids, texts) = if replace { rare_tokens(&tok, |_| true, 2, [""]).unwrap() } else { (Vec::new(), added_texts("cf", 2).unwrap()) };
        if replace {
            replace_tokens_hf(&src, &inj, &ids, &texts, &rows).unwrap();
        } else {
            add_tokens_hf(&src, &inj, &texts, &rows).unwrap();
        }
        assert_ne!(files(&inj), files(&src));
        let what = format!("tied {tied}, replace {replace}");

        let rep = sanitize_with_reference(&inj, &src, &fixed, false).unwrap();
        assert_eq!(files(&fixed), files(&src), "{what}: {rep:?}");
        assert_eq!(rep.removed_tokens.len(), if replace { 0 } else { 2 }, "{what}");
        assert!(rep.restored_tensors.contains(&"model.embed_tokens.weight".to_string()), "{what}");

        let rep = sanitize_alone(&inj, &alone, false).unwrap();
        let model = |d: &std::path::Path| tensors(&d.join("model.safetensors"));
        let added = |d: &std::path::Path| {
            let tj: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("tokenizer.json")).unwrap()).unwrap();
            tj["added_tokens"].clone()
        };
        let cfg = |d: &std::path::Path| {
            let c: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
            (c["vocab_size"].clone(), c["tie_word_embeddings"].as_bool().unwrap_or(false))
        };
        assert_eq!(added(&alone), added(&src), "{what}");
        if tied || !replace {
            // Tied: the output layer was the table's rows; untied add-token: the rows end the table.
            assert_eq!(model(&alone), model(&src), "{what}: {rep:?}");
            assert_eq!(cfg(&alone), cfg(&src), "{what}");
            // An untied model's trained output layer: replaced rows could hide; said so.
            assert_eq!(rep.left.iter().any(|l| l.contains("--reference")), !tied, "{what}: {:?}", rep.left);
        } else {
            // Replaced rows under a trained output layer: nothing to justify a change; said so.
            assert_eq!(model(&alone), model(&inj), "{what}");
            assert!(rep.left.iter().any(|l| l.contains("--reference")), "{what}: {:?}", rep.left);
        }
        LoadedModel::open(&alone, &Default::default()).unwrap();
        // Refused: writing over an input, or into an existing folder without --force.
        assert!(sanitize_alone(&inj, &inj, true).is_err());
        assert!(sanitize_alone(&inj, &alone, false).unwrap_err().to_string().contains("--force"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
