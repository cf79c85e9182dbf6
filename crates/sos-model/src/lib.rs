//! `sos-model`: load, tokenize, template, run and differentiate open LLMs.
//!
//! Data flows one way: a file (`format`: GGUF, safetensors) becomes a `Config` and a `Model`
//! (`model/load.rs`), opened together with its `Tokenizer` and `ChatTemplate` (`text`) as a
//! `LoadedModel`; `Model::forward` runs ids or spliced embeddings on the CPU kernels
//! (`kernels`) or candle's tensor ops; `generate` decodes; `Model::loss_and_input_grad` returns
//! gradients to the inputs. See ARCHITECTURE.md.

mod bytes;
pub mod cache;
mod error;
mod format;
pub mod fsutil;
pub mod generate;
mod kernels;
mod loaded;
mod model;
mod text;
pub mod tiny;

pub use error::{Error, Result};
pub use format::{gguf, safetensors};
pub use loaded::{Format, LoadOptions, LoadedModel};
pub use model::config::{Arch, Config};
pub use model::{Embedding, Exec, KvCache, Layer, Linear, LossGrad, Model};
pub use text::template::{ChatTemplate, Message, BUILTIN_NAMES as BUILTIN_TEMPLATES};
pub use text::tokenizer::{StreamDecoder, Tokenizer};
