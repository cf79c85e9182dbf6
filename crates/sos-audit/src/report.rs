//! The audit's result: the findings with the verdict, the row statistics and the behaviour
//! numbers. The JSON shape is documented in the README ("Audit") and kept stable: fields are
//! only ever added.

use serde::Serialize;
use serde_json::Value as Json;

use crate::finding::{Finding, Severity};

/// The report's schema version.
pub const SCHEMA: u32 = 1;

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
    /// Each ordinary row's nearest-row cosine (histogram, threshold, loneliest rows), when the
    /// search ran.
    pub isolation: Option<crate::isolation::Isolation>,
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
        Report { schema: SCHEMA, verdict: if fail { "fail" } else { "pass" }, fail_on, candidate, reference, findings, summary, timings_ms, sos_version: env!("CARGO_PKG_VERSION"), rows: None, isolation: None, behavior: None, behavior_note: None }
    }

    pub fn failed(&self) -> bool {
        self.verdict == "fail"
    }
}
