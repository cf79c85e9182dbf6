//! `sos tokenize`: token ids of a text, or of a templated chat prompt.

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;
use sos_model::{LoadedModel, Message};

use crate::common::ModelArgs;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to tokenize (special tokens such as <|im_start|> are recognised).
    pub text: String,
    /// Treat TEXT as a user message: render it with the chat template first.
    #[arg(long)]
    pub chat: bool,
    /// System prompt, with --chat.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    // Only the tokenizer and template: tokenizing needs no weights, and works for architectures
    // the runtime cannot run.
    let path = a.model.path()?;
    let (tokenizer, template) = LoadedModel::open_text(&path, a.model.template.as_deref())?;
    let text = if a.chat {
        let Some(template) = template else {
            bail!("{} has no chat template; name one with --template ({})", path.display(), sos_model::BUILTIN_TEMPLATES.join("|"));
        };
        let mut m: Vec<Message> = a.system.iter().map(|s| Message::system(s.clone())).collect();
        m.push(Message::user(a.text.clone()));
        template.render(&m, true)?
    } else {
        a.text.clone()
    };
    let ids = tokenizer.encode(&text)?;
    let pieces: Vec<String> = ids.iter().map(|&i| tokenizer.decode(&[i], false).unwrap_or_default()).collect();
    if a.json {
        println!("{}", json!({ "text": text, "ids": ids, "tokens": pieces }));
    } else {
        for (id, p) in ids.iter().zip(&pieces) {
            println!("{id:>7}  {p:?}");
        }
        eprintln!("{} tokens", ids.len());
    }
    Ok(())
}
