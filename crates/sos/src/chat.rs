//! `sos chat`: an interactive conversation, streamed token by token.

use std::io::{BufRead, Write};

use anyhow::Result;
use clap::Args;
use sos_model::generate::{generate, Sampling};
use sos_model::StreamDecoder;
use sos_model::Message;

use crate::common::ModelArgs;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

const HELP: &str = "commands: /system TEXT (set the system prompt and reset), /reset, /quit";

pub fn run(a: ChatArgs) -> Result<()> {
    let lm = a.model.load()?;
    lm.template()?;
    let mut system = a.system.clone();
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("{} loaded. {HELP}", lm.path.display());
    let mut turn = 0u64;
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.split_once(' ').map_or((line, ""), |(c, r)| (c, r)) {
            ("/quit" | "/exit", _) => break,
            ("/reset", _) => {
                history.clear();
                eprintln!("(conversation reset)");
                continue;
            }
            ("/system", rest) => {
                system = (!rest.trim().is_empty()).then(|| rest.trim().to_string());
                history.clear();
                eprintln!("(system prompt {}; conversation reset)", if system.is_some() { "set" } else { "cleared" });
                continue;
            }
            (c, _) if c.starts_with('/') => {
                eprintln!("unknown command {c}; {HELP}");
                continue;
            }
            _ if line.trim().is_empty() => continue,
            _ => {}
        }
        history.push(Message::user(line));
        let mut messages: Vec<Message> = system.iter().map(|s| Message::system(s.clone())).collect();
        messages.extend(history.iter().cloned());
        let ids = lm.chat_ids(&messages, true)?;
        let x = lm.model.embed_ids(&ids)?;
        let sampling = Sampling { temperature: a.temperature, top_p: a.top_p, seed: a.seed.wrapping_add(turn) };
        turn += 1;
        let mut stream = StreamDecoder::new();
        let g = generate(&lm.model, &x, a.max_tokens, &lm.tokenizer.stop_ids, sampling, |id| {
            let piece = stream.push(&lm.tokenizer, id)?;
            print!("{piece}");
            let _ = std::io::stdout().flush();
            Ok(true)
        })?;
        println!();
        history.push(Message::assistant(lm.tokenizer.decode(&g.tokens, true)?));
    }
    Ok(())
}
