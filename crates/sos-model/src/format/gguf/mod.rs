//! GGUF: what a file holds (`types.rs`), reading it as untrusted input (`reader.rs`), and
//! writing one that llama.cpp's loader accepts (`writer.rs`), and checking a file against that
//! loader's rules (`rules.rs`).

mod reader;
mod rules;
#[cfg(test)]
mod tests;
mod types;
mod writer;

pub use reader::Gguf;
pub use types::{TensorInfo, TensorType, Value, MAGIC};
pub use writer::Writer;
