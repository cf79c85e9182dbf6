//! The library's error type. Every error that comes from a file names the file, because a user
//! with three downloads open needs to know which one is broken.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or read at all.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file was read but its content is malformed, hostile or unsupported.
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// A request that does not fit the model (bad token id, prompt too long, ...).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
}

/// `bail_format!(path, "...", args)` returns a `Format` error for `path`.
#[macro_export]
macro_rules! bail_format {
    ($path:expr, $($arg:tt)*) => {
        return Err($crate::Error::format($path, format!($($arg)*)))
    };
}
