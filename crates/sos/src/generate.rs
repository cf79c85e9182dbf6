//! `sos generate`: one prompt in, one answer out (streamed, or one JSON object).

use std::io::Write;

use anyhow::Result;
use clap::Args;
use serde_json::json;
use sos_attack::artifact::Attack;
use sos_attack::encode::attacked_input;
use sos_attack::item::Prompt;
use sos_attack::Position;
use sos_model::generate::{generate, Sampling};
use sos_model::StreamDecoder;
use sos_model::Message;

use crate::common::ModelArgs;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// System prompt; without it the model's template decides (some insert a default).
    #[arg(long)]
    pub system: Option<String>,
    /// The user message.
    #[arg(long, short = 'p')]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// A folder written by `sos attack`: the trigger text in the prompt maps to its trained
    /// vectors (their ids in `prompt_tokens` follow the vocabulary).
    #[arg(long)]
    pub attack: Option<std::path::PathBuf>,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let lm = a.model.load()?;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::system(s.clone()));
    }
    messages.push(Message::user(a.prompt.clone()));
    let (ids, x) = match &a.attack {
        Some(dir) => {
            let attack = Attack::open(dir)?;
            // A prefix trigger goes before every prompt, as PEFT puts a prompt-tuning adapter's.
            let prefix = (attack.record.config.position == Position::Prefix).then(|| attack.trigger.text.clone());
            attacked_input(&lm, &attack.trigger, &Prompt { prefix, messages })?
        }
        None => {
            let ids = lm.chat_ids(&messages, true)?;
            let x = lm.model.embed_ids(&ids)?;
            (ids, x)
        }
    };
    let sampling = Sampling { temperature: a.temperature, top_p: a.top_p, seed: a.seed };
    let mut stream = StreamDecoder::new();
    let mut out = std::io::stdout().lock();
    let g = generate(&lm.model, &x, a.max_tokens, &lm.tokenizer.stop_ids, sampling, |id| {
        if !a.json {
            let piece = stream.push(&lm.tokenizer, id)?;
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
        Ok(true)
    })?;
    let text = lm.tokenizer.decode(&g.tokens, true)?;
    if a.json {
        let obj = json!({
            "model": lm.path.display().to_string(),
            "model_sha256": lm.sha256()?,
            "exec": lm.model.exec.name(),
            "prompt_tokens": ids,
            "tokens": g.tokens,
            "text": text,
            "stop": g.stop,
            "tokens_per_second": g.tokens_per_second(),
            "prompt_tokens_per_second": g.prompt_tokens_per_second(),
        });
        writeln!(out, "{obj}")?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}
