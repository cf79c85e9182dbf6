//! The second architecture on real models: Qwen2.5-Coder-0.5B-Instruct (qwen2: q/k/v biases,
//! half-split rotary layout, untied output, Q5_0/Q4_K/Q6_K/Q8_0 tensors, the qwen2 pre-tokenizer)
//! and Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, the largest model reachable here), against llama.cpp.
//! Each fixture's header says how it was made (`compat/llamacpp_greedy.py`).

use std::path::PathBuf;

use sos_model::generate::{generate, Sampling};
use sos_model::{cache, Exec, LoadOptions, LoadedModel, Message};

fn fixture(name: &str) -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn qwen2_matches_llama_cpp() {
    check("qwen2.5-coder-0.5b-instruct", "qwen2_llamacpp.json", &[Exec::Quant, Exec::F32]);
}

/// Quantized only: the 1.5B model in f32 needs 6 GB and minutes on CI's 2 cores.
#[test]
fn qwen2_1_5b_matches_llama_cpp() {
    check("qwen2.5-coder-1.5b-instruct", "qwen2_1_5b_llamacpp.json", &[Exec::Quant]);
}

fn check(alias: &str, fixture_name: &str, execs: &[Exec]) {
    let m = cache::known(alias).unwrap();
    let path = cache::ensure(m, &mut |msg| eprintln!("{msg}")).unwrap_or_else(|e| panic!("{alias} must be fetchable: {e}"));
    let fx = fixture(fixture_name);
    let want = ids(&fx["generated_ids"]);
    for &exec in execs {
        let lm = LoadedModel::open(&path, &LoadOptions { exec, ..Default::default() }).unwrap();
        let messages = [Message::system(fx["system"].as_str().unwrap()), Message::user(fx["question"].as_str().unwrap())];
        let text = lm.template().unwrap().render(&messages, true).unwrap();
        assert_eq!(text, fx["prompt_text"].as_str().unwrap(), "{alias}: chat template rendering differs");
        let prompt = lm.tokenizer.encode(&text).unwrap();
        assert_eq!(prompt, ids(&fx["prompt_ids"]), "{alias}: tokenization differs from llama.cpp");
        let x = lm.model.embed_ids(&prompt).unwrap();
        let g = generate(&lm.model, &x, want.len(), &lm.tokenizer.stop_ids, Sampling::default(), |_| Ok(true)).unwrap();
        let agree = g.tokens.iter().zip(&want).take_while(|(a, b)| a == b).count();
        eprintln!("{alias} {}: {agree}/{} leading greedy tokens agree with llama.cpp", exec.name(), want.len());
        match exec {
            // Same quantized arithmetic as llama.cpp: all of them.
            Exec::Quant => assert_eq!(g.tokens, want, "{alias}"),
            // Dequantized f32 is a different computation; it must still give the same answer start.
            Exec::F32 => assert!(agree >= 8, "{alias}: f32 parts from llama.cpp after {agree} tokens: {:?}", g.tokens),
        }
    }
}
