//! `sos model fetch|list|info`.

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use sos_model::cache;

use crate::common::ModelArgs;

#[derive(Subcommand, Debug)]
pub enum ModelCmd {
    /// Download a known model into the cache and verify its SHA-256 (default: the default model).
    Fetch {
        alias: Option<String>,
        /// Fetch again even if the file is cached.
        #[arg(long)]
        force: bool,
    },
    /// List the known models and whether each is cached.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Architecture, sizes, tensor types, vocabulary, special tokens and template of a model.
    Info(InfoArgs),
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Fetch { alias, force } => {
            let alias = alias.as_deref().unwrap_or(cache::DEFAULT_ALIAS);
            let m = cache::known(alias).ok_or_else(|| {
                anyhow!("unknown model alias `{alias}` (known: {})", cache::KNOWN.iter().map(|m| m.alias).collect::<Vec<_>>().join(", "))
            })?;
            let progress = &mut |msg: &str| eprintln!("{msg}");
            let path = if force { cache::fetch(m, progress)? } else { cache::ensure(m, progress)? };
            println!("{}", path.display());
        }
        ModelCmd::List { json } => {
            let rows: Vec<_> = cache::KNOWN
                .iter()
                .map(|m| {
                    let p = cache::cached_path(m);
                    (m, p.exists().then_some(p))
                })
                .collect();
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(m, p)| json!({"alias": m.alias, "file": m.file_name, "sha256": m.sha256, "bytes": m.size,
                                         "cached": p.as_ref().map(|p| p.display().to_string()), "note": m.note}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for (m, p) in rows {
                    let state = p.map_or("not cached".to_string(), |p| p.display().to_string());
                    let default = if m.alias == cache::DEFAULT_ALIAS { " (default)" } else { "" };
                    println!("{:<30} {:>8.1} MB  {}{}\n{:<30} {}", m.alias, m.size as f64 / 1e6, state, default, "", m.note);
                }
            }
        }
        ModelCmd::Info(a) => info(a)?,
    }
    Ok(())
}

fn info(a: InfoArgs) -> Result<()> {
    let lm = a.model.load()?;
    let c = &lm.model.cfg;
    let specials = lm.tokenizer.special_tokens();
    let name = |id: Option<u32>| id.and_then(|i| lm.tokenizer.id_to_token(i));
    let v = json!({
        "path": lm.path.display().to_string(),
        "format": lm.format,
        "architecture": c.arch,
        "parameters": lm.n_params,
        "layers": c.n_layer,
        "d_model": c.d_model,
        "heads": c.n_head,
        "kv_heads": c.n_kv_head,
        "head_dim": c.head_dim,
        "d_ff": c.d_ff,
        "vocab_size": c.vocab_size,
        "tokenizer_size": lm.tokenizer.vocab_size(),
        "context_length": c.max_seq,
        "rope_theta": c.rope_theta,
        "tied_embeddings": c.tied,
        "qkv_bias": c.qkv_bias,
        "tensor_types": lm.tensor_types,
        "bos": name(lm.tokenizer.bos),
        "eos": name(lm.tokenizer.eos),
        "stop_tokens": lm.tokenizer.stop_ids.iter().map(|&i| json!({"id": i, "token": lm.tokenizer.id_to_token(i)})).collect::<Vec<_>>(),
        "special_tokens": specials.iter().map(|(i, t)| json!({"id": i, "token": t})).collect::<Vec<_>>(),
        "chat_template": lm.template.is_some(),
    });
    if a.json {
        println!("{v}");
        return Ok(());
    }
    println!("path            {}", lm.path.display());
    println!("format          {:?}", lm.format);
    println!("architecture    {} ({:.1}M parameters)", c.arch.name(), lm.n_params as f64 / 1e6);
    println!("layers          {}  d_model {}  d_ff {}", c.n_layer, c.d_model, c.d_ff);
    println!("attention       {} heads / {} kv heads, head_dim {}, rope theta {}{}", c.n_head, c.n_kv_head, c.head_dim, c.rope_theta, if c.qkv_bias { ", q/k/v bias" } else { "" });
    println!("context         {}", c.max_seq);
    println!("vocab           {} rows ({} tokenizer ids), output {}", c.vocab_size, lm.tokenizer.vocab_size(), if c.tied { "tied to embeddings" } else { "separate" });
    let types: Vec<String> = lm.tensor_types.iter().map(|(k, n)| format!("{k} x{n}")).collect();
    println!("tensor types    {}", types.join(", "));
    println!("bos / eos       {:?} / {:?}", name(lm.tokenizer.bos), name(lm.tokenizer.eos));
    let stops: Vec<String> = lm.tokenizer.stop_ids.iter().map(|&i| format!("{} ({i})", lm.tokenizer.id_to_token(i).unwrap_or_default())).collect();
    println!("stop tokens     {}", stops.join(", "));
    let sp: Vec<String> = specials.iter().map(|(i, t)| format!("{t}={i}")).collect();
    println!("special tokens  {} : {}", sp.len(), sp.join(" "));
    println!("chat template   {}", if lm.template.is_some() { "present" } else { "none (use --template)" });
    Ok(())
}
