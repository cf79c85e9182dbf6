//! The structure check: what llama.cpp's GGUF loader would refuse or read otherwise than sos.

use serde_json::json;
use sos_model::gguf::Gguf;

use crate::finding::{Check, Finding, Severity};

pub fn gguf(g: &Gguf) -> Vec<Finding> {
    match g.check_llama_cpp() {
        Ok(()) => Vec::new(),
        Err(e) => vec![Finding::new("structure.loader-rules", Check::Structure, Severity::High, format!("breaks llama.cpp's loader rules: {e}")).evidence(json!({"error": e.to_string()}))],
    }
}
