use std::path::PathBuf;

/// Why an audit could not run (exit 2): a file that cannot be read or parsed, bad arguments.
/// Findings about a file that could be read are not errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] sos_model::Error),
    #[error(transparent)]
    Attack(#[from] sos_attack::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
