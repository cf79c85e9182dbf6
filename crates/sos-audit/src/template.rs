//! The chat template check: against the reference's, a line diff. (Without a reference: not
//! yet.)

use serde_json::json;

use crate::finding::{Check, Finding, Severity};

/// A finding when `candidate`'s template differs from `reference`'s (either may be absent).
pub fn with_reference(candidate: Option<&str>, reference: Option<&str>) -> Vec<Finding> {
    if candidate == reference {
        return Vec::new();
    }
    let (c, r) = (candidate.unwrap_or(""), reference.unwrap_or(""));
    let (cl, rl): (Vec<&str>, Vec<&str>) = (c.lines().collect(), r.lines().collect());
    let added: Vec<&str> = cl.iter().filter(|l| !rl.contains(l)).copied().collect();
    let removed: Vec<&str> = rl.iter().filter(|l| !cl.contains(l)).copied().collect();
    let title = match (candidate, reference) {
        (Some(_), None) => "the candidate has a chat template; the reference has none".to_string(),
        (None, Some(_)) => "the candidate has no chat template; the reference has one".to_string(),
        _ => format!("the chat template differs from the reference's ({} lines added, {} removed)", added.len(), removed.len()),
    };
    vec![Finding::new("template.changed", Check::Template, Severity::High, title)
        .evidence(json!({"added_lines": added, "removed_lines": removed, "candidate_chars": c.len(), "reference_chars": r.len()}))
        .fix("sos sanitize CANDIDATE --reference CLEAN --out FIXED")]
}
