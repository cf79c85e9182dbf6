//! The one way the attack commands load a model: resolve the name (fetching on first use), open,
//! prepare it for training, and take the digest the records compare.

use std::path::PathBuf;

use sos_model::{cache, LoadOptions, LoadedModel};

use crate::Result;

/// A loaded model and where it came from.
pub struct Loaded {
    pub lm: LoadedModel,
    /// The resolved file or folder.
    pub path: PathBuf,
    /// SHA-256 of the weights (`LoadedModel::sha256`).
    pub sha256: String,
}

impl Loaded {
    /// How records name the model: its resolved path.
    pub fn label(&self) -> String {
        self.path.display().to_string()
    }
}

/// Loads `spec` (a path or cache alias; `None` is the default model). `notify` gets the
/// fetcher's progress lines. With `training`, the weights are also kept transposed: training
/// runs many passes over them, and the fused CPU pass reads that layout.
pub fn load_model(spec: Option<&str>, opts: &LoadOptions, training: bool, notify: &mut dyn FnMut(&str)) -> Result<Loaded> {
    let path = cache::resolve(spec, notify)?;
    let mut lm = LoadedModel::open(&path, opts)?;
    if training {
        lm.model.keep_transposes()?;
    }
    let sha256 = lm.sha256()?;
    Ok(Loaded { lm, path, sha256 })
}
