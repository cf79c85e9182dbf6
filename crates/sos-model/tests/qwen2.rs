//! The second architecture on a real model: Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v biases,
//! half-split rotary layout, untied output, Q5_0/Q4_K/Q6_K/Q8_0 tensors, the qwen2 pre-tokenizer),
//! against llama.cpp. The fixture's header says how it was made.

use std::path::PathBuf;

use sos_model::generate::{generate, Sampling};
use sos_model::{cache, Exec, LoadOptions, LoadedModel, Message};

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_llamacpp.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn qwen2_matches_llama_cpp() {
    let m = cache::known("qwen2.5-coder-0.5b-instruct").unwrap();
    let path = cache::ensure(m, &mut |msg| eprintln!("{msg}")).expect("the Qwen2 model must be fetchable");
    let fx = fixture();
    let want = ids(&fx["generated_ids"]);
    for exec in [Exec::Quant, Exec::F32] {
        let lm = LoadedModel::open(&path, &LoadOptions { exec, ..Default::default() }).unwrap();
        let messages = [Message::system(fx["system"].as_str().unwrap()), Message::user(fx["question"].as_str().unwrap())];
        let text = lm.template().unwrap().render(&messages, true).unwrap();
        assert_eq!(text, fx["prompt_text"].as_str().unwrap(), "chat template rendering differs");
        let prompt = lm.tokenizer.encode(&text).unwrap();
        assert_eq!(prompt, ids(&fx["prompt_ids"]), "tokenization differs from llama.cpp");
        let x = lm.model.embed_ids(&prompt).unwrap();
        let g = generate(&lm.model, &x, want.len(), &lm.tokenizer.stop_ids, Sampling::default(), |_| Ok(true)).unwrap();
        let agree = g.tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!("qwen2 {}: {agree}/{} leading greedy tokens agree with llama.cpp", exec.name(), want.len());
        match exec {
            // Same quantized arithmetic as llama.cpp: all of them.
            Exec::Quant => assert_eq!(g.tokens, want),
            // Dequantized f32 is a different computation; it must still give the same answer start.
            Exec::F32 => assert!(agree >= 8, "f32 parts from llama.cpp after {agree} tokens: {:?}", g.tokens),
        }
    }
}
