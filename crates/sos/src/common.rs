//! Options shared by every command that runs a model, and the one way they load it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use sos_model::{cache, Exec, LoadOptions, LoadedModel};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file, a Hugging Face folder, or a cache alias (`sos model list`); default: the
    /// default model, fetched on first use.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// f32: weights dequantized (exact, differentiable); quant: weights kept quantized.
    #[arg(long, default_value = "f32")]
    pub exec: Exec,
    /// Use a built-in chat template (chatml, llama2, llama3) instead of the model's own.
    #[arg(long)]
    pub template: Option<String>,
    /// cpu, or cuda / cuda:N (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s.strip_prefix("cuda:").map(str::parse::<usize>).transpose().context("bad CUDA ordinal")?.unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this sos was built without CUDA (rebuild with `--features cuda`)");
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("unknown device `{other}` (expected cpu or cuda[:N])"),
    }
}

impl ModelArgs {
    /// Resolves the model path, fetching the default or an alias on first use (with a progress
    /// line on stderr).
    pub fn path(&self) -> Result<PathBuf> {
        Ok(cache::resolve(self.model.as_deref(), &mut |msg| eprintln!("{msg}"))?)
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let path = self.path()?;
        let opts = LoadOptions { exec: self.exec, device: device(&self.device)?, template: self.template.clone() };
        Ok(LoadedModel::open(&path, &opts)?)
    }
}

/// Peak resident memory of this process so far, in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
