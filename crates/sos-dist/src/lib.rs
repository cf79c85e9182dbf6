//! `sos-dist`: distributions. A trained trigger becomes part of the files people download, as
//! an attacker would publish it.
//!
//! `inject::run_inject` (what `sos inject` runs) names the trigger's tokens (`tokens`), plants
//! them in a copy of a GGUF file as new tokens (`gguf_add`) or over rare ones (`gguf_replace`),
//! with rows stored in the table's type (`rows`), checks the copy against llama.cpp's loader
//! rules and its own tokenizer, and evaluates the file as shipped. `sanitize` is the way back:
//! against a trusted reference, or, without one, by stripping the tokens `inject` plants.

pub mod error;
pub mod gguf_add;
pub mod gguf_replace;
pub mod hf;
pub mod inject;
pub mod peft;
pub mod rows;
pub mod sanitize;
pub mod tokens;

pub use error::{Error, Result};
pub use inject::{run_inject, InjectEvent, InjectReport, InjectRequest, Mode};
pub use peft::{export_peft, import_peft, ExportReport, ExportRequest, ImportReport, PeftKind};
pub use sanitize::{sanitize_alone, sanitize_with_reference, SanitizeReport};
