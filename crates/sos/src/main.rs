//! The `sos` command line: parses arguments and calls the libraries. Nothing else lives here.

mod attack;
mod audit;
mod bench;
mod chat;
mod common;
mod demo;
mod eval;
mod generate;
mod inject;
mod manifest;
mod model_cmd;
mod peft;
mod sanitize;
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
    /// Bake a trained trigger into a copy of the model file (new tokens, or rare ones replaced).
    Inject(inject::InjectArgs),
    /// Remove injected tokens and restore embedding rows, against a trusted reference or without.
    Sanitize(sanitize::SanitizeArgs),
    /// Write a trained trigger as a PEFT adapter (trainable tokens or prompt tuning).
    ExportPeft(peft::ExportArgs),
    /// Turn a PEFT adapter into an attack folder (for generate, eval, inject).
    ImportPeft(peft::ImportArgs),
    /// Audit a downloaded model for injected soft prompts; exit 1 on findings at --fail-on.
    Audit(audit::AuditArgs),
    /// Provenance: a model-signing v1.0 manifest of a model's files, and its verification.
    #[command(subcommand)]
    Manifest(manifest::ManifestCmd),
    /// The whole story on the default model in a few minutes: train a backdoor, inject it,
    /// watch it fire, audit it, sanitize it, audit again.
    Demo(demo::DemoArgs),
    /// Measure generation and attack-step speed.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

/// An attack step allocates and frees a few hundred MB of activations. By default glibc serves
/// blocks over a (moving) threshold with mmap and hands freed memory at the top of the heap back
/// to the kernel, so every step page-faulted all of it in again: ~900k faults and ~10 % of the
/// CPU time in the kernel for a run of `sos bench step`. Keeping freed memory for reuse costs
/// nothing the peak did not already hold.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum on 64-bit
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Generate(a) => generate::run(a),
        Cmd::Chat(a) => chat::run(a),
        Cmd::Tokenize(a) => tokenize::run(a),
        Cmd::Model(c) => model_cmd::run(c),
        Cmd::Bench(c) => bench::run(c),
        Cmd::Attack(a) => attack::run(a),
        Cmd::Demo(a) => demo::run(a).map(|failed| {
            if failed {
                std::process::exit(1);
            }
        }),
        Cmd::Eval(a) => eval::run(a),
        Cmd::Inject(a) => inject::run(a),
        Cmd::Sanitize(a) => sanitize::run(a),
        Cmd::ExportPeft(a) => peft::export(a),
        Cmd::ImportPeft(a) => peft::import(a),
        Cmd::Audit(a) => audit::run(a).map(|failed| {
            if failed {
                std::process::exit(1);
            }
        }),
        Cmd::Manifest(c) => manifest::run(c).map(|failed| {
            if failed {
                std::process::exit(1);
            }
        }),
    };
    if let Err(e) = result {
        // One line: the whole cause chain, outermost first. Some library errors carry a
        // backtrace after their message (candle with RUST_BACKTRACE set); only the message counts.
        let chain: Vec<String> = e.chain().map(|c| c.to_string().lines().next().unwrap_or("").trim().to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(2);
    }
}
