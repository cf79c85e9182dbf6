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

/// What the model is loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Inference,
    /// Training runs many passes over the weights, and the fused CPU pass reads them transposed:
    /// a transposed copy of every weight (`Model::keep_transposes`) saves transposing them on
    /// each pass, at the cost of their memory once more. The copies are kept when they take at
    /// most half the memory still available once the model is loaded, and never with
    /// `low_memory`. Kept or not, the pass computes the same bits.
    Training { low_memory: bool },
}

/// Loads `spec` (a path or cache alias; `None` is the default model). `notify` gets the lines a
/// user should see: the fetcher's progress, and whether training keeps its copies of the weights.
pub fn load_model(spec: Option<&str>, opts: &LoadOptions, purpose: Purpose, notify: &mut dyn FnMut(&str)) -> Result<Loaded> {
    let path = cache::resolve(spec, notify)?;
    let mut lm = LoadedModel::open(&path, opts)?;
    if let Purpose::Training { low_memory } = purpose {
        let need = lm.model.transposes_bytes();
        let available = available_memory();
        if low_memory || available.is_some_and(|a| need > a / 2) {
            let why = match available {
                Some(a) if !low_memory => format!("they would take {} of the {} available", gb(need), gb(a)),
                _ => "--low-memory".to_string(),
            };
            notify(&format!("training without transposed copies of the weights ({why}): each pass transposes them as it goes, steps take ~25 % longer, the results are the same"));
        } else {
            lm.model.keep_transposes()?;
        }
    }
    let sha256 = lm.sha256()?;
    Ok(Loaded { lm, path, sha256 })
}

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// `MemAvailable` of `/proc/meminfo`: what the kernel can hand out without swapping. `None`
/// where there is no such file (the copies are then kept).
fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
