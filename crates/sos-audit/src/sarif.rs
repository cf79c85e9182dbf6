//! The report as SARIF 2.1.0, for code-scanning dashboards: one run, one rule per finding id,
//! one result per finding (high -> error, medium -> warning, low -> note), the finding's
//! evidence in the result's property bag. Valid against the OASIS schema (tested).

use std::collections::BTreeMap;

use serde_json::{json, Value as Json};

use crate::finding::Severity;
use crate::report::Report;

const INFO_URI: &str = "https://example.invalid/sos";

fn level(s: Severity) -> &'static str {
    match s {
        Severity::High => "error",
        Severity::Medium => "warning",
        Severity::Low => "note",
    }
}

/// A path as a URI reference (SARIF's `artifactLocation.uri`): percent-encoded where needed.
fn uri(path: &str) -> String {
    let mut s = String::with_capacity(path.len());
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => s.push(b as char),
            _ => s.push_str(&format!("%{b:02X}")),
        }
    }
    s
}

pub fn to_sarif(r: &Report) -> Json {
    let mut rules: BTreeMap<&str, Json> = BTreeMap::new();
    for f in &r.findings {
        rules.entry(f.id.as_str()).or_insert_with(|| {
            json!({
                "id": f.id,
                "shortDescription": {"text": f.id.replace(['.', '-'], " ")},
                "defaultConfiguration": {"level": level(f.severity)},
                "properties": {"check": f.check},
            })
        });
    }
    let index: BTreeMap<&str, usize> = rules.keys().enumerate().map(|(i, k)| (*k, i)).collect();
    let location = json!([{"physicalLocation": {"artifactLocation": {"uri": uri(&r.candidate)}}}]);
    let results: Vec<Json> = r
        .findings
        .iter()
        .map(|f| {
            let mut text = f.title.clone();
            if let Some(fix) = &f.fix {
                text += &format!(" Fix: {fix}");
            }
            json!({
                "ruleId": f.id,
                "ruleIndex": index[f.id.as_str()],
                "level": level(f.severity),
                "message": {"text": text},
                "locations": location,
                "properties": {"severity": f.severity, "check": f.check, "token_ids": f.token_ids, "evidence": f.evidence},
            })
        })
        .collect();
    json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "sos", "version": r.sos_version, "informationUri": INFO_URI, "rules": rules.into_values().collect::<Vec<_>>()}},
            "invocations": [{"executionSuccessful": true}],
            "results": results,
            "properties": {"verdict": r.verdict, "fail_on": r.fail_on, "summary": r.summary, "reference": r.reference, "timings_ms": r.timings_ms},
        }],
    })
}
