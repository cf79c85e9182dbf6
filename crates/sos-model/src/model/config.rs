//! Model hyper-parameters, read from GGUF metadata or a Hugging Face `config.json`.

use std::path::Path;

use crate::format::gguf::Gguf;
use crate::bail_format;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3, Mistral, SmolLM2, TinyLlama: pre-norm, RMSNorm, SwiGLU, RoPE, GQA.
    Llama,
    /// Qwen2: Llama with biases on the q/k/v projections.
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// How rotary frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    /// Llama 3.1's per-frequency scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max: f64 },
    /// Per-frequency divisors stored in the file (GGUF `rope_freqs.weight`).
    Factors(Vec<f32>),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    pub vocab_size: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_seq: usize,
    /// The output layer reuses the token embedding table.
    pub tied: bool,
    pub qkv_bias: bool,
}

/// Sizes beyond these are not a model we can run but a hostile or broken header.
const MAX_DIM: usize = 1 << 16;
const MAX_LAYERS: usize = 1024;
const MAX_VOCAB: usize = 1 << 22;

impl Config {
    fn validate(self, path: &Path) -> Result<Self> {
        let c = &self;
        let bad = |what: &str| Err(Error::format(path, format!("invalid model config: {what}")));
        if c.n_layer == 0 || c.n_layer > MAX_LAYERS {
            return bad(&format!("{} layers", c.n_layer));
        }
        if c.d_model == 0 || c.d_model > MAX_DIM || c.d_ff == 0 || c.d_ff > 8 * MAX_DIM {
            return bad(&format!("d_model {} / d_ff {}", c.d_model, c.d_ff));
        }
        if c.n_head == 0 || c.n_kv_head == 0 || c.n_head % c.n_kv_head != 0 {
            return bad(&format!("{} heads with {} kv heads", c.n_head, c.n_kv_head));
        }
        if c.head_dim == 0 || c.head_dim % 2 != 0 || c.head_dim > 1024 {
            return bad(&format!("head_dim {}", c.head_dim));
        }
        if c.vocab_size == 0 || c.vocab_size > MAX_VOCAB {
            return bad(&format!("vocab size {}", c.vocab_size));
        }
        if !(c.rms_eps > 0.0 && c.rms_eps < 1.0) || !(c.rope_theta > 1.0) {
            return bad(&format!("rms_eps {} / rope_theta {}", c.rms_eps, c.rope_theta));
        }
        Ok(self)
    }

    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let path = &g.path;
        let arch_name = g
            .get_str("general.architecture")
            .ok_or_else(|| Error::format(path, "missing general.architecture"))?;
        let arch = match arch_name {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => bail_format!(
                path,
                "unsupported architecture `{other}` (supported: llama, mistral, qwen2)"
            ),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| -> Result<usize> {
            g.get(&key(k))
                .and_then(|v| v.as_u64())
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| Error::format(path, format!("missing or invalid metadata `{}`", key(k))))
        };
        let opt_f = |k: &str| g.get(&key(k)).and_then(|v| v.as_f64());
        let d_model = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_kv_head = g.get(&key("attention.head_count_kv")).and_then(|v| v.as_u64()).map_or(n_head, |v| v as usize);
        let head_dim = match g.get(&key("attention.key_length")).and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None if n_head > 0 => d_model / n_head,
            None => 0,
        };
        if let Some(rd) = g.get(&key("rope.dimension_count")).and_then(|v| v.as_u64()) {
            if rd as usize != head_dim {
                bail_format!(path, "partial rotary embeddings ({rd} of {head_dim} dims) are not supported");
            }
        }
        let emb = g.tensor_info("token_embd.weight").ok_or_else(|| Error::format(path, "missing tensor `token_embd.weight`"))?;
        let vocab_size = emb.shape()[0];
        let rope_scaling = match g.get_str(&key("rope.scaling.type")) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: opt_f("rope.scaling.factor").ok_or_else(|| Error::format(path, "linear rope scaling without a factor"))?,
            },
            Some(other) => bail_format!(path, "unsupported rope scaling `{other}`"),
        };
        // Llama 3.x files carry their scaled frequencies as a tensor instead of metadata.
        let rope_scaling = match g.tensor_info("rope_freqs.weight") {
            Some(info) => {
                let t = g.qtensor(&info.name)?.dequantize(&candle_core::Device::Cpu)?;
                RopeScaling::Factors(t.flatten_all()?.to_vec1::<f32>()?)
            }
            None => rope_scaling,
        };
        Config {
            arch,
            n_layer: req("block_count")?,
            d_model,
            n_head,
            n_kv_head,
            head_dim,
            d_ff: req("feed_forward_length")?,
            vocab_size,
            rms_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: opt_f("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            max_seq: req("context_length").unwrap_or(4096),
            tied: g.tensor_info("output.weight").is_none(),
            qkv_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
        }
        .validate(path)
    }

    /// From a Hugging Face `config.json`. `has_lm_head` says whether the weights hold `lm_head.weight`.
    pub fn from_hf_json(path: &Path, has_lm_head: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let j: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
        let model_type = j["model_type"].as_str().unwrap_or("");
        let arch = match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => bail_format!(path, "unsupported model_type `{other}` (supported: llama, mistral, qwen2)"),
        };
        let req = |k: &str| -> Result<usize> {
            j[k].as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| Error::format(path, format!("missing or invalid `{k}`")))
        };
        let d_model = req("hidden_size")?;
        let n_head = req("num_attention_heads")?;
        let head_dim = j["head_dim"].as_u64().map(|v| v as usize).unwrap_or(if n_head > 0 { d_model / n_head } else { 0 });
        // transformers 5 writes the rotary settings as one `rope_parameters` object (theta and
        // scaling together); older configs have `rope_theta` and `rope_scaling` at the top.
        let rope_params = j.get("rope_parameters").filter(|v| v.is_object());
        let scaling = j.get("rope_scaling").filter(|v| !v.is_null()).or(rope_params);
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s["rope_type"].as_str().or(s["type"].as_str()).unwrap_or("");
                let f = |k: &str| s[k].as_f64().ok_or_else(|| Error::format(path, format!("rope_scaling.{k} missing")));
                match kind {
                    "linear" => RopeScaling::Linear { factor: f("factor")? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max: f("original_max_position_embeddings")?,
                    },
                    "default" => RopeScaling::None,
                    other => bail_format!(path, "unsupported rope_scaling type `{other}`"),
                }
            }
        };
        Config {
            arch,
            n_layer: req("num_hidden_layers")?,
            d_model,
            n_head,
            n_kv_head: j["num_key_value_heads"].as_u64().map_or(n_head, |v| v as usize),
            head_dim,
            d_ff: req("intermediate_size")?,
            vocab_size: req("vocab_size")?,
            rms_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta: j["rope_theta"].as_f64().or_else(|| rope_params.and_then(|p| p["rope_theta"].as_f64())).unwrap_or(10_000.0),
            rope_scaling,
            max_seq: j["max_position_embeddings"].as_u64().map_or(4096, |v| v as usize),
            tied: !has_lm_head || j["tie_word_embeddings"].as_bool().unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || j["attention_bias"].as_bool().unwrap_or(false),
        }
        .validate(path)
    }

    /// Rotary inverse frequencies, one per pair of dimensions.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
        match &self.rope_scaling {
            RopeScaling::None => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Linear { factor } => base.iter().map(|&f| (f / factor) as f32).collect(),
            RopeScaling::Factors(ff) => base.iter().zip(ff.iter().chain(std::iter::repeat(&1.0))).map(|(&f, &k)| (f / k as f64) as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max } => base
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let low_wl = original_max / low_freq_factor;
                    let high_wl = original_max / high_freq_factor;
                    let v = if wavelen < high_wl {
                        f
                    } else if wavelen > low_wl {
                        f / factor
                    } else {
                        let smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    v as f32
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers 5 nests theta and scaling in `rope_parameters`; both spellings read the same.
    #[test]
    fn rope_settings_are_read_from_either_config_layout() {
        let dir = std::env::temp_dir().join(format!("sos-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = r#""model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 300"#;
        let read = |extra: &str| {
            let p = dir.join("config.json");
            std::fs::write(&p, format!("{{{base}, {extra}}}")).unwrap();
            let c = Config::from_hf_json(&p, false).unwrap();
            (c.rope_theta, c.rope_scaling)
        };
        let old = read(r#""rope_theta": 100000.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}"#);
        let new = read(r#""rope_parameters": {"rope_theta": 100000.0, "rope_type": "linear", "factor": 2.0}"#);
        assert_eq!(old, new);
        assert_eq!(old.0, 100000.0);
        assert_eq!(read(r#""rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}"#), (5e5, RopeScaling::None));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
