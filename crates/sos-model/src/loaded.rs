//! A model ready to use: weights, tokenizer and chat template, opened from a GGUF file or a
//! Hugging Face folder through one path, with the check that they fit together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::format::gguf;
use crate::format::safetensors::SafeTensorsDir;
use crate::model::config::Config;
use crate::model::{load, Exec, Model};
use crate::text::template::{self, ChatTemplate, Message};
use crate::text::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::fsutil;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gguf,
    /// A Hugging Face folder: config.json, safetensors, tokenizer.json.
    HfFolder,
}

/// A model ready to use: weights, tokenizer, chat template and where they came from.
pub struct LoadedModel {
    pub path: PathBuf,
    pub format: Format,
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// `None` when the model ships no template and none was named.
    pub template: Option<ChatTemplate>,
    /// Tensor type name -> number of tensors, as stored in the file.
    pub tensor_types: BTreeMap<String, usize>,
    pub n_params: u64,
}

/// What to load and how.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub exec: Exec,
    pub device: Device,
    /// A built-in template name that replaces (or stands in for) the model's own.
    pub template: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { exec: Exec::F32, device: Device::Cpu, template: None }
    }
}

impl LoadedModel {
    pub fn open(path: &Path, opts: &LoadOptions) -> Result<Self> {
        if path.is_dir() {
            Self::open_hf(path, opts)
        } else {
            Self::open_gguf(path, opts)
        }
    }

    fn open_gguf(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let g = gguf::Gguf::open(path)?;
        let cfg = Config::from_gguf(&g)?;
        let (tokenizer, template) = gguf_text(&g, opts.template.as_deref())?;
        check_fit(path, &cfg, &tokenizer)?;
        let model = load::build_model(load::Weights::Gguf(&g), &cfg, opts.exec, &opts.device, path)?;
        let mut tensor_types = BTreeMap::new();
        for t in &g.tensors {
            *tensor_types.entry(t.ty.name().to_string()).or_insert(0) += 1;
        }
        let n_params = g.tensors.iter().map(|t| t.n_elements()).sum();
        Ok(LoadedModel { path: path.to_path_buf(), format: Format::Gguf, model, tokenizer, template, tensor_types, n_params })
    }

    fn open_hf(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let st = SafeTensorsDir::open(dir)?;
        let cfg = Config::from_hf_json(&dir.join("config.json"), st.contains("lm_head.weight"))?;
        let (tokenizer, template) = hf_text(dir, opts.template.as_deref())?;
        check_fit(&dir.join("tokenizer.json"), &cfg, &tokenizer)?;
        let model = load::build_model(load::Weights::SafeTensors(&st), &cfg, opts.exec, &opts.device, dir)?;
        let tensor_types = BTreeMap::from([("safetensors".to_string(), st.paths().count())]);
        let n_params = count_params(&model);
        Ok(LoadedModel { path: dir.to_path_buf(), format: Format::HfFolder, model, tokenizer, template, tensor_types, n_params })
    }

    /// Only the text side of a model: its tokenizer and chat template (or the built-in one
    /// `template` names), without reading or checking the weights, so that tokenizing works for
    /// architectures this runtime cannot run.
    pub fn open_text(path: &Path, template: Option<&str>) -> Result<(Tokenizer, Option<ChatTemplate>)> {
        if path.is_dir() {
            hf_text(path, template)
        } else {
            gguf_text(&gguf::Gguf::open(path)?, template)
        }
    }

    /// The template, or an error that says how to name one.
    pub fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| {
            Error::Invalid(format!(
                "{} has no chat template; name one with --template ({})",
                self.path.display(),
                template::BUILTIN_NAMES.join("|")
            ))
        })
    }

    /// Renders messages with the chat template and tokenizes the result.
    pub fn chat_ids(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.template()?.render(messages, add_generation_prompt)?;
        self.tokenizer.encode(&text)
    }

    /// SHA-256 of the weights: the GGUF file, or the safetensors files of a folder in name order
    /// (a single file's digest; for shards, the digest of their digests).
    pub fn sha256(&self) -> Result<String> {
        match self.format {
            Format::Gguf => fsutil::sha256_file(&self.path),
            Format::HfFolder => {
                let st = SafeTensorsDir::open(&self.path)?;
                let digests = st.paths().map(fsutil::sha256_file).collect::<Result<Vec<_>>>()?;
                Ok(if digests.len() == 1 { digests[0].clone() } else { fsutil::sha256_hex(digests.concat().as_bytes()) })
            }
        }
    }
}

/// Tokenizer and chat template from GGUF metadata.
fn gguf_text(g: &gguf::Gguf, template: Option<&str>) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let tokenizer = Tokenizer::from_gguf(g)?;
    let tok_str = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
    let (bos, eos) = (tok_str(tokenizer.bos), tok_str(tokenizer.eos));
    let own = g.get_str("tokenizer.chat_template").map(|s| ChatTemplate::new(s, bos.clone(), eos.clone()));
    let template = pick_template(own, template, &bos, &eos)?;
    Ok((tokenizer, template))
}

/// Tokenizer and chat template from a Hugging Face folder's `tokenizer.json`,
/// `tokenizer_config.json` (or `chat_template.jinja`) and `generation_config.json`.
fn hf_text(dir: &Path, template: Option<&str>) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let tok_path = dir.join("tokenizer.json");
    let mut tokenizer = Tokenizer::from_tokenizer_json(&tok_path)?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc: serde_json::Value = match std::fs::read_to_string(&tc_path) {
        Ok(s) => serde_json::from_str(&s).map_err(|e| Error::format(&tc_path, format!("invalid JSON: {e}")))?,
        Err(_) => serde_json::Value::Null,
    };
    // Special tokens appear either as strings or as {"content": ...} objects.
    let tok_name = |k: &str| -> Option<String> {
        let v = &tc[k];
        v.as_str().or_else(|| v["content"].as_str()).map(String::from)
    };
    let (bos, eos) = (tok_name("bos_token"), tok_name("eos_token"));
    tokenizer = tokenizer.with_special_names(bos.as_deref(), eos.as_deref(), tc["add_bos_token"].as_bool().unwrap_or(false));
    if let Ok(s) = std::fs::read_to_string(dir.join("generation_config.json")) {
        if let Ok(gc) = serde_json::from_str::<serde_json::Value>(&s) {
            let ids: Vec<u64> = match &gc["eos_token_id"] {
                serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64()).collect(),
                v => v.as_u64().into_iter().collect(),
            };
            ids.into_iter().for_each(|i| tokenizer.add_stop_id(i as u32));
        }
    }
    let (b, e) = (bos.unwrap_or_default(), eos.unwrap_or_default());
    // transformers 5 saves the template beside the config, as `chat_template.jinja`; it wins.
    let jinja = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
    let own = jinja.as_deref().or(tc["chat_template"].as_str()).map(|s| ChatTemplate::new(s, b.clone(), e.clone()));
    let template = pick_template(own, template, &b, &e)?;
    Ok((tokenizer, template))
}

fn pick_template(own: Option<ChatTemplate>, named: Option<&str>, bos: &str, eos: &str) -> Result<Option<ChatTemplate>> {
    match named {
        Some(name) => Ok(Some(ChatTemplate::builtin(name, bos, eos)?)),
        None => Ok(own),
    }
}

/// A tokenizer whose ids reach past the embedding table belongs to another model.
fn check_fit(path: &Path, cfg: &Config, tok: &Tokenizer) -> Result<()> {
    let n = tok.vocab_size();
    if n > cfg.vocab_size {
        return Err(Error::format(
            path,
            format!("tokenizer has {n} tokens but the model's embedding table has {} rows: tokenizer and model do not fit", cfg.vocab_size),
        ));
    }
    Ok(())
}

fn count_params(m: &Model) -> u64 {
    let c = &m.cfg;
    let per_layer = 2 * c.d_model
        + c.d_model * (c.n_head + 2 * c.n_kv_head) * c.head_dim
        + c.n_head * c.head_dim * c.d_model
        + 3 * c.d_model * c.d_ff;
    let head = if c.tied { 0 } else { c.vocab_size * c.d_model };
    (c.vocab_size * c.d_model + c.n_layer * per_layer + c.d_model + head) as u64
}
