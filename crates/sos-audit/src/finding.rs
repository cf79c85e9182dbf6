//! What an audit reports: findings, each from one check with a severity, and the verdict.
//! The JSON shape is documented in the README ("Audit report") and kept stable: fields are only
//! ever added.

use serde::Serialize;
use serde_json::Value as Json;

/// The report's schema version.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }
}

impl std::str::FromStr for Severity {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "low" => Ok(Severity::Low),
            "medium" => Ok(Severity::Medium),
            "high" => Ok(Severity::High),
            _ => Err(crate::Error::Invalid(format!("unknown severity `{s}` (expected low, medium or high)"))),
        }
    }
}

/// The checks of an audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    Structure,
    Provenance,
    Tokenizer,
    Weights,
    Template,
    SideFiles,
    Behavior,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Stable identifier of the kind of finding, `check.what` (e.g. `tokenizer.added-token`).
    pub id: String,
    pub check: Check,
    pub severity: Severity,
    pub title: String,
    /// The tokens involved, when any.
    pub token_ids: Vec<u32>,
    /// The numbers and texts behind the finding.
    pub evidence: Json,
    /// What to do about it (usually a `sos sanitize` command).
    pub fix: Option<String>,
}

impl Finding {
    pub fn new(id: &str, check: Check, severity: Severity, title: impl Into<String>) -> Self {
        Finding { id: id.to_string(), check, severity, title: title.into(), token_ids: Vec::new(), evidence: Json::Null, fix: None }
    }
    pub fn tokens(mut self, ids: Vec<u32>) -> Self {
        self.token_ids = ids;
        self
    }
    pub fn evidence(mut self, e: Json) -> Self {
        self.evidence = e;
        self
    }
    pub fn fix(mut self, f: impl Into<String>) -> Self {
        self.fix = Some(f.into());
        self
    }
}

/// Findings per severity.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub high: usize,
    pub medium: usize,
    pub low: usize,
}

/// The audit's result: what `--format json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    /// `pass` or `fail`: whether any finding is at or above `fail_on`.
    pub verdict: &'static str,
    pub fail_on: Severity,
    pub candidate: String,
    pub reference: Option<String>,
    pub findings: Vec<Finding>,
    pub summary: Summary,
    /// Milliseconds per check, and `total`.
    pub timings_ms: serde_json::Map<String, Json>,
    pub sos_version: &'static str,
    /// The token table's row norms (histogram and largest rows), when its type can be read.
    pub rows: Option<crate::weights::RowStats>,
    /// The behaviour tests' numbers, when they ran.
    pub behavior: Option<crate::behavior::Summary>,
    /// Why behaviour tests did not run, when they were not turned off.
    pub behavior_note: Option<String>,
}

impl Report {
    pub fn new(candidate: String, reference: Option<String>, mut findings: Vec<Finding>, fail_on: Severity, timings_ms: serde_json::Map<String, Json>) -> Self {
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        let mut summary = Summary::default();
        for f in &findings {
            match f.severity {
                Severity::High => summary.high += 1,
                Severity::Medium => summary.medium += 1,
                Severity::Low => summary.low += 1,
            }
        }
        let fail = findings.iter().any(|f| f.severity >= fail_on);
        Report { schema: SCHEMA, verdict: if fail { "fail" } else { "pass" }, fail_on, candidate, reference, findings, summary, timings_ms, sos_version: env!("CARGO_PKG_VERSION"), rows: None, behavior: None, behavior_note: None }
    }

    pub fn failed(&self) -> bool {
        self.verdict == "fail"
    }
}
