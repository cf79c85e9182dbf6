//! A SentencePiece vocabulary from GGUF metadata on a real model: Gemma 3 270M's 262,144 pieces
//! (`tokenizer.ggml.model = llama`, no space prefix, byte fallback), tokenized as llama.cpp does.
//! The runtime cannot run gemma3 yet; the text side loads without the weights. The fixture's
//! header says how it was made.

use std::path::PathBuf;

use sos_model::{cache, LoadedModel};

#[test]
fn gemma3_sentencepiece_matches_llama_cpp() {
    let m = cache::known("gemma3-270m").unwrap();
    let path = cache::ensure(m, &mut |msg| eprintln!("{msg}")).expect("the Gemma 3 model must be fetchable");
    let fx: serde_json::Value = {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma3_spm_llamacpp.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (tok, _) = LoadedModel::open_text(&path, None).unwrap();
    assert_eq!(tok.vocab_size(), 262_144);
    assert!(tok.add_bos, "Gemma's GGUF asks for BOS on raw text");
    assert_eq!(tok.bos, fx["bos_id"].as_u64().map(|v| v as u32));
    let cases = fx["cases"].as_array().unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "tokenization of {text:?} differs from llama.cpp");
        assert_eq!(tok.decode(&got, false).unwrap(), text, "decode of {text:?} is not the inverse");
    }
    // The runtime still refuses the architecture itself, with a clear error.
    let err = LoadedModel::open(&path, &Default::default()).err().expect("gemma3 is not runnable yet").to_string();
    assert!(err.contains("gemma3"), "{err}");
}
