//! `sos audit CANDIDATE [--reference REF]`: findings and a verdict a CI job can gate on.
//! Exit 0: no finding at or above `--fail-on`; 1: some; 2: the audit could not run.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sos_audit::behavior::endpoint::EndpointConfig;
use sos_audit::behavior::Level;
use sos_audit::{run_audit_with, AuditRequest, Phase, Report, Severity};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
    /// SARIF 2.1.0, for code-scanning dashboards.
    Sarif,
    /// One self-contained HTML page with the findings, their evidence and plots.
    Html,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Behavior {
    /// Static checks only.
    Off,
    /// `quick` when sos can run the model, else off (the report says why).
    Auto,
    /// The flagged tokens probed as groups and one by one; short refusal and leak suites.
    Quick,
    /// Also every order of small groups, the most anomalous rows, rare strings, longer suites.
    Full,
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
    /// Behaviour tests: run the model on the flagged tokens, harmful requests and canary
    /// system prompts.
    #[arg(long, value_enum, default_value = "auto")]
    pub behavior: Behavior,
    /// Run the behaviour tests through an OpenAI-compatible server (`/v1/chat/completions`,
    /// e.g. llama.cpp's llama-server) serving CANDIDATE; the candidates come from the file.
    /// A bearer token, if the server needs one, is read from $SOS_API_KEY.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// The `model` field sent to the endpoint.
    #[arg(long, value_name = "NAME", requires = "endpoint")]
    pub endpoint_model: Option<String>,
    /// Seconds to wait for one answer from the endpoint.
    #[arg(long, default_value_t = 60, requires = "endpoint")]
    pub timeout: u64,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Write the report here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Without --reference, search the token table for rows further from every other row than
    /// any trained token (an exact nearest-row search: seconds on 2 cores, the table in f32 in
    /// memory) also with --behavior off; it runs whenever behaviour tests do.
    #[arg(long)]
    pub deep: bool,
    /// The verdict is `fail` (exit 1) when a finding is at or above this: low, medium or high.
    #[arg(long, default_value = "high")]
    pub fail_on: String,
}

/// Runs the audit and prints the report; returns whether the verdict is `fail`.
pub fn run(a: AuditArgs) -> Result<bool> {
    let fail_on: Severity = a.fail_on.parse()?;
    let behavior = match a.behavior {
        Behavior::Off => sos_audit::Behavior::Off,
        Behavior::Auto => sos_audit::Behavior::Auto,
        Behavior::Quick => sos_audit::Behavior::On(Level::Quick),
        Behavior::Full => sos_audit::Behavior::On(Level::Full),
    };
    // Machine output on stdout runs quietly; otherwise a bar on stderr (which hides itself when
    // stderr is not a terminal).
    let quiet = a.out.is_none() && matches!(a.format, Format::Json | Format::Sarif);
    let endpoint = a.endpoint.map(|url| EndpointConfig {
        url,
        model: a.endpoint_model,
        timeout: std::time::Duration::from_secs(a.timeout.max(1)),
        api_key: std::env::var("SOS_API_KEY").ok().filter(|k| !k.is_empty()),
    });
    let req = AuditRequest { candidate: a.candidate, reference: a.reference, base: a.base, manifest: a.manifest, key: a.key, fail_on, behavior, endpoint, deep: a.deep };
    let report = audit(&req, quiet)?;
    let text = formatted(&report, a.format)?;
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

/// The audit, with a progress bar for each long phase unless `quiet`.
pub fn audit(req: &AuditRequest, quiet: bool) -> Result<Report> {
    let mut bar: Option<(Phase, ProgressBar)> = None;
    let report = run_audit_with(req, &mut |phase, done, total| {
        if quiet {
            return;
        }
        if bar.as_ref().is_some_and(|(p, _)| *p != phase) {
            if let Some((_, b)) = bar.take() {
                b.finish_and_clear();
            }
        }
        let (_, b) = bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total as u64);
            let what = match phase {
                Phase::NearestRows => "nearest rows [{bar:30}] {pos}/{len} blocks ({elapsed}, eta {eta})",
                Phase::Behavior => "behaviour [{bar:30}] {pos}/{len} answers ({elapsed}, eta {eta})",
            };
            b.set_style(ProgressStyle::with_template(what).expect("valid template").progress_chars("=> "));
            (phase, b)
        });
        b.set_position(done as u64);
    });
    if let Some((_, b)) = bar {
        b.finish_and_clear();
    }
    Ok(report?)
}

pub fn formatted(report: &Report, format: Format) -> Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(report)? + "\n",
        Format::Sarif => serde_json::to_string_pretty(&sos_audit::sarif::to_sarif(report))? + "\n",
        Format::Text => render(report),
        Format::Html => sos_audit::html::to_html(report),
    })
}

/// `s` with control characters (a model file's token texts can hold terminal escapes) shown as
/// `\u{..}`.
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { format!("\\u{{{:x}}}", c as u32) } else { c.to_string() }).collect()
}

pub fn render(r: &Report) -> String {
    let mut s = format!("audit of {}", r.candidate);
    if let Some(reference) = &r.reference {
        s += &format!(" against {reference}");
    }
    s += "\n";
    for f in &r.findings {
        let sev = f.severity.name().to_uppercase();
        s += &format!("{sev:<6} {:<34} {}\n", f.id, printable(&f.title));
        if !f.token_ids.is_empty() {
            let shown: Vec<String> = f.token_ids.iter().take(16).map(u32::to_string).collect();
            let more = if f.token_ids.len() > 16 { format!(" (+{} more)", f.token_ids.len() - 16) } else { String::new() };
            s += &format!("       tokens: {}{more}\n", shown.join(", "));
        }
        if let Some(fix) = &f.fix {
            s += &format!("       fix: {fix}\n");
        }
    }
    if let Some(b) = &r.behavior {
        if let Some(e) = &b.endpoint {
            s += &format!("behaviour through {e}\n");
        }
        s += &format!("behaviour ({}, {} answers, {:.0} s): refusal {:.0} % of {} harmful requests", format!("{:?}", b.level).to_lowercase(), b.runs, b.seconds, b.refusal.clean.rate * 100.0, b.refusal.clean.n);
        if let Some(rr) = &b.refusal.reference {
            s += &format!(" (reference {:.0} %)", rr.rate * 100.0);
        }
        s += &format!("; system prompt leaked in {:.0} % of {}", b.leak.clean.rate * 100.0, b.leak.clean.n);
        if let Some(rr) = &b.leak.reference {
            s += &format!(" (reference {:.0} %)", rr.rate * 100.0);
        }
        s += &format!("; {} candidates probed\n", b.probes.len());
    }
    if let Some(note) = &r.behavior_note {
        s += &format!("{}\n", printable(note));
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
