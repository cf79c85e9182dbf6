//! `sos sanitize CANDIDATE --out FIXED [--reference CLEAN]`: a downloaded GGUF file or Hugging
//! Face folder without injected tokens or altered embedding rows.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use sos_dist::{sanitize_alone, sanitize_with_reference};

#[derive(Args, Debug)]
pub struct SanitizeArgs {
    /// The GGUF file or Hugging Face folder to clean.
    pub candidate: PathBuf,
    /// Where to write the cleaned file or folder (never over an input).
    #[arg(long)]
    pub out: PathBuf,
    /// A trusted copy of the same model (a file for a file, a folder for a folder): tokenizer,
    /// chat template, config, token table and output layer are restored from it. Without it, trailing USER_DEFINED tokens and their rows are removed,
    /// and a table that differs from its output layer in a few rows only (a tied model given an
    /// output layer of its own) gets those rows back and the output layer removed.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Replace FIXED if it exists.
    #[arg(long)]
    pub force: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: SanitizeArgs) -> Result<()> {
    let rep = match &a.reference {
        Some(r) => sanitize_with_reference(&a.candidate, r, &a.out, a.force)?,
        None => sanitize_alone(&a.candidate, &a.out, a.force)?,
    };
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
        return Ok(());
    }
    println!("wrote {}", rep.path.display());
    for (id, t) in &rep.removed_tokens {
        println!("removed token {id} {t:?}");
    }
    for k in &rep.restored_keys {
        println!("restored metadata {k}");
    }
    for f in &rep.restored_files {
        println!("restored file {f}");
    }
    for f in &rep.removed_files {
        println!("removed file {f}");
    }
    for t in &rep.restored_tensors {
        println!("restored tensor {t}");
    }
    if rep.restored_rows > 0 {
        let from = if a.reference.is_some() { "the reference" } else { "the output layer, which otherwise equals the table (the file was tied)" };
        println!("  ({} rows of the token table differed from {from}; set back)", rep.restored_rows);
    }
    for t in &rep.removed_tensors {
        println!("removed tensor {t}");
    }
    for l in &rep.left {
        println!("left: {l}");
    }
    if rep.removed_tokens.is_empty() && rep.restored_keys.is_empty() && rep.restored_tensors.is_empty() && rep.removed_tensors.is_empty() && rep.restored_files.is_empty() && rep.removed_files.is_empty() {
        println!("nothing to change");
    }
    Ok(())
}
