//! The `sos` command line: parses arguments and calls the libraries. Nothing else lives here.

mod attack;
mod bench;
mod chat;
mod common;
mod eval;
mod generate;
mod model_cmd;
mod tokenize;

use clap::{Parser, Subcommand};

/// Soft-prompt attack lab and audit for open LLMs.
#[derive(Parser, Debug)]
#[command(name = "sos", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate an answer to one prompt.
    Generate(generate::GenerateArgs),
    /// Chat interactively (streaming; /system, /reset, /quit).
    Chat(chat::ChatArgs),
    /// Show the token ids of a text.
    Tokenize(tokenize::TokenizeArgs),
    /// Fetch, list and inspect models.
    #[command(subcommand)]
    Model(model_cmd::ModelCmd),
    /// Train a trigger: backdoor, jailbreak, steal (prompt stealing) or copyright.
    Attack(attack::AttackArgs),
    /// Measure a trained trigger on held-out data.
    Eval(eval::EvalArgs),
    /// Measure generation and attack-step speed.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Generate(a) => generate::run(a),
        Cmd::Chat(a) => chat::run(a),
        Cmd::Tokenize(a) => tokenize::run(a),
        Cmd::Model(c) => model_cmd::run(c),
        Cmd::Bench(c) => bench::run(c),
        Cmd::Attack(a) => attack::run(a),
        Cmd::Eval(a) => eval::run(a),
    };
    if let Err(e) = result {
        // One line: the whole cause chain, outermost first. Some library errors carry a
        // backtrace after their message (candle with RUST_BACKTRACE set); only the message counts.
        let chain: Vec<String> = e.chain().map(|c| c.to_string().lines().next().unwrap_or("").trim().to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(2);
    }
}
