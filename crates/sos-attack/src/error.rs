//! Errors of the attack library. Errors about a file name the file.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] sos_model::Error),
    /// A file (dataset, config, checkpoint, artifact) that cannot be read or is malformed.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// Settings that do not make sense together.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
}
