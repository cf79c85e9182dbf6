//! The text side of a model: its tokenizer and its chat template.

pub mod template;
pub mod tokenizer;
