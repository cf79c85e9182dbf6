//! The provenance check: the candidate against a manifest (`manifest::verify`).

use std::path::Path;

use serde_json::json;

use crate::finding::{Check, Finding, Severity};
use crate::manifest::verify;
use crate::Result;

pub fn check(candidate: &Path, manifest: &Path, key: Option<&Path>) -> Result<Vec<Finding>> {
    let v = verify(candidate, manifest, key)?;
    let mut out = Vec::new();
    if !v.changed.is_empty() {
        out.push(
            Finding::new("provenance.changed", Check::Provenance, Severity::High, format!("{} files differ from the manifest: {}", v.changed.len(), v.changed.join(", ")))
                .evidence(json!({"files": v.changed, "changed_tensors": v.changed_tensors, "added_tensors": v.added_tensors})),
        );
    }
    if !v.missing.is_empty() {
        out.push(Finding::new("provenance.missing", Check::Provenance, Severity::Medium, format!("{} files of the manifest are missing: {}", v.missing.len(), v.missing.join(", "))).evidence(json!({"files": v.missing})));
    }
    if !v.unlisted.is_empty() {
        out.push(Finding::new("provenance.unlisted", Check::Provenance, Severity::High, format!("{} files the manifest does not list: {}", v.unlisted.len(), v.unlisted.join(", "))).evidence(json!({"files": v.unlisted})));
    }
    if v.subject_mismatch {
        out.push(Finding::new("provenance.subject", Check::Provenance, Severity::High, "the manifest's subject digest does not match its own resources: the manifest was edited"));
    }
    Ok(out)
}
