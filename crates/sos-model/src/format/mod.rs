//! Model file formats: GGUF (`gguf/`) and the safetensors files of a Hugging Face folder.

pub mod gguf;
pub mod safetensors;
