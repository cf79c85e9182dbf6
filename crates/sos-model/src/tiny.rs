//! Tiny random models for tests: a few layers, a byte-level vocabulary, seeded weights.
//!
//! One set of weights is written both as a GGUF file (with llama.cpp's Q/K row permutation, as
//! its converter writes Llama files) and as a Hugging Face folder, so tests exercise the real
//! loading paths and can check that both give the same model.

use std::path::Path;

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::model::config::Arch;
use crate::format::gguf::{TensorType, Value, Writer};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: Arch,
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub d_ff: usize,
    pub tied: bool,
    pub seed: u64,
    /// Standard deviation-ish scale of the random weights.
    pub scale: f32,
    /// Scale of the token embeddings (and of a tied output layer).
    pub embed_scale: f32,
    /// Write the matrices (token table, projections, output layer) in this GGUF type, quantized
    /// by candle, where their rows fit its blocks; `None` writes f32.
    pub quant: Option<TensorType>,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec { arch: Arch::Llama, n_layer: 2, d_model: 32, n_head: 4, n_kv_head: 2, d_ff: 64, tied: true, seed: 1, scale: 0.15, embed_scale: 1.0, quant: None }
    }
}

pub const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// A few merges so BPE has work to do; their results are appended to the vocabulary.
const MERGES: &[(&str, &str)] = &[("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")];
pub const MAX_SEQ: usize = 1024;
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// GPT-2's reversible byte -> printable character map.
fn byte_chars() -> Vec<char> {
    let mut keep: Vec<u32> = ('!' as u32..='~' as u32).chain('¡' as u32..='¬' as u32).chain('®' as u32..='ÿ' as u32).collect();
    let mut map = vec!['\0'; 256];
    for &b in &keep {
        map[b as usize] = char::from_u32(b).expect("valid");
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !keep.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).expect("valid");
            n += 1;
            keep.push(b);
        }
    }
    map
}

/// Vocabulary: the specials, the 256 byte characters, then the merge results.
pub fn vocab() -> Vec<String> {
    let mut v: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    v.extend(byte_chars().into_iter().map(String::from));
    v.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    v
}

struct Weights {
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl TinySpec {
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_head
    }

    fn weights(&self) -> Weights {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let mut rand_vec = |n: usize, scale: f32, center: f32| -> Vec<f32> {
            (0..n).map(|_| center + scale * (rng.gen::<f32>() * 2.0 - 1.0) * 1.7).collect()
        };
        let (d, hd, ff) = (self.d_model, self.head_dim(), self.d_ff);
        let (nq, nkv) = (self.n_head * hd, self.n_kv_head * hd);
        let v = vocab().len();
        let s = self.scale;
        let mut t = vec![("token_embd.weight".to_string(), vec![v, d], rand_vec(v * d, self.embed_scale, 0.0))];
        for i in 0..self.n_layer {
            let n = |x: &str| format!("blk.{i}.{x}");
            t.push((n("attn_norm.weight"), vec![d], rand_vec(d, 0.2, 1.0)));
            t.push((n("attn_q.weight"), vec![nq, d], rand_vec(nq * d, s * 2.0, 0.0)));
            t.push((n("attn_k.weight"), vec![nkv, d], rand_vec(nkv * d, s * 2.0, 0.0)));
            t.push((n("attn_v.weight"), vec![nkv, d], rand_vec(nkv * d, s, 0.0)));
            t.push((n("attn_output.weight"), vec![d, nq], rand_vec(d * nq, s, 0.0)));
            if self.arch == Arch::Qwen2 {
                t.push((n("attn_q.bias"), vec![nq], rand_vec(nq, 0.3, 0.0)));
                t.push((n("attn_k.bias"), vec![nkv], rand_vec(nkv, 0.3, 0.0)));
                t.push((n("attn_v.bias"), vec![nkv], rand_vec(nkv, 0.3, 0.0)));
            }
            t.push((n("ffn_norm.weight"), vec![d], rand_vec(d, 0.2, 1.0)));
            t.push((n("ffn_gate.weight"), vec![ff, d], rand_vec(ff * d, s, 0.0)));
            t.push((n("ffn_up.weight"), vec![ff, d], rand_vec(ff * d, s, 0.0)));
            t.push((n("ffn_down.weight"), vec![d, ff], rand_vec(d * ff, s, 0.0)));
        }
        t.push(("output_norm.weight".to_string(), vec![d], rand_vec(d, 0.2, 1.0)));
        if !self.tied {
            t.push(("output.weight".to_string(), vec![v, d], rand_vec(v * d, 0.5, 0.0)));
        }
        Weights { tensors: t }
    }

    fn arch_name(&self) -> &'static str {
        self.arch.name()
    }

    /// Writes the model as a GGUF file with its tokenizer and a ChatML template.
    pub fn write_gguf(&self, path: &Path) -> Result<()> {
        let a = self.arch_name();
        let k = |s: &str| format!("{a}.{s}");
        let hd = self.head_dim();
        let mut w = Writer::new();
        w.meta("general.architecture", Value::Str(a.into()))
            .meta("general.name", Value::Str("tiny-test".into()))
            .meta(&k("block_count"), Value::U32(self.n_layer as u32))
            .meta(&k("context_length"), Value::U32(MAX_SEQ as u32))
            .meta(&k("embedding_length"), Value::U32(self.d_model as u32))
            .meta(&k("feed_forward_length"), Value::U32(self.d_ff as u32))
            .meta(&k("attention.head_count"), Value::U32(self.n_head as u32))
            .meta(&k("attention.head_count_kv"), Value::U32(self.n_kv_head as u32))
            .meta(&k("rope.freq_base"), Value::F32(10_000.0))
            .meta(&k("rope.dimension_count"), Value::U32(hd as u32))
            .meta(&k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5));
        let toks = vocab();
        let types: Vec<Value> = (0..toks.len()).map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 })).collect();
        w.meta("tokenizer.ggml.model", Value::Str("gpt2".into()))
            .meta("tokenizer.ggml.pre", Value::Str("smollm".into()))
            .meta("tokenizer.ggml.tokens", Value::Array(toks.iter().map(|t| Value::Str(t.clone())).collect()))
            .meta("tokenizer.ggml.token_type", Value::Array(types))
            .meta("tokenizer.ggml.merges", Value::Array(MERGES.iter().map(|(a, b)| Value::Str(format!("{a} {b}"))).collect()))
            .meta("tokenizer.ggml.bos_token_id", Value::U32(1))
            .meta("tokenizer.ggml.eos_token_id", Value::U32(2))
            .meta("tokenizer.ggml.add_bos_token", Value::Bool(false))
            .meta("tokenizer.chat_template", Value::Str(CHATML.into()));
        for (name, shape, data) in self.weights().tensors {
            // llama.cpp's converter interleaves the rotary halves of Llama Q/K rows.
            let data = match (self.arch, name.ends_with("attn_q.weight"), name.ends_with("attn_k.weight")) {
                (Arch::Llama, true, _) => permute_rows(&data, self.n_head, hd),
                (Arch::Llama, _, true) => permute_rows(&data, self.n_kv_head, hd),
                _ => data,
            };
            match self.quant.filter(|ty| shape.len() == 2 && shape[1] % ty.block().0 as usize == 0) {
                Some(ty) => {
                    let t = candle_core::Tensor::from_vec(data, (shape[0], shape[1]), &candle_core::Device::Cpu)?;
                    let q = candle_core::quantized::QTensor::quantize(&t, ty.to_candle())?;
                    w.tensor(&name, &shape, ty, q.data()?.to_vec());
                }
                None => {
                    w.tensor_f32(&name, &shape, &data);
                }
            }
        }
        w.write(path)
    }

    /// Writes the same model as a Hugging Face folder (config, safetensors, tokenizer files).
    pub fn write_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let gguf_path = dir.join(".tokenizer-source.gguf");
        // The tokenizer.json is the one our GGUF importer builds, saved by `tokenizers`.
        self.write_gguf(&gguf_path)?;
        let g = crate::format::gguf::Gguf::open(&gguf_path)?;
        let tok = crate::text::tokenizer::Tokenizer::from_gguf(&g)?;
        drop(g);
        std::fs::remove_file(&gguf_path).map_err(|e| Error::io(&gguf_path, e))?;
        tok.save(&dir.join("tokenizer.json"))?;
        let write_json = |name: &str, v: serde_json::Value| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_string_pretty(&v).expect("json")).map_err(|e| Error::io(&p, e))
        };
        write_json(
            "config.json",
            json!({
                "model_type": self.arch_name(),
                "hidden_size": self.d_model,
                "intermediate_size": self.d_ff,
                "num_attention_heads": self.n_head,
                "num_key_value_heads": self.n_kv_head,
                "num_hidden_layers": self.n_layer,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "vocab_size": vocab().len(),
                "max_position_embeddings": MAX_SEQ,
                "tie_word_embeddings": self.tied,
            }),
        )?;
        write_json("tokenizer_config.json", json!({"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false}))?;
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .weights()
            .tensors
            .into_iter()
            .map(|(name, shape, data)| (crate::model::load::hf_name(&name), shape, data.iter().flat_map(|v| v.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("consistent view")))
            .collect();
        let p = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &p).map_err(|e| Error::format(&p, e.to_string()))
    }
}

/// llama.cpp's `permute`: per head, row `i * half + j` moves to `2 * j + i`.
fn permute_rows(data: &[f32], n_head: usize, head_dim: usize) -> Vec<f32> {
    let rows = n_head * head_dim;
    let cols = data.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let src = h * head_dim + i * half + j;
                let dst = h * head_dim + 2 * j + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}
