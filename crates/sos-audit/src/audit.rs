//! `run_audit`: the checks of an audit in order, each timed, into one report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Map, Value as Json};
use sos_model::gguf::Gguf;

use crate::finding::{Finding, Report, Severity};
use crate::{structure, template, tokenizer, weights, Error, Result};

/// What `sos audit` was asked.
pub struct AuditRequest {
    pub candidate: PathBuf,
    pub reference: Option<PathBuf>,
    /// Findings at or above this make the verdict `fail`.
    pub fail_on: Severity,
}

/// Runs every check on the candidate (and its reference). An `Err` is an audit that could not
/// run (unreadable or unparsable input): exit 2, not a verdict.
pub fn run_audit(req: &AuditRequest) -> Result<Report> {
    let t0 = Instant::now();
    let mut timings = Map::new();
    let mut findings = Vec::new();
    let mut timed = |name: &str, f: &mut dyn FnMut() -> Result<Vec<Finding>>| -> Result<()> {
        let t = Instant::now();
        findings.extend(f()?);
        timings.insert(name.to_string(), Json::from(t.elapsed().as_secs_f64() * 1e3));
        Ok(())
    };
    let candidate = open_gguf(&req.candidate)?;
    let reference = req.reference.as_deref().map(open_gguf).transpose()?;
    timed("structure", &mut || Ok(structure::gguf(&candidate)))?;
    match &reference {
        Some(r) => {
            timed("tokenizer", &mut || Ok(tokenizer::with_reference(&candidate, r)))?;
            timed("weights", &mut || weights::with_reference(&candidate, r))?;
            timed("template", &mut || Ok(template::with_reference(candidate.get_str("tokenizer.chat_template"), r.get_str("tokenizer.chat_template"))))?;
        }
        None => {
            timed("tokenizer", &mut || Ok(tokenizer::alone(&candidate)))?;
            timed("weights", &mut || weights::alone(&candidate))?;
        }
    }
    timings.insert("total".into(), Json::from(t0.elapsed().as_secs_f64() * 1e3));
    let shown = |p: &Path| p.display().to_string();
    Ok(Report::new(shown(&req.candidate), req.reference.as_deref().map(shown), findings, req.fail_on, timings))
}

fn open_gguf(path: &Path) -> Result<Gguf> {
    if !path.exists() {
        return Err(Error::File { path: path.to_path_buf(), msg: "no such file".into() });
    }
    if path.is_dir() {
        return Err(Error::File { path: path.to_path_buf(), msg: "a folder: Hugging Face folders and PEFT adapters are not audited yet (GGUF files are)".into() });
    }
    Ok(Gguf::open(path)?)
}
