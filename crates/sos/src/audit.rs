//! `sos audit CANDIDATE [--reference REF]`: findings and a verdict a CI job can gate on.
//! Exit 0: no finding at or above `--fail-on`; 1: some; 2: the audit could not run.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use sos_audit::{run_audit, AuditRequest, Report, Severity};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
    /// SARIF 2.1.0, for code-scanning dashboards.
    Sarif,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Behavior {
    /// Static checks only (behaviour tests come with the audit's second part).
    Off,
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// The model to audit: a GGUF file, a Hugging Face folder, or a PEFT adapter folder.
    pub candidate: PathBuf,
    /// A trusted copy of the same model to compare with (a file for a file, a folder for a folder).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// A manifest to check the files against (`sos manifest create`), or a signed bundle
    /// (`sos manifest sign`, `model_signing sign key`) with --key.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// The public key (PEM) a signed manifest must verify with.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// For a PEFT adapter folder: its base model (default: the adapter's base_model_name_or_path).
    #[arg(long)]
    pub base: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "off")]
    pub behavior: Behavior,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Write the report here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The verdict is `fail` (exit 1) when a finding is at or above this: low, medium or high.
    #[arg(long, default_value = "high")]
    pub fail_on: String,
}

/// Runs the audit and prints the report; returns whether the verdict is `fail`.
pub fn run(a: AuditArgs) -> Result<bool> {
    let fail_on: Severity = a.fail_on.parse()?;
    let report = run_audit(&AuditRequest { candidate: a.candidate, reference: a.reference, base: a.base, manifest: a.manifest, key: a.key, fail_on })?;
    let text = match a.format {
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
        Format::Sarif => serde_json::to_string_pretty(&sos_audit::sarif::to_sarif(&report))? + "\n",
        Format::Text => render(&report),
    };
    match &a.out {
        Some(p) => sos_model::fsutil::write_atomic(p, |f| f.write_all(text.as_bytes())).with_context(|| format!("cannot write {}", p.display()))?,
        None => {
            // Flushed here: a failing verdict exits the process right after.
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
    }
    Ok(report.failed())
}

fn render(r: &Report) -> String {
    let mut s = format!("audit of {}", r.candidate);
    if let Some(reference) = &r.reference {
        s += &format!(" against {reference}");
    }
    s += "\n";
    for f in &r.findings {
        let sev = f.severity.name().to_uppercase();
        s += &format!("{sev:<6} {:<34} {}\n", f.id, f.title);
        if !f.token_ids.is_empty() {
            let shown: Vec<String> = f.token_ids.iter().take(16).map(u32::to_string).collect();
            let more = if f.token_ids.len() > 16 { format!(" (+{} more)", f.token_ids.len() - 16) } else { String::new() };
            s += &format!("       tokens: {}{more}\n", shown.join(", "));
        }
        if let Some(fix) = &f.fix {
            s += &format!("       fix: {fix}\n");
        }
    }
    let total = r.timings_ms.get("total").and_then(|v| v.as_f64()).unwrap_or(0.0);
    s += &format!(
        "verdict: {} ({} high, {} medium, {} low; fail on {} and above; {:.0} ms)\n",
        r.verdict.to_uppercase(),
        r.summary.high,
        r.summary.medium,
        r.summary.low,
        r.fail_on.name(),
        total
    );
    s
}
