//! `sos-audit`: the defender's side. `audit::run_audit` (what `sos audit` runs) opens a
//! downloaded model, a GGUF file or a Hugging Face folder (`folder`), and, when given, a trusted
//! reference, and runs the checks, one module each:
//! `structure` (the loader's rules), `tokenizer` (added and user-defined tokens), `weights`
//! (per tensor identical, re-quantized or changed, with `ranges` bounding what re-quantization
//! can explain; the planted rows named), `template` (the chat template), `side_files` (PEFT
//! adapters whose weights are embeddings, pickles), then `behavior` (the model run on flagged
//! tokens, harmful requests and canary system prompts). Each check returns
//! `finding::Finding`s; the `Report` holds them with the verdict, and prints as JSON, SARIF
//! (`sarif`) or one HTML page (`html`).

pub mod audit;
pub mod behavior;
pub mod error;
pub mod finding;
pub mod folder;
pub mod html;
pub mod isolation;
pub mod manifest;
pub mod nearest;
pub mod provenance;
pub mod ranges;
pub mod report;
pub mod sarif;
pub mod side_files;
pub mod signature;
pub mod structure;
pub mod template;
pub mod tokenizer;
pub mod weights;

pub use audit::{run_audit, run_audit_with, AuditRequest, Behavior, Phase};
pub use error::{Error, Result};
pub use finding::{Check, Finding, Severity};
pub use report::Report;
