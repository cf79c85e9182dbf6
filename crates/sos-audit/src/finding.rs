//! What an audit finds: findings, each from one check with a severity (`report.rs` holds them
//! with the verdict).

use serde::Serialize;
use serde_json::Value as Json;

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
